"""A Llama-family decoder (Llama 2/3, SmolLM, Qwen2) that reads and writes a paged KV cache.

RMSNorm, rotary embeddings, grouped-query attention and a SwiGLU MLP. The q/k/v and the
gate/up projections are fused into one matmul each, which matters on a CPU where the
per-call overhead of small matmuls is a large share of a decode step.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bucketserve.engine import kv_quant
from bucketserve.engine.device import cpu_has_amx
from bucketserve.engine.kernels import NativeKernels
from bucketserve.engine.weights import MultiFormatLinear
from bucketserve.errors import ConfigError

try:  # torch's flash attention over packed rows of different lengths (CUDA, fp16 / bf16)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # an older torch: each prompt chunk attends on its own
    varlen_attn = None

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# Whether a bf16 model's chunks over cached context attend in bf16 (Attention._chunk_over_cache).
_BF16_CHUNK_ATTENTION = cpu_has_amx()
# Whether a bf16 model's prompt chunks attend through the native chunk kernel (fresh ones and
# ones over cached context alike) where it is built (AVX512-BF16, head_dim 64). On a Zen 5
# EPYC without AMX its first version ran 5x torch's causal SDPA on fresh 512-token chunks (1.3
# against 7.3 ms a layer) and 1.7-3x torch's flash over cached context (with its gather); the
# second converts each key tile once a call and reaches ~650 GFLOP/s, about the bf16 GEMMs'.
# On a CPU with AMX torch's bf16 flash runs on AMX tiles and the two were not measured side by
# side, so it keeps torch's there.
_NATIVE_CHUNK_ATTENTION = not _BF16_CHUNK_ATTENTION


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: dict[str, Any] | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; bucketserve runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-architecture) models"
            )
        if model_type == "mistral" and cfg.get("sliding_window"):
            raise ConfigError("Mistral models with sliding-window attention are not supported")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "linear"):
            raise ConfigError(f"rope scaling {scaling!r} is not supported (only llama3 and linear)")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            rope_scaling=scaling,
            eos_token_ids=eos_ids,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels: NativeKernels | None = None  # set by LlamaModel.use_kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        """RMSNorm(x); with ``residual``, vLLM's fused form: residual += x, then
        (RMSNorm(residual), residual). The native kernel updates the residual in place."""
        if residual is None:
            return self._norm(x)
        if self.kernels is not None and x.is_contiguous() and residual.is_contiguous():
            return self.kernels.add_rms_norm(residual, x, self.weight, self.eps, checked=True), residual
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as the reference does (F.rms_norm on a bf16 input normalises in
        # bf16, and the embedded model then answers wrongly), then scale in the model dtype.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    s = args.rope_scaling
    if s is None:
        return inv_freq.float()
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return (inv_freq / s["factor"]).float()
    # llama3: keep high frequencies, divide low ones by factor, interpolate between.
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_mid, mid, scaled).float()


class RotaryEmbedding(nn.Module):
    def __init__(self, args: ModelArgs, max_positions: int) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(args))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (see ``apply_rope``) for ``positions`` [T], shaped [T, 1, head_dim]
        to broadcast over heads."""
        cos, sin = self.cos[positions], self.sin[positions]
        half = sin.shape[-1] // 2
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos.unsqueeze(1).to(dtype), signed_sin.unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half([a, b]) = [-b, a] written as a roll by
    half a head times a sin whose first half is negated: four ops per call instead of seven."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


@dataclass
class CachedContext:
    """A prefill chunk's view of its sequence's earlier tokens, already in the paged cache."""

    block_ids: torch.Tensor  # [blocks] the blocks that hold the sequence's first ``length`` tokens
    length: int  # tokens before the chunk


@dataclass
class PrefillRow:
    """One sequence's chunk of several tokens, packed at ``start`` in the step's tokens."""

    start: int
    length: int
    cached: CachedContext | None  # None when the chunk starts at position 0


