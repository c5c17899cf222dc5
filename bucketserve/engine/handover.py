"""The prefill/decode hand-over: a prompt's KV cache and first token, from the instance that
computed them to the instance that decodes the rest (DistServe's KV transfer; vLLM V1 carries
the same in ``RequestOutput.kv_transfer_params``).

The prefill instance runs the prompt, samples the first token, detaches the sequence from its
scheduler and copies the sequence's KV blocks out (``export_blocks``). The decode instance has
reserved blocks for the sequence's whole life before the copy, writes the KV into them
(``import_blocks``) and attaches the sequence to its scheduler, which decodes from there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from bucketserve.core.block_manager import blocks_for
from bucketserve.outputs import TokenLogprobs


@dataclass
class KVHandover:
    """What a prefill instance sends a decode instance for one request."""

    first_token: int
    num_tokens: int  # tokens whose KV is in ``kv``: the prompt
    # [layers, 2, kv_heads, blocks, block_size, head_dim], the prompt's blocks in order;
    # None when the first token ended the request (nothing left to decode)
    kv: torch.Tensor | None
    logprobs: TokenLogprobs | None = None  # the first token's, when the request asked
    finish_reason: str | None = None  # the first token already ended the request: why
    stop_reason: int | str | None = None
    # time.time() when the prefill instance let go of it: the decode instance measures the
    # transfer from there (the two share a clock on one host; across hosts, NTP's accuracy)
    sent_at: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()


def export_blocks(
    kv_cache: torch.Tensor, blocks: list[int], num_tokens: int, block_size: int
) -> torch.Tensor:
    """A copy of the KV of a sequence's first ``num_tokens`` tokens held in ``blocks``."""
    ids = torch.tensor(blocks[: blocks_for(num_tokens, block_size)], device=kv_cache.device)
    return kv_cache.index_select(3, ids).cpu()


def import_blocks(kv_cache: torch.Tensor, blocks: list[int], kv: torch.Tensor) -> None:
    """Write exported KV into the first of a sequence's reserved ``blocks``."""
    ids = torch.tensor(blocks[: kv.shape[3]], device=kv_cache.device)
    kv_cache.index_copy_(3, ids, kv.to(device=kv_cache.device, dtype=kv_cache.dtype))
