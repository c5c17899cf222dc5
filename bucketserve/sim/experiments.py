"""The paper's experiments (DESIGN section 6) and the Azure trace replays, in simulation.

Setup, stated once: 4 x A100-40GB; OPT-13B's published A100 profile (DistServe's engine)
stands in for LLaMA-2-13B (same size class); KV memory = 90% of GPU memory minus the fp16
weights (26 GB). "4 GPUs" means one tensor-parallel-4 instance for the aggregated policies
(bucket, continuous, static, uellm) and, for distserve, a TP-2 prefill instance and a TP-2
decode instance with the KV moved between them over NVLink (300 GB/s by default).
Requests carry SLOs by kind (our choice): short (Alpaca-like) TTFT 0.25 s / TPOT 0.1 s, the
chatbot targets DistServe reports for OPT-13B; long (LongBench-like, prompt >= 1000 tokens)
TTFT 2.5 s / TPOT 0.15 s. ``Setup.slo_scale`` multiplies them. The workloads' lengths are
synthetic (``bucketserve.workloads.synthetic``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bucketserve.config import SchedulerConfig
from bucketserve.core.policies import policy_names
from bucketserve.metrics import load_capacity, meets_slo, summarize
from bucketserve.options import check, check_fields, option, parse_bytes
from bucketserve.sim.cost_model import (
    OPT_13B_KV_BYTES_PER_TOKEN,
    OPT_13B_WEIGHT_BYTES,
    kv_capacity_tokens,
    load_profile,
)
from bucketserve.sim.simulator import InstanceSpec, SimConfig, SimRequest, SimResult, simulate
from bucketserve.workloads import arrivals, synthetic
from bucketserve.workloads.traces import load_trace

GPU_MEMORY = 40_000_000_000  # A100-40GB
NVLINK_BANDWIDTH = 300_000_000_000  # bytes/s
SHORT_SLO = (0.25, 0.1)  # TTFT s, TPOT s
LONG_SLO = (2.5, 0.15)
LONG_PROMPT = 1000  # prompts this long or longer get the long SLO
WORKLOADS = ("alpaca", "longbench", "mixed")
TRACES = ("azure-conv", "azure-code")
DEFAULT_RATES = (0.05, 0.1, 0.15, 0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64)


@dataclass
class Setup:
    """The simulated hardware and serving configuration shared by every run (``simulate``'s
    "simulated hardware" options are generated from the fields declared with ``option``)."""

    profile: str = option(
        "a100-distserve",
        help="cost model: a100-distserve, a100-vllm (published, OPT-13B) or a profile JSON path",
    )
    gpu_memory: int = option(GPU_MEMORY, parse=parse_bytes, metavar="BYTES", help="bytes per GPU (A100-40GB)")
    num_gpus: int = option(4, help="GPUs (aggregated: one TP instance; distserve: halves)")
    # Not an option here: the command line's default depends on the workload (4096, traces 8192).
    max_model_len: int = 4096
    link_bandwidth: int = option(
        NVLINK_BANDWIDTH, parse=parse_bytes, metavar="BYTES", help="KV transfer bytes/s (NVLink)"
    )
    max_num_seqs: int = option(256, help="most sequences running at once")
    max_num_batched_tokens: int = option(4096, help="token budget per step")
    slo_scale: float = option(
        1.0,
        help="multiply the SLOs (prompts under 1000 tokens: TTFT 0.25 s, TPOT 0.1 s; longer: 2.5 s, 0.15 s)",
    )
    pad_prefill: bool = option(
        False, help="charge every policy's prefill batches padded to their longest prompt (no ragged kernels)"
    )
    # The simulated model (OPT-13B's sizes), and extra SchedulerConfig fields: not options.
    kv_bytes_per_token: int = OPT_13B_KV_BYTES_PER_TOKEN
    weight_bytes: int = OPT_13B_WEIGHT_BYTES
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("gpu_memory", "num_gpus", "max_model_len", "link_bandwidth", "max_num_seqs"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(
            self.max_num_batched_tokens >= 1,
            f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}",
        )
        check(self.slo_scale > 0, f"slo_scale must be > 0, got {self.slo_scale}")

    def instance(self, num_gpus: int) -> InstanceSpec:
        profile = load_profile(self.profile, tp=num_gpus)
        cap = kv_capacity_tokens(self.gpu_memory, num_gpus, self.weight_bytes, self.kv_bytes_per_token)
        return InstanceSpec(profile, cap, num_gpus)

    def config(self, policy: str) -> SimConfig:
        sched = SchedulerConfig(
            policy=policy,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            **self.overrides,
        )
        common = dict(
            max_model_len=self.max_model_len,
            kv_bytes_per_token=self.kv_bytes_per_token,
            link_bandwidth=self.link_bandwidth,
            pad_prefill=self.pad_prefill,
        )
        if policy == "distserve" and self.num_gpus >= 2:
            half = self.num_gpus // 2
            return SimConfig(sched, self.instance(half), decode_instance=self.instance(half), **common)
        return SimConfig(sched, self.instance(self.num_gpus), **common)

    def describe(self, policy: str) -> str:
        cfg = self.config(policy)
        if cfg.decode_instance is not None:
            return (
                f"prefill TP{cfg.instance.num_gpus} ({cfg.instance.kv_capacity_tokens} KV tokens) + decode "
                f"TP{cfg.decode_instance.num_gpus} ({cfg.decode_instance.kv_capacity_tokens}), "
                f"KV over {self.link_bandwidth / 1e9:.0f} GB/s"
            )
        return f"one TP{cfg.instance.num_gpus} instance ({cfg.instance.kv_capacity_tokens} KV tokens)"


@dataclass
class SimulateConfig:
    """Which policies ``simulate`` runs, and its single run's workload."""

    policies: tuple[str, ...] = option(
        default_factory=policy_names, choices=policy_names, help="comma-separated policies"
    )
    workload: str = option(
        "mixed", choices=(*WORKLOADS, *TRACES), help="single run: synthetic lengths, or an Azure trace"
    )
    num_requests: int = option(1000, help="single run: requests (a trace: its first N)")
    rate: float | None = option(None, help="single run: Poisson req/s (default: all at t=0)")
    seed: int = option(0, help="seed of lengths and arrivals")

    def __post_init__(self) -> None:
        check_fields(self)
        check(bool(self.policies), "policies must name at least one policy")
        check(self.num_requests >= 1, f"num_requests must be >= 1, got {self.num_requests}")
        check(self.rate is None or self.rate > 0, f"rate must be > 0, got {self.rate}")


