"""The scheduler interface shared by every policy, the real engine and the simulator.

An executor (the engine's model runner, the simulator's cost model, the tests' fake
executors) drives one loop:

    scheduler.add(seq)                    # admission; raises if the request can never fit
    batch = scheduler.schedule(now)       # this step's rows, their KV blocks allocated
    tokens = execute(batch)               # a token for each row that samples
    scheduler.update(batch, tokens, now)  # append, stop, free: returns what finished
    scheduler.finish(seq_id, reason, now) # a stop string, a failed batch or an abort;
                                          # frees the sequence's KV blocks at once

The scheduler alone decides when a sequence ends from its tokens (end-of-sequence, stop
token ids, max_tokens); the engine adds stop strings, which need the detokenized text.
"""

from __future__ import annotations

import abc
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bucketserve.core.block_manager import BlockManager, blocks_for
from bucketserve.core.cost import OnlineCostFit, step_ms
from bucketserve.core.ordering import targets
from bucketserve.core.sequence import FinishReason, Sequence, SequenceStatus
from bucketserve.errors import DeadlineUnreachableError, InvalidRequestError

if TYPE_CHECKING:
    from bucketserve.config import SchedulerConfig  # config.py imports the core's policies


@dataclass(frozen=True)
class BatchShape:
    """What a batch's cost depends on, read before it runs: each prefill row's chunk and the
    tokens already cached before it, each decode row's context (its token included).

    The engine keeps it in its step records and the simulator's cost model charges it, so a
    measured step can be set beside the model's estimate for the very same work (its JSON
    form is ``bucketserve.wire.StepSample``'s).
    """

    prefill: tuple[tuple[int, int], ...] = ()  # (chunk tokens, cached tokens) per prefill row
    decode: tuple[int, ...] = ()  # context length per decode row
    padded: bool = False
    num_ghost_rows: int = 0

    @property
    def num_rows(self) -> int:
        return len(self.prefill) + len(self.decode)


