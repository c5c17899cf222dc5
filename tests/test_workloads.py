"""Workload generators, traces, arrival processes and the SLO metrics shared by bench and simulator."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from bucketserve.bench.report import SLO, class_summaries
from bucketserve.metrics import RequestRecord, goodput, load_capacity, slo_attainment, slo_misses, summarize
from bucketserve.workloads import LengthPair
from bucketserve.workloads.arrivals import all_at_once, gamma, poisson, scale_times
from bucketserve.workloads.synthetic import alpaca_like, fixed, longbench_like, mixed, uniform
from bucketserve.workloads.traces import load_trace

# --- synthetic lengths -----------------------------------------------------------------------


@pytest.mark.parametrize("make", [alpaca_like, longbench_like, mixed])
def test_synthetic_generators_repeat_for_a_seed_and_differ_across_seeds(make):
    assert make(200, seed=3) == make(200, seed=3)
    assert make(200, seed=3) != make(200, seed=4)


def test_alpaca_like_matches_the_papers_prompt_statistics():
    pairs = alpaca_like(5000, seed=0)
    prompts = [p.prompt_len for p in pairs]
    assert statistics.mean(prompts) == pytest.approx(83.7, rel=0.1)
    assert statistics.median(prompts) == pytest.approx(69, rel=0.1)
    assert 100 <= statistics.mean(p.output_len for p in pairs) <= 250


def test_alpaca_like_respects_its_caps():
    pairs = alpaca_like(2000, seed=1, max_prompt_len=100, max_output_len=50)
    assert max(p.prompt_len for p in pairs) == 100
    assert max(p.output_len for p in pairs) == 50
    assert min(p.prompt_len for p in pairs) >= 4 and min(p.output_len for p in pairs) >= 4


def test_longbench_like_prompts_are_long_and_truncated_to_the_limit():
    pairs = longbench_like(2000, seed=0, max_prompt_len=4000)
    prompts = [p.prompt_len for p in pairs]
    assert max(prompts) == 4000 and min(prompts) >= 1000
    assert statistics.median(prompts) >= 3000
    assert statistics.mean(p.output_len for p in pairs) < 200


def test_mixed_holds_the_requested_share_of_long_requests():
    pairs = mixed(1000, seed=0, long_fraction=0.3)
    assert len(pairs) == 1000
    assert sum(p.prompt_len >= 1000 for p in pairs) == pytest.approx(300, abs=5)


def test_fixed_and_uniform():
    assert fixed(3, 10, 20) == [LengthPair(10, 20)] * 3
    pairs = uniform(500, (5, 9), (1, 2), seed=0)
    assert {p.prompt_len for p in pairs} == {5, 6, 7, 8, 9}
    assert {p.output_len for p in pairs} == {1, 2}


# --- traces ----------------------------------------------------------------------------------


def test_azure_traces_load_every_row():
    conv, code = load_trace("azure-conv"), load_trace("azure-code")
    assert (len(conv), len(code)) == (19366, 8819)
    assert conv[0].arrival == 0.0 and (conv[0].prompt_len, conv[0].output_len) == (374, 44)
    assert all(a.arrival <= b.arrival for a, b in itertools.pairwise(conv))


def test_unknown_trace_is_refused():
    with pytest.raises(ValueError, match="azure-conv"):
        load_trace("nope")


# --- arrivals --------------------------------------------------------------------------------


def test_arrival_processes_start_at_zero_and_repeat_for_a_seed():
    assert all_at_once(3) == [0.0, 0.0, 0.0]
    times = poisson(100, rate=4.0, seed=1)
    assert times[0] == 0.0 and times == sorted(times) and len(times) == 100
    assert times == poisson(100, rate=4.0, seed=1)
    assert gamma(100, 4.0, 0.5, seed=1) == gamma(100, 4.0, 0.5, seed=1)
    assert poisson(5, rate=math.inf) == [0.0] * 5


def test_gamma_keeps_the_mean_gap_and_burstiness_one_is_poisson():
    n, rate = 20000, 5.0
    for burstiness in (0.25, 1.0, 4.0):
        assert gamma(n, rate, burstiness, seed=0)[-1] / (n - 1) == pytest.approx(1 / rate, rel=0.05)
    assert poisson(n, rate, seed=0)[-1] / (n - 1) == pytest.approx(1 / rate, rel=0.05)

    def gap_cv(times: list[float]) -> float:
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return statistics.stdev(gaps) / statistics.mean(gaps)

    # Coefficient of variation of gamma gaps is 1/sqrt(shape): 1 for Poisson, 2 when bursty.
    assert gap_cv(gamma(n, rate, 1.0, seed=2)) == pytest.approx(1.0, rel=0.05)
    assert gap_cv(gamma(n, rate, 0.25, seed=2)) == pytest.approx(2.0, rel=0.08)


def test_scale_times_shifts_to_zero_and_scales():
    assert scale_times([10.0, 11.0, 14.0], 0.5) == [0.0, 0.5, 2.0]
    assert scale_times([], 2.0) == []


# --- SLO metrics -----------------------------------------------------------------------------


def rec(ttft: float, tpot: float, out: int = 11, error: str | None = None) -> RequestRecord:
    return RequestRecord(0.0, ttft, ttft + tpot * (out - 1), 5, out, error=error)


def test_slo_attainment_counts_failed_requests_as_misses():
    records = [rec(0.1, 0.01), rec(0.3, 0.01), rec(0.1, 0.05), rec(0.1, 0.01, error="HTTP 500")]
    assert slo_attainment(records, lambda r: (0.2, 0.02)) == 0.25
    assert slo_attainment(records, lambda r: (0.2, None)) == 0.5
    assert slo_attainment(records, lambda r: (None, None)) == 0.75
    assert math.isnan(slo_attainment([], lambda r: (1.0, 1.0)))
    assert goodput(records, lambda r: (0.2, 0.02), duration=2.0) == 0.5


def test_slo_classes_hold_each_request_to_the_targets_of_its_prompt_length() -> None:
    slo = SLO.parse(["ttft:5000"], ("100:0.2:-",))  # short prompts: 0.2 s; longer: 5 s
    records = [
        RequestRecord(0.0, 0.1, 1.0, 50, 11),  # short, on time
        RequestRecord(0.0, 0.3, 1.0, 50, 11),  # short, late for its class
        RequestRecord(0.0, 0.3, 1.0, 500, 11),  # long, on time for its class
        RequestRecord(0.0, 6.0, 7.0, 500, 11),  # long, late
    ]
    assert slo_attainment(records, slo.of) == 0.5
    by_class = class_summaries(records, slo)
    assert list(by_class) == ["<=100", "longer"]
    assert by_class["<=100"]["slo_attainment"] == 0.5 and by_class["<=100"]["requests"] == 2
    assert by_class["<=100"]["p99_ttft_ms"] == pytest.approx(300, rel=0.05)
    assert by_class["longer"]["slo_attainment"] == 0.5
    assert str(slo) == "<=100: ttft<=200ms; longer: ttft<=5000ms"


def test_slo_misses_count_each_miss_once_by_its_first_cause() -> None:
    records = [
        RequestRecord(0.0, 0.1, 1.0, 50, 11),  # met
        RequestRecord(0.0, math.nan, math.nan, 50, 0, error="HTTP 429"),  # no reply
        RequestRecord(0.0, 0.5, 9.0, 50, 11),  # first token late (and slow: counted as late)
        RequestRecord(0.0, 0.1, 9.0, 50, 11),  # on time, decoded too slowly
    ]
    assert slo_misses(records, lambda r: (0.2, 0.2)) == {"failed": 1, "ttft": 1, "tpot": 1}
    assert slo_misses(records, lambda r: (None, None)) == {"failed": 1, "ttft": 0, "tpot": 0}
    by_class = class_summaries(records, SLO.parse([], ("100:0.2:0.2",)))
    assert by_class["<=100"]["missed"] == {"failed": 1, "ttft": 1, "tpot": 1}


def test_load_capacity_interpolates_where_attainment_crosses_the_target():
    # 0.9 at rate 2, 0.7 at rate 4: 0.8 is crossed half-way, at rate 3.
    assert load_capacity([1, 2, 4, 8], [1.0, 0.9, 0.7, 0.1]) == pytest.approx(3.0)
    assert load_capacity([4, 1, 2], [0.7, 1.0, 0.9], target=0.9) == 2  # unsorted input, exact hit
    assert load_capacity([1, 2], [0.95, 0.85]) == 2  # never below the target: the highest rate
    assert math.isnan(load_capacity([1, 2], [0.5, 0.1]))  # never reached


def test_summarize_uses_vllm_names_and_keeps_failures_out_of_latencies():
    ok = RequestRecord(0.0, 0.05, 0.25, 7, 11, itls=[0.02] * 10)
    failed = RequestRecord(0.0, math.nan, math.nan, 7, 0, error="timeout")
    s = summarize([ok, failed], duration=1.0)
    assert (s["requests"], s["completed"], s["failed"]) == (2, 1, 1)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 11
    assert s["mean_ttft_ms"] == pytest.approx(50)
    assert s["median_tpot_ms"] == pytest.approx(20)
    assert s["p99_itl_ms"] == pytest.approx(20)
    assert s["mean_e2el_ms"] == pytest.approx(250)
