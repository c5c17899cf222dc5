"""Makes a loaded model fast on this CPU: native attention kernels and tuned weight formats.

Both are built or measured once and cached under ``<cache dir>`` next to the converted
model (``kernels/``, ``tuning/``), so a later start only loads them. ``--enforce-eager``
skips this module, and a CUDA model does not use it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bucketserve.engine import kernels as native
from bucketserve.engine.autotune import TunedPlans, cache_key, tune
from bucketserve.engine.model import LlamaModel
from bucketserve.engine.weights import MultiFormatLinear
from bucketserve.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Optimization:
    kernels: bool  # decode attention runs the native kernel
    plans: TunedPlans
    seconds: float  # what start-up spent here


def optimize_for_cpu(model: LlamaModel, model_path: Path, quantization: str, cache_dir: Path) -> Optimization:
    t0 = time.perf_counter()
    if quantization == "auto" and model.lm_head.weight.dtype != torch.bfloat16:
        # Asked for float32, a user gets exact float32 weights; in bfloat16, whose own
        # rounding is 0.4%, a quantization within 1% of the weights is in the same class.
        quantization = "none"
    kernels = native.load(cache_dir)
    model.use_kernels(kernels)
    config = (model_path / "config.json").read_text() if (model_path / "config.json").exists() else ""
    key = cache_key([str(model_path.resolve()), config, str(model.lm_head.weight.dtype), quantization])
    linears = model.linears()
    plans = tune(
        linears, model.lm_head, model.lm_head.weight.dtype, quantization, cache_dir / "tuning" / f"{key}.json"
    )
    with torch.inference_mode():
        for layer in linears:
            for lin in layer:
                lin.pack(plans.layers, _only(lin, plans.layers.used, quantization))
        model.lm_head.pack(plans.lm_head, _only(model.lm_head, plans.lm_head.used, quantization))
    seconds = time.perf_counter() - t0
    log.info(
        "CPU fast path in %.1f s: decode attention %s; weight formats %s (lm head %s)",
        seconds,
        "native kernel" if kernels else "torch reference",
        plans.layers.describe(),
        plans.lm_head.describe(),
    )
    return Optimization(kernels is not None, plans, seconds)


def _only(lin: MultiFormatLinear, used: set[str], quantization: str) -> dict[str, tuple[torch.Tensor, ...]]:
    """The formats of ``used`` for one linear (building the others would cost memory)."""
    formats = lin.candidate_formats(quantization, only=used)
    missing = used - set(formats)
    if missing:
        raise ConfigError(
            f"the tuned weight format(s) {sorted(missing)} do not reproduce every layer of this model; "
            "start with --quantization none"
        )
    return formats
