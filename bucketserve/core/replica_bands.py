"""Length bands across replicas: BucketServe's buckets one level up, shared by the Ray Serve
router (``cluster.router``) and the simulator's replicas (``sim.simulator``).

Each replica owns a band of request lengths (prompt plus max_tokens), so that long documents
and short chats run on different engines and a long prefill never stalls a short chat's
decode. The bands' edges follow the recent requests: the cuts that give every replica an
equal share of their tokens, so every replica stays busy as the mix changes. And no replica
idles while another queues: when the band's replica has a full batch in hand (``seats``
requests) and another has seats free, the request goes to the least loaded (lengths alone
cannot split a load of equal lengths).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence


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
        free = free[: max(1, len(free) - (num_bands - 1 - k))]  # leave a cut for every later band
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


class LengthBands:
    """The bands of the recent requests, and where a new one goes."""

    def __init__(self, window: int = 512, seats: int = 8) -> None:
        self.recent: deque[int] = deque(maxlen=window)
        self.seats = seats

    def observe(self, length: int) -> None:
        """A request of ``length`` went to a replica: it shapes the bands from now on."""
        self.recent.append(length)

    def rank(self, length: int, loads: Sequence[int]) -> list[list[int]]:
        """Replica indices (replicas in a stable order, ``loads[i]`` the requests replica i has
        in hand) in ranks of preference: its band's replica, then the nearer bands; or the
        least loaded first when its band's batch is full and another replica has seats."""
        n = len(loads)
        edges = band_edges([*self.recent, length], n)
        ranked = ranked_by_band(band_of(length, edges), n)
        if loads[ranked[0]] >= self.seats > min(loads):
            least = min(range(n), key=lambda i: (loads[i], ranked.index(i)))
            return [[least], [i for i in ranked if i != least]]
        return [[i] for i in ranked]
