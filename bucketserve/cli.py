"""The ``bucketserve`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from bucketserve.argparse_options import add_engine_options, add_server_options, engine_configs, server_config
from bucketserve.bench.cli import add_bench_parser
from bucketserve.config import OFFLINE_SCHEDULER_DEFAULTS
from bucketserve.errors import BucketServeError, InvalidRequestError
from bucketserve.sampling_params import SamplingParams
from bucketserve.sim.cli import add_simulate_parser
from bucketserve.sim.profile import add_profile_parser

log = logging.getLogger("bucketserve")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    # Request parameters (SamplingParams), not engine options: a --file line may override them.
    g = p.add_argument_group("sampling (defaults for every prompt)")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1, off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (default: 0, off)")
    g.add_argument(
        "--seed", type=int, default=None, help="per-request seed for reproducible sampling (default: none)"
    )
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable; default: none)")
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

    engine_config, scheduler_config = engine_configs(a)
    llm = LLM(engine_config=engine_config, scheduler_config=scheduler_config)
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
    server = server_config(a)
    server.api_key = server.api_key or os.environ.get("BUCKETSERVE_API_KEY") or None
    if server.on_ray:  # several engines on Ray Serve (imports Ray only then)
        from bucketserve.cluster.replicas import serve_replicas

        return serve_replicas(engine_config, scheduler_config, server, log_level=a.log_level)
    return serve(engine_config, scheduler_config, server, log_level=a.log_level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bucketserve",
        description="LLM inference with bucket-based dynamic batching (BucketServe).",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="(default: info)"
    )
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
    gen.add_argument("--output", help="write JSONL results here (default: stdout)")
    gen.add_argument("--json", action="store_true", help="print JSONL results even for --prompt")
    add_engine_options(gen, OFFLINE_SCHEDULER_DEFAULTS)  # offline, as LLM: throughput first
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics.",
    )
    add_server_options(srv)
    add_engine_options(srv)
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