@dataclass
class ExperimentConfig:
    """The sizes of ``simulate --experiment paper`` and ``traces``, and where they write."""

    rates: tuple[float, ...] = option(DEFAULT_RATES, help="paper: Poisson rates swept")
    num_offline: int = option(1000, help="paper: requests per offline run")
    num_online: int = option(500, help="paper: requests per rate point")
    trace_limit: float | None = option(
        None, metavar="SECONDS", help="traces: keep the first SECONDS (default: the whole trace)"
    )
    output_dir: str = option("results/sim", help="where tables, JSON and PNGs go")

    def __post_init__(self) -> None:
        check_fields(self)
        check(bool(self.rates) and all(r > 0 for r in self.rates), f"rates must be > 0, got {self.rates}")
        check(self.num_offline >= 1, f"num_offline must be >= 1, got {self.num_offline}")
        check(self.num_online >= 1, f"num_online must be >= 1, got {self.num_online}")
        check(
            self.trace_limit is None or self.trace_limit > 0,
            f"trace_limit must be > 0, got {self.trace_limit}",
        )


def slo_for(prompt_len: int, scale: float = 1.0) -> tuple[float, float]:
    ttft, tpot = LONG_SLO if prompt_len >= LONG_PROMPT else SHORT_SLO
    return ttft * scale, tpot * scale


def lengths(workload: str, n: int, seed: int) -> list[tuple[int, int]]:
    if workload == "alpaca":
        pairs = synthetic.alpaca_like(n, seed)
    elif workload == "longbench":
        pairs = synthetic.longbench_like(n, seed)
    elif workload == "mixed":
        pairs = synthetic.mixed(n, seed)
    else:
        raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}")
    return [(p.prompt_len, p.output_len) for p in pairs]


