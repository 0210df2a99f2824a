"""The additive damage model, disparity curves, the critical fraction and the optimal ranking."""

import itertools

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.protection import (
    DamageModel, critical_fraction, disparity_bound, disparity_curve, fit_sensitivities, min_linear_fractional,
    rank_layers, sharpness_derivation,
)

LANGS = ["eng", "heb", "jpn", "rus"]


def _model(seed=0, n=8, equal=False):
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.5, 3.0, size=(len(LANGS), n))
    s[0] *= 0.6  # the reference suffers less
    eps = rng.uniform(1e-4, 1e-3, size=n)
    n_params = np.full(n, 1000.0) if equal else rng.integers(500, 5000, size=n).astype(float)
    return s, eps, n_params


def test_additive_model_reproduces_an_exactly_additive_case():
    s, eps, n_params = _model()
    # "measure" an exactly additive system: each language's degradation is a sum over quantized layers
    measure = lambda quantized: (s * eps)[:, quantized].sum(axis=1)
    single = np.stack([measure(np.eye(len(eps), dtype=bool)[i]) for i in range(len(eps))], axis=1)
    fitted = fit_sensitivities(single, eps)
    np.testing.assert_allclose(fitted, s, rtol=1e-12)
    m = DamageModel.from_sensitivities(fitted, eps, n_params, LANGS)
    order = rank_layers(m, "position")
    p, d, _ = disparity_curve(m, order)
    mask = np.zeros(len(eps), dtype=bool)
    for k, i in enumerate([None, *order]):
        if i is not None:
            mask[i] = True
        meas = measure(~mask)
        if meas[0] > 0:
            assert d[k] == pytest.approx(np.mean(meas[1:] / meas[0]), rel=1e-12)


def test_disparity_crossing_matches_excess_sign_condition():
    s, eps, n_params = _model(1)
    m = DamageModel.from_sensitivities(s, eps, n_params, LANGS)
    e = m.excess_damage()
    order = rank_layers(m, "excess")
    mask = np.zeros(len(eps), dtype=bool)
    for i in order[:-1]:
        mask[i] = True
        assert (m.disparity(mask) <= 1) == (e[~mask].sum() <= 0)


def test_excess_ranking_is_optimal_for_equal_sized_layers():
    s, eps, n_params = _model(2, n=6, equal=True)
    m = DamageModel.from_sensitivities(s, eps, n_params, LANGS)

    def first_k(order):
        p, d, _ = disparity_curve(m, order)
        hit = np.flatnonzero(np.isfinite(d) & (d <= 1))
        return p[hit[0]] if hit.size else np.inf

    best = min(first_k(np.array(o)) for o in itertools.permutations(range(6)))
    assert first_k(rank_layers(m, "excess")) == pytest.approx(best)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_excess_ranking_beats_other_rankings_within_one_layer(seed):
    s, eps, n_params = _model(seed, n=10)
    m = DamageModel.from_sensitivities(s, eps, n_params, LANGS)
    rng = np.random.default_rng(seed)
    kurt = rng.uniform(0, 10, size=10)
    p_ex = critical_fraction(*disparity_curve(m, rank_layers(m, "excess"))[:2])
    slack = n_params.max() / n_params.sum()
    for r in ("position", "reverse_position", "size"):
        p_r = critical_fraction(*disparity_curve(m, rank_layers(m, r))[:2])
        assert p_ex <= p_r + slack
    p_k = critical_fraction(*disparity_curve(m, rank_layers(m, "kurtosis", kurtosis=kurt))[:2])
    assert p_ex <= p_k + slack


def test_critical_fraction_interpolates_and_handles_no_crossing():
    assert critical_fraction([0, 0.5, 1.0], [3.0, 2.0, 0.0]) == pytest.approx(0.75)
    assert critical_fraction([0, 0.5], [0.8, 0.5]) == 0.0
    assert critical_fraction([0, 0.5, 1.0], [3.0, 2.0, np.nan]) == 1.0  # only full protection
    assert np.isnan(critical_fraction([0, 0.5], [3.0, 2.0]))  # stopped before crossing
    assert np.isnan(critical_fraction([0, 0.5], [np.nan, np.nan]))  # never defined
    assert critical_fraction([0, 0.3, 0.6, 1.0], [np.nan, 2.0, 0.5, np.nan]) == pytest.approx(0.3 + 0.3 * 2 / 3)


