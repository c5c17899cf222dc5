"""Safety properties every policy must hold, and what makes BucketServe BucketServe."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketserve.config import BucketConfig, OrderConfig
from bucketserve.core.buckets import BucketManager, optimal_boundaries
from bucketserve.core.policies import policy_names
from bucketserve.core.scheduler import Scheduler
from bucketserve.core.sequence import FinishReason
from bucketserve.errors import InvalidRequestError
from tests.core_helpers import FakeExecutor, make, seq

POLICIES = policy_names()


@settings(max_examples=40, deadline=None)
@given(
    policy=st.sampled_from(POLICIES),
    workload=st.lists(
        st.tuples(st.integers(1, 60), st.integers(1, 20), st.floats(0, 2), st.integers(-2, 2)),
        min_size=1,
        max_size=30,
    ),
    num_blocks=st.integers(22, 80),
    abort_seed=st.integers(0, 10_000),
)
def test_any_policy_respects_memory_finishes_everything_and_leaks_nothing(
    policy, workload, num_blocks, abort_seed
) -> None:
    sched = make(policy, num_blocks=num_blocks, max_model_len=84, max_num_batched_tokens=128)
    rng = random.Random(abort_seed)
    arrivals = [seq(i, p, o, arrival=t, priority=pr) for i, (p, o, t, pr) in enumerate(workload)]
    ex = FakeExecutor(sched)
    pending = sorted(arrivals, key=lambda s: s.arrival_time)
    admitted, finished, aborted = [], set(), set()
    for _ in range(20_000):
        while pending and pending[0].arrival_time <= ex.now:
            s = pending.pop(0)
            sched.add(s)
            admitted.append(s)
        if admitted and rng.random() < 0.03:
            victim = rng.choice(admitted)
            if sched.finish(victim.seq_id, FinishReason.ABORT, ex.now) is not None:
                aborted.add(victim.seq_id)
        finished.update(s.seq_id for s in ex.step())
        assert sched.block_manager.num_used_blocks <= num_blocks
        if not pending and not sched.has_unfinished():
            break
    else:
        raise AssertionError("the scheduler made no progress")
    assert {s.seq_id for s in admitted} == finished | aborted
    assert all(s.num_output_tokens == s.params.max_tokens for s in admitted if s.seq_id in finished)
    assert sched.block_manager.num_free_blocks == num_blocks
    if policy in ("bucket", "static", "uellm", "distserve"):
        assert sched.num_preemptions == 0  # they reserve prompt + max_tokens at admission


@settings(max_examples=200, deadline=None)
@given(
    max_len=st.integers(2, 5000),
    lengths=st.lists(st.integers(0, 5000), max_size=200),
    n_max=st.integers(1, 20),
    ops=st.lists(st.booleans(), max_size=30),
)
def test_bucket_intervals_always_partition_the_length_range(max_len, lengths, n_max, ops) -> None:
    manager = BucketManager(max_len)
    queued = []
    for i, n in enumerate(lengths):
        s = seq(i, max(1, min(n, max_len - 1)), 1)
        manager.push(s, float(i))
        queued.append(s)
        if i % 7 == 0:
            manager.adapt(n_max, 0.5)
    for drain in ops:  # drain some, then adapt again: merges
        if drain:
            for b in manager.buckets:
                while len(b):
                    manager.pop(b)
        manager.adapt(n_max, 0.5)
    edges = manager.boundaries
    assert edges[0] == 0 and edges[-1] == max_len
    assert all(a < b for a, b in itertools.pairwise(edges)), edges
    for b in manager.buckets:
        assert all(b.lower <= min(s.prompt_len, max_len - 1) < b.upper for _, _, s in b.heap)


def test_buckets_split_under_load_and_merge_when_it_falls() -> None:
    manager = BucketManager(1000)
    for i in range(30):  # 30 short prompts, all below the midpoint 500
        manager.push(seq(i, 10 + i, 1), float(i))
    manager.adapt(n_max=10, theta=0.5)
    assert len(manager.buckets) > 1 and manager.num_splits >= 1 and manager.num_merges == 0
    assert manager.buckets[0].upper <= 500
    while len(manager):
        for b in manager.buckets:
            if len(b):
                manager.pop(b)
    manager.adapt(n_max=10, theta=0.5)
    assert [(b.lower, b.upper) for b in manager.buckets] == [(0, 1000)]
    assert manager.num_merges == manager.num_splits  # each merge removes an edge a split added


def test_optimal_boundaries_separate_two_length_clusters() -> None:
    hist = [0] * 64
    hist[1] = 50  # lengths ~ 16-32
    hist[40] = 50  # lengths ~ 640-656
    edges = optimal_boundaries(hist, bin_width=16, max_len=1024, num_buckets=2)
    assert len(edges) == 3 and 32 <= edges[1] <= 640


def test_a_bucket_prefill_batch_holds_one_bucket_only() -> None:
    """The paper's whole-prompt steps (with the slo budget a chunk of a prompt started in an
    earlier step may share a step with another bucket's batch)."""
    sched = make(
        "bucket",
        num_blocks=4000,
        max_model_len=1024,
        max_num_batched_tokens=4096,
        policy_config=BucketConfig(n_max=4, dispatch_window_s=0.0, step_budget="tokens"),
    )
    rng = random.Random(0)
    arrivals = [
        seq(i, rng.choice([rng.randint(4, 60), rng.randint(400, 900)]), 4, arrival=i * 0.001)
        for i in range(200)
    ]
    ex = FakeExecutor(sched)
    ex.run(arrivals)
    prefill_batches = [b for b in ex.batches if b.num_prefill_rows]
    assert sched.buckets.num_splits > 0  # the load did split the single starting bucket
    for b in prefill_batches:
        lower, upper = b.bucket
        prompts = [s.prompt_len for s, p in zip(b.seqs, b.is_prefill, strict=True) if p]
        assert all(lower <= p < upper for p in prompts), (b.bucket, prompts)


