"""The web page's server side: `/` and its assets, and `GET /dashboard/state`, the one endpoint
the page reads (a real server process on the tiny model). The page itself, in a browser, is
tests/test_browser.py."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_process import MODEL, Server


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[Server]:
    # Two running at most and a low split threshold: a burst queues, and its queue splits.
    srv = Server(
        tiny_model_dir, "--max-num-seqs", "2", "--bucket-n-max", "3", "--slo-classes", "8:2:0.5,256:5:-"
    )
    yield srv
    assert srv.stop() == 0, "".join(srv.log)


def state(srv: Server, **params: float) -> dict:
    r = httpx.get(srv.url + "/dashboard/state", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_page_and_its_assets_are_served_from_the_package(server: Server) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in page.text
    # The browser may load and fetch from this server alone (the browser test checks it too).
    assert "default-src 'self'" in page.headers["content-security-policy"]
    js = httpx.get(server.url + "/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "/dashboard/state" in js.text
    assert httpx.get(server.url + "/static/style.css").headers["content-type"].startswith("text/css")
    # Only the listed assets: no other file of the package, however its name is spelt.
    for name in ("%2e%2e%2fapp.py", "..%2fdashboard.py", "dashboard.py", "nothing.js"):
        assert httpx.get(f"{server.url}/static/{name}").status_code == 404, name


def test_the_start_up_log_names_the_page(server: Server) -> None:
    assert any(f"open {server.url}/ in a browser" in line for line in server.log)


def test_state_names_the_policy_and_its_settings(server: Server) -> None:
    s = state(server)
    assert s["model"] == MODEL and s["running"] is True
    settings = s["settings"]
    assert settings["policy"] == "bucket"
    assert settings["policy_options"]["n_max"] == 3
    assert settings["max_model_len"] == 256 and settings["api_key"] is False
    assert settings["max_num_seqs"] == 2
    assert s["latency"]["targets"]["classes"] == [
        {"max_prompt": 8, "ttft_s": 2.0, "tpot_s": 0.5},
        {"max_prompt": 256, "ttft_s": 5.0, "tpot_s": None},
    ]
    # one bucket over every length while nothing waits
    assert s["current"]["queues"] == [[0, 256, 0]]


def test_a_finished_request_shows_in_tokens_latency_and_steps(server: Server) -> None:
    before = state(server)
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 12, "ignore_eos": True}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=30).status_code == 200
    after = state(server, since=before["now"], steps_since=before["now"])
    assert after["current"]["generated_tokens"] - before["current"]["generated_tokens"] == 12
    latency = after["latency"]
    assert latency["requests"] >= 1 and latency["output_tokens"] >= 12
    assert 0 < latency["ttft_p50_ms"] <= latency["ttft_p99_ms"]
    assert latency["tpot_p50_ms"] > 0
    assert latency["slo_attainment"] == 1.0  # a short prompt alone meets 2 s / 500 ms
    # only the steps since `since`: this request's prefill and its 11 decodes
    steps = after["steps"]
    assert len(steps) == 12 and all(st["t"] > before["now"] for st in steps)
    assert steps[0]["prefill_tokens"] == steps[0]["real_tokens"] > 0 and steps[0]["decode_rows"] == 0
    assert all(st["decode_rows"] == 1 and st["prefill_tokens"] == 0 for st in steps[1:])
    assert all(st["ms"] > 0 for st in steps)


def test_history_holds_a_sample_a_second_and_since_sends_only_newer_ones(server: Server) -> None:
    first = state(server)
    assert len(first["history"]) >= 1 and first["settings"] is not None
    time.sleep(3.5)
    later = state(server, since=first["now"], steps_since=first["now"])
    ts = [x["t"] for x in later["history"]]
    assert 2 <= len(ts) <= 4 and all(t > first["now"] for t in ts)
    assert all(0.5 < b - a < 1.8 for a, b in itertools.pairwise(ts))  # about one a second
    assert later["steps"] == [] and later["settings"] is None  # nothing ran; settings once


def test_buckets_split_under_load_and_merge_after_it(server: Server) -> None:
    """With n_max 3, many waiting requests split the one bucket; the state counts the splits,
    shows the intervals, and merges them back once the queue drains."""
    import asyncio

    before = state(server)["current"]
    body = {"model": MODEL, "max_tokens": 40, "ignore_eos": True}

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            prompts = ["hi"] * 12 + ["The quick brown fox jumps over the lazy dog. " * 4] * 4
            await asyncio.gather(*(c.post("/v1/completions", json={**body, "prompt": p}) for p in prompts))

    asyncio.run(burst())
    now = state(server)["current"]
    assert now["splits"] > before["splits"] and now["merges"] > before["merges"]
    assert now["queues"] == [[0, 256, 0]]  # merged back: low load needs no partition


@pytest.fixture(scope="module")
def guarded(tiny_model_dir: Path) -> Iterator[Server]:
    srv = Server(tiny_model_dir, "--api-key", "s3cret")
    yield srv
    srv.stop()


def test_with_an_api_key_the_page_is_public_but_its_state_needs_the_key(guarded: Server) -> None:
    assert httpx.get(guarded.url + "/").status_code == 200
    assert httpx.get(guarded.url + "/dashboard/state").status_code == 401
    ok = httpx.get(guarded.url + "/dashboard/state", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["settings"]["api_key"] is True
    assert "s3cret" not in ok.text


def test_no_web_ui_serves_neither_the_page_nor_its_state(tiny_model_dir: Path) -> None:
    srv = Server(tiny_model_dir, "--no-web-ui")
    try:
        assert httpx.get(srv.url + "/").status_code == 404
        assert httpx.get(srv.url + "/dashboard/state").status_code == 404
        assert not any("in a browser" in line for line in srv.log)
    finally:
        srv.stop()
