"""Latency targets in the core: the online cost model, the step budget from the TPOT targets,
chunked prefill inside a bucket's batch, SLO classes and requests that cannot be on time."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketserve.config import OrderConfig
from bucketserve.core.budget import StepBudget
from bucketserve.core.cost import OnlineCostFit, Profile, step_ms
from bucketserve.core.ordering import targets
from bucketserve.core.scheduler import BatchShape
from bucketserve.core.sequence import FinishReason
from bucketserve.errors import ConfigError, DeadlineUnreachableError
from tests.core_helpers import FakeExecutor, make, seq

# A CPU-like model in the fit's family: one decode regime, no mixed scale.
KNOWN = Profile(
    prefill=(20.0, 0.9, 0.0004),
    decode_small=(7.0, 0.002, 1.1),
    decode_large=(7.0, 0.002, 1.1),
    large_batch_threshold=1 << 30,
    step_overhead=(0.0, 0.05),
    mixed_scale=1.0,
    padded_decode=False,
)


def random_shape(rng: random.Random) -> BatchShape:
    kind = rng.choice(("prefill", "decode", "mixed"))
    prefill = tuple(
        (rng.randint(1, 600), rng.choice((0, rng.randint(1, 1500)))) for _ in range(rng.randint(1, 4))
    )
    decode = tuple(rng.randint(2, 2000) for _ in range(rng.randint(1, 48)))
    return BatchShape(prefill if kind != "decode" else (), decode if kind != "prefill" else ())


def test_the_online_fit_recovers_known_coefficients_from_step_records() -> None:
    rng = random.Random(0)
    fit = OnlineCostFit()
    for _ in range(400):
        shape = random_shape(rng)
        fit.observe(shape, step_ms(KNOWN, shape) / 1e3)
    got = fit.profile()
    assert got is not None
    for name in ("prefill", "decode_small"):
        for want, have in zip(getattr(KNOWN, name), getattr(got, name), strict=True):
            assert have == pytest.approx(want, rel=1e-3, abs=1e-6), name
    assert got.step_overhead[1] == pytest.approx(KNOWN.step_overhead[1], rel=1e-3)
    for _ in range(50):  # and so it predicts steps it never saw
        shape = random_shape(rng)
        assert step_ms(got, shape) == pytest.approx(step_ms(KNOWN, shape), rel=1e-3)


def test_the_fit_predicts_steps_when_every_prefill_step_has_one_prompt() -> None:
    """With one prompt per prefill step the per-row overhead cannot be told apart from the
    prefill constant; whatever split the fit picks, its predictions hold."""
    rng = random.Random(2)
    fit = OnlineCostFit()
    for _ in range(300):
        shape = random_shape(rng)
        shape = BatchShape(shape.prefill[:1], shape.decode)
        fit.observe(shape, step_ms(KNOWN, shape) / 1e3)
    got = fit.profile()
    assert got is not None
    for _ in range(50):
        shape = random_shape(rng)
        shape = BatchShape(shape.prefill[:1], shape.decode)
        assert step_ms(got, shape) == pytest.approx(step_ms(KNOWN, shape), rel=1e-3)


def test_the_online_fit_follows_a_machine_that_slows_down() -> None:
    """Old steps fade (half-life in steps): after the machine runs 2x slower for a few
    half-lives, the fit predicts the slower steps."""
    rng = random.Random(1)
    fit = OnlineCostFit(half_life=50)
    for _ in range(300):
        shape = random_shape(rng)
        fit.observe(shape, step_ms(KNOWN, shape) / 1e3)
    for _ in range(400):
        shape = random_shape(rng)
        fit.observe(shape, 2 * step_ms(KNOWN, shape) / 1e3)
    profile = fit.profile()
    assert profile is not None
    shape = BatchShape(((300, 0),), tuple([500] * 16))
    assert step_ms(profile, shape) == pytest.approx(2 * step_ms(KNOWN, shape), rel=0.02)


def test_the_fit_reports_how_far_its_steps_run_over_their_prediction() -> None:
    """Steps that alternate between their predicted time and 1.3x it: the fit's prediction
    settles between the two, the 75th percentile of measured / predicted is above 1 by about
    the spread, and the median below it; with no scatter it is 1."""
    rng = random.Random(3)
    noisy, exact = OnlineCostFit(prior=KNOWN), OnlineCostFit(prior=KNOWN)
    for i in range(400):
        shape = random_shape(rng)
        t = step_ms(KNOWN, shape) / 1e3
        noisy.observe(shape, t * (1.3 if i % 2 else 1.0))
        exact.observe(shape, t)
    assert 1.08 < noisy.error_quantile(0.75) < 1.3
    assert noisy.error_quantile(0.25) < 1.0
    assert exact.error_quantile(0.75) == pytest.approx(1.0, abs=1e-6)
    assert noisy.error_quantile(0) == 1.0


def test_slo_bucket_plans_its_steps_at_the_quantile_of_their_overrun() -> None:
    """A document waits beside ten decoding chats (TPOT target 0.1 s). Where recent steps
    scattered (every other one 1.6x the other), the step is planned at its limit over the 75th
    percentile of measured / predicted time; where they ran as predicted, at the limit."""
    limits, quantiles = [], []
    for overrun in (1.0, 1.6):
        sched = make(
            "bucket", num_blocks=800, block_size=16, max_model_len=2048, max_num_batched_tokens=2048,
            policy_config={"step_budget": "slo"}, order={"default_tpot_slo_s": 0.1},
        )  # fmt: skip
        sched.cost_fit = OnlineCostFit(prior=KNOWN)
        rng = random.Random(4)
        for i in range(300):
            shape = random_shape(rng)
            sched.cost_fit.observe(shape, step_ms(KNOWN, shape) / 1e3 * (overrun if i % 2 else 1.0))
        quantiles.append(sched.cost_fit.error_quantile(0.75))
        for i in range(10):
            sched.add(seq(i, 50, 64))
        first = sched.schedule(0.0)
        assert first is not None
        sched.update(first, [7] * len(first), 0.05)
        sched.add(seq(99, 1500, 4, arrival=0.05))
        assert sched.schedule(0.05) is not None
        budget = sched.last_budget
        assert budget is not None
        limits.append(budget.limit_ms)
        assert budget.predicted_s() * 1e3 <= budget.limit_ms + 1e-6
    assert quantiles[0] == pytest.approx(1.0, abs=1e-6) and quantiles[1] > 1.1
    assert limits[0] / limits[1] == pytest.approx(quantiles[1], rel=0.02)


def test_the_fit_answers_only_once_it_saw_both_kinds_of_step_or_has_a_prior() -> None:
    fit = OnlineCostFit(min_steps=4)
    for _ in range(10):
        fit.observe(BatchShape((), (100, 200)), 0.01)
    assert fit.profile() is None  # no prefill seen: its coefficients would be guesses
    assert OnlineCostFit(prior=KNOWN).profile() is KNOWN
    fit.observe(BatchShape(((64, 0),), (), padded=True), 0.5)
    assert fit.num_prefill_steps == 0  # padded steps are not in the fitted family


def test_a_step_budget_chunks_a_prompt_to_stay_under_its_time_limit() -> None:
    decode = [300] * 8
    alone = step_ms(KNOWN, BatchShape((), tuple(decode))) / 1e3
    budget = StepBudget(KNOWN, decode, limit_s=alone + 0.1, max_tokens=4096, min_chunk=16)
    n = budget.take(1000, 0)
    assert 16 < n < 1000
    assert budget.predicted_s() <= alone + 0.1
    assert step_ms(KNOWN, BatchShape(((n + 1, 0),), tuple(decode))) / 1e3 > alone + 0.1  # the most that fits
    assert budget.take(500, 0) == 0  # full


def test_a_step_budget_always_lets_one_chunk_through() -> None:
    """A limit below even the decodes' own time still moves a waiting prompt by min_chunk."""
    budget = StepBudget(KNOWN, [300] * 8, limit_s=0.001, max_tokens=4096, min_chunk=16)
    assert budget.take(1000, 0) == 16
    assert budget.take(1000, 0) == 0


