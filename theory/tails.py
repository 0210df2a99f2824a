"""A body plus a generalized Pareto tail (peaks over threshold) as a model of one clipping site.

A unimodal family fitted to all of a tensor's values is pulled by its bulk: the few large values
that decide where clipping pays are fitted badly. Extreme value theory says what those look like
whatever the bulk is (Pickands-Balkema-de Haan): above a high threshold ``u`` the excess
``|X| - u`` of almost any distribution is close to a generalized Pareto distribution (GPD)

    S(y) = P(Y > y) = (1 + xi y / sigma)^(-1/xi),   y >= 0   (xi = 0: exp(-y / sigma)),

whose shape ``xi`` is the tail index: ``xi > 0`` a power-law tail (Student-t with ``nu`` degrees of
freedom has ``xi = 1/nu``), ``xi = 0`` exponential-like (Gaussian, Laplace), ``xi < 0`` a bounded
tail ending at ``-sigma/xi``. The clipping error needs the second moment, finite for ``xi < 1/2``.

This module builds:

* :class:`GeneralizedPareto` - the closed forms the MSE needs: partial moments
  ``P_k(t) = int_t^inf y^k f(y) dy`` (``k = 0, 1, 2``) and the clipping term
  ``E[(Y - t)^2; Y > t] = S(t) 2 (sigma + xi t)^2 / ((1 - xi)(1 - 2 xi))``. Both follow from
  threshold stability: given ``Y > t`` the excess ``Y - t`` is GPD(xi, sigma + xi t).
  :func:`gpd_partial_moment_expr`, :func:`gpd_clipping_expr` and :func:`gpd_derivation` carry
  the derivation out in sympy (the test compares them with the numeric forms and quadrature);
* :func:`fit_pot` - the maximum-likelihood GPD of the exceedances over a threshold, with
  standard errors from the observed information;
* :func:`choose_threshold` - the threshold by the Anderson-Darling test of the GPD fit on a
  ladder of candidate thresholds (Choulakian & Stephens 2001), or by ForwardStop on the same
  p-values (Bader, Yan & Zhang 2018);
* :class:`BodyTail` - a :class:`theory.site_models.SiteModel`: a symmetric body family on
  ``[-u, u]`` and ``u + GPD`` on each side beyond, with the exact MSE of every grid.

``import theory.tails`` imports numpy only (and the numpy-only theory modules); scipy is imported
by the fits and sympy by the derivations, inside the functions that use them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .distributions import Distribution, family as family_class
from .grids import Grid, check_bits, step_factor
from .mse import check_alpha
from .site_models import SiteModel, interval_moments

__all__ = [
    "GeneralizedPareto", "gpd_symbols", "gpd_partial_moment_expr", "gpd_clipping_expr",
    "gpd_derivation", "PotFit", "fit_pot", "anderson_darling", "ad_critical_value", "ad_p_value",
    "ThresholdDiagnostics", "choose_threshold", "fit_truncated", "BodyTail", "MIN_EXCEEDANCES",
    "DEFAULT_QUANTILES",
]

#: fewest exceedances :func:`fit_pot` fits a GPD to
MIN_EXCEEDANCES = 30
#: below this ``|xi z|`` the GPD's ``log1p(xi z) / xi`` and ``expm1(xi s) / xi`` use their series
_SERIES = 1e-5
#: positive levels above which :meth:`BodyTail.mse` integrates rounding error by quadrature
_QUADRATURE_LEVELS = 256
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)
#: alphas x cells evaluated at once by the closed-form MSE
_CHUNK = 1_000_000


# ---- the generalized Pareto distribution -------------------------------------------------------

def _log1p_ratio(xi: float, z) -> np.ndarray:
    """``log1p(xi z) / xi`` for ``z >= 0``, continuous at ``xi = 0`` (where it is ``z``).

    ``xi z <= -1`` (at or past the end of a bounded tail) gives ``+inf``; ``z = inf`` gives
    ``inf``. Below ``|xi z| = 1e-5`` the series ``z (1 - a/2 + a^2/3 - a^3/4)``, ``a = xi z``.
    """
    z = np.asarray(z, dtype=np.float64)
    if xi == 0.0:
        return z.copy()
    shape = z.shape
    z = np.atleast_1d(z)
    a = xi * z
    out = np.empty(z.shape)
    small = np.abs(a) < _SERIES
    asm = a[small]
    out[small] = z[small] * (1.0 - asm * (0.5 - asm * (1.0 / 3.0 - 0.25 * asm)))
    ab = a[~small]
    with np.errstate(divide="ignore", invalid="ignore"):
        out[~small] = np.where(ab <= -1.0, np.inf, np.log1p(np.maximum(ab, -1.0)) / xi)
    return out.reshape(shape)


def _expm1_ratio(xi: float, s: np.ndarray) -> np.ndarray:
    """``expm1(xi s) / xi``, continuous at ``xi = 0`` (``= s``)."""
    s = np.asarray(s, dtype=np.float64)
    a = xi * s
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(np.abs(a) < _SERIES, s * (1.0 + a * (0.5 + a / 6.0)),
                        np.expm1(a) / (xi if xi != 0.0 else 1.0))


def _gpd_logsf(y, xi: float, sigma: float) -> np.ndarray:
    """``log S(y)`` of GPD(xi, sigma) for any ``xi``: 0 for ``y <= 0``, ``-inf`` past the end."""
    y = np.asarray(y, dtype=np.float64)
    return np.where(y <= 0, 0.0, -_log1p_ratio(xi, np.maximum(y, 0.0) / sigma))


def _gpd_logpdf(y, xi: float, sigma: float) -> np.ndarray:
    """``log f(y) = -log sigma - (1 + xi) log1p(xi y / sigma) / xi`` (``-inf`` off the support)."""
    y = np.asarray(y, dtype=np.float64)
    z = np.maximum(y, 0.0) / sigma
    inside = (y >= 0) & ((xi >= 0) | (xi * z > -1.0))
    with np.errstate(invalid="ignore", over="ignore"):
        lp = -math.log(sigma) - (1.0 + xi) * _log1p_ratio(xi, np.where(inside, z, 0.0))
    return np.where(inside, lp, -np.inf)


def _check_xi_sigma(xi, sigma) -> tuple[float, float]:
    try:
        xi, sigma = float(xi), float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"GPD parameters must be numbers, got xi={xi!r}, sigma={sigma!r}") from None
    if not math.isfinite(xi):
        raise ValueError(f"GPD shape xi must be finite, got xi={xi}")
    if xi >= 0.5:
        raise ValueError(f"GPD shape xi={xi:.6g} >= 0.5: the tail has no finite second moment, so "
                         "the clipping error E[(Y - t)^2; Y > t] is infinite")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"GPD scale sigma must be positive and finite, got sigma={sigma}")
    return xi, sigma


def _check_t(t, what: str = "t") -> np.ndarray:
    t = np.asarray(t, dtype=np.float64)
    if np.any(np.isnan(t)):
        raise ValueError(f"{what} contains NaN")
    return t


@dataclass(frozen=True)
class GeneralizedPareto:
    """The generalized Pareto distribution of an excess ``Y >= 0`` over a threshold.

    Parameters
    ----------
    xi : float
        Shape (tail index), ``xi < 1/2`` (a finite second moment; larger ``xi`` is refused
        naming it). ``xi < 0`` is a bounded tail on ``[0, -sigma/xi]``; ``xi = 0`` the exponential
        limit, which every formula reaches continuously (``|xi y / sigma| < 1e-5`` uses series).
    sigma : float
        Scale, positive.

    Notes
    -----
    ``S(y) = (1 + xi y/sigma)^(-1/xi)``, ``f(y) = S(y) / (sigma + xi y)``. Threshold stability:
    ``P(Y - t > z | Y > t) = (1 + xi z / (sigma + xi t))^(-1/xi)``, the GPD with scale
    ``sigma_t = sigma + xi t``, whose mean is ``sigma_t / (1 - xi)`` and second moment
    ``2 sigma_t^2 / ((1 - xi)(1 - 2 xi))``. Hence, for ``t >= 0``,

    * ``P_0(t) = S(t)``,
    * ``P_1(t) = S(t) (t + sigma_t / (1 - xi)) = S(t) (sigma + t) / (1 - xi)``,
    * ``P_2(t) = S(t) (t^2 + 2 t sigma_t / (1 - xi) + 2 sigma_t^2 / ((1 - xi)(1 - 2 xi)))``,
    * ``E[(Y - t)^2; Y > t] = S(t) 2 sigma_t^2 / ((1 - xi)(1 - 2 xi))``.
    """

    xi: float
    sigma: float

    def __post_init__(self):
        xi, sigma = _check_xi_sigma(self.xi, self.sigma)
        object.__setattr__(self, "xi", xi)
        object.__setattr__(self, "sigma", sigma)

    # ---- basic functions -------------------------------------------------------------------
    @property
    def upper_end(self) -> float:
        """End of the support: ``-sigma/xi`` for ``xi < 0``, else ``inf``."""
        return -self.sigma / self.xi if self.xi < 0 else math.inf

    @property
    def mean(self) -> float:
        return self.sigma / (1.0 - self.xi)

    @property
    def variance(self) -> float:
        return self.sigma**2 / ((1.0 - self.xi) ** 2 * (1.0 - 2.0 * self.xi))

    def sf(self, y) -> np.ndarray:
        """``P(Y > y)``: 1 for ``y <= 0``, 0 past the end of a bounded tail."""
        return np.exp(_gpd_logsf(_check_t(y, "y"), self.xi, self.sigma))

    def cdf(self, y) -> np.ndarray:
        return -np.expm1(_gpd_logsf(_check_t(y, "y"), self.xi, self.sigma))

    def pdf(self, y) -> np.ndarray:
        """Density; 0 for ``y < 0`` and past the end of a bounded tail."""
        return np.exp(_gpd_logpdf(_check_t(y, "y"), self.xi, self.sigma))

    def logpdf(self, y) -> np.ndarray:
        return _gpd_logpdf(_check_t(y, "y"), self.xi, self.sigma)

    def isf(self, q) -> np.ndarray:
        """The ``y`` with ``S(y) = q``, ``0 < q <= 1``: ``sigma expm1(-xi log q) / xi``."""
        q = np.asarray(q, dtype=np.float64)
        if np.any(~(q > 0) | ~(q <= 1)):
            raise ValueError(f"tail probabilities must lie in (0, 1], got {q!r}")
        return self.sigma * _expm1_ratio(self.xi, -np.log(q))

    @property
    def scipy(self):
        """The frozen ``scipy.stats.genpareto(c=xi, loc=0, scale=sigma)``."""
        import scipy.stats

        return scipy.stats.genpareto(self.xi, loc=0.0, scale=self.sigma)

    # ---- what clipping needs ---------------------------------------------------------------
    def _sf_and_scale(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = np.exp(_gpd_logsf(t, self.xi, self.sigma))
        # sigma_t is the excess scale; past the end of a bounded tail S = 0 and it no longer matters
        return s, np.maximum(self.sigma + self.xi * t, 0.0)

    def partial_moment(self, k: int, t) -> np.ndarray:
        """``P_k(t) = int_t^inf y^k f(y) dy`` for ``k`` in 0, 1, 2 (closed form, array ``t``).

        ``t <= 0`` gives the full moment (the density is 0 below 0); ``t = inf`` gives 0.
        """
        if k not in (0, 1, 2):
            raise ValueError(f"partial moments are defined for k in 0, 1, 2; got {k}")
        t = np.maximum(_check_t(t), 0.0)
        fin = np.isfinite(t)
        tt = np.where(fin, t, 0.0)
        s, st = self._sf_and_scale(tt)
        xi = self.xi
        if k == 0:
            out = s
        elif k == 1:
            out = s * (tt + st / (1.0 - xi))
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                out = s * (tt * tt + 2.0 * tt * st / (1.0 - xi)
                           + 2.0 * st * st / ((1.0 - xi) * (1.0 - 2.0 * xi)))
            out = np.where(s == 0.0, 0.0, out)
        return np.where(fin, out, 0.0)

    def clipping_term(self, t) -> np.ndarray:
        """``E[(Y - t)^2; Y > t]``: ``S(t) 2 (sigma + xi t)^2 / ((1 - xi)(1 - 2 xi))`` for ``t >= 0``.

        ``t < 0`` gives ``E[(Y - t)^2] = E[Y^2] - 2 t E[Y] + t^2``; ``t = inf`` gives 0.
        """
        t = _check_t(t)
        xi = self.xi
        fin = np.isfinite(t)
        tp = np.where(fin, np.maximum(t, 0.0), 0.0)
        s, st = self._sf_and_scale(tp)
        out = s * (2.0 * st * st / ((1.0 - xi) * (1.0 - 2.0 * xi)))
        neg = t < 0
        if np.any(neg):
            m1, m2 = self.mean, self.variance + self.mean**2
            tn = np.where(neg, t, 0.0)
            out = np.where(neg, m2 - 2.0 * tn * m1 + tn * tn, out)
        return np.where(fin, out, np.where(t < 0, np.inf, 0.0))

    def beyond(self, s, d) -> np.ndarray:
        """``E[((Y - s) + d)^2; Y > s]`` for ``s >= 0``: the error of the outermost cell of a grid
        whose edge is ``s`` (in excess units) and whose level sits ``d = edge - level`` below it.

        ``= clipping_term(s) + 2 d S(s) sigma_s / (1 - xi) + d^2 S(s)``: no term grows like
        ``s^2``, so nothing cancels however far out the cell starts.
        """
        s = np.maximum(_check_t(s), 0.0)
        d = np.asarray(d, dtype=np.float64)
        fin = np.isfinite(s)
        ss = np.where(fin, s, 0.0)
        sf, st = self._sf_and_scale(ss)
        xi = self.xi
        with np.errstate(over="ignore", invalid="ignore"):
            out = sf * (2.0 * st * st / ((1.0 - xi) * (1.0 - 2.0 * xi))
                        + d * (2.0 * st / (1.0 - xi)) + d * d)
        return np.where(fin & (sf > 0), out, 0.0)


# ---- the derivation in sympy --------------------------------------------------------------------

@functools.cache
def gpd_symbols():
    """``(t, sigma, xi)``: the sympy symbols of the expressions below (all positive; the
    derivation takes ``0 < xi < 1/2``, where the integrals converge)."""
    import sympy as sp

    return sp.symbols("t sigma xi", positive=True)


def _gpd_density_sym(y, sigma, xi):
    return (1 + xi * y / sigma) ** (-1 / xi - 1) / sigma


def _gpd_sf_sym(t, sigma, xi):
    return (1 + xi * t / sigma) ** (-1 / xi)


@functools.cache
def gpd_partial_moment_expr(k: int):
    """``P_k(t) = int_t^oo y^k f(y) dy`` of GPD(xi, sigma), integrated by sympy (``0 < xi < 1/2``).

    An expression in :func:`gpd_symbols`; for ``k = 0, 1, 2`` it equals
    :meth:`GeneralizedPareto.partial_moment`, which extends it to ``xi <= 0``.
    """
    import sympy as sp

    if k not in (0, 1, 2):
        raise ValueError(f"partial moments are defined for k in 0, 1, 2; got {k}")
    t, sigma, xi = gpd_symbols()
    y = sp.Symbol("y", positive=True)
    out = sp.integrate(y**k * _gpd_density_sym(y, sigma, xi), (y, t, sp.oo), conds="none")
    if out.has(sp.Integral):
        raise RuntimeError(f"sympy could not integrate the GPD partial moment of order {k}: {out}")
    return sp.factor(sp.simplify(out))


@functools.cache
def _gpd_clipping_steps():
    import sympy as sp

    t, sigma, xi = gpd_symbols()
    y, z = sp.symbols("y z", positive=True)
    # 1. by integration of the density
    integral = sp.integrate((y - t) ** 2 * _gpd_density_sym(y, sigma, xi), (y, t, sp.oo),
                            conds="none")
    if integral.has(sp.Integral):
        raise RuntimeError(f"sympy could not integrate the GPD clipping error: {integral}")
    integral = sp.simplify(integral)
    # 2. threshold stability: the excess over t is GPD(xi, sigma + xi t)
    sigma_t = sigma + xi * t
    stability = sp.simplify(sp.powsimp(_gpd_sf_sym(t + z, sigma, xi) / _gpd_sf_sym(t, sigma, xi)
                                       - _gpd_sf_sym(z, sigma_t, xi), force=True))
    if stability != 0:
        raise RuntimeError(f"threshold stability did not reduce to 0: {stability}")
    excess_m2 = sp.simplify(sp.integrate(z**2 * _gpd_density_sym(z, sigma_t, xi), (z, 0, sp.oo),
                                         conds="none"))
    identity = _gpd_sf_sym(t, sigma, xi) * 2 * sigma_t**2 / ((1 - xi) * (1 - 2 * xi))
    if sp.simplify(sp.powsimp(integral - identity, force=True)) != 0:
        raise RuntimeError(f"the integrated clipping error {integral} differs from the threshold-"
                           f"stability form {identity}")
    if sp.simplify(excess_m2 - 2 * sigma_t**2 / ((1 - xi) * (1 - 2 * xi))) != 0:
        raise RuntimeError(f"the excess second moment is {excess_m2}, not 2 sigma_t^2/((1-xi)(1-2xi))")
    S = sp.Function("S")
    return integral, excess_m2, identity, sp.Eq(S(t + z) / S(t), _gpd_sf_sym(z, sigma_t, xi))


def gpd_clipping_expr():
    """``E[(Y - t)^2; Y > t] = S(t) 2 (sigma + xi t)^2 / ((1 - xi)(1 - 2 xi))`` (sympy).

    sympy integrates ``(y - t)^2 f(y)`` over ``(t, oo)`` for ``0 < xi < 1/2`` and checks that the
    result equals the threshold-stability form (survival times the excess's second moment, itself
    integrated); the returned expression is that form, in :func:`gpd_symbols`.
    """
    return _gpd_clipping_steps()[2]


@functools.cache
def gpd_derivation():
    """The clipping error of a generalized Pareto tail as a :class:`theory.derivations.Derivation`."""
    import sympy as sp

    from .derivations import Derivation

    t, sigma, xi = gpd_symbols()
    y = sp.Symbol("y", positive=True)
    integral, excess_m2, identity, stability = _gpd_clipping_steps()
    return Derivation("gpd_clipping", title="Clipping error of a generalized Pareto tail", steps={
        "density": sp.Eq(sp.Function("f")(y), _gpd_density_sym(y, sigma, xi)),
        "survival": sp.Eq(sp.Function("S")(t), gpd_partial_moment_expr(0)),
        "threshold stability": stability,
        "P_1": sp.Eq(sp.Function("P_1")(t), gpd_partial_moment_expr(1)),
        "P_2": sp.Eq(sp.Function("P_2")(t), gpd_partial_moment_expr(2)),
        "excess second moment": sp.Eq(sp.Symbol(r"\mathrm{E}[Z_t^2]"), excess_m2),
        "clipping": sp.Eq(sp.Symbol("E_clip"), identity),
    })


# ---- maximum likelihood on the exceedances -----------------------------------------------------

@dataclass(frozen=True)
class PotFit:
    """A GPD fitted to the exceedances ``|x| - u`` of the magnitudes above ``u`` (:func:`fit_pot`).

    ``xi_se`` and ``sigma_se`` are standard errors from the observed information (NaN where the
    information is not positive definite, e.g. ``xi < -1/2``, where the MLE is not regular).
    """

    xi: float
    sigma: float
    threshold: float
    n_exceed: int
    n_total: int
    xi_se: float
    sigma_se: float

    @property
    def p_exceed(self) -> float:
        """Share of the magnitudes above the threshold."""
        return self.n_exceed / self.n_total

    def gpd(self) -> GeneralizedPareto:
        """The fitted :class:`GeneralizedPareto` (ValueError naming xi when ``xi >= 1/2``)."""
        return GeneralizedPareto(self.xi, self.sigma)


def _check_magnitudes(magnitudes) -> np.ndarray:
    m = np.asarray(magnitudes, dtype=np.float64).ravel()
    if m.size == 0:
        raise ValueError("magnitudes are empty")
    if not np.all(np.isfinite(m)):
        raise ValueError("magnitudes contain NaN or inf")
    if np.any(m < 0):
        raise ValueError("magnitudes must be non-negative (pass np.abs(x))")
    return m


def _profile_loglik(tau: np.ndarray, y: np.ndarray, ymax: float) -> np.ndarray:
    """Profile log-likelihood per exceedance at ``theta = tau / ymax`` (Grimshaw 1993):
    ``sigma(theta) = mean(log1p(theta y)) / theta``, ``xi = theta sigma``,
    ``l = -log sigma - 1 - xi`` (``-inf`` where ``sigma`` is not positive and finite)."""
    tau = np.atleast_1d(np.asarray(tau, dtype=np.float64))
    th = tau / ymax
    a = th[:, None] * y[None, :] if y.size * tau.size <= _CHUNK else None
    if a is None:
        sig = np.array([float(np.mean(_log1p_ratio(float(t), y))) for t in th])
    else:
        small = np.abs(a) < _SERIES
        with np.errstate(divide="ignore", invalid="ignore"):
            big = np.log1p(np.maximum(a, -1.0)) / np.where(th == 0, 1.0, th)[:, None]
        ser = y[None, :] * (1.0 - a * (0.5 - a * (1.0 / 3.0 - 0.25 * a)))
        sig = np.mean(np.where(small, ser, big), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = -np.log(sig) - 1.0 - th * sig
    return np.where(np.isfinite(sig) & (sig > 0), out, -np.inf)


def _gpd_mle(y: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood ``(xi, sigma)`` of GPD exceedances ``y > 0`` by the profile likelihood in
    ``theta = xi / sigma`` over ``(-1/max y, inf)``: a scan, then Brent's method."""
    from scipy import optimize

    ymax = float(np.max(y))
    tau = np.concatenate([-1.0 + np.geomspace(1e-9, 1.0, 60)[:-1], [0.0], np.geomspace(1e-6, 1e8, 120)])
    ll = _profile_loglik(tau, y, ymax)
    i = int(np.argmax(ll))
    if i == 0:
        raise ValueError("the GPD likelihood grows without bound towards xi <= -1 (the exceedances "
                         "look like a bounded tail with an infinite density at its end): no MLE")
    if i == tau.size - 1:
        raise ValueError("the GPD likelihood still grows at xi ~ 1e8: the exceedances have no "
                         "usable GPD fit (a few values orders of magnitude above the rest?)")
    res = optimize.minimize_scalar(lambda v: -float(_profile_loglik(np.array([v]), y, ymax)[0]),
                                   bounds=(float(tau[i - 1]), float(tau[i + 1])), method="bounded",
                                   options={"xatol": 1e-12})
    tv = float(res.x) if -float(res.fun) >= ll[i] else float(tau[i])
    th = tv / ymax
    sigma = float(np.mean(_log1p_ratio(th, y)))
    return th * sigma, sigma


