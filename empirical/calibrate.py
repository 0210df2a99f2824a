"""Activation calibrators: the clipping threshold of one quantization site from sample activations.

A *site* is the input of one Linear layer (q/k/v, and gate/up, read one input: one site). Its
calibration data is a mapping ``language -> (n_tokens_l, C)`` matrix (rows are token positions,
columns the ``C`` input channels). Quantization is symmetric on the signed grids of
:mod:`theory.grids` (``int``, ``midrise``, ``midtread``, ``aciq``): level index
``k = clip(floor(x / step - offset + 1/2), kmin, kmax)``, value ``(k + offset) * step``,
``step = alpha * f`` with ``(f, kmin, kmax, offset) = theory.grids.step_factor(grid, bits)``
(:func:`quantize_dequantize`; the same rule as ``empirical.fakequant._round_to_grid``). ``aciq`` is
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
    channel its own mean and standard deviation, one shared unit-variance shape) fitted from an
    :class:`empirical.capture.StreamingStats` of the matrix; see :func:`theory_threshold`.

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
           "language_aware_threshold", "combine_thresholds", "calibrate", "quantize_dequantize",
           "entropy_threshold", "theory_threshold", "ENTROPY_BINS", "ENTROPY_START_BIN",
           "THEORY_SHAPES"]

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

def quantize_dequantize(x, alpha, bits: int, grid: Grid | str = "int") -> np.ndarray:
    """Round ``x`` onto the grid at threshold ``alpha`` and back (numpy reference, float64).

    ``k = clip(floor(x / step - offset + 1/2), kmin, kmax)``, result ``(k + offset) * step`` with
    ``step = alpha * f`` and ``(f, kmin, kmax, offset) = theory.grids.step_factor(grid, bits)``:
    nearest level, ties up, clipped to the outermost levels (``theory.grids.quantize``, the rule of
    ``empirical.fakequant._round_to_grid``).

    Parameters
    ----------
    x : array_like
        Values, last axis = channels.
    alpha : float or array_like
        Positive finite threshold: a scalar / shape ``()`` (per tensor) or shape ``(C,)`` with
        ``C = x.shape[-1]`` (per channel, broadcast over the rows).
    bits : int
    grid : str
        A signed grid (``uint`` is refused).
    """
    g, m = _check_grid_bits(grid, bits)
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("x contains NaN or infinite values")
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim > 1 or (a.ndim == 1 and (arr.ndim == 0 or a.shape[0] != arr.shape[-1])):
        raise ValueError(f"alpha must be a scalar or one value per channel (shape "
                         f"({arr.shape[-1] if arr.ndim else 1},)), got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError("alpha must be positive and finite")
    f, kmin, kmax, off = step_factor(g, m)
    step = a * f
    with np.errstate(over="ignore"):  # alpha = tiny: x / step overflows to +-inf, clipped below
        k = np.floor(arr / step - off + 0.5)
    k = np.clip(k, kmin, kmax)
    return (k + off) * step


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
    per shape.

    * ``tensor``: ``ChannelMixture.optimal_alpha(bits, grid)``, the minimiser of the model's exact
      MSE, capped at ``max|x|`` (a larger threshold only coarsens the step).
    * ``channel``: ``alpha_c = min(alpha*(Z) s_c, max_t |x_tc|)`` with ``alpha*(Z)`` theory's
      alpha* of the unit-variance shape (``theory.optimal_alpha``), i.e. alpha*/std of the fitted
      shape times the column's standard deviation, as ``empirical.fakequant.choose_alpha`` does
      for weights. The column mean is not used (a zero-mean model of each column); a constant
      column (``s_c = 0``) gets its absmax.

    ``grid="aciq"`` gives theory's ACIQ-model alpha* (clipping error plus uniform noise).
    """
    g, m = _check_grid_bits(grid, bits)
    _check_granularity(granularity)
    x = _check_matrix(x)
    return _theory(x, m, g, granularity, seed)


def _theory(x: np.ndarray, m: int, g: Grid, granularity: str, seed: int) -> np.ndarray:
    from theory.optimal import optimal_alpha
    from theory.site_models import ChannelMixture, unit_variance

    absmax = _absmax(x, granularity)
    if granularity == "tensor" and float(absmax) == 0.0:
        return np.asarray(_TINY)
    st = _theory_stats(x, seed)
    fam, shape = _theory_shape(st)
    if granularity == "tensor":
        cm = ChannelMixture.from_power_sums(st.channel_count, st.channel_sum, st.channel_sumsq,
                                            family=fam, shape=shape, absmax=st.channel_absmax)
        return _positive(min(float(cm.optimal_alpha(m, g)), float(absmax)))
    ratio = float(optimal_alpha(unit_variance(fam, *shape), m, g))
    std = np.std(x, axis=0, dtype=np.float64)
    return _positive(np.where(std > 0, np.minimum(ratio * std, absmax), absmax))


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
