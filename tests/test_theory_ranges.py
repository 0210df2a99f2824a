"""Theory holds over the whole range a class accepts, or refuses with the reason (issue #13).

Each test plants an input at the edge of float64 (a scale that underflows, a threshold whose
square overflows, data near 1e200, an extreme lognormal shape) and checks for either a finite,
independently checked value or a ValueError that names the problem.
"""

import math

import numpy as np
import pytest

from theory import Laplace, Lognormal, expected_mse, optimal_alpha


@pytest.mark.parametrize("mu", [-1000.0, -400.0, 400.0, 1000.0])
def test_lognormal_mu_whose_scale_under_or_overflows_is_refused(mu):
    # exp(-1000) is 0.0 in float64: the distribution used to be accepted with scale 0 and
    # optimal_alpha returned 0.0 without a word.
    with pytest.raises(ValueError, match="mu"):
        Lognormal(mu, 1.0)
    with pytest.raises(ValueError, match="mu"):
        Lognormal(np.array([0.0, mu]), 1.0)


@pytest.mark.parametrize("mu", [-300.0, 300.0])
def test_lognormal_mu_at_the_edge_of_the_range_scales_exactly(mu):
    d = Lognormal(mu, 0.5)
    assert d.scale == pytest.approx(math.exp(mu), rel=1e-12)
    assert optimal_alpha(d, 4, "uint") == pytest.approx(
        optimal_alpha(Lognormal(0.0, 0.5), 4, "uint") * math.exp(mu), rel=1e-9)


# ---- expected_mse where alpha^2 overflows float64 (alpha / scale past ~1e154) -------------

@pytest.mark.parametrize("alpha", [1e155, 1e300])
@pytest.mark.parametrize("grid", ["int", "midtread"])
def test_expected_mse_with_a_huge_alpha_is_the_variance(alpha, grid):
    # Step alpha/7 (int) or alpha/8 (midtread): every value of Laplace(1) rounds to the level
    # at 0, so the MSE is E[X^2] = 2 b^2, whatever alpha. It used to be NaN (inf * 0).
    assert expected_mse(Laplace(1.0), alpha, 4, grid) == pytest.approx(2.0, rel=1e-12)
    # the same at another scale: only alpha / scale matters
    assert expected_mse(Laplace(1e-100), alpha * 1e-100, 4, grid) == pytest.approx(2e-200, rel=1e-12)


def test_expected_mse_with_a_huge_alpha_one_sided():
    # uint has a level at 0 too: the MSE tends to E[X^2] = exp(2 sigma^2) for Lognormal(0, sigma)
    for alpha in (1e155, 1e300):
        assert expected_mse(Lognormal(0.0, 1.0), alpha, 4, "uint") == pytest.approx(
            math.exp(2.0), rel=1e-12)


def test_expected_mse_aciq_at_1e155_is_its_noise_term():
    # ACIQ: clipping (0 here) + alpha^2 / (3 4^M) = 1.30e307, finite though alpha^2 is not
    expect = (1e155 / math.sqrt(3.0 * 4.0**4)) ** 2
    assert math.isfinite(expect)
    assert expected_mse(Laplace(1.0), 1e155, 4, "aciq") == pytest.approx(expect, rel=1e-12)
    # high-resolution rounding term step^2 / 12 * P(|X| <= alpha), step = alpha / 7
    expect = (1e155 / 7.0 / math.sqrt(12.0)) ** 2
    assert expected_mse(Laplace(1.0), 1e155, 4, "int", exact=False) == pytest.approx(
        expect, rel=1e-12)


@pytest.mark.parametrize("grid", ["aciq", "midrise"])
def test_expected_mse_beyond_float64_is_refused_with_the_reason(grid):
    # aciq: alpha^2 / 768 = 1.3e597; midrise: its innermost level alpha / 16 gives ~ alpha^2 / 256
    with pytest.raises(ValueError, match="exceeds float64"):
        expected_mse(Laplace(1.0), 1e300, 4, grid)
    with pytest.raises(ValueError, match="exceeds float64"):
        expected_mse(Laplace(1.0), np.array([1.0, 1e300]), 4, grid)


@pytest.mark.parametrize("bits", [12, 16])
def test_expected_mse_fine_grid_with_cells_wider_than_the_data(bits):
    # Past 256 levels rounding error is integrated per cell by 8-node Gauss-Legendre; a cell
    # far wider than the density's features (Lognormal(0, 1) at alpha = 5e11: step 1.2e8) was
    # integrated as ~0 (1.7e-31). Every value rounds to the level 0 there: MSE = E[X^2] = e^2.
    assert expected_mse(Lognormal(0.0, 1.0), 5e11, bits, "uint") == pytest.approx(
        math.exp(2.0), rel=1e-9)
    # data far narrower than a cell: Lognormal(0, 1e-6) at alpha = 2.1 (a level at 1.0 at 12
    # bits, 4.6e-6 = 4.6 sigma below 1 and 11 sigma from an edge at 16) gives the variance
    # plus the squared distance of the mean to its level
    d = Lognormal(0.0, 1e-6)
    levels = np.arange(2**bits) * 2.1 / (2**bits - 1)
    mean = math.exp(0.5e-12)
    q = levels[np.argmin(np.abs(levels - mean))]
    var = math.expm1(1e-12) * math.exp(1e-12)
    assert expected_mse(d, 2.1, bits, "uint") == pytest.approx(var + (mean - q) ** 2, rel=1e-6)


