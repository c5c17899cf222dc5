"""Server-sent events: one request's outputs streamed as OpenAI chunks.

Each endpoint says what its chunks look like (a ``ChunkWriter``); ``sse_response`` frames them
as ``data: {json}`` events, sends only the text each output adds, reports an engine failure or
a shutdown as an error event, ends with ``data: [DONE]``, and aborts the request (freeing its
KV blocks at once) when the client goes away before the end.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from bucketserve.engine.async_engine import EngineStoppedError, RequestStream
from bucketserve.outputs import RequestOutput, TokenLogprobs
from bucketserve.server.errors import APIError, output_error
from bucketserve.server.json_reply import json_text
from bucketserve.server.metrics import RequestTracker
from bucketserve.server.protocol import usage

# A streamed reply's engine arrival time, on the server's monotonic clock: with /debug/steps's
# "now", the bench client places the request on the engine's timeline.
ARRIVAL_HEADER = "X-Bucketserve-Arrival"
DONE = "data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json_text(payload)}\n\n"


class ChunkWriter(abc.ABC):
    """One streamed request's chunks in its endpoint's shape: each is ``base`` (id, object,
    created, model) plus one choice, and ``"usage": null`` when the client asked for usage,
    which then comes in a last chunk without choices."""

    def __init__(self, base: dict[str, Any], include_usage: bool) -> None:
        self.base = base
        self.include_usage = include_usage

    def first(self) -> dict[str, Any] | None:
        """A chunk sent before any text (chat's announces the assistant's role); None: none."""
        return None

    @abc.abstractmethod
    def choice(
        self, text: str, finish_reason: str | None, logprobs: list[TokenLogprobs] | None
    ) -> dict[str, Any]:
        """The choice carrying ``text``, the new tokens' logprobs and the finish reason."""

    def chunk(
        self, text: str, finish_reason: str | None, logprobs: list[TokenLogprobs] | None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {**self.base, "choices": [self.choice(text, finish_reason, logprobs)]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, final: RequestOutput) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": usage(final)}


def sse_response(
    stream: RequestStream, writer: ChunkWriter, tracker: RequestTracker, abort: Callable[[str], None]
) -> StreamingResponse:
    """Stream ``stream``'s outputs as ``writer``'s chunks; ``abort(request_id)`` frees a
    request whose client left."""
    headers = {"Cache-Control": "no-cache", ARRIVAL_HEADER: f"{stream.arrival_time:.6f}"}
    return StreamingResponse(
        _events(stream, writer, tracker, abort), media_type="text/event-stream", headers=headers
    )


async def _events(
    stream: RequestStream, writer: ChunkWriter, tracker: RequestTracker, abort: Callable[[str], None]
) -> AsyncIterator[str]:
    sent, num_logprobs_sent = "", 0
    last: RequestOutput | None = None
    try:
        first = writer.first()
        if first is not None:
            yield sse_event(first)
        try:
            async for out in stream:
                tracker.observe(out)
                last = out
                err = output_error(out)
                if err is not None:
                    yield sse_event(err.response_body())
                    break
                c = out.outputs[0]
                delta, sent = c.text[len(sent) :], c.text
                if delta or c.finish_reason is not None:
                    lps = None if c.logprobs is None else c.logprobs[num_logprobs_sent:]
                    num_logprobs_sent += len(lps or ())
                    yield sse_event(writer.chunk(delta, c.finish_reason, lps))
        except EngineStoppedError as e:
            yield sse_event(APIError(503, str(e), type="service_unavailable").response_body())
        if writer.include_usage and last is not None:
            yield sse_event(writer.usage_chunk(last))
        yield DONE
    finally:
        if not stream.finished:  # the client went away (or we failed): free the KV now
            abort(stream.request_id)
            tracker.aborted()
