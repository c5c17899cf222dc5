"""Request routers for the engine replicas (Ray Serve's ``RequestRouter`` interface).

``LengthBandRouter`` is BucketServe's buckets across replicas: each replica owns a band of
request lengths (prompt plus max_tokens), so that long documents and short chats run on
different engines and a long prefill never stalls a short chat's decode. The bands' edges
follow the recent requests: they are the quantiles that give every replica an equal share of
the recent requests' tokens, so every replica stays busy as the mix changes. A request whose
band's replica is full goes to the nearest band with room (Ray probes the ranks in order).
And no replica idles while another queues: when the band's replica has a full batch in hand
(``seats`` requests, its ``max_num_seqs``) and another has seats free, the request goes to the
least loaded (lengths alone cannot split a load of equal lengths; Ray's prefix-affinity
router falls back on load the same way).

``FreeKVRouter`` sends a disaggregated request to the decode replica with the most free KV
blocks, as DistServe places a prefilled request on the least loaded decode instance.

Ray's default, power of two choices on ongoing requests, is what both are measured against
(``benchmarks/replicas.py``). The band arithmetic is pure, and tested without Ray.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

LENGTH_KWARG = "length"  # the keyword the gateway passes a request's length in
KV_FREE_STAT = "kv_free_blocks"  # what each replica's ``record_routing_stats`` reports


def band_edges(lengths: Sequence[int], num_bands: int) -> list[int]:
    """``num_bands - 1`` cut points that split ``lengths``' tokens into shares as equal as
    cuts between distinct lengths allow (equal lengths share a band; no band is left empty
    while there are distinct lengths to fill it): band i holds the lengths in
    [edges[i - 1], edges[i]), the first from 0, the last to infinity."""
    if num_bands <= 1 or not lengths:
        return []
    ordered = sorted(lengths)
    total = sum(ordered)
    # (tokens below the cut, the cut) after each distinct length but the longest
    bounds: list[tuple[int, int]] = []
    seen = 0
    for i, length in enumerate(ordered[:-1]):
        seen += length
        if ordered[i + 1] != length:
            bounds.append((seen, length + 1))
    edges: list[int] = []
    for k in range(1, num_bands):
        free = [b for b in bounds if not edges or b[1] > edges[-1]]
        free = free[: len(free) - (num_bands - 1 - k)] or free  # leave a cut for every later band
        if not free:  # fewer distinct lengths than bands: empty bands above the longest
            edges.append(max(edges[-1] if edges else 0, ordered[-1]) + 1)
            continue
        edges.append(min(free, key=lambda b: abs(b[0] - total * k / num_bands))[1])
    return edges


def band_of(length: int, edges: Sequence[int]) -> int:
    return bisect.bisect_right(edges, length)


def ranked_by_band(home: int, num_bands: int) -> list[int]:
    """Bands in the order a request of band ``home`` tries them: its own, then the nearer
    neighbours first (the shorter one on a tie)."""
    return sorted(range(num_bands), key=lambda b: (abs(b - home), b))


class LengthBandRouter(FIFOMixin, RequestRouter):
    """Routes by length band; a request without a length (a GET) goes to the least loaded."""

    def initialize_state(self, window: int = 512, seats: int = 8, **kwargs: Any) -> None:
        self.recent: deque[int] = deque(maxlen=window)
        self.seats = seats
        # Requests this router has in flight on each replica, counted here beside Ray's
        # queue-length cache: the cache counts a request at once when it is sent, but its
        # entries lapse (unknown) between probes; this count stays, but starts only once the
        # replica has accepted the request.
        self.in_hand: dict[Any, int] = {}
        self.sent_to: dict[str, Any] = {}  # internal request id -> replica id

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        length = None if pending_request is None else pending_request.kwargs.get(LENGTH_KWARG)
        if length is None or len(candidate_replicas) == 1:
            return [candidate_replicas]  # Ray probes them all and takes the least loaded
        # A stable order, so that a band stays with its replica while the set is unchanged.
        replicas = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        edges = band_edges([*self.recent, length], len(replicas))
        ranked = [replicas[b] for b in ranked_by_band(band_of(length, edges), len(replicas))]
        loads = [self._load(r.replica_id) for r in ranked]
        if loads[0] >= self.seats > min(loads):  # its band's batch is full, another has seats
            least = min(range(len(ranked)), key=loads.__getitem__)
            return [[ranked[least]], [r for i, r in enumerate(ranked) if i != least]]
        return [[r] for r in ranked]

    def _load(self, replica_id: Any) -> int:
        cached = self.replica_queue_len_cache.get(replica_id)
        return max(cached or 0, self.in_hand.get(replica_id, 0))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        length = pending_request.kwargs.get(LENGTH_KWARG)
        if length is not None:
            self.recent.append(length)
        self.sent_to[pending_request.metadata.internal_request_id] = replica_id
        self.in_hand[replica_id] = self.in_hand.get(replica_id, 0) + 1

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        if self.sent_to.pop(internal_request_id, None) is not None:
            self.in_hand[replica_id] = max(0, self.in_hand.get(replica_id, 0) - 1)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self.in_hand.pop(replica_id, None)


class FreeKVRouter(FIFOMixin, RequestRouter):
    """Ranks the replicas by the free KV blocks they last reported, most first."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        def free(r: RunningReplica) -> int:
            return int((r.routing_stats or {}).get(KV_FREE_STAT, 0))

        return [[r] for r in sorted(candidate_replicas, key=free, reverse=True)]
