"""All configuration, in one place, validated when it is built.

Pure Python (the scheduling core imports it). Values that depend on the model or the machine
(the model's context length, the KV pool size) are resolved by the engine at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bucketserve.errors import ConfigError

POLICIES = ("bucket", "continuous", "static", "uellm", "distserve")
ORDERS = ("fcfs", "sjf", "ljf", "edf")
SPLIT_MODES = ("bisect", "optimal")
RESERVES = ("max_tokens", "predicted")
DTYPES = ("auto", "bfloat16", "float32", "float16")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("auto", "none", "int8", "int4")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


@dataclass
class OrderConfig:
    """Who goes first among waiting requests (every policy that orders uses this).

    Each request gets a fixed urgency key, in seconds; the lowest runs first:

        key = arrival + priority * aging_s            (fcfs)
            + ttft_slo (or default_ttft_slo_s)        (edf)
            + predicted job tokens * token_weight_s   (sjf; minus for ljf)

    Because the key never changes after arrival, aging is built in: a request is overtaken
    only by requests that arrive less than (its key - their key offset) later, so no request
    waits forever. Priorities are integers, lower first, as in vLLM.
    """

    order: str = "fcfs"
    aging_s: float = 1.0  # one priority level is worth this much waiting
    token_weight_s: float = 0.001  # sjf/ljf: one token of job size is worth this much waiting
    default_ttft_slo_s: float = 10.0  # edf: the deadline of a request without its own TTFT SLO

    def __post_init__(self) -> None:
        _one_of("order", self.order, ORDERS)
        _check(self.aging_s >= 0, f"aging_s must be >= 0, got {self.aging_s}")
        _check(self.token_weight_s >= 0, f"token_weight_s must be >= 0, got {self.token_weight_s}")
        _check(self.default_ttft_slo_s > 0, f"default_ttft_slo_s must be > 0, got {self.default_ttft_slo_s}")


@dataclass
class BucketConfig:
    """BucketServe (DESIGN section 3). Lengths are prompt tokens."""

    n_max: int | None = None  # split threshold on queued requests; None: max_num_seqs
    theta: float = 0.5  # split a crowded bucket when more than this share sits below its midpoint
    dispatch_window_s: float = 0.05  # dispatch a bucket whose most urgent request waited this long
    initial_boundaries: tuple[int, ...] = ()  # inner boundaries to start with; () = one bucket
    split_mode: str = "bisect"  # bisect at the midpoint (paper) | optimal (least expected padding)
    reserve: str = "max_tokens"  # KV reserved per request: prompt + max_tokens | + predicted output
    memory_safety: float = 0.9  # M_safe = memory_safety x free KV memory

    def __post_init__(self) -> None:
        _check(self.n_max is None or self.n_max >= 1, f"n_max must be >= 1, got {self.n_max}")
        _check(0 < self.theta < 1, f"theta must be in (0, 1), got {self.theta}")
        _check(self.dispatch_window_s >= 0, f"dispatch_window_s must be >= 0, got {self.dispatch_window_s}")
        self.initial_boundaries = tuple(sorted(set(self.initial_boundaries)))
        _check(all(b > 0 for b in self.initial_boundaries), "initial boundaries must be > 0")
        _one_of("split mode", self.split_mode, SPLIT_MODES)
        _one_of("reserve", self.reserve, RESERVES)
        _check(0 < self.memory_safety <= 1, f"memory_safety must be in (0, 1], got {self.memory_safety}")


@dataclass
class StaticConfig:
    """Static batching (HF generate): FCFS batches of a fixed size, padded, run to completion."""

    batch_size: int = 8

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"static batch_size must be >= 1, got {self.batch_size}")


@dataclass
class UELLMConfig:
    """UELLM's SLO_ODBS batching, with the constants of its released code (HYIUYOU/UELLM)."""

    a: float = 1.0  # weight of the SLO (seconds) in the sort key
    b: float = 0.5  # weight of the predicted output length (tokens) in the sort key
    batch_cap: int = 10
    threshold: float = 15000.0  # (out - current_max) x (len + 1) x 1.2 must stay under this

    def __post_init__(self) -> None:
        _check(self.batch_cap >= 1, f"uellm batch_cap must be >= 1, got {self.batch_cap}")
        _check(self.threshold > 0, f"uellm threshold must be > 0, got {self.threshold}")


@dataclass
class DistServeConfig:
    """DistServe's prefill batching: short prompts batched up to a saturation token count,
    longer ones alone; decode by continuous batching."""

    prefill_saturation_tokens: int = 512

    def __post_init__(self) -> None:
        _check(
            self.prefill_saturation_tokens >= 1,
            f"prefill_saturation_tokens must be >= 1, got {self.prefill_saturation_tokens}",
        )


@dataclass
class SchedulerConfig:
    policy: str = "bucket"
    max_num_seqs: int = 128  # the most sequences running at once
    max_num_batched_tokens: int = 1024  # token budget per step (prefill chunks + decodes)
    enable_chunked_prefill: bool = True  # continuous only
    order: OrderConfig = field(default_factory=OrderConfig)
    bucket: BucketConfig = field(default_factory=BucketConfig)
    static: StaticConfig = field(default_factory=StaticConfig)
    uellm: UELLMConfig = field(default_factory=UELLMConfig)
    distserve: DistServeConfig = field(default_factory=DistServeConfig)

    def __post_init__(self) -> None:
        _one_of("policy", self.policy, POLICIES)
        _check(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _check(
            self.max_num_batched_tokens >= 1,
            f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}",
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
    # CPU weight formats the start-up tuning may pick per step size: auto = with bfloat16
    # compute, int8/int4 only where they reproduce the weights within 1% (a GGUF Q4 model's
    # int4 does), nothing quantized in float32; none = the model's dtype and fp32 only;
    # int8 / int4 = offer that quantization whatever it costs.
    quantization: str = "auto"
    # No native kernels, no weight-format tuning: every op is torch's, as in vLLM's flag.
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0 < self.kv_cache_fraction <= 0.95:
            raise ConfigError(f"kv_cache_fraction must be in (0, 0.95], got {self.kv_cache_fraction}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"unknown quantization {self.quantization!r}; choose one of {', '.join(QUANTIZATIONS)}"
            )
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")


_UNITS = {
    "": 1,
    "B": 1,
    "K": 1e3,
    "KB": 1e3,
    "M": 1e6,
    "MB": 1e6,
    "G": 1e9,
    "GB": 1e9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_bytes(text: str | int) -> int:
    """Parse '2GiB', '512MB', '1e9' or an int into a byte count."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    unit = s[len(num) :]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 2GiB, 512MiB or 1000000") from None
    if value <= 0:
        raise ConfigError(f"size must be > 0, got {text!r}")
    return int(value)
