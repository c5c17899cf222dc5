"""This machine's compute ceiling for the embedded model, in tokens per second.

What it measures
    GEMM throughput (FLOP/s) at large M on the model's own linear shapes (M tokens x
    hidden -> 3 x intermediate... every decoder linear and the LM head, M = 1,024), in bf16 and
    in fp32, with torch's CPU kernels (oneDNN; AMX where the CPU has it). The model's FLOPs per
    token are 2 x the weights of its linears (attention's share is small at these lengths and
    left out, which makes the ceiling higher, not lower). Ceiling = FLOP/s / FLOPs per token.

    The issue's figure is the bf16 ceiling; on a CPU whose fp32 GEMM is faster (no AMX), the
    fp32 ceiling is printed too, and the larger of the two is the honest bound.

How to run
    .venv/bin/python benchmarks/machine_ceiling.py
    (benchmarks/offline_throughput.py imports ``measure_ceiling`` and prints its share of it)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from bucketserve.engine.loader import read_config, resolve_model_path
from bucketserve.engine.model import ModelArgs


@dataclass(frozen=True)
class Ceiling:
    flops_per_token: float
    gflops: dict[str, float]  # dtype -> GFLOP/s at large M

    def tokens_per_s(self, dtype: str) -> float:
        return self.gflops[dtype] * 1e9 / self.flops_per_token

    def higher(self, other: Ceiling) -> Ceiling:
        """Each dtype's faster reading of the two (the stricter ceiling)."""
        return Ceiling(self.flops_per_token, {d: max(g, other.gflops[d]) for d, g in self.gflops.items()})

    @property
    def best(self) -> tuple[str, float]:
        dtype = max(self.gflops, key=lambda d: self.gflops[d])
        return dtype, self.tokens_per_s(dtype)


def linear_shapes(args: ModelArgs) -> list[tuple[int, int]]:
    """(out, in) of each linear of one decoder layer, fused as the engine runs them."""
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    h, i = args.hidden_size, args.intermediate_size
    return [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]


# A pass over the shapes takes ~0.1-0.3 s; on a shared VM one pass in a stall read 500
# GFLOP/s where the best of many read 900 (measured), so the best is taken over passes
# until MIN_TIMED_S have been timed (at least MIN_REPEATS of them).
MIN_REPEATS = 3
MIN_TIMED_S = 2.0
MAX_REPEATS = 30


def measure_ceiling(model: str | None = None, rows: int = 1024) -> Ceiling:
    args = ModelArgs.from_hf_config(read_config(resolve_model_path(model)))
    layer = linear_shapes(args)
    flops_per_token = 2 * (
        args.num_layers * sum(o * i for o, i in layer) + args.vocab_size * args.hidden_size
    )
    gflops = {}
    with torch.inference_mode():
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            shapes = [*layer, (args.vocab_size, args.hidden_size)]
            ws = [torch.randn(o, i, dtype=dtype) for o, i in shapes]
            xs = {i: torch.randn(rows, i, dtype=dtype) for _, i in shapes}
            work = 2 * rows * sum(o * i for o, i in shapes)
            for w in ws:  # warm
                torch.nn.functional.linear(xs[w.shape[1]], w)
            best, timed, passes = float("inf"), 0.0, 0
            while passes < MAX_REPEATS and (passes < MIN_REPEATS or timed < MIN_TIMED_S):
                t = time.perf_counter()
                for w in ws:
                    torch.nn.functional.linear(xs[w.shape[1]], w)
                elapsed = time.perf_counter() - t
                best, timed, passes = min(best, elapsed), timed + elapsed, passes + 1
            gflops[name] = work / best / 1e9
    return Ceiling(flops_per_token, gflops)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face folder (default: the embedded model)")
    a = ap.parse_args(argv)
    c = measure_ceiling(a.model)
    print(f"model FLOPs per token: {c.flops_per_token / 1e9:.3f} GFLOP ({torch.get_num_threads()} threads)")
    for dtype, g in c.gflops.items():
        print(f"  {dtype} GEMM at M=1024: {g:7.1f} GFLOP/s -> ceiling {c.tokens_per_s(dtype):7.0f} tokens/s")
    dtype, tps = c.best
    print(f"best: {dtype}, {tps:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
