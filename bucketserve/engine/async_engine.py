"""An asyncio front for :class:`LLMEngine`: one background thread runs the step loop.

The engine is not thread-safe, so only the engine thread touches it. Callers (coroutines on
an event loop) put commands (add, abort) in a thread-safe inbox that the loop drains between
steps; the loop hands each request's outputs back to the caller's event loop with
``loop.call_soon_threadsafe`` into a per-request ``asyncio.Queue``.

    engine = AsyncEngine(LLMEngine(config, scheduler_config), max_waiting_requests=256)
    async for out in engine.generate("req-1", "Hello", SamplingParams(max_tokens=16)):
        print(out.outputs[0].text)        # cumulative text so far
    await engine.shutdown(grace_s=5)

Validation errors (:class:`InvalidRequestError`) and a full waiting queue
(:class:`QueueFullError`) are raised by ``add_request`` (and so by the first step of
``generate``) before any output. Leaving ``generate`` early (``aclose``, cancellation, a
client that disconnects) aborts the request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bucketserve.engine.handover import KVHandover
from bucketserve.engine.llm_engine import LLMEngine, StepRecord
from bucketserve.errors import BucketServeError, ConfigError
from bucketserve.outputs import RequestOutput
from bucketserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(BucketServeError):
    """The waiting queue holds ``max_waiting_requests``; retry after ``retry_after_s`` (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type, tuple[str, int]]:  # it crosses processes (P/D replicas)
        return type(self), (str(self), self.retry_after_s)


class EngineStoppedError(BucketServeError):
    """The engine is shutting down (or its loop died) and takes no more requests (HTTP 503)."""


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state after its latest step or command, for /metrics and /health."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_preemptions: int = 0
    num_late: int = 0  # requests that could not meet their TTFT target (Scheduler.num_late)
    num_steps: int = 0
    padding_ratio: float = 0.0
    queues: tuple[tuple[str, int], ...] = ()  # (bucket or queue label, waiting requests)
    queue_edges: tuple[int, ...] = ()  # queue i holds prompt lengths [edges[i], edges[i + 1])
    num_queue_splits: int = 0  # times a bucket split, since start
    num_queue_merges: int = 0
    num_late_demotions: int = 0  # late prompts moved behind the on-time ones (Scheduler.num_late_demotions)

    @property
    def kv_cache_usage(self) -> float:
        """Share of the KV pool's blocks in use, in [0, 1]."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


def retry_after(num_waiting: int, finish_times: deque[float], cap_s: int = 60) -> int:
    """Seconds until about half of the waiting queue has been started, at the rate requests
    recently finished (each finish frees room for one waiting request); 1 to ``cap_s``.

    Half the queue, not one slot: every refused client gets the same hint, and they should not
    all come back for the same freed slot at once."""
    if len(finish_times) < 2 or finish_times[-1] <= finish_times[0]:
        return 1
    rate = (len(finish_times) - 1) / (finish_times[-1] - finish_times[0])
    return max(1, min(cap_s, math.ceil(0.5 * num_waiting / rate)))


_ACCEPTED = object()  # put in a request's queue once the engine has queued it


@dataclass(frozen=True)
class _Reserved:
    """Put in a request's queue once a decode instance has reserved its KV blocks."""

    prompt_token_ids: list[int]


class RemotePrefill(Protocol):
    """Where a decode instance's prompts run: a prefill instance that returns each prompt's
    KV and first token. An ``AsyncEngine`` is one (in process); on Ray Serve, a handle to
    the prefill replicas (``cluster.replicas.HandlePrefill``)."""

    def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        annotations: dict[str, Any],
    ) -> Awaitable[KVHandover]:
        """Run the prompt there; ``annotations`` are ``AsyncEngine.generate``'s priority and
        SLO keywords. Raises what the prefill instance's ``add_request`` raises."""


