"""Time per ``schedule()`` call, per policy, with 100 / 1,000 / 10,000 waiting and 256 running.

Pure scheduling core, no model: a fake executor appends one token per sampled row. The
running set is filled first (max_num_seqs=256 keeps it there), then the waiting queue, then
``schedule()`` is timed over many steps; requests never finish during the measurement.
Static and UELLM run one fixed batch at a time, so they hold only their batch running.

    .venv/bin/python benchmarks/scheduler_overhead.py [--steps 200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from bucketserve.config import SchedulerConfig
from bucketserve.core.block_manager import BlockManager
from bucketserve.core.policies import make_scheduler, policy_names
from bucketserve.core.sequence import Sequence
from bucketserve.sampling_params import SamplingParams


def build(policy: str, running: int, waiting: int, seed: int = 0):
    rng = random.Random(seed)
    sched = make_scheduler(
        SchedulerConfig(policy=policy, max_num_seqs=running, max_num_batched_tokens=1 << 20),
        BlockManager(num_blocks=2_000_000, block_size=16),
        max_model_len=4096,
    )
    params = SamplingParams(max_tokens=2000, ignore_eos=True)
    now = 0.0

    def new(i: int) -> Sequence:
        return Sequence(
            f"r{i}", [1] * rng.randint(4, 1024), params, arrival_time=now, priority=rng.randint(0, 3)
        )

    for i in range(running):
        sched.add(new(i))
    while sched.num_waiting and sched.num_running < min(running, sched.num_running + sched.num_waiting):
        before = sched.num_running
        step(sched, now)
        if sched.num_running == before:
            break
    for i in range(running, running + waiting):
        sched.add(new(i))
    return sched


def step(sched, now: float) -> float:
    t0 = time.perf_counter()
    batch = sched.schedule(now)
    elapsed = time.perf_counter() - t0
    if batch is not None:
        sched.update(batch, [7] * len(batch), now)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200, help="timed schedule() calls per cell")
    args = parser.parse_args()
    print(f"{'policy':<11}{'waiting':>9}{'running':>9}{'mean ms':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for policy in policy_names():
        for waiting in (100, 1_000, 10_000):
            sched = build(policy, 256, waiting)
            times = sorted(step(sched, 1.0 + k * 0.01) for k in range(args.steps))
            line = (
                f"{policy:<11}{sched.num_waiting:>9}{sched.num_running:>9}"
                f"{statistics.mean(times) * 1e3:>10.3f}{times[len(times) // 2] * 1e3:>9.3f}"
                f"{times[int(len(times) * 0.99)] * 1e3:>9.3f}"
            )
            if hasattr(sched, "form_batch"):
                # Whole-batch policies form a batch only when the last one ends; time that too.
                t0 = time.perf_counter()
                sched.form_batch()
                line += f"   (forming a batch: {(time.perf_counter() - t0) * 1e3:.3f} ms)"
            print(line)


if __name__ == "__main__":
    main()
