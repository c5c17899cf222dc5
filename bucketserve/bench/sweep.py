"""Vary the request rate: SLO attainment per rate, load capacity at a target attainment, plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bucketserve.bench.client import ClientConfig
from bucketserve.bench.report import SLO, summarize_run
from bucketserve.bench.runner import RunResult, run_workload
from bucketserve.bench.workload import Workload
from bucketserve.metrics import load_capacity
from bucketserve.options import check, check_fields, option


@dataclass
class SweepPoint:
    rate: float  # requests/s asked for (inf = all at once)
    summary: dict[str, Any]
    result: RunResult


@dataclass
class SweepConfig:
    """The rates a sweep runs and where its results go (``bench sweep`` and ``compare``)."""

    request_rates: tuple[float, ...] = option(
        metavar="R,R,...",
        help="request rates to run, comma-separated, req/s; inf = all at once. A trace keeps "
        "its arrival pattern, rescaled to each mean rate",
    )
    warmup_requests: int = option(
        0,
        help="before the measured runs, send the workload's first N requests at the first rate "
        "and discard them (a server whose scheduler learns its step costs online starts warm)",
    )
    target_attainment: float = option(0.8, help="load capacity = highest rate with this attainment")
    output_dir: str = option("bench-results", help="where the JSON and PNG go")
    name: str | None = option(None, help="file name stem (default: <command>-<dataset>)")

    def __post_init__(self) -> None:
        check_fields(self)
        rates = self.request_rates
        check(
            bool(rates) and all(r > 0 for r in rates),  # (nan > 0 is false)
            f"request_rates must be numbers > 0 (or inf), got {','.join(f'{r:g}' for r in rates) or 'none'}",
        )
        check(self.warmup_requests >= 0, f"warmup_requests must be >= 0, got {self.warmup_requests}")
        check(
            0 < self.target_attainment <= 1,
            f"target_attainment must be in (0, 1], got {self.target_attainment}",
        )


async def run_sweep(
    workload: Workload,
    rates: Sequence[float],
    cfg: ClientConfig,
    slo: SLO | None = None,
    burstiness: float = 1.0,
    seed: int = 0,
    max_concurrency: int | None = None,
    progress: bool = True,
    label: str = "",
    warmup_requests: int = 0,
) -> list[SweepPoint]:
    """Run the same requests once per rate, in the order given (after ``warmup_requests`` of
    them at the first rate, not measured)."""
    if warmup_requests:
        n = min(warmup_requests, len(workload.requests))
        times = workload.trace_times[:n] if workload.trace_times is not None else None
        warm = Workload(f"{workload.name} warm-up", workload.requests[:n], times)
        arrivals = warm.arrivals(rates[0], burstiness, seed=seed + 1)
        desc = f"{label} warm-up".strip()
        await run_workload(warm.requests, arrivals, cfg, max_concurrency, progress, desc=desc)
    points = []
    for rate in rates:
        arrivals = workload.arrivals(rate, burstiness, seed=seed)
        result = await run_workload(
            workload.requests, arrivals, cfg, max_concurrency, progress, desc=f"{label} rate {rate:g}".strip()
        )
        summary = summarize_run(result, slo)
        summary["request_rate"] = rate
        points.append(SweepPoint(rate, summary, result))
    return points


def capacity(points: Sequence[SweepPoint], target: float) -> float:
    """Load capacity (requests/s) at ``target`` attainment over the finite rates of a sweep;
    nan without an SLO or when no rate reaches the target (see metrics.load_capacity)."""
    finite = [p for p in points if math.isfinite(p.rate) and "slo_attainment" in p.summary]
    if not finite:
        return math.nan
    return load_capacity([p.rate for p in finite], [p.summary["slo_attainment"] for p in finite], target)


def plot_sweeps(curves: dict[str, Sequence[SweepPoint]], path: str, target: float, title: str = "") -> None:
    """One PNG: SLO attainment (if measured), p99 TTFT and output throughput against the rate,
    one line per server; a single rate per server gives bar charts instead."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    has_slo = any("slo_attainment" in p.summary for pts in curves.values() for p in pts)
    panels = [("slo_attainment", "SLO attainment")] if has_slo else []
    panels += [("p99_ttft_ms", "p99 TTFT (ms)"), ("median_tpot_ms", "median TPOT (ms)")]
    panels += [("output_throughput", "output tokens/s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    single = all(len(pts) == 1 for pts in curves.values())
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        if single:
            names = list(curves)
            values = [_num(curves[n][0].summary.get(key)) for n in names]
            ax.bar(names, values, color="tab:blue")
            ax.set_xlabel(", ".join(sorted({f"rate {curves[n][0].rate:g} req/s" for n in names})))
            ax.tick_params(axis="x", rotation=30)
        else:
            for name, pts in curves.items():
                finite = [p for p in pts if math.isfinite(p.rate)]
                ax.plot(
                    [p.rate for p in finite], [_num(p.summary.get(key)) for p in finite], "o-", label=name
                )
            ax.set_xlabel("request rate (req/s)")
            if key == "slo_attainment":
                ax.axhline(target, color="gray", linestyle="--", linewidth=1)
                ax.set_ylim(0, 1.05)
            ax.legend(fontsize=8)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan
