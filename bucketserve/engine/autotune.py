"""Measures, once per machine and model, which weight format runs each step size fastest.

For each row count in ``ROW_BUCKETS`` and each format a linear may hold (weights.py), one
pass over the linears of the first few decoder layers is timed (best of a few); the fastest
format wins that bucket. The result, a ``FormatPlan`` for the decoder layers and one for the
LM head, is cached as JSON under ``<cache dir>/tuning``, named by everything it depends on
(model, dtype, quantization, torch version, CPU flags, threads), so later starts read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bucketserve.engine.device import cpu_flags
from bucketserve.engine.weights import FORMATS, WEIGHT_ONLY, FormatPlan, MultiFormatLinear

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TUNE_LAYERS = 8  # layers timed per pass: enough to spill the caches, few enough to be quick
REPEATS = 3
TIE = 0.05
BYTES_PER_WEIGHT = {"int4": 0.5, "int8": 1, "w8a8": 1, "bf16": 2, "fp32": 4}
VERSION = 4  # bump when what is measured or offered changes


@dataclass(frozen=True)
class TunedPlans:
    layers: FormatPlan
    lm_head: FormatPlan
    timings: dict[str, dict[str, float]]  # part -> "format@rows" -> ms per pass

    def to_dict(self) -> dict:
        return {
            "version": VERSION,
            "layers": self.layers.to_dict(),
            "lm_head": self.lm_head.to_dict(),
            "timings": self.timings,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TunedPlans:
        return cls(FormatPlan.from_dict(d["layers"]), FormatPlan.from_dict(d["lm_head"]), d["timings"])


def cache_key(parts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in (f"v{VERSION}", torch.__version__, str(torch.get_num_threads()), cpu_flags(), *parts):
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _time_pass(fn: Callable[[], object]) -> float:
    fn()  # warm: first calls allocate and pick kernels
    best = float("inf")
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _tune_part(
    name: str,
    layers: list[tuple[MultiFormatLinear, dict[str, tuple[torch.Tensor, ...]]]],
    dtype: torch.dtype,
    bar: tqdm,
) -> tuple[FormatPlan, dict[str, float]]:
    formats = [f for f in FORMATS if all(f in cands for _, cands in layers)]
    timings: dict[str, float] = {}
    winners: list[str] = []
    losing: dict[str, int] = {}
    for rows in ROW_BUCKETS:
        measured: dict[str, float] = {}  # this M's timings, unrounded
        for fmt in formats:
            if losing.get(fmt, 0) >= 2:  # weight-only kernels only fall further behind as M grows
                bar.update(1)
                continue
            for lin, cands in layers:
                lin.pack(FormatPlan.single(fmt), cands)
            inputs = {lin.in_features: torch.randn(rows, lin.in_features, dtype=dtype) for lin, _ in layers}

            def one_pass(fmt: str = fmt, inputs: dict[int, torch.Tensor] = inputs) -> None:
                for lin, _ in layers:
                    lin.forward_format(inputs[lin.in_features], fmt)

            measured[fmt] = ms = _time_pass(one_pass)
            timings[f"{fmt}@{rows}"] = round(ms, 3)
            bar.update(1)
        best_ms = min(measured.values())
        for fmt in formats:
            if fmt in WEIGHT_ONLY and fmt in measured:
                losing[fmt] = losing.get(fmt, 0) + 1 if measured[fmt] > 1.5 * best_ms else 0
        # Timings within TIE of the fastest are a tie, which the format with the fewest bytes
        # per weight wins: the pass runs warm in the caches where a real step does not, and a
        # tie measured here was a loss in the step (w8a8 against int4 at M = 1: 1.21 against
        # 1.24 ms here, a decode step 12.5 against 9.8 ms).
        tied = [f for f, ms in measured.items() if ms <= best_ms * (1 + TIE)]
        winners.append(min(tied, key=lambda f: (BYTES_PER_WEIGHT[f], measured[f])))
    bounds: list[int] = []
    chosen: list[str] = []
    for rows, fmt in zip(ROW_BUCKETS, winners, strict=True):
        if chosen and chosen[-1] == fmt:
            bounds[-1] = rows
        else:
            bounds.append(rows)
            chosen.append(fmt)
    plan = FormatPlan(tuple(bounds), tuple(chosen))
    log.info("weight formats for %s: %s", name, plan.describe())
    return plan, timings


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
            log.info("weight formats from %s: layers %s", cache_file, plans.layers.describe())
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
        layer_plan, layer_times = _tune_part("decoder layers", sample, dtype, bar)
        head_plan, head_times = _tune_part("lm head", head, dtype, bar)
    for lin, _ in (*sample, *head):
        lin.unpack()
    plans = TunedPlans(layer_plan, head_plan, {"layers": layer_times, "lm_head": head_times})
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(plans.to_dict(), indent=1))
        os.replace(tmp, cache_file)
    return plans
