"""The step protocol every executor drives: ``schedule`` -> execute -> ``update``, and
``finish`` for what only the caller sees. The scheduler appends the sampled tokens, stamps
the first token's time, ends sequences and frees their KV blocks."""

from __future__ import annotations

import pytest

from bucketserve.core.scheduler import Scheduler
from bucketserve.core.sequence import FinishReason, Sequence, SequenceStatus
from bucketserve.sampling_params import SamplingParams
from tests.core_helpers import make, seq

EOS = 2


def request(i: int, prompt_len: int = 4, **params: object) -> Sequence:
    params.setdefault("max_tokens", 8)
    return Sequence(f"r{i}", list(range(10, 10 + prompt_len)), SamplingParams(**params), eos_token_id=EOS)


def running(*seqs: Sequence, **cfg: object) -> Scheduler:
    """A continuous scheduler whose sequences have prefilled and sampled their first token 5."""
    sched = make("continuous", **cfg)  # type: ignore[arg-type]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule(0.0)
    assert batch is not None and batch.seqs == list(seqs)
    assert sched.update(batch, [5] * len(seqs), 1.0) == []
    return sched


def decode(sched: Scheduler, tokens: list[int], now: float = 2.0) -> list[Sequence]:
    batch = sched.schedule(now)
    assert batch is not None and batch.num_new_tokens == [1] * len(tokens)
    return sched.update(batch, tokens, now)


def test_a_prefill_row_yields_the_first_token_at_the_steps_end() -> None:
    s = request(0, prompt_len=6)
    sched = make("continuous")
    sched.add(s)
    batch = sched.schedule(0.0)
    assert batch is not None
    assert (batch.is_prefill, batch.samples) == ([True], [True])
    assert sched.update(batch, [5], 0.25) == []
    assert s.output_token_ids == [5] and s.num_computed_tokens == 6
    assert s.first_token_time == 0.25 and s.first_scheduled_time == 0.0
    assert s.status is SequenceStatus.RUNNING and s.finish_reason is None


def test_the_first_token_time_is_stamped_once() -> None:
    s = request(0)
    sched = running(s)
    decode(sched, [6], now=3.0)
    assert s.output_token_ids == [5, 6] and s.first_token_time == 1.0


def test_decode_rows_are_not_prefill_and_each_samples() -> None:
    a, b = request(0), request(1)
    sched = running(a, b)
    batch = sched.schedule(2.0)
    assert batch is not None
    assert (batch.is_prefill, batch.samples, batch.num_prefill_rows) == ([False, False], [True, True], 0)


def test_a_chunk_short_of_the_prompts_end_samples_no_token() -> None:
    s = request(0, prompt_len=10)
    sched = make("continuous", max_num_batched_tokens=4)
    sched.add(s)
    chunks = []
    while not s.output_token_ids:
        batch = sched.schedule(0.0)
        assert batch is not None
        chunks.append((batch.num_new_tokens[0], batch.is_prefill[0], batch.samples[0]))
        # The executor has no token for a row that does not sample; only the last chunk does.
        sched.update(batch, [5 if batch.samples[0] else None], 1.0)
        if not batch.samples[0]:
            assert s.output_token_ids == [] and s.first_token_time is None
    assert chunks == [(4, True, False), (4, True, False), (2, True, True)]
    assert s.output_token_ids == [5] and s.num_computed_tokens == 10


def test_a_prompts_last_chunk_of_one_token_runs_as_a_decode_row() -> None:
    s = request(0, prompt_len=9)
    sched = make("continuous", max_num_batched_tokens=8)
    sched.add(s)
    first = sched.schedule(0.0)
    assert first is not None and first.samples == [False]
    sched.update(first, [None], 0.5)
    last = sched.schedule(1.0)
    assert last is not None and last.num_new_tokens == [1]
    assert (last.is_prefill, last.samples) == ([False], [True])


def test_the_rows_facts_are_fixed_when_the_batch_is_formed() -> None:
    s = request(0)
    sched = make("continuous")
    sched.add(s)
    batch = sched.schedule(0.0)
    assert batch is not None
    sched.update(batch, [5], 1.0)  # the sequence has advanced; the batch still says what ran
    assert (batch.is_prefill, batch.samples) == ([True], [True])


def test_eos_finishes_with_stop_and_frees_the_blocks() -> None:
    a, b = request(0), request(1)
    sched = running(a, b)
    finished = decode(sched, [EOS, 6], now=2.5)
    assert finished == [a]
    assert a.finish_reason is FinishReason.STOP and a.stop_reason is None
    assert a.output_token_ids == [5, EOS]  # the EOS token is part of the output
    assert a.status is SequenceStatus.FINISHED and a.finished_time == 2.5 and a.block_table == []
    assert sched.running == [b] and a.seq_id not in sched.seqs
    assert sched.block_manager.num_used_blocks == len(b.block_table)


def test_eos_is_only_a_token_under_ignore_eos() -> None:
    s = request(0, ignore_eos=True)
    sched = running(s)
    assert decode(sched, [EOS]) == []
    assert s.finish_reason is None and s.output_token_ids == [5, EOS]


