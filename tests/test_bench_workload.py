"""Benchmark workloads: real text cut to the asked token counts, length caps, arrival patterns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import build_tokenizer

from bucketserve.bench.datasets import cap_lengths, requests_for_lengths, sharegpt_requests
from bucketserve.bench.workload import Workload, build_workload
from bucketserve.workloads import LengthPair


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    path: Path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def test_text_is_cut_to_the_asked_token_count(tokenizer) -> None:
    pairs = [LengthPair(n, 5) for n in (1, 7, 64, 300, 1500)]
    requests = requests_for_lengths(tokenizer, pairs, seed=0)
    for pair, req in zip(pairs, requests, strict=True):
        assert req.prompt_len == len(tokenizer.encode(req.prompt, add_special_tokens=False))
        assert abs(req.prompt_len - pair.prompt_len) <= 2  # text seams may merge a token or two
        assert req.output_len == 5
    assert requests_for_lengths(tokenizer, pairs, seed=0) == requests
    assert requests_for_lengths(tokenizer, pairs, seed=1) != requests


def test_cap_lengths_cuts_prompt_then_output_to_fit_the_total() -> None:
    pairs = [LengthPair(5000, 300), LengthPair(100, 900), LengthPair(10, 10)]
    assert cap_lengths(pairs, max_prompt_len=1000, max_output_len=500, max_total_len=1200) == [
        LengthPair(1000, 200),
        LengthPair(100, 500),
        LengthPair(10, 10),
    ]
    assert cap_lengths(pairs, None, None, None) == pairs


def test_sharegpt_requests_follow_vllms_filters(tokenizer) -> None:
    requests = sharegpt_requests(
        tokenizer, 20, seed=0, max_prompt_len=256, max_output_len=64, max_total_len=300
    )
    assert len(requests) == 20
    for r in requests:
        assert 4 <= r.prompt_len <= 256 and 4 <= r.output_len <= 64 and r.prompt_len + r.output_len <= 300


def test_a_trace_workload_keeps_the_traces_lengths_and_arrivals(tokenizer) -> None:
    w = build_workload("azure-conv", 5, tokenizer, max_prompt_len=200, max_output_len=50, max_total_len=None)
    assert [r.output_len for r in w.requests] == [44, 50, 50, 16, 16]  # 44, 109, 55, 16, 16 capped
    for req, want in zip(w.requests, [200, 200, 200, 91, 91], strict=True):  # 374, 396, 879, 91, 91
        assert abs(req.prompt_len - want) <= 2
    assert w.trace_times is not None and w.trace_times[0] == 0.0
    assert w.arrivals(time_scale=0.5) == [t * 0.5 for t in w.trace_times]


def test_a_trace_rescaled_to_a_rate_keeps_its_pattern_at_that_mean_rate() -> None:
    w = Workload("t", [None] * 4, trace_times=[0.0, 1.0, 3.0, 6.0])  # type: ignore[list-item]
    assert w.trace_rate == 0.5
    assert w.arrivals(rate=2.0) == [0.0, 0.25, 0.75, 1.5]
    assert w.arrivals(rate=math.inf) == [0.0] * 4


def test_synthetic_workloads_arrive_all_at_once_or_by_poisson() -> None:
    w = Workload("s", [None] * 50)  # type: ignore[list-item]
    assert w.arrivals() == [0.0] * 50
    times = w.arrivals(rate=10.0, seed=3)
    assert times == w.arrivals(rate=10.0, seed=3) and times != w.arrivals(rate=10.0, burstiness=0.5, seed=3)
    assert 2.0 <= times[-1] <= 8.0  # 49 gaps of mean 0.1 s


def test_synthetic_dataset_lengths_come_from_the_generator(tokenizer) -> None:
    w = build_workload("fixed", 3, tokenizer, prompt_len=32, output_len=8)
    assert [r.output_len for r in w.requests] == [8, 8, 8] and w.trace_times is None
    assert all(abs(r.prompt_len - 32) <= 2 for r in w.requests)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_workload("nope", 1, tokenizer)
