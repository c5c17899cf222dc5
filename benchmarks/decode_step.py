"""Time of one decode step of the real engine, per batch size, fast path against eager.

What it measures
    In process, the embedded model: B requests with ``--prompt-len``-token prompts (default
    100; EOS ignored, ``3 * steps + 40`` tokens reserved) are added and stepped past their
    prefill; then ``--steps`` calls of ``engine.step()`` are timed, three times, and the best
    and median kept. Each batch size runs on the default engine (native kernels, tuned weight
    formats, the int8 KV cache where it runs), with ``--w8a8`` on one with ``--quantization
    w8a8``, with ``--model-kv`` on one with ``--kv-cache-dtype model`` (the compute dtype's
    cache), with ``--eager`` on an ``--enforce-eager`` engine (the torch reference paths in
    the model's dtype), and, with ``--layer-by-layer``, on the default engine with its decode
    steps run layer by layer instead of in one native call (``LlamaModel.fuse_decode``), in
    turns so that the machine's drift falls on all. ``--profile`` adds torch.profiler's table
    of the fast engine's ops at the first batch size.

How to run
    .venv/bin/python benchmarks/decode_step.py                 # B = 1, 8, 32
    .venv/bin/python benchmarks/decode_step.py --eager --batches 1,8
    .venv/bin/python benchmarks/decode_step.py --w8a8          # beside --quantization w8a8
    .venv/bin/python benchmarks/decode_step.py --model-kv --batches 150,150 --prompt-len 250
    .venv/bin/python benchmarks/decode_step.py --layer-by-layer --batches 1,4,8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bucketserve import LLM, SamplingParams


def time_steps(llm: LLM, batch: int, steps: int, prompt_len: int = 100) -> list[float]:
    engine = llm.engine
    # Each request reserves its prompt and max_tokens of KV at admission: only as many tokens
    # as the timed steps need, so that the whole batch fits (500 let 60-72 of 200 in a 1 GiB
    # cache, and the table then named a batch that did not run).
    params = SamplingParams(max_tokens=3 * steps + 40, ignore_eos=True, temperature=0)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", [100 + (i + j) % 1000 for j in range(prompt_len)], params)
    for _ in range(32):  # the prompts (a few steps of the token budget), then decode steps
        engine.step()
        shape = engine.stats.recent[-1].shape
        if not shape.prefill and len(shape.decode) == batch:
            break
    else:
        raise SystemExit(
            f"batch {batch} did not all decode at once in the 1 GiB KV cache: time a smaller one"
        )
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        runs.append((time.perf_counter() - t) / steps * 1e3)
    for rid in list(engine._requests):
        engine.abort_request(rid)
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=100, help="tokens of each request's prompt")
    ap.add_argument("--eager", action="store_true", help="also time an --enforce-eager engine")
    ap.add_argument("--w8a8", action="store_true", help="also time a --quantization w8a8 engine")
    ap.add_argument(
        "--model-kv",
        action="store_true",
        help="also time a --kv-cache-dtype model engine (the compute dtype's cache)",
    )
    ap.add_argument(
        "--layer-by-layer",
        action="store_true",
        help="also time the default engine with its decode steps layer by layer (not in one native call)",
    )
    ap.add_argument("--profile", action="store_true", help="torch.profiler table at the first batch size")
    a = ap.parse_args(argv)
    engines = {"fast": LLM(kv_cache_memory=2**30, max_model_len=2048)}
    if a.layer_by_layer:
        engines["layers"] = engines["fast"]  # the same engine, its model told not to fuse
    if a.w8a8:
        engines["w8a8"] = LLM(kv_cache_memory=2**30, max_model_len=2048, quantization="w8a8")
    if a.model_kv:
        engines["modelkv"] = LLM(kv_cache_memory=2**30, max_model_len=2048, kv_cache_dtype="model")
    if a.eager:
        engines["eager"] = LLM(kv_cache_memory=2**30, max_model_len=2048, enforce_eager=True)
    print(f"{'engine':<7} {'batch':>5} {'best ms':>8} {'median ms':>9} {'tok/s':>7}")
    for b in (int(x) for x in a.batches.split(",")):
        for name, llm in engines.items():
            llm.engine.model.fuse_decode = name != "layers"
            runs = time_steps(llm, b, a.steps, a.prompt_len)
            best = min(runs)
            print(
                f"{name:<7} {b:5d} {best:8.2f} {statistics.median(runs):9.2f} {b / best * 1e3:7.0f}",
                flush=True,
            )
    if a.profile:
        from torch.profiler import profile

        llm, b = engines["fast"], int(a.batches.split(",")[0])
        with profile() as prof:
            time_steps(llm, b, 10, a.prompt_len)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
