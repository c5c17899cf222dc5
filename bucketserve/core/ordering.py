"""Urgency keys: who goes first among waiting requests (see OrderConfig)."""

from __future__ import annotations

from bucketserve.config import OrderConfig
from bucketserve.core.sequence import Sequence


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