def test_bucket_pads_less_than_static_on_a_mixed_workload() -> None:
    """Run with padded execution for both (as a static-batch engine would), so that the
    comparison measures how well each policy groups lengths."""

    def workload() -> list:
        r = random.Random(42)
        return [
            seq(i, r.choice([r.randint(4, 40), r.randint(300, 600)]), r.randint(4, 32), arrival=0.0)
            for i in range(120)
        ]

    def padding(policy: str, **cfg: object) -> float:
        sched = make(policy, num_blocks=6000, max_model_len=1024, max_num_batched_tokens=4096, **cfg)
        ex = FakeExecutor(sched)
        original = sched.schedule

        def padded_schedule(now: float):
            batch = original(now)
            if batch is not None:
                batch.padded = True
            return batch

        sched.schedule = padded_schedule  # type: ignore[method-assign]
        ex.run(workload())
        real = sum(b.num_real_tokens for b in ex.batches)
        padded = sum(b.num_padded_tokens for b in ex.batches)
        return 1 - real / padded

    bucket = padding("bucket", policy_config=BucketConfig(n_max=16, dispatch_window_s=0.0))
    static = padding("static")
    assert bucket < static, (bucket, static)


def test_a_request_that_can_never_fit_is_rejected_at_admission() -> None:
    for policy in POLICIES:
        sched = make(policy, num_blocks=4, block_size=4, max_model_len=1000)  # 16 tokens of KV
        with pytest.raises(InvalidRequestError, match="whole KV cache holds 4 blocks"):
            sched.add(seq(0, 16, 1))
        assert not sched.has_unfinished()


@pytest.mark.parametrize("policy", POLICIES)
def test_the_same_workload_gives_the_same_schedule(policy: str) -> None:
    def trace() -> list:
        rng = random.Random(7)
        arrivals = [
            seq(i, rng.randint(1, 100), rng.randint(1, 30), arrival=rng.random() * 2) for i in range(60)
        ]
        ex = FakeExecutor(make(policy, num_blocks=200, max_model_len=256))
        ex.run(arrivals)
        return [(tuple(s.seq_id for s in b.seqs), tuple(b.num_new_tokens)) for b in ex.batches]

    assert trace() == trace()


