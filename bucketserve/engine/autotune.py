"""Measures, once per machine and model, which weight format runs each step size fastest.

For each row count in ``ROW_BUCKETS`` and each format a linear may hold (weights.py), one
pass over the linears of the first few decoder layers is timed (best of a few); the fastest
format wins that bucket. Four ``FormatPlan``s come out of the one measurement: the decoder
layers' for prompt tokens, the same among the formats that keep the activations exact
(``EXACT_PROMPT_FORMATS``: what ``--quantization auto`` runs prompt tokens in, in the linears
where w8a8 misses the calibration text's bound, optimize.py), theirs for decode rows, and the
LM head's; a step that carries both kinds of rows runs each by its own plan. The
result is cached as JSON under ``<cache dir>/tuning``, named by everything it depends on
(model, dtype, quantization, torch version, CPU flags, threads), so later starts read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bucketserve.engine.device import cpu_flags
from bucketserve.engine.weights import FORMATS, INT8_ACTIVATIONS, WEIGHT_ONLY, FormatPlan, MultiFormatLinear

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TUNE_LAYERS = 8  # layers timed per pass: enough to spill the caches, few enough to be quick
REPEATS = 3
MIN_TIMED_S = 0.05  # a format's pass is timed at least this long in all (short passes repeat)
MAX_REPEATS = 50
TIE = 0.05
BYTES_PER_WEIGHT = {"int4": 0.5, "w4a8": 0.5, "int8": 1, "w8a8": 1, "bf16": 2, "fp32": 4}
VERSION = 9  # bump when what is measured or offered changes (9: stalls re-timed)
# A pass timed this much slower than the same format's pass over more rows (which does more
# work) is timed again, up to RETIMES times: it fell into a stall of the machine.
STALL = 1.5
RETIMES = 2
# The formats that keep the activations exact: what --quantization auto runs prompt tokens
# in, in a decoder linear whose w8a8 output misses the calibration text by more than
# weights.PROMPT_W8A8_TOLERANCE. A prompt's K/V are read by every token of its reply, so its
# rounding is held to a measured bound per linear; w8a8 on every linear (--quantization w8a8)
# costs +1.3% perplexity and flips the README's greedy answer, the bound's 90 of 120 linears
# +0.9% and keep it.
EXACT_PROMPT_FORMATS = frozenset(FORMATS) - set(INT8_ACTIVATIONS)
# Formats whose cost grows with M at least as fast as the best one's: once one loses by 1.5x
# at two row counts in a row it is not measured at larger ones.
STOPS_PAYING = (*WEIGHT_ONLY, "w4a8")


@dataclass(frozen=True)
class TunedPlans:
    layers: FormatPlan  # the decoder layers' prompt tokens
    exact_layers: FormatPlan  # the same among EXACT_PROMPT_FORMATS
    decode_layers: FormatPlan  # the decoder layers' decode rows
    lm_head: FormatPlan
    timings: dict[str, dict[str, float]]  # part -> "format@rows" -> ms per pass

    def to_dict(self) -> dict:
        return {
            "version": VERSION,
            "layers": self.layers.to_dict(),
            "exact_layers": self.exact_layers.to_dict(),
            "decode_layers": self.decode_layers.to_dict(),
            "lm_head": self.lm_head.to_dict(),
            "timings": self.timings,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TunedPlans:
        return cls(
            FormatPlan.from_dict(d["layers"]),
            FormatPlan.from_dict(d["exact_layers"]),
            FormatPlan.from_dict(d["decode_layers"]),
            FormatPlan.from_dict(d["lm_head"]),
            d["timings"],
        )

    def describe(self) -> str:
        return (
            f"decoder layers {self.layers.describe()} (where w8a8 misses the calibration bound: "
            f"{self.exact_layers.describe()}; decode rows: {self.decode_layers.describe()}); "
            f"lm head {self.lm_head.describe()}"
        )


def cache_key(parts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in (f"v{VERSION}", torch.__version__, str(torch.get_num_threads()), cpu_flags(), *parts):
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _time_pass(fn: Callable[[], object]) -> float:
    """The best of at least REPEATS passes and of as many as fill MIN_TIMED_S (up to
    MAX_REPEATS): a short pass timed three times can fall entirely inside one stall of a
    shared VM (the LM head at one row measured 4.5 ms in int8 at a server start, 1.2 ms
    after, and fp32 won that bucket)."""
    fn()  # warm: first calls allocate and pick kernels
    best = float("inf")
    start = time.perf_counter()
    for i in range(MAX_REPEATS):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if i + 1 >= REPEATS and time.perf_counter() - start >= MIN_TIMED_S:
            break
    return best * 1e3


def _measure_part(
    layers: list[tuple[MultiFormatLinear, dict[str, tuple[torch.Tensor, ...]]]],
    dtype: torch.dtype,
    bar: tqdm,
) -> dict[int, dict[str, float]]:
    """ms per pass over ``layers`` for each row bucket and each format all of them hold."""
    formats = [f for f in FORMATS if all(f in cands for _, cands in layers)]
    measured: dict[int, dict[str, float]] = {}
    losing: dict[str, int] = {}

    def time_format(fmt: str, rows: int) -> float:
        for lin, cands in layers:
            lin.pack(FormatPlan.single(fmt), cands)
        inputs = {lin.in_features: torch.randn(rows, lin.in_features, dtype=dtype) for lin, _ in layers}

        def one_pass(fmt: str = fmt, inputs: dict[int, torch.Tensor] = inputs) -> None:
            for lin, _ in layers:
                lin.forward_format(inputs[lin.in_features], fmt)

        return _time_pass(one_pass)

    for rows in ROW_BUCKETS:
        at = measured[rows] = {}
        for fmt in formats:
            if losing.get(fmt, 0) >= 2:  # weight-only kernels only fall further behind as M grows
                bar.update(1)
                continue
            at[fmt] = time_format(fmt, rows)
            bar.update(1)
        # Weight-only formats against the best that keeps the activations exact, as the
        # prompt plan may have to choose among those alone; w4a8 (decode rows only) against all.
        best_exact = min(ms for f, ms in at.items() if f in EXACT_PROMPT_FORMATS)
        best = min(at.values())
        for fmt in STOPS_PAYING:
            if fmt in at:
                rival = best_exact if fmt in WEIGHT_ONLY else best
                losing[fmt] = losing.get(fmt, 0) + 1 if at[fmt] > 1.5 * rival else 0
    _retime_stalls(measured, time_format)
    return measured


def _retime_stalls(measured: dict[int, dict[str, float]], time_format: Callable[[str, int], float]) -> None:
    """Time again (up to RETIMES times, keeping the best) each pass timed over STALL x the same
    format's pass at a larger row count: a pass over more rows does at least the work of one
    over fewer, so it fell into a stall of the machine. (A cached table whose figures were all
    ~10x this machine's timed w8a8 at 651 ms a pass at 2 rows and 3.2 at 4, bf16 at 624 at 64
    rows and 342 at 128, and its plans ran 17-64 decode rows in w8a8 off the fused w4a8 path: a
    32-row decode step took 64.1 / 47.6 ms on it, 44.7 / 41.0 re-tuned; RESULTS, issue 13,
    thirty-seventh session.) A format that is slower at fewer rows on every try keeps its
    time: a kernel's path for small M can be slow, and the step runs that path."""
    larger: dict[str, float] = {}  # each format's fastest pass at the row counts above
    for rows in sorted(measured, reverse=True):
        at = measured[rows]
        for fmt in list(at):
            for _ in range(RETIMES):
                if at[fmt] <= STALL * larger.get(fmt, math.inf):
                    break
                at[fmt] = min(at[fmt], time_format(fmt, rows))
            larger[fmt] = min(at[fmt], larger.get(fmt, math.inf))


