"""Workloads for benchmarks and the simulator: request lengths, arrival times, real traces.

Pure Python, no torch. ``synthetic`` generates seeded length distributions (labelled
synthetic), ``traces`` loads the real Azure traces shipped in ``bucketserve/data/traces``,
``arrivals`` makes arrival offsets, ``sharegpt`` samples real ShareGPT text.
"""

from bucketserve.workloads.lengths import LengthPair

__all__ = ["LengthPair"]
