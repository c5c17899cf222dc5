"""`bucketserve serve --replicas N`: engine replicas on Ray Serve behind one endpoint (a real
Ray cluster of one node on this machine, the tiny model)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import build_tiny_model
from prometheus_client.parser import text_string_to_metric_families
from server_process import MODEL, Server

from bucketserve.cluster.gateway import request_length
from bucketserve.cluster.metrics_merge import merge_expositions
from bucketserve.cluster.router import InFlight

KEY = {"Authorization": "Bearer s3cret"}


def test_merged_metrics_label_every_sample_with_its_replica_and_name_each_family_once() -> None:
    a = '# HELP x_total Things.\n# TYPE x_total counter\nx_total{model_name="m"} 3.0\n'
    b = '# HELP x_total Things.\n# TYPE x_total counter\nx_total{model_name="m"} 5.0\n'
    text = merge_expositions({"r2": b, "r1": a})
    assert text.count("# HELP x_total") == 1
    (family,) = text_string_to_metric_families(text)
    assert [(s.labels["replica"], s.value) for s in family.samples] == [("r1", 3.0), ("r2", 5.0)]


def test_the_in_flight_count_follows_routed_and_completed_requests_per_replica() -> None:
    counts = InFlight()
    counts.routed("r1", "A")
    counts.routed("r2", "A")
    counts.routed("r3", "B")
    assert (counts.load("A"), counts.load("B")) == (2, 1)
    counts.completed("r1", "A")
    counts.forget("B")  # B died: nothing is in flight there
    assert (counts.load("A"), counts.load("B")) == (1, 0)


def test_a_reply_that_completes_before_ray_reports_it_routed_leaves_no_load_behind() -> None:
    """A fast 429 or 400 can complete before Ray calls on_request_routed; counting the
    routing then would leave the replica looking busy for ever."""
    counts = InFlight()
    counts.completed("fast", "A")
    counts.routed("fast", "A")
    assert counts.load("A") == 0
    counts.routed("next", "A")  # later requests are counted as usual
    assert counts.load("A") == 1


def test_a_rejected_attempt_does_not_uncount_its_retry_on_another_replica() -> None:
    counts = InFlight(memory=2)
    counts.completed("r", "A")  # A rejected it (Ray completes the cancelled attempt)
    counts.routed("r", "B")  # B accepted it
    assert counts.load("B") == 1
    for i in range(5):  # the memory of early completions stays bounded
        counts.completed(f"x{i}", "A")
    assert len(counts.done_early) == 2


def test_with_port_0_the_proxy_tries_another_free_port_when_its_first_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray's own processes can take the free port picked for the proxy before it binds;
    with --port 0 another is picked, with a fixed port the error stands."""
    from ray import serve
    from ray.exceptions import RayError

    from bucketserve.cluster import replicas

    ports: list[int] = []
    shutdowns: list[bool] = []

    def start(http_options: dict, **kwargs: object) -> None:
        ports.append(http_options["port"])
        if len(ports) == 1:
            raise RayError("Failed to bind to address")

    monkeypatch.setattr(serve, "start", start)
    monkeypatch.setattr(serve, "shutdown", lambda: shutdowns.append(True))
    assert replicas._start_proxy("127.0.0.1", 0, {}) == ports[-1]
    assert len(ports) == 2 and all(p > 0 for p in ports) and shutdowns == [True]
    ports.clear()
    with pytest.raises(RayError):
        replicas._start_proxy("127.0.0.1", 8123, {})
    assert ports == [8123]


