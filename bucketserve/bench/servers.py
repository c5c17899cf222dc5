"""Start and stop ``bucketserve serve`` processes for ``bench compare``: one per policy, on a free
loopback port, ready once /health answers 200, always stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from bucketserve.bench.client import BenchError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerStartError(BenchError):
    """A server we started exited or never became healthy."""


def server_command(port: int, policy: str | None, extra_args: Sequence[str]) -> list[str]:
    cmd = [sys.executable, "-m", "bucketserve", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if policy is not None:
        cmd += ["--policy", policy]
    return cmd + list(extra_args)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"the server exited with status {proc.returncode}; see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise ServerStartError(f"the server did not answer /health within {timeout:g} s; see {log_path}")


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM (the server lets in-flight requests finish), then SIGKILL after ``grace`` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def managed_server(
    policy: str | None,
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
    startup_timeout: float = 300.0,
) -> Iterator[str]:
    """Run ``bucketserve serve --policy POLICY EXTRA_ARGS`` and yield its base URL; the server is
    stopped when the block exits, however it exits (errors, Ctrl-C)."""
    port = free_port()
    log_path = log_path or Path(os.devnull)
    with open(log_path, "w") as log:
        # A session of its own: Ctrl-C in the terminal reaches only us, and we stop it in order.
        proc = subprocess.Popen(
            server_command(port, policy, extra_args),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc, startup_timeout, log_path)
            yield url
        finally:
            stop(proc)
