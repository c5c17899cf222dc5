"""The CPU fast path against its references: the native decode kernel against the torch
attention, each weight format against the fp32 weight, the tuned plan and its cache, and an
engine on the fast path against one with ``enforce_eager``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bucketserve.config import KV_CACHE_DTYPES
from bucketserve.engine import autotune, kernels, kv_quant
from bucketserve.engine.calibration import record_input_ranges
from bucketserve.engine.kv_quant import SCALE_BYTES
from bucketserve.engine.loader import load_state_dict, read_config
from bucketserve.engine.model import (
    Attention,
    AttentionMetadata,
    CachedContext,
    DecodeRows,
    LlamaModel,
    ModelArgs,
)
from bucketserve.engine.weights import (
    PROMPT_W8A8_TOLERANCE,
    FormatPlan,
    MultiFormatLinear,
    dequantize_int4,
    dequantize_w4a8,
    int8_matmul_reference,
    quantize_int4,
    quantize_int8,
    quantize_w4a8,
    w4a8_codes,
    w4a8_matmul_reference,
)
from bucketserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> kernels.NativeKernels:
    k = kernels.load(tmp_path_factory.mktemp("kernels"))
    if k is None:
        pytest.fail("the native kernels did not build: install a C++ compiler (g++)")
    return k


def _attention(heads: int, kv_heads: int, head_dim: int) -> Attention:
    return Attention(_model_args(heads, kv_heads, head_dim))


def _model_args(heads: int, kv_heads: int, head_dim: int, num_layers: int = 1) -> ModelArgs:
    return ModelArgs(
        vocab_size=16,
        hidden_size=heads * head_dim,
        intermediate_size=32,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_bias=False,
    )


def _execute_steps(runner, bm, steps) -> None:  # type: ignore[no-untyped-def]
    """Run each step, a sequence of (sequence, new tokens) rows, through ``runner`` as the
    engine would: KV blocks allocated first, then the computed and sampled tokens recorded."""
    from bucketserve.core.scheduler import ScheduledBatch

    for step in steps:
        for s, n in step:
            bm.allocate(s, s.num_computed_tokens + n)
        result = runner.execute(ScheduledBatch([s for s, _ in step], [n for _, n in step]))
        for (s, n), tok in zip(step, result.tokens, strict=True):
            s.num_computed_tokens += n
            if tok is not None:
                s.append_token(tok)


@pytest.mark.parametrize(("heads", "kv_heads", "cached", "n"), [(9, 3, 37, 20), (4, 2, 16, 1), (8, 8, 5, 64)])
def test_a_chunk_over_cached_context_equals_one_masked_attention(
    heads: int, kv_heads: int, cached: int, n: int
) -> None:
    """The CPU path (two flash attentions merged by log-sum-exp, the query group as one block
    over the cached keys) computes the chunk's causal attention over cache and itself, as the
    masked SDPA that other devices run."""
    torch.manual_seed(heads + n)
    attn, d, block = _attention(heads, kv_heads, 16), 16, 8
    blocks = (cached + block - 1) // block
    k_cache = torch.randn(kv_heads, blocks + 3, block, d)
    v_cache = torch.randn(kv_heads, blocks + 3, block, d)
    ctx = CachedContext(torch.tensor([2, 0, 4, 1, 3][: max(blocks, 1)]), cached)
    q = torch.randn(1, heads, n, d)
    k, v = torch.randn(n, kv_heads, d), torch.randn(n, kv_heads, d)
    fast = attn._chunk_over_cache(q, k, v, k_cache, v_cache, ctx)
    masked = attn._chunk_over_cache_masked(q, k, v, k_cache, v_cache, ctx)
    torch.testing.assert_close(fast, masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bf16_attention", [False, True])
def test_a_bf16_chunk_over_cached_context_attends_in_the_dtype_its_cpu_runs_fastest(
    monkeypatch: pytest.MonkeyPatch, bf16_attention: bool
) -> None:
    """A bf16 model's chunk over cached context attends in bf16 where the CPU has AMX and in
    fp32 elsewhere (model._BF16_CHUNK_ATTENTION); either way it is the masked attention of
    the same bf16 inputs, within bf16's rounding of the probabilities."""
    import bucketserve.engine.model as model_module

    monkeypatch.setattr(model_module, "_BF16_CHUNK_ATTENTION", bf16_attention)
    torch.manual_seed(0)
    heads, kv_heads, d, block, cached, n = 9, 3, 64, 16, 70, 24
    attn = _attention(heads, kv_heads, d)
    blocks = (cached + block - 1) // block
    k_cache = torch.randn(kv_heads, blocks + 2, block, d, dtype=torch.bfloat16)
    v_cache = torch.randn(kv_heads, blocks + 2, block, d, dtype=torch.bfloat16)
    ctx = CachedContext(torch.tensor([3, 0, 4, 1, 2][:blocks]), cached)
    q = torch.randn(1, heads, n, d, dtype=torch.bfloat16)
    k, v = (
        torch.randn(n, kv_heads, d, dtype=torch.bfloat16),
        torch.randn(n, kv_heads, d, dtype=torch.bfloat16),
    )
    dtypes = []
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    class Recording:  # records the dtype each flash attention ran in
        def __call__(self, q, *args, **kwargs):  # type: ignore[no-untyped-def]
            dtypes.append(q.dtype)
            return flash(q, *args, **kwargs)

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", Recording())
    fast = attn._chunk_over_cache(q, k, v, k_cache, v_cache, ctx)
    exact = attn._chunk_over_cache_masked(
        q.float(), k.float(), v.float(), k_cache.float(), v_cache.float(), ctx
    )
    assert dtypes == [torch.bfloat16 if bf16_attention else torch.float32] * 2
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), exact, atol=2e-2, rtol=2e-2)


