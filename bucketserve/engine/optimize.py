"""Makes a loaded model fast on this CPU: native attention kernels and tuned weight formats.

Both are built or measured once and cached under ``<cache dir>`` next to the converted
model (``kernels/``, ``tuning/``), so a later start only loads them. ``--enforce-eager``
skips this module, and a CUDA model does not use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from bucketserve.engine import kernels as native
from bucketserve.engine.autotune import TunedPlans, cache_key, tune
from bucketserve.engine.calibration import record_input_ranges, record_prompt_w8a8_errors
from bucketserve.engine.model import LlamaModel
from bucketserve.engine.weights import PROMPT_W8A8_TOLERANCE, FormatPlan, MultiFormatLinear

log = logging.getLogger(__name__)


def optimize_for_cpu(
    model: LlamaModel, model_path: Path, quantization: str, cache_dir: Path, calibration_ids: list[int]
) -> TunedPlans:
    """Load (or build) the native kernels into ``model`` and pack its linears by the tuned
    plans; returns the plans. ``calibration_ids`` (``calibration.CALIBRATION_TEXT``
    tokenized) give the activation ranges that w8a8 smooths with."""
    t0 = time.perf_counter()
    if quantization == "auto" and model.lm_head.weight.dtype != torch.bfloat16:
        # Asked for float32, a user gets exact float32 weights; in bfloat16, whose own
        # rounding is 0.4%, a quantization within 1% of the weights is in the same class.
        quantization = "none"
    kernels = native.load(cache_dir)
    model.use_kernels(kernels)
    if quantization in ("auto", "w8a8"):  # the ones that offer w8a8
        record_input_ranges(model, calibration_ids)
    config = (model_path / "config.json").read_text() if (model_path / "config.json").exists() else ""
    # The weights' files by size and time: new weights under the same path are tuned anew.
    files = sorted(
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in model_path.glob("*.safetensors")
    )
    key = cache_key(
        [str(model_path.resolve()), config, *files, str(model.lm_head.weight.dtype), quantization]
    )
    linears = model.linears()
    if quantization == "auto":  # w8a8 asks for int8 activations everywhere; auto measures where
        text = hashlib.sha256(str(calibration_ids).encode()).hexdigest()[:8]
        _prompt_w8a8_errors(model, calibration_ids, cache_dir / "tuning" / f"{key}-{text}.prompt-w8a8.json")
    plans = tune(
        linears, model.lm_head, model.lm_head.weight.dtype, quantization, cache_dir / "tuning" / f"{key}.json"
    )
    fallbacks = exact = 0
    with torch.inference_mode():
        for layer in linears:
            for lin in layer:
                error = lin.prompt_w8a8_error
                prompt_plan = plans.layers
                if error is not None and error > PROMPT_W8A8_TOLERANCE:
                    prompt_plan, exact = plans.exact_layers, exact + 1
                fallbacks += _pack(lin, prompt_plan, plans.decode_layers, quantization)
        fallbacks += _pack(model.lm_head, plans.lm_head, plans.lm_head, quantization)
    if exact and plans.layers != plans.exact_layers:
        log.info(
            "%d of %d decoder linears keep prompt activations exact (w8a8 misses the calibration "
            "text by over %.0f%% there)",
            exact,
            sum(map(len, linears)),
            100 * PROMPT_W8A8_TOLERANCE,
        )
    if fallbacks:
        log.warning(
            "%d linear(s) do not reproduce their weights within 1%% in a tuned quantized format; "
            "they run those step sizes in fp32",
            fallbacks,
        )
    seconds = time.perf_counter() - t0
    log.info(
        "CPU fast path in %.1f s: decode attention %s; weight formats: %s",
        seconds,
        "native kernel" if kernels else "torch reference",
        plans.describe(),
    )
    return plans


def _prompt_w8a8_errors(model: LlamaModel, calibration_ids: list[int], cache_file: Path) -> None:
    """Set each decoder linear's ``prompt_w8a8_error``: read from ``cache_file`` (written by
    an earlier start of the same model, dtype and machine) or measured and written there."""
    linears = [lin for layer in model.linears() for lin in layer]
    try:
        errors = json.loads(cache_file.read_text())
        if len(errors) == len(linears):
            for lin, error in zip(linears, errors, strict=True):
                lin.prompt_w8a8_error = float(error)
            return
    except (OSError, ValueError, TypeError):
        pass  # not measured yet (or unreadable): measure
    record_prompt_w8a8_errors(model, calibration_ids)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps([lin.prompt_w8a8_error for lin in linears]))
    os.replace(tmp, cache_file)


def _pack(lin: MultiFormatLinear, plan: FormatPlan, decode_plan: FormatPlan, quantization: str) -> bool:
    """Pack one linear by its plans, building only the formats they name (the others would
    cost memory). The tuning timed the first layers only: a later layer that does not offer a
    tuned quantized format runs fp32 there instead (returns True)."""
    used = plan.used | decode_plan.used
    formats = lin.candidate_formats(quantization, only=used)
    if used <= set(formats):
        lin.pack(plan, formats, decode_plan)
        return False

    def own(p: FormatPlan) -> FormatPlan:
        return FormatPlan(p.max_rows, tuple(f if f in formats else "fp32" for f in p.formats))

    lin.pack(own(plan), formats | lin.candidate_formats(quantization, only={"fp32"}), own(decode_plan))
    return True