def _nll(xi: float, log_sigma: float, y: np.ndarray) -> float:
    v = _gpd_logpdf(y, xi, math.exp(log_sigma))
    return -float(np.sum(v)) if np.all(np.isfinite(v)) else math.inf


def _standard_errors(xi: float, sigma: float, y: np.ndarray) -> tuple[float, float]:
    """Standard errors of ``(xi, sigma)`` from the inverse observed information: the Hessian of
    the negative log-likelihood in ``(xi, log sigma)`` by central differences (step 1e-4)."""
    h = 1e-4
    p0 = np.array([xi, math.log(sigma)])

    def f(d):
        return _nll(p0[0] + d[0], p0[1] + d[1], y)

    f0 = f((0.0, 0.0))
    hess = np.empty((2, 2))
    for i in range(2):
        e = np.zeros(2)
        e[i] = h
        hess[i, i] = (f(e) - 2.0 * f0 + f(-e)) / (h * h)
    hess[0, 1] = hess[1, 0] = (f((h, h)) - f((h, -h)) - f((-h, h)) + f((-h, -h))) / (4.0 * h * h)
    if not np.all(np.isfinite(hess)):
        return math.nan, math.nan
    try:
        ev = np.linalg.eigvalsh(hess)
        if ev[0] <= 0:
            return math.nan, math.nan
        cov = np.linalg.inv(hess)
    except np.linalg.LinAlgError:
        return math.nan, math.nan
    return math.sqrt(cov[0, 0]), sigma * math.sqrt(cov[1, 1])