def test_over_the_limit_short_prompts_share_the_one_chunk_of_progress() -> None:
    """Where the decodes alone fill the limit, a burst of short prompts goes through together,
    whole, while their tokens stay within the one chunk progress allows: not one a step."""
    budget = StepBudget(KNOWN, [300] * 8, limit_s=0.001, max_tokens=4096, min_chunk=64)
    assert budget.take(20, 0) == 20  # forced: nothing fits
    assert budget.take(30, 0) == 30  # whole, 50 of the chunk's 64
    assert budget.take(20, 0) == 0  # would pass the chunk: waits
    assert budget.take(10, 0) == 10  # whole, 60 of 64
    assert budget.take(1000, 0) == 0  # never a partial chunk past the first


def test_a_step_with_room_takes_nothing_over_its_limit() -> None:
    """Progress forces only a step's first chunk: once a prompt fitted, no other goes over."""
    decode = [300] * 8
    alone = step_ms(KNOWN, BatchShape((), tuple(decode))) / 1e3
    budget = StepBudget(KNOWN, decode, limit_s=alone + 0.02, max_tokens=4096, min_chunk=64)
    first = budget.take(1000, 0)
    assert 64 <= first < 1000
    assert budget.take(8, 0) == 0


def test_without_a_time_limit_the_budget_is_the_tokens() -> None:
    budget = StepBudget(KNOWN, [300] * 8, limit_s=float("inf"), max_tokens=520, min_chunk=16)
    assert budget.take(1000, 0) == 512  # the decodes' 8 tokens count too
    assert StepBudget(None, [], limit_s=0.01, max_tokens=64, min_chunk=16).take(100, 0) == 64


