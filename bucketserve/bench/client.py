"""One streamed request to an OpenAI-compatible server, timed token by token.

Times are seconds on ``time.perf_counter()`` minus the run's start, so every record of a run
shares one clock. A request counts from the moment it is sent (as in vLLM's ``bench serve``);
the time it waited for a ``--max-concurrency`` slot is kept apart, as ``scheduled``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bucketserve.bench.datasets import BenchRequest
from bucketserve.errors import BucketServeError
from bucketserve.metrics import RequestRecord
from bucketserve.options import check, check_fields, option
from bucketserve.wire import StepSample

DEFAULT_URL = "http://127.0.0.1:8000"
APIS = ("completions", "chat")


class BenchError(BucketServeError):
    """A benchmark that cannot run (the CLI prints it as one line and exits 2)."""


@dataclass
class ClientConfig:
    """How to talk to one server, and what every request carries besides its prompt.

    The ``bench`` subcommands' client options are generated from these fields."""

    base_url: str = option(DEFAULT_URL, help="the server, without /v1")
    model: str = option("", help="model name to send (default: the first of /v1/models)")
    api: str = option("completions", choices=APIS, help="/v1/completions or /v1/chat/completions")
    ignore_eos: bool = option(
        True,
        help="send ignore_eos=true, so each request generates exactly its output length; "
        "--no-ignore-eos lets the model stop at EOS",
    )
    temperature: float = option(0.0, help="sampling temperature sent")
    request_timeout: float = option(600.0, help="seconds per request before it counts as failed")
    api_key: str | None = option(
        None, help="bearer token (default: $BUCKETSERVE_API_KEY or $OPENAI_API_KEY, else none)"
    )
    priority: int | None = option(
        None, help="send this priority (lower first) with every request (default: not sent)"
    )
    ttft_slo_ms: float | None = option(None, help="send this TTFT SLO with every request (default: not sent)")
    tpot_slo_ms: float | None = option(None, help="send this TPOT SLO with every request (default: not sent)")
    # More fields for every body, as they are (not a command-line option).
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)
        check(self.request_timeout > 0, f"request_timeout must be > 0 seconds, got {self.request_timeout}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")

    @property
    def endpoint(self) -> str:
        path = "/v1/chat/completions" if self.api == "chat" else "/v1/completions"
        return self.base_url.rstrip("/") + path


@dataclass
class Outcome:
    """A request's metrics record plus what only the HTTP client sees."""

    record: RequestRecord
    scheduled: float  # when the arrival process released it (before any concurrency wait)
    chunks: int  # streamed chunks that carried text
    usage_tokens: int | None  # completion_tokens from the usage chunk, if the server sent one
    # When the server's engine took the request in (its X-Bucketserve-Arrival header, on
    # the server's clock until the runner maps it onto the run's); None from other servers.
    admitted: float | None = None

    @property
    def token_count_mismatch(self) -> bool:
        return self.record.ok and self.usage_tokens is not None and self.usage_tokens != self.chunks


def build_payload(req: BenchRequest, cfg: ClientConfig) -> dict[str, Any]:
    """The JSON body: streaming with usage, max_tokens = the request's output length."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": req.output_len,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.api == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension: generate exactly max_tokens
    for name in ("priority", "ttft_slo_ms", "tpot_slo_ms"):  # bucketserve's extensions, if set
        if getattr(cfg, name) is not None:
            body[name] = getattr(cfg, name)
    body.update(cfg.extra_body)
    return body


def _chunk_text(event: dict[str, Any], api: str) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    text = (choice.get("delta") or {}).get("content") if api == "chat" else choice.get("text")
    return text or ""


def _error_message(response_text: str) -> str:
    try:
        return str(json.loads(response_text)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return response_text[:200]


async def send_request(
    client: httpx.AsyncClient, cfg: ClientConfig, req: BenchRequest, t0: float, scheduled: float
) -> Outcome:
    """Send ``req``, stream the reply and time it; failures come back as records with ``error``
    set (HTTP status, an error event in the stream, a timeout, a broken connection)."""
    start = time.perf_counter() - t0
    token_times: list[float] = []
    usage: int | None = None
    error: str | None = None
    admitted: float | None = None
    done = False
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    try:
        async with (
            asyncio.timeout(cfg.request_timeout),
            client.stream("POST", cfg.endpoint, json=build_payload(req, cfg), headers=headers) as response,
        ):
            arrival_header = response.headers.get("x-bucketserve-arrival")
            admitted = float(arrival_header) if arrival_header else None
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                error = f"HTTP {response.status_code}: {_error_message(body)}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        error = f"stream error: {_error_message(data)}"
                        break
                    if _chunk_text(event, cfg.api):
                        token_times.append(time.perf_counter() - t0)
                    if event.get("usage"):
                        usage = event["usage"].get("completion_tokens")
                if error is None and not done:
                    error = "stream ended without [DONE]"
    except (TimeoutError, httpx.TimeoutException):
        error = f"timeout after {cfg.request_timeout:g} s"
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"[:200]
    except json.JSONDecodeError as e:
        error = f"bad stream data: {e}"
    finished = time.perf_counter() - t0
    if error is None and not token_times:
        error = "no output tokens"
    if error is not None:
        record = RequestRecord(start, math.nan, finished, req.prompt_len, 0, error=error)
    else:
        record = RequestRecord(
            arrival=start,
            first_token=token_times[0],
            finished=finished,
            prompt_tokens=req.prompt_len,
            output_tokens=usage if usage is not None else len(token_times),
            itls=[b - a for a, b in itertools.pairwise(token_times)],
        )
    return Outcome(record, scheduled, len(token_times), usage, admitted)


@dataclass
class EngineTimeline:
    """What a bucketserve server says of its engine: its recent steps, and the offset of its
    monotonic clock from ours (exact on one machine; off by up to the round trip across
    machines), to place the steps and the requests' arrivals on a run's clock."""

    offset: float  # the server's clock minus ours
    steps: list[StepSample]  # start on the server's clock

    def steps_between(self, run_start: float, run_end: float) -> list[StepSample]:
        """The steps that started in [run_start, run_end] (our clock), their starts made
        relative to run_start."""
        out = []
        for step in self.steps:
            start = self.to_run(step.start, run_start)
            if 0 <= start <= run_end - run_start:
                out.append(dataclasses.replace(step, start=start))
        return out

    def to_run(self, server_time: float, run_start: float) -> float:
        return server_time - self.offset - run_start


async def fetch_timeline(client: httpx.AsyncClient, cfg: ClientConfig) -> EngineTimeline | None:
    """The server's /debug/steps; None from a server without it."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    try:
        r = await client.get(cfg.base_url.rstrip("/") + "/debug/steps", headers=headers)
    except httpx.HTTPError:
        return None
    received = time.monotonic()
    if r.status_code != 200:
        return None
    data = r.json()
    steps = [StepSample.from_dict(d) for d in data.get("steps", [])]
    return EngineTimeline(float(data["now"]) - received, steps)


async def model_info(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """The first model a server lists under /v1/models (its ``id``, maybe ``max_model_len``)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout) as client:
        r = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
        r.raise_for_status()
        models = r.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]


def served_model(base_url: str, api_key: str | None = None) -> str:
    """The id of the first model the server lists; a one-line error if it cannot be reached."""
    try:
        return str(asyncio.run(model_info(base_url, api_key))["id"])
    except (httpx.HTTPError, ValueError) as e:
        raise BenchError(
            f"cannot get the model name from {base_url}/v1/models ({e}); is the server up?"
        ) from None
