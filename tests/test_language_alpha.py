"""Language-aware alpha: closed forms against numerics, independent roots, and the orderings that
the three choices must satisfy by their definitions."""

import math

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, special

from theory import (
    GeneralizedGaussian, Gaussian, Laplace, Lognormal, StudentT, optimal_alpha,
)
from theory.grids import quantize
from theory.language_alpha import (
    aciq_penalty_expr, alpha_penalty, language_alphas, laplace_penalty_expr, minimax_alpha,
    mixture_alpha, mixture_mse, weighted_alpha,
)

HYP = settings(max_examples=20, deadline=None)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_laplace_penalty_closed_form_equals_numeric(m):
    expr, u, M = laplace_penalty_expr()
    f = sp.lambdify((u, M), expr, modules=[{"LambertW": lambda z: special.lambertw(z).real}, "numpy"])
    a_star = float(special.lambertw(3 * 4**m).real)
    for b in (1e-3, 1.0, 7.0):
        for r in (0.3, 0.8, 1.0, 1.5, 3.0):
            closed = float(np.real(f(r * a_star, m)))
            numeric = alpha_penalty(Laplace(b), r * a_star * b, m, "aciq")
            assert closed == pytest.approx(numeric, rel=1e-9, abs=1e-12)
    assert float(np.real(f(a_star, m))) == pytest.approx(0.0, abs=1e-12)


def test_aciq_penalty_expr_is_zero_at_its_optimum():
    expr, a, a_star, M = aciq_penalty_expr(Gaussian)
    star = optimal_alpha(Gaussian(1.0), 4, "aciq")
    val = float(expr.subs({a: star, a_star: star, M: 4}).evalf())
    assert val == pytest.approx(0.0, abs=1e-12)
    assert float(expr.subs({a: 1.5 * star, a_star: star, M: 4}).evalf()) == pytest.approx(
        alpha_penalty(Gaussian(1.0), 1.5 * star, 4, "aciq"), rel=1e-8)


@pytest.mark.parametrize("w", [(0.5, 0.5), (0.9, 0.1), (0.2, 0.8)])
def test_mixture_alpha_two_laplace_matches_hand_derivative(w):
    """ACIQ grid: d/dalpha [sum_l w_l (2 b_l^2 e^{-alpha/b_l}) + alpha^2/(3 4^M)] = 0 by brentq."""
    b, m = (1.0, 3.0), 4

    def d(a):
        return sum(wi * (-2 * bi * math.exp(-a / bi)) for wi, bi in zip(w, b)) + 2 * a / (3 * 4**m)

    ref = optimize.brentq(d, 1e-3, 100.0, xtol=1e-14)
    got = mixture_alpha([Laplace(1.0), Laplace(3.0)], m, "aciq", weights=w)
    assert got == pytest.approx(ref, rel=1e-9)


def test_mixture_mse_matches_sampled_mixture():
    """The mixture of MSEs is the MSE of the mixture: check on samples, not on the same algebra."""
    rng = np.random.default_rng(1)
    n = 400_000
    w = np.array([0.7, 0.3])
    x = np.concatenate([rng.laplace(0, 1.0, int(w[0] * n)), 2.5 * rng.standard_t(6, int(w[1] * n))])
    dists = [Laplace(1.0), StudentT(6.0, 2.5)]
    for grid, bits in (("int", 4), ("midrise", 3)):
        for alpha in (2.0, 6.0):
            err = (x - quantize(x, grid, alpha, bits)) ** 2
            se = err.std() / math.sqrt(err.size)
            assert abs(err.mean() - mixture_mse(dists, alpha, bits, grid, weights=w)) < 4 * se


def test_single_language_is_its_own_optimum():
    d = {"en": StudentT(5.0, 0.3)}
    r = language_alphas(d, 4, "int")
    a = optimal_alpha(d["en"], 4, "int")
    for choice in ("mix", "minimax", "weighted"):
        assert r.alpha[choice] == pytest.approx(a, rel=1e-9)
        assert r.penalty[choice][0] == pytest.approx(0.0, abs=1e-9)


def test_identical_languages_pay_nothing():
    r = language_alphas({"en": Gaussian(2.0), "fr": Gaussian(2.0)}, 4, "int", mix_weights=[10, 1])
    assert max(r.penalty["mix"]) == pytest.approx(0.0, abs=1e-12)


