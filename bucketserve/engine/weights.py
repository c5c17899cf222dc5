"""Linear layers that keep their weight in several formats and use, for each step, the one
that runs fastest at that step's token count.

Which format is fastest depends on the machine and on M, the rows of the step (measured on a
2-core Xeon without AMX, 30 layers of SmolLM2-135M's linears, ms):

    M        1     8    16    32    64
    fp32   17.6  32.2  37.6  48.3  74.1
    bf16   19.2  26.6  37.5  59.8 101.3
    int8   10.2  21.6  36.1  67.5 118.2
    int4    5.6  13.8  26.7  52.8 102.2

Small steps read weights (fewer bytes win: int4), large steps compute: there the fastest
arithmetic wins, int8 with int32 sums (VNNI on x86, AMX where present) over fp32 and bf16.
So the engine measures each format on the model's own layers at start-up (``autotune.py``)
and gives every decoder linear the same two ``FormatPlan``s, a format per range of M: one
for prompt tokens, one for decode rows (they differ where w8a8 is offered to decode rows
only); the LM head has its own.

The formats: fp32 and bf16; int8 and int4, weight-only (torch's packed kernels
``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` dequantize the weights and multiply
in floating point); w8a8, int8 weights times int8 activations quantized per token at each call
(torch's ``_int_mm``, oneDNN's int8 GEMM; the quantization and the rescale of its int32 sums
are one native call each, ``kernels.NativeKernels.int8_matmul``); w4a8, the int4 weights
times activations quantized to int8 per group of 32, llama.cpp's Q4_1 x Q8_1 (one native
call on CPUs with AVX512-VNNI, ``NativeKernels.w4a8_matmul``: 1.5x torch's int4 kernel at
batch 1, where a step streams every weight once, 1.9x at 8 rows). A weight format is offered
only where it reproduces the weights closely (``_close``): the embedded SmolLM2 ships as a
Q4_1 GGUF, whose 4-bit groups of 32 int4 with a scale and zero per group reproduces up to
rounding; int8 with a scale per output channel is within 0.4% of each row's largest weight.
What w8a8's activation rounding costs the model is measured by ``benchmarks/perplexity.py``.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from bucketserve.engine.kernels import NativeKernels

FORMATS = ("fp32", "bf16", "int8", "int4", "w8a8", "w4a8")
QUANTIZED = ("int8", "int4", "w8a8", "w4a8")
# Formats that round the step's activations to int8 as well as the weights.
INT8_ACTIVATIONS = ("w8a8", "w4a8")
# Weights stored in fewer bits, multiplied in floating point: they pay while a step reads
# weights (small M) and only fall behind as M grows. w8a8 multiplies in int8 too (activations
# quantized per token), which pays most where the step computes (large M).
WEIGHT_ONLY = ("int8", "int4")
INT4_GROUP = 32
# The share of each input channel's range that w8a8 moves from the activations into the
# weights (SmoothQuant's alpha; its default, and the best of 0.3-0.85 measured here).
SMOOTHING_ALPHA = 0.5
# The most a quantized weight may differ from the original, relative to the tensor's largest
# magnitude, for ``quantization="auto"`` to offer it.
AUTO_TOLERANCE = 0.01
# The most w8a8's output may differ from the exact linear's on the calibration text (relative
# L2 error over all its tokens, ``MultiFormatLinear.w8a8_error``) for ``quantization="auto"``
# to run that linear's prompt tokens in it. On SmolLM2-135M: 0.6-2.2% for the attention
# projections and gate/up (most 1.0-1.6%), 2.2-3.5% for most down projections, whose inputs (SwiGLU's
# product) carry the largest outliers; this bound keeps 90 of the 120 linears (+0.9%
# perplexity against +1.3% for all of them, benchmarks/perplexity.py).
PROMPT_W8A8_TOLERANCE = 0.02


@dataclass(frozen=True)
class FormatPlan:
    """The format for each range of rows: ``formats[i]`` serves M <= ``max_rows[i]``; the last
    one serves everything above too."""

    max_rows: tuple[int, ...] = (1,)
    formats: tuple[str, ...] = ("fp32",)

    def __post_init__(self) -> None:
        if len(self.max_rows) != len(self.formats) or not self.formats:
            raise ValueError("a format plan needs one format per row bound")
        if list(self.max_rows) != sorted(self.max_rows):
            raise ValueError("row bounds must increase")
        unknown = set(self.formats) - set(FORMATS)
        if unknown:
            raise ValueError(f"unknown weight formats {sorted(unknown)}")

    @classmethod
    def single(cls, fmt: str) -> FormatPlan:
        return cls((1,), (fmt,))

    def format_for(self, rows: int) -> str:
        i = bisect_left(self.max_rows, rows)
        return self.formats[min(i, len(self.formats) - 1)]

    @property
    def used(self) -> set[str]:
        return set(self.formats)

    def describe(self) -> str:
        """E.g. "M 1-16: int4, M 17+: fp32" (the last format serves every larger M)."""
        parts, lo = [], 1
        for i, (hi, fmt) in enumerate(zip(self.max_rows, self.formats, strict=True)):
            last = i == len(self.formats) - 1
            parts.append(f"M {lo}+: {fmt}" if last else f"M {lo}-{hi}: {fmt}")
            lo = hi + 1
        return ", ".join(parts)

    def to_dict(self) -> dict[str, list]:
        return {"max_rows": list(self.max_rows), "formats": list(self.formats)}

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> FormatPlan:
        return cls(tuple(int(x) for x in d["max_rows"]), tuple(str(f) for f in d["formats"]))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output channel: (int8 [N, K], scales [N])."""
    w = w.float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of ``group`` along K: (codes 0..15 [N, K] int32, scales and
    zeros [K/group, N, 2]) in the layout of ``_weight_int4pack_mm_for_cpu``, whose weight is
    (code - 8) x scale + zero."""
    w = w.float()
    n, k = w.shape
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    zero = lo + 8 * scale
    return codes.view(n, k), torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


def dequantize_int4(codes: torch.Tensor, scales_zeros: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    n, k = codes.shape
    sz = scales_zeros.float().transpose(0, 1)  # [N, K/group, 2]
    g = codes.view(n, k // group, group).float() - 8
    return (g * sz[..., :1] + sz[..., 1:]).view(n, k)


def quantize_w4a8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 codes of ``quantize_int4`` in the w4a8 kernel's layout (cpu_kernels.cpp says
    it): codes uint8 [N/16, K/32, 4, 64], two a byte; scales and mins float16 [N/16, K/32,
    2, 16], so that weight = code x scale + min."""
    n, k = w.shape
    groups, tiles = k // INT4_GROUP, n // 16
    codes, sz = quantize_int4(w)
    scale = sz[..., 0].t()  # [N, K/32]
    mins = (sz[..., 1] - 8 * sz[..., 0]).t()
    # [tile, row, group, half, p, j]: the code at k = 32 group + 16 half + 4 p + j
    c = codes.to(torch.uint8).view(tiles, 16, groups, 2, 4, 4)
    low, high = (c[:, :, :, h].permute(0, 2, 3, 1, 4).reshape(tiles, groups, 4, 64) for h in (0, 1))
    packed = (low | (high << 4)).contiguous()

    def by_tile(t: torch.Tensor) -> torch.Tensor:  # [N, K/32] -> [tiles, K/32, 16]
        return t.reshape(tiles, 16, groups).permute(0, 2, 1)

    return packed, torch.stack([by_tile(scale), by_tile(mins)], 2).half().contiguous()