def test_sharpness_slope_from_sympy_matches_numeric_curve():
    der = sharpness_derivation()
    p, q = sp.symbols("p q", real=True)
    a_expr, b_expr = 2 - 2 * q, 3 * (1 - q) ** 2 + 0.5 * (1 - q)  # densities on [0, 1]
    A = sp.integrate(a_expr, (q, p, 1))
    B = sp.integrate(b_expr, (q, p, 1))
    # D(p) = B/A, crossing where B = A
    pstar = [r for r in sp.solve(sp.Eq(B, A), p) if r.is_real and 0 < r < 1]
    assert len(pstar) == 1
    pstar = pstar[0]
    numeric = sp.diff(B / A, p).subs(p, pstar)
    slope = der["slope_at_crossing"].rhs.subs({sp.Function("a")(p): a_expr.subs(q, p),
                                               sp.Function("b")(p): b_expr.subs(q, p)})
    slope = slope.subs(sp.Integral(sp.Function("a")(q), (q, p, 1)), A).doit().subs(p, pstar)
    assert float(slope) == pytest.approx(float(numeric), rel=1e-12)


@pytest.mark.parametrize("call,match", [
    (lambda: fit_sensitivities([[1.0, np.nan]], [1.0, 1.0]), "NaN"),
    (lambda: fit_sensitivities([[1.0, 2.0]], [1.0, 0.0]), "eps"),
    (lambda: DamageModel(np.ones((2, 3)), [1, 1, 1], ["eng", "heb"], ["xxx"]), "reference"),
    (lambda: DamageModel(np.ones((2, 3)), [1, 1, 1], ["eng", "heb"], ["eng", "heb"]), "reference group"),
    (lambda: rank_layers(DamageModel(np.ones((2, 3)), [1, 1, 1], ["eng", "heb"], ["eng"]), "random"), "ranking"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- disparity lower bounds -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_min_linear_fractional_equals_brute_force_over_vertices(n, seed):
    rng = np.random.default_rng(seed)
    a, r = rng.uniform(0, 2, n), rng.uniform(0.01, 2, n)
    lo = rng.uniform(0, 1, n)
    hi = lo + rng.uniform(0, 2, n)
    val, x = min_linear_fractional(a, r, lo, hi)
    brute = min(float(a @ v / (r @ v)) for v in (np.where(bits, hi, lo)
                                                  for bits in itertools.product([0, 1], repeat=n)))
    assert val == pytest.approx(brute, rel=1e-12)
    assert np.all((x >= lo) & (x <= hi)) and float(a @ x / (r @ x)) == pytest.approx(val, rel=1e-12)
    # no interior point does better
    for _ in range(20):
        y = rng.uniform(lo, hi)
        assert float(a @ y / (r @ y)) >= val * (1 - 1e-12)


def test_disparity_bounds_bracket_the_model():
    rng = np.random.default_rng(3)
    dmg = rng.uniform(0.0, 1.0, (4, 6))
    dmg[1, 2] = -0.05  # noise below zero is clipped by the bounds
    m = DamageModel(dmg, np.arange(1, 7) * 10.0, ["eng", "heb", "jpn", "ara"], ["eng"])
    shrink = rng.uniform(0.2, 0.9, 6)
    clipped = DamageModel(np.clip(dmg, 0, None), m.n_params, m.languages, m.reference)
    for k in range(6):
        mask = np.zeros(6, dtype=bool)
        mask[:k] = True
        any_q = disparity_bound(m, mask)
        at_rate = disparity_bound(m, mask, shrink)
        assert any_q <= at_rate + 1e-12 <= clipped.disparity(mask) + 2e-12
        # x = 1 everywhere is the model itself
        assert disparity_bound(m, mask, np.ones(6)) == pytest.approx(clipped.disparity(mask), rel=1e-12)
        keep = ~mask
        a = np.clip(dmg[1:, keep], 0, None).mean(axis=0)
        assert any_q == pytest.approx(np.min(a / dmg[0, keep]), rel=1e-12)
    with pytest.raises(ValueError, match="shrink"):
        disparity_bound(m, np.zeros(6, bool), np.full(6, 1.5))


# ---- refused input: parameter counts, positions, protected masks --------------------------------


def _small_model(n_params=(1.0, 2.0, 3.0)):
    dmg = np.array([[1.0, 2.0, 3.0], [2.0, 5.0, 1.0]])
    return DamageModel(dmg, list(n_params), ["eng", "heb"], ["eng"])


@pytest.mark.parametrize("n_params, match", [
    ([1.0, np.nan, 3.0], r"n_params must be finite, got \[1.0, nan, 3.0\]"),
    ([1.0, np.inf, 3.0], r"n_params must be finite, got \[1.0, inf, 3.0\]"),
    ([1.0, 0.0, 3.0], r"n_params must be positive, got \[1.0, 0.0, 3.0\]"),
    ([1.0, 2.0], r"n_params must have one entry per layer \(3\), got shape \(2,\)"),
])
def test_bad_parameter_counts_are_refused(n_params, match):
    # NaN slipped through "n_params <= 0" and made every protected fraction NaN
    with pytest.raises(ValueError, match=match):
        _small_model(n_params)


@pytest.mark.parametrize("positions, match", [
    ([0, 1], r"positions must have one entry per layer \(3\), got shape \(2,\)"),
    ([0, 1, 2, 3], r"positions must have one entry per layer \(3\), got shape \(4,\)"),
    ([0, np.nan, 2], r"positions must be finite"),
])
def test_bad_positions_are_refused(positions, match):
    m = _small_model()
    for ranking in ("position", "reverse_position"):
        with pytest.raises(ValueError, match=match):
            rank_layers(m, ranking, positions=positions)
    # right length: the order follows the positions
    assert rank_layers(m, "position", positions=[2.0, 0.0, 1.0]).tolist() == [1, 2, 0]
    assert rank_layers(m, "reverse_position", positions=[2.0, 0.0, 1.0]).tolist() == [0, 2, 1]


def _mask_calls(m, mask):
    return [lambda: m.degradation(mask), lambda: m.disparity(mask),
            lambda: m.per_language_disparity(mask), lambda: disparity_bound(m, mask),
            lambda: disparity_bound(m, mask, np.ones(3))]


@pytest.mark.parametrize("mask, match", [
    # read as booleans, [0, 1, 2] protected layers 1 and 2, not 0, 1 and 2
    ([0, 1, 2], r"protected_mask must be booleans, got integers \[0, 1, 2\]: pass a boolean mask or use "
                r"protected indices"),
    (np.array([1, 0, 1]), r"protected_mask must be booleans, got integers \[1, 0, 1\]"),
    ([0.0, 1.0, 0.0], r"protected_mask must be booleans, got dtype float64"),
    ([True, False], r"protected_mask must have one entry per layer \(3\), got shape \(2,\)"),
    ([[True, False, True]], r"protected_mask must have one entry per layer \(3\), got shape \(1, 3\)"),
])
def test_bad_protected_masks_are_refused(mask, match):
    m = _small_model()
    for call in _mask_calls(m, mask):
        with pytest.raises(ValueError, match=match):
            call()


def test_boolean_masks_as_lists_or_arrays_agree():
    m = _small_model()
    # protecting layer 1: eng keeps 1 + 3 = 4, heb 2 + 1 = 3, so D = 3/4
    for mask in ([False, True, False], np.array([False, True, False]), (False, True, False)):
        np.testing.assert_array_equal(m.degradation(mask), [4.0, 3.0])
        assert m.disparity(mask) == pytest.approx(0.75)
