"""Activation calibrators: the clipping threshold of one quantization site from sample activations.

A *site* is the input of one Linear layer (q/k/v, and gate/up, read one input: one site). Its
calibration data is a mapping ``language -> (n_tokens_l, C)`` matrix (rows are token positions,
columns the ``C`` input channels). Quantization is symmetric on the signed grids of
:mod:`theory.grids` (``int``, ``midrise``, ``midtread``, ``aciq``): level index
``k = clip(floor(x / step - offset + 1/2), kmin, kmax)``, value ``(k + offset) * step``,
``step = alpha * f`` with ``(f, kmin, kmax, offset) = theory.grids.step_factor(grid, bits)``
(``theory.grids.quantize``; the same rule as ``empirical.fakequant._round_to_grid``). ``aciq`` is
realised on the ``midrise`` levels, so its measured errors are those of ``midrise``. Activations are
signed here: the one-sided ``uint`` grid is refused.

A threshold is a float64 array: shape ``()`` for granularity ``"tensor"``, ``(C,)`` for
``"channel"`` (one threshold per input channel, i.e. per column). A threshold is never 0 (a zero
step is undefined): wherever a calibrator's rule gives 0 (an all-zero column or matrix, a
percentile that falls on zeros) it returns the smallest positive float64, ``np.finfo(float).tiny``,
which the quantizer treats as "quantizes to 0".

Calibrators (:data:`CALIBRATORS`; :func:`threshold` on one matrix)
-------------------------------------------------------------------
``max``
    ``max |x|`` over the tensor / each column.
``p<q>`` (``p99.9``, ``p99.99``, any ``0 < q <= 100``)
    The ``q``-th percentile of ``|x|`` with numpy's default linear interpolation: for the sorted
    magnitudes ``m_0 <= .. <= m_{n-1}`` and ``h = (n - 1) q / 100``,
    ``m_floor(h) + (h - floor(h)) (m_floor(h)+1 - m_floor(h))``, over all values or per column.
    Computed exactly from the values; NVIDIA ModelOpt's percentile calibrator reads it off a
    2048-bin histogram of ``|x|`` (``_compute_amax_percentile``: the lower edge of the bin in which
    the histogram's CDF reaches ``q / 100``), which can fall short by up to one bin width,
    ``max|x| / 2048``.
``mse``
    The exact minimiser of the empirical quantize-dequantize MSE
    ``1/n sum (x - Q_alpha(x))^2`` (:mod:`empirical.sweep`). Per tensor
    :func:`empirical.optimal.empirical_optimal_alpha` (128-point geometric grid on
    ``[1e-3, 1] max|x|``, a 257-point linear grid on the bracket around its best point, Brent's
    method). Per channel, each column ``c`` with absmax ``A_c``: the 64 geometric fractions
    ``A_c * 1000^(j/63 - 1)``, ``j = 0..63`` (from ``1e-3 A_c`` to ``A_c``, ratio
    ``r = 1000^(1/63) ~ 1.116``), then two refinements, each of 33 multipliers of the column's
    best point so far spanning its two neighbours: ``r^(t/16)``, then ``r^(t/256)``,
    ``t = -16..16`` (final spacing ``r^(1/256)``, ~0.04%). Each level contains the best point
    itself (``r^0 = 1``), so it never does worse. Every point is an exact sweep of the column
    (:func:`empirical.sweep.mse_sweep` semantics, the column's values divided by its scale).
``entropy``
    TensorRT's entropy (KL-divergence) calibrator, per tensor only (NVIDIA pytorch-quantization
    ``calib/histogram.py`` ``_compute_amax_entropy``, identical in ModelOpt's
    ``modelopt/torch/quantization/calib/histogram.py``; Migacz, "8-bit Inference with TensorRT",
    GTC 2017); see :func:`entropy_threshold` for the exact rule.
``theory``
    Theory's alpha* of a channel-mixture site model (``theory.ChannelMixture``, issue #14: each
    channel ``c`` is ``m_c + s_c Z``, its own mean and standard deviation, one shared
    unit-variance shape ``Z``) fitted from an :class:`empirical.capture.StreamingStats` of the
    matrix. Per tensor, the minimiser of the mixture's exact MSE. Per channel, each column's own
    optimum: the grid is fixed about 0, so column ``c`` needs
    ``alpha_c = min(s_c g(m_c / s_c), max_t |x_tc|)``, ``g(r)`` the minimiser of theory's exact
    MSE of ``r + Z`` (:class:`ShiftTable`; ``g(0)`` is ``theory.optimal_alpha(Z)``). See
    :func:`theory_threshold`.

Language-aware calibrators (:data:`LANGUAGE_AWARE`; :func:`language_aware_threshold`)
--------------------------------------------------------------------------------------
LA-ACIQ (docs/design.md, :mod:`theory.language_alpha`) on measured curves: each language's exact
MSE curve ``MSE_l(alpha)``, its penalty ``pi_l(alpha) = MSE_l(alpha) / min MSE_l - 1``;
``minimax`` = ``argmin_alpha max_l pi_l``, ``weighted`` = ``argmin_alpha sum_l v_l pi_l`` with
fairness weights ``v`` (equal by default).

Calibration sets (:func:`calibrate`)
------------------------------------
``mode="pooled"`` concatenates the languages' rows (the token-weighted mix) and calibrates once;
``mode="separate"`` calibrates each language and combines the thresholds
(:func:`combine_thresholds`). Language-aware methods ignore ``mode``.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np

from theory.grids import Grid, check_bits, step_factor

__all__ = ["CALIBRATORS", "LANGUAGE_AWARE", "GRANULARITIES", "MODES", "threshold",
           "language_aware_threshold", "combine_thresholds", "calibrate",
           "entropy_threshold", "theory_threshold", "ENTROPY_BINS", "ENTROPY_START_BIN",
           "THEORY_SHAPES", "ShiftTable", "SHIFT_TABLE_POINTS", "SHIFT_TABLE_MIN_RATIO",
           "SHIFT_TABLE_MAX_RATIO"]

CALIBRATORS = ("max", "p99.9", "p99.99", "mse", "entropy", "theory", "minimax", "weighted")
LANGUAGE_AWARE = ("minimax", "weighted")
GRANULARITIES = ("tensor", "channel")
MODES = ("pooled", "separate")

#: histogram bins of the entropy calibrator (TensorRT / ModelOpt default ``num_bins``)
ENTROPY_BINS = 2048
#: first candidate bin count of the entropy calibrator (TensorRT ``start_bin``; stride 1)
ENTROPY_START_BIN = 128
#: unit-variance shapes the ``theory`` calibrator chooses from (by BIC)
THEORY_SHAPES = ("gaussian", "laplace", "gennorm", "student_t")

_TINY = float(np.finfo(np.float64).tiny)
# a column whose std is at most this fraction of its |mean| is constant up to rounding
_CONSTANT = 1e-12
# per-channel MSE search: 64 geometric fractions of the column's scale from 1e-3 to 1 (ratio
# r = 1000^(1/63) ~ 1.116), then two refinements of 33 multipliers spanning the two neighbours of
# the best point: r^(t/16), then r^(t/256), t = -16..16 (r^0 = 1 exactly: never worse)
_N_COARSE = 64
_R = 1000.0 ** (1.0 / (_N_COARSE - 1))
_COARSE = 1000.0 ** (np.arange(_N_COARSE) / (_N_COARSE - 1) - 1.0)
_LEVELS = (_R ** (np.arange(-16, 17) / 16.0), _R ** (np.arange(-16, 17) / 256.0))
_PCT = re.compile(r"p(.+)")


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

def _parse_method(method) -> tuple[str, float | None]:
    """``(kind, q)``: kind one of max/percentile/mse/entropy/theory/minimax/weighted."""
    if not isinstance(method, str):
        raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(CALIBRATORS)} "
                         "or 'p<q>' for any percentile 0 < q <= 100")
    if method in ("max", "mse", "entropy", "theory") or method in LANGUAGE_AWARE:
        return method, None
    m = _PCT.fullmatch(method)
    if m:
        try:
            q = float(m.group(1))
        except ValueError:
            q = None
        if q is not None:
            if not 0.0 < q <= 100.0:
                raise ValueError(f"percentile {method!r} is outside (0, 100]")
            return "percentile", q
    raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(CALIBRATORS)} "
                     "or 'p<q>' for any percentile 0 < q <= 100")


def _check_grid_bits(grid, bits) -> tuple[Grid, int]:
    g = Grid.parse(grid)
    if g.one_sided:
        raise ValueError(f"grid {g.value!r} is one-sided (levels 0..alpha, for non-negative data); "
                         "activations are signed: use int, midrise, midtread or aciq")
    return g, check_bits(bits, g)


def _check_granularity(granularity) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; known: {', '.join(GRANULARITIES)}")
    return granularity


def _check_matrix(x, what: str = "x") -> np.ndarray:
    """``x`` as a finite, non-empty 2-D float32/float64 array ``(tokens, channels)``."""
    arr = np.asarray(x)
    if arr.dtype not in (np.float32, np.float64):
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"{what} must be a real numeric matrix, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (tokens, channels) matrix, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


def _check_samples(samples) -> dict[str, np.ndarray]:
    """Each language's matrix, checked, with one column count across languages."""
    if not isinstance(samples, Mapping):
        raise ValueError(f"samples must be a mapping language -> (tokens, channels) matrix, "
                         f"got {type(samples).__name__}")
    if len(samples) == 0:
        raise ValueError("no languages given (samples is empty)")
    out = {str(l): _check_matrix(x, f"samples of {l!r}") for l, x in samples.items()}
    cols = {l: a.shape[1] for l, a in out.items()}
    if len(set(cols.values())) > 1:
        raise ValueError(f"mismatched column (channel) counts across languages: {cols}")
    return out


