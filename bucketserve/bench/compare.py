"""Run one workload against several servers in turn: ``bucketserve serve`` processes started
per policy, and/or servers already running at given URLs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bucketserve.bench.client import ClientConfig, served_model
from bucketserve.bench.servers import ServerStartError, managed_server
from bucketserve.bench.sweep import SweepPoint, capacity, run_sweep
from bucketserve.bench.workload import Workload
from bucketserve.core.policies import policy_names
from bucketserve.options import check, check_fields, option


@dataclass
class CompareConfig:
    """Which servers ``bench compare`` starts, and how (running servers are given by --url)."""

    policies: tuple[str, ...] | None = option(
        None,
        choices=policy_names,
        help="comma-separated policies to start servers for "
        f"(default: {','.join(policy_names())} unless --server or --url is given)",
    )
    server_args: str = option(
        "",
        metavar="'ARGS'",
        help="extra `bucketserve serve` arguments, one quoted string after '=', e.g. "
        "--server-args='--kv-cache-memory 2GiB --max-model-len 2048' (default: none)",
    )
    startup_timeout: float = option(300.0, help="seconds to wait for /health")

    def __post_init__(self) -> None:
        check_fields(self)
        check(self.startup_timeout > 0, f"startup_timeout must be > 0 seconds, got {self.startup_timeout}")


@dataclass(frozen=True)
class Target:
    """A server to measure: one we start (``--policy POLICY`` and/or ``args`` on top of
    --server-args), or one already running at ``url``."""

    name: str
    policy: str | None = None
    url: str | None = None
    args: tuple[str, ...] = ()

    @classmethod
    def from_server_arg(cls, text: str) -> Target:
        """'NAME=ARGS': start `bucketserve serve ARGS` (ARGS may be empty: the defaults)."""
        name, sep, args = text.partition("=")
        if not sep or not name:
            raise ValueError(f"bad --server {text!r}: use NAME='SERVE ARGS', e.g. c='--policy continuous'")
        return cls(name, args=tuple(shlex.split(args)))

    @classmethod
    def from_url_arg(cls, text: str) -> Target:
        """'NAME=URL' (or just URL, named by itself)."""
        name, sep, url = text.partition("=")
        if not sep:
            name, url = text, text
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"bad --url {text!r}: use NAME=http://HOST:PORT")
        return cls(name, url=url.rstrip("/"))


def run_compare(
    targets: Sequence[Target],
    workload: Workload,
    rates: Sequence[float],
    client: ClientConfig,
    server_args: Sequence[str] = (),
    log_dir: Path | None = None,
    startup_timeout: float = 300.0,
    **sweep_kwargs: object,
) -> dict[str, list[SweepPoint]]:
    """For each target in order: start its server unless it has a URL (one that fails to start
    is reported and skipped; none at all raises ServerStartError), run the sweep over
    ``rates`` (one rate = one run), stop the server. ``client.model`` empty = ask the server."""
    curves: dict[str, list[SweepPoint]] = {}
    for target in targets:
        if target.url is None:
            log = log_dir / f"server-{target.name}.log" if log_dir else None
            server = managed_server(target.policy, [*server_args, *target.args], log, startup_timeout)
        else:
            server = contextlib.nullcontext(target.url)
        with contextlib.ExitStack() as stack:
            try:
                url = stack.enter_context(server)
            except ServerStartError as e:  # the others are still measured
                print(f"{target.name}: not measured: {e}", file=sys.stderr)
                continue
            assert url is not None
            cfg = dataclasses.replace(
                client, base_url=url, model=client.model or served_model(url, client.api_key)
            )
            curves[target.name] = asyncio.run(
                run_sweep(workload, rates, cfg, label=target.name, **sweep_kwargs)  # type: ignore[arg-type]
            )
    if not curves:
        raise ServerStartError("no server could be measured")
    return curves


def format_compare_table(curves: dict[str, Sequence[SweepPoint]], target: float) -> str:
    """One row per server and rate; a load-capacity line per server when an SLO was set."""
    cols = [
        ("server", 12, None),
        ("rate", 6, "request_rate"),
        ("ok/fail", 8, None),
        ("req/s", 7, "request_throughput"),
        ("out tok/s", 9, "output_throughput"),
        ("TTFT p50", 9, "median_ttft_ms"),
        ("TTFT p99", 9, "p99_ttft_ms"),
        ("TPOT p50", 9, "median_tpot_ms"),
        ("TPOT p99", 9, "p99_tpot_ms"),
        ("E2E p50", 9, "median_e2el_ms"),
        ("SLO att.", 8, "slo_attainment"),
    ]
    lines = [" ".join(f"{name:>{w}}" for name, w, _ in cols), "(latencies in ms)"]
    for name, points in curves.items():
        for p in points:
            s = p.summary
            cells = []
            for col, w, key in cols:
                if col == "server":
                    cells.append(f"{name[:w]:>{w}}")
                elif col == "ok/fail":
                    cells.append(f"{s['completed']}/{s['failed']:<3}".rjust(w))
                else:
                    v = s.get(key, math.nan)
                    cells.append(f"{'n/a' if v is None or math.isnan(v) else f'{v:.2f}':>{w}}")
            lines.append(" ".join(cells))
    lines += _class_lines(curves)
    caps = {n: capacity(pts, target) for n, pts in curves.items()}
    swept = any(
        sum("slo_attainment" in p.summary and math.isfinite(p.rate) for p in pts) >= 2
        for pts in curves.values()
    )
    if swept:  # a load capacity needs an SLO and at least two finite rates
        lines.append(f"load capacity at {target:.0%} SLO attainment (req/s, interpolated):")
        for n, c in caps.items():
            top = max((p.rate for p in curves[n] if math.isfinite(p.rate)), default=math.nan)
            text = "below the lowest rate" if math.isnan(c) else f"{c:.3g}"
            lines.append(f"  {n}: {'>= ' if c == top else ''}{text}")
    return "\n".join(lines)


def _class_lines(curves: dict[str, Sequence[SweepPoint]]) -> list[str]:
    """Per SLO length class (``--slo-classes``), where the runs were held to classes."""
    rows = [(n, p) for n, pts in curves.items() for p in pts if "slo_classes" in p.summary]
    if not rows:
        return []
    lines = [
        "by length class:",
        f"{'server':>12} {'rate':>6} {'class':>8} {'reqs':>5} {'SLO att.':>8} "
        f"{'TTFT p99':>9} {'TPOT p50':>9}",
    ]
    for name, p in rows:
        for label, c in p.summary["slo_classes"].items():
            cells = ["n/a" if math.isnan(c[k]) else f"{c[k]:.2f}" for k in ("p99_ttft_ms", "median_tpot_ms")]
            lines.append(
                f"{name[:12]:>12} {p.rate:>6.2f} {label:>8} {c['requests']:>5} {c['slo_attainment']:>8.2f} "
                f"{cells[0]:>9} {cells[1]:>9}"
            )
    return lines
