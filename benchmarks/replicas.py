"""One engine against engine replicas on Ray Serve: aggregated (two routers) and disaggregated.

What it measures
    The same requests, all sent at once with at most --concurrency in flight, to
      - `bucketserve serve --num-threads T` (one engine),
      - `--replicas R --threads-per-replica T/R --replica-router power-of-two` (Ray's default),
      - the same with `--replica-router length` (length bands),
      - `--prefill-replicas 1 --decode-replicas 1 --threads-per-replica T/2` (P/D),
    (with --rate: at Poisson arrivals instead, an open loop where queueing shows in TTFT)
    on two workloads: ShareGPT, and "mixed" (short chats and long documents: half Alpaca-like,
    half LongBench-like lengths, text from ShareGPT). For each: output tokens/s, TTFT and TPOT
    p50/p99, the p99 TTFT of the short requests (prompt <= 256 tokens) and, for P/D, the mean
    KV transfer time per request (the servers' `bucketserve:kv_transfer_seconds`).

How to run (a quiet machine: every core is in use)
    .venv/bin/python benchmarks/replicas.py
    .venv/bin/python benchmarks/replicas.py --num-prompts 48 --replicas 2 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bucketserve.bench.client import ClientConfig
from bucketserve.bench.datasets import BenchRequest, load_tokenizer
from bucketserve.bench.runner import run_workload
from bucketserve.bench.servers import managed_server
from bucketserve.bench.workload import build_workload
from bucketserve.metrics import percentile, summarize
from bucketserve.wire import write_json
from bucketserve.workloads import arrivals

SHORT_PROMPT = 256


def run(
    requests: list[BenchRequest],
    times: list[float],
    server_args: list[str],
    concurrency: int,
    log: Path,
    desc: str,
) -> dict:
    with managed_server(None, server_args, log) as url:
        cfg = ClientConfig(base_url=url, model="SmolLM2-135M-Instruct", request_timeout=1800)
        asyncio.run(run_workload([BenchRequest("Warm up.", 3, 4)], [0.0], cfg, progress=False))
        before = kv_transfers(url)
        result = asyncio.run(run_workload(requests, times, cfg, concurrency, desc=desc))
        after = kv_transfers(url)
    records = [o.record for o in result.outcomes]
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed ({desc}), e.g. {failed[0]}")
    summary = summarize(records, result.duration)
    short = [r.ttft * 1e3 for r in records if r.prompt_tokens <= SHORT_PROMPT]
    summary["p99_short_ttft_ms"] = percentile(short, 99)
    count = after[1] - before[1]
    summary["mean_kv_transfer_ms"] = (after[0] - before[0]) / count * 1e3 if count else float("nan")
    return summary


def kv_transfers(url: str) -> tuple[float, float]:
    """(seconds, count) of the KV transfers the server has made, from its /metrics."""
    text = httpx.get(url + "/metrics", timeout=60).text
    total = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "bucketserve:kv_transfer_seconds":
            for sample in family.samples:
                kind = sample.name.rsplit("_", 1)[-1]
                if kind in total:
                    total[kind] += sample.value
    return total["sum"], total["count"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads in all, split among the replicas")
    p.add_argument("--max-output-len", type=int, default=128)
    p.add_argument("--output-json", type=Path, default=Path("results/replicas.json"))
    p.add_argument("--only", help="run only the setups whose name contains this (e.g. length, 1P)")
    p.add_argument("--datasets", default="sharegpt,mixed")
    p.add_argument("--rate", type=float, default=0.0, help="Poisson requests/s; 0 = all at once (default)")
    a = p.parse_args()
    if a.threads % a.replicas:
        p.error("--threads must be a multiple of --replicas")
    tokenizer = load_tokenizer(None)
    a.output_json.parent.mkdir(parents=True, exist_ok=True)
    per = str(a.threads // a.replicas)
    setups = {
        f"1 x {a.threads} threads": ["--num-threads", str(a.threads)],
        f"{a.replicas} x {per}, pow-2": [
            "--replicas", str(a.replicas), "--threads-per-replica", per, "--replica-router", "power-of-two",
        ],
        f"{a.replicas} x {per}, length": [
            "--replicas", str(a.replicas), "--threads-per-replica", per, "--replica-router", "length",
        ],
        f"1P+1D x {a.threads // 2}": [
            "--prefill-replicas", "1", "--decode-replicas", "1", "--threads-per-replica", str(a.threads // 2),
        ],
    }  # fmt: skip
    setups = {name: args for name, args in setups.items() if a.only is None or a.only in name}
    results: dict[str, dict[str, dict]] = {}
    for dataset in a.datasets.split(","):
        requests = build_workload(
            dataset, a.num_prompts, tokenizer, max_output_len=a.max_output_len, max_prompt_len=1536,
            max_total_len=2048,
        ).requests  # fmt: skip
        times = [0.0] * len(requests) if a.rate <= 0 else arrivals.poisson(len(requests), a.rate, 0)
        print(f"{dataset}: {len(requests)} requests, {sum(r.prompt_len for r in requests)} prompt + "
              f"{sum(r.output_len for r in requests)} output tokens, {a.concurrency} at once")  # fmt: skip
        for name, args in setups.items():
            slug = "".join(c if c.isalnum() else "-" for c in name)
            log = a.output_json.with_suffix(f".{dataset}.{slug}.server.log")
            results.setdefault(dataset, {})[name] = run(
                requests, times, args, a.concurrency, log, f"{dataset}, {name}"
            )
    keys = [
        ("output_throughput", "output tokens/s"),
        ("median_ttft_ms", "TTFT p50 (ms)"),
        ("p99_ttft_ms", "TTFT p99 (ms)"),
        ("median_tpot_ms", "TPOT p50 (ms)"),
        ("p99_tpot_ms", "TPOT p99 (ms)"),
        ("p99_short_ttft_ms", f"short (<= {SHORT_PROMPT}) TTFT p99"),
        ("mean_kv_transfer_ms", "KV transfer, mean (ms)"),
    ]
    for dataset, by_setup in results.items():
        print(f"\n{dataset}{'':20}" + "".join(f"{name:>24}" for name in by_setup))
        for key, label in keys:
            print(f"{label:28}" + "".join(f"{r[key]:24.1f}" for r in by_setup.values()))
    write_json(a.output_json, {"args": {k: str(v) for k, v in vars(a).items()}, "results": results})
    print(f"wrote {a.output_json}")


if __name__ == "__main__":
    main()