def test_priority_runs_first_but_aging_bounds_the_wait() -> None:
    """The stated bound: a request of priority p is overtaken only by requests of priority q
    that arrive less than (p - q) x aging_s after it, so its wait is at most the time to
    serve the requests that arrived before arrival + (p - q) x aging_s.

    Here the executor is overloaded (one sequence at a time, 40 arrivals/s), a priority-4
    request arrives at 0.5 s with aging_s = 0.5: it must start after every priority-0
    request that arrived before 0.5 + 4 x 0.5 = 2.5 s and before every one that came later.
    """
    order = OrderConfig(aging_s=0.5)
    sched = make(
        "bucket",
        num_blocks=2000,
        max_model_len=256,
        max_num_seqs=1,
        order=order,
        policy_config=BucketConfig(dispatch_window_s=0.0),
    )
    low = seq(0, 10, 4, arrival=0.5, priority=4)
    stream = [seq(i, 10, 4, arrival=0.025 * i, priority=0) for i in range(1, 200)]  # 5 s of arrivals
    FakeExecutor(sched).run([low, *stream])
    horizon = low.arrival_time + 4 * order.aging_s
    before = [s for s in stream if s.first_scheduled_time < low.first_scheduled_time]
    after = [s for s in stream if s.first_scheduled_time > low.first_scheduled_time]
    assert low.first_scheduled_time - low.arrival_time > 1.0  # priority made it wait
    assert all(s.arrival_time < horizon for s in before)
    assert all(s.arrival_time >= horizon for s in after)
    assert before and after


def one_seat_bucket(order: OrderConfig, max_model_len: int = 256) -> Scheduler:
    """A bucket scheduler that prefills one prompt at a time, dispatching at once: who runs
    first is the order's alone."""
    return make(
        "bucket",
        num_blocks=2000,
        max_model_len=max_model_len,
        max_num_seqs=1,
        order=order,
        policy_config=BucketConfig(dispatch_window_s=0.0),
    )


def test_edf_serves_the_tightest_deadline_first() -> None:
    sched = one_seat_bucket(OrderConfig(order="edf"))
    relaxed = seq(0, 10, 2, arrival=0.0, ttft_slo=5.0)
    urgent = seq(1, 10, 2, arrival=0.0, ttft_slo=0.1)
    sched.add(relaxed)
    sched.add(urgent)
    batch = sched.schedule(0.0)
    assert [s.seq_id for s in batch.seqs] == ["r1"]


CLASSES = ("256:1:-", "2048:5:-")  # chats: TTFT 1 s; documents: 5 s


@pytest.mark.parametrize("order, first", [("edf", "r0"), ("edfs", "r1"), (None, "r1")])
def test_edfs_puts_a_long_document_behind_a_chat_that_edf_would_run_after_it(
    order: str | None, first: str
) -> None:
    """A 1,600-token job with the documents' 5-s target, queued at 0, and a chat arriving at
    4.5 s: EDF's deadlines are 5 and 5.5 s; edfs (the default: order None) moves the document,
    4 s looser than the chats, by 4 x 1,600 x 0.0006 = 3.84 s to 8.84 s, so the chat goes first."""
    chosen = {} if order is None else {"order": order}
    sched = one_seat_bucket(
        OrderConfig(**chosen, slo_classes=CLASSES, deadline_token_share=0.0006), max_model_len=2048
    )
    sched.add(seq(0, 1500, 100, arrival=0.0))
    sched.add(seq(1, 200, 100, arrival=4.5))
    batch = sched.schedule(4.5)
    assert [s.seq_id for s in batch.seqs] == [first]


def test_edfs_keeps_deadline_order_in_the_tightest_class_whatever_the_sizes() -> None:
    sched = one_seat_bucket(OrderConfig(order="edfs", slo_classes=CLASSES), max_model_len=512)
    for i, size in ((2, 10), (0, 250), (1, 100)):  # the largest chat arrived first
        sched.add(seq(i, size, 100, arrival=0.01 * i))
    ex = FakeExecutor(sched)
    ex.run([])
    assert [b.seqs[0].seq_id for b in ex.batches if b.num_prefill_rows] == ["r0", "r1", "r2"]


