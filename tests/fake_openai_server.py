"""A fake OpenAI-compatible streaming server with known token timing, for the bench tests.

It streams ``max_tokens`` one-word chunks: the first ``first_token_s`` after the request, then
one every ``itl_s``. ``mode`` makes it misbehave: "error" answers 500, "hang" never answers,
"stream_error" sends an error event after two tokens. ``usage_extra`` adds to the reported
completion_tokens (to fake a usage/stream mismatch). Runs uvicorn on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class FakeServer:
    def __init__(
        self,
        first_token_s: float = 0.05,
        itl_s: float = 0.02,
        mode: str = "ok",
        usage_extra: int = 0,
        model: str = "fake-model",
    ) -> None:
        self.first_token_s, self.itl_s, self.mode, self.usage_extra = first_token_s, itl_s, mode, usage_extra
        self.bodies: list[dict[str, Any]] = []
        self.app = self._build(model)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def _build(self, model: str) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": model, "object": "model"}]}

        async def handle(request: Request, chat: bool) -> Any:
            body = await request.json()
            self.bodies.append(body)
            if self.mode == "error":
                return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
            if self.mode == "hang":
                await asyncio.sleep(3600)
            return StreamingResponse(self._events(body, chat), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            return await handle(request, chat=True)

        return app

    async def _events(self, body: dict[str, Any], chat: bool) -> AsyncIterator[str]:
        n = body["max_tokens"]
        start = time.perf_counter()

        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        def choice(text: str) -> dict[str, Any]:
            return {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}

        if chat:  # OpenAI sends the role first, with no content: not a token
            yield event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for i in range(n):
            # Sleep to an absolute schedule so that timing errors do not accumulate.
            due = start + self.first_token_s + i * self.itl_s
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if self.mode == "stream_error" and i == 2:
                yield event({"error": {"message": "engine failed", "type": "server_error"}})
                return
            yield event({"choices": [choice(" tok")]})
        usage = {"prompt_tokens": 1, "completion_tokens": n + self.usage_extra, "total_tokens": n + 1}
        yield event({"choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.server.force_exit = True  # do not wait for hanging streams
        self.thread.join(10)
