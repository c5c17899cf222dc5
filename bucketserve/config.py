"""All configuration, in one place, validated when it is built.

Pure Python (the scheduling core imports it). Values that depend on the model or the machine
(the model's context length, the KV pool size) are resolved by the engine at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from bucketserve.errors import ConfigError

POLICIES = ("continuous",)
DTYPES = ("auto", "bfloat16", "float32", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class SchedulerConfig:
    policy: str = "continuous"
    max_num_seqs: int = 128  # the most sequences running at once
    max_num_batched_tokens: int = 1024  # token budget per step (prefill chunks + decodes)
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


@dataclass
class EngineConfig:
    """How to build the engine. ``model`` None means the embedded SmolLM2-135M-Instruct."""

    model: str | None = None
    dtype: str = "auto"  # auto: bfloat16 where this CPU/GPU computes it fast, else float32
    device: str = "auto"  # auto: cuda when available, else cpu
    kv_cache_memory: int | None = None  # bytes for the KV pool; overrides the fraction
    kv_cache_fraction: float = 0.2  # share of free memory for the KV pool when no bytes given
    block_size: int = 16  # tokens per KV block
    max_model_len: int | None = None  # defaults to the model's context length
    cache_dir: str | None = None  # where the embedded model is converted to (see loader)
    num_threads: int | None = None  # torch intra-op threads on CPU; None keeps torch's choice
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0 < self.kv_cache_fraction <= 0.95:
            raise ConfigError(f"kv_cache_fraction must be in (0, 0.95], got {self.kv_cache_fraction}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")


_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str | int) -> int:
    """Parse '2GiB', '512MB', '1e9' or an int into a byte count."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 2GiB, 512MiB or 1000000") from None
    if value <= 0:
        raise ConfigError(f"size must be > 0, got {text!r}")
    return int(value)