class RequestStream:
    """One request's outputs as they arrive; iterate it with ``async for``."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.finished = False
        self.arrival_time = time.monotonic()  # the engine's arrival time for the request

    def put(self, item: RequestOutput | BaseException | object) -> None:
        """Called from the engine thread."""
        # A closed loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert isinstance(item, RequestOutput)
        if item.finished:
            self.finished = True
        return item


def _deliver(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    """Hand a step's outputs to their event loops, with one wake-up per loop rather than one
    per request: each wake-up is a syscall and a GIL hand-over that the next step waits for."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
    for stream, out in items:
        by_loop.setdefault(stream.loop, []).append((stream, out))
    for loop, batch in by_loop.items():
        # A closed loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_put_all, batch)


def _put_all(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)


@dataclass
class _Add:
    stream: RequestStream
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    priority: int
    ttft_slo: float | None
    tpot_slo: float | None
    hand_over: bool = False


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Attach:
    request_id: str
    handover: KVHandover


class AsyncEngine:
    """Runs an engine's step loop in a background thread and serves requests to coroutines.

    ``engine`` is an LLMEngine, or a function that builds one: then it is built on the engine
    thread itself (its errors raised here), so that every torch operation runs on that one
    thread. Built on the caller's thread, the model load leaves an OpenMP thread team there
    beside the engine thread's; on two cores that made steps behind the server 1.3-1.7x
    slower (docs/RESULTS.md).

    With ``remote_prefill`` it is a decode instance: each request's prompt runs there, after
    this engine has reserved the request's KV blocks, and its KV comes back to be decoded here.
    """

    def __init__(
        self,
        engine: LLMEngine | Callable[[], LLMEngine],
        *,
        max_waiting_requests: int = 256,
        idle_poll_s: float = 0.002,
        remote_prefill: RemotePrefill | None = None,
    ) -> None:
        if max_waiting_requests < 1:
            raise ConfigError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        self.max_waiting_requests = max_waiting_requests
        self._idle_poll_s = idle_poll_s
        self._remote_prefill = remote_prefill
        self._cond = threading.Condition()
        self._inbox: deque[_Add | _Abort | _Attach] = deque()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._stopping = False
        self._deadline = float("inf")
        self._finish_times: deque[float] = deque(maxlen=32)  # engine thread only
        self.engine: LLMEngine
        self._snapshot: EngineSnapshot
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.engine = engine if isinstance(engine, LLMEngine) else engine()
            except BaseException as e:  # raised to the constructor's caller below
                failure.append(e)
                ready.set()
                return
            self._update_snapshot()
            ready.set()
            self._run()

        self._thread = threading.Thread(target=run, name="bucketserve-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    # -- the caller's side (any thread with a running event loop) ---------------------------
    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def stats(self) -> EngineSnapshot:
        return self._snapshot

    def recent_steps(self) -> list[StepRecord]:
        """The engine's most recent step records, oldest first (a copy: list() of a deque is
        one C call under the GIL, safe while the engine thread appends)."""
        return list(self.engine.stats.recent)

    def tokenize(self, prompt: str) -> list[int]:
        """The tokenizer is read-only and thread-safe; callers may tokenize on their side."""
        return self.engine.tokenize(prompt)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.engine.apply_chat_template(messages)

    def decode_token(self, token_id: int) -> str:
        return self.engine.decode_token(token_id)

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        ttft_slo: float | None = None,
        tpot_slo: float | None = None,
        hand_over: bool = False,
    ) -> RequestStream:
        """Queue a request and return its output stream once the engine has accepted it
        (``hand_over``: a prefill instance's, see ``LLMEngine.add_request``).

        Raises InvalidRequestError, QueueFullError or EngineStoppedError (nothing queued)."""
        stream = RequestStream(request_id, asyncio.get_running_loop())
        self._send(_Add(stream, prompt, params, stream.arrival_time, priority, ttft_slo, tpot_slo, hand_over))
        try:
            item = await stream.queue.get()
            if isinstance(item, BaseException):
                raise item
            assert item is _ACCEPTED
            if self._remote_prefill is not None:
                await self._prefill_remotely(stream, params, priority, ttft_slo, tpot_slo)
        except BaseException:
            self.abort(request_id)  # a no-op for what the engine refused
            raise
        return stream

    async def _prefill_remotely(
        self,
        stream: RequestStream,
        params: SamplingParams,
        priority: int,
        ttft_slo: float | None,
        tpot_slo: float | None,
    ) -> None:
        """Once the engine has reserved the request's blocks, run its prompt on a prefill
        instance and hand the KV that comes back to the engine, which decodes from there."""
        assert self._remote_prefill is not None
        item = await stream.queue.get()
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, _Reserved)
        annotations = {"priority": priority, "ttft_slo": ttft_slo, "tpot_slo": tpot_slo}
        handover = await self._remote_prefill.prefill(
            stream.request_id, item.prompt_token_ids, params, annotations
        )
        self._send(_Attach(stream.request_id, handover))

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        ttft_slo: float | None = None,
        tpot_slo: float | None = None,
        hand_over: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (cumulative text and token ids), the last one finished
        (``hand_over``: a prefill instance's, whose last output carries the KV hand-over).

        Closing or cancelling the iterator before the end aborts the request."""
        stream = await self.add_request(
            request_id, prompt, params, priority=priority, ttft_slo=ttft_slo, tpot_slo=tpot_slo,
            hand_over=hand_over,
        )  # fmt: skip
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(request_id)

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        annotations: dict[str, Any],
    ) -> KVHandover:
        """A prefill instance's part of a request: run its prompt and return its KV and first
        token (``RemotePrefill.prefill``'s other end). Cancelling the call aborts it."""
        last = None
        async for out in self.generate(request_id, prompt_token_ids, params, hand_over=True, **annotations):
            last = out
        if last is None or last.kv_handover is None:
            raise EngineStoppedError("the engine ended the request without handing it over")
        return last.kv_handover

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe, returns at once); the engine frees its KV blocks
        before its next step. Unknown or finished ids are ignored."""
        with self._cond:
            self._inbox.append(_Abort(request_id))
            self._cond.notify()

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, let running ones finish for up to ``grace_s`` seconds, abort
        the rest (their streams raise EngineStoppedError) and stop the engine thread."""
        with self._cond:
            if not self._stopping:
                self._stopping = True
                self._deadline = time.monotonic() + grace_s
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    def _send(self, cmd: _Add | _Abort | _Attach) -> None:
        with self._cond:
            # While stopping, requests already taken in still get their KV and finish.
            if not self._thread.is_alive() or (self._stopping and isinstance(cmd, _Add)):
                raise EngineStoppedError("the server is shutting down; retry on another instance")
            self._inbox.append(cmd)
            self._cond.notify()

    # -- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug in the engine: fail every request, refuse new ones
            log.exception("the engine loop died")
            with self._cond:
                self._stopping = True
                cmds = list(self._inbox)
                self._inbox.clear()
            err = EngineStoppedError(f"the engine failed: {e}")
            for cmd in cmds:
                if isinstance(cmd, _Add):
                    cmd.stream.put(err)
            for stream in self._streams.values():
                stream.put(err)
            self._streams.clear()

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._inbox and not self._streams and not self._stopping:
                    self._cond.wait()
                cmds = list(self._inbox)
                self._inbox.clear()
                stopping, deadline = self._stopping, self._deadline
            for cmd in cmds:
                self._apply(cmd)
            if self._remote_prefill is not None and not stopping and (reserved := engine.reserve_awaiting()):
                self._update_snapshot()  # the blocks are held before anyone hears of it
                for seq in reserved:
                    self._streams[seq.seq_id].put(_Reserved(list(seq.prompt_token_ids)))
            if stopping and (not self._streams or time.monotonic() >= deadline):
                self._abort_all(EngineStoppedError("the server shut down before this request finished"))
                self._update_snapshot()
                return
            if not engine.has_unfinished_requests():
                if self._streams:  # requests the engine no longer knows: never wait for them forever
                    log.error("the engine lost %d requests; failing them", len(self._streams))
                    self._abort_all(EngineStoppedError("the engine lost this request; retry it"))
                self._update_snapshot()
                continue
            steps = engine.stats.steps
            try:
                outputs = engine.step()
            except Exception as e:  # the scheduler itself failed: fail the in-flight requests
                log.exception("an engine step failed; failing %d requests", len(self._streams))
                self._abort_all(e)
                outputs = []
            delivered = []
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                delivered.append((stream, out))
                if out.finished:
                    del self._streams[out.request_id]
                    self._finish_times.append(time.monotonic())
            _deliver(delivered)
            self._update_snapshot()
            if engine.stats.steps == steps:
                # The policy chose to wait (a bucket's dispatch window); don't spin.
                with self._cond:
                    if not self._inbox:
                        self._cond.wait(self._idle_poll_s)

    def _apply(self, cmd: _Add | _Abort | _Attach) -> None:
        engine = self.engine
        if isinstance(cmd, _Abort):
            engine.abort_request(cmd.request_id)
            self._streams.pop(cmd.request_id, None)
            return
        if isinstance(cmd, _Attach):
            stream = self._streams.get(cmd.request_id)
            try:
                out = engine.attach_kv(cmd.request_id, cmd.handover)
            except Exception as e:  # a hand-over that does not fit: fail this request only
                log.exception("the KV handed over for %s could not be taken in", cmd.request_id)
                engine.abort_request(cmd.request_id)
                self._streams.pop(cmd.request_id, None)
                if stream is not None:
                    stream.put(e)
                return
            if out is not None and stream is not None:
                _deliver([(stream, out)])
                if out.finished:
                    del self._streams[cmd.request_id]
                    self._finish_times.append(time.monotonic())
            return
        stream = cmd.stream
        if self._stopping:
            stream.put(EngineStoppedError("the server is shutting down; retry on another instance"))
            return
        queued = engine.num_queued
        if queued >= self.max_waiting_requests:
            wait_s = retry_after(queued, self._finish_times)
            stream.put(
                QueueFullError(
                    f"the server is overloaded: {queued} requests are already waiting for a seat "
                    f"(max_waiting_requests={self.max_waiting_requests}); retry in {wait_s} s",
                    retry_after_s=wait_s,
                )
            )
            return
        try:
            engine.add_request(
                stream.request_id,
                cmd.prompt,
                cmd.params,
                arrival_time=cmd.arrival_time,
                priority=cmd.priority,
                ttft_slo=cmd.ttft_slo,
                tpot_slo=cmd.tpot_slo,
                hand_over=cmd.hand_over,
                await_kv=self._remote_prefill is not None,
            )
        except Exception as e:  # InvalidRequestError, or a tokenizer failure on odd input
            stream.put(e)
            return
        self._streams[stream.request_id] = stream
        stream.put(_ACCEPTED)

    def _abort_all(self, error: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort_request(rid)
            stream.put(error)
        self._streams.clear()

    def _update_snapshot(self) -> None:
        engine = self.engine
        bm = engine.block_manager
        self._snapshot = EngineSnapshot(
            num_running=engine.scheduler.num_running,
            num_waiting=engine.num_waiting,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            num_preemptions=engine.stats.preemptions,
            num_late=engine.scheduler.num_late,
            num_steps=engine.stats.steps,
            padding_ratio=engine.stats.padding_ratio,
            queues=tuple(engine.scheduler.queue_lengths()),
            queue_edges=tuple(engine.scheduler.queue_edges()),
            num_queue_splits=engine.scheduler.num_queue_splits,
            num_queue_merges=engine.scheduler.num_queue_merges,
            num_late_demotions=engine.scheduler.num_late_demotions,
        )
