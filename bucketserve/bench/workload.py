"""A benchmark workload: the requests (real text) and how they arrive."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bucketserve.bench.datasets import (
    BenchRequest,
    cap_lengths,
    requests_for_lengths,
    sharegpt_requests,
)
from bucketserve.workloads import LengthPair, synthetic
from bucketserve.workloads.arrivals import all_at_once, gamma, poisson, scale_times
from bucketserve.workloads.traces import load_trace


@dataclass
class Workload:
    name: str
    requests: list[BenchRequest]
    trace_times: list[float] | None = None  # a trace's own arrival times (seconds), if replayed

    @property
    def trace_rate(self) -> float:
        """The replayed slice's mean request rate (requests per second of trace time)."""
        if not self.trace_times or len(self.trace_times) < 2:
            return math.nan
        return (len(self.trace_times) - 1) / (max(self.trace_times) - min(self.trace_times))

    def arrivals(
        self, rate: float | None = None, burstiness: float = 1.0, time_scale: float = 1.0, seed: int = 0
    ) -> list[float]:
        """Arrival offsets. ``rate`` inf: all at once. A trace keeps its own arrival pattern:
        ``rate`` rescales it to that mean rate, else ``time_scale`` multiplies its times. Other
        workloads: ``rate`` None = all at once, else Poisson (burstiness 1) or gamma arrivals."""
        n = len(self.requests)
        if rate is not None and math.isinf(rate):
            return all_at_once(n)
        if self.trace_times is not None:
            scale = time_scale if rate is None else self.trace_rate / rate
            return scale_times(self.trace_times, scale)
        if rate is None:
            return all_at_once(n)
        return poisson(n, rate, seed) if burstiness == 1.0 else gamma(n, rate, burstiness, seed)


def build_workload(
    dataset: str,
    num_requests: int,
    tokenizer: Any,
    seed: int = 0,
    max_prompt_len: int = 1024,
    max_output_len: int | None = None,
    max_total_len: int | None = 2048,
    prompt_len: int = 128,
    output_len: int = 128,
    long_fraction: float = 0.5,
) -> Workload:
    """``num_requests`` requests of ``dataset``: "sharegpt" (real prompts, vLLM's filters), a
    trace ("azure-conv", "azure-code": its first requests, lengths capped, text from ShareGPT)
    or a synthetic length generator ("alpaca-like", "longbench-like", "mixed", "fixed",
    "uniform": prompt_len/2..prompt_len x output_len/2..output_len) with ShareGPT text."""
    if dataset == "sharegpt":
        reqs = sharegpt_requests(tokenizer, num_requests, seed, max_prompt_len, max_output_len, max_total_len)
        return Workload(dataset, reqs)
    if dataset in ("azure-conv", "azure-code"):
        rows = load_trace(dataset)[:num_requests]
        pairs = [LengthPair(r.prompt_len, r.output_len) for r in rows]
        times: list[float] | None = [r.arrival for r in rows]
    else:
        times = None
        if dataset == "alpaca-like":
            pairs = synthetic.alpaca_like(num_requests, seed)
        elif dataset == "longbench-like":
            pairs = synthetic.longbench_like(num_requests, seed, max_prompt_len=max_prompt_len)
        elif dataset == "mixed":
            pairs = synthetic.mixed(num_requests, seed, long_fraction, max_prompt_len=max_prompt_len)
        elif dataset == "fixed":
            pairs = synthetic.fixed(num_requests, prompt_len, output_len)
        elif dataset == "uniform":
            pairs = synthetic.uniform(
                num_requests,
                (max(1, prompt_len // 2), prompt_len),
                (max(1, output_len // 2), output_len),
                seed,
            )
        else:
            raise ValueError(f"unknown dataset {dataset!r}")
    pairs = cap_lengths(pairs, max_prompt_len, max_output_len, max_total_len)
    return Workload(dataset, requests_for_lengths(tokenizer, pairs, seed), times)
