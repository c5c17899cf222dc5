"""Request metrics with one set of definitions for the engine, the simulator and the bench
(DESIGN section 5). Pure Python."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class RequestRecord:
    """What one finished request looked like, in seconds on one clock."""

    arrival: float
    first_token: float
    finished: float
    prompt_tokens: int
    output_tokens: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finished - self.arrival

    @property
    def tpot(self) -> float:
        """(E2E - TTFT) / (output_tokens - 1); 0 for a single-token output."""
        return (
            (self.finished - self.first_token) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0
        )


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(records: list[RequestRecord], duration: float) -> dict[str, float]:
    """Throughputs and mean/p50/p90/p99 of TTFT, TPOT and E2E (in ms)."""
    out: dict[str, float] = {
        "requests": len(records),
        "duration_s": duration,
        "request_throughput": len(records) / duration if duration else math.nan,
        "output_throughput": sum(r.output_tokens for r in records) / duration if duration else math.nan,
        "total_token_throughput": sum(r.output_tokens + r.prompt_tokens for r in records) / duration
        if duration
        else math.nan,
    }
    for name in ("ttft", "tpot", "e2e"):
        values = [getattr(r, name) * 1e3 for r in records]
        out[f"mean_{name}_ms"] = sum(values) / len(values) if values else math.nan
        for q in (50, 90, 99):
            out[f"p{q}_{name}_ms"] = percentile(values, q)
    return out
