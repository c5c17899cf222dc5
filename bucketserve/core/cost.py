"""What a step costs: one model for the engine's scheduler and for the simulator.

``Profile`` holds the coefficients (ms) of DistServe's formula family:

    prefill  t = a + b * sum(len) + c * sum(len**2)
    decode   t = a + b * sum(context) + c * batch      (small- or large-batch row)

and ``step_ms`` charges a ``BatchShape`` with them (the simulator's ``CostModel`` is this
function in seconds). A step that mixes prefill rows and decode rows pays the prefill time
plus the decode time without its constant ``a``: one forward pass has one fixed overhead,
scaled by a measured profile's ``mixed_scale``. A prefill chunk of n tokens after s cached
ones counts n toward sum(len) and n * (n + 2s) toward sum(len**2): its attention reads the
cached s tokens too.

``OnlineCostFit`` learns a profile from the engine's own step records while it serves, so a
policy can predict the next step's time without a separate profile run (``bucketserve
profile``): a weighted least-squares fit, the weights forgetting old steps so that the fit
follows a machine whose speed drifts. Pure Python, as the rest of the core.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the scheduler imports this module
    from bucketserve.core.scheduler import BatchShape


@dataclass(frozen=True)
class Profile:
    """Latency coefficients (ms) of one model at one tensor-parallel degree, in the formula
    family of DistServe's profiles (see the module's docstring)."""

    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    large_batch_threshold: int = 95
    name: str = ""  # where it was loaded from; not written
    # Our profiles only: the engine's own work per step around the forward pass (scheduling,
    # appending tokens, detokenizing) = a + b * rows, in ms. Published profiles: none.
    step_overhead: tuple[float, float] = (0.0, 0.0)
    # Our profiles only: measured time of mixed prefill+decode steps over the formula's
    # estimate (a CPU step runs its prefill and decode rows less overlapped than a GPU's).
    mixed_scale: float = 1.0
    # Whether a padded (static) batch's decode rows all pay for the longest context, as in a
    # dense-cache engine (the published profiles' use here), or for their own (our engine).
    padded_decode: bool = True
    # Our profiles only: the measured model's KV bytes per token and weight bytes.
    kv_bytes_per_token: int | None = None
    weight_bytes: int | None = None
    # Our profiles only: a second prefill row for steps of more than ``prefill_threshold``
    # prompt tokens (a CPU engine switches weight formats with the step's token count, and
    # its cost steps there); None: one row for all, as published.
    prefill_large: tuple[float, float, float] | None = None
    prefill_threshold: int = 1 << 30

    def prefill_ms(self, sum_len: float, sum_len_sq: float) -> float:
        if self.prefill_large is not None and sum_len > self.prefill_threshold:
            a, b, c = self.prefill_large
        else:
            a, b, c = self.prefill
        return a + b * sum_len + c * sum_len_sq

    def decode_ms(self, sum_ctx: float, batch: int) -> float:
        a, b, c = self.decode_large if batch >= self.large_batch_threshold else self.decode_small
        return a + b * sum_ctx + c * batch

    def decode_fixed_ms(self, batch: int) -> float:
        return (self.decode_large if batch >= self.large_batch_threshold else self.decode_small)[0]

    def to_dict(self) -> dict[str, Any]:
        """DistServe's keys, then ours (sizes only where known)."""
        out: dict[str, Any] = {
            "decoding_large_small_bs_threshold": self.large_batch_threshold,
            "prefill": list(self.prefill),
            "decoding_smallbs": list(self.decode_small),
            "decoding_largebs": list(self.decode_large),
            "step_overhead_ms": list(self.step_overhead),
            "mixed_scale": self.mixed_scale,
            "padded_decode": self.padded_decode,
        }
        if self.prefill_large is not None:
            out["prefill_large"] = list(self.prefill_large)
            out["prefill_large_threshold"] = self.prefill_threshold
        if self.kv_bytes_per_token is not None:
            out["kv_bytes_per_token"] = self.kv_bytes_per_token
        if self.weight_bytes is not None:
            out["weight_bytes"] = self.weight_bytes
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "") -> Profile:
        """A published entry (DistServe's three rows and threshold) or one of ours."""
        kv, weights = d.get("kv_bytes_per_token"), d.get("weight_bytes")
        a, b = d.get("step_overhead_ms", (0.0, 0.0))
        return cls(
            prefill=_three(d["prefill"]),
            decode_small=_three(d["decoding_smallbs"]),
            decode_large=_three(d["decoding_largebs"]),
            large_batch_threshold=int(d.get("decoding_large_small_bs_threshold", 95)),
            name=name,
            step_overhead=(float(a), float(b)),
            mixed_scale=float(d.get("mixed_scale", 1.0)),
            padded_decode=bool(d.get("padded_decode", True)),
            kv_bytes_per_token=None if kv is None else int(kv),
            weight_bytes=None if weights is None else int(weights),
            prefill_large=_three(d["prefill_large"]) if "prefill_large" in d else None,
            prefill_threshold=int(d.get("prefill_large_threshold", 1 << 30)),
        )


