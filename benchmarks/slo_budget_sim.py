"""The bucket policy's step budget from the SLOs against its token budget and against
continuous batching, in simulation (the paper's setup: 4 x A100, OPT-13B's published profile).

What it measures
    For each workload (``--workloads``) and each scheduler variant, a Poisson rate sweep of
    ``--num-requests`` requests carrying the paper setup's SLOs (prompts under 1,000 tokens:
    TTFT 0.25 s, TPOT 0.1 s; longer: 2.5 s, 0.15 s; times ``--slo-scale``), SLO attainment at
    each rate, and the load capacity at 80% attainment. The variants:

    - ``bucket``: BucketServe as in the paper (whole prompts, token budget per step, FCFS)
    - ``bucket-edf``: the same with ``--order edf`` (earliest TTFT deadline first)
    - ``bucket-slo``: the bucket policy's defaults, ``--bucket-step-budget slo --order edfs``
      (here every request's own TTFT target is within the 10-s default, so edfs orders as edf)
      (prompt tokens per step from the TPOT and TTFT targets, by the cost model fitted online
      from the simulated steps; chunked prompts, most urgent first)
    - ``bucket-slo-late``: ``bucket-slo`` with ``--reject-late`` (a request that cannot meet
      its TTFT target behind the prompts EDF runs first is refused at once: a miss, but one
      that takes no time from the others)
    - ``bucket-slo-optimal``: ``bucket-slo`` with ``--bucket-split-mode optimal`` (boundaries
      fitted to the observed lengths instead of bisection)
    - ``bucket-slo-lift``: ``bucket-slo`` with ``--bucket-ttft-lift`` (a queued prompt's TTFT
      deadline in danger lifts a step past the running requests' TPOT limit, to the TTFT cap)
    - ``bucket-slo-share1``: ``bucket-slo`` with ``--bucket-ttft-share 1`` (steps up to the
      tightest TTFT target, not a tenth of it)
    - ``bucket-slo-share25``: ``bucket-slo`` with ``--bucket-ttft-share 0.25`` (steps up to a
      quarter of the tightest TTFT target, the default before the tenth)
    - ``bucket-slo-danger50``, ``-danger1``: ``bucket-slo`` whose steps may grow to half (all)
      of the tightest TTFT target while a TTFT deadline is in danger
      (``--bucket-danger-ttft-share``; by default a quarter, from the cap's tenth)
    - ``bucket-slo-nodemote``: ``bucket-slo`` with ``--bucket-late-demotion 0`` (a prompt that
      will miss its TTFT target keeps its place in the deadline order instead of going behind
      the ones still on time)
    - ``bucket-slo-nowindow``: ``bucket-slo`` with ``--bucket-tpot-window 0`` (every step held
      to its own limit; the default before the twenty-ninth session, which turned the TPOT
      window on: decode-only steps bank time for fewer, larger prompt chunks)
    - ``continuous-B``: vLLM-style, chunked prefill, token budget B for each of
      ``--continuous-budgets`` (its best setting is the baseline); ``continuous-B-late`` the
      same with ``--reject-late`` (behind every queued prompt, first come first served)

    The same policy objects run here as in the server. Prints one table per workload and
    writes ``--output-json`` and an attainment-vs-rate plot next to it.

How to run
    .venv/bin/python benchmarks/slo_budget_sim.py                       # mixed, 500 requests
    .venv/bin/python benchmarks/slo_budget_sim.py --workloads mixed,alpaca,longbench
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bucketserve.metrics import load_capacity
from bucketserve.sim.experiments import DEFAULT_RATES, Setup, requests_for, run_summary
from bucketserve.sim.simulator import simulate


def variants(continuous_budgets: list[int]) -> dict[str, dict[str, Any]]:
    """Scheduler settings (SchedulerConfig fields) per variant name."""
    out: dict[str, dict[str, Any]] = {
        "bucket": {
            "policy": "bucket",
            "policy_config": {"step_budget": "tokens"},
            "order": {"order": "fcfs"},
        },
        "bucket-edf": {
            "policy": "bucket",
            "policy_config": {"step_budget": "tokens"},
            "order": {"order": "edf"},
        },
        "bucket-slo": {"policy": "bucket"},  # the defaults: the slo step budget, edfs
        "bucket-slo-late": {"policy": "bucket", "order": {"reject_late": True}},
        "bucket-slo-optimal": {"policy": "bucket", "policy_config": {"split_mode": "optimal"}},
        "bucket-slo-lift": {"policy": "bucket", "policy_config": {"ttft_lift": True}},
        "bucket-slo-share1": {"policy": "bucket", "policy_config": {"ttft_share": 1.0}},
        "bucket-slo-share25": {"policy": "bucket", "policy_config": {"ttft_share": 0.25}},
        "bucket-slo-danger50": {"policy": "bucket", "policy_config": {"danger_ttft_share": 0.5}},
        "bucket-slo-danger1": {"policy": "bucket", "policy_config": {"danger_ttft_share": 1.0}},
        "bucket-slo-nodemote": {"policy": "bucket", "policy_config": {"late_demotion_s": 0.0}},
        "bucket-slo-nowindow": {"policy": "bucket", "policy_config": {"tpot_window": 0}},
    }
    for b in continuous_budgets:
        out[f"continuous-{b}"] = {"policy": "continuous", "max_num_batched_tokens": b}
        out[f"continuous-{b}-late"] = {
            "policy": "continuous",
            "max_num_batched_tokens": b,
            "order": {"reject_late": True},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="mixed", help="comma-separated: alpaca, longbench, mixed")
    ap.add_argument("--num-requests", type=int, default=500)
    ap.add_argument("--rates", default=",".join(str(r) for r in DEFAULT_RATES if r <= 24))
    ap.add_argument("--slo-scale", type=float, default=1.0)
    ap.add_argument("--continuous-budgets", default="512,2048,4096", help="continuous's token budgets")
    ap.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-json", default="results/sim/slo-budget.json")
    a = ap.parse_args(argv)
    rates = sorted(float(r) for r in a.rates.split(","))
    runs = variants([int(b) for b in a.continuous_budgets.split(",")])
    if a.variants:
        unknown = set(a.variants.split(",")) - set(runs)
        if unknown:
            ap.error(f"unknown variants {', '.join(sorted(unknown))}; choose from {', '.join(runs)}")
        runs = {k: v for k, v in runs.items() if k in a.variants.split(",")}
    workloads = [w for w in a.workloads.split(",") if w]
    result: dict[str, Any] = {"slo_scale": a.slo_scale, "num_requests": a.num_requests, "workloads": {}}
    bar = tqdm(total=len(workloads) * len(runs) * len(rates), desc="simulating", unit="run")
    for w in workloads:
        per: dict[str, Any] = {}
        for name, overrides in runs.items():
            rest = {k: v for k, v in overrides.items() if k not in ("policy", "max_num_batched_tokens")}
            tokens = overrides.get("max_num_batched_tokens", Setup.max_num_batched_tokens)
            setup = Setup(slo_scale=a.slo_scale, max_num_batched_tokens=tokens, overrides=rest)
            points = []
            for rate in rates:
                reqs = requests_for(w, a.num_requests, rate, a.seed, a.slo_scale)
                run = simulate(setup.config(overrides["policy"]), reqs)
                points.append({"rate": rate, **run_summary(run, reqs)})
                bar.update(1)
            capacity = load_capacity([p["rate"] for p in points], [p["slo_attainment"] for p in points], 0.8)
            per[name] = {"capacity": capacity, "points": points}
        result["workloads"][w] = per
    bar.close()

    for w, per in result["workloads"].items():
        cont = {k: v["capacity"] for k, v in per.items() if k.startswith("continuous")}
        best_cont = max((c for k, c in cont.items() if not k.endswith("-late")), default=0.0)
        best_late = max(cont.values(), default=0.0)
        print(f"\n{w}: load capacity at 80% SLO attainment (req/s), and SLO attainment per rate")
        print("(vs continuous: its best token budget; vs any continuous: -late variants included)")
        head = " ".join(f"{r:>5g}" for r in rates)
        print(f"{'variant':<20} {'capacity':>9} {'vs continuous':>14} {'vs any continuous':>18}  {head}")
        for name, v in per.items():
            # "-" where no continuous variant ran (--variants without one) or none held 80%.
            ratios = [f"{v['capacity'] / c:.2f}x" if c else "-" for c in (best_cont, best_late)]
            cells = " ".join(f"{p['slo_attainment']:5.2f}" for p in v["points"])
            print(f"{name:<20} {v['capacity']:9.2f} {ratios[0]:>14} {ratios[1]:>18}  {cells}")
    out = Path(a.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = result["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
    for ax, (w, per) in zip(axes[0], workloads.items(), strict=True):
        for name, v in per.items():
            xs, ys = [p["rate"] for p in v["points"]], [p["slo_attainment"] for p in v["points"]]
            ax.plot(xs, ys, "o-", label=name)
        ax.axhline(0.8, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("Poisson rate (req/s)")
        ax.set_ylabel("SLO attainment")
        ax.set_title(f"{w} (simulated, 4 x A100, OPT-13B)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
