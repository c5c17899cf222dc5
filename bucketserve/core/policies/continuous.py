"""vLLM-style continuous batching: FCFS, a token budget per step, chunked prefill and
preemption by recompute when the KV cache runs out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bucketserve.core.block_manager import BlockManager
from bucketserve.core.policies.registry import register_policy
from bucketserve.core.scheduler import ScheduledBatch, Scheduler
from bucketserve.core.sequence import Sequence
from bucketserve.errors import ConfigError

if TYPE_CHECKING:
    from bucketserve.config import SchedulerConfig


@dataclass
class ContinuousConfig:
    """vLLM-style scheduling has no options of its own: it runs on the scheduler's token
    budget (max_num_batched_tokens) and chunked prefill (enable_chunked_prefill)."""


class ContinuousScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int):
        super().__init__(config, block_manager, max_model_len)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
            raise ConfigError(
                f"without chunked prefill a whole prompt must fit in one step: "
                f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= "
                f"max_model_len ({max_model_len})"
            )

    def schedule(self, now: float) -> ScheduledBatch | None:
        cfg, bm = self.config, self.block_manager
        budget = cfg.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted: list[Sequence] = []

        # Running sequences first, oldest first: decodes and unfinished prefill chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if n < seq.num_uncomputed_tokens and not cfg.enable_chunked_prefill:
                i += 1
                continue
            # Make room by preempting the newest running sequences (FCFS keeps the oldest).
            while not bm.can_allocate(bm.blocks_needed(seq, seq.num_computed_tokens + n)):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq in preempted:
                break
            bm.allocate(seq, seq.num_computed_tokens + n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
            i += 1

        # Then admit waiting sequences in arrival order while budget, seats and blocks last.
        # A sequence preempted in this very step waits for the next one.
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            if seq in preempted:
                break
            n = min(seq.num_uncomputed_tokens, budget)
            if n < seq.num_uncomputed_tokens and not cfg.enable_chunked_prefill:
                break
            if not bm.can_allocate(bm.blocks_needed(seq, seq.num_computed_tokens + n)):
                break
            self.waiting.popleft()
            bm.allocate(seq, seq.num_computed_tokens + n)
            self._start(seq, now)
            seqs.append(seq)
            counts.append(n)
            budget -= n

        if not seqs:
            return None
        return ScheduledBatch(seqs, counts, preempted)


register_policy(
    "continuous",
    ContinuousScheduler,
    ContinuousConfig,
    "vLLM-style FCFS with a token budget per step, chunked prefill and preemption by recompute",
)