@dataclass
class PackedRows:
    """A mixed step's rows attending in one varlen flash-attention call (``varlen_attn``, on
    CUDA) instead of a few kernels per prompt chunk and layer and the decode rows' masked
    matmuls: each row's queries (a prompt chunk's tokens, or a decode row's one) over its
    sequence's keys from position 0 to its last token (its own K/V are in the cache by
    then), gathered slot by slot into one packed key array, causal from the bottom right (a
    row's first query sees all its cached context). Built once per step by the model runner."""

    slots: torch.Tensor  # [keys] int64: each row's KV slots, position 0 to its last token
    cu_seq_q: torch.Tensor  # [rows + 1] int32: where each row's queries start in the step
    cu_seq_k: torch.Tensor  # [rows + 1] int32: where its keys start in ``slots``
    max_q: int
    max_k: int


@dataclass
class DecodeRows:
    """The paged rows' block tables and context lengths (their own token included): one row
    per decode token, and one per token of a short prompt chunk that attends row by row
    (``AttentionMetadata.paged_start``)."""

    block_tables: torch.Tensor  # [B, W] int64, padded with any valid block
    context_lens: torch.Tensor  # [B] int64
    hidden: torch.Tensor | None = None  # [1, B, 1, 1, W*block_size] for the torch path only


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the paged KV cache and what each query may see.

    The step's tokens are packed without padding: the prompt chunks first, then one token
    per decode row. The tokens from ``paged_start`` on attend one query each through the
    paged kernel (``decode``): the decode rows and, before them, the tokens of short prompt
    chunks, whose K/V are in the cache by then (``model_runner.PAGED_CHUNK_TOKENS``
    says why). Built once per step by the model runner, shared by all layers.
    """

    slot_mapping: torch.Tensor  # [T] KV slot of each token
    positions: torch.Tensor  # [T] position of each token
    prefill: list[PrefillRow]  # the chunks that attend as a whole (flash attention)
    num_prefill_tokens: int  # prompt tokens, first in the step: the linears' prompt rows
    decode: DecodeRows | None
    packed: PackedRows | None = None  # every row in one varlen call (CUDA; prefill and decode empty)

    @property
    def paged_start(self) -> int:
        """The first token that attends through ``decode``: the end of the flash chunks."""
        last = self.prefill[-1] if self.prefill else None
        return 0 if last is None else last.start + last.length

    @classmethod
    def one_prefill(cls, num_tokens: int) -> AttentionMetadata:
        """One sequence's first ``num_tokens`` tokens in slots 0..n-1 of a scratch cache (a
        calibration pass, teacher-forced scoring)."""
        return cls(
            slot_mapping=torch.arange(num_tokens),
            positions=torch.arange(num_tokens),
            prefill=[PrefillRow(0, num_tokens, None)],
            num_prefill_tokens=num_tokens,
            decode=None,
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = args.num_heads, args.num_kv_heads
        self.head_dim = args.head_dim
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.qkv_proj = MultiFormatLinear(
            args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.attention_bias
        )
        self.o_proj = MultiFormatLinear(self.q_size, args.hidden_size, bias=False)
        self.kernels: NativeKernels | None = None  # set by LlamaModel.use_kernels
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # fp32 cos, sin [positions, D]
        # Whether bf16 prompt chunks attend through the native chunk kernel (use_kernels).
        self.chunk_kernel = False

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor | None,  # [T, 1, head_dim]; None on the native path
        sin: torch.Tensor | None,
        k_cache: torch.Tensor,  # [kv_heads, blocks, block_size, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        T = x.shape[0]
        prompt_rows = meta.num_prefill_tokens  # the linears run prompt and decode rows by their own plans
        qkv = self.qkv_proj(x, prompt_rows)
        native = self.kernels is not None and self.rope_tables is not None
        if native:
            qkv = qkv if qkv.is_contiguous() else qkv.contiguous()
            # One native call rotates q and k in place and writes K and V to the cache.
            self.kernels.rope_write_kv(
                qkv,
                meta.positions,
                *self.rope_tables,
                k_cache,
                v_cache,
                meta.slot_mapping,
                self.num_heads,
                checked=True,
            )
            if not meta.prefill:  # paged rows only: attention reads q inside qkv's rows
                return self.o_proj(self._native_decode(qkv, k_cache, v_cache, meta.decode), prompt_rows)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(T, self.num_heads, self.head_dim)
            k = k.view(T, self.num_kv_heads, self.head_dim)
        else:
            assert cos is not None and sin is not None, "the torch rope needs the model's cos and sin"
            qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
            # q and k rotate together: one rope for all heads.
            qk = apply_rope(qk.reshape(T, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            v_rows = v.reshape(T, self.num_kv_heads, self.head_dim)
            if k_cache.dtype == torch.int8:
                kv_quant.write(k_cache, meta.slot_mapping, k, keys=True)
                kv_quant.write(v_cache, meta.slot_mapping, v_rows, keys=False)
            else:
                for cache, x in ((k_cache, k), (v_cache, v_rows)):
                    cache.view(self.num_kv_heads, -1, self.head_dim).index_copy_(
                        1, meta.slot_mapping, x.transpose(0, 1)
                    )
        v = v.view(T, self.num_kv_heads, self.head_dim)

        outs = []
        chunk_kernel = self.chunk_kernel and qkv.dtype == torch.bfloat16
        if meta.packed is not None:  # every row in one call
            outs.append(self._packed_attention(q, k_cache, v_cache, meta.packed))
        for row in meta.prefill:
            if chunk_kernel:
                outs.append(self._native_chunk(qkv, k, v, k_cache, v_cache, row))
                continue
            qi = q[row.start : row.start + row.length].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if row.cached is None:
                # A chunk from position 0 sees only itself: causal attention on its own K/V.
                ki = k[row.start : row.start + row.length].transpose(0, 1).unsqueeze(0)
                vi = v[row.start : row.start + row.length].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
            else:
                ki = k[row.start : row.start + row.length]
                vi = v[row.start : row.start + row.length]
                o = self._chunk_over_cache(qi, ki, vi, k_cache, v_cache, row.cached)
            outs.append(o[0].transpose(0, 1).reshape(-1, self.q_size))  # [n, H * D]
        if meta.decode is not None:
            if native:
                rows = qkv[meta.paged_start :]
                outs.append(self._native_decode(rows, k_cache, v_cache, meta.decode))
            else:
                qd = q[meta.paged_start :].unsqueeze(2)
                outs.append(self._paged_attention(qd, k_cache, v_cache, meta.decode).reshape(-1, self.q_size))
        return self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs), prompt_rows)

    def _native_chunk(
        self,
        qkv: torch.Tensor,  # [T, (heads + 2 kv_heads) * head_dim], q and k rotated
        k: torch.Tensor,  # [T, kv_heads, head_dim]: views of qkv's rows
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        row: PrefillRow,
    ) -> torch.Tensor:
        """One prompt chunk's attention by the native chunk kernel: its queries over the cached
        context (read in place) and causally over its own keys; [n, heads * head_dim]."""
        assert self.kernels is not None
        rows = slice(row.start, row.start + row.length)
        cached = row.cached
        block_ids = cached.block_ids if cached is not None else _NO_BLOCKS
        return self.kernels.chunk_attention(
            qkv[rows],
            k[rows],
            v[rows],
            k_cache,
            v_cache,
            block_ids,
            cached.length if cached is not None else 0,
            self.num_heads,
            checked=True,
        )

    def _native_decode(
        self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: DecodeRows | None
    ) -> torch.Tensor:
        """The native paged attention of the decode rows, whose rows of ``qkv`` start with q:
        [rows, heads * head_dim]."""
        assert self.kernels is not None and rows is not None
        return self.kernels.decode_attention(
            qkv,
            k_cache,
            v_cache,
            rows.block_tables,
            rows.context_lens,
            self.head_dim**-0.5,
            self.num_heads,
            checked=True,
        )

    def _packed_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, packed: PackedRows
    ) -> torch.Tensor:
        """The step's rows (their queries q [T, H, D]) in one varlen flash attention over their
        sequences' keys, gathered from the cache slot by slot: [T, H * D]."""
        kvh, d = self.num_kv_heads, self.head_dim

        def row_keys(cache: torch.Tensor) -> torch.Tensor:  # [keys, kv_heads, D]
            return cache.view(kvh, -1, d).index_select(1, packed.slots).transpose(0, 1).contiguous()

        o = _varlen_causal(q.contiguous(), row_keys(k_cache), row_keys(v_cache), packed)
        return o.reshape(-1, self.q_size)

    def _chunk_over_cache(
        self,
        q: torch.Tensor,  # [1, H, n, D]
        k: torch.Tensor,  # [n, kv_heads, D], the chunk's own keys and values
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: CachedContext,
    ) -> torch.Tensor:
        """A chunk continuing a sequence, as two flash attentions merged by their log-sum-exp:
        the chunk over its cached context (dense, no mask) and over itself (causal, so the
        upper triangle is skipped, not computed and masked). Costs what it computes: no [n x
        context] mask and no wasted triangle. In fp32 (the inputs are exact in it), which
        torch's CPU flash attention ran 1.5x faster than bf16 on AVX-512 Xeons; a bf16 model
        on a CPU with AMX runs it in bf16, as its fresh prompts, about twice as fast there."""
        kvh, d = self.num_kv_heads, self.head_dim
        _, H, n, _ = q.shape
        group = H // kvh
        if q.device.type != "cpu":  # the log-sum-exp op below is torch's CPU kernel
            return self._chunk_over_cache_masked(q, k, v, k_cache, v_cache, ctx)
        dtype = q.dtype if q.dtype == torch.bfloat16 and _BF16_CHUNK_ATTENTION else torch.float32
        qf = q.to(dtype)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        # Over the cached tokens every query sees every key, so a kv head's query group runs as
        # one [group * n] block against that head's keys: no copy of K/V per query head.
        cached_k = _gather(k_cache, ctx.block_ids, dtype, keys=True).view(1, kvh, -1, d)[:, :, : ctx.length]
        cached_v = _gather(v_cache, ctx.block_ids, dtype, keys=False).view(1, kvh, -1, d)[:, :, : ctx.length]
        o_old, lse_old = flash(qf.reshape(1, kvh, group * n, d), cached_k, cached_v)[:2]
        o_old, lse_old = o_old.reshape(1, H, n, d), lse_old.reshape(1, H, n)
        # Over its own tokens the chunk is causal, which is per query position: heads repeated.
        own_k = k.transpose(0, 1).to(dtype).repeat_interleave(group, 0).unsqueeze(0)
        own_v = v.transpose(0, 1).to(dtype).repeat_interleave(group, 0).unsqueeze(0)
        o_new, lse_new = flash(qf, own_k, own_v, is_causal=True)[:2]
        # softmax over both key sets = each part's softmax weighted by its share of the mass
        w_old = torch.sigmoid(lse_old - lse_new).unsqueeze(-1)  # [1, H, n, 1], fp32
        o_new, o_old = o_new.float(), o_old.float()
        return (o_new + (o_old - o_new) * w_old).to(q.dtype)

    def _chunk_over_cache_masked(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: CachedContext,
    ) -> torch.Tensor:
        """The same on other devices: one SDPA over the cached keys and the chunk's own under
        the chunk's causal mask (the masked triangle is computed; fine where compute is cheap)."""
        kvh, d, n = self.num_kv_heads, self.head_dim, q.shape[2]
        cached_k = _gather(k_cache, ctx.block_ids, q.dtype, keys=True).view(kvh, -1, d)[:, : ctx.length]
        cached_v = _gather(v_cache, ctx.block_ids, q.dtype, keys=False).view(kvh, -1, d)[:, : ctx.length]
        keys = torch.cat([cached_k, k.transpose(0, 1)], 1).unsqueeze(0)
        values = torch.cat([cached_v, v.transpose(0, 1)], 1).unsqueeze(0)
        visible = torch.ones(n, ctx.length + n, dtype=torch.bool, device=q.device).tril(ctx.length)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=True)

    def _paged_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: DecodeRows
    ) -> torch.Tensor:
        """The torch reference for decode rows (``--enforce-eager``, or no C++ compiler):
        q [B, H, 1, D]; gathers every row's blocks out of the cache and attends with two
        batched matmuls under the context-length mask. Returns [B, H, 1, D]."""
        B, H, L, D = q.shape
        kvh, group = self.num_kv_heads, H // self.num_kv_heads
        bt = rows.block_tables.flatten()
        S = bt.numel() // B * k_cache.shape[2]
        if k_cache.dtype == torch.int8:  # the native kernel's integer scores need an int8 query
            q = kv_quant.fake_quantize(q)
        keys = _gather(k_cache, bt, q.dtype, keys=True).view(kvh, B, S, D)
        values = _gather(v_cache, bt, q.dtype, keys=False).view(kvh, B, S, D)
        qg = q.reshape(B, kvh, group * L, D).transpose(0, 1)  # [kv_heads, B, group*L, D]
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * (D**-0.5)
        hidden = rows.hidden
        if hidden is None:
            hidden = (torch.arange(S, device=q.device).view(1, S) >= rows.context_lens.view(B, 1)).view(
                1, B, 1, 1, S
            )
        scores = scores.view(kvh, B, group, L, S).masked_fill(hidden, float("-inf"))
        probs = scores.softmax(-1).to(q.dtype).view(kvh, B, group * L, S)
        return torch.matmul(probs, values).transpose(0, 1).reshape(B, H, L, D)


