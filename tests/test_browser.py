"""The web page in a real headless browser: Debian's chromium, driven by Playwright (the
system browser; Playwright downloads none). `scripts/setup.sh` installs both. Where the browser
cannot start these tests fail and say what to install; they never skip.

The server runs a tiny random-weight model with a 4,096-token context, so that a reply can
run long enough to be stopped. The tests add ``ignore_eos`` to the page's chat requests
(a random model may end a reply at once); the page itself sends what a user asks for."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import build_tiny_model
from server_process import MODEL, Server, metric

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
INSTALL = (
    "run `bash scripts/setup.sh` as root (it runs `apt-get install chromium`), or set BUCKETSERVE_CHROMIUM"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the browser tests need playwright: run `bash scripts/setup.sh` (pip install -e '.[dev]')"
        )
    path = os.environ.get("BUCKETSERVE_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    if path is None:
        pytest.fail(f"no chromium found (looked for {', '.join(BROWSERS)}): {INSTALL}")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        except Exception as e:
            pytest.fail(f"chromium at {path} could not start ({e}); {INSTALL}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def long_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Four wider layers: a few ms a token, so that a 3,500-token reply outlasts the Stop test's
    # reaction by seconds (the 2-layer model wrote it in under 3 s, and Stop could land late).
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-llama-4k"),
        max_position_embeddings=4096,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
    )


@pytest.fixture(scope="module")
def server(long_tiny_model_dir: Path) -> Iterator[Server]:
    # Few running slots and a low split threshold: a burst queues, and its queue splits.
    srv = Server(
        long_tiny_model_dir, "--kv-cache-memory", "40MiB", "--max-num-seqs", "4", "--bucket-n-max", "4"
    )
    yield srv
    assert srv.stop() == 0, "".join(srv.log)


class Page:
    """A browser tab on the server's page, recording console errors and uncaught exceptions."""

    def __init__(self, browser: object, url: str, ignore_eos: bool = True) -> None:
        # bypass_csp: the page's policy forbids eval, which Playwright's own checks use; what the
        # policy guards (nothing loaded from elsewhere) is checked on every request below.
        self.page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)  # type: ignore[attr-defined]
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # Nothing from anywhere but the server itself.
        self.page.on(
            "request",
            lambda r: None if r.url.startswith((url.rstrip("/"), "data:")) else self.errors.append(r.url),
        )
        if ignore_eos:
            self.page.route("**/v1/chat/completions", _with_ignore_eos)
        self.page.goto(url)

    def close(self) -> None:
        self.page.close()


def _with_ignore_eos(route: object) -> None:
    body = json.loads(route.request.post_data)  # type: ignore[attr-defined]
    route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))  # type: ignore[attr-defined]


@pytest.fixture
def page(browser: object, server: Server) -> Iterator[Page]:
    p = Page(browser, server.url + "/")
    yield p
    p.close()


def aborted(srv: Server) -> float:
    """Requests the server ended because their client left."""
    return metric(srv.metrics(), "bucketserve:request_success_total", finished_reason="abort")


def engine_state(srv: Server) -> dict:
    return httpx.get(srv.url + "/dashboard/state").json()


def test_the_page_loads_with_no_console_errors_and_shows_the_server(page: Page) -> None:
    p = page.page
    p.wait_for_function("document.querySelector('#settings tbody').childElementCount > 0")
    assert p.inner_text("#model") == MODEL
    assert p.inner_text("#policy") == "policy: bucket"
    assert "max_num_seqs\t4" in p.inner_text("#settings")
    assert p.locator("#bucket-table tbody tr").count() == 1  # one bucket while nothing waits
    p.wait_for_timeout(1500)  # a few polls
    assert page.errors == []


def test_the_dashboard_shows_the_buckets_of_a_running_load_and_their_counts_change(
    page: Page, server: Server
) -> None:
    p = page.page
    p.wait_for_function("document.querySelector('#settings tbody').childElementCount > 0")
    body = {"model": MODEL, "max_tokens": 300, "ignore_eos": True}
    prompts = ["hi"] * 24 + ["The quick brown fox jumps over the lazy dog. " * 6] * 8

    def load() -> None:
        import asyncio

        async def burst() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                await asyncio.gather(
                    *(c.post("/v1/completions", json={**body, "prompt": q}) for q in prompts)
                )

        asyncio.run(burst())

    runner = threading.Thread(target=load)
    runner.start()
    waiting_seen, tables_seen = set(), set()
    try:
        deadline = time.monotonic() + 30
        while runner.is_alive() and time.monotonic() < deadline:
            waiting_seen.add(p.inner_text("#c-waiting"))
            if p.locator("#bucket-table tbody tr").count() > 1:  # split: intervals and their counts
                tables_seen.add(p.inner_text("#bucket-table tbody"))
            p.wait_for_timeout(250)
    finally:
        runner.join(120)
    busy = {w for w in waiting_seen if w not in ("0", "–")}
    assert len(busy) >= 2, f"the waiting count did not change under load: {waiting_seen}"
    assert len(tables_seen) >= 2, f"the split buckets' counts did not change on the page: {tables_seen}"
    p.wait_for_function("document.querySelector('#bucket-events').textContent.includes('split')")
    # Once the load is done the queue drains and the buckets merge back into one.
    p.wait_for_function("document.querySelectorAll('#bucket-table tbody tr').length === 1")
    assert p.inner_text("#c-waiting") == "0"
    assert page.errors == []


