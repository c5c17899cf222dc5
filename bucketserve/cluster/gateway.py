"""The endpoint's ingress on Ray Serve: reads each HTTP request, measures its length, and
forwards it whole to an engine replica through a Ray handle, streaming the reply back.

Why a gateway and not Ray's proxy straight to the replicas: a router sees a request's
arguments, and Ray's proxy passes a replica the HTTP request's headers but streams its body
separately, so no router can see a prompt. The gateway reads the body (under the server's
size limit), counts the prompt's tokens plus max_tokens with the model's tokenizer, and hands
that length to the router (``router.LengthBandRouter``) beside the request. Ray Serve LLM is
built the same way (an OpenAI ingress in front of its LLM server deployments).

The replicas answer with the single server's app (``asgi.call_app``), so a reply is the one
the single server would give, status and headers included. What only the gateway can see it
answers itself, in OpenAI's error shape: a body over the limit (413), every replica full at
Ray's queue (429 with Retry-After), a replica that died before answering (503), and one that
died mid-stream: an SSE error event and ``data: [DONE]``, so a client's stream ends instead
of hanging.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response, StreamingResponse
from starlette.requests import Request

from bucketserve.cluster.asgi import ForwardedRequest, ResponseStart
from bucketserve.cluster.router import LENGTH_KWARG
from bucketserve.server.errors import APIError
from bucketserve.server.protocol import DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS
from bucketserve.server.serving import read_body
from bucketserve.server.streaming import DONE, sse_event

log = logging.getLogger("bucketserve.server")

RETRY_AFTER_S = 1  # what a client refused at Ray's queue is told; the gateway knows no finish rates


def request_length(path: str, body: bytes, tokenizer: Any) -> int | None:
    """A generation request's length for routing: its prompt's tokens plus max_tokens (the
    chat template's few tokens per message not counted); None for anything else, or a body
    the replica will refuse anyway."""
    chat = path.endswith("/chat/completions")
    if not chat and not path.endswith("/completions"):
        return None
    try:
        data = json.loads(body)
        if chat:
            contents = [m.get("content") for m in data["messages"]]
            texts = [c if isinstance(c, str) else json.dumps(c) for c in contents if c]
            prompt_len = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
            max_tokens = (
                data.get("max_completion_tokens") or data.get("max_tokens") or DEFAULT_CHAT_MAX_TOKENS
            )
        else:
            prompt = data["prompt"]
            if isinstance(prompt, str):
                prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
            elif prompt and all(isinstance(t, int) for t in prompt):
                prompt_len = len(prompt)
            else:  # a batch of prompts: the longest decides
                prompt_len = max(
                    len(p) if isinstance(p, list) else len(tokenizer.encode(p, add_special_tokens=False))
                    for p in prompt
                )
            max_tokens = data.get("max_tokens") or DEFAULT_COMPLETION_MAX_TOKENS
        return prompt_len + int(max_tokens)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


async def forward(request: Request, engines: Any, tokenizer: Any | None, max_body_bytes: int) -> Response:
    """Forward ``request`` to a replica of ``engines`` (a streaming Ray handle) and answer with
    its reply; with a ``tokenizer``, pass the router the request's length."""
    from ray.exceptions import RayError
    from ray.serve.exceptions import BackPressureError

    try:
        body = await read_body(request, max_body_bytes)
    except APIError as e:
        return e.response()
    client = request.client
    call = ForwardedRequest(
        method=request.method,
        path=request.url.path,
        query_string=request.url.query.encode(),
        headers=list(request.headers.raw),
        body=body,
        client=(client.host, client.port) if client else None,
    )
    length = None
    if tokenizer is not None and call.method == "POST":  # off the event loop: a prompt may be long
        length = await asyncio.to_thread(request_length, call.path, body, tokenizer)
    reply = engines.forward.remote(call, **{LENGTH_KWARG: length})
    try:
        start = await reply.__anext__()
    except asyncio.CancelledError:  # the client left before the reply began
        reply.cancel()
        raise
    except BackPressureError:
        reply.cancel()
        return APIError(
            429,
            "the server is overloaded: every replica's queue is full; retry later",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ).response()
    except RayError as e:
        log.warning("a replica failed before answering: %s", e)
        return _replica_failed().response()
    assert isinstance(start, ResponseStart)
    events = (start.header(b"content-type") or b"").startswith(b"text/event-stream")
    response = StreamingResponse(_rest(reply, events), status_code=start.status)
    response.raw_headers = start.headers
    return response


def _replica_failed() -> APIError:
    return APIError(
        503,
        "the replica serving this request failed; retry it (Ray Serve replaces the replica)",
        type="service_unavailable",
    )


async def _rest(reply: Any, events: bool) -> AsyncIterator[bytes]:
    """The reply's body; if its replica dies first, an SSE reply ends with an error event."""
    from ray.exceptions import RayError

    try:
        async for piece in reply:
            yield piece
    except RayError as e:
        log.warning("a replica failed mid-reply: %s", e)
        if events:
            yield sse_event(_replica_failed().response_body()).encode()
            yield DONE.encode()
    finally:
        reply.cancel()  # the client left (or the reply ended): the replica stops, the KV is freed
