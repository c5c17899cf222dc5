"""``bucketserve bench run | sweep | compare``: the command line of the benchmark client.

The options are generated from the configs of the jobs they configure
(``bucketserve.argparse_options``): ``ClientConfig`` (bench/client.py), ``WorkloadConfig`` and
``ArrivalConfig`` (bench/workload.py), ``SweepConfig`` (bench/sweep.py), ``ReportConfig``
(bench/report.py) and ``CompareConfig`` (bench/compare.py). Only ``--goodput`` (vLLM's
``KEY:MS`` list) and ``compare --url`` / ``--server`` (repeatable) are written here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bucketserve.argparse_options import add_config_options, config_from_options
from bucketserve.bench.client import ClientConfig
from bucketserve.bench.compare import CompareConfig, Target
from bucketserve.bench.report import SLO, ReportConfig
from bucketserve.bench.sweep import SweepConfig
from bucketserve.bench.workload import ArrivalConfig, WorkloadConfig
from bucketserve.errors import ConfigError

# A run takes one rate (or a trace's time scale); a sweep and a comparison take a list.
RUN_ONLY_ARRIVALS = ("request_rate", "time_scale")
RUN_ONLY_REPORT = ("output_json",)


def _client_options(p: argparse.ArgumentParser, url: bool = True) -> None:
    # compare measures the servers it starts or the --url ones: no --base-url there.
    add_config_options(p.add_argument_group("client"), ClientConfig, exclude=() if url else ("base_url",))


def _workload_options(p: argparse.ArgumentParser) -> None:
    add_config_options(p.add_argument_group("workload"), WorkloadConfig)


def _arrival_options(
    p: argparse.ArgumentParser, sweep: bool, default_rates: tuple[float, ...] | None = None
) -> None:
    """A run's rate or time scale; a sweep's or comparison's rates instead (required where
    ``default_rates`` is None)."""
    group = p.add_argument_group("arrivals")
    add_config_options(group, ArrivalConfig, exclude=RUN_ONLY_ARRIVALS if sweep else ())
    if sweep:
        defaults = {} if default_rates is None else {"request_rates": default_rates}
        sweep_output = ("target_attainment", "output_dir", "name")  # in the report group
        add_config_options(group, SweepConfig, exclude=sweep_output, defaults=defaults)


def _report_options(p: argparse.ArgumentParser, sweep: bool) -> None:
    g = p.add_argument_group("report")
    g.add_argument(
        "--goodput",
        nargs="+",
        type=_checked(lambda item: SLO.parse([item])),  # SLO.parse reads the whole list
        default=[],
        metavar="KEY:MS",
        help="SLO targets for goodput and attainment, e.g. --goodput ttft:2000 tpot:200 (default: none; "
        "--slo-classes sets them by prompt length)",
    )
    add_config_options(g, ReportConfig, exclude=RUN_ONLY_REPORT if sweep else ())
    if sweep:
        add_config_options(g, SweepConfig, exclude=("request_rates", "warmup_requests"))


def _quiet_http_logs() -> None:
    # httpx logs every request at INFO: thousands of lines over a progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def add_bench_parser(sub: Any) -> None:
    """Register ``bench`` and its subcommands on the top-level subparsers."""
    bench = sub.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible server (run, sweep, compare)",
        description="Measure any OpenAI-compatible server: TTFT, TPOT, ITL, E2E latency, throughput, "
        "SLO attainment, goodput and load capacity, with vLLM's metric names.",
    )
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")

    run = bsub.add_parser(
        "run",
        help="one run against one server",
        description="Send one workload to one server and report its metrics.",
    )
    _client_options(run)
    _workload_options(run)
    _arrival_options(run, sweep=False)
    _report_options(run, sweep=False)
    run.set_defaults(func=cmd_run)

    sw = bsub.add_parser(
        "sweep",
        help="SLO attainment and latency against the request rate",
        description="Run the same requests at several rates against one server; report SLO attainment "
        "per rate and the load capacity; plot them.",
    )
    _client_options(sw)
    _workload_options(sw)
    _arrival_options(sw, sweep=True)
    _report_options(sw, sweep=True)
    sw.set_defaults(func=cmd_sweep)

    cmp = bsub.add_parser(
        "compare",
        help="the same workload against several servers or policies",
        description="Start one `bucketserve serve` per --policies or --server entry (on free loopback "
        "ports) and/or use running servers given by --url; run the same workload against each, server "
        "by server or (--interleave) rate by rate; print one table; write one JSON and one PNG. "
        "Servers it started are always stopped.",
    )
    t = cmp.add_argument_group("servers")
    add_config_options(t, CompareConfig)
    t.add_argument(
        "--url",
        action="append",
        type=_checked(Target.from_url_arg),
        default=[],
        metavar="NAME=URL",
        help="a running server to measure, named NAME (repeatable; default: none)",
    )
    t.add_argument(
        "--server",
        action="append",
        type=_checked(Target.from_server_arg),
        default=[],
        metavar="NAME='ARGS'",
        help="start `bucketserve serve ARGS` (after --server-args) and measure it as NAME, e.g. "
        "--server c2048='--policy continuous --max-num-batched-tokens 2048' (repeatable; default: none)",
    )
    _client_options(cmp, url=False)
    _workload_options(cmp)
    _arrival_options(cmp, sweep=True, default_rates=(math.inf,))
    _report_options(cmp, sweep=True)
    cmp.set_defaults(func=cmd_compare)


def _checked(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse ``type=`` that checks one value with ``parse`` as it is read (its ValueError
    shown as argparse's one-line error) and keeps the text as given, for the result file."""

    def read(text: str) -> str:
        try:
            parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return read


