"""A benchmark workload: the requests (real text) and how they arrive."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bucketserve.bench.datasets import (
    DATASETS,
    BenchRequest,
    cap_lengths,
    load_tokenizer,
    requests_for_lengths,
    sharegpt_requests,
)
from bucketserve.options import check, check_fields, option
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


# -- the bench subcommands' workload and arrival options -------------------------------------


@dataclass
class WorkloadConfig:
    """Which requests a benchmark sends (the ``bench`` subcommands' workload options)."""

    dataset: str = option(
        "sharegpt",
        choices=DATASETS,
        help="sharegpt: real ShareGPT prompts and reply lengths (vLLM's filters); azure-conv / "
        "azure-code: the real Azure 2023 traces (arrival times and lengths; text cut from ShareGPT); "
        "alpaca-like, longbench-like, mixed, fixed, uniform: SYNTHETIC lengths with ShareGPT text",
    )
    num_prompts: int = option(100, help="requests to send (a trace: its first N)")
    seed: int = option(0, help="seed for sampling, text and arrivals")
    tokenizer: str | None = option(
        None,
        help="Hugging Face folder whose tokenizer counts tokens; must match the served model "
        "(default: the embedded SmolLM2-135M-Instruct's)",
    )
    max_prompt_len: int = option(1024, help="longest prompt in tokens")
    max_output_len: int | None = option(
        None, help="cap on max_tokens per request (default: none, the dataset's length)"
    )
    max_total_len: int = option(
        2048,
        help="prompt + output cap (sharegpt drops longer pairs; others cut the output); "
        "keep it <= the server's --max-model-len",
    )
    prompt_len: int = option(128, help="fixed/uniform: prompt tokens (uniform: N/2..N)")
    output_len: int = option(128, help="fixed/uniform: output tokens (uniform: N/2..N)")
    long_fraction: float = option(0.5, help="mixed: share of longbench-like requests")

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("num_prompts", "max_prompt_len", "max_total_len", "prompt_len", "output_len"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(
            self.max_output_len is None or self.max_output_len >= 1,
            f"max_output_len must be >= 1, got {self.max_output_len}",
        )
        check(0 <= self.long_fraction <= 1, f"long_fraction must be in [0, 1], got {self.long_fraction}")

    def build(self) -> Workload:
        """The requests, their token counts read with ``tokenizer``."""
        return build_workload(
            self.dataset,
            self.num_prompts,
            load_tokenizer(self.tokenizer),
            seed=self.seed,
            max_prompt_len=self.max_prompt_len,
            max_output_len=self.max_output_len,
            max_total_len=self.max_total_len,
            prompt_len=self.prompt_len,
            output_len=self.output_len,
            long_fraction=self.long_fraction,
        )


@dataclass
class ArrivalConfig:
    """When the requests are sent (the ``bench`` subcommands' arrival options; a sweep gives
    its rates instead of ``request_rate``, see ``bench.sweep.SweepConfig``)."""

    request_rate: float | None = option(
        None,
        help="mean requests/s (Poisson, or gamma with --burstiness); inf or unset = all at once. "
        "For a trace: rescale its arrivals to this mean rate (default: unset; a trace then replays "
        "with --time-scale)",
    )
    time_scale: float = option(
        1.0, help="trace replay: multiply the trace's arrival times (0.5 = twice as fast)"
    )
    burstiness: float = option(
        1.0, help="gamma shape of the inter-arrival times: 1 = Poisson, < 1 burstier, > 1 steadier"
    )
    max_concurrency: int | None = option(None, help="most requests in flight (default: no limit)")

    def __post_init__(self) -> None:
        check_fields(self)
        check(
            self.request_rate is None or self.request_rate > 0,
            f"request_rate must be > 0 (or inf), got {self.request_rate}",
        )
        check(self.time_scale > 0, f"time_scale must be > 0, got {self.time_scale}")
        check(self.burstiness > 0, f"burstiness must be > 0, got {self.burstiness}")
        check(
            self.max_concurrency is None or self.max_concurrency >= 1,
            f"max_concurrency must be >= 1, got {self.max_concurrency}",
        )
