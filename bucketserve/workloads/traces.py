"""Real request traces (Azure LLM inference, 2023) shipped in ``bucketserve/data/traces``.

See the README there for their origin and licence (microsoft/vidur, MIT; Azure Public
Dataset). A trace gives arrival times and token counts, no text. Pure Python.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

TRACES = {"azure-conv": "azure-2023-conv.csv", "azure-code": "azure-2023-code.csv"}


@dataclass(frozen=True)
class TraceRequest:
    """One traced request: arrival in seconds from the trace start, and its token counts."""

    arrival: float
    prompt_len: int
    output_len: int


@functools.lru_cache(maxsize=4)
def _read(source: str) -> tuple[TraceRequest, ...]:
    if source in TRACES:
        text = resources.files("bucketserve").joinpath("data", "traces", TRACES[source]).read_text()
    else:
        text = Path(source).read_text()
    rows = csv.DictReader(text.splitlines())
    return tuple(
        TraceRequest(float(r["arrived_at"]), int(r["num_prefill_tokens"]), int(r["num_decode_tokens"]))
        for r in rows
    )


def load_trace(name: str) -> list[TraceRequest]:
    """The requests of trace ``name`` ("azure-conv", "azure-code", or a path to a CSV with
    columns arrived_at, num_prefill_tokens, num_decode_tokens), in file order."""
    if name not in TRACES and not Path(name).is_file():
        raise ValueError(f"unknown trace {name!r}: use one of {sorted(TRACES)} or a CSV path")
    return list(_read(name))
