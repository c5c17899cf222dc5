"""Static batching (HF ``generate``) and UELLM: whole batches, padded, run to completion.

A batch is formed only when the previous one has finished. Its prompts are prefilled in one
padded step; then it decodes until its last member finishes, and members that finished
earlier keep occupying a row (a ghost row) as they do in a static engine. KV is reserved for
prompt + max_tokens, so nothing is ever preempted.
"""

from __future__ import annotations

import itertools

from bucketserve.config import SchedulerConfig
from bucketserve.core.block_manager import BlockManager, blocks_for
from bucketserve.core.ordering import job_tokens
from bucketserve.core.scheduler import ScheduledBatch, Scheduler
from bucketserve.core.sequence import Sequence


class StaticScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int):
        super().__init__(config, block_manager, max_model_len)
        self.batch_size = config.static.batch_size
        self.batch_rows = 0  # rows of the batch in flight, finished members included

    def form_batch(self) -> list[Sequence]:
        """The next batch, in the waiting order: FCFS up to batch_size (UELLM overrides)."""
        return list(itertools.islice(self.waiting, self.batch_size))

    def schedule(self, now: float) -> ScheduledBatch | None:
        if self.running:
            # Decode the live members; finished ones still cost a row each.
            counts = [1] * len(self.running)
            return ScheduledBatch(
                list(self.running),
                counts,
                num_ghost_rows=self.batch_rows - len(self.running),
                padded=True,
                scheduled_at=now,
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
        return ScheduledBatch(
            chosen, [s.num_uncomputed_tokens for s in chosen], padded=True, scheduled_at=now
        )


class UELLMScheduler(StaticScheduler):
    """UELLM's SLO-ODBS: sort by a x SLO + b x predicted output, then group greedily while the
    group is under the cap and (out - current_max) x (size + 1) x 1.2 <= threshold."""

    def form_batch(self) -> list[Sequence]:
        cfg, order = self.config.uellm, self.config.order

        def predicted(s: Sequence) -> int:
            return job_tokens(s) - s.prompt_len

        def key(s: Sequence) -> float:
            slo = s.ttft_slo if s.ttft_slo is not None else order.default_ttft_slo_s
            return cfg.a * slo + cfg.b * predicted(s)

        candidates = sorted(self.waiting, key=key)
        group = candidates[:1]
        current_max = predicted(group[0])
        for seq in candidates[1:]:
            out = predicted(seq)
            if len(group) >= cfg.batch_cap or (out - current_max) * (len(group) + 1) * 1.2 > cfg.threshold:
                break
            group.append(seq)
            current_max = max(current_max, out)
        return group