def w4a8_codes(packed: torch.Tensor) -> torch.Tensor:
    """The codes [N, K] (0..15) back out of ``quantize_w4a8``'s layout."""
    tiles, groups = packed.shape[:2]
    low, high = (packed & 0x0F), (packed >> 4)
    halves = [h.view(tiles, groups, 4, 16, 4).permute(0, 3, 1, 2, 4) for h in (low, high)]  # t, r, g, p, j
    return torch.stack(halves, 3).reshape(tiles * 16, groups * INT4_GROUP)


def dequantize_w4a8(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    tiles, groups = packed.shape[:2]
    n = tiles * 16
    scale, mins = (scales[:, :, h].float().permute(0, 2, 1).reshape(n, groups, 1) for h in (0, 1))
    codes = w4a8_codes(packed).float().view(n, groups, INT4_GROUP)
    return (codes * scale + mins).view(n, groups * INT4_GROUP)


def w4a8_matmul_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ W.T in the w4a8 format, in torch ops: x rounded to int8 per group of 32 (one scale
    a group) times the dequantized int4 weights; what ``NativeKernels.w4a8_matmul`` computes
    with int32 sums."""
    m, k = x.shape
    g = x.float().view(m, k // INT4_GROUP, INT4_GROUP)
    sx = g.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    xq = (torch.round(g / sx) * sx).view(m, k)
    return (xq @ dequantize_w4a8(packed, scales).t()).to(x.dtype)


def int4_supported(w: torch.Tensor) -> bool:
    n, k = w.shape
    return k % INT4_GROUP == 0 and n % 16 == 0


class MultiFormatLinear(nn.Module):
    """``y = x @ W.T (+ b)`` with W held in the formats of its plans, picked per call by M and
    by the rows' kind: ``plan`` serves prompt tokens, ``decode_plan`` decode rows (autotune.py
    says why they may differ).

    ``weight`` (a Parameter, in the model's dtype) is the reference the other formats are
    built from by ``pack``; until then this is an ``nn.Linear``.
    """

    # Bumped by every pack and unpack of any linear: whoever keeps the packed tensors' raw
    # addresses (LlamaModel's one-call decode) rebuilds them when it moves.
    packings = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.plan: FormatPlan | None = None
        self.decode_plan: FormatPlan | None = None
        self._packed: dict[str, tuple[torch.Tensor, ...]] = {}
        # The native kernels (kernels/), set by the model's ``use_kernels``: w8a8 quantizes
        # and rescales through them, else through torch ops (same numbers, more dispatch).
        self.kernels: NativeKernels | None = None
        # The largest magnitude of each input channel over the calibration text
        # (calibration.py), from which w8a8 smooths its activations; None: not calibrated.
        self.input_absmax: torch.Tensor | None = None
        # w8a8's relative error on the calibration text (``w8a8_error``), which decides
        # whether auto runs this linear's prompt tokens in it; None: not measured.
        self.prompt_w8a8_error: float | None = None

    def candidate_formats(
        self, quantization: str, only: set[str] | None = None
    ) -> dict[str, tuple[torch.Tensor, ...]]:
        """Every format (of ``only``, if given) this weight may run in under ``quantization``
        (auto, none, int8, int4, w8a8)."""
        want = set(FORMATS) if only is None else only
        w = self.weight.detach()
        out: dict[str, tuple[torch.Tensor, ...]] = {}
        if "fp32" in want:  # exact for weights in any dtype
            out["fp32"] = (w.float().contiguous(),)
        lossy_ok = quantization != "none" and w.device.type == "cpu"
        if "bf16" in want and (w.dtype == torch.bfloat16 or lossy_ok):
            out["bf16"] = (w.bfloat16().contiguous(),)
        if not lossy_ok:
            return out
        peak = float(w.abs().max()) or 1.0
        if "int8" in want and quantization in ("auto", "int8", "w8a8"):
            q, s = quantize_int8(w)
            s = s.bfloat16()  # the kernel's scales: check what will run
            if quantization == "int8" or _close(dequantize_int8(q, s), w, peak):
                out["int8"] = (q, s)
        if "w8a8" in want and quantization in ("auto", "w8a8"):
            smooth = (
                torch.ones(self.in_features) if self.input_absmax is None else smoothing(self.input_absmax, w)
            )
            smoothed = w.float() * smooth
            q, s = quantize_int8(smoothed)
            if _close(dequantize_int8(q, s), smoothed, float(smoothed.abs().max())):
                # _int_mm multiplies [M, K] by [K, N]; the transposed view of the row-major
                # weight ran faster than a contiguous [K, N] copy (oneDNN reads it as N x K).
                out["w8a8"] = (q.t(), s.float(), (1 / smooth).contiguous())
        if "int4" in want and quantization in ("auto", "int4", "w8a8") and int4_supported(w):
            codes, sz = quantize_int4(w)
            sz = sz.bfloat16()  # the kernel's scales and zeros: check what will run
            if quantization == "int4" or _close(dequantize_int4(codes, sz), w, peak):
                packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
                out["int4"] = (packed, sz)
        native_w4a8 = self.kernels is not None and self.kernels.has_w4a8
        if "w4a8" in want and quantization in ("auto", "w8a8") and int4_supported(w) and native_w4a8:
            packed, scales = quantize_w4a8(w)  # float16 scales: check what will run
            if _close(dequantize_w4a8(packed, scales), w, peak):
                out["w4a8"] = (packed, scales)
        return out

    def w8a8_error(self, x: torch.Tensor) -> float:
        """How far w8a8 (smoothed by ``input_absmax``) lands from the exact product on inputs
        ``x``: ||y_w8a8 - y|| / ||y|| over all rows; inf where w8a8 is not offered."""
        packed = self.candidate_formats("w8a8", only={"w8a8"}).get("w8a8")
        if packed is None:
            return float("inf")
        x = x.detach().reshape(-1, self.in_features).contiguous()
        exact = x.float() @ self.weight.detach().float().T
        if self.kernels is not None and x.dtype in (torch.float32, torch.bfloat16):
            approx = self.kernels.int8_matmul(x, *packed, checked=True)
        else:
            approx = int8_matmul_reference(x, *packed)
        return float((approx.float() - exact).norm() / exact.norm().clamp(min=1e-12))

    def pack(
        self,
        plan: FormatPlan,
        formats: dict[str, tuple[torch.Tensor, ...]],
        decode_plan: FormatPlan | None = None,
    ) -> None:
        """Keep only the formats the plans use (memory) and run by them from now on;
        ``decode_plan`` None: ``plan`` serves decode rows too."""
        decode_plan = decode_plan or plan
        used = plan.used | decode_plan.used
        missing = used - set(formats)
        if missing:
            raise ValueError(f"no {sorted(missing)} weights for this layer")
        self.plan, self.decode_plan = plan, decode_plan
        self._packed = {f: formats[f] for f in used}
        MultiFormatLinear.packings += 1

    @property
    def packed(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """The formats the plans use, by name ({} while unpacked)."""
        return self._packed

    def unpack(self) -> None:
        """Drop the packed formats: back to an ``nn.Linear`` on ``weight``."""
        self.plan = self.decode_plan = None
        self._packed = {}
        MultiFormatLinear.packings += 1

    def forward_format(self, x: torch.Tensor, fmt: str) -> torch.Tensor:
        w = self._packed[fmt]
        if fmt in INT8_ACTIVATIONS:
            native = (
                self.kernels is not None and x.is_contiguous() and x.dtype in (torch.float32, torch.bfloat16)
            )
            if fmt == "w8a8":  # w packed by candidate_formats
                y = self.kernels.int8_matmul(x, *w, checked=True) if native else int8_matmul_reference(x, *w)
            else:
                y = self.kernels.w4a8_matmul(x, *w, checked=True) if native else w4a8_matmul_reference(x, *w)
            return y if self.bias is None else y + self.bias
        # Conversions only where the dtypes differ: a no-op .to() still costs a dispatch, and a
        # batch-1 decode step made 240 of them.
        xin = _as(x, torch.bfloat16 if fmt in WEIGHT_ONLY else w[0].dtype)
        if fmt == "int4":
            y = torch._weight_int4pack_mm_for_cpu(xin, w[0], INT4_GROUP, w[1])
        elif fmt == "int8":
            y = torch._weight_int8pack_mm(xin, w[0], w[1])
        else:
            y = F.linear(xin, w[0])
        y = _as(y, x.dtype)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor, prompt_rows: int | None = None) -> torch.Tensor:
        """``prompt_rows``: how many of x's rows, first, are prompt tokens (None: all of them);
        the rest are decode rows. Rows of one kind run in their plan's format for their count;
        a step with both runs in one matmul, in the decode plan's format where the two plans
        agree, else in the prompt plan's at the step's row count."""
        if self.plan is None or self.decode_plan is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.shape[0]
        prompt = rows if prompt_rows is None else prompt_rows
        if prompt == 0:
            return self.forward_format(x, self.decode_plan.format_for(rows))
        prompt_fmt = self.plan.format_for(prompt)
        if prompt == rows or self.decode_plan.format_for(rows - prompt) == prompt_fmt:
            return self.forward_format(x, prompt_fmt)
        # The plans differ at these counts: all rows run in one matmul, in the prompt plan's
        # format at the step's row count. Two matmuls (and a cat) per linear cost a step that
        # adds a short chunk to 32 decode rows ~10 ms on a 2-core Xeon, and the prompt plan's
        # formats are the ones that keep prompt tokens accurate (w8a8 only where it passed the
        # calibration bound); decode rows lose nothing by them (w8a8 or finer).
        return self.forward_format(x, self.plan.format_for(rows))


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def smoothing(
    input_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTHING_ALPHA
) -> torch.Tensor:
    """SmoothQuant's factor per input channel (float32 [K]): w8a8 runs (x / s) @ (W * s).T,
    with s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) (calibration.py says why)."""
    w = weight.detach().float().abs().amax(0).clamp(min=1e-5)
    return (input_absmax.float().clamp(min=1e-5) ** alpha / w ** (1 - alpha)).clamp(min=1e-5)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row (per token): (int8 [M, K], scales float32 [M, 1])."""
    xf = x.float()
    scale = xf.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(xf / scale).to(torch.int8), scale


def int8_matmul_reference(
    x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor, inv_smoothing: torch.Tensor
) -> torch.Tensor:
    """x @ W.T in the w8a8 format, in torch ops: x divided by the smoothing factors and
    quantized per token, the smoothed W per output channel, multiplied in int8 with int32 sums
    by torch's ``_int_mm`` (oneDNN's VNNI/AMX int8 GEMM on x86). The native kernels' version
    (``NativeKernels.int8_matmul``) computes the same in one call each side of the matmul."""
    q, scale = quantize_rows_int8(x.float() * inv_smoothing)
    return (torch._int_mm(q, weight_t) * scale * weight_scale).to(x.dtype)


def _close(approx: torch.Tensor, w: torch.Tensor, peak: float) -> bool:
    return float((approx - w.float()).abs().max()) <= AUTO_TOLERANCE * peak
