"""The bucketing manager: a partition of [0, L_max) into length intervals, each a queue.

A request goes to the bucket whose interval holds its prompt length. Buckets split when the
load is high and merge when it falls (DESIGN section 3.2). Each bucket's queue is a heap on
the requests' urgency keys, which never change after arrival, so pops are O(log n).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from bucketserve.core.sequence import Sequence


@dataclass
class Bucket:
    lower: int  # inclusive
    upper: int  # exclusive
    heap: list[tuple[float, int, Sequence]] = field(default_factory=list)
    below: int = 0  # queued requests shorter than the midpoint, kept up to date for splits
    # The longest prompt queued since the bucket was formed or last empty: a bound on its
    # queue's longest (a pop leaves it; an exact maximum would cost a scan or a second heap).
    longest: int = 0

    def __post_init__(self) -> None:
        self.below = sum(1 for _, _, s in self.heap if s.prompt_len < self.midpoint)
        self.longest = max((s.prompt_len for _, _, s in self.heap), default=0)

    def __len__(self) -> int:
        return len(self.heap)

    @property
    def midpoint(self) -> int:
        return (self.lower + self.upper) // 2

    def head(self) -> Sequence | None:
        return self.heap[0][2] if self.heap else None

    def head_key(self) -> float:
        return self.heap[0][0] if self.heap else float("inf")


class BucketManager:
    """Buckets over prompt lengths [0, max_len), with split and merge."""

    def __init__(self, max_len: int, boundaries: tuple[int, ...] = ()) -> None:
        self.max_len = max_len
        inner = sorted(b for b in set(boundaries) if 0 < b < max_len)
        edges = [0, *inner, max_len]
        self.buckets = [Bucket(lo, hi) for lo, hi in itertools.pairwise(edges)]
        self._counter = 0  # ties in urgency break by insertion order
        self.num_splits = 0
        self.num_merges = 0

    # -- queue ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)

    def __iter__(self) -> Iterator[Sequence]:
        for b in self.buckets:
            for _, _, seq in b.heap:
                yield seq

    @property
    def boundaries(self) -> list[int]:
        """All edges, from 0 to max_len."""
        return [b.lower for b in self.buckets] + [self.max_len]

    def bucket_of(self, length: int) -> Bucket:
        i = bisect.bisect_right([b.lower for b in self.buckets], min(length, self.max_len - 1)) - 1
        return self.buckets[i]

    def push(self, seq: Sequence, key: float) -> None:
        self._counter += 1
        bucket = self.bucket_of(seq.prompt_len)
        heapq.heappush(bucket.heap, (key, self._counter, seq))
        bucket.below += seq.prompt_len < bucket.midpoint
        bucket.longest = max(bucket.longest, seq.prompt_len)

    def pop(self, bucket: Bucket) -> Sequence:
        seq = heapq.heappop(bucket.heap)[2]
        bucket.below -= seq.prompt_len < bucket.midpoint
        if not bucket.heap:
            bucket.longest = 0
        return seq

    def remove(self, seq: Sequence) -> bool:
        bucket = self.bucket_of(seq.prompt_len)
        for i, (_, _, s) in enumerate(bucket.heap):
            if s is seq:
                bucket.heap[i] = bucket.heap[-1]
                bucket.heap.pop()
                heapq.heapify(bucket.heap)
                bucket.below -= seq.prompt_len < bucket.midpoint
                if not bucket.heap:
                    bucket.longest = 0
                return True
        return False

    # -- adaptation ----------------------------------------------------------------------
    def adapt(self, n_max: int, theta: float, optimal_edges: list[int] | None = None) -> None:
        """Split while the load exceeds n_max; merge when it falls below.

        A bucket splits (at its midpoint, or at ``optimal_edges`` when given) when the total
        queue exceeds n_max, it alone holds more than n_max, and more than ``theta`` of its
        requests sit below its midpoint. When the total falls below n_max, adjacent buckets
        merge, the emptiest pair first, until one remains: low load needs no partition.
        """
        total = len(self)
        if total > n_max:
            if optimal_edges is not None:
                crowded = any(len(b) > n_max for b in self.buckets)
                if crowded and len(optimal_edges) > len(self.buckets) + 1:
                    added = len(optimal_edges) - 1 - len(self.buckets)  # buckets the reshape adds
                    self._reshape(optimal_edges)
                    self.num_splits += added
                return
            i = 0
            while i < len(self.buckets):
                b = self.buckets[i]
                if len(b) > n_max and b.below > theta * len(b) and b.upper - b.lower >= 2:
                    self._split(i)
                    self.num_splits += 1
                    continue  # the lower half may need splitting again
                i += 1
        elif total < n_max:
            while len(self.buckets) > 1:
                i = min(
                    range(len(self.buckets) - 1),
                    key=lambda j: len(self.buckets[j]) + len(self.buckets[j + 1]),
                )
                self._merge(i)
                self.num_merges += 1

    def _split(self, i: int) -> None:
        b = self.buckets[i]
        mid = b.midpoint
        low = Bucket(b.lower, mid, [e for e in b.heap if e[2].prompt_len < mid])
        high = Bucket(mid, b.upper, [e for e in b.heap if e[2].prompt_len >= mid])
        heapq.heapify(low.heap)
        heapq.heapify(high.heap)
        self.buckets[i : i + 1] = [low, high]

    def _merge(self, i: int) -> None:
        a, b = self.buckets[i], self.buckets[i + 1]
        merged = Bucket(a.lower, b.upper, a.heap + b.heap)
        heapq.heapify(merged.heap)
        self.buckets[i : i + 2] = [merged]

    def _reshape(self, edges: list[int]) -> None:
        entries = [e for b in self.buckets for e in b.heap]
        heaps: list[list[tuple[float, int, Sequence]]] = [[] for _ in edges[1:]]
        for entry in entries:
            heaps[bisect.bisect_right(edges, min(entry[2].prompt_len, self.max_len - 1)) - 1].append(entry)
        for heap in heaps:
            heapq.heapify(heap)
        self.buckets = [
            Bucket(lo, hi, h) for (lo, hi), h in zip(itertools.pairwise(edges), heaps, strict=True)
        ]


def optimal_boundaries(histogram: list[int], bin_width: int, max_len: int, num_buckets: int) -> list[int]:
    """Edges (0 .. max_len) of ``num_buckets`` buckets minimising expected padding.

    Expected waste of a bucket [L, U): sum over its requests of (1 - S/U), the share of a
    padded row that is padding when every row is padded to U (the paper's E[waste]). Edges
    fall on histogram bin edges; requests are taken at their bin's upper edge. Dynamic
    programming over bins: O(num_buckets x bins^2).
    """
    n = len(histogram)
    upper = [min((i + 1) * bin_width, max_len) for i in range(n)]
    # cost[i][j]: waste of one bucket covering bins i..j (inclusive), padded to upper[j].
    counts_prefix = [0]
    lens_prefix = [0.0]
    for i, c in enumerate(histogram):
        counts_prefix.append(counts_prefix[-1] + c)
        lens_prefix.append(lens_prefix[-1] + c * (upper[i] - bin_width / 2))

    def cost(i: int, j: int) -> float:
        count = counts_prefix[j + 1] - counts_prefix[i]
        return count - (lens_prefix[j + 1] - lens_prefix[i]) / upper[j]

    k = max(1, min(num_buckets, n))
    inf = float("inf")
    best = [[inf] * n for _ in range(k + 1)]
    choice = [[-1] * n for _ in range(k + 1)]
    for j in range(n):
        best[1][j] = cost(0, j)
    for m in range(2, k + 1):
        for j in range(m - 1, n):
            for i in range(m - 1, j + 1):  # the last bucket covers bins i..j
                c = best[m - 1][i - 1] + cost(i, j)
                if c < best[m][j]:
                    best[m][j], choice[m][j] = c, i
    edges, j, m = [max_len], n - 1, k
    while m > 1:
        i = choice[m][j]
        edges.append(i * bin_width)
        j, m = i - 1, m - 1
    edges.append(0)
    return sorted(set(edges))
