"""``bucketserve profile``: time the real engine here and fit the simulator's cost model.

Prefill is timed over a grid of batch size x prompt length, decode over batch size x
mean context length (the contexts spread around it, as in a live batch), each point the
median of a few runs of ``ModelRunner.execute`` on batches built by hand (the scheduler
plays no part: this measures the forward pass alone). The
points are fitted by least squares to the published profiles' formula family (see
``cost_model``) and written as a profile file the simulator loads. A short workload through
``engine.step()`` then measures what a step costs beyond the forward pass (scheduling,
appending tokens, detokenizing), kept as ``step_overhead_ms`` = [a, b]: a + b * rows.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bucketserve.argparse_options import add_engine_options, engine_configs
from bucketserve.core.cost import Profile
from bucketserve.wire import ProfileFile, write_json

# Single short prompts too: ShareGPT prompts are mostly short, and the CPU engine switches
# prompt weight formats at 16 tokens a step, so the fit needs points either side of it.
FULL_PREFILL = [(1, 4), (1, 8), (1, 24), (1, 32), (1, 48)] + [
    (b, n) for b in (1, 2, 4, 8) for n in (16, 64, 128, 256, 512, 1024) if b * n <= 4096
]
FULL_DECODE = [(b, c) for b in (1, 4, 16, 32, 64, 128) for c in (64, 256, 512, 1024)]
QUICK_PREFILL = [(1, 8), (1, 32), (2, 16), (4, 32)]
QUICK_DECODE = [(1, 16), (2, 32), (4, 8), (8, 32)]


@dataclass
class Point:
    batch: int
    length: int  # prompt length (prefill) or context length (decode)
    ms: float


def fit(xs: list[list[float]], ys: list[float]) -> list[float]:
    """[a, b, c] for y = a + b*x1 + c*x2, least squares on the relative error: the grid spans
    two decades of latency, and plain least squares would fit the slowest points only."""
    import numpy as np

    y = np.array(ys)
    a = np.array([[1.0, *x] for x in xs]) / y[:, None]
    coef, *_ = np.linalg.lstsq(a, np.ones_like(y), rcond=None)
    return [float(c) for c in coef]


NO_SPLIT = 1 << 30


def relative_errors(coef: list[float], feats: list[list[float]], ys: list[float]) -> list[float]:
    """(predicted - measured) / measured of each point under the row ``coef``."""
    pred = [coef[0] + coef[1] * f[0] + coef[2] * f[1] for f in feats]
    return [(p - y) / y for p, y in zip(pred, ys, strict=True)]


def worst(errors: list[float]) -> float:
    return max(abs(e) for e in errors)


def rms(errors: list[float]) -> float:
    return math.sqrt(sum(e * e for e in errors) / len(errors))


def max_relative_error(coef: list[float], feats: list[list[float]], ys: list[float]) -> float:
    return worst(relative_errors(coef, feats, ys))


def best_split(
    feats: list[list[float]],
    ys: list[float],
    keys: list[int],
    first_large: list[int],
    score: Callable[[list[float]], float] = worst,
) -> tuple[float, list[float], list[float], int] | None:
    """Two rows, one for the points whose key is below each candidate in ``first_large`` and
    one for the rest (at least 3 points each): (score of their relative errors, small row,
    large row, candidate) of the best, or None when no candidate leaves 3 points a side."""
    best = None
    for t in first_large:
        small = [i for i, k in enumerate(keys) if k < t]
        large = [i for i, k in enumerate(keys) if k >= t]
        if len(small) < 3 or len(large) < 3:
            continue
        s = fit([feats[i] for i in small], [ys[i] for i in small])
        g = fit([feats[i] for i in large], [ys[i] for i in large])
        err = score(
            relative_errors(s, [feats[i] for i in small], [ys[i] for i in small])
            + relative_errors(g, [feats[i] for i in large], [ys[i] for i in large])
        )
        if best is None or err < best[0]:
            best = (err, s, g, t)
    return best


def fit_decode(points: list[Point]) -> tuple[list[float], list[float], int]:
    """Decode rows as the published profiles have them: a small-batch and a large-batch row
    split at the batch size (from the grid) that gives the smallest worst relative error;
    NO_SPLIT when one row does best."""
    feats = [decode_features(p) for p in points]
    ys = [p.ms for p in points]
    one = fit(feats, ys)
    batches = [p.batch for p in points]
    split = best_split(feats, ys, batches, sorted(set(batches))[1:])
    if split is None or split[0] >= max_relative_error(one, feats, ys):
        return one, one, NO_SPLIT
    return split[1], split[2], split[3]


def fit_prefill(points: list[Point]) -> tuple[list[float], list[float] | None, int]:
    """The prefill row, or two split at the step's prompt-token count (from the grid) where
    one row misses by 2% or more and two cut the worst relative error by more than a fifth:
    our CPU engine switches weight formats with the token count, and its cost steps there.
    Returns (row up to the threshold, row above it or None, threshold or NO_SPLIT)."""
    feats = [prefill_features(p) for p in points]
    ys = [p.ms for p in points]
    one = fit(feats, ys)
    # Judged by the root mean square of the relative errors, not the worst one: the grid's
    # slowest, attention-heavy step (4 x 1,024 tokens) missed by the same 25-29% with one row
    # or two on a Zen 5 EPYC, so the worst error kept one row that missed every short prompt
    # by 10-20% (the ShareGPT chats' TTFT in sim_validation); two rows fit them within 7%.
    single_error = rms(relative_errors(one, feats, ys))
    tokens = [p.batch * p.length for p in points]
    # A threshold t puts steps of up to t tokens in the small row: first_large = t + 1.
    split = best_split(feats, ys, tokens, [t + 1 for t in sorted(set(tokens))[:-1]], score=rms)
    if split is None or single_error < 0.02 or split[0] > 0.8 * single_error:  # one row will do
        return one, None, NO_SPLIT
    return split[1], split[2], split[3] - 1


def prefill_features(p: Point) -> list[float]:
    return [p.batch * p.length, p.batch * p.length**2]


def decode_features(p: Point) -> list[float]:
    return [p.batch * p.length, p.batch]


# A step with prompt tokens, served, follows decode steps that ran in other weight formats
# (decode rows in w4a8 at small batches, prompts in w8a8, bf16 or int4: weights.py), so it
# reads its weights from memory; timed back to back, it found them in the caches and the
# profile charged it 40% too little (prompt steps of a 2-req/s run: measured / modelled 1.39
# at the median). Each timed step with prompt tokens therefore follows one such decode step.
INTERLEAVED_DECODE = [(128, True)] * 4


def time_rows(
    engine: Any,
    rows: list[tuple[int, bool]],
    repeats: int = 3,
    seed: int = 0,
    between: list[tuple[int, bool]] | None = None,
) -> float:
    """Median ms of ``ModelRunner.execute`` on one hand-built batch (after a warm-up run):
    each row is (length, is_decode): a prompt of that length, or one decode token after a
    context of that length (whose cached values do not matter for timing). ``between``: a
    batch of the same form run, untimed, before each timed one."""
    import random

    from bucketserve.core.scheduler import ScheduledBatch
    from bucketserve.core.sequence import Sequence
    from bucketserve.sampling_params import SamplingParams

    rng = random.Random(seed)
    bm = engine.block_manager

    def build(spec: list[tuple[int, bool]], prefix: str) -> tuple[list[Sequence], list[int]]:
        seqs, counts = [], []
        for i, (length, decode) in enumerate(spec):
            ids = [rng.randrange(3, engine.args.vocab_size) for _ in range(length)]
            s = Sequence(f"{prefix}-{i}", ids, SamplingParams(max_tokens=1, ignore_eos=True))
            bm.allocate(s, length)
            if decode:
                s.num_computed_tokens = length - 1
            seqs.append(s)
            counts.append(1 if decode else length)
        return seqs, counts

    seqs, counts = build(rows, "profile")
    other, other_counts = build(between or [], "profile-between")
    times = []
    try:
        for _ in range(repeats + 1):
            if other:
                engine.runner.execute(ScheduledBatch(other, other_counts))
            t0 = time.perf_counter()
            engine.runner.execute(ScheduledBatch(seqs, counts))
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        for s in seqs + other:
            bm.free(s)
            engine.sampler.forget(s.seq_id)
    return statistics.median(times[1:])


def spread(mean: int, count: int) -> list[int]:
    """``count`` context lengths spread evenly over [mean/4, 7*mean/4], with mean ``mean``.

    A live batch's contexts differ, and the engine's decode attention runs each group of
    similar lengths apart: on this CPU a batch of spread contexts took 10-40% longer than
    one of a single length with the same total, so the grid times spread batches."""
    return [max(1, round(mean * (0.25 + 1.5 * (i + 0.5) / count))) for i in range(count)]


def measure(
    engine: Any,
    prefill_grid: list[tuple[int, int]],
    decode_grid: list[tuple[int, int]],
    repeats: int = 3,
    progress: Any = None,
) -> tuple[list[Point], list[Point]]:
    """Time the engine's forward pass on each grid point (median of ``repeats``, after a warm-up)."""
    prefill, decode = [], []
    for b, n in prefill_grid:
        prefill.append(Point(b, n, time_rows(engine, [(n, False)] * b, repeats, between=INTERLEAVED_DECODE)))
        if progress:
            progress()
    for b, c in decode_grid:
        decode.append(Point(b, c, time_rows(engine, [(n, True) for n in spread(c, b)], repeats)))
        if progress:
            progress()
    return prefill, decode


