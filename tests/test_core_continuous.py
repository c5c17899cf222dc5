"""The FCFS continuous-batching policy, driven by a fake executor (no torch)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketserve.core.scheduler import Scheduler
from bucketserve.core.sequence import FinishReason, Sequence
from bucketserve.errors import ConfigError, InvalidRequestError
from tests import core_helpers as helpers
from tests.core_helpers import FakeExecutor, seq, step


def make(**cfg: object) -> Scheduler:
    cfg.setdefault("policy", "continuous")
    return helpers.make(**cfg)  # type: ignore[arg-type]


def test_prefill_is_batched_then_decodes_run_together() -> None:
    sched = make(max_num_batched_tokens=64)
    for i, n in enumerate([10, 20, 5]):
        sched.add(seq(i, n, 3))
    batch = sched.schedule(0.0)
    assert batch is not None
    assert batch.num_new_tokens == [10, 20, 5]
    sched.update(batch, [7, 7, 7], 0.0)
    batch = sched.schedule(1.0)
    assert batch is not None and batch.num_new_tokens == [1, 1, 1]


def test_token_budget_chunks_a_long_prompt() -> None:
    sched = make(max_num_batched_tokens=8)
    s = seq(0, 20, 2)
    sched.add(s)
    counts = []
    while s.num_computed_tokens < 20:
        batch = sched.schedule(0.0)
        assert batch is not None
        counts.append(batch.num_new_tokens[0])
        sched.update(batch, [7], 0.0)
    assert counts == [8, 8, 4]


def test_requests_are_admitted_in_arrival_order() -> None:
    sched = make(max_num_seqs=2)
    seqs = [seq(i, 4, 2) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule(0.0)
    assert [s.seq_id for s in batch.seqs] == ["r0", "r1"]


def test_kv_exhaustion_preempts_the_newest_and_everything_still_finishes() -> None:
    # 8 blocks of 4 tokens: two sequences of 8 + 12 tokens cannot both complete at once.
    sched = make(num_blocks=8, block_size=4, max_model_len=32)
    a, b = seq(0, 8, 12), seq(1, 8, 12)
    sched.add(a)
    sched.add(b)
    now = 0.0
    finished: list[Sequence] = []
    while sched.has_unfinished():
        now += 1
        finished += step(sched, now)
    assert sched.num_preemptions >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert {s.seq_id for s in finished} == {"r0", "r1"}
    assert all(s.num_output_tokens == 12 for s in finished)
    assert sched.block_manager.num_free_blocks == 8


def test_a_request_that_can_never_fit_is_rejected_at_admission() -> None:
    sched = make(num_blocks=4, block_size=4, max_model_len=1000)  # 16 tokens of KV
    with pytest.raises(InvalidRequestError, match="whole KV cache holds 4 blocks"):
        sched.add(seq(0, 16, 1))  # 16 prompt + 1 output = 17 tokens
    sched.add(seq(1, 15, 1))  # exactly fits
    assert sched.num_waiting == 1


def test_prompt_beyond_the_context_is_rejected_with_both_lengths() -> None:
    sched = make(max_model_len=32)
    with pytest.raises(InvalidRequestError, match=r"maximum context length is 32 tokens.*40 in the prompt"):
        sched.add(seq(0, 40, 1))


def test_abort_frees_blocks_at_once() -> None:
    sched = make()
    s = seq(0, 10, 5)
    sched.add(s)
    step(sched, 0.0)
    assert sched.block_manager.num_used_blocks > 0
    assert sched.finish("r0", FinishReason.ABORT, 1.0) is s
    assert s.finish_reason is FinishReason.ABORT and s.is_finished
    assert sched.block_manager.num_used_blocks == 0
    assert not sched.has_unfinished()
    assert sched.finish("r0", FinishReason.ABORT, 1.0) is None


def test_without_chunked_prefill_the_budget_must_hold_a_whole_prompt() -> None:
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        make(max_model_len=256, enable_chunked_prefill=False, max_num_batched_tokens=128)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(
        st.tuples(st.integers(1, 40), st.integers(1, 30), st.integers(0, 20)), min_size=1, max_size=25
    ),
    num_blocks=st.integers(18, 60),
    budget=st.integers(8, 64),
    max_seqs=st.integers(1, 16),
    chunked=st.booleans(),
    abort_seed=st.integers(0, 1000),
)
def test_random_workloads_respect_memory_finish_and_leak_nothing(
    lengths, num_blocks, budget, max_seqs, chunked, abort_seed
) -> None:
    block_size = 4
    max_model_len = 70
    if not chunked:
        budget = max(budget, max_model_len)
    sched = make(
        num_blocks=num_blocks,
        block_size=block_size,
        max_model_len=max_model_len,
        max_num_batched_tokens=budget,
        max_num_seqs=max_seqs,
        enable_chunked_prefill=chunked,
    )
    rng = random.Random(abort_seed)
    pending = sorted(
        (seq(i, p, o, arrival=float(t)) for i, (p, o, t) in enumerate(lengths)), key=lambda s: s.arrival_time
    )
    admitted, done, aborted = [], set(), set()
    now, steps = 0.0, 0
    while pending or sched.has_unfinished():
        while pending and pending[0].arrival_time <= now:
            s = pending.pop(0)
            try:
                sched.add(s)
                admitted.append(s)
            except InvalidRequestError:
                assert s.max_len > num_blocks * block_size or s.max_len > max_model_len
        if admitted and rng.random() < 0.05:
            victim = rng.choice(admitted)
            if sched.finish(victim.seq_id, FinishReason.ABORT, now) is not None:
                aborted.add(victim.seq_id)
        done.update(s.seq_id for s in step(sched, now))
        assert sched.block_manager.num_used_blocks <= num_blocks
        now += 1
        steps += 1
        assert steps < 10_000, "the scheduler made no progress"
    assert {s.seq_id for s in admitted} == done | aborted
    assert all(s.num_output_tokens == s.params.max_tokens for s in admitted if s.seq_id in done)
    assert sched.block_manager.num_free_blocks == num_blocks


def test_the_same_workload_gives_the_same_schedule() -> None:
    def trace() -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
        sched = make(num_blocks=20, max_num_batched_tokens=16)
        for i, (p, o) in enumerate([(9, 5), (3, 8), (15, 2), (6, 6), (20, 3)]):
            sched.add(seq(i, p, o))
        ex = FakeExecutor(sched)
        while sched.has_unfinished():
            ex.step()
        return [(tuple(s.seq_id for s in b.seqs), tuple(b.num_new_tokens)) for b in ex.batches]

    assert trace() == trace()