def test_a_bucket_bounds_its_longest_queued_prompt() -> None:
    """``Bucket.longest``, the S_b behind N_b: the longest prompt queued since the bucket was
    formed or last empty; a pop leaves it (a bound, kept in O(1)), a split measures each half."""
    m = BucketManager(1024)
    for i, n in enumerate([100, 700, 300, 600]):
        m.push(seq(i, n, 4), float(i))
    (b,) = m.buckets
    assert b.longest == 700
    assert m.pop(b).seq_id == "r0" and b.longest == 700
    for _ in range(3):
        m.pop(b)
    assert b.longest == 0
    for i, n in enumerate([100, 200, 300, 600, 800]):
        m.push(seq(i, n, 4), float(i))
    m.adapt(n_max=2, theta=0.5)  # 3 of 5 below the midpoint 512: split there, then the lower half
    assert len(m.buckets) == 3
    assert [x.longest for x in m.buckets] == [max(s.prompt_len for _, _, s in x.heap) for x in m.buckets]


def test_bucket_batch_size_follows_free_memory_and_the_longest_queued_request() -> None:
    """N_b = floor(M_safe / S_b), S_b the largest KV reservation among the bucket's queued
    requests (not the bucket's upper edge, 256 tokens = 65 blocks here): in a pool of 100
    blocks x 4 tokens, requests of 50 + 4 tokens reserve 14 blocks, so 7 fit 100 free blocks;
    one of 200 + 4 queued beside them reserves 51, and then one batch takes a single request."""
    sched = make(
        "bucket",
        num_blocks=100,
        block_size=4,
        max_model_len=256,
        max_num_batched_tokens=4096,
        policy_config=BucketConfig(dispatch_window_s=0.0),
    )
    for i in range(5):
        sched.add(seq(i, 50, 4))
    (bucket,) = sched.buckets.buckets
    assert sched.batch_size(bucket, 100) == 7
    assert sched.batch_size(bucket, 27) == 1
    sched.add(seq(5, 200, 4))
    assert sched.batch_size(bucket, 100) == 1
    assert sched.batch_size(bucket, 200) == 3
    batch = sched.schedule(0.0)
    assert [s.seq_id for s in batch.seqs] == ["r0"]  # the most urgent alone


def test_bucket_admits_a_quiet_start_s_requests_together_when_the_pool_holds_them() -> None:
    """200 requests at once into the one bucket of a start that has not split: each reserves
    14 blocks of a 5,000-block pool, so a step takes as many as its token budget holds, not
    the ~1 that a bound of max_model_len (8,192 tokens) per request would allow."""
    sched = make(
        "bucket",
        num_blocks=5000,
        block_size=4,
        max_model_len=8192,
        max_num_seqs=256,
        max_num_batched_tokens=4096,
        policy_config=BucketConfig(dispatch_window_s=0.0, step_budget="tokens"),
    )
    for i in range(200):
        sched.add(seq(i, 50, 4))
    batch = sched.schedule(0.0)
    assert batch.num_prefill_rows == 81  # 4,096 // 50 whole prompts, and one more may exceed it


def test_predicted_reservation_admits_more_and_preempts_when_a_prediction_is_short() -> None:
    def run(reserve: str) -> tuple[int, int, list]:
        sched = make(
            "bucket",
            num_blocks=40,
            block_size=4,
            max_model_len=128,
            max_num_batched_tokens=512,
            policy_config=BucketConfig(reserve=reserve, dispatch_window_s=0.0),
        )
        arrivals = [seq(i, 8, 40, predicted_output_len=4) for i in range(8)]  # predictions far too short
        ex = FakeExecutor(sched)
        done = ex.run(arrivals)
        return max(len(b) for b in ex.batches), sched.num_preemptions, done

    rows_max, preempt_max, done_max = run("max_tokens")
    rows_pred, preempt_pred, done_pred = run("predicted")
    assert preempt_max == 0 and len(done_max) == 8
    assert rows_pred > rows_max  # smaller reservations let more run at once
    assert preempt_pred > 0 and len(done_pred) == 8  # and overflow is handled by recompute
    assert all(s.num_output_tokens == 40 for s in done_pred)


def test_an_optimal_reshape_counts_one_split_per_bucket_it_adds() -> None:
    manager = BucketManager(1000)
    for i in range(30):
        manager.push(seq(i, 10 + 30 * i, 1), float(i))
    manager.adapt(n_max=10, theta=0.5, optimal_edges=[0, 100, 400, 1000])
    assert [b.lower for b in manager.buckets] == [0, 100, 400]
    assert manager.num_splits == 2
