"""One generic suite over every family: the symbolic hooks against independent computations."""

import math

import numpy as np
import pytest
import sympy as sp
from scipy import integrate

from theory import FAMILIES, GeneralizedGaussian, Gaussian, Laplace, Lognormal, StudentT, family
from theory.distributions import T

CASES = [
    Gaussian(1.7),
    Laplace(0.6),
    Lognormal(0.4, 0.7),
    GeneralizedGaussian(0.6, 1.3),
    GeneralizedGaussian(3.0, 0.8),
    StudentT(3.5, 2.0),
    StudentT(9.0, 0.5),
]
IDS = [repr(d) for d in CASES]


@pytest.mark.parametrize("dist", CASES, ids=IDS)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_tail_moment_matches_quadrature(dist, k):
    u = dist.with_scale(1.0)
    pdf = u.scipy.pdf
    for t in (0.0, 0.3, 1.0, 2.5, 6.0):
        lo = max(t, 1e-300) if dist.one_sided else t
        ref = integrate.quad(lambda x: x**k * pdf(x), lo, np.inf, epsabs=0, epsrel=1e-12, limit=400)[0]
        got = float(u.tail_moment(k, t))
        assert got == pytest.approx(ref, rel=1e-8, abs=1e-300), (t, got, ref)


@pytest.mark.parametrize("cls", list(FAMILIES.values()), ids=list(FAMILIES))
@pytest.mark.parametrize("k", [0, 1, 2])
def test_tail_moment_is_an_antiderivative(cls, k):
    """d U_k / dt = -t^k f(t), checked on the sympy expression itself at random points."""
    expr = cls.tail_moment_expr(k)
    d = sp.diff(expr, T)
    target = -(T**k) * cls.pdf_expr().subs(sp.Symbol("x", real=True), T)
    rng = np.random.default_rng(k)
    shape_vals = {"sigma": 0.8, "beta": 1.7, "nu": 5.5}
    for t in rng.uniform(0.1, 4.0, size=3):
        subs = {T: t, **{s: shape_vals[s.name] for s in cls.shape_symbols}}
        assert float(sp.N(d.subs(subs), 30)) == pytest.approx(float(sp.N(target.subs(subs), 30)), rel=1e-10)


@pytest.mark.parametrize("dist", CASES, ids=IDS)
def test_moments_and_entropy_match_scipy(dist):
    ref = dist.scipy
    assert float(dist.variance) == pytest.approx(ref.var(), rel=1e-10)
    k = ref.stats("k")
    if math.isfinite(float(k)):
        assert dist.excess_kurtosis == pytest.approx(float(k), rel=1e-8)
    else:
        assert math.isinf(dist.excess_kurtosis)
    assert float(dist.entropy) == pytest.approx(float(ref.entropy()), rel=1e-10)


def test_student_t_kurtosis_infinite_below_four():
    assert math.isinf(StudentT(3.5, 1.0).excess_kurtosis)
    assert StudentT(10.0, 1.0).excess_kurtosis == pytest.approx(1.0)


def test_special_cases_of_generalized_gaussian():
    s = 1.3
    g2 = GeneralizedGaussian(2.0, s)
    assert float(g2.variance) == pytest.approx(Gaussian(s / math.sqrt(2)).variance)
    assert GeneralizedGaussian(1.0, s).excess_kurtosis == pytest.approx(Laplace(s).excess_kurtosis)


def test_array_scales_are_vectorised():
    d = Laplace(np.array([0.5, 1.0, 2.0]))
    np.testing.assert_allclose(d.variance, 2 * np.array([0.25, 1.0, 4.0]))
    assert d[1] == Laplace(1.0)


@pytest.mark.parametrize("bad", [
    lambda: Gaussian(0.0), lambda: Gaussian(-1.0), lambda: Gaussian(float("nan")),
    lambda: Laplace(float("inf")), lambda: StudentT(2.0, 1.0), lambda: StudentT(5.0, -1.0),
    lambda: GeneralizedGaussian(0.0, 1.0), lambda: Lognormal(float("nan"), 1.0),
    lambda: Lognormal(0.0, 0.0), lambda: Gaussian(np.array([1.0, np.nan])), lambda: Gaussian("x"),
])
def test_bad_parameters_raise_clear_errors(bad):
    with pytest.raises(ValueError):
        bad()


def test_family_lookup():
    assert family("Normal") is Gaussian
    assert family("t") is StudentT
    with pytest.raises(ValueError, match="unknown distribution family"):
        family("cauchy")
