"""`bucketserve serve` as clients see it: a real server process on 127.0.0.1 running the tiny
model, driven by the official ``openai`` package and plain HTTP."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from server_process import MODEL, Server, metric, sse_events

PROMPTS = [
    "The quick brown fox",
    "What is the capital of France?",
    "Bucket-based batching groups requests",
    "Large language models generate text",
    "Hello, world! 0123456789",
    "Paris is the capital",
    "jumps over the lazy dog.",
    "one token at a time.",
]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[Server]:
    srv = Server(tiny_model_dir)
    yield srv
    assert srv.stop() == 0, "".join(srv.log)


@pytest.fixture(scope="module")
def guarded(tiny_model_dir: Path) -> Iterator[Server]:
    """A server with an API key (from the environment), one running sequence and one waiting slot."""
    srv = Server(
        tiny_model_dir,
        "--max-num-seqs", "1", "--max-waiting-requests", "1",
        env={"BUCKETSERVE_API_KEY": "s3cret"},
    )  # fmt: skip
    yield srv
    srv.stop()


# -- the OpenAI API ---------------------------------------------------------------------------
def test_completion_text_equals_the_concatenated_stream_and_usage_counts_tokens(
    server: Server, tiny_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    client = server.client()
    params = dict(
        model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    whole = client.completions.create(**params)
    chunks = list(client.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    prompt_tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir).encode(PROMPTS[0]))

    assert whole.object == "text_completion" and whole.model == MODEL
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == prompt_tokens
    assert whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == prompt_tokens + 12
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text != ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, 12)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_text_equals_the_concatenated_stream(server: Server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": PROMPTS[1]}]
    extra = {"ignore_eos": True}
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, extra_body=extra
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True, extra_body=extra
        )
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_in_both_shapes_streamed_and_not(server: Server) -> None:
    client = server.client()
    params = dict(model=MODEL, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(prompt=PROMPTS[0], logprobs=2, **params).choices[0]
    lp = whole.logprobs
    assert "".join(lp.tokens) == whole.text and len(lp.token_logprobs) == 5
    # greedy: each token is the most likely one, listed first among the top 2
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and value <= 0 and top[tok] == pytest.approx(value)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]

    streamed = client.completions.create(prompt=PROMPTS[0], logprobs=2, stream=True, **params)
    pieces = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs]
    assert [v for p in pieces for v in p.token_logprobs] == pytest.approx(lp.token_logprobs)
    assert [o for p in pieces for o in p.text_offset] == lp.text_offset

    messages = [{"role": "user", "content": PROMPTS[1]}]
    chat = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=3, **params)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    chunks = client.chat.completions.create(messages=messages, logprobs=True, stream=True, **params)
    streamed_chat = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert [t.logprob for t in streamed_chat] == pytest.approx([t.logprob for t in content])
    assert client.completions.create(prompt="Hi", **params).choices[0].logprobs is None


def test_the_model_path_is_accepted_as_model_name_and_listed_models(
    server: Server, tiny_model_dir: Path
) -> None:
    client = server.client()
    out = client.completions.create(model=str(tiny_model_dir), prompt="Hello", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens <= 2
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_sixty_four_concurrent_streams_each_get_their_own_tokens_in_order(server: Server) -> None:
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(64)]
    params = dict(model=MODEL, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    client = server.client()
    alone = [client.completions.create(prompt=p, **params).choices[0].text for p in prompts]

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> tuple[str, int]:
        stream = await aclient.completions.create(
            prompt=prompt, stream=True, stream_options={"include_usage": True}, **params
        )
        text, tokens = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, tokens

    async def all_at_once() -> list[tuple[str, int]]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        async with aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    results = asyncio.run(all_at_once())
    assert [t for t, _ in results] == alone
    assert [n for _, n in results] == [24] * 64
    assert len(set(alone)) > 1  # different prompts: a mix-up between streams would show


def test_a_client_that_disconnects_mid_stream_frees_its_kv_blocks(server: Server) -> None:
    before = server.metrics()
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 230, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        events = sse_events(r)
        first = next(e for e in events if isinstance(e, dict) and e["choices"][0]["text"])
        assert first["choices"][0]["finish_reason"] is None
        assert metric(server.metrics(), "bucketserve:kv_cache_usage_perc") > 0
    # the connection is closed here, long before 230 tokens
    deadline = time.monotonic() + 5
    while (m := server.metrics()) and metric(m, "bucketserve:kv_cache_usage_perc") > 0:
        assert time.monotonic() < deadline, "KV blocks still in use after the client left"
        time.sleep(0.02)
    assert metric(m, "bucketserve:num_requests_running") == 0

    def delta(name: str, **labels: str) -> float:
        return metric(m, name, **labels) - metric(before, name, **labels)

    # the engine stopped early: it ran far fewer than the 230 steps the request needed
    assert delta("bucketserve:engine_steps_total") < 150
    assert delta("bucketserve:request_success_total", finished_reason="abort") == 1


def test_a_client_that_gives_up_on_a_non_streaming_request_frees_its_kv_blocks(server: Server) -> None:
    before = server.metrics()
    body = {"model": MODEL, "prompt": PROMPTS[5], "max_tokens": 230, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.03))
    deadline = time.monotonic() + 5
    while (m := server.metrics()) and (
        metric(m, "bucketserve:request_success_total", finished_reason="abort")
        == metric(before, "bucketserve:request_success_total", finished_reason="abort")
        or metric(m, "bucketserve:kv_cache_usage_perc") > 0
    ):
        assert time.monotonic() < deadline, "the request was not aborted after the client left"
        time.sleep(0.02)
    steps = metric(m, "bucketserve:engine_steps_total") - metric(before, "bucketserve:engine_steps_total")
    assert steps < 150


# -- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ('{"prompt": "hi", "max_tokens": ', 400, "not valid JSON"),
        ('{"prompt": "hi", "max_tokens": "many"}', 400, "max_tokens"),
        ('{"prompt": "hi", "temperature": [1]}', 400, "temperature"),
        ('{"max_tokens": 4}', 400, "prompt: Field required"),
        ('{"prompt": "hi", "model": "gpt-4"}', 404, "'gpt-4' does not exist"),
        ('{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens must be an integer >= 1"),
        ('{"prompt": "hi", "n": 2}', 400, "only n=1 is supported"),
        ('{"prompt": "hi", "max_tokens": 0, "stream": true}', 400, "max_tokens must be an integer >= 1"),
        (
            '{"prompt": "hi", "stream": false, "stream_options": {"include_usage": true}}',
            400,
            "stream_options",
        ),
        ('{"prompt": ""}', 400, "the prompt is empty"),
        ('{"prompt": "hi", "top_p": 0}', 400, "top_p"),
        ('{"prompt": "hi", "logprobs": 21}', 400, "logprobs must be in [0, 20]"),
        ('{"prompt": "hi", "suffix": "!"}', 400, "suffix is not supported"),
        ("[" * 5000 + "]" * 5000, 400, "too deeply"),
        ('{"prompt": ' + "[" * 5000 + "]" * 5000 + "}", 400, "too deeply"),
        ('{"prompt": "' + "The quick brown fox " * 60 + '"}', 400, "maximum context length is 256 tokens"),
    ],
)
def test_bad_completion_requests_get_a_4xx_in_openai_shape(
    server: Server, body: str, status: int, message: str
) -> None:
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]


def test_a_too_long_prompt_message_states_both_lengths(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=MODEL, prompt="The quick brown fox " * 60, max_tokens=8)
    found = re.search(r"maximum context length is (\d+) tokens, but (\d+) were requested", str(e.value))
    assert found and int(found.group(1)) == 256 and int(found.group(2)) > 256


def test_bad_chat_requests_are_refused(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="messages must not be empty"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="max_tokens must be an integer >= 1"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=0
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


# -- metrics --------------------------------------------------------------------------------
def test_metrics_parse_and_count_requests(server: Server) -> None:
    before = server.metrics()
    server.client().completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, extra_body={"ignore_eos": True}
    )
    httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "n": 3})
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("bucketserve:request_success_total", finished_reason="length") == 1
    assert delta("bucketserve:time_to_first_token_seconds_count") == 1
    assert delta("bucketserve:e2e_request_latency_seconds_count") == 1
    assert delta("bucketserve:request_queue_time_seconds_count") == 1
    assert delta("bucketserve:inter_token_latency_seconds_count") == 4
    assert delta("bucketserve:generation_tokens_total") == 5
    assert delta("bucketserve:request_rejected_total", reason="invalid") == 1
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert ("bucketserve:" + gauge, ()) in after
    assert ("bucketserve:num_preemptions_total", ()) in after
    assert ("bucketserve:num_late_demotions_total", ()) in after  # exported (metric() reads 0 if not)
    assert metric(after, "bucketserve:num_late_demotions_total") == 0  # nothing here was late
    # the default policy is bucket: one queue per bucket, labelled by its length range
    assert metric(after, "bucketserve:num_buckets") >= 1
    assert ("bucketserve:bucket_queue_length", (("bucket", "[0,256)"),)) in after


def test_debug_steps_lists_the_engine_steps_with_their_batch_shapes(server: Server) -> None:
    prompt = [11, 12, 13, 14, 15, 16, 17]  # token ids: a known prompt length
    server.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, extra_body={"ignore_eos": True}
    )
    data = httpx.get(server.url + "/debug/steps").json()
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1, "stream": True}
    ) as r:
        admitted = float(r.headers["x-bucketserve-arrival"])  # on the server's clock, like "now"
        r.read()
    assert data["now"] < admitted < httpx.get(server.url + "/debug/steps").json()["now"]
    steps = data["steps"]
    assert all(s["start"] + s["duration"] <= data["now"] for s in steps)
    assert all(0 < s["schedule_time"] < s["duration"] for s in steps)  # picking the batch, then running it
    # The last three steps served this request alone: its prefill, then two decodes.
    last = steps[-3:]
    assert [s["prefill"] for s in last] == [[[7, 0]], [], []]
    assert [s["decode"] for s in last] == [[], [8], [9]]


# -- the guarded server: API key, a full queue, SIGTERM ---------------------------------------
def test_v1_needs_the_api_key_but_health_and_metrics_do_not(guarded: Server) -> None:
    r = httpx.post(guarded.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="wrong").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert httpx.get(guarded.url + "/v1/models").status_code == 401
    out = guarded.client(api_key="s3cret").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert out.choices[0].finish_reason in ("length", "stop")
    assert httpx.get(guarded.url + "/health").status_code == 200
    assert httpx.get(guarded.url + "/metrics").status_code == 200
    assert httpx.get(guarded.url + "/debug/steps").status_code == 401  # prompt lengths of others


def test_a_full_waiting_queue_answers_429_with_retry_after(guarded: Server) -> None:
    body = {"prompt": PROMPTS[3], "max_tokens": 200, "ignore_eos": True}
    headers = {"Authorization": "Bearer s3cret"}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=guarded.url, headers=headers, timeout=30) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(6)))

    before = guarded.metrics()
    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    # one runs (--max-num-seqs 1), one waits (--max-waiting-requests 1), the rest are refused
    assert codes.count(200) >= 1 and codes.count(429) >= 1, codes
    assert set(codes) == {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 200
    rejected = metric(guarded.metrics(), "bucketserve:request_rejected_total", reason="queue_full")
    assert rejected - metric(
        before, "bucketserve:request_rejected_total", reason="queue_full"
    ) == codes.count(429)


def test_sigterm_lets_an_inflight_stream_finish_and_exits_0(guarded: Server) -> None:
    body = {"prompt": PROMPTS[4], "max_tokens": 150, "ignore_eos": True, "stream": True}
    headers = {"Authorization": "Bearer s3cret"}
    with httpx.stream("POST", guarded.url + "/v1/completions", json=body, headers=headers, timeout=30) as r:
        events = sse_events(r)
        next(events)
        guarded.proc.send_signal(signal.SIGTERM)
        rest = list(events)
    assert rest[-1] == "[DONE]"
    assert rest[-2]["choices"][0]["finish_reason"] == "length"
    assert guarded.proc.wait(30) == 0
    assert "server stopped" in "".join(guarded.log)


# -- latency targets ---------------------------------------------------------------------------
def test_a_request_dropped_from_the_queue_as_late_is_answered_429_deadline_unreachable() -> None:
    """The engine ends such a request with finish_reason "late" and no token; the server
    answers it as it answers a request refused late on arrival (the streaming path sends the
    same body as an error event), and a finished one is no error."""
    from bucketserve.outputs import CompletionOutput, RequestOutput
    from bucketserve.server.errors import output_error

    def ended(reason: str) -> RequestOutput:
        return RequestOutput("r", "Hi", [1], [CompletionOutput(0, "", [], finish_reason=reason)], True)

    err = output_error(ended("late"))
    assert err is not None and err.status == 429
    assert err.response_body()["error"]["code"] == "deadline_unreachable"
    assert output_error(ended("length")) is None


def test_reject_late_answers_429_to_a_request_that_cannot_meet_its_ttft_target(tiny_model_dir: Path) -> None:
    """Once the online cost model has seen enough steps, a request whose TTFT target is
    shorter than its own prefill gets 429 at once (nothing queued), and is counted; one with
    a target it can meet is served."""
    srv = Server(tiny_model_dir, "--reject-late")
    try:
        client = srv.client()
        for i in range(20):  # prefill and decode steps for the cost model to fit
            client.completions.create(model=MODEL, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=3)
        body = {"prompt": PROMPTS[0], "max_tokens": 2}
        r = httpx.post(srv.url + "/v1/completions", json={**body, "ttft_slo_ms": 0.001})
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "deadline_unreachable"
        assert "TTFT target" in r.json()["error"]["message"]
        ok = httpx.post(srv.url + "/v1/completions", json={**body, "ttft_slo_ms": 60_000})
        assert ok.status_code == 200
        after = srv.metrics()
        assert metric(after, "bucketserve:num_requests_late_total") == 1
        assert metric(after, "bucketserve:request_rejected_total", reason="late") == 1
        assert metric(after, "bucketserve:num_requests_waiting") == 0
    finally:
        assert srv.stop() == 0, "".join(srv.log)
