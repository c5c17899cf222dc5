"""One engine with two threads against two single-thread engine replicas on Ray Serve.

What it measures
    The same requests, all sent at once with at most --concurrency in flight, to
    `bucketserve serve --num-threads T` (one engine) and to
    `bucketserve serve --replicas R --threads-per-replica T/R` (R engines behind Ray Serve's
    proxy), on two workloads: ShareGPT, and "mixed" (short chats and long documents: half
    Alpaca-like, half LongBench-like lengths, text from ShareGPT). For each: output tokens/s,
    TTFT and TPOT p50/p99, and the p99 TTFT of the short requests (prompt <= 256 tokens).

How to run (a quiet machine: every core is in use)
    .venv/bin/python benchmarks/replicas.py
    .venv/bin/python benchmarks/replicas.py --num-prompts 48 --replicas 2 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from bucketserve.bench.client import ClientConfig
from bucketserve.bench.datasets import BenchRequest, load_tokenizer
from bucketserve.bench.runner import run_workload
from bucketserve.bench.servers import managed_server
from bucketserve.bench.workload import build_workload
from bucketserve.metrics import percentile, summarize
from bucketserve.wire import write_json

SHORT_PROMPT = 256


def run(requests: list[BenchRequest], server_args: list[str], concurrency: int, log: Path, desc: str) -> dict:
    with managed_server(None, server_args, log) as url:
        cfg = ClientConfig(base_url=url, model="SmolLM2-135M-Instruct", request_timeout=1800)
        asyncio.run(run_workload([BenchRequest("Warm up.", 3, 4)], [0.0], cfg, progress=False))
        result = asyncio.run(run_workload(requests, [0.0] * len(requests), cfg, concurrency, desc=desc))
    records = [o.record for o in result.outcomes]
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed ({desc}), e.g. {failed[0]}")
    summary = summarize(records, result.duration)
    short = [r.ttft * 1e3 for r in records if r.prompt_tokens <= SHORT_PROMPT]
    summary["p99_short_ttft_ms"] = percentile(short, 99)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads in all, split among the replicas")
    p.add_argument("--max-output-len", type=int, default=128)
    p.add_argument("--output-json", type=Path, default=Path("results/replicas.json"))
    a = p.parse_args()
    if a.threads % a.replicas:
        p.error("--threads must be a multiple of --replicas")
    tokenizer = load_tokenizer(None)
    a.output_json.parent.mkdir(parents=True, exist_ok=True)
    setups = {
        f"1 x {a.threads} threads": ["--num-threads", str(a.threads)],
        f"{a.replicas} replicas x {a.threads // a.replicas}": [
            "--replicas", str(a.replicas), "--threads-per-replica", str(a.threads // a.replicas),
        ],
    }  # fmt: skip
    results: dict[str, dict[str, dict]] = {}
    for dataset in ("sharegpt", "mixed"):
        requests = build_workload(
            dataset, a.num_prompts, tokenizer, max_output_len=a.max_output_len, max_prompt_len=1536,
            max_total_len=2048,
        ).requests  # fmt: skip
        print(f"{dataset}: {len(requests)} requests, {sum(r.prompt_len for r in requests)} prompt + "
              f"{sum(r.output_len for r in requests)} output tokens, {a.concurrency} at once")  # fmt: skip
        for name, args in setups.items():
            log = a.output_json.with_suffix(f".{dataset}.{name.split()[0]}.server.log")
            results.setdefault(dataset, {})[name] = run(
                requests, args, a.concurrency, log, f"{dataset}, {name}"
            )
    keys = [
        ("output_throughput", "output tokens/s"),
        ("median_ttft_ms", "TTFT p50 (ms)"),
        ("p99_ttft_ms", "TTFT p99 (ms)"),
        ("median_tpot_ms", "TPOT p50 (ms)"),
        ("p99_tpot_ms", "TPOT p99 (ms)"),
        ("p99_short_ttft_ms", f"short (<= {SHORT_PROMPT}) TTFT p99"),
    ]
    for dataset, by_setup in results.items():
        print(f"\n{dataset}{'':20}" + "".join(f"{name:>24}" for name in by_setup))
        for key, label in keys:
            print(f"{label:28}" + "".join(f"{r[key]:24.1f}" for r in by_setup.values()))
    write_json(a.output_json, {"args": {k: str(v) for k, v in vars(a).items()}, "results": results})
    print(f"wrote {a.output_json}")


if __name__ == "__main__":
    main()
