"""BucketServe: bucket-based dynamic batching (DESIGN section 3; arXiv 2507.17120).

Each step decodes every running sequence (continuous decode) and, when a bucket is ready,
adds one prefill batch drawn from that bucket alone, so that the prompts batched together
have similar lengths. The batch size comes from the free KV memory: M_safe = safety x free,
N_b = floor(M_safe / S_b) with S_b the longest sequence the bucket's batch can reach.
Admission reserves KV for a request's whole life (``reserve="max_tokens"``: never a
preemption) or for its predicted output (``reserve="predicted"``: preempt by recompute, the
least urgent first, should a sequence outgrow its reservation while memory is short).

How many prompt tokens a step takes (``step_budget``): "tokens", the paper's, takes whole
prompts up to ``max_num_batched_tokens`` (one prompt may exceed it); "slo" takes as many as
keep every running request's time per output token over its reply within its TPOT target
(what its faster steps banked, and the margin every step keeps, spent first) and the step
under ``ttft_share`` of the tightest TTFT target it knows (``core/budget.py``; the cost
model is fitted online from the steps the executor reports), chunking prompts across steps,
most urgent first, and lets a step grow (to ``danger_ttft_share`` of the tightest TTFT
target, within the TPOT limit unless ``ttft_lift``) when one of the most urgent prompts, in
urgency order, would otherwise miss a TTFT deadline it can still meet, or when a deep queue
is all late already (nothing left to save; larger steps empty it sooner). A prompt that will
miss its TTFT deadline anyway goes behind the ones still on time (``late_demotion_s``).
The slo budget plans each step at a quantile of how far recent steps ran over their
prediction (``plan_quantile``); with ``tpot_window`` (16 by default) it may also run a step
as long as keeps the mean of the last that many measured steps within the tightest TPOT target
(``_window_limit``; up to ``window_ttft_share`` of the tightest TTFT target, and within every
decoding request's TPOT limit over its reply), so that decode-only steps bank time for fewer,
larger chunks (each step with prompt tokens pays a fixed overhead beside its decode rows, and
on a CPU with AMX a small chunk costs several times a large one's per token).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bucketserve.core.block_manager import BlockManager, blocks_for
from bucketserve.core.buckets import Bucket, BucketManager, optimal_boundaries
from bucketserve.core.budget import StepBudget
from bucketserve.core.monitor import Monitor
from bucketserve.core.ordering import targets, urgency
from bucketserve.core.policies.registry import register_policy
from bucketserve.core.scheduler import BatchShape, ScheduledBatch, Scheduler
from bucketserve.core.sequence import FinishReason, Sequence, SequenceStatus
from bucketserve.options import check, check_fields, option

if TYPE_CHECKING:
    from bucketserve.config import SchedulerConfig

SPLIT_MODES = ("bisect", "optimal")
RESERVES = ("max_tokens", "predicted")
STEP_BUDGETS = ("tokens", "slo")
# slo: how many of the most urgent prompts the TTFT check looks at each step.
DEADLINE_LOOKAHEAD = 32


@dataclass
class BucketConfig:
    """BucketServe's options (DESIGN section 3). Lengths are prompt tokens."""

    n_max: int | None = option(
        None, help="split buckets when more requests than this wait (default: --max-num-seqs)"
    )
    theta: float = option(0.5, help="split a crowded bucket when more than this share is below its midpoint")
    dispatch_window_s: float = option(
        0.05,
        name="window",
        metavar="SECONDS",
        help="dispatch a bucket whose most urgent request waited this long",
    )
    hold_share: float = option(
        0.0,
        metavar="SHARE",
        help="also hold a bucket until its most urgent request waited this share of its own TTFT "
        "target (a chat with a 1-s target 0.2 s at 0.2, a document with 5 s 1 s), so that prompts "
        "which can wait go through together in fewer, larger prompt steps (each step with prompt "
        "tokens pays a fixed cost beside its decode rows); never while the executor is idle (0: off; "
        "at 0.2 on an EPYC it lowered TPOT p50 below capacity and lost load near it on the Azure "
        "trace, docs/RESULTS.md)",
    )
    initial_boundaries: tuple[int, ...] = option(
        (),
        name="boundaries",
        metavar="N,N,...",
        help="initial inner bucket boundaries in prompt tokens (default: one bucket)",
    )
    split_mode: str = option(
        "bisect",
        choices=SPLIT_MODES,
        help="bisect at the midpoint (paper) or optimal (least expected padding)",
    )
    reserve: str = option(
        "max_tokens",
        choices=RESERVES,
        help="KV reserved per request: prompt + max_tokens (never preempts) or + predicted output",
    )
    memory_safety: float = option(0.9, help="M_safe = this share of the free KV memory")
    step_budget: str = option(
        "slo",
        choices=STEP_BUDGETS,
        help="prompt tokens per step: tokens = whole prompts up to --max-num-batched-tokens (paper); "
        "slo = as many as keep every running request within its TPOT target over its reply and "
        "the step under --bucket-ttft-share of the tightest TTFT target (chunking prompts, most "
        "urgent first; more when a TTFT deadline is in danger)",
    )
    tpot_margin: float = option(
        0.9, help="slo: every step is held to this share of the TPOT targets of the requests it decodes"
    )
    ttft_share: float = option(
        0.1,
        help="slo: no step runs longer than this share of the tightest TTFT target the server knows "
        "(--slo-classes, --default-ttft-slo, the requests' own), so one that arrives mid-step can "
        "still start in time (a quarter held less load over HTTP on ShareGPT, docs/RESULTS.md)",
    )
    danger_ttft_share: float = option(
        0.25,
        help="slo: while a queued prompt's TTFT deadline is in danger, a step may run up to this "
        "share of the tightest TTFT target (larger steps prefill more per second; never less than "
        "--bucket-ttft-share), still within the running requests' TPOT limit unless --bucket-ttft-lift",
    )
    plan_quantile: float = option(
        0.75,
        help="slo: plan each step's time at this quantile of the recent steps' measured / "
        "predicted time, so that most steps end within their limit on a machine whose step "
        "times scatter (0: at the cost model's prediction)",
    )
    min_chunk: int = option(32, help="slo: the fewest prompt tokens a step takes while prompts wait")
    tpot_window: int = option(
        16,
        metavar="STEPS",
        help="slo: a step may also run as long as keeps the mean time of the last STEPS steps "
        "(measured: one that ran over shortens the next) within the running requests' tightest "
        "TPOT target x --bucket-tpot-margin, so that decode-only steps bank time for fewer, larger "
        "prompt chunks (0 or 1: every step on its own, the default before the twenty-ninth "
        "session; on a CPU with AMX the window held more load on the Azure trace and about as "
        "much on the other workloads, docs/RESULTS.md)",
    )
    window_chunk: int = option(
        512,
        metavar="TOKENS",
        help="slo, while the TPOT window applies: the fewest prompt tokens a chunk takes unless it "
        "ends its prompt (a step with prompt tokens costs a fixed overhead beside its decode rows, "
        "and on a CPU with AMX a 128-token chunk costs 1.6x a 512-token one per token); waiting "
        "prompts are forced through with this many tokens, over the limit (one chunk, or whole "
        "short prompts), only after --bucket-tpot-window - 1 steps without prompt tokens or when "
        "the most urgent one's TTFT deadline cannot wait",
    )
    window_ttft_share: float = option(
        0.4,
        metavar="SHARE",
        help="slo, while the TPOT window applies: a step may run up to this share of the tightest "
        "TTFT target on time the steps before it banked, still within the decoding requests' TPOT "
        "limit over their replies (at --bucket-ttft-share's 0.1 a 512-token window chunk never fit "
        "on a CPU and every one waited out the window to be forced through)",
    )
    late_demotion_s: float = option(
        30.0,
        name="late-demotion",
        metavar="SECONDS",
        help="a prompt that can no longer meet its TTFT target (not even run whole in the next "
        "step) moves this much later in the urgency order, behind the prompts that still can; it "
        "still runs, overtaken by at most this many seconds of later arrivals (0: off)",
    )
    ttft_lift: bool = option(
        False,
        help="slo: let a step run up to --bucket-danger-ttft-share of the tightest TTFT target, past "
        "the running requests' TPOT limit, when a queued prompt would otherwise miss its TTFT "
        "deadline (a queued request's TTFT before the running ones' TPOT; default: the running "
        "requests' TPOT first)",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        check(self.n_max is None or self.n_max >= 1, f"n_max must be >= 1, got {self.n_max}")
        check(0 < self.theta < 1, f"theta must be in (0, 1), got {self.theta}")
        check(self.dispatch_window_s >= 0, f"dispatch_window_s must be >= 0, got {self.dispatch_window_s}")
        check(0 <= self.hold_share < 1, f"hold_share must be in [0, 1), got {self.hold_share}")
        self.initial_boundaries = tuple(sorted(set(self.initial_boundaries)))
        check(all(b > 0 for b in self.initial_boundaries), "initial boundaries must be > 0")
        check(0 < self.memory_safety <= 1, f"memory_safety must be in (0, 1], got {self.memory_safety}")
        check(0 < self.tpot_margin <= 1, f"tpot_margin must be in (0, 1], got {self.tpot_margin}")
        check(0 < self.ttft_share <= 1, f"ttft_share must be in (0, 1], got {self.ttft_share}")
        check(
            0 < self.danger_ttft_share <= 1,
            f"danger_ttft_share must be in (0, 1], got {self.danger_ttft_share}",
        )
        check(0 <= self.plan_quantile < 1, f"plan_quantile must be in [0, 1), got {self.plan_quantile}")
        check(self.late_demotion_s >= 0, f"late_demotion_s must be >= 0, got {self.late_demotion_s}")
        check(self.min_chunk >= 1, f"min_chunk must be >= 1, got {self.min_chunk}")
        check(self.tpot_window >= 0, f"tpot_window must be >= 0, got {self.tpot_window}")
        check(self.window_chunk >= 1, f"window_chunk must be >= 1, got {self.window_chunk}")
        check(
            0 < self.window_ttft_share <= 1,
            f"window_ttft_share must be in (0, 1], got {self.window_ttft_share}",
        )


class BucketScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int):
        super().__init__(config, block_manager, max_model_len)
        self.cfg: BucketConfig = config.policy_config
        self.buckets = BucketManager(max_model_len, self.cfg.initial_boundaries)
        self.n_max = self.cfg.n_max or config.max_num_seqs
        self.monitor = Monitor(max_model_len)
        self._keys: dict[str, float] = {}
        self.last_budget: StepBudget | None = None  # slo: the last step's budget (for tests)
        # The requests present with a TTFT target of their own (few, usually none), kept as they
        # come and go so that a step need not scan every request for the tightest target.
        self._own_ttfts: dict[str, float] = {}
        self._demoted: set[str] = set()  # late prompts whose key moved (_demote_late)
        self._num_demotions = 0  # since start (num_late_demotions)
        # slo: the last tpot_window - 1 steps' measured times, and how many steps in a row ran
        # without prompt tokens (_step_budget's window and progress).
        self._recent_steps: deque[float] = deque(maxlen=max(0, self.cfg.tpot_window - 1))
        self._steps_without_prompt = 0

    def add(self, seq: Sequence) -> None:
        super().add(seq)
        self.monitor.on_arrival(seq.prompt_len)
        if seq.ttft_slo is not None:
            self._own_ttfts[seq.seq_id] = seq.ttft_slo

    def observe_step(self, shape: BatchShape, seconds: float) -> None:
        super().observe_step(shape, seconds)
        if self._recent_steps.maxlen:
            self._recent_steps.append(seconds)

    # -- queue: the buckets ------------------------------------------------------------
    def _enqueue(self, seq: Sequence) -> None:
        key = self._keys.setdefault(seq.seq_id, urgency(seq, self.config.order))
        self.buckets.push(seq, key)

    _requeue = _enqueue  # a preempted sequence keeps its urgency, so it goes back ahead

    def _runs_before(self, other: Sequence, seq: Sequence) -> bool:
        theirs = self._keys.get(other.seq_id)  # none: reserved for a handover, not prefilled here
        mine = self._keys.get(seq.seq_id)
        if mine is None:  # not queued yet: admission asks
            mine = urgency(seq, self.config.order)
        return theirs is not None and theirs <= mine

    def _dequeue(self, seq: Sequence) -> None:
        self.buckets.remove(seq)

    def _finish(self, seq: Sequence, reason: FinishReason, now: float) -> None:
        super()._finish(seq, reason, now)
        self._keys.pop(seq.seq_id, None)
        self._own_ttfts.pop(seq.seq_id, None)
        self._demoted.discard(seq.seq_id)

    # A handed-over sequence keeps an urgency here too: running ones are decoded in its order.
    def attach(self, seq: Sequence, now: float) -> None:
        self._keys.setdefault(seq.seq_id, urgency(seq, self.config.order))
        super().attach(seq, now)

    def detach(self, seq: Sequence) -> list[int]:
        self._keys.pop(seq.seq_id, None)
        self._own_ttfts.pop(seq.seq_id, None)
        self._demoted.discard(seq.seq_id)
        return super().detach(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.buckets)

    def queue_lengths(self) -> list[tuple[str, int]]:
        return [(f"[{b.lower},{b.upper})", len(b)) for b in self.buckets.buckets]

    def queue_edges(self) -> list[int]:
        return self.buckets.boundaries

    @property
    def num_queue_splits(self) -> int:
        return self.buckets.num_splits

    @property
    def num_queue_merges(self) -> int:
        return self.buckets.num_merges

    @property
    def num_late_demotions(self) -> int:
        return self._num_demotions

    def _adapt(self) -> None:
        """Split or merge buckets for the current load (once per step, not per arrival)."""
        edges = None
        crowded = len(self.buckets) > self.n_max and any(len(b) > self.n_max for b in self.buckets.buckets)
        if self.cfg.split_mode == "optimal" and crowded:
            m = self.monitor
            edges = optimal_boundaries(
                m.histogram, m.bin_width, self.max_model_len, len(self.buckets.buckets) + 1
            )
        self.buckets.adapt(self.n_max, self.cfg.theta, edges)

    # -- memory ----------------------------------------------------------------------------
    def reserved_tokens(self, seq: Sequence) -> int:
        """KV tokens admission sets aside for ``seq``."""
        if self.cfg.reserve == "predicted" and seq.predicted_output_len is not None:
            return min(seq.max_len, len(seq) + max(1, seq.predicted_output_len - seq.num_output_tokens))
        return seq.max_len

    def safe_free_blocks(self) -> int:
        """M_safe in blocks: the safety share of the blocks not yet promised to running sequences.

        With nothing running the margin has nothing to protect, and a request that needs more
        than the safety share of the pool (admission lets in up to all of it) must still run.
        """
        bm = self.block_manager
        if not self.running:
            return bm.num_free_blocks
        promised = sum(
            max(0, blocks_for(self.reserved_tokens(s), bm.block_size) - len(s.block_table))
            for s in self.running
        )
        return int(self.cfg.memory_safety * max(0, bm.num_free_blocks - promised))

    def batch_size(self, bucket: Bucket, safe_blocks: int) -> int:
        """N_b = floor(M_safe / S_b), S_b = the longest sequence the bucket's batch can reach:
        the longest prompt queued in the bucket (``Bucket.longest``) plus the output reserved
        by its most urgent request; capped by free seats. (The step's token budget then caps
        the prompt tokens actually taken, one prompt always allowed.) S_b took the bucket's
        upper edge for the prompt: with the one bucket of a start that has not split (fewer
        than ``n_max`` waiting) that edge is max_model_len, and N_b fell to ~11 of 200
        requests a step in an offline run whose every reservation fit the pool at once (its
        prompts took 34 steps, continuous's 5)."""
        head = bucket.head()
        assert head is not None
        s_b = min(self.max_model_len, bucket.longest + self.reserved_tokens(head) - head.prompt_len)
        by_memory = safe_blocks // blocks_for(s_b, self.block_manager.block_size)
        if (
            by_memory == 0
            and blocks_for(self.reserved_tokens(head), self.block_manager.block_size) <= safe_blocks
        ):
            by_memory = 1  # S_b is a bound; the head itself fits
        seats = self.config.max_num_seqs - len(self.running)
        return max(0, min(by_memory, seats))

    # -- the step --------------------------------------------------------------------------
    def schedule(self, now: float) -> ScheduledBatch | None:
        bm = self.block_manager
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted: list[Sequence] = []
        chunking = self.cfg.step_budget == "slo"
        prefilling: list[Sequence] = []  # slo: running prompts with chunks still to compute

        # Continuous decode over all running sequences, most urgent first.
        self.running.sort(key=lambda s: self._keys[s.seq_id])
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below by a more urgent sequence
            if chunking and seq.num_uncomputed_tokens > 1:
                prefilling.append(seq)
                continue
            while not bm.can_allocate(bm.blocks_needed(seq, len(seq))):
                # Only with reserve="predicted": a sequence outgrew its prediction.
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                bm.allocate(seq, len(seq))
                seqs.append(seq)
                counts.append(seq.num_uncomputed_tokens)

        # One prefill batch from the most urgent ready bucket.
        self._adapt()
        if self.cfg.late_demotion_s > 0:
            self._demote_late(now, prefilling)
        bucket = self._pick_bucket(now)
        bounds = None if bucket is None else (bucket.lower, bucket.upper)
        if chunking:
            prefilling = [s for s in prefilling if s.status is SequenceStatus.RUNNING]
            budget = self.last_budget = self._step_budget(now, seqs, prefilling, bucket)
            self._take_chunks(now, budget, prefilling, bucket, seqs, counts, preempted)
        elif bucket is not None:
            safe = self.safe_free_blocks()
            tokens = self.config.max_num_batched_tokens
            for taken in range(self.batch_size(bucket, safe)):
                seq = bucket.head()
                if seq is None or seq in preempted:
                    break
                need = blocks_for(self.reserved_tokens(seq), bm.block_size)
                n = seq.num_uncomputed_tokens
                if need > safe or (n > tokens and taken > 0):  # one prompt may exceed the budget
                    break
                tokens -= n
                self._start_prompt(seq, bucket, n, now, seqs, counts)
                safe -= need

        if not seqs:
            return None
        batch = ScheduledBatch(seqs, counts, preempted, bucket=bounds)
        self._steps_without_prompt = 0 if batch.num_prefill_rows else self._steps_without_prompt + 1
        return batch

    def _demote_late(self, now: float, prefilling: list[Sequence]) -> None:
        """Move the prompts that will miss their TTFT deadline anyway (``is_late``) behind the
        ones that still can meet theirs: their urgency key grows by ``late_demotion_s``, once.

        Earliest-deadline-first alone runs the most overdue prompt first, so under overload
        every request ends up late (EDF's domino effect); run after the ones still on time, a
        late one costs no one else their deadline. Only the started prompts and each bucket's
        head are checked, before the step picks its prompts: a queued prompt is checked when
        it comes to its bucket's head. Keys stay finite, so every wait stays bounded
        (OrderConfig's aging argument, with this much more)."""

        def demote(seq: Sequence) -> bool:
            """Move ``seq``'s key if it is late and was not moved before; whether it moved."""
            if seq.seq_id in self._demoted or seq.first_token_time is not None or not self.is_late(seq, now):
                return False
            self._demoted.add(seq.seq_id)
            self._num_demotions += 1
            self._keys[seq.seq_id] += self.cfg.late_demotion_s
            return True

        for seq in prefilling:
            demote(seq)
        for bucket in self.buckets.buckets:
            while (head := bucket.head()) is not None and demote(head):
                self.buckets.pop(bucket)  # back in at its new key
                self.buckets.push(head, self._keys[head.seq_id])

    def _start_prompt(
        self, seq: Sequence, bucket: Bucket, n: int, now: float, seqs: list[Sequence], counts: list[int]
    ) -> None:
        """Take ``seq`` off ``bucket`` and into this step with its first ``n`` prompt tokens."""
        self.buckets.pop(bucket)
        self.block_manager.allocate(seq, seq.num_computed_tokens + n)
        self._start(seq, now)
        seqs.append(seq)
        counts.append(n)

    def _take_chunks(
        self,
        now: float,
        budget: StepBudget,
        started: list[Sequence],
        bucket: Bucket | None,
        seqs: list[Sequence],
        counts: list[int],
        preempted: list[Sequence],
    ) -> None:
        """slo: the step's prompt chunks, most urgent first, from the prompts already started
        and the picked bucket's batch (up to N_b new ones), until the budget is spent. A chunk
        of a started prompt does not go ahead of a more urgent new one: a short request is not
        kept waiting behind a long document's remaining chunks."""
        bm = self.block_manager
        safe = self.safe_free_blocks() if bucket is not None else 0
        seats = self.batch_size(bucket, safe) if bucket is not None else 0
        pending = list(reversed(started))  # most urgent last, to pop
        while True:
            head = bucket.head() if bucket is not None and seats > 0 else None
            if head is not None and (
                head in preempted or blocks_for(self.reserved_tokens(head), bm.block_size) > safe
            ):
                head = None  # the bucket's batch ends here
            if pending and (head is None or self._keys[pending[-1].seq_id] <= self._keys[head.seq_id]):
                seq = pending.pop()
                n = budget.take(seq.num_uncomputed_tokens, seq.num_computed_tokens)
                if not n:
                    continue
                if not bm.can_allocate(bm.blocks_needed(seq, seq.num_computed_tokens + n)):
                    budget.give_back()  # only with reserve="predicted": it waits for blocks
                    continue
                bm.allocate(seq, seq.num_computed_tokens + n)
                seqs.append(seq)
                counts.append(n)
            elif head is not None:
                assert bucket is not None
                n = budget.take(head.num_uncomputed_tokens, head.num_computed_tokens)
                if n == 0:
                    seats = 0  # the step is full: no more new prompts
                    continue
                safe -= blocks_for(self.reserved_tokens(head), bm.block_size)
                seats -= 1
                self._start_prompt(head, bucket, n, now, seqs, counts)
            else:
                return

    def _step_budget(
        self, now: float, decoding: list[Sequence], prefilling: list[Sequence], bucket: Bucket | None
    ) -> StepBudget:
        """slo: this step's budget. The time limit keeps every decoding request within its
        TPOT target (``_tpot_limit``), capped at ``ttft_share`` of the tightest TTFT
        target the server knows; none while the cost model has seen too few steps. Grown to
        ``danger_ttft_share`` of that target (within the TPOT limit, unless ``ttft_lift``)
        for this step if, at the limit, one of the most urgent prompts (started, or queued in
        the picked bucket), taken in urgency order, would finish its prefill after its TTFT
        deadline when it could still meet it, or if a full lookahead of them waits for its
        first token and every one is late already."""
        order = self.config.order
        profile = self.cost_fit.profile()
        contexts = [len(s) for s in decoding]

        # Steps run over their prediction as often as under it: the budget plans each step's
        # time at a quantile of how far recent ones ran over (1 where the model is exact).
        slack = self.cost_fit.error_quantile(self.cfg.plan_quantile)
        # A request that arrives while this step runs waits for its end: the step keeps a share
        # of the tightest TTFT target the server knows (its classes and default, and the
        # requests present that brought their own).
        own = min(self._own_ttfts.values(), default=math.inf)
        tightest = min(self.config.order.tightest_ttft_s, own)
        cap = self.cfg.ttft_share * tightest
        # The TPOT window (``_window_limit``): while it applies, prompt work comes in chunks of
        # at least window_chunk, and a waiting prompt is forced through only after a window of
        # steps without prompt tokens (the decode-only steps bank the time for it).
        window = self._window_limit(decoding, self.cfg.window_ttft_share * tightest)
        chunk, progress = self.cfg.min_chunk, True
        tpot_limit = self._tpot_limit(decoding, now)
        if window is not None:
            # The window bounds the mean of the last steps, not each reply: a request that
            # spent its own bank (a long step before the window) keeps its TPOT limit, planned
            # at the overrun quantile as a step-by-step limit is (at the prediction, chats
            # beside documents decoded over their target: RESULTS, issue 13 twenty-ninth).
            window = min(window, tpot_limit / slack)
            chunk = max(chunk, self.cfg.window_chunk)
            progress = self._steps_without_prompt >= self.cfg.tpot_window - 1 or self._cannot_wait(
                now, prefilling, bucket
            )

        def budget(limit_s: float) -> StepBudget:
            tokens = self.config.max_num_batched_tokens
            planned = limit_s / slack if window is None else max(limit_s / slack, window)
            return StepBudget(profile, contexts, planned, tokens, chunk, progress)

        if profile is None:  # too few steps seen to predict one: the token budget alone
            return budget(math.inf)
        limit = min(tpot_limit, cap)
        # What the step may grow to while a TTFT deadline is in danger: a queue that is behind
        # already keeps a new arrival waiting longer than a step, and larger steps prefill more
        # per second. Past the running requests' TPOT limit only with ttft_lift.
        grown = max(self.cfg.danger_ttft_share, self.cfg.ttft_share) * tightest
        if not self.cfg.ttft_lift:
            grown = min(grown, tpot_limit)
        if grown <= limit:  # nothing to grow
            return budget(limit)
        queued = heapq.nsmallest(DEADLINE_LOOKAHEAD, bucket.heap) if bucket is not None else []
        candidates = sorted([*prefilling, *(s for _, _, s in queued)], key=lambda s: self._keys[s.seq_id])
        if candidates:
            # EDF feasibility at this limit: the prompts in urgency order, each finishing after
            # the ones before it at the rate the limit allows; any deadline missed lifts it.
            # Prompts that lifting cannot help do not count: a recomputed one (its first token
            # is out) and one whose prompt alone, run now, already ends past its deadline.
            # The rate: prompt tokens a step takes at the limit, with the most urgent prompt's
            # context halfway through its rest (chunks cost more as its context grows).
            first = candidates[0]
            mid = first.num_computed_tokens + first.num_uncomputed_tokens // 2
            rate = max(budget(limit).take(self.config.max_num_batched_tokens, mid), 1)
            ahead = late = 0
            for seq in candidates[:DEADLINE_LOOKAHEAD]:
                ahead += seq.num_uncomputed_tokens
                if seq.first_token_time is not None:
                    continue
                if self.is_late(seq, now):
                    late += 1
                    continue
                deadline = seq.arrival_time + targets(seq, order)[0]
                if now + math.ceil(ahead / rate) * limit > deadline:
                    limit = grown  # a TTFT deadline in danger
                    break
            else:
                # A full lookahead of late prompts: a deep queue with no deadline left to keep
                # (an offline batch, an overload), which larger steps empty sooner. Not a few
                # late ones in a burst near capacity: there the next arrivals' TTFT still
                # counts, and they would wait for the longer steps.
                if late == DEADLINE_LOOKAHEAD:
                    limit = grown
        return budget(limit)

    def _cannot_wait(self, now: float, prefilling: list[Sequence], bucket: Bucket | None) -> bool:
        """slo, while the TPOT window applies: whether the most urgent prompt (started, or its
        bucket's head), still able to meet its TTFT deadline, would pass it while the window
        banks time for it (a window of steps as long as the last): then it is forced through
        now, as a chat with a tight TTFT target must not wait out a window."""
        head = bucket.head() if bucket is not None else None
        waiting = [*prefilling, *([head] if head is not None else [])]
        first = min(waiting, key=lambda s: self._keys[s.seq_id], default=None)
        if first is None or first.first_token_time is not None or self.is_late(first, now):
            return False  # a recomputed prompt, or one late even if run whole now: it can wait
        deadline = first.arrival_time + targets(first, self.config.order)[0]
        return deadline - now < self.cfg.tpot_window * self.last_step_s

    def _window_limit(self, decoding: list[Sequence], cap: float) -> float | None:
        """slo: how long this step may run with the mean of the last ``tpot_window`` steps
        (the ones before it as measured) at most the tightest TPOT target x margin among the
        decoding requests, and at most ``cap``; None (the window does not apply) until that
        many steps were measured, or while no decoding request has a TPOT target. Every
        running request decodes in every step, so this bounds each one's time per output
        token over the window; measured times correct a step that ran over its prediction in
        the steps after it, so the window plans at the prediction, not at a quantile. (The
        caller holds it within ``_tpot_limit`` too: the mean of recent steps says nothing of a
        request that spent its bank before them.)"""
        recent = self._recent_steps
        if not recent.maxlen or len(recent) < recent.maxlen:
            return None
        order = self.config.order
        tpots = [t for s in decoding if (t := targets(s, order)[1]) is not None]
        if not tpots:
            return None
        held = min(tpots) * self.cfg.tpot_margin
        return max(0.0, min(cap, (len(recent) + 1) * held - sum(recent)))

    def _tpot_limit(self, decoding: list[Sequence], now: float) -> float:
        """slo: the longest this step may run with every decoding request's time per output
        token over its whole reply still within its TPOT target t. Every step to come is
        planned at t x margin, and the reply as a whole aims at t x (1 + margin) / 2: the
        steps that spend what was banked end on that line, and the last of them, which no
        later step can make up for, keep half the margin for a step that runs over its
        prediction. So a request of N tokens (its predicted output, else max_tokens) that
        has n out since its first at f may have this step end as late as
        f + (N - 1) x t x (1 + margin) / 2 - (N - n - 1) x t x margin: what its faster steps
        banked and the margin of the steps to come. At least t x margin, so a request already
        behind still decodes in steps of that."""
        limit = math.inf
        margin = self.cfg.tpot_margin
        aim = (1 + margin) / 2  # the reply's share of its target
        for seq in decoding:
            target = targets(seq, self.config.order)[1]
            if target is None:
                continue
            held = target * margin
            end = -math.inf
            if seq.first_token_time is not None:
                n, total = seq.num_output_tokens, seq.params.max_tokens
                if seq.predicted_output_len is not None:
                    total = min(total, max(n + 1, seq.predicted_output_len))
                end = seq.first_token_time + (total - 1) * target * aim - max(0, total - n - 1) * held
            limit = min(limit, max(held, end - now))
        return limit

    def _pick_bucket(self, now: float) -> Bucket | None:
        """The most urgent bucket that is full (N_b queued), whose most urgent request will
        have waited its hold by the next chance to dispatch it (a step from now: a hold
        shorter than a step must not cost a whole step), or that would otherwise leave the
        executor idle."""
        safe = self.safe_free_blocks()
        idle = not self.running
        for bucket in sorted((b for b in self.buckets.buckets if len(b)), key=Bucket.head_key):
            n_b = self.batch_size(bucket, safe)
            if n_b == 0:
                continue
            head = bucket.head()
            assert head is not None  # the bucket is not empty
            waited = now + self.last_step_s - head.arrival_time >= self._hold(head)
            if idle or waited or len(bucket) >= n_b:
                return bucket
        return None

    def _hold(self, head: Sequence) -> float:
        """How long a bucket's most urgent request ``head`` is held before the bucket is
        dispatched: the dispatch window, or ``hold_share`` of its own TTFT target if longer."""
        if not self.cfg.hold_share:
            return self.cfg.dispatch_window_s
        return max(self.cfg.dispatch_window_s, self.cfg.hold_share * targets(head, self.config.order)[0])


register_policy(
    "bucket",
    BucketScheduler,
    BucketConfig,
    "BucketServe's length buckets that split and merge with the load, batches sized from free KV",
)
