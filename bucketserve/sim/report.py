"""Tables (Markdown) and plots (PNG, matplotlib Agg) of the simulated experiments."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _f(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _ratio(a: float, b: float) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def paper_tables(data: dict[str, Any]) -> str:
    lines = ["## Setup", ""]
    lines += [f"- `{p}`: {d}" for p, d in data["setup"].items()]
    lines += ["", "## (i) Offline throughput, all requests at t=0", ""]
    for w, runs in data["offline"].items():
        base = runs.get("uellm", {}).get("output_throughput", math.nan)
        lines += [
            f"**{w}** ({next(iter(runs.values()))['completed']} requests)",
            "",
            "| policy | output tok/s | req/s | makespan (s) | GPU busy share | padding ratio | vs uellm |",
            "|---|---|---|---|---|---|---|",
        ]
        for p, r in runs.items():
            lines.append(
                f"| {p} | {_f(r['output_throughput'])} | {_f(r['request_throughput'], 2)} | "
                f"{_f(r['duration_s'])} | {_f(r['busy_share'], 3)} | {_f(r['padding_ratio'], 3)} | "
                f"{_ratio(r['output_throughput'], base)} |"
            )
        lines.append("")
    lines += [
        "## (i-b) Offline throughput when every prefill is padded (no ragged kernels)",
        "",
        "The same runs charged as an engine that pads each prefill batch to its longest prompt.",
        "",
    ]
    for w, runs in data.get("offline_padded_prefill", {}).items():
        base = runs.get("uellm", {}).get("output_throughput", math.nan)
        lines += [
            f"**{w}**",
            "",
            "| policy | output tok/s | makespan (s) | padding ratio | vs uellm |",
            "|---|---|---|---|---|",
        ]
        for p, r in runs.items():
            lines.append(
                f"| {p} | {_f(r['output_throughput'])} | {_f(r['duration_s'])} | "
                f"{_f(r['padding_ratio'], 3)} | {_ratio(r['output_throughput'], base)} |"
            )
        lines.append("")
    short, long = data.get("slo", {}).get("short"), data.get("slo", {}).get("long")
    lines += ["## (ii) Load capacity at 80% SLO attainment (requests/s, Poisson)", ""]
    if short and long:
        lines += [
            f"SLOs: prompts under 1000 tokens TTFT {short[0]:g} s / TPOT {short[1]:g} s; longer prompts "
            f"TTFT {long[0]:g} s / TPOT {long[1]:g} s.",
            "",
        ]
    cap = data["capacity"]
    workloads = list(cap)
    policies = list(next(iter(cap.values())))
    lines += ["| policy | " + " | ".join(workloads) + " |", "|---" * (len(workloads) + 1) + "|"]
    for p in policies:
        lines.append(f"| {p} | " + " | ".join(_f(cap[w][p], 2) for w in workloads) + " |")
    for other in ("uellm", "distserve", "continuous"):
        if "bucket" in policies and other in policies:
            lines.append(
                f"| bucket / {other} | "
                + " | ".join(_ratio(cap[w]["bucket"], cap[w][other]) for w in workloads)
                + " |"
            )
    lines += [
        "",
        "A capacity equal to the sweep's highest rate is a lower bound; n/a: below the lowest rate.",
        "",
        "## (iii) Scheduling time vs iteration time (offline runs)",
        "",
        "Scheduling is wall-clock time of `schedule()` on this machine's CPU; iterations are "
        "simulated A100 time.",
        "",
        "| workload | policy | steps | mean schedule (ms) | mean iteration (ms) | share |",
        "|---|---|---|---|---|---|",
    ]
    for w, runs in data["offline"].items():
        for p, r in runs.items():
            share = r["mean_schedule_ms"] / r["mean_step_ms"] if r["mean_step_ms"] else math.nan
            lines.append(
                f"| {w} | {p} | {r['steps']} | {_f(r['mean_schedule_ms'], 3)} | {_f(r['mean_step_ms'], 2)} "
                f"| {_f(100 * share, 2)}% |"
            )
    lines += [
        "",
        "## (iv) Padding ratio (padded / computed tokens, offline)",
        "",
        "| policy | " + " | ".join(workloads) + " |",
        "|---" * (len(workloads) + 1) + "|",
    ]
    for p in policies:
        lines.append(
            f"| {p} | " + " | ".join(_f(data["offline"][w][p]["padding_ratio"], 3) for w in workloads) + " |"
        )
    lines += ["", "## SLO attainment per rate", ""]
    for w, per_policy in data["online"].items():
        rates = [x["rate"] for x in next(iter(per_policy.values()))]
        lines += [f"**{w}**", "", "| policy | " + " | ".join(f"{r:g}/s" for r in rates) + " |"]
        lines.append("|---" * (len(rates) + 1) + "|")
        for p, points in per_policy.items():
            lines.append(f"| {p} | " + " | ".join(f"{x['slo_attainment']:.2f}" for x in points) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def trace_tables(data: dict[str, Any]) -> str:
    lines = []
    for name, per in data.items():
        lines += [f"## {name}: {per['requests']} requests over {per['span_s']:.0f} s, real arrival times", ""]
        for key, runs in per.items():
            if not key.endswith("gpu"):
                continue
            lines += [
                f"**{key.removesuffix('gpu')} x A100-40GB**",
                "",
                "| policy | setup | out tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | SLO attainment "
                "| rejected | busy share | padding |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for p, r in runs.items():
                lines.append(
                    f"| {p} | {r['setup']} | {_f(r['output_throughput'])} | {_f(r['p50_ttft_ms'], 0)} / "
                    f"{_f(r['p99_ttft_ms'], 0)} | {_f(r['p50_tpot_ms'], 1)} / {_f(r['p99_tpot_ms'], 1)} | "
                    f"{_f(r['slo_attainment'], 3)} | {r['rejected']} | {_f(r['busy_share'], 3)} | "
                    f"{_f(r['padding_ratio'], 3)} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def paper_plots(data: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    workloads = list(data["offline"])
    policies = list(data["offline"][workloads[0]])

    def bars(metric: str, ylabel: str, name: str) -> None:
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(policies)
        for i, p in enumerate(policies):
            xs = [j + i * width for j in range(len(workloads))]
            ax.bar(xs, [data["offline"][w][p][metric] for w in workloads], width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} (simulated, offline)")
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    bars("output_throughput", "output tokens/s", "offline_throughput.png")
    bars("padding_ratio", "padding ratio", "padding_ratio.png")
    bars("busy_share", "GPU busy share", "busy_share.png")

    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=True):
        for p, points in data["online"][w].items():
            ax.plot([x["rate"] for x in points], [x["slo_attainment"] for x in points], marker="o", label=p)
        ax.axhline(0.8, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_ylabel("SLO attainment")
        ax.set_title(w)
    axes[0][0].legend()
    fig.suptitle("SLO attainment vs rate (simulated, 4 x A100-40GB)")
    fig.tight_layout()
    path = out_dir / "slo_attainment.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def topology_tables(data: dict[str, Any]) -> str:
    lines = ["## Setup", "", f"Policy `{data['policy']}` on every instance.", ""]
    lines += [f"- {t}: {d}" for t, d in data["setup"].items()]
    for w, by_rate in data["runs"].items():
        lines += ["", f"## {w}", "", "Load capacity (highest Poisson rate with SLO attainment >= 80%):", ""]
        lines += ["| topology | capacity (req/s) |", "|---|---|"]
        lines += [f"| {t} | {_f(c, 2)} |" for t, c in data["capacity"][w].items()]
        for rate, row in by_rate.items():
            lines += [
                "",
                f"**{rate} req/s**",
                "",
                "| topology | out tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | short TTFT p99 (ms) "
                "| SLO attainment |",
                "|---|---|---|---|---|---|",
            ]
            for t, r in row.items():
                lines.append(
                    f"| {t} | {_f(r['output_throughput'])} | "
                    f"{_f(r['p50_ttft_ms'])} / {_f(r['p99_ttft_ms'])} | "
                    f"{_f(r['p50_tpot_ms'])} / {_f(r['p99_tpot_ms'])} | {_f(r['p99_short_ttft_ms'])} | "
                    f"{_f(r['slo_attainment'], 3)} |"
                )
    return "\n".join(lines) + "\n"
