"""The JSON formats bucketserve writes and reads back, and the one JSON writer.

Each record is a dataclass with one ``to_dict`` (plain lists, numbers and strings) and one
``from_dict``; nothing else in the package builds or parses these dicts. Pure Python, outside
``sim/``, so that the server, the bench client, the simulator and the benchmarks share it.

- ``RequestRow``: one request of a measured run (times in seconds from the run's start).
- ``StepSample``: one engine step: its start, duration and ``BatchShape`` (``/debug/steps``,
  result files).
- ``MeasuredRun``: a run's summary, request rows and engine steps. A ``bench run`` file is
  ``{"config", **run}``; each point of ``bench sweep`` is ``{"request_rate", **run}`` under
  ``"points"``, and ``bench compare`` holds ``{"servers": {name: {"load_capacity",
  "points"}}}``; ``benchmarks/sim_validation.py`` writes ``bench run``'s layout.
- ``Profile`` and ``ProfileFile``: a cost-model profile in DistServe's layout
  (``{model: {tensor-parallel degree: coefficients}, "meta": {...}}``).

NaN policy: standard JSON (RFC 8259) has no NaN or Infinity; Python writes them as bare
``NaN`` literals that jq, browsers and most other parsers refuse. ``write_json`` and
``dumps`` therefore write every non-finite float as ``null`` ("not measured", e.g. a failed
request's TTFT, a percentile of no values, or a sweep's "all at once" rate, which is inf).
``read_json`` still accepts the ``NaN`` literals that files written before this module hold.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bucketserve.core.cost import Profile
from bucketserve.core.scheduler import BatchShape
from bucketserve.metrics import RequestRecord


# -- the JSON writer and reader ----------------------------------------------------------------
def to_json_value(value: Any) -> Any:
    """``value`` with every non-finite float made None, tuples made lists, paths made text and
    numpy-like scalars made Python numbers: what ``json.dumps`` writes as standard JSON."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return to_json_value(float(value))
    raise TypeError(f"{type(value).__name__} is not JSON data; convert it with its to_dict()")


def dumps(data: Any, indent: int | None = 1) -> str:
    """Standard JSON text of ``data`` (non-finite floats as null, see the module's docstring)."""
    return json.dumps(to_json_value(data), indent=indent, allow_nan=False)


def write_json(path: str | Path, data: Any, indent: int | None = 1) -> None:
    """Write ``data`` to ``path`` as standard JSON with a final newline, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(data, indent) + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file's data; ``NaN`` and ``Infinity`` literals (older files) read as floats."""
    return json.loads(Path(path).read_text())


def _float_or_none(value: Any) -> float | None:
    """None for a value not measured: null, or the NaN an older file may hold."""
    return None if value is None or not math.isfinite(value) else float(value)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- measured runs -----------------------------------------------------------------------------
