"""The scheduler interface shared by every policy, the real engine and the simulator.

An executor (the engine's model runner, or the simulator's cost model) drives it:

    scheduler.add(seq)                 # admission; raises if the request can never fit
    batch = scheduler.schedule(now)    # what to compute this step, KV blocks allocated
    ... execute, then append each sampled token with seq.append_token() ...
    scheduler.update(batch, now)       # advance progress, release finished sequences
    scheduler.abort(seq_id)            # cancel; frees its KV blocks at once
"""

from __future__ import annotations

import abc
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bucketserve.config import SchedulerConfig
from bucketserve.core.block_manager import BlockManager, blocks_for
from bucketserve.core.monitor import Monitor
from bucketserve.core.sequence import FinishReason, Sequence, SequenceStatus
from bucketserve.errors import InvalidRequestError


@dataclass(frozen=True)
class BatchShape:
    """What a batch's cost depends on, read before it runs: each prefill row's chunk and the
    tokens already cached before it, each decode row's context (its token included).

    The engine keeps it in its step records and the simulator's cost model charges it, so a
    measured step can be set beside the model's estimate for the very same work.
    """

    prefill: tuple[tuple[int, int], ...] = ()  # (chunk tokens, cached tokens) per prefill row
    decode: tuple[int, ...] = ()  # context length per decode row
    padded: bool = False
    num_ghost_rows: int = 0

    @property
    def num_rows(self) -> int:
        return len(self.prefill) + len(self.decode)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers, for JSON."""
        return {
            "prefill": [list(r) for r in self.prefill],
            "decode": list(self.decode),
            "padded": self.padded,
            "ghost_rows": self.num_ghost_rows,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchShape:
        return cls(
            tuple((int(n), int(c)) for n, c in d.get("prefill", ())),
            tuple(int(c) for c in d.get("decode", ())),
            bool(d.get("padded", False)),
            int(d.get("ghost_rows", 0)),
        )


@dataclass
class ScheduledBatch:
    """One step's work: each sequence computes its next ``num_new_tokens[i]`` tokens.

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
    scheduled_at: float = 0.0

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_real_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def num_prefill_rows(self) -> int:
        return sum(n > 1 for n in self.num_new_tokens)

    @property
    def num_padded_tokens(self) -> int:
        """Tokens the executor computes, padding and ghost rows included."""
        if not self.padded:
            return self.num_real_tokens + self.num_ghost_rows
        prefill = [n for n in self.num_new_tokens if n > 1]
        decode = len(self.num_new_tokens) - len(prefill)
        return len(prefill) * max(prefill, default=0) + decode + self.num_ghost_rows

    def shape(self) -> BatchShape:
        """The batch's shape now; call it before the step runs and advances the sequences."""
        prefill, decode = [], []
        for seq, n in zip(self.seqs, self.num_new_tokens, strict=True):
            if n > 1:
                prefill.append((n, seq.num_computed_tokens))
            else:
                decode.append(len(seq))
        return BatchShape(tuple(prefill), tuple(decode), self.padded, self.num_ghost_rows)

    def samples(self, i: int) -> bool:
        """Whether row i yields an output token (its chunk reaches the end of its tokens)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == len(seq)


class Scheduler(abc.ABC):
    """Admission, queues and bookkeeping common to all policies; subclasses pick the batch.

    The waiting queue is a FIFO deque here; a policy with its own queues overrides
    ``_enqueue``, ``_requeue``, ``_dequeue``, ``num_waiting`` and ``waiting_seqs``.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int):
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self.monitor = Monitor(max_model_len)
        self.num_preemptions = 0

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
        seq.status = SequenceStatus.WAITING
        self.seqs[seq.seq_id] = seq
        self.monitor.on_arrival(seq.arrival_time, seq.prompt_len)
        self._enqueue(seq)

    # -- policy ------------------------------------------------------------------------
    @abc.abstractmethod
    def schedule(self, now: float) -> ScheduledBatch | None:
        """Choose this step's batch and allocate its KV blocks; None when there is nothing to do."""

    # -- bookkeeping ---------------------------------------------------------------------
    def update(self, batch: ScheduledBatch, now: float) -> list[Sequence]:
        """Advance the batch's sequences; release and return those that finished."""
        finished = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens += n
            if seq.finish_reason is not None:
                self._finish(seq, now)
                finished.append(seq)
        self.monitor.on_step(now - batch.scheduled_at, batch.num_prefill_rows > 0)
        return finished

    def abort(self, seq_id: str, now: float = 0.0) -> Sequence | None:
        """Cancel a waiting or running sequence; its KV blocks are free when this returns."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            return None
        seq.finish_reason = FinishReason.ABORT
        self._finish(seq, now)
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

    def _finish(self, seq: Sequence, now: float) -> None:
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

    def waiting_seqs(self) -> Iterable[Sequence]:
        return iter(self.waiting)

    def queue_lengths(self) -> list[tuple[str, int]]:
        """Waiting requests per queue, labelled (one queue here; a bucket each for ``bucket``)."""
        return [("all", self.num_waiting)]

    # -- state -------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)
