"""DistServe's batching rules (Zhong et al., OSDI 2024) on one aggregated instance.

Prefill is FCFS; prompts shorter than the saturation token count are batched together up
to it, a longer prompt runs alone; decode is continuous batching over all running
sequences. KV is reserved for prompt + max_tokens at admission.

What this is not: DistServe runs prefill and decode on separate instances and moves the KV
between them. The real engine here runs both phases in one process; the simulator models the
two instances and the KV transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

from bucketserve.core.block_manager import blocks_for
from bucketserve.core.policies.registry import register_policy
from bucketserve.core.scheduler import ScheduledBatch, Scheduler
from bucketserve.core.sequence import Sequence
from bucketserve.options import check, check_fields, option


@dataclass
class DistServeConfig:
    """DistServe's prefill batching: short prompts batched up to a saturation token count,
    longer ones alone; decode by continuous batching."""

    prefill_saturation_tokens: int = option(
        512, name="saturation", help="batch short prompts up to this many tokens"
    )

    def __post_init__(self) -> None:
        check_fields(self)
        check(
            self.prefill_saturation_tokens >= 1,
            f"prefill_saturation_tokens must be >= 1, got {self.prefill_saturation_tokens}",
        )


class DistServeScheduler(Scheduler):
    def _promised_blocks(self) -> int:
        bm = self.block_manager
        return sum(max(0, blocks_for(s.max_len, bm.block_size) - len(s.block_table)) for s in self.running)

    def schedule(self, now: float) -> ScheduledBatch | None:
        bm = self.block_manager
        seqs: list[Sequence] = []
        counts: list[int] = []
        for seq in self.running:  # reservations guarantee these allocations
            bm.allocate(seq, len(seq))
            seqs.append(seq)
            counts.append(1)

        saturation = self.config.policy_config.prefill_saturation_tokens
        free = bm.num_free_blocks - self._promised_blocks()
        tokens = 0
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            need = blocks_for(seq.max_len, bm.block_size)
            n = seq.num_uncomputed_tokens
            if need > free or (tokens and tokens + n > saturation):
                break
            self.waiting.popleft()
            bm.allocate(seq, len(seq))
            self._start(seq, now)
            seqs.append(seq)
            counts.append(n)
            free -= need
            tokens += n
            if tokens >= saturation:
                break  # a long prompt runs alone; short ones fill up to saturation

        if not seqs:
            return None
        return ScheduledBatch(seqs, counts)


register_policy(
    "distserve",
    DistServeScheduler,
    DistServeConfig,
    "DistServe's prefill batching on one aggregated instance (the simulator disaggregates)",
)
