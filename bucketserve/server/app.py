"""The OpenAI-compatible HTTP API over an :class:`AsyncEngine`: the app and its routes.

Routes: POST /v1/completions, POST /v1/chat/completions (both with SSE streaming), GET
/v1/models, GET /health, GET /metrics (Prometheus), GET /debug/steps (the engine's recent
steps), and the web page: GET / (dashboard and chat), GET /dashboard/state (its data;
``dashboard``). The endpoints' work lives in ``serving_completion`` and ``serving_chat`` (on
``serving``'s shared base), SSE framing in ``streaming``, the error shape in ``errors``; the
routes find them in the app's state, as vLLM's api_server does.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bucketserve.engine.async_engine import AsyncEngine
from bucketserve.server.dashboard import LiveView, dashboard_router, sampling
from bucketserve.server.errors import APIError, add_error_handlers
from bucketserve.server.metrics import ServerMetrics
from bucketserve.server.openapi import json_body, with_body_schemas
from bucketserve.server.protocol import ChatCompletionRequest, CompletionRequest
from bucketserve.server.serving import DEFAULT_MAX_BODY_BYTES
from bucketserve.server.serving_chat import ChatServing
from bucketserve.server.serving_completion import CompletionServing
from bucketserve.wire import StepSample

__all__ = ["build_app"]

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes need, kept in ``app.state.server``."""

    engine: AsyncEngine
    model_name: str
    api_key: str | None
    shutdown_grace_s: float
    metrics: ServerMetrics
    completions: CompletionServing
    chat: ChatServing
    created: int  # when the app was built: the model's "created" in /v1/models
    # What /metrics answers, when not this app's own registry (every replica's, on Ray Serve)
    metrics_text: Callable[[], Awaitable[str]] | None = None


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def check_api_key(request: Request) -> None:
    """With an API key set, the request needs ``Authorization: Bearer KEY`` (else 401)."""
    state = _state(request)
    if state.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        state.metrics.reject("unauthorized")
        raise APIError(
            401,
            "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="invalid_api_key",
        )


v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])
router = APIRouter()


@v1.post("/completions", response_model=None, openapi_extra=json_body(CompletionRequest))
async def create_completion(request: Request) -> Response:
    return await _state(request).completions.create(request)


@v1.post("/chat/completions", response_model=None, openapi_extra=json_body(ChatCompletionRequest))
async def create_chat_completion(request: Request) -> Response:
    return await _state(request).chat.create(request)


@v1.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = _state(request)
    model = {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "bucketserve",
        "root": state.engine.model_name,
        "max_model_len": state.engine.max_model_len,
    }
    return {"object": "list", "data": [model]}


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    if _state(request).engine.is_running:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable"}, status_code=503)


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    state = _state(request)
    if state.metrics_text is not None:
        return Response(await state.metrics_text(), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/debug/steps", dependencies=[Depends(check_api_key)])
async def engine_steps(request: Request) -> JSONResponse:
    """The engine's recent steps (up to 4096) as ``wire.StepSample``s, each starting on the
    server's monotonic clock, with the seconds of it the scheduler took; ``now`` is
    that clock at the reply. The bench client stores
    them with a run, for `bucketserve simulate --validate`. Behind the API key: they tell
    the lengths of other clients' prompts."""
    engine = _state(request).engine
    steps = [
        StepSample(r.start, r.duration, r.shape, r.schedule_time).to_dict() for r in engine.recent_steps()
    ]
    return JSONResponse({"now": time.monotonic(), "steps": steps})


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    live: LiveView | None = app.state.live
    if live is None:
        yield
    else:
        async with sampling(live):
            yield
    state: ServerState = app.state.server
    log.info("stopping the engine (grace %.1f s)", state.shutdown_grace_s)
    await state.engine.shutdown(state.shutdown_grace_s)


def build_app(
    async_engine: AsyncEngine,
    model_name: str,
    api_key: str | None = None,
    *,
    shutdown_grace_s: float = 5.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    web_ui: bool = True,
    metrics_text: Callable[[], Awaitable[str]] | None = None,
) -> FastAPI:
    """The FastAPI app serving ``async_engine`` as ``model_name`` (the engine's own model
    path is accepted too). With ``api_key``, /v1/* and /debug/steps need
    ``Authorization: Bearer KEY``. Stopping the app stops the engine, letting requests in
    flight finish for up to ``shutdown_grace_s``. A request body over ``max_body_bytes`` gets
    a 413. With ``web_ui``, / serves the dashboard and chat page. ``metrics_text``, when given,
    answers /metrics instead of this app's registry (a replica's, with every replica's)."""
    metrics = ServerMetrics(async_engine.stats, model_name)
    app = FastAPI(title="bucketserve", lifespan=_lifespan)
    app.state.server = ServerState(
        engine=async_engine,
        model_name=model_name,
        api_key=api_key,
        shutdown_grace_s=shutdown_grace_s,
        metrics=metrics,
        completions=CompletionServing(async_engine, model_name, metrics, max_body_bytes),
        chat=ChatServing(async_engine, model_name, metrics, max_body_bytes),
        created=int(time.time()),
        metrics_text=metrics_text,
    )
    app.state.metrics, app.state.engine = metrics, async_engine
    app.state.live = LiveView(async_engine, metrics, model_name, api_key is not None) if web_ui else None
    add_error_handlers(app, metrics)
    app.include_router(v1)
    app.include_router(router)
    if web_ui:
        app.include_router(dashboard_router(check_api_key))
    app.openapi = with_body_schemas(app, [CompletionRequest, ChatCompletionRequest])  # type: ignore[method-assign]
    return app
