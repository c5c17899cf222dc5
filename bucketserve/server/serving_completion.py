"""POST /v1/completions: a text (or token ids) prompt, answered whole or streamed."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from bucketserve.errors import InvalidRequestError
from bucketserve.outputs import TokenLogprobs
from bucketserve.server.json_reply import JSONReply
from bucketserve.server.logprobs import DecodeToken, completion_logprobs
from bucketserve.server.metrics import RequestTracker
from bucketserve.server.protocol import DEFAULT_COMPLETION_MAX_TOKENS, CompletionRequest, usage
from bucketserve.server.serving import OpenAIServing
from bucketserve.server.streaming import ChunkWriter


class CompletionChunks(ChunkWriter):
    """``text_completion`` chunks; each chunk's logprobs give their tokens' offsets in the
    whole text, so the writer counts the text it has sent."""

    def __init__(self, base: dict[str, Any], include_usage: bool, decode: DecodeToken) -> None:
        super().__init__(base, include_usage)
        self.decode = decode
        self.text_offset = 0

    def choice(
        self, text: str, finish_reason: str | None, logprobs: list[TokenLogprobs] | None
    ) -> dict[str, Any]:
        lps = None if logprobs is None else completion_logprobs(logprobs, self.decode, self.text_offset)
        self.text_offset += len(text)
        return {"index": 0, "text": text, "logprobs": lps, "finish_reason": finish_reason}


class CompletionServing(OpenAIServing):
    async def create(self, request: Request) -> Response:
        req = await self.parse(request, CompletionRequest)
        self.check_model(req.model)
        try:
            req.check()
            prompt = req.single_prompt()
        except InvalidRequestError as e:
            raise self.invalid(e) from None
        rid = f"cmpl-{uuid.uuid4().hex}"
        max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        stream = await self.add_request(rid, prompt, req, max_tokens)
        tracker = RequestTracker(self.metrics)
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        decode = self.engine.decode_token
        if req.stream:
            return self.stream(stream, CompletionChunks(base, req.include_usage, decode), tracker)

        final = await self.collect(stream, request, tracker)
        if final is None:
            return Response(status_code=499)  # the client left
        c = final.outputs[0]
        choice = {
            "index": 0,
            "text": c.text,
            "logprobs": None if c.logprobs is None else completion_logprobs(c.logprobs, decode),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        return JSONReply({**base, "choices": [choice], "usage": usage(final)})
