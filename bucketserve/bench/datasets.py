"""Benchmark requests with real text: ShareGPT prompts as they are, or ShareGPT text cut and
repeated to the token counts a trace or a synthetic generator asks for.

Only the tokenizer of the served model is needed (never its weights): token counts must be the
server's own, or prompt lengths would be off.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bucketserve.workloads import LengthPair
from bucketserve.workloads.sharegpt import load_conversations, prompt_reply_pairs, sample_sharegpt

SYNTHETIC = ("alpaca-like", "longbench-like", "mixed", "fixed", "uniform")
TRACE_NAMES = ("azure-conv", "azure-code")
DATASETS = ("sharegpt", *TRACE_NAMES, *SYNTHETIC)


@dataclass
class BenchRequest:
    """One request to send: its prompt text, the prompt's token count, and tokens to generate."""

    prompt: str
    prompt_len: int
    output_len: int


def load_tokenizer(path: str | None) -> Any:
    """The tokenizer in a Hugging Face folder; None = the embedded SmolLM2's (converting it once
    if needed, as ``bucketserve serve`` would)."""
    from transformers import AutoTokenizer

    if path is None:
        from bucketserve.engine.loader import resolve_model_path

        path = str(resolve_model_path(None))
    return AutoTokenizer.from_pretrained(path)


def cap_lengths(
    pairs: Sequence[LengthPair],
    max_prompt_len: int | None,
    max_output_len: int | None,
    max_total_len: int | None,
) -> list[LengthPair]:
    """Clip each pair so prompt <= max_prompt_len, output <= max_output_len and
    prompt + output <= max_total_len (the output is cut first, to no less than 1 token)."""
    out = []
    for p in pairs:
        prompt = p.prompt_len if max_prompt_len is None else min(p.prompt_len, max_prompt_len)
        output = p.output_len if max_output_len is None else min(p.output_len, max_output_len)
        if max_total_len is not None:
            prompt = min(prompt, max_total_len - 1)
            output = max(1, min(output, max_total_len - prompt))
        out.append(LengthPair(max(1, prompt), output))
    return out


class TextPool:
    """A long run of real ShareGPT tokens (human turns, shuffled by seed) to cut prompts from."""

    def __init__(self, tokenizer: Any, min_tokens: int, seed: int = 0, path: str | None = None) -> None:
        pairs = prompt_reply_pairs(load_conversations(path))
        random.Random(seed).shuffle(pairs)
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        for prompt, _ in pairs:
            self.tokens += tokenizer.encode(prompt + "\n\n", add_special_tokens=False)
            if len(self.tokens) >= min_tokens:
                break
        if not self.tokens:
            raise ValueError("the ShareGPT data gave no text")
        self.rng = random.Random(seed)

    def text(self, num_tokens: int) -> tuple[str, int]:
        """Text of about ``num_tokens`` tokens from a random place in the pool (wrapping around,
        repeating the pool if it is shorter), and its token count once re-encoded."""
        start = self.rng.randrange(len(self.tokens))
        want = num_tokens
        for _ in range(4):  # decode/encode can merge or split tokens at the seams: adjust
            ids = [self.tokens[(start + i) % len(self.tokens)] for i in range(want)]
            text = self.tokenizer.decode(ids)
            got = len(self.tokenizer.encode(text, add_special_tokens=False))
            if got == num_tokens:
                break
            want = max(1, want + num_tokens - got)
        return text, got


def requests_for_lengths(
    tokenizer: Any, pairs: Sequence[LengthPair], seed: int = 0, path: str | None = None
) -> list[BenchRequest]:
    """A request of real text per length pair; prompt_len is the count re-encoded by the
    tokenizer (it can differ from the asked count by a token or two at text seams)."""
    if not pairs:
        return []
    # A pool much longer than any prompt keeps the prompts' texts varied.
    pool = TextPool(tokenizer, max(max(p.prompt_len for p in pairs) * 2, 100_000), seed, path)
    out = []
    for p in pairs:
        text, n = pool.text(p.prompt_len)
        out.append(BenchRequest(text, n, p.output_len))
    return out


def sharegpt_requests(
    tokenizer: Any,
    n: int,
    seed: int = 0,
    max_prompt_len: int = 1024,
    max_output_len: int | None = None,
    max_total_len: int | None = 2048,
    path: str | None = None,
) -> list[BenchRequest]:
    """``n`` ShareGPT requests with vLLM's filters (prompt 4..max_prompt_len tokens, output >= 4,
    prompt + output <= max_total_len); output = the reference reply's length, capped."""
    return [
        BenchRequest(s.prompt, s.prompt_len, s.output_len)
        for s in sample_sharegpt(
            tokenizer,
            n,
            seed=seed,
            max_prompt_len=max_prompt_len,
            max_output_len=max_output_len,
            max_total_len=max_total_len,
            path=path,
        )
    ]