def test_slo_classes_give_default_targets_by_prompt_length() -> None:
    order = OrderConfig(slo_classes=("2048:4:-", "256:1:0.1"), default_tpot_slo_s=0.3)
    assert targets(seq(0, 100, 4), order) == (1.0, 0.1)
    assert targets(seq(1, 1000, 4), order) == (4.0, None)
    assert targets(seq(2, 3000, 4), order) == (10.0, 0.3)  # no class holds it: the defaults
    assert targets(seq(3, 100, 4, ttft_slo=0.2, tpot_slo=0.05), order) == (0.2, 0.05)  # its own first
    for bad in (("256:1",), ("x:1:0.1",), ("256:0:0.1",), ("256:1:0.1", "256:2:0.2")):
        with pytest.raises(ConfigError):
            OrderConfig(slo_classes=bad)


# The step-by-step tests below hold one step's budget on its own: the TPOT window off (a test
# of the window turns it on), and where one does, its chunks and share as they were before the
# window became the default (128 tokens, --bucket-ttft-share's tenth), which their figures use.
WINDOW_OFF = {"tpot_window": 0, "window_chunk": 128, "window_ttft_share": 0.1}


def _slo_bucket(**cfg: object):  # type: ignore[no-untyped-def]
    sched = make(
        "bucket",
        num_blocks=400,
        block_size=16,
        max_model_len=2048,
        max_num_batched_tokens=2048,
        policy_config={"step_budget": "slo", "min_chunk": 16, **WINDOW_OFF, **cfg},
        order={"order": "edf", "default_tpot_slo_s": 0.05, "default_ttft_slo_s": 30.0},
    )
    sched.cost_fit = OnlineCostFit(prior=KNOWN)
    return sched


def _two_class_bucket(num_blocks: int = 400, **cfg: object):  # type: ignore[no-untyped-def]
    """The slo bucket policy under a 1-s class of chats (<= 256 tokens) and a 5-s class of
    documents (no TPOT targets), on the known cost model."""
    sched = make(
        "bucket", num_blocks=num_blocks, block_size=16, max_model_len=2048, max_num_batched_tokens=2048,
        policy_config={"step_budget": "slo", "min_chunk": 16, **WINDOW_OFF, **cfg},
        order={"order": "edf", "slo_classes": ("256:1:-", "2048:5:-")},
    )  # fmt: skip
    sched.cost_fit = OnlineCostFit(prior=KNOWN)
    return sched


def _four_decoding(sched) -> FakeExecutor:  # type: ignore[no-untyped-def]
    """An executor on ``sched`` with four short requests past their prefill, decoding."""
    ex = FakeExecutor(sched, profile=KNOWN)
    for i in range(4):
        sched.add(seq(i, 40, 200))
    for _ in range(3):
        ex.step()
    return ex


def _decode_beside_a_document(sched, chats: list, document) -> list[int]:  # type: ignore[no-untyped-def]
    """Run ``chats`` three steps, then with ``document`` queued until the chats finish, in
    virtual time at the known costs; each step's prompt tokens after the arrival."""
    ex = FakeExecutor(sched, profile=KNOWN)
    for s in chats:
        sched.add(s)
    for _ in range(3):
        ex.step()
    document.arrival_time = ex.now
    sched.add(document)
    first = len(ex.batches)
    while any(not s.is_finished for s in chats):
        ex.step()
    return [sum(n for n, _ in batch.shape().prefill) for batch in ex.batches[first:]]


def test_slo_bucket_chunks_a_long_prompt_instead_of_stalling_the_decodes() -> None:
    """Four requests of 24 tokens decode with a 100-ms TPOT target (90 ms with the margin)
    while a 1,500-token prompt (~2.3 s whole) arrives: the whole prompt would push their
    time per output token far past the target, so it goes in chunks, as large as what they
    banked in their fast steps allows, each of them within its target over its whole reply."""
    sched = _slo_bucket()
    decoding = [seq(i, 40, 24, tpot_slo=0.1) for i in range(4)]
    chunks = [n for n in _decode_beside_a_document(sched, decoding, seq(9, 1500, 8)) if n]
    assert len(chunks) > 3 and max(chunks) < 1500
    for s in decoding:
        assert s.finished_time is not None and s.first_token_time is not None
        assert (s.finished_time - s.first_token_time) / (s.num_output_tokens - 1) <= 0.1


def test_slo_bucket_banks_decode_only_steps_for_fewer_larger_chunks() -> None:
    """Four chats decode with a 100-ms TPOT target (90 ms with the margin) beside a
    1,500-token document. After a first chunk from what the chats' replies allow at their
    start, each step on its own takes what fits its limit, a sliver every step; with a window
    of 4 steps a step may run as long as keeps the four steps' mean within 90 ms, so
    decode-only steps bank the time for chunks of at least the window chunk (bar the prompt's
    last), in fewer steps, and every chat stays within its target either way."""
    runs = {}
    for window in (0, 4):
        sched = _slo_bucket(tpot_window=window, window_chunk=128)
        chats = [seq(i, 40, 120, tpot_slo=0.1) for i in range(4)]
        runs[window] = [n for n in _decode_beside_a_document(sched, chats, seq(9, 1500, 8)) if n]
        for s in chats:
            assert s.finished_time is not None and s.first_token_time is not None
            assert (s.finished_time - s.first_token_time) / (s.num_output_tokens - 1) <= 0.1
    assert sum(runs[4]) == sum(runs[0]) == 1500
    assert len(runs[4]) < len(runs[0])
    assert all(n >= 128 for n in runs[4][:-1]) and min(runs[0][:-1]) < 128


