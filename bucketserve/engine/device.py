"""Picks the device and the compute dtype."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from bucketserve.errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def cpu_flags() -> str:
    """This CPU's feature flags line from /proc/cpuinfo (the machine name where there is none):
    what -march=native code and measured timings depend on, so it names what is cached."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls ran 2-3x faster than fp32 on an EPYC with
    AVX512-BF16 (on a Xeon without AMX, large ones ran slower: the CPU fast path then keeps
    fp32 weights for large steps; the bf16 KV cache still halves attention's reads)."""
    return _cpu_has("avx512_bf16") or _cpu_has("amx_bf16")


def cpu_has_amx() -> bool:
    """AMX (amx_bf16): there torch's CPU flash attention ran a bfloat16 chunk over cached
    context about twice as fast as in fp32, where on AVX-512 Xeons without it fp32 ran 1.5x
    faster (both measured, docs/RESULTS.md)."""
    return _cpu_has("amx_bf16")


def _cpu_has(flag: str) -> bool:
    return f" {flag} " in f" {cpu_flags()} "


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        dtype = _DTYPES[name]
        if dtype == torch.float16 and device.type == "cpu":
            raise ConfigError("float16 is slow and poorly supported on CPU; use bfloat16 or float32")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