def _random_caches(
    int8: bool,
    dtype: torch.dtype,
    kv_heads: int,
    num_blocks: int,
    block_size: int,
    head_dim: int,
    key_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random K and V caches, every slot filled: int8 ones written by the torch quantizer from
    normal values (keys x 3), else normal values (keys x ``key_scale``) in ``dtype``."""
    if int8:
        k_cache = torch.zeros(kv_heads, num_blocks, block_size, head_dim + SCALE_BYTES, dtype=torch.int8)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.arange(num_blocks * block_size)
        kv_quant.write(k_cache, slots, torch.randn(len(slots), kv_heads, head_dim) * 3, keys=True)
        kv_quant.write(v_cache, slots, torch.randn(len(slots), kv_heads, head_dim), keys=False)
        return k_cache, v_cache
    k_cache = (torch.randn(kv_heads, num_blocks, block_size, head_dim) * key_scale).to(dtype)
    return k_cache, torch.randn(kv_heads, num_blocks, block_size, head_dim).to(dtype)


@pytest.mark.parametrize("cache", ["dtype", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"), [(9, 3, 64, 16), (4, 2, 16, 4), (8, 8, 128, 16)]
)
def test_native_decode_attention_equals_the_torch_reference(
    native: kernels.NativeKernels,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    cache: str,
) -> None:
    """On a cache in the query's dtype (bf16 with head_dim 64 and blocks of 16: the VDPBF16PS
    kernel) and on an int8 one ((9, 3, 64, 16): the VNNI kernel, else the scalar one; both
    score with the query quantized to int8 as the torch reference does, and the VNNI kernel
    weighs V in int16, 15 bits against the largest weight)."""
    torch.manual_seed(0)
    rows, num_blocks, width = 7, 64, 9
    k_cache, v_cache = _random_caches(cache == "int8", dtype, kv_heads, num_blocks, block_size, head_dim)
    tables = torch.randperm(num_blocks)[: rows * width].view(rows, width).contiguous()
    lens = torch.tensor(
        [1, block_size, block_size + 1, 2 * block_size - 1, width * block_size, 5, 3 * block_size]
    )
    q = torch.randn(rows, heads, head_dim).to(dtype)
    # The query rows as the kernel meets them in the model: inside the qkv projection's rows.
    qkv = torch.cat([q.view(rows, -1), torch.randn(rows, 2 * kv_heads * head_dim).to(dtype)], 1)
    got = native.decode_attention(qkv, k_cache, v_cache, tables, lens, head_dim**-0.5, heads)
    # Over int8, the reference in fp32 (the kernels' own scores): only V's weights and the
    # output's rounding differ.
    ref_q = q.float() if cache == "int8" else q
    ref = _attention(heads, kv_heads, head_dim)._paged_attention(
        ref_q.unsqueeze(2), k_cache, v_cache, DecodeRows(tables, lens)
    )
    tol = {("dtype", torch.float32): 1e-5, ("int8", torch.float32): 1e-3}.get((cache, dtype), 2e-2)
    torch.testing.assert_close(
        got.view(rows, heads, head_dim).float(), ref.squeeze(2).float(), atol=tol, rtol=tol
    )
    # The last rows alone, as a step whose decode rows follow its prefill rows.
    tail = native.decode_attention(qkv[3:], k_cache, v_cache, tables[3:], lens[3:], head_dim**-0.5, heads)
    torch.testing.assert_close(tail, got[3:])


@pytest.mark.parametrize("cache", ["bf16", "int8"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "cached", "n"),
    # one query; a chunk inside one position tile; tiles and key tiles cut mid-block; fresh;
    # a chunk whose cached context ends mid-block; one query head per kv head; keys over more
    # than two key tiles, the last one partial
    [
        (9, 3, 0, 1),
        (9, 3, 37, 20),
        (9, 3, 45, 70),
        (9, 3, 0, 33),
        (4, 2, 100, 17),
        (2, 2, 16, 48),
        (9, 3, 130, 40),
    ],
)
def test_native_chunk_attention_equals_one_masked_attention(
    native: kernels.NativeKernels, cache: str, heads: int, kv_heads: int, cached: int, n: int
) -> None:
    """A bf16 chunk's native attention (cached keys read in place from a bf16 or int8 cache,
    its own from its qkv rows, causal) is the masked SDPA over the same keys in fp32, within
    bf16's rounding of the weights and the output."""
    if not native.has_chunk_attention:
        pytest.skip("the chunk kernel needs AVX512-BF16")
    torch.manual_seed(cached + n)
    head_dim, block_size, num_blocks = 64, 16, 24
    k_cache, v_cache = _random_caches(
        cache == "int8", torch.bfloat16, kv_heads, num_blocks, block_size, head_dim, key_scale=3.0
    )
    ctx = CachedContext(torch.randperm(num_blocks)[: (cached + block_size - 1) // block_size], cached)
    # The chunk's rows as the kernel meets them in the model: q, k and v inside qkv's rows.
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim).bfloat16()
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    k = qkv[:, q_size : q_size + kv_size].view(n, kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(n, kv_heads, head_dim)
    got = native.chunk_attention(qkv, k, v, k_cache, v_cache, ctx.block_ids, cached, heads)
    q = qkv[:, :q_size].float().view(n, heads, head_dim).transpose(0, 1).unsqueeze(0)
    ref = _attention(heads, kv_heads, head_dim)._chunk_over_cache_masked(
        q, k.float(), v.float(), _float(k_cache, keys=True), _float(v_cache, keys=False), ctx
    )
    torch.testing.assert_close(got.float(), ref[0].transpose(0, 1).reshape(n, -1), atol=2e-2, rtol=2e-2)


def test_native_chunk_attention_refuses_inputs_it_does_not_run(native: kernels.NativeKernels) -> None:
    """fp32 queries, block ids that cannot hold the cached tokens, and a head size the kernel
    was not built for are refused with a message instead of read past."""
    if not native.has_chunk_attention:
        pytest.skip("the chunk kernel needs AVX512-BF16")
    k_cache = torch.zeros(1, 4, 16, 64, dtype=torch.bfloat16)
    qkv = torch.zeros(3, 3 * 64, dtype=torch.bfloat16)
    k, v = qkv[:, 64:128].view(3, 1, 64), qkv[:, 128:].view(3, 1, 64)
    with pytest.raises(ValueError, match="bfloat16"):
        native.chunk_attention(
            qkv.float(), k.float(), v.float(), k_cache.float(), k_cache.float(), torch.tensor([0]), 5, 1
        )
    with pytest.raises(ValueError, match="do not hold"):
        native.chunk_attention(qkv, k, v, k_cache, k_cache, torch.tensor([0]), 17, 1)
    with pytest.raises(ValueError, match="do not hold"):
        native.chunk_attention(qkv, k, v, k_cache, k_cache, torch.tensor([4]), 5, 1)
    wide = torch.zeros(1, 4, 16, 128, dtype=torch.bfloat16)
    qkv128 = torch.zeros(3, 3 * 128, dtype=torch.bfloat16)
    k128, v128 = qkv128[:, 128:256].view(3, 1, 128), qkv128[:, 256:].view(3, 1, 128)
    with pytest.raises(ValueError, match="head_dim 64"):
        native.chunk_attention(qkv128, k128, v128, wide, wide, torch.tensor([0]), 5, 1)


def _float(cache: torch.Tensor, keys: bool) -> torch.Tensor:
    """A K (``keys``) or V cache as fp32 values [kv_heads, blocks, block_size, head_dim],
    an int8 one dequantized."""
    if cache.dtype != torch.int8:
        return cache.float()
    return kv_quant.read(cache, torch.arange(cache.shape[1]), torch.float32, keys)


@pytest.mark.parametrize("keys", [True, False])
def test_an_int8_kv_cache_gives_back_each_token_within_half_a_step_of_its_scale(keys: bool) -> None:
    torch.manual_seed(0)
    kvh, nb, bs, d = 3, 6, 4, 16
    cache = torch.zeros(kvh, nb, bs, d + SCALE_BYTES, dtype=torch.int8)
    slots = torch.randperm(nb * bs)[:17]
    x = torch.randn(17, kvh, d) * torch.tensor([0.01, 1.0, 300.0]).view(1, kvh, 1)
    x[0, 0] = 0
    kv_quant.write(cache, slots, x, keys=keys)
    back = kv_quant.read(cache, torch.arange(nb), torch.float32, keys=keys).view(kvh, nb * bs, d)[:, slots]
    back = back.transpose(0, 1)  # [tokens, kv heads, d], as written
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    assert ((back - x).abs() <= scale * 0.5001).all()
    assert back[0, 0].eq(0).all()  # an all-zero row stays zero
    unwritten = torch.ones(nb * bs, dtype=torch.bool)
    unwritten[slots] = False
    all_back = kv_quant.read(cache, torch.arange(nb), torch.float32, keys=keys).view(kvh, nb * bs, d)
    assert all_back[:, unwritten].eq(0).all()  # a write touches its own slot only


def test_an_int8_kv_cache_holds_a_token_in_its_codes_and_one_scale_per_row() -> None:
    from bucketserve.engine.kv_cache import allocate_kv_cache, kv_bytes_per_token
    from bucketserve.errors import ConfigError

    args = _model_args(9, 3, 64, num_layers=2)
    assert kv_bytes_per_token(args, torch.int8) == 2 * 2 * 3 * (64 + SCALE_BYTES)
    assert kv_bytes_per_token(args, torch.bfloat16) == 2 * 2 * 3 * 64 * 2
    cache = allocate_kv_cache(args, 4, 16, torch.int8, torch.device("cpu"))
    assert cache.shape == (2, 2, 3, 4, 16, 64 + SCALE_BYTES)
    with pytest.raises(ConfigError, match="even --block-size") as refused:  # V's codes lie in token pairs
        allocate_kv_cache(args, 4, 15, torch.int8, torch.device("cpu"))
    advised = str(refused.value).rsplit("--kv-cache-dtype ", 1)[1]
    assert advised in KV_CACHE_DTYPES  # the way out it names is a choice the option takes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 12])  # the vector quantizer and the scalar one
def test_native_int8_kv_write_stores_the_bytes_the_torch_write_stores(
    native: kernels.NativeKernels, dtype: torch.dtype, head_dim: int
) -> None:
    torch.manual_seed(0)
    heads, kvh, bs, nb, tokens = 4, 2, 16, 5, 37
    qkv = (torch.randn(tokens, (heads + 2 * kvh) * head_dim) * 4).to(dtype)
    qkv[3, heads * head_dim : (heads + 1) * head_dim] = 0  # an all-zero K row
    positions = torch.randint(0, 100, (tokens,))
    cos, sin = torch.randn(100, head_dim), torch.randn(100, head_dim)
    slots = torch.randperm(nb * bs)[:tokens]
    k_cache = torch.zeros(kvh, nb, bs, head_dim + SCALE_BYTES, dtype=torch.int8)
    v_cache = torch.zeros_like(k_cache)
    native.rope_write_kv(qkv, positions, cos, sin, k_cache, v_cache, slots, heads)
    rotated = qkv.view(tokens, heads + 2 * kvh, head_dim)  # rotated in place by the call
    want_k, want_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    kv_quant.write(want_k, slots, rotated[:, heads : heads + kvh], keys=True)
    kv_quant.write(want_v, slots, rotated[:, heads + kvh :], keys=False)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_auto_takes_an_int8_kv_cache_where_its_vector_kernel_runs_and_int8_is_given_when_asked(
    native, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    from bucketserve.engine.kv_cache import resolve_kv_cache_dtype

    bf16, fp32, int8 = torch.bfloat16, torch.float32, torch.int8
    smollm = _model_args(9, 3, 64)  # the embedded model's head size and query group
    assert not native.int8_attention_vectorized(128, 1, 16)
    assert not native.int8_attention_vectorized(64, 3, 8)
    vectorized = native.int8_attention_vectorized(64, 3, 16)  # where the CPU has AVX512-VNNI
    # auto: int8 where its vector kernel runs, else the compute dtype; model: the compute dtype
    assert resolve_kv_cache_dtype("auto", bf16, native, smollm, 16) == (int8 if vectorized else bf16)
    for dtype, loaded, args, block_size in (
        (fp32, native, smollm, 16),
        (bf16, None, smollm, 16),
        (bf16, native, smollm, 8),
        (bf16, native, _model_args(8, 8, 128), 16),
    ):
        assert resolve_kv_cache_dtype("auto", dtype, loaded, args, block_size) == dtype
    assert resolve_kv_cache_dtype("model", bf16, native, smollm, 16) == bf16
    assert resolve_kv_cache_dtype("model", fp32, native, smollm, 16) == fp32
    assert "scalar one runs" not in caplog.text  # auto and model never warn
    caplog.clear()
    assert resolve_kv_cache_dtype("int8", bf16, native, smollm, 16) == int8
    assert ("scalar one runs" in caplog.text) != vectorized
    for dtype, loaded, args, block_size in (
        (fp32, native, smollm, 16),
        (bf16, None, smollm, 16),
        (bf16, native, smollm, 8),
        (bf16, native, _model_args(8, 8, 128), 16),
    ):
        caplog.clear()
        assert resolve_kv_cache_dtype("int8", dtype, loaded, args, block_size) == int8  # asked for: given
        assert "scalar one runs" in caplog.text


def test_native_decode_attention_refuses_a_context_longer_than_its_table(
    native: kernels.NativeKernels,
) -> None:
    k = torch.zeros(1, 4, 4, 16)
    with pytest.raises(ValueError, match="exceeds its block table"):
        native.decode_attention(
            torch.zeros(1, 16), k, k, torch.zeros(1, 2, dtype=torch.long), torch.tensor([9]), 1.0, 1
        )


@pytest.mark.parametrize("rows", [1, 3, 130])
def test_native_argmax_answers_as_torch_argmax_does_ties_and_nans_included(native, rows: int) -> None:  # type: ignore[no-untyped-def]
    vocab = 49_152 + 7  # not a multiple of the kernel's 64-value scan
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows))
    logits[0, 100] = logits[0, vocab - 1] = logits[0].max() + 1  # a tie: the first wins
    if rows > 1:
        logits[1, :] = float("-inf")  # nothing finite: index 0
    if rows > 2:
        logits[2, 5000] = float("nan")  # a NaN is torch's largest
        logits[2, 9] = float("inf")
    assert native.argmax_rows(logits) == logits.argmax(-1).tolist()
    assert native.argmax_rows(logits[:, :50]) == logits[:, :50].argmax(-1).tolist()  # a strided view
    assert native.argmax_rows(logits)[0] == 100


def test_kernels_fall_back_to_none_without_a_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert kernels.load(tmp_path / "fresh") is None


def _grid_weight(n: int, k: int) -> torch.Tensor:
    """A weight already on an int4 grid of 32-wide groups, as a de-quantized Q4_1 GGUF is."""
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (n, k))
    codes[:, ::32] = 0  # every group spans the full code range, so its scale is recovered exactly
    codes[:, 1::32] = 15
    scale = torch.rand(n, k // 32, 1) * 0.01 + 0.001
    low = torch.randn(n, k // 32, 1) * 0.05
    return (codes.view(n, k // 32, 32).float() * scale + low).view(n, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_native_int8_matmul_equals_the_torch_reference(native, dtype: torch.dtype, rows: int) -> None:  # type: ignore[no-untyped-def]
    """The w8a8 format's native quantize and rescale compute what its torch ops do."""
    w = torch.randn(96, 128)
    smooth = torch.linspace(0.5, 2, 128)
    q, scale = quantize_int8(w * smooth)
    x = (torch.randn(rows, 128) * torch.linspace(0.1, 3, 128)).to(dtype)
    args = (q.t(), scale.float(), (1 / smooth).contiguous())
    got = native.int8_matmul(x, *args)
    want = int8_matmul_reference(x, *args)
    assert got.dtype == dtype and got.shape == (rows, 96)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2 * want.abs().max().item(), rtol=0)
    exact = x.float() @ w.T  # the smoothing cancels: (x / s) @ (W * s).T
    torch.testing.assert_close(got.float(), exact, atol=3e-2 * exact.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_native_norm_and_swiglu_round_where_torch_does(native, dtype: torch.dtype, rows: int) -> None:  # type: ignore[no-untyped-def]
    """Widths that leave a partial vector (72, 40), values up to ~40: the residual sum is
    the reference's to the bit, the normalised and SwiGLU outputs to one unit of the last
    place (the vector paths sum the squares and take the exponential in another order), and
    in bfloat16 nearly all SwiGLU outputs to the bit."""
    one_ulp = 2**-7 if dtype == torch.bfloat16 else 2e-6
    residual = (torch.randn(rows, 72) * 8).to(dtype)
    x = (torch.randn(rows, 72) * 8).to(dtype)
    weight = torch.randn(72).to(dtype)
    want_residual = residual + x
    r = want_residual.float()
    normed = (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    want = weight * normed
    got_residual = residual.clone()
    got = native.add_rms_norm(got_residual, x, weight, 1e-5)
    assert torch.equal(got_residual, want_residual)
    torch.testing.assert_close(got, want, rtol=one_ulp, atol=1e-6)

    gate_up = (torch.randn(rows, 80) * 10).to(dtype)
    gate, up = gate_up[:, :40], gate_up[:, 40:]
    want = torch.nn.functional.silu(gate.float()).to(dtype) * up
    got = native.silu_and_mul(gate_up)
    torch.testing.assert_close(got, want, rtol=2 * one_ulp, atol=1e-6)
    if dtype == torch.bfloat16:  # silu rounded before the product, as torch rounds it
        assert (got == want).float().mean() >= 0.95


def test_w8a8_smoothing_keeps_an_outlier_channel_from_rounding_the_others_away() -> None:
    """One input channel 100x the others: one scale per token leaves the rest a few int8
    steps; smoothing by the calibrated ranges (SmoothQuant) brings the error back down."""
    torch.manual_seed(0)
    lin = MultiFormatLinear(128, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 128))
    x = torch.randn(16, 128)
    x[:, 3] *= 100
    exact = x @ lin.weight.detach().T

    def error() -> float:
        lin.pack(FormatPlan.single("w8a8"), lin.candidate_formats("w8a8", only={"w8a8"}))
        return float((lin(x) - exact).abs().max() / exact.abs().max())

    plain = error()
    lin.input_absmax = x.abs().amax(0)
    smoothed = error()
    assert smoothed < plain / 3, (plain, smoothed)


def test_calibration_records_every_linear_input_range(tiny_model_dir: Path) -> None:
    model = LlamaModel(ModelArgs.from_hf_config(read_config(tiny_model_dir)))
    model.load_hf_state_dict(load_state_dict(tiny_model_dir))
    record_input_ranges(model, list(range(3, 40)))
    for lin in [*(lin for layer in model.linears() for lin in layer), model.lm_head]:
        assert lin.input_absmax is not None and lin.input_absmax.shape == (lin.in_features,)
        assert bool((lin.input_absmax > 0).all())


def test_int4_reproduces_a_weight_that_was_4_bit_already() -> None:
    w = _grid_weight(64, 128)
    codes, sz = quantize_int4(w)
    assert (dequantize_int4(codes, sz) - w).abs().max() < 1e-6


def test_w4a8_layout_holds_the_int4_codes_and_scales() -> None:
    """The w4a8 kernel's layout keeps quantize_int4's codes, and its float16 scales and mins
    give back a weight that was 4-bit already."""
    w = _grid_weight(64, 128)
    packed, scales = quantize_w4a8(w)
    assert packed.shape == (4, 4, 4, 64) and packed.dtype == torch.uint8
    assert scales.shape == (4, 4, 2, 16) and scales.dtype == torch.float16
    assert torch.equal(w4a8_codes(packed).long(), quantize_int4(w)[0].long())
    torch.testing.assert_close(dequantize_w4a8(packed, scales), w, atol=2e-3 * w.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_native_w4a8_matmul_equals_the_torch_reference(native, dtype: torch.dtype, rows: int) -> None:  # type: ignore[no-untyped-def]
    """int4 codes times int8 activations with int32 sums: the torch reference's numbers, for
    every count of input rows the kernel unrolls (1-4, and more in chunks of 4)."""
    if not native.has_w4a8:
        pytest.skip("this CPU has no AVX512-VNNI: the w4a8 format is not offered here")
    torch.manual_seed(rows)
    w = torch.randn(96, 128) * 0.05
    packed, scales = quantize_w4a8(w)
    x = (torch.randn(rows, 128) * torch.linspace(0.1, 3, 128)).to(dtype)
    got = native.w4a8_matmul(x, packed, scales)
    want = w4a8_matmul_reference(x, packed, scales)
    assert got.dtype == dtype and got.shape == (rows, 96)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2 * want.abs().max().item(), rtol=0)
    exact = x.float() @ dequantize_w4a8(packed, scales).T  # the activations' rounding aside
    torch.testing.assert_close(got.float(), exact, atol=3e-2 * exact.abs().max().item(), rtol=0)
    with pytest.raises(ValueError, match="codes"):
        native.w4a8_matmul(x, packed[:, :2].contiguous(), scales)


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4", "w8a8", "w4a8"])
def test_every_weight_format_computes_the_same_linear(native, fmt: str, rows: int) -> None:  # type: ignore[no-untyped-def]
    if fmt == "w4a8" and not native.has_w4a8:
        pytest.skip("this CPU has no AVX512-VNNI: the w4a8 format is not offered here")
    lin = MultiFormatLinear(128, 64)
    lin.kernels = native  # w8a8 and w4a8 run their native kernels
    with torch.no_grad():
        lin.weight.copy_(_grid_weight(64, 128))
    formats = lin.candidate_formats({"int4": "int4", "w8a8": "w8a8", "w4a8": "auto"}.get(fmt, "int8"))
    lin.pack(FormatPlan.single(fmt), formats)
    x = torch.randn(rows, 128)
    ref = x @ lin.weight.detach().T
    tol = {"fp32": 1e-5, "bf16": 3e-2, "int8": 3e-2, "int4": 3e-2, "w8a8": 3e-2, "w4a8": 3e-2}[fmt]
    torch.testing.assert_close(lin(x), ref, atol=tol * ref.abs().max().item(), rtol=0)


def test_tuning_gives_prompt_tokens_a_plan_with_int8_activations_and_one_without(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # w8a8 the fastest format at every size: every plan takes it but the exact-activation
    # prompt plan, which takes the fastest format that keeps the activations exact.
    table = {"int8": 2.0, "w8a8": 1.0, "fp32": 3.0, "bf16": 4.0}
    layers, head = _tuning_case(monkeypatch, lambda f, m: table[f])
    for quantization in ("auto", "w8a8"):
        plans = autotune.tune(layers, head, torch.float32, quantization, None)
        assert plans.layers.formats == plans.decode_layers.formats == plans.lm_head.formats == ("w8a8",)
        assert plans.exact_layers.formats == ("int8",)
    lin = MultiFormatLinear(128, 64)
    torch.nn.init.normal_(lin.weight)
    assert "w8a8" not in lin.candidate_formats("none")


def test_w4a8_is_offered_only_with_the_native_kernel_and_never_under_none(
    native, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """w4a8 rounds the activations as w8a8 does: with it the fastest format, the
    exact-activation prompt plan leaves it out; it needs the native kernel, and nothing
    offers it under none."""
    if not native.has_w4a8:
        pytest.skip("this CPU has no AVX512-VNNI: the w4a8 format is not offered here")
    table = {"int4": 2.0, "w4a8": 1.0, "int8": 2.5, "w8a8": 1.5, "fp32": 3.0, "bf16": 4.0}
    layers, head = _tuning_case(monkeypatch, lambda f, m: table[f])
    for lin in (layers[0][0], layers[1][0], head):
        with torch.no_grad():
            lin.weight.copy_(_grid_weight(lin.out_features, lin.in_features))
        lin.kernels = native
    plans = autotune.tune(layers, head, torch.float32, "auto", None)
    assert plans.decode_layers.formats == plans.layers.formats == ("w4a8",)
    assert plans.exact_layers.formats == ("int4",)
    assert "w4a8" not in layers[0][0].candidate_formats("none")
    layers[0][0].kernels = None
    assert "w4a8" not in layers[0][0].candidate_formats("auto")


def test_w8a8_error_is_small_for_flat_inputs_and_large_for_an_unsmoothed_outlier_channel() -> None:
    """The measurement behind auto's choice per linear: w8a8's relative output error, low
    where one scale per token fits every channel, high where one channel dwarfs the others
    and no calibrated range smooths it."""
    torch.manual_seed(0)
    lin = MultiFormatLinear(128, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 128))
    flat = torch.randn(32, 128)
    spiky = flat.clone()
    spiky[:, 3] *= 30
    assert lin.w8a8_error(flat) < PROMPT_W8A8_TOLERANCE < lin.w8a8_error(spiky)
    lin.input_absmax = spiky.abs().amax(0)  # calibrated: SmoothQuant moves the spike into W
    assert lin.w8a8_error(spiky) < PROMPT_W8A8_TOLERANCE / 2


def test_auto_runs_prompt_tokens_in_w8a8_only_where_the_calibration_text_allows(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each decoder linear's w8a8 error is measured on the calibration text; a linear over the
    bound gets the exact-activation prompt plan, the others the fastest plan; decode rows and
    --quantization w8a8 (which asks for it everywhere) are not affected."""
    from bucketserve.engine import optimize
    from bucketserve.engine.calibration import record_prompt_w8a8_errors

    model = LlamaModel(ModelArgs.from_hf_config(read_config(tiny_model_dir)))
    model.load_hf_state_dict(load_state_dict(tiny_model_dir))
    model.to(torch.bfloat16)  # auto quantizes with bfloat16 compute only
    ids = list(range(3, 60))
    record_input_ranges(model, ids)
    record_prompt_w8a8_errors(model, ids)
    errors = [lin.prompt_w8a8_error for layer in model.linears() for lin in layer]
    assert all(e is not None and 0 < e < 1 for e in errors), errors

    fast = FormatPlan.single("w8a8")
    exact = FormatPlan.single("fp32")
    plans = autotune.TunedPlans(fast, exact, fast, fast, {})
    monkeypatch.setattr(optimize, "tune", lambda *a, **k: plans)
    monkeypatch.setattr(optimize.native, "load", lambda cache_dir: None)
    bound = sorted(errors)[len(errors) // 2]  # half the linears over it, half within
    monkeypatch.setattr(optimize, "PROMPT_W8A8_TOLERANCE", bound)
    monkeypatch.setattr(optimize, "record_prompt_w8a8_errors", lambda m, ids: None)  # measured above
    optimize.optimize_for_cpu(model, tiny_model_dir, "auto", tmp_path, ids)
    for layer in model.linears():
        for lin in layer:
            want = exact if lin.prompt_w8a8_error > bound else fast
            assert lin.plan == want and lin.decode_plan == fast
    assert {lin.plan for layer in model.linears() for lin in layer} == {fast, exact}

    # A later start reads the errors from the cache instead of measuring them again.
    def measure_again(m: LlamaModel, ids: list[int]) -> None:
        raise AssertionError("measured again")

    monkeypatch.setattr(optimize, "record_prompt_w8a8_errors", measure_again)
    for layer in model.linears():
        for lin in layer:
            lin.prompt_w8a8_error = None
    optimize.optimize_for_cpu(model, tiny_model_dir, "auto", tmp_path, ids)
    assert [lin.prompt_w8a8_error for layer in model.linears() for lin in layer] == errors


def test_a_linear_runs_each_kind_of_row_by_its_plan_and_a_mixed_step_in_one_matmul() -> None:
    """Rows of one kind run in their plan's format for their count; a step with both kinds
    runs one matmul: in the format both plans give where they agree, else in the prompt
    plan's format at the step's row count (the prompt plan's formats keep prompt tokens
    accurate; decode rows lose nothing by them)."""
    lin = MultiFormatLinear(128, 64)
    with torch.no_grad():
        lin.weight.copy_(_grid_weight(64, 128))
    prompt_plan, decode_plan = FormatPlan((4, 512), ("int4", "fp32")), FormatPlan((2, 512), ("int8", "int4"))
    lin.pack(prompt_plan, lin.candidate_formats("auto"), decode_plan)
    ran: list[tuple[int, str]] = []
    original = lin.forward_format
    lin.forward_format = lambda x, fmt: ran.append((x.shape[0], fmt)) or original(x, fmt)  # type: ignore[method-assign]
    x = torch.randn(8, 128)

    def runs(rows: int, prompt_rows: int | None) -> list[tuple[int, str]]:
        ran.clear()
        assert lin(x[:rows], prompt_rows).shape == (rows, 64)
        return list(ran)

    assert runs(6, None) == [(6, "fp32")]  # prompt rows only, the default
    assert runs(6, 0) == [(6, "int4")]  # decode rows only
    assert runs(8, 4) == [(8, "int4")]  # 4 prompt rows (int4) and 4 decode rows (int4): they agree
    assert runs(6, 4) == [(6, "fp32")]  # int4 for 4 prompt rows, int8 for 2 decode rows: the prompt plan at 6
    assert runs(3, 1) == [(3, "int4")]  # int4 for 1 prompt row, int8 for 2 decode rows: the prompt plan at 3
    torch.testing.assert_close(lin(x[:6], 4), lin(x[:6]))


def test_auto_quantization_offers_only_formats_that_reproduce_the_weight() -> None:
    lin = MultiFormatLinear(128, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 128))
    random_formats = set(lin.candidate_formats("auto"))
    assert "int4" not in random_formats  # 4 bits cannot hold a random weight within 1%
    assert "int8" in random_formats  # per-channel int8 is within 0.4% of each row's peak
    with torch.no_grad():
        lin.weight.copy_(_grid_weight(64, 128))
    assert "int4" in lin.candidate_formats("auto")
    assert set(lin.candidate_formats("none")) == {"fp32"}  # an fp32 weight is never rounded


def test_format_plan_picks_by_rows() -> None:
    plan = FormatPlan((4, 16, 512), ("int4", "int8", "fp32"))
    assert [plan.format_for(m) for m in (1, 4, 5, 16, 17, 512, 4096)] == [
        "int4",
        "int4",
        "int8",
        "int8",
        "fp32",
        "fp32",
        "fp32",
    ]
    assert FormatPlan.from_dict(plan.to_dict()) == plan
    assert plan.describe() == "M 1-4: int4, M 5-16: int8, M 17+: fp32"


def test_tuning_measures_once_then_reads_its_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layers = [[MultiFormatLinear(64, 64), MultiFormatLinear(64, 128)] for _ in range(2)]
    head = MultiFormatLinear(64, 96)
    for lin in (*layers[0], *layers[1], head):
        torch.nn.init.normal_(lin.weight)
    calls = []
    monkeypatch.setattr(
        autotune, "_time_pass", lambda fn: calls.append(fn) or (1.0 if len(calls) % 2 else 2.0)
    )
    cache = tmp_path / "plan.json"
    first = autotune.tune(layers, head, torch.float32, "auto", cache)
    measured = len(calls)
    assert measured > 0 and cache.exists()
    again = autotune.tune(layers, head, torch.float32, "auto", cache)
    assert len(calls) == measured, "a cached plan is read, not measured again"
    assert again == first
    assert json.loads(cache.read_text())["layers"] == first.layers.to_dict()


@pytest.mark.parametrize("kv_cache_dtype", ["model", "int8"])
def test_engine_on_the_fast_path_generates_what_the_eager_engine_does(make_llm, kv_cache_dtype: str) -> None:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = ["The quick brown fox", "What is the capital of France?", "Hello"] * 3
    # chunked prefill over cached context too
    fast = make_llm(max_num_batched_tokens=16, kv_cache_dtype=kv_cache_dtype)
    assert fast.engine.model.kernels is not None
    assert fast.engine.sampler.argmax_rows == fast.engine.model.kernels.argmax_rows  # greedy rows too
    assert (fast.engine.runner.kv_cache.dtype == torch.int8) == (kv_cache_dtype == "int8")
    eager = make_llm(max_num_batched_tokens=16, enforce_eager=True, kv_cache_dtype=kv_cache_dtype)
    assert eager.engine.model.kernels is None and eager.engine.weight_plans is None
    got = [o.outputs[0].token_ids for o in fast.generate(prompts, params, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    assert got == want


def _tuning_case(monkeypatch: pytest.MonkeyPatch, ms: Callable[[str, int], float]):  # type: ignore[no-untyped-def]
    """Two one-linear layers and a head, with the tuner's timing replaced by ``ms(format,
    rows)`` (the pass's format and inputs are its closure's default arguments)."""
    layers = [[MultiFormatLinear(64, 64)] for _ in range(2)]
    head = MultiFormatLinear(64, 96)
    for lin in (layers[0][0], layers[1][0], head):
        torch.nn.init.normal_(lin.weight)

    def fake_time(fn) -> float:  # type: ignore[no-untyped-def]
        fmt, inputs = fn.__defaults__
        return ms(fmt, next(iter(inputs.values())).shape[0])

    monkeypatch.setattr(autotune, "_time_pass", fake_time)
    return layers, head


def test_tuning_keeps_the_fastest_format_for_each_step_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # A machine where int8 wins up to 8 rows and fp32 from there.
    table = {"fp32": 2.0, "bf16": 3.0, "w8a8": 9.0}
    layers, head = _tuning_case(
        monkeypatch, lambda f, m: (1.0 if m <= 8 else 9.0) if f == "int8" else table[f]
    )
    plans = autotune.tune(layers, head, torch.float32, "auto", None)
    assert plans.layers == plans.decode_layers == FormatPlan((8, 512), ("int8", "fp32"))
    assert plans.layers.format_for(3) == "int8" and plans.layers.format_for(9) == "fp32"


def test_tuning_keeps_measuring_w8a8_after_it_loses_at_small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weight-only formats are dropped once they fall well behind (they only lose more as M
    grows); w8a8 computes in int8 and wins at large M, so losing small steps must not drop it."""
    times = {
        "int8": lambda m: 1.0 if m <= 4 else 50.0,
        "fp32": lambda m: 2.0,
        "bf16": lambda m: 3.0,
        "w8a8": lambda m: 9.0 if m < 64 else 1.0,
    }
    layers, head = _tuning_case(monkeypatch, lambda f, m: times[f](m))
    plans = autotune.tune(layers, head, torch.float32, "w8a8", None)
    assert plans.layers == FormatPlan((4, 32, 512), ("int8", "fp32", "w8a8"))
    assert "int8@512" not in plans.timings["layers"], "int8 was dropped once it fell behind"


def test_tuning_times_again_a_pass_that_fell_into_a_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32's first pass at 32 rows falls into a stall of the machine (300 ms, slower than its
    own pass over 64 rows, which does more work): the tuner times it again, and fp32 keeps the
    32-row bucket that int8, at a steady 5 ms, would have taken on the stalled figure. A format
    slower at fewer rows on every try (w8a8 here) keeps its time."""
    stalled = []

    def ms(fmt: str, rows: int) -> float:
        if fmt == "fp32":
            if rows == 32 and not stalled:
                stalled.append(rows)
                return 300.0
            return 2.0 + rows / 64
        if fmt == "w8a8":
            return 9.0 if rows < 64 else 1.0  # a slow path for small M, every time
        return {"int8": 5.0, "bf16": 9.0}[fmt]

    layers, head = _tuning_case(monkeypatch, ms)
    plans = autotune.tune(layers, head, torch.float32, "w8a8", None)
    assert stalled, "the stall happened"
    assert plans.layers.format_for(32) == "fp32"
    assert plans.timings["layers"]["fp32@32"] == 2.5
    assert plans.layers == FormatPlan((32, 512), ("fp32", "w8a8"))
    assert plans.timings["layers"]["w8a8@32"] == 9.0


def test_tuning_gives_a_tie_to_the_format_with_fewer_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    table = {"int8": 1.0, "w8a8": 1.5, "fp32": 0.97, "bf16": 3.0}  # fp32 faster by 3%: a tie
    layers, head = _tuning_case(monkeypatch, lambda f, m: table[f])
    plans = autotune.tune(layers, head, torch.float32, "auto", None)
    assert plans.layers == FormatPlan((512,), ("int8",))  # 1 byte a weight against fp32's 4


def test_a_layer_without_a_tuned_quantized_format_falls_back_to_fp32() -> None:
    from bucketserve.engine.optimize import _pack

    lin = MultiFormatLinear(128, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 128))  # int4 cannot hold it within 1%
    plan = FormatPlan((16, 512), ("int4", "fp32"))
    assert _pack(lin, plan, FormatPlan.single("int4"), "auto") is True
    assert lin.plan == FormatPlan((16, 512), ("fp32", "fp32"))
    assert lin.decode_plan == FormatPlan.single("fp32")
    x = torch.randn(3, 128)
    torch.testing.assert_close(lin(x), x @ lin.weight.detach().T)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8])
def test_bf16_model_on_the_native_kernels_matches_the_torch_reference(
    tmp_path: Path, native, cache_dtype: torch.dtype
) -> None:  # type: ignore[no-untyped-def]
    """head_dim 64 and blocks of 16: the AVX-512 decode path, the bf16 rope/KV write and the
    bf16 residual norm, step by step (a prefill, a chunk over cached context, decodes), on a
    bf16 cache and on an int8 one (the quantizing write, the int8 decode kernel)."""
    from bucketserve.core.block_manager import BlockManager
    from bucketserve.core.sequence import Sequence
    from bucketserve.engine.kv_cache import allocate_kv_cache
    from bucketserve.engine.loader import load_state_dict, read_config
    from bucketserve.engine.model import LlamaModel
    from bucketserve.engine.model_runner import ModelRunner
    from tests.conftest import build_tiny_model

    path = build_tiny_model(tmp_path / "m", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    args = ModelArgs.from_hf_config(read_config(path))
    logits: dict[str, list[torch.Tensor]] = {"torch": [], "native": []}

    for name in logits:
        model = LlamaModel(args)
        model.load_hf_state_dict(load_state_dict(path))
        model = model.to(torch.bfloat16).eval()
        model.rotary.to(torch.float32)
        model.use_kernels(native if name == "native" else None)
        cache = allocate_kv_cache(args, 33, 16, cache_dtype, torch.device("cpu"))

        def capture(lg, ids, params, banned, name=name):  # type: ignore[no-untyped-def]
            logits[name].append(lg.clone())
            return lg.argmax(-1).tolist()

        runner = ModelRunner(model, cache, 16, capture)  # type: ignore[arg-type]
        bm = BlockManager(32, 16)
        a = Sequence("a", list(range(3, 43)), SamplingParams(max_tokens=8))
        b = Sequence("b", list(range(50, 120)), SamplingParams(max_tokens=8))
        _execute_steps(
            runner, bm, [((a, 40), (b, 30)), ((a, 1), (b, 40)), ((a, 1), (b, 1)), ((a, 1), (b, 1))]
        )
    assert len(logits["torch"]) == len(logits["native"]) == 4
    for ref, got in zip(logits["torch"], logits["native"], strict=True):
        scale = ref.abs().max().item()
        torch.testing.assert_close(got, ref, atol=0.05 * scale, rtol=0)


def _record_flash_chunks(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Per step from now on: the lengths of the chunks that flash attention runs."""
    flash_rows: list[list[int]] = []
    real_forward = LlamaModel.forward

    def forward(self, ids, positions, kv_cache, meta, logits_index):  # type: ignore[no-untyped-def]
        flash_rows.append([row.length for row in meta.prefill])
        return real_forward(self, ids, positions, kv_cache, meta, logits_index)

    monkeypatch.setattr(LlamaModel, "forward", forward)
    return flash_rows


def _tiny_step_runner(tmp_path: Path, native):  # type: ignore[no-untyped-def]
    """A tiny fp32 model on the native kernels, and ``run(cache_dtype, plan)``: two 40-token
    sequences a and b through the steps ``plan(a, b)`` on a fresh cache, returning the logits
    of every row that samples."""
    from bucketserve.core.block_manager import BlockManager
    from bucketserve.core.sequence import Sequence
    from bucketserve.engine.kv_cache import allocate_kv_cache
    from bucketserve.engine.model_runner import ModelRunner
    from tests.conftest import build_tiny_model

    path = build_tiny_model(tmp_path / "m", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    args = ModelArgs.from_hf_config(read_config(path))
    model = LlamaModel(args)
    model.load_hf_state_dict(load_state_dict(path))
    model = model.eval()
    model.use_kernels(native)

    def run(cache_dtype: torch.dtype, plan) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
        cache = allocate_kv_cache(args, 33, 16, cache_dtype, torch.device("cpu"))
        out: list[torch.Tensor] = []

        def capture(lg, ids, params, banned):  # type: ignore[no-untyped-def]
            out.append(lg.clone())
            return lg.argmax(-1).tolist()

        runner = ModelRunner(model, cache, 16, capture)  # type: ignore[arg-type]
        a = Sequence("a", list(range(3, 43)), SamplingParams(max_tokens=8))
        b = Sequence("b", list(range(50, 90)), SamplingParams(max_tokens=8))
        _execute_steps(runner, BlockManager(32, 16), plan(a, b))
        return out

    return run


def test_a_short_prompt_chunk_attends_row_by_row_as_flash_attention_would(
    tmp_path: Path, native, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A short prompt chunk, fresh or over cached context, attends one token at a time
    through the native paged kernel (each token a row over its sequence up to itself) and
    gives the logits that flash attention gives the same chunk; a long one keeps flash."""
    from bucketserve.engine import model_runner

    flash_rows = _record_flash_chunks(monkeypatch)
    run_steps = _tiny_step_runner(tmp_path, native)

    def run(row_by_row: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(model_runner, "PAGED_CHUNK_TOKENS", 16 if row_by_row else 0)
        # Fresh chunks of 30 (flash either way) and 12; chunks of 16 over 12 cached and of 10
        # over 30 (a's last: it samples); a decode row beside b's last 12; two decode rows.
        return run_steps(
            torch.float32,
            lambda a, b: [((a, 30), (b, 12)), ((b, 16), (a, 10)), ((a, 1), (b, 12)), ((a, 1), (b, 1))],
        )

    flash = run(row_by_row=False)
    assert flash_rows == [[30, 12], [16, 10], [12], []]
    flash_rows.clear()
    paged = run(row_by_row=True)
    assert flash_rows == [[30], [], [], []]  # chunks of up to 16 tokens went row by row
    assert len(paged) == len(flash) == 3  # the first step ends no prompt: it samples nothing
    for got, want in zip(paged, flash, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)


def test_under_an_int8_cache_a_fresh_prompt_attends_its_own_unquantized_keys_and_values(
    tmp_path: Path, native, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Row by row, a short fresh prompt would read back its own K/V from the cache: under an
    int8 cache it runs flash attention on its K/V as computed instead, so its logits (a
    prompt's first token) are those of a cache in the compute dtype; a short chunk over
    cached context still goes row by row."""
    from bucketserve.engine import model_runner

    monkeypatch.setattr(model_runner, "PAGED_CHUNK_TOKENS", 16)
    flash_rows = _record_flash_chunks(monkeypatch)
    run_steps = _tiny_step_runner(tmp_path, native)
    # b's whole 40-token prompt, not row by row either way; a's 12 fresh tokens, then its
    # last 28 as chunks of 14 over its cache: a samples there, b decodes.
    plan = lambda a, b: [((a, 12), (b, 40)), ((a, 14), (b, 1)), ((a, 14), (b, 1))]  # noqa: E731
    exact = run_steps(torch.float32, plan)
    assert flash_rows == [[40], [], []]  # a's fresh 12 went row by row over the fp32 cache
    flash_rows.clear()
    quantized = run_steps(torch.int8, plan)
    assert flash_rows == [[12, 40], [], []]  # under int8 a's fresh 12 went to flash
    # b's first token comes from its own prompt alone: bit for bit the unquantized logits.
    assert torch.equal(quantized[0], exact[0])
    # a's, sampled after chunks over its int8 cache, only close to them.
    torch.testing.assert_close(quantized[2], exact[2], atol=0.05 * exact[2].abs().max().item(), rtol=0)


@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.int8)],
)
def test_decode_steps_in_one_native_call_compute_what_the_layer_by_layer_path_does(
    tmp_path: Path, native, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:  # type: ignore[no-untyped-def]
    """With every decoder linear in w4a8 for decode rows, a decode-only step runs all layers
    in ``decode_layers_w4a8``: the same kernels in the same order as the Python loop, so the
    same logits to the bit, step after step, on a cache in the compute dtype or int8; prompt
    steps keep the loop."""
    if not native.has_w4a8:
        pytest.skip("this CPU has no AVX512-VNNI: the w4a8 format is not offered here")
    from bucketserve.core.block_manager import BlockManager
    from bucketserve.core.sequence import Sequence
    from bucketserve.engine.kv_cache import allocate_kv_cache
    from bucketserve.engine.model_runner import ModelRunner
    from tests.conftest import build_tiny_model

    path = build_tiny_model(tmp_path / "m", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    args = ModelArgs.from_hf_config(read_config(path))
    model = LlamaModel(args)
    model.load_hf_state_dict(load_state_dict(path))
    model = model.to(dtype).eval()
    model.rotary.to(torch.float32)
    model.use_kernels(native)
    with torch.inference_mode():
        for lin in (lin for layer in model.linears() for lin in layer):
            w = lin.weight.detach()
            formats = {"fp32": (w.float().contiguous(),), "w4a8": quantize_w4a8(w)}
            lin.pack(FormatPlan.single("fp32"), formats, FormatPlan((4, 8), ("w4a8", "fp32")))

    fused_steps = []
    real_table = LlamaModel.fused_decode_table

    def run(fused: bool) -> list[torch.Tensor]:
        def table(self, meta, kv_cache):  # type: ignore[no-untyped-def]
            t = real_table(self, meta, kv_cache)
            fused_steps.append(t is not None)
            return t

        monkeypatch.setattr(LlamaModel, "fused_decode_table", table)
        model.fuse_decode = fused
        cache = allocate_kv_cache(args, 33, 16, cache_dtype, torch.device("cpu"))
        out: list[torch.Tensor] = []

        def capture(lg, ids, params, banned):  # type: ignore[no-untyped-def]
            out.append(lg.clone())
            return lg.argmax(-1).tolist()

        runner = ModelRunner(model, cache, 16, capture)  # type: ignore[arg-type]
        bm = BlockManager(32, 16)
        seqs = [
            Sequence(f"s{i}", list(range(3 + 20 * i, 30 + 25 * i)), SamplingParams(max_tokens=40))
            for i in range(3)
        ]
        plan = [[(s, len(s)) for s in seqs]] + [[(s, 1) for s in seqs]] * 20
        _execute_steps(runner, bm, plan)
        return out

    layer_by_layer = run(fused=False)
    assert not any(fused_steps)
    fused_steps.clear()
    one_call = run(fused=True)
    assert fused_steps == [False] + [True] * 20  # the prompt step loops; every decode step is one call
    assert len(one_call) == len(layer_by_layer) == 21
    for got, want in zip(one_call, layer_by_layer, strict=True):
        assert torch.equal(got, want)

    # The table holds raw addresses: a linear packed anew (new tensors) must not be read at
    # the old ones.
    monkeypatch.setattr(LlamaModel, "fused_decode_table", real_table)
    meta = AttentionMetadata(
        torch.zeros(1, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
        [],
        0,
        DecodeRows(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long)),
    )
    cache = allocate_kv_cache(args, 33, 16, cache_dtype, torch.device("cpu"))
    before = model.fused_decode_table(meta, cache)
    qkv = model.layers[0].self_attn.qkv_proj
    fresh = quantize_w4a8(qkv.weight.detach())
    qkv.pack(qkv.plan, {**qkv.packed, "w4a8": fresh}, qkv.decode_plan)
    after = model.fused_decode_table(meta, cache)
    assert before is not None and after is not None
    assert int(before[0, 0]) != fresh[0].data_ptr() and int(after[0, 0]) == fresh[0].data_ptr()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_the_kv_cache_asks_for_huge_pages_where_it_spans_them_and_starts_zeroed() -> None:
    """The KV pool is advised MADV_HUGEPAGE over its 2-MiB-aligned span (a decode row's blocks
    lie anywhere in it); a tensor smaller than one aligned huge page is left alone."""
    from bucketserve.engine.kv_cache import advise_huge_pages, allocate_kv_cache

    assert advise_huge_pages(torch.empty(8 << 20, dtype=torch.uint8))
    assert not advise_huge_pages(torch.empty(16, dtype=torch.uint8))
    args = ModelArgs.from_hf_config(
        {
            "vocab_size": 16,
            "hidden_size": 64,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
        }
    )
    cache = allocate_kv_cache(args, 300, 16, torch.bfloat16, torch.device("cpu"))
    assert cache.shape == (2, 2, 2, 300, 16, 16)
    assert not cache.any()