def fit_pot(magnitudes, threshold: float) -> PotFit:
    """Peaks over threshold: the maximum-likelihood GPD of ``y = |x| - u`` for ``|x| > u``.

    Parameters
    ----------
    magnitudes : array_like
        Non-negative values (``np.abs(x)``), finite.
    threshold : float
        ``u``, finite and non-negative.

    Returns
    -------
    PotFit
        ``xi``, ``sigma`` (any ``xi > -1`` the data give: ``xi >= 1/2`` is reported, and refused
        only where a finite second moment is needed, :meth:`PotFit.gpd`), the counts and
        standard errors from the observed information.

    Raises
    ------
    ValueError
        NaN/inf or negative magnitudes, a bad threshold, fewer than 30 exceedances, exceedances
        that are all equal, or a likelihood without a maximum (``xi <= -1``).
    """
    m = _check_magnitudes(magnitudes)
    try:
        u = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {threshold!r}") from None
    if not (math.isfinite(u) and u >= 0):
        raise ValueError(f"threshold must be finite and non-negative, got {threshold!r}")
    y = m[m > u] - u
    if y.size < MIN_EXCEEDANCES:
        raise ValueError(f"only {y.size} magnitudes exceed the threshold {u:.6g}; a GPD fit needs "
                         f"at least {MIN_EXCEEDANCES}")
    if float(np.max(y)) == float(np.min(y)):
        raise ValueError(f"the {y.size} exceedances over {u:.6g} are all equal; no GPD fits them")
    xi, sigma = _gpd_mle(y)
    xi_se, sigma_se = _standard_errors(xi, sigma, y)
    return PotFit(float(xi), float(sigma), u, int(y.size), int(m.size), xi_se, sigma_se)


