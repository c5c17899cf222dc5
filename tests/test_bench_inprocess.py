"""The in-process replay the engine benchmarks share: requests join at their offsets, every
request ends with its asked length, and the steps it returns are the run's, all of them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bucketserve.bench.inprocess import replay


@dataclass
class Req:
    prompt: str
    output_len: int


def test_requests_join_at_their_offsets_and_finish_with_their_lengths(llm) -> None:
    requests = [Req("a b c", 3), Req("The quick brown fox", 5), Req("hello", 2)]
    run = replay(llm.engine, requests, [0.0, 0.05, 0.10])
    assert [r.output_tokens for r in run.records] == [3, 5, 2]
    assert [r.arrival - run.start for r in run.records] == pytest.approx([0.0, 0.05, 0.10])
    assert all(r.arrival < r.first_token <= r.finished <= run.start + run.duration for r in run.records)
    # The steps are this run's and all of them: they computed every prompt and output token
    # but the last one of each request, which is sampled, never fed back.
    prompts = sum(len(llm.engine.tokenize(r.prompt)) for r in requests)
    assert sum(s.real_tokens for s in run.steps) == prompts + (3 + 5 + 2) - 3
    assert all(s.start >= run.start for s in run.steps)


def test_one_engine_replays_the_same_requests_twice(llm) -> None:
    requests = [Req("a b c", 2), Req("hello there", 2)]
    first = replay(llm.engine, requests, [0.0, 0.0])
    second = replay(llm.engine, requests, [0.0, 0.0])  # no clash of request ids
    assert [r.output_tokens for r in second.records] == [r.output_tokens for r in first.records] == [2, 2]
    assert second.start > first.start
