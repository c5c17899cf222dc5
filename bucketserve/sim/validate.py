"""Check the simulator against measurement: replay a bench run's requests in simulation.

A bench result JSON (``bucketserve bench run --output-json``, or ``bench compare``'s, which
holds a run per server and rate; the layouts are ``bucketserve.wire``'s) has a row per request
with when it was sent (seconds from the run's start), its TTFT, E2E latency, token counts and
error. The simulator replays the same arrivals and lengths with
a measured profile (``bucketserve profile``) and the server's KV budget and scheduler
settings, and the two are compared on output throughput, TTFT p50 and TPOT p50.

The bench cannot see a server's policy: for a ``bench run`` file pass ``--policy`` (or
FILE:POLICY). A ``bench compare`` file records how it started its servers (``--policies``,
``--server NAME=ARGS``, ``--server-args``): each server is replayed with the policy, scheduler
settings (SLO classes, ``--reject-late``, the policy's own options) and KV pool its arguments
gave it, where they say; the command line's settings fill in the rest.

``fit_steps``: instead of the profile's coefficients, the cost model is fitted to the file's own
step records (the core's ``OnlineCostFit``, nothing forgotten; the profile still gives the KV
bytes per token): the serving path's costs under the measured load, which an in-process
profile does not see (the server's own work per step, the machine of the day).

A file written by ``benchmarks/sim_validation.py`` also holds the engine's steps, each with
its start, duration and batch shape. Then the cost model's estimate of every measured step is
known, and with it how much slower or faster the machine ran than when it was profiled: on
this project's shared 2-vCPU machine that drifts by up to a third within a minute. The run is
then simulated a second time with that drift replayed (``SpeedTrace``), which separates the
simulator's scheduling from the machine's speed.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bucketserve.argparse_options import serve_configs
from bucketserve.bench.compare import compare_targets
from bucketserve.config import EngineConfig, SchedulerConfig
from bucketserve.core.cost import OnlineCostFit, Profile
from bucketserve.core.policies import policy_names
from bucketserve.errors import ConfigError
from bucketserve.metrics import RequestRecord, summarize
from bucketserve.options import check, check_fields, default_of, option, parse_bytes
from bucketserve.sim.cost_model import CostModel, load_profile
from bucketserve.sim.simulator import InstanceSpec, SimConfig, SimRequest, simulate
from bucketserve.wire import MeasuredRun, StepSample, read_json

METRICS = ("output_throughput", "p50_ttft_ms", "p50_tpot_ms")
# The server sizes its KV pool from free memory unless given --kv-cache-memory, and a bench
# file does not record the pool: validation assumes this one unless told.
ASSUMED_KV_POOL = 2 * 2**30


@dataclass
class ValidateConfig:
    """The settings of the server that produced the bench files ``simulate --validate``
    replays; each defaults to the server's own default (``EngineConfig``, ``SchedulerConfig``)."""

    policy: str | None = option(
        None, choices=policy_names, help="the server's policy, if the JSON does not say (default: none)"
    )
    kv_cache_memory: int = option(
        ASSUMED_KV_POOL,
        parse=parse_bytes,
        metavar="BYTES",
        help="the server's KV pool bytes: its --kv-cache-memory (a server sized by "
        "--kv-cache-fraction has a pool the file does not record: give it here)",
    )
    block_size: int = option(default_of(EngineConfig, "block_size"), help="the server's --block-size")
    server_max_num_seqs: int = option(
        default_of(SchedulerConfig, "max_num_seqs"), help="the server's --max-num-seqs"
    )
    server_max_num_batched_tokens: int = option(
        default_of(SchedulerConfig, "max_num_batched_tokens"), help="the server's --max-num-batched-tokens"
    )
    disaggregated: bool = option(
        False,
        help="the server ran --prefill-replicas 1 --decode-replicas 1: simulate a prefill and a decode "
        "instance, each with --kv-cache-memory and the profile, the KV moved between them",
    )
    kv_transfer_latency: float = option(
        0.0,
        metavar="SECONDS",
        help="with --disaggregated: each KV transfer's time, as the server measured it (its "
        "bucketserve:kv_transfer_seconds mean)",
    )
    fit_steps: bool = option(
        False,
        help="fit the cost model to the bench files' own step records (the serving path's costs "
        "under load) instead of the profile's coefficients; the profile still gives the KV bytes "
        "per token",
    )
    target: float = option(0.15, help="relative error target")

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("block_size", "server_max_num_seqs", "server_max_num_batched_tokens"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.kv_cache_memory >= 1, f"kv_cache_memory must be >= 1 byte, got {self.kv_cache_memory}")
        check(self.target > 0, f"target must be > 0, got {self.target}")
        check(
            self.kv_transfer_latency >= 0, f"kv_transfer_latency must be >= 0, got {self.kv_transfer_latency}"
        )

    @property
    def scheduler(self) -> dict[str, int]:
        """The server's scheduler limits, as SchedulerConfig fields."""
        return {
            "max_num_seqs": self.server_max_num_seqs,
            "max_num_batched_tokens": self.server_max_num_batched_tokens,
        }


