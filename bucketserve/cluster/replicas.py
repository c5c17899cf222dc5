"""Several engines as one Ray Serve application behind one OpenAI-compatible endpoint.

    bucketserve serve --replicas N                                   # aggregated
    bucketserve serve --prefill-replicas P --decode-replicas D       # disaggregated (P/D)

Deployments (each replica a Ray actor, its own process):

- ``Gateway``: the ingress (``gateway``): reads a request, measures its length, forwards it.
- ``EngineReplica``: one engine and the single server's app over it, answering what the
  gateway forwards (``asgi.call_app``). Aggregated, it runs prompts and decodes; as a decode
  replica it reserves a request's KV blocks, has a ``PrefillReplica`` run the prompt, takes
  the KV and first token back and decodes the rest into the same HTTP response.
- ``PrefillReplica`` (P/D only): one engine that runs prompts and hands each one's KV over
  (``engine.handover``); Ray moves the tensors through its object store (shared memory on
  one host).

Routing: the gateway reaches the engine replicas through Ray's default router (the less
loaded of two) or, with ``--replica-router length``, ``router.LengthBandRouter``; a decode
replica is chosen by free KV memory (``router.FreeKVRouter``), a prefill replica by Ray's
default.

Capacity and backpressure: requests wait in the replicas' own queues (buckets, priorities),
not in Ray's. A replica holds at most ``max_num_seqs`` running plus ``max_waiting_requests``
waiting requests and refuses more itself (429 with ``Retry-After``, as the single server
does). Ray may send a replica up to twice its waiting room beyond that
(``max_ongoing_requests``), so that it keeps forwarding to a full replica, which refuses at
once. Requests that find every replica at that bound wait in the gateway's handle up to
``max_queued_requests`` (twice the cluster's room, at least ``HANDLE_QUEUE_MIN``), a
backstop against a flood, beyond which the gateway answers 429.

``/metrics`` on any engine replica answers for all of them (``DeploymentHandle.broadcast``,
merged with a ``replica`` label), the prefill replicas included.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from bucketserve.cluster.asgi import ForwardedRequest, ResponseStart, call_app
from bucketserve.config import EngineConfig, SchedulerConfig, ServerConfig
from bucketserve.engine.async_engine import RemotePrefill
from bucketserve.engine.handover import KVHandover
from bucketserve.errors import ConfigError
from bucketserve.sampling_params import SamplingParams

log = logging.getLogger("bucketserve.server")

APP_NAME = "bucketserve"
GATEWAY, ENGINE, PREFILL = "Gateway", "EngineReplica", "PrefillReplica"
HANDLE_QUEUE_MIN = 64  # requests that may wait in the gateway's handle for a replica at least
GATEWAY_MAX_ONGOING = 10_000  # the gateway only forwards: the replicas bound the load
ROUTING_STATS_PERIOD_S = 0.5  # how often replicas report their free KV to the routers
METRICS_TIMEOUT_S = 10.0  # a /metrics scrape waits this long for the replicas' expositions
POLICIES_WITHOUT_HANDOVER = ("static", "uellm")  # they run padded batches to the end


def _replica_id() -> str:
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


async def every_replicas_metrics() -> str:
    """Every engine (and prefill) replica's /metrics, merged with a ``replica`` label."""
    from ray import serve

    from bucketserve.cluster.metrics_merge import merge_expositions

    texts: dict[str, str] = {}
    for deployment in (ENGINE, PREFILL):
        try:
            handle = serve.get_deployment_handle(deployment, APP_NAME)
        except Exception:  # no prefill replicas: an aggregated application
            continue
        # A replica that is gone (killed, not yet replaced) is left out, not a failed scrape.
        results = await handle.broadcast("metrics_text").results_async(
            timeout_s=METRICS_TIMEOUT_S, return_exceptions=True
        )
        texts.update(r for r in results if isinstance(r, tuple))
    return merge_expositions(texts)