def test_slo_bucket_forces_a_waiting_prompt_through_after_a_window_without_prompt_work() -> None:
    """Where no window-chunk fits in the window (400 tokens take longer than four steps'
    allowance), the document still moves: after three steps without prompt tokens its next
    400 go through over the limit, so prompt work runs every fourth step, none waits longer."""
    sched = _slo_bucket(tpot_window=4, window_chunk=400)
    chats = [seq(i, 40, 120, tpot_slo=0.1) for i in range(4)]
    # its 1-s TTFT target caps every step at a tenth of a second: no 400 tokens fit in one
    steps = _decode_beside_a_document(sched, chats, seq(9, 1500, 8, ttft_slo=1.0))
    carried = [i for i, n in enumerate(steps) if n]
    assert [steps[i] for i in carried] == [400, 400, 400, 300]
    assert all(b - a == 4 for a, b in itertools.pairwise(carried))


def test_slo_bucket_spends_banked_time_on_window_chunks_up_to_the_window_ttft_share() -> None:
    """The document's 1-s TTFT target caps a step at a tenth of a second, so a 200-token
    window chunk (~200 ms) never fits and goes through forced, every fourth step. With
    --bucket-window-ttft-share 0.5 a step on time the chats banked may run up to half a
    second: chunks go as soon as the banked time covers them, so the document's prompt is
    done in fewer steps, and every chat still keeps its TPOT target over its reply."""
    done_at = {}
    for share in (0.1, 0.5):
        sched = _slo_bucket(tpot_window=4, window_chunk=200, window_ttft_share=share)
        chats = [seq(i, 40, 120, tpot_slo=0.1) for i in range(4)]
        steps = _decode_beside_a_document(sched, chats, seq(9, 1500, 8, ttft_slo=1.0))
        carried = [i for i, n in enumerate(steps) if n]
        assert sum(steps[i] for i in carried) == 1500
        assert all(steps[i] >= 200 for i in carried[:-1])  # window chunks, bar the prompt's last
        done_at[share] = carried[-1]
        for s in chats:
            assert s.finished_time is not None and s.first_token_time is not None
            assert (s.finished_time - s.first_token_time) / (s.num_output_tokens - 1) <= 0.1
    assert done_at[0.5] < done_at[0.1]


def _chats_with_nothing_banked(sched) -> FakeExecutor:  # type: ignore[no-untyped-def]
    """Four chats (100-ms TPOT target) decoding on ``sched`` in virtual time, a window of
    fast steps measured, their first tokens 10 s ago: their replies have banked nothing."""
    ex = FakeExecutor(sched, profile=KNOWN)
    chats = [seq(i, 40, 120, tpot_slo=0.1) for i in range(4)]
    for s in chats:
        sched.add(s)
    for _ in range(5):
        ex.step()
    for s in chats:
        s.first_token_time = ex.now - 10.0
    return ex


def test_slo_bucket_holds_a_window_step_within_the_decoding_requests_tpot_limit() -> None:
    """The window bounds the mean of the last steps, not each reply. Four chats (100-ms TPOT
    target, 90 ms with the margin) whose first tokens came 10 s ago have nothing banked, so
    their TPOT limit is 90 ms; fast decode-only steps leave the window 4 x 90 ms less their
    ~12 ms each. A document arrives: the step's plan stays within the chats' 90 ms, and so
    do its prompt tokens (~70 fit beside the four rows), not the window's ~300 ms."""
    sched = _slo_bucket(tpot_window=4, window_chunk=32)
    ex = _chats_with_nothing_banked(sched)
    sched.add(seq(9, 1500, 8, arrival=ex.now - 0.1))  # waited out the dispatch window
    ex.step()
    budget = sched.last_budget
    assert budget is not None and budget.timed
    assert budget.limit_ms <= 90.0 + 1e-6
    assert 32 <= ex.batches[-1].shape().prefill[0][0] <= 72


def test_slo_bucket_plans_a_window_steps_tpot_hold_at_the_overrun_quantile() -> None:
    """As in the test above, but recent steps ran 1.5x their prediction: the window's step is
    held to the chats' 90-ms TPOT limit over 1.5, as a step-by-step limit is, so that a step
    that runs over as the recent ones did still keeps the chats within their targets."""
    sched = _slo_bucket(tpot_window=4, window_chunk=32)
    ex = _chats_with_nothing_banked(sched)
    sched.cost_fit.error_quantile = lambda q: 1.5  # type: ignore[method-assign]
    sched.add(seq(9, 1500, 8, arrival=ex.now - 0.1))
    ex.step()
    budget = sched.last_budget
    assert budget is not None and budget.timed
    assert budget.limit_ms == pytest.approx(90.0 / 1.5)


