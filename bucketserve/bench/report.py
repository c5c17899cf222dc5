"""Summaries, the printed table and the result-file record of a benchmark run."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bucketserve.bench.runner import RunResult
from bucketserve.metrics import goodput, slo_attainment, summarize
from bucketserve.options import check_fields, option
from bucketserve.wire import MeasuredRun, RequestRow


@dataclass
class ReportConfig:
    """What a benchmark shows and writes besides its table (``--goodput`` is read by
    :meth:`SLO.parse`; ``bench sweep`` and ``compare`` write to ``SweepConfig.output_dir``)."""

    progress: bool = option(True, help="show a progress bar")
    output_json: str | None = option(
        None, help="write config, summary and per-request records here (default: not written)"
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds; None = not checked."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    @classmethod
    def parse(cls, items: list[str]) -> SLO:
        """From vLLM's ``--goodput`` syntax: ``ttft:MS tpot:MS`` (either or both; e2el is refused)."""
        targets: dict[str, float] = {}
        for item in items:
            name, sep, value = item.partition(":")
            if not sep or name not in ("ttft", "tpot"):
                raise ValueError(f"bad SLO {item!r}: use ttft:MS and/or tpot:MS")
            ms = float(value)
            if ms <= 0:
                raise ValueError(f"bad SLO {item!r}: the target must be > 0 ms")
            targets[name] = ms / 1e3
        return cls(targets.get("ttft"), targets.get("tpot"))

    def __str__(self) -> str:
        parts = [f"{n}<={v * 1e3:g}ms" for n, v in (("ttft", self.ttft_s), ("tpot", self.tpot_s)) if v]
        return " ".join(parts) or "none"


def summarize_run(result: RunResult, slo: SLO | None = None) -> dict[str, Any]:
    """DESIGN section 5 metrics under vLLM's names, plus client-side checks: failures by kind
    and how many replies streamed a different number of chunks than their usage reported."""
    records = [o.record for o in result.outcomes]
    out: dict[str, Any] = summarize(records, result.duration)
    out["token_count_mismatches"] = sum(o.token_count_mismatch for o in result.outcomes)
    out["errors"] = dict(Counter(r.error.split(":")[0] for r in records if r.error))
    if slo is not None and (slo.ttft_s or slo.tpot_s):
        out["slo"] = str(slo)
        out["slo_attainment"] = slo_attainment(records, slo.ttft_s, slo.tpot_s)
        out["request_goodput"] = goodput(records, slo.ttft_s, slo.tpot_s, result.duration)
    return out


def measured_run(result: RunResult, summary: dict[str, Any]) -> MeasuredRun:
    """The run as result files hold it: ``summary``, a row per request (seconds from the
    run's start, with what only the client saw), and the server's engine steps if it said."""
    rows = [
        RequestRow.from_record(
            o.record,
            scheduled=o.scheduled,
            admitted=o.admitted,  # when the server's engine took it in (bucketserve only)
            streamed_chunks=o.chunks,
            usage_output_tokens=o.usage_tokens,
        )
        for o in result.outcomes
    ]
    return MeasuredRun(summary, rows, result.steps)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def format_table(summary: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    """A readable block in the layout of vLLM's ``bench serve``."""
    width = 50
    lines = [f" {title} ".center(width, "=")]

    def row(label: str, key: str) -> None:
        if key in summary:
            lines.append(f"{label:<40}{_fmt(summary[key]):>10}")

    row("Successful requests:", "completed")
    row("Failed requests:", "failed")
    for kind, count in summary.get("errors", {}).items():
        lines.append(f"{'  ' + kind + ':':<40}{count:>10}")
    row("Benchmark duration (s):", "duration_s")
    row("Total input tokens:", "total_input_tokens")
    row("Total generated tokens:", "total_output_tokens")
    row("Request throughput (req/s):", "request_throughput")
    row("Output token throughput (tok/s):", "output_throughput")
    row("Total token throughput (tok/s):", "total_token_throughput")
    if "slo_attainment" in summary:
        lines.append(f"{'SLO (' + summary['slo'] + '):':<40}")
        row("SLO attainment:", "slo_attainment")
        row("Request goodput (req/s):", "request_goodput")
    row("Token count mismatches (usage/stream):", "token_count_mismatches")
    for key, name in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)")):
        lines.append(f" {name} ".center(width, "-"))
        for stat in ("mean", "median", "p90", "p99"):
            row(f"{stat.capitalize()} {key.upper()} (ms):", f"{stat}_{key}_ms")
    for key, name in (("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f" {name} ".center(width, "-"))
        for stat in ("mean", "median", "p99"):
            row(f"{stat.capitalize()} {key.upper()} (ms):", f"{stat}_{key}_ms")
    lines.append("=" * width)
    return "\n".join(lines)