# -- commands ------------------------------------------------------------------------------


def _client(a: argparse.Namespace, base_url: str = "") -> ClientConfig:
    """The client options; without ``--base-url`` (compare), ``base_url`` as given."""
    given = {} if hasattr(a, "base_url") else {"base_url": base_url}
    cfg = config_from_options(ClientConfig, a, **given)
    cfg.api_key = cfg.api_key or os.environ.get("BUCKETSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    cfg.base_url = cfg.base_url.rstrip("/")
    return cfg


def _arrivals(a: argparse.Namespace, sweep: bool) -> ArrivalConfig:
    return config_from_options(ArrivalConfig, a, exclude=RUN_ONLY_ARRIVALS if sweep else ())


def _config(a: argparse.Namespace) -> dict[str, Any]:
    """The options as given, for the result file (the API key left out)."""
    skip = {"func", "api_key"}
    return {k: v for k, v in vars(a).items() if k not in skip}


def _stem(sweep: SweepConfig, dataset: str, kind: str) -> Path:
    out = Path(sweep.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / (sweep.name or f"{kind}-{dataset}")


def cmd_run(a: argparse.Namespace) -> int:
    from bucketserve.bench.client import served_model
    from bucketserve.bench.report import format_table, measured_run, summarize_run
    from bucketserve.bench.runner import run_workload
    from bucketserve.wire import write_json

    _quiet_http_logs()
    slo = SLO.parse(a.goodput, a.slo_classes)
    cfg, workload_config = _client(a), config_from_options(WorkloadConfig, a)
    arrival, report = _arrivals(a, sweep=False), config_from_options(ReportConfig, a)
    cfg.model = cfg.model or served_model(cfg.base_url, cfg.api_key)
    workload = workload_config.build()
    # inf, like unset, sends everything at once; a trace then replays at --time-scale.
    rate = None if arrival.request_rate is None or math.isinf(arrival.request_rate) else arrival.request_rate
    arrivals = workload.arrivals(rate, arrival.burstiness, arrival.time_scale, workload_config.seed)
    result = asyncio.run(
        run_workload(workload.requests, arrivals, cfg, arrival.max_concurrency, report.progress)
    )
    summary = summarize_run(result, slo)
    print(format_table(summary))
    if report.output_json:
        config = {**_config(a), "model": cfg.model}
        write_json(report.output_json, {"config": config, **measured_run(result, summary).to_dict()})
        print(f"wrote {report.output_json}")
    return 0 if summary["completed"] else 1


def _points_json(points: list[Any]) -> list[dict[str, Any]]:
    from bucketserve.bench.report import measured_run

    return [{"request_rate": p.rate, **measured_run(p.result, p.summary).to_dict()} for p in points]


def cmd_sweep(a: argparse.Namespace) -> int:
    from bucketserve.bench.client import served_model
    from bucketserve.bench.compare import format_compare_table
    from bucketserve.bench.sweep import capacity, plot_sweeps, run_sweep
    from bucketserve.wire import write_json

    _quiet_http_logs()
    slo = SLO.parse(a.goodput, a.slo_classes)
    cfg, workload_config = _client(a), config_from_options(WorkloadConfig, a)
    arrival, sweep = _arrivals(a, sweep=True), config_from_options(SweepConfig, a)
    report = config_from_options(ReportConfig, a, exclude=RUN_ONLY_REPORT)
    cfg.model = cfg.model or served_model(cfg.base_url, cfg.api_key)
    workload = workload_config.build()
    points = asyncio.run(
        run_sweep(
            workload,
            sweep.request_rates,
            cfg,
            slo,
            arrival.burstiness,
            workload_config.seed,
            arrival.max_concurrency,
            report.progress,
            "sweep",
            sweep.warmup_requests,
        )
    )
    name = cfg.base_url
    print(format_compare_table({name: points}, sweep.target_attainment))
    stem = _stem(sweep, workload_config.dataset, "sweep")
    cap = capacity(points, sweep.target_attainment)
    config = {**_config(a), "model": cfg.model}
    write_json(f"{stem}.json", {"config": config, "load_capacity": cap, "points": _points_json(points)})
    plot_sweeps(
        {name: points}, f"{stem}.png", sweep.target_attainment, f"{workload_config.dataset}, SLO {slo}"
    )
    print(f"wrote {stem}.json and {stem}.png")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from bucketserve.bench.compare import (
        compare_targets,
        format_compare_table,
        format_repeats_table,
        format_step_table,
        pooled_capacities,
        run_compare,
    )
    from bucketserve.bench.sweep import capacity, plot_sweeps
    from bucketserve.wire import write_json

    _quiet_http_logs()
    slo = SLO.parse(a.goodput, a.slo_classes)
    compare, workload_config = config_from_options(CompareConfig, a), config_from_options(WorkloadConfig, a)
    arrival, sweep = _arrivals(a, sweep=True), config_from_options(SweepConfig, a)
    report = config_from_options(ReportConfig, a, exclude=RUN_ONLY_REPORT)
    targets = compare_targets(compare.policies, a.server, a.url)
    names = [t.name for t in targets]
    if not targets:
        raise ConfigError("nothing to compare: give --policies, --server and/or --url")
    if len(set(names)) < len(names):
        raise ConfigError(f"two servers share a name: {', '.join(names)}")
    if any("#" in n for n in names):
        raise ConfigError(f"server names must not contain '#' (rounds are named NAME#R): {', '.join(names)}")
    stem = _stem(sweep, workload_config.dataset, "compare")
    workload = workload_config.build()
    curves = run_compare(
        targets,
        workload,
        sweep.request_rates,
        _client(a),
        server_args=shlex.split(compare.server_args),
        log_dir=stem.parent,
        startup_timeout=compare.startup_timeout,
        interleave=compare.interleave,
        rounds=compare.rounds,
        slo=slo,
        burstiness=arrival.burstiness,
        seed=workload_config.seed,
        max_concurrency=arrival.max_concurrency,
        progress=report.progress,
        warmup_requests=sweep.warmup_requests,
    )
    print(format_compare_table(curves, sweep.target_attainment))
    if repeats := format_repeats_table(curves):
        print(repeats)
    if steps := format_step_table(curves):
        print(steps)
    write_json(
        f"{stem}.json",
        {
            "config": _config(a),
            "servers": {
                n: {"load_capacity": capacity(pts, sweep.target_attainment), "points": _points_json(pts)}
                for n, pts in curves.items()
            },
            # each server's capacity from its attainment averaged over the rounds (--rounds > 1)
            "pooled_load_capacity": pooled_capacities(curves, sweep.target_attainment),
        },
    )
    plot_sweeps(curves, f"{stem}.png", sweep.target_attainment, f"{workload_config.dataset}, SLO {slo}")
    print(f"wrote {stem}.json and {stem}.png")
    return 0
