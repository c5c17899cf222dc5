"""The ``bucketserve`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from bucketserve.bench.cli import add_bench_parser
from bucketserve.config import (
    DEVICES,
    DTYPES,
    ORDERS,
    POLICIES,
    QUANTIZATIONS,
    RESERVES,
    SPLIT_MODES,
    BucketConfig,
    DistServeConfig,
    EngineConfig,
    OrderConfig,
    SchedulerConfig,
    StaticConfig,
    UELLMConfig,
    parse_bytes,
)
from bucketserve.errors import BucketServeError, InvalidRequestError
from bucketserve.sampling_params import SamplingParams
from bucketserve.sim.cli import add_simulate_parser
from bucketserve.sim.profile import add_profile_parser

log = logging.getLogger("bucketserve")


def size_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except BucketServeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=None,
        help="Hugging Face model folder (config.json, safetensors, tokenizer). "
        "Default: the embedded SmolLM2-135M-Instruct",
    )
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="compute dtype; auto = bfloat16 where the CPU/GPU runs it fast, else float32",
    )
    g.add_argument("--device", choices=DEVICES, default="auto", help="auto = cuda if available, else cpu")
    g.add_argument(
        "--kv-cache-memory",
        type=size_arg,
        default=None,
        metavar="BYTES",
        help="bytes for the KV-cache pool, e.g. 2GiB or 512MB (overrides --kv-cache-fraction)",
    )
    g.add_argument(
        "--kv-cache-fraction",
        type=float,
        default=0.2,
        help="share of free memory for the KV-cache pool (default 0.2)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output in tokens (default: the model's context length)",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        help="where the embedded model is converted (default $BUCKETSERVE_CACHE or ~/.cache/bucketserve)",
    )
    g.add_argument(
        "--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    g.add_argument("--engine-seed", type=int, default=0, help="seed for requests without their own seed")
    g.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="auto",
        help="CPU weight formats the start-up tuning may use per step size: auto = with bfloat16 "
        "compute, int8/int4 only where they reproduce the weights within 1%% (the embedded Q4 GGUF "
        "model's int4 does), nothing quantized in float32; none = the model's dtype and fp32 only; "
        "int8/int4 = offer that quantization anyway",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="torch ops only: no native attention kernel, no weight-format tuning (as in vLLM)",
    )

    s = p.add_argument_group("scheduler")
    s.add_argument(
        "--policy",
        choices=POLICIES,
        default="bucket",
        help="bucket: BucketServe (default); continuous: vLLM-style; static: HF-style fixed "
        "batches; uellm: UELLM's SLO-ODBS batches; distserve: DistServe's prefill "
        "batching on one aggregated instance",
    )
    s.add_argument("--max-num-seqs", type=int, default=128, help="most sequences running at once")
    s.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget per step")
    s.add_argument(
        "--no-chunked-prefill",
        dest="enable_chunked_prefill",
        action="store_false",
        help="continuous: run each prompt's prefill in one step",
    )
    s.add_argument(
        "--order",
        choices=ORDERS,
        default="fcfs",
        help="who goes first: fcfs, sjf/ljf (shortest/longest job), edf (earliest TTFT deadline)",
    )
    s.add_argument(
        "--aging",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="one priority level is worth this much waiting (bounds every wait)",
    )
    s.add_argument(
        "--default-ttft-slo",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="edf: the deadline of requests without their own TTFT SLO",
    )
    b = p.add_argument_group("bucket policy")
    b.add_argument(
        "--bucket-n-max",
        type=int,
        default=None,
        help="split buckets when more requests than this wait (default: --max-num-seqs)",
    )
    b.add_argument(
        "--bucket-theta",
        type=float,
        default=0.5,
        help="split a crowded bucket when more than this share is below its midpoint",
    )
    b.add_argument(
        "--bucket-window",
        type=float,
        default=0.05,
        metavar="SECONDS",
        help="dispatch a bucket whose oldest request waited this long",
    )
    b.add_argument(
        "--bucket-boundaries",
        type=_int_list,
        default=(),
        metavar="N,N,...",
        help="initial inner bucket boundaries in prompt tokens (default: one bucket)",
    )
    b.add_argument(
        "--bucket-split-mode",
        choices=SPLIT_MODES,
        default="bisect",
        help="bisect at the midpoint (paper) or optimal (least expected padding)",
    )
    b.add_argument(
        "--bucket-reserve",
        choices=RESERVES,
        default="max_tokens",
        help="KV reserved per request: prompt + max_tokens (never preempts) or + predicted output",
    )
    o = p.add_argument_group("baseline policies")
    o.add_argument("--static-batch-size", type=int, default=8, help="static: requests per batch")
    o.add_argument("--uellm-a", type=float, default=1.0, help="uellm: weight of the SLO in the sort key")
    o.add_argument("--uellm-b", type=float, default=0.5, help="uellm: weight of the predicted output")
    o.add_argument("--uellm-batch-cap", type=int, default=10, help="uellm: most requests per batch")
    o.add_argument("--uellm-threshold", type=float, default=15000.0, help="uellm: grouping threshold")
    o.add_argument(
        "--distserve-saturation",
        type=int,
        default=512,
        help="distserve: batch short prompts up to this many tokens",
    )


def engine_configs(a: argparse.Namespace) -> tuple[EngineConfig, SchedulerConfig]:
    return (
        EngineConfig(
            model=a.model,
            dtype=a.dtype,
            device=a.device,
            kv_cache_memory=a.kv_cache_memory,
            kv_cache_fraction=a.kv_cache_fraction,
            block_size=a.block_size,
            max_model_len=a.max_model_len,
            cache_dir=a.cache_dir,
            num_threads=a.num_threads,
            seed=a.engine_seed,
            quantization=a.quantization,
            enforce_eager=a.enforce_eager,
        ),
        SchedulerConfig(
            policy=a.policy,
            max_num_seqs=a.max_num_seqs,
            max_num_batched_tokens=a.max_num_batched_tokens,
            enable_chunked_prefill=a.enable_chunked_prefill,
            order=OrderConfig(order=a.order, aging_s=a.aging, default_ttft_slo_s=a.default_ttft_slo),
            bucket=BucketConfig(
                n_max=a.bucket_n_max,
                theta=a.bucket_theta,
                dispatch_window_s=a.bucket_window,
                initial_boundaries=a.bucket_boundaries,
                split_mode=a.bucket_split_mode,
                reserve=a.bucket_reserve,
            ),
            static=StaticConfig(batch_size=a.static_batch_size),
            uellm=UELLMConfig(
                a=a.uellm_a, b=a.uellm_b, batch_cap=a.uellm_batch_cap, threshold=a.uellm_threshold
            ),
            distserve=DistServeConfig(prefill_saturation_tokens=a.distserve_saturation),
        ),
    )


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults for every prompt)")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="generate max_tokens even past end-of-sequence")


def sampling_params(a: argparse.Namespace, overrides: dict[str, Any] | None = None) -> SamplingParams:
    values = dict(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
        stop=list(a.stop),
        ignore_eos=a.ignore_eos,
    )
    values.update(overrides or {})
    try:
        return SamplingParams(**values)
    except TypeError as e:
        raise InvalidRequestError(f"unknown sampling parameter: {e}") from None


def read_prompt_file(path: str) -> list[dict[str, Any]]:
    """JSONL: each line {"prompt": "..."} or {"messages": [...]}, plus optional sampling fields."""
    file = Path(path)
    if not file.is_file():
        raise InvalidRequestError(f"prompt file {path} does not exist")
    items = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
            raise InvalidRequestError(f'{path}:{n}: each line needs exactly one of "prompt" or "messages"')
        items.append(item)
    if not items:
        raise InvalidRequestError(f"prompt file {path} holds no prompts")
    return items


def cmd_generate(a: argparse.Namespace) -> int:
    if a.file:
        items = read_prompt_file(a.file)
    else:
        key = "prompt" if a.raw else "messages"
        items = [{key: p if a.raw else [{"role": "user", "content": p}]} for p in a.prompt]
    for item in items:  # validate everything before loading the model
        if item.get("prompt") == "" or any(not m.get("content") for m in item.get("messages", [])):
            raise InvalidRequestError("the prompt is empty")
    params = [
        sampling_params(a, {k: v for k, v in it.items() if k not in ("prompt", "messages")}) for it in items
    ]

    from bucketserve.entrypoints.llm import LLM

    llm = LLM(a.model, **_llm_kwargs(a))
    engine = llm.engine
    prompts = [it["prompt"] if "prompt" in it else engine.apply_chat_template(it["messages"]) for it in items]
    outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    out = open(a.output, "w") if a.output else sys.stdout  # noqa: SIM115
    try:
        for item, o in zip(items, outputs, strict=True):
            c = o.outputs[0]
            if a.file or a.output or a.json:
                out.write(
                    json.dumps(
                        {
                            **item,
                            "text": c.text,
                            "finish_reason": c.finish_reason,
                            "prompt_tokens": len(o.prompt_token_ids),
                            "completion_tokens": len(c.token_ids),
                        }
                    )
                    + "\n"
                )
            else:
                out.write(c.text + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from bucketserve.server.launch import serve

    engine_config, scheduler_config = engine_configs(a)
    return serve(
        engine_config,
        scheduler_config,
        host=a.host,
        port=a.port,
        served_model_name=a.served_model_name,
        api_key=a.api_key or os.environ.get("BUCKETSERVE_API_KEY") or None,
        max_waiting_requests=a.max_waiting_requests,
        shutdown_grace_s=a.shutdown_grace,
        log_level=a.log_level,
    )


def _llm_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    engine, sched = engine_configs(a)
    kwargs = {k: getattr(engine, k) for k in EngineConfig.__dataclass_fields__ if k != "model"}
    kwargs.update({k: getattr(sched, k) for k in SchedulerConfig.__dataclass_fields__})
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bucketserve",
        description="LLM inference with bucket-based dynamic batching (BucketServe).",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="generate completions offline for prompts or a JSONL file",
        description="Generate offline. Prompts go through the model's chat template unless --raw is given.",
    )
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument(
        "--file",
        help='JSONL file: {"prompt": ...} or {"messages": [...]} per line, '
        "optionally with sampling fields such as max_tokens",
    )
    gen.add_argument("--raw", action="store_true", help="send --prompt text as is, without the chat template")
    gen.add_argument("--output", help="write JSONL results here instead of stdout")
    gen.add_argument("--json", action="store_true", help="print JSONL results even for --prompt")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics.",
    )
    h = srv.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    h.add_argument(
        "--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)"
    )
    h.add_argument(
        "--served-model-name",
        default="SmolLM2-135M-Instruct",
        help="the model name clients send (the --model path is accepted too)",
    )
    h.add_argument(
        "--max-waiting-requests",
        type=int,
        default=256,
        help="answer 429 (with Retry-After) beyond this many waiting requests (default 256)",
    )
    h.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $BUCKETSERVE_API_KEY, else none)",
    )
    h.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM, let in-flight requests finish for this long (default 10)",
    )
    add_engine_args(srv)
    srv.set_defaults(func=cmd_serve)
    add_bench_parser(sub)
    add_simulate_parser(sub)
    add_profile_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return args.func(args)
    except BucketServeError as e:
        print(f"bucketserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bucketserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
