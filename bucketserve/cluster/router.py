"""Request routers for the engine replicas (Ray Serve's ``RequestRouter`` interface).

``LengthBandRouter`` applies ``core.replica_bands`` (BucketServe's buckets across replicas:
a band of request lengths per replica, rebalanced with the recent requests, the least loaded
replica when a band's batch is full). A request whose band's replica is full at Ray's bound
goes to the next rank (Ray probes the ranks in order).

``FreeKVRouter`` sends a disaggregated request to the decode replica with the most free KV
blocks, as DistServe places a prefilled request on the least loaded decode instance.

Ray's default, power of two choices on ongoing requests, is what both are measured against
(``benchmarks/replicas.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from bucketserve.core.replica_bands import LengthBands

LENGTH_KWARG = "length"  # the keyword the gateway passes a request's length in
KV_FREE_STAT = "kv_free_blocks"  # what each replica's ``record_routing_stats`` reports


class InFlight:
    """Requests in flight per replica, from Ray's two router callbacks.

    Ray calls ``on_request_routed`` once the replica has accepted a request, but registers
    the completion callback before it asks: a reply that comes back at once (a 429, a 400)
    can complete before it is routed. Such a completion is remembered, and the routing that
    follows is not counted, or the replica would look busy for ever after. Ray also
    completes the attempts a replica rejected (same request id, never routed there); the
    memory of those is bounded."""

    def __init__(self, memory: int = 4096) -> None:
        self.count: dict[Any, int] = {}
        self.sent_to: dict[str, Any] = {}  # request id -> the replica that accepted it
        self.done_early: OrderedDict[tuple[str, Any], None] = OrderedDict()
        self.memory = memory

    def load(self, replica_id: Any) -> int:
        return self.count.get(replica_id, 0)

    def routed(self, request_id: str, replica_id: Any) -> None:
        if (request_id, replica_id) in self.done_early:  # its completion came first
            del self.done_early[(request_id, replica_id)]
            return
        self.sent_to[request_id] = replica_id
        self.count[replica_id] = self.count.get(replica_id, 0) + 1

    def completed(self, request_id: str, replica_id: Any) -> None:
        if self.sent_to.get(request_id) == replica_id:
            del self.sent_to[request_id]
            self.count[replica_id] = max(0, self.count[replica_id] - 1)
            return
        self.done_early[(request_id, replica_id)] = None
        while len(self.done_early) > self.memory:
            self.done_early.popitem(last=False)

    def forget(self, replica_id: Any) -> None:
        """A replica died: nothing is in flight on it any more."""
        self.count.pop(replica_id, None)
        self.sent_to = {r: rep for r, rep in self.sent_to.items() if rep != replica_id}


class LengthBandRouter(FIFOMixin, RequestRouter):
    """Routes by length band; a request without a length (a GET) goes to the least loaded."""

    def initialize_state(self, window: int = 512, seats: int = 8, **kwargs: Any) -> None:
        self.bands = LengthBands(window, seats)
        # Requests this router has in flight on each replica, counted beside Ray's queue-length
        # cache: the cache counts a request at once when it is sent, but its entries lapse
        # (unknown) between probes; this count stays.
        self.in_flight = InFlight()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        length = None if pending_request is None else pending_request.kwargs.get(LENGTH_KWARG)
        if length is None or len(candidate_replicas) == 1:
            return [candidate_replicas]  # Ray probes them all and takes the least loaded
        # A stable order, so that a band stays with its replica while the set is unchanged.
        replicas = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        ranks = self.bands.rank(length, [self._load(r.replica_id) for r in replicas])
        return [[replicas[i] for i in rank] for rank in ranks]

    def _load(self, replica_id: Any) -> int:
        cached = self.replica_queue_len_cache.get(replica_id)
        return max(cached or 0, self.in_flight.load(replica_id))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        length = pending_request.kwargs.get(LENGTH_KWARG)
        if length is not None:
            self.bands.observe(length)
        self.in_flight.routed(pending_request.metadata.internal_request_id, replica_id)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        self.in_flight.completed(internal_request_id, replica_id)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self.in_flight.forget(replica_id)


class FreeKVRouter(FIFOMixin, RequestRouter):
    """Ranks the replicas by the free KV blocks they last reported, most first."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        def free(r: RunningReplica) -> int:
            return int((r.routing_stats or {}).get(KV_FREE_STAT, 0))

        return [[r] for r in sorted(candidate_replicas, key=free, reverse=True)]
