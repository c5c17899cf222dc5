"""The web page: a live view of the scheduler and a chat playground, served at ``/``.

The page (``static/``: HTML, CSS and plain JavaScript drawing SVG; nothing fetched from the
internet) reads one endpoint, ``GET /dashboard/state``, once a second. That endpoint builds
its reply from what the server already keeps: the engine's snapshot (refreshed by the engine
after every step), its recent step records, and the metrics' tallies and last finished
requests. A sampler stores the snapshot once a second for the last ``HISTORY_S`` seconds, so
a page opened late still sees the buckets split and merge. ``?since=T&steps_since=S`` sends
only the samples newer than T and the steps that started after S (and the settings only when
neither is given), so a page that keeps polling gets a few kilobytes a second.

The state is behind the API key, like ``/debug/steps``: its steps tell the lengths of other
clients' prompts. The page itself is public and asks for the key when the state answers 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, is_dataclass
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from bucketserve.engine.async_engine import AsyncEngine, EngineSnapshot
from bucketserve.metrics import percentile
from bucketserve.server.metrics import FinishedRequest, ServerMetrics

__all__ = ["LiveView", "dashboard_router"]

log = logging.getLogger(__name__)

HISTORY_S = 300  # seconds of per-second samples kept
SAMPLE_EVERY_S = 1.0
MAX_STEPS = 240  # the newest step records sent per reply
LATENCY_WINDOW_S = 60.0  # the headline percentiles cover this much
LATENCY_BIN_S = 10.0  # the latency charts' resolution, over HISTORY_S

STATIC = resources.files("bucketserve.server") / "static"
# The page may load and fetch from this server only: nothing from the internet, no inline script.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
}
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


@dataclass(frozen=True)
class Sample:
    """The server's state at one moment (monotonic seconds)."""

    t: float
    running: int
    waiting: int
    kv_usage: float
    generated_tokens: int  # since start: the page takes differences for throughput
    rejected: int  # 429s since start
    queues: tuple[tuple[int, int, int], ...]  # (lower, upper, waiting) per bucket
    splits: int
    merges: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["queues"] = [list(q) for q in self.queues]
        return d


def _latency(requests: list[FinishedRequest]) -> dict[str, Any]:
    records = [r.record for r in requests]
    ttft = [r.ttft * 1e3 for r in records]
    tpot = [r.tpot * 1e3 for r in records if r.output_tokens > 1]  # as summarize() counts TPOT

    def pct(xs: list[float], q: float) -> float | None:
        v = percentile(xs, q)
        return None if math.isnan(v) else round(v, 2)

    return {
        "requests": len(requests),
        "output_tokens": sum(r.output_tokens for r in records),
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "tpot_p50_ms": pct(tpot, 50),
        "tpot_p99_ms": pct(tpot, 99),
        "slo_attainment": sum(r.met_slo for r in requests) / len(requests) if requests else None,
    }


