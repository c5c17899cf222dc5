"""``bucketserve bench run | sweep | compare``: the command line of the benchmark client."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shlex
from pathlib import Path
from typing import Any

from bucketserve.bench.datasets import DATASETS
from bucketserve.core.policies import policy_names

DEFAULT_URL = "http://127.0.0.1:8000"


class Fmt(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, [], "") or isinstance(action.default, bool):
            return text
        return super()._get_help_string(action) or text


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        default="sharegpt",
        help="sharegpt: real ShareGPT prompts and reply lengths (vLLM's filters); azure-conv / "
        "azure-code: the real Azure 2023 traces (arrival times and lengths; text cut from ShareGPT); "
        "alpaca-like, longbench-like, mixed, fixed, uniform: SYNTHETIC lengths with ShareGPT text",
    )
    g.add_argument("--num-prompts", type=int, default=100, help="requests to send (a trace: its first N)")
    g.add_argument("--seed", type=int, default=0, help="seed for sampling, text and arrivals")
    g.add_argument(
        "--tokenizer",
        default=None,
        help="Hugging Face folder whose tokenizer counts tokens; must match the served model "
        "(default: the embedded SmolLM2-135M-Instruct's)",
    )
    g.add_argument("--max-prompt-len", type=int, default=1024, help="longest prompt in tokens")
    g.add_argument(
        "--max-output-len",
        type=int,
        default=None,
        help="cap on max_tokens per request (default: none, the dataset's length)",
    )
    g.add_argument(
        "--max-total-len",
        type=int,
        default=2048,
        help="prompt + output cap (sharegpt drops longer pairs; others cut the output); "
        "keep it <= the server's --max-model-len",
    )
    g.add_argument(
        "--prompt-len", type=int, default=128, help="fixed/uniform: prompt tokens (uniform: N/2..N)"
    )
    g.add_argument(
        "--output-len", type=int, default=128, help="fixed/uniform: output tokens (uniform: N/2..N)"
    )
    g.add_argument("--long-fraction", type=float, default=0.5, help="mixed: share of longbench-like requests")


def _arrival_args(p: argparse.ArgumentParser, sweep: bool, default_rates: str | None = None) -> None:
    """Single runs take one rate (or a trace time scale); sweeps and comparisons a list of rates
    (required when ``default_rates`` is None)."""
    g = p.add_argument_group("arrivals")
    if sweep:
        g.add_argument(
            "--request-rates",
            default=default_rates,
            required=default_rates is None,
            metavar="R,R,...",
            help="request rates to run, comma-separated, req/s; inf = all at once. A trace keeps "
            "its arrival pattern, rescaled to each mean rate",
        )
    else:
        g.add_argument(
            "--request-rate",
            type=_positive_float,
            default=None,
            help="mean requests/s (Poisson, or gamma with --burstiness); inf or unset = all at once. "
            "For a trace: rescale its arrivals to this mean rate (default: unset; a trace then replays "
            "with --time-scale)",
        )
        g.add_argument(
            "--time-scale",
            type=float,
            default=1.0,
            help="trace replay: multiply the trace's arrival times (0.5 = twice as fast)",
        )
    g.add_argument(
        "--burstiness",
        type=_positive_float,
        default=1.0,
        help="gamma shape of the inter-arrival times: 1 = Poisson, < 1 burstier, > 1 steadier",
    )
    g.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)"
    )


def _client_args(p: argparse.ArgumentParser, url: bool = True) -> None:
    g = p.add_argument_group("client")
    if url:
        g.add_argument("--base-url", default=DEFAULT_URL, help="the server, without /v1")
    g.add_argument(
        "--api",
        choices=("completions", "chat"),
        default="completions",
        help="/v1/completions or /v1/chat/completions",
    )
    g.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    g.add_argument(
        "--api-key",
        default=None,
        help="bearer token (default: $BUCKETSERVE_API_KEY or $OPENAI_API_KEY, else none)",
    )
    g.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=600.0,
        help="seconds per request before it counts as failed",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent")
    g.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let the model stop at EOS (default: send ignore_eos=true, so each request generates "
        "exactly its output length)",
    )
    g.add_argument(
        "--priority",
        type=int,
        default=None,
        help="send this priority (lower first) with every request (default: not sent)",
    )
    g.add_argument(
        "--ttft-slo-ms",
        type=float,
        default=None,
        help="send this TTFT SLO with every request (default: not sent)",
    )
    g.add_argument(
        "--tpot-slo-ms",
        type=float,
        default=None,
        help="send this TPOT SLO with every request (default: not sent)",
    )


def _report_args(p: argparse.ArgumentParser, out_dir: bool) -> None:
    g = p.add_argument_group("report")
    g.add_argument(
        "--goodput",
        nargs="+",
        default=[],
        metavar="KEY:MS",
        help="SLO targets for goodput and attainment, e.g. --goodput ttft:2000 tpot:200 (default: none)",
    )
    if out_dir:
        g.add_argument(
            "--target-attainment",
            type=float,
            default=0.8,
            help="load capacity = highest rate with this attainment",
        )
        g.add_argument("--output-dir", default="bench-results", help="where the JSON and PNG go")
        g.add_argument("--name", default=None, help="file name stem (default: <command>-<dataset>)")
    else:
        g.add_argument(
            "--output-json",
            default=None,
            help="write config, summary and per-request records here (default: not written)",
        )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


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
        formatter_class=Fmt,
        description="Send one workload to one server and report its metrics.",
    )
    _client_args(run)
    _workload_args(run)
    _arrival_args(run, sweep=False)
    _report_args(run, out_dir=False)
    run.set_defaults(func=cmd_run)

    sw = bsub.add_parser(
        "sweep",
        help="SLO attainment and latency against the request rate",
        formatter_class=Fmt,
        description="Run the same requests at several rates against one server; report SLO attainment "
        "per rate and the load capacity; plot them.",
    )
    _client_args(sw)
    _workload_args(sw)
    _arrival_args(sw, sweep=True)
    _report_args(sw, out_dir=True)
    sw.set_defaults(func=cmd_sweep)

    cmp = bsub.add_parser(
        "compare",
        help="the same workload against several servers or policies",
        formatter_class=Fmt,
        description="Start one `bucketserve serve` per --policies entry (one at a time, on a free loopback "
        "port) and/or use running servers given by --url; run the same workload against each in turn; "
        "print one table; write one JSON and one PNG. Servers it started are always stopped.",
    )
    t = cmp.add_argument_group("servers")
    t.add_argument(
        "--policies",
        default=None,
        help="comma-separated policies to start servers for "
        f"(default: {','.join(policy_names())} unless --url is given)",
    )
    t.add_argument(
        "--url",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="a running server to measure, named NAME (repeatable; default: none)",
    )
    t.add_argument(
        "--server-args",
        default="",
        metavar="'ARGS'",
        help="extra `bucketserve serve` arguments, one quoted string after '=', e.g. "
        "--server-args='--kv-cache-memory 2GiB --max-model-len 2048' (default: none)",
    )
    t.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /health")
    _client_args(cmp, url=False)
    _workload_args(cmp)
    _arrival_args(cmp, sweep=True, default_rates="inf")
    _report_args(cmp, out_dir=True)
    cmp.set_defaults(func=cmd_compare)


# -- commands ------------------------------------------------------------------------------


def _slo(a: argparse.Namespace) -> Any:
    from bucketserve.bench.report import SLO

    try:
        return SLO.parse(a.goodput)
    except ValueError as e:
        raise SystemExit(f"bucketserve bench: error: {e}") from None


def _client(a: argparse.Namespace, base_url: str = "") -> Any:
    from bucketserve.bench.client import ClientConfig

    extra = {
        k: v
        for k, v in (("priority", a.priority), ("ttft_slo_ms", a.ttft_slo_ms), ("tpot_slo_ms", a.tpot_slo_ms))
        if v is not None
    }
    return ClientConfig(
        base_url=base_url,
        model=a.model or "",
        api=a.api,
        ignore_eos=a.ignore_eos,
        temperature=a.temperature,
        request_timeout=a.request_timeout,
        api_key=a.api_key or os.environ.get("BUCKETSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        extra_body=extra,
    )


def _workload(a: argparse.Namespace) -> Any:
    from bucketserve.bench.datasets import load_tokenizer
    from bucketserve.bench.workload import build_workload

    return build_workload(
        a.dataset,
        a.num_prompts,
        load_tokenizer(a.tokenizer),
        seed=a.seed,
        max_prompt_len=a.max_prompt_len,
        max_output_len=a.max_output_len,
        max_total_len=a.max_total_len,
        prompt_len=a.prompt_len,
        output_len=a.output_len,
        long_fraction=a.long_fraction,
    )


def _config(a: argparse.Namespace) -> dict[str, Any]:
    skip = {"func", "api_key"}
    return {k: v for k, v in vars(a).items() if k not in skip}


def _rates(a: argparse.Namespace) -> list[float]:
    from bucketserve.bench.sweep import parse_rates

    try:
        return parse_rates(a.request_rates)
    except ValueError as e:
        raise SystemExit(f"bucketserve bench: error: {e}") from None


def _stem(a: argparse.Namespace, kind: str) -> Path:
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / (a.name or f"{kind}-{a.dataset}")


def cmd_run(a: argparse.Namespace) -> int:
    from bucketserve.bench.client import served_model
    from bucketserve.bench.report import format_table, measured_run, summarize_run
    from bucketserve.bench.runner import run_workload
    from bucketserve.wire import write_json

    _quiet_http_logs()
    slo = _slo(a)
    cfg = _client(a, a.base_url.rstrip("/"))
    cfg.model = cfg.model or served_model(cfg.base_url, cfg.api_key)
    workload = _workload(a)
    rate = None if a.request_rate is None or math.isinf(a.request_rate) else a.request_rate
    arrivals = workload.arrivals(rate, a.burstiness, a.time_scale, a.seed)
    result = asyncio.run(run_workload(workload.requests, arrivals, cfg, a.max_concurrency, a.progress))
    summary = summarize_run(result, slo)
    print(format_table(summary))
    if a.output_json:
        config = {**_config(a), "model": cfg.model}
        write_json(a.output_json, {"config": config, **measured_run(result, summary).to_dict()})
        print(f"wrote {a.output_json}")
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
    slo, rates = _slo(a), _rates(a)
    cfg = _client(a, a.base_url.rstrip("/"))
    cfg.model = cfg.model or served_model(cfg.base_url, cfg.api_key)
    workload = _workload(a)
    points = asyncio.run(
        run_sweep(workload, rates, cfg, slo, a.burstiness, a.seed, a.max_concurrency, a.progress, "sweep")
    )
    name = a.base_url
    print(format_compare_table({name: points}, a.target_attainment))
    stem = _stem(a, "sweep")
    cap = capacity(points, a.target_attainment)
    config = {**_config(a), "model": cfg.model}
    write_json(f"{stem}.json", {"config": config, "load_capacity": cap, "points": _points_json(points)})
    plot_sweeps({name: points}, f"{stem}.png", a.target_attainment, f"{a.dataset}, SLO {slo}")
    print(f"wrote {stem}.json and {stem}.png")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from bucketserve.bench.compare import Target, format_compare_table, run_compare
    from bucketserve.bench.sweep import capacity, plot_sweeps
    from bucketserve.wire import write_json

    _quiet_http_logs()
    slo, rates = _slo(a), _rates(a)
    try:
        urls = [Target.from_url_arg(u) for u in a.url]
    except ValueError as e:
        raise SystemExit(f"bucketserve bench: error: {e}") from None
    policies = a.policies if a.policies is not None else ("" if urls else ",".join(policy_names()))
    targets = [Target(p, policy=p) for p in policies.split(",") if p] + urls
    if not targets:
        raise SystemExit("bucketserve bench: error: nothing to compare: give --policies and/or --url")
    stem = _stem(a, "compare")
    workload = _workload(a)
    curves = run_compare(
        targets,
        workload,
        rates,
        _client(a),
        server_args=shlex.split(a.server_args),
        log_dir=stem.parent,
        startup_timeout=a.startup_timeout,
        slo=slo,
        burstiness=a.burstiness,
        seed=a.seed,
        max_concurrency=a.max_concurrency,
        progress=a.progress,
    )
    print(format_compare_table(curves, a.target_attainment))
    write_json(
        f"{stem}.json",
        {
            "config": _config(a),
            "servers": {
                n: {"load_capacity": capacity(pts, a.target_attainment), "points": _points_json(pts)}
                for n, pts in curves.items()
            },
        },
    )
    plot_sweeps(curves, f"{stem}.png", a.target_attainment, f"{a.dataset}, SLO {slo}")
    print(f"wrote {stem}.json and {stem}.png")
    return 0