def test_slo_bucket_does_not_keep_a_chat_waiting_out_the_window_past_its_ttft_deadline() -> None:
    """Right after a forced chunk of a late document, a 150-token chat with a 0.5-s TTFT
    target arrives; the steps' cap (a tenth of it) leaves no room for it, and the window would
    hold prompt work back for three more steps: it goes through in the next step instead,
    since waiting out the window would cost it its deadline."""
    sched = _slo_bucket(tpot_window=4, window_chunk=400)
    ex = FakeExecutor(sched, profile=KNOWN)
    for i in range(4):
        sched.add(seq(i, 40, 120, tpot_slo=0.1))
    for _ in range(3):
        ex.step()
    sched.add(seq(9, 1500, 8, arrival=ex.now, ttft_slo=1.0))  # late from the start
    while not ex.batches[-1].shape().prefill or "r9" not in [s.seq_id for s in ex.batches[-1].seqs]:
        ex.step()  # until the document's first forced chunk
    chat = seq(20, 150, 4, arrival=ex.now, ttft_slo=0.5)
    sched.add(chat)
    ex.step()
    assert chat in ex.batches[-1].seqs
    assert chat.first_token_time is not None and chat.first_token_time - chat.arrival_time <= 0.5


def test_slo_bucket_lifts_the_limit_when_a_ttft_deadline_is_in_danger() -> None:
    """A 1,500-token prompt takes ~2.3 s alone; in chunks under the 45-ms limit of four
    decoding chats that have spent what their fast steps banked (0.6 s idle) it would take
    longer than its 3-s target: the step takes it whole (no TTFT cap: share 1). With a
    target it cannot meet even alone (1 s), lifting would only stall the decodes: it is
    chunked. Without --bucket-ttft-lift (the default) the running requests' TPOT comes
    first: chunked."""
    for ttft, lift, whole in ((3.0, True, True), (1.0, True, False), (3.0, False, False)):
        sched = _slo_bucket(ttft_share=1.0, ttft_lift=lift)
        ex = _four_decoding(sched)
        now = ex.now + 0.6
        running = [s for s in sched.running if s.num_uncomputed_tokens == 1]
        assert sched._tpot_limit(running, now) == pytest.approx(0.045)  # t x margin: no bank left
        sched.add(seq(9, 1500, 8, arrival=now, ttft_slo=ttft))
        batch = sched.schedule(now + 0.06)  # its bucket's dispatch window (0.05 s) has passed
        assert batch is not None
        assert (max(n for n, _ in batch.shape().prefill) == 1500) is whole, (ttft, lift)
        assert len(batch.shape().decode) == 4  # the decodes run either way


def test_slo_bucket_steps_keep_a_share_of_the_tightest_ttft_target() -> None:
    """With nothing decoding there is no TPOT limit, but a 1-s class means a chat may arrive
    at any moment: no step runs longer than a tenth of that second (no deadline is in
    danger here), so a 1,500-token document (~2.3 s whole) goes in chunks, and a chat that
    arrives meanwhile goes first."""
    sched = _two_class_bucket()
    now = 0.0

    def step() -> BatchShape:
        nonlocal now
        batch = sched.schedule(now)
        assert batch is not None
        shape = batch.shape()
        took = step_ms(KNOWN, shape) / 1e3
        assert took <= 0.1 + 1e-9
        now += took
        sched.observe_step(shape, took)
        sched.update(batch, [7] * len(batch), now)
        return shape

    sched.add(seq(0, 1500, 8))
    [(chunk, _)] = step().prefill
    assert chunk < 1500
    sched.add(seq(1, 60, 8, arrival=now))
    assert step().prefill[0] == (60, 0)  # the chat before the document's next chunk
    while sched.has_unfinished():
        step()


def test_slo_bucket_steps_grow_while_the_queue_is_behind_its_ttft_deadlines() -> None:
    """Twenty chats at once, 1-s class: each alone is on time, but at a tenth of a second per
    step (the cap) the last would start seconds late. While that is so a step may grow to
    --bucket-danger-ttft-share of the tightest target (more prompt tokens per second): a
    quarter by default, half with 0.5; with 0.1, the cap's own, it does not grow."""
    for share, longest in ((0.5, 0.5), (0.25, 0.25), (0.1, 0.1)):
        sched = _two_class_bucket(danger_ttft_share=share)
        for i in range(20):
            sched.add(seq(i, 200, 8))
        batch = sched.schedule(0.06)
        assert batch is not None
        took = step_ms(KNOWN, batch.shape()) / 1e3
        assert longest - 0.1 < took <= longest + 1e-9, (share, took)


