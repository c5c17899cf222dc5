"""The KV-cache pool: one tensor of fixed-size blocks, sized once from a memory budget."""

from __future__ import annotations

import ctypes
import logging
import sys

import psutil
import torch

from bucketserve.config import EngineConfig
from bucketserve.engine.kernels import NativeKernels
from bucketserve.engine.kv_quant import row_width
from bucketserve.engine.model import ModelArgs
from bucketserve.errors import ConfigError

log = logging.getLogger(__name__)


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """2 (K and V) x layers x kv_heads x a row's bytes (head_dim elements; int8 rows carry
    their scale too): GQA-aware."""
    return 2 * args.num_layers * args.num_kv_heads * row_width(args.head_dim, dtype) * dtype.itemsize


def resolve_kv_cache_dtype(
    choice: str,
    compute_dtype: torch.dtype,
    kernels: NativeKernels | None,
    args: ModelArgs,
    block_size: int,
) -> torch.dtype:
    """The cache's element type for ``--kv-cache-dtype`` (config.py says what each choice
    means). ``auto`` takes int8 only where its vector decode kernel runs; an int8 cache asked
    for where it cannot is given, with a warning that its scalar kernel is slower than the
    compute dtype's."""
    if choice == "model":
        return compute_dtype
    group = args.num_heads // args.num_kv_heads
    vectorized = (
        kernels is not None
        and compute_dtype == torch.bfloat16
        and kernels.int8_attention_vectorized(args.head_dim, group, block_size)
    )
    if choice == "auto":
        return torch.int8 if vectorized else compute_dtype
    if not vectorized:
        log.warning(
            "--kv-cache-dtype int8: its vector decode kernel needs bfloat16 compute on a CPU with "
            "AVX512-VNNI, head_dim 64, at most 4 query heads per kv head and --block-size 16; "
            "here the scalar one runs, slower than a %s cache",
            str(compute_dtype).removeprefix("torch."),
        )
    return torch.int8


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def plan_num_blocks(
    config: EngineConfig, args: ModelArgs, dtype: torch.dtype, device: torch.device, max_model_len: int
) -> int:
    """Blocks the budget buys; refuses a budget that cannot hold one full-length sequence."""
    per_token = kv_bytes_per_token(args, dtype)
    per_block = per_token * config.block_size
    if config.kv_cache_memory is not None:
        budget, source = config.kv_cache_memory, "--kv-cache-memory"
    else:
        budget = int(free_memory_bytes(device) * config.kv_cache_fraction)
        source = f"--kv-cache-fraction {config.kv_cache_fraction} of free memory"
    num_blocks = budget // per_block
    need_blocks = -(-max_model_len // config.block_size)
    if num_blocks < need_blocks:
        need = need_blocks * per_block
        raise ConfigError(
            f"the KV cache budget ({fmt_bytes(budget)} from {source}) holds {num_blocks * config.block_size} "
            f"tokens, fewer than one sequence of max_model_len={max_model_len} tokens needs: at least "
            f"{need} bytes ({fmt_bytes(need)}, {per_token} bytes per token). Raise --kv-cache-memory "
            f"or lower --max-model-len"
        )
    log.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %s (%d bytes/token, %s)",
        num_blocks,
        config.block_size,
        num_blocks * config.block_size,
        fmt_bytes(num_blocks * per_block),
        per_token,
        source,
    )
    return num_blocks


def allocate_kv_cache(
    args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[layers, 2, kv_heads, num_blocks, block_size, head_dim] (int8: head_dim + 4, the
    block laid out as kv_quant.py says), zeroed so that masked-out slots never hold NaN bit
    patterns that a masked softmax would multiply by zero. On a Linux CPU the pool asks for
    transparent huge pages before it is first touched."""
    if dtype == torch.int8 and (block_size % 2 or args.head_dim % 4):
        raise ConfigError(
            f"an int8 KV cache needs an even --block-size and a head_dim divisible by 4 (got block "
            f"size {block_size}, head_dim {args.head_dim}); use --kv-cache-dtype model"
        )
    shape = (args.num_layers, 2, args.num_kv_heads, num_blocks, block_size, row_width(args.head_dim, dtype))
    cache = torch.empty(shape, dtype=dtype, device=device)
    if device.type == "cpu":
        advise_huge_pages(cache)
    return cache.zero_()


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def advise_huge_pages(t: torch.Tensor) -> bool:
    """madvise(MADV_HUGEPAGE) over the 2-MiB-aligned span of ``t``'s memory (call it before
    the memory is touched). A decode row's KV blocks lie anywhere in a pool of gigabytes, so
    with 4-KiB pages nearly every block read missed the TLB: decode attention at 128 rows x
    300 tokens took 2.6-2.9 ms a layer on 4-KiB pages and 2.0-2.4 on huge ones (measured,
    docs/RESULTS.md). False where the call fails (a kernel without THP) or spans no huge page;
    with THP set to ``never`` it succeeds and changes nothing."""
    if not sys.platform.startswith("linux"):
        return False
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    if end <= start:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        ok = libc.madvise(start, end - start, _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.debug("madvise(MADV_HUGEPAGE) on the KV cache failed; it stays on 4-KiB pages")
    return ok
