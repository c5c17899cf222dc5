"""Arrival processes: offsets in seconds from 0, seeded (pure Python).

The first request arrives at 0 and each later one one gap after the previous, as in vLLM's
``bench serve``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence


def all_at_once(n: int) -> list[float]:
    """Every request at 0 (offline throughput)."""
    return [0.0] * n


def _from_gaps(gaps: list[float]) -> list[float]:
    return [0.0, *itertools.accumulate(gaps)][: len(gaps)]


def poisson(n: int, rate: float, seed: int = 0) -> list[float]:
    """Poisson arrivals: exponential gaps with mean 1/rate seconds; rate inf = all at once."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if math.isinf(rate):
        return all_at_once(n)
    rng = random.Random(seed)
    return _from_gaps([rng.expovariate(rate) for _ in range(n)])


def gamma(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Gamma-distributed gaps with mean 1/rate, as vLLM's ``--burstiness``: shape = burstiness,
    scale = 1 / (rate x burstiness). 1 is Poisson; below 1 burstier, above 1 more regular."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate} and {burstiness}")
    if math.isinf(rate):
        return all_at_once(n)
    rng = random.Random(seed)
    return _from_gaps([rng.gammavariate(burstiness, 1 / (rate * burstiness)) for _ in range(n)])


def scale_times(times: Sequence[float], scale: float) -> list[float]:
    """Trace replay: shift so the first arrival is at 0, then multiply by ``scale``
    (0.1 replays ten times faster, 2 half as fast)."""
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    if not times:
        return []
    t0 = min(times)
    return [(t - t0) * scale for t in times]