def test_slo_bucket_steps_grow_once_a_deep_queue_is_all_late() -> None:
    """Forty chats that arrived 2 s ago under a 1-s class are all late: no deadline is left
    to keep, so the step grows to --bucket-danger-ttft-share of the target (a quarter) and
    prefills more per second. Not for a few late ones (a burst near capacity, where the
    next arrivals would wait for the longer steps), nor for chats on time and not in danger
    at the cap: their steps stay within a tenth."""
    for arrival, chats, longest in ((-2.0, 40, 0.25), (-2.0, 4, 0.1), (0.0, 2, 0.1)):
        sched = _two_class_bucket(num_blocks=800)
        for i in range(chats):
            sched.add(seq(i, 200, 8, arrival=arrival))
        batch = sched.schedule(0.06)
        assert batch is not None
        assert all(sched.is_late(s, 0.06) for s in batch.seqs) is (arrival < 0)
        took = step_ms(KNOWN, batch.shape()) / 1e3
        assert longest - 0.1 < took <= longest + 1e-9, (chats, took)


def test_bucket_holds_a_prompt_for_its_share_of_its_own_ttft_target() -> None:
    """--bucket-hold-share 0.2 under a 1-s class of chats and a 5-s class of documents: while
    something decodes, a queued chat is held 0.2 s and a document 1 s before their bucket is
    dispatched, so the chats that arrive meanwhile go through in one step; with 0 (and no
    dispatch window) each chat goes in the first step after it arrives."""

    def prompt_steps(hold_share: float, arrivals: list[tuple[int, float]]) -> list[tuple[float, list[str]]]:
        """When each step with new prompts ran, and whose: a long reply decodes from t=0 while
        the prompts of ``arrivals`` (length, time) come in; a step every 50 ms."""
        sched = _two_class_bucket(hold_share=hold_share, dispatch_window_s=0.0, step_budget="tokens")
        sched.add(seq(0, 16, 1000))
        pending = [seq(i + 1, n, 8, arrival=t) for i, (n, t) in enumerate(arrivals)]
        steps = []
        for tick in range(40):
            now = round(tick * 0.05, 2)
            while pending and pending[0].arrival_time <= now:
                sched.add(pending.pop(0))
            batch = sched.schedule(now)
            assert batch is not None  # the long reply decodes in every step
            prompts = [s.seq_id for s, p in zip(batch.seqs, batch.is_prefill, strict=True) if p]
            if tick and prompts:
                steps.append((now, prompts))
            sched.update(batch, [7] * len(batch), now)
        return steps

    chats = [(100, 0.05), (120, 0.1), (80, 0.2)]
    assert prompt_steps(0.0, chats) == [(0.05, ["r1"]), (0.1, ["r2"]), (0.2, ["r3"])]
    assert prompt_steps(0.2, chats) == [(0.25, ["r1", "r2", "r3"])]
    assert prompt_steps(0.2, [(1000, 0.05)]) == [(1.05, ["r1"])]


def test_a_request_that_cannot_be_on_time_is_counted_and_with_reject_late_refused() -> None:
    sched = make("bucket", num_blocks=400, block_size=16, max_model_len=2048, max_num_batched_tokens=2048)
    sched.cost_fit = OnlineCostFit(prior=KNOWN)  # a 1,500-token prefill: ~2.3 s
    sched.add(seq(0, 1500, 4, ttft_slo=0.5))
    assert sched.num_late == 1
    sched.add(seq(1, 100, 4, ttft_slo=0.5))  # on time alone, but queued behind the 2.3-s prompt
    assert sched.num_late == 2
    strict = make(
        "bucket",
        num_blocks=400,
        block_size=16,
        max_model_len=2048,
        order={"reject_late": True},
    )
    strict.cost_fit = OnlineCostFit(prior=KNOWN)
    with pytest.raises(DeadlineUnreachableError, match="TTFT target"):
        strict.add(seq(0, 1500, 4, ttft_slo=0.5))
    assert not strict.has_unfinished()  # nothing of it queued
    strict.add(seq(1, 100, 4, ttft_slo=0.5))  # one that can be on time is served


@pytest.mark.parametrize("reject_late", [False, True])
def test_with_reject_late_a_queued_prompt_leaves_as_late_once_it_can_no_longer_be_on_time(
    reject_late: bool,
) -> None:
    """Two 100-token chats (0.5-s targets, ~0.1 s each) and a third with a 5-s target arrive
    together: all can be on time, so all are taken. One prompt fits a step; the first step
    ends at 0.6 s (a stall), when the second chat could no longer get its first token by
    0.5 s. With --reject-late it leaves the queue at the end of that step, its blocks free,
    as late; without, it waits and runs late. The chat that has its first token and the
    request still on time stay either way."""
    # Steps up to a quarter of the 0.5-s target, so that a 100-token prompt fits one.
    sched = make(
        "bucket", num_blocks=400, block_size=16, max_model_len=2048, max_num_batched_tokens=100,
        policy_config={"ttft_share": 0.25}, order={"order": "edf", "reject_late": reject_late},
    )  # fmt: skip
    sched.cost_fit = OnlineCostFit(prior=KNOWN)
    first, second = seq(0, 100, 4, ttft_slo=0.5), seq(1, 100, 4, ttft_slo=0.5)
    patient = seq(2, 100, 4, ttft_slo=5)
    for s in (first, second, patient):
        sched.add(s)
    assert sched.num_late == 0
    batch = sched.schedule(0.0)
    assert batch is not None and batch.seqs == [first]
    ended = sched.update(batch, [7], 0.6)
    if reject_late:
        assert ended == [second] and second.finish_reason is FinishReason.LATE
        assert sched.num_late == 1 and sched.num_waiting == 1 and not second.block_table
    else:
        assert ended == [] and sched.num_late == 0 and sched.num_waiting == 2
    assert not first.is_finished and not patient.is_finished


