"""One simulated serving instance: a scheduler from the core driven by a cost model.

It drives the engine's loop (schedule, execute, ``scheduler.update``), with the forward
pass replaced by the cost model's latency in virtual time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from bucketserve.core.scheduler import BatchShape, ScheduledBatch, Scheduler
from bucketserve.core.sequence import Sequence
from bucketserve.sim.cost_model import CostModel

# The token every simulated step "samples": requests ignore EOS and run to max_tokens.
SIM_TOKEN = 7


@dataclass
class InstanceStats:
    steps: int = 0
    busy_s: float = 0.0  # virtual seconds spent computing batches
    real_tokens: int = 0
    padded_tokens: int = 0  # tokens computed, padding and ghost rows included
    schedule_wall_s: float = 0.0  # real seconds spent in scheduler.schedule()
    preemptions: int = 0


class Instance:
    """A scheduler plus a cost model; runs one batch at a time."""

    def __init__(
        self,
        name: str,
        scheduler: Scheduler,
        cost: CostModel,
        num_gpus: int = 1,
        speed: Callable[[float], float] | None = None,
    ) -> None:
        self.name = name
        self.speed = speed  # slowdown at a virtual time over the profile; None: as profiled
        self.scheduler = scheduler
        self.cost = cost
        self.num_gpus = num_gpus
        self.batch: ScheduledBatch | None = None
        self._charged: tuple[BatchShape, float] | None = None  # the running batch's shape and time
        self.stats = InstanceStats()
        self.wake_pending = False

    @property
    def busy(self) -> bool:
        return self.batch is not None

    def start(self, now: float) -> float | None:
        """Schedule a batch at ``now``; return when it completes, or None if there is none."""
        assert self.batch is None, "an instance runs one batch at a time"
        t0 = time.perf_counter()
        batch = self.scheduler.schedule(now)
        self.stats.schedule_wall_s += time.perf_counter() - t0
        if batch is None:
            return None
        shape = batch.shape()
        duration = self.cost.shape_time(shape)
        if self.speed is not None:
            duration *= self.speed(now)
        self.batch = batch
        self._charged = (shape, duration)  # what the scheduler learns when it ends
        s = self.stats
        s.steps += 1
        s.busy_s += duration
        s.real_tokens += batch.num_real_tokens
        s.padded_tokens += self.cost.computed_tokens(batch)
        s.preemptions += len(batch.preempted)
        return now + duration

    def finish(self, now: float) -> list[Sequence]:
        """Complete the running batch at ``now`` (each row that samples gets ``SIM_TOKEN``);
        return the sequences that finished."""
        batch, self.batch = self.batch, None
        assert batch is not None
        assert self._charged is not None
        self.scheduler.observe_step(*self._charged)  # as the engine reports each measured step
        return self.scheduler.update(batch, [SIM_TOKEN] * len(batch), now)

    @property
    def load(self) -> int:
        """Requests here, queued or running: new requests go to the instance with fewest."""
        return self.scheduler.num_waiting + self.scheduler.num_running
