"""alpha* against published values (ACIQ, Max 1960) and the properties it must have."""

import math

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, special

from theory import (
    GeneralizedGaussian, Gaussian, Laplace, Lognormal, StudentT, allocate_bits, bias_correct,
    expected_mse, laplace_aciq, octav_alpha, octav_objective, optimal_alpha, optimal_mse, to_latex,
)
from theory import strategies as lst
from theory.derivations import aciq_clipping, gaussian_aciq

# Banner, Nahshan & Soudry (NeurIPS 2019), alpha*/b (Laplace) and alpha*/sigma (Gaussian), M = 2..8,
# printed to two decimals.
ACIQ_LAPLACE = [2.83, 3.89, 5.03, 6.20, 7.41, 8.64, 9.89]
ACIQ_GAUSS = [1.71, 2.15, 2.55, 2.94, 3.29, 3.61, 3.92]

# Max (1960), Table II: optimum uniform quantizer for N(0,1): N levels, step, MSE.
MAX_UNIFORM = [(2, 1.596, 0.3634), (4, 0.9957, 0.1188), (8, 0.5860, 0.03744), (16, 0.3352, 0.01154)]


@pytest.mark.parametrize("m,published", list(zip(range(2, 9), ACIQ_LAPLACE)))
def test_aciq_published_laplace(m, published):
    a = optimal_alpha(Laplace(1.0), m, "aciq")
    assert abs(a - published) <= 0.01
    # and exactly the Lambert-W closed form
    assert a == pytest.approx(float(special.lambertw(3 * 4**m).real), rel=1e-12)


@pytest.mark.parametrize("m,published", list(zip(range(2, 9), ACIQ_GAUSS)))
def test_aciq_published_gaussian(m, published):
    assert abs(optimal_alpha(Gaussian(1.0), m, "aciq") - published) <= 0.01


@pytest.mark.parametrize("levels,step,mse", MAX_UNIFORM)
def test_max_1960_optimal_uniform_gaussian(levels, step, mse):
    m = int(math.log2(levels))
    a = optimal_alpha(Gaussian(1.0), m, "midrise")
    assert 2 * a / levels == pytest.approx(step, abs=6e-4)
    assert optimal_mse(Gaussian(1.0), m, "midrise") == pytest.approx(mse, abs=6e-5)


def test_laplace_derivation_comes_from_sympy():
    d = laplace_aciq()
    b, M = sp.Symbol("b", positive=True), sp.Symbol("M", positive=True, integer=True)
    w = sp.LambertW(3 * 4**M)
    assert sp.simplify(d["alpha_star"].rhs - b * w) == 0
    assert sp.simplify(d["mse_star"].rhs - b**2 * w * (w + 2) / (3 * 4**M)) == 0
    # the derived MSE* equals the numeric optimum
    for m in (2, 5, 8):
        num = float(d["mse_star"].rhs.subs({b: 1.7, M: m}).evalf(30))
        assert optimal_mse(Laplace(1.7), m, "aciq") == pytest.approx(num, rel=1e-10)
    tex = to_latex(d)
    assert r"W\left(3 \cdot 4^{M}\right)" in tex


def test_gaussian_stationarity_holds_at_optimum():
    d = gaussian_aciq()
    a, s = sp.symbols("alpha sigma", positive=True)
    M = sp.Symbol("M", positive=True, integer=True)
    expr = d["stationarity"].lhs
    for m in (2, 4, 8):
        val = float(expr.subs({a: optimal_alpha(Gaussian(2.0), m, "aciq"), s: 2.0, M: m}).evalf(30))
        assert abs(val) < 1e-10


@pytest.mark.parametrize("dist,grid", [
    (Gaussian(1.0), "int"), (Laplace(2.0), "midrise"), (StudentT(5.0, 1.0), "midtread"),
    (GeneralizedGaussian(0.7, 1.0), "aciq"), (Lognormal(0.5, 0.6), "uint"), (Gaussian(1.0), "midtread"),
])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_alpha_star_is_a_minimum(dist, grid, bits):
    if grid == "int" and bits == 1:
        pytest.skip("int needs 2 bits")
    a = optimal_alpha(dist, bits, grid)
    best = expected_mse(dist, a, bits, grid)
    for f in (0.98, 0.995, 1.005, 1.02):
        assert expected_mse(dist, a * f, bits, grid) >= best * (1 - 1e-12)


@settings(max_examples=30, deadline=None)
@given(c=st.floats(1e-6, 1e6), bits=lst.bits(min_bits=2, max_bits=8),
       grid=lst.grids(Laplace))
def test_alpha_star_is_scale_equivariant(c, bits, grid):
    d = Laplace(1.0)
    assert optimal_alpha(d.with_scale(c), bits, grid) == pytest.approx(c * optimal_alpha(d, bits, grid), rel=1e-12)


@pytest.mark.parametrize("dist,grid", [(Gaussian(1.0), "int"), (Laplace(1.0), "aciq"),
                                       (StudentT(4.0, 1.0), "midrise"), (Lognormal(0, 1.0), "uint")])
