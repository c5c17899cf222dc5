"""`bucketserve serve --replicas N`: N engines as one Ray Serve application behind one endpoint.

Each replica is a Ray actor (its own process) that builds the very app the single-process
server runs (``server.app.build_app`` over its own ``AsyncEngine``), so routes, SSE streaming,
errors and the API key are the same code. Ray's HTTP proxy takes the connections and routes
each request to a replica with room (power of two choices on their ongoing requests).

Capacity and backpressure: requests wait in the replicas' own queues (buckets, priorities),
not in Ray's. A replica holds at most ``max_num_seqs`` running plus ``max_waiting_requests``
waiting requests and refuses more itself (429 with ``Retry-After``, in OpenAI's shape, as
the single server does). Ray may send a replica up to twice its waiting room beyond that
(``max_ongoing_requests``), so that it keeps forwarding to a full replica, which refuses at
once; and its router sends each request to the less loaded of two replicas (power of two
choices; with two replicas, both), so a request is refused when the replicas it could go to
are full. Requests count as queued at the proxy until a replica takes them, even with room
everywhere, so its bound (``max_queued_requests``, then Ray's own 429 in plain text) is
twice the whole cluster's room and at least ``PROXY_QUEUE_MIN``: a backstop against a flood
of arrivals, not the admission rule.

``/metrics`` on any replica answers for all of them: it asks every replica for its own
exposition (``DeploymentHandle.broadcast``) and merges them with a ``replica`` label.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bucketserve.config import EngineConfig, SchedulerConfig, ServerConfig
from bucketserve.errors import ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("bucketserve.server")

APP_NAME = "bucketserve"
DEPLOYMENT = "EngineReplica"
PROXY_QUEUE_MIN = 64  # requests that may wait at the proxy for a replica at least
RETRY_AFTER_S = 1.0  # what the proxy's backstop tells a refused client; it knows no finish rates

# This replica's app. Each replica is its own process, so a module global is its own.
_app: FastAPI | None = None


def _replica_id() -> str:
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


def _own_metrics() -> tuple[str, str]:
    """(this replica's id, its own /metrics exposition). At module level, so that the
    deployment class (pickled by value, with a copy of the globals it names) reaches this
    process's ``_app``."""
    from prometheus_client import generate_latest

    assert _app is not None, "the replica's app is not built yet"
    return _replica_id(), generate_latest(_app.state.metrics.registry).decode()


async def _every_replicas_metrics() -> str:
    """Every replica's /metrics, merged with a ``replica`` label."""
    from ray import serve

    from bucketserve.cluster.metrics_merge import merge_expositions

    handle = serve.get_deployment_handle(DEPLOYMENT, APP_NAME)
    results = await handle.broadcast("metrics_text").results_async()
    return merge_expositions(dict(results))


def build_replica_app(
    engine_config: EngineConfig, scheduler_config: SchedulerConfig, server: ServerConfig
) -> FastAPI:
    """One replica's app: the single server's, over an engine built in this process."""
    from bucketserve.server.launch import build_server_app

    global _app
    _app, _ = build_server_app(
        engine_config,
        scheduler_config,
        server,
        web_ui=False,  # the page shows one engine's state; across replicas it is future work
        metrics_text=_every_replicas_metrics,
    )
    return _app


def application(
    engine_config: EngineConfig, scheduler_config: SchedulerConfig, server: ServerConfig, threads: int
) -> Any:
    """The Ray Serve application: ``server.replicas`` replicas of the engine's app, each with
    ``threads`` torch threads and Ray CPUs."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    engine_config = replace(engine_config, num_threads=threads)

    def build() -> FastAPI:
        return build_replica_app(engine_config, scheduler_config, server)

    @serve.deployment(
        name=DEPLOYMENT,
        num_replicas=server.replicas,
        ray_actor_options={"num_cpus": threads},
        max_ongoing_requests=scheduler_config.max_num_seqs + 2 * server.max_waiting_requests,
        max_queued_requests=max(
            PROXY_QUEUE_MIN,
            2 * server.replicas * (scheduler_config.max_num_seqs + server.max_waiting_requests),
        ),
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
        graceful_shutdown_timeout_s=server.shutdown_grace_s + 1,
    )
    @serve.ingress(build)
    class EngineReplica:
        def metrics_text(self) -> tuple[str, str]:
            return _own_metrics()

    return EngineReplica.bind()


def replica_threads(engine_config: EngineConfig, server: ServerConfig) -> int:
    """Each replica's torch threads (and Ray CPUs): --threads-per-replica, else --num-threads
    (an engine's threads), else 1; the two may not disagree."""
    per_replica, per_engine = server.threads_per_replica, engine_config.num_threads
    if per_replica is not None and per_engine is not None and per_replica != per_engine:
        raise ConfigError(
            f"--threads-per-replica {per_replica} and --num-threads {per_engine} disagree: "
            "with --replicas each replica is one engine; give one of them"
        )
    return per_replica or per_engine or 1


def serve_replicas(
    engine_config: EngineConfig,
    scheduler_config: SchedulerConfig,
    server: ServerConfig,
    log_level: str = "info",
) -> int:
    """Start Ray on this machine (or join the cluster at ``--address``), run the application,
    serve until SIGTERM/SIGINT, then remove it (a joined cluster keeps running); 0 after a
    clean stop."""
    from bucketserve.server.launch import bind, server_url

    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigError(
            "--replicas needs Ray Serve: run scripts/setup.sh (pip install 'ray[serve]')"
        ) from None
    assert server.replicas is not None
    threads = replica_threads(engine_config, server)
    cpus = server.replicas * threads
    have = os.cpu_count() or 1
    if cpus > have and server.ray_address is None:
        log.warning("%d replicas x %d threads ask for %d CPUs on a machine with %d", server.replicas,
                    threads, cpus, have)  # fmt: skip
    with bind(server.host, server.port) as sock:  # a free port for 0, a one-line error if taken
        port = sock.getsockname()[1]
    if server.ray_address is None:
        ray.init(num_cpus=max(cpus, have), include_dashboard=False, logging_level=log_level.upper())
    else:  # its nodes bring their own CPUs; the replicas go where Ray finds them
        ray.init(address=server.ray_address, logging_level=log_level.upper())
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # One endpoint: one proxy, on the head node (Ray's default puts one on every node).
        serve.start(http_options={"host": server.host, "port": port}, proxy_location="HeadOnly")
        serve.run(
            application(engine_config, scheduler_config, server, threads), name=APP_NAME, route_prefix="/"
        )
        url = server_url(server.host, port)
        log.info(
            "serving on %s (OpenAI API under %s/v1; %d replicas on Ray Serve)", url, url, server.replicas
        )
        stop.wait()
        log.info("stopping: letting requests in flight finish for up to %.0f s", server.shutdown_grace_s)
        serve.shutdown()
    finally:
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("server stopped")
    return 0
