"""Validate the simulator against the real engine, in process (no HTTP in between).

For each policy: replay a seeded ShareGPT sample on the real engine (Poisson arrivals, or
all at t=0), write the per-request records and every engine step (start, duration, batch
shape) as a bench-shaped result file, then simulate the same arrivals and lengths with a
profile measured by `bucketserve profile` and print the error table (output throughput,
TTFT p50, TPOT p50; target within 15%). The steps give the machine's speed during the run
against the profile's, and a second simulation replays that drift (sim.validate.SpeedTrace).
With --repeats, the policies take turns, so that slow spells fall on all of them, and a
second table sets the simulation beside each policy's median run.

    .venv/bin/bucketserve profile --kv-cache-memory 1GiB --max-model-len 2048 -o results/sim/profile-cpu.json
    .venv/bin/python benchmarks/sim_validation.py --kv-cache-memory 1GiB --num-prompts 60 \
        --repeats 3 --profile results/sim/profile-cpu.json

The engine and the simulation share the settings below (KV budget, max_num_seqs, token
budget, max_model_len). `bucketserve simulate --validate FILE:POLICY` reads the same files,
and those `bucketserve bench run --output-json` writes against a live server (no steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from pathlib import Path

from bucketserve import LLM
from bucketserve.argparse_options import argparse_type
from bucketserve.bench.inprocess import Replay, replay
from bucketserve.config import SchedulerConfig, parse_bytes
from bucketserve.core.policies import policy_names
from bucketserve.metrics import summarize
from bucketserve.options import default_of
from bucketserve.sim.validate import error_table, repeat_table, validate_run
from bucketserve.wire import MeasuredRun, RequestRow, StepSample, write_json
from bucketserve.workloads.sharegpt import sample_sharegpt


def to_measured_run(run: Replay) -> MeasuredRun:
    """The run as a bench result file holds it, in seconds from its start."""
    # the engine's records are on its clock: latencies keep, arrivals count from the start
    rows = [dataclasses.replace(RequestRow.from_record(r), sent=r.arrival - run.start) for r in run.records]
    steps = [StepSample(s.start - run.start, s.duration, s.shape, s.schedule_time) for s in run.steps]
    return MeasuredRun(summarize(run.records, run.duration), rows, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default=",".join(policy_names()), help="comma-separated (default: all)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--max-output", type=int, default=128, help="output length cap (default 128)")
    p.add_argument("--rate", type=float, default=2.0, help="Poisson requests/s; 0 = all at t=0 (default 2)")
    p.add_argument("--seed", type=int, default=0)
    # argparse_type: argparse shows our ConfigError ("cannot read 'x' as a size"), not its own
    # "invalid parse_bytes value".
    p.add_argument("--kv-cache-memory", type=argparse_type(parse_bytes), default=parse_bytes("2GiB"))
    p.add_argument("--max-num-seqs", type=int, default=default_of(SchedulerConfig, "max_num_seqs"))
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=default_of(SchedulerConfig, "max_num_batched_tokens")
    )
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument(
        "--profile", default=None, help="profile JSON; without it only the result files are written"
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per policy, round-robin (default 1)")
    p.add_argument("--output-dir", default="results/sim/validation")
    a = p.parse_args()

    out_dir = Path(a.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sched = {"max_num_seqs": a.max_num_seqs, "max_num_batched_tokens": a.max_num_batched_tokens}
    policies = a.policies.split(",")
    files = []
    requests: list = []
    # Round-robin over the policies, so that the machine's drift falls on all of them alike.
    for rep in range(a.repeats):
        for policy in policies:
            llm = LLM(
                policy=policy, kv_cache_memory=a.kv_cache_memory, max_model_len=a.max_model_len, **sched
            )
            if not requests:
                requests = sample_sharegpt(
                    llm.get_tokenizer(), a.num_prompts, seed=a.seed, max_output_len=a.max_output
                )
            rng = random.Random(a.seed)
            arrivals, t = [], 0.0
            for _ in requests:
                t += rng.expovariate(a.rate) if a.rate > 0 else 0.0
                arrivals.append(t)
            run = to_measured_run(replay(llm.engine, requests, arrivals))
            path = out_dir / f"{policy}-rate{a.rate:g}-{rep}.json"
            config = {"policy": policy, "kv_cache_memory": a.kv_cache_memory, "rate": a.rate, **sched}
            write_json(path, {"config": config, **run.to_dict()})
            print(f"wrote {path}", flush=True)
            files.append((path, policy))
            del llm
    if a.profile:
        comparisons = [
            c
            for path, policy in files
            for c in validate_run(
                path, a.profile, a.kv_cache_memory, policy, sched, max_model_len=a.max_model_len
            )
        ]
        print(error_table(comparisons))
        if a.repeats > 1:
            print()
            print(repeat_table(comparisons))


if __name__ == "__main__":
    main()
