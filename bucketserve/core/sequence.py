"""One request as the scheduler sees it: its tokens, its progress and its KV blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from bucketserve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-sequence token, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the client or the engine
    ERROR = "error"  # the batch it ran in failed
    LATE = "late"  # dropped before its first token, its TTFT target out of reach (--reject-late)


@dataclass(eq=False)
class Sequence:
    """A request's token sequence (prompt followed by output) and its scheduling state.

    ``num_computed_tokens`` counts the tokens whose KV is in the cache. A step that brings it
    up to ``len(token_ids)`` yields the next output token. Preemption by recompute drops the
    KV and sets it back to 0; the tokens themselves are kept.
    """

    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    priority: int = 0  # lower runs first, as in vLLM
    ttft_slo: float | None = None  # seconds
    tpot_slo: float | None = None  # seconds
    predicted_output_len: int | None = None
    eos_token_id: int | None = None

    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        self.prompt_len = len(self.prompt_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return self.prompt_len + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def max_len(self) -> int:
        """The longest this sequence can grow: prompt plus max_tokens."""
        return self.prompt_len + self.params.max_tokens

    def append_token(self, token_id: int) -> None:
        """Record a sampled token. Whether it ends the sequence is the scheduler's call."""
        self.output_token_ids.append(token_id)
