"""Exact MSE against direct numerical integration over the levels, and its properties."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from theory import (
    GeneralizedGaussian, Gaussian, Grid, Laplace, Lognormal, StudentT, clipping_mse, expected_mse,
    grid_spec, mse_derivative, quantize, rounding_mse,
)
from theory import strategies as lst

TWO_SIDED = [Gaussian(1.3), Laplace(0.7), GeneralizedGaussian(0.8, 2.0), StudentT(4.0, 1.5)]
PAIRS = [(d, g) for d in TWO_SIDED for g in ("midrise", "midtread", "int")] + [(Lognormal(0.3, 0.8), "uint")]


def quad_mse(dist, alpha, bits, grid):
    """Direct integration of (x - q)^2 f(x) over each level's decision cell."""
    s = grid_spec(grid, alpha, bits)
    lv = s.levels()
    edges = np.concatenate([[-np.inf], s.thresholds(), [np.inf]])
    if dist.one_sided:
        edges[0] = 0.0
    total = 0.0
    for j, q in enumerate(lv):
        lo, hi = edges[j], edges[j + 1]
        if hi > lo:
            total += integrate.quad(lambda x: (x - q) ** 2 * dist.pdf(x), lo, hi, epsabs=0,
                                    epsrel=1e-12, limit=400)[0]
    return total


@pytest.mark.parametrize("dist,grid", PAIRS, ids=[f"{d!r}-{g}" for d, g in PAIRS])
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_exact_mse_equals_quadrature(dist, grid, bits):
    if bits < Grid.parse(grid).min_bits:
        pytest.skip("int needs 2 bits")
    # 8 bits means 256 quad calls per alpha: one alpha there keeps the suite quick.
    for rel_alpha in ((0.7, 2.5, 6.0) if bits < 8 else (2.5,)):
        alpha = rel_alpha * float(dist.std)
        got = expected_mse(dist, alpha, bits, grid)
        ref = quad_mse(dist, alpha, bits, grid)
        assert got == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("dist", TWO_SIDED, ids=repr)
def test_aciq_mse_is_clipping_plus_uniform_noise(dist):
    a, m = 2.0 * float(dist.std), 3
    clip = 2 * integrate.quad(lambda x: (x - a) ** 2 * dist.pdf(x), a, np.inf, epsrel=1e-12)[0]
    assert clipping_mse(dist, a, m, "aciq") == pytest.approx(clip, rel=1e-9)
    assert rounding_mse(dist, a, m, "aciq") == pytest.approx(a**2 / (3 * 4**m), rel=1e-14)


def test_clipping_plus_rounding_is_total():
    d = StudentT(5.0, 1.0)
    for g in ("midrise", "midtread", "int"):
        tot = expected_mse(d, 3.0, 4, g)
        assert clipping_mse(d, 3.0, 4, g) + rounding_mse(d, 3.0, 4, g) == pytest.approx(tot, rel=1e-12)


def test_exact_mse_matches_monte_carlo_of_the_reference_quantizer():
    """The numpy reference quantizer and theory's integral describe the same levels."""
    rng = np.random.default_rng(0)
    d = Laplace(1.0)
    x = d.scipy.rvs(size=400_000, random_state=rng)
    for g in ("midrise", "midtread", "int"):
        err = (x - quantize(x, g, 3.0, 3)) ** 2
        se = err.std() / np.sqrt(x.size)
        assert abs(err.mean() - expected_mse(d, 3.0, 3, g)) < 5 * se


@pytest.mark.parametrize("bits", [10, 12, 16])
def test_high_bit_exact_mse_matches_rounding_formula(bits):
    """With thousands of levels the quadrature path is used; rounding error -> step^2/12 P(in)."""
    d = Gaussian(1.0)
    a = 3.0
    ex = rounding_mse(d, a, bits, "int")
    ap = rounding_mse(d, a, bits, "int", exact=False)
    assert ex == pytest.approx(ap, rel=1e-6)
    assert np.isfinite(expected_mse(d, a, bits, "midrise"))


@pytest.mark.parametrize("dist,grid", PAIRS[::2] + [(Laplace(1.0), "aciq")], ids=str)
def test_derivative_matches_finite_difference(dist, grid):
    a = 1.8 * float(dist.std)
    h = 1e-5 * a
    fd = (expected_mse(dist, a + h, 4, grid) - expected_mse(dist, a - h, 4, grid)) / (2 * h)
    assert mse_derivative(dist, a, 4, grid) == pytest.approx(fd, rel=1e-6, abs=1e-12)


def test_exact_and_approximate_converge_as_bits_grow():
    d = Laplace(1.0)
    gaps = []
    for m in (2, 4, 6, 8, 10):
        a = 8.0
        ex, ap = expected_mse(d, a, m, "midtread"), expected_mse(d, a, m, "midtread", exact=False)
        gaps.append(abs(ex / ap - 1))
    assert all(g2 < g1 for g1, g2 in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-4


def test_vectorised_over_alpha_and_scale():
    a = np.linspace(0.5, 5, 7)
    d = Gaussian(np.array([[0.5], [2.0]]))
    out = expected_mse(d, a, 4, "int")
    assert out.shape == (2, 7)
    for i, s in enumerate((0.5, 2.0)):
        for j, aj in enumerate(a):
            assert out[i, j] == pytest.approx(expected_mse(Gaussian(s), aj, 4, "int"), rel=1e-13)


@settings(max_examples=40, deadline=None)
@given(c=st.floats(1e-6, 1e6), rel=st.floats(0.2, 8.0), bits=lst.bits(min_bits=2, max_bits=8),
       grid=lst.grids(StudentT))
def test_mse_scales_as_scale_squared(c, rel, bits, grid):
    d = StudentT(6.0, 1.0)
    base = expected_mse(d, rel, bits, grid)
    assert expected_mse(d.with_scale(c), rel * c, bits, grid) == pytest.approx(base * c * c, rel=1e-9)


@pytest.mark.parametrize("call,match", [
    (lambda: expected_mse(Gaussian(1.0), 1.0, 0, "int"), "bits"),
    (lambda: expected_mse(Gaussian(1.0), 1.0, 17, "midrise"), "bits"),
    (lambda: expected_mse(Gaussian(1.0), 1.0, 1, "int"), "bits"),
    (lambda: expected_mse(Gaussian(1.0), 1.0, 2.5, "int"), "bits"),
    (lambda: expected_mse(Gaussian(1.0), 1.0, 4, "fp4"), "unknown grid"),
    (lambda: expected_mse(Lognormal(0.0, 1.0), 1.0, 4, "int"), "one-sided"),
    (lambda: expected_mse(Gaussian(1.0), 1.0, 4, "uint"), "one-sided"),
    (lambda: expected_mse(Gaussian(1.0), float("nan"), 4, "int"), "alpha"),
    (lambda: expected_mse(Gaussian(1.0), -1.0, 4, "int"), "alpha"),
    (lambda: expected_mse("gaussian", 1.0, 4, "int"), "distribution"),
])
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
