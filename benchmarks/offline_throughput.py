"""Offline throughput on real ShareGPT requests: bucketserve versus static-batch HF transformers.

What it measures
    N requests sampled from ShareGPT (seeded; prompt 4..1024 tokens, output length = the
    reference reply's token count capped at 256, as in vLLM's benchmark_throughput) are sent as
    raw prompt text, no chat template. Each request generates exactly its output length
    (greedy, EOS ignored), so both systems do the same useful work.

    1. bucketserve: every request goes to ``LLM.generate`` at once; the scheduler batches them.
       Only ``generate`` is timed (not the model load).
    2. HF transformers: ``AutoModelForCausalLM.generate`` on the same converted weights and dtype,
       in static batches of ``--hf-batch-size`` requests in order (left padding). A batch runs to
       its longest output; only each request's own output length counts as useful tokens.

    For each system it prints requests, prompt/output tokens, wall time, output tokens/s, total
    tokens/s, requests/s and peak RSS, plus the engine's padding ratio, steps, preemptions,
    mean schedule time per step and KV cache element type; then the speed-up (ours / HF
    output tokens/s) against the 3x target.

How to run
    .venv/bin/python benchmarks/offline_throughput.py                     # 200 prompts, both systems
    .venv/bin/python benchmarks/offline_throughput.py --num-prompts 16    # a quick check
    .venv/bin/python benchmarks/offline_throughput.py --skip-hf --output-json results.json
    .venv/bin/python benchmarks/offline_throughput.py --skip-hf --kv-cache-dtype model  # a bf16 cache
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bucketserve import LLM, SamplingParams
from bucketserve.config import (
    DTYPES,
    KV_CACHE_DTYPES,
    OFFLINE_SCHEDULER_DEFAULTS,
    QUANTIZATIONS,
    EngineConfig,
    SchedulerConfig,
    parse_bytes,
)
from bucketserve.core.policies import policy_names
from bucketserve.errors import BucketServeError
from bucketserve.wire import write_json
from bucketserve.workloads.sharegpt import SampledRequest, load_conversations, sample_sharegpt

TARGET_SPEEDUP = 3.0
CEILING_TARGET = 0.40  # issue 11: share of the bf16 compute ceiling, prompt + output tokens
CEILING_READINGS = 3  # on each side of the run
MAX_PROMPT_LEN = 1024
MAX_OUTPUT_LEN = 256


@dataclass
class Result:
    system: str
    requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float
    peak_rss_mib: float
    extra: dict[str, Any]

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    @property
    def req_s(self) -> float:
        return self.requests / self.elapsed_s

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "output_tok_s": self.output_tok_s,
            "total_tok_s": self.total_tok_s,
            "req_s": self.req_s,
        }


# -- memory ------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident memory since the last reset (VmHWM), else the process peak (ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


# -- the two systems ---------------------------------------------------------------------


def run_bucketserve(llm: Any, requests: list[SampledRequest]) -> Result:
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    stats = llm.engine.stats
    steps0, sched0, pre0 = stats.steps, stats.schedule_time, stats.preemptions
    reset_peak_rss()
    start = time.perf_counter()
    outputs = llm.generate([r.prompt for r in requests], params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    for r, out in zip(requests, outputs, strict=True):
        got = len(out.outputs[0].token_ids)
        if got != r.output_len or len(out.prompt_token_ids) != r.prompt_len:
            raise RuntimeError(
                f"request {out.request_id}: expected {r.prompt_len} prompt + {r.output_len} output tokens, "
                f"got {len(out.prompt_token_ids)} + {got} (finish_reason {out.outputs[0].finish_reason})"
            )
    steps = stats.steps - steps0
    return Result(
        system="bucketserve",
        requests=len(requests),
        prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
        output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        elapsed_s=elapsed,
        peak_rss_mib=peak_rss_mib(),
        extra={
            "padding_ratio": stats.padding_ratio,
            "steps": steps,
            "preemptions": stats.preemptions - pre0,
            "mean_schedule_ms_per_step": 1e3 * (stats.schedule_time - sched0) / max(steps, 1),
            "kv_cache_dtype": str(llm.engine.kv_cache_dtype).removeprefix("torch."),
        },
    )


def run_hf(model_path: Path, dtype: Any, requests: list[SampledRequest], batch_size: int) -> Result:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reset_peak_rss()
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    generated = 0  # tokens HF actually computed, padding to each batch's longest output included
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(batches, desc="HF batches", unit="batch"):
            enc = tokenizer(
                [r.prompt for r in batch], return_tensors="pt", padding=True, add_special_tokens=False
            )
            if enc["attention_mask"].sum(dim=1).tolist() != [r.prompt_len for r in batch]:
                raise RuntimeError("the HF tokenizer split a prompt differently from the engine's")
            new = max(r.output_len for r in batch)
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=tokenizer.eos_token_id,
            )
            got = out.shape[1] - enc["input_ids"].shape[1]
            if got != new:
                raise RuntimeError(f"HF generated {got} tokens for a batch that asked for {new}")
            generated += got * len(batch)
    elapsed = time.perf_counter() - start
    useful = sum(r.output_len for r in requests)
    return Result(
        system="hf-transformers",
        requests=len(requests),
        prompt_tokens=sum(r.prompt_len for r in requests),
        output_tokens=useful,
        elapsed_s=elapsed,
        peak_rss_mib=peak_rss_mib(),
        extra={
            "batch_size": batch_size,
            "generated_tokens": generated,
            "wasted_output_ratio": 1 - useful / generated if generated else 0.0,
        },
    )


# -- reporting ---------------------------------------------------------------------------


def print_result(r: Result) -> None:
    print(f"\n== {r.system} ==")
    rows = [
        ("requests", f"{r.requests}"),
        ("prompt tokens", f"{r.prompt_tokens}"),
        ("output tokens", f"{r.output_tokens}"),
        ("wall time (s)", f"{r.elapsed_s:.2f}"),
        ("output tokens/s", f"{r.output_tok_s:.1f}"),
        ("total tokens/s", f"{r.total_tok_s:.1f}"),
        ("requests/s", f"{r.req_s:.3f}"),
        ("peak RSS (MiB)", f"{r.peak_rss_mib:.0f}"),
    ]
    for key, value in r.extra.items():
        rows.append((key.replace("_", " "), f"{value:.4f}" if isinstance(value, float) else f"{value}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def speedup_line(ours: Result, hf: Result) -> tuple[float, str]:
    ratio = ours.output_tok_s / hf.output_tok_s
    verdict = "met" if ratio >= TARGET_SPEEDUP else "NOT met"
    return ratio, (
        f"speed-up (output tok/s, bucketserve / HF): {ratio:.2f}x  (target {TARGET_SPEEDUP:.0f}x: {verdict})"
    )


# -- main --------------------------------------------------------------------------------


def size_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except BucketServeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows each option's default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--num-prompts", type=int, default=200, help="ShareGPT requests to sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the ShareGPT sample")
    p.add_argument("--hf-batch-size", type=int, default=8, help="static batch size of the HF baseline")
    p.add_argument("--skip-hf", action="store_true", help="run bucketserve only")
    p.add_argument(
        "--skip-ceiling",
        action="store_true",
        help="do not measure the machine's compute ceiling (three times before and after the run, "
        "the highest kept)",
    )
    sched = SchedulerConfig()
    p.add_argument(
        "--policy", choices=policy_names(), default=sched.policy, help="bucketserve: scheduling policy"
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=OFFLINE_SCHEDULER_DEFAULTS["max_num_seqs"],
        help="bucketserve: most sequences running at once (default: LLM's offline default)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=OFFLINE_SCHEDULER_DEFAULTS["max_num_batched_tokens"],
        help="bucketserve: token budget per step (prefill chunks + decodes) (default: LLM's offline default)",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=size_arg,
        default="2GiB",
        metavar="BYTES",
        help="bucketserve: bytes for the KV-cache pool, e.g. 2GiB or 512MB",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="compute dtype of both systems; auto = bfloat16 where the CPU runs it fast, else float32",
    )
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=EngineConfig().quantization,
        help="bucketserve: the CPU weight formats the start-up tuning may pick (see `serve --help`)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=EngineConfig().kv_cache_dtype,
        help="bucketserve: the KV cache's element type (see `serve --help`)",
    )
    p.add_argument(
        "--output-json", type=Path, default=None, metavar="PATH", help="also write the figures here as JSON"
    )
    a = p.parse_args(argv)
    if a.num_prompts < 1 or a.hf_batch_size < 1:
        p.error("--num-prompts and --hf-batch-size must be >= 1")
    return a


def build_llm(a: argparse.Namespace) -> Any:
    return LLM(
        policy=a.policy,
        kv_cache_memory=a.kv_cache_memory,
        dtype=a.dtype,
        quantization=a.quantization,
        kv_cache_dtype=a.kv_cache_dtype,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    # The ceiling is read CEILING_READINGS times before the run and as many after it, and the
    # highest reading kept: on a shared VM a reading can land in a stretch where AMX runs at
    # 60% (measured: 593 and 928 GFLOP/s minutes apart; 934, 920 and 528 within 20 s), and a
    # low one would flatter the share (one before and one after both read ~535 once).
    ceilings = []
    if not a.skip_ceiling:
        from machine_ceiling import Ceiling, measure_ceiling  # beside this script

        ceilings += [measure_ceiling() for _ in range(CEILING_READINGS)]
    llm = build_llm(a)
    model_path, dtype = llm.engine.model_path, llm.engine.dtype
    conversations = load_conversations()
    requests = sample_sharegpt(
        llm.get_tokenizer(),
        a.num_prompts,
        seed=a.seed,
        max_prompt_len=MAX_PROMPT_LEN,
        max_output_len=MAX_OUTPUT_LEN,
    )
    prompt_tokens, output_tokens = sum(r.prompt_len for r in requests), sum(r.output_len for r in requests)
    print(
        f"model {model_path} ({str(dtype).removeprefix('torch.')}); {len(conversations)} ShareGPT "
        f"conversations, sampled {len(requests)} requests (seed {a.seed}): "
        f"{prompt_tokens} prompt + {output_tokens} output tokens"
    )

    ours = run_bucketserve(llm, requests)
    print_result(ours)
    del llm
    gc.collect()
    ceiling = None
    if not a.skip_ceiling:
        ceilings += [measure_ceiling() for _ in range(CEILING_READINGS)]
        ceiling = functools.reduce(Ceiling.higher, ceilings)
        print("\n== share of this machine's compute ceiling (benchmarks/machine_ceiling.py) ==")
        before, after = (
            ", ".join(f"{c.gflops['bf16']:.0f}" for c in part)
            for part in (ceilings[:CEILING_READINGS], ceilings[CEILING_READINGS:])
        )
        print(f"  bf16 GEMM read {before} GFLOP/s before the run, {after} after: the highest kept")
        for kind in ceiling.gflops:  # not `dtype`: the report below names the model's
            tps = ceiling.tokens_per_s(kind)
            print(
                f"  {kind} GEMM {ceiling.gflops[kind]:.0f} GFLOP/s -> ceiling {tps:.0f} tokens/s; "
                f"bucketserve {ours.total_tok_s:.0f} total tokens/s = {100 * ours.total_tok_s / tps:.1f}%"
            )
        share = ours.total_tok_s / ceiling.tokens_per_s("bf16")
        verdict = "met" if share >= CEILING_TARGET else "NOT met"
        print(f"  target: >= {100 * CEILING_TARGET:.0f}% of the bf16 ceiling: {100 * share:.1f}% ({verdict})")

    report: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "model_path": str(model_path),
        "dtype": str(dtype).removeprefix("torch."),
        "bucketserve": ours.to_dict(),
    }
    if ceiling is not None:
        report["ceiling"] = {
            "flops_per_token": ceiling.flops_per_token,
            "gflops": ceiling.gflops,
            "share_of_bf16_ceiling": ours.total_tok_s / ceiling.tokens_per_s("bf16"),
            "share_of_best_ceiling": ours.total_tok_s / ceiling.best[1],
        }
    if not a.skip_hf:
        hf = run_hf(model_path, dtype, requests, a.hf_batch_size)
        print_result(hf)
        ratio, line = speedup_line(ours, hf)
        print(f"\n{line}")
        report.update(hf=hf.to_dict(), speedup=ratio, target_speedup=TARGET_SPEEDUP)

    if a.output_json:
        write_json(a.output_json, report)
        print(f"wrote {a.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