# ---- goodness of fit and the threshold ---------------------------------------------------------

#: Choulakian & Stephens (2001), Technometrics 43(4), Table 2: upper-tail percentage points of the
#: Anderson-Darling A^2 for the GPD with both parameters estimated by maximum likelihood. Their
#: shape k is -xi (F = 1 - (1 - k x / a)^(1/k)); rows here are ordered by xi = -k.
_CS_P = (0.5, 0.25, 0.1, 0.05, 0.025, 0.01, 0.005, 0.001)
_CS_XI = (-0.5, -0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.5, 0.9)
_CS_A2 = (
    (0.496, 0.735, 1.061, 1.321, 1.590, 1.958, 2.243, 2.922),  # k = 0.5
    (0.468, 0.688, 0.985, 1.221, 1.465, 1.799, 2.058, 2.674),  # k = 0.4
    (0.445, 0.649, 0.924, 1.140, 1.365, 1.672, 1.909, 2.475),  # k = 0.3
    (0.426, 0.617, 0.873, 1.074, 1.283, 1.567, 1.788, 2.314),  # k = 0.2
    (0.410, 0.591, 0.831, 1.020, 1.215, 1.481, 1.687, 2.176),  # k = 0.1
    (0.397, 0.569, 0.796, 0.974, 1.158, 1.409, 1.603, 2.064),  # k = 0
    (0.386, 0.550, 0.766, 0.935, 1.110, 1.348, 1.532, 1.966),  # k = -0.1
    (0.376, 0.534, 0.741, 0.903, 1.069, 1.296, 1.471, 1.893),  # k = -0.2
    (0.356, 0.499, 0.685, 0.830, 0.978, 1.180, 1.336, 1.707),  # k = -0.5
    (0.339, 0.471, 0.641, 0.771, 0.905, 1.086, 1.226, 1.559),  # k = -0.9
)


