"""Logprobs in OpenAI's two response shapes: the legacy completions one and the chat one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bucketserve.outputs import TokenLogprobs

DecodeToken = Callable[[int], str]


def completion_logprobs(
    lps: list[TokenLogprobs], decode: DecodeToken, text_offset: int = 0
) -> dict[str, Any]:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` for /v1/completions;
    ``text_offset`` is where the first of these tokens starts in the whole output text."""
    tokens = [decode(lp.token_id) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{decode(i): v for i, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def chat_logprobs(lps: list[TokenLogprobs], decode: DecodeToken) -> dict[str, Any]:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`` for /v1/chat/completions."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = decode(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]} for lp in lps
        ]
    }