class _Words:
    """A tokenizer stand-in: one token per word."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [0] * len(text.split())


def test_a_requests_length_is_its_prompt_plus_max_tokens_and_none_for_what_is_not_generation() -> None:
    words = _Words()
    assert request_length("/v1/completions", b'{"prompt": "a b c", "max_tokens": 7}', words) == 10
    assert request_length("/v1/completions", b'{"prompt": [1, 2]}', words) == 2 + 16  # OpenAI's default
    chat = b'{"messages": [{"role": "user", "content": "a b"}], "max_completion_tokens": 3}'
    assert request_length("/v1/chat/completions", chat, words) == 5
    assert request_length("/v1/completions", b"not json", words) is None
    assert request_length("/v1/models", b"", words) is None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Long context for long replies; one running and one waiting request per replica.
    model = build_tiny_model(tmp_path_factory.mktemp("tiny-llama-4k"), max_position_embeddings=4096)
    srv = Server(
        model, "--replicas", "2", "--kv-cache-memory", "4MiB", "--max-num-seqs", "1",
        "--max-waiting-requests", "1", "--replica-router", "length",
        env={"BUCKETSERVE_API_KEY": "s3cret"}, ready_s=180,
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0, "".join(srv.log)


def completion(srv: Server, **body: object) -> httpx.Response:
    return httpx.post(srv.url + "/v1/completions", json={"model": MODEL, **body}, headers=KEY, timeout=60)


def replica_counts(srv: Server) -> dict[str, float]:
    """Finished requests per replica, from the one /metrics endpoint."""
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "bucketserve:request_success":
            for s in family.samples:
                if s.name.endswith("_total"):
                    counts[s.labels["replica"]] = counts.get(s.labels["replica"], 0) + s.value
    return counts


def test_the_one_endpoint_streams_and_answers_as_the_single_server_does(cluster: Server) -> None:
    plain = completion(cluster, prompt="The quick brown fox", max_tokens=16, temperature=0, ignore_eos=True)
    assert plain.status_code == 200, plain.text
    text = plain.json()["choices"][0]["text"]
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, headers=KEY, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert streamed == text  # same weights on every replica: the same greedy reply


def test_every_route_keeps_its_api_key_and_error_shape(cluster: Server) -> None:
    r = httpx.post(cluster.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=30)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    bad = completion(cluster, prompt="hi", max_tokens=0)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    assert httpx.get(cluster.url + "/health", timeout=30).json() == {"status": "ok"}


def per_replica(srv: Server, family_name: str) -> dict[str, float]:
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            for s in family.samples:
                if not s.name.endswith("_created"):
                    out[s.labels["replica"]] = out.get(s.labels["replica"], 0) + s.value
    return out


def test_short_chats_and_long_documents_go_to_different_replicas(cluster: Server) -> None:
    """One request at a time, so load never overrides the bands: the long prompts' tokens all
    land on one replica, the short ones' on the other."""
    before = per_replica(cluster, "bucketserve:prompt_tokens")
    for _ in range(4):
        assert completion(cluster, prompt="hi", max_tokens=2).status_code == 200
        assert completion(cluster, prompt="hi " * 1000, max_tokens=2).status_code == 200
    after = per_replica(cluster, "bucketserve:prompt_tokens")
    served = sorted(after[r] - before.get(r, 0) for r in after)
    assert served[0] <= 4 * 2 and served[1] >= 4 * 1000, served  # "hi" is a token or two


def test_requests_spread_over_the_replicas_and_metrics_say_which_served_them(cluster: Server) -> None:
    before = replica_counts(cluster)

    async def pairs() -> None:
        async with httpx.AsyncClient(base_url=cluster.url, headers=KEY, timeout=60) as c:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 60, "ignore_eos": True}
            for _ in range(3):  # two at a time: one replica holds one running request
                rs = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(2)))
                assert all(r.status_code == 200 for r in rs), [r.text for r in rs]

    asyncio.run(pairs())
    after = replica_counts(cluster)
    assert len(after) == 2
    served = {rep: after[rep] - before.get(rep, 0) for rep in after}
    assert sum(served.values()) == 6 and all(n >= 1 for n in served.values()), served