class HandlePrefill(RemotePrefill):
    """A decode replica's prompts run on the prefill replicas, through a Ray handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        annotations: dict[str, Any],
    ) -> KVHandover:
        from ray.exceptions import RayError, RayTaskError

        from bucketserve.engine.async_engine import EngineStoppedError

        call = self.handle.prefill.remote(request_id, prompt_token_ids, params, annotations)
        try:
            return await call
        except asyncio.CancelledError:  # the client left: stop the prompt there too
            call.cancel()
            raise
        except RayTaskError as e:  # what the prefill engine refused (a full queue: a 429 here too)
            raise e.cause from None
        except RayError as e:  # the prefill replica died, or its answer could not be read: a 503
            raise EngineStoppedError(f"the prefill replica failed: {type(e).__name__}; retry") from None


class EngineReplica:
    """One engine and the single server's app over it; a decode replica when given the
    prefill replicas' handle."""

    def __init__(
        self,
        engine_config: EngineConfig,
        scheduler_config: SchedulerConfig,
        server: ServerConfig,
        prefill: Any | None = None,
    ) -> None:
        from bucketserve.server.launch import build_server_app

        self.grace_s = server.shutdown_grace_s
        self.app, self.engine = build_server_app(
            engine_config,
            scheduler_config,
            server,
            remote_prefill=None if prefill is None else HandlePrefill(prefill),
            web_ui=False,  # the page shows one engine's state; across replicas it is future work
            metrics_text=every_replicas_metrics,
        )

    async def forward(
        self, request: ForwardedRequest, length: int | None = None
    ) -> AsyncIterator[ResponseStart | bytes]:
        """Answer a forwarded request (``length`` is the router's) with the app's reply."""
        async for piece in call_app(self.app, request):
            yield piece

    def metrics_text(self) -> tuple[str, str]:
        from prometheus_client import generate_latest

        return _replica_id(), generate_latest(self.app.state.metrics.registry).decode()

    def record_routing_stats(self) -> dict[str, Any]:
        from bucketserve.cluster.router import KV_FREE_STAT

        snap = self.engine.stats()
        return {KV_FREE_STAT: snap.kv_blocks_total - snap.kv_blocks_used}

    async def __del__(self) -> None:
        await self.engine.shutdown(self.grace_s)


class PrefillReplica:
    """One engine that runs prompts and hands their KV over to the decode replicas."""

    def __init__(
        self, engine_config: EngineConfig, scheduler_config: SchedulerConfig, server: ServerConfig
    ) -> None:
        from bucketserve.engine.async_engine import AsyncEngine
        from bucketserve.engine.llm_engine import LLMEngine
        from bucketserve.server.metrics import ServerMetrics

        self.grace_s = server.shutdown_grace_s
        self.engine = AsyncEngine(
            lambda: LLMEngine(engine_config, scheduler_config),
            max_waiting_requests=server.max_waiting_requests,
        )
        self.metrics = ServerMetrics(self.engine.stats, server.served_model_name)  # its engine's gauges

    async def prefill(self, *args: Any) -> KVHandover:
        """``AsyncEngine.prefill`` here: run the prompt, return its KV and first token. A
        cancelled call aborts it."""
        return await self.engine.prefill(*args)

    def metrics_text(self) -> tuple[str, str]:
        from prometheus_client import generate_latest

        return _replica_id(), generate_latest(self.metrics.registry).decode()

    async def __del__(self) -> None:
        await self.engine.shutdown(self.grace_s)


class Gateway:
    """The endpoint's ingress: forwards every request to an engine replica (``gateway``)."""

    def __init__(self, engines: Any, engine_config: EngineConfig, server: ServerConfig) -> None:
        from bucketserve.engine.loader import load_tokenizer, resolve_model_path

        self.engines = engines.options(stream=True)
        # Only the length router reads a request's length: the gateway counts tokens for it alone.
        by_length = server.replica_router == "length" and server.prefill_replicas is None
        path = resolve_model_path(engine_config.model, engine_config.cache_dir)
        self.tokenizer = load_tokenizer(path) if by_length else None
        self.max_body_bytes = server.max_request_body

    async def __call__(self, request: Any) -> Any:
        from bucketserve.cluster.gateway import forward

        return await forward(request, self.engines, self.tokenizer, self.max_body_bytes)


