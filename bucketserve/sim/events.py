"""The simulator's event queue: a virtual clock and a heap of timed events.

Events at the same time run in the order they were pushed, which keeps seeded runs
deterministic.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from typing import Any, NamedTuple


class EventKind(enum.Enum):
    ARRIVAL = "arrival"  # a request reaches the gateway
    STEP_DONE = "step_done"  # an instance finished its current batch
    TRANSFER_DONE = "transfer_done"  # a sequence's KV cache reached its decode instance
    WAKE = "wake"  # an idle instance with queued work looks again (e.g. a dispatch window ran out)


class Event(NamedTuple):
    time: float
    order: int  # push order: breaks ties, so kind and data are never compared
    kind: EventKind
    data: Any = None


class EventQueue:
    def __init__(self) -> None:
        self._heap: list[Event] = []  # tuples: compared in C, several times faster than dataclasses
        self._counter = itertools.count()
        self.now = 0.0

    def push(self, time: float, kind: EventKind, data: Any = None) -> None:
        heapq.heappush(self._heap, Event(time, next(self._counter), kind, data))

    def pop(self) -> Event:
        """The earliest event; the clock moves to its time (never backwards)."""
        event = heapq.heappop(self._heap)
        self.now = max(self.now, event.time)
        return event

    def next_time(self) -> float:
        """The time of the earliest event; inf when none is left."""
        return self._heap[0][0] if self._heap else float("inf")

    def __len__(self) -> int:
        return len(self._heap)
