"""Check the simulator against measurement: replay a bench run's requests in simulation.

A bench result JSON (``bucketserve bench run --output-json``, or ``bench compare``'s, which
holds a run per server and rate) has per-request rows with
``sent`` (seconds from the run's start), ``ttft``, ``e2el``, ``prompt_tokens``,
``output_tokens`` and ``error``. The simulator replays the same arrivals and lengths with
a measured profile (``bucketserve profile``) and the server's KV budget and scheduler
settings, and the two are compared on output throughput, TTFT p50 and TPOT p50.

The bench cannot see a server's policy: a compare file names each server after the policy it
started it with; for a ``bench run`` file pass ``--policy`` (or FILE:POLICY).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bucketserve.config import POLICIES, SchedulerConfig
from bucketserve.metrics import RequestRecord, summarize
from bucketserve.sim.cost_model import load_profile
from bucketserve.sim.simulator import InstanceSpec, SimConfig, SimRequest, simulate

METRICS = ("output_throughput", "p50_ttft_ms", "p50_tpot_ms")


def _records(rows: list[dict[str, Any]]) -> list[RequestRecord]:
    records = []
    for r in rows:
        sent = float(r.get("sent", r.get("arrival", 0.0)))
        ttft, e2e = r.get("ttft"), r.get("e2el", r.get("e2e"))
        records.append(
            RequestRecord(
                arrival=sent,
                first_token=sent + ttft if ttft is not None else math.nan,
                finished=sent + e2e if e2e is not None else math.nan,
                prompt_tokens=int(r["prompt_tokens"]),
                output_tokens=int(r.get("output_tokens") or 0),
                error=r.get("error"),
            )
        )
    return records


@dataclass
class BenchRun:
    name: str
    policy: str | None  # the server's policy, where the file says
    records: list[RequestRecord]


def _rate(rate: float | None) -> str:
    return "all at once" if rate is None or math.isinf(rate) else f"{rate:g}/s"  # JSON has no inf


def read_bench(path: str | Path) -> list[BenchRun]:
    """The runs in a ``bench run`` file (one) or a ``bench compare`` file (one per server and
    rate; a server named after a policy was started with that policy)."""
    data = json.loads(Path(path).read_text())
    name = Path(path).stem
    if isinstance(data.get("requests"), list):
        return [BenchRun(name, data.get("config", {}).get("policy"), _records(data["requests"]))]
    if isinstance(data.get("servers"), dict):
        return [
            BenchRun(
                f"{name} {server} @ {_rate(p.get('request_rate'))}",
                server if server in POLICIES else None,
                _records(p["requests"]),
            )
            for server, entry in data["servers"].items()
            for p in entry.get("points", [])
        ]
    raise ValueError(f"{path}: neither a `bench run` nor a `bench compare` result (no requests or servers)")


def span(records: list[RequestRecord]) -> float:
    ok = [r for r in records if r.ok]
    return max(r.finished for r in ok) - min(r.arrival for r in records) if ok else math.nan


@dataclass
class Comparison:
    name: str
    policy: str
    measured: dict[str, float]
    simulated: dict[str, float]

    def error(self, metric: str) -> float:
        m, s = self.measured[metric], self.simulated[metric]
        return (s - m) / m if m else math.nan


def validate_run(
    path: str | Path,
    profile: str,
    kv_cache_memory: int,
    policy: str | None = None,
    scheduler: dict[str, Any] | None = None,
    block_size: int = 16,
    max_model_len: int = 8192,
) -> list[Comparison]:
    """Simulate the requests of each run in a bench file and compare the three metrics;
    ``policy`` is the server's where the file does not say."""
    prof, entry = load_profile(profile)
    if "kv_bytes_per_token" not in entry:
        raise ValueError(f"profile {profile!r} has no kv_bytes_per_token; use one from `bucketserve profile`")
    capacity = kv_cache_memory // entry["kv_bytes_per_token"]
    out = []
    for run in read_bench(path):
        run_policy = run.policy or policy  # a compare file names its servers' policies
        if run_policy is None:
            raise ValueError(f"{path}: the server's policy of {run.name!r} is unknown; pass --policy")
        ok = [r for r in run.records if r.ok and r.output_tokens > 0]
        t0 = min(r.arrival for r in ok)
        requests = [SimRequest(r.arrival - t0, r.prompt_tokens, r.output_tokens) for r in ok]
        sim_cfg = SimConfig(
            SchedulerConfig(policy=run_policy, **(scheduler or {})),
            InstanceSpec(prof, capacity),
            block_size=block_size,
            max_model_len=max_model_len,
        )
        result = simulate(sim_cfg, requests)
        measured = summarize(ok, span(ok))
        simulated = summarize(result.records, span(result.records))
        out.append(
            Comparison(
                run.name, run_policy, {k: measured[k] for k in METRICS}, {k: simulated[k] for k in METRICS}
            )
        )
    return out


def error_table(rows: list[Comparison], target: float = 0.15) -> str:
    head = "| run | policy | " + " | ".join(f"{m} measured / simulated (error)" for m in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 2) + "|"]
    for c in rows:
        cells = []
        for m in METRICS:
            err = c.error(m)
            flag = "" if abs(err) <= target else " !"
            cells.append(f"{c.measured[m]:.1f} / {c.simulated[m]:.1f} ({err:+.1%}{flag})")
        lines.append(f"| {c.name} | {c.policy} | " + " | ".join(cells) + " |")
    lines.append(f"\n'!' marks an error beyond the {target:.0%} target.")
    return "\n".join(lines)