def _positive(a) -> np.ndarray:
    """float64 thresholds with every zero replaced by the smallest positive float64."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(a > 0.0, a, _TINY)


def _measured_grid(g: Grid) -> Grid:
    # aciq is realised on the midrise levels: measured errors are those of midrise
    return Grid.MIDRISE if g is Grid.ACIQ else g


# --------------------------------------------------------------------------------------------
# the numpy reference quantizer
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# single-matrix calibrators
# --------------------------------------------------------------------------------------------

def _absmax(x: np.ndarray, granularity: str) -> np.ndarray:
    return np.max(np.abs(x), axis=None if granularity == "tensor" else 0).astype(np.float64)


def _percentile(x: np.ndarray, q: float, granularity: str) -> np.ndarray:
    mags = np.abs(x).astype(np.float64)
    return np.asarray(np.percentile(mags, q, axis=None if granularity == "tensor" else 0),
                      dtype=np.float64)


def _mse_tensor(x: np.ndarray, m: int, g: Grid) -> np.ndarray:
    from .optimal import empirical_optimal_alpha

    mags = np.abs(x)
    if float(np.max(mags)) == 0.0:
        return np.asarray(_TINY)
    mg = _measured_grid(g)
    f, kmin, kmax, off = step_factor(mg, m)
    # a grid symmetric about zero sees only magnitudes (the sort then skips the sign fold)
    y = mags if kmin + kmax + 2 * off == 0 else x
    return np.asarray(empirical_optimal_alpha(y, m, mg).alpha, dtype=np.float64)


def _column_curves(x: np.ndarray, scale: np.ndarray, fractions: np.ndarray, m: int, g: Grid) -> np.ndarray:
    """MSE of every column of ``x / scale`` at thresholds ``fractions``: ``[alpha, column]``, in
    units of ``scale^2`` (``MSE_raw(f * scale_c) / scale_c^2``). On a grid symmetric about zero
    only magnitudes matter, and the sort skips the sign fold."""
    from .sweep import prepare

    mg = _measured_grid(g)
    f, kmin, kmax, off = step_factor(mg, m)
    y = np.abs(x) / scale if kmin + kmax + 2 * off == 0 else x / scale
    return np.asarray(prepare(y, axis=1).mse(fractions, m, mg), dtype=np.float64)


def _channel_min(x: np.ndarray, m: int, g: Grid, s: np.ndarray):
    """Each column's MSE minimiser: ``(alpha, mse, coarse)``.

    ``alpha`` in data units; ``mse`` and the coarse curve ``[fraction, column]`` in units of
    ``s^2``. Search: the fractions :data:`_COARSE` of ``s`` (positive), then each level of
    :data:`_LEVELS` as multipliers of the best point so far.
    """
    cols = np.arange(x.shape[1])
    coarse = _column_curves(x, s, _COARSE, m, g)
    k = np.argmin(coarse, axis=0)
    a, best = _COARSE[k] * s, coarse[k, cols]
    for mult in _LEVELS:
        c = _column_curves(x, a, mult, m, g) * (a / s) ** 2
        k = np.argmin(c, axis=0)
        a, best = mult[k] * a, np.minimum(best, c[k, cols])
    return a, best, coarse


def _mse_channel(x: np.ndarray, m: int, g: Grid) -> np.ndarray:
    absmax = _absmax(x, "channel")
    zero = absmax == 0.0
    a, _, _ = _channel_min(x, m, g, np.where(zero, 1.0, absmax))
    return np.where(zero, 0.0, a)


def entropy_threshold(x, bits: int) -> float:
    """TensorRT's entropy (KL-divergence) threshold of the values of ``x`` (per tensor).

    The rule of NVIDIA pytorch-quantization ``calib/histogram.py`` ``_compute_amax_entropy``
    (the same code in ModelOpt's ``calib/histogram.py``; Migacz, GTC 2017), with its defaults
    ``num_bins=2048``, ``start_bin=128``, ``stride=1``, ``unsigned=False``:

    1. ``h``: histogram of ``|x|`` with :data:`ENTROPY_BINS` = 2048 equal bins on
       ``[0, max|x|]``, edges ``e_0 = 0 .. e_2048 = max|x|`` (``np.histogram``; ModelOpt uses
       ``torch.histc`` on float32 magnitudes, which can put a value lying on an edge in the other
       bin). Then the zero bin is overwritten with its neighbour: ``h_0 := h_1``.
    2. For every candidate ``i = 128, 129, .., 2048`` (the first ``i`` bins kept):

       * reference ``P``: ``h_0 .. h_{i-1}`` with the mass beyond added to the last one,
         ``P_{i-1} = h_{i-1} + sum_{j >= i} h_j``;
       * candidate ``Q``: bin ``j < i`` belongs to merged bin ``floor(j * B / i)`` with
         ``B = 2^(bits-1)`` merged bins (numpy ``digitize`` of ``range(i)`` against
         ``linspace(0, i, B + 1)``, which is exactly that integer division); each merged bin's
         mass ``sum h_j`` (without the outlier mass) is spread evenly over its *nonzero* bins,
         and ``Q_j = 0`` where ``h_j = 0``;
       * ``KL_i = scipy.stats.entropy(P, Q)`` (which normalises both to sum 1):
         ``sum_j p_j log(p_j / q_j)``, infinite where ``P_{i-1} > 0 = Q_{i-1}``.
    3. The threshold is ``e_i`` (the upper edge of the ``i``-th bin, counted from 1) of the
       minimising ``i``; ties go to the largest ``i`` (TensorRT's "last argmin").

    ``B`` is TensorRT's ``1 << (num_bits - 1 + unsigned)`` with ``unsigned=False``, whatever the
    grid: the positive levels of the symmetric ``midrise``/``aciq`` grids (``2^(M-1)``), one more
    than the positive levels of ``int`` (``2^(M-1) - 1``) and of ``midtread`` (``2^(M-1) - 1``
    positive, ``2^(M-1)`` negative). At ``bits >= 9`` (``B >= 256 > 128``) every bin of a
    candidate is its own merged bin, ``KL_i`` comes only from the outlier mass and ``i = 2048``
    (``max|x|``) wins.

    One deviation: where ``h_0 .. h_{i-1}`` are all zero, ``Q`` is empty and scipy returns NaN;
    such a candidate counts as infinitely far (TensorRT's ``np.argmin`` would pick the first NaN).
    ``x`` all zero gives ``np.finfo(float).tiny``.

    Parameters
    ----------
    x : array_like
        Values (any shape; finite).
    bits : int
        Bit width ``M`` (1..16).

    Returns
    -------
    float
    """
    from scipy.stats import entropy

    m = check_bits(bits)
    mags = np.abs(np.asarray(x, dtype=np.float64)).ravel()
    if mags.size == 0:
        raise ValueError("x is empty")
    if not np.all(np.isfinite(mags)):
        raise ValueError("x contains NaN or infinite values")
    amax = float(mags.max())
    if amax == 0.0:
        return _TINY
    hist, edges = np.histogram(mags, bins=ENTROPY_BINS, range=(0.0, amax))
    h = hist.astype(np.float64)
    h[0] = h[1]
    nz = h != 0
    csum = np.concatenate([[0.0], np.cumsum(h)])  # integer counts: exact in float64
    total = csum[-1]
    nb = 1 << (m - 1)
    j = np.arange(ENTROPY_BINS)
    cands = np.arange(ENTROPY_START_BIN, ENTROPY_BINS + 1)
    kl = np.empty(cands.size)
    for t, i in enumerate(cands):
        hi = h[:i]
        p = hi.copy()
        p[-1] += total - csum[i]
        merged = (j[:i] * nb) // i
        mass = np.bincount(merged, weights=hi, minlength=nb)
        count = np.bincount(merged, weights=nz[:i], minlength=nb)
        q = np.zeros(i)
        sel = nz[:i]
        q[sel] = mass[merged[sel]] / count[merged[sel]]
        with np.errstate(invalid="ignore", divide="ignore"):
            d = float(entropy(p, q))
        kl[t] = d if not math.isnan(d) else math.inf
    best = kl.size - 1 - int(np.argmin(kl[::-1]))
    return float(edges[cands[best]])


def _theory_stats(x: np.ndarray, seed: int):
    import torch

    from .capture import StreamingStats

    st = StreamingStats(seed=int(seed), top_k=0)
    st.update(torch.from_numpy(np.ascontiguousarray(x)))
    return st


def _theory_shape(st) -> tuple[str, tuple]:
    """The shape of :data:`THEORY_SHAPES` with the best BIC on the standardized reservoir."""
    from theory.site_models import fit_unit_shape, unit_variance

    xs, ch = st.sample(), st.sample_channels()
    n = st.channel_count
    mean = st.channel_sum / n
    std = np.sqrt(np.maximum(st.channel_sumsq / n - mean * mean, 0.0))
    ok = std[ch] > 0
    z = (xs[ok] - mean[ch[ok]]) / std[ch[ok]]
    if z.size < 10:
        return "gaussian", ()
    best, best_bic = ("gaussian", ()), math.inf
    for fam in THEORY_SHAPES:
        try:
            shape = fit_unit_shape(z, fam)
            ll = float(np.sum(np.log(np.maximum(unit_variance(fam, *shape).pdf(z), 1e-300))))
        except (ValueError, RuntimeError):
            continue
        bic = len(shape) * math.log(z.size) - 2.0 * ll
        if bic < best_bic:
            best, best_bic = (fam, shape), bic
    return best


# --------------------------------------------------------------------------------------------
# theory per channel: g(r), the MSE-optimal threshold of a unit shape shifted by r
# (ShiftTable; the helpers below work on r >= 0, a negative r on the mirrored levels)
# --------------------------------------------------------------------------------------------

#: log-spaced nonzero ratios ``r = |mean| / std`` of a :class:`ShiftTable` (plus ``r = 0``)
SHIFT_TABLE_POINTS = 48
#: the smallest nonzero ratio of a :class:`ShiftTable`; below it ``g`` is linear in ``r``
SHIFT_TABLE_MIN_RATIO = 1e-2
#: the largest ratio a :class:`ShiftTable` tabulates; beyond it every ratio is searched
SHIFT_TABLE_MAX_RATIO = 1e4
#: relative ripple of the MSE (:func:`_ripple`) above which the optimum is searched level by level
SHIFT_RIPPLE_TOL = 5e-3
_SHIFT_TABLE_RIPPLE = 1e-4  # ripple above which a table ratio is searched window by window
_SHIFT_CENTRE_SCAN = 8    # most window centres compared inside a table ratio's scan bracket
_SHIFT_SCAN = 12          # log-spaced scan points per table ratio
_SHIFT_XTOL = 1e-9       # relative alpha tolerance of the derivative root search
_SHIFT_CENTRES = 2        # windows on each side of a query's interpolated one whose centres are compared
_SHIFT_ROUNDS = 8         # most windows a window search adds on one side
_SHIFT_CELLS = 500_000    # pairs x cells evaluated at once (memory bound)


class _Side:
    """The levels one sign of ``r`` sees, mirrored so that ``r >= 0``: level ``j`` (ascending,
    ``j = 0 .. n-1``) sits at ``Q_j alpha``, ``Q_j = (kmin + j + off) f``; ``E_j`` are the cell
    edges in units of alpha (``E_0 = -inf``, ``E_n = inf``, else the midpoints). ``aciq`` is the
    ACIQ model (no levels)."""

    def __init__(self, g: Grid, m: int, mirror: bool):
        f, kmin, kmax, off = step_factor(g, m)
        if mirror:  # levels -(k + off) f: k' = -k, off' = -off
            kmin, kmax, off = -kmax, -kmin, -off
        self.f, self.kmin, self.kmax, self.off, self.m = f, kmin, kmax, off, m
        self.aciq = g is Grid.ACIQ
        self.n = kmax - kmin + 1
        self.Q = (np.arange(kmin, kmax + 1, dtype=np.float64) + off) * f
        self.E = np.concatenate([[-np.inf], 0.5 * (self.Q[1:] + self.Q[:-1]), [np.inf]])
        self.top = float(self.Q[-1]) if not self.aciq else 1.0

    def window_of(self, r: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Index ``j`` of the level nearest to ``r`` at threshold ``a``."""
        with np.errstate(over="ignore", invalid="ignore"):
            k = np.floor(r / (self.f * a) - self.off + 0.5)
        return (np.clip(np.nan_to_num(k, nan=self.kmax), self.kmin, self.kmax) - self.kmin).astype(np.int64)

    def window(self, r: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[lo, hi]``: the alphas at which level ``j`` is the one nearest to ``r >= 0``
        (``E_j a <= r <= E_{j+1} a``); empty (``lo > hi``) where no alpha makes it so."""
        e_lo, e_hi = self.E[j], self.E[j + 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            lo = np.where(np.isposinf(e_hi), 0.0, np.where(e_hi > 0, r / e_hi, np.inf))
            hi = np.where(e_lo > 0, r / e_lo, np.inf)
        return lo, hi


def _shifted_mse(unit, side: _Side, r, a, deriv: bool = False):
    """Exact MSE of ``r + Z`` (``Z`` = ``unit``) quantized at threshold ``a`` on ``side``'s
    levels, elementwise over ``r`` and ``a`` (1-D, same length), and with ``deriv`` its
    derivative in ``a``.

    Theory's cell integral (:func:`theory.site_models.site_mse_on_levels` for one channel of
    scale 1): the cell of level ``q`` between edges ``(u, v)`` contributes
    ``M_2 - 2 c M_1 + c^2 M_0`` with ``c = q - r`` and ``M_k`` the moments of ``Z`` over
    ``(u - r, v - r)``; only the cells within theory's support radius of ``r`` are integrated.
    The derivative is ``-(2 / a) sum_cells q (M_1 - c M_0)``: every inner edge is the midpoint
    of its two levels, where the two cells' integrands are equal, so the moving edges add
    nothing. ACIQ: the exact clipping error beyond ``+-a`` plus ``a^2 / (3 4^M)``, derivative
    ``-2 E[(X - a)^+] - 2 E[(-X - a)^+] + 2 a / (3 4^M)``.
    """
    from theory.site_models import _consecutive_moments, _support_radius, interval_moments

    r = np.asarray(r, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    if side.aciq:
        inf = np.full(r.shape, np.inf)
        hi, lo = a - r, -a - r
        up = interval_moments(unit, hi, inf)
        dn = interval_moments(unit, -inf, lo)
        mse = ((up[2] - 2 * hi * up[1] + hi * hi * up[0]) + (dn[2] - 2 * lo * dn[1] + lo * lo * dn[0])
               + a * a / (3.0 * 4.0 ** side.m))
        if not deriv:
            return mse
        return mse, -2 * (up[1] - hi * up[0]) + 2 * (dn[1] - lo * dn[0]) + 2 * a / (3.0 * 4.0 ** side.m)
    n = side.n
    radius = _support_radius(unit) if n > 16 else None
    if radius is None:
        first = np.zeros(r.shape, dtype=np.int64)
        width = n
    else:
        first = side.window_of(r - radius, a)
        width = int(np.max(side.window_of(r + radius, a) - first)) + 1 if r.size else 1
        first = np.minimum(first, n - width)
    mse = np.empty(r.shape)
    der = np.empty(r.shape) if deriv else None
    per = max(1, _SHIFT_CELLS // width)
    cols = np.arange(width)
    for s in range(0, r.size, per):
        sl = slice(s, s + per)
        j = first[sl, None] + cols[None, :]
        aa, rr = a[sl, None], r[sl, None]
        q = side.Q[j] * aa
        t = np.concatenate([side.E[j] * aa, side.E[j[:, -1:] + 1] * aa], axis=1) - rr
        c = q - rr
        m0, m1, m2 = _consecutive_moments(unit, t)
        mse[sl] = np.sum(m2 - 2.0 * c * m1 + c * c * m0, axis=1)
        if deriv:
            der[sl] = -2.0 / a[sl] * np.sum(q * (m1 - c * m0), axis=1)
    return (mse, der) if deriv else mse


def _root(dfun, lo, hi, dlo, dhi):
    """Illinois (modified regula falsi) on the derivative: a root of ``dfun`` in ``[lo, hi]``
    where ``dlo < 0 < dhi``, to ``_SHIFT_XTOL`` relative; keeps the bracket, so the root is a
    local minimum of the MSE."""
    lo, hi, dlo, dhi = (np.array(v, dtype=np.float64) for v in (lo, hi, dlo, dhi))
    last = np.zeros(lo.shape, dtype=np.int8)  # -1: lo moved last, +1: hi moved last
    act = np.arange(lo.size)
    for _ in range(100):
        if act.size == 0:
            break
        a, b, da, db = lo[act], hi[act], dlo[act], dhi[act]
        c = (a * db - b * da) / (db - da)
        c = np.where((c > a) & (c < b), c, 0.5 * (a + b))
        dc = dfun(act, c)
        left = dc < 0
        lact = last[act]
        # Illinois: an end that stays twice in a row has its derivative halved
        dhi[act] = np.where(left & (lact == -1), 0.5 * db, np.where(left, db, dc))
        dlo[act] = np.where(~left & (lact == 1), 0.5 * da, np.where(left, dc, da))
        lo[act] = np.where(left, c, a)
        hi[act] = np.where(left, b, c)
        last[act] = np.where(left, -1, 1)
        done = (hi[act] - lo[act] <= _SHIFT_XTOL * hi[act]) | (dc == 0)
        lo[act[dc == 0]] = hi[act[dc == 0]] = c[dc == 0]
        act = act[~done]
    return 0.5 * (lo + hi)


def _local_min(unit, side, r, lo, hi):
    """Each interval's lowest point, as ``(alpha, mse)``: the root of the derivative where it
    changes sign from - to + between the ends (Illinois), else the lower of the two ends."""
    v_lo, d_lo = _shifted_mse(unit, side, r, lo, deriv=True)
    v_hi, d_hi = _shifted_mse(unit, side, r, hi, deriv=True)
    low = v_hi < v_lo
    alpha, mse = np.where(low, hi, lo), np.where(low, v_hi, v_lo)
    inner = (d_lo < 0) & (d_hi > 0)
    if np.any(inner):
        i = np.flatnonzero(inner)
        root = _root(lambda idx, c: _shifted_mse(unit, side, r[i][idx], c, deriv=True)[1],
                     lo[i], hi[i], d_lo[i], d_hi[i])
        vr = _shifted_mse(unit, side, r[i], root)
        better = vr < mse[i]
        alpha[i[better]], mse[i[better]] = root[better], vr[better]
    return alpha, mse


def _window_min(unit, side: _Side, r, lo, hi, centre):
    """Each window's lowest point ``(alpha, mse)``: the MSE and its derivative at ``lo``,
    ``centre`` (the alpha that puts the window's level on ``r``), the two midpoints and ``hi``;
    every sub-interval where the derivative changes sign from - to + is solved (Illinois), and
    the lowest of those roots and the five points is kept. (A window's ends, where ``r`` lies
    halfway between two levels, are near maxima of the ripple, so the derivative at the ends
    alone does not bracket the minimum inside.)"""
    pts = np.stack([lo, 0.5 * (lo + centre), centre, 0.5 * (centre + hi), hi], axis=1)
    n = r.size
    v, d = _shifted_mse(unit, side, np.repeat(r, 5), pts.ravel(), deriv=True)
    v, d = v.reshape(n, 5), d.reshape(n, 5)
    k = np.argmin(v, axis=1)
    best_a, best_v = pts[np.arange(n), k], v[np.arange(n), k]
    w, s = np.nonzero((d[:, :-1] < 0) & (d[:, 1:] > 0))
    if w.size:
        root = _root(lambda idx, c: _shifted_mse(unit, side, r[w][idx], c, deriv=True)[1],
                     pts[w, s], pts[w, s + 1], d[w, s], d[w, s + 1])
        vr = _shifted_mse(unit, side, r[w], root)
        for i in range(4):  # at most one root per sub-interval: four passes settle ties
            sel = s == i
            better = vr[sel] < best_v[w[sel]]
            best_a[w[sel][better]], best_v[w[sel][better]] = root[sel][better], vr[sel][better]
    return best_a, best_v


def _search_range(side: _Side, g0: float, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the optimum of ``r + Z`` is sought: ``[max(g0, r / Q_top) / 4, 4 (g0 + r) / Q_top]``
    (``Q_top``: the top level in units of alpha)."""
    return 0.25 * np.maximum(g0, r / side.top), 4.0 * (g0 + r) / side.top


def _centre(side: _Side, r: np.ndarray, j: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The alpha that puts level ``j`` on ``r`` (``r / Q_j``), or the window's geometric middle
    where that lies outside ``[lo, hi]``."""
    q = side.Q[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(q > 0, r / q, np.nan)
    return np.where((c > lo) & (c < hi), c, np.sqrt(lo * np.where(np.isfinite(hi), hi, lo)))


def _windows(side: _Side, r, j, A_lo, A_hi):
    """Window ``j`` of each ``r`` within the search range: ``(ok, lo, hi)``."""
    ok = (j >= 0) & (j < side.n)
    lo, hi = side.window(r, np.clip(j, 0, side.n - 1))
    lo, hi = np.maximum(lo, A_lo), np.minimum(hi, A_hi)
    return ok & (lo < hi), lo, hi


def _best_centre(unit, side: _Side, g0: float, r: np.ndarray, j_lo: np.ndarray, j_hi: np.ndarray,
                 most: int | None = None):
    """For each ``r``, the window ``j_lo <= j <= j_hi`` whose level put on ``r`` (the window's
    :func:`_centre`) gives the lowest MSE: one evaluation per window, all at the same phase of
    the ripple, so they trace its envelope. With ``most``, every ``ceil(count / most)``-th window
    only (the envelope is smooth)."""
    j_lo, j_hi = np.maximum(j_lo, 0), np.minimum(j_hi, side.n - 1)
    span = np.maximum(j_hi - j_lo + 1, 1)
    stride = np.ones_like(span) if most is None else -(-span // most)
    count = -(-span // stride)
    owner = np.repeat(np.arange(r.size), count)
    j = j_lo[owner] + stride[owner] * (np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count))
    A_lo, A_hi = _search_range(side, g0, r)
    ok, lo, hi = _windows(side, r[owner], j, A_lo[owner], A_hi[owner])
    v = np.full(owner.size, np.inf)
    if np.any(ok):
        v[ok] = _shifted_mse(unit, side, r[owner][ok], _centre(side, r[owner][ok], j[ok], lo[ok], hi[ok]))
    order = np.lexsort((v, owner))
    first = order[np.searchsorted(owner[order], np.arange(r.size))]
    return np.where(np.isfinite(v[first]), j[first], np.clip(j_lo, 0, side.n - 1)), stride


def _window_search(unit, side: _Side, g0: float, r: np.ndarray, j0: np.ndarray):
    """Best threshold of ``r + Z`` over the windows of levels around window ``j0``: windows
    ``j0 - 1 .. j0 + 1`` (:meth:`_Side.window`, within :func:`_search_range`), each minimised by
    :func:`_window_min`, then one more window on the side of the best while the best is at an end
    of those searched (at most :data:`_SHIFT_ROUNDS` more on each side); and the top level's
    window where it is near (within :data:`_SHIFT_CENTRES` windows; its minimum is not near its
    centre, since the clipping above it moves it up) or where the step at the top level on ``r``
    is at least the spread (``f r / Q_top >= 1``: every window's minimum is then close to the
    variance, and the top one, the finest step that holds ``r``, is the best).
    Returns ``(alpha, mse)``."""
    A_lo, A_hi = _search_range(side, g0, r)
    n = r.size
    best_a, best_v = np.full(n, np.nan), np.full(n, np.inf)

    def evaluate(idx, j):
        """Minimise window ``j`` of the problems ``idx``; which of them it improved."""
        ok, lo, hi = _windows(side, r[idx], j, A_lo[idx], A_hi[idx])
        i = idx[ok]
        if i.size == 0:
            return i, np.zeros(0, dtype=bool)
        jj = j[ok]
        a, v = _window_min(unit, side, r[i], lo[ok], hi[ok], _centre(side, r[i], jj, lo[ok], hi[ok]))
        better = v < best_v[i]
        best_a[i[better]], best_v[i[better]] = a[better], v[better]
        return i, better

    j0 = np.asarray(j0, dtype=np.int64)
    everyone = np.arange(n)
    best_j = j0.copy()
    for dj in (0, -1, 1):
        i, better = evaluate(everyone, j0 + dj)
        best_j[i[better]] = j0[i[better]] + dj
    lo_j, hi_j = j0 - 1, j0 + 1
    for _ in range(_SHIFT_ROUNDS):
        moved = False
        for step in (-1, 1):
            edge = lo_j if step < 0 else hi_j
            idx = np.flatnonzero((best_j == edge) & (edge + step >= 0) & (edge + step < side.n))
            if idx.size == 0:
                continue
            moved = True
            edge[idx] += step
            i, better = evaluate(idx, edge[idx])
            best_j[i[better]] = edge[i[better]]
        if not moved:
            break
    # where the step is as wide as the spread every window's minimum is close to the variance,
    # and the top level's window (the finest step that still holds r) is the best
    top = np.flatnonzero((hi_j < side.n - 1)
                         & ((hi_j >= side.n - 1 - _SHIFT_CENTRES) | (side.f * r / side.top >= 1.0)))
    if top.size:
        evaluate(top, np.full(top.size, side.n - 1))
    return best_a, best_v


def _ripple(unit, side: _Side, r: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Relative amplitude of the MSE's ripple with the position of ``r`` between two levels, at
    threshold ``a``: the MSE at ``r + j step / 4``, ``j = -2..2``, fitted exactly by a quadratic in
    the shift plus ``A cos(2 pi shift / step) + B sin(2 pi shift / step)``; returns
    ``sqrt(A^2 + B^2) / MSE(r)``. A smooth envelope leaves it near 0; a level that can sit on a
    peaked mode, or a step as wide as the spread, does not."""
    j = np.arange(-2, 3, dtype=np.float64)
    step = side.f * a
    y = _shifted_mse(unit, side, (r[:, None] + j[None, :] * step[:, None] / 4).ravel(),
                     np.repeat(a, 5)).reshape(r.size, 5)
    design = np.stack([np.ones(5), j, j * j, np.cos(np.pi * j / 2), np.sin(np.pi * j / 2)], axis=1)
    coef = np.linalg.solve(design, y.T)
    return np.hypot(coef[3], coef[4]) / y[:, 2]


def _optimal_shifted(unit, side: _Side, g0: float, r: np.ndarray):
    """Global optimum of ``r + Z`` for every ``r >= 0``.

    1. A scan of :data:`_SHIFT_SCAN` log-spaced thresholds over
       ``[max(g0, r / Q_top) / 2, 2 (g0 + r) / Q_top]``; its best point and the two neighbours
       bracket the optimum.
    2. (``r > 0``, not ``aciq``) The centres of the windows inside that bracket (at most
       :data:`_SHIFT_CENTRE_SCAN`, evenly strided; :func:`_best_centre`: each window's level on
       ``r``, so all at the same phase of the ripple), and the bracket narrowed to the best
       centre's window and the windows one stride away on each side.
    3. The local minimum in the bracket (:func:`_local_min`).
    4. Where the MSE's ripple there exceeds 1e-4 (:func:`_ripple`; a local minimum of a
       smaller ripple is within it of the global one), :func:`_window_search` from the best
       centre's window; the ratio is *rippled* where it exceeds :data:`SHIFT_RIPPLE_TOL`.

    ``aciq`` (whose MSE is convex in alpha) and ``r = 0`` stop at step 3. Returns
    ``(alpha, rippled)``.
    """
    s_lo, s_hi = 0.5 * np.maximum(g0, r / side.top), 2.0 * (g0 + r) / side.top
    t = np.linspace(0.0, 1.0, _SHIFT_SCAN)
    scan = s_lo[:, None] * (s_hi / s_lo)[:, None] ** t[None, :]
    v = _shifted_mse(unit, side, np.repeat(r, _SHIFT_SCAN), scan.ravel()).reshape(scan.shape)
    b = np.argmin(v, axis=1)
    rows = np.arange(r.size)
    lo = scan[rows, np.maximum(b - 1, 0)]
    hi = scan[rows, np.minimum(b + 1, _SHIFT_SCAN - 1)]
    pos = np.flatnonzero(r > 0) if not side.aciq else np.zeros(0, dtype=np.int64)
    jc = np.zeros(r.size, dtype=np.int64)
    if pos.size:
        rp = r[pos]
        jc[pos], stride = _best_centre(unit, side, g0, rp, side.window_of(rp, hi[pos]),
                                       side.window_of(rp, lo[pos]), most=_SHIFT_CENTRE_SCAN)
        # windows jc + stride (lower alphas) to jc - stride (higher), within the bracket
        ok_lo, w_lo, _ = _windows(side, rp, jc[pos] + stride, lo[pos], hi[pos])
        ok_hi, _, w_hi = _windows(side, rp, jc[pos] - stride, lo[pos], hi[pos])
        ok_c, c_lo, c_hi = _windows(side, rp, jc[pos], lo[pos], hi[pos])
        new_lo = np.where(ok_lo, w_lo, np.where(ok_c, c_lo, lo[pos]))
        new_hi = np.where(ok_hi, w_hi, np.where(ok_c, c_hi, hi[pos]))
        good = new_lo < new_hi
        lo[pos[good]], hi[pos[good]] = new_lo[good], new_hi[good]
    alpha, _ = _local_min(unit, side, r, lo, hi)
    rippled = np.zeros(r.size, dtype=bool)
    if pos.size:
        # a ripple can only make several minima where more than one window lies within a
        # factor 2 of the local minimum found
        ap = alpha[pos]
        cand = pos[side.window_of(r[pos], ap / 2) != side.window_of(r[pos], 2 * ap)]
        rip = _ripple(unit, side, r[cand], alpha[cand])
        rippled[cand] = rip > SHIFT_RIPPLE_TOL
        win = cand[rip > _SHIFT_TABLE_RIPPLE]
        if win.size:
            a, val = _window_search(unit, side, g0, r[win], jc[win])
            cur = _shifted_mse(unit, side, r[win], alpha[win])
            alpha[win] = np.where(val < cur, a, alpha[win])
    return alpha, rippled


def _query_search(unit, side: _Side, g0: float, r: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The optimum of ``r + Z`` near an interpolated ``seed``, for ratios in rippled intervals:
    the centres (:func:`_centre`) of the :data:`_SHIFT_CENTRES` windows on each side of the
    seed's are compared (:func:`_best_centre`), :func:`_window_search` runs from the best, and
    the seed's own window is minimised too where it lies outside the windows searched (a window
    whose minimum is far from its centre, such as the level nearest 0 or the top level's, is
    not ranked well by its centre)."""
    A_lo, A_hi = _search_range(side, g0, r)
    j0 = side.window_of(r, seed)
    jc = _best_centre(unit, side, g0, r, j0 - _SHIFT_CENTRES, j0 + _SHIFT_CENTRES)[0]
    out, best = _window_search(unit, side, g0, r, jc)
    far = np.flatnonzero(np.abs(j0 - jc) > 1)
    if far.size:
        ok, lo, hi = _windows(side, r[far], j0[far], A_lo[far], A_hi[far])
        i = far[ok]
        if i.size:
            a, v = _window_min(unit, side, r[i], lo[ok], hi[ok], _centre(side, r[i], j0[i], lo[ok], hi[ok]))
            better = v < best[i]
            out[i[better]] = a[better]
    return out


class _HalfTable:
    """``g`` on one side of ``r`` (mirrored to ``r >= 0``)."""

    def __init__(self, unit, side: _Side, g0: float, r_max: float):
        from scipy.interpolate import PchipInterpolator

        self.unit, self.side, self.g0 = unit, side, g0
        hi = min(max(float(r_max), 10.0 * SHIFT_TABLE_MIN_RATIO), SHIFT_TABLE_MAX_RATIO)
        self.ratios = np.concatenate([[0.0], np.geomspace(SHIFT_TABLE_MIN_RATIO, hi, SHIFT_TABLE_POINTS)])
        self.alphas, self.rippled = _optimal_shifted(unit, side, g0, self.ratios)
        self._pchip = PchipInterpolator(np.log(self.ratios[1:]), self.alphas[1:], extrapolate=False)

    def interpolate(self, r: np.ndarray) -> np.ndarray:
        """PCHIP in ``log r`` between the nonzero ratios, linear in ``r`` on ``[0, r_1]``; beyond
        the last ratio ``r_N``: ``g(r_N) r / r_N``."""
        r1, rn = self.ratios[1], self.ratios[-1]
        with np.errstate(divide="ignore"):
            lr = np.log(np.clip(r, r1, rn))
        out = self._pchip(lr)
        small = r < r1
        out[small] = self.alphas[0] + (self.alphas[1] - self.alphas[0]) * r[small] / r1
        big = r > rn
        out[big] = self.alphas[-1] * r[big] / rn
        return out

    def flagged(self, r: np.ndarray) -> np.ndarray:
        """Whether ``r`` lies beyond the table or in an interval with a rippled end."""
        i = np.clip(np.searchsorted(self.ratios, r, side="right") - 1, 0, self.ratios.size - 2)
        return (r > self.ratios[-1]) | self.rippled[i] | self.rippled[i + 1]

    def __call__(self, r: np.ndarray) -> np.ndarray:
        out = self.interpolate(r)
        f = np.flatnonzero(self.flagged(r))
        if f.size:
            out[f] = _query_search(self.unit, self.side, self.g0, r[f], out[f])
        return out


class ShiftTable:
    """``g(r)``: the MSE-optimal threshold of the unit-variance shape shifted by ``r``,
    ``r + Z``, on one grid and bit width, for the signed ratios ``r = mean / std`` of a set of
    columns (``|r| <= r_max``).

    A column ``x = m + s Z`` (``s > 0``) has its optimum at ``s g(m / s)``: the grid is fixed
    about 0, so the shift matters and the scale does not. On a grid symmetric about 0 (``int``,
    ``midrise``, ``aciq``) ``g(-r) = g(r)``; ``midtread`` (one more level below 0) has a table
    per sign, the negative one built on the mirrored levels. ``g(0)`` is
    ``theory.optimal_alpha`` of the shape.

    The MSE is theory's, exact: the cell integral of :func:`theory.site_models.site_mse_on_levels`
    for one channel (``aciq``: the ACIQ model, clipping plus ``alpha^2 / (3 4^M)``), evaluated
    with its derivative in alpha (:func:`_shifted_mse`). Where the step is comparable to the
    column's spread, or the shape has a sharp peak (Laplace, generalized Gaussian with
    ``beta <= 1``, Student-t with small ``nu``), the MSE *ripples* with the position of ``r``
    between two levels: along alpha it has a local minimum in many *windows* (the alphas at which
    one given level is the nearest to ``r``), one per level that can sit on the column's mode, so
    ``g`` jumps from level to level as ``r`` grows and no interpolation follows it.

    **Table.** ``r = 0`` and :data:`SHIFT_TABLE_POINTS` = 48 log-spaced ratios from
    :data:`SHIFT_TABLE_MIN_RATIO` = 0.01 to ``min(max(r_max, 0.1), SHIFT_TABLE_MAX_RATIO)``,
    each solved by :func:`_optimal_shifted` (a scan, the envelope of the ripple from the windows'
    centres, a root of the derivative, and where the ripple exceeds 1e-4 a search window by
    window, :func:`_window_search`). A ratio is *rippled* where the relative ripple
    (:func:`_ripple`) exceeds :data:`SHIFT_RIPPLE_TOL` = 5e-3 and more than one window lies within
    a factor 2 of its optimum.

    **Query.** PCHIP (monotone cubic) interpolation of ``g`` in ``log r`` between the nonzero
    ratios, linear in ``r`` on ``[0, 0.01]``, is the answer where both ends of the ratio's
    interval are smooth (not rippled). Elsewhere (and beyond the table) the interpolated value
    only seeds a search at that ratio (:func:`_query_search`: the window centres around it, then
    the window search).

    **Error, measured** against a brute-force optimum (the exact MSE scanned with 8 to 24 points
    per window over ``[max(g(0), r) / 3, 3 (g(0) + r)]``, then Brent) at 40 log-uniform random
    ratios in ``[0.001, 100]`` in each of 144 cases: Gaussian, Laplace, Student-t (``nu`` = 2.05,
    2.3, 4) and generalized Gaussian (``beta`` = 0.4, 0.7, 1.5) shapes on ``int``, ``midtread``,
    ``midrise`` and ``aciq`` at 2, 3, 4, 6 and 8 bits. Searched ratios: within 1.5e-3 of the
    optimal MSE (within 1e-12, or below the brute force, in all but three cases). Interpolated
    ratios: at 3 and 4 bits within 2.2e-5 of the optimal MSE and 0.22% of the optimal alpha; at
    2 bits within 8.3e-4; at 6 and 8 bits within 9e-3 and 2.5%, except Student-t ``nu = 2.3``
    (1.4e-2, and alphas up to 23% off: a ripple just under the tolerance on a flat curve, where
    far-apart alphas have nearly the same MSE); on ``aciq`` within 1.4e-5 and 0.03%.

    Parameters
    ----------
    family : str
        A shape of :data:`THEORY_SHAPES`.
    shape : tuple
        Its shape parameters (``()``, ``(beta,)``, ``(nu,)``), as ``theory.site_models.unit_variance``.
    bits : int
    grid : str
        A signed grid.
    r_max : float
        The largest ``|mean| / std`` to be asked (finite, >= 0); larger ratios are searched.
    """

    def __init__(self, family: str, shape: tuple, bits: int, grid: Grid | str, r_max: float):
        from theory.optimal import optimal_alpha
        from theory.site_models import unit_variance

        g, m = _check_grid_bits(grid, bits)
        r_max = float(r_max)
        if not (math.isfinite(r_max) and r_max >= 0):
            raise ValueError(f"r_max must be finite and non-negative, got {r_max!r}")
        self.unit = unit_variance(family, *shape)
        self.bits, self.grid = m, g
        self.g0 = float(optimal_alpha(self.unit, m, g))
        f, kmin, kmax, off = step_factor(g, m)
        self.symmetric = kmin + kmax + 2 * off == 0
        self.pos = _HalfTable(self.unit, _Side(g, m, False), self.g0, r_max)
        self.neg = None if self.symmetric else _HalfTable(self.unit, _Side(g, m, True), self.g0, r_max)

    def __call__(self, r) -> np.ndarray:
        """``g(r)`` for signed ratios ``r`` (array, finite)."""
        r = np.asarray(r, dtype=np.float64)
        if not np.all(np.isfinite(r)):
            raise ValueError("ratios must be finite")
        flat = r.ravel()
        out = np.empty(flat.shape)
        if self.symmetric:
            out[:] = self.pos(np.abs(flat))
        else:
            p = flat >= 0
            out[p] = self.pos(flat[p])
            out[~p] = self.neg(-flat[~p])
        return out.reshape(r.shape)

    def mse(self, r, alpha) -> np.ndarray:
        """Theory's exact MSE of ``r + Z`` at threshold ``alpha`` (elementwise, signed ``r``)."""
        r, alpha = (np.asarray(v, dtype=np.float64) for v in np.broadcast_arrays(r, alpha))
        flat, a = r.ravel(), alpha.ravel()
        out = np.empty(flat.shape)
        p = (flat >= 0) | self.symmetric
        side = self.pos.side
        out[p] = _shifted_mse(self.unit, side, np.abs(flat[p]), a[p])
        if not np.all(p):
            out[~p] = _shifted_mse(self.unit, self.neg.side, -flat[~p], a[~p])
        return out.reshape(r.shape)


def theory_threshold(x, bits: int, grid: Grid | str = "int", granularity: str = "tensor",
                     seed: int = 0) -> np.ndarray:
    """Theory's clipping threshold from a channel-mixture site model fitted to ``x``.

    The model (``theory.ChannelMixture``, issue #14): channel ``c`` is ``mu_c + s_c Z`` with its
    mean and standard deviation from the per-channel power sums of an
    :class:`empirical.capture.StreamingStats` of ``x`` (``top_k=0``, seeded by ``seed``), and
    ``Z`` one unit-variance shape shared by all channels. The shape is the member of
    :data:`THEORY_SHAPES` (Gaussian, Laplace, generalized Gaussian, Student-t ``nu > 2``), each
    fitted by maximum likelihood to the reservoir sample standardized by its channels
    (``theory.site_models.fit_unit_shape``), with the lowest BIC ``k ln n - 2 ln L``.

    This is not #14's ``selected`` model (``empirical.site_fit.fit_site_models``: every model,
    then the one whose MSE curve best matches a held-out half of a stratified sample): on a
    (2000, 2048) matrix that costs ~2.7 s at 4 bits and ~20 s at 8 bits (two shared cores),
    most of it in the held-out curves; #14 found the channel mixture to be the model that holds
    on Linear inputs. Here the shape is chosen by likelihood instead, which costs one cheap fit
    per shape. Per channel, a (2000, 2048) float32 matrix costs 0.05-0.12 s at 4 and 8 bits with
    Gaussian, Laplace or Student-t (``nu`` = 5) columns, 5% of them offset by 3 to 50 std
    (0.24 s at 8 bits with every column so offset), and 0.28 s / 0.42 s (4 / 8 bits) with
    generalized Gaussian ``beta = 0.7`` columns; the searches of rippled ratios make very peaked
    shapes slow at 8 bits: ~4 s where ``beta = 0.42`` is fitted, or ``beta = 0.7`` with every
    column offset (two shared cores).

    * ``tensor``: ``ChannelMixture.optimal_alpha(bits, grid)``, the minimiser of the model's exact
      MSE, capped at ``max|x|`` (a larger threshold only coarsens the step).
    * ``channel``: column ``c`` is ``m_c + s_c Z`` with its mean ``m_c`` and standard deviation
      ``s_c`` (float64, over the rows). The grid is symmetric about 0 whatever the column, so
      its MSE-optimal threshold is ``s_c g(m_c / s_c)``, ``g(r)`` the minimiser of theory's
      exact MSE of ``r + Z`` (:class:`ShiftTable`, built once per call for the ratios present:
      exact at 49 ratios, PCHIP-interpolated in ``log r`` between them where ``g`` is smooth,
      searched at the ratio itself where the optimum jumps from level to level; the measured
      error is in :class:`ShiftTable`). Then ``alpha_c = min(s_c g(m_c / s_c), max_t |x_tc|)``.
      ``g(0) = alpha*(Z)`` (``theory.optimal_alpha``), so a zero-mean column gets
      ``alpha*(Z) s_c`` as before; a column with mean 3 and std 1 at 4 bits on a Gaussian shape
      gets 4.96 (the old ``alpha*(Z) s_c``, 2.47, has 23x the optimal MSE). A constant column
      (``s_c <= 1e-12 |m_c|``) gets its absmax.

    ``grid="aciq"`` gives theory's ACIQ-model alpha* (clipping error plus uniform noise).
    """
    g, m = _check_grid_bits(grid, bits)
    _check_granularity(granularity)
    x = _check_matrix(x)
    return _theory(x, m, g, granularity, seed)


def _theory(x: np.ndarray, m: int, g: Grid, granularity: str, seed: int) -> np.ndarray:
    from theory.site_models import ChannelMixture

    absmax = _absmax(x, granularity)
    if granularity == "tensor" and float(absmax) == 0.0:
        return np.asarray(_TINY)
    st = _theory_stats(x, seed)
    fam, shape = _theory_shape(st)
    if granularity == "tensor":
        cm = ChannelMixture.from_power_sums(st.channel_count, st.channel_sum, st.channel_sumsq,
                                            family=fam, shape=shape, absmax=st.channel_absmax)
        return _positive(min(float(cm.optimal_alpha(m, g)), float(absmax)))
    mean = np.mean(x, axis=0, dtype=np.float64)
    std = np.std(x, axis=0, dtype=np.float64)
    ok = std > _CONSTANT * np.abs(mean)  # else constant up to rounding: its absmax
    ratio = np.where(ok, mean / np.where(ok, std, 1.0), 0.0)
    table = ShiftTable(fam, shape, m, g, float(np.max(np.abs(ratio))))
    alpha = std * table(ratio)
    return _positive(np.where(ok, np.minimum(alpha, absmax), absmax))


def threshold(x, method: str, bits: int, grid: Grid | str = "int", granularity: str = "tensor",
              seed: int = 0) -> np.ndarray:
    """Clipping threshold of one sample matrix ``x`` (one language, or several pooled).

    Parameters
    ----------
    x : array_like, shape (tokens, channels)
        Finite values; float32 or float64 are read as they are.
    method : str
        ``max``, ``p<q>`` (e.g. ``p99.9``, ``p99.99``; ``0 < q <= 100``), ``mse``, ``entropy``
        (per tensor only) or ``theory``; the definitions are in the module docstring. The
        language-aware methods need per-language samples (:func:`language_aware_threshold`).
    bits : int
        Bit width (``theory.grids.check_bits``; 2..16 on ``int``).
    grid : str
        ``int`` (default), ``midrise``, ``midtread`` or ``aciq`` (``uint`` is refused).
    granularity : str
        ``tensor`` (one threshold) or ``channel`` (one per column).
    seed : int
        Reservoir seed of the ``theory`` calibrator (the others are deterministic).

    Returns
    -------
    numpy.ndarray
        float64, shape ``()`` or ``(C,)``; zeros are replaced by ``np.finfo(float).tiny``.
    """
    kind, q = _parse_method(method)
    g, m = _check_grid_bits(grid, bits)
    _check_granularity(granularity)
    if kind in LANGUAGE_AWARE:
        raise ValueError(f"method {method!r} is language-aware: it needs per-language samples "
                         "(language_aware_threshold, or calibrate with a mapping language -> matrix)")
    if kind == "entropy" and granularity == "channel":
        raise ValueError("the entropy calibrator is per tensor only (ModelOpt's HistogramCalibrator "
                         "supports per-tensor scaling only); use granularity='tensor'")
    x = _check_matrix(x)
    return _threshold(x, kind, q, m, g, granularity, seed)


def _threshold(x, kind, q, m, g, granularity, seed) -> np.ndarray:
    if kind == "max":
        return _positive(_absmax(x, granularity))
    if kind == "percentile":
        return _positive(_percentile(x, q, granularity))
    if kind == "mse":
        return _positive(_mse_tensor(x, m, g) if granularity == "tensor" else _mse_channel(x, m, g))
    if kind == "entropy":
        return _positive(entropy_threshold(x, m))
    if kind == "theory":
        return _theory(x, m, g, granularity, seed)
    raise AssertionError(kind)  # pragma: no cover


# --------------------------------------------------------------------------------------------
# language-aware (LA-ACIQ)
# --------------------------------------------------------------------------------------------

def _fair_weights(fair_weights, langs: list[str]) -> np.ndarray:
    if fair_weights is None:
        return np.full(len(langs), 1.0 / len(langs))
    if isinstance(fair_weights, Mapping):
        missing = [l for l in langs if l not in fair_weights]
        if missing:
            raise ValueError(f"fair_weights has no weight for languages {missing}")
        w = np.asarray([fair_weights[l] for l in langs], dtype=np.float64)
    else:
        w = np.asarray(fair_weights, dtype=np.float64).ravel()
    if w.size != len(langs) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"fair_weights must be {len(langs)} finite non-negative numbers with a "
                         f"positive sum, got {fair_weights!r}")
    return w / w.sum()


def _penalties(curves: np.ndarray, star: np.ndarray) -> np.ndarray:
    """``curves[l] / star[l] - 1``; where ``star`` is 0 the penalty is 0 if the curve is 0 too
    (a language all zeros in that column pays nothing anywhere), else infinite."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pen = curves / star - 1.0
    return np.where(star > 0, pen, np.where(curves > 0, np.inf, 0.0))


def _objective(pen: np.ndarray, method: str, v: np.ndarray) -> np.ndarray:
    if method == "minimax":
        return np.max(pen, axis=0)
    return np.tensordot(v, pen, axes=1)


def language_aware_threshold(samples, method: str, bits: int, grid: Grid | str = "int",
                             granularity: str = "tensor", fair_weights=None) -> np.ndarray:
    """LA-ACIQ threshold from each language's exact MSE curve.

    ``MSE_l(alpha)`` is the exact empirical quantize-dequantize MSE of language ``l``'s values
    (:mod:`empirical.sweep`), ``pi_l(alpha) = MSE_l(alpha) / min MSE_l - 1`` its penalty.

    * ``minimax``: ``argmin_alpha max_l pi_l(alpha)`` (``fair_weights`` is not used);
    * ``weighted``: ``argmin_alpha sum_l v_l pi_l(alpha)``, ``v`` = ``fair_weights`` normalised
      to sum 1 (equal by default).

    Per tensor: :func:`empirical.optimal.empirical_language_alphas` on each language's values
    (all columns flattened): every language's swept optimum, then the objective on a 257-point
    grid over ``[min_l alpha*_l, max_l alpha*_l]`` refined once on another 257 points. A language
    whose values are all zero is left out (its MSE is 0 at every alpha).

    Per channel, column ``c`` with pooled absmax ``A_c = max_l max_t |x_l[t, c]|``: every
    language's curve on the common fractions ``A_c * 1000^(j/63 - 1)``, ``j = 0..63``; each
    language's ``min MSE_l`` is its own per-column optimum (the ``mse`` channel search started
    from those common fractions), lowered to any smaller value met later; the objective's best
    common point is then refined twice, every language's curve evaluated at the same alphas
    (``r^(t/16)``, then ``r^(t/256)`` times the best point, ``t = -16..16``,
    ``r = 1000^(1/63)``, as in the ``mse`` channel search).

    With one language both reduce to that language's ``mse`` threshold.

    Parameters
    ----------
    samples : mapping language -> array_like (tokens, channels)
    method : ``"minimax"`` or ``"weighted"``
    bits, grid, granularity
        As in :func:`threshold`.
    fair_weights : mapping language -> float or sequence, optional
        ``v`` of ``weighted``.

    Returns
    -------
    numpy.ndarray
        float64, shape ``()`` or ``(C,)``.
    """
    kind, _ = _parse_method(method)
    if kind not in LANGUAGE_AWARE:
        raise ValueError(f"method {method!r} is not language-aware; use one of {', '.join(LANGUAGE_AWARE)}")
    g, m = _check_grid_bits(grid, bits)
    _check_granularity(granularity)
    data = _check_samples(samples)
    langs = list(data)
    v = _fair_weights(fair_weights, langs)
    if granularity == "tensor":
        return _la_tensor(data, kind, m, g, v)
    return _la_channel(data, kind, m, g, v)


def _la_tensor(data: dict[str, np.ndarray], kind: str, m: int, g: Grid, v: np.ndarray) -> np.ndarray:
    from .optimal import empirical_language_alphas

    keep = [i for i, a in enumerate(data.values()) if np.any(a != 0)]
    if not keep:
        return np.asarray(_TINY)
    langs = list(data)
    flat = {langs[i]: data[langs[i]].ravel() for i in keep}
    if len(flat) == 1:
        return _positive(_mse_tensor(next(iter(flat.values()))[:, None], m, g))
    r = empirical_language_alphas(flat, m, _measured_grid(g), fair_weights=v[keep], min_samples=1)
    return _positive(r.alpha[kind])


def _la_channel(data: dict[str, np.ndarray], kind: str, m: int, g: Grid, v: np.ndarray) -> np.ndarray:
    mats = list(data.values())
    if len(mats) == 1:
        return _positive(_mse_channel(mats[0], m, g))
    A = np.max([_absmax(x, "channel") for x in mats], axis=0)
    zero = A == 0.0
    s = np.where(zero, 1.0, A)
    coarse, star = [], []
    for x in mats:
        # each language's own optimum, searched from the common coarse grid, whose curve is
        # reused for the objective (all in units of s^2)
        _, mse, c = _channel_min(x, m, g, s)
        coarse.append(c)
        star.append(mse)
    coarse = np.array(coarse)  # [language, fraction, column]
    star = np.array(star)      # [language, column]
    k = np.argmin(_objective(_penalties(coarse, star[:, None, :]), kind, v), axis=0)
    best = _COARSE[k] * s  # data units
    for mult in _LEVELS:
        # every language on the same alphas best * mult
        c = np.array([_column_curves(x, best, mult, m, g) for x in mats]) * ((best / s) ** 2)[None, None, :]
        star = np.minimum(star, c.min(axis=1))
        best = mult[np.argmin(_objective(_penalties(c, star[:, None, :]), kind, v), axis=0)] * best
    return _positive(np.where(zero, 0.0, best))


# --------------------------------------------------------------------------------------------
# calibration sets
# --------------------------------------------------------------------------------------------

def combine_thresholds(per_language: Mapping[str, np.ndarray], method: str) -> np.ndarray:
    """Combine thresholds calibrated on each language separately ("per language then combined").

    ``max``: the elementwise maximum over languages, which is the threshold of the pooled data
    (``max`` keeps its meaning: never clip any calibration value). Every other method: the
    equal-weight mean ``1/L sum_l alpha_l``, so each language counts once whatever its token
    count (pooling would weight languages by tokens).

    Parameters
    ----------
    per_language : mapping language -> threshold
        Arrays of one shape (``()`` or ``(C,)``), positive and finite.
    method : str
        The calibrator that produced them.
    """
    kind, _ = _parse_method(method)
    if not isinstance(per_language, Mapping) or len(per_language) == 0:
        raise ValueError("no languages given (per_language is empty)")
    arrs = {l: np.asarray(a, dtype=np.float64) for l, a in per_language.items()}
    shapes = {l: a.shape for l, a in arrs.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"mismatched threshold shapes across languages: {shapes}")
    for l, a in arrs.items():
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(f"threshold of {l!r} must be positive and finite")
    stack = np.stack(list(arrs.values()))
    return stack.max(axis=0) if kind == "max" else stack.mean(axis=0)


def calibrate(samples, method: str, bits: int, grid: Grid | str = "int", granularity: str = "tensor",
              mode: str = "pooled", seed: int = 0) -> np.ndarray:
    """Threshold of one site from per-language samples under a calibration set ``mode``.

    * ``pooled``: the languages' rows concatenated (the token-weighted mix), then
      :func:`threshold`;
    * ``separate``: :func:`threshold` per language, then :func:`combine_thresholds`;
    * :data:`LANGUAGE_AWARE` methods ignore ``mode`` (they use each language by construction) and
      call :func:`language_aware_threshold` with equal fairness weights.

    Calibrating on English only is ``calibrate({"en": x_en}, ...)``.

    Parameters
    ----------
    samples : mapping language -> array_like (tokens, channels)
    method, bits, grid, granularity, seed
        As in :func:`threshold`.
    mode : ``"pooled"`` or ``"separate"``
    """
    kind, q = _parse_method(method)
    g, m = _check_grid_bits(grid, bits)
    _check_granularity(granularity)
    if mode not in MODES:
        raise ValueError(f"unknown calibration mode {mode!r}; known: {', '.join(MODES)}")
    if kind == "entropy" and granularity == "channel":
        raise ValueError("the entropy calibrator is per tensor only (ModelOpt's HistogramCalibrator "
                         "supports per-tensor scaling only); use granularity='tensor'")
    data = _check_samples(samples)
    if kind in LANGUAGE_AWARE:
        return language_aware_threshold(data, method, m, g, granularity)
    if mode == "pooled":
        x = data[next(iter(data))] if len(data) == 1 else np.concatenate(list(data.values()), axis=0)
        return _threshold(x, kind, q, m, g, granularity, seed)
    return combine_thresholds({l: _threshold(x, kind, q, m, g, granularity, seed)
                               for l, x in data.items()}, method)
