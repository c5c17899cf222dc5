"""The length pair every workload generator yields (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LengthPair:
    """One request's shape: prompt tokens in, output tokens to generate."""

    prompt_len: int
    output_len: int
