"""One generic suite over every family of ``theory.FAMILIES`` (scipy.stats' test_continuous_basic
in spirit): a new family is added to CASES and then passes or fails the same checks.

Numeric hooks are checked against ``sympy.lambdify`` of their symbolic twins (so the formula the
paper prints is the one tested), and both against independent computations: scipy.stats,
quadrature, maximum-likelihood recovery of known parameters.
"""

import math
import zlib

import numpy as np
import pytest
import sympy as sp
from scipy import integrate, stats

from theory import (
    FAMILIES,
    Distribution,
    GeneralizedGaussian,
    Gaussian,
    Grid,
    Laplace,
    Lognormal,
    StudentT,
    expected_mse,
    family,
)
from theory._symbolic import T, X, lambdify
from theory.mse import aciq_mse_expr
from theory.optimal import aciq_mse_derivative

CASES = [
    Gaussian(1.7),
    Laplace(0.6),
    Lognormal(0.4, 0.7),
    Lognormal(-1.0, 1.4),
    GeneralizedGaussian(0.6, 1.3),
    GeneralizedGaussian(3.0, 0.8),
    StudentT(3.5, 2.0),
    StudentT(9.0, 0.5),
    StudentT(2.3, 1.0),
]
IDS = [repr(d) for d in CASES]
FAMILY_IDS = list(FAMILIES)
T_GRID = np.array([0.0, 0.05, 0.3, 1.0, 2.5, 6.0, 15.0])


def _unit(dist):
    return dist.with_scale(1.0)


def _shapes(cls) -> list[tuple]:
    """Every shape of CASES in family ``cls`` (one empty tuple for shape-free families)."""
    return sorted({d.shape for d in CASES if type(d) is cls})


def test_every_family_has_a_case():
    assert {type(d) for d in CASES} == set(FAMILIES.values())
    for name, cls in FAMILIES.items():
        assert issubclass(cls, Distribution) and cls.name == name
        assert family(name) is cls


# ---- numeric hooks == lambdify(symbolic hooks) ---------------------------------------------

@pytest.mark.parametrize("cls", list(FAMILIES.values()), ids=FAMILY_IDS)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_numeric_tail_moment_is_the_sympy_expression(cls, k):
    f = lambdify((T, *cls.shape_symbols()), cls.tail_moment_expr(k))
    for shape in _shapes(cls):
        t = T_GRID[1:] if cls.one_sided else T_GRID  # log(0) in the lognormal's form
        want = np.asarray(f(t, *shape), dtype=np.float64)
        got = cls.tail_moment_fn(k)(t, *shape)
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-300, err_msg=f"{cls.name}{shape}")


@pytest.mark.parametrize("cls", list(FAMILIES.values()), ids=FAMILY_IDS)
def test_numeric_pdf_and_constants_are_the_sympy_expressions(cls):
    x = np.linspace(0.05, 8.0, 23) if cls.one_sided else np.linspace(-8.0, 8.0, 24)
    pdf = lambdify((X, *cls.shape_symbols()), cls.pdf_expr())
    for shape in _shapes(cls):
        np.testing.assert_allclose(cls.pdf_fn()(x, *shape), pdf(x, *shape), rtol=1e-12)
        for what in ("variance", "excess_kurtosis", "entropy"):
            want = float(lambdify(cls.shape_symbols(), getattr(cls, f"{what}_expr")())(*shape))
            got = float(getattr(cls, f"_{what}")(*shape))
            if math.isinf(want):
                assert got == want, (what, shape)
            else:
                assert got == pytest.approx(want, rel=1e-12, abs=1e-14), (what, shape)