def test_a_full_cluster_answers_429_with_retry_after(cluster: Server) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.url, headers=KEY, timeout=120) as c:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 1500, "ignore_eos": True}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(12)))

    rs = asyncio.run(burst())
    codes = sorted(r.status_code for r in rs)
    # Two replicas hold one running and one waiting request each: four run, eight are refused.
    assert codes == [200] * 4 + [429] * 8, codes
    refused = [r for r in rs if r.status_code == 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert all(r.json()["error"]["code"] == "queue_full" for r in refused)  # the replica's own answer


def test_a_client_that_leaves_mid_stream_frees_its_kv_on_the_replica(cluster: Server) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, headers=KEY, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert max(kv_usage_by_replica(cluster).values()) > 0  # the reply is under way
    deadline = time.monotonic() + 30
    while max(kv_usage_by_replica(cluster).values()) > 0:
        assert time.monotonic() < deadline, "the replica kept the departed client's KV"
        time.sleep(0.2)


def test_threads_per_replica_and_num_threads_that_disagree_are_refused_in_one_line(
    tiny_model_dir: Path,
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bucketserve", "serve", "--model", str(tiny_model_dir),
         "--replicas", "2", "--num-threads", "2", "--threads-per-replica", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "--threads-per-replica 1 and --num-threads 2 disagree" in out.stderr
    assert "Traceback" not in out.stderr


def replica_processes() -> list[psutil.Process]:
    """The engine replicas' processes (Ray names them after the deployment)."""
    return [
        p
        for p in psutil.process_iter(["name"])
        if (p.info["name"] or "").endswith("ServeReplica:bucketserve:EngineReplica")
    ]


def test_a_replica_killed_mid_stream_ends_its_streams_while_the_other_serves_and_ray_restarts_it(
    cluster: Server,
) -> None:
    """The killed replica's stream ends at once with an error event and ``[DONE]`` (not a
    hang), the survivor's finishes with every token and frees its KV, and Ray starts a
    replacement."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    outcomes: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", cluster.url + "/v1/completions", json=body, headers=KEY, timeout=60) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        if "error" in last:
            assert last["error"]["type"] == "service_unavailable" and "retry" in last["error"]["message"]
            outcomes.append("error")
        else:
            assert last["choices"][0]["finish_reason"] == "length"
            outcomes.append("done")

    # Ray names a replica's process once it runs; wait for both (a replacement of one that an
    # earlier test's load brought down may still be starting: the suite once saw one listed).
    deadline = time.monotonic() + 90
    while len(before := replica_processes()) < 2 or len(kv_usage_by_replica(cluster)) < 2:
        assert time.monotonic() < deadline, f"two replicas never ran: {before}"
        time.sleep(1)
    assert len(before) == 2
    streams: list[threading.Thread] = []
    # Streams until both replicas hold one (the router may queue a second behind the first;
    # each replica takes one running and one waiting request).
    while len(streams) < 4 and sum(u > 0 for u in kv_usage_by_replica(cluster).values()) < 2:
        streams.append(threading.Thread(target=stream))
        streams[-1].start()
        time.sleep(1.0)
    assert sum(u > 0 for u in kv_usage_by_replica(cluster).values()) == 2
    victim = before[0]
    victim.kill()
    for t in streams:
        t.join(60)
    # The victim's streams end with the error event, the survivor's with every token.
    assert set(outcomes) == {"done", "error"} and len(outcomes) == len(streams), outcomes
    # Ray replaces the killed replica; the replacement is ready once /metrics reaches it.
    deadline = time.monotonic() + 90
    while len(usage := kv_usage_by_replica(cluster)) < 2 or victim.pid in {
        p.pid for p in replica_processes()
    }:
        assert time.monotonic() < deadline, f"Ray did not replace the killed replica: {usage}"
        time.sleep(1)
    assert completion(cluster, prompt="hi", max_tokens=4).status_code == 200
    assert list(kv_usage_by_replica(cluster).values()) == [
        0.0,
        0.0,
    ]  # the survivor and the new one hold no KV


def kv_usage_by_replica(srv: Server) -> dict[str, float]:
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    return {
        s.labels["replica"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "bucketserve:kv_cache_usage_perc"
        for s in f.samples
    }