def _three(values: list[float]) -> tuple[float, float, float]:
    a, b, c = values
    return float(a), float(b), float(c)


def step_ms(profile: Profile, shape: BatchShape, pad_prefill: bool = False) -> float:
    """Milliseconds to run a batch of this shape. ``padded`` shapes (static, uellm) pay for
    every prefill row padded to the longest one and every decode row (ghost rows included)
    at the longest context where the profile says its engine pads decode rows; ``pad_prefill``
    charges every policy's prefill rows padded (an engine without ragged attention kernels)."""
    sum_len = sum_sq = 0.0
    max_chunk = 0
    for n, s in shape.prefill:
        max_chunk = max(max_chunk, n)
        sum_len += n
        sum_sq += n * (n + 2 * s)
    prefill_rows = len(shape.prefill)
    decode_rows = len(shape.decode)
    sum_ctx = sum(shape.decode)
    if shape.padded or pad_prefill:
        sum_len = prefill_rows * max_chunk
        sum_sq = prefill_rows * max_chunk * max_chunk
    if shape.padded:
        decode_rows += shape.num_ghost_rows
        if profile.padded_decode:
            sum_ctx = decode_rows * max(shape.decode, default=0)
        else:
            sum_ctx += shape.num_ghost_rows
    p = profile
    if prefill_rows and decode_rows:
        ms = p.mixed_scale * (
            p.prefill_ms(sum_len, sum_sq) + p.decode_ms(sum_ctx, decode_rows) - p.decode_fixed_ms(decode_rows)
        )
    elif prefill_rows:
        ms = p.prefill_ms(sum_len, sum_sq)
    else:
        ms = p.decode_ms(sum_ctx, decode_rows)
    ms += p.step_overhead[0] + p.step_overhead[1] * shape.num_rows
    return max(ms, 0.0)


# The fit's features of a (packed, unpadded) step, each a coefficient of the profile:
#   has prefill (prefill a), decode only (decode a), sum(len) (prefill b), sum(len**2)
#   (prefill c), sum(context) (decode b), decode rows (decode c plus the per-row overhead),
#   prefill rows (the per-row overhead).
FEATURES = ("prefill_a", "decode_a", "sum_len", "sum_len_sq", "sum_ctx", "decode_rows", "prefill_rows")
# Feature scales: the normal equations are solved on features of similar size.
_SCALE = (1.0, 1.0, 1e3, 1e6, 1e4, 10.0, 10.0)


def features(shape: BatchShape) -> list[float]:
    """The fit's feature vector of a step (FEATURES), scaled."""
    sum_len = float(sum(n for n, _ in shape.prefill))
    sum_sq = float(sum(n * (n + 2 * s) for n, s in shape.prefill))
    has_prefill = 1.0 if shape.prefill else 0.0
    raw = (
        has_prefill,
        1.0 - has_prefill,
        sum_len,
        sum_sq,
        float(sum(shape.decode)),
        float(len(shape.decode)),
        float(len(shape.prefill)),
    )
    return [x / s for x, s in zip(raw, _SCALE, strict=True)]


