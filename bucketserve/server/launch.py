"""Run the HTTP server: load the engine, bind the socket, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from bucketserve.config import EngineConfig, SchedulerConfig, ServerConfig
from bucketserve.engine.async_engine import AsyncEngine, RemotePrefill
from bucketserve.engine.llm_engine import LLMEngine
from bucketserve.errors import ConfigError
from bucketserve.server.app import build_app

log = logging.getLogger("bucketserve.server")


class _Server(uvicorn.Server):
    """uvicorn's server, logging the URL once it accepts connections, and draining on the
    first SIGTERM/SIGINT before it stops listening.

    uvicorn alone would close the listening socket at once, so a client arriving during the
    grace period would get "connection refused" and a load balancer could not tell a stopping
    server from a dead one. Draining instead keeps answering: new requests get a 503 with a
    message (the engine refuses them), /health turns 503, and requests in flight run for up to
    the grace period; then uvicorn's own shutdown runs. A second signal stops at once."""

    def __init__(
        self, config: uvicorn.Config, url: str, drain: Callable[[], Awaitable[None]], web_ui: bool
    ) -> None:
        super().__init__(config)
        self.url = url
        self.web_ui = web_ui
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Future[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started:
            log.info("serving on %s (OpenAI API under %s/v1)", self.url, self.url)
            if self.web_ui:
                log.info("dashboard and chat: open %s/ in a browser", self.url)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self.should_exit or self._loop is None or not self.started:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self._captured_signals.append(sig)  # re-raised after the shutdown, as uvicorn does
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())  # kept: not collected

    async def _drain_then_exit(self) -> None:
        log.info("stopping: refusing new requests, letting those in flight finish")
        try:
            await self.drain()
        finally:
            self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def server_url(host: str, port: int) -> str:
    """The base URL clients use (an IPv6 host in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def build_server_app(
    engine_config: EngineConfig,
    scheduler_config: SchedulerConfig,
    server_config: ServerConfig,
    remote_prefill: RemotePrefill | None = None,
    **app_options: Any,
) -> tuple[FastAPI, AsyncEngine]:
    """The server's app over a new engine (built on its own thread: every torch operation
    then runs on that one thread), as ``serve`` and each ``--replicas`` replica run it (a
    decode replica's engine gets its prompts' KV from ``remote_prefill``); ``app_options``
    go to ``build_app`` (``web_ui``, ``metrics_text``)."""
    async_engine = AsyncEngine(
        lambda: LLMEngine(engine_config, scheduler_config),
        max_waiting_requests=server_config.max_waiting_requests,
        remote_prefill=remote_prefill,
    )
    app = build_app(
        async_engine,
        server_config.served_model_name,
        server_config.api_key,
        shutdown_grace_s=server_config.shutdown_grace_s,
        max_body_bytes=server_config.max_request_body,
        **{"web_ui": server_config.web_ui, **app_options},
    )
    return app, async_engine


def serve(
    engine_config: EngineConfig,
    scheduler_config: SchedulerConfig,
    server_config: ServerConfig | None = None,
    *,
    log_level: str = "info",
) -> int:
    """Serve until SIGTERM or SIGINT; in-flight requests get ``shutdown_grace_s`` to finish.
    Returns 0 after a SIGTERM (a clean stop); SIGINT raises KeyboardInterrupt afterwards."""
    server_config = server_config or ServerConfig()
    if server_config.on_ray:
        raise ConfigError(
            "serve() runs one engine; replicas run in bucketserve.cluster.replicas.serve_replicas"
        )
    shutdown_grace_s = server_config.shutdown_grace_s
    sock = bind(server_config.host, server_config.port)  # fail fast, before loading the model
    app, async_engine = build_server_app(engine_config, scheduler_config, server_config)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        log_config=None,  # uvicorn logs through the CLI's logging setup
        timeout_graceful_shutdown=int(shutdown_grace_s) + 1,
        access_log=log_level == "debug",
    )
    server = _Server(
        config,
        server_url(server_config.host, sock.getsockname()[1]),
        drain=lambda: async_engine.shutdown(shutdown_grace_s),
        web_ui=server_config.web_ui,
    )
    # uvicorn re-raises a captured signal after its graceful shutdown, to the handler installed
    # before it ran: SIGTERM's is replaced so that a requested stop exits with status 0.
    terminated: list[int] = []

    def on_term(sig: int, frame: FrameType | None) -> None:
        terminated.append(sig)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if not server.started:
        return 1
    log.info("server stopped")
    return 0
