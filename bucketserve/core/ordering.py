"""Urgency keys: who goes first among waiting requests."""

from __future__ import annotations

from dataclasses import dataclass

from bucketserve.core.sequence import Sequence
from bucketserve.options import check, check_fields, option

ORDERS = ("fcfs", "sjf", "ljf", "edf")


@dataclass
class OrderConfig:
    """Who goes first among waiting requests (every policy that orders uses this).

    Each request gets a fixed urgency key, in seconds; the lowest runs first:

        key = arrival + priority * aging_s            (fcfs)
            + ttft_slo (or default_ttft_slo_s)        (edf)
            + predicted job tokens * token_weight_s   (sjf; minus for ljf)

    Because the key never changes after arrival, aging is built in: a request is overtaken
    only by requests that arrive less than (its key - their key offset) later, so no request
    waits forever. Priorities are integers, lower first, as in vLLM.
    """

    order: str = option(
        "fcfs",
        choices=ORDERS,
        help="who goes first: fcfs, sjf/ljf (shortest/longest job), edf (earliest TTFT deadline)",
    )
    aging_s: float = option(
        1.0,
        name="aging",
        metavar="SECONDS",
        help="one priority level is worth this much waiting (bounds every wait)",
    )
    token_weight_s: float = option(
        0.001,
        name="token-weight",
        metavar="SECONDS",
        help="sjf/ljf: one token of job size is worth this much waiting",
    )
    default_ttft_slo_s: float = option(
        10.0,
        name="default-ttft-slo",
        metavar="SECONDS",
        help="edf: the deadline of requests without their own TTFT SLO",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        check(self.aging_s >= 0, f"aging_s must be >= 0, got {self.aging_s}")
        check(self.token_weight_s >= 0, f"token_weight_s must be >= 0, got {self.token_weight_s}")
        check(self.default_ttft_slo_s > 0, f"default_ttft_slo_s must be > 0, got {self.default_ttft_slo_s}")


def job_tokens(seq: Sequence) -> int:
    """The work a request asks for: its prompt plus its predicted (or maximum) output."""
    out = seq.predicted_output_len if seq.predicted_output_len is not None else seq.params.max_tokens
    return seq.prompt_len + out


def urgency(seq: Sequence, cfg: OrderConfig) -> float:
    """A key in seconds, fixed at arrival; lower runs first. Aging is built in (see OrderConfig)."""
    key = seq.arrival_time + seq.priority * cfg.aging_s
    if cfg.order == "edf":
        key += seq.ttft_slo if seq.ttft_slo is not None else cfg.default_ttft_slo_s
    elif cfg.order == "sjf":
        key += job_tokens(seq) * cfg.token_weight_s
    elif cfg.order == "ljf":
        key -= job_tokens(seq) * cfg.token_weight_s
    return key
