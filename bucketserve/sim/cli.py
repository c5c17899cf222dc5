"""``bucketserve simulate``: one workload, the paper's experiments, trace replays, validation.

The options are generated from the configs they build (``bucketserve.argparse_options``):
``SimulateConfig``, ``Setup`` (the simulated hardware) and ``ExperimentConfig``
(sim/experiments.py), ``ValidateConfig`` (sim/validate.py). Written here: the mode
(``--experiment``, ``--validate``) and ``--max-model-len``, whose default depends on the mode.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bucketserve.argparse_options import add_config_options, config_from_options
from bucketserve.core.policies import policy_names
from bucketserve.sim.experiments import ExperimentConfig, Setup, SimulateConfig
from bucketserve.sim.validate import ValidateConfig

# --max-model-len when not given: the paper's setting, the traces' longer context, and the
# embedded SmolLM2's context length for a replay of our server.
MAX_MODEL_LEN = 4096
TRACE_MAX_MODEL_LEN = 8192
VALIDATE_MAX_MODEL_LEN = 8192


def add_simulate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate the scheduling policies on GPUs in virtual time",
        description="Run the core's scheduling policies, unchanged, in a discrete-event simulator "
        "with a profiled cost model (published A100 profiles for OPT-13B, or one measured by "
        "`bucketserve profile`). Without --experiment or --validate: one workload, every policy "
        "side by side.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--experiment",
        choices=("paper", "traces", "topologies"),
        help="paper: DESIGN section 6 (offline throughput, SLO attainment vs rate, load capacity, "
        "scheduling time, padding); traces: the Azure traces at their real rates on 1 and 4 GPUs; "
        "topologies: --num-gpus as one engine, two replicas (least loaded, length bands) or a "
        "prefill and a decode instance, over the rates, with the first of --policies "
        "(default: neither, one workload)",
    )
    mode.add_argument(
        "--validate",
        nargs="+",
        metavar="RESULT.json[:POLICY]",
        help="bench result files (`bucketserve bench run --output-json`) to replay with --profile "
        "and compare with measurement; :POLICY names the server's policy, else --policy (default: none)",
    )
    add_config_options(p, SimulateConfig)
    h = p.add_argument_group("simulated hardware")
    add_config_options(h, Setup)
    h.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help=f"context limit (default: {MAX_MODEL_LEN}; traces {TRACE_MAX_MODEL_LEN}; "
        f"--validate {VALIDATE_MAX_MODEL_LEN}, the embedded model's)",
    )
    add_config_options(p.add_argument_group("--experiment"), ExperimentConfig)
    add_config_options(p.add_argument_group("--validate (the server's settings)"), ValidateConfig)
    p.set_defaults(func=cmd_simulate)


def _setup(a: argparse.Namespace, default_len: int) -> Setup:
    return config_from_options(Setup, a, max_model_len=a.max_model_len or default_len)


def cmd_simulate(a: argparse.Namespace) -> int:
    run = config_from_options(SimulateConfig, a)  # checks --policies whatever the mode
    if a.validate:
        return _validate(a, config_from_options(ValidateConfig, a))
    if a.experiment == "paper":
        return _paper(a, run, config_from_options(ExperimentConfig, a))
    if a.experiment == "traces":
        return _traces(a, run, config_from_options(ExperimentConfig, a))
    if a.experiment == "topologies":
        return _topologies(a, run, config_from_options(ExperimentConfig, a))
    return _single(a, run)


def _single(a: argparse.Namespace, run: SimulateConfig) -> int:
    from bucketserve.sim.experiments import TRACES, requests_for, run_summary, slo_for
    from bucketserve.sim.simulator import SimRequest, simulate
    from bucketserve.workloads.traces import load_trace

    trace_run = run.workload in TRACES
    setup = _setup(a, TRACE_MAX_MODEL_LEN if trace_run else MAX_MODEL_LEN)
    if trace_run:
        trace = load_trace(run.workload)[: run.num_requests]
        reqs = [
            SimRequest(
                t.arrival - trace[0].arrival,
                t.prompt_len,
                t.output_len,
                *slo_for(t.prompt_len, setup.slo_scale),
            )
            for t in trace
        ]
    else:
        reqs = requests_for(run.workload, run.num_requests, run.rate, run.seed, setup.slo_scale)
    print(
        f"{len(reqs)} {run.workload} requests, "
        f"{'rate ' + str(run.rate) + '/s' if run.rate else 'at their times'}"
    )
    print("| policy | setup | out tok/s | TTFT p50 (ms) | TPOT p50 (ms) | SLO att. | busy | padding |")
    print("|---|---|---|---|---|---|---|---|")
    for p in run.policies:
        r = run_summary(simulate(setup.config(p), reqs), reqs)
        print(
            f"| {p} | {setup.describe(p)} | {r['output_throughput']:.1f} | {r['p50_ttft_ms']:.0f} | "
            f"{r['p50_tpot_ms']:.1f} | {r['slo_attainment']:.3f} | {r['busy_share']:.3f} | "
            f"{r['padding_ratio']:.3f} |"
        )
    return 0


def _paper(a: argparse.Namespace, run: SimulateConfig, experiment: ExperimentConfig) -> int:
    from tqdm import tqdm

    from bucketserve.sim.experiments import WORKLOADS, paper_experiment
    from bucketserve.sim.report import paper_plots, paper_tables

    out = Path(experiment.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = len(WORKLOADS) * len(run.policies) * (1 + len(experiment.rates))
    with tqdm(total=total, desc="paper experiment", unit="run") as bar:
        data = paper_experiment(
            _setup(a, MAX_MODEL_LEN),
            run.policies,
            WORKLOADS,
            experiment.rates,
            experiment.num_offline,
            experiment.num_online,
            run.seed,
            bar.update,
        )
    _write(out, "paper", "Simulated paper experiment", data, paper_tables(data), paper_plots(data, out))
    return 0


def _write(out: Path, name: str, title: str, data: Any, tables: str, extra: list[Path] | None = None) -> None:
    """An experiment's NAME.json and NAME.md (its tables under TITLE), and the tables printed."""
    from bucketserve.wire import write_json

    write_json(out / f"{name}.json", data)
    (out / f"{name}.md").write_text(f"# {title}\n\n" + tables)
    print(tables)
    print("wrote " + ", ".join(str(p) for p in [out / f"{name}.json", out / f"{name}.md", *(extra or [])]))


