"""What a short prompt chunk adds to a decode step: by flash attention, or row by row.

What it measures
    In process, on the embedded model (policy ``continuous``, default engine): ``--decode-rows``
    requests decoding (200-token prompts), then, again and again, one more request whose
    prompt is ``--cached`` + C tokens: its first ``--cached`` tokens run in a step of their
    own, and the next step, which carries its last C tokens beside the decode rows, is timed
    against the decode-only step right after it (the request aborted in between). The median
    of ``--repeats`` such differences is what the chunk adds. Each C runs with the default
    routing (a short chunk over a short context attends one token at a time through the
    native paged kernel: ``model_runner.PAGED_CHUNK_TOKENS`` / ``PAGED_CHUNK_PAIRS``) and with
    every chunk on flash attention, in turns, so that the machine's drift falls on both.

How to run
    .venv/bin/python benchmarks/mixed_step.py                         # fresh chunks
    .venv/bin/python benchmarks/mixed_step.py --cached 352 --chunks 8,32,64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from tqdm.auto import tqdm

from bucketserve import LLM, SamplingParams
from bucketserve.engine import model_runner


def chunk_cost_ms(llm: LLM, decode_rows: int, cached: int, chunk: int, tag: str) -> tuple[float, float]:
    """(ms the chunk adds to a step of ``decode_rows`` decodes, ms of the decode-only step)."""
    engine, sched = llm.engine, llm.engine.scheduler
    rid = f"chunk-{tag}"
    prompt = [(i * 7919) % 40000 + 100 for i in range(cached + chunk)]
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True, temperature=0))
    if cached:  # its first tokens in a step of their own
        budget = sched.config.max_num_batched_tokens
        sched.config.max_num_batched_tokens = decode_rows + cached
        engine.step()
        sched.config.max_num_batched_tokens = budget
    t = time.perf_counter()
    engine.step()
    mixed = time.perf_counter() - t
    engine.abort_request(rid)
    t = time.perf_counter()
    engine.step()
    decode = time.perf_counter() - t
    return (mixed - decode) * 1e3, decode * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode-rows", type=int, default=32, help="requests decoding beside the chunk")
    ap.add_argument("--cached", type=int, default=0, help="tokens of the chunk's prompt already in the cache")
    ap.add_argument("--chunks", default="8,32,64,128", help="chunk sizes C, comma-separated")
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",")]

    llm = LLM(policy="continuous", max_num_batched_tokens=8192)
    engine = llm.engine
    if engine.model.kernels is None:
        print("the native kernels are not loaded: both routings would be flash attention", file=sys.stderr)
        return 1
    for i in range(args.decode_rows):
        params = SamplingParams(max_tokens=4000, ignore_eos=True, temperature=0)
        engine.add_request(f"decode-{i}", list(range(100, 300)), params)
    for _ in range(6):
        engine.step()

    default = model_runner.PAGED_CHUNK_TOKENS
    routings = {"row by row where short (default)": default, "flash attention": 0}
    added: dict[str, dict[int, list[float]]] = {r: {c: [] for c in chunks} for r in routings}
    base: dict[str, list[float]] = {r: [] for r in routings}
    with tqdm(total=args.repeats * len(routings) * len(chunks), desc="steps", unit="pair") as bar:
        for rep in range(args.repeats):
            for name, tokens in routings.items():
                model_runner.PAGED_CHUNK_TOKENS = tokens
                for c in chunks:
                    tag = f"{rep}-{tokens}-{c}"
                    extra, decode = chunk_cost_ms(llm, args.decode_rows, args.cached, c, tag)
                    added[name][c].append(extra)
                    base[name].append(decode)
                    bar.update()
    model_runner.PAGED_CHUNK_TOKENS = default

    rows, cached = args.decode_rows, args.cached
    print(f"\n{rows} decode rows; chunks over {cached} cached tokens; median of {args.repeats}")
    print("| routing | decode-only step ms | " + " | ".join(f"+{c} tokens" for c in chunks) + " |")
    print("|---|---|" + "---|" * len(chunks))
    for name in routings:
        cells = " | ".join(f"{statistics.median(added[name][c]):.1f}" for c in chunks)
        print(f"| {name} | {statistics.median(base[name]):.1f} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
