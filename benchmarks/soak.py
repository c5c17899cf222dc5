"""Soak: the Azure conversation trace replayed against `bucketserve serve` for a long time,
with clients that leave mid-reply and clients that send bad requests (issue 12, item 7).

What it measures
    The real Azure 2023 conversation trace (arrival pattern and lengths; text from ShareGPT,
    ``bench.workload``), time-scaled so that its mean rate is --load (default 0.7) of the
    server's capacity (--capacity req/s, or measured first: --capacity-requests trace requests
    all at once, completed per second), for --duration seconds (default 1800). The trace's
    first --period seconds (default: one --window) are replayed over and over, so that the first
    and the last windows carry the same requests at the same offsets and a change of TTFT
    between them is drift of the server, not another stretch of the trace (--period 0: the
    trace straight through). 10% of the clients (--drop-fraction) close the stream after the
    first few tokens; 5% (--bad-fraction) send a body the server must refuse with a 400; which
    ones is fixed per request of the period, so every repeat has the same mix.
    Meanwhile the server's resident memory (RSS) is sampled every --rss-every seconds.

    Prints: requests by kind, 5xx answers (HTTP status, or an error event in a stream), the KV
    usage from /metrics once the last request ended, RSS over time and its growth after the
    warm-up (--warmup, default 10% of the run), and the p99 TTFT of the first and the last
    --window seconds (default 300, at most a quarter of the run); then a verdict against the
    bounds: 0 5xx, KV usage back to 0, RSS growth < 5%, last p99 TTFT within 20% of the first.

How to run
    .venv/bin/python benchmarks/soak.py                            # 30 min, embedded model
    .venv/bin/python benchmarks/soak.py --duration 60 --capacity 2 # a quick check
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000 --pid PID --capacity 3
Run the full 30 minutes on a quiet machine: other load moves the TTFT percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bucketserve.bench.client import ClientConfig, build_payload, send_request, served_model
from bucketserve.bench.datasets import BenchRequest, load_tokenizer
from bucketserve.bench.runner import run_workload
from bucketserve.bench.servers import free_port, server_command, stop, wait_healthy
from bucketserve.bench.workload import build_workload
from bucketserve.metrics import percentile

TRACE = "azure-conv"
BOUNDS = {"rss_growth": 0.05, "ttft_drift": 0.20}


@dataclass
class Totals:
    """What the three kinds of clients saw."""

    sent: dict[str, int] = field(default_factory=lambda: {"normal": 0, "drop": 0, "bad": 0})
    server_errors: list[str] = field(default_factory=list)  # 5xx and stream error events
    other_failures: list[str] = field(default_factory=list)  # 4xx to good requests, timeouts...
    ttfts: list[tuple[float, float]] = field(default_factory=list)  # (arrival, TTFT seconds)
    bad_not_refused: int = 0  # bad requests that did not get a 400


async def drop_midway(
    client: httpx.AsyncClient, cfg: ClientConfig, req: BenchRequest, totals: Totals
) -> None:
    """Stream a request and close the connection after a few chunks, as a client that leaves."""
    keep = random.Random(req.prompt_len).randint(1, 4)
    async with client.stream("POST", cfg.endpoint, json=build_payload(req, cfg)) as r:
        if r.status_code >= 500:
            totals.server_errors.append(f"drop: HTTP {r.status_code}")
            return
        async for line in r.aiter_lines():
            if line.startswith("data:") and '"error"' in line:
                totals.server_errors.append(f"drop: {line[:200]}")
                return
            keep -= line.startswith("data:")
            if keep <= 0:
                return  # leaving the block closes the connection mid-reply


async def send_bad(client: httpx.AsyncClient, cfg: ClientConfig, req: BenchRequest, totals: Totals) -> None:
    """A request the server must refuse with 400 (a negative temperature)."""
    body = {**build_payload(req, cfg), "temperature": -1}
    r = await client.post(cfg.endpoint, json=body)
    if r.status_code >= 500:
        totals.server_errors.append(f"bad: HTTP {r.status_code}: {r.text[:200]}")
    elif r.status_code != 400:
        totals.bad_not_refused += 1


async def replay(
    requests: list[BenchRequest], arrivals: list[float], kinds: list[str], cfg: ClientConfig
) -> Totals:
    totals = Totals()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=cfg.request_timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(req: BenchRequest, at: float, kind: str) -> None:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            totals.sent[kind] += 1
            try:
                if kind == "drop":
                    await drop_midway(client, cfg, req, totals)
                elif kind == "bad":
                    await send_bad(client, cfg, req, totals)
                else:
                    rec = (await send_request(client, cfg, req, t0, at)).record
                    if rec.error is None:
                        totals.ttfts.append((rec.arrival, rec.first_token - rec.arrival))
                    elif rec.error.startswith(("HTTP 5", "stream error")):
                        totals.server_errors.append(rec.error)
                    else:
                        totals.other_failures.append(rec.error)
            except httpx.HTTPError as e:
                totals.other_failures.append(f"{kind}: {type(e).__name__}: {e}"[:200])

        await asyncio.gather(*(one(r, a, k) for r, a, k in zip(requests, arrivals, kinds, strict=True)))
    return totals


def client_kinds(n: int, drop: float, bad: float, seed: int) -> list[str]:
    """Which of ``n`` requests are sent normally, dropped mid-reply, or sent broken."""
    rng = random.Random(seed)
    return ["drop" if (u := rng.random()) < drop else "bad" if u < drop + bad else "normal" for _ in range(n)]


def trace_replay(
    tokenizer, duration: float, rate: float, max_len: int, period: float, drop: float, bad: float, seed: int
) -> tuple[list[BenchRequest], list[float], list[str]]:
    """The trace's requests, arrival offsets at mean ``rate`` and client kinds until ``duration``:
    its first ``period`` seconds over and over (``period`` 0: the whole run's worth of trace,
    repeated only if the trace runs out)."""
    span = period if period > 0 else duration
    needed = math.ceil(span * rate) + 1
    trace = build_workload(TRACE, needed, tokenizer, max_prompt_len=max_len // 2, max_total_len=max_len)
    times = trace.arrivals(rate=rate)
    if period > 0:
        keep = [i for i, t in enumerate(times) if t < period]
    else:
        keep, period = list(range(len(times))), times[-1] + 1 / rate
    kinds = client_kinds(len(keep), drop, bad, seed)
    requests, arrivals, kind_of = [], [], []
    for k in range(math.ceil(duration / period)):
        for i, kind in zip(keep, kinds, strict=True):
            if (at := k * period + times[i]) < duration:
                requests.append(trace.requests[i])
                arrivals.append(at)
                kind_of.append(kind)
    return requests, arrivals, kind_of


def measure_capacity(cfg: ClientConfig, requests: list[BenchRequest]) -> float:
    """Completed requests per second with ``requests`` all sent at once."""
    result = asyncio.run(run_workload(requests, [0.0] * len(requests), cfg, progress=False))
    done = sum(o.record.ok for o in result.outcomes)
    return done / result.duration


async def sample_rss(pid: int, every: float, out: list[tuple[float, int]], stop_event: asyncio.Event) -> None:
    proc, t0 = psutil.Process(pid), time.perf_counter()
    while not stop_event.is_set():
        out.append((time.perf_counter() - t0, proc.memory_info().rss))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_event.wait(), every)


def kv_usage(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("bucketserve:kv_cache_usage_perc"):
            return float(line.rsplit(" ", 1)[1])
    return math.nan


def p99_ttft(ttfts: list[tuple[float, float]], lo: float, hi: float) -> float:
    return percentile([t for at, t in ttfts if lo <= at < hi], 99)


def soak(url: str, pid: int | None, a: argparse.Namespace) -> bool:
    cfg = ClientConfig(url, served_model(url), request_timeout=a.request_timeout)
    tokenizer = load_tokenizer(a.tokenizer or a.model)
    capacity = a.capacity
    if capacity is None:
        probe = build_workload(TRACE, a.capacity_requests, tokenizer, max_total_len=a.max_len).requests
        capacity = measure_capacity(cfg, probe)
        print(f"measured capacity: {capacity:.2f} req/s ({a.capacity_requests} trace requests at once)")
    rate = a.load * capacity
    window = min(a.window, a.duration / 4)
    period = window if a.period is None else a.period
    requests, arrivals, kinds = trace_replay(
        tokenizer, a.duration, rate, a.max_len, period, a.drop_fraction, a.bad_fraction, a.seed
    )
    repeats = f"its first {period:g} s over and over" if period > 0 else "straight through"
    print(f"replaying {len(requests)} {TRACE} requests ({repeats}) at {rate:.2f} req/s "
          f"({a.load:.0%} of {capacity:.2f}) for {a.duration:g} s")  # fmt: skip

    async def run() -> tuple[Totals, list[tuple[float, int]]]:
        rss: list[tuple[float, int]] = []
        done = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(pid, a.rss_every, rss, done)) if pid else None
        totals = await replay(requests, arrivals, kinds, cfg)
        done.set()
        if sampler:
            await sampler
        return totals, rss

    start = time.perf_counter()
    totals, rss = asyncio.run(run())
    wall = time.perf_counter() - start
    time.sleep(1.0)  # aborts of the last dropped streams reach the engine between steps
    kv = kv_usage(url)

    warmup = a.warmup if a.warmup is not None else 0.1 * a.duration
    first, last = p99_ttft(totals.ttfts, 0, window), p99_ttft(totals.ttfts, a.duration - window, a.duration)
    after = [r for t, r in rss if t >= warmup]
    growth = (after[-1] - after[0]) / after[0] if len(after) >= 2 else math.nan
    drift = (last - first) / first if first > 0 else math.nan

    print(f"wall time: {wall:.0f} s; sent: {totals.sent}")
    print(f"5xx (status or stream error event): {len(totals.server_errors)}")
    for e in totals.server_errors[:10]:
        print("  ", e)
    print(f"other failures of good requests: {len(totals.other_failures)}; "
          f"bad requests not refused with 400: {totals.bad_not_refused}")  # fmt: skip
    for e in totals.other_failures[:5]:
        print("  ", e)
    if any("HTTP 429" in e for e in totals.other_failures):
        print("warning: 429s: the load exceeded the server's capacity; give a lower --capacity or --load")
    print(f"KV usage at the end: {kv:.3f}")
    if rss:
        step = max(1, len(rss) // 12)
        print("RSS (MiB) over time: " + ", ".join(f"{t:.0f}s {r / 2**20:.0f}" for t, r in rss[::step]))
        print(f"RSS growth after the {warmup:.0f} s warm-up: {growth:+.1%}")
    print(f"p99 TTFT, first {window:.0f} s: {first * 1e3:.0f} ms; last {window:.0f} s: {last * 1e3:.0f} ms "
          f"({drift:+.1%})")  # fmt: skip
    checks = {
        "0 5xx": not totals.server_errors,
        "KV usage back to 0": kv == 0,
        f"RSS growth < {BOUNDS['rss_growth']:.0%}": bool(rss) and growth < BOUNDS["rss_growth"],
        f"last p99 TTFT within {BOUNDS['ttft_drift']:.0%} of the first": drift <= BOUNDS["ttft_drift"],
    }
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    print("verdict:", "PASS" if all(checks.values()) else "FAIL")
    return all(checks.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="soak this running server (RSS needs --pid) instead of starting one")
    p.add_argument("--pid", type=int, help="with --url: the server's process id, for its RSS")
    p.add_argument("--model", help="the model to serve, and its tokenizer (default: the embedded one)")
    p.add_argument("--tokenizer", help="the tokenizer's folder (default: --model's)")
    p.add_argument("--serve-args", default="", help="more `bucketserve serve` options, one string")
    p.add_argument("--duration", type=float, default=1800.0, help="seconds")
    p.add_argument("--load", type=float, default=0.7, help="the share of the capacity to replay at")
    p.add_argument("--capacity", type=float, help="req/s (default: measured first)")
    p.add_argument("--capacity-requests", type=int, default=64, help="trace requests that measure it")
    p.add_argument("--max-len", type=int, default=1024, help="cap on prompt + output tokens")
    p.add_argument("--drop-fraction", type=float, default=0.10)
    p.add_argument("--bad-fraction", type=float, default=0.05)
    p.add_argument("--warmup", type=float, help="seconds before RSS growth counts (default: 10%% of the run)")
    p.add_argument("--window", type=float, default=300.0, help="the first/last TTFT windows, seconds")
    p.add_argument(
        "--period", type=float, help="seconds of trace replayed again and again (default: --window; 0: none)"
    )
    p.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", type=Path, default=Path("soak-server.log"), help="the started server's log")
    a = p.parse_args()
    if a.url:
        return 0 if soak(a.url.rstrip("/"), a.pid, a) else 1
    port = free_port()
    extra = (["--model", a.model] if a.model else []) + shlex.split(a.serve_args)
    with open(a.log, "w") as log:
        proc = subprocess.Popen(server_command(port, None, extra), stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc, 300, a.log)
            return 0 if soak(url, proc.pid, a) else 1
        finally:
            stop(proc)


if __name__ == "__main__":
    sys.exit(main())
