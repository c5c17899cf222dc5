"""Take the README's pictures of the web page: the dashboard under a real load and a chat.

Starts `bucketserve serve` on the embedded model (buckets that split early: ``--bucket-n-max
8``, 16 running at most), sends ShareGPT requests at a Poisson rate above what the engine
keeps up with, so that a queue builds and splits into buckets, opens the page in headless
chromium (Playwright, the system browser), and saves:

    docs/images/dashboard.png   the dashboard, after --load-seconds of load
    docs/images/chat.png        the chat: a question answered, then a long reply stopped

How to run (a quiet machine; about two minutes)
    .venv/bin/python scripts/screenshots.py
    .venv/bin/python scripts/screenshots.py --rate 6 --load-seconds 90 --out docs/images
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import threading
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from bucketserve.bench.client import ClientConfig
from bucketserve.bench.datasets import load_tokenizer, sharegpt_requests
from bucketserve.bench.runner import run_workload
from bucketserve.bench.servers import managed_server
from bucketserve.workloads.arrivals import poisson

MODEL = "SmolLM2-135M-Instruct"


def load(url: str, rate: float, seconds: float, seed: int) -> threading.Thread:
    """ShareGPT requests arriving at ``rate`` per second for ``seconds``, in a thread."""
    n = int(rate * seconds)
    requests = sharegpt_requests(load_tokenizer(None), n, seed, max_prompt_len=1024, max_output_len=256)
    cfg = ClientConfig(base_url=url, model=MODEL, request_timeout=600)
    arrivals = poisson(len(requests), rate, seed)
    thread = threading.Thread(
        target=lambda: asyncio.run(run_workload(requests, arrivals, cfg, progress=False)), daemon=True
    )
    thread.start()
    return thread


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
    p.add_argument("--rate", type=float, default=5.0, help="ShareGPT requests per second (default 5)")
    p.add_argument("--load-seconds", type=float, default=75.0, help="load before the picture (default 75)")
    p.add_argument("--out", type=Path, default=Path("docs/images"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    browser_path = os.environ.get("BUCKETSERVE_CHROMIUM") or shutil.which("chromium")
    if browser_path is None:
        raise SystemExit("no chromium: apt-get install chromium (scripts/setup.sh does), or set BUCKETSERVE_CHROMIUM")
    a.out.mkdir(parents=True, exist_ok=True)
    args = ["--max-num-seqs", "16", "--bucket-n-max", "8", "--slo-classes", "256:2:0.25,2048:8:0.25"]
    with managed_server("bucket", args, a.out / "screenshots.server.log") as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1750})
        page.goto(url + "/")
        runner = load(url, a.rate, a.load_seconds + 30, a.seed)
        page.wait_for_timeout(a.load_seconds * 1000)
        page.screenshot(path=a.out / "dashboard.png", full_page=True)
        print(f"wrote {a.out / 'dashboard.png'}")
        chat_page = browser.new_page(viewport={"width": 1100, "height": 760})
        chat_page.goto(url + "/")
        chat(chat_page)
        chat_page.screenshot(path=a.out / "chat.png")
        print(f"wrote {a.out / 'chat.png'}")
        browser.close()
        runner.join(0)  # the rest of the load stops with the server


if __name__ == "__main__":
    main()
