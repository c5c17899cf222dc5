"""What the HTTP server costs: the same ShareGPT requests through `bucketserve serve` (streamed
by concurrent clients) and through `LLM.generate` in-process.

What it measures
    N ShareGPT requests (seeded; vLLM's filters; output = the reference reply's length capped at
    --max-output-len; greedy, EOS ignored, so both sides generate exactly the same tokens).

    1. In-process: ``LLM.generate`` with every request at once and ``--max-num-seqs`` = the
       client concurrency, so at most that many run together, as behind the server.
    1b. In-process, the server's arrival pattern: ``--concurrency`` asyncio clients on an
       ``AsyncEngine`` (the server's engine front), each sending its next request when its
       previous one ends. The difference between 1b and 2 is what HTTP itself costs.
    2. HTTP: a `bucketserve serve` subprocess with the same engine options, driven by the bench
       client (`bucketserve.bench`) with ``--concurrency`` streaming clients, each sending its
       next request as soon as its previous one ends.

    For each: wall time, output tokens/s, mean and median TPOT. Then the server's cost: the
    throughput it loses against in-process (target < 10%) and its TPOT change. The model load
    and one warm-up request are not timed.

    With ``--web-page``, what the web page costs instead: the HTTP run (2) without the page
    (``--no-web-ui``: no sampler, no routes), with the page served but nobody looking, and
    with a page open (a client polling ``/dashboard/state`` once a second with ``since``,
    as the page's script does): three runs each, in the order A B C, B C A, C A B.

How to run
    .venv/bin/python benchmarks/server_overhead.py                    # 96 requests, 32 clients
    .venv/bin/python benchmarks/server_overhead.py --num-prompts 16   # a quick check
    .venv/bin/python benchmarks/server_overhead.py --web-page         # the web page's cost
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import time
from pathlib import Path
from typing import Any

import httpx

from bucketserve import LLM, SamplingParams
from bucketserve.bench.client import ClientConfig
from bucketserve.bench.datasets import BenchRequest, load_tokenizer, sharegpt_requests
from bucketserve.bench.runner import run_workload
from bucketserve.bench.servers import managed_server
from bucketserve.engine.async_engine import AsyncEngine
from bucketserve.metrics import RequestRecord, summarize
from bucketserve.wire import write_json

TARGET_OVERHEAD = 0.10


def in_process(requests: list[BenchRequest], concurrency: int, engine_args: dict[str, Any]) -> dict:
    llm = LLM(max_num_seqs=concurrency, **engine_args)
    llm.generate("Warm up.", SamplingParams(max_tokens=4), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate([r.prompt for r in requests], params, use_tqdm=True)
    duration = time.perf_counter() - start
    for r, out in zip(requests, outputs, strict=True):
        if len(out.outputs[0].token_ids) != r.output_len:
            raise RuntimeError(
                f"{out.request_id}: asked {r.output_len} tokens, got {len(out.outputs[0].token_ids)}"
            )
    records = [RequestRecord.from_output(out) for out in outputs]
    del llm
    gc.collect()
    return summarize(records, duration)


def closed_loop(requests: list[BenchRequest], concurrency: int, engine_args: dict[str, Any]) -> dict:
    """The server's arrival pattern without HTTP: ``concurrency`` asyncio clients on an in-process
    AsyncEngine, each sending its next request when its previous one ends."""
    # built on the engine thread, as the server builds it (see AsyncEngine)
    engine = AsyncEngine(lambda: LLM(max_num_seqs=concurrency, **engine_args).engine)

    async def run() -> tuple[list[RequestRecord], float]:
        slots = asyncio.Semaphore(concurrency)

        async def one(i: int, r: BenchRequest) -> RequestRecord:
            params = SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
            async with slots:
                async for out in engine.generate(f"r{i}", r.prompt, params):  # noqa: B007
                    pass
            return RequestRecord.from_output(out)

        start = time.perf_counter()
        records = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        duration = time.perf_counter() - start
        await engine.shutdown()
        return list(records), duration

    records, duration = asyncio.run(run())
    gc.collect()
    return summarize(records, duration)


async def watch_page(url: str, stop: asyncio.Event) -> list[float]:
    """What an open web page asks of the server: its state once a second, only what is newer
    than the last sample and the last step it has (the page's script). Returns the ms each
    reply took to build on the server (its ``Server-Timing``)."""
    cursors: dict[str, float] = {}
    build_ms: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            r = await client.get("/dashboard/state", params=cursors)
            r.raise_for_status()
            d = r.json()
            build_ms.append(float(r.headers["server-timing"].split("dur=")[1]))
            if d["history"]:
                cursors["since"] = d["history"][-1]["t"]
            if d["steps"]:
                cursors["steps_since"] = d["steps"][-1]["t"]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    return build_ms


def over_http(
    requests: list[BenchRequest],
    concurrency: int,
    server_args: list[str],
    log_path: Path,
    page_open: bool = False,
    desc: str = "HTTP",
) -> dict:
    with managed_server(None, ["--max-num-seqs", str(concurrency), *server_args], log_path) as url:
        cfg = ClientConfig(base_url=url, model="SmolLM2-135M-Instruct", request_timeout=1800)
        warm = BenchRequest("Warm up.", 3, 4)
        asyncio.run(run_workload([warm], [0.0], cfg, progress=False))

        async def run() -> Any:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_page(url, stop)) if page_open else None
            try:
                return await run_workload(requests, [0.0] * len(requests), cfg, concurrency, desc=desc)
            finally:
                stop.set()
                if watcher is not None:
                    ms = await watcher
                    print(
                        f"  the page polled the state {len(ms)} times; building a reply took "
                        f"{sum(ms) / len(ms):.2f} ms on average, {max(ms):.2f} ms at most"
                    )

        result = asyncio.run(run())
    records = [o.record for o in result.outcomes]
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed over HTTP, e.g. {failed[0]}")
    for r, rec in zip(requests, records, strict=True):
        if rec.output_tokens != r.output_len:
            raise RuntimeError(f"asked {r.output_len} tokens over HTTP, got {rec.output_tokens}")
    return summarize(records, result.duration)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=96, help="ShareGPT requests (default 96)")
    p.add_argument("--concurrency", type=int, default=32, help="streaming clients (default 32)")
    p.add_argument("--max-output-len", type=int, default=128, help="cap on output tokens (default 128)")
    p.add_argument("--max-prompt-len", type=int, default=1024, help="cap on prompt tokens (default 1024)")
    p.add_argument("--policy", default="bucket", help="scheduling policy on both sides (default bucket)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", type=Path, default=Path("results/server_overhead.json"))
    p.add_argument(
        "--web-page",
        action="store_true",
        help="measure the web page's cost instead: HTTP without it, with it closed, with it open",
    )
    a = p.parse_args()

    tokenizer = load_tokenizer(None)
    requests = sharegpt_requests(
        tokenizer, a.num_prompts, a.seed, max_prompt_len=a.max_prompt_len, max_output_len=a.max_output_len
    )
    print(
        f"{len(requests)} ShareGPT requests: {sum(r.prompt_len for r in requests)} prompt + "
        f"{sum(r.output_len for r in requests)} output tokens; {a.concurrency} concurrent; policy {a.policy}"
    )
    a.output_json.parent.mkdir(parents=True, exist_ok=True)
    if a.web_page:
        web_page_cost(requests, a)
        return
    # The in-process LLM runs torch on this thread, which would then slow the closed-loop
    # engine's thread (see AsyncEngine): it goes last.
    loop = closed_loop(requests, a.concurrency, {"policy": a.policy})
    local = in_process(requests, a.concurrency, {"policy": a.policy})
    http = over_http(
        requests, a.concurrency, ["--policy", a.policy], a.output_json.with_suffix(".server.log")
    )

    print(f"\n{'':24}{'generate':>12}{'clients':>12}{'HTTP':>12}")
    for key, label in [
        ("duration_s", "wall time (s)"),
        ("output_throughput", "output tokens/s"),
        ("mean_tpot_ms", "mean TPOT (ms)"),
        ("median_tpot_ms", "median TPOT (ms)"),
        ("p99_tpot_ms", "p99 TPOT (ms)"),
    ]:
        print(f"{label:24}{local[key]:12.2f}{loop[key]:12.2f}{http[key]:12.2f}")
    cost = 1 - http["output_throughput"] / local["output_throughput"]
    tpot = http["mean_tpot_ms"] / local["mean_tpot_ms"] - 1
    http_cost = 1 - http["output_throughput"] / loop["output_throughput"]
    verdict = "meets" if cost < TARGET_OVERHEAD else "misses"
    print(f"\nserver vs LLM.generate: {cost:+.1%} of output throughput "
          f"({verdict} the < {TARGET_OVERHEAD:.0%} target); mean TPOT {tpot:+.1%}")  # fmt: skip
    print(f"HTTP alone (vs the same closed-loop clients in-process): {http_cost:+.1%} of output throughput")
    write_json(
        a.output_json,
        {
            "args": {k: str(v) for k, v in vars(a).items()},
            "in_process": local,
            "closed_loop": loop,
            "http": http,
            "throughput_cost": cost,
            "http_cost": http_cost,
            "tpot_change": tpot,
        },
    )
    print(f"wrote {a.output_json}")


def web_page_cost(requests: list[BenchRequest], a: argparse.Namespace) -> None:
    """HTTP runs without the web page, with it served and closed, with it open, three each."""
    setups = {
        "no page": (["--no-web-ui"], False),
        "page closed": ([], False),
        "page open": ([], True),
    }
    # Each setup once in each position of a round (A B C, B C A, C A B): the first run of a
    # command has read fastest, and drift within it cancels.
    names = list(setups)
    order = [names[(r + i) % len(names)] for r in range(len(names)) for i in range(len(names))]
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    for i, name in enumerate(order):
        args, page_open = setups[name]
        log = a.output_json.with_suffix(f".web-{i}.server.log")
        runs[name].append(
            over_http(requests, a.concurrency, ["--policy", a.policy, *args], log, page_open, desc=name)
        )
    print(f"\n{'':24}" + "".join(f"{name:>24}" for name in setups))
    for key, label in [
        ("output_throughput", "output tokens/s"),
        ("median_tpot_ms", "median TPOT (ms)"),
        ("median_ttft_ms", "median TTFT (ms)"),
    ]:
        cells = [" ".join(f"{r[key]:.1f}" for r in runs[name]) for name in setups]
        print(f"{label:24}" + "".join(f"{c:>24}" for c in cells))
    base = sum(r["output_throughput"] for r in runs["no page"])
    for name in ("page closed", "page open"):
        ours = sum(r["output_throughput"] for r in runs[name])
        print(f"{name}: {ours / base - 1:+.1%} output throughput against no page (its runs summed)")
    write_json(
        a.output_json.with_suffix(".web-page.json"), {"args": {k: str(v) for k, v in vars(a).items()}, **runs}
    )
    print(f"wrote {a.output_json.with_suffix('.web-page.json')}")


if __name__ == "__main__":
    main()
