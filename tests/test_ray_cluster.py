"""`bucketserve serve --replicas 2 --address HOST:PORT` across two Ray nodes: a head started
with `ray start --head` and a second node joined to it, both on this machine with one CPU
each, so that each replica must land on its own node."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from server_process import MODEL, Server

from bucketserve.bench.servers import free_port

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    # Token authentication (Ray's default for new clusters) on every process, with a token of
    # this test's own: a node started without it is refused by the head.
    home = tmp_path_factory.mktemp("ray-home")
    token = home / "auth_token"
    token.write_text("bucketserve-test-" + os.urandom(16).hex())
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    address = f"127.0.0.1:{free_port()}"
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    subprocess.run(
        [RAY, "start", "--head", "--port", address.split(":")[1], "--include-dashboard", "false", *common],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    try:
        subprocess.run(
            [RAY, "start", "--address", address, *common],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield address, env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def node_of(process: psutil.Process) -> int:
    """The pid of the raylet (one per Ray node) that started ``process``."""
    for parent in process.parents():
        if parent.name() == "raylet":
            return parent.pid
    raise AssertionError(f"{process.pid} has no raylet above it")


def test_replicas_spread_over_the_nodes_of_a_joined_cluster_and_serve_through_one_endpoint(
    tiny_model_dir: Path, two_nodes: tuple[str, dict[str, str]]
) -> None:
    address, env = two_nodes
    srv = Server(tiny_model_dir, "--replicas", "2", "--address", address, env=env, ready_s=180)
    try:
        replicas = [
            p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").endswith("EngineReplica")
        ]
        assert len(replicas) == 2
        assert len({node_of(p) for p in replicas}) == 2, "both replicas on one node"
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 8, "ignore_eos": True}
        for _ in range(4):
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        assert httpx.get(srv.url + "/metrics", timeout=30).text.count("bucketserve:engine_steps_total{") == 2
    finally:
        assert srv.stop() == 0, "".join(srv.log)
    # Our replicas are gone, the cluster is not: it was there before us.
    assert not [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").endswith("EngineReplica")]
    status = subprocess.run(
        [RAY, "status", "--address", address], env=env, capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0 and status.stdout.count(" node_") == 2, status.stdout


def test_address_without_replicas_is_refused_in_one_line(tiny_model_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bucketserve", "serve", "--model", str(tiny_model_dir), "--address", "auto"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "--address needs --replicas" in out.stderr