def _plain(value: Any) -> Any:
    """A config value as JSON: dataclasses as dicts, tuples as lists."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


class LiveView:
    """What the page shows, kept and assembled on the server's event loop."""

    def __init__(
        self, engine: AsyncEngine, metrics: ServerMetrics, model_name: str, api_key_set: bool
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.api_key_set = api_key_set
        self.started = time.monotonic()
        self.history: deque[Sample] = deque(maxlen=int(HISTORY_S / SAMPLE_EVERY_S))

    def sample(self, s: EngineSnapshot | None = None) -> Sample:
        """The state now, from snapshot ``s`` (default: the engine's latest)."""
        s = s or self.engine.stats()
        bands = itertools.pairwise(s.queue_edges)  # the snapshot's edges and queues agree
        queues = tuple((lo, hi, n) for (lo, hi), (_, n) in zip(bands, s.queues, strict=True))
        m = self.metrics
        return Sample(
            t=round(time.monotonic(), 3),
            running=s.num_running,
            waiting=s.num_waiting,
            kv_usage=round(s.kv_cache_usage, 4),
            generated_tokens=m.num_generated_tokens,
            rejected=m.rejections["queue_full"] + m.rejections["late"],
            queues=queues,
            splits=s.num_queue_splits,
            merges=s.num_queue_merges,
        )

    async def run_sampler(self) -> None:
        """Store a sample every second until cancelled; a failed sample is logged and skipped
        (the server must not lose its shutdown to the page's bookkeeping)."""
        while True:
            try:
                self.history.append(self.sample())
            except Exception:
                log.exception("the dashboard's sampler failed")
            await asyncio.sleep(SAMPLE_EVERY_S)

    @functools.cached_property
    def settings(self) -> dict[str, Any]:
        """The policy and the main settings, as the engine runs them."""
        llm = self.engine.engine
        sched, cfg = llm.scheduler_config, llm.config
        plans = llm.weight_plans
        return {
            "policy": sched.policy,
            "policy_options": _plain(sched.policy_config),
            "order": _plain(sched.order),
            "max_num_seqs": sched.max_num_seqs,
            "max_num_batched_tokens": sched.max_num_batched_tokens,
            "chunked_prefill": sched.enable_chunked_prefill,
            "max_model_len": llm.max_model_len,
            "kv_blocks": llm.block_manager.num_blocks,
            "block_size": cfg.block_size,
            "device": str(llm.device),
            "dtype": str(llm.dtype).removeprefix("torch."),
            "quantization": cfg.quantization,
            "weight_formats": plans.describe() if plans is not None else "eager (no tuning)",
            "threads": cfg.num_threads or "torch's default",
            "max_waiting_requests": self.engine.max_waiting_requests,
            "api_key": self.api_key_set,
        }

    def targets(self) -> dict[str, Any]:
        """The default SLO targets and the length classes, in seconds (a request may bring its own)."""
        order = self.engine.engine.scheduler_config.order
        return {
            "ttft_s": order.default_ttft_slo_s,
            "tpot_s": order.default_tpot_slo_s,
            "classes": [
                {"max_prompt": c.max_prompt, "ttft_s": c.ttft_s, "tpot_s": c.tpot_s} for c in order.classes
            ],
        }

    def state(self, since: float | None = None, steps_since: float | None = None) -> dict[str, Any]:
        """The page's data: samples newer than ``since``, steps started after ``steps_since``
        (both on the server's monotonic clock; None: all kept), the rest as of now."""
        now = time.monotonic()
        s = self.engine.stats()
        current = self.sample(s)
        history = [x for x in self.history if since is None or x.t > since]
        recent_steps = self.engine.recent_steps()[-MAX_STEPS:]
        steps = [r for r in recent_steps if steps_since is None or r.start > steps_since]
        # One pass over the finished requests, each into its bin: bins fixed on the clock
        # (not counted back from now), so a request stays in its bin from poll to poll.
        by_bin: dict[int, list[FinishedRequest]] = {}
        recent = []
        for r in self.metrics.finished:
            end = r.record.finished
            if now - end < HISTORY_S:
                by_bin.setdefault(int(end // LATENCY_BIN_S), []).append(r)
                if now - end < LATENCY_WINDOW_S:
                    recent.append(r)
        bins = [{"t": (i + 1) * LATENCY_BIN_S, **_latency(by_bin[i])} for i in sorted(by_bin)]
        return {
            "now": round(now, 3),
            "wall": time.time(),
            "uptime_s": round(now - self.started, 1),
            "model": self.model_name,
            "running": self.engine.is_running,
            "settings": self.settings if since is None and steps_since is None else None,
            "current": current.to_dict(),
            "totals": {
                "steps": s.num_steps,
                "preemptions": s.num_preemptions,
                "late": s.num_late,
                "padding_ratio": round(s.padding_ratio, 4),
                "kv_blocks_used": s.kv_blocks_used,
                "kv_blocks_total": s.kv_blocks_total,
            },
            "history": [x.to_dict() for x in history],
            "steps": [
                {
                    "t": round(r.start, 4),
                    "ms": round(r.duration * 1e3, 2),
                    "prefill_tokens": sum(chunk for chunk, _ in r.shape.prefill),
                    "prefill_rows": len(r.shape.prefill),
                    "decode_rows": len(r.shape.decode),
                    "real_tokens": r.real_tokens,
                    "padded_tokens": r.padded_tokens,
                }
                for r in steps
            ],
            "latency": {
                "window_s": LATENCY_WINDOW_S,
                "bin_s": LATENCY_BIN_S,
                **_latency(recent),
                "bins": bins,
                "targets": self.targets(),
            },
        }


def _live(request: Request) -> LiveView:
    return request.app.state.live


def dashboard_router(check_api_key: Any) -> APIRouter:
    """``/`` (the page), ``/static/*`` (its script and style), ``/dashboard/state``."""
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(), headers=PAGE_HEADERS)

    @router.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            return JSONResponse({"error": {"message": f"no asset {name!r}", "type": "not_found"}}, 404)
        return Response(
            (STATIC / name).read_text(), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"}
        )

    @router.get("/dashboard/state", dependencies=[Depends(check_api_key)])
    async def dashboard_state(
        request: Request, since: float | None = None, steps_since: float | None = None
    ) -> JSONResponse:
        """The page's data: the engine's state now, per-second samples (newer than ``since``,
        on the server's monotonic clock), the steps that started after ``steps_since``,
        latency percentiles, and the settings on a first request (neither given).
        ``Server-Timing`` says how long the reply took to build (what the page costs)."""
        start = time.perf_counter()
        reply = JSONResponse(_live(request).state(since, steps_since))
        reply.headers["Server-Timing"] = f"state;dur={(time.perf_counter() - start) * 1e3:.3f}"
        return reply

    return router


@contextlib.asynccontextmanager
async def sampling(live: LiveView) -> AsyncIterator[None]:
    """Run the once-a-second sampler for as long as the app runs."""
    task = asyncio.create_task(live.run_sampler())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
