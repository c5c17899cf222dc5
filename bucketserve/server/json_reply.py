"""The server's JSON text: standard JSON (RFC 8259) for every reply and every SSE event.

Python's ``json`` writes a non-finite float as ``NaN`` or ``-Infinity``, which JSON parsers
refuse, and Starlette's ``JSONResponse`` refuses to write one at all (a 500). A logprob can be
``-inf`` (a token the model rules out) or NaN (a model that overflowed), so the server writes
every reply through ``wire.to_json_value``: non-finite as ``null``, the project's one policy.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

from bucketserve.wire import to_json_value


def json_text(payload: Any) -> str:
    """``payload`` as compact standard JSON, non-ASCII kept as is."""
    return json.dumps(to_json_value(payload), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class JSONReply(JSONResponse):
    """A ``JSONResponse`` that writes non-finite floats as null instead of failing."""

    def render(self, content: Any) -> bytes:
        return json_text(content).encode()