def _traces(a: argparse.Namespace, run: SimulateConfig, experiment: ExperimentConfig) -> int:
    from tqdm import tqdm

    from bucketserve.sim.experiments import trace_experiment
    from bucketserve.sim.report import trace_tables

    out = Path(experiment.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup = _setup(a, TRACE_MAX_MODEL_LEN)
    gpus = sorted({1, setup.num_gpus})
    with tqdm(total=2 * len(gpus) * len(run.policies), desc="trace replay", unit="run") as bar:
        data = trace_experiment(
            setup, gpu_counts=gpus, policies=run.policies, limit_s=experiment.trace_limit, progress=bar.update
        )
    _write(out, "traces", "Simulated Azure trace replays", data, trace_tables(data))
    return 0


def _topologies(a: argparse.Namespace, run: SimulateConfig, experiment: ExperimentConfig) -> int:
    from tqdm import tqdm

    from bucketserve.sim.experiments import TOPOLOGIES, WORKLOADS, topology_experiment
    from bucketserve.sim.report import topology_tables

    out = Path(experiment.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = len(WORKLOADS) * len(experiment.rates) * len(TOPOLOGIES)
    with tqdm(total=total, desc="topologies", unit="run") as bar:
        data = topology_experiment(
            _setup(a, MAX_MODEL_LEN),
            WORKLOADS,
            experiment.rates,
            experiment.num_online,
            run.seed,
            run.policies[0],
            bar.update,
        )
    _write(out, "topologies", "Simulated topologies", data, topology_tables(data))
    return 0


def _validate(a: argparse.Namespace, server: ValidateConfig) -> int:
    from bucketserve.sim.validate import METRICS, error_table, validate_run

    setup = _setup(a, VALIDATE_MAX_MODEL_LEN)  # (only its profile and context limit apply)
    rows = []
    for item in a.validate:
        # FILE:POLICY names the policy of the server that produced FILE.
        path, _, policy = (
            item.rpartition(":") if item.rpartition(":")[2] in policy_names() else (item, "", server.policy)
        )
        rows.extend(
            validate_run(
                path,
                setup.profile,
                server.kv_cache_memory,
                policy=policy,
                scheduler=server.scheduler,
                block_size=server.block_size,
                max_model_len=setup.max_model_len,
                disaggregated=server.disaggregated,
                kv_transfer_latency=server.kv_transfer_latency,
                fit_steps=server.fit_steps,
            )
        )
    print(error_table(rows, server.target))
    worst = max(abs(c.error(m)) for c in rows for m in METRICS)
    return 0 if worst <= server.target else 1