_NO_BLOCKS = torch.zeros(0, dtype=torch.int64)


def _varlen_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedRows) -> torch.Tensor:
    """``varlen_attn`` causal over ``packed``'s rows, q [T, H, D], k and v [keys, kv_heads, D],
    in whichever signature this torch has: a causal window (2.11 on) or ``is_causal`` (2.10),
    and fewer kv heads than query heads (``enable_gqa``, 2.12 on) or K and V repeated."""
    assert varlen_attn is not None
    takes = _parameters(varlen_attn)
    kwargs: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in takes else {"is_causal": True}
    if "enable_gqa" in takes:
        kwargs["enable_gqa"] = True
    else:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return varlen_attn(q, k, v, packed.cu_seq_q, packed.cu_seq_k, packed.max_q, packed.max_k, **kwargs)


@functools.cache
def _parameters(fn: Callable[..., Any]) -> frozenset[str]:
    """The names ``fn`` takes (its signature is read once)."""
    return frozenset(inspect.signature(fn).parameters)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype, keys: bool) -> torch.Tensor:
    """The blocks ``block_ids`` of one layer's K (``keys``) or V cache as values [kv_heads,
    len(block_ids), block_size, head_dim] in ``dtype`` (an int8 cache's dequantized)."""
    if cache.dtype == torch.int8:
        return kv_quant.read(cache, block_ids, dtype, keys)
    return cache.index_select(1, block_ids).to(dtype)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.inter = args.intermediate_size
        self.gate_up_proj = MultiFormatLinear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = MultiFormatLinear(args.intermediate_size, args.hidden_size, bias=False)
        self.kernels: NativeKernels | None = None  # set by LlamaModel.use_kernels

    def forward(self, x: torch.Tensor, prompt_rows: int | None = None) -> torch.Tensor:
        """``prompt_rows``: as for ``MultiFormatLinear.forward``."""
        gate_up = self.gate_up_proj(x, prompt_rows)
        if self.kernels is not None and gate_up.is_contiguous():
            return self.down_proj(self.kernels.silu_and_mul(gate_up, checked=True), prompt_rows)
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up, prompt_rows)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, h, residual, cos, sin, k_cache, v_cache, meta):  # type: ignore[no-untyped-def]
        """vLLM's residual form: (this layer's output, the residual stream before it is added)."""
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, cos, sin, k_cache, v_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, meta.num_prefill_tokens), residual


