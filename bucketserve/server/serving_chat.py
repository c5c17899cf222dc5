"""POST /v1/chat/completions: messages through the model's chat template, answered whole or
streamed."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from bucketserve.errors import InvalidRequestError
from bucketserve.outputs import TokenLogprobs
from bucketserve.server.json_reply import JSONReply
from bucketserve.server.logprobs import DecodeToken, chat_logprobs
from bucketserve.server.metrics import RequestTracker
from bucketserve.server.protocol import DEFAULT_CHAT_MAX_TOKENS, ChatCompletionRequest, usage
from bucketserve.server.serving import OpenAIServing
from bucketserve.server.streaming import ChunkWriter


class ChatChunks(ChunkWriter):
    """``chat.completion.chunk`` chunks: a first one announcing the assistant's role, then
    the content's deltas."""

    def __init__(self, base: dict[str, Any], include_usage: bool, decode: DecodeToken) -> None:
        super().__init__(base, include_usage)
        self.decode = decode

    def first(self) -> dict[str, Any]:
        out = self.chunk("", None, None)
        out["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return out

    def choice(
        self, text: str, finish_reason: str | None, logprobs: list[TokenLogprobs] | None
    ) -> dict[str, Any]:
        return {
            "index": 0,
            "delta": {"content": text},
            "logprobs": None if logprobs is None else chat_logprobs(logprobs, self.decode),
            "finish_reason": finish_reason,
        }


class ChatServing(OpenAIServing):
    async def create(self, request: Request) -> Response:
        req = await self.parse(request, ChatCompletionRequest)
        self.check_model(req.model)
        try:
            req.check()
            prompt_ids = self.engine.apply_chat_template([m.as_template_dict() for m in req.messages])
        except InvalidRequestError as e:
            raise self.invalid(e) from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        max_tokens = req.requested_max_tokens
        if max_tokens is None:
            # the rest of the context, capped; at least 1 so that a too-long prompt gets the
            # engine's message with both lengths
            max_tokens = max(1, min(DEFAULT_CHAT_MAX_TOKENS, self.engine.max_model_len - len(prompt_ids)))
        stream = await self.add_request(rid, prompt_ids, req, max_tokens)
        tracker = RequestTracker(self.metrics)
        created = int(time.time())
        if req.stream:
            base = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
            }
            return self.stream(stream, ChatChunks(base, req.include_usage, self.engine.decode_token), tracker)

        final = await self.collect(stream, request, tracker)
        if final is None:
            return Response(status_code=499)  # the client left
        c = final.outputs[0]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": None if c.logprobs is None else chat_logprobs(c.logprobs, self.engine.decode_token),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        return JSONReply(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": self.model_name,
                "choices": [choice],
                "usage": usage(final),
            }
        )
