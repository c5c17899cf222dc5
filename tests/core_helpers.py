"""A fake executor for the scheduling core: deterministic step times, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from bucketserve.config import SchedulerConfig
from bucketserve.core.block_manager import BlockManager
from bucketserve.core.cost import Profile, step_ms
from bucketserve.core.policies import make_scheduler
from bucketserve.core.scheduler import ScheduledBatch, Scheduler
from bucketserve.core.sequence import Sequence
from bucketserve.sampling_params import SamplingParams


def make(
    policy: str, num_blocks: int = 64, block_size: int = 4, max_model_len: int = 256, **cfg: object
) -> Scheduler:
    return make_scheduler(
        SchedulerConfig(policy=policy, **cfg), BlockManager(num_blocks, block_size), max_model_len
    )


def seq(i: int, prompt_len: int, max_tokens: int, arrival: float = 0.0, **kw: object) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Sequence(f"r{i}", list(range(1, prompt_len + 1)), params, arrival_time=arrival, **kw)


TOKEN = 7  # what every fake step samples; the helpers' requests ignore EOS


@dataclass
class FakeExecutor:
    """Runs a scheduler in virtual time: a step costs base + per_token x computed tokens, or,
    given a ``profile``, what the core's cost model charges its shape. Each step is reported
    to the scheduler (``observe_step``), as the engine reports its measured steps."""

    sched: Scheduler
    base: float = 0.01
    per_token: float = 0.0001
    now: float = 0.0
    profile: Profile | None = None
    batches: list[ScheduledBatch] = field(default_factory=list)
    max_used_blocks: int = 0

    def step(self) -> list[Sequence]:
        """Schedule at ``now``, "run" the batch, update at its end; return what finished."""
        batch = self.sched.schedule(self.now)
        if batch is None:
            self.now += self.base
            return []
        self.batches.append(batch)
        bm = self.sched.block_manager
        self.max_used_blocks = max(self.max_used_blocks, bm.num_used_blocks)
        for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True):  # every token has a KV slot
            assert len(s.block_table) * bm.block_size >= s.num_computed_tokens + n
        shape = batch.shape()
        if self.profile is not None:
            duration = step_ms(self.profile, shape) / 1e3
        else:
            duration = self.base + self.per_token * batch.num_padded_tokens
        self.now += duration
        self.sched.observe_step(shape, duration)
        return self.sched.update(batch, [TOKEN] * len(batch), self.now)

    def run(self, arrivals: list[Sequence], max_steps: int = 100_000) -> list[Sequence]:
        pending = sorted(arrivals, key=lambda s: s.arrival_time)
        done: list[Sequence] = []
        for _ in range(max_steps):
            while pending and pending[0].arrival_time <= self.now:
                self.sched.add(pending.pop(0))
            if not pending and not self.sched.has_unfinished():
                return done
            if not self.sched.has_unfinished():
                self.now = pending[0].arrival_time
                continue
            done += self.step()
        raise AssertionError("the scheduler made no progress")


def step(sched: Scheduler, now: float) -> list[Sequence]:
    """One step that takes no time: scheduled and updated at ``now``; return what finished."""
    return FakeExecutor(sched, base=0.0, per_token=0.0, now=now).step()