def test_mse_star_falls_as_bits_grow(dist, grid):
    vals = [optimal_mse(dist, m, grid) for m in range(2, 17)]
    assert all(b < a for a, b in zip(vals, vals[1:])), vals


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("grid", ["aciq", "int", "midrise"])
def test_heavier_tails_need_larger_alpha_over_sigma(bits, grid):
    # Not true at 2 bits: there Student-t(5) (kurtosis 6) takes a smaller alpha*/sigma than
    # Laplace (kurtosis 3); see the test below.
    fams = [GeneralizedGaussian(4.0, 1.0), Gaussian(1.0), Laplace(1.0), GeneralizedGaussian(0.7, 1.0),
            StudentT(5.0, 1.0)]
    # ordered by excess kurtosis except the last pair, so sort by it
    fams.sort(key=lambda d: d.excess_kurtosis)
    ratios = [optimal_alpha(d, bits, grid) / float(d.std) for d in fams[:4]]
    assert all(b > a for a, b in zip(ratios, ratios[1:])), ratios
    ts = [StudentT(nu, 1.0) for nu in (30.0, 10.0, 5.0)]
    r = [optimal_alpha(d, bits, grid) / float(d.std) for d in ts]
    assert r[0] < r[1] < r[2]


def test_kurtosis_ordering_breaks_at_two_bits():
    """Recorded counterexample: kurtosis alone does not order alpha*/sigma at very low bits."""
    gg, lap = StudentT(5.0, 1.0), Laplace(1.0)
    assert gg.excess_kurtosis > lap.excess_kurtosis
    assert optimal_alpha(gg, 2, "aciq") / float(gg.std) < optimal_alpha(lap, 2, "aciq") / float(lap.std)


@pytest.mark.parametrize("dist", [Gaussian(1.5), Laplace(0.5), StudentT(6.0, 1.0)], ids=repr)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_octav_agrees_with_direct_minimiser(dist, bits):
    a_oct = octav_alpha(dist, bits)
    res = optimize.minimize_scalar(lambda a: float(octav_objective(dist, a, bits)),
                                   bounds=(0.1 * a_oct, 5 * a_oct), method="bounded",
                                   options={"xatol": 1e-10 * a_oct})
    tol = {2: 0.05, 4: 0.01, 8: 1e-3}[bits]
    assert a_oct == pytest.approx(res.x, rel=tol)
    # and the aciq-grid optimum, which differs only by the in-range mass on the noise term
    assert a_oct == pytest.approx(optimal_alpha(dist, bits, "aciq"), rel=tol)


def test_octav_gap_shrinks_with_bits():
    d = Gaussian(1.0)
    gaps = []
    for m in (2, 3, 4, 6, 8):
        a = octav_alpha(d, m)
        r = optimize.minimize_scalar(lambda x: float(octav_objective(d, x, m)), bounds=(0.5, 10),
                                     method="bounded", options={"xatol": 1e-12}).x
        gaps.append(abs(a / r - 1))
    assert all(b < a for a, b in zip(gaps, gaps[1:])), gaps


def test_bit_allocation_follows_two_thirds_power_law():
    a = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
    budget = a.size * 2**4
    m = allocate_bits(a, budget)
    assert np.sum(2.0**m) == pytest.approx(budget)
    # 2^{M_i} proportional to alpha^{2/3}
    np.testing.assert_allclose(2.0**m / a ** (2 / 3), (2.0**m / a ** (2 / 3))[0])
    # it beats equal allocation on the ACIQ noise model
    noise = lambda bits: np.sum(a**2 / (3 * 4.0**bits))
    assert noise(m) < noise(np.full(a.size, 4.0))
    mi = allocate_bits(a, budget, integer=True)
    assert np.sum(2.0**mi) <= budget and mi.dtype.kind == "i"
    with pytest.raises(ValueError):
        allocate_bits([1.0, -1.0], 8)


def test_bias_correction_restores_channel_mean_and_norm():
    rng = np.random.default_rng(1)
    w = rng.laplace(0.1, 0.5, size=(8, 256))
    from theory import quantize
    wq = quantize(w, "int", 0.8, 3)
    wc = bias_correct(w, wq, axis=1)
    np.testing.assert_allclose(wc.mean(axis=1), w.mean(axis=1), atol=1e-12)
    np.testing.assert_allclose(wc.std(axis=1), w.std(axis=1), rtol=1e-12)
    assert np.mean((wc - w) ** 2) < np.mean((wq - w) ** 2) * 1.5
    with pytest.raises(ValueError):
        bias_correct(w, wq[:, :10])


def test_derivations_export_latex_for_every_family():
    for name in ("gaussian", "laplace", "gennorm", "student_t"):
        tex = aciq_clipping(name).latex()
        assert r"\begin{align*}" in tex and "MSE" in tex


@pytest.mark.parametrize("call", [
    lambda: optimal_alpha(Gaussian(1.0), 0, "int"),
    lambda: optimal_alpha(Gaussian(1.0), 17, "aciq"),
    lambda: optimal_alpha(Gaussian(1.0), 4, "nf4"),
    lambda: optimal_alpha(Lognormal(0, 1.0), 4, "midrise"),
    lambda: octav_alpha(Gaussian(1.0), 40),
])
def test_bad_input(call):
    with pytest.raises(ValueError):
        call()


def test_student_t_tends_to_gaussian_for_large_nu():
    """The t constants go through loggamma, so huge nu neither overflows nor loses the limit."""
    for nu in (500.0, 5000.0):
        d = StudentT(nu, 1.0)
        g = Gaussian(float(d.std))
        assert optimal_alpha(d, 4, "int") == pytest.approx(optimal_alpha(g, 4, "int"), rel=5 / nu)
