"""The real engine on ShareGPT requests, per scheduling policy: offline and Poisson arrivals.

For each policy it builds one engine over the embedded model, then replays the same seeded
ShareGPT sample (first human turn as raw prompt; output = reference reply length capped at
--max-output, EOS ignored) twice: all requests at t=0, and Poisson arrivals at --rate
requests/s. It prints output tokens/s, TTFT and TPOT p50/p99, p99 TTFT of the short
requests (prompt below the sample's median), padding ratio, preemptions, and the share of
step time spent in schedule().

    .venv/bin/python benchmarks/policy_comparison.py --num-prompts 100 --rate 2
"""

from __future__ import annotations

import argparse
import random
import statistics

from bucketserve import LLM
from bucketserve.argparse_options import argparse_type
from bucketserve.bench.inprocess import replay
from bucketserve.config import ORDERS, OrderConfig, parse_bytes
from bucketserve.core.policies import policy_names
from bucketserve.metrics import RequestRecord, percentile, summarize
from bucketserve.wire import write_json
from bucketserve.workloads.sharegpt import sample_sharegpt


def measure(llm: LLM, requests: list, arrivals: list[float]) -> tuple[list[RequestRecord], float, dict]:
    """Replay the requests; their records, the run's duration and the engine's step figures."""
    run = replay(llm.engine, requests, arrivals)
    steps = run.steps
    real = sum(s.real_tokens for s in steps)
    padded = sum(s.padded_tokens for s in steps)
    sched_t = sum(s.schedule_time for s in steps)
    busy = sum(s.duration for s in steps)
    extra = {
        "steps": len(steps),
        "padding_ratio": 1 - real / padded if padded else 0.0,
        "preemptions": sum(s.preempted for s in steps),
        "schedule_share": sched_t / busy if busy else 0.0,
        "mean_schedule_ms": sched_t / len(steps) * 1e3 if steps else 0.0,
    }
    short = statistics.median(r.prompt_len for r in requests)
    extra["p99_ttft_short_ms"] = percentile(
        [rec.ttft * 1e3 for r, rec in zip(requests, run.records, strict=True) if r.prompt_len < short], 99
    )
    return run.records, run.duration, extra


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default=",".join(policy_names()), help="comma-separated (default: all)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, requests/s")
    p.add_argument("--seed", type=int, default=0)
    # argparse_type: argparse shows our ConfigError ("cannot read 'x' as a size"), not its own
    # "invalid parse_bytes value".
    p.add_argument("--kv-cache-memory", type=argparse_type(parse_bytes), default=parse_bytes("2GiB"))
    p.add_argument("--modes", default="offline,poisson")
    p.add_argument("--order", choices=ORDERS, default="fcfs", help="request ordering (bucket policy)")
    p.add_argument("--output-json", default=None)
    a = p.parse_args()
    if a.rate <= 0:
        p.error(f"--rate must be > 0 (the offline run needs no rate), got {a.rate}")

    results = []
    for policy in a.policies.split(","):
        llm = LLM(
            policy=policy,
            kv_cache_memory=a.kv_cache_memory,
            max_model_len=2048,
            order=OrderConfig(order=a.order),
        )
        requests = sample_sharegpt(
            llm.get_tokenizer(), a.num_prompts, seed=a.seed, max_output_len=a.max_output
        )
        rng = random.Random(a.seed)
        poisson, t = [], 0.0
        for _ in requests:
            t += rng.expovariate(a.rate)
            poisson.append(t)
        for mode in a.modes.split(","):
            arrivals = [0.0] * len(requests) if mode == "offline" else poisson
            records, duration, extra = measure(llm, requests, arrivals)
            row = {"policy": policy, "order": a.order, "mode": mode, **summarize(records, duration), **extra}
            results.append(row)
            print(
                f"{policy:<11}{mode:<8} out tok/s {row['output_throughput']:7.1f} | TTFT p50/p99 "
                f"{row['p50_ttft_ms']:8.0f}/{row['p99_ttft_ms']:8.0f} ms"
                f" | short p99 {row['p99_ttft_short_ms']:8.0f} ms"
                f" | TPOT p50/p99 {row['p50_tpot_ms']:6.0f}/{row['p99_tpot_ms']:6.0f} ms"
                f" | pad {row['padding_ratio']:.3f} | preempt {row['preemptions']}"
                f" | sched {row['schedule_share']:.2%}",
                flush=True,
            )
        del llm
    if a.output_json:
        write_json(a.output_json, results)


if __name__ == "__main__":
    main()
