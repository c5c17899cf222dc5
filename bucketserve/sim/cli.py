"""``bucketserve simulate``: one workload, the paper's experiments, trace replays, validation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bucketserve.core.policies import policy_names
from bucketserve.options import parse_bytes

WORKLOAD_CHOICES = ("alpaca", "longbench", "mixed", "azure-conv", "azure-code")


def _list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in _list(text)]


def _bytes(text: str) -> int:
    try:
        return parse_bytes(text)
    except Exception as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def add_simulate_parser(sub: Any) -> None:
    from bucketserve.sim.experiments import DEFAULT_RATES

    p = sub.add_parser(
        "simulate",
        help="simulate the scheduling policies on GPUs in virtual time",
        description="Run the core's scheduling policies, unchanged, in a discrete-event simulator "
        "with a profiled cost model (published A100 profiles for OPT-13B, or one measured by "
        "`bucketserve profile`). Without --experiment or --validate: one workload, every policy "
        "side by side.",
        formatter_class=_Help,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--experiment",
        choices=("paper", "traces"),
        help="paper: DESIGN section 6 (offline throughput, SLO attainment vs rate, load capacity, "
        "scheduling time, padding); traces: the Azure traces at their real rates on 1 and 4 GPUs",
    )
    mode.add_argument(
        "--validate",
        nargs="+",
        metavar="RESULT.json[:POLICY]",
        help="bench result files (`bucketserve bench run --output-json`) to replay with --profile "
        "and compare with measurement; :POLICY names the server's policy (else --policy)",
    )
    p.add_argument(
        "--policies", type=_list, default=",".join(policy_names()), help="comma-separated policies"
    )
    p.add_argument("--workload", choices=WORKLOAD_CHOICES, default="mixed", help="single-run workload")
    p.add_argument("--num-requests", type=int, default=1000, help="single run: requests")
    p.add_argument("--rate", type=float, default=None, help="single run: Poisson req/s (default: all at t=0)")
    p.add_argument("--seed", type=int, default=0, help="seed of lengths and arrivals")
    h = p.add_argument_group("simulated hardware")
    h.add_argument(
        "--profile",
        default="a100-distserve",
        help="cost model: a100-distserve, a100-vllm (published, OPT-13B) or a profile JSON path",
    )
    h.add_argument(
        "--num-gpus", type=int, default=4, help="GPUs (aggregated: one TP instance; distserve: halves)"
    )
    h.add_argument("--gpu-memory", type=_bytes, default=40_000_000_000, help="bytes per GPU (A100-40GB)")
    h.add_argument(
        "--link-bandwidth", type=_bytes, default=300_000_000_000, help="KV transfer bytes/s (NVLink)"
    )
    h.add_argument("--max-model-len", type=int, default=None, help="context limit (4096; traces 8192)")
    h.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once")
    h.add_argument("--max-num-batched-tokens", type=int, default=4096, help="token budget per step")
    h.add_argument(
        "--slo-scale",
        type=float,
        default=1.0,
        help="multiply the SLOs (prompts under 1000 tokens: TTFT 0.25 s, TPOT 0.1 s; longer: 2.5 s, 0.15 s)",
    )
    h.add_argument(
        "--pad-prefill",
        action="store_true",
        help="charge every policy's prefill batches padded to their longest prompt (no ragged kernels)",
    )
    e = p.add_argument_group("--experiment")
    e.add_argument(
        "--rates",
        type=_floats,
        default=",".join(f"{r:g}" for r in DEFAULT_RATES),
        help="paper: Poisson rates swept",
    )
    e.add_argument("--num-offline", type=int, default=1000, help="paper: requests per offline run")
    e.add_argument("--num-online", type=int, default=500, help="paper: requests per rate point")
    e.add_argument("--trace-limit", type=float, default=None, help="traces: keep the first SECONDS")
    e.add_argument("--output-dir", default="results/sim", help="where tables, JSON and PNGs go")
    v = p.add_argument_group("--validate (the server's settings)")
    v.add_argument(
        "--policy", choices=policy_names(), default=None, help="the server's policy, if the JSON does not say"
    )
    v.add_argument("--kv-cache-memory", type=_bytes, default=2 * 2**30, help="the server's KV pool bytes")
    v.add_argument("--block-size", type=int, default=16, help="the server's KV block size")
    v.add_argument("--server-max-num-seqs", type=int, default=128, help="the server's --max-num-seqs")
    v.add_argument("--server-max-num-batched-tokens", type=int, default=1024, help="its token budget")
    v.add_argument("--target", type=float, default=0.15, help="relative error target")
    p.set_defaults(func=cmd_simulate)


def _setup(a: argparse.Namespace, default_len: int) -> Any:
    from bucketserve.sim.experiments import Setup

    return Setup(
        profile=a.profile,
        gpu_memory=a.gpu_memory,
        num_gpus=a.num_gpus,
        max_model_len=a.max_model_len or default_len,
        link_bandwidth=a.link_bandwidth,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        slo_scale=a.slo_scale,
        pad_prefill=a.pad_prefill,
    )


def cmd_simulate(a: argparse.Namespace) -> int:
    unknown = [p for p in a.policies if p not in policy_names()]
    if unknown:
        print(
            f"bucketserve simulate: unknown policies {unknown}; choose from {', '.join(policy_names())}",
            file=sys.stderr,
        )
        return 2
    if a.validate:
        return _validate(a)
    if a.experiment == "paper":
        return _paper(a)
    if a.experiment == "traces":
        return _traces(a)
    return _single(a)


def _single(a: argparse.Namespace) -> int:
    from bucketserve.sim.experiments import requests_for, run_summary, slo_for
    from bucketserve.sim.simulator import SimRequest, simulate
    from bucketserve.workloads.traces import load_trace

    setup = _setup(a, 8192 if a.workload.startswith("azure") else 4096)
    if a.workload.startswith("azure"):
        trace = load_trace(a.workload)[: a.num_requests]
        reqs = [
            SimRequest(
                t.arrival - trace[0].arrival, t.prompt_len, t.output_len, *slo_for(t.prompt_len, a.slo_scale)
            )
            for t in trace
        ]
    else:
        reqs = requests_for(a.workload, a.num_requests, a.rate, a.seed, a.slo_scale)
    print(
        f"{len(reqs)} {a.workload} requests, {'rate ' + str(a.rate) + '/s' if a.rate else 'at their times'}"
    )
    print("| policy | setup | out tok/s | TTFT p50 (ms) | TPOT p50 (ms) | SLO att. | busy | padding |")
    print("|---|---|---|---|---|---|---|---|")
    for p in a.policies:
        r = run_summary(simulate(setup.config(p), reqs), reqs)
        print(
            f"| {p} | {setup.describe(p)} | {r['output_throughput']:.1f} | {r['p50_ttft_ms']:.0f} | "
            f"{r['p50_tpot_ms']:.1f} | {r['slo_attainment']:.3f} | {r['busy_share']:.3f} | "
            f"{r['padding_ratio']:.3f} |"
        )
    return 0


def _paper(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bucketserve.sim.experiments import WORKLOADS, paper_experiment
    from bucketserve.sim.report import paper_plots, paper_tables
    from bucketserve.wire import write_json

    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = len(WORKLOADS) * len(a.policies) * (1 + len(a.rates))
    with tqdm(total=total, desc="paper experiment", unit="run") as bar:
        data = paper_experiment(
            _setup(a, 4096), a.policies, WORKLOADS, a.rates, a.num_offline, a.num_online, a.seed, bar.update
        )
    write_json(out / "paper.json", data)
    tables = paper_tables(data)
    (out / "paper.md").write_text("# Simulated paper experiment\n\n" + tables)
    plots = paper_plots(data, out)
    print(tables)
    print(f"wrote {out / 'paper.json'}, {out / 'paper.md'}, " + ", ".join(str(p) for p in plots))
    return 0


def _traces(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bucketserve.sim.experiments import trace_experiment
    from bucketserve.sim.report import trace_tables
    from bucketserve.wire import write_json

    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    gpus = sorted({1, a.num_gpus})
    with tqdm(total=2 * len(gpus) * len(a.policies), desc="trace replay", unit="run") as bar:
        data = trace_experiment(
            _setup(a, 8192), gpu_counts=gpus, policies=a.policies, limit_s=a.trace_limit, progress=bar.update
        )
    write_json(out / "traces.json", data)
    tables = trace_tables(data)
    (out / "traces.md").write_text("# Simulated Azure trace replays\n\n" + tables)
    print(tables)
    print(f"wrote {out / 'traces.json'} and {out / 'traces.md'}")
    return 0


def _validate(a: argparse.Namespace) -> int:
    from bucketserve.sim.validate import error_table, validate_run

    rows = []
    for item in a.validate:
        # FILE:POLICY names the policy of the server that produced FILE.
        path, _, policy = (
            item.rpartition(":") if item.rpartition(":")[2] in policy_names() else (item, "", a.policy)
        )
        rows.extend(
            validate_run(
                path,
                a.profile,
                a.kv_cache_memory,
                policy=policy,
                scheduler={
                    "max_num_seqs": a.server_max_num_seqs,
                    "max_num_batched_tokens": a.server_max_num_batched_tokens,
                },
                block_size=a.block_size,
                max_model_len=a.max_model_len or 8192,
            )
        )
    print(error_table(rows, a.target))
    worst = max(abs(c.error(m)) for c in rows for m in ("output_throughput", "p50_ttft_ms", "p50_tpot_ms"))
    return 0 if worst <= a.target else 1
