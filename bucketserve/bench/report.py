"""Summaries, the printed table and the result-file record of a benchmark run."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bucketserve.bench.runner import RunResult
from bucketserve.core.ordering import SloClass, parse_slo_classes
from bucketserve.metrics import RequestRecord, goodput, percentile, slo_attainment, slo_misses, summarize
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
    slo_classes: tuple[str, ...] = option(
        (),
        name="slo-classes",
        metavar="LEN:TTFT:TPOT,...",
        help="targets by prompt length, in seconds, as `serve --slo-classes` reads them: a request "
        "of at most LEN prompt tokens is held to the first class that holds it (TPOT may be -); "
        "longer ones to --goodput. Adds each class's attainment and p99 TTFT to the report",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        parse_slo_classes(self.slo_classes)  # a one-line error now, not after the run


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds; None = not checked. ``classes`` hold targets by prompt
    length (the first class that holds a prompt applies); longer prompts get the flat ones."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    classes: tuple[SloClass, ...] = ()

    @classmethod
    def parse(cls, items: list[str], classes: tuple[str, ...] = ()) -> SLO:
        """From vLLM's ``--goodput`` syntax: ``ttft:MS tpot:MS`` (either or both; e2el is refused),
        and ``--slo-classes`` (``LEN:TTFT:TPOT`` in seconds, as the server reads them)."""
        targets: dict[str, float] = {}
        for item in items:
            name, sep, value = item.partition(":")
            if not sep or name not in ("ttft", "tpot"):
                raise ValueError(f"bad SLO {item!r}: use ttft:MS and/or tpot:MS")
            ms = float(value)
            if ms <= 0:
                raise ValueError(f"bad SLO {item!r}: the target must be > 0 ms")
            targets[name] = ms / 1e3
        return cls(targets.get("ttft"), targets.get("tpot"), parse_slo_classes(classes))

    @property
    def is_set(self) -> bool:
        return bool(self.ttft_s or self.tpot_s or self.classes)

    def targets(self, prompt_tokens: int) -> tuple[float | None, float | None]:
        """(TTFT, TPOT) targets in seconds of a request with this many prompt tokens."""
        for c in self.classes:
            if prompt_tokens <= c.max_prompt:
                return c.ttft_s, c.tpot_s
        return self.ttft_s, self.tpot_s

    def of(self, record: RequestRecord) -> tuple[float | None, float | None]:
        """The targets ``record`` is held to (``metrics.Targets``)."""
        return self.targets(record.prompt_tokens)

    def __str__(self) -> str:
        def flat(ttft: float | None, tpot: float | None) -> str:
            parts = [f"{n}<={v * 1e3:g}ms" for n, v in (("ttft", ttft), ("tpot", tpot)) if v]
            return " ".join(parts) or "none"

        if not self.classes:
            return flat(self.ttft_s, self.tpot_s)
        parts = [f"<={c.max_prompt}: {flat(c.ttft_s, c.tpot_s)}" for c in self.classes]
        return "; ".join([*parts, f"longer: {flat(self.ttft_s, self.tpot_s)}"])


def class_label(slo: SLO, prompt_tokens: int) -> str:
    """The name of the length class that holds a prompt: "<=256", ..., or "longer"."""
    return next((f"<={c.max_prompt}" for c in slo.classes if prompt_tokens <= c.max_prompt), "longer")


def class_summaries(records: list[RequestRecord], slo: SLO) -> dict[str, dict[str, Any]]:
    """Per length class: requests, SLO attainment, p99 TTFT and p50 TPOT (ms, completed ones),
    and ``missed``: the misses by cause (``metrics.slo_misses``)."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(class_label(slo, r.prompt_tokens), []).append(r)
    out = {}
    labels = [f"<={c.max_prompt}" for c in slo.classes] + ["longer"]  # short to long
    for label, group in sorted(groups.items(), key=lambda item: labels.index(item[0])):
        ok = [r for r in group if r.ok]
        out[label] = {
            "requests": len(group),
            "slo_attainment": slo_attainment(group, slo.of),
            "p99_ttft_ms": percentile([r.ttft * 1e3 for r in ok], 99),
            "median_tpot_ms": percentile([r.tpot * 1e3 for r in ok if r.output_tokens > 1], 50),
            "missed": slo_misses(group, slo.of),
        }
    return out


def summarize_run(result: RunResult, slo: SLO | None = None) -> dict[str, Any]:
    """DESIGN section 5 metrics under vLLM's names, plus client-side checks: failures by kind
    and how many replies streamed a different number of chunks than their usage reported."""
    records = [o.record for o in result.outcomes]
    out: dict[str, Any] = summarize(records, result.duration)
    out["token_count_mismatches"] = sum(o.token_count_mismatch for o in result.outcomes)
    out["errors"] = dict(Counter(r.error.split(":")[0] for r in records if r.error))
    if slo is not None and slo.is_set:
        out["slo"] = str(slo)
        out["slo_attainment"] = slo_attainment(records, slo.of)
        out["request_goodput"] = goodput(records, slo.of, result.duration)
        if slo.classes:
            out["slo_classes"] = class_summaries(records, slo)
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