class SpeedTrace:
    """The machine's measured slowdown over a profile: at time t, the sum of the measured
    durations of the steps within ``window_s`` of t over the sum of the cost model's
    estimates for them (1.0 = as fast as when profiled). Callable with a time in the run's
    clock shifted by ``offset``, so it plugs into ``SimConfig.speed``."""

    def __init__(self, steps: list[StepSample], cost: CostModel, window_s: float = 10.0, offset: float = 0.0):
        if not steps:
            raise ValueError("a speed trace needs measured steps")
        steps = sorted(steps, key=lambda s: s.start)
        self.starts = [s.start for s in steps]
        self.measured = _cumsum([s.duration for s in steps])
        self.predicted = _cumsum([cost.shape_time(s.shape) for s in steps])
        self.window_s = window_s
        self.offset = offset
        self.overall = self.measured[-1] / self.predicted[-1] if self.predicted[-1] > 0 else 1.0

    def __call__(self, t: float) -> float:
        t += self.offset
        lo = bisect.bisect_left(self.starts, t - self.window_s / 2)
        hi = bisect.bisect_right(self.starts, t + self.window_s / 2)
        if hi - lo < 5:  # too few steps here (idle, or past the run's end) to say
            return self.overall
        pred = self.predicted[hi] - self.predicted[lo]
        return (self.measured[hi] - self.measured[lo]) / pred if pred > 0 else self.overall


def _cumsum(xs: list[float]) -> list[float]:
    out = [0.0]
    for x in xs:
        out.append(out[-1] + x)
    return out


@dataclass
class BenchRun:
    name: str
    policy: str | None  # the server's policy, where the file says
    records: list[RequestRecord]
    steps: list[StepSample] | None = None  # the engine's steps, where the file has them
    # Per record, when the server's engine took the request in (None: not known). Over
    # HTTP that is later than the client sent it, and all at once, in another order.
    admitted: list[float | None] | None = None
    # A compare file's server: the `bucketserve serve` arguments it was started with.
    server_args: list[str] | None = None


def _rate(rate: float | None) -> str:
    return "all at once" if rate is None or math.isinf(rate) else f"{rate:g}/s"  # JSON has no inf


def read_bench(path: str | Path) -> list[BenchRun]:
    """The runs in a ``bench run`` file (one) or a ``bench compare`` file (one per server and
    rate; a server named after a policy was started with that policy)."""
    data = read_json(path)
    name = Path(path).stem
    if isinstance(data.get("requests"), list):
        return [_bench_run(name, data.get("config", {}).get("policy"), MeasuredRun.from_dict(data))]
    if isinstance(data.get("servers"), dict):
        started = recorded_server_args(data.get("config", {}))
        return [
            _bench_run(
                f"{name} {server} @ {_rate(p.get('request_rate'))}",
                server if server in policy_names() else None,
                MeasuredRun.from_dict(p),
                started.get(server.partition("#")[0]),  # rounds are named NAME#R
            )
            for server, entry in data["servers"].items()
            for p in entry.get("points", [])
        ]
    raise ValueError(f"{path}: neither a `bench run` nor a `bench compare` result (no requests or servers)")


def recorded_server_args(config: dict[str, Any]) -> dict[str, list[str]]:
    """The `bucketserve serve` arguments of each server a compare file's run started (not the
    --url ones), from the options its config records ({} where it records none)."""
    if "server_args" not in config:
        return {}
    targets = compare_targets(config.get("policies"), config.get("server") or (), config.get("url") or ())
    shared = shlex.split(config.get("server_args") or "")
    return {t.name: t.serve_args(shared) for t in targets if t.url is None}


