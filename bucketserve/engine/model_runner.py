"""Executes a ScheduledBatch on the model: builds the step's tensors, runs, samples."""

from __future__ import annotations

from typing import NamedTuple

import torch

from bucketserve.core.block_manager import blocks_for
from bucketserve.core.scheduler import ScheduledBatch
from bucketserve.core.sequence import Sequence
from bucketserve.engine.model import AttentionMetadata, LlamaModel, PagedContext, PrefillRow
from bucketserve.engine.sampler import Sampler, token_logprobs
from bucketserve.outputs import TokenLogprobs


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

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        """Run one step; return the sampled token of each row that samples (else None).

        All rows run in one forward pass over their tokens packed without padding (vLLM's
        layout): prefill chunks first, then the decode rows' single tokens. A ``padded``
        batch also computes pad tokens after each prompt that starts at position 0, up to the
        longest prompt chunk, as a static-batching engine does; their K/V go to a scratch
        block that no sequence owns, and causal attention keeps them out of real tokens' way.
        """

        # Prefill rows first, in batch order; then decode rows by context length, so that
        # groups of similar length attend together with little padding.
        def row_key(i: int) -> tuple[bool, int]:
            is_decode = batch.num_new_tokens[i] == 1
            return is_decode, len(batch.seqs[i]) if is_decode else 0

        order = sorted(range(len(batch)), key=row_key)
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        num_prefill = sum(n > 1 for n in counts)
        starts = [s.num_computed_tokens for s in seqs]

        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: list[PrefillRow] = []
        logits_index: list[int] = []
        sampled_rows: list[int] = []
        bs = self.block_size
        pad_to = max(counts[:num_prefill], default=0) if batch.padded else 0
        num_prefill_tokens = 0
        for r, (seq, start, n) in enumerate(zip(seqs, starts, counts, strict=True)):
            offset = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if r < num_prefill:
                cached = self._paged_context([seq], [start], [n]) if start > 0 else None
                pad = max(0, pad_to - n) if cached is None else 0
                ids.extend([0] * pad)
                positions.extend(min(p, self.max_position) for p in range(n, n + pad))
                slots.extend([self.scratch_slot] * pad)
                rows.append(PrefillRow(offset, n + pad, cached))
                num_prefill_tokens = len(ids)
            if start + n == len(seq):  # the chunk reaches the end: this row samples
                logits_index.append(offset + n - 1)
                sampled_rows.append(r)

        decode = [
            self._paged_context(seqs[a:b], starts[a:b], counts[a:b])
            for a, b in _length_groups([s + 1 for s in starts[num_prefill:]], num_prefill)
        ]
        if batch.num_ghost_rows:
            # Rows of finished static-batch members: computed, then thrown away.
            g = batch.num_ghost_rows
            ids.extend([0] * g)
            positions.extend([0] * g)
            slots.extend([self.scratch_slot] * g)
            scratch = torch.full((g, 1), self.scratch_slot // bs, dtype=torch.long)
            visible = torch.arange(bs).view(1, 1, 1, 1, bs) > 0
            decode.append(
                PagedContext(scratch.to(self.device), visible.expand(1, g, 1, 1, bs).to(self.device))
            )
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device),
            prefill=rows,
            num_prefill_tokens=num_prefill_tokens,
            decode=decode,
        )
        logits = self.model(
            torch.tensor(ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_cache,
            meta,
            torch.tensor(logits_index, dtype=torch.long, device=self.device),
        )
        result = StepResult([None] * len(batch), [None] * len(batch))
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

    def _paged_context(self, seqs: list[Sequence], starts: list[int], counts: list[int]) -> PagedContext:
        """Block tables and visibility mask for rows whose queries read the cache."""
        bs = self.block_size
        used = [blocks_for(s + n, bs) for s, n in zip(starts, counts, strict=True)]
        width = max(used)
        tables = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, (seq, u) in enumerate(zip(seqs, used, strict=True)):
            tables[b, :u] = torch.tensor(seq.block_table[:u])
        L = max(counts)
        # Query j of row b sits at position starts[b] + j and sees keys up to that position.
        query_pos = torch.tensor(starts).view(-1, 1) + torch.arange(L).view(1, -1)
        hidden = torch.arange(width * bs).view(1, 1, -1) > query_pos.unsqueeze(-1)
        return PagedContext(tables.to(self.device), hidden.view(1, len(seqs), 1, L, -1).to(self.device))


def _length_groups(context_lens: list[int], offset: int, slack: float = 1.25) -> list[tuple[int, int]]:
    """Split rows sorted by context length into runs whose longest is within ``slack`` of
    their shortest: decode attention reads every row's K/V padded to its group's longest,
    and one group for all would read the longest context once per row (3x the bytes on
    ShareGPT-like mixes, where reading K/V is most of a decode step)."""
    groups, start = [], 0
    for i in range(1, len(context_lens) + 1):
        if i == len(context_lens) or context_lens[i] > slack * context_lens[start] + 16:
            groups.append((offset + start, offset + i))
            start = i
    return groups


def _banned_tokens(seq: Sequence) -> list[int]:
    """Tokens that would end the sequence before min_tokens."""
    if seq.num_output_tokens >= seq.params.min_tokens:
        return []
    ends = list(seq.params.stop_token_ids)
    if not seq.params.ignore_eos and seq.eos_token_id is not None:
        ends.append(seq.eos_token_id)
    return ends
