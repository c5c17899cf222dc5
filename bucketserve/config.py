"""Every option, in one tree, validated when it is built.

    EngineConfig      the model, the device, the KV pool                        (this module)
    SchedulerConfig   the policy, its limits, the order of waiting requests     (this module)
      .order          OrderConfig                                  (bucketserve.core.ordering)
      .policy_config  the policy's own options, e.g. BucketConfig  (its module in core/policies)
    ServerConfig      the HTTP server                                           (this module)

Each option is a dataclass field declared with ``bucketserve.options.option``: its default,
its help, its accepted forms and its choices live with the field. The command line's
engine and server options are generated from these fields (``bucketserve.argparse_options``)
and ``LLM`` takes the same values, read and checked by the same ``__post_init__``. A policy's
options are declared next to its scheduler, which registers both under the policy's name;
this module re-exports them, so every option is reachable from here.

The benchmark client's and the simulator's options are declared the same way, next to the
code they configure (they import this module, so it names them without importing them):
``bench.client.ClientConfig``, ``bench.workload.WorkloadConfig`` and ``ArrivalConfig``,
``bench.sweep.SweepConfig``, ``bench.report.ReportConfig``, ``bench.compare.CompareConfig``;
``sim.experiments.Setup``, ``SimulateConfig`` and ``ExperimentConfig``,
``sim.validate.ValidateConfig``.

Pure Python (no torch, no I/O). Values that depend on the model or the machine (the model's
context length, the KV pool size) are resolved by the engine at start-up.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from bucketserve.core.ordering import ORDERS, OrderConfig
from bucketserve.core.policies import all_policies, get_policy, policy_names
from bucketserve.core.policies.bucket import RESERVES, SPLIT_MODES, BucketConfig
from bucketserve.core.policies.continuous import ContinuousConfig
from bucketserve.core.policies.distserve import DistServeConfig
from bucketserve.core.policies.static import StaticConfig
from bucketserve.core.policies.uellm import UELLMConfig
from bucketserve.errors import ConfigError
from bucketserve.options import build, check, check_fields, option, parse_bytes

DTYPES = ("auto", "bfloat16", "float32", "float16")
DEVICES = ("auto", "cpu", "cuda")
REPLICA_ROUTERS = ("length", "power-of-two")
QUANTIZATIONS = ("auto", "none", "int8", "int4", "w8a8")
KV_CACHE_DTYPES = ("auto", "model", "int8")


@dataclass
class SchedulerConfig:
    """Which policy schedules, and the limits every policy keeps."""

    policy: str = option(
        "bucket",
        choices=policy_names,
        help="; ".join(f"{p.name}: {p.summary}" for p in all_policies()),
    )
    # 256 as vLLM's default on a GPU: bucket's step budget holds the running requests to their TPOT
    # targets however many run, and on ShareGPT over HTTP it held 80% of the SLOs to >= 28
    # req/s with 256 seats against 18.8 with 128; continuous, whose steps grow with its
    # batch, did better with 128 (docs/RESULTS.md, issue 13, twenty-second session).
    max_num_seqs: int = option(256, help="most sequences running at once")
    max_num_batched_tokens: int = option(1024, help="token budget per step (prefill chunks + decodes)")
    enable_chunked_prefill: bool = option(
        True, name="chunked-prefill", help="continuous: split a long prompt's prefill across steps"
    )
    order: OrderConfig = option(default_factory=OrderConfig, name="", help="who goes first")
    # The chosen policy's own options: its registered config, or a dict of that config's
    # fields; None means its defaults. (The command line offers every policy's options,
    # named after it: --bucket-theta, --static-batch-size, ...)
    policy_config: Any = option(None, help="the policy's own options (default: its defaults)")

    def __post_init__(self) -> None:
        check_fields(self)
        policy = get_policy(self.policy)
        if self.policy_config is None:
            self.policy_config = policy.config()
        elif isinstance(self.policy_config, dict):
            self.policy_config = build(policy.config, self.policy_config)
        elif not isinstance(self.policy_config, policy.config):
            raise ConfigError(
                f"policy {self.policy!r} takes a {policy.config.__name__} (or a dict of its fields) "
                f"as policy_config, got {type(self.policy_config).__name__}"
            )
        check(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        check(
            self.max_num_batched_tokens >= 1,
            f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}",
        )


@dataclass
class EngineConfig:
    """How to build the engine. ``model`` None means the embedded SmolLM2-135M-Instruct."""

    model: str | None = option(
        None,
        help="Hugging Face model folder (config.json, safetensors, tokenizer) "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    dtype: str = option(
        "auto",
        choices=DTYPES,
        help="compute dtype; auto = bfloat16 where the CPU/GPU runs it fast, else float32",
    )
    device: str = option("auto", choices=DEVICES, help="auto = cuda if available, else cpu")
    kv_cache_memory: int | None = option(
        None,
        parse=parse_bytes,
        metavar="BYTES",
        help="bytes for the KV-cache pool, e.g. 2GiB or 512MB; overrides --kv-cache-fraction "
        "(default: none, the fraction decides)",
    )
    kv_cache_fraction: float = option(0.2, help="share of free memory for the KV-cache pool")
    kv_cache_dtype: str = option(
        "auto",
        choices=KV_CACHE_DTYPES,
        help="int8 = each token's K and V per head as int8 codes and one float32 scale: 1.9x the "
        "tokens in the same memory, and half the bytes for decode attention to read (offline "
        "throughput +8-22% on a 2-core Xeon; +0.15% perplexity on the embedded model, "
        "benchmarks/perplexity.py); model = the compute dtype; auto = int8 where its vector "
        "kernel runs (bfloat16 compute on an AVX512-VNNI CPU, head_dim 64, at most 4 query "
        "heads per kv head, --block-size 16), else the compute dtype",
    )
    block_size: int = option(16, help="tokens per KV block")
    max_model_len: int | None = option(
        None, help="longest prompt + output in tokens (default: the model's context length)"
    )
    cache_dir: str | None = option(
        None,
        help="where the embedded model is converted and the native kernels and tuning are kept "
        "(default: $BUCKETSERVE_CACHE or ~/.cache/bucketserve)",
    )
    num_threads: int | None = option(None, help="torch CPU threads (default: torch's choice)")
    seed: int = option(0, name="engine-seed", help="seed for requests without their own seed")
    quantization: str = option(
        "auto",
        choices=QUANTIZATIONS,
        help="CPU weight formats the start-up tuning may pick per step size: auto = with bfloat16 "
        "compute, int8/int4 weights only where they reproduce the weights within 1% (the embedded Q4 "
        "GGUF model's int4 does), and int8 activations (w8a8, and w4a8 on CPUs with AVX512-VNNI) for decode "
        "rows, in the LM head, and for prompt tokens in the decoder linears whose w8a8 output stays "
        "within 2% of the exact one on a calibration text (the others keep prompt activations "
        "exact); nothing quantized in float32; none = the model's dtype and fp32 only; "
        "int8/int4 = offer that weight quantization whatever it costs; w8a8 = auto with int8 "
        "activations for prompt tokens in every linear (+1.3% perplexity on the embedded model "
        "against auto's +0.9%, and greedy answers can change)",
    )
    enforce_eager: bool = option(
        False,
        help="torch ops only: no native attention kernel, no weight-format tuning, and on CUDA no "
        "CUDA graphs of the decode steps (as in vLLM)",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        check(
            self.kv_cache_memory is None or self.kv_cache_memory > 0,
            f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}",
        )
        check(
            0 < self.kv_cache_fraction <= 0.95,
            f"kv_cache_fraction must be in (0, 0.95], got {self.kv_cache_fraction}",
        )
        check(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        check(
            self.max_model_len is None or self.max_model_len >= 2,
            f"max_model_len must be >= 2, got {self.max_model_len}",
        )
        check(
            self.num_threads is None or self.num_threads >= 1,
            f"num_threads must be >= 1, got {self.num_threads}",
        )


@dataclass
class ServerConfig:
    """The OpenAI-compatible HTTP server in front of the engine."""

    host: str = option("127.0.0.1", help="address to listen on")
    port: int = option(8000, help="port to listen on; 0 picks a free one")
    served_model_name: str = option(
        "SmolLM2-135M-Instruct", help="the model name clients send (the --model path is accepted too)"
    )
    max_waiting_requests: int = option(
        256, help="answer 429 (with Retry-After) beyond this many requests waiting for a free batch seat"
    )
    api_key: str | None = option(
        None, help="require 'Authorization: Bearer KEY' on /v1/* (default: $BUCKETSERVE_API_KEY, else none)"
    )
    shutdown_grace_s: float = option(
        10.0,
        name="shutdown-grace",
        metavar="SECONDS",
        help="on SIGTERM, let in-flight requests finish for this long",
    )
    web_ui: bool = option(
        True, help="serve the web page at /: a live view of the scheduler and a chat playground"
    )
    replicas: int | None = option(
        None,
        help="run this many engine replicas as a Ray Serve application behind one endpoint "
        "(default: one engine in this process, no Ray)",
    )
    replica_router: str = option(
        "power-of-two",
        choices=REPLICA_ROUTERS,
        help="with --replicas: how requests find a replica: power-of-two = Ray's default (the less loaded "
        "of two), length = by length band (prompt + max_tokens; bands rebalanced with the load)",
    )
    prefill_replicas: int | None = option(
        None,
        help="prefill/decode disaggregation: this many replicas run prompts and hand each prompt's KV "
        "to a decode replica (with --decode-replicas; instead of --replicas)",
    )
    decode_replicas: int | None = option(
        None,
        help="prefill/decode disaggregation: this many replicas decode, each request on the one with "
        "the most free KV memory (with --prefill-replicas)",
    )
    ray_address: str | None = option(
        None,
        name="address",
        help="with --replicas or --prefill-replicas: join this Ray cluster (HOST:PORT, or auto) instead of "
        "starting Ray here; the endpoint listens on its head node",
    )
    threads_per_replica: int | None = option(
        None,
        help="with --replicas or --prefill-replicas: torch threads and Ray CPUs per replica "
        "(default: --num-threads, else 1)",
    )
    max_request_body: int = option(
        16 * 2**20,
        parse=parse_bytes,
        metavar="BYTES",
        help="answer 413 to a request body larger than this, e.g. 16MiB (default: 16 MiB)",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        check(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        check(
            self.max_waiting_requests >= 1,
            f"max_waiting_requests must be >= 1, got {self.max_waiting_requests}",
        )
        check(self.shutdown_grace_s >= 0, f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        check(self.max_request_body >= 1, f"max_request_body must be >= 1 byte, got {self.max_request_body}")
        check(self.replicas is None or self.replicas >= 1, f"replicas must be >= 1, got {self.replicas}")
        for name in ("prefill_replicas", "decode_replicas"):
            n = getattr(self, name)
            check(n is None or n >= 1, f"{name} must be >= 1, got {n}")
        check(
            (self.prefill_replicas is None) == (self.decode_replicas is None),
            "--prefill-replicas and --decode-replicas go together",
        )
        check(
            self.replicas is None or self.prefill_replicas is None,
            "give --replicas (aggregated), or --prefill-replicas and --decode-replicas, not both",
        )
        check(self.ray_address is None or self.on_ray, "--address needs --replicas or --prefill-replicas")
        check(
            self.threads_per_replica is None or self.threads_per_replica >= 1,
            f"threads_per_replica must be >= 1, got {self.threads_per_replica}",
        )

    @property
    def on_ray(self) -> bool:
        """Whether the engines run as replicas on Ray Serve (else one engine in this process)."""
        return self.replicas is not None or self.prefill_replicas is not None


# Where ``LLM`` and ``generate`` (offline batches: throughput, no one waiting on a token)
# start from other limits than the server, as vLLM's usage-context defaults do on CPU (LLM_CLASS
# 4096 tokens a step against the API server's 2048). On the 200-request offline benchmark,
# 4096 tokens ran 6-18% faster than 1024 (alternated pairs, docs/RESULTS.md); the server keeps
# the smaller steps its latency needs. Both start from 256 sequences.
OFFLINE_SCHEDULER_DEFAULTS: Mapping[str, Any] = {"max_num_seqs": 256, "max_num_batched_tokens": 4096}


def with_options(
    engine: EngineConfig | None,
    scheduler: SchedulerConfig | None,
    options: Mapping[str, Any],
    scheduler_defaults: Mapping[str, Any] | None = None,
) -> tuple[EngineConfig, SchedulerConfig]:
    """The configs given (or the defaults) with ``options`` set, by field name, on whichever
    of the two has the field. Each config is built anew, so every value is read and checked
    as in its constructor. ``scheduler_defaults`` replace SchedulerConfig's own defaults where
    no scheduler config is given and ``options`` leave the field unset (``LLM`` passes
    OFFLINE_SCHEDULER_DEFAULTS). (How ``LLM(**options)`` is configured.)"""
    engine_names = {f.name for f in fields(EngineConfig)}
    scheduler_names = {f.name for f in fields(SchedulerConfig)}
    for name in options:
        if name not in engine_names | scheduler_names:
            close = difflib.get_close_matches(name, engine_names | scheduler_names, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"unknown option {name!r}{hint} (options are EngineConfig and SchedulerConfig fields)"
            )
    engine_options = {k: v for k, v in options.items() if k in engine_names}
    scheduler_options = {k: v for k, v in options.items() if k in scheduler_names}
    if scheduler is None and scheduler_defaults:
        scheduler_options = {**scheduler_defaults, **scheduler_options}
    if scheduler is not None and scheduler_options.get("policy", scheduler.policy) != scheduler.policy:
        # Another policy: the given config's policy options are not its options.
        scheduler_options.setdefault("policy_config", None)
    return (
        replace(engine, **engine_options) if engine else EngineConfig(**engine_options),
        replace(scheduler, **scheduler_options) if scheduler else SchedulerConfig(**scheduler_options),
    )


__all__ = [
    "DEVICES",
    "DTYPES",
    "KV_CACHE_DTYPES",
    "OFFLINE_SCHEDULER_DEFAULTS",
    "ORDERS",
    "QUANTIZATIONS",
    "RESERVES",
    "SPLIT_MODES",
    "BucketConfig",
    "ContinuousConfig",
    "DistServeConfig",
    "EngineConfig",
    "OrderConfig",
    "SchedulerConfig",
    "ServerConfig",
    "StaticConfig",
    "UELLMConfig",
    "parse_bytes",
    "with_options",
]
