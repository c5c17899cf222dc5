"""Native CPU kernels, built once from the C++ source beside this file and loaded with ctypes.

The source has no torch headers, so the build takes about a second with the system C++
compiler. The shared object is cached under ``<cache dir>/kernels``, named by a hash of the
source, the compiler flags and this CPU's feature flags (``-march=native``), so another
machine or a changed source builds anew. Without a C++ compiler the engine runs its torch
reference paths and says so once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from bucketserve.engine.device import cpu_flags
from bucketserve.engine.kv_quant import SCALE_BYTES

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _library_name(compiler: str) -> str:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), cpu_flags().encode(), compiler.encode()):
        h.update(part)
    return f"cpu_kernels-{h.hexdigest()[:16]}.so"


def build(cache_dir: Path) -> Path:
    """Compile the kernels into ``cache_dir/kernels`` unless already there; return the path."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++ or g++) on PATH; scripts/setup.sh installs g++")
    target = cache_dir / "kernels" / _library_name(compiler)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: a concurrent start sees the whole file or none
    return target


class NativeKernels:
    """The loaded kernels. Each call checks its tensors before handing raw pointers over,
    unless its caller passes ``checked=True`` to say it guarantees them (the model does)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        fn = lib.bucketserve_decode_attention
        fn.restype = ctypes.c_int
        # dtype, out, q, q's row stride, k, v, tables, width, lens, six sizes, scale
        fn.argtypes = [ctypes.c_int, _ptr, _ptr, _i64, *[_ptr] * 3, _i64, _ptr, *[_i64] * 6, ctypes.c_float]
        self._decode = fn
        fn = lib.bucketserve_decode_attention_int8
        fn.restype = ctypes.c_int
        fn.argtypes = self._decode.argtypes
        self._decode_int8 = fn
        fn = lib.bucketserve_add_rms_norm
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, _ptr, _ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float]
        self._add_rms_norm = fn
        fn = lib.bucketserve_rope_write_kv
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, *[_i64] * 5]
        self._rope_write_kv = fn
        fn = lib.bucketserve_rope_write_kv_int8
        fn.restype = ctypes.c_int
        fn.argtypes = [*self._rope_write_kv.argtypes, _i64]  # and the block size
        self._rope_write_kv_int8 = fn
        fn = lib.bucketserve_silu_and_mul
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, _ptr, _ptr, _i64, _i64]
        self._silu_and_mul = fn
        fn = lib.bucketserve_quantize_rows_int8
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, _ptr, _ptr, _ptr, _ptr, _i64, _i64]
        self._quantize_rows_int8 = fn
        fn = lib.bucketserve_rescale_int32
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, _ptr, _ptr, _ptr, _ptr, _i64, _i64]
        self._rescale_int32 = fn
        fn = lib.bucketserve_w4a8_matmul
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64]
        self._w4a8_matmul = fn
        fn = lib.bucketserve_decode_layers_w4a8
        fn.restype = ctypes.c_int
        # dtype, h, residual, layer table, layers, rows, positions, cos, sin, slots, tables,
        # width, lens, hidden, heads, kv_heads, head_dim, inter, blocks, block_size, eps, scale,
        # whether the caches are int8
        fn.argtypes = [
            ctypes.c_int,
            *[_ptr] * 3,
            _i64,
            _i64,
            *[_ptr] * 5,
            _i64,
            _ptr,
            *[_i64] * 7,
            ctypes.c_float,
            ctypes.c_float,
            ctypes.c_int,
        ]
        self._decode_layers_w4a8 = fn
        fn = lib.bucketserve_argmax_rows
        fn.restype = ctypes.c_int
        fn.argtypes = [_ptr, _ptr, _i64, _i64]
        self._argmax_rows = fn
        # w4a8 needs AVX512-VNNI (and BW): built in where -march=native has them.
        self.has_w4a8 = bool(lib.bucketserve_has_w4a8())
        fn = lib.bucketserve_chunk_attention
        fn.restype = ctypes.c_int
        # out, q, q's row stride, k, v, their row stride, caches, whether int8, blocks, cached,
        # n, heads, kv_heads, head_dim, num_blocks, block_size, scale
        fn.argtypes = [
            *[_ptr] * 2,
            _i64,
            *[_ptr] * 2,
            _i64,
            *[_ptr] * 2,
            ctypes.c_int,
            _ptr,
            *[_i64] * 7,
            ctypes.c_float,
        ]
        self._chunk_attention = fn
        # The chunk kernel needs AVX512-BF16: built in where -march=native has it.
        self.has_chunk_attention = bool(lib.bucketserve_has_chunk_attention())
        fn = lib.bucketserve_int8_attention_vectorized
        fn.restype = ctypes.c_int
        fn.argtypes = [_i64, _i64, _i64]
        self._int8_attention_vectorized = fn

    def int8_attention_vectorized(self, head_dim: int, group: int, block_size: int) -> bool:
        """Whether decode attention over an int8 KV cache runs its AVX512-VNNI kernel for bf16
        queries at these sizes (else a scalar one, far slower than the bf16 cache's)."""
        return bool(self._int8_attention_vectorized(head_dim, group, block_size))

    def argmax_rows(self, logits: torch.Tensor) -> list[int]:
        """Each row's ``argmax`` of ``logits`` [rows, vocab] float32, as ``torch.argmax``
        answers it (the first of ties, the first NaN where there is one)."""
        if logits.dtype != torch.float32 or logits.dim() != 2 or logits.device.type != "cpu":
            raise ValueError("argmax_rows needs float32 CPU logits of [rows, vocab]")
        logits = logits.contiguous()
        rows, n = logits.shape
        out = torch.empty(rows, dtype=torch.int64)
        if rows and self._argmax_rows(out.data_ptr(), logits.data_ptr(), rows, n):
            raise ValueError("argmax_rows rejected its arguments")
        return out.tolist()

    def silu_and_mul(self, gate_up: torch.Tensor, checked: bool = False) -> torch.Tensor:
        """SwiGLU's ``silu(gate) * up`` of ``gate_up`` [T, 2I] (gate first): [T, I]."""
        tokens, width = gate_up.shape
        if not checked:
            _check(gate_up)
            if width % 2:
                raise ValueError("silu_and_mul needs gate and up side by side: an even width")
        out = torch.empty(tokens, width // 2, dtype=gate_up.dtype)
        if self._silu_and_mul(
            _DTYPE_CODES[gate_up.dtype], out.data_ptr(), gate_up.data_ptr(), tokens, width // 2
        ):
            raise ValueError("silu_and_mul rejected its arguments")
        return out

    def int8_matmul(
        self,
        x: torch.Tensor,
        weight_t: torch.Tensor,
        weight_scale: torch.Tensor,
        inv_smoothing: torch.Tensor,
        checked: bool = False,
    ) -> torch.Tensor:
        """``x @ W.T`` in the w8a8 format (weights.py): x times ``inv_smoothing`` quantized per
        token here, the int8 product by ``torch._int_mm``, its int32 sums scaled back here;
        [M, N] in x's dtype. ``weight_t`` is the smoothed int8 weight's [K, N] transposed view,
        ``weight_scale`` float32 [N], ``inv_smoothing`` float32 [K]. ``checked``: as for
        ``add_rms_norm`` (``MultiFormatLinear`` packs the three itself and passes it)."""
        rows, k = x.shape
        n = weight_t.shape[1]
        if not checked:
            if x.dtype not in _DTYPE_CODES or not x.is_contiguous() or x.device.type != "cpu":
                raise ValueError("int8_matmul needs a contiguous float32 or bfloat16 CPU input")
            if weight_t.dtype != torch.int8 or weight_t.shape[0] != k:
                raise ValueError("int8_matmul needs int8 weights of [K, N] for an input of [M, K]")
            for t, size in ((weight_scale, n), (inv_smoothing, k)):
                if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != (size,):
                    raise ValueError(
                        "int8_matmul needs contiguous float32 scales of [N] and smoothing of [K]"
                    )
        code = _DTYPE_CODES[x.dtype]
        q = torch.empty(rows, k, dtype=torch.int8)
        row_scale = torch.empty(rows, dtype=torch.float32)
        if self._quantize_rows_int8(
            code, q.data_ptr(), row_scale.data_ptr(), x.data_ptr(), inv_smoothing.data_ptr(), rows, k
        ):
            raise ValueError("quantize_rows_int8 rejected its arguments")
        acc = torch._int_mm(q, weight_t).contiguous()
        out = torch.empty(rows, n, dtype=x.dtype)
        if self._rescale_int32(
            code, out.data_ptr(), acc.data_ptr(), row_scale.data_ptr(), weight_scale.data_ptr(), rows, n
        ):
            raise ValueError("rescale_int32 rejected its arguments")
        return out

    def w4a8_matmul(
        self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, checked: bool = False
    ) -> torch.Tensor:
        """``x @ W.T`` in the w4a8 format (weights.py, ``quantize_w4a8``): x [M, K] float32 or
        bfloat16, ``codes`` uint8 [N/16, K/32, 4, 64], ``scales`` float16 [N/16, K/32, 2, 16];
        [M, N] in x's dtype. ``checked``: as for ``add_rms_norm``."""
        rows, k = x.shape
        n = codes.shape[0] * 16
        if not checked:
            if not self.has_w4a8:
                raise ValueError("w4a8_matmul needs a CPU with AVX512-VNNI")
            if x.dtype not in _DTYPE_CODES or not x.is_contiguous() or x.device.type != "cpu":
                raise ValueError("w4a8_matmul needs a contiguous float32 or bfloat16 CPU input")
            groups = k // 32
            if k % 32 or codes.dtype != torch.uint8 or codes.shape != (n // 16, groups, 4, 64):
                raise ValueError(
                    "w4a8_matmul needs codes of [N/16, K/32, 4, 64] uint8 for an input of [M, K]"
                )
            if scales.dtype != torch.float16 or scales.shape != (n // 16, groups, 2, 16):
                raise ValueError("w4a8_matmul needs scales of [N/16, K/32, 2, 16] float16")
            if not (codes.is_contiguous() and scales.is_contiguous()):
                raise ValueError("w4a8_matmul needs contiguous codes and scales")
        out = torch.empty(rows, n, dtype=x.dtype)
        err = self._w4a8_matmul(
            _DTYPE_CODES[x.dtype],
            out.data_ptr(),
            x.data_ptr(),
            codes.data_ptr(),
            scales.data_ptr(),
            rows,
            k,
            n,
        )
        if err:
            raise ValueError(f"w4a8_matmul rejected its arguments (code {err})")
        return out

    def decode_layers_w4a8(
        self,
        h: torch.Tensor,  # [rows, hidden]: layer 0's normalised input; the last layer's output after
        residual: torch.Tensor,  # [rows, hidden]: the embeddings; the residual stream after
        layer_ptrs: torch.Tensor,  # int64 [layers, 12] (cpu_kernels.cpp lists them)
        positions: torch.Tensor,  # [rows] int64
        cos: torch.Tensor,  # [max_positions, head_dim] float32
        sin: torch.Tensor,
        slots: torch.Tensor,  # [rows] int64
        block_tables: torch.Tensor,  # [rows, width] int64
        context_lens: torch.Tensor,  # [rows] int64
        *,
        heads: int,
        kv_heads: int,
        head_dim: int,
        inter: int,
        num_blocks: int,
        block_size: int,
        eps: float,
        kv_int8: bool = False,
    ) -> None:
        """Every decoder layer of a decode-only step, each linear in w4a8, in one call
        (``kv_int8``: the caches are int8, in kv_quant.py's layout).
        ``LlamaModel.fused_decode_table`` builds ``layer_ptrs`` from tensors it keeps alive and
        the model guarantees every shape, so there is no checked form."""
        err = self._decode_layers_w4a8(
            _DTYPE_CODES[h.dtype],
            h.data_ptr(),
            residual.data_ptr(),
            layer_ptrs.data_ptr(),
            layer_ptrs.shape[0],
            h.shape[0],
            positions.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            block_tables.data_ptr(),
            block_tables.shape[1],
            context_lens.data_ptr(),
            h.shape[1],
            heads,
            kv_heads,
            head_dim,
            inter,
            num_blocks,
            block_size,
            eps,
            head_dim**-0.5,
            int(kv_int8),
        )
        if err:
            raise ValueError(f"decode_layers_w4a8 rejected its arguments (code {err})")

    def add_rms_norm(
        self, residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, checked: bool = False
    ) -> torch.Tensor:
        """``residual += x`` in place, then RMSNorm(residual) x weight; both [rows, dim].

        ``checked`` (as for every method here): the caller guarantees contiguous CPU tensors
        of one supported dtype and matching shapes (the model does, by construction), which
        skips the checks: a decode step makes 90 of these calls, and the checks cost more
        than the kernels at batch 1."""
        rows, dim = residual.shape
        if not checked:
            _check(residual, x, weight)
            if x.shape != residual.shape or weight.shape != (dim,):
                raise ValueError("add_rms_norm: x must match the residual, weight its last dimension")
        out = torch.empty_like(residual)
        err = self._add_rms_norm(
            _DTYPE_CODES[residual.dtype],
            out.data_ptr(),
            residual.data_ptr(),
            x.data_ptr(),
            weight.data_ptr(),
            rows,
            dim,
            eps,
        )
        if err:
            raise ValueError(f"add_rms_norm rejected its arguments (code {err})")
        return out

    def rope_write_kv(
        self,
        qkv: torch.Tensor,  # [T, (heads + 2 kv_heads) * head_dim], rotated in place
        positions: torch.Tensor,  # [T] int64
        cos: torch.Tensor,  # [max_positions, head_dim] float32
        sin: torch.Tensor,
        k_cache: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim]
        v_cache: torch.Tensor,
        slots: torch.Tensor,  # [T] int64
        heads: int,
        checked: bool = False,
    ) -> None:
        """Rotate q and k in place and write the step's K and V into their cache slots (into
        an int8 cache quantized, in kv_quant.py's layout)."""
        kvh, nb, bs, dim = _cache_shape(k_cache)
        tokens = qkv.shape[0]
        if not checked:
            _check(qkv)
            _check_caches(qkv.dtype, k_cache, v_cache)
            if (
                qkv.shape[1] != (heads + 2 * kvh) * dim
                or positions.shape != (tokens,)
                or slots.shape != (tokens,)
            ):
                raise ValueError("rope_write_kv: qkv, positions and slots disagree on shapes")
            if (
                cos.dtype != torch.float32
                or sin.dtype != torch.float32
                or not (cos.is_contiguous() and sin.is_contiguous())
            ):
                raise ValueError("rope_write_kv: cos and sin must be contiguous float32 tables")
            if positions.dtype != torch.int64 or slots.dtype != torch.int64:
                raise ValueError("rope_write_kv: positions and slots must be int64")
            if cos.shape != sin.shape or cos.shape[1] != dim or v_cache.shape != k_cache.shape:
                raise ValueError("rope_write_kv: the rope tables or caches have the wrong shape")
            if tokens and not (
                0 <= int(positions.min()) <= int(positions.max()) < cos.shape[0]
                and 0 <= int(slots.min()) <= int(slots.max()) < nb * bs
            ):
                raise ValueError("rope_write_kv: a position or slot is out of range")
        args = (
            _DTYPE_CODES[qkv.dtype],
            qkv.data_ptr(),
            positions.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            slots.data_ptr(),
            tokens,
            heads,
            kvh,
            dim,
            nb * bs,
        )
        if k_cache.dtype == torch.int8:
            err = self._rope_write_kv_int8(*args, bs)
        else:
            err = self._rope_write_kv(*args)
        if err:
            raise ValueError(f"rope_write_kv rejected its arguments (code {err})")

    def chunk_attention(
        self,
        q: torch.Tensor,  # [n, >= heads * head_dim] bf16, rows unit-strided (qkv's rows may do)
        k: torch.Tensor,  # [n, kv_heads, head_dim] bf16: the chunk's own keys, heads contiguous
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim] bf16, or int8 rows
        v_cache: torch.Tensor,
        block_ids: torch.Tensor,  # [blocks] int64: those holding the first ``cached`` tokens
        cached: int,
        heads: int,
        checked: bool = False,
    ) -> torch.Tensor:
        """A bf16 prompt chunk of n tokens after ``cached`` ones: each query attends to the
        cached tokens (read in place from the paged cache) and causally to the chunk's own
        ``k``/``v``; [n, heads * head_dim]. Needs ``has_chunk_attention`` and head_dim 64."""
        n = q.shape[0]
        kvh, nb, bs, dim = _cache_shape(k_cache)
        if not checked:
            if not self.has_chunk_attention:
                raise ValueError("chunk_attention needs a CPU with AVX512-BF16")
            if dim != 64:
                raise ValueError(f"chunk_attention runs head_dim 64, got {dim}")
            if q.dtype != torch.bfloat16 or k.dtype != q.dtype or v.dtype != q.dtype:
                raise ValueError("chunk_attention runs bfloat16 queries, keys and values")
            if q.dim() != 2 or q.stride(1) != 1 or q.shape[1] < heads * dim:
                raise ValueError("chunk_attention needs q as [n, >= heads * head_dim] unit-strided rows")
            if (
                k.shape != (n, kvh, dim)
                or v.shape != k.shape
                or k.stride()[1:] != (dim, 1)
                or k.stride() != v.stride()
            ):
                raise ValueError("chunk_attention needs k and v as [n, kv_heads, head_dim] rows alike")
            _check_caches(q.dtype, k_cache, v_cache)
            if block_ids.dtype != torch.int64 or not block_ids.is_contiguous():
                raise ValueError("chunk_attention needs contiguous int64 block ids")
            if cached > block_ids.numel() * bs or (
                block_ids.numel() and not 0 <= int(block_ids.min()) <= int(block_ids.max()) < nb
            ):
                raise ValueError("chunk_attention: the block ids do not hold the cached tokens")
        out = torch.empty(n, heads * dim, dtype=q.dtype)
        err = self._chunk_attention(
            out.data_ptr(),
            q.data_ptr(),
            q.stride(0),
            k.data_ptr(),
            v.data_ptr(),
            k.stride(0),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            int(k_cache.dtype == torch.int8),
            block_ids.data_ptr(),
            cached,
            n,
            heads,
            kvh,
            dim,
            nb,
            bs,
            dim**-0.5,
        )
        if err:
            raise ValueError(f"chunk_attention rejected its arguments (code {err})")
        return out

    def decode_attention(
        self,
        q: torch.Tensor,  # [rows, >= heads * head_dim]: each row's heads first, contiguous
        k_cache: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim]
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [rows, width] int64
        context_lens: torch.Tensor,  # [rows] int64
        scale: float,
        heads: int,
        checked: bool = False,
    ) -> torch.Tensor:
        """Each row's query attends to its first ``context_lens[r]`` cached tokens; [rows,
        heads * head_dim]. ``q`` may be the decode rows of the fused qkv projection's output
        as they lie (q first in each row): the kernel reads them in place.

        ``checked``: as for ``add_rms_norm``; the model runner builds the block tables from
        the lengths, so every length fits its table."""
        rows = q.shape[0]
        kvh, nb, bs, dim = _cache_shape(k_cache)
        if not checked:
            if q.dim() != 2 or q.stride(1) != 1 or q.shape[1] < heads * dim or q.dtype not in _DTYPE_CODES:
                raise ValueError(
                    "decode_attention needs q as [rows, >= heads * head_dim] rows, unit-strided, "
                    "float32 or bfloat16"
                )
            _check_caches(q.dtype, k_cache, v_cache)
            if not (block_tables.is_contiguous() and context_lens.is_contiguous()):
                raise ValueError("decode_attention needs contiguous block tables and lengths")
            if block_tables.dtype != torch.int64 or context_lens.dtype != torch.int64:
                raise ValueError("block tables and context lengths must be int64")
            if block_tables.shape[0] != rows or context_lens.shape != (rows,):
                raise ValueError("one block table and one context length per query row")
            if v_cache.shape != k_cache.shape or heads % kvh:
                raise ValueError("decode_attention: q, k_cache and v_cache disagree on heads")
            if rows and int(context_lens.max()) > block_tables.shape[1] * bs:
                raise ValueError("a context length exceeds its block table")
            if rows and (
                int(context_lens.min()) < 0
                or not 0 <= int(block_tables.min()) <= int(block_tables.max()) < nb
            ):
                raise ValueError("decode_attention: a block id or context length is out of range")
        out = torch.empty(rows, heads * dim, dtype=q.dtype)
        err = (self._decode_int8 if k_cache.dtype == torch.int8 else self._decode)(
            _DTYPE_CODES[q.dtype],
            out.data_ptr(),
            q.data_ptr(),
            q.stride(0),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            block_tables.data_ptr(),
            block_tables.shape[1],
            context_lens.data_ptr(),
            rows,
            heads,
            kvh,
            dim,
            nb,
            bs,
            scale,
        )
        if err:
            raise ValueError(f"decode_attention rejected its arguments (code {err})")
        return out


def _check(*tensors: torch.Tensor) -> None:
    first = tensors[0].dtype
    if first not in _DTYPE_CODES:
        raise ValueError(f"native kernels run float32 or bfloat16, got {first}")
    for t in tensors:
        if t.dtype != first or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("native kernels need contiguous CPU tensors of one dtype")


def _cache_shape(cache: torch.Tensor) -> tuple[int, int, int, int]:
    """kv_heads, blocks, block_size and head_dim of one layer's K or V cache."""
    kvh, nb, bs, row = cache.shape
    return kvh, nb, bs, row - SCALE_BYTES if cache.dtype == torch.int8 else row


def _check_caches(dtype: torch.dtype, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Contiguous CPU K and V caches, both in ``dtype`` or both int8 rows."""
    if {k_cache.dtype, v_cache.dtype} not in ({dtype}, {torch.int8}):
        raise ValueError(f"native kernels need K and V caches in {dtype} or both int8")
    for t in (k_cache, v_cache):
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("native kernels need contiguous CPU caches")


_loaded: dict[Path, NativeKernels | None] = {}


def load(cache_dir: Path) -> NativeKernels | None:
    """The kernels, built on first use; None (with one warning) where they cannot be built."""
    key = cache_dir.resolve()
    if key not in _loaded:
        try:
            _loaded[key] = NativeKernels(build(cache_dir))
        except (OSError, RuntimeError) as e:
            log.warning("native kernels unavailable, using the torch reference paths (slower): %s", e)
            _loaded[key] = None
    return _loaded[key]
