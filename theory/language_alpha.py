"""Language-aware clipping (LA-ACIQ): what one global alpha costs each language.

A layer's input has a different distribution for each language ``l`` (weights ``w_l`` of the
calibration text, e.g. its share of tokens). The quantization MSE of a mixture is the mixture of
the MSEs, because MSE(alpha) is linear in the density:

    MSE_mix(alpha) = sum_l w_l MSE_l(alpha),

so the alpha a user calibrating on the pooled text gets is ``alpha_mix = argmin MSE_mix``. What
language ``l`` pays for it is its *penalty*

    pi_l(alpha) = MSE_l(alpha) / MSE_l(alpha*_l) - 1 >= 0,

the relative excess over its own optimum. Two language-aware choices:

* ``minimax``: ``argmin_alpha max_l pi_l(alpha)``, the alpha whose worst-off language pays least;
* ``weighted``: ``argmin_alpha sum_l v_l pi_l(alpha)`` with fairness weights ``v_l`` (equal by
  default), which unlike the token-weighted mix compares languages in *relative* MSE, so a
  language with small activations or few tokens is not ignored.

All of them lie in ``[min_l alpha*_l, max_l alpha*_l]`` (each MSE_l falls below its optimum and
rises above it), which is where they are searched; ``alpha_mix`` solves ``sum_l w_l dMSE_l/dalpha
= 0`` by Brent's method on the exact derivative (:func:`theory.mse_derivative`).

Closed form. On the ``aciq`` grid the Laplace penalty is elementary in ``u = alpha / b``:
``pi(u) = (2 z e^{-u} + u^2) / (W (W + 2)) - 1`` with ``z = 3 * 4^M`` and ``W = W_0(z)`` (Lambert
W), derived by sympy in :func:`laplace_penalty_expr`; for every family the ACIQ-grid penalty is
the ratio of two closed-form MSEs (:func:`aciq_penalty_expr`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from theory.distributions import Distribution, Laplace
from theory.grids import Grid, check_bits
from theory.mse import aciq_mse_expr, expected_mse, mse_derivative
from theory.optimal import _brentq, optimal_alpha

__all__ = ["LanguageAlphas", "mixture_mse", "mixture_alpha", "alpha_penalty", "minimax_alpha",
           "weighted_alpha", "language_alphas", "aciq_penalty_expr", "laplace_penalty_expr"]


def _is_site(d) -> bool:
    from theory.site_models import SiteModel

    return isinstance(d, SiteModel)


def _mse(d, alpha, bits: int, grid) -> np.ndarray:
    """The MSE of a Distribution or a site model (theory.site_models) at ``alpha``."""
    if isinstance(d, Distribution):
        return np.asarray(expected_mse(d, alpha, bits, grid), dtype=np.float64)
    return np.asarray(d.mse(alpha, bits, grid), dtype=np.float64)


def _alpha_star(d, bits: int, grid) -> float:
    if isinstance(d, Distribution):
        return float(optimal_alpha(d, bits, grid))
    return float(d.optimal_alpha(bits, grid))


def _check_dists(dists) -> tuple[list[str], list]:
    if isinstance(dists, Mapping):
        names, ds = [str(k) for k in dists], list(dists.values())
    else:
        ds = list(dists)
        names = [str(i) for i in range(len(ds))]
    if not ds:
        raise ValueError("no languages given: need at least one distribution")
    for n, d in zip(names, ds):
        if not isinstance(d, Distribution):
            if _is_site(d):  # a site model (channel mixture, body + tail, ...): two-sided
                continue
            raise TypeError(f"language {n!r}: expected a theory Distribution or a site model "
                            f"(theory.site_models), got {type(d).__name__}")
        if np.ndim(d.scale) != 0:
            raise ValueError(f"language {n!r}: scale must be a scalar, got shape {np.shape(d.scale)}")
    sides = {getattr(d, "one_sided", False) if isinstance(d, Distribution) else False for d in ds}
    if len(sides) > 1:
        raise ValueError("mixing one-sided and signed distributions: a layer's input is either "
                         "non-negative in every language or signed in every language")
    return names, ds


def _check_weights(weights, n: int, what: str) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.size != n:
        raise ValueError(f"{what}: got {w.size} weights for {n} languages")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{what} contain NaN or inf")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"{what} must be non-negative with a positive sum, got {w.tolist()}")
    return w / w.sum()


def _weights_of(weights, names: list[str], what: str) -> np.ndarray:
    if isinstance(weights, Mapping):
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"{what}: no weight for {missing}")
        weights = [weights[n] for n in names]
    return _check_weights(weights, len(names), what)


def mixture_mse(dists, alpha, bits: int, grid: Grid | str = "int", weights=None) -> np.ndarray | float:
    """``sum_l w_l MSE_l(alpha)``: the exact MSE on the mixture of the languages' distributions.

    Parameters
    ----------
    dists : mapping language -> Distribution, or sequence
    alpha : float or array_like
        Clipping thresholds (data units).
    weights : sequence or mapping, optional
        Mixture weights (normalised; default equal).
    """
    names, ds = _check_dists(dists)
    w = _weights_of(weights, names, "mixture weights")
    out = sum(wi * _mse(d, alpha, bits, grid) for wi, d in zip(w, ds))
    return float(out) if np.ndim(out) == 0 else out


def alpha_penalty(dist: Distribution, alpha, bits: int, grid: Grid | str = "int") -> np.ndarray | float:
    """``MSE(alpha) / MSE(alpha*) - 1``: the relative MSE excess of clipping at ``alpha``."""
    a_star = _alpha_star(dist, bits, grid)
    best = float(_mse(dist, a_star, bits, grid))
    out = _mse(dist, alpha, bits, grid) / best - 1.0
    # alpha* is a numerical minimum: tiny negative values are rounding, not a better alpha
    out = np.maximum(out, 0.0)
    return float(out) if out.ndim == 0 else out


def _bracket(ds, bits, grid) -> tuple[float, float, np.ndarray]:
    stars = np.array([_alpha_star(d, bits, grid) for d in ds], dtype=np.float64)
    return float(stars.min()), float(stars.max()), stars


def _minimise(f, lo: float, hi: float) -> float:
    """Minimise a function that is unimodal on ``[lo, hi]``: a vectorised scan (``f`` takes an
    array of alphas), then bounded Brent on the bracket around the best point of the scan."""
    if hi <= lo * (1 + 1e-12):
        return lo
    xs = np.linspace(lo, hi, 65)
    ys = np.asarray(f(xs), dtype=np.float64)
    i = int(np.argmin(ys))
    a, b = xs[max(i - 1, 0)], xs[min(i + 1, xs.size - 1)]
    from scipy import optimize  # 0.3 s to import: only when a language-aware alpha is asked for

    res = optimize.minimize_scalar(lambda x: float(f(np.array([x]))[0]), bounds=(a, b), method="bounded",
                                   options={"xatol": 1e-12 * hi, "maxiter": 500})
    return float(res.x) if res.fun <= ys[i] else float(xs[i])


def _mse_matrix(ds, alphas, bits, grid) -> np.ndarray:
    """``[language, alpha]`` exact MSE."""
    return np.array([np.atleast_1d(_mse(d, alphas, bits, grid)) for d in ds], dtype=np.float64)


def mixture_alpha(dists, bits: int, grid: Grid | str = "int", weights=None) -> float:
    """The MSE-optimal alpha of the calibration mix: root of ``sum_l w_l dMSE_l/dalpha``."""
    names, ds = _check_dists(dists)
    w = _weights_of(weights, names, "mixture weights")
    lo, hi, _ = _bracket(ds, bits, grid)
    if hi <= lo * (1 + 1e-12):
        return lo
    if not all(isinstance(d, Distribution) for d in ds):  # site models: no closed-form derivative
        return _minimise(lambda a: w @ _mse_matrix(ds, a, bits, grid), lo, hi)

    def deriv(a):
        return sum(wi * float(mse_derivative(d, a, bits, grid)) for wi, d in zip(w, ds))

    d_lo, d_hi = deriv(lo), deriv(hi)
    if d_lo < 0 < d_hi:
        return float(_brentq(deriv, lo, hi, xtol=1e-13 * hi, rtol=4 * np.finfo(float).eps))
    # derivative does not change sign inside (a weight of 0, or a flat MSE): minimise directly
    return _minimise(lambda a: w @ _mse_matrix(ds, a, bits, grid), lo, hi)


def minimax_alpha(dists, bits: int, grid: Grid | str = "int") -> float:
    """``argmin_alpha max_l (MSE_l(alpha) / MSE_l(alpha*_l) - 1)``: the worst language's
    relative MSE excess made as small as possible."""
    _, ds = _check_dists(dists)
    lo, hi, stars = _bracket(ds, bits, grid)
    best = np.array([float(_mse(d, a, bits, grid)) for d, a in zip(ds, stars)])[:, None]
    return _minimise(lambda a: np.max(_mse_matrix(ds, a, bits, grid) / best, axis=0), lo, hi)


def weighted_alpha(dists, bits: int, grid: Grid | str = "int", weights=None) -> float:
    """``argmin_alpha sum_l v_l (MSE_l(alpha) / MSE_l(alpha*_l) - 1)`` with fairness weights
    ``v_l`` (default equal): every language counted in relative MSE."""
    names, ds = _check_dists(dists)
    v = _weights_of(weights, names, "fairness weights")
    lo, hi, stars = _bracket(ds, bits, grid)
    best = np.array([float(_mse(d, a, bits, grid)) for d, a in zip(ds, stars)])[:, None]
    return _minimise(lambda a: v @ (_mse_matrix(ds, a, bits, grid) / best), lo, hi)


@dataclass
class LanguageAlphas:
    """Per-language optima and the cost of shared clipping for one layer.

    Attributes
    ----------
    languages : list of str
    alpha_star : numpy.ndarray
        Each language's own MSE-optimal alpha.
    mse_star : numpy.ndarray
        Its MSE there.
    mix_weights, fair_weights : numpy.ndarray
        Calibration-mix weights (token shares) and fairness weights, normalised.
    alpha : dict
        ``{"mix": ..., "minimax": ..., "weighted": ...}``.
    penalty : dict of numpy.ndarray
        ``penalty[choice][l]`` = ``MSE_l(alpha[choice]) / mse_star[l] - 1``.
    """

    languages: list[str]
    bits: int
    grid: str
    alpha_star: np.ndarray
    mse_star: np.ndarray
    mix_weights: np.ndarray
    fair_weights: np.ndarray
    alpha: dict[str, float] = field(default_factory=dict)
    penalty: dict[str, np.ndarray] = field(default_factory=dict)

    def worst(self, choice: str) -> tuple[str, float]:
        """The language paying the largest penalty under ``choice``, and that penalty."""
        p = self.penalty[choice]
        i = int(np.argmax(p))
        return self.languages[i], float(p[i])

    def to_dict(self) -> dict:
        return {"languages": self.languages, "bits": self.bits, "grid": self.grid,
                "alpha_star": dict(zip(self.languages, self.alpha_star.tolist())),
                "mse_star": dict(zip(self.languages, self.mse_star.tolist())),
                "mix_weights": dict(zip(self.languages, self.mix_weights.tolist())),
                "fair_weights": dict(zip(self.languages, self.fair_weights.tolist())),
                "alpha": dict(self.alpha),
                "penalty": {c: dict(zip(self.languages, p.tolist())) for c, p in self.penalty.items()}}


def language_alphas(dists, bits: int, grid: Grid | str = "int", mix_weights=None,
                    fair_weights=None) -> LanguageAlphas:
    """Everything of this module for one layer.

    Parameters
    ----------
    dists : mapping language -> Distribution or site model
        Each language's fitted distribution of the layer's input (or weights), or its site model
        (``theory.site_models``: a channel mixture, bulk plus outliers, body plus tail).
    bits : int
    grid : str
    mix_weights : sequence or mapping, optional
        Weights of the calibration mix (e.g. token counts); default equal.
    fair_weights : sequence or mapping, optional
        Weights of the ``weighted`` choice; default equal.

    Examples
    --------
    >>> from theory import Laplace, language_alphas
    >>> r = language_alphas({"en": Laplace(1.0), "he": Laplace(2.0)}, 4, "aciq", mix_weights=[9, 1])
    >>> round(r.alpha["mix"], 3) < round(r.alpha["minimax"], 3)
    True
    """
    names, ds = _check_dists(dists)
    g = Grid.parse(grid)
    check_bits(bits, g)
    w = _weights_of(mix_weights, names, "mixture weights")
    v = _weights_of(fair_weights, names, "fairness weights")
    stars = np.array([_alpha_star(d, bits, g) for d in ds], dtype=np.float64)
    best = np.array([float(_mse(d, a, bits, g)) for d, a in zip(ds, stars)])
    alpha = {"mix": mixture_alpha(ds, bits, g, w), "minimax": minimax_alpha(ds, bits, g),
             "weighted": weighted_alpha(ds, bits, g, v)}
    penalty = {c: np.maximum(np.array([float(_mse(d, a, bits, g)) for d in ds]) / best - 1.0, 0.0)
               for c, a in alpha.items()}
    return LanguageAlphas(names, int(bits), g.value, stars, best, w, v, alpha, penalty)


# ---- closed forms --------------------------------------------------------------------------

def aciq_penalty_expr(cls: type[Distribution]) -> tuple[sp.Expr, sp.Symbol, sp.Symbol, sp.Symbol]:
    """Symbolic ACIQ-grid penalty of family ``cls`` on unit scale:
    ``MSE(alpha) / MSE(alpha_star) - 1``; returns ``(expr, alpha, alpha_star, M)``."""
    import sympy as sp
    mse, a, M = aciq_mse_expr(cls)
    a_star = sp.Symbol("alpha_star", positive=True)
    return mse / mse.subs(a, a_star) - 1, a, a_star, M


def laplace_penalty_expr() -> tuple[sp.Expr, sp.Symbol, sp.Symbol]:
    """The Laplace ACIQ-grid penalty in closed form, ``u = alpha / b``.

    sympy: ``MSE(u) = 2 e^{-u} + u^2 / z`` (``z = 3 * 4^M``), its minimiser ``u* = W(z)``
    (``theory.derivations.laplace_aciq``), and ``e^{-W} = W / z`` turns ``MSE(u*)`` into
    ``W (W + 2) / z``. Returns ``(expr, u, M)``.
    """
    import sympy as sp
    mse, a, M = aciq_mse_expr(Laplace)
    u = sp.Symbol("u", positive=True)
    z = 3 * 4**M
    W = sp.LambertW(z)
    m_u = sp.simplify(mse.subs(a, u))
    m_star = sp.simplify(m_u.subs(u, W).subs(sp.exp(-W), W / z))
    return sp.simplify(m_u / m_star - 1), u, M
