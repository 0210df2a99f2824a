"""Maximum-likelihood fits of the docs/design.md distribution families to weights and activations.

Each fit is a scipy.stats maximum-likelihood estimate on (a seeded subsample of) the data, made
by the family's class (``theory.FAMILIES``, :meth:`theory.Distribution.fit`), which also maps
scipy's parameters to theory's and knows whether the family is one-sided; this module loops over
the families and compares them. Today's families:

==============  =======================  ======================================================
family          scipy.stats              theory object (:meth:`FitResult.to_theory`)
==============  =======================  ======================================================
``gaussian``    ``norm``                 ``Gaussian(sigma)``
``laplace``     ``laplace``              ``Laplace(b)``
``gennorm``     ``gennorm``              ``GeneralizedGaussian(beta, scale)``
``student_t``   ``t``                    ``StudentT(nu, scale)``
``lognormal``   ``lognorm`` (loc = 0)    ``Lognormal(mu, sigma)`` (one-sided, x > 0)
==============  =======================  ======================================================

Models are compared by AIC = 2k - 2 ln L and BIC = k ln n - 2 ln L (Schwarz 1978), k the number
of free parameters, and by the Kolmogorov-Smirnov distance sup |F_n - F|. The data's excess
kurtosis (Fisher's definition, moment estimate on all data) is reported
alongside, since it is the quantity that ties the families together (docs/design.md), with
statsmodels' quantile-based (robust) kurtosis measures of the fitted sample in ``extra``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from theory.distributions import FAMILIES, Distribution, family as _family

__all__ = ["FitResult", "fit_languages", "theory_distribution", "FAMILIES_SIGNED", "FAMILIES_ONE_SIDED", "fit", "fit_all", "best_fit", "best_theory_fit", "first_theory_fit",
           "subsample", "excess_kurtosis", "robust_excess_kurtosis"]

#: names of the two-sided and one-sided families, in ``theory.FAMILIES`` order
FAMILIES_SIGNED = tuple(n for n, c in FAMILIES.items() if not c.one_sided)
FAMILIES_ONE_SIDED = tuple(n for n, c in FAMILIES.items() if c.one_sided)
MIN_SAMPLES = 20


@dataclass
class FitResult:
    """One maximum-likelihood fit.

    Attributes
    ----------
    family : str
        Family name (the ``name`` of the theory class).
    params : dict
        Shape and scale parameters in theory's parametrisation (``sigma``, ``b``,
        ``beta``/``scale``, ``nu``/``scale``, ``mu``/``sigma``).
    loc : float
        Fitted (or fixed) location; 0 for lognormal.
    loglik, aic, bic : float
        Log-likelihood on the fitted sample and the information criteria.
    ks : float
        Kolmogorov-Smirnov distance between the fitted sample and the fitted CDF.
    excess_kurtosis : float
        Excess kurtosis of the data (all of it, not only the subsample).
    n : int
        Number of samples the fit used.
    n_total : int
        Number of values in the data.
    """

    family: str
    params: dict[str, float]
    loc: float
    loglik: float
    aic: float
    bic: float
    ks: float
    excess_kurtosis: float
    n: int
    n_total: int = 0
    k: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_theory(self):
        """The theory distribution with these parameters (location dropped: data centred)."""
        return theory_distribution(self.family, self.params)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "params": dict(self.params), "loc": self.loc,
                "loglik": self.loglik, "aic": self.aic, "bic": self.bic, "ks": self.ks,
                "excess_kurtosis": self.excess_kurtosis, "n": self.n, "n_total": self.n_total,
                "k": self.k, **self.extra}


def theory_distribution(family: str, params: dict) -> Distribution:
    """The ``theory`` distribution of a fitted ``family`` with ``params`` (as in
    :attr:`FitResult.params`), e.g. from a stored fit."""
    return _family(family).from_params(params)


def _family_name(name: str) -> str:
    return _family(name).name


def _as_data(x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"data must be numeric, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError("data is empty")
    if arr.size < MIN_SAMPLES:
        raise ValueError(f"need at least {MIN_SAMPLES} values to fit a distribution, got {arr.size}")
    return arr


def _check_max_samples(max_samples) -> None:
    """``max_samples`` is None (all values) or an integer of at least :data:`MIN_SAMPLES`: a
    subsample below the fit minimum would pass the data check and fit a handful of values."""
    if max_samples is None:
        return
    if isinstance(max_samples, bool) or not isinstance(max_samples, numbers.Integral):
        raise ValueError(f"max_samples must be an integer or None, got {max_samples!r}")
    if max_samples < MIN_SAMPLES:
        raise ValueError(f"max_samples must be >= {MIN_SAMPLES} (the fit minimum), got {int(max_samples)}")


def _check_spread(arr: np.ndarray, y: np.ndarray, seed: int) -> None:
    """Refuse data whose values are all equal: every scale estimate is 0 (or rounding noise), so
    the Gaussian and Laplace log-likelihoods are NaN and a Student-t with a scale of 1e-25 "wins".
    Checked on all of ``arr`` and on the subsample ``y`` actually fitted."""
    lo, hi = np.min(arr), np.max(arr)
    if lo == hi:
        raise ValueError(f"x has zero spread (all {arr.size} values equal {float(lo)!r}): "
                         "no distribution fits it")
    if y.min() == y.max():
        raise ValueError(f"x's subsample of {y.size} values (seed {seed}) has zero spread (all equal "
                         f"{float(y[0])!r}) though x has not: raise max_samples or pass max_samples=None")


def subsample(x, max_samples: int | None = 200_000, seed: int = 0) -> np.ndarray:
    """A seeded uniform subsample without replacement, as float64 (the whole array if small).

    Indices are drawn without materialising a permutation of the full array, and the values are
    gathered by multi-index, so a huge (even non-contiguous) tensor is never copied whole.
    ``max_samples`` is None (all values) or an integer >= :data:`MIN_SAMPLES`.
    """
    _check_max_samples(max_samples)
    arr = _as_data(x)
    n = arr.size
    if max_samples is None or n <= int(max_samples):
        out = np.asarray(arr, dtype=np.float64).ravel()
    else:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(n, size=int(max_samples), replace=False))
        out = np.asarray(arr[np.unravel_index(idx, arr.shape)], dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError("data contains NaN or infinite values")
    return out


def excess_kurtosis(x, chunk: int = 1 << 22) -> float:
    """Excess kurtosis ``m4 / m2^2 - 3`` of all of ``x`` (float64, chunked; no full copy)."""
    arr = np.asarray(x).ravel()  # a view for contiguous input
    n = arr.size
    if n == 0:
        raise ValueError("data is empty")
    s1 = 0.0
    for i in range(0, n, chunk):
        s1 += float(np.sum(arr[i:i + chunk], dtype=np.float64))
    mean = s1 / n
    m2 = m4 = 0.0
    for i in range(0, n, chunk):
        d = arr[i:i + chunk].astype(np.float64) - mean
        d2 = d * d
        m2 += float(d2.sum())
        m4 += float((d2 * d2).sum())
    if not math.isfinite(m4):
        raise ValueError("data contains NaN or infinite values")
    if m2 == 0.0:
        return float("nan")
    m2 /= n
    m4 /= n
    return m4 / (m2 * m2) - 3.0


def robust_excess_kurtosis(y: np.ndarray) -> dict[str, float]:
    """Quantile-based kurtosis measures of ``y`` (statsmodels ``robust_kurtosis``), excess over
    the normal: Moors' octile measure and Crow-Siddiqui's. Unlike the moment estimate they do
    not hinge on a few extreme weights (Kim & White 2004)."""
    from statsmodels.stats.stattools import robust_kurtosis

    _kr1, kr2, _kr3, kr4 = robust_kurtosis(np.asarray(y, dtype=np.float64))
    return {"moors": float(kr2), "crow_siddiqui": float(kr4)}


def _fit_sample(family: str, y: np.ndarray, fix_loc: bool, kurt: float, n_total: int,
                robust: dict[str, float] | None = None) -> FitResult:
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mle = _family(family).fit(y, fix_loc)
        frozen = mle.scipy()
        loglik = float(np.sum(frozen.logpdf(y)))
        # only the statistic is used: skip the exact p-value's cost
        ks = float(stats.kstest(y, frozen.cdf, method="asymp").statistic)
    n, k = y.size, mle.k
    return FitResult(family=mle.family, params=mle.params, loc=mle.loc, loglik=loglik,
                     aic=2 * k - 2 * loglik, bic=k * math.log(n) - 2 * loglik, ks=ks,
                     excess_kurtosis=kurt, n=n, n_total=n_total, k=k,
                     extra={"robust_excess_kurtosis": robust} if robust else {})


def fit(x, family: str, fix_loc: bool = False, max_samples: int | None = 200_000,
        seed: int = 0) -> FitResult:
    """Maximum-likelihood fit of one family to ``x``.

    Parameters
    ----------
    x : array_like
        Data of any shape (flattened).
    family : str
        ``gaussian``, ``laplace``, ``gennorm``, ``student_t`` or ``lognormal``.
    fix_loc : bool
        Fix the location at 0 (symmetric quantizers are centred at 0) instead of fitting it.
        Ignored for lognormal, whose location is always 0.
    max_samples : int or None
        Fit on a seeded subsample of at most this many values (None: all); at least
        ``MIN_SAMPLES`` (20).
    seed : int
        Seed of the subsample.
    """
    cls = _family(family)
    arr = _as_data(x)
    y = subsample(arr, max_samples, seed)
    # All values, not only the subsample: one negative weight means the wrong model.
    cls.check_support(arr)
    _check_spread(arr, y, seed)
    return _fit_sample(cls.name, y, fix_loc, excess_kurtosis(arr), arr.size, robust_excess_kurtosis(y))


def fit_all(x, families=None, one_sided: bool = False, max_samples: int | None = 200_000,
            seed: int = 0, fix_loc: bool = False) -> list[FitResult]:
    """Fit every family and return the results sorted by BIC (best first).

    Parameters
    ----------
    x : array_like
        Data. With ``one_sided=True`` it must be strictly positive (pass ``np.abs(x)`` to fit the
        magnitudes of signed data).
    families : sequence of str, optional
        Default: gaussian, laplace, gennorm, student_t (signed) or lognormal (one-sided).
    one_sided : bool
        Fit the one-sided families.
    max_samples, seed, fix_loc
        As in :func:`fit`; every family sees the same subsample, so likelihoods compare.
    """
    arr = _as_data(x)
    fams = [_family_name(f) for f in (families if families is not None else
                                      (FAMILIES_ONE_SIDED if one_sided else FAMILIES_SIGNED))]
    if not fams:
        raise ValueError("no families to fit")
    y = subsample(arr, max_samples, seed)
    for f in fams:
        _family(f).check_support(arr)
    _check_spread(arr, y, seed)
    kurt = excess_kurtosis(arr)
    robust = robust_excess_kurtosis(y)
    results = [_fit_sample(f, y, fix_loc, kurt, arr.size, robust) for f in fams]
    results.sort(key=lambda r: (r.bic if math.isfinite(r.bic) else math.inf))
    return results


def best_fit(x, criterion: str = "bic", **kwargs) -> FitResult:
    """The best of :func:`fit_all` by ``bic``, ``aic`` or ``ks`` (smallest wins)."""
    crit = str(criterion).lower()
    if crit not in ("bic", "aic", "ks"):
        raise ValueError(f"criterion must be 'bic', 'aic' or 'ks', got {criterion!r}")
    res = fit_all(x, **kwargs)
    return min(res, key=lambda r: (getattr(r, crit) if math.isfinite(getattr(r, crit)) else math.inf))


def first_theory_fit(fits: Sequence[FitResult]) -> tuple[FitResult | None, Any, list[dict]]:
    """The first fit (in the given order, e.g. by BIC) that theory can quantize.

    A Student-t fit with ``nu <= 2`` has infinite variance and no finite clipping MSE, so theory
    refuses it and the next family is used. Returns ``(fit, distribution, skipped)`` with
    ``skipped`` listing the refused families and why; ``(None, None, skipped)`` if none fits.
    """
    skipped = []
    for f in fits:
        try:
            return f, f.to_theory(), skipped
        except ValueError as exc:
            skipped.append({"family": f.family, "reason": str(exc)})
    return None, None, skipped


def best_theory_fit(x, **kwargs) -> tuple[FitResult, Any]:
    """:func:`fit_all` then :func:`first_theory_fit`; returns ``(fit, distribution)``."""
    fit, dist, skipped = first_theory_fit(fit_all(x, **kwargs))
    if fit is None:
        raise ValueError(f"no fitted family has a finite-variance theory form: {skipped}")
    return fit, dist


def fit_languages(samples, min_samples: int = 200, **kwargs) -> dict[str, tuple[FitResult, Any]]:
    """:func:`best_theory_fit` of each language's sample of one layer.

    Parameters
    ----------
    samples : mapping language -> array_like
        E.g. the reservoir samples of :mod:`empirical.capture` for one site.
    min_samples : int
        Fewer values than this for any language is an error naming it (a fit on a handful of
        activations would be noise).
    **kwargs
        Passed to :func:`fit_all` (``max_samples``, ``seed``, ``fix_loc``, ``families``).

    Returns
    -------
    dict language -> (FitResult, theory distribution)
    """
    if not samples:
        raise ValueError("no languages given")
    out = {}
    for lang, x in samples.items():
        n = np.asarray(x).size
        if n < max(min_samples, MIN_SAMPLES):
            raise ValueError(f"language {lang!r} has {n} samples; need at least {max(min_samples, MIN_SAMPLES)}")
        try:
            out[str(lang)] = best_theory_fit(x, **kwargs)
        except ValueError as exc:
            raise ValueError(f"language {lang!r}: {exc}") from exc
    return out