def _bench_run(
    name: str, policy: str | None, run: MeasuredRun, server_args: list[str] | None = None
) -> BenchRun:
    admitted = [r.admitted for r in run.requests]
    return BenchRun(
        name,
        policy,
        [r.to_record() for r in run.requests],
        run.steps or None,  # `sim_validation.py` records them in process, `bench` from /debug/steps
        None if all(t is None for t in admitted) else admitted,
        server_args,
    )


def fitted_profile(runs: list[BenchRun], prior: Profile) -> Profile:
    """A cost model fitted to every step the runs recorded (``OnlineCostFit``, nothing
    forgotten), ``prior``'s sizes kept; a ConfigError where too few steps of each kind were."""
    fit = OnlineCostFit(prior=prior, half_life=math.inf)
    for run in runs:
        for step in run.steps or ():
            fit.observe(step.shape, step.duration)
    if not fit.fitted:
        raise ConfigError(
            f"too few step records to fit a cost model ({fit.num_prefill_steps} with prompt tokens, "
            f"{fit.num_decode_steps} without; {fit.min_steps} of each needed; `bench` records a "
            "server's steps from its /debug/steps)"
        )
    profile = fit.profile()
    assert profile is not None  # fitted
    return dataclasses.replace(profile, name=f"fitted to the steps of {len(runs)} runs")


def span(records: list[RequestRecord]) -> float:
    ok = [r for r in records if r.ok]
    return max(r.finished for r in ok) - min(r.arrival for r in records) if ok else math.nan


@dataclass
class Comparison:
    name: str
    policy: str
    measured: dict[str, float]
    simulated: dict[str, float]
    # With the run's steps: the machine's measured / profiled step time, and the simulation
    # rerun with that drift replayed.
    speed_ratio: float | None = None
    corrected: dict[str, float] | None = None

    def error(self, metric: str, corrected: bool = False) -> float:
        sim = self.corrected if corrected else self.simulated
        if sim is None:
            return math.nan
        m, s = self.measured[metric], sim[metric]
        return (s - m) / m if m else math.nan


