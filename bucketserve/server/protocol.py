"""OpenAI request bodies (the subset we serve), their translation to SamplingParams, and the
usage object every reply carries."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bucketserve.errors import InvalidRequestError
from bucketserve.outputs import RequestOutput
from bucketserve.sampling_params import SamplingParams

# Chat requests without max_tokens get the rest of the context, capped here: the bucket policy
# reserves KV memory for prompt + max_tokens, so a huge default would shrink every batch.
DEFAULT_CHAT_MAX_TOKENS = 1024
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields common to completions and chat. Unknown fields are ignored, as OpenAI clients
    send some we do not use (user, logit_bias, ...)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    # extensions
    priority: int = 0
    ttft_slo_ms: float | None = Field(default=None, gt=0)
    tpot_slo_ms: float | None = Field(default=None, gt=0)

    def check_common(self) -> None:
        if self.n != 1:
            raise InvalidRequestError(f"only n=1 is supported, got n={self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", "stream_options")

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0 if self.top_k == -1 else self.top_k,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=self.num_logprobs,
        )

    @property
    def num_logprobs(self) -> int | None:
        """How many top alternatives to return per token; None when logprobs are off."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def ttft_slo(self) -> float | None:
        return None if self.ttft_slo_ms is None else self.ttft_slo_ms / 1000

    @property
    def tpot_slo(self) -> float | None:
        return None if self.tpot_slo_ms is None else self.tpot_slo_ms / 1000


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def single_prompt(self) -> str | list[int]:
        """The one prompt this request carries (text or token ids)."""
        p: Any = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise InvalidRequestError(
                    f"batched prompts are not supported: send one prompt per request (got {len(p)})",
                    "prompt",
                )
            p = p[0]
        if isinstance(p, list) and not p:
            raise InvalidRequestError("the prompt is empty", "prompt")
        return p

    def check(self) -> None:
        self.check_common()
        if self.echo:
            raise InvalidRequestError("echo is not supported", "echo")
        if self.suffix is not None:
            raise InvalidRequestError("suffix is not supported", "suffix")

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def check(self) -> None:
        self.check_common()
        if not self.messages:
            raise InvalidRequestError("messages must not be empty", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true", "top_logprobs")

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def usage(out: RequestOutput) -> dict[str, int]:
    """OpenAI's ``usage``: the prompt's tokens and the tokens generated so far."""
    p, c = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