def anderson_darling(y, xi: float, sigma: float) -> float:
    """The Anderson-Darling statistic ``A^2`` of exceedances ``y`` against GPD(xi, sigma):
    ``-n - (1/n) sum_i (2i - 1) [log F(y_(i)) + log S(y_(n+1-i))]`` (``y`` sorted ascending)."""
    y = np.sort(np.asarray(y, dtype=np.float64).ravel())
    n = y.size
    if n == 0:
        raise ValueError("no exceedances to test")
    if not np.all(np.isfinite(y)):
        raise ValueError("exceedances contain NaN or inf")
    log_s = _gpd_logsf(y, float(xi), float(sigma))
    with np.errstate(divide="ignore"):
        log_f = np.log(-np.expm1(log_s))
    i = np.arange(1, n + 1)
    return float(-n - np.sum((2 * i - 1) * (log_f + log_s[::-1])) / n)


def _cs_row(xi: float) -> np.ndarray:
    """The A^2 percentage points at ``xi``, linear in xi between the table's rows (clamped to
    its range, -0.5..0.9)."""
    xs = np.asarray(_CS_XI)
    tab = np.asarray(_CS_A2)
    x = min(max(float(xi), xs[0]), xs[-1])
    return np.array([np.interp(x, xs, tab[:, j]) for j in range(tab.shape[1])])


def ad_critical_value(xi: float, level: float = 0.05) -> float:
    """The A^2 the GPD test rejects above at significance ``level`` (one of the table's 0.5,
    0.25, 0.1, 0.05, 0.025, 0.01, 0.005, 0.001), at shape ``xi`` (Choulakian & Stephens 2001,
    Table 2, interpolated linearly in xi and clamped to -0.5..0.9)."""
    if float(level) not in _CS_P:
        raise ValueError(f"level must be one of the table's {', '.join(map(str, _CS_P))}; got {level!r}")
    return float(_cs_row(xi)[_CS_P.index(float(level))])


def ad_p_value(a2: float, xi: float) -> float:
    """Approximate p-value of ``A^2 = a2`` at shape ``xi``: ``log p`` interpolated linearly in A^2
    between the table's points, clipped to its range ``[0.001, 0.5]`` (0.5 reads "at least 0.5",
    0.001 "at most 0.001")."""
    row = _cs_row(xi)
    return float(np.exp(np.interp(float(a2), row, np.log(np.asarray(_CS_P)))))


@dataclass(frozen=True, eq=False)
class ThresholdDiagnostics:
    """Per candidate threshold (ascending): ``u``, the exceedance count, the GPD fit, its
    Anderson-Darling ``ad``, the ``critical`` value at ``level``, the table ``p_value`` and
    whether the test ``accepted`` it; ``chosen`` indexes the threshold taken and ``rule`` says how
    (``first_accept``, ``forward_stop``, or ``... none accepted: least rejected``)."""

    u: np.ndarray
    quantile: np.ndarray
    n_exceed: np.ndarray
    xi: np.ndarray
    sigma: np.ndarray
    ad: np.ndarray
    critical: np.ndarray
    p_value: np.ndarray
    accepted: np.ndarray
    chosen: int
    rule: str
    level: float

    def rows(self) -> list[dict]:
        """One dict per candidate (for tables and JSON)."""
        keys = ("u", "quantile", "n_exceed", "xi", "sigma", "ad", "critical", "p_value", "accepted")
        return [{k: getattr(self, k)[i].item() for k in keys} for i in range(self.u.size)]


#: default ladder of candidate thresholds: these quantiles of the magnitudes
DEFAULT_QUANTILES = tuple(round(0.80 + 0.01 * i, 2) for i in range(20))


def choose_threshold(magnitudes, candidates: Sequence[float] | None = None, level: float = 0.05,
                     rule: str = "first_accept", min_exceed: int = 50
                     ) -> tuple[float, ThresholdDiagnostics]:
    """The peaks-over-threshold threshold by the Anderson-Darling test of the GPD fit.

    At every candidate threshold ``u`` (default: the 0.80, 0.81, ..., 0.99 quantiles of the
    magnitudes, keeping those with at least ``min_exceed`` exceedances) the GPD is fitted by
    maximum likelihood (:func:`fit_pot`) and its fit tested by the Anderson-Darling ``A^2`` with
    both parameters estimated, whose percentage points Choulakian & Stephens (2001,
    "Goodness-of-fit tests for the generalized Pareto distribution", Technometrics 43(4),
    478-484, Table 2) tabulate against the shape (:func:`ad_critical_value`). Then

    * ``rule="first_accept"`` (default): the lowest candidate the test accepts at ``level``
      (``A^2`` at most the critical value): the sequential use of the test for choosing the
      threshold that Choulakian & Stephens propose (lowest threshold, most data, above which the
      GPD fits);
    * ``rule="forward_stop"``: ForwardStop (Bader, Yan & Zhang 2018, "Automated threshold
      selection for extreme value analysis via ordered goodness-of-fit tests with adjustment for
      false discovery rate", Ann. Appl. Stat. 12(1), 310-329) on the candidates' p-values
      ``p_1..p_m`` in ascending order of threshold: reject the first
      ``k^ = max{k : -(1/k) sum_{i<=k} log(1 - p_i) <= level}`` and take candidate ``k^ + 1``.
      The p-values come from the same table (:func:`ad_p_value`), not the parametric bootstrap
      of Bader et al.; they are clipped to the table's range ``[0.001, 0.5]``, which understates
      ``-log(1 - p)`` for good fits (``p > 0.5``) and so leans towards a higher threshold.

    If every candidate is rejected (large samples reject small departures from the GPD), the one
    with the smallest ``A^2 / critical`` is taken and ``rule`` says so.

    Parameters
    ----------
    magnitudes : array_like
        ``|x|``: non-negative, finite.
    candidates : sequence of float, optional
        Thresholds to try (sorted and deduplicated); default the quantile ladder above.
    level : float
        Significance level, one of the table's (0.5, 0.25, 0.1, 0.05, 0.025, 0.01, 0.005, 0.001);
        for ForwardStop the target false discovery rate.
    rule : {"first_accept", "forward_stop"}
    min_exceed : int
        Fewest exceedances a candidate needs (at least 30).

    Returns
    -------
    (u, ThresholdDiagnostics)
    """
    m = _check_magnitudes(magnitudes)
    if rule not in ("first_accept", "forward_stop"):
        raise ValueError(f"unknown rule {rule!r}; use 'first_accept' or 'forward_stop'")
    lev = float(level)
    if rule == "first_accept":
        ad_critical_value(0.0, lev)  # validates the level against the table
    elif not 0 < lev < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    if int(min_exceed) < MIN_EXCEEDANCES:
        raise ValueError(f"min_exceed must be at least {MIN_EXCEEDANCES}, got {min_exceed}")
    if candidates is None:
        us = np.quantile(m, DEFAULT_QUANTILES)
    else:
        us = np.asarray(candidates, dtype=np.float64).ravel()
        if us.size == 0:
            raise ValueError("candidates are empty")
        if not np.all(np.isfinite(us)) or np.any(us < 0):
            raise ValueError("candidate thresholds must be finite and non-negative")
    # the critical value shown (and used by the fallback) is at ``level`` when the table has it
    crit_level = lev if lev in _CS_P else 0.05
    us = np.unique(us)
    ms = np.sort(m)
    n_exc = ms.size - np.searchsorted(ms, us, side="right")
    keep = n_exc >= int(min_exceed)
    if not np.any(keep):
        raise ValueError(f"no candidate threshold has {min_exceed} exceedances among {m.size} "
                         "magnitudes")
    us, n_exc = us[keep], n_exc[keep]
    rows = []
    for u in us:
        y = ms[ms > u] - u
        try:
            xi, sigma = _gpd_mle(y)
            a2 = anderson_darling(y, xi, sigma)
        except ValueError:
            xi = sigma = a2 = math.nan
        crit = ad_critical_value(xi if math.isfinite(xi) else 0.0, crit_level)
        p = ad_p_value(a2, xi) if math.isfinite(a2) else 0.0
        rows.append((xi, sigma, a2, crit, p))
    xi, sigma, a2, crit, p = (np.array(c, dtype=np.float64) for c in zip(*rows))
    if rule == "first_accept":
        accepted = np.isfinite(a2) & (a2 <= crit)
        idx = np.flatnonzero(accepted)
        chosen = int(idx[0]) if idx.size else -1
    else:
        stat = np.cumsum(-np.log1p(-p)) / np.arange(1, p.size + 1)
        ok = np.flatnonzero(stat <= lev)
        k_hat = int(ok[-1]) + 1 if ok.size else 0  # number of rejected candidates
        accepted = np.arange(p.size) >= k_hat
        chosen = k_hat if k_hat < p.size else -1
    used = rule
    if chosen < 0:
        ratio = np.where(np.isfinite(a2), a2 / crit, np.inf)
        if not np.any(np.isfinite(ratio)):
            raise ValueError("the GPD could not be fitted at any candidate threshold")
        chosen = int(np.argmin(ratio))
        used = f"{rule}: none accepted: least rejected"
    q = np.searchsorted(ms, us, side="right") / ms.size
    diag = ThresholdDiagnostics(us, q, n_exc, xi, sigma, a2, crit, p, accepted, chosen, used, lev)
    return float(us[chosen]), diag