@pytest.mark.parametrize("cls", list(FAMILIES.values()), ids=FAMILY_IDS)
def test_aciq_derivative_is_the_sympy_derivative(cls):
    if cls.one_sided:
        pytest.skip("the aciq grid is two-sided")
    expr, a, M = aciq_mse_expr(cls)
    f = lambdify((a, M, *cls.shape_symbols()), sp.diff(expr, a))
    t = T_GRID[1:]
    for shape in _shapes(cls):
        d = next(c for c in CASES if type(c) is cls and c.shape == shape).with_scale(1.0)
        for bits in (2, 4, 8):
            np.testing.assert_allclose(aciq_mse_derivative(d, t, bits), f(t, bits, *shape),
                                       rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("cls", list(FAMILIES.values()), ids=FAMILY_IDS)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_tail_moment_is_an_antiderivative(cls, k):
    """d U_k / dt = -t^k f(t), checked on the sympy expression itself at random points."""
    d = sp.diff(cls.tail_moment_expr(k), T)
    target = -(T**k) * cls.pdf_expr().subs(X, T)
    rng = np.random.default_rng(k)
    shape_vals = {"sigma": 0.8, "beta": 1.7, "nu": 5.5}
    for t in rng.uniform(0.1, 4.0, size=3):
        subs = {T: t, **{s: shape_vals[s.name] for s in cls.shape_symbols()}}
        assert float(sp.N(d.subs(subs), 30)) == pytest.approx(float(sp.N(target.subs(subs), 30)), rel=1e-10)


# ---- against independent computations ------------------------------------------------------

@pytest.mark.parametrize("dist", CASES, ids=IDS)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_tail_moment_matches_quadrature(dist, k):
    u = _unit(dist)
    pdf = u.scipy.pdf
    for t in (0.0, 0.3, 1.0, 2.5, 6.0):
        lo = max(t, 1e-300) if dist.one_sided else t
        ref = integrate.quad(lambda x: x**k * pdf(x), lo, np.inf, epsabs=0, epsrel=1e-12, limit=400)[0]
        got = float(u.tail_moment(k, t))
        assert got == pytest.approx(ref, rel=1e-8, abs=1e-300), (t, got, ref)


@pytest.mark.parametrize("dist", CASES, ids=IDS)
def test_tail_moments_at_zero_are_the_absolute_moments(dist):
    """``U_k(0)`` is all of ``E|X|^k`` for a one-sided family, half of it for a symmetric one."""
    u = _unit(dist)
    half = 1.0 if dist.one_sided else 0.5
    assert float(u.tail_moment(0, 0.0)) == pytest.approx(half, rel=1e-12)
    assert float(u.tail_moment(1, 0.0)) == pytest.approx(half * u.scipy.expect(abs), rel=1e-8)
    assert float(u.tail_moment(2, 0.0)) == pytest.approx(half * u.scipy.moment(2), rel=1e-8)
    assert float(u.tail_moment(2, np.inf)) == 0.0


@pytest.mark.parametrize("dist", CASES, ids=IDS)
def test_pdf_matches_scipy_and_integrates_to_one(dist):
    ref = dist.scipy
    x = np.linspace(1e-3, 10, 41) * float(dist.std)
    x = x if dist.one_sided else np.concatenate([-x[::-1], [0.0], x])
    np.testing.assert_allclose(dist.pdf(x), ref.pdf(x), rtol=1e-12, atol=1e-300)
    lo = 0.0 if dist.one_sided else -np.inf
    assert integrate.quad(dist.pdf, lo, np.inf, limit=400)[0] == pytest.approx(1.0, rel=1e-9)
    if dist.one_sided:
        assert dist.pdf(-1.0) == 0.0 and dist.pdf(0.0) == 0.0


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


@pytest.mark.parametrize("dist", CASES, ids=IDS)
def test_entropy_is_the_integral_of_minus_f_log_f(dist):
    lp = dist.scipy.logpdf

    def g(x):
        v = lp(x)
        return -math.exp(v) * v if math.isfinite(v) else 0.0

    if dist.one_sided:
        med = float(dist.scipy.median())
        h = sum(integrate.quad(g, a, b, epsabs=0, epsrel=1e-11, limit=400)[0]
                for a, b in ((0.0, med), (med, np.inf)))
    else:
        h = 2 * integrate.quad(g, 0.0, np.inf, epsabs=0, epsrel=1e-11, limit=400)[0]
    assert float(dist.entropy) == pytest.approx(h, rel=1e-8)


@pytest.mark.parametrize("dist", CASES, ids=IDS)
def test_cube_root_integral_and_compander_density(dist):
    """``int f^(1/3)`` by quadrature, and the compander density is ``f^(1/3) / int f^(1/3)``."""
    u = _unit(dist)
    c = u.cube_root_integral()
    lo = 0.0 if dist.one_sided else -np.inf
    pts = [lo, float(u.scipy.median()), np.inf] if dist.one_sided else [-np.inf, 0.0, np.inf]
    q = sum(integrate.quad(lambda x: u.pdf(x) ** (1 / 3), a, b, epsabs=0, epsrel=1e-11, limit=400)[0]
            for a, b in zip(pts[:-1], pts[1:]))
    assert c == pytest.approx(q, rel=1e-7)
    g3 = u.cube_root_density()
    if g3 is not None:
        x = np.linspace(0.05, 6.0, 13)
        np.testing.assert_allclose(g3.pdf(x) * c, u.pdf(x) ** (1 / 3), rtol=1e-10)


# ---- parameters, scipy views and fits ------------------------------------------------------

@pytest.mark.parametrize("dist", CASES, ids=IDS)
def test_parameter_mappings_round_trip(dist):
    cls = type(dist)
    assert tuple(dist.params) == cls.param_names
    again = cls.from_params(dist.params)
    assert again.shape == dist.shape and float(again.scale) == pytest.approx(float(dist.scale), rel=1e-14)
    assert cls(**dist.params).shape == dist.shape
    via_scipy = cls.from_scipy(dist.scipy.args, dist.scipy.kwds["scale"])
    assert float(via_scipy.scale) == pytest.approx(float(dist.scale), rel=1e-14)
    assert via_scipy.shape == dist.shape
    frozen = cls.scipy_frozen(dist.params, loc=0.25)
    assert frozen.cdf(1.0) == pytest.approx(dist.scipy.cdf(0.75), rel=1e-12)
    with pytest.raises(ValueError, match="takes parameters"):
        cls.from_params({**dist.params, "bogus": 1.0})
    with pytest.raises(ValueError, match="takes parameters"):
        cls.from_params({})


def _observed_information(cls, params: dict, y: np.ndarray) -> np.ndarray:
    """Minus the Hessian of the log-likelihood in theory's parameters (central differences)."""
    names = list(params)
    theta = np.array([params[n] for n in names], dtype=np.float64)
    h = 1e-4 * np.maximum(np.abs(theta), 1e-2)

    def ll(th):
        return float(np.sum(cls.scipy_frozen(dict(zip(names, th))).logpdf(y)))

    n = theta.size
    hess = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            ei, ej = np.eye(n)[i] * h[i], np.eye(n)[j] * h[j]
            hess[i, j] = (ll(theta + ei + ej) - ll(theta + ei - ej) - ll(theta - ei + ej)
                          + ll(theta - ei - ej)) / (4 * h[i] * h[j])
    return -hess


@pytest.mark.parametrize("dist", CASES, ids=IDS)
def test_fit_recovers_parameters_within_their_standard_error(dist):
    """MLE on n seeded samples lands within 5 standard errors (from the observed Fisher
    information, so the tolerance shrinks as 1/sqrt(n)) of the true parameters."""
    cls = type(dist)
    n = 20_000
    y = dist.scipy.rvs(size=n, random_state=np.random.default_rng(zlib.crc32(repr(dist).encode())))
    fit = cls.fit(y, fix_loc=True)
    assert fit.family == cls.name and fit.loc == 0.0 and fit.k == len(cls.param_names)
    assert tuple(fit.params) == cls.param_names
    se = np.sqrt(np.diag(np.linalg.inv(_observed_information(cls, fit.params, y))))
    assert np.all(np.isfinite(se)) and np.all(se > 0)
    for (name, est), s in zip(fit.params.items(), se):
        true = float(dist.params[name])
        assert abs(est - true) <= 5 * s, (name, est, true, s)
        assert s < 0.2 * max(abs(true), 1.0)  # the bound is informative at this n
    assert isinstance(fit.to_theory(), cls)


def test_fit_with_free_location_counts_it():
    y = stats.laplace(2.0, 0.5).rvs(size=4000, random_state=np.random.default_rng(1))
    fit = Laplace.fit(y)
    assert fit.k == 2 and fit.loc == pytest.approx(2.0, abs=0.05)
    assert Lognormal.fit(np.exp(y)).k == 2  # one-sided: the location is always 0


def test_fit_that_theory_refuses_still_reports_parameters():
    y = stats.t(1.0).rvs(size=4000, random_state=np.random.default_rng(2))  # Cauchy
    fit = StudentT.fit(y, fix_loc=True)
    assert fit.params["nu"] < 2
    assert np.isfinite(fit.scipy().logpdf(y)).all()
    with pytest.raises(ValueError, match="nu > 2"):
        fit.to_theory()


@pytest.mark.parametrize("cls", list(FAMILIES.values()), ids=FAMILY_IDS)
def test_one_sided_families_only_take_the_uint_grid_and_positive_data(cls):
    dist = next(d for d in CASES if type(d) is cls)
    for g in Grid:
        if g.one_sided == cls.one_sided:
            assert expected_mse(dist, float(dist.std), 4, g) > 0
        else:
            with pytest.raises(ValueError, match="one-sided"):
                expected_mse(dist, float(dist.std), 4, g)
    signed = np.linspace(-1, 1, 101)
    if cls.one_sided:
        with pytest.raises(ValueError, match="negative"):
            cls.fit(signed)
        with pytest.raises(ValueError, match="zeros"):
            cls.check_support(np.abs(signed))
    else:
        cls.check_support(signed)


# ---- construction, vectorisation, errors ---------------------------------------------------

def test_student_t_kurtosis_infinite_below_four():
    assert math.isinf(StudentT(3.5, 1.0).excess_kurtosis)
    assert StudentT(10.0, 1.0).excess_kurtosis == pytest.approx(1.0)


def test_special_cases_of_generalized_gaussian():
    s = 1.3
    g2 = GeneralizedGaussian(2.0, s)
    assert float(g2.variance) == pytest.approx(Gaussian(s / math.sqrt(2)).variance)
    assert GeneralizedGaussian(1.0, s).excess_kurtosis == pytest.approx(Laplace(s).excess_kurtosis)
    t = np.array([0.0, 0.5, 2.0])
    for k in range(3):
        np.testing.assert_allclose(GeneralizedGaussian(1.0, 1.0).tail_moment(k, t),
                                   Laplace(1.0).tail_moment(k, t), rtol=1e-13)


def test_far_tails_keep_relative_precision():
    # erfc, not 1/2 - erf/2: the Gaussian tail beyond t ~ 8 is not rounded to 0
    assert float(Gaussian(1.0).tail_moment(0, 20.0)) == pytest.approx(stats.norm.sf(20.0), rel=1e-12)
    assert float(StudentT(400.0, 1.0).tail_moment(1, 1.0)) > 0  # Gamma(200) would overflow


def test_array_scales_are_vectorised():
    d = Laplace(np.array([0.5, 1.0, 2.0]))
    np.testing.assert_allclose(d.variance, 2 * np.array([0.25, 1.0, 4.0]))
    assert d[1] == Laplace(1.0)
    np.testing.assert_allclose(d.pdf(1.0), [Laplace(s).pdf(1.0) for s in (0.5, 1.0, 2.0)])
    assert repr(d) == "Laplace(b=array(shape=(3,)))"


@pytest.mark.parametrize("bad", [
    lambda: Gaussian(0.0), lambda: Gaussian(-1.0), lambda: Gaussian(float("nan")),
    lambda: Laplace(float("inf")), lambda: StudentT(2.0, 1.0), lambda: StudentT(5.0, -1.0),
    lambda: GeneralizedGaussian(0.0, 1.0), lambda: Lognormal(float("nan"), 1.0),
    lambda: Lognormal(0.0, 0.0), lambda: Gaussian(np.array([1.0, np.nan])), lambda: Gaussian("x"),
    lambda: Laplace(1.0).tail_moment(3, 1.0), lambda: Gaussian.from_params([1.0]),
])
def test_bad_parameters_raise_clear_errors(bad):
    with pytest.raises(ValueError):
        bad()


def test_family_lookup():
    assert family("Normal") is Gaussian
    assert family("t") is StudentT
    assert family(Laplace) is Laplace
    with pytest.raises(ValueError, match="unknown family 'cauchy'.*known: gaussian"):
        family("cauchy")