def test_minority_language_pays_more_under_the_token_mix():
    # 90% English tokens with small activations, 10% Hebrew with twice the scale
    r = language_alphas({"en": Laplace(1.0), "he": Laplace(2.0)}, 4, "aciq", mix_weights=[9, 1])
    assert r.worst("mix")[0] == "he"
    assert r.penalty["mix"][1] > 2 * r.penalty["mix"][0]
    # minimax equalises the two penalties at its optimum (the two curves cross there)
    assert r.penalty["minimax"][0] == pytest.approx(r.penalty["minimax"][1], rel=1e-6)
    assert r.worst("minimax")[1] < r.worst("mix")[1]


FAMILY = st.sampled_from(["gaussian", "laplace", "t5", "gg08"])


def _dist(name, scale):
    return {"gaussian": Gaussian(scale), "laplace": Laplace(scale), "t5": StudentT(5.0, scale),
            "gg08": GeneralizedGaussian(0.8, scale)}[name]


@HYP
@given(fams=st.lists(FAMILY, min_size=2, max_size=4),
       scales=st.lists(st.floats(0.2, 5.0), min_size=4, max_size=4),
       weights=st.lists(st.floats(0.05, 1.0), min_size=4, max_size=4),
       bits=st.sampled_from([3, 4, 6]), grid=st.sampled_from(["int", "aciq", "midrise"]))
def test_choices_are_ordered_by_their_objectives(fams, scales, weights, bits, grid):
    dists = {f"l{i}": _dist(f, s) for i, (f, s) in enumerate(zip(fams, scales))}
    w = weights[: len(dists)]
    r = language_alphas(dists, bits, grid, mix_weights=w)
    lo, hi = r.alpha_star.min(), r.alpha_star.max()
    for a in r.alpha.values():
        assert lo * (1 - 1e-9) <= a <= hi * (1 + 1e-9)
    tol = 1e-9
    # each choice is the best under its own objective
    assert max(r.penalty["minimax"]) <= min(max(r.penalty["mix"]), max(r.penalty["weighted"])) + tol
    fair = r.fair_weights
    assert fair @ r.penalty["weighted"] <= min(fair @ r.penalty["mix"], fair @ r.penalty["minimax"]) + tol
    mix = {c: mixture_mse(list(dists.values()), a, bits, grid, weights=w) for c, a in r.alpha.items()}
    assert mix["mix"] <= min(mix["minimax"], mix["weighted"]) * (1 + tol)
    assert np.all(np.concatenate(list(r.penalty.values())) >= 0)


@HYP
@given(c=st.floats(1e-6, 1e6), bits=st.sampled_from([2, 4, 8]))
def test_alphas_scale_with_the_data(c, bits):
    base = language_alphas({"a": Laplace(1.0), "b": Gaussian(2.0)}, bits, "int", mix_weights=[3, 1])
    scaled = language_alphas({"a": Laplace(c), "b": Gaussian(2.0 * c)}, bits, "int", mix_weights=[3, 1])
    for k in base.alpha:
        assert scaled.alpha[k] == pytest.approx(c * base.alpha[k], rel=1e-6)
        np.testing.assert_allclose(scaled.penalty[k], base.penalty[k], rtol=1e-5, atol=1e-9)


def test_bad_input_is_refused_clearly():
    two = {"en": Laplace(1.0), "he": Laplace(2.0)}
    with pytest.raises(ValueError, match="no languages"):
        language_alphas({}, 4, "int")
    with pytest.raises(ValueError, match="3 weights for 2 languages"):
        language_alphas(two, 4, "int", mix_weights=[1, 2, 3])
    with pytest.raises(ValueError, match="NaN or inf"):
        mixture_alpha(two, 4, "int", weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_alpha(two, 4, "int", weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="no weight for"):
        language_alphas(two, 4, "int", mix_weights={"en": 1.0})
    with pytest.raises(ValueError, match="one-sided and signed"):
        minimax_alpha({"en": Laplace(1.0), "x": Lognormal(0.0, 0.5)}, 4, "int")
    with pytest.raises(TypeError, match="Distribution"):
        language_alphas({"en": 1.0}, 4, "int")
    with pytest.raises(ValueError, match="bits"):
        language_alphas(two, 17, "int")
    with pytest.raises(ValueError, match="grid"):
        language_alphas(two, 4, "nf4")