def _choose(name: str, measured: dict[int, dict[str, float]], allowed: frozenset[str]) -> FormatPlan:
    """The fastest of the ``allowed`` formats for each row bucket, as a plan."""
    bounds: list[int] = []
    chosen: list[str] = []
    for rows in ROW_BUCKETS:
        at = {f: ms for f, ms in measured[rows].items() if f in allowed}
        best_ms = min(at.values())
        # Timings within TIE of the fastest are a tie, which the format with the fewest bytes
        # per weight wins: the pass runs warm in the caches where a real step does not, and a
        # tie measured here was a loss in the step (w8a8 against int4 at M = 1: 1.21 against
        # 1.24 ms here, a decode step 12.5 against 9.8 ms).
        tied = [f for f, ms in at.items() if ms <= best_ms * (1 + TIE)]
        fmt = min(tied, key=lambda f: (BYTES_PER_WEIGHT[f], at[f]))
        if chosen and chosen[-1] == fmt:
            bounds[-1] = rows
        else:
            bounds.append(rows)
            chosen.append(fmt)
    plan = FormatPlan(tuple(bounds), tuple(chosen))
    log.info("weight formats for %s: %s", name, plan.describe())
    return plan


def _flat(measured: dict[int, dict[str, float]]) -> dict[str, float]:
    return {f"{fmt}@{rows}": round(ms, 3) for rows, at in measured.items() for fmt, ms in at.items()}


def tune(
    decoder_linears: list[list[MultiFormatLinear]],
    lm_head: MultiFormatLinear,
    dtype: torch.dtype,
    quantization: str,
    cache_file: Path | None,
) -> TunedPlans:
    """The plans for this model on this machine: read from ``cache_file`` or measured (with a
    progress bar) and written there."""
    if cache_file is not None and cache_file.exists():
        try:
            plans = TunedPlans.from_dict(json.loads(cache_file.read_text()))
            log.info("weight formats from %s: %s", cache_file, plans.describe())
            return plans
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable tuning file %s: %s", cache_file, e)
    sample = [
        (lin, lin.candidate_formats(quantization)) for layer in decoder_linears[:TUNE_LAYERS] for lin in layer
    ]
    head = [(lm_head, lm_head.candidate_formats(quantization))]
    total = sum(len(c) for c in (sample[0][1], head[0][1])) * len(ROW_BUCKETS)
    with (
        torch.inference_mode(),
        tqdm(total=total, desc="tuning weight formats", unit="test", leave=False) as bar,
    ):
        layer_times = _measure_part(sample, dtype, bar)
        head_times = _measure_part(head, dtype, bar)
    every = frozenset(FORMATS)
    for lin, _ in (*sample, *head):
        lin.unpack()
    plans = TunedPlans(
        _choose("decoder layers, prompt tokens", layer_times, every),
        _choose("decoder layers, prompt tokens, exact activations", layer_times, EXACT_PROMPT_FORMATS),
        _choose("decoder layers, decode rows", layer_times, every),
        _choose("lm head", head_times, every),
        {"layers": _flat(layer_times), "lm_head": _flat(head_times)},
    )
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(plans.to_dict(), indent=1))
        os.replace(tmp, cache_file)
    return plans
