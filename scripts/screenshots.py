"""Take the README's pictures of the web page: the dashboard under a real load and a chat.

Starts `bucketserve serve` on the embedded model (buckets that split early: ``--bucket-n-max
8``, 16 running at most), sends ShareGPT requests in a burst above what the engine keeps up
with (``--burst-rate`` for ``--burst-seconds``: a queue builds and splits into buckets), then
calmly (``--calm-rate``: the queue drains and the buckets merge), opens the page in headless
chromium (Playwright, the system browser) and saves:

    docs/images/dashboard.png   the dashboard once the burst's queue has drained
    docs/images/chat.png        the chat: a question answered, then a long reply stopped

How to run (a quiet machine; about three minutes)
    .venv/bin/python scripts/screenshots.py
    .venv/bin/python scripts/screenshots.py --burst-rate 4 --burst-seconds 30 --out /tmp/shots
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

from bucketserve.bench.client import ClientConfig
from bucketserve.bench.datasets import load_tokenizer, sharegpt_requests
from bucketserve.bench.runner import run_workload
from bucketserve.bench.servers import managed_server
from bucketserve.workloads.arrivals import poisson

MODEL = "SmolLM2-135M-Instruct"


def load(url: str, burst_rate: float, burst_s: float, calm_rate: float, calm_s: float, seed: int) -> None:
    """ShareGPT requests at ``burst_rate`` per second for ``burst_s``, then at ``calm_rate``
    for ``calm_s``, sent from a thread (the server stops whatever is left when it stops)."""
    n_burst, n_calm = int(burst_rate * burst_s), int(calm_rate * calm_s)
    requests = sharegpt_requests(
        load_tokenizer(None), n_burst + n_calm, seed, max_prompt_len=1024, max_output_len=256
    )
    arrivals = poisson(n_burst, burst_rate, seed)
    arrivals += [burst_s + t for t in poisson(n_calm, calm_rate, seed + 1)]
    cfg = ClientConfig(base_url=url, model=MODEL, request_timeout=600)
    threading.Thread(
        target=lambda: asyncio.run(run_workload(requests, arrivals, cfg, progress=False)), daemon=True
    ).start()


def wait_until_drained(url: str, after_s: float, timeout_s: float) -> None:
    """Wait ``after_s``, then until fewer requests wait than split a bucket (8), or the timeout."""
    time.sleep(after_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(url + "/dashboard/state").json()["current"]["waiting"] < 8:
            break
        time.sleep(1)
    time.sleep(5)  # a few samples after the merge


def chat(page: Page) -> None:
    page.click("button[data-tab=chat]")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "64")
    page.fill("#prompt", "What is the capital of France?")
    page.keyboard.press("Enter")
    page.locator(".msg.assistant[data-done=true]").wait_for(timeout=120_000)
    page.fill("#temperature", "0.7")
    page.fill("#max-tokens", "512")
    page.fill("#prompt", "Write a short story about a lighthouse keeper.")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "document.querySelectorAll('.msg.assistant .text')[1]?.textContent.length > 200", timeout=120_000
    )
    page.click("#stop")
    page.locator(".msg.assistant[data-done=true] >> nth=1").wait_for(timeout=30_000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--burst-rate", type=float, default=3.0, help="requests/s in the burst (default 3)")
    p.add_argument("--burst-seconds", type=float, default=40.0, help="how long the burst lasts (default 40)")
    p.add_argument("--calm-rate", type=float, default=0.3, help="requests/s after it (default 0.3)")
    p.add_argument("--out", type=Path, default=Path("docs/images"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    browser_path = os.environ.get("BUCKETSERVE_CHROMIUM") or shutil.which("chromium")
    if browser_path is None:
        raise SystemExit("no chromium: apt-get install chromium (setup.sh does), or set BUCKETSERVE_CHROMIUM")
    a.out.mkdir(parents=True, exist_ok=True)
    log = Path("results/screenshots.server.log")
    log.parent.mkdir(exist_ok=True)
    args = ["--max-num-seqs", "16", "--bucket-n-max", "8", "--slo-classes", "256:2:0.25,2048:8:0.25"]
    with managed_server("bucket", args, log) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1400}, bypass_csp=True)
        page.goto(url + "/")
        load(url, a.burst_rate, a.burst_seconds, a.calm_rate, 600, a.seed)
        wait_until_drained(url, a.burst_seconds, timeout_s=240)
        page.screenshot(path=a.out / "dashboard.png", full_page=True)
        print(f"wrote {a.out / 'dashboard.png'}")
        chat_page = browser.new_page(viewport={"width": 1100, "height": 760}, bypass_csp=True)
        chat_page.goto(url + "/")
        chat(chat_page)
        chat_page.screenshot(path=a.out / "chat.png")
        print(f"wrote {a.out / 'chat.png'}")
        browser.close()


if __name__ == "__main__":
    main()