def application(
    engine_config: EngineConfig, scheduler_config: SchedulerConfig, server: ServerConfig, threads: int
) -> Any:
    """The Ray Serve application: the gateway in front of ``server.replicas`` engine replicas,
    or of ``server.decode_replicas`` decode replicas backed by ``server.prefill_replicas``
    prefill replicas; each engine replica with ``threads`` torch threads and Ray CPUs."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from bucketserve.cluster.router import FreeKVRouter, LengthBandRouter

    engine_config = replace(engine_config, num_threads=threads)
    room = scheduler_config.max_num_seqs + server.max_waiting_requests
    per_replica = {
        "ray_actor_options": {"num_cpus": threads},
        "max_ongoing_requests": scheduler_config.max_num_seqs + 2 * server.max_waiting_requests,
        "graceful_shutdown_timeout_s": server.shutdown_grace_s + 1,
    }
    prefill = None
    if server.prefill_replicas is None:
        assert server.replicas is not None
        num_engines = server.replicas
        if server.replica_router == "length":
            router = RequestRouterConfig(
                request_router_class=LengthBandRouter,
                request_router_kwargs={"seats": scheduler_config.max_num_seqs},
            )
        else:
            router = RequestRouterConfig()
    else:
        assert server.decode_replicas is not None
        num_engines = server.decode_replicas
        router = RequestRouterConfig(
            request_router_class=FreeKVRouter, request_routing_stats_period_s=ROUTING_STATS_PERIOD_S
        )
        prefill = (
            serve.deployment(PrefillReplica)
            .options(name=PREFILL, num_replicas=server.prefill_replicas, **per_replica)
            .bind(engine_config, scheduler_config, server)
        )
    engines = (
        serve.deployment(EngineReplica)
        .options(
            name=ENGINE,
            num_replicas=num_engines,
            max_queued_requests=max(HANDLE_QUEUE_MIN, 2 * num_engines * room),
            request_router_config=router,
            **per_replica,
        )
        .bind(engine_config, scheduler_config, server, prefill)
    )
    return (
        serve.deployment(Gateway)
        .options(
            name=GATEWAY,
            num_replicas=1,
            ray_actor_options={"num_cpus": 0},
            max_ongoing_requests=GATEWAY_MAX_ONGOING,
            graceful_shutdown_timeout_s=server.shutdown_grace_s + 2,
        )
        .bind(engines, engine_config, server)
    )


def replica_threads(engine_config: EngineConfig, server: ServerConfig) -> int:
    """Each replica's torch threads (and Ray CPUs): --threads-per-replica, else --num-threads
    (an engine's threads), else 1; the two may not disagree."""
    per_replica, per_engine = server.threads_per_replica, engine_config.num_threads
    if per_replica is not None and per_engine is not None and per_replica != per_engine:
        raise ConfigError(
            f"--threads-per-replica {per_replica} and --num-threads {per_engine} disagree: "
            "each replica is one engine; give one of them"
        )
    return per_replica or per_engine or 1


def num_engines(server: ServerConfig) -> int:
    """Engine replicas of every kind."""
    if server.prefill_replicas is not None and server.decode_replicas is not None:
        return server.prefill_replicas + server.decode_replicas
    assert server.replicas is not None
    return server.replicas


PROXY_BIND_TRIES = 3  # --port 0: free ports tried for the proxy


def _start_proxy(host: str, port: int, logs: dict[str, Any]) -> int:
    """Start Ray Serve's HTTP proxy on ``port`` and return the port; for 0, on a free port
    picked now, after Ray's own processes took theirs (one picked before ``ray.init`` was
    sometimes taken by them), and on another if the proxy still cannot bind it."""
    from ray import serve
    from ray.exceptions import RayError

    from bucketserve.server.launch import bind

    def start(chosen: int) -> int:
        if chosen == 0:
            with bind(host, 0) as sock:
                chosen = sock.getsockname()[1]
        http = {"host": host, "port": chosen}
        serve.start(http_options=http, proxy_location="HeadOnly", logging_config=logs)
        return chosen

    for _ in range(PROXY_BIND_TRIES - 1 if port == 0 else 0):
        try:
            return start(0)
        except RayError:
            log.warning("the HTTP proxy could not bind a free port; trying another")
            serve.shutdown()
    return start(port)  # the last try (a fixed port's only one) raises what it meets


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
            "replicas need Ray Serve: run scripts/setup.sh (pip install 'ray[serve]')"
        ) from None
    if server.prefill_replicas is not None and scheduler_config.policy in POLICIES_WITHOUT_HANDOVER:
        raise ConfigError(
            f"--policy {scheduler_config.policy} runs padded batches to the end, which a handed-over "
            f"request cannot join; disaggregate with --policy bucket, continuous or distserve"
        )
    threads = replica_threads(engine_config, server)
    engines = num_engines(server)
    cpus = engines * threads
    have = os.cpu_count() or 1
    if cpus > have and server.ray_address is None:
        log.warning(
            "%d replicas x %d threads ask for %d CPUs on a machine with %d", engines, threads, cpus, have
        )
    if server.port:
        with bind(server.host, server.port):  # a one-line error if taken, before Ray starts
            pass
    if server.ray_address is None:
        ray.init(num_cpus=max(cpus, have), include_dashboard=False, logging_level=log_level.upper())
    else:  # its nodes bring their own CPUs; the replicas go where Ray finds them
        ray.init(address=server.ray_address, logging_level=log_level.upper())
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # One endpoint: one proxy, on the head node (Ray's default puts one on every node).
        # A line per request from every deployment only when debugging, as the single server does.
        logs = {"log_level": log_level.upper(), "enable_access_log": log_level == "debug"}
        port = _start_proxy(server.host, server.port, logs)
        serve.run(
            application(engine_config, scheduler_config, server, threads),
            name=APP_NAME,
            route_prefix="/",
            logging_config=logs,
        )
        url = server_url(server.host, port)
        topology = (
            f"{server.replicas} replicas, {server.replica_router} routing"
            if server.prefill_replicas is None
            else f"{server.prefill_replicas} prefill + {server.decode_replicas} decode replicas"
        )
        log.info("serving on %s (OpenAI API under %s/v1; %s on Ray Serve)", url, url, topology)
        stop.wait()
        log.info("stopping: letting requests in flight finish for up to %.0f s", server.shutdown_grace_s)
        serve.shutdown()
    finally:
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("server stopped")
    return 0
