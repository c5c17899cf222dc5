"""CUDA graphs of the decode-only step (as vLLM and nano-vllm capture theirs).

On a GPU a decode step of a small model is bound by kernel launches, not by the GPU: eager,
a step of the embedded model's shapes took 13.5 ms at batch 1 on an H200, each of its 30
layers' kernels launched one by one from Python; replayed as a graph, 3.2 ms
(docs/RESULTS.md). A graph captured once replays the whole step's kernels in one launch.

A graph fixes its tensors' shapes and addresses, so there is one per (batch size, block-table
width) bucket, all reading the same static input buffer: a step's rows are padded up to the
next captured batch size (a pad row writes its K/V to the runner's scratch block, which no
sequence owns, and attends that one token), and its block tables up to the next captured
width (the torch attention reads every column, masked by the context lengths, so the width
sets its cost; a few widths keep short contexts cheap). Prompt steps run eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from bucketserve.core.block_manager import blocks_for
from bucketserve.engine.model import AttentionMetadata, DecodeRows, LlamaModel

log = logging.getLogger(__name__)

# The batch sizes captured (up to the largest batch the scheduler forms, which is captured too).
BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# The narrowest block-table width captured, in blocks; each next one is FACTOR times wider, up
# to the widest a sequence of max_model_len tokens needs.
MIN_WIDTH = 16
WIDTH_FACTOR = 4


class DecodeGraphs:
    """Decode-only steps of ``model`` over ``kv_cache`` by (batch size, width) bucket.

    ``capture=False`` runs the same padded, static-buffer step eagerly: what the graphs
    replay, on any device (the tests check it on the CPU against the unpadded step)."""

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,
        block_size: int,
        max_model_len: int,
        max_batch: int,
        scratch_slot: int,
        capture: bool = True,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.scratch_slot = scratch_slot
        self.scratch_block = scratch_slot // block_size
        self.sizes = [b for b in BATCH_SIZES if b < max_batch] + [max_batch]
        widest = blocks_for(max_model_len, block_size)
        self.widths: list[int] = []
        width = MIN_WIDTH
        while width < widest:
            self.widths.append(width)
            width *= WIDTH_FACTOR
        self.widths.append(widest)
        # One flat int64 buffer holds every input, so that a step copies it to the device once:
        # token ids, positions, KV slots and context lengths (max_batch each), then the block
        # tables (batch x width, row-major at the bucket's width).
        n = self.max_batch = max_batch
        device = kv_cache.device
        self._host = torch.zeros(4 * n + n * widest, dtype=torch.long, pin_memory=device.type == "cuda")
        self._device = torch.zeros_like(self._host, device=device)
        self._logits_index = torch.arange(n, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_steps = 0  # decode steps run through the buckets
        if capture:
            self._capture()

    def fits(self, rows: int, width: int) -> bool:
        """Whether a decode-only step of ``rows`` rows whose longest block table is ``width``
        blocks has a bucket."""
        return 0 < rows <= self.sizes[-1] and width <= self.widths[-1]

    def run(
        self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]]
    ) -> torch.Tensor:
        """The logits [rows, vocab] of a decode-only step: row i is token ``ids[i]`` at
        ``positions[i]`` (its context is positions[i] + 1 tokens), writing its K/V to
        ``slots[i]``, with block table ``tables[i]``."""
        rows = len(ids)
        b = self.sizes[bisect.bisect_left(self.sizes, rows)]
        w = self.widths[bisect.bisect_left(self.widths, max(len(t) for t in tables))]
        pad = b - rows
        n, host = self.max_batch, self._host
        host[0:b] = torch.tensor(ids + [0] * pad)
        host[n : n + b] = torch.tensor(positions + [0] * pad)
        host[2 * n : 2 * n + b] = torch.tensor(slots + [self.scratch_slot] * pad)
        host[3 * n : 3 * n + b] = torch.tensor([p + 1 for p in positions] + [1] * pad)
        scratch = self.scratch_block
        table = [t + [scratch] * (w - len(t)) for t in tables] + [[scratch] * w] * pad
        host[4 * n : 4 * n + b * w] = torch.tensor(table).view(-1)
        end = 4 * n + b * w
        self._device[:end].copy_(host[:end], non_blocking=True)
        self.num_steps += 1
        graph = self.graphs.get((b, w))
        if graph is None:
            return self._forward(b, w)[:rows]
        graph[0].replay()
        return graph[1][:rows]

    def _forward(self, b: int, w: int) -> torch.Tensor:
        """The step on the static buffer's first ``b`` rows at width ``w``."""
        n, dev = self.max_batch, self._device
        meta = AttentionMetadata(
            slot_mapping=dev[2 * n : 2 * n + b],
            positions=dev[n : n + b],
            prefill=[],
            num_prefill_tokens=0,
            decode=DecodeRows(dev[4 * n : 4 * n + b * w].view(b, w), dev[3 * n : 3 * n + b]),
        )
        return self.model(dev[0:b], meta.positions, self.kv_cache, meta, self._logits_index[:b])

    def _capture(self) -> None:
        """Capture every bucket, the largest first, into one memory pool (the smaller ones
        reuse the largest one's memory). The static buffer holds pad rows meanwhile: every
        warm-up and captured write goes to the scratch block."""
        t0 = time.perf_counter()
        n, host = self.max_batch, self._host
        host.zero_()
        host[2 * n : 3 * n] = self.scratch_slot
        host[3 * n : 4 * n] = 1
        host[4 * n :] = self.scratch_block
        self._device.copy_(host)
        pool = None
        for w in reversed(self.widths):
            for b in reversed(self.sizes):
                self._forward(b, w)  # warm-up: lazy library handles and workspaces come first
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._forward(b, w)
                pool = graph.pool()
                self.graphs[(b, w)] = (graph, out)
        torch.cuda.synchronize()
        log.info(
            "captured %d CUDA graphs of decode steps (batch sizes up to %d, widths %s blocks) in %.1f s",
            len(self.graphs),
            self.sizes[-1],
            ",".join(map(str, self.widths)),
            time.perf_counter() - t0,
        )