def requests_for(
    workload: str, n: int, rate: float | None, seed: int, slo_scale: float = 1.0
) -> list[SimRequest]:
    """``n`` requests of ``workload``, Poisson at ``rate`` per second (None: all at t=0)."""
    times = arrivals.all_at_once(n) if rate is None else arrivals.poisson(n, rate, seed)
    pairs = lengths(workload, n, seed)
    return [SimRequest(t, p, o, *slo_for(p, slo_scale)) for t, (p, o) in zip(times, pairs, strict=True)]


def attainment(result: SimResult, requests: list[SimRequest]) -> float:
    """Share of requests meeting their own TTFT and TPOT targets (rejected ones miss)."""
    hits = sum(meets_slo(r, q.ttft_slo, q.tpot_slo) for r, q in zip(result.records, requests, strict=True))
    return hits / len(requests) if requests else math.nan


def run_summary(result: SimResult, requests: list[SimRequest]) -> dict[str, Any]:
    s = summarize(result.records, result.duration)
    return {
        "output_throughput": s["output_throughput"],
        "request_throughput": s["request_throughput"],
        "p50_ttft_ms": s["p50_ttft_ms"],
        "p99_ttft_ms": s["p99_ttft_ms"],
        "p50_tpot_ms": s["p50_tpot_ms"],
        "p99_tpot_ms": s["p99_tpot_ms"],
        "duration_s": result.duration,
        "completed": s["completed"],
        "rejected": s["failed"],
        "busy_share": result.busy_share,
        "padding_ratio": result.padding_ratio,
        "steps": result.steps,
        "mean_step_ms": result.mean_step_s * 1e3,
        "mean_schedule_ms": result.mean_schedule_wall_s * 1e3,
        "slo_attainment": attainment(result, requests),
        "preemptions": sum(r.stats.preemptions for r in result.instances),
    }


Progress = Callable[[], None]


