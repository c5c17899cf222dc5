"""Synthetic request-length generators, seeded (pure Python).

These are NOT real data: they draw lengths from log-normal distributions fitted to published
statistics, so that the paper's workloads (Alpaca, LongBench, Mixed; DESIGN section 6) can be
approximated without the datasets. For real lengths use ``traces`` (Azure) or ``sharegpt``.
Every generator returns ``list[LengthPair]`` and gives the same list for the same arguments.
"""

from __future__ import annotations

import math
import random

from bucketserve.workloads.lengths import LengthPair

# Alpaca prompt lengths per the BucketServe paper: mean 83.7, median 69 tokens. A log-normal
# with median m and mean M has mu = ln m and sigma = sqrt(2 ln(M / m)).
ALPACA_PROMPT_MEDIAN = 69.0
ALPACA_PROMPT_MEAN = 83.7
# Alpaca outputs (text-davinci-003 replies): a log-normal with median 150 and mean ~200 tokens.
ALPACA_OUTPUT_MEDIAN = 150.0
ALPACA_OUTPUT_SIGMA = 0.75
# LongBench documents run to thousands of tokens (English tasks average ~6.7k words); answers
# are short (QA, summaries). Prompts are truncated to the model's limit, as LongBench does.
LONGBENCH_PROMPT_MEDIAN = 7000.0
LONGBENCH_PROMPT_SIGMA = 0.6
LONGBENCH_MIN_PROMPT = 1000
LONGBENCH_OUTPUT_MEDIAN = 64.0
LONGBENCH_OUTPUT_SIGMA = 0.8


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))


def alpaca_like(
    n: int,
    seed: int = 0,
    max_prompt_len: int = 1024,
    max_output_len: int = 1024,
    min_output_len: int = 4,
) -> list[LengthPair]:
    """Synthetic Alpaca-like lengths: prompts log-normal with median 69 and mean 83.7 tokens
    (the paper's Alpaca statistics), outputs log-normal with median 150 and mean ~200 tokens.
    Prompts are clipped to [4, max_prompt_len], outputs to [min_output_len, max_output_len]."""
    rng = random.Random(seed)
    sigma = math.sqrt(2 * math.log(ALPACA_PROMPT_MEAN / ALPACA_PROMPT_MEDIAN))
    return [
        LengthPair(
            _lognormal_int(rng, ALPACA_PROMPT_MEDIAN, sigma, 4, max_prompt_len),
            _lognormal_int(rng, ALPACA_OUTPUT_MEDIAN, ALPACA_OUTPUT_SIGMA, min_output_len, max_output_len),
        )
        for _ in range(n)
    ]


def longbench_like(
    n: int,
    seed: int = 0,
    max_prompt_len: int = 3584,
    max_output_len: int = 512,
    min_output_len: int = 4,
) -> list[LengthPair]:
    """Synthetic LongBench-like lengths: documents log-normal with median 7,000 tokens (at least
    1,000), truncated to ``max_prompt_len`` (default 3,584 = LLaMA-2's 4,096 context minus room
    for the output), so most prompts sit at the limit; outputs short, median 64 tokens."""
    rng = random.Random(seed)
    return [
        LengthPair(
            min(
                max_prompt_len,
                _lognormal_int(
                    rng, LONGBENCH_PROMPT_MEDIAN, LONGBENCH_PROMPT_SIGMA, LONGBENCH_MIN_PROMPT, 1 << 20
                ),
            ),
            _lognormal_int(
                rng, LONGBENCH_OUTPUT_MEDIAN, LONGBENCH_OUTPUT_SIGMA, min_output_len, max_output_len
            ),
        )
        for _ in range(n)
    ]


def mixed(
    n: int,
    seed: int = 0,
    long_fraction: float = 0.5,
    max_prompt_len: int = 3584,
    max_output_len: int = 512,
) -> list[LengthPair]:
    """Synthetic Mixed workload: ``round(n * long_fraction)`` LongBench-like requests and the rest
    Alpaca-like, shuffled together (the paper's Mixed workload mixes both)."""
    if not 0.0 <= long_fraction <= 1.0:
        raise ValueError(f"long_fraction must be in [0, 1], got {long_fraction}")
    n_long = round(n * long_fraction)
    out = longbench_like(n_long, seed, max_prompt_len, max_output_len) + alpaca_like(
        n - n_long, seed + 1, min(1024, max_prompt_len), max_output_len
    )
    random.Random(seed + 2).shuffle(out)
    return out


def fixed(n: int, prompt_len: int, output_len: int) -> list[LengthPair]:
    """``n`` identical synthetic requests."""
    return [LengthPair(prompt_len, output_len)] * n


def uniform(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int = 0
) -> list[LengthPair]:
    """Synthetic lengths drawn uniformly from the inclusive ranges."""
    rng = random.Random(seed)
    return [LengthPair(rng.randint(*prompt_range), rng.randint(*output_range)) for _ in range(n)]