def test_with_reject_late_a_prompt_part_way_through_its_chunks_is_dropped_once_late() -> None:
    """A 150-token chat (0.5-s target) alone, 100 tokens a step: its first chunk's step ends at
    0.6 s, past the point where the other 50 could still bring its first token in time. It
    ends as late and its blocks (the first chunk's KV) are free."""
    # Steps up to a quarter of the 0.5-s target, so that the token budget, not the time, sets
    # the chunk.
    sched = make(
        "bucket", num_blocks=400, block_size=16, max_model_len=2048, max_num_batched_tokens=100,
        policy_config={"step_budget": "slo", "ttft_share": 0.25},
        order={"order": "edf", "reject_late": True},
    )  # fmt: skip
    sched.cost_fit = OnlineCostFit(prior=KNOWN)
    chat = seq(0, 150, 4, ttft_slo=0.5)
    sched.add(chat)
    batch = sched.schedule(0.0)
    assert batch is not None and batch.num_new_tokens == [100]
    assert sched.update(batch, [None], 0.6) == [chat]
    assert chat.finish_reason is FinishReason.LATE and not chat.block_table
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


@pytest.mark.parametrize("demotion", [0.0, 1.0])
def test_a_late_prompt_goes_behind_the_on_time_ones_for_a_bounded_time(demotion: float) -> None:
    """At 0.6 s a chat whose 0.5-s TTFT deadline has passed and one with a 1-s target (alone
    ~0.1 s: still on time) wait; one prompt fits a step. Earliest deadline first alone runs
    the late one first and makes the other late too; demoted by 1 s, the late one goes after
    the on-time one but before a chat that arrives more than that second after it would be due."""
    # Steps up to a quarter of the tightest (0.5-s) target, so that a 100-token prompt fits one.
    sched = make(
        "bucket", num_blocks=400, block_size=16, max_model_len=2048, max_num_batched_tokens=100,
        policy_config={"step_budget": "slo", "late_demotion_s": demotion, "ttft_share": 0.25},
        order={"order": "edf"},
    )  # fmt: skip
    sched.cost_fit = OnlineCostFit(prior=KNOWN)
    late, on_time = seq(0, 100, 4, ttft_slo=0.5), seq(1, 100, 4, ttft_slo=1.0)
    sched.add(late)
    sched.add(on_time)
    first = sched.schedule(0.6)
    assert first is not None and first.seqs == ([on_time] if demotion else [late])
    sched.update(first, [7], 0.72)
    later = seq(2, 100, 4, arrival=0.72, ttft_slo=1.0)  # due at 1.72, after the late one's 0.5 + 1
    sched.add(later)
    second = sched.schedule(0.72)
    assert second is not None
    prompts = [s for s, n in zip(second.seqs, second.num_new_tokens, strict=True) if n > 1]
    assert prompts == ([late] if demotion else [on_time])
    assert sched.num_late_demotions == (1 if demotion else 0)  # once, though checked every step


@pytest.mark.parametrize(
    ("policy", "order", "refused"),
    [("continuous", {}, True), ("bucket", {"order": "fcfs"}, True), ("bucket", {"order": "edf"}, False)],
)
def test_reject_late_counts_the_prompts_the_order_runs_first(policy: str, order: dict, refused: bool) -> None:
    """Four 1,000-token documents (10-s targets) are queued, ~4.5 s of prefill; a 100-token
    chat with a 1-s target, alone ~0.1 s, arrives behind them. First come, first served it
    waits for all four and is refused at once; earliest deadline first runs it before them."""
    sched = make(
        policy, num_blocks=800, block_size=16, max_model_len=2048, max_num_batched_tokens=2048,
        order={**order, "reject_late": True},
    )  # fmt: skip
    sched.cost_fit = OnlineCostFit(prior=KNOWN)
    for i in range(4):
        sched.add(seq(i, 1000, 4, ttft_slo=10.0))
    chat = seq(9, 100, 4, arrival=0.01, ttft_slo=1.0)
    assert sched.prompt_tokens_ahead(chat) == (4000 if refused else 0)
    if refused:
        with pytest.raises(DeadlineUnreachableError, match="4000 queued ahead"):
            sched.add(chat)
        assert sched.num_waiting == 4 and sched.num_late == 1
    else:
        sched.add(chat)
        assert sched.num_waiting == 5 and sched.num_late == 0