# ---- empirical sweep on data whose squares overflow ----------------------------------------

def _sweep():
    from empirical.sweep import mse_sweep  # numba: only these tests pay for it

    return mse_sweep


@pytest.mark.parametrize("grid", ["int", "aciq", "midtread"])
def test_mse_sweep_on_data_near_1e200_is_refused_naming_the_magnitude(grid):
    x = np.random.default_rng(0).standard_normal(1000) * 1e200
    # (x - q)^2 ~ 1e400 overflows: this used to return [nan, nan] without a warning
    with pytest.raises(ValueError, match=r"magnitudes up to \d(\.\d+)?e\+200"):
        _sweep()(x, [1e200, 3e200], 4, grid)


def test_mse_sweep_refuses_an_alpha_whose_square_overflows():
    # aciq adds alpha^2 / (3 4^M): inf at alpha = 1e160 on data of magnitude 1
    x = np.random.default_rng(1).standard_normal(100)
    with pytest.raises(ValueError, match="alpha"):
        _sweep()(x, [1.0, 1e160], 4, "aciq")


def test_mse_sweep_just_inside_the_range_scales_exactly():
    # 1e150 is inside the range: the MSE there is 1e300 times the MSE of the unit data
    x = np.random.default_rng(2).standard_normal(1000)
    big = _sweep()(x * 1e150, [1e150, 3e150], 4, "int")
    unit = _sweep()(x, [1.0, 3.0], 4, "int")
    assert np.all(np.isfinite(big))
    np.testing.assert_allclose(big, unit * 1e300, rtol=1e-12)


# ---- lognormal optimal alpha over every sigma the class accepts ----------------------------

_SIGMAS = [1e-6, 0.01, 1.0, 3.5, 5.0, 10.0, 17.0, 18.0]


@pytest.mark.parametrize("sigma, bits", [(s, b) for s in _SIGMAS for b in (2, 4, 8)]
                         + [(s, 12) for s in (1e-6, 1.0, 3.0, 5.0, 17.0)])
def test_lognormal_optimal_alpha_is_a_minimum_for_every_sigma(sigma, bits):
    # The scan used to run over [1e-2, 1e6] x std: sigma <= 1e-6 has its optimum near 1 = 1e6 std,
    # sigma >= 3.5 far above 1e6 std (x^2 f(x) peaks at exp(2 sigma^2)), and past sigma ~ 17 the
    # squares overflowed to NaN ("All-NaN slice encountered").
    d = Lognormal(0.0, sigma)
    a = optimal_alpha(d, bits, "uint")
    assert math.isfinite(a) and a > 0
    m = expected_mse(d, a, bits, "uint")
    assert math.isfinite(m) and m > 0
    if sigma <= 1e-6:  # the data sit at 1 +- sigma in one cell; a level at the mean leaves var
        assert m == pytest.approx(math.expm1(sigma**2) * math.exp(sigma**2), rel=1e-3)
    for f in (0.99, 1.01):
        assert expected_mse(d, f * a, bits, "uint") >= m * (1 - 1e-12), (f, a)
    # the scan is wide enough that the minimum is not at its border: a coarse independent grid
    # over the whole float range finds nothing lower
    n = 4001 if bits <= 8 else 401  # 12 bits: 4095 cells integrated by quadrature per point
    grid = np.exp(np.linspace(-20 * sigma - 1, min(2 * sigma**2 + 20 * sigma + 5, 340), n))
    assert np.min(expected_mse(d, grid, bits, "uint")) >= m * (1 - 1e-9)


def test_lognormal_optimal_alpha_scales_with_exp_mu_for_a_wide_sigma():
    a0 = optimal_alpha(Lognormal(0.0, 5.0), 4, "uint")
    assert optimal_alpha(Lognormal(3.0, 5.0), 4, "uint") == pytest.approx(a0 * math.exp(3.0),
                                                                          rel=1e-9)


@pytest.mark.parametrize("sigma", [19.0, 100.0, 9e-7, 1e-8])
def test_lognormal_sigma_outside_the_range_is_refused_naming_sigma(sigma):
    # sigma > 18: E[X^2] = exp(2 sigma^2) exceeds float64 (1e281 at 18, 1e313 at 19);
    # sigma < 1e-6: the MSE ~ sigma^2 is a difference of moments of size 1 (float64: ~1e-16);
    # at 1e-8 it came out 2.2e-16 for a true 1e-16
    with pytest.raises(ValueError, match="sigma"):
        Lognormal(0.0, sigma)
