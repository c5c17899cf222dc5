"""What the two generation endpoints share: reading the body, checking the model name, handing
the request to the engine (refusals become 4xx/5xx answers), and waiting for a reply that is
not streamed while watching for the client to leave."""

from __future__ import annotations

import asyncio
import json
import re
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from bucketserve.engine.async_engine import AsyncEngine, EngineStoppedError, QueueFullError, RequestStream
from bucketserve.errors import DeadlineUnreachableError, InvalidRequestError
from bucketserve.outputs import RequestOutput
from bucketserve.server.errors import APIError, output_error
from bucketserve.server.metrics import RequestTracker, ServerMetrics
from bucketserve.server.protocol import ChatCompletionRequest, CompletionRequest
from bucketserve.server.streaming import ChunkWriter, sse_response

_Body = TypeVar("_Body", bound=BaseModel)

_TOO_DEEP = "the request body nests JSON arrays or objects too deeply"
# A JSON escape of a UTF-16 surrogate: a lone one decodes to a str that is not text (the
# tokenizer and every UTF-8 writer refuse it), a pair decodes to one character.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def has_lone_surrogate(data: object) -> bool:
    """Whether any string in ``data`` (keys included) holds a lone surrogate; iterative, as
    the body may nest deeply."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# Enough for a prompt that fills a long context as text or as token ids; beyond it a body is
# refused before it is read whole (a client could otherwise fill the server's memory).
DEFAULT_MAX_BODY_BYTES = 16 * 2**20


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, or a 413 as soon as it is known to exceed ``max_bytes``: from its
    Content-Length before reading anything, else (a chunked upload) while reading it."""
    too_large = APIError(
        413,
        f"the request body is larger than this server accepts ({max_bytes} bytes; see --max-request-body)",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, model: type[_Body], max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> _Body:
    """The JSON body as ``model``, whatever the Content-Type (curl -d sends a form type).
    Pydantic's complaints go to the validation handler (``errors.validation_message``)."""
    body = await read_body(request, max_bytes)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # Python's JSON parser recurses once per nesting level
        raise APIError(400, _TOO_DEEP) from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body) and has_lone_surrogate(data):
        raise APIError(
            400, "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), not text"
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None
    except RecursionError:
        raise APIError(400, _TOO_DEEP) from None


class OpenAIServing:
    """The base of ``CompletionServing`` and ``ChatServing``, over one engine."""

    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        metrics: ServerMetrics,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.accepted_models = {model_name, engine.model_name}  # the engine's model path too

    async def parse(self, request: Request, model: type[_Body]) -> _Body:
        """The body as ``model`` (see ``parse_body``); a body refused is counted as invalid."""
        try:
            return await parse_body(request, model, self.max_body_bytes)
        except APIError:
            self.metrics.reject("invalid")
            raise

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.accepted_models:
            self.metrics.reject("invalid")
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    def invalid(self, e: InvalidRequestError) -> APIError:
        """The 400 for a refused request, counted."""
        self.metrics.reject("invalid")
        return APIError(400, str(e), param=e.param)

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        req: CompletionRequest | ChatCompletionRequest,
        max_tokens: int,
    ) -> RequestStream:
        """Start the request on the engine: 400 if its parameters are refused, 429 with
        Retry-After when the waiting queue is full, 429 at once when it cannot meet its TTFT
        target behind the prompts ahead of it (``--reject-late``), 503 once the server is stopping."""
        try:
            return await self.engine.add_request(
                request_id,
                prompt,
                req.sampling_params(max_tokens),
                priority=req.priority,
                ttft_slo=req.ttft_slo,
                tpot_slo=req.tpot_slo,
            )
        except InvalidRequestError as e:
            raise self.invalid(e) from None
        except QueueFullError as e:
            self.metrics.reject("queue_full")
            raise APIError(
                429,
                str(e),
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after_s)},
            ) from None
        except DeadlineUnreachableError as e:
            self.metrics.reject("late")
            raise APIError.deadline_unreachable(str(e)) from None
        except EngineStoppedError as e:
            self.metrics.reject("shutdown")
            raise APIError(503, str(e), type="service_unavailable", code="shutting_down") from None

    async def collect(
        self, stream: RequestStream, request: Request, tracker: RequestTracker
    ) -> RequestOutput | None:
        """Run a request to its end; None (and the request aborted) if the client left first.
        Raises the APIError of a request whose batch failed or whose server is stopping."""
        task = asyncio.ensure_future(_last_output(stream, tracker))
        watcher = asyncio.ensure_future(_client_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                self.engine.abort(stream.request_id)
                tracker.aborted()
        if not task.done() or task.cancelled():
            return None
        exc = task.exception()
        if isinstance(exc, EngineStoppedError):
            raise APIError(503, str(exc), type="service_unavailable", code="shutting_down")
        if exc is not None:
            raise exc
        final = task.result()
        err = output_error(final) if final is not None else None
        if err is not None:
            raise err
        return final

    def stream(
        self, stream: RequestStream, writer: ChunkWriter, tracker: RequestTracker
    ) -> StreamingResponse:
        return sse_response(stream, writer, tracker, self.engine.abort)


async def _last_output(stream: RequestStream, tracker: RequestTracker) -> RequestOutput | None:
    final = None
    async for out in stream:
        tracker.observe(out)
        final = out
    return final


async def _client_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
