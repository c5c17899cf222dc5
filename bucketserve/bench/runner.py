"""Replay a workload against one server: release each request at its arrival offset, keep at
most ``max_concurrency`` in flight, and collect every outcome (failures included)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from bucketserve.bench.client import ClientConfig, Outcome, fetch_timeline, send_request
from bucketserve.bench.datasets import BenchRequest
from bucketserve.wire import StepSample


@dataclass
class RunResult:
    outcomes: list[Outcome]  # in request order
    duration: float  # from the first release to the last reply, seconds
    # The server's engine steps during the run (start from the run's start), where the
    # server is a bucketserve one; `simulate --validate` replays the machine's drift from them.
    steps: list[StepSample] | None = None


async def run_workload(
    requests: Sequence[BenchRequest],
    arrivals: Sequence[float],
    cfg: ClientConfig,
    max_concurrency: int | None = None,
    progress: bool = True,
    desc: str = "requests",
) -> RunResult:
    """Send ``requests[i]`` at ``arrivals[i]`` seconds after the start; wait for all of them."""
    if len(requests) != len(arrivals):
        raise ValueError(f"{len(requests)} requests but {len(arrivals)} arrival times")
    # httpx's default pool (100 connections) would silently cap concurrency: size it ourselves.
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, unit="req")
    async with httpx.AsyncClient(timeout=cfg.request_timeout, limits=limits) as client:
        t0, t0_mono = time.perf_counter(), time.monotonic()

        async def one(req: BenchRequest, at: float) -> Outcome:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            scheduled = time.perf_counter() - t0
            if semaphore is None:
                outcome = await send_request(client, cfg, req, t0, scheduled)
            else:
                async with semaphore:
                    outcome = await send_request(client, cfg, req, t0, scheduled)
            bar.update(1)
            return outcome

        try:
            outcomes = await asyncio.gather(*(one(r, a) for r, a in zip(requests, arrivals, strict=True)))
        finally:
            bar.close()
        duration = time.perf_counter() - t0
        timeline = await fetch_timeline(client, cfg)
    steps = None
    if timeline is not None:
        steps = timeline.steps_between(t0_mono, t0_mono + duration)
        for o in outcomes:
            if o.admitted is not None:
                o.admitted = timeline.to_run(o.admitted, t0_mono)
    return RunResult(list(outcomes), duration, steps)