# ---- the body -----------------------------------------------------------------------------------

_SHAPE_BOUNDS = {"gennorm": (math.log(0.2), math.log(20.0)), "student_t": (math.log(1e-3), math.log(398.0))}


def _two_sided_family(name) -> type[Distribution]:
    cls = family_class(name)
    if cls.one_sided:
        raise ValueError(f"{cls.name} is one-sided; a body-tail model needs a symmetric two-sided "
                         "family (gaussian, laplace, generalized_gaussian, student_t)")
    return cls


def _member(cls: type[Distribution], params: np.ndarray) -> Distribution:
    """Family member from the optimiser's ``(log scale[, transformed shape])``."""
    scale = math.exp(float(params[0]))
    if cls.name == "gennorm":
        shape = (math.exp(float(params[1])),)
    elif cls.name == "student_t":
        shape = (2.0 + math.exp(float(params[1])),)
    else:
        shape = ()
    return cls.from_scipy(shape, scale)


def fit_truncated(values, threshold: float, body_family: str = "student_t") -> Distribution:
    """Maximum-likelihood member of a symmetric family for values known to satisfy ``|x| <= u``.

    The likelihood is the truncated one, ``prod_i g(x_i) / P_g(|X| <= u)``, so the fit is not
    biased by the missing tail (a plain fit to the values below ``u`` underestimates the scale).
    Location is fixed at 0 (the grids are centred at 0). The Student-t keeps ``nu`` in
    ``(2, 400]`` and the generalized Gaussian ``beta`` in ``[0.2, 20]``; within ``[-u, u]`` a
    truncated fit identifies the shape only weakly, which matters little there: only the
    density on ``[-u, u]`` is used.

    Parameters
    ----------
    values : array_like
        The values with ``|x| <= threshold`` (others are refused), at least 10, finite.
    threshold : float
        ``u > 0``.
    body_family : str
        A two-sided family of :data:`theory.FAMILIES` (aliases such as ``generalized_gaussian``).
    """
    from scipy import optimize

    cls = _two_sided_family(body_family)
    v = np.asarray(values, dtype=np.float64).ravel()
    u = float(threshold)
    if not (math.isfinite(u) and u > 0):
        raise ValueError(f"threshold must be positive and finite, got {threshold!r}")
    if v.size < 10:
        raise ValueError(f"a body fit needs at least 10 values, got {v.size}")
    if not np.all(np.isfinite(v)):
        raise ValueError("body values contain NaN or inf")
    if np.any(np.abs(v) > u):
        raise ValueError(f"body values must satisfy |x| <= threshold = {u:.6g}")
    rms = float(np.sqrt(np.mean(v * v)))
    if rms == 0:
        raise ValueError("body values are all 0")
    shape0 = {"gennorm": [math.log(2.0)], "student_t": [math.log(8.0)]}.get(cls.name, [])
    x0 = np.array([math.log(rms)] + shape0)
    bounds = [(x0[0] - 12.0, x0[0] + 12.0)] + ([_SHAPE_BOUNDS[cls.name]] if shape0 else [])

    def nll(p):
        d = _member(cls, p)
        lp = np.log(np.maximum(d.pdf(v), 1e-300))
        mass = 1.0 - 2.0 * float(d.tail_moment(0, np.array([u / float(d.scale)]))[0])
        if not mass > 0:
            return 1e300
        return -(float(np.sum(lp)) - v.size * math.log(mass)) / v.size

    best = None
    for start in ([x0] if not shape0 else [x0, np.array([x0[0], bounds[1][1] - 0.5])]):
        res = optimize.minimize(nll, start, method="L-BFGS-B", bounds=bounds,
                                options={"ftol": 1e-13, "gtol": 1e-9, "maxiter": 500})
        if best is None or res.fun < best.fun:
            best = res
    return _member(cls, best.x)


# ---- the site model -----------------------------------------------------------------------------

