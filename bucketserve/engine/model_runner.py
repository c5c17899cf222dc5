"""Executes a ScheduledBatch on the model: builds the step's tensors, runs, samples."""

from __future__ import annotations

import torch

from bucketserve.core.block_manager import blocks_for
from bucketserve.core.scheduler import ScheduledBatch
from bucketserve.core.sequence import Sequence
from bucketserve.engine.model import AttentionMetadata, LlamaModel
from bucketserve.engine.sampler import Sampler


class ModelRunner:
    def __init__(
        self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int, sampler: Sampler
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.sampler = sampler
        self.device = kv_cache.device

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[int | None]:
        """Run one step; return the sampled token of each row that samples, else None.

        Decode rows (one new token) and prefill rows run as separate forward passes so that
        decodes are never padded to a prompt's length.
        """
        rows = range(len(batch))
        decode = [i for i in rows if batch.num_new_tokens[i] == 1]
        prefill = [i for i in rows if batch.num_new_tokens[i] > 1]
        result: list[int | None] = [None] * len(batch)
        for group in (prefill, decode):
            if group:
                tokens = self._run_group(
                    [batch.seqs[i] for i in group], [batch.num_new_tokens[i] for i in group],
                    [batch.samples(i) for i in group],
                )
                for i, tok in zip(group, tokens, strict=True):
                    result[i] = tok
        return result

    def _run_group(self, seqs: list[Sequence], counts: list[int], samples: list[bool]) -> list[int | None]:
        B, L, bs = len(seqs), max(counts), self.block_size
        starts = [s.num_computed_tokens for s in seqs]
        input_ids = torch.zeros(B, L, dtype=torch.long)
        positions = torch.zeros(B, L, dtype=torch.long)
        valid, slots, logits_index = [], [], []
        for b, (seq, start, n) in enumerate(zip(seqs, starts, counts, strict=True)):
            input_ids[b, :n] = torch.tensor(seq.token_ids[start : start + n])
            pos = torch.arange(start, start + n)
            positions[b, :n] = pos
            positions[b, n:] = start + n - 1  # padding queries look like the last real one
            table = torch.tensor(seq.block_table)
            slots.append(table[pos // bs] * bs + pos % bs)
            valid.append(torch.arange(b * L, b * L + n))
            if samples[b]:
                logits_index.append(b * L + n - 1)

        if all(s == 0 for s in starts):
            block_tables, attn_mask = None, None
        else:
            width = max(blocks_for(s + n, bs) for s, n in zip(starts, counts, strict=True))
            block_tables = torch.zeros(B, width, dtype=torch.long)
            for b, seq in enumerate(seqs):
                used = blocks_for(starts[b] + counts[b], bs)
                block_tables[b, :used] = torch.tensor(seq.block_table[:used])
            key_pos = torch.arange(width * bs)
            attn_mask = (key_pos.view(1, 1, 1, -1) <= positions.view(B, 1, L, 1)).to(self.device)
            block_tables = block_tables.to(self.device)

        meta = AttentionMetadata(
            valid_index=torch.cat(valid).to(self.device),
            slot_mapping=torch.cat(slots).to(self.device),
            block_tables=block_tables,
            attn_mask=attn_mask,
            num_padded_tokens=B * L,
        )
        out: list[int | None] = [None] * B
        if not logits_index:
            self.model(input_ids.to(self.device), positions.to(self.device), self.kv_cache, meta,
                       torch.zeros(0, dtype=torch.long, device=self.device))
            return out
        logits = self.model(
            input_ids.to(self.device), positions.to(self.device), self.kv_cache, meta,
            torch.tensor(logits_index, device=self.device),
        )
        sampling = [b for b in range(B) if samples[b]]
        chosen = [seqs[b] for b in sampling]
        tokens = self.sampler(
            logits,
            [s.seq_id for s in chosen],
            [s.params for s in chosen],
            [_banned_tokens(s) for s in chosen],
        )
        for b, tok in zip(sampling, tokens, strict=True):
            out[b] = tok
        return out


def _banned_tokens(seq: Sequence) -> list[int]:
    """Tokens that would end the sequence before min_tokens."""
    if seq.num_output_tokens >= seq.params.min_tokens:
        return []
    ends = list(seq.params.stop_token_ids)
    if not seq.params.ignore_eos and seq.eos_token_id is not None:
        ends.append(seq.eos_token_id)
    return ends