def test_a_stop_token_id_finishes_with_stop_and_says_which() -> None:
    s = request(0, stop_token_ids=[9, 11])
    sched = running(s)
    assert decode(sched, [11]) == [s]
    assert (s.finish_reason, s.stop_reason) == (FinishReason.STOP, 11)


def test_nothing_but_max_tokens_ends_a_sequence_before_min_tokens() -> None:
    s = request(0, min_tokens=4, max_tokens=5, stop_token_ids=[9])
    sched = running(s)
    assert decode(sched, [EOS]) == [] and decode(sched, [9], now=3.0) == []
    assert decode(sched, [9], now=4.0) == [s]  # the fourth token may stop it
    assert (s.finish_reason, s.stop_reason, s.num_output_tokens) == (FinishReason.STOP, 9, 4)


def test_max_tokens_finishes_with_length() -> None:
    s = request(0, max_tokens=2)
    sched = running(s)
    assert decode(sched, [6]) == [s]
    assert s.finish_reason is FinishReason.LENGTH and s.stop_reason is None
    assert s.output_token_ids == [5, 6] and sched.block_manager.num_used_blocks == 0


def test_a_prompts_first_token_can_finish_it() -> None:
    s = request(0, max_tokens=1)
    sched = make("continuous")
    sched.add(s)
    batch = sched.schedule(0.0)
    assert batch is not None
    assert sched.update(batch, [5], 1.0) == [s]
    assert (s.finish_reason, s.first_token_time, s.finished_time) == (FinishReason.LENGTH, 1.0, 1.0)
    assert not sched.has_unfinished() and sched.block_manager.num_used_blocks == 0


def test_a_sampling_row_without_a_token_is_an_executor_bug() -> None:
    s = request(0)
    sched = make("continuous")
    sched.add(s)
    batch = sched.schedule(0.0)
    assert batch is not None
    with pytest.raises(ValueError, match="no token"):
        sched.update(batch, [None], 1.0)


def test_finish_aborts_a_waiting_request() -> None:
    s = request(0)
    sched = make("continuous")
    sched.add(s)
    assert sched.finish("r0", FinishReason.ABORT, 3.0) is s
    assert (s.finish_reason, s.status, s.finished_time) == (FinishReason.ABORT, SequenceStatus.FINISHED, 3.0)
    assert sched.num_waiting == 0 and not sched.has_unfinished()
    assert sched.schedule(4.0) is None


def test_finish_aborts_a_running_request_and_frees_its_blocks() -> None:
    a, b = request(0), request(1)
    sched = running(a, b)
    assert sched.finish("r0", FinishReason.ABORT, 3.0) is a
    assert a.block_table == [] and sched.running == [b]
    assert sched.block_manager.num_used_blocks == len(b.block_table)
    assert sched.finish("r0", FinishReason.ABORT, 4.0) is None  # finished already
    assert sched.finish("nobody", FinishReason.ABORT, 4.0) is None


def test_a_request_finished_while_its_step_ran_is_left_as_it_is() -> None:
    a, b = request(0), request(1)
    sched = running(a, b)
    batch = sched.schedule(2.0)
    assert batch is not None
    computed = a.num_computed_tokens
    sched.finish("r0", FinishReason.ABORT, 2.1)
    assert sched.update(batch, [6, 6], 2.5) == []
    assert a.output_token_ids == [5] and a.num_computed_tokens == computed
    assert a.finish_reason is FinishReason.ABORT and a.finished_time == 2.1
    assert b.output_token_ids == [5, 6]


@pytest.mark.parametrize("reason", [FinishReason.STOP, FinishReason.ERROR])
def test_finish_ends_a_request_for_reasons_only_the_caller_sees(reason: FinishReason) -> None:
    """A stop string (the engine detokenizes) or a batch that failed."""
    s = request(0)
    sched = running(s)
    assert sched.finish("r0", reason, 2.0) is s
    assert (s.finish_reason, s.finished_time) == (reason, 2.0)
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished()


def test_a_preempted_sequence_recomputes_its_tokens_then_samples_the_next() -> None:
    # 4 blocks of 4 tokens: two 7-token prompts fit; growing past 8 tokens each does not.
    a, b = seq(0, 7, 6), seq(1, 7, 6)
    sched = running(a, b, num_blocks=4, block_size=4, max_model_len=16)
    decode(sched, [6, 6])  # both have 8 tokens' KV: every block is in use
    batch = sched.schedule(3.0)  # a needs a third block: the newest, b, is preempted
    assert batch is not None and batch.seqs == [a] and batch.preempted == [b]
    sched.update(batch, [7], 3.5)
    assert b.num_computed_tokens == 0 and b.output_token_ids == [5, 6] and b.first_token_time == 1.0
    while b.num_computed_tokens == 0:
        batch = sched.schedule(4.0)
        assert batch is not None
        sched.update(batch, [8] * len(batch), 4.5)
    i = batch.seqs.index(b)
    assert batch.num_new_tokens[i] == 9 and batch.is_prefill[i] and batch.samples[i]
    assert b.output_token_ids == [5, 6, 8] and b.first_token_time == 1.0