@dataclass(repr=False, eq=False)
class BodyTail(SiteModel):
    """A symmetric body on ``[-u, u]`` spliced to ``u + GPD`` tails: the density

        f(x) = (1 - p) g(x) / G(u)          for |x| <= u,    G(u) = P_g(|X| <= u),
        f(x) = p/2 h(|x| - u)               for |x| >  u,

    with ``g`` the body family, ``h`` the GPD density and ``p = p_tail = P(|X| > u)`` split evenly
    between the two sides. The density may jump at ``+-u``; nothing below needs it continuous.

    :meth:`mse` is exact on every grid's real levels (docs/design.md): per cell
    ``E[(X - q)^2; a < X < b] = M_2 - 2 q M_1 + q^2 M_0`` with ``M_k`` the cell's moments of the
    spliced density, each a sum of the body's part (differences of its upper partial moments on
    the side of zero where they do not cancel, :func:`theory.site_models.interval_moments`,
    times ``(1 - p)/G(u)``) and the tails' parts (GPD partial moments of ``x - u``, times
    ``p/2``); the outermost cells, when beyond ``u``, use :meth:`GeneralizedPareto.beyond`.
    With more than 256 positive levels the inner cells are integrated by 8-point Gauss-Legendre
    on pieces split at the level, ``0``, ``+-u`` and a bounded tail's end (the closed-form
    differences lose about ``(alpha/step)^2`` there), and a piece whose quadrature misses its
    mass takes the closed form, as in :mod:`theory.mse`. ``aciq`` is the ACIQ model: the exact
    clipping error plus ``alpha^2 / (3 4^M)``.

    Build it from data with :meth:`fit`, or from parts: ``body`` a two-sided theory
    :class:`~theory.distributions.Distribution` (scalar scale), ``tail`` a
    :class:`GeneralizedPareto`, ``threshold`` ``u > 0`` and ``p_tail`` in ``(0, 1)``.
    """

    body: Distribution
    tail: GeneralizedPareto
    threshold: float
    p_tail: float
    name: str = "body_tail"
    pot: PotFit | None = None
    diagnostics: ThresholdDiagnostics | None = None
    _w_body: float = field(init=False, repr=False)
    _w_tail: float = field(init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.body, Distribution):
            raise ValueError(f"body must be a theory distribution, got {self.body!r}")
        _two_sided_family(type(self.body))
        if np.ndim(self.body.scale):
            raise ValueError("body must have a scalar scale")
        if not isinstance(self.tail, GeneralizedPareto):
            raise ValueError(f"tail must be a GeneralizedPareto, got {self.tail!r}")
        u, p = float(self.threshold), float(self.p_tail)
        if not (math.isfinite(u) and u > 0):
            raise ValueError(f"threshold must be positive and finite, got {self.threshold!r}")
        if not (0 < p < 1):
            raise ValueError(f"p_tail must lie in (0, 1), got {self.p_tail!r}")
        self.threshold, self.p_tail = u, p
        g = 1.0 - 2.0 * float(self._body_upper(0, np.array([u]))[0])
        if not g > 0:
            raise ValueError(f"the body {self.body!r} has no mass in [-{u:.6g}, {u:.6g}]")
        self._w_body = (1.0 - p) / g
        self._w_tail = 0.5 * p

    # ---- construction from data ----------------------------------------------------------
    @classmethod
    def fit(cls, x, body_family: str = "student_t", threshold: float | None = None, *,
            level: float = 0.05, rule: str = "first_accept") -> "BodyTail":
        """Fit the model to a site's signed values ``x``.

        ``u`` is :func:`choose_threshold` on ``|x|`` (``level``, ``rule``) unless given; the tail
        is :func:`fit_pot` on ``|x|`` at ``u``; ``p_tail`` the share of ``|x| > u``; the body
        :func:`fit_truncated` of ``body_family`` to the values with ``|x| <= u`` (location 0:
        the model is symmetric about 0, as the grids are). A tail with ``xi >= 1/2`` is refused
        naming xi (its clipping error is infinite).
        """
        v = np.asarray(x, dtype=np.float64).ravel()
        if v.size == 0:
            raise ValueError("x is empty")
        if not np.all(np.isfinite(v)):
            raise ValueError("x contains NaN or inf")
        _two_sided_family(body_family)
        mags = np.abs(v)
        diag = None
        if threshold is None:
            u, diag = choose_threshold(mags, level=level, rule=rule)
        else:
            try:
                u = float(threshold)
            except (TypeError, ValueError):
                raise ValueError(f"threshold must be a number, got {threshold!r}") from None
        if not (math.isfinite(u) and u > 0):
            raise ValueError(f"threshold must be positive and finite, got {u!r}")
        pot = fit_pot(mags, u)
        if pot.xi >= 0.5:
            raise ValueError(f"the tail beyond u = {u:.6g} has GPD shape xi = {pot.xi:.4g} "
                             f"(standard error {pot.xi_se:.2g}) >= 0.5: its second moment, and so "
                             "the clipping error, is infinite; no body-tail model")
        body = fit_truncated(v[mags <= u], u, body_family)
        return cls(body, pot.gpd(), u, pot.p_exceed, pot=pot, diagnostics=diag)

    # ---- the spliced density --------------------------------------------------------------
    def _body_upper(self, k: int, t: np.ndarray) -> np.ndarray:
        sc = float(self.body.scale)
        return np.asarray(self.body.tail_moment(k, np.asarray(t) / sc), dtype=np.float64) * sc**k

    def pdf(self, x) -> np.ndarray:
        """The spliced density at ``x`` (vectorised)."""
        x = np.asarray(x, dtype=np.float64)
        ax = np.abs(x)
        inside = ax <= self.threshold
        out = np.empty(x.shape)
        with np.errstate(invalid="ignore", over="ignore"):
            out[inside] = self._w_body * self.body.pdf(x[inside])
            out[~inside] = self._w_tail * self.tail.pdf(ax[~inside] - self.threshold)
        return out

    def _piece_masses(self, pts: np.ndarray) -> np.ndarray:
        """``P(pts[i] < X < pts[i+1])`` for ascending breakpoints none of whose pieces straddles
        0 or ``+-u``: each from one evaluation of the body's ``U_0`` and the GPD's survival per
        point, differenced on the side of zero where nothing cancels."""
        u = self.threshold
        v = self._body_upper(0, np.abs(np.clip(pts, -u, u)))
        body = np.where(pts[:-1] >= 0, v[:-1] - v[1:], v[1:] - v[:-1])
        r = self.tail.sf(np.maximum(pts, u) - u)
        left = self.tail.sf(np.maximum(-pts, u) - u)
        return self._w_body * body + self._w_tail * ((r[:-1] - r[1:]) + (left[1:] - left[:-1]))

    def _tail_upper(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``int_{u+s}^inf x^k p/2 h(x - u) dx`` for ``k = 0, 1, 2`` (``s >= 0``, inf allowed)."""
        u, tl = self.threshold, self.tail
        p0, p1, p2 = (tl.partial_moment(k, s) for k in range(3))
        w = self._w_tail
        return w * p0, w * (p1 + u * p0), w * (p2 + u * (2.0 * p1 + u * p0))

    def interval_moments(self, a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(M_0, M_1, M_2)``, ``M_k = int_a^b x^k f(x) dx`` of the spliced density (``a <= b``,
        infinities allowed): the body's part over ``[a, b] & [-u, u]`` and each tail's part."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
        u = self.threshold
        ba, bb = np.clip(a, -u, u), np.clip(b, -u, u)
        m_body = interval_moments(self.body, ba, bb)
        out = [self._w_body * m_body[k] for k in range(3)]
        # right tail over [max(a, u), max(b, u)]
        lo_r, hi_r = np.maximum(a, u) - u, np.maximum(b, u) - u
        up_lo, up_hi = self._tail_upper(lo_r), self._tail_upper(hi_r)
        # left tail over [min(a, -u), min(b, -u)], mirrored onto the right
        lo_l, hi_l = -np.minimum(b, -u) - u, -np.minimum(a, -u) - u
        ul_lo, ul_hi = self._tail_upper(lo_l), self._tail_upper(hi_l)
        for k in range(3):
            sign = -1.0 if k == 1 else 1.0
            out[k] = out[k] + (up_lo[k] - up_hi[k]) + sign * (ul_lo[k] - ul_hi[k])
        return out[0], out[1], out[2]

    @property
    def variance(self) -> float:
        """``E[X^2]`` of the spliced density (its mean is 0)."""
        return float(self.interval_moments(-np.inf, np.inf)[2])

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def sample(self, n: int, seed: int | np.random.Generator | None = None) -> np.ndarray:
        """``n`` draws from the spliced density (body by its truncated inverse cdf)."""
        rng = np.random.default_rng(seed)
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        frozen = self.body.scipy
        lo, hi = float(frozen.cdf(-self.threshold)), float(frozen.cdf(self.threshold))
        in_tail = rng.random(n) < self.p_tail
        out = np.empty(n)
        nb = int(np.count_nonzero(~in_tail))
        out[~in_tail] = frozen.ppf(lo + (hi - lo) * rng.random(nb))
        nt = n - nb
        y = self.tail.isf(1.0 - rng.random(nt))  # 1 - U lies in (0, 1]
        out[in_tail] = np.where(rng.random(nt) < 0.5, -1.0, 1.0) * (self.threshold + y)
        return out

    # ---- the MSE ------------------------------------------------------------------------------
    def _beyond(self, e: np.ndarray, q: np.ndarray) -> np.ndarray:
        """``int_e^inf (x - q)^2 f(x) dx`` for ``e >= u`` (cancellation-free)."""
        u = self.threshold
        return self._w_tail * self.tail.beyond(e - u, e - q)

    def _cell(self, lo, hi, q) -> np.ndarray:
        m0, m1, m2 = self.interval_moments(lo, hi)
        return m2 - 2.0 * q * m1 + q * (q * m0)

    def _clip_up(self, e: np.ndarray, q: np.ndarray) -> np.ndarray:
        """``int_e^inf (x - q)^2 f`` for any ``e`` (the outermost positive cell)."""
        out = self._cell(e, np.full_like(e, np.inf), q)
        far = e >= self.threshold
        if np.any(far):
            out = np.where(far, self._beyond(np.where(far, e, self.threshold), q), out)
        return out

    def _inner_quadrature(self, alpha: float, q: np.ndarray, e: np.ndarray) -> float:
        """Sum over the inner cells (finite edges) of ``int (x - q_j)^2 f`` by Gauss-Legendre on
        pieces split at levels, edges, 0, +-u and a bounded tail's end."""
        u = self.threshold
        edges = e[1:-1] * alpha  # finite edges, ascending
        lv = q[1:-1] * alpha     # levels of the inner cells
        lo, hi = edges[0], edges[-1]
        special = np.array([-u - self.tail.upper_end, -u, 0.0, u, u + self.tail.upper_end])
        special = special[np.isfinite(special) & (special > lo) & (special < hi)]
        pts = np.unique(np.concatenate([edges, lv, special]))
        a, b = pts[:-1], pts[1:]
        mid = 0.5 * (a + b)
        cell = np.clip(np.searchsorted(edges, mid, side="right") - 1, 0, lv.size - 1)
        qq = lv[cell]
        half = 0.5 * (b - a)
        x = mid[:, None] + half[:, None] * _GL_NODES[None, :]
        fx = self.pdf(x)
        fx = np.where(np.isfinite(fx), fx, 0.0)
        dx = x - qq[:, None]
        val = half * ((dx * (dx * fx)) @ _GL_WEIGHTS)
        mass = half * (fx @ _GL_WEIGHTS)
        m0 = self._piece_masses(pts)
        bad = np.abs(mass - m0) > 1e-9 * np.abs(m0) + 1e-300
        if np.any(bad):
            val[bad] = self._cell(a[bad], b[bad], qq[bad])
        return float(np.sum(val))

    def mse(self, alpha, bits: int, grid: Grid | str = "int") -> np.ndarray:
        """Exact expected MSE at every ``alpha`` (array; shaped like ``alpha``) on ``grid``."""
        g = Grid.parse(grid)
        m = check_bits(bits, g)
        if g.one_sided:
            raise ValueError(f"grid {g.value!r} is one-sided; the body-tail model is two-sided")
        al = check_alpha(alpha)
        flat = al.ravel()
        if g is Grid.ACIQ:
            clip = self._clip_up(flat, flat)
            out = 2.0 * clip + flat * (flat / (3.0 * 4.0**m))
            return out.reshape(al.shape)
        f, kmin, kmax, off = step_factor(g, m)
        q = (np.arange(kmin, kmax + 1, dtype=np.float64) + off) * f
        e = np.concatenate([[-np.inf], 0.5 * (q[1:] + q[:-1]), [np.inf]])
        # outermost cells: beyond the last finite edge on each side (mirrored onto the right)
        top = self._clip_up(e[-2] * flat, q[-1] * flat)
        bottom = self._clip_up(-e[1] * flat, -q[0] * flat)
        out = top + bottom
        n_pos = int(np.count_nonzero(q >= 0))
        if q.size > 2:
            if n_pos > _QUADRATURE_LEVELS:
                out = out + np.array([self._inner_quadrature(float(a), q, e) for a in flat])
            else:
                qi, lo_u, hi_u = q[1:-1], e[1:-2], e[2:-1]
                rows = max(1, _CHUNK // qi.size)
                for s in range(0, flat.size, rows):
                    a = flat[s:s + rows, None]
                    out[s:s + rows] += np.sum(self._cell(lo_u * a, hi_u * a, qi * a), axis=1)
        return np.maximum(out, 0.0).reshape(al.shape)

    def alpha_range(self) -> tuple[float, float]:
        """``(1e-3 sd, max(1e3 sd, 10 (u + reach)))`` with ``sd`` the body's standard deviation
        and ``reach`` the tail's ``1 - 1e-9`` quantile (a bounded tail: its end)."""
        sd = float(self.body.std)
        reach = self.tail.upper_end if self.tail.xi < 0 else float(self.tail.isf(1e-9))
        return 1e-3 * sd, max(1e3 * sd, 10.0 * (self.threshold + reach))

    def __repr__(self) -> str:
        return (f"<BodyTail body={self.body!r} u={self.threshold:.6g} p_tail={self.p_tail:.4g} "
                f"tail=GPD(xi={self.tail.xi:.4g}, sigma={self.tail.sigma:.4g})>")
