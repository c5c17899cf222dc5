"""Per-request generation parameters, in vLLM's shape."""

from __future__ import annotations

from dataclasses import dataclass, field

from bucketserve.errors import InvalidRequestError

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
# The seeds torch.Generator.manual_seed takes: a seed outside them would fail its batch's step.
SEED_MIN, SEED_END = -(2**63), 2**64


@dataclass
class SamplingParams:
    """How to sample one request's output.

    temperature == 0 means greedy decoding. ``seed`` makes a sampled output reproducible.
    ``stop`` strings end the output (and are not part of it); ``stop_token_ids`` end it
    after the token is produced. ``ignore_eos`` keeps generating past the end-of-sequence
    token until ``max_tokens``, as benchmarks need. ``logprobs=k`` returns each output
    token's log-probability and the k most likely tokens at its position.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens"
            )
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}", "top_k")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
                "min_tokens",
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs"
            )
        if self.seed is not None and not SEED_MIN <= self.seed < SEED_END:
            raise InvalidRequestError(f"seed must be in [-2**63, 2**64), got {self.seed}", "seed")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