def test_a_chat_message_streams_a_reply_with_its_ttft_and_rate(page: Page) -> None:
    p = page.page
    p.click("button[data-tab=chat]")
    # Count the reply's updates as they land: a streamed reply grows many times.
    p.evaluate(
        """() => {
          window.updates = 0;
          new MutationObserver(() => { window.updates += 1; }).observe(
            document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    p.fill("#max-tokens", "300")
    p.fill("#prompt", "What is the capital of France?")
    p.keyboard.press("Enter")
    done = p.locator(".msg.assistant[data-done=true]")
    done.wait_for(timeout=60_000)
    assert p.inner_text(".msg.user") == "What is the capital of France?"
    meta = done.locator(".meta").inner_text()
    assert "TTFT" in meta and "tokens/s" in meta and "300 tokens" in meta, meta
    assert len(done.locator(".text").inner_text()) > 0
    assert p.evaluate("window.updates") > 10  # streamed, not written once at the end
    assert p.is_disabled("#stop") and p.is_enabled("#send")
    assert page.errors == []


def test_stop_aborts_the_reply_and_the_server_frees_its_kv_cache(page: Page, server: Server) -> None:
    p = page.page
    p.click("button[data-tab=chat]")
    p.fill("#max-tokens", "3500")
    p.fill("#prompt", "Tell me a very long story.")
    p.click("#send")
    p.wait_for_function("document.querySelector('.msg.assistant .text').textContent.length > 0")
    assert engine_state(server)["totals"]["kv_blocks_used"] > 0
    aborted_before = aborted(server)
    p.click("#stop")
    meta = p.locator(".msg.assistant[data-done=true] .meta")
    meta.wait_for(timeout=10_000)
    assert meta.inner_text().endswith("· stopped")  # not "stopped at max tokens"
    assert aborted(server) == aborted_before + 1  # the server ended it as an abort
    deadline = time.monotonic() + 5
    while (s := engine_state(server))["totals"]["kv_blocks_used"] > 0 or s["current"]["running"] > 0:
        assert time.monotonic() < deadline, f"KV still in use after Stop: {s['totals']}"
        time.sleep(0.05)
    tokens = int(p.get_attribute(".msg.assistant[data-done=true]", "data-tokens"))
    assert 0 < tokens < 3500
    # and the page's own dashboard says so
    p.click("button[data-tab=dashboard]")
    p.wait_for_function("document.getElementById('c-kv').textContent === '0.0%'")
    assert page.errors == []


@pytest.fixture(scope="module")
def guarded(long_tiny_model_dir: Path) -> Iterator[Server]:
    # Debug logging: the access log is on, so a key in a URL would show in it.
    srv = Server(
        long_tiny_model_dir, "--kv-cache-memory", "40MiB", "--api-key", "s3cret-key", log_level="debug"
    )
    yield srv
    srv.stop()


def test_with_an_api_key_the_page_asks_for_it_and_keeps_it_out_of_urls_and_logs(
    browser: object, guarded: Server
) -> None:
    page = Page(browser, guarded.url + "/")
    p = page.page
    urls: list[str] = []
    p.on("request", lambda r: urls.append(r.url))
    try:
        dialog = p.locator("#key-dialog")
        dialog.wait_for(state="visible")
        p.fill("#key-input", "s3cret-key")
        p.click("#key-form button[type=submit]")
        p.wait_for_function("document.querySelector('#settings tbody').childElementCount > 0")
        assert p.inner_text("#model") == MODEL
        assert not dialog.is_visible()
        p.click("button[data-tab=chat]")
        p.fill("#max-tokens", "20")
        p.fill("#prompt", "hello")
        p.keyboard.press("Enter")
        meta = p.locator(".msg.assistant[data-done=true] .meta")
        meta.wait_for(timeout=30_000)
        assert "20 tokens" in meta.inner_text()
        # 401s before the key was given are expected; nothing else may fail
        assert all("401" in e for e in page.errors), page.errors
    finally:
        page.close()
    assert urls and not any("s3cret" in u for u in urls)
    assert any("GET /dashboard/state" in line for line in guarded.log)  # the access log ran
    assert not any("s3cret" in line for line in guarded.log)
