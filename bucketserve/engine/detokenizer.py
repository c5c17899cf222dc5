"""Incremental detokenization and stop-string matching for one sequence.

Decoding token by token breaks multi-byte characters and merges, so, as vLLM does, we decode
a short window ending at the newest token and emit only the text past what was already read,
and only once it no longer ends in an incomplete character.
"""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-6:])  # context so the first word decodes right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop
        self.stop_hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int) -> str | None:
        """Append a token; return the stop string it completed, if any (text cut before it)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(
            self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True
        )
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith(INCOMPLETE):
            old_len = len(self.text)
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.stop:
                # Only the new text and the few characters before it can complete a stop string.
                window = max(0, old_len - self.stop_hold)
                for s in self.stop:
                    at = self.text.find(s, window)
                    if at != -1:
                        self.text = self.text[:at]
                        return s
        return None

    def visible_text(self, finished: bool) -> str:
        """Text safe to show: while running, hold back what might still become a stop string."""
        if finished or not self.stop_hold:
            return self.text
        return self.text[: max(0, len(self.text) - self.stop_hold)]
