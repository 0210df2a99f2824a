"""Models of a whole quantization site (a tensor clipped at one threshold) and their MSE curves.

A unimodal family fitted to a tensor's pooled values puts alpha* in the bulk when a few channels
carry most of the energy (docs/design.md, "Site models"). The models here describe the tensor the
way one shared clipping threshold sees it:

* :class:`FamilySite` - one theory distribution (the old unimodal model), optionally shifted;
* :class:`ChannelMixture` - every channel ``c`` its own location ``mu_c`` and scale ``s_c`` under
  one shared unit-variance shape ``Z``: ``X_c = mu_c + s_c Z``. A per-tensor threshold quantizes
  every channel on the same levels, so the tensor's MSE is, exactly, the count-weighted sum of
  the channels' MSEs at the same alpha;
* :class:`Mixture` - a weighted sum of site models (bulk plus outlier channels,
  :func:`bulk_outlier_model`).

Every model has ``mse(alpha, bits, grid)`` (vectorised over alpha), ``alpha_range()`` (where its
optimum can lie) and ``optimal_alpha(bits, grid)``: a log-spaced scan of the curve, then a bounded
Brent search between the scan points around its minimum (:func:`minimize_curve`).

The MSE of a shifted, scaled family on any level set is integrated exactly, cell by cell, from
the unit family's upper partial moments ``U_k(t) = int_t^inf z^k f(z) dz`` (``k = 0, 1, 2``):
for the cell ``(a, b)`` of level ``q`` in the channel's own units (``z = (x - mu) / s``,
``c = (q - mu) / s``),

    E[(X - q)^2; a < Z < b] = s^2 [M_2 - 2 c M_1 + c^2 M_0],   M_k = int_a^b z^k f(z) dz,

with each ``M_k`` taken as a difference of upper moments on the side of zero where it does not
cancel (:func:`interval_moments`). The ``aciq`` grid is the ACIQ model (exact clipping error plus
``alpha^2 / (3 4^M)``), as in :mod:`theory.mse`.

This module imports numpy only; scipy is imported by the shape fits when they are called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .distributions import Distribution, family as family_class
from .grids import Grid, check_bits, step_factor
from .mse import check_alpha, expected_mse

__all__ = [
    "SiteModel", "FamilySite", "ChannelMixture", "Mixture", "interval_moments", "unit_variance",
    "minimize_curve", "site_mse_on_levels", "fit_unit_shape", "outlier_channels",
    "bulk_outlier_model", "curve_distance", "select_site_model", "SHAPES",
]

#: shapes a channel mixture can share: name -> (family, fitted shape parameter or None)
SHAPES = ("gaussian", "laplace", "gennorm", "student_t")
#: cells per channel x alpha evaluated at once (memory bound of the vectorised MSE)
_CHUNK = 4_000_000


# ---- the unit family ------------------------------------------------------------------------

def unit_variance(family, *shape) -> Distribution:
    """The member of ``family`` (a name or class) with shape ``shape`` and variance 1.

    ``unit_variance("student_t", 3.0)`` is the Student-t with ``nu = 3`` and scale
    ``sqrt(1/3)``. A shape without a finite variance (Student-t ``nu <= 2``) is a ValueError.
    """
    cls = family_class(family) if isinstance(family, str) else family
    d = cls.__new__(cls)
    d.scale, d.shape = 1.0, tuple(float(s) for s in shape)
    v = float(d._variance(*d.shape))
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{cls.name}{d.shape} has no finite variance: a channel model needs one "
                         "(the clipping error of a shared threshold would be infinite)")
    if cls.one_sided:
        raise ValueError(f"{cls.name} is one-sided; channel models are two-sided families")
    return d.with_scale(1.0 / math.sqrt(v))


def _upper(dist: Distribution, k: int, t: np.ndarray) -> np.ndarray:
    """``U_k(t) = int_t^inf x^k f(x) dx`` of ``dist`` at its own scale, ``t >= 0`` (``inf``
    allowed: 0). ``Distribution.tail_moment`` is the unit-scale moment: ``U_k(t) = scale^k
    U_k^unit(t / scale)``."""
    out = np.zeros_like(t)
    fin = np.isfinite(t)
    if np.any(fin):
        sc = float(dist.scale)
        u = np.asarray(dist.tail_moment(k, t[fin] / sc), dtype=np.float64) * sc**k
        out[fin] = np.where(np.isnan(u), 0.0, u)
    return out


def _upper_all(dist: Distribution, t: np.ndarray) -> list[np.ndarray]:
    """``[U_0(t), U_1(t), U_2(t)]`` of ``dist`` at its own scale, ``t >= 0``, in one call
    (:meth:`Distribution.tail_moments`)."""
    out = [np.zeros_like(t) for _ in range(3)]
    fin = np.isfinite(t)
    if np.any(fin):
        sc = float(dist.scale)
        for k, u in enumerate(dist.tail_moments(t[fin] / sc)):
            u = np.asarray(u, dtype=np.float64) * sc**k
            out[k][fin] = np.where(np.isnan(u), 0.0, u)
    return out


def interval_moments(dist: Distribution, a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(M_0, M_1, M_2)``, ``M_k = int_a^b z^k f(z) dz`` of a symmetric two-sided ``dist``.

    ``a <= b`` elementwise (``-inf`` and ``inf`` allowed). Each moment is a difference of upper
    partial moments taken on the side of zero where the two terms do not cancel: both ends
    positive ``U(a) - U(b)``; both negative ``(-1)^k (U(-b) - U(-a))``; straddling zero
    ``m_k - U(b) - (-1)^k U(-a)`` with ``m_k`` the full moment (1, 0, variance).
    """
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    pos, neg = a >= 0, b <= 0
    mid = ~(pos | neg)
    full = (1.0, 0.0, float(dist.variance))
    out = []
    for k in range(3):
        sign = -1.0 if k == 1 else 1.0
        m = np.zeros(a.shape)
        if np.any(pos):
            m[pos] = _upper(dist, k, a[pos]) - _upper(dist, k, b[pos])
        if np.any(neg):
            m[neg] = sign * (_upper(dist, k, -b[neg]) - _upper(dist, k, -a[neg]))
        if np.any(mid):
            m[mid] = full[k] - _upper(dist, k, b[mid]) - sign * _upper(dist, k, -a[mid])
        out.append(m)
    return out[0], out[1], out[2]


