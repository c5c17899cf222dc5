"""Request metrics with one set of definitions for the engine, the simulator and the bench
(DESIGN section 5). Pure Python; nothing here knows about HTTP.

Summary keys follow vLLM's ``bench serve``: request_throughput, output_throughput,
mean/median/p99 _ttft_ms, _tpot_ms, _itl_ms, _e2el_ms (plus p50/p90).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bucketserve.outputs import RequestOutput


@dataclass
class RequestRecord:
    """What one request looked like, in seconds on one clock.

    A failed request keeps ``error`` set (e.g. "HTTP 500", "timeout"); its times may be nan and
    it counts as a miss in SLO attainment and goodput, never as a latency sample.
    ``itls`` holds every gap between consecutive streamed tokens (empty when not observed);
    ``queue_time`` is the time from arrival to the first scheduling, where an executor knows it.
    """

    arrival: float
    first_token: float
    finished: float
    prompt_tokens: int
    output_tokens: int
    itls: list[float] = field(default_factory=list)
    error: str | None = None
    queue_time: float | None = None

    @classmethod
    def from_output(cls, out: RequestOutput) -> RequestRecord:
        """A finished engine output's record (engine clock; queue time from its scheduling)."""
        m = out.metrics
        if m.first_token_time is None or m.finished_time is None:
            raise ValueError(f"{out.request_id} has not finished with a token")
        return cls(
            arrival=m.arrival_time,
            first_token=m.first_token_time,
            finished=m.finished_time,
            prompt_tokens=len(out.prompt_token_ids),
            output_tokens=len(out.outputs[0].token_ids),
            queue_time=None if m.first_scheduled_time is None else m.first_scheduled_time - m.arrival_time,
        )

    @property
    def ok(self) -> bool:
        return self.error is None

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


def _stats(out: dict[str, float], name: str, values_ms: list[float]) -> None:
    out[f"mean_{name}_ms"] = sum(values_ms) / len(values_ms) if values_ms else math.nan
    out[f"median_{name}_ms"] = percentile(values_ms, 50)
    for q in (50, 90, 99):
        out[f"p{q}_{name}_ms"] = percentile(values_ms, q)


def summarize(records: list[RequestRecord], duration: float) -> dict[str, float]:
    """Throughputs over ``duration`` (completed requests only) and mean/median/p50/p90/p99 of
    TTFT, TPOT, ITL and E2E latency (``e2el``) in ms, vLLM's names.

    As in vLLM, TPOT statistics skip single-token outputs and ITL pools every gap of every
    request; ``requests`` counts all records, ``completed``/``failed`` split them.
    """
    ok = [r for r in records if r.ok]

    def per_s(x: float) -> float:
        return x / duration if duration else math.nan

    out: dict[str, float] = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": sum(r.output_tokens for r in ok),
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(sum(r.output_tokens for r in ok)),
        "total_token_throughput": per_s(sum(r.output_tokens + r.prompt_tokens for r in ok)),
    }
    _stats(out, "ttft", [r.ttft * 1e3 for r in ok])
    _stats(out, "tpot", [r.tpot * 1e3 for r in ok if r.output_tokens > 1])
    _stats(out, "itl", [gap * 1e3 for r in ok for gap in r.itls])
    _stats(out, "e2el", [r.e2e * 1e3 for r in ok])
    queue = [r.queue_time * 1e3 for r in ok if r.queue_time is not None]
    if queue:
        _stats(out, "queue", queue)
    return out


MISS_CAUSES = ("failed", "ttft", "tpot")


def miss_cause(record: RequestRecord, ttft_s: float | None, tpot_s: float | None) -> str | None:
    """Why ``record`` missed its targets, the first cause in ``MISS_CAUSES``' order: "failed"
    (no reply: an error, a 429 for a request that could not make its TTFT, a timeout), "ttft"
    (its first token came later than ttft_s), "tpot" (on time, but decoded slower than
    tpot_s); None when it met them (a None target is not checked)."""
    if not record.ok:
        return "failed"
    if ttft_s is not None and not record.ttft <= ttft_s:
        return "ttft"
    if tpot_s is not None and not record.tpot <= tpot_s:
        return "tpot"
    return None


def meets_slo(record: RequestRecord, ttft_s: float | None, tpot_s: float | None) -> bool:
    """Completed, with TTFT <= ttft_s and TPOT <= tpot_s (a None target is not checked)."""
    return miss_cause(record, ttft_s, tpot_s) is None


# A request's (TTFT, TPOT) targets in seconds, None = not checked: one pair for all, or by class.
Targets = Callable[[RequestRecord], tuple[float | None, float | None]]


def slo_attainment(records: list[RequestRecord], targets: Targets) -> float:
    """Share of ALL requests (failed ones are misses) meeting both their targets; nan for none."""
    if not records:
        return math.nan
    return sum(meets_slo(r, *targets(r)) for r in records) / len(records)


def slo_misses(records: list[RequestRecord], targets: Targets) -> dict[str, int]:
    """How many requests missed their targets, by first cause (``miss_cause``), in
    ``MISS_CAUSES``' order."""
    causes = Counter(miss_cause(r, *targets(r)) for r in records)
    return {cause: causes[cause] for cause in MISS_CAUSES}


def goodput(records: list[RequestRecord], targets: Targets, duration: float) -> float:
    """Requests per second that met their SLOs (vLLM's request_goodput)."""
    return sum(meets_slo(r, *targets(r)) for r in records) / duration if duration else math.nan


def load_capacity(rates: Sequence[float], attainments: Sequence[float], target: float = 0.8) -> float:
    """The highest request rate whose SLO attainment stays >= ``target``, from a sweep.

    Points are sorted by rate. Take the highest-rate point at or above the target: if it is
    the last point, its rate is returned (a lower bound: the sweep never failed); otherwise the
    rate where the line to the next point crosses the target. nan when no point reaches it
    (the capacity is below the sweep's lowest rate).
    """
    if len(rates) != len(attainments):
        raise ValueError(f"{len(rates)} rates but {len(attainments)} attainments")
    points = sorted(zip(rates, attainments, strict=True))
    above = [i for i, (_, a) in enumerate(points) if a >= target]
    if not above:
        return math.nan
    i = above[-1]
    if i == len(points) - 1:
        return points[i][0]
    (r0, a0), (r1, a1) = points[i], points[i + 1]
    return r0 + (a0 - target) / (a0 - a1) * (r1 - r0)
