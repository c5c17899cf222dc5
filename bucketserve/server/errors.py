"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, and the
app's exception handlers that answer every failure in it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bucketserve.errors import InvalidRequestError
from bucketserve.outputs import RequestOutput
from bucketserve.server.json_reply import JSONReply
from bucketserve.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered in OpenAI's shape; ``code`` defaults to the HTTP status."""

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

    @classmethod
    def invalid(cls, e: InvalidRequestError) -> APIError:
        """A 400 for a request the engine or the protocol refused."""
        return cls(400, str(e), param=e.param)

    @classmethod
    def deadline_unreachable(cls, message: str) -> APIError:
        """A 429 for a request that cannot meet its TTFT target (``--reject-late``): refused on
        arrival, or dropped from the queue once late."""
        return cls(429, message, type="rate_limit_error", code="deadline_unreachable")

    def response_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONReply(self.response_body(), status_code=self.status, headers=self.headers)


def output_error(out: RequestOutput) -> APIError | None:
    """A 500 for a request whose batch failed in the engine (which logged why and went on); a
    429 for one dropped from the queue as late (``--reject-late``)."""
    reason = out.outputs[0].finish_reason
    if reason == "late":
        return APIError.deadline_unreachable(
            "the request waited past the point where it could still get its first token within its "
            "TTFT target (--reject-late); retry later or raise ttft_slo_ms"
        )
    if reason != "error":
        return None
    return APIError(
        500,
        "the engine failed while running this request (see the server log); retry it",
        type="server_error",
        code="engine_error",
    )


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line for pydantic's errors, and the field it names first (the ``param``);
    a union's alternatives count as one error."""
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


class _ValidationErrorHandler:
    """A body that does not fit the request model: 400, counted as an invalid request."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    async def __call__(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        self.metrics.reject("invalid")
        message, param = validation_message(exc)
        return APIError(400, message, param=param).response()


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (an unknown route, a wrong method) in OpenAI's shape."""
    assert isinstance(exc, StarletteHTTPException)
    err_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), type=err_type).response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error answering %s", request.url.path, exc_info=exc)
    return APIError(500, f"internal error: {exc}", type="server_error", code="internal_error").response()


def add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Answer every error in OpenAI's shape: ours, pydantic's, Starlette's and the unexpected."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _ValidationErrorHandler(metrics))
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