# Mixed steps (prefill rows + decode rows, as bucket and continuous run them): measured only
# to check the cost model's assumption that their costs add, with one fixed overhead.
MIXED = [(1, 64, 16, 256), (2, 128, 32, 256), (1, 256, 64, 512), (4, 64, 8, 128)]
QUICK_MIXED = [(1, 16, 2, 16)]


def mixed_scale(checks: list[list[float]]) -> float:
    """The median of measured / modelled time over the timed mixed steps; 1 without any."""
    ratios = sorted(ms / model for *_, ms, model in checks if model > 0)
    if not ratios:
        return 1.0
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def mixed_check(engine: Any, prof: Profile, grid: list[tuple[int, int, int, int]], repeats: int) -> list:
    """[prefill rows, prompt len, decode rows, context, measured ms, modelled ms] per point,
    modelled by the formulas alone (no step overhead, no mixed scale: this measures that)."""
    out = []
    for pb, n, db, c in grid:
        rows = [(n, False)] * pb + [(x, True) for x in spread(c, db)]
        ms = time_rows(engine, rows, repeats, between=INTERLEAVED_DECODE)
        model = prof.prefill_ms(pb * n, pb * n * n) + prof.decode_ms(db * c, db) - prof.decode_fixed_ms(db)
        out.append([pb, n, db, c, ms, model])
    return out


