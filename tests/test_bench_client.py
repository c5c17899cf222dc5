"""The bench client against a fake streaming server whose token timing is known: first token
50 ms after the request, then one every 20 ms. Measured values may run a little late (the
loopback round trip, a busy machine) but never early."""

from __future__ import annotations

import asyncio
import itertools
import statistics

import pytest
from fake_openai_server import FakeServer

from bucketserve.bench.client import ClientConfig, build_payload
from bucketserve.bench.datasets import BenchRequest
from bucketserve.bench.report import SLO, format_table, summarize_run
from bucketserve.bench.runner import RunResult, run_workload

FIRST, ITL, TOKENS = 0.050, 0.020, 10
JITTER = 0.030  # allowed lateness of one measured time, seconds


def run(server: FakeServer, n: int = 4, arrivals: list[float] | None = None, **cfg: object) -> RunResult:
    config = ClientConfig(server.url, "fake-model", **cfg)  # type: ignore[arg-type]
    requests = [BenchRequest(f"prompt {i}", 3, TOKENS) for i in range(n)]
    return asyncio.run(run_workload(requests, arrivals or [0.0] * n, config, progress=False))


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_ttft_tpot_itl_and_e2e_match_the_servers_timing(api: str) -> None:
    with FakeServer(FIRST, ITL) as server:
        result = run(server, api=api)
    records = [o.record for o in result.outcomes]
    assert all(r.ok and r.output_tokens == TOKENS for r in records)
    for r in records:
        assert FIRST <= r.ttft <= FIRST + JITTER  # chat: the role-only first chunk is not a token
        assert r.tpot == pytest.approx(ITL, rel=0.1)
        assert len(r.itls) == TOKENS - 1
        assert r.e2e - r.ttft == pytest.approx((TOKENS - 1) * ITL, rel=0.1)
    assert statistics.median(g for r in records for g in r.itls) == pytest.approx(ITL, abs=0.003)


def test_summary_throughput_counts_tokens_over_the_run() -> None:
    with FakeServer(FIRST, ITL) as server:
        result = run(server, n=4)
    s = summarize_run(result)
    e2e = FIRST + (TOKENS - 1) * ITL  # all four run side by side, so the run lasts one E2E
    assert e2e <= result.duration <= e2e + 2 * JITTER
    assert s["completed"] == 4 and s["failed"] == 0 and s["token_count_mismatches"] == 0
    assert s["output_throughput"] == pytest.approx(4 * TOKENS / result.duration)
    assert s["request_throughput"] == pytest.approx(4 / result.duration)
    assert s["median_tpot_ms"] == pytest.approx(ITL * 1e3, rel=0.1)
    assert "Successful requests:" in format_table(s)


def test_requests_are_sent_at_their_arrival_times() -> None:
    arrivals = [0.0, 0.1, 0.25]
    with FakeServer(0.0, 0.001) as server:
        result = run(server, n=3, arrivals=arrivals)
    for o, at in zip(result.outcomes, arrivals, strict=True):
        assert at <= o.scheduled <= at + JITTER
        assert at <= o.record.arrival <= at + JITTER


def test_max_concurrency_one_sends_each_request_after_the_previous_finished() -> None:
    with FakeServer(FIRST, ITL) as server:
        config = ClientConfig(server.url, "fake-model")
        requests = [BenchRequest("p", 3, 3)] * 3
        result = asyncio.run(run_workload(requests, [0.0] * 3, config, max_concurrency=1, progress=False))
    spans = sorted((o.record.arrival, o.record.finished) for o in result.outcomes)
    assert all(prev_end <= start for (_, prev_end), (start, _) in itertools.pairwise(spans))
    # Waiting for a slot is not response time: each request's TTFT stays one server TTFT.
    assert all(o.record.ttft <= FIRST + JITTER for o in result.outcomes)


def test_the_request_body_asks_for_exactly_output_len_tokens_with_usage_and_extensions() -> None:
    with FakeServer(0.0, 0.001) as server:
        run(server, n=1, extra_body={"priority": 2, "ttft_slo_ms": 500.0})
        run(server, n=1, api="chat", ignore_eos=False)
    completion, chat = server.bodies
    assert completion["max_tokens"] == TOKENS and completion["ignore_eos"] is True
    assert completion["stream"] is True and completion["stream_options"] == {"include_usage": True}
    assert completion["priority"] == 2 and completion["ttft_slo_ms"] == 500.0
    assert completion["prompt"] == "prompt 0" and completion["model"] == "fake-model"
    assert chat["messages"] == [{"role": "user", "content": "prompt 0"}] and "ignore_eos" not in chat


def test_build_payload_defaults_to_greedy_completions() -> None:
    body = build_payload(BenchRequest("x", 1, 7), ClientConfig("http://h", "m"))
    assert body["temperature"] == 0.0 and body["max_tokens"] == 7 and body["prompt"] == "x"


def test_http_errors_are_counted_as_failed_requests_and_slo_misses() -> None:
    with FakeServer(mode="error") as server:
        result = run(server, n=3)
    s = summarize_run(result, SLO(ttft_s=10.0))
    assert (s["completed"], s["failed"]) == (0, 3)
    assert s["errors"] == {"HTTP 500": 3}
    assert s["slo_attainment"] == 0.0 and s["request_goodput"] == 0.0
    assert result.outcomes[0].record.error == "HTTP 500: boom"


def test_a_hanging_server_times_out_and_the_requests_count_as_failed() -> None:
    with FakeServer(mode="hang") as server:
        result = run(server, n=2, request_timeout=0.3)
    s = summarize_run(result)
    assert (s["completed"], s["failed"]) == (0, 2)
    assert s["errors"] == {"timeout after 0.3 s": 2}


def test_an_error_event_inside_the_stream_fails_the_request() -> None:
    with FakeServer(0.0, 0.001, mode="stream_error") as server:
        result = run(server, n=1)
    assert result.outcomes[0].record.error == "stream error: engine failed"
    assert summarize_run(result)["failed"] == 1


def test_output_tokens_come_from_usage_and_a_different_chunk_count_is_reported() -> None:
    with FakeServer(0.0, 0.001, usage_extra=2) as server:
        result = run(server, n=2)
    assert [o.record.output_tokens for o in result.outcomes] == [TOKENS + 2] * 2
    assert summarize_run(result)["token_count_mismatches"] == 2


def test_a_refused_connection_is_a_failed_request() -> None:
    with FakeServer() as server:
        url = server.url
    config = ClientConfig(url, "m", request_timeout=5)
    result = asyncio.run(run_workload([BenchRequest("p", 1, 2)], [0.0], config, progress=False))
    assert result.outcomes[0].record.error.startswith("ConnectError")
