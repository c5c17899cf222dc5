"""What a prefill chunk over cached context costs, against a fresh chunk of the same size.

What it measures
    In process, on the embedded model, policy ``continuous`` with a token budget of C per
    step and nothing else running: a request whose prompt is C tokens (one fresh chunk), and
    requests whose prompts are k x C tokens (k chunks, the last k - 1 over k x C cached
    tokens at most). Each step's time comes from the engine's step records, whose batch
    shape says how many tokens each chunk had cached. Every case runs ``--repeats`` times,
    interleaved, and the median is kept. Prints the time of the fresh chunk, of each chunk
    over cached context, and their ratio against the issue's 1.3x bound.

    Beside it, what the chunk computes against the fresh chunk (``flops``: the linears plus
    attention over every key each query sees) and the time per FLOP against the fresh
    chunk's (``per flop``). A chunk over c cached tokens does more attention than a fresh
    one, so past some c no executor can stay within 1.3x; ``per flop`` near 1.0 says the
    chunk costs what it computes, no more.

How to run
    .venv/bin/python benchmarks/chunked_prefill.py               # C = 512, 768, 1024
    .venv/bin/python benchmarks/chunked_prefill.py --chunks 256 --max-cached 1536
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict

from bucketserve import LLM, SamplingParams
from bucketserve.config import KV_CACHE_DTYPES
from bucketserve.engine.model import ModelArgs

BOUND = 1.3


def run_prompt(llm: LLM, n: int, chunk: int) -> list[tuple[int, int, float]]:
    """(chunk tokens, cached tokens, seconds) of each prefill step of one n-token prompt."""
    engine = llm.engine
    before = engine.stats.steps
    ids = [(i * 7919) % 40000 + 100 for i in range(n)]
    llm.generate([ids], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    steps = list(engine.stats.recent)[-(engine.stats.steps - before) :]
    return [(r.shape.prefill[0][0], r.shape.prefill[0][1], r.duration) for r in steps if r.shape.prefill]


def chunk_flops(args: ModelArgs, n: int, cached: int) -> float:
    """FLOPs of a prefill chunk of n tokens after ``cached`` ones (the one lm_head row aside)."""
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    h, i = args.hidden_size, args.intermediate_size
    linears = 2 * args.num_layers * h * (q + 2 * kv + q + 3 * i)  # qkv, o, gate_up, down per token
    keys_seen = n * cached + n * (n + 1) / 2  # every query: the cached keys and its own prefix
    attention = 4 * args.num_layers * q * keys_seen  # q.k and p.v over each key seen
    return n * linears + attention


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", default="512,768,1024", help="chunk sizes C (token budgets)")
    ap.add_argument("--max-cached", type=int, default=1536, help="longest cached context before a chunk")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--enforce-eager", action="store_true", help="the torch reference paths, for comparison")
    ap.add_argument(
        "--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help="the KV cache's type (serve --help)"
    )
    a = ap.parse_args(argv)
    worst = 0.0
    heads = ("chunk", "cached", "step ms", "fresh ms", "ratio", "flops", "per flop")
    print(" ".join(f"{h:>{w}}" for h, w in zip(heads, (6, 7, 9, 9, 6, 6, 8), strict=True)))
    worst_per_flop = 0.0
    for chunk in (int(c) for c in a.chunks.split(",")):
        llm = LLM(
            policy="continuous",
            max_num_batched_tokens=chunk,
            max_model_len=chunk + a.max_cached + 16,
            kv_cache_memory=2**30,
            enforce_eager=a.enforce_eager,
            kv_cache_dtype=a.kv_cache_dtype,
        )
        times: dict[int, list[float]] = defaultdict(list)
        prompt_lens = [chunk * k for k in range(1, a.max_cached // chunk + 2)]
        run_prompt(llm, chunk, chunk)  # warm
        for _ in range(a.repeats):
            for n in prompt_lens:
                for c, cached, secs in run_prompt(llm, n, chunk):
                    if c == chunk:
                        times[cached].append(secs)
        fresh = statistics.median(times[0])
        for cached in sorted(times):
            ms = 1e3 * statistics.median(times[cached])
            ratio = ms / (1e3 * fresh)
            args = llm.engine.model.args
            work = chunk_flops(args, chunk, cached) / chunk_flops(args, chunk, 0)
            if cached:
                worst = max(worst, ratio)
                worst_per_flop = max(worst_per_flop, ratio / work)
            row = f"{chunk:6d} {cached:7d} {ms:9.1f} {1e3 * fresh:9.1f} {ratio:6.2f} {work:6.2f}"
            print(f"{row} {ratio / work:8.2f}")
        del llm
    verdict = "met" if worst <= BOUND else "NOT met"
    print(f"\nworst chunk over cached context / fresh chunk: {worst:.2f}x (bound {BOUND}x: {verdict})")
    print(f"worst time per FLOP of a chunk over cached context / a fresh chunk's: {worst_per_flop:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
