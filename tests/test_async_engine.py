"""AsyncEngine: the engine's step loop in a thread, requests served to coroutines."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bucketserve.config import EngineConfig, SchedulerConfig
from bucketserve.engine.async_engine import AsyncEngine, EngineStoppedError, QueueFullError, retry_after
from bucketserve.engine.llm_engine import LLMEngine
from bucketserve.errors import ConfigError, InvalidRequestError
from bucketserve.sampling_params import SamplingParams

LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)


@pytest.fixture
def make_engine(tiny_model_dir: Path) -> Iterator:
    made: list[AsyncEngine] = []

    def make(max_waiting_requests: int = 256, **sched: object) -> AsyncEngine:
        def build() -> LLMEngine:
            config = EngineConfig(
                model=str(tiny_model_dir), dtype="float32", device="cpu", kv_cache_memory=2**20
            )
            return LLMEngine(config, SchedulerConfig(**sched))  # type: ignore[arg-type]

        made.append(AsyncEngine(build, max_waiting_requests=max_waiting_requests))
        return made[-1]

    yield make
    for e in made:
        asyncio.run(e.shutdown(0))
        assert e.engine.block_manager.num_used_blocks == 0, "KV blocks leaked"
        assert not e.engine.has_unfinished_requests()


async def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_generate_streams_cumulative_outputs_to_a_finished_one(make_engine) -> None:
    engine = make_engine()

    async def run() -> list:
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        return [out async for out in engine.generate("a", "The quick brown fox", params)]

    outs = asyncio.run(run())
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 11))
    texts = [o.outputs[0].text for o in outs]
    assert all(texts[-1].startswith(t) for t in texts)
    assert outs[-1].outputs[0].finish_reason == "length"


def test_an_invalid_request_raises_before_any_output_and_queues_nothing(make_engine) -> None:
    engine = make_engine()

    async def run() -> None:
        with pytest.raises(InvalidRequestError, match="maximum context length is 256"):
            async for _ in engine.generate("a", "x", SamplingParams(max_tokens=1000)):
                pass
        with pytest.raises(InvalidRequestError, match="the prompt is empty"):
            await engine.add_request("b", "", SamplingParams())

    asyncio.run(run())
    assert not engine.engine.has_unfinished_requests()


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_leaving_generate_early_aborts_and_frees_the_kv_at_once(make_engine, how: str) -> None:
    engine = make_engine()

    async def run() -> None:
        first, leave = asyncio.Event(), asyncio.Event()

        async def consume() -> None:
            outputs = engine.generate("a", "The quick brown fox", LONG)
            async for _ in outputs:
                first.set()
                if how == "aclose":  # else: cancelled while the generator awaits the next output
                    await leave.wait()
                    break
            await outputs.aclose()

        task = asyncio.ensure_future(consume())
        await first.wait()
        await wait_until(lambda: engine.stats().kv_blocks_used > 0)
        if how == "cancel":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            leave.set()
            await task
        await wait_until(lambda: engine.stats().kv_blocks_used == 0)
        assert engine.stats().num_running == 0
        assert engine.stats().num_steps < 100  # it stopped long before its 200 tokens

    asyncio.run(run())


def test_a_full_waiting_queue_refuses_with_queue_full(make_engine) -> None:
    engine = make_engine(max_waiting_requests=1, max_num_seqs=1)

    async def run() -> None:
        running = await engine.add_request("a", "The quick brown fox", LONG)
        await running.__anext__()  # "a" runs; with max_num_seqs=1 nothing else can start
        waiting = await engine.add_request("b", "Hello", LONG)
        with pytest.raises(QueueFullError, match="max_waiting_requests=1"):
            await engine.add_request("c", "Hello", LONG)
        engine.abort("a")
        engine.abort("b")
        del waiting

    asyncio.run(run())


def test_requests_that_reach_an_idle_engine_together_take_its_free_seats_before_the_queue(
    make_engine,
) -> None:
    """Admission bounds the requests no free seat will take: of three sent at once to an
    idle engine with one seat and room for one waiting, one runs, one waits and one is
    refused, whether or not the engine steps between their arrivals."""
    engine = make_engine(max_waiting_requests=1, max_num_seqs=1)

    async def run() -> None:
        added = await asyncio.gather(
            *(engine.add_request(rid, "Hello", LONG) for rid in "abc"), return_exceptions=True
        )
        refused = [r for r in added if isinstance(r, QueueFullError)]
        assert len(refused) == 1, added
        for rid, r in zip("abc", added, strict=True):
            if not isinstance(r, BaseException):
                engine.abort(rid)

    asyncio.run(run())


def test_a_factory_builds_the_engine_on_the_engine_thread_and_its_errors_reach_the_caller(
    tiny_model_dir: Path,
) -> None:
    threads: list[str] = []

    def build() -> LLMEngine:
        threads.append(threading.current_thread().name)
        return LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", kv_cache_memory=2**20))

    engine = AsyncEngine(build)
    assert threads == ["bucketserve-engine"] and engine.is_running
    asyncio.run(engine.shutdown(0))
    with pytest.raises(ConfigError, match="KV"):
        AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(tiny_model_dir), kv_cache_memory=1000)))


def test_retry_after_is_the_time_to_start_half_the_queue_at_the_recent_finish_rate() -> None:
    two_per_second = deque([0.0, 0.5, 1.0, 1.5, 2.0])
    assert retry_after(10, two_per_second) == 3  # 5 requests at 2/s: 2.5 s, rounded up
    assert retry_after(1000, two_per_second, cap_s=60) == 60
    assert retry_after(1, two_per_second) == 1
    assert retry_after(50, deque([3.0])) == 1  # nothing measured yet


def test_shutdown_aborts_what_outlives_the_grace_and_refuses_new_requests(make_engine) -> None:
    engine = make_engine()

    async def run() -> None:
        stream = await engine.add_request("a", "The quick brown fox", LONG)
        await stream.__anext__()
        await engine.shutdown(grace_s=0)
        with pytest.raises(EngineStoppedError):
            async for _ in stream:
                pass
        with pytest.raises(EngineStoppedError):
            await engine.add_request("b", "Hello", LONG)

    asyncio.run(run())
    assert not engine.is_running


def test_a_failing_batch_answers_500_in_openai_shape(make_engine, monkeypatch) -> None:
    from bucketserve.server.app import build_app

    engine = make_engine()
    monkeypatch.setattr(engine.engine.runner, "execute", lambda batch: 1 / 0)
    app = build_app(engine, "tiny")

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})

    r = asyncio.run(run())
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
