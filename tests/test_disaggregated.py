"""Prefill/decode disaggregation: a prefill engine hands each prompt's KV and first token to a
decode engine, which reserved the request's blocks before the copy and decodes the rest. In
process (two engines, the tiny model) and on Ray Serve (``--prefill-replicas``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import assert_no_leaks
from prometheus_client.parser import text_string_to_metric_families
from server_process import MODEL, Server

from bucketserve.config import EngineConfig, SchedulerConfig
from bucketserve.engine.async_engine import AsyncEngine, RemotePrefill
from bucketserve.engine.handover import KVHandover
from bucketserve.engine.llm_engine import LLMEngine
from bucketserve.sampling_params import SamplingParams

PROMPTS = ["hello world " * k for k in range(1, 9)]


@pytest.fixture
def engines(tiny_model_dir: Path, engine_cache_dir: str) -> Iterator[Any]:
    made: list[AsyncEngine] = []

    def make(policy: str = "bucket", kv: int = 2**20, prefill: RemotePrefill | None = None) -> AsyncEngine:
        config = EngineConfig(
            model=str(tiny_model_dir), dtype="float32", kv_cache_memory=kv, cache_dir=engine_cache_dir
        )
        engine = AsyncEngine(
            lambda: LLMEngine(config, SchedulerConfig(policy=policy)), remote_prefill=prefill
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        asyncio.run(engine.shutdown(0))
        assert_no_leaks(engine.engine)


async def generate_all(engine: AsyncEngine, params: SamplingParams) -> list[Any]:
    async def one(i: int, prompt: str) -> Any:
        last = None
        async for out in engine.generate(f"r{i}", prompt, params):
            last = out
        return last

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))


@pytest.mark.parametrize("policy", ["bucket", "continuous", "distserve"])
def test_a_disaggregated_pair_gives_the_aggregated_engines_greedy_tokens(engines: Any, policy: str) -> None:
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    aggregated = engines(policy)
    prefill = engines(policy)
    decode = engines(policy, prefill=prefill)  # an AsyncEngine is a RemotePrefill

    async def both() -> tuple[list[Any], list[Any]]:
        return await generate_all(aggregated, params), await generate_all(decode, params)

    want, got = asyncio.run(both())
    assert sum(len(r.shape.prefill) for r in prefill.recent_steps()) == len(PROMPTS)  # each ran there
    for a, b in zip(want, got, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].text == a.outputs[0].text and b.outputs[0].finish_reason == "length"
        assert b.metrics.kv_transfer_time is not None and b.metrics.kv_transfer_time >= 0
    # The prefill engine ran one step per prompt batch and no decode step; the decode engine
    # ran no prompt.
    steps = decode.recent_steps()
    assert steps and all(not r.shape.prefill for r in steps)
    assert all(not r.shape.decode for r in prefill.recent_steps())


def test_a_first_token_that_ends_the_request_ends_it_on_the_decode_side_without_kv(engines: Any) -> None:
    decode = engines(prefill=engines())
    out = asyncio.run(generate_all(decode, SamplingParams(max_tokens=1, temperature=0)))[0]
    assert out.finished and out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 1


def test_a_decode_engine_reserves_a_requests_blocks_before_its_prompt_runs_and_waits_for_room(
    engines: Any, tiny_model_dir: Path
) -> None:
    """With room for one request's whole life, the second waits (counted as waiting) until the
    first finishes; neither prompt runs before its blocks are reserved."""
    reserved_at_prefill: list[int] = []

    prefill_engine = engines()

    class Watching:
        async def prefill(self, *args: Any) -> KVHandover:
            reserved_at_prefill.append(decode.stats().kv_blocks_used)
            return await prefill_engine.prefill(*args)

    decode = engines(kv=2**17, prefill=Watching())  # 16 blocks of 16 tokens
    params = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)  # 10 blocks each

    async def one(rid: str) -> Any:
        async for out in decode.generate(rid, "hello", params):
            last = out
        return last

    async def two() -> tuple[Any, Any, bool]:
        # The second arrives while the first's prompt is still running elsewhere, so the first
        # cannot have finished; then watch (not sleep a fixed time: CI machines vary) until the
        # second is counted as waiting, and note whether the first was still running then.
        first = asyncio.ensure_future(one("a"))
        while not reserved_at_prefill:
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(one("b"))
        waited_beside_first = False
        while not first.done():
            if decode.stats().num_waiting == 1:
                waited_beside_first = True
                break
            await asyncio.sleep(0.001)
        return await first, await second, waited_beside_first

    a, b, waited_beside_first = asyncio.run(two())
    assert waited_beside_first
    assert a.outputs[0].token_ids and b.outputs[0].token_ids
    assert all(used > 0 for used in reserved_at_prefill)  # its own blocks were held already
    # The second's prompt ran with only its own blocks held: the first had finished and freed its.
    first_held, second_held = reserved_at_prefill
    assert second_held == first_held


def test_an_abort_while_the_prompt_runs_elsewhere_frees_the_reservation(engines: Any) -> None:
    started = asyncio.Event()

    class Slow(RemotePrefill):
        async def prefill(self, *args: Any) -> KVHandover:
            started.set()
            await asyncio.sleep(30)
            raise AssertionError("not cancelled")

    decode = engines(prefill=Slow())

    async def cancelled() -> int:
        task = asyncio.ensure_future(decode.add_request("r", "hello", SamplingParams(max_tokens=50)))
        await started.wait()
        used = decode.stats().kv_blocks_used
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if decode.stats().kv_blocks_used == 0:
                break
            await asyncio.sleep(0.01)
        return used

    assert asyncio.run(cancelled()) > 0
    assert decode.stats().kv_blocks_used == 0


# -- on Ray Serve --------------------------------------------------------------------------
KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def pd_cluster(tiny_model_dir: Path) -> Iterator[Server]:
    srv = Server(
        tiny_model_dir, "--prefill-replicas", "1", "--decode-replicas", "1", "--kv-cache-memory", "2MiB",
        env={"BUCKETSERVE_API_KEY": "s3cret"}, ready_s=180,
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0, "".join(srv.log)


def test_the_disaggregated_endpoint_streams_the_greedy_reply_of_one_engine(
    pd_cluster: Server, make_llm: Any
) -> None:
    want = make_llm().generate(
        ["The quick brown fox"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    )
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", pd_cluster.url + "/v1/completions", json=body, headers=KEY, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == want[0].outputs[0].text
    chat = httpx.post(
        pd_cluster.url + "/v1/chat/completions", headers=KEY, timeout=60,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
    )  # fmt: skip
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1


def test_the_kv_transfer_time_is_a_metric_and_both_kinds_of_replica_report(pd_cluster: Server) -> None:
    rs = [
        httpx.post(pd_cluster.url + "/v1/completions", headers=KEY, timeout=60,
                   json={"model": MODEL, "prompt": "hello " * n, "max_tokens": 4})
        for n in (1, 20, 60)
    ]  # fmt: skip
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(pd_cluster.url + "/metrics").text)
    }
    transfers = [s for s in families["bucketserve:kv_transfer_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in transfers) >= 3
    replicas = {s.labels["replica"] for s in families["bucketserve:kv_cache_usage_perc"].samples}
    assert len(replicas) == 2  # the prefill replica and the decode replica
    assert all(s.value == 0 for s in families["bucketserve:kv_cache_usage_perc"].samples)


def test_disaggregation_options_that_cannot_work_are_refused_in_one_line(tiny_model_dir: Path) -> None:
    import subprocess
    import sys

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "bucketserve", "serve", "--model", str(tiny_model_dir), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    cases = {
        ("--prefill-replicas", "1"): "--prefill-replicas and --decode-replicas go together",
        ("--replicas", "2", "--prefill-replicas", "1", "--decode-replicas", "1"): "not both",
        ("--prefill-replicas", "1", "--decode-replicas", "1", "--policy", "static"): "cannot join",
    }
    for args, message in cases.items():
        out = serve(*args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_full_prefill_queue_crosses_processes_as_what_it_is() -> None:
    import pickle

    from bucketserve.engine.async_engine import QueueFullError

    e = pickle.loads(pickle.dumps(QueueFullError("the queue is full", 3)))
    assert isinstance(e, QueueFullError) and e.retry_after_s == 3 and str(e) == "the queue is full"


def test_a_hand_over_that_does_not_fit_fails_its_request_only(engines: Any) -> None:
    import torch

    prefill_engine = engines()

    class Misshapen:
        async def prefill(self, *args: Any) -> KVHandover:
            handover = await prefill_engine.prefill(*args)
            assert handover.kv is not None
            handover.kv = torch.zeros(1, 2, 3)  # not this engine's layout
            return handover

    decode = engines(prefill=Misshapen())
    params = SamplingParams(max_tokens=4, temperature=0)

    async def one() -> BaseException | None:
        try:
            async for _ in decode.generate("bad", "hello", params):
                pass
        except Exception as e:
            return e
        return None

    assert asyncio.run(one()) is not None
    assert decode.is_running  # the engine goes on
    deadline = time.monotonic() + 5
    while decode.stats().kv_blocks_used:  # the snapshot follows the engine's next turn
        assert time.monotonic() < deadline, "the failed request's reserved blocks were not freed"
        time.sleep(0.01)
