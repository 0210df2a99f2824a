"""Distribution fits (empirical.fits): parameter recovery, model choice, errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats

import theory
from empirical.fits import (
    FAMILIES_ONE_SIDED,
    FAMILIES_SIGNED,
    best_fit,
    best_theory_fit,
    excess_kurtosis,
    fit,
    fit_all,
    subsample,
    theory_distribution,
)

N = 20_000


def _rvs(frozen, n=N, seed=0):
    return frozen.rvs(size=n, random_state=np.random.default_rng(seed))


# Identifiable cases: Laplace vs gennorm(beta=1) would be the same model, so the gennorm case
# uses beta far from 1 and 2 and the Student-t case a small nu.
CASES = [
    ("gaussian", stats.norm(0, 0.02), {"sigma": 0.02}),
    ("laplace", stats.laplace(0, 0.5), {"b": 0.5}),
    ("gennorm", stats.gennorm(0.5, 0, 1.5), {"beta": 0.5, "scale": 1.5}),
    ("student_t", stats.t(3.0, 0, 2.0), {"nu": 3.0, "scale": 2.0}),
]


@pytest.mark.parametrize("family, frozen, params", CASES, ids=[c[0] for c in CASES])
def test_recovers_parameters_and_family(family, frozen, params):
    x = _rvs(frozen)
    res = fit_all(x, fix_loc=True)
    assert [r.bic for r in res] == sorted(r.bic for r in res)
    assert res[0].family == family
    own = next(r for r in res if r.family == family)
    for k, v in params.items():
        assert own.params[k] == pytest.approx(v, rel=0.08), (k, own.params)
    assert own.ks < 0.02
    assert own.n == N and own.n_total == N
    assert math.isfinite(own.aic) and math.isfinite(own.loglik)
    assert own.loc == 0.0


def test_free_location():
    x = _rvs(stats.norm(3.0, 0.5))
    r = fit(x, "gaussian")
    assert r.loc == pytest.approx(3.0, abs=0.02)
    assert r.params["sigma"] == pytest.approx(0.5, rel=0.03)
    assert r.k == 2
    assert fit(x - 3.0, "gaussian", fix_loc=True).k == 1


def test_lognormal_one_sided():
    x = _rvs(stats.lognorm(0.7, 0, math.exp(-1.0)))
    res = fit_all(x, one_sided=True)
    assert res[0].family == "lognormal"
    assert res[0].params["mu"] == pytest.approx(-1.0, abs=0.03)
    assert res[0].params["sigma"] == pytest.approx(0.7, rel=0.03)
    d = res[0].to_theory()
    assert d.one_sided


def test_to_theory_round_trip():
    x = _rvs(stats.laplace(0, 0.25))
    # Independent of the family classes: scipy's own frozen distribution of each fit.
    by_hand = {"gaussian": lambda p: stats.norm(0, p["sigma"]),
               "laplace": lambda p: stats.laplace(0, p["b"]),
               "gennorm": lambda p: stats.gennorm(p["beta"], 0, p["scale"]),
               "student_t": lambda p: stats.t(p["nu"], 0, p["scale"])}
    res = fit_all(x, fix_loc=True)
    assert {r.family for r in res} == set(by_hand)
    for r in res:
        d = r.to_theory()
        assert isinstance(d, theory.Distribution)
        assert d.name == r.family
        # The theory object's CDF is the fitted one (location dropped).
        assert d.scipy.cdf(0.3) == pytest.approx(by_hand[r.family](r.params).cdf(0.3), rel=1e-9)
        assert theory_distribution(r.family, r.to_dict()["params"]) == d


def test_families_come_from_theory():
    """fits loops over theory.FAMILIES: every family is fitted, split by one-sidedness."""
    assert set(FAMILIES_SIGNED) | set(FAMILIES_ONE_SIDED) == set(theory.FAMILIES)
    assert all(theory.family(f).one_sided for f in FAMILIES_ONE_SIDED)
    assert not any(theory.family(f).one_sided for f in FAMILIES_SIGNED)
    x = _rvs(stats.norm(0, 1), n=2000)
    assert {r.family for r in fit_all(x)} == set(FAMILIES_SIGNED)
    assert {r.family for r in fit_all(np.abs(x), one_sided=True)} == set(FAMILIES_ONE_SIDED)
    assert fit(x, "Normal").family == "gaussian"  # aliases as theory.family knows them
    with pytest.raises(ValueError, match="takes parameters"):
        theory_distribution("laplace", {"sigma": 1.0})


def test_excess_kurtosis_reported():
    x = _rvs(stats.laplace(0, 1), n=200_000)
    assert excess_kurtosis(x) == pytest.approx(3.0, abs=0.3)
    assert excess_kurtosis(x) == pytest.approx(stats.kurtosis(x), rel=1e-9)
    r = best_fit(x[:N])
    assert r.excess_kurtosis == pytest.approx(stats.kurtosis(x[:N]), rel=1e-9)
    # Robust (quantile) measures: positive for Laplace, about 0 for a Gaussian.
    assert r.extra["robust_excess_kurtosis"]["moors"] > 0.2
    g = best_fit(_rvs(stats.norm(0, 1)))
    assert abs(g.extra["robust_excess_kurtosis"]["moors"]) < 0.1


def test_subsampling_is_deterministic_and_bounded():
    x = _rvs(stats.norm(0, 1), n=50_000).reshape(100, 500).astype(np.float32)
    a = subsample(x, 1000, seed=3)
    b = subsample(x, 1000, seed=3)
    assert a.shape == (1000,) and np.array_equal(a, b)
    assert not np.array_equal(a, subsample(x, 1000, seed=4))
    assert np.isin(a, x.astype(np.float64)).all()
    # Non-contiguous input works without a full copy.
    assert subsample(x.T, 1000, seed=3).shape == (1000,)
    r = fit_all(x, max_samples=1000, families=["gaussian"])[0]
    assert r.n == 1000 and r.n_total == 50_000


def test_best_fit_criteria():
    x = _rvs(stats.t(3.0, 0, 1.0))
    for crit in ("bic", "aic", "ks"):
        assert best_fit(x, criterion=crit, fix_loc=True).family == "student_t"
    with pytest.raises(ValueError, match="criterion"):
        best_fit(x, criterion="r2")


@pytest.mark.parametrize(
    "x, kwargs, match",
    [
        (np.array([1.0, np.nan] * 20), {}, "NaN"),
        (np.array([1.0, np.inf] * 20), {}, "NaN or infinite"),
        (np.array([]), {}, "empty"),
        (np.ones(5), {}, "at least"),
        (np.linspace(-1, 1, 100), {"one_sided": True}, "negative"),
        (np.linspace(0, 1, 100), {"one_sided": True}, "zeros"),
        (np.linspace(-1, 1, 100), {"families": ["cauchy"]}, "unknown family"),
        (np.linspace(-1, 1, 100), {"families": []}, "no families"),
    ],
)
def test_bad_input(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_all(x, **kwargs)


def test_negative_to_lognormal_fit():
    with pytest.raises(ValueError, match="negative"):
        fit(np.linspace(-1, 1, 100), "lognormal")
    # Negative values outside the subsample are still caught.
    x = np.ones(10_000)
    x[1234] = -1.0
    with pytest.raises(ValueError, match="negative"):
        fit(x, "lognormal", max_samples=100)


@pytest.mark.parametrize("value", [0.5, 0.1, -3.0, 0.0])
def test_constant_data_is_refused(value):
    # Constant data once gave StudentT(nu=104, scale=6.9e-25) as the "best" fit, with NaN
    # log-likelihoods for the Gaussian and Laplace: no distribution fits zero spread.
    x = np.full(37, value)
    for call in (lambda: fit_all(x), lambda: best_theory_fit(x), lambda: best_fit(x),
                 lambda: fit(x, "gaussian"), lambda: fit(x, "student_t", fix_loc=True)):
        with pytest.raises(ValueError, match=re.escape(f"x has zero spread (all 37 values equal {value!r})")):
            call()
    if value > 0:
        with pytest.raises(ValueError, match="zero spread"):
            fit_all(x, one_sided=True)


def test_constant_subsample_is_refused():
    # Spread in the data but none in the sample fitted: the fit would be as degenerate.
    x = np.zeros(100_000)
    x[7] = 1.0
    with pytest.raises(ValueError, match=r"subsample of 50 values \(seed 0\) has zero spread \(all equal 0.0\)"):
        fit_all(x, max_samples=50, seed=0)
    # a few equal values among others are data, not a degenerate sample
    assert fit(np.r_[np.full(3, 5.0), np.arange(1.0, 38.0)], "gaussian").n == 40


@pytest.mark.parametrize("max_samples, match", [
    (0, r"max_samples must be >= 20 \(the fit minimum\), got 0"),
    (5, r"max_samples must be >= 20 \(the fit minimum\), got 5"),
    (-1, r"max_samples must be >= 20 \(the fit minimum\), got -1"),
    (19, r"max_samples must be >= 20 \(the fit minimum\), got 19"),
    (100.5, r"max_samples must be an integer or None, got 100.5"),
    (True, r"max_samples must be an integer or None, got True"),
    ("1000", r"max_samples must be an integer or None, got '1000'"),
])
def test_bad_max_samples(max_samples, match):
    x = _rvs(stats.norm(0, 1), n=1000)
    for call in (lambda: fit(x, "gaussian", max_samples=max_samples),
                 lambda: fit_all(x, max_samples=max_samples),
                 lambda: subsample(x, max_samples)):
        with pytest.raises(ValueError, match=match):
            call()


def test_max_samples_at_the_minimum_and_numpy_integers_are_accepted():
    x = _rvs(stats.norm(0, 1), n=1000)
    assert fit(x, "gaussian", max_samples=20).n == 20
    assert fit(x, "gaussian", max_samples=np.int64(500)).n == 500
    assert fit(x, "gaussian", max_samples=None).n == 1000