def measure_overhead(
    engine: Any, num_requests: int = 32, prompt_len: int = 32, output_len: int = 32
) -> list[float]:
    """The engine's per-step work outside the forward pass, fitted as a + b * rows (ms).

    Runs a small workload through ``engine.step()`` and times each step against the
    ``ModelRunner.execute`` call inside it.
    """
    import random

    from bucketserve.sampling_params import SamplingParams

    rng = random.Random(1)
    runner = engine.runner
    inner = runner.execute
    calls: list[tuple[int, float]] = []

    def timed(batch: Any) -> Any:
        t0 = time.perf_counter()
        out = inner(batch)
        calls.append((len(batch), (time.perf_counter() - t0) * 1e3))
        return out

    runner.execute = timed
    rows: list[tuple[int, float]] = []
    try:
        for i in range(num_requests):
            ids = [rng.randrange(3, engine.args.vocab_size) for _ in range(prompt_len)]
            engine.add_request(f"overhead-{i}", ids, SamplingParams(max_tokens=output_len, ignore_eos=True))
        while engine.has_unfinished_requests():
            n = len(calls)
            t0 = time.perf_counter()
            engine.step()
            step_ms = (time.perf_counter() - t0) * 1e3
            if len(calls) > n:
                batch_rows, exec_ms = calls[-1]
                rows.append((batch_rows, max(0.0, step_ms - exec_ms)))
    finally:
        runner.execute = inner
    import numpy as np

    a = np.array([[1.0, r] for r, _ in rows])
    coef, *_ = np.linalg.lstsq(a, np.array([ms for _, ms in rows]), rcond=None)
    return [max(0.0, float(c)) for c in coef]


def build_profile(
    engine: Any, prefill: list[Point], decode: list[Point], overhead: list[float] | None = None
) -> ProfileFile:
    """The profile file's content: DistServe's structure for one model at TP 1, plus the KV
    and weight sizes and how the measurement was made."""
    import platform

    import torch

    from bucketserve.engine.kv_cache import kv_bytes_per_token

    pf = [prefill_features(p) for p in prefill]
    df = [decode_features(p) for p in decode]
    p_coef, p_large, p_threshold = fit_prefill(prefill)
    d_small, d_large, threshold = fit_decode(decode)

    def prefill_error() -> float:
        return max(
            abs((c[0] + c[1] * f[0] + c[2] * f[1]) - p.ms) / p.ms
            for p, f in zip(prefill, pf, strict=True)
            for c in [p_large if p_large is not None and p.batch * p.length > p_threshold else p_coef]
        )

    def decode_error() -> float:
        return max(
            abs((c[0] + c[1] * f[0] + c[2] * f[1]) - p.ms) / p.ms
            for p, f in zip(decode, df, strict=True)
            for c in [d_large if p.batch >= threshold else d_small]
        )

    weight_bytes = sum(t.numel() * t.element_size() for t in engine.model.parameters())
    profile = Profile(
        prefill=(p_coef[0], p_coef[1], p_coef[2]),
        prefill_large=None if p_large is None else (p_large[0], p_large[1], p_large[2]),
        prefill_threshold=p_threshold,
        decode_small=(d_small[0], d_small[1], d_small[2]),
        decode_large=(d_large[0], d_large[1], d_large[2]),
        large_batch_threshold=threshold,
        step_overhead=(overhead[0], overhead[1]) if overhead else (0.0, 0.0),
        # Our engine decodes a static batch's rows on the paged cache, unpadded.
        padded_decode=False,
        kv_bytes_per_token=kv_bytes_per_token(engine.args, engine.kv_cache_dtype),
        weight_bytes=weight_bytes,
    )
    return ProfileFile(
        {engine.model_name: {1: profile}},
        {
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "prefill_points": [[p.batch, p.length, p.ms] for p in prefill],
            "decode_points": [[p.batch, p.length, p.ms] for p in decode],
            "prefill_max_rel_error": prefill_error(),
            "decode_max_rel_error": decode_error(),
        },
    )


