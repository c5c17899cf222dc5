"""Static batching (HF ``generate``): whole batches, padded, run to completion.

A batch is formed only when the previous one has finished. Its prompts are prefilled in one
padded step; then it decodes until its last member finishes, and members that finished
earlier keep occupying a row (a ghost row) as they do in a static engine. KV is reserved for
prompt + max_tokens, so nothing is ever preempted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bucketserve.core.block_manager import BlockManager, blocks_for
from bucketserve.core.policies.registry import register_policy
from bucketserve.core.scheduler import ScheduledBatch, Scheduler
from bucketserve.core.sequence import Sequence
from bucketserve.options import check, check_fields, option

if TYPE_CHECKING:
    from bucketserve.config import SchedulerConfig


@dataclass
class StaticConfig:
    """Static batching (HF generate): FCFS batches of a fixed size, padded, run to completion."""

    batch_size: int = option(8, help="requests per batch")

    def __post_init__(self) -> None:
        check_fields(self)
        check(self.batch_size >= 1, f"static batch_size must be >= 1, got {self.batch_size}")


class StaticScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int):
        super().__init__(config, block_manager, max_model_len)
        self.batch_rows = 0  # rows of the batch in flight, finished members included

    def form_batch(self) -> list[Sequence]:
        """The next batch, in the waiting order: FCFS up to batch_size (UELLM overrides)."""
        return list(itertools.islice(self.waiting, self.config.policy_config.batch_size))

    def schedule(self, now: float) -> ScheduledBatch | None:
        if self.running:
            # Decode the live members; finished ones still cost a row each.
            counts = [1] * len(self.running)
            return ScheduledBatch(
                list(self.running),
                counts,
                num_ghost_rows=self.batch_rows - len(self.running),
                padded=True,
            )
        if not self.waiting:
            return None
        bm = self.block_manager
        free = bm.num_free_blocks
        chosen = []
        for seq in self.form_batch():
            need = blocks_for(seq.max_len, bm.block_size)
            if need > free:
                break
            free -= need
            chosen.append(seq)
        if not chosen:  # cannot happen: admission ensures one sequence fits an empty pool
            return None
        for seq in chosen:
            self.waiting.remove(seq)
            bm.allocate(seq, seq.max_len)  # the whole life up front: never a preemption
            self._start(seq, now)
        self.batch_rows = len(chosen)
        return ScheduledBatch(chosen, [s.num_uncomputed_tokens for s in chosen], padded=True)


register_policy(
    "static",
    StaticScheduler,
    StaticConfig,
    "HF generate-style fixed FCFS batches, padded to the longest prompt, run to completion",
)