def validate_run(
    path: str | Path,
    profile: str,
    kv_cache_memory: int,
    policy: str | None = None,
    scheduler: dict[str, Any] | None = None,
    block_size: int = 16,
    max_model_len: int = 8192,
    disaggregated: bool = False,
    kv_transfer_latency: float = 0.0,
    fit_steps: bool = False,
) -> list[Comparison]:
    """Simulate the requests of each run in a bench file and compare the three metrics;
    ``policy``, ``scheduler``, ``kv_cache_memory``, ``block_size`` and ``max_model_len`` are
    the server's where the file does not say (a compare file records its servers' arguments).
    ``disaggregated``: a prefill and a decode instance alike, each KV transfer taking
    ``kv_transfer_latency`` seconds (on one host, Ray's object store: a fixed cost, not a
    link's bandwidth). ``fit_steps``: the cost model fitted to the file's steps."""
    prof = load_profile(profile)
    if prof.kv_bytes_per_token is None:
        raise ValueError(f"profile {profile!r} has no kv_bytes_per_token; use one from `bucketserve profile`")
    runs = read_bench(path)
    if fit_steps:
        prof = fitted_profile(runs, prof)
    out = []
    for run in runs:
        sched_cfg, kv_bytes, blocks, context = None, kv_cache_memory, block_size, max_model_len
        if run.server_args is not None:
            try:
                engine, sched_cfg = serve_configs(run.server_args)
            except ConfigError as e:
                raise ConfigError(f"{path}: {run.name!r} ran with arguments serve refuses: {e}") from e
            kv_bytes = engine.kv_cache_memory or kv_cache_memory
            blocks, context = engine.block_size, engine.max_model_len or max_model_len
        run_policy = sched_cfg.policy if sched_cfg is not None else run.policy or policy
        if run_policy is None:
            raise ValueError(f"{path}: the server's policy of {run.name!r} is unknown; pass --policy")
        if sched_cfg is None:
            sched_cfg = SchedulerConfig(policy=run_policy, **(scheduler or {}))
        admitted = run.admitted or [None] * len(run.records)
        kept = [(r, a) for r, a in zip(run.records, admitted, strict=True) if r.ok and r.output_tokens > 0]
        ok = [r for r, _ in kept]
        t0 = min(r.arrival for r in ok)
        # Requests enter the simulation when the engine took them in, where the server said;
        # their latencies are still counted from when the client sent them, as measured.
        at_engine = all(a is not None for _, a in kept)
        requests = [
            SimRequest((a if at_engine else r.arrival) - t0, r.prompt_tokens, r.output_tokens)  # type: ignore[operator]
            for r, a in kept
        ]
        sent = [r.arrival - t0 for r in ok]
        instance = InstanceSpec(prof, kv_bytes // prof.kv_bytes_per_token)
        sim_cfg = SimConfig(
            sched_cfg,
            instance,
            decode_instance=instance if disaggregated else None,
            block_size=blocks,
            max_model_len=context,
            link_bandwidth=math.inf,
            link_latency=kv_transfer_latency,
            first_token_at_decode=True,  # what our disaggregated server does
        )
        measured = summarize(ok, span(ok))
        c = Comparison(run.name, run_policy, _pick(measured), _pick(_simulate(sim_cfg, requests, sent)))
        if run.steps:
            trace = SpeedTrace(run.steps, CostModel(prof), offset=t0)
            c.speed_ratio = trace.overall
            sim_cfg.speed = trace
            c.corrected = _pick(_simulate(sim_cfg, requests, sent))
        out.append(c)
    return out


def _simulate(cfg: SimConfig, requests: list[SimRequest], sent: list[float]) -> dict[str, float]:
    """The simulated run's summary, each request's latencies counted from ``sent``."""
    records = [
        dataclasses.replace(r, arrival=t) if r.ok else r
        for r, t in zip(simulate(cfg, requests).records, sent, strict=True)
    ]
    return summarize(records, span(records))


def _pick(summary: dict[str, float]) -> dict[str, float]:
    return {k: summary[k] for k in METRICS}


def error_table(rows: list[Comparison], target: float = 0.15) -> str:
    """Markdown: measured / simulated (error) per metric; where the runs carry their steps,
    the machine's speed ratio and the drift-corrected simulation's error too."""
    with_steps = any(c.corrected is not None for c in rows)
    head = "| run | policy | " + " | ".join(f"{m} measured / simulated (error)" for m in METRICS)
    if with_steps:
        head += " | measured / profiled step time | "
        head += " | ".join(f"{m} error, drift replayed" for m in METRICS)
    width = len(METRICS) * (2 if with_steps else 1) + 2 + with_steps
    lines = [head + " |", "|---" * width + "|"]

    def err(c: Comparison, m: str, corrected: bool) -> str:
        e = c.error(m, corrected)
        return "n/a" if math.isnan(e) else f"{e:+.1%}" + ("" if abs(e) <= target else " !")

    for c in rows:
        cells = [f"{c.measured[m]:.1f} / {c.simulated[m]:.1f} ({err(c, m, False)})" for m in METRICS]
        if with_steps:
            cells.append("n/a" if c.speed_ratio is None else f"{c.speed_ratio:.2f}")
            cells += [err(c, m, True) for m in METRICS]
        lines.append(f"| {c.name} | {c.policy} | " + " | ".join(cells) + " |")
    lines.append(f"\n'!' marks an error beyond the {target:.0%} target.")
    return "\n".join(lines)


def repeat_table(rows: list[Comparison], target: float = 0.15) -> str:
    """Markdown, a row per policy over its repeated runs: the median measured value (and the
    runs' range), the median simulated one and its error, and the median error with each
    run's drift replayed."""
    by_policy: dict[str, list[Comparison]] = {}
    for c in rows:
        by_policy.setdefault(c.policy, []).append(c)
    head = "| policy | runs | " + " | ".join(
        f"{m} measured median [range] / simulated (error) | drift replayed" for m in METRICS
    )
    lines = [head + " |", "|---" * (2 + 2 * len(METRICS)) + "|"]

    def flag(e: float) -> str:
        return "n/a" if math.isnan(e) else f"{e:+.1%}" + ("" if abs(e) <= target else " !")

    for policy, cs in by_policy.items():
        cells = []
        for m in METRICS:
            meas = [c.measured[m] for c in cs]
            med, sim = statistics.median(meas), statistics.median(c.simulated[m] for c in cs)
            fixed = [c.error(m, True) for c in cs if c.corrected is not None]
            cells.append(
                f"{med:.1f} [{min(meas):.1f}-{max(meas):.1f}] / {sim:.1f} ({flag((sim - med) / med)})"
            )
            cells.append(flag(statistics.median(fixed)) if fixed else "n/a")
        lines.append(f"| {policy} | {len(cs)} | " + " | ".join(cells) + " |")
    lines.append(f"\n'!' marks an error beyond the {target:.0%} target.")
    return "\n".join(lines)