@dataclass
class ScheduledBatch:
    """One step's work: each sequence computes its next ``num_new_tokens[i]`` tokens.

    Two facts per row are fixed when the batch is formed, before the step advances anything:
    ``is_prefill[i]``, the row computes more than one token (a prompt, a chunk of one, or a
    recompute after preemption; a one-token row runs and costs as a decode row, whatever its
    phase), and ``samples[i]``, the row's chunk reaches the end of its sequence's tokens, so
    it yields an output token (a chunk short of the end does not).

    ``padded`` asks the executor to compute every prefill row as long as the longest one,
    as static-batching engines (HF ``generate``) do, and ``num_ghost_rows`` extra decode
    rows for members of a static batch that already finished but whose batch runs on;
    paged engines pack tokens without padding (``padded=False``, no ghosts).
    """

    seqs: list[Sequence]
    num_new_tokens: list[int]
    preempted: list[Sequence] = field(default_factory=list)
    padded: bool = False
    num_ghost_rows: int = 0
    bucket: tuple[int, int] | None = None  # the length interval its prefill rows came from
    is_prefill: list[bool] = field(init=False)
    samples: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        self.is_prefill = [n > 1 for n in self.num_new_tokens]
        self.samples = [
            seq.num_computed_tokens + n == len(seq)
            for seq, n in zip(self.seqs, self.num_new_tokens, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_real_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def num_prefill_rows(self) -> int:
        return sum(self.is_prefill)

    @property
    def num_padded_tokens(self) -> int:
        """Tokens the executor computes, padding and ghost rows included."""
        return self.computed_tokens(self.padded)

    def computed_tokens(self, padded: bool) -> int:
        """Tokens computed with every prefill row padded to the longest (``padded``) or
        packed without padding; ghost rows included."""
        if not padded:
            return self.num_real_tokens + self.num_ghost_rows
        prefill = [n for n, p in zip(self.num_new_tokens, self.is_prefill, strict=True) if p]
        decode = len(self.num_new_tokens) - len(prefill)
        return len(prefill) * max(prefill, default=0) + decode + self.num_ghost_rows

    def shape(self) -> BatchShape:
        """The batch's shape now; call it before the step runs and advances the sequences."""
        prefill, decode = [], []
        for seq, n, is_prefill in zip(self.seqs, self.num_new_tokens, self.is_prefill, strict=True):
            if is_prefill:
                prefill.append((n, seq.num_computed_tokens))
            else:
                decode.append(len(seq))
        return BatchShape(tuple(prefill), tuple(decode), self.padded, self.num_ghost_rows)


def check_stop(seq: Sequence) -> FinishReason | None:
    """Why ``seq`` ends with the token it has just appended, if it does; a stop token id
    that ends it is recorded as ``seq.stop_reason`` (vLLM reports it so).

    An end-of-sequence token (unless ``ignore_eos``) or a stop token id ends it once
    ``min_tokens`` are out; ``max_tokens`` ends it in any case.
    """
    p, token, n = seq.params, seq.output_token_ids[-1], seq.num_output_tokens
    if n >= p.min_tokens:
        if not p.ignore_eos and token == seq.eos_token_id:
            return FinishReason.STOP
        if token in p.stop_token_ids:
            seq.stop_reason = token
            return FinishReason.STOP
    if n >= p.max_tokens:
        return FinishReason.LENGTH
    return None


class Scheduler(abc.ABC):
    """Admission, queues and bookkeeping common to all policies; subclasses pick the batch.

    The waiting queue is a FIFO deque here; a policy with its own queues overrides
    ``_enqueue``, ``_requeue``, ``_dequeue`` and ``num_waiting``.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int):
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self.num_preemptions = 0
        # What steps cost, learnt from the steps the executor reports (``observe_step``).
        self.cost_fit = OnlineCostFit()
        self.last_step_s = 0.0  # how long the last step took (the next chance to schedule is as far)
        # Requests found unable to meet their TTFT target: on arrival (misses_deadline), and,
        # with reject_late, those dropped before their first token once late (drop_late).
        self.num_late = 0

    # -- admission ---------------------------------------------------------------------
    def check_admissible(self, seq: Sequence) -> None:
        """Raise InvalidRequestError if ``seq`` could never be served."""
        if seq.prompt_len == 0:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if seq.max_len > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{seq.max_len} were requested ({seq.prompt_len} in the prompt, "
                f"{seq.params.max_tokens} for the output); shorten the prompt or lower max_tokens",
                "max_tokens" if seq.prompt_len < self.max_model_len else "prompt",
            )
        need = blocks_for(seq.max_len, self.block_manager.block_size)
        if need > self.block_manager.num_blocks:
            raise InvalidRequestError(
                f"the request needs {need} KV blocks ({seq.max_len} tokens: prompt plus max_tokens) "
                f"but the whole KV cache holds {self.block_manager.num_blocks} blocks "
                f"({self.block_manager.capacity_tokens} tokens); raise the KV cache budget",
                "prompt",
            )

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; raises InvalidRequestError, queueing nothing, if it could never run.

        A sequence is admissible when its prompt plus max_tokens fits in the whole KV pool:
        one that fitted its prompt but outgrew the pool would be preempted forever.
        """
        self.check_admissible(seq)
        if seq.seq_id in self.seqs:
            raise InvalidRequestError(f"request id {seq.seq_id!r} is already queued", "request_id")
        if self.misses_deadline(seq, seq.arrival_time):
            self.num_late += 1
            if self.config.order.reject_late:
                raise DeadlineUnreachableError(
                    f"the request cannot get its first token within its TTFT target of "
                    f"{targets(seq, self.config.order)[0]:.3g} s: its {seq.prompt_len} prompt tokens and "
                    f"the {self.prompt_tokens_ahead(seq)} queued ahead of them take longer to compute; "
                    "retry later, shorten the prompt or raise ttft_slo_ms"
                )
        seq.status = SequenceStatus.WAITING
        self.seqs[seq.seq_id] = seq
        self._enqueue(seq)

    # -- what steps cost ---------------------------------------------------------------
    def observe_step(self, shape: BatchShape, seconds: float) -> None:
        """A step of this shape took ``seconds`` (measured by the engine, charged by the
        simulator): the online cost model learns from it."""
        self.cost_fit.observe(shape, seconds)
        self.last_step_s = seconds

    def is_late(self, seq: Sequence, now: float) -> bool:
        """Whether ``seq`` would miss its TTFT target even if its whole prompt ran in the next
        step, by the online cost model (False while the model has seen too few steps)."""
        profile = self.cost_fit.profile()
        if profile is None:
            return False
        own = step_ms(profile, BatchShape(((seq.num_uncomputed_tokens, seq.num_computed_tokens),))) / 1e3
        return now + own > seq.arrival_time + targets(seq, self.config.order)[0]

    def prompt_tokens_ahead(self, seq: Sequence) -> int:
        """Prompt tokens still to compute that this policy runs before ``seq``'s: here every
        queued or started prompt (first come, first served); a policy with urgency keys
        counts the more urgent ones only."""
        return sum(
            s.num_uncomputed_tokens
            for s in self.seqs.values()
            if s is not seq and s.num_uncomputed_tokens > 1 and self._runs_before(s, seq)
        )

    def _runs_before(self, other: Sequence, seq: Sequence) -> bool:
        return True

    def misses_deadline(self, seq: Sequence, now: float) -> bool:
        """Whether ``seq`` will miss its TTFT target however fast the steps go: the prompts
        ahead of it (``prompt_tokens_ahead``) and its own, computed in full-budget chunks
        (``max_num_batched_tokens`` a step, as fresh tokens) beside the running decodes, end
        after its deadline. An optimistic estimate (later, more urgent arrivals and the
        chunks' cached context only add time), so what it flags is late for sure, by the
        online cost model; False while the model has seen too few steps."""
        profile = self.cost_fit.profile()
        if profile is None:
            return False
        decode = tuple(len(s) for s in self.running if s.num_uncomputed_tokens <= 1)
        chunk = max(1, self.config.max_num_batched_tokens - len(decode))
        steps, rest = divmod(self.prompt_tokens_ahead(seq) + seq.num_uncomputed_tokens, chunk)
        ms = steps * step_ms(profile, BatchShape(((chunk, 0),), decode))
        if rest:
            ms += step_ms(profile, BatchShape(((rest, 0),), decode))
        return now + ms / 1e3 > seq.arrival_time + targets(seq, self.config.order)[0]

    # -- policy ------------------------------------------------------------------------
    @abc.abstractmethod
    def schedule(self, now: float) -> ScheduledBatch | None:
        """Choose this step's batch and allocate its KV blocks; None when there is nothing to do."""

    # -- the token protocol --------------------------------------------------------------
    def update(self, batch: ScheduledBatch, sampled_tokens: list[int | None], now: float) -> list[Sequence]:
        """Apply the step that ran ``batch`` and ended at ``now``; release and return the
        sequences that finished.

        Every row's tokens now have KV. Each row that samples appends its token
        (``sampled_tokens[i]``; the entries of rows that do not sample are not read); a
        sequence's first token stamps ``first_token_time``; an end-of-sequence token, a stop
        token id or max_tokens finishes it and frees its KV blocks (``check_stop``). A
        sequence that finished while the step ran (an abort) is left as it is.
        """
        finished = []
        rows = zip(batch.seqs, batch.num_new_tokens, batch.samples, sampled_tokens, strict=True)
        for seq, n, samples, token in rows:
            if seq.is_finished:
                continue
            seq.num_computed_tokens += n
            if not samples:
                continue
            if token is None:
                raise ValueError(f"{seq.seq_id!r} samples this step, but the executor gave it no token")
            seq.append_token(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = check_stop(seq)
            if reason is not None:
                self._finish(seq, reason, now)
                finished.append(seq)
        return finished + self.drop_late(now)

    def drop_late(self, now: float) -> list[Sequence]:
        """With ``reject_late``, end (``FinishReason.LATE``) and return every request still
        without its first token (queued, or its prompt part-way through in chunks) that would
        miss its TTFT target even if the rest of its prompt ran in the next step (``is_late``).
        It misses its target either way; run late, it would still hold a seat (and its blocks)
        and slow every step for its whole output, at the cost of requests still on time (the
        queue ran away at 5 req/s on ShareGPT while 196 of 200 requests got in on arrival).
        ``update`` calls it at the end of every step."""
        if not self.config.order.reject_late:
            return []
        late = [s for s in self.seqs.values() if s.first_token_time is None and self.is_late(s, now)]
        for seq in late:
            self._finish(seq, FinishReason.LATE, now)
        self.num_late += len(late)
        return late

    def finish(self, seq_id: str, reason: FinishReason, now: float) -> Sequence | None:
        """End a waiting or running sequence for a reason only the caller sees (a stop string,
        a failed batch, an abort); its KV blocks are free when this returns. Returns the
        sequence, or None if it is not here (unknown, or finished already)."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            return None
        self._finish(seq, reason, now)
        return seq

    # -- disaggregated serving (the simulator's prefill and decode instances) ---------------
    def detach(self, seq: Sequence) -> list[int]:
        """Hand a running sequence over to another instance; return its KV block ids here.

        The sequence leaves this scheduler unfinished. Its blocks stay allocated (the KV still
        has to be copied out); the caller frees them with ``release_blocks`` once it has.
        The engine never calls this: it serves prefill and decode in one instance.
        """
        self.running.remove(seq)
        del self.seqs[seq.seq_id]
        blocks, seq.block_table = seq.block_table, []
        return blocks

    def release_blocks(self, blocks: list[int]) -> None:
        """Free blocks returned by ``detach``."""
        self.block_manager.free_blocks(blocks)

    def can_attach(self, seq: Sequence) -> bool:
        """Whether ``attach`` would find seats and KV blocks for ``seq``'s whole life here."""
        bm = self.block_manager
        need = bm.blocks_needed(seq, seq.max_len)
        return len(self.running) < self.config.max_num_seqs and bm.can_allocate(need)

    def reserve(self, seq: Sequence) -> None:
        """Allocate ``seq``'s blocks for its whole life (prompt + max_tokens) before its KV
        arrives, so that nothing admitted meanwhile can take them."""
        self.block_manager.allocate(seq, seq.max_len)

    def attach(self, seq: Sequence, now: float) -> None:
        """Run a sequence whose KV has arrived from another instance (reserved here first)."""
        self.reserve(seq)  # a no-op when reserved already
        self.seqs[seq.seq_id] = seq
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _finish(self, seq: Sequence, reason: FinishReason, now: float) -> None:
        seq.finish_reason = reason
        self.block_manager.free(seq)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self._dequeue(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finished_time = now
        del self.seqs[seq.seq_id]

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: drop the KV, requeue, keep the tokens."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self._requeue(seq)
        self.num_preemptions += 1

    def _start(self, seq: Sequence, now: float) -> None:
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = now
        self.running.append(seq)

    # -- the waiting queue (FIFO unless a policy overrides) -------------------------------
    def _enqueue(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def _requeue(self, seq: Sequence) -> None:
        """A preempted sequence goes back ahead of the others."""
        self.waiting.appendleft(seq)

    def _dequeue(self, seq: Sequence) -> None:
        self.waiting.remove(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def queue_lengths(self) -> list[tuple[str, int]]:
        """Waiting requests per queue, labelled (one queue here; a bucket each for ``bucket``)."""
        return [("all", self.num_waiting)]

    def queue_edges(self) -> list[int]:
        """The prompt-length edges of the queues, from 0 to the model's length: queue i holds
        prompts in [edges[i], edges[i + 1])."""
        return [0, self.max_model_len]

    @property
    def num_queue_splits(self) -> int:
        """Times a waiting queue was split (buckets for ``bucket``; never for one queue)."""
        return 0

    @property
    def num_queue_merges(self) -> int:
        """Times waiting queues were merged."""
        return 0

    @property
    def num_late_demotions(self) -> int:
        """Prompts moved behind the ones still on time once they could not meet their TTFT
        target (the ``bucket`` policy's ``late_demotion_s``; none for a policy without it)."""
        return 0

    # -- state -------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)
