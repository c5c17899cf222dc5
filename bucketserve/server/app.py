"""The OpenAI-compatible HTTP API over an :class:`AsyncEngine`.

Routes: POST /v1/completions, POST /v1/chat/completions (both with SSE streaming),
GET /v1/models, GET /health, GET /metrics (Prometheus). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from bucketserve.engine.async_engine import AsyncEngine, EngineStoppedError, QueueFullError, RequestStream
from bucketserve.errors import InvalidRequestError
from bucketserve.outputs import RequestOutput, TokenLogprobs
from bucketserve.sampling_params import SamplingParams
from bucketserve.server.logprobs import chat_logprobs, completion_logprobs
from bucketserve.server.metrics import ServerMetrics
from bucketserve.server.protocol import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
)
from bucketserve.sim.validate import StepSample

log = logging.getLogger(__name__)

ARRIVAL_HEADER = "X-Bucketserve-Arrival"  # a streamed reply's engine arrival time


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = code if code is not None else status
        self.headers = headers

    def response_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.response_body(), status_code=self.status, headers=self.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line for pydantic's errors; a union's alternatives count as one error."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON", None
    by_field: dict[str, list[str]] = {}
    for e in errors:
        # a union reports each alternative under loc ("prompt", "str"); keep the field path
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(x for x in loc if not x.startswith(("list[", "str", "int", "function-")))
        by_field.setdefault(field or "body", []).append(str(e.get("msg", "invalid")))
    parts = [
        f"{field}: {msgs[0] if len(msgs) == 1 else 'has the wrong type or value'}"
        for field, msgs in list(by_field.items())[:5]
    ]
    first = next(iter(by_field))
    return "invalid request: " + "; ".join(parts), None if first == "body" else first


_Model = TypeVar("_Model", bound=BaseModel)


async def _parse_body(request: Request, model: type[_Model]) -> _Model:
    """The JSON body as ``model``, whatever the Content-Type (curl -d sends a form type)."""
    body = await request.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # Python's JSON parser recurses once per nesting level
        raise APIError(400, "the request body nests JSON arrays or objects too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None
    except RecursionError:
        raise APIError(400, "the request body nests JSON arrays or objects too deeply") from None


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Tracker:
    """Observes one request's outputs into the Prometheus metrics."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics
        self.num_tokens = 0
        self.last: float | None = None

    def observe(self, out: RequestOutput) -> None:
        m, label = self.m, self.m.model_name
        now = time.monotonic()
        n = len(out.outputs[0].token_ids)
        new = n - self.num_tokens
        if new > 0:
            t = out.metrics
            if self.num_tokens == 0 and t.first_token_time is not None:
                m.ttft.labels(label).observe(max(0.0, t.first_token_time - t.arrival_time))
                if t.first_scheduled_time is not None:
                    m.queue_time.labels(label).observe(max(0.0, t.first_scheduled_time - t.arrival_time))
            elif self.last is not None:
                gap = (now - self.last) / new
                for _ in range(new):
                    m.itl.labels(label).observe(gap)
            m.generation_tokens.labels(label).inc(new)
            self.num_tokens, self.last = n, now
        if out.finished:
            end = out.metrics.finished_time or now
            m.e2e.labels(label).observe(max(0.0, end - out.metrics.arrival_time))
            m.success.labels(label, out.outputs[0].finish_reason or "unknown").inc()
            m.prompt_tokens.labels(label).inc(len(out.prompt_token_ids))

    def aborted(self) -> None:
        self.m.success.labels(self.m.model_name, "abort").inc()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def build_app(
    async_engine: AsyncEngine,
    model_name: str,
    api_key: str | None = None,
    *,
    shutdown_grace_s: float = 5.0,
) -> FastAPI:
    """The FastAPI app serving ``async_engine`` as ``model_name`` (the engine's own model
    path is accepted too). With ``api_key``, /v1/* needs ``Authorization: Bearer KEY``."""
    engine = async_engine
    metrics = ServerMetrics(engine.stats, model_name)
    accepted_models = {model_name, engine.model_name}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        log.info("stopping the engine (grace %.1f s)", shutdown_grace_s)
        await engine.shutdown(shutdown_grace_s)

    app = FastAPI(title="bucketserve", lifespan=lifespan)

    # -- errors --------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.reject("invalid")
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=err_type).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s", request.url.path, exc_info=exc)
        return APIError(500, f"internal error: {exc}", type="server_error", code="internal_error").response()

    # -- auth ----------------------------------------------------------------------------
    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            metrics.reject("unauthorized")
            raise APIError(
                401,
                "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    # -- helpers -------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name not in accepted_models:
            metrics.reject("invalid")
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {model_name!r}",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    async def start(
        request_id: str,
        prompt: str | list[int],
        params_fn: Callable[[], SamplingParams],
        req: CompletionRequest | ChatCompletionRequest,
    ) -> RequestStream:
        try:
            params = params_fn()
            return await engine.add_request(
                request_id,
                prompt,
                params,
                priority=req.priority,
                ttft_slo=req.ttft_slo,
                tpot_slo=req.tpot_slo,
            )
        except InvalidRequestError as e:
            metrics.reject("invalid")
            raise APIError(400, str(e), param=e.param) from None
        except QueueFullError as e:
            metrics.reject("queue_full")
            raise APIError(
                429,
                str(e),
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after_s)},
            ) from None
        except EngineStoppedError as e:
            metrics.reject("shutdown")
            raise APIError(503, str(e), type="service_unavailable", code="shutting_down") from None

    async def collect(stream: RequestStream, request: Request, tracker: _Tracker) -> RequestOutput | None:
        """Run a request to the end; None (and the request aborted) if the client left.
        Raises the APIError of a request whose batch failed."""
        final: RequestOutput | None = None

        async def consume() -> None:
            nonlocal final
            async for out in stream:
                tracker.observe(out)
                final = out

        task = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                engine.abort(stream.request_id)
                tracker.aborted()
        if not task.done() or task.cancelled():
            return None
        exc = task.exception()
        if isinstance(exc, EngineStoppedError):
            raise APIError(503, str(exc), type="service_unavailable", code="shutting_down")
        if exc is not None:
            raise exc
        err = finished_error(final) if final is not None else None
        if err is not None:
            raise err
        return final

    def finished_error(out: RequestOutput) -> APIError | None:
        if out.outputs[0].finish_reason == "error":
            return APIError(
                500,
                "the engine failed while running this request (see the server log); retry it",
                type="server_error",
                code="engine_error",
            )
        return None

    def usage(out: RequestOutput) -> dict[str, int]:
        p, c = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def stream_response(
        stream: RequestStream,
        tracker: _Tracker,
        chunk: Callable[[str | None, str | None, list[TokenLogprobs] | None], dict[str, Any]],
        head: dict[str, Any] | None,
        include_usage: bool,
    ) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            sent, num_lps_sent = "", 0
            last: RequestOutput | None = None
            try:
                if head is not None:
                    yield _sse(head)
                try:
                    async for out in stream:
                        tracker.observe(out)
                        last = out
                        c = out.outputs[0]
                        err = finished_error(out)
                        if err is not None:
                            yield _sse(err.response_body())
                            break
                        delta, sent = c.text[len(sent) :], c.text
                        if delta or c.finish_reason is not None:
                            lps = None if c.logprobs is None else c.logprobs[num_lps_sent:]
                            num_lps_sent += len(lps or ())
                            yield _sse(chunk(delta, c.finish_reason, lps))
                except EngineStoppedError as e:
                    yield _sse(APIError(503, str(e), type="service_unavailable").response_body())
                if include_usage and last is not None:
                    payload = chunk(None, None, None)
                    payload["choices"], payload["usage"] = [], usage(last)
                    yield _sse(payload)
                yield "data: [DONE]\n\n"
            finally:
                if not stream.finished:  # the client went away (or we failed): free the KV now
                    engine.abort(stream.request_id)
                    tracker.aborted()

        # The engine's arrival time (the server's monotonic clock): with /debug/steps's "now",
        # the bench client places the request on the engine's timeline.
        headers = {"Cache-Control": "no-cache", ARRIVAL_HEADER: f"{stream.arrival_time:.6f}"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    # -- routes --------------------------------------------------------------------------
    @v1.post("/completions", response_model=None)
    async def completions(request: Request) -> Response:
        req = await _parse_body(request, CompletionRequest)
        check_model(req.model)
        try:
            req.check()
            prompt = req.single_prompt()
        except InvalidRequestError as e:
            metrics.reject("invalid")
            raise APIError(400, str(e), param=e.param) from None
        rid = f"cmpl-{uuid.uuid4().hex}"
        max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        stream = await start(rid, prompt, lambda: req.sampling_params(max_tokens), req)
        tracker = _Tracker(metrics)
        now = int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": model_name}

        decode = engine.decode_token
        if req.stream:
            offset = 0

            def chunk(
                delta: str | None, finish: str | None, lps: list[TokenLogprobs] | None
            ) -> dict[str, Any]:
                nonlocal offset
                logprobs = None if lps is None else completion_logprobs(lps, decode, offset)
                offset += len(delta or "")
                out: dict[str, Any] = {
                    **base,
                    "choices": [{"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish}],
                }
                if req.include_usage:
                    out["usage"] = None
                return out

            return stream_response(stream, tracker, chunk, None, req.include_usage)

        final = await collect(stream, request, tracker)
        if final is None:
            return Response(status_code=499)
        c = final.outputs[0]
        return JSONResponse(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "text": c.text,
                        "logprobs": None if c.logprobs is None else completion_logprobs(c.logprobs, decode),
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                ],
                "usage": usage(final),
            }
        )

    @v1.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        req = await _parse_body(request, ChatCompletionRequest)
        check_model(req.model)
        try:
            req.check()
            prompt_ids = engine.apply_chat_template([m.as_template_dict() for m in req.messages])
        except InvalidRequestError as e:
            metrics.reject("invalid")
            raise APIError(400, str(e), param=e.param) from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        requested = req.requested_max_tokens
        if requested is None:
            # the rest of the context, capped; at least 1 so that a too-long prompt gets the
            # engine's message with both lengths
            requested = max(1, min(DEFAULT_CHAT_MAX_TOKENS, engine.max_model_len - len(prompt_ids)))
        max_tokens = requested
        stream = await start(rid, prompt_ids, lambda: req.sampling_params(max_tokens), req)
        tracker = _Tracker(metrics)
        now = int(time.time())

        if req.stream:
            base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name}

            def chunk(
                delta: str | None, finish: str | None, lps: list[TokenLogprobs] | None
            ) -> dict[str, Any]:
                out: dict[str, Any] = {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {} if delta is None else {"content": delta},
                            "logprobs": None if lps is None else chat_logprobs(lps, engine.decode_token),
                            "finish_reason": finish,
                        }
                    ],
                }
                if req.include_usage:
                    out["usage"] = None
                return out

            head = chunk("", None, None)
            head["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return stream_response(stream, tracker, chunk, head, req.include_usage)

        final = await collect(stream, request, tracker)
        if final is None:
            return Response(status_code=499)
        c = final.outputs[0]
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": now,
                "model": model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": None
                        if c.logprobs is None
                        else chat_logprobs(c.logprobs, engine.decode_token),
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                ],
                "usage": usage(final),
            }
        )

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "bucketserve",
                    "root": engine.model_name,
                    "max_model_len": engine.max_model_len,
                }
            ],
        }

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.is_running:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/debug/steps", dependencies=[Depends(check_api_key)])
    async def engine_steps() -> JSONResponse:
        """The engine's recent steps (up to 4096), each with its start on the server's
        monotonic clock, its duration and its batch shape; ``now`` is that clock at the reply.
        The bench client stores them with a run, for `bucketserve simulate --validate`."""
        steps = [StepSample(r.start, r.duration, r.shape).to_json() for r in engine.recent_steps()]
        return JSONResponse({"now": time.monotonic(), "steps": steps})

    app.state.metrics = metrics
    app.state.engine = engine
    return app
