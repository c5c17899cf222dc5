"""What a prefill chunk over cached context costs, against a fresh chunk of the same size.

What it measures
    In process, on the embedded model, policy ``continuous`` with a token budget of C per
    step and nothing else running: a request whose prompt is C tokens (one fresh chunk), and
    requests whose prompts are k x C tokens (k chunks, the last k - 1 over k x C cached
    tokens at most). Each step's time comes from the engine's step records, whose batch
    shape says how many tokens each chunk had cached. Every case runs ``--repeats`` times,
    interleaved, and the median is kept. Prints the time of the fresh chunk, of each chunk
    over cached context, and their ratio against the issue's 1.3x bound.

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

BOUND = 1.3


def run_prompt(llm: LLM, n: int, chunk: int) -> list[tuple[int, int, float]]:
    """(chunk tokens, cached tokens, seconds) of each prefill step of one n-token prompt."""
    engine = llm.engine
    before = engine.stats.steps
    ids = [(i * 7919) % 40000 + 100 for i in range(n)]
    llm.generate([ids], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    steps = list(engine.stats.recent)[-(engine.stats.steps - before) :]
    return [(r.shape.prefill[0][0], r.shape.prefill[0][1], r.duration) for r in steps if r.shape.prefill]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", default="512,768,1024", help="chunk sizes C (token budgets)")
    ap.add_argument("--max-cached", type=int, default=1536, help="longest cached context before a chunk")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--enforce-eager", action="store_true", help="the torch reference paths, for comparison")
    a = ap.parse_args(argv)
    worst = 0.0
    print(f"{'chunk':>6} {'cached':>7} {'step ms':>9} {'fresh ms':>9} {'ratio':>6}")
    for chunk in (int(c) for c in a.chunks.split(",")):
        llm = LLM(
            policy="continuous",
            max_num_batched_tokens=chunk,
            max_model_len=chunk + a.max_cached + 16,
            kv_cache_memory=2**30,
            enforce_eager=a.enforce_eager,
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
            if cached:
                worst = max(worst, ratio)
            print(f"{chunk:6d} {cached:7d} {ms:9.1f} {1e3 * fresh:9.1f} {ratio:6.2f}")
        del llm
    verdict = "met" if worst <= BOUND else "NOT met"
    print(f"\nworst chunk over cached context / fresh chunk: {worst:.2f}x (bound {BOUND}x: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
