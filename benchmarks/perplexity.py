"""Perplexity of the embedded model on 50 ShareGPT replies, per weight format and KV cache type.

What it measures
    A fixed set of ShareGPT (prompt, reply) pairs (seeded; the first N whose prompt and reply
    fit in 1,024 tokens together, reply at least 16 tokens) is scored by teacher forcing: the
    mean negative log-likelihood of each reply's tokens given its prompt and the reply so far,
    over all replies together, as perplexity = exp(mean NLL).

    First the model as the engine packed it by default (``--quantization auto``): a reply's
    scoring pass is one prefill, so each decoder linear runs its prompt plan (w8a8 where the
    calibration text allowed it, exact activations elsewhere) and the LM head its own. Then
    each weight format forced on every layer (``FormatPlan.single``), so that its own quality
    shows. The reference is bf16 with no quantization; the verdict takes the worst of the
    default packing and the formats it runs decode rows in, with the issue's 2% bound.

    The KV cache: under the default packing, the replies scored again as decode rows that
    read their context from a bf16 cache and from an int8 one (the default ``auto`` where its
    vector kernel runs), whose change is reported against both.

How to run
    .venv/bin/python benchmarks/perplexity.py                  # 50 replies, every format
    .venv/bin/python benchmarks/perplexity.py --num-replies 10 # a quick look
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

import torch
from tqdm.auto import tqdm

from bucketserve.config import EngineConfig
from bucketserve.engine.kv_cache import allocate_kv_cache
from bucketserve.engine.llm_engine import LLMEngine
from bucketserve.engine.model import AttentionMetadata, DecodeRows, LlamaModel, PrefillRow
from bucketserve.engine.weights import FormatPlan
from bucketserve.workloads.sharegpt import load_conversations, prompt_reply_pairs

BOUND = 0.02
MAX_LEN = 1024
BLOCK = 16


def pick_pairs(tokenizer, n: int, seed: int) -> list[tuple[list[int], list[int]]]:  # type: ignore[no-untyped-def]
    pairs = prompt_reply_pairs(load_conversations())
    random.Random(seed).shuffle(pairs)
    out = []
    for prompt, reply in pairs:
        p = tokenizer.encode(prompt, add_special_tokens=False)
        r = tokenizer.encode(reply, add_special_tokens=False)
        if len(r) >= 16 and len(p) >= 1 and len(p) + len(r) <= MAX_LEN:
            out.append((p, r))
        if len(out) == n:
            break
    return out


def decode_rows_meta(prompt_len: int, n: int) -> AttentionMetadata:
    """The prompt as one prefill and each later token as a decode row over the cache up to
    itself: every reply token reads its context from the KV cache, as decode steps do (a
    prefill attends to its own exact K/V and would not show the cache's quantization). The
    linears run every row by their prompt plan, as ``one_prefill`` does, so that only the
    cache differs."""
    width = -(-n // BLOCK)
    return AttentionMetadata(
        slot_mapping=torch.arange(n),
        positions=torch.arange(n),
        prefill=[PrefillRow(0, prompt_len, None)],
        num_prefill_tokens=n,
        decode=DecodeRows(
            torch.arange(width).expand(n - prompt_len, width).contiguous(),
            torch.arange(prompt_len + 1, n + 1),
        ),
    )


@torch.inference_mode()
def reply_nll(
    model: LlamaModel, kv: torch.Tensor, prompt: list[int], reply: list[int], as_decode: bool = False
) -> tuple[float, int]:
    """Summed NLL of ``reply`` given ``prompt``, and its token count. ``as_decode``: the reply
    tokens read the cache as decode rows (``decode_rows_meta``)."""
    ids = torch.tensor(prompt + reply)
    n = ids.numel()
    meta = decode_rows_meta(len(prompt), n) if as_decode else AttentionMetadata.one_prefill(n)
    first = len(prompt) - 1  # the logits at position i predict token i + 1
    index = torch.arange(first, n - 1)
    logits = model(ids, meta.positions, kv, meta, index)
    nll = torch.nn.functional.cross_entropy(logits, ids[first + 1 :], reduction="sum")
    return float(nll), len(reply)


def perplexity(model: LlamaModel, kv: torch.Tensor, pairs, label: str, as_decode: bool = False) -> float:  # type: ignore[no-untyped-def]
    total, count = 0.0, 0
    for p, r in tqdm(pairs, desc=label, unit="reply", leave=False):
        nll, n = reply_nll(model, kv, p, r, as_decode)
        total, count = total + nll, count + n
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-replies", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    engine = LLMEngine(EngineConfig(dtype="bfloat16", kv_cache_memory=64 * 2**20, max_model_len=MAX_LEN))
    if engine.weight_plans is None:
        print("the CPU fast path is off (not a CPU?): nothing to compare")
        return 1
    model = engine.model
    default = engine.weight_plans
    pairs = pick_pairs(engine.tokenizer, a.num_replies, a.seed)
    tokens = sum(len(r) for _, r in pairs)
    kv = allocate_kv_cache(model.args, MAX_LEN // BLOCK + 1, BLOCK, torch.bfloat16, torch.device("cpu"))
    print(f"{len(pairs)} ShareGPT replies, {tokens} scored tokens (seed {a.seed})")
    print(f"default plan (--quantization auto): {default.describe()}")

    linears = [lin for layer in model.linears() for lin in layer]
    results: dict[tuple[str, str], float] = {}
    t = time.perf_counter()
    as_packed = ("default", "packed")
    results[as_packed] = ppl = perplexity(model, kv, pairs, "as packed")
    print(f"  the default packing, as prompts run  perplexity {ppl:8.4f}  ({time.perf_counter() - t:.0f} s)")
    # The KV cache's element type, each read as decode steps read it, under the default packing.
    kv_results: dict[str, float] = {}
    for name, cache_dtype in (("bf16", torch.bfloat16), ("int8", torch.int8)):
        t = time.perf_counter()
        cache = allocate_kv_cache(model.args, MAX_LEN // BLOCK + 1, BLOCK, cache_dtype, torch.device("cpu"))
        kv_results[name] = ppl = perplexity(model, cache, pairs, f"{name} KV cache", as_decode=True)
        print(
            f"  the default packing, replies read the {name} KV cache  perplexity {ppl:8.4f}  "
            f"({time.perf_counter() - t:.0f} s)"
        )
    # The default plan's formats (fp32 is exact: bf16 stands for it), each combination of a
    # layer format with a head format, beside the reference and the formats it does not use.
    layer_used = sorted({_reference(f) for f in default.layers.used | default.decode_layers.used})
    head_used = sorted({_reference(f) for f in default.lm_head.used})
    combos = [("bf16", "bf16"), ("int8", "bf16"), ("int4", "bf16"), ("w8a8", "bf16"), ("w8a8", "w8a8")]
    combos += [(lf, hf) for lf in layer_used for hf in head_used if (lf, hf) not in combos]
    for layer_fmt, head_fmt in combos:
        t = time.perf_counter()
        for lin in linears:
            lin.pack(FormatPlan.single(layer_fmt), lin.candidate_formats(_q(layer_fmt), only={layer_fmt}))
        model.lm_head.pack(
            FormatPlan.single(head_fmt), model.lm_head.candidate_formats(_q(head_fmt), only={head_fmt})
        )
        results[layer_fmt, head_fmt] = ppl = perplexity(model, kv, pairs, f"{layer_fmt}/{head_fmt}")
        print(
            f"  layers {layer_fmt:5s} lm head {head_fmt:5s}  perplexity {ppl:8.4f}  "
            f"({time.perf_counter() - t:.0f} s)"
        )

    ref = results["bf16", "bf16"]
    print("\nformat (layers / lm head)   perplexity   vs bf16")
    for (lf, hf), ppl in results.items():
        print(f"  {lf:5s} / {hf:5s}               {ppl:8.4f}   {100 * (ppl / ref - 1):+6.2f}%")
    kv_change = kv_results["int8"] / kv_results["bf16"] - 1
    print(
        f"\nint8 KV cache (--kv-cache-dtype int8), replies as decode rows, default packing: "
        f"{100 * kv_change:+.2f}% perplexity vs the bf16 cache; "
        f"{100 * (kv_results['int8'] / ref - 1):+.2f}% vs bf16 without quantization "
        f"(bound {100 * BOUND:.0f}%: {'met' if kv_results['int8'] / ref - 1 <= BOUND else 'NOT met'})"
    )
    used = [(lf, hf) for lf in layer_used for hf in head_used if (lf, hf) != ("bf16", "bf16")]
    if not used:
        print("\nthe default plan quantizes nothing on this machine: quality equals bf16")
        return 0
    used.append(as_packed)
    # Every combination the default plan can run (a step's M picks one format for the layers
    # and one for the head): the worst of them is the verdict.
    worst = max(used, key=lambda k: results[k])
    change = results[worst] / ref - 1
    verdict = "met" if change <= BOUND else "NOT met"
    print(
        f"\ndefault quantization, worst combination {worst[0]} layers / {worst[1]} lm head: "
        f"{100 * change:+.2f}% perplexity vs bf16 (bound {100 * BOUND:.0f}%: {verdict})"
    )
    return 0


def _reference(fmt: str) -> str:
    """The format whose perplexity stands for ``fmt``'s: fp32 is exact, bf16 is the reference."""
    return "bf16" if fmt == "fp32" else fmt


def _q(fmt: str) -> str:
    """The ``--quantization`` value that offers ``fmt`` unconditionally."""
    return {"int8": "int8", "w8a8": "w8a8", "int4": "int4", "w4a8": "auto"}.get(fmt, "none")


if __name__ == "__main__":
    sys.exit(main())
