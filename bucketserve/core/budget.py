"""How many prompt tokens a step may take: a budget in time, from the latency targets.

Every step decodes all running sequences, so a step's time is every running request's time
per output token (TPOT). ``StepBudget`` takes prompt tokens into a step only while the cost
model predicts the step to stay under a time limit (the caller's: the ``bucket`` policy's
keeps every running request within its TPOT target over its reply, and a share of the
tightest TTFT target), chunking a prompt where it would not fit whole. Without a limit the
token budget alone applies (``max_num_batched_tokens``).

A chunk that does not end its prompt takes at least ``min_chunk`` tokens: a step with prompt
tokens costs a fixed overhead beside its decode rows, so a sliver of a prompt is not worth a
step. Progress: while the token budget has room and the caller allows it (``progress``), the
first chunk of a step may always take ``min_chunk`` tokens (or the rest of its prompt), even
over the limit, and whole prompts after it while the tokens so taken stay within
``min_chunk``; so a step exceeds its limit by at most one chunk's tokens and a tight target
never starves a waiting prompt. (Whole prompts: where the running decodes alone fill the
limit, one short prompt a step left a burst of chats waiting a step each; ShareGPT at 11
req/s, RESULTS issue 13 thirty-third session.) Decode rows count against the token budget
here (as in ``continuous``), one token each.
"""

from __future__ import annotations

import math

from bucketserve.core.cost import Profile, step_ms
from bucketserve.core.scheduler import BatchShape


class StepBudget:
    """Prompt tokens for one step: ``take`` as many of a prompt as fit, chunk by chunk."""

    def __init__(
        self,
        profile: Profile | None,
        decode_contexts: list[int],
        limit_s: float,
        max_tokens: int,
        min_chunk: int,
        progress: bool = True,
    ) -> None:
        self.profile = profile
        self.decode = tuple(decode_contexts)
        self.limit_ms = limit_s * 1e3
        self.tokens_left = max_tokens - len(decode_contexts)  # decodes count against the tokens
        self.min_chunk = min_chunk
        self.progress = progress  # whether a step may take min_chunk tokens over the limit
        self.rows: list[tuple[int, int, int]] = []  # (tokens, cached, sequence length) per prompt
        # Whether the first chunk went over the limit (progress): then so did every row after it,
        # as the predicted time only grows, and all the rows' tokens count against min_chunk.
        self.over = False

    @property
    def timed(self) -> bool:
        """Whether a time limit applies (a cost model and a finite limit), not tokens alone."""
        return self.profile is not None and math.isfinite(self.limit_ms)

    def predicted_s(self, extra: tuple[tuple[int, int, int], ...] = ()) -> float:
        """The step's predicted time with its chunks so far (and ``extra``), in seconds."""
        if self.profile is None:
            return 0.0
        rows = (*self.rows, *extra)
        # A one-token row runs and is charged as a decode row at its sequence's length
        # (ScheduledBatch.is_prefill, BatchShape).
        prefill = tuple((n, c) for n, c, _ in rows if n > 1)
        decode = (*self.decode, *(length for n, _, length in rows if n == 1))
        return step_ms(self.profile, BatchShape(prefill, decode)) / 1e3

    def _fits(self, n: int, cached: int, length: int) -> bool:
        return self.predicted_s(((n, cached, length),)) * 1e3 <= self.limit_ms

    def take(self, want: int, cached: int) -> int:
        """How many of a prompt's ``want`` remaining tokens (after ``cached`` computed ones)
        this step takes; records them. 0 when the step is full: a chunk shorter than
        ``min_chunk`` is taken only to end a prompt, or as the step's first (``progress``);
        one that does not fit is taken over the limit only as the first chunk, or whole within
        what the first left of ``min_chunk`` (``progress``)."""
        length = cached + want
        hi = min(want, self.tokens_left)
        if hi <= 0:
            return 0
        n = hi
        if self.timed and not self._fits(hi, cached, length):
            lo = 0  # the most tokens that fit: predicted time grows with n
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._fits(mid, cached, length):
                    lo = mid
                else:
                    hi = mid - 1
            n = lo
        if n < min(want, self.min_chunk):
            n = 0
            if self.progress and not self.rows:
                n = min(want, self.tokens_left, self.min_chunk)
                self.over = True
            elif self.over and want <= min(self.tokens_left, self.min_chunk - sum(r[0] for r in self.rows)):
                n = want  # a whole prompt within the progress chunk's tokens
        if n > 0:
            self.rows.append((n, cached, length))
            self.tokens_left -= n
        return n

    def give_back(self) -> None:
        """Undo the last ``take`` (its prompt could not get KV blocks after all)."""
        n, _, _ = self.rows.pop()
        self.tokens_left += n
        self.over = self.over and bool(self.rows)
