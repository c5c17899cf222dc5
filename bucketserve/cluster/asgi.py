"""One HTTP request through an ASGI app in this process, its response streamed back piece by
piece: how a replica answers what the gateway forwards to it (a Ray handle carries Python
objects, not sockets). The replica's app is the single server's, so routes, errors, the API
key and SSE are the same code.

A caller that stops reading (the client left, the gateway cancelled the call) ends the
generator; the app then sees ``http.disconnect``, as it would from a socket, and aborts the
request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the gateway read it: the whole body, already under its size limit."""

    method: str
    path: str
    query_string: bytes
    headers: Headers
    body: bytes
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class ResponseStart:
    """The first item of a forwarded response: its status and headers; body bytes follow."""

    status: int
    headers: Headers

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


async def call_app(app: Any, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
    """Run ``request`` through the ASGI ``app``; yield its ``ResponseStart``, then each piece of
    its body as the app sends it."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": request.client,
        "server": None,
    }
    sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    gone = asyncio.Event()
    body_read = False

    async def receive() -> dict[str, Any]:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()  # a streaming response listens here for the client leaving
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: sent.put_nowait({"type": "app.done"}))
    try:
        while True:
            message = await sent.get()
            kind = message["type"]
            if kind == "http.response.start":
                yield ResponseStart(message["status"], list(message.get("headers", [])))
            elif kind == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
            elif kind == "app.done":
                task.result()  # the app raised: raise it here
                raise RuntimeError("the app returned without a complete response")
    finally:
        gone.set()
        if not task.done():
            # Let the app see the disconnect and abort the request, then stop it if it lingers.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
            task.cancel()
