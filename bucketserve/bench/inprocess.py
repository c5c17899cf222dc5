"""Replay requests on an engine in this process at their arrival offsets (open loop, no HTTP):
the benchmarks that measure the engine itself, beside the HTTP client of ``bench``."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bucketserve.engine.llm_engine import LLMEngine, StepRecord
from bucketserve.metrics import RequestRecord
from bucketserve.sampling_params import SamplingParams

_runs = itertools.count()  # request ids stay unique when one engine replays several runs


class ReplayRequest(Protocol):
    prompt: str
    output_len: int


@dataclass
class Replay:
    start: float  # the engine's clock (time.monotonic) when the run started
    duration: float  # seconds from the start to the last request's end
    records: list[RequestRecord]  # in request order, on the engine's clock
    steps: list[StepRecord]  # every step the engine ran, in order


def replay(engine: LLMEngine, requests: Sequence[ReplayRequest], arrivals: Sequence[float]) -> Replay:
    """Add ``requests[i]`` at ``arrivals[i]`` seconds after the start (greedy, EOS ignored,
    ``output_len`` tokens), step the engine until every request has finished."""
    run = next(_runs)
    start = time.monotonic()
    order = sorted(range(len(requests)), key=lambda i: arrivals[i])
    records: dict[str, RequestRecord] = {}
    steps: list[StepRecord] = []
    nxt = 0
    while nxt < len(order) or engine.has_unfinished_requests():
        now = time.monotonic() - start
        while nxt < len(order) and arrivals[order[nxt]] <= now:
            i = order[nxt]
            params = SamplingParams(temperature=0, max_tokens=requests[i].output_len, ignore_eos=True)
            engine.add_request(
                f"replay{run}-{i}", requests[i].prompt, params, arrival_time=start + arrivals[i]
            )
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(0.01, arrivals[order[nxt]] - now)))
            continue
        before = engine.stats.steps
        outputs = engine.step()
        if engine.stats.steps > before:  # the policy may also have chosen to wait
            steps.append(engine.stats.recent[-1])
        for out in outputs:
            if out.finished:
                records[out.request_id] = RequestRecord.from_output(out)
    duration = time.monotonic() - start
    return Replay(start, duration, [records[f"replay{run}-{i}"] for i in range(len(requests))], steps)
