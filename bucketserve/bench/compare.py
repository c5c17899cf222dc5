"""Run one workload against several servers: ``bucketserve serve`` processes started per
policy, and/or servers already running at given URLs; each server's whole sweep in turn, or
interleaved rate by rate so that a drift of the machine's speed falls on every server alike."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bucketserve.bench.client import ClientConfig, served_model
from bucketserve.bench.servers import ServerStartError, managed_server
from bucketserve.bench.sweep import SweepPoint, capacity, run_sweep
from bucketserve.bench.workload import Workload
from bucketserve.core.policies import policy_names
from bucketserve.metrics import load_capacity
from bucketserve.options import check, check_fields, option
from bucketserve.wire import StepSample


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
    interleave: bool = option(
        False,
        help="start all servers at once (an idle one waits) and run every server at a rate before the "
        "next rate, in an order reversed at every other rate (A B, B A, ...), so that the machine's "
        "drift falls on all alike (default: one server up at a time, each running every rate)",
    )
    rounds: int = option(
        1,
        help="run the whole comparison this many times; each round's results are named NAME#R and "
        "the table adds each server's capacity from its attainment pooled over the rounds, and "
        "per server and rate the median and spread over the rounds of SLO attainment, TTFT p99 "
        "and TPOT p50",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        check(self.startup_timeout > 0, f"startup_timeout must be > 0 seconds, got {self.startup_timeout}")
        check(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")


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

    def serve_args(self, server_args: Sequence[str] = ()) -> list[str]:
        """The `bucketserve serve` arguments of a server we start: --policy, then the shared
        --server-args, then its own."""
        return [*(["--policy", self.policy] if self.policy else []), *server_args, *self.args]

    @classmethod
    def from_url_arg(cls, text: str) -> Target:
        """'NAME=URL' (or just URL, named by itself)."""
        name, sep, url = text.partition("=")
        if not sep:
            name, url = text, text
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"bad --url {text!r}: use NAME=http://HOST:PORT")
        return cls(name, url=url.rstrip("/"))


def compare_targets(
    policies: Sequence[str] | None, servers: Sequence[str] = (), urls: Sequence[str] = ()
) -> list[Target]:
    """The servers of a compare: one per policy (all of them when neither --policies nor a
    --server or --url is given), then the --server and --url entries."""
    given = [Target.from_server_arg(s) for s in servers] + [Target.from_url_arg(u) for u in urls]
    chosen = policies if policies is not None else (() if given else policy_names())
    return [Target(p, policy=p) for p in chosen] + given


def run_compare(
    targets: Sequence[Target],
    workload: Workload,
    rates: Sequence[float],
    client: ClientConfig,
    server_args: Sequence[str] = (),
    log_dir: Path | None = None,
    startup_timeout: float = 300.0,
    interleave: bool = False,
    rounds: int = 1,
    **sweep_kwargs: object,
) -> dict[str, list[SweepPoint]]:
    """Run the sweep over ``rates`` (one rate = one run) against every target, ``rounds`` times
    (results named NAME#R when more than one). A target without a URL gets a server started
    for it (one that fails to start is reported and skipped; none at all raises
    ServerStartError), stopped when done. One server up at a time, its whole sweep; or with
    ``interleave`` all up at once, every server at a rate before the next rate, the order
    reversed at every other rate (``interleaved_order``). Each server gets its
    ``warmup_requests`` before its first run. ``client.model`` empty = ask the server."""
    curves: dict[str, list[SweepPoint]] = {}

    def start(stack: contextlib.ExitStack, target: Target) -> ClientConfig | None:
        if target.url is None:
            log = log_dir / f"server-{target.name}.log" if log_dir else None
            server = managed_server(None, target.serve_args(server_args), log, startup_timeout)
        else:
            server = contextlib.nullcontext(target.url)
        try:
            url = stack.enter_context(server)
        except ServerStartError as e:  # the others are still measured
            print(f"{target.name}: not measured: {e}", file=sys.stderr)
            return None
        assert url is not None
        model = client.model or served_model(url, client.api_key)
        return dataclasses.replace(client, base_url=url, model=model)

    def measure(name: str, cfg: ClientConfig, run_rates: Sequence[float], warm: bool) -> None:
        kwargs = dict(sweep_kwargs)
        if not warm:
            kwargs["warmup_requests"] = 0
        points = asyncio.run(run_sweep(workload, run_rates, cfg, label=name, **kwargs))  # type: ignore[arg-type]
        curves.setdefault(name, []).extend(points)

    def named(name: str, r: int) -> str:
        return f"{name}#{r + 1}" if rounds > 1 else name

    if not interleave:
        for r in range(rounds):
            for target in targets:
                with contextlib.ExitStack() as stack:
                    if (cfg := start(stack, target)) is not None:
                        measure(named(target.name, r), cfg, rates, warm=True)
    else:
        with contextlib.ExitStack() as stack:
            up = {t.name: cfg for t in targets if (cfg := start(stack, t)) is not None}
            for r, rate, names in interleaved_order(list(up), rates, rounds):
                for name in names:
                    measure(named(name, r), up[name], [rate], warm=r == 0 and named(name, r) not in curves)
    if not curves:
        raise ServerStartError("no server could be measured")
    # Each server's rounds together, in the order the targets were given.
    return {n: curves[n] for t in targets for r in range(rounds) if (n := named(t.name, r)) in curves}


def interleaved_order(
    names: Sequence[str], rates: Sequence[float], rounds: int
) -> list[tuple[int, float, list[str]]]:
    """(round, rate, servers in the order they run it): every rate of every round runs all
    servers, reversed at every other rate counting across rounds (A B, B A, A B, ...), so that
    a drift of the machine's speed that is linear over two rates falls on all alike."""
    schedule = []
    for r in range(rounds):
        for i, rate in enumerate(rates):
            forward = (r * len(rates) + i) % 2 == 0
            schedule.append((r, rate, list(names) if forward else list(reversed(names))))
    return schedule


def rounds_by_server(curves: dict[str, Sequence[SweepPoint]]) -> dict[str, list[SweepPoint]]:
    """The points of every round of each server run in rounds (curves named NAME#R), by NAME."""
    out: dict[str, list[SweepPoint]] = {}
    for name, points in curves.items():
        base, sep, _ = name.rpartition("#")
        if sep:
            out.setdefault(base, []).extend(points)
    return out


def pooled_capacities(curves: dict[str, Sequence[SweepPoint]], target: float) -> dict[str, float]:
    """Per server run in rounds (curves named NAME#R): the load capacity of its SLO attainment
    averaged over the rounds at each rate (each round sends the same requests, so this is the
    attainment of all of them); empty without rounds."""
    by_server: dict[str, dict[float, list[float]]] = {}
    for base, points in rounds_by_server(curves).items():
        for p in points:
            if "slo_attainment" in p.summary and math.isfinite(p.rate):
                by_server.setdefault(base, {}).setdefault(p.rate, []).append(p.summary["slo_attainment"])
    out = {}
    for base, by_rate in by_server.items():
        rates = sorted(by_rate)
        out[base] = load_capacity(rates, [sum(by_rate[r]) / len(by_rate[r]) for r in rates], target)
    return out


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
        lines += [_capacity_line(n, c, curves[n]) for n, c in caps.items()]
        pooled = pooled_capacities(curves, target)
        if pooled:
            lines.append("pooled over the rounds (mean attainment at each rate):")
            rounds = rounds_by_server(curves)
            lines += [_capacity_line(n, c, rounds[n]) for n, c in pooled.items()]
    return "\n".join(lines)


def _spread(values: Sequence[float | None], fmt: str) -> str:
    """'MEDIAN [LOW-HIGH]' of the values that are numbers, 'n/a' where none is."""
    known = [v for v in values if v is not None and not math.isnan(v)]
    if not known:
        return "n/a"
    return f"{statistics.median(known):{fmt}} [{min(known):{fmt}}-{max(known):{fmt}}]"


def format_repeats_table(curves: dict[str, Sequence[SweepPoint]]) -> str:
    """Per server run in rounds and rate: the median over the rounds and the lowest and highest
    round of SLO attainment, TTFT p99 (of the shortest SLO class where the runs had classes:
    the chats a policy should not keep waiting) and TPOT p50, so that a difference between
    servers can be told from the machine's run-to-run spread; '' without rounds."""
    by_server = rounds_by_server(curves)
    if not by_server:
        return ""

    def short_ttft_p99(p: SweepPoint) -> float:
        classes = p.summary.get("slo_classes")
        if classes:
            return next(iter(classes.values()))["p99_ttft_ms"]
        return p.summary.get("p99_ttft_ms", math.nan)

    classed = any("slo_classes" in p.summary for pts in by_server.values() for p in pts)
    ttft = "TTFT p99 (1st class)" if classed else "TTFT p99"
    lines = [
        "over the rounds: median [lowest-highest round]",
        f"{'server':>12} {'rate':>6} {'rounds':>6} {'SLO att.':>17} {ttft:>23} {'TPOT p50':>23}",
        "(latencies in ms)",
    ]
    for name, points in by_server.items():
        for rate in sorted({p.rate for p in points}):
            at = [p for p in points if p.rate == rate]
            lines.append(
                f"{name[:12]:>12} {rate:>6.2f} {len(at):>6} "
                f"{_spread([p.summary.get('slo_attainment', math.nan) for p in at], '.2f'):>17} "
                f"{_spread([short_ttft_p99(p) for p in at], '.0f'):>23} "
                f"{_spread([p.summary.get('median_tpot_ms', math.nan) for p in at], '.1f'):>23}"
            )
    return "\n".join(lines)


# Decode-only steps of this many rows time the machine (StepSplit.decode_row_ms): in smaller
# ones the step's fixed cost outweighs its rows; larger ones come only at a high load, with the
# longer contexts of a loaded run.
SPEED_ROWS = (16, 64)


def _decode_row_ms(decode_only: Sequence[StepSample]) -> list[float]:
    lo, hi = SPEED_ROWS
    timed = (st for st in decode_only if lo <= len(st.shape.decode) <= hi)
    return [1e3 * st.duration / len(st.shape.decode) for st in timed]


@dataclass(frozen=True)
class StepSplit:
    """Where one run's engine time went: its steps with prompt tokens against its decode-only
    steps (the server's own step records, ``/debug/steps``)."""

    busy: float  # share of the run's duration (from its first recorded step) spent in steps
    prompt_steps: int
    prompt_s: float
    prompt_tokens_p50: float  # prompt tokens in a step that has any
    decode_steps: int
    decode_s: float
    # Milliseconds per decode row of the decode-only steps of SPEED_ROWS rows, at the median
    # (nan where none): the machine's speed during the run, as every policy runs such steps
    # alike (two runs of one server read 30% apart on the 2-vCPU VMs).
    decode_row_ms: float
    # The run's time of its first recorded step: a server keeps its last few thousand steps
    # (``/debug/steps``), so a long run's record can start after the run did.
    from_s: float

    @classmethod
    def of(cls, p: SweepPoint) -> StepSplit | None:
        """None where the server reported no steps (not a bucketserve server)."""
        steps = p.result.steps
        if not steps:
            return None
        from_s = max(0.0, steps[0].start)
        if p.result.duration <= from_s:
            return None
        prompt = [st for st in steps if st.shape.prefill]
        decode = [st for st in steps if not st.shape.prefill]
        return cls(
            busy=sum(st.duration for st in steps) / (p.result.duration - from_s),
            prompt_steps=len(prompt),
            prompt_s=sum(st.duration for st in prompt),
            prompt_tokens_p50=statistics.median(sum(n for n, _ in st.shape.prefill) for st in prompt)
            if prompt
            else 0.0,
            decode_steps=len(decode),
            decode_s=sum(st.duration for st in decode),
            decode_row_ms=statistics.median(timed) if (timed := _decode_row_ms(decode)) else math.nan,
            from_s=from_s,
        )


def format_step_table(curves: dict[str, Sequence[SweepPoint]]) -> str:
    """Per server (its rounds pooled) and rate, the median over the runs of where the engine's
    time went: the share of the run it was busy, its steps with prompt tokens (how many, their
    seconds, their prompt tokens at the median) and its decode-only steps. A policy that cuts
    prompts finely spends more in prompt steps for the same prompts, and every request
    decoding through them waits that long for a token. A row marked * covers only the steps the
    server still held (its record started over a second into some run); '' where no server
    reported steps. Last, the machine's speed in each run (``StepSplit.decode_row_ms``) at
    the median and [lowest-highest]: runs that read apart on it ran on a machine that did."""
    groups = rounds_by_server(curves)
    for name, points in curves.items():
        if "#" not in name:
            groups[name] = list(points)
    lines = [
        "engine steps: median over the runs (seconds; the server's /debug/steps)",
        f"{'server':>12} {'rate':>6} {'busy':>5} {'prompt steps':>12} {'their s':>8} "
        f"{'tokens p50':>10} {'decode-only':>11} {'their s':>8} {'ms/decode row':>19}",
    ]
    cut = False
    for name, points in groups.items():
        for rate in sorted({p.rate for p in points}):
            found = [StepSplit.of(p) for p in points if p.rate == rate]
            splits = [sp for sp in found if sp is not None]
            if not splits or len(splits) < len(found):
                continue  # some run has no steps to split
            partial = any(sp.from_s > 1.0 for sp in splits)
            cut |= partial

            def mid(field: str, splits: list[StepSplit] = splits) -> float:
                return statistics.median(getattr(sp, field) for sp in splits)

            lines.append(
                f"{name[:12]:>12} {rate:>6.2f} {mid('busy'):>5.2f} {mid('prompt_steps'):>12.0f} "
                f"{mid('prompt_s'):>8.1f} {mid('prompt_tokens_p50'):>10.0f} {mid('decode_steps'):>11.0f} "
                f"{mid('decode_s'):>8.1f} {_spread([sp.decode_row_ms for sp in splits], '.2f'):>19}"
                f"{' *' if partial else ''}"
            )
    if cut:
        lines.append("* from the first step the server still held, over a second into the run")
    return "\n".join(lines) if len(lines) > 2 else ""


def _capacity_line(name: str, cap: float, points: Sequence[SweepPoint]) -> str:
    """'  NAME: C', with '>=' when every rate met the target (the sweep did not bound it)."""
    top = max((p.rate for p in points if math.isfinite(p.rate)), default=math.nan)
    text = "below the lowest rate" if math.isnan(cap) else f"{cap:.3g}"
    return f"  {name}: {'>= ' if cap == top else ''}{text}"


def _class_lines(curves: dict[str, Sequence[SweepPoint]]) -> list[str]:
    """Per SLO length class (``--slo-classes``), where the runs were held to classes."""
    rows = [(n, p) for n, pts in curves.items() for p in pts if "slo_classes" in p.summary]
    if not rows:
        return []
    lines = [
        "by length class:",
        f"{'server':>12} {'rate':>6} {'class':>8} {'reqs':>5} {'SLO att.':>8} "
        f"{'TTFT p99':>9} {'TPOT p50':>9} {'missed: failed/TTFT/TPOT':>24}",
    ]
    for name, p in rows:
        for label, c in p.summary["slo_classes"].items():
            cells = ["n/a" if math.isnan(c[k]) else f"{c[k]:.2f}" for k in ("p99_ttft_ms", "median_tpot_ms")]
            # Result files from before the miss counts have none: a blank cell.
            missed = "/".join(str(n) for n in c["missed"].values()) if "missed" in c else ""
            lines.append(
                f"{name[:12]:>12} {p.rate:>6.2f} {label:>8} {c['requests']:>5} {c['slo_attainment']:>8.2f} "
                f"{cells[0]:>9} {cells[1]:>9} {missed:>24}"
            )
    if any("missed" in c for _, p in rows for c in p.summary["slo_classes"].values()):
        lines.append("(missed: no reply, e.g. a 429 or a timeout / first token late / decoded too slowly)")
    return lines