def paper_experiment(
    setup: Setup,
    policies: Iterable[str] | None = None,  # None: every registered policy
    workloads: Iterable[str] = WORKLOADS,
    rates: Iterable[float] = DEFAULT_RATES,
    num_offline: int = 1000,
    num_online: int = 500,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Offline throughput, busy share and padding (all requests at t=0), the same with every
    prefill charged padded (an engine without ragged kernels), then SLO attainment over a
    Poisson rate sweep and the load capacity at 80% per policy and workload."""
    policies = list(policy_names() if policies is None else policies)
    workloads, rates = list(workloads), sorted(rates)
    padded = Setup(**{**setup.__dict__, "pad_prefill": True})
    out: dict[str, Any] = {
        "setup": {p: setup.describe(p) for p in policies},
        "slo": {"short": slo_for(1, setup.slo_scale), "long": slo_for(LONG_PROMPT, setup.slo_scale)},
        "offline": {},
        "offline_padded_prefill": {},
        "online": {},
        "capacity": {},
    }
    for w in workloads:
        offline = requests_for(w, num_offline, None, seed, setup.slo_scale)
        out["offline"][w] = {}
        out["offline_padded_prefill"][w] = {}
        out["online"][w] = {}
        out["capacity"][w] = {}
        for p in policies:
            out["offline"][w][p] = run_summary(simulate(setup.config(p), offline), offline)
            out["offline_padded_prefill"][w][p] = run_summary(simulate(padded.config(p), offline), offline)
            if progress:
                progress()
            points = []
            for rate in rates:
                reqs = requests_for(w, num_online, rate, seed, setup.slo_scale)
                points.append({"rate": rate, **run_summary(simulate(setup.config(p), reqs), reqs)})
                if progress:
                    progress()
            out["online"][w][p] = points
            out["capacity"][w][p] = load_capacity(
                [x["rate"] for x in points], [x["slo_attainment"] for x in points], 0.8
            )
    return out


def trace_experiment(
    base: Setup,
    traces: Iterable[str] = ("azure-conv", "azure-code"),
    gpu_counts: Iterable[int] = (1, 4),
    policies: Iterable[str] | None = None,  # None: every registered policy
    limit_s: float | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Replay the Azure traces at their real arrival times; ``limit_s`` keeps the first seconds."""
    policies = list(policy_names() if policies is None else policies)
    out: dict[str, Any] = {}
    for name in traces:
        trace = [t for t in load_trace(name) if limit_s is None or t.arrival < limit_s]
        t0 = trace[0].arrival if trace else 0.0
        reqs = [
            SimRequest(t.arrival - t0, t.prompt_len, t.output_len, *slo_for(t.prompt_len, base.slo_scale))
            for t in trace
        ]
        out[name] = {"requests": len(reqs), "span_s": reqs[-1].arrival if reqs else 0.0}
        for g in gpu_counts:
            setup = Setup(**{**base.__dict__, "num_gpus": g})
            out[name][f"{g}gpu"] = {}
            for p in policies:
                res = simulate(setup.config(p), reqs)
                out[name][f"{g}gpu"][p] = {"setup": setup.describe(p), **run_summary(res, reqs)}
                if progress:
                    progress()
    return out


TOPOLOGIES = ("one engine", "replicas, least loaded", "replicas, length bands", "prefill + decode")
SHORT_PROMPT = 256  # "short" requests, whose p99 TTFT the topology experiment reports


def topology_config(setup: Setup, topology: str, policy: str = "bucket") -> SimConfig:
    """``setup.num_gpus`` GPUs as one tensor-parallel engine, as two replicas of half as many
    (least loaded, or by length band), or as a prefill and a decode instance of half each."""
    half = setup.num_gpus // 2
    check(
        half >= 1 and setup.num_gpus % 2 == 0, f"topologies need an even number of GPUs, got {setup.num_gpus}"
    )
    config = setup.config(policy)
    if topology == "one engine":
        return config
    if topology.startswith("replicas"):
        router = "length" if topology.endswith("length bands") else "least-loaded"
        return dataclasses.replace(config, instance=setup.instance(half), num_instances=2, router=router)
    if topology == "prefill + decode":
        return dataclasses.replace(
            config, instance=setup.instance(half), decode_instance=setup.instance(half)
        )
    raise ValueError(f"unknown topology {topology!r}; choose one of {', '.join(TOPOLOGIES)}")


def short_p99_ttft_ms(result: SimResult) -> float:
    from bucketserve.metrics import percentile

    return percentile([r.ttft * 1e3 for r in result.records if r.ok and r.prompt_tokens <= SHORT_PROMPT], 99)


def topology_experiment(
    setup: Setup,
    workloads: Iterable[str] = ("mixed",),
    rates: Iterable[float] = DEFAULT_RATES,
    num_requests: int = 500,
    seed: int = 0,
    policy: str = "bucket",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The same requests on each of ``TOPOLOGIES`` (``setup.num_gpus`` GPUs in all): per
    workload and Poisson rate, ``run_summary`` plus the p99 TTFT of the short requests; and
    each topology's load capacity (the highest rate with SLO attainment >= 80%)."""
    rates = sorted(rates)
    out: dict[str, Any] = {
        "setup": {t: _describe(topology_config(setup, t, policy)) for t in TOPOLOGIES},
        "policy": policy,
        "runs": {},
        "capacity": {},
    }
    for w in workloads:
        out["runs"][w] = {}
        for rate in rates:
            reqs = requests_for(w, num_requests, rate, seed, setup.slo_scale)
            row = {}
            for t in TOPOLOGIES:
                result = simulate(topology_config(setup, t, policy), reqs)
                row[t] = {**run_summary(result, reqs), "p99_short_ttft_ms": short_p99_ttft_ms(result)}
                if progress:
                    progress()
            out["runs"][w][str(rate)] = row
        out["capacity"][w] = {
            t: load_capacity(list(rates), [out["runs"][w][str(r)][t]["slo_attainment"] for r in rates], 0.8)
            for t in TOPOLOGIES
        }
    return out


def _describe(cfg: SimConfig) -> str:
    if cfg.decode_instance is not None:
        return f"prefill TP{cfg.instance.num_gpus} + decode TP{cfg.decode_instance.num_gpus}"
    if cfg.num_instances > 1:
        return f"{cfg.num_instances} x TP{cfg.instance.num_gpus}, {cfg.router}"
    return f"one TP{cfg.instance.num_gpus} instance"