def add_profile_parser(sub: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="time the real engine and fit the simulator's cost model",
        description="Time prefill (batch x prompt length) and decode (batch x context) on this "
        "machine's engine, fit t = a + b*sum(len) + c*sum(len^2) and t = a + b*sum(ctx) + c*batch "
        "(ms), and write a profile JSON for `bucketserve simulate --profile`.",
    )
    add_engine_options(p)
    p.add_argument(
        "--output", "-o", default="profile.json", help="profile file to write (default profile.json)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a 4+4-point grid (seconds; for tests) instead of the full 28+24-point grid (minutes)",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs per grid point, median taken (default 3)"
    )
    p.set_defaults(func=cmd_profile)


def cmd_profile(a: Any) -> int:
    from tqdm import tqdm

    from bucketserve.engine.llm_engine import LLMEngine

    engine_cfg, sched_cfg = engine_configs(a)
    engine = LLMEngine(engine_cfg, sched_cfg)
    prefill_grid = QUICK_PREFILL if a.quick else FULL_PREFILL
    decode_grid = QUICK_DECODE if a.quick else FULL_DECODE
    # Points must fit the context limit and the KV pool (raise --kv-cache-memory to keep them).
    bm = engine.block_manager

    def fits(b: int, n: int, beside: int = 0) -> bool:
        return n <= engine.max_model_len and b * -(-n // bm.block_size) + beside <= bm.num_blocks

    # Steps with prompt tokens are timed beside the interleaved decode batch's blocks.
    interleaved = sum(-(-n // bm.block_size) for n, _ in INTERLEAVED_DECODE)
    skipped = [p for p in prefill_grid if not fits(*p, interleaved)]
    skipped += [(b, c) for b, c in decode_grid if not fits(b, max(spread(c, b)))]
    prefill_grid = [p for p in prefill_grid if fits(*p, interleaved)]
    decode_grid = [(b, c) for b, c in decode_grid if fits(b, max(spread(c, b)))]
    if skipped:
        print(f"skipped (batch, length) points that do not fit the KV pool or context: {skipped}")
    with tqdm(total=len(prefill_grid) + len(decode_grid), desc="profile", unit="point") as bar:
        prefill, decode = measure(engine, prefill_grid, decode_grid, a.repeats, bar.update)
    overhead = measure_overhead(engine, 8 if a.quick else 32, 16 if a.quick else 32, 8 if a.quick else 32)
    data = build_profile(engine, prefill, decode, overhead)
    by_tp, meta = data.models[engine.model_name], data.meta
    mixed = [
        m for m in (QUICK_MIXED if a.quick else MIXED) if fits(m[0] + m[2], max(m[1], m[3]), interleaved)
    ]
    meta["mixed_check"] = mixed_check(engine, by_tp[1], mixed, a.repeats)
    by_tp[1] = entry = dataclasses.replace(by_tp[1], mixed_scale=mixed_scale(meta["mixed_check"]))
    write_json(a.output, data.to_dict())
    split = (
        ""
        if entry.prefill_large is None
        else (f" up to {entry.prefill_threshold} tokens a step, {list(entry.prefill_large)} above")
    )
    print(f"prefill ms = {list(entry.prefill)}{split} (max rel. error {meta['prefill_max_rel_error']:.1%})")
    print(
        f"decode  ms = {list(entry.decode_small)} below batch {entry.large_batch_threshold}, "
        f"{list(entry.decode_large)} from there (max rel. error {meta['decode_max_rel_error']:.1%})"
    )
    print(f"engine overhead per step: {overhead[0]:.2f} ms + {overhead[1]:.3f} ms per row")
    for pb, n, db, c, ms, model in meta["mixed_check"]:
        print(
            f"mixed step {pb} x {n} prefill + {db} x {c} decode: {ms:.1f} ms measured, "
            f"{model:.1f} ms modelled ({(model - ms) / ms:+.0%})"
        )
    print(f"mixed steps are charged x {entry.mixed_scale:.3f} (the median measured / modelled)")
    print(f"wrote {a.output}")
    return 0