def _levels_units(grid: Grid, bits: int) -> np.ndarray:
    f, kmin, kmax, off = step_factor(grid, bits)
    return (np.arange(kmin, kmax + 1, dtype=np.float64) + off) * f


def site_mse_on_levels(unit: Distribution, loc, scale, weight, alpha, bits: int,
                       grid: Grid | str = "int") -> np.ndarray:
    """``sum_c weight_c MSE(mu_c + s_c Z; alpha)`` for every alpha: the exact MSE of a channel
    mixture on the real levels of ``grid`` (``aciq``: the ACIQ model), with ``Z`` = ``unit``.

    ``loc``, ``scale``, ``weight`` are arrays over channels (weights need not sum to 1; the
    result is the weighted sum). Returns an array shaped like ``alpha``.
    """
    g = Grid.parse(grid)
    m = check_bits(bits, g)
    mu, s, w = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (loc, scale, weight))
    mu, s, w = np.broadcast_arrays(mu, s, w)
    al = np.atleast_1d(check_alpha(alpha))
    out = np.empty(al.shape)
    if g is Grid.ACIQ:
        # ACIQ: exact clipping beyond +-alpha plus alpha^2 / (3 4^M) (Banner et al. eq. 5)
        for i, a in enumerate(al.ravel()):
            hi, lo = (a - mu) / s, (-a - mu) / s
            inf = np.full_like(hi, np.inf)
            up = interval_moments(unit, hi, inf)
            dn = interval_moments(unit, -inf, lo)
            ch, cl = (a - mu) / s, (-a - mu) / s
            clip = s * s * ((up[2] - 2 * ch * up[1] + ch * ch * up[0])
                            + (dn[2] - 2 * cl * dn[1] + cl * cl * dn[0]))
            out.flat[i] = float(np.sum(w * clip)) + a * a / (3.0 * 4.0**m)
        return out.reshape(np.shape(alpha))
    q = _levels_units(g, m)  # level positions in units of alpha, ascending
    e = np.concatenate([[-np.inf], 0.5 * (q[1:] + q[:-1]), [np.inf]])
    n_cells = q.size
    radius = _support_radius(unit)
    flat = al.ravel()
    for i, a in enumerate(flat):
        if radius is None or n_cells <= 16:
            idx = np.broadcast_to(np.arange(n_cells), (mu.size, n_cells))
            keep = None
        else:
            # Only the cells a channel's mass reaches (|z| <= radius, beyond which its
            # moments are below 1e-17 of its variance) are integrated; the rest hold nothing.
            inner = e[1:-1] * a
            j_lo = np.searchsorted(inner, mu - radius * s, side="left")
            j_hi = np.searchsorted(inner, mu + radius * s, side="right")
            width = int(np.max(j_hi - j_lo)) + 1
            if width >= n_cells:
                idx, keep = np.broadcast_to(np.arange(n_cells), (mu.size, n_cells)), None
            else:
                idx = np.minimum(j_lo[:, None] + np.arange(width)[None, :], n_cells - 1)
                keep = (j_lo[:, None] + np.arange(width)[None, :]) <= j_hi[:, None]
        acc = 0.0
        per = max(1, _CHUNK // max(1, idx.shape[1]))
        for c0 in range(0, mu.size, per):
            sl = slice(c0, c0 + per)
            ii = idx[sl]
            mu_c, s_c = mu[sl, None], s[sl, None]
            # the window's edges, each evaluated once (a cell's upper edge is the next one's lower)
            t = (e[np.concatenate([ii, ii[:, -1:] + 1], axis=1)] * a - mu_c) / s_c
            c = (q[ii] * a - mu_c) / s_c
            m0, m1, m2 = _consecutive_moments(unit, t)
            cell = m2 - 2.0 * c * m1 + c * c * m0
            if keep is not None:
                cell = np.where(keep[sl], cell, 0.0)
            acc += float(np.sum(cell.sum(axis=1) * (w[sl] * s[sl] * s[sl])))
        out.flat[i] = acc
    return out.reshape(np.shape(alpha))


def _consecutive_moments(dist: Distribution, t: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`interval_moments` of the consecutive intervals ``(t[..., j], t[..., j + 1])`` of a
    non-decreasing last axis, with every upper moment evaluated once per edge."""
    u = _upper_all(dist, np.abs(t))
    a, b = t[..., :-1], t[..., 1:]
    pos, neg = a >= 0, b <= 0
    full = (1.0, 0.0, float(dist.variance))
    out = []
    for k in range(3):
        sign = -1.0 if k == 1 else 1.0
        ua, ub = u[k][..., :-1], u[k][..., 1:]
        m = np.where(pos, ua - ub, np.where(neg, sign * (ub - ua), full[k] - ub - sign * ua))
        out.append(m)
    return out[0], out[1], out[2]


_RADIUS_TOL = 1e-17


def _support_radius(unit: Distribution) -> float | None:
    """The smallest ``R`` (on a factor-1.25 ladder up to 1e4) with ``U_0(R)`` and ``U_2(R)`` of the
    unit-variance ``unit`` below 1e-17: beyond ``mu +- R s`` a channel holds nothing the MSE can
    see. None for tails too heavy to cut (Student-t, whose moments fall as a power of R)."""
    key = (type(unit).name, unit.shape)
    if key not in _RADII:
        r, found = 2.0, None
        while r <= 1e4:
            t = np.array([r])
            if float(_upper(unit, 0, t)[0]) < _RADIUS_TOL and float(_upper(unit, 2, t)[0]) < _RADIUS_TOL:
                found = r
                break
            r *= 1.25
        _RADII[key] = found
    return _RADII[key]


_RADII: dict = {}


# ---- minimisation of a curve --------------------------------------------------------------------

def minimize_curve(fn: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, n: int = 40,
                   what: str = "model", refine: int = 9, xatol: float = 1e-6) -> float:
    """The alpha in ``[lo, hi]`` minimising ``fn`` (vectorised): a scan of ``n`` log-spaced points,
    ``refine`` more between the neighbours of the best one, then a bounded Brent search between
    the points around the best, to ``xatol`` relative (near its minimum the MSE changes by the
    square of that: 1e-4 in alpha is 1e-8 in MSE). A minimum at an end
    of the range is a RuntimeError naming ``what`` (the range is too narrow: never a silent end
    point)."""
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"{what}: alpha range must satisfy 0 < lo < hi < inf, got [{lo}, {hi}]")
    ts = np.geomspace(lo, hi, n)
    vals = np.asarray(fn(ts), dtype=np.float64)
    if not np.any(np.isfinite(vals)):
        raise RuntimeError(f"{what}: the MSE is not finite anywhere in [{lo:.3g}, {hi:.3g}]")
    i = int(np.nanargmin(vals))
    if 0 < i < ts.size - 1 and refine > 0:
        # a finer scan between the neighbours of the best point: the curve of a mixture can
        # have several local minima (one per cluster of channel scales) closer than a step
        ts2 = np.geomspace(ts[i - 1], ts[i + 1], refine)
        v2 = np.asarray(fn(ts2), dtype=np.float64)
        j = int(np.nanargmin(v2))
        if 0 < j < ts2.size - 1 and v2[j] <= vals[i]:
            ts, vals, i = ts2, v2, j
    if i == ts.size - 1:
        raise RuntimeError(f"{what}: the MSE still falls at the top of the scanned range "
                           f"[{lo:.3g}, {hi:.3g}]; alpha* lies above it")
    if i == 0:
        raise RuntimeError(f"{what}: the MSE still falls at the bottom of the scanned range "
                           f"[{lo:.3g}, {hi:.3g}]; alpha* lies below it")
    from scipy import optimize

    a, b = float(ts[i - 1]), float(ts[i + 1])
    res = optimize.minimize_scalar(lambda t: float(np.asarray(fn(np.array([t])))[0]),
                                   bounds=(a, b), method="bounded",
                                   options={"xatol": xatol * b, "maxiter": 100})
    x = float(res.x)
    return x if float(res.fun) <= float(vals[i]) else float(ts[i])


# ---- site models ------------------------------------------------------------------------------

class SiteModel:
    """A model of all the values one clipping threshold quantizes.

    Subclasses define :meth:`mse` (vectorised over alpha) and :meth:`alpha_range`; the rest
    follows. ``name`` says which model it is (``unimodal``, ``channel_mixture/student_t``, ...).
    """

    name: str = "site"

    def mse(self, alpha, bits: int, grid: Grid | str = "int") -> np.ndarray:
        raise NotImplementedError

    def alpha_range(self) -> tuple[float, float]:
        """``(lo, hi)``: a range that contains alpha* for every bit width from 1 to 16."""
        raise NotImplementedError

    def optimal_alpha(self, bits: int, grid: Grid | str = "int") -> float:
        """The alpha minimising :meth:`mse` (:func:`minimize_curve` over :meth:`alpha_range`)."""
        g = Grid.parse(grid)
        check_bits(bits, g)
        lo, hi = self.alpha_range()
        return minimize_curve(lambda a: self.mse(a, bits, g), lo, hi, what=f"{self.name} at {bits} bits")

    def optimal_mse(self, bits: int, grid: Grid | str = "int") -> float:
        return float(self.mse(self.optimal_alpha(bits, grid), bits, grid))

    def penalty(self, alpha: float, bits: int, grid: Grid | str = "int") -> float:
        """``MSE(alpha) / MSE(alpha*) - 1``: what clipping at ``alpha`` costs under this model."""
        best = self.optimal_mse(bits, grid)
        return max(float(self.mse(alpha, bits, grid)) / best - 1.0, 0.0)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


@dataclass(repr=False)
class FamilySite(SiteModel):
    """One theory distribution, shifted by ``loc``: the per-tensor unimodal model."""

    dist: Distribution
    loc: float = 0.0
    name: str = "unimodal"

    def __post_init__(self):
        if not isinstance(self.dist, Distribution):
            raise ValueError(f"dist must be a theory distribution, got {self.dist!r}")
        if not math.isfinite(self.loc):
            raise ValueError(f"loc must be finite, got {self.loc}")

    def mse(self, alpha, bits: int, grid: Grid | str = "int") -> np.ndarray:
        if self.loc == 0.0 or self.dist.one_sided:
            return np.asarray(expected_mse(self.dist, alpha, bits, grid), dtype=np.float64)
        sd = float(np.sqrt(self.dist.variance))
        unit = self.dist.with_scale(float(self.dist.scale) / sd)
        return site_mse_on_levels(unit, self.loc, sd, 1.0, alpha, bits, grid)

    def alpha_range(self) -> tuple[float, float]:
        v = float(self.dist.variance)
        sd = math.sqrt(v) if math.isfinite(v) and v > 0 else float(self.dist.scale)
        return 1e-3 * sd + 1e-3 * abs(self.loc), 1e5 * sd + 10 * abs(self.loc)

    def optimal_alpha(self, bits: int, grid: Grid | str = "int") -> float:
        if self.loc == 0.0:
            from .optimal import optimal_alpha

            return float(optimal_alpha(self.dist, bits, grid))
        return super().optimal_alpha(bits, grid)


@dataclass(repr=False)
class ChannelMixture(SiteModel):
    """Channels with their own location and scale under one shared unit-variance shape.

    ``X_c = loc_c + scale_c Z`` with ``Z`` the unit-variance member of ``family`` with ``shape``
    (:func:`unit_variance`); channel ``c`` holds the share ``weight_c`` of the site's values
    (equal for a residual stream or a Linear input: every token has every channel). The MSE of
    one threshold for all of them is ``sum_c weight_c MSE_c(alpha)``, exactly.

    Build it from the one capture pass with :meth:`from_power_sums` (per-channel count, sum and
    sum of squares).
    """

    family: str
    shape: tuple
    loc: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    name: str = ""
    absmax: float | None = None
    unit: Distribution = field(init=False)

    def __post_init__(self):
        self.shape = tuple(float(s) for s in self.shape)
        self.unit = unit_variance(self.family, *self.shape)
        self.family = type(self.unit).name
        loc, scale, w = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in
                         (self.loc, self.scale, self.weight))
        loc, scale, w = (np.array(v) for v in np.broadcast_arrays(loc, scale, w))
        if loc.ndim != 1 or loc.size == 0:
            raise ValueError("a channel mixture needs a 1-D, non-empty array of channels")
        for nm, v in (("loc", loc), ("scale", scale), ("weight", w)):
            if not np.all(np.isfinite(v)):
                raise ValueError(f"channel {nm} has NaN or inf values")
        if np.any(scale < 0) or np.any(w < 0):
            raise ValueError("channel scales and weights must be non-negative")
        if not np.sum(w) > 0:
            raise ValueError("channel weights sum to 0")
        # a constant channel (scale 0) is a point mass: a tiny scale keeps the formulas finite
        # and its MSE the point's rounding error to far below anything measured
        tiny = 1e-12 * max(float(np.max(scale)), float(np.max(np.abs(loc))), 1e-300)
        self.loc, self.scale, self.weight = loc, np.maximum(scale, tiny), w / np.sum(w)
        if not self.name:
            self.name = f"channel_mixture/{self.family}"

    @classmethod
    def from_power_sums(cls, count, total, sumsq, family: str = "gaussian", shape: tuple = (),
                        absmax=None, name: str = "") -> "ChannelMixture":
        """From per-channel ``count``, ``sum x`` and ``sum x^2`` (arrays over channels): the
        channel's mean and standard deviation, weighted by its count."""
        n = np.asarray(count, dtype=np.float64)
        s1, s2 = np.asarray(total, dtype=np.float64), np.asarray(sumsq, dtype=np.float64)
        n, s1, s2 = np.broadcast_arrays(n, s1, s2)
        if np.any(n <= 0):
            raise ValueError("every channel needs at least one value (count > 0)")
        mean = s1 / n
        var = np.maximum(s2 / n - mean * mean, 0.0)
        am = None if absmax is None else float(np.max(absmax))
        return cls(family, shape, mean, np.sqrt(var), n, name=name, absmax=am)

    def channel_mse(self, alpha, bits: int, grid: Grid | str = "int") -> np.ndarray:
        """Each channel's own MSE at ``alpha`` (a scalar): shape ``(channels,)``."""
        return np.array([float(site_mse_on_levels(self.unit, self.loc[c], self.scale[c], 1.0,
                                                  float(alpha), bits, grid))
                         for c in range(self.loc.size)])

    def mse(self, alpha, bits: int, grid: Grid | str = "int") -> np.ndarray:
        return site_mse_on_levels(self.unit, self.loc, self.scale, self.weight, alpha, bits, grid)

    def mse_high_resolution(self, alpha, bits: int, grid: Grid | str = "int") -> np.ndarray:
        """The cheap approximation of :meth:`mse`: every channel's exact clipping error beyond the
        outermost levels plus ``step^2 / 12`` times its mass inside them (the high-resolution
        rounding term). Used only to find where to search the exact curve."""
        g = Grid.parse(grid)
        m = check_bits(bits, g)
        if g is Grid.ACIQ:
            return self.mse(alpha, bits, g)
        q = _levels_units(g, m)
        al = np.atleast_1d(np.asarray(alpha, dtype=np.float64))
        mu, s = self.loc[None, :], self.scale[None, :]
        a = al[:, None]
        top, bot = q[-1] * a, q[0] * a
        inf = np.full(np.broadcast_shapes(a.shape, mu.shape), np.inf)
        up = interval_moments(self.unit, (top - mu) / s, inf)
        dn = interval_moments(self.unit, -inf, (bot - mu) / s)
        ct, cb = (top - mu) / s, (bot - mu) / s
        clip = s * s * ((up[2] - 2 * ct * up[1] + ct * ct * up[0]) + (dn[2] - 2 * cb * dn[1] + cb * cb * dn[0]))
        step = (q[1] - q[0]) * a
        inside = np.maximum(1.0 - up[0] - dn[0], 0.0)
        out = (clip + step * step / 12.0 * inside) @ self.weight
        return out.reshape(np.shape(alpha))

    def optimal_alpha(self, bits: int, grid: Grid | str = "int") -> float:
        """The exact curve's minimum. Fine grids (more than 16 levels) first locate it on the
        high-resolution approximation (:meth:`mse_high_resolution`), then search the exact curve
        within a factor 1.6 of that point; if the exact minimum lies at an end of that window,
        the whole range is searched exactly."""
        g = Grid.parse(grid)
        m = check_bits(bits, g)
        lo, hi = self.alpha_range()
        what = f"{self.name} at {m} bits"
        if g is Grid.ACIQ or _levels_units(g, m).size <= 16:
            return minimize_curve(lambda a: self.mse(a, m, g), lo, hi, what=what)
        try:
            a0 = minimize_curve(lambda a: self.mse_high_resolution(a, m, g), lo, hi, what=what)
            return minimize_curve(lambda a: self.mse(a, m, g), a0 / 1.6, a0 * 1.6, n=7, what=what,
                                  refine=0, xatol=1e-4)
        except RuntimeError:
            return minimize_curve(lambda a: self.mse(a, m, g), lo, hi, what=what)

    def alpha_range(self) -> tuple[float, float]:
        reach = np.abs(self.loc) + self.scale
        lo = 1e-3 * float(np.min(reach[reach > 0])) if np.any(reach > 0) else 1e-300
        hi = 1e3 * float(np.max(reach))
        if self.absmax is not None and math.isfinite(self.absmax):
            hi = max(hi, 4.0 * self.absmax)
        return lo, hi


@dataclass(repr=False)
class Mixture(SiteModel):
    """``sum_i w_i model_i``: e.g. a bulk model plus the outlier channels (:func:`bulk_outlier_model`)."""

    components: Sequence[SiteModel]
    weights: Sequence[float]
    name: str = "mixture"

    def __post_init__(self):
        w = np.asarray(self.weights, dtype=np.float64)
        if len(self.components) == 0 or w.shape != (len(self.components),):
            raise ValueError("a mixture needs one weight per component and at least one component")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.sum(w) > 0:
            raise ValueError("mixture weights must be finite, non-negative and not all 0")
        self.weights = w / np.sum(w)

    def mse(self, alpha, bits: int, grid: Grid | str = "int") -> np.ndarray:
        return sum(w * np.asarray(m.mse(alpha, bits, grid), dtype=np.float64)
                   for w, m in zip(self.weights, self.components) if w > 0)

    def alpha_range(self) -> tuple[float, float]:
        r = [m.alpha_range() for m in self.components]
        return min(lo for lo, _ in r), max(hi for _, hi in r)


# ---- fits -------------------------------------------------------------------------------------

def fit_unit_shape(z, family: str) -> tuple:
    """Maximum-likelihood shape of the unit-variance member of ``family`` for standardized values
    ``z`` (each value's channel mean removed and divided by the channel's standard deviation).

    The variance is fixed to 1 (the channels' own power sums give their scales); only the shape
    is fitted: ``gennorm`` (generalized Gaussian) its beta in [0.2, 20], ``student_t`` its nu in (2, 400].
    ``gaussian`` and ``laplace`` have no shape (returns ``()``).
    """
    z = np.asarray(z, dtype=np.float64).ravel()
    if z.size < 10:
        raise ValueError(f"a shape fit needs at least 10 values, got {z.size}")
    if not np.all(np.isfinite(z)):
        raise ValueError("standardized values contain NaN or inf")
    name = family_class(family).name
    if name in ("gaussian", "laplace"):
        return ()
    from scipy import optimize

    if name == "gennorm":
        def nll(lb):
            d = unit_variance(name, math.exp(lb))
            return -float(np.sum(np.log(np.maximum(d.pdf(z), 1e-300))))
        lo, hi = math.log(0.2), math.log(20.0)
    elif name == "student_t":
        def nll(lb):
            d = unit_variance(name, 2.0 + math.exp(lb))
            return -float(np.sum(np.log(np.maximum(d.pdf(z), 1e-300))))
        lo, hi = math.log(1e-3), math.log(398.0)
    else:
        raise ValueError(f"family {family!r} cannot be a channel shape; use one of {', '.join(SHAPES)}")
    res = optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    v = math.exp(float(res.x))
    return (v,) if name == "gennorm" else (2.0 + v,)


def outlier_channels(loc, scale, ratio: float = 6.0, max_share: float = 0.05) -> np.ndarray:
    """Indices of a site's outlier channels: those whose root mean square ``sqrt(mu^2 + s^2)``
    exceeds ``ratio`` times the median channel's, at most ``max_share`` of the channels (the
    largest first). The rule is docs/design.md's ("Site models")."""
    rms = np.sqrt(np.asarray(loc, dtype=np.float64) ** 2 + np.asarray(scale, dtype=np.float64) ** 2)
    if rms.size == 0:
        return np.zeros(0, dtype=np.int64)
    med = float(np.median(rms))
    idx = np.flatnonzero(rms > ratio * med) if med > 0 else np.flatnonzero(rms > 0)
    cap = max(1, int(math.floor(max_share * rms.size)))
    return np.sort(idx[np.argsort(-rms[idx])][:cap])


def bulk_outlier_model(bulk: SiteModel, channels: ChannelMixture, outliers: np.ndarray,
                       name: str = "bulk_outlier") -> SiteModel:
    """Two components: ``bulk`` (a model of the values of every channel not in ``outliers``) and
    the outlier channels of ``channels`` each with its own location and scale, weighted by their
    share of the values."""
    outliers = np.asarray(outliers, dtype=np.int64)
    if outliers.size == 0:
        return bulk
    w_out = float(np.sum(channels.weight[outliers]))
    out = ChannelMixture(channels.family, channels.shape, channels.loc[outliers],
                         channels.scale[outliers], channels.weight[outliers],
                         name="outlier_channels", absmax=channels.absmax)
    return Mixture([bulk, out], [1.0 - w_out, w_out], name=name)


# ---- selection by the curve -------------------------------------------------------------------

def curve_distance(predicted, measured) -> float:
    """Root mean square of ``log(pred / min pred) - log(meas / min meas)`` over the points where
    both are positive and finite: how well the *shape* of a predicted MSE curve (where its
    minimum lies, how fast it rises) matches a measured one, whatever their overall levels."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    ok = np.isfinite(p) & np.isfinite(m) & (p > 0) & (m > 0)
    if np.count_nonzero(ok) < 3:
        return math.inf
    lp, lm = np.log(p[ok] / np.min(p[ok])), np.log(m[ok] / np.min(m[ok]))
    return float(np.sqrt(np.mean((lp - lm) ** 2)))


def select_site_model(models: Mapping[str, SiteModel], alphas, measured, bits: int,
                      grid: Grid | str = "int") -> tuple[str, dict[str, float]]:
    """The model whose predicted MSE curve over ``alphas`` best matches the ``measured`` curve
    of held-out values (:func:`curve_distance`); returns ``(name, distances)``. Models whose
    curve cannot be evaluated get distance inf and are never chosen unless all fail."""
    dist: dict[str, float] = {}
    for name, m in models.items():
        try:
            dist[name] = curve_distance(m.mse(np.asarray(alphas, dtype=np.float64), bits, grid), measured)
        except (ValueError, RuntimeError, FloatingPointError):
            dist[name] = math.inf
    if not dist:
        raise ValueError("no models to select from")
    return min(dist, key=lambda k: (dist[k], k)), dist
