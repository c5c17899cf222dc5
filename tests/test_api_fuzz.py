"""No input breaks the API: requests generated from the server's own OpenAPI document never
get a 5xx or hang, and each input the fuzzer (or a reviewer) once broke now gets a 4xx."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_process import Server

from bucketserve.bench.fuzz import fuzz
from bucketserve.server.json_reply import JSONReply, json_text

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[Server]:
    srv = Server(tiny_model_dir, "--max-request-body", "64KiB")
    yield srv
    assert srv.stop() == 0, "".join(srv.log)


def post(server: Server, content: bytes | Iterator[bytes], path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(server.url + path, content=content, timeout=30)


def test_generated_requests_get_no_5xx_no_hang_and_the_server_still_serves(server: Server) -> None:
    report = fuzz(server.url, num_cases=120, seed=0, timeout=30, concurrency=4)
    assert report.num_requests >= 100
    assert report.passed, "\n".join(report.lines())


def test_a_body_over_the_limit_gets_413_whether_its_length_is_declared_or_not(server: Server) -> None:
    big = json.dumps({"prompt": "a" * MAX_BODY}).encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield from (big[i : i + 4096] for i in range(0, len(big), 4096))

    for content in (big, chunked()):
        r = post(server, content)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"
        assert "--max-request-body" in r.json()["error"]["message"]


def test_deep_nesting_gets_400(server: Server) -> None:
    r = post(server, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert r.status_code == 400 and "too deeply" in r.json()["error"]["message"]


def test_a_seed_torch_cannot_take_gets_400_not_a_failed_batch(server: Server) -> None:
    for path, body in [
        ("/v1/completions", {"prompt": "hi", "seed": 2**70}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": -(2**63) - 1}),
    ]:
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    edge = {"prompt": "hi", "seed": 2**64 - 1, "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=edge, timeout=30).status_code == 200


def test_a_lone_surrogate_escape_gets_400_and_a_surrogate_pair_is_text(server: Server) -> None:
    r = post(server, rb'{"prompt": "\ud800", "max_tokens": 2}')
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    chat = rb'{"messages": [{"role": "user", "content": "x\udfff"}], "max_tokens": 2}'
    assert post(server, chat, "/v1/chat/completions").status_code == 400
    assert post(server, rb'{"prompt": "\ud83d\ude00", "max_tokens": 2}').status_code == 200


def test_non_finite_numbers_are_written_as_null_never_as_invalid_json() -> None:
    payload = {"token_logprobs": [-math.inf, math.nan, -1.5], "top_logprobs": [{"a": -math.inf}]}
    strict = {"parse_constant": lambda c: pytest.fail(f"{c} is not JSON")}
    event = json.loads(json_text(payload), **strict)
    reply = json.loads(JSONReply(payload).body, **strict)
    assert event == reply == {"token_logprobs": [None, None, -1.5], "top_logprobs": [{"a": None}]}