@dataclass
class OnlineCostFit:
    """A ``Profile`` fitted from observed steps (shape, seconds), refitted as they come.

    Each step adds its features' outer product to the normal equations of a least-squares
    fit on relative error (rows weighted by 1 / time, so a 10-ms decode step counts as much
    as a 1-s prefill), the old sums first multiplied by ``decay``: a step ``half_life`` steps
    ago weighs half. A small ridge pulls toward ``prior`` (a measured profile, if any) so that
    a feature no step had yet keeps the prior's coefficient (0 without one). Padded steps
    (static batching) are not observed: their cost depends on
    padding, which the fitted family does not model. ``profile()`` is None until
    ``min_steps`` of each kind (decode-only, with prefill) were seen.

    How far off its predictions run: for each of the last ``error_window`` steps that carried
    prompt tokens, the measured time over what the fit predicted just before
    (``error_quantile``). A fit right on average still has half its steps run over, and on a
    shared CPU its mixed steps ran 1.15x their prediction at the 75th percentile and 1.35x at
    the 90th: a budget that plans at the median misses a target it aims just under.
    """

    prior: Profile | None = None
    half_life: float = 2000.0
    min_steps: int = 16
    ridge: float = 1e-9
    refit_every: int = 16
    error_window: int = 100
    _errors: deque[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._errors = deque(maxlen=self.error_window)
        k = len(FEATURES)
        self.decay = 0.5 ** (1.0 / self.half_life)
        self._xtx = [[0.0] * k for _ in range(k)]
        self._xty = [0.0] * k
        self.num_prefill_steps = 0
        self.num_decode_steps = 0
        self._cached: Profile | None = None
        self._since_solve = 0  # steps observed since _cached was solved
        self._prior_coef = _coefficients(self.prior) if self.prior is not None else [0.0] * k

    def observe(self, shape: BatchShape, seconds: float) -> None:
        """Add one measured step."""
        if shape.padded or shape.num_ghost_rows or seconds <= 0 or not shape.num_rows:
            return
        ms = seconds * 1e3
        if shape.prefill and (known := self.profile()) is not None:
            self._errors.append(ms / max(step_ms(known, shape), 1e-6))
        x = [v / ms for v in features(shape)]  # relative error: the row and target over t
        d = self.decay
        for i, xi in enumerate(x):
            row = self._xtx[i]
            for j, xj in enumerate(x):
                row[j] = row[j] * d + xi * xj
            self._xty[i] = self._xty[i] * d + xi  # y / t = 1
        if shape.prefill:
            self.num_prefill_steps += 1
        else:
            self.num_decode_steps += 1
        self._since_solve += 1

    def error_quantile(self, q: float) -> float:
        """The ``q`` quantile of measured / predicted time over the recent steps with prompt
        tokens (1.0 until ``min_steps`` of them, or for q = 0), within [0.5, 2]."""
        if q <= 0 or len(self._errors) < self.min_steps:
            return 1.0
        ranked = sorted(self._errors)
        return min(2.0, max(0.5, ranked[min(len(ranked) - 1, int(q * len(ranked)))]))

    @property
    def fitted(self) -> bool:
        """Whether enough steps of each kind were seen for the fit to stand on its own."""
        return min(self.num_prefill_steps, self.num_decode_steps) >= self.min_steps

    def profile(self) -> Profile | None:
        """The fitted profile, or the prior (None without one) until ``fitted``."""
        if not self.fitted:
            return self.prior
        # Re-solved every ``refit_every`` steps, not every step: a solve costs ~50 us of pure
        # Python, and with a half-life of thousands of steps a few steps move the fit little.
        if self._cached is None or self._since_solve >= self.refit_every:
            self._cached = _profile_of(self._solve(), self.prior)
            self._since_solve = 0
        return self._cached

    def _solve(self) -> list[float]:
        # Ridge in proportion to each feature's own weight (scale-free, a bias of ~ridge
        # relative), plus a trace-sized floor for features no step had: those keep the prior.
        k = len(FEATURES)
        trace = sum(self._xtx[i][i] for i in range(k)) or 1.0
        lam = [self.ridge * self._xtx[i][i] + 1e-12 * trace for i in range(k)]
        a = [[self._xtx[i][j] + (lam[i] if i == j else 0.0) for j in range(k)] for i in range(k)]
        b = [self._xty[i] + lam[i] * self._prior_coef[i] for i in range(k)]
        # Solved with unit diagonal (Jacobi scaling): the features' weights differ by orders
        # of magnitude, and the plain system lost a weakly-determined coefficient to rounding.
        d = [math.sqrt(a[i][i]) for i in range(k)]
        scaled = [[a[i][j] / (d[i] * d[j]) for j in range(k)] for i in range(k)]
        y = _gauss_solve(scaled, [b[i] / d[i] for i in range(k)])
        return [y[i] / d[i] for i in range(k)]


def _coefficients(p: Profile) -> list[float]:
    """A profile's coefficients in FEATURES' order and scale (the small-batch decode row)."""
    pa, pb, pc = p.prefill
    da, db, dc = p.decode_small
    o0, o1 = p.step_overhead
    raw = (pa + o0, da + o0, pb, pc, db, dc + o1, o1)
    return [c * s for c, s in zip(raw, _SCALE, strict=True)]


def _profile_of(coef: list[float], prior: Profile | None) -> Profile:
    pa, da, pb, pc, db, dc, ob = (max(0.0, c / s) for c, s in zip(coef, _SCALE, strict=True))
    # Not clamped: a decode row's charge is (dc - ob) + ob = dc, whatever share of it the fit
    # gave the per-row overhead (which one-prompt prefill steps alone cannot tell apart).
    decode = (da, db, dc - ob)
    base = prior or Profile(prefill=(0.0, 0.0, 0.0), decode_small=decode, decode_large=decode)
    return replace(
        base,
        prefill=(pa, pb, pc),
        prefill_large=None,  # the online fit has one prefill row
        decode_small=decode,
        decode_large=decode,
        large_batch_threshold=1 << 30,
        step_overhead=(0.0, ob),
        mixed_scale=1.0,
        padded_decode=False,
        name="online fit",
    )


def _gauss_solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a x = b (a small symmetric positive-definite system) by Gaussian elimination
    with partial pivoting."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) < 1e-300:
            continue
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            if f:
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        s = m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))
        x[r] = s / m[r][r] if abs(m[r][r]) >= 1e-300 else 0.0
    return x
