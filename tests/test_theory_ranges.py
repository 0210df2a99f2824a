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
