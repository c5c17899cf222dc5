"""What the engine returns per request, in vLLM's shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bucketserve.engine.handover import KVHandover


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of one sampled token and of the most likely alternatives at its
    position, from the model's own distribution (before temperature, top-k and top-p, as
    vLLM reports them by default)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error", "late"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprobs] | None = None  # one per token id, when the request asked


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    ttft_slo: float | None = None  # the request's targets in seconds, as the scheduler resolved them
    tpot_slo: float | None = None
    # Disaggregated serving: seconds from the prefill instance's hand-over to the KV written
    # in here (serialization, the transfer and the copy), on the decode instance's outputs
    kv_transfer_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))
    # A prefill instance's last output: the KV and first token for the decode instance
    kv_handover: KVHandover | None = None
