"""MSE-optimal clipping thresholds measured on data.

Two estimators of the clipping threshold ``alpha*`` of a tensor:

* :func:`empirical_optimal_alpha`: the minimiser of the exact empirical MSE
  (:mod:`empirical.sweep`): the best point of a geometric grid of thresholds, refined by bounded
  Brent minimisation on the same exact kernel. This is the ground truth that analytic
  predictions (``theory.optimal_alpha`` of a fitted distribution) are compared with.
* :func:`octav_alpha`: OCTAV (Sakr, Dai, Tambe, Keckler, Khailany, Dally, "Optimal clipping and
  magnitude-aware differentiation for improved quantization-aware training", ICML 2022), the
  Newton-style fixed point of the high-resolution noise model on samples.

and their counterparts over *all* the values a capture saw, from its :class:`StratifiedSample`
(the exact largest magnitudes plus a weighted uniform reservoir of the rest;
:meth:`empirical.capture.StreamingStats.stratified`): :func:`stratified_mse` and
:func:`stratified_optimal_alpha`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize_scalar

from theory.grids import Grid, check_bits, step_factor

from .sweep import SortedMagnitudes, prepare, validate_data

__all__ = ["EmpiricalOptimum", "StratifiedSample", "empirical_language_alphas", "empirical_mixture_alpha",
           "empirical_optimal_alpha", "measured_penalties", "octav_alpha", "stratified_mse",
           "stratified_optimal_alpha"]


class EmpiricalOptimum(NamedTuple):
    """Clipping threshold ``alpha`` and the exact empirical MSE there."""

    alpha: float
    mse: float


def _prepared(x) -> SortedMagnitudes:
    if isinstance(x, SortedMagnitudes):
        if x.sorted_abs.shape[0] != 1:
            raise ValueError("empirical_optimal_alpha works per tensor; prepare() without axis/group_size")
        return x
    return prepare(x)


def empirical_optimal_alpha(x, bits: int, grid: Grid | str = "int", n_grid: int = 128,
                            xatol: float = 1e-10) -> EmpiricalOptimum:
    """Clipping threshold minimising the exact empirical quantization MSE of ``x``.

    Parameters
    ----------
    x : array_like or SortedMagnitudes
        Data, or the result of :func:`empirical.sweep.prepare` to reuse one sort across calls.
    bits : int
        Bit width ``M``.
    grid : str
        Quantizer grid (docs/design.md); ``aciq`` minimises clipping error + ``alpha^2/(3*4^M)``.
    n_grid : int
        Points of the coarse geometric grid on ``[1e-3, 1] * max|x|``; the bracket around its
        best point is then searched on a 257-point linear grid and polished by Brent's method.
    xatol : float
        Relative tolerance of the refinement (times the bracket's upper end).

    Returns
    -------
    EmpiricalOptimum
        ``(alpha, mse)``. The empirical MSE is piecewise smooth in alpha and can have small
        local wiggles at high bit widths, so the refinement searches only the bracket around the
        best grid point; the returned MSE is never worse than that grid point's.
    """
    g = Grid.parse(grid)
    m = check_bits(bits, g)
    if int(n_grid) < 3:
        raise ValueError("n_grid must be at least 3")
    sm = _prepared(x)
    amax = float(sm.absmax[0])
    if amax == 0.0:
        raise ValueError("x is identically zero: every clipping threshold is optimal")
    alphas = np.geomspace(1e-3 * amax, amax, int(n_grid))
    curve = sm.mse(alphas, m, g)
    i = int(np.argmin(curve))
    lo = alphas[max(i - 1, 0)]
    hi = alphas[min(i + 1, alphas.size - 1)]
    best = EmpiricalOptimum(float(alphas[i]), float(curve[i]))
    # The measured curve has small wiggles (values switching cells), so a dense second grid
    # picks the right basin before Brent polishes it.
    fine = np.linspace(lo, hi, 257)
    fcurve = sm.mse(fine, m, g)
    i = int(np.argmin(fcurve))
    if fcurve[i] <= best.mse:
        best = EmpiricalOptimum(float(fine[i]), float(fcurve[i]))
    lo = fine[max(i - 1, 0)]
    hi = fine[min(i + 1, fine.size - 1)]

    def f(a: float) -> float:
        return float(sm.mse(a, m, g))

    res = minimize_scalar(f, bounds=(lo, hi), method="bounded",
                          options={"xatol": xatol * hi, "maxiter": 200})
    if res.success and float(res.fun) <= best.mse:
        best = EmpiricalOptimum(float(res.x), float(res.fun))
    return best


def octav_alpha(x, bits: int, grid: Grid | str = "aciq", iters: int = 50, tol: float = 1e-8,
                alpha0: float | None = None) -> float:
    """OCTAV clipping threshold (Sakr et al., ICML 2022, eq. 5 and Algorithm 1) on samples.

    Minimises the high-resolution model ``J(alpha) = c alpha^2 P(|X| <= alpha) +
    E[(|X| - alpha)^2 1{|X| > alpha}]`` by the fixed-point (Newton) iteration

        alpha_{n+1} = E[|X| 1{|X| > alpha_n}] / (c P(|X| <= alpha_n) + P(|X| > alpha_n)),

    where ``c alpha^2 = step^2 / 12`` is the uniform rounding noise. For the grids with
    step ``2 alpha / 2^M`` (``aciq``, ``midrise``, ``midtread``) ``c = 4^-M / 3``, the paper's
    constant; for ``int`` and ``uint`` ``c`` follows their step (docs/design.md), e.g.
    ``1 / (12 (2^(M-1) - 1)^2)`` for ``int``. Expectations are sample means over ``|x|``.

    Parameters
    ----------
    x : array_like or SortedMagnitudes
        Data (magnitudes are used; ``uint`` requires non-negative data), or a per-tensor
        :func:`empirical.sweep.prepare` result to reuse its sort.
    bits : int
        Bit width ``M``.
    grid : str
        Grid whose step sets ``c``.
    iters, tol : int, float
        Stop after ``iters`` iterations or when ``|alpha_{n+1} - alpha_n| <= tol * alpha_n``.
    alpha0 : float, optional
        Start; default ``E|X|`` (inside the data range, so both probabilities are non-zero;
        starting at ``max|x|`` would give an empty tail and ``alpha_1 = 0``).

    Returns
    -------
    float
        The OCTAV threshold.
    """
    g = Grid.parse(grid)
    m = check_bits(bits, g)
    f, *_ = step_factor(g, m)
    c = f * f / 12.0
    if isinstance(x, SortedMagnitudes):  # reuse a sort already made for the sweep
        sm = _prepared(x)
        if g is Grid.UINT and not sm.nonnegative:
            raise ValueError("grid 'uint' is one-sided: the data has negative values")
        mags = sm.sorted_abs[0].astype(np.float64, copy=False)
    else:
        arr = validate_data(x)
        if not np.all(np.isfinite(arr)):
            raise ValueError("x contains NaN or infinite values")
        if g is Grid.UINT and np.any(arr < 0):
            raise ValueError("grid 'uint' is one-sided: the data has negative values")
        mags = np.sort(np.abs(arr).ravel()).astype(np.float64, copy=False)
    n = mags.size
    # tail[i] = sum of mags[i:], so E[|X| 1{|X| > a}] is a searchsorted away.
    tail = np.concatenate([np.cumsum(mags[::-1])[::-1], [0.0]])
    a = float(tail[0] / n) if alpha0 is None else float(alpha0)
    if not math.isfinite(a) or a <= 0:
        raise ValueError("alpha0 must be positive (and x not identically zero)")
    for _ in range(int(iters)):
        i = int(np.searchsorted(mags, a, side="right"))  # count of |x| <= a
        p_in = i / n
        denom = c * p_in + (1.0 - p_in)
        new = tail[i] / n / denom
        if not new > 0:
            break
        done = abs(new - a) <= tol * a
        a = new
        if done:
            break
    return float(a)


def _language_samples(samples, min_samples: int) -> dict[str, SortedMagnitudes]:
    if not samples:
        raise ValueError("no languages given")
    out = {}
    for lang, x in samples.items():
        arr = validate_data(x, f"samples of {lang!r}")
        if arr.size < min_samples:
            raise ValueError(f"language {lang!r} has {arr.size} samples; need at least {min_samples}")
        out[str(lang)] = prepare(arr)
    return out


def _norm_weights(weights, langs: list[str], what: str) -> np.ndarray:
    if weights is None:
        return np.full(len(langs), 1.0 / len(langs))
    w = np.asarray([weights[l] for l in langs] if isinstance(weights, dict) else weights, dtype=np.float64)
    if w.size != len(langs) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"{what} must be {len(langs)} finite non-negative numbers with a positive sum")
    return w / w.sum()


def _grid_min(curves, objective, lo: float, hi: float, levels: int = 2) -> float:
    """Minimise ``objective(mse matrix [language, alpha])`` over ``[lo, hi]``: a 257-point
    grid, then a 257-point grid on the bracket around its best point (``levels`` times), each
    level one vectorised sweep per language (a single-alpha sweep costs as much as 257)."""
    if hi <= lo:
        return lo
    for _ in range(levels):
        xs = np.linspace(lo, hi, 257)
        y = objective(curves(xs))
        i = int(np.argmin(y))
        lo, hi = xs[max(i - 1, 0)], xs[min(i + 1, xs.size - 1)]
    return float(xs[i])


def empirical_language_alphas(samples, bits: int, grid: Grid | str = "int", mix_weights=None,
                              fair_weights=None, min_samples: int = 100):
    """The measured counterpart of :func:`theory.language_alphas`: every language's optimum and
    the mix, minimax and weighted alphas, all from the exact empirical MSE of each language's
    samples (no fitted family anywhere).

    Returns
    -------
    theory.LanguageAlphas
        ``alpha_star``/``mse_star`` are the swept optima; ``penalty[choice][l]`` the measured
        relative MSE excess of language ``l`` at the measured ``alpha[choice]``.
    """
    from theory.language_alpha import LanguageAlphas

    sms = _language_samples(samples, min_samples)
    g = Grid.parse(grid)
    m = check_bits(bits, g)
    langs = list(sms)
    w = _norm_weights(mix_weights, langs, "mixture weights")
    v = _norm_weights(fair_weights, langs, "fairness weights")
    opt = [empirical_optimal_alpha(sms[l], m, g) for l in langs]
    stars = np.array([o.alpha for o in opt])
    best = np.array([o.mse for o in opt])
    lo, hi = float(stars.min()), float(stars.max())

    def curves(xs):
        return np.array([np.atleast_1d(sms[l].mse(xs, m, g)) for l in langs])

    rel = best[:, None]
    alpha = {"mix": _grid_min(curves, lambda c: w @ c, lo, hi),
             "minimax": _grid_min(curves, lambda c: np.max(c / rel, axis=0), lo, hi),
             "weighted": _grid_min(curves, lambda c: v @ (c / rel), lo, hi)}
    penalty = {c: np.maximum(curves(np.array([a]))[:, 0] / best - 1.0, 0.0) for c, a in alpha.items()}
    return LanguageAlphas(langs, m, g.value, stars, best, w, v, alpha, penalty)


def empirical_mixture_alpha(samples, bits: int, grid: Grid | str = "int", weights=None,
                            min_samples: int = 100) -> EmpiricalOptimum:
    """Clipping threshold minimising ``sum_l w_l MSE_l(alpha)`` measured on each language's
    samples (the empirical counterpart of :func:`theory.mixture_alpha`)."""
    r = empirical_language_alphas(samples, bits, grid, mix_weights=weights, min_samples=min_samples)
    a = r.alpha["mix"]
    return EmpiricalOptimum(a, float(r.mix_weights @ (r.mse_star * (1.0 + r.penalty["mix"]))))


def measured_penalties(samples, alphas, bits: int, grid: Grid | str = "int",
                       min_samples: int = 100) -> dict[str, dict[str, float]]:
    """Each language's measured relative MSE excess ``MSE_l(alpha) / min MSE_l - 1`` at given
    thresholds, against its own measured optimum (:func:`empirical_optimal_alpha`).

    Parameters
    ----------
    samples : mapping language -> array_like
    alphas : mapping name -> float
        Thresholds to price, e.g. ``{"mix": ..., "minimax": ...}``.

    Returns
    -------
    dict
        ``{language: {"alpha_star": ..., "mse_star": ..., name: penalty, ...}}``.
    """
    sms = _language_samples(samples, min_samples)
    g = Grid.parse(grid)
    m = check_bits(bits, g)
    out = {}
    for lang, sm in sms.items():
        opt = empirical_optimal_alpha(sm, m, g)
        row = {"alpha_star": opt.alpha, "mse_star": opt.mse}
        for name, a in alphas.items():
            row[name] = float(sm.mse(float(a), m, g)) / opt.mse - 1.0 if opt.mse > 0 else math.nan
        out[lang] = row
    return out


# --------------------------------------------------------------------------------------------
# Stratified samples: exact tail plus weighted reservoir
# --------------------------------------------------------------------------------------------

def _channel_array(c, size: int, what: str) -> np.ndarray | None:
    if c is None:
        return None
    arr = np.asarray(c)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64).reshape(-1)
    if arr.size != size:
        raise ValueError(f"{what} has {arr.size} entries for {size} values")
    return arr


@dataclass(frozen=True, eq=False)
class StratifiedSample:
    """``n_total`` values represented by an exact stratum and a weighted uniform sample.

    Built by :meth:`empirical.capture.StreamingStats.stratified`: ``top`` are values of the
    stream kept exactly (the largest magnitudes), ``rest`` a uniform sample of all the other
    values. The sum of ``f(x)`` over the ``n_total`` values is estimated by
    ``top_weight * sum f(top) + rest_weight * sum f(rest)``, without bias.

    Parameters
    ----------
    top : array_like
        Values represented exactly (each stands for ``top_weight`` values, 1 unless halved).
    rest : array_like
        Uniform sample of the other values; each stands for ``rest_weight`` values.
    rest_weight : float
        ``(n_total - top_weight * len(top)) / len(rest)`` (0 when ``rest`` is empty).
    n_total : int
        Number of values represented.
    top_channels, rest_channels : array_like of int, optional
        Channel of each value.
    top_weight : float
        Values each ``top`` value stands for: 1 for the exact stratum, about 2 in a half made by
        :meth:`split`.

    Raises
    ------
    ValueError
        Nothing in either stratum, NaN or infinite values, weights that are negative, not
        finite or zero for a non-empty stratum, or weights whose represented count
        ``top_weight * len(top) + rest_weight * len(rest)`` is not ``n_total``.
    """

    top: np.ndarray
    rest: np.ndarray
    rest_weight: float
    n_total: int
    top_channels: np.ndarray | None = None
    rest_channels: np.ndarray | None = None
    top_weight: float = 1.0

    def __post_init__(self):
        top = np.array(self.top, dtype=np.float64).reshape(-1)
        rest = np.array(self.rest, dtype=np.float64).reshape(-1)
        if top.size + rest.size == 0:
            raise ValueError("the stratified sample is empty (no top and no rest values)")
        for nm, v in (("top", top), ("rest", rest)):
            if not np.all(np.isfinite(v)):
                raise ValueError(f"the stratified sample's {nm} values contain NaN or infinite values")
        n = self.n_total
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"n_total must be a positive integer, got {n!r}")
        wt, wr = float(self.top_weight), float(self.rest_weight)
        for nm, w, size in (("top_weight", wt, top.size), ("rest_weight", wr, rest.size)):
            if not math.isfinite(w) or w < 0 or (size and w == 0):
                raise ValueError(f"{nm} must be finite, non-negative and positive for a non-empty "
                                 f"stratum, got {w}")
        represented = wt * top.size + wr * rest.size
        if abs(represented - n) > 1e-9 * n:
            raise ValueError(f"the weights represent {represented:.6g} values, not n_total = {n}")
        object.__setattr__(self, "top", top)
        object.__setattr__(self, "rest", rest)
        object.__setattr__(self, "n_total", int(n))
        object.__setattr__(self, "top_weight", wt)
        object.__setattr__(self, "rest_weight", wr)
        for nm, size in (("top_channels", top.size), ("rest_channels", rest.size)):
            object.__setattr__(self, nm, _channel_array(getattr(self, nm), size, nm))

    @property
    def exact(self) -> bool:
        """True when every value is held (nothing is estimated)."""
        return self.top_weight == 1.0 and (self.rest.size == 0 or self.rest_weight == 1.0)

    @property
    def absmax(self) -> float:
        """Largest magnitude held."""
        return float(max(np.max(np.abs(self.top), initial=0.0), np.max(np.abs(self.rest), initial=0.0)))

    @cached_property
    def _parts(self) -> list:
        """``(values represented, SortedMagnitudes)`` of each non-empty stratum (sorted once)."""
        strata = ((self.top_weight, self.top), (self.rest_weight, self.rest))
        return [(w * v.size, prepare(v)) for w, v in strata if v.size]

    def split(self, seed: int = 0) -> tuple["StratifiedSample", "StratifiedSample"]:
        """Two complementary random halves, each an unbiased estimate of the whole.

        ``rest`` and ``top`` are each cut into two random halves (the odd value goes to a random
        half) and each half's weight is scaled so that it stands for the whole stratum: a half
        of ``m`` of the ``r`` rest values gets ``rest_weight * r / m``. For held-out model
        selection: fit on one half, compare curves on the other. A stratum of one value can not
        be halved: a ``top`` of one value is kept whole in both halves (exact, so both stay
        unbiased); a ``rest`` of one value is refused.

        Returns
        -------
        (StratifiedSample, StratifiedSample)
        """
        rng = np.random.default_rng(seed)

        def halves(v, c, w, what):
            if v.size == 0 or (v.size == 1 and what == "top"):
                return (v, c, w), (v, c, w)
            if v.size == 1:
                raise ValueError("the rest stratum has one value: it cannot be split in halves")
            perm = rng.permutation(v.size)
            h = v.size // 2 + (int(rng.integers(2)) if v.size % 2 else 0)
            out = []
            for idx in (np.sort(perm[:h]), np.sort(perm[h:])):
                out.append((v[idx], None if c is None else c[idx], w * v.size / idx.size))
            return tuple(out)

        ta, tb = halves(self.top, self.top_channels, self.top_weight, "top")
        ra, rb = halves(self.rest, self.rest_channels, self.rest_weight, "rest")
        return tuple(StratifiedSample(t[0], r[0], r[2] if r[0].size else 0.0, self.n_total, t[1], r[1],
                                      t[2] if t[0].size else 1.0)
                     for t, r in ((ta, ra), (tb, rb)))


def _check_stratified(sample) -> StratifiedSample:
    if not isinstance(sample, StratifiedSample):
        raise TypeError(f"expected a StratifiedSample (StreamingStats.stratified()), "
                        f"got {type(sample).__name__}")
    return sample


def stratified_mse(sample: StratifiedSample, alphas, bits, grid: Grid | str = "int") -> np.ndarray:
    """Mean squared quantization error over all ``n_total`` values, from a stratified sample.

    ``(top_weight * sum_top err + rest_weight * sum_rest err) / n_total`` at each alpha, with
    the exact error of each held value (:meth:`empirical.sweep.SortedMagnitudes.mse`). Exact when
    the sample holds every value; otherwise an unbiased estimate whose tail (the values that
    decide clipping) is exact.

    Parameters
    ----------
    sample : StratifiedSample
    alphas : float or array_like
        Clipping thresholds (> 0, data units).
    bits : int or sequence of int
        Bit widths.
    grid : str
        Quantizer grid (docs/design.md); for ``aciq`` the noise term ``alpha^2 / (3 * 4^M)`` is
        counted once per represented value, so it is exact.

    Returns
    -------
    numpy.ndarray
        Shaped like :func:`empirical.sweep.mse_sweep` per tensor: ``[bits, alpha]``, an axis
        dropped where its argument is a scalar.
    """
    s = _check_stratified(sample)
    total = None
    for count, sm in s._parts:
        part = count * np.asarray(sm.mse(alphas, bits, grid), dtype=np.float64)
        total = part if total is None else total + part
    return total / s.n_total


def stratified_optimal_alpha(sample: StratifiedSample, bits: int, grid: Grid | str = "int",
                             n_grid: int = 256, xatol: float = 1e-10) -> EmpiricalOptimum:
    """Clipping threshold minimising :func:`stratified_mse` (the MSE over all values).

    A geometric scan of ``n_grid`` thresholds from ``0.01`` times the rest's standard deviation
    (all values' when the rest has fewer than two) up to the largest magnitude, then bounded
    Brent minimisation (``scipy.optimize.minimize_scalar(method="bounded")``) between the
    neighbours of the best scan point; the returned MSE is never worse than that point's.

    Parameters
    ----------
    sample : StratifiedSample
    bits : int
    grid : str
    n_grid : int
        Scan points (at least 128).
    xatol : float
        Relative tolerance of Brent's method (times the bracket's upper end).

    Returns
    -------
    EmpiricalOptimum
        ``(alpha, mse)``.

    Raises
    ------
    ValueError
        Bad bits or grid, ``n_grid < 128``, or a sample that is identically zero.
    """
    s = _check_stratified(sample)
    g = Grid.parse(grid)
    m = check_bits(bits, g)
    if isinstance(n_grid, bool) or int(n_grid) != n_grid or n_grid < 128:
        raise ValueError(f"n_grid must be an integer of at least 128, got {n_grid!r}")
    amax = s.absmax
    if amax == 0.0:
        raise ValueError("the sample is identically zero: every clipping threshold is optimal")
    body = s.rest if s.rest.size >= 2 else np.concatenate([s.top, s.rest])
    sd = float(np.std(body)) if body.size >= 2 else 0.0
    lo = 1e-2 * sd if sd > 0 else 1e-3 * amax
    lo = min(lo, 1e-3 * amax) if lo >= amax else lo
    alphas = np.geomspace(lo, amax, int(n_grid))
    curve = stratified_mse(s, alphas, m, g)
    i = int(np.argmin(curve))
    best = EmpiricalOptimum(float(alphas[i]), float(curve[i]))
    a_lo, a_hi = float(alphas[max(i - 1, 0)]), float(alphas[min(i + 1, alphas.size - 1)])

    def f(a: float) -> float:
        return float(stratified_mse(s, a, m, g))

    res = minimize_scalar(f, bounds=(a_lo, a_hi), method="bounded",
                          options={"xatol": xatol * a_hi, "maxiter": 200})
    if res.success and float(res.fun) <= best.mse:
        best = EmpiricalOptimum(float(res.x), float(res.fun))
    return best