@dataclass(kw_only=True)
class RequestRow:
    """One request of a measured run, in seconds from the run's start.

    ``sent`` is when the client sent it; ``scheduled`` when the arrival process released it
    (earlier, if it waited for a concurrency slot); ``admitted`` when the server's engine took
    it in (bucketserve servers only). Latencies are None where not measured (a failed request
    has no TTFT). The last four fields are what only an HTTP client sees.
    """

    scheduled: float | None = None
    sent: float
    admitted: float | None = None
    ttft: float | None
    e2el: float | None
    tpot: float | None = None
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int
    output_tokens: int
    streamed_chunks: int | None = None
    usage_output_tokens: int | None = None
    error: str | None = None

    @classmethod
    def from_record(
        cls,
        record: RequestRecord,
        *,
        scheduled: float | None = None,
        admitted: float | None = None,
        streamed_chunks: int | None = None,
        usage_output_tokens: int | None = None,
    ) -> RequestRow:
        """The row of a request measured on the run's clock (``record.arrival`` = sent)."""
        return cls(
            scheduled=scheduled,
            sent=record.arrival,
            admitted=admitted,
            ttft=_finite_or_none(record.ttft),
            e2el=_finite_or_none(record.e2e),
            tpot=record.tpot if record.ok else None,
            itls=list(record.itls),
            prompt_tokens=record.prompt_tokens,
            output_tokens=record.output_tokens,
            streamed_chunks=streamed_chunks,
            usage_output_tokens=usage_output_tokens,
            error=record.error,
        )

    def to_record(self) -> RequestRecord:
        """The metrics record (arrival = sent; unmeasured times nan), for ``metrics.summarize``."""
        return RequestRecord(
            arrival=self.sent,
            first_token=self.sent + self.ttft if self.ttft is not None else math.nan,
            finished=self.sent + self.e2el if self.e2el is not None else math.nan,
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
            itls=list(self.itls),
            error=self.error,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheduled": self.scheduled,
            "sent": self.sent,
            "admitted": self.admitted,
            "ttft": self.ttft,
            "e2el": self.e2el,
            "tpot": self.tpot,
            "itls": list(self.itls),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "streamed_chunks": self.streamed_chunks,
            "usage_output_tokens": self.usage_output_tokens,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRow:
        """Also reads the rows of older files: ``arrival`` for ``sent``, ``e2e`` for ``e2el``,
        and rows that leave out every field but sent, prompt_tokens and the latencies."""
        chunks, usage = d.get("streamed_chunks"), d.get("usage_output_tokens")
        return cls(
            scheduled=_float_or_none(d.get("scheduled")),
            sent=float(d.get("sent", d.get("arrival", 0.0))),
            admitted=_float_or_none(d.get("admitted")),
            ttft=_float_or_none(d.get("ttft")),
            e2el=_float_or_none(d.get("e2el", d.get("e2e"))),
            tpot=_float_or_none(d.get("tpot")),
            itls=[float(x) for x in d.get("itls") or ()],
            prompt_tokens=int(d["prompt_tokens"]),
            output_tokens=int(d.get("output_tokens") or 0),
            streamed_chunks=None if chunks is None else int(chunks),
            usage_output_tokens=None if usage is None else int(usage),
            error=d.get("error"),
        )


@dataclass(frozen=True)
class StepSample:
    """One measured engine step: when it started (seconds, on the clock of whoever holds it:
    the server's monotonic clock in ``/debug/steps``, the run's in a result file), how long
    it took, and what it computed; where the engine recorded it, how much of the duration the
    scheduler took to pick the batch (the rest ran it)."""

    start: float
    duration: float
    shape: BatchShape
    schedule_time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Flat: start and duration (to the microsecond), then the batch shape's fields, then
        the scheduling time where known."""
        s = self.shape
        d: dict[str, Any] = {
            "start": round(self.start, 6),
            "duration": round(self.duration, 6),
            "prefill": [[n, c] for n, c in s.prefill],
            "decode": list(s.decode),
            "padded": s.padded,
            "ghost_rows": s.num_ghost_rows,
        }
        if self.schedule_time is not None:
            d["schedule_time"] = round(self.schedule_time, 6)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepSample:
        shape = BatchShape(
            tuple((int(n), int(c)) for n, c in d.get("prefill", ())),
            tuple(int(c) for c in d.get("decode", ())),
            bool(d.get("padded", False)),
            int(d.get("ghost_rows", 0)),
        )
        schedule = d.get("schedule_time")  # files written before it was recorded have none
        start, duration = float(d["start"]), float(d["duration"])
        return cls(start, duration, shape, None if schedule is None else float(schedule))


@dataclass
class MeasuredRun:
    """One measured run: its summary (``metrics.summarize``'s keys, plus the bench client's),
    a row per request, and the engine's steps during it where the server reported them
    (None: not a bucketserve server, or not asked)."""

    summary: dict[str, Any]
    requests: list[RequestRow]
    steps: list[StepSample] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "requests": [r.to_dict() for r in self.requests],
            "steps": None if self.steps is None else [s.to_dict() for s in self.steps],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MeasuredRun:
        steps = d.get("steps")
        return cls(
            dict(d.get("summary") or {}),
            [RequestRow.from_dict(r) for r in d["requests"]],
            None if steps is None else [StepSample.from_dict(s) for s in steps],
        )


# -- cost-model profiles -----------------------------------------------------------------------
# ``Profile`` lives with the cost model in the core (``bucketserve.core.cost``); its JSON form
# is its to_dict / from_dict.


@dataclass
class ProfileFile:
    """A profile file: per model name, per tensor-parallel degree, a ``Profile``; and, for
    profiles we measured, how (``meta``: device, grid points, fit errors, ...)."""

    models: dict[str, dict[int, Profile]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            model: {str(tp): p.to_dict() for tp, p in by_tp.items()} for model, by_tp in self.models.items()
        }
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> ProfileFile:
        """Every key but ``meta`` is a model; each profile is named ``source:model:tpN``."""
        models = {
            model: {int(tp): Profile.from_dict(e, f"{source}:{model}:tp{tp}") for tp, e in by_tp.items()}
            for model, by_tp in d.items()
            if model != "meta" and isinstance(by_tp, dict)
        }
        return cls(models, dict(d.get("meta") or {}))
