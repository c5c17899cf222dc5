"""SIGTERM under load: the server drains. Requests in flight finish within the grace period,
new ones get a 503 with a message (and /health says 503), and the process exits with 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
from server_process import Server, sse_events

NUM_STREAMS = 12
MAX_TOKENS = 200


def test_sigterm_drains_streams_in_flight_refuses_new_requests_with_503_and_exits_0(
    tiny_model_dir: Path,
) -> None:
    # One sequence at a time: the streams run one after another, so most are still in
    # flight (waiting or running) when SIGTERM comes.
    server = Server(tiny_model_dir, "--max-num-seqs", "1", "--shutdown-grace", "60")
    body = {"prompt": "The quick brown fox", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    results: list[list] = [[] for _ in range(NUM_STREAMS)]
    finished_at = [0.0] * NUM_STREAMS
    started = threading.Barrier(NUM_STREAMS + 1)

    def stream(i: int) -> None:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            events = sse_events(r)
            results[i].append(next(events))  # the engine accepted it: the headers came back
            started.wait()
            results[i].extend(events)
        finished_at[i] = time.monotonic()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(NUM_STREAMS)]
    try:
        for t in threads:
            t.start()
        started.wait(timeout=30)
        server.proc.send_signal(signal.SIGTERM)
        # The drain starts at once; /health (which never queues) says when. A request sent
        # before the signal is handled would be accepted and wait behind every stream (one
        # sequence at a time), and the server could end its drain meanwhile and exit.
        health = None
        deadline = time.monotonic() + 5
        while health != 503 and time.monotonic() < deadline:
            health = httpx.get(server.url + "/health", timeout=10).status_code
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        refused = r if r.status_code == 503 else None
        refused_at = time.monotonic()
        for t in threads:
            t.join(timeout=60)
    finally:
        status = server.stop()

    assert refused is not None, "no 503 during the drain"
    assert refused.json()["error"]["code"] == "shutting_down"
    assert "shutting down" in refused.json()["error"]["message"]
    assert health == 503
    assert refused_at < max(finished_at), "every stream had ended before the 503: no load to drain"
    for events in results:
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for e in events[:-1] if e["choices"][0]["text"]) >= MAX_TOKENS // 2
    assert status == 0
    assert "server stopped" in "".join(server.log)