@settings(max_examples=30, deadline=None)
@given(
    workload=st.lists(
        st.tuples(
            st.integers(1, 800),  # prompt
            st.integers(1, 40),  # output
            st.floats(0, 3),  # arrival
            st.sampled_from([None, 0.02, 0.05, 0.2]),  # own TPOT target
            st.sampled_from([None, 0.5, 2.0, 10.0]),  # own TTFT target
        ),
        min_size=1,
        max_size=15,
    ),
    num_blocks=st.integers(90, 300),
    min_chunk=st.sampled_from([8, 32, 64]),
    window=st.sampled_from([0, 16]),
)
def test_slo_bucket_never_runs_out_of_memory_bounds_every_step_and_starves_no_one(
    workload, num_blocks, min_chunk, window
) -> None:
    """Whatever arrives, step by step or with the TPOT window (the default): KV never over the
    pool, every request finishes, no step over its time limit by more than the one chunk
    progress allows, and none waits unboundedly."""
    sched = make(
        "bucket",
        num_blocks=num_blocks,
        block_size=16,
        max_model_len=1280,
        max_num_batched_tokens=1280,
        policy_config={"step_budget": "slo", "min_chunk": min_chunk, "tpot_window": window},
        order={"order": "edf", "default_tpot_slo_s": 0.1},
    )
    sched.cost_fit = OnlineCostFit(prior=KNOWN)
    arrivals = [
        seq(i, p, o, arrival=t, tpot_slo=tp, ttft_slo=tt) for i, (p, o, t, tp, tt) in enumerate(workload)
    ]
    pending = sorted(arrivals, key=lambda s: s.arrival_time)
    now = 0.0
    for _ in range(5000):
        while pending and pending[0].arrival_time <= now:
            sched.add(pending.pop(0))
        if not pending and not sched.has_unfinished():
            break
        batch = sched.schedule(now)
        if batch is None:
            now = pending[0].arrival_time if pending and not sched.running else now + 0.01
            continue
        assert sched.block_manager.num_used_blocks <= num_blocks
        shape = batch.shape()
        took = step_ms(KNOWN, shape) / 1e3
        budget = sched.last_budget
        assert budget is not None
        rows = zip(batch.seqs, batch.num_new_tokens, strict=True)
        decoding = [s for s, n in rows if n == 1 and s.num_computed_tokens > 0]
        # each decoding request's allowance: a step of its TPOT target t x 0.9, or as long as
        # keeps its whole reply (N tokens) within t x 0.95 when every later step keeps t x 0.9
        allowances = [
            0.9 * t
            if s.first_token_time is None  # a prompt's last token: no reply yet to bank
            else max(
                0.9 * t,
                s.first_token_time + (n - 1) * 0.95 * t - (n - s.num_output_tokens - 1) * 0.9 * t - now,
            )
            for s in decoding
            if (t := targets(s, sched.config.order)[1]) is not None and (n := s.params.max_tokens)
        ]
        # The limit: the least allowance of the decoding requests, capped at a tenth of the
        # tightest TTFT target present (the 10-s default or a request's own), or at a quarter
        # of it while a TTFT deadline is in danger (by default a step never grows past the
        # running requests' TPOT).
        present = [s.ttft_slo for s in arrivals if s.ttft_slo is not None and s.seq_id in sched.seqs]
        tightest_ms = min([10.0, *present]) * 1e3
        tpot_ms = min(allowances) * 1e3 if allowances else math.inf
        caps = [min(tpot_ms, share * tightest_ms) for share in (0.1, 0.25)]
        # or, while the window applies, what the last steps banked: within every decoding
        # request's allowance and 0.4 of the tightest TTFT target
        banked = budget.limit_ms <= min(tpot_ms, 0.4 * tightest_ms) + 1e-6 and window > 0
        assert banked or any(budget.limit_ms == pytest.approx(cap) for cap in caps), (budget.limit_ms, caps)
        if took * 1e3 > budget.limit_ms + 1e-6:
            # over its limit only by the one chunk of progress (min_chunk tokens in all, the
            # window chunk while the window applies), or by the decodes alone
            assert sum(n for n, _ in shape.prefill) <= budget.min_chunk
        assert batch.num_real_tokens <= 1280  # the token budget, decodes included
        now += took
        sched.update(batch, [7] * len(batch), now)
    else:
        raise AssertionError("the scheduler made no progress")
    assert not pending and not sched.has_unfinished()
    assert all(s.num_output_tokens == s.params.max_tokens for s in arrivals)
    assert sched.block_manager.num_free_blocks == num_blocks
    # bounded waits: with at most 15 requests of at most 800 + 40 tokens, none waits longer
    # than every other one's whole service (a generous bound that starvation would break)
    worst_service = sum(step_ms(KNOWN, BatchShape(((s.prompt_len, 0),), ())) / 1e3 for s in arrivals)
    worst_service += sum(s.params.max_tokens for s in arrivals) * 0.1
    for s in arrivals:
        assert s.first_token_time is not None
        assert s.first_token_time - s.arrival_time <= worst_service + 1.0