@dataclass
class _FusedDecode:
    """What ``LlamaModel.fused_decode_table`` keeps: the table, and what it was built from."""

    kv_cache: torch.Tensor
    packings: int  # MultiFormatLinear.packings when it was built
    linears: list[MultiFormatLinear]  # the decoder linears, layer by layer
    table: torch.Tensor | None  # int64 [layers, 12]; None: some linear has no w4a8 or a bias
    rows_ok: dict[int, bool]  # row count -> every linear's decode plan says w4a8 there

    @classmethod
    def build(cls, model: LlamaModel, kv_cache: torch.Tensor) -> _FusedDecode:
        linears = [lin for layer in model.linears() for lin in layer]
        fused = cls(kv_cache, MultiFormatLinear.packings, linears, None, {})
        if any(lin.bias is not None or "w4a8" not in lin.packed for lin in linears):
            return fused
        rows = []
        for i, layer in enumerate(model.layers):
            lins = (
                layer.self_attn.qkv_proj,
                layer.self_attn.o_proj,
                layer.mlp.gate_up_proj,
                layer.mlp.down_proj,
            )
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(not w.is_contiguous() or w.dtype != model.embed_tokens.weight.dtype for w in norms):
                return fused
            codes_scales = [t.data_ptr() for lin in lins for t in lin.packed["w4a8"]]
            rows.append(
                [
                    *codes_scales,
                    *(w.data_ptr() for w in norms),
                    kv_cache[i, 0].data_ptr(),
                    kv_cache[i, 1].data_ptr(),
                ]
            )
        fused.table = torch.tensor(rows, dtype=torch.int64)
        return fused


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, max_positions: int | None = None) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = MultiFormatLinear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(args, max_positions or args.max_position_embeddings)
        self.kernels: NativeKernels | None = None
        self._cache_views: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._fused: _FusedDecode | None = None
        self.fuse_decode = True  # False: decode steps go layer by layer (benchmarks/decode_step.py)

    def use_kernels(self, kernels: NativeKernels | None) -> None:
        """Run attention, rope with the KV write, the residual norms, SwiGLU and w8a8 linears
        through the native kernels (None: the torch reference paths). Call it after the last
        ``.to()``: the rope kernel reads the fp32 tables as they are now."""
        self.kernels = kernels
        tables = (
            None
            if kernels is None
            else (self.rotary.cos.float().contiguous(), self.rotary.sin.float().contiguous())
        )
        for layer in self.layers:
            attn = layer.self_attn
            attn.kernels = kernels
            attn.rope_tables = tables
            attn.chunk_kernel = (
                kernels is not None
                and _NATIVE_CHUNK_ATTENTION
                and attn.head_dim == 64
                and kernels.has_chunk_attention
            )
            layer.input_layernorm.kernels = layer.post_attention_layernorm.kernels = kernels
            layer.mlp.kernels = kernels
        self.norm.kernels = kernels
        for lin in [*(lin for layer in self.linears() for lin in layer), self.lm_head]:
            lin.kernels = kernels

    def _layer_caches(self, kv_cache: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (K, V) views of ``kv_cache``, made once per cache: indexing the cache
        anew each step cost 90 dispatches a step."""
        if self._cache_views is None or self._cache_views[0] is not kv_cache:
            self._cache_views = (kv_cache, [(c[0], c[1]) for c in kv_cache])
        return self._cache_views[1]

    def fused_decode_table(self, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor | None:
        """The address table for ``NativeKernels.decode_layers_w4a8`` where this step can run
        every decoder layer in that one native call: decode rows only, and every decoder
        linear runs w4a8 at this row count (the tuning's choice at small batches on CPUs with
        AVX512-VNNI) without a bias. None where the step goes layer by layer.

        The table holds raw addresses, so it is rebuilt whenever a linear is packed anew or
        the cache changes, and kept beside the tensors it points into."""
        if not self.fuse_decode or self.kernels is None or not self.kernels.has_w4a8:
            return None
        if meta.num_prefill_tokens or meta.decode is None:
            return None
        fused = self._fused
        # Checked in O(1) a step: walking the 120 linears for their packed tensors each step
        # cost 260 us (nn.Module attribute lookups), 3% of a batch-1 step.
        if fused is None or fused.kv_cache is not kv_cache or fused.packings != MultiFormatLinear.packings:
            fused = self._fused = _FusedDecode.build(self, kv_cache)
        if fused.table is None:
            return None
        rows = meta.decode.context_lens.shape[0]
        ok = fused.rows_ok.get(rows)
        if ok is None:
            ok = fused.rows_ok[rows] = all(
                lin.decode_plan is not None and lin.decode_plan.format_for(rows) == "w4a8"
                for lin in fused.linears
            )
        return fused.table if ok else None

    def linears(self) -> list[list[MultiFormatLinear]]:
        """Each decoder layer's linears, in the order they run."""
        return [
            [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
            for layer in self.layers
        ]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T], the step's tokens packed (see AttentionMetadata)
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,  # [layers, 2, kv_heads, num_blocks, block_size, head_dim]
        meta: AttentionMetadata,
        logits_index: torch.Tensor,  # [N] indices into [T] of the tokens to score
    ) -> torch.Tensor:
        """Logits (fp32) of the tokens at ``logits_index``, after writing every token's KV."""
        h = self.embed_tokens(input_ids)
        table = self.fused_decode_table(meta, kv_cache)
        if table is not None:
            assert self.kernels is not None and meta.decode is not None  # by fused_decode_table
            first = self.layers[0]
            h, residual = first.input_layernorm(h), h
            attn = first.self_attn
            self.kernels.decode_layers_w4a8(
                h,
                residual,
                table,
                meta.positions,
                *attn.rope_tables,
                meta.slot_mapping,
                meta.decode.block_tables,
                meta.decode.context_lens,
                heads=attn.num_heads,
                kv_heads=attn.num_kv_heads,
                head_dim=attn.head_dim,
                inter=first.mlp.inter,
                num_blocks=kv_cache.shape[3],
                block_size=kv_cache.shape[4],
                eps=first.input_layernorm.eps,
                kv_int8=kv_cache.dtype == torch.int8,
            )
        else:
            # The reference rope's cos and sin (the native one reads the fp32 tables itself).
            cos, sin = self.rotary(positions, h.dtype) if self.kernels is None else (None, None)
            residual = None
            for layer, (k_cache, v_cache) in zip(self.layers, self._layer_caches(kv_cache), strict=True):
                h, residual = layer(h, residual, cos, sin, k_cache, v_cache, meta)
        h, _ = self.norm(h[logits_index], residual[logits_index])
        return self.lm_head(h).float()  # one plan for its prompt and decode rows (autotune)

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face Llama/Qwen2 weights, fusing q/k/v and gate/up as this model does."""
        own: dict[str, torch.Tensor] = {}
        pending: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if any(p in name for p in (".q_proj.", ".k_proj.", ".v_proj.", ".gate_proj.", ".up_proj.")):
                pending[name] = tensor
            else:
                own[name] = tensor
        for i in range(self.args.num_layers):
            a, m = f"layers.{i}.self_attn", f"layers.{i}.mlp"
            for kind in ("weight", "bias"):
                parts = [pending.pop(f"{a}.{p}_proj.{kind}", None) for p in "qkv"]
                if all(t is not None for t in parts):
                    own[f"{a}.qkv_proj.{kind}"] = torch.cat(parts)
            own[f"{m}.gate_up_proj.weight"] = torch.cat(
                [pending.pop(f"{m}.gate_proj.weight"), pending.pop(f"{m}.up_proj.weight")]
            )
        if pending:
            raise ConfigError(f"unexpected weights in checkpoint: {sorted(pending)[:5]}")
        if self.args.tie_word_embeddings:
            own.pop("lm_head.weight", None)
            own["lm_head.weight"] = own["embed_tokens.weight"]
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.startswith("rotary.")]
        if missing or unexpected:
            raise ConfigError(
                f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
