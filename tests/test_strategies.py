"""theory.strategies: every strategy yields values the formulas accept, reaches every family and
grid, and each ready check passes on a true property and catches a planted wrong one."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis.errors import NoSuchExample
from hypothesis import strategies as st

from theory import (FAMILIES, Gaussian, Grid, Laplace, StudentT, expected_mse, optimal_alpha,
                    shannon_lower_bound)
from theory import strategies as lst

HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REAL_GRIDS = ["midrise", "midtread", "int", "uint"]  # real quantizers; aciq is a noise model


def test_import_theory_does_not_import_hypothesis():
    out = subprocess.run([sys.executable, "-c", "import sys, theory; print('hypothesis' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@HYP
@given(case=lst.cases(max_bits=8))
def test_cases_are_accepted_by_the_formulas(case):
    dist, grid, bits = case
    assert Grid.parse(grid).one_sided == type(dist).one_sided
    a = optimal_alpha(dist, bits, grid)
    m = expected_mse(dist, a, bits, grid)
    assert math.isfinite(a) and a > 0 and math.isfinite(m) and m > 0
    # alpha* is a minimum: neighbours do not do better
    for f in (0.9, 1.1):
        assert expected_mse(dist, a * f, bits, grid) >= m * (1 - 1e-9)


@settings(max_examples=8, deadline=None)
@given(case=lst.cases(min_bits=12))
def test_high_bit_cases_are_accepted(case):
    dist, grid, bits = case
    a = optimal_alpha(dist, bits, grid)
    assert math.isfinite(a) and a > 0
    assert 0 < expected_mse(dist, a, bits, grid) < math.inf


@HYP
@given(data=st.data())
def test_alphas_and_samples_are_valid(data):
    dist, grid, bits = data.draw(lst.cases(max_bits=6))
    a = data.draw(lst.alphas(dist, bits, grid, spread=3.0))
    a0 = optimal_alpha(dist, bits, grid)
    assert a0 / 3.0 * (1 - 1e-12) <= a <= a0 * 3.0 * (1 + 1e-12)
    assert expected_mse(dist, a, bits, grid) >= expected_mse(dist, a0, bits, grid) * (1 - 1e-9)
    x = data.draw(lst.samples(dist, 5, 50))
    assert 5 <= x.size <= 50 and np.all(np.isfinite(x))
    if type(dist).one_sided:
        assert np.all(x > 0)


def test_samples_are_the_seeded_draws_and_shrink_to_the_smallest():
    d = Laplace(2.0)
    x = find(lst.samples(d, 3, 100), lambda x: True)
    assert x.size == 3  # smallest size, seed 0
    np.testing.assert_array_equal(x, d.scipy.rvs(size=3, random_state=np.random.default_rng(0)))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_find_reaches_every_family(name):
    d = find(lst.distributions(), lambda d: d.name == name)
    assert type(d) is FAMILIES[name]


@pytest.mark.parametrize("grid", [g.value for g in Grid])
def test_find_reaches_every_grid(grid):
    assert find(lst.grids(), lambda g: g == grid) == grid
    case = find(lst.cases(max_bits=4), lambda c: c[1] == grid)
    assert case[1] == grid and case[2] >= Grid(grid).min_bits


def test_find_reaches_heavy_tails_near_the_limit():
    d = find(lst.distributions("student_t"), lambda d: d.shape[0] < 2.1)
    assert 2.05 <= d.shape[0] < 2.1
    optimal_alpha(d, 4, "int")


def test_grids_and_bits_respect_the_family():
    assert find(lst.grids("lognormal"), lambda g: True) == "uint"
    with pytest.raises(NoSuchExample):
        find(lst.grids("gaussian"), lambda g: g == "uint")
    assert find(lst.bits("int"), lambda b: True) == 2
    assert find(lst.bits("midrise"), lambda b: True) == 1
    assert find(lst.bits("int"), lambda b: b >= 16) == 16
    with pytest.raises(ValueError, match="unknown family"):
        lst.distributions("cauchy")
    with pytest.raises(ValueError, match="range"):
        lst.distributions(scales=(0.0, 1.0))


# --------------------------------------------------------------------------------------------
# ready checks: pass on a true property, fail with a counterexample on a planted wrong one
# --------------------------------------------------------------------------------------------

@HYP
@given(case=lst.cases(max_bits=8, grids=REAL_GRIDS))
def test_shannon_lower_bound_passes_on_every_real_grid(case):
    dist, grid, bits = case
    lst.check_lower_bound(shannon_lower_bound, dist, bits, grid)


@HYP
@given(case=lst.cases(max_bits=8, min_bits=2, grids=["aciq"]))
def test_shannon_lower_bound_passes_on_aciq_from_two_bits(case):
    dist, grid, bits = case
    lst.check_lower_bound(shannon_lower_bound, dist, bits, grid)


def test_shannon_lower_bound_exceeds_the_aciq_model_at_one_bit():
    # the ACIQ noise model (clip + alpha^2/(3 4^M)) is not a quantizer: at one bit it falls below
    # the Shannon bound, which is why check_lower_bound is run on aciq from 2 bits only
    with pytest.raises(AssertionError, match="Gaussian"):
        lst.check_lower_bound(shannon_lower_bound, Gaussian(1.0), 1, "aciq")


def test_slb_times_1_5_is_caught_with_a_counterexample():
    def wrong(dist, bits):
        return 1.5 * shannon_lower_bound(dist, bits)

    @settings(max_examples=200, deadline=None, database=None)
    @given(case=lst.cases(max_bits=8, grids=REAL_GRIDS))
    def prop(case):
        dist, grid, bits = case
        lst.check_lower_bound(wrong, dist, bits, grid)

    with pytest.raises(AssertionError, match=r"lower bound exceeds the exact MSE at .*grid=.*bits=\d+"
                                             r".*alpha=.*bound=.*mse="):
        prop()


def test_check_alpha():
    d = StudentT(3.0, 0.5)
    lst.check_alpha(lambda d, b, g: optimal_alpha(d, b, g), d, 4, "int", rtol=1e-12)
    with pytest.raises(AssertionError, match=r"StudentT\(nu=3.*proposed .* optimal_alpha"):
        lst.check_alpha(lambda d, b, g: 1.2 * optimal_alpha(d, b, g), d, 4, "int", rtol=0.1)


@HYP
@given(case=lst.cases(max_bits=6))
def test_check_alpha_catches_a_20_percent_error_everywhere(case):
    dist, grid, bits = case
    lst.check_alpha(lambda d, b, g: optimal_alpha(d, b, g), dist, bits, grid)
    with pytest.raises(AssertionError, match="alpha is off"):
        lst.check_alpha(lambda d, b, g: 1.2 * optimal_alpha(d, b, g), dist, bits, grid, rtol=0.1)


def _fit_then_alpha(x, bits, grid):
    # maximum-likelihood Laplace scale, then the analytic alpha*: a consistent estimator
    return optimal_alpha(Laplace(float(np.mean(np.abs(x)))), bits, grid)


def test_check_estimator_converges():
    d = Laplace(0.3)
    lst.check_estimator_converges(_fit_then_alpha, d, 4, "int", sizes=(100, 10_000, 200_000),
                                  rtol=0.01)
    with pytest.raises(AssertionError, match=r"does not converge .*Laplace\(b=0.3\).*n=100:"):
        lst.check_estimator_converges(lambda x, b, g: 1.0, d, 4, "int", sizes=(100, 10_000))
    # a biased estimator (alpha* of the raw std taken as a Laplace b) is caught as well
    with pytest.raises(AssertionError, match="does not converge"):
        lst.check_estimator_converges(lambda x, b, g: optimal_alpha(Laplace(float(np.std(x))), b, g),
                                      d, 4, "int", sizes=(100, 100_000))


@HYP
@given(dist=lst.distributions(), c=st.floats(1e-3, 1e3))
def test_check_scale_equivariance(dist, c):
    lst.check_scale_equivariance(lambda d: optimal_alpha(d, 4, "uint" if d.one_sided else "int"),
                                 dist, c, power=1, rtol=1e-9)
    lst.check_scale_equivariance(lambda d: shannon_lower_bound(d, 3), dist, c, power=2)
    if abs(math.log(c)) > 1e-3:
        with pytest.raises(AssertionError, match="not scale-equivariant"):
            lst.check_scale_equivariance(lambda d: float(np.asarray(d.scale)) ** 1.5, dist, c,
                                         power=1)
