"""bucketserve against llama.cpp's llama-server (or any OpenAI-compatible server), same
requests, at several concurrency levels, in one command and one table.

What it measures
    The first N of 200 ShareGPT requests (seeded; prompt <= 1,024 tokens, output = the
    reference reply's length capped at 256, EOS ignored so every server generates exactly
    that), streamed from /v1/completions, all released at once with at most c in flight.
    For each server and each c: output and total tokens/s, TTFT and TPOT p50 (ms), failures.
    Servers run one at a time (each started here is stopped before the next starts), so
    none competes with another for the two cores.

Servers
    --ours NAME="ARGS"   start `bucketserve serve ARGS` (repeatable; ARGS may be empty)
    --llama NAME         start llama-server through ../shared/peers/llama-server.sh, with as
                         many slots as the largest concurrency (it builds llama.cpp once)
    --url NAME=URL       a server already running (repeatable)
    The first --llama (or else the first --url) is the peer the ratios are taken against.

How to run
    .venv/bin/python benchmarks/peer_comparison.py --ours bucketserve= --llama llama-server
    .venv/bin/python benchmarks/peer_comparison.py --ours bucket= \\
        --ours continuous="--policy continuous" --llama llama --concurrency 1,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bucketserve.bench.client import ClientConfig
from bucketserve.bench.datasets import load_tokenizer, sharegpt_requests
from bucketserve.bench.report import summarize_run
from bucketserve.bench.runner import run_workload
from bucketserve.bench.servers import free_port, managed_server, stop, wait_healthy
from bucketserve.wire import write_json

PEERS_SCRIPT = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "llama-server.sh"
MODEL_NAME = "SmolLM2-135M-Instruct"
TARGETS = {1: 1.0, 8: 2.0, 32: 3.0}  # issue 11: output tok/s vs llama-server at each c


@contextlib.contextmanager
def llama_server(slots: int, script: Path, log_path: Path) -> Iterator[str]:
    if not script.exists():
        raise SystemExit(f"no {script}: pass --peers-script or run a llama-server yourself and use --url")
    subprocess.run(["bash", str(script), "build"], check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["bash", str(script), "serve", str(port), str(slots)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc, 300, log_path)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            stop(proc)


def bench_levels(
    url: str, name: str, requests: list, levels: list[int], counts: list[int]
) -> dict[int, dict]:
    cfg = ClientConfig(base_url=url, model=MODEL_NAME, ignore_eos=True, temperature=0.0)
    out = {}
    # One short warm-up request: first-call costs (allocations, lazy init) are not the steady state.
    asyncio.run(run_workload(requests[:1], [0.0], cfg, 1, progress=False))
    for c, n in zip(levels, counts, strict=True):
        reqs = requests[:n]
        result = asyncio.run(run_workload(reqs, [0.0] * len(reqs), cfg, c, desc=f"{name} c={c}"))
        out[c] = summarize_run(result)
        s = out[c]
        print(
            f"  {name} c={c}: {s['output_throughput']:.1f} out tok/s, TTFT p50 {s['p50_ttft_ms']:.0f} ms, "
            f"TPOT p50 {s['p50_tpot_ms']:.1f} ms, failed {s['failed']}",
            flush=True,
        )
    return out


def print_table(results: dict[str, dict[int, dict]], levels: list[int], peer: str | None) -> None:
    head = f"{'server':<22}" + "".join(
        f"| c={c:<3} out tok/s  total tok/s  TTFT p50  TPOT p50 " for c in levels
    )
    print("\n" + head)
    print("-" * len(head))
    for name, by_c in results.items():
        cells = []
        for c in levels:
            s = by_c[c]
            ratio = ""
            if peer and name != peer:
                ratio = f" ({s['output_throughput'] / results[peer][c]['output_throughput']:.2f}x)"
            cells.append(
                f"| {s['output_throughput']:7.1f}{ratio:<8} {s['total_token_throughput']:8.1f}  "
                f"{s['p50_ttft_ms']:7.0f} ms {s['p50_tpot_ms']:6.1f} ms "
                + (f"[{s['failed']} failed] " if s["failed"] else "")
            )
        print(f"{name:<22}" + "".join(cells))
    if peer:
        print(
            f"\nratios: output tok/s against {peer}; targets "
            + ", ".join(f"c={c}: {t}x" for c, t in TARGETS.items())
        )
        for name, by_c in results.items():
            if name == peer:
                continue
            verdicts = []
            for c in levels:
                ratio = by_c[c]["output_throughput"] / results[peer][c]["output_throughput"]
                target = TARGETS.get(c)
                ttft_ok = by_c[c]["p50_ttft_ms"] < results[peer][c]["p50_ttft_ms"]
                mark = "" if target is None else (" met" if ratio >= target else " NOT met")
                if c == 32 and target is not None:
                    mark += ", TTFT p50 " + ("below" if ttft_ok else "NOT below") + f" {peer}'s"
                verdicts.append(f"c={c} {ratio:.2f}x{mark}")
            print(f"  {name}: " + "; ".join(verdicts))


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"{flag} takes NAME=VALUE, got {item!r}")
        out.append((name, value))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", action="append", default=[], metavar='NAME="SERVE ARGS"')
    ap.add_argument("--llama", action="append", default=[], metavar="NAME")
    ap.add_argument("--url", action="append", default=[], metavar="NAME=URL")
    ap.add_argument("--concurrency", default="1,8,32", help="levels, comma-separated")
    ap.add_argument("--num-prompts", default="12,48,128", help="requests per level (the first N of the 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-output-len", type=int, default=256)
    ap.add_argument("--peers-script", type=Path, default=PEERS_SCRIPT)
    ap.add_argument("--log-dir", type=Path, default=Path("results/peers"))
    ap.add_argument("--output-json", type=Path, default=None)
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.concurrency.split(",")]
    counts = [int(x) for x in a.num_prompts.split(",")]
    if len(counts) != len(levels):
        ap.error("--num-prompts needs one count per --concurrency level")
    servers = [("ours", n, v) for n, v in _pairs(a.ours, "--ours")]
    servers += [("llama", n, "") for n in a.llama]
    servers += [("url", n, v) for n, v in _pairs(a.url, "--url")]
    if not servers:
        ap.error("name at least one server (--ours, --llama or --url)")
    peer = a.llama[0] if a.llama else (_pairs(a.url, "--url")[0][0] if a.url else None)

    requests = sharegpt_requests(load_tokenizer(None), 200, seed=a.seed, max_output_len=a.max_output_len)
    n = max(counts)
    print(
        f"{len(requests)} ShareGPT requests (seed {a.seed}); the first {n}: prompt mean "
        f"{sum(r.prompt_len for r in requests[:n]) / n:.0f} tokens, output mean "
        f"{sum(r.output_len for r in requests[:n]) / n:.0f} (cap {a.max_output_len}, EOS ignored)"
    )
    a.log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for kind, name, value in servers:
        log = a.log_dir / f"{name}.log"
        if kind == "ours":
            ctx = managed_server(None, shlex.split(value), log_path=log, startup_timeout=600)
        elif kind == "llama":
            ctx = llama_server(max(levels), a.peers_script, log)
        else:
            ctx = contextlib.nullcontext(value)
        with ctx as url:
            print(f"{name}: {url} (log {log if kind != 'url' else '-'})", flush=True)
            results[name] = bench_levels(url, name, requests, levels, counts)
    print_table(results, levels, peer)
    if a.output_json:
        write_json(a.output_json, {"config": vars(a), "results": results})
        print(f"wrote {a.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
