"""Executes a ScheduledBatch on the model: builds the step's tensors, runs, samples."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from bucketserve.core.block_manager import blocks_for
from bucketserve.core.scheduler import ScheduledBatch
from bucketserve.core.sequence import Sequence
from bucketserve.engine.cuda_graphs import DecodeGraphs
from bucketserve.engine.model import (
    AttentionMetadata,
    CachedContext,
    DecodeRows,
    LlamaModel,
    PackedRows,
    PrefillRow,
    varlen_attn,
)
from bucketserve.engine.sampler import Sampler, token_logprobs
from bucketserve.outputs import TokenLogprobs

# A prompt chunk of at most PAGED_CHUNK_TOKENS tokens, whose queries see at most
# PAGED_CHUNK_PAIRS keys in all (n x (cached + n / 2)), attends one token at a time through the
# native paged kernel, each token a row over its sequence's cache up to itself, as a decode
# row does, instead of by flash attention. A short chunk then skips the per-layer gather of its
# cached context and the two flash calls; a long one over a long context is faster by flash
# (bf16 on AMX). ``benchmarks/mixed_step.py`` measures both beside 32 decode rows; on a
# 2-core Xeon with AMX, ms added to the step by flash / row by row (median of 6): fresh 16
# tokens 19.2 / 10.5, 32: 20.2 / 17.4, 64: 35.7 / 27.8 (8: even); over 352 cached 8: 20.8 /
# 11.8, 32: 40.1 / 30.7; over 1,400 cached 8: 34.3 / 23.5, 16: 40.2 / 34.4. Row by row lost
# over 1,400 cached at 32 and 64 tokens (57.2 / 49.3 and 110.0 / 61.1 ms, a session script by
# the same method), hence the bound on keys (docs/RESULTS.md).
PAGED_CHUNK_TOKENS = 64
PAGED_CHUNK_PAIRS = 24_576


class StepResult(NamedTuple):
    """Per batch row: the sampled token (None for a row that does not sample yet) and, where
    the request asked for them, its logprobs."""

    tokens: list[int | None]
    logprobs: list[TokenLogprobs | None]


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int, sampler: Sampler) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.sampler = sampler
        self.device = kv_cache.device
        # The pool's last block belongs to no sequence: padded batches write pad K/V there.
        self.scratch_slot = (kv_cache.shape[3] - 1) * block_size
        self.max_position = model.rotary.cos.shape[0] - 1
        self.int8_cache = kv_cache.dtype == torch.int8  # fresh prompts then attend by flash
        self.decode_graphs: DecodeGraphs | None = None  # capture_decode_graphs
        # Whether a step with prompt tokens attends in one varlen call (PackedRows): torch's
        # varlen flash attention runs on CUDA in fp16 / bf16, over an unquantized cache.
        self.packed_attention = (
            self.device.type == "cuda"
            and varlen_attn is not None
            and kv_cache.dtype in (torch.float16, torch.bfloat16)
        )

    def capture_decode_graphs(self, max_model_len: int, max_batch: int, capture: bool = True) -> None:
        """Run decode-only steps through ``DecodeGraphs`` from now on: CUDA graphs captured now
        (``capture``), or, without, their padded static-buffer steps run eagerly (tests)."""
        self.decode_graphs = DecodeGraphs(
            self.model, self.kv_cache, self.block_size, max_model_len, max_batch, self.scratch_slot, capture
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        """Run one step; return the sampled token of each row that samples (else None).

        All rows run in one forward pass over their tokens packed without padding (vLLM's
        layout): prefill chunks first, then the decode rows' single tokens. A ``padded``
        batch also computes pad tokens after each prompt that starts at position 0, up to the
        longest prompt chunk, as a static-batching engine does; their K/V go to a scratch
        block that no sequence owns, and causal attention keeps them out of real tokens' way.
        """

        # Prompt chunks first (those that attend as a whole, then the short ones that attend
        # row by row), then decode rows, each in batch order.
        paged = [self._attends_row_by_row(batch, i) for i in range(len(batch))]
        order = sorted(range(len(batch)), key=lambda i: 2 if not batch.is_prefill[i] else int(paged[i]))
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        num_prefill = batch.num_prefill_rows
        starts = [s.num_computed_tokens for s in seqs]

        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: list[PrefillRow] = []
        logits_index: list[int] = []
        sampled_rows: list[int] = []
        # The paged rows': each token of a chunk that attends row by row, each decode row.
        paged_tables: list[list[int]] = []
        paged_lens: list[int] = []
        bs = self.block_size
        pad_to = max(counts[:num_prefill], default=0) if batch.padded else 0
        num_prefill_tokens = 0
        # The native kernels' layers (a CPU) attend their own way.
        packed = (
            self.packed_attention
            and self.model.kernels is None
            and num_prefill > 0
            and not batch.padded
            and not batch.num_ghost_rows
        )
        packed_rows: list[tuple[list[int], int, int]] = []  # (block table, first position, tokens)
        for r, (seq, start, n) in enumerate(zip(seqs, starts, counts, strict=True)):
            offset = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if packed:
                packed_rows.append((table, start, n))
            elif r < num_prefill and not paged[order[r]]:
                cached = self._cached_context(seq, start) if start > 0 else None
                pad = max(0, pad_to - n) if cached is None else 0
                ids.extend([0] * pad)
                positions.extend(min(p, self.max_position) for p in range(n, n + pad))
                slots.extend([self.scratch_slot] * pad)
                rows.append(PrefillRow(offset, n + pad, cached))
            else:  # each token sees its sequence up to itself
                paged_lens.extend(range(start + 1, start + n + 1))
                paged_tables.extend(table[: blocks_for(p, bs)] for p in range(start + 1, start + n + 1))
            if r < num_prefill:
                num_prefill_tokens = len(ids)
            if batch.samples[order[r]]:
                logits_index.append(offset + n - 1)
                sampled_rows.append(r)

        graphs = self.decode_graphs
        if (
            graphs is not None
            and not num_prefill
            and not batch.num_ghost_rows
            and len(sampled_rows) == len(ids)  # every row samples (a 1-token mid-prompt chunk does not)
            and graphs.fits(len(ids), max(len(t) for t in paged_tables))
        ):
            logits = graphs.run(ids, positions, slots, paged_tables)
            return self._sample(seqs, order, sampled_rows, logits, len(batch))
        if batch.num_ghost_rows:
            # Rows of finished static-batch members: computed on the scratch block, thrown away.
            g = batch.num_ghost_rows
            ids.extend([0] * g)
            positions.extend([0] * g)
            slots.extend([self.scratch_slot] * g)
            paged_tables.extend([[self.scratch_slot // bs]] * g)
            paged_lens.extend([1] * g)
        positions_t = torch.tensor(positions, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device),
            positions=positions_t,
            prefill=rows,
            num_prefill_tokens=num_prefill_tokens,
            decode=self._decode_rows(paged_tables, paged_lens) if paged_lens else None,
            packed=self._packed_rows(packed_rows) if packed else None,
        )
        logits = self.model(
            torch.tensor(ids, device=self.device),
            positions_t,
            self.kv_cache,
            meta,
            torch.tensor(logits_index, dtype=torch.long, device=self.device),
        )
        return self._sample(seqs, order, sampled_rows, logits, len(batch))

    def _sample(
        self, seqs: list[Sequence], order: list[int], sampled_rows: list[int], logits: torch.Tensor, size: int
    ) -> StepResult:
        """The tokens (and logprobs where asked) of the rows ``sampled_rows`` of ``seqs`` (the
        step's rows in execution order; ``order`` maps them back to the batch's), whose logits
        are ``logits``' rows in that order."""
        result = StepResult([None] * size, [None] * size)
        if not sampled_rows:
            return result
        chosen = [seqs[r] for r in sampled_rows]
        wants = [j for j, s in enumerate(chosen) if s.params.logprobs is not None]
        raw = logits[wants] if wants else None  # a copy (index list): the sampler masks logits in place
        tokens = self.sampler(
            logits,
            [s.seq_id for s in chosen],
            [s.params for s in chosen],
            [_banned_tokens(s) for s in chosen],
        )
        for r, tok in zip(sampled_rows, tokens, strict=True):
            result.tokens[order[r]] = tok
        if raw is not None:
            lps = token_logprobs(
                raw, [tokens[j] for j in wants], [chosen[j].params.logprobs or 0 for j in wants]
            )
            for j, lp in zip(wants, lps, strict=True):
                result.logprobs[order[sampled_rows[j]]] = lp
        return result

    def _attends_row_by_row(self, batch: ScheduledBatch, i: int) -> bool:
        """Whether row ``i``, a prompt chunk, attends one token at a time through the native
        paged kernel, as decode rows do (a short chunk over a short context: see
        ``PAGED_CHUNK_TOKENS``; under an int8 cache, only a chunk over cached context)."""
        if not batch.is_prefill[i] or batch.padded or self.model.kernels is None:
            return False
        n, cached = batch.num_new_tokens[i], batch.seqs[i].num_computed_tokens
        if cached == 0 and self.int8_cache:
            # Row by row it would read back its own K/V quantized; by flash it attends them as
            # computed, so a prompt's first token is the unquantized cache's (a near tie flipped
            # the embedded model's answer to the README's question).
            return False
        return n <= PAGED_CHUNK_TOKENS and n * (2 * cached + n) <= 2 * PAGED_CHUNK_PAIRS

    def _cached_context(self, seq: Sequence, start: int) -> CachedContext:
        """What a chunk at position ``start`` sees of its sequence: the first ``start`` tokens."""
        used = blocks_for(start, self.block_size)
        return CachedContext(torch.tensor(seq.block_table[:used], device=self.device), start)

    def _packed_rows(self, rows: list[tuple[list[int], int, int]]) -> PackedRows:
        """The step's ``rows`` (block table, first position, tokens) for one varlen call: each
        one's KV slots from position 0 to its last token, built with a few tensor ops over
        the rows' blocks rather than a Python loop over their tokens."""
        bs = self.block_size
        ends = [start + n for _, start, n in rows]
        num_blocks = [blocks_for(end, bs) for end in ends]
        tables = (table[:nb] for (table, _, _), nb in zip(rows, num_blocks, strict=True))
        blocks = torch.tensor(list(itertools.chain.from_iterable(tables)))
        slots = (blocks.view(-1, 1) * bs + torch.arange(bs)).flatten()  # every row's whole blocks
        spans = torch.tensor(num_blocks) * bs
        position = torch.arange(len(slots)) - torch.repeat_interleave(spans.cumsum(0) - spans, spans)
        slots = slots[position < torch.repeat_interleave(torch.tensor(ends), spans)]

        def offsets(lengths: list[int]) -> torch.Tensor:
            return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=self.device)

        counts = [n for _, _, n in rows]
        return PackedRows(
            slots=slots.to(self.device),
            cu_seq_q=offsets(counts),
            cu_seq_k=offsets(ends),
            max_q=max(counts),
            max_k=max(ends),
        )

    def _decode_rows(self, tables: list[list[int]], lens: list[int]) -> DecodeRows:
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]  # one tensor built, not one per row
        rows = DecodeRows(
            torch.tensor(padded, dtype=torch.long, device=self.device), torch.tensor(lens, device=self.device)
        )
        if self.model.kernels is None:  # the torch reference path needs the mask
            span = torch.arange(width * self.block_size).view(1, -1)
            hidden = span >= torch.tensor(lens).view(-1, 1)
            rows.hidden = hidden.view(1, len(lens), 1, 1, -1).to(self.device)
        return rows


def _banned_tokens(seq: Sequence) -> list[int]:
    """Tokens that would end the sequence before min_tokens."""
    if seq.num_output_tokens >= seq.params.min_tokens:
        return []
    ends = list(seq.params.stop_token_ids)
    if not seq.params.ignore_eos and seq.eos_token_id is not None:
        ends.append(seq.eos_token_id)
    return ends
