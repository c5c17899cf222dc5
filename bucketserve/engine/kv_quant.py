"""The int8 KV cache (``--kv-cache-dtype int8``): its block layout, for the torch paths.

Decode attention reads every cached K/V byte once a step at the memory's speed, so an int8
cache cuts its time where contexts are long, and holds 1.9x the tokens. Each token's K (or
V) for one kv head is quantized symmetrically, as w8a8 quantizes a token's activations:
scale = max|x| / 127, codes = x / scale rounded to nearest even. One layer's K (or V) cache
is int8 [kv_heads, blocks, block_size, head_dim + 4]; that shape gives the sizes, but a
block's ``block_size * (head_dim + 4)`` bytes lie as:

    codes   K: [head_dim / 4][block_size][4], offset by 128 (unsigned): four dimensions of
               every token at a time, the layout VPDPBUSD reads (16 keys' scores grow by
               four dimensions per 64-byte load and instruction)
            V: [block_size / 2][head_dim][2], signed: token pairs, each dimension's two
               codes side by side, which VPDPWSSD multiplies by the pair's two weights
    scales  [block_size] float32

(So a block holds an even number of tokens.)

The native kernels (cpu_kernels.cpp, ``rope_write_kv_int8``, ``decode_attention`` over int8)
use the same layout and arithmetic. Their decode scores come from integer dot products, so
the query is quantized the same way first (``fake_quantize``): the torch reference for
decode rows does that too, and the two agree to rounding.
"""

from __future__ import annotations

import torch

from bucketserve.engine.weights import quantize_rows_int8

SCALE_BYTES = 4  # one float32 scale per token
K_OFFSET = 128


def row_width(head_dim: int, cache_dtype: torch.dtype) -> int:
    """Elements of ``cache_dtype`` one token's K (or V) takes per kv head."""
    return head_dim + SCALE_BYTES if cache_dtype == torch.int8 else head_dim


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [..., D] and float32 scales [...] of ``x`` [..., D]: w8a8's per-token
    quantization (``quantize_rows_int8``) of each D-long row."""
    codes, scale = quantize_rows_int8(x.reshape(-1, x.shape[-1]))
    return codes.view(x.shape), scale.view(x.shape[:-1])


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """``x`` as its int8 codes times their scale, in x's dtype."""
    codes, scale = quantize(x)
    return (codes.float() * scale.unsqueeze(-1)).to(x.dtype)


def _code_offsets(head_dim: int, block_size: int, at: torch.Tensor, keys: bool) -> torch.Tensor:
    """Byte offsets within a block of the codes of the tokens at ``at`` [T]: [T, head_dim]."""
    d = torch.arange(head_dim, device=at.device)
    t = at.unsqueeze(1)
    if keys:
        return (d // 4) * block_size * 4 + t * 4 + d % 4
    return (t // 2) * head_dim * 2 + d * 2 + t % 2


def write(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, keys: bool) -> None:
    """Quantize ``x`` [T, kv_heads, head_dim] into one layer's ``cache`` at ``slots`` [T]."""
    kvh, nb, bs, row = cache.shape
    d = row - SCALE_BYTES
    flat = cache.view(kvh, nb, bs * row)
    codes, scale = quantize(x)  # [T, kvh, d], [T, kvh]
    if keys:
        codes = (codes.to(torch.int16) + K_OFFSET).to(torch.uint8).view(torch.int8)
    block, at = (slots // bs).unsqueeze(1), slots % bs
    flat[:, block, _code_offsets(d, bs, at, keys)] = codes.transpose(0, 1)
    scale_at = bs * d + at.unsqueeze(1) * SCALE_BYTES + torch.arange(SCALE_BYTES, device=slots.device)
    flat[:, block, scale_at] = scale.transpose(0, 1).contiguous().unsqueeze(-1).view(torch.int8)


def read(cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype, keys: bool) -> torch.Tensor:
    """The blocks ``block_ids`` of one layer's ``cache`` as values [kv_heads, len(block_ids),
    block_size, head_dim] in ``dtype``."""
    kvh, _, bs, row = cache.shape
    d = row - SCALE_BYTES
    blocks = cache.index_select(1, block_ids).view(kvh, -1, bs * row)
    n = blocks.shape[1]
    codes = blocks[..., : bs * d]
    scales = blocks[..., bs * d :].contiguous().view(torch.float32)  # [kvh, n, bs]
    if keys:
        values = codes.view(torch.uint8).view(kvh, n, d // 4, bs, 4).permute(0, 1, 3, 2, 4).float() - K_OFFSET
    else:
        values = codes.view(kvh, n, bs // 2, d, 2).transpose(-1, -2).float()
    return (values.reshape(kvh, n, bs, d) * scales.unsqueeze(-1)).to(dtype)
