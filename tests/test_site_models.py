"""Site models (theory.site_models): exact identities of the channel mixture and its optimum."""

import numpy as np
import pytest

from theory import expected_mse, optimal_alpha
from theory.grids import quantize
from theory.site_models import (
    ChannelMixture, FamilySite, Mixture, bulk_outlier_model, curve_distance, fit_unit_shape,
    interval_moments, outlier_channels, select_site_model, site_mse_on_levels, unit_variance,
)

SHAPES = [("gaussian", ()), ("laplace", ()), ("student_t", (4.0,)), ("gennorm", (0.7,))]


@pytest.mark.parametrize("fam,shape", SHAPES)
@pytest.mark.parametrize("grid", ["int", "midrise", "midtread", "aciq"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_one_channel_mixture_equals_its_family(fam, shape, grid, bits):
    u = unit_variance(fam, *shape)
    d = u.with_scale(float(u.scale) * 2.5)
    cm = ChannelMixture(fam, shape, [0.0], [2.5], [1.0])
    a = np.array([0.3, 2.0, 7.5, 40.0])
    np.testing.assert_allclose(cm.mse(a, bits, grid), expected_mse(d, a, bits, grid), rtol=1e-9)


@pytest.mark.parametrize("fam,shape", SHAPES)
def test_unit_variance(fam, shape):
    assert float(unit_variance(fam, *shape).variance) == pytest.approx(1.0, rel=1e-12)


def test_unit_variance_refuses_infinite_variance():
    with pytest.raises(ValueError, match="no finite variance"):
        unit_variance("student_t", 1.5)


@pytest.mark.parametrize("fam,shape", SHAPES)
def test_interval_moments_against_quadrature(fam, shape):
    from scipy import integrate

    u = unit_variance(fam, *shape)
    for a, b in [(-3.0, -0.5), (-0.7, 1.2), (0.4, 2.5), (-np.inf, -1.0), (1.5, np.inf)]:
        m = interval_moments(u, a, b)
        for k in range(3):
            ref = integrate.quad(lambda z: z**k * float(u.pdf(z)), a, b, limit=200, epsabs=1e-13)[0]
            assert float(m[k]) == pytest.approx(ref, rel=1e-7, abs=1e-11)


@pytest.mark.parametrize("fam,shape", [*SHAPES[:2], ("student_t", (9.0,)), SHAPES[3]])
def test_mixture_mse_equals_quadrature_of_mixed_density(fam, shape):
    """sum_c w_c MSE_c(alpha) is the MSE of the mixed density, integrated directly (a Student-t
    with nu = 9: with heavier tails the grid's +-400 would miss part of the clipping error)."""
    u = unit_variance(fam, *shape)
    mu, s, w = np.array([0.0, 2.0, -1.0]), np.array([1.0, 0.3, 4.0]), np.array([0.5, 0.3, 0.2])
    cm = ChannelMixture(fam, shape, mu, s, w)
    x = np.linspace(-400, 400, 4_000_001)
    dx = x[1] - x[0]
    dens = sum(wi * u.pdf((x - mi) / si) / si for mi, si, wi in zip(mu, s, w))
    for bits, alpha in [(3, 3.0), (4, 6.0), (8, 12.0)]:
        err = (x - quantize(x, "int", alpha, bits)) ** 2
        ref = float(np.sum(err * dens) * dx)
        assert float(cm.mse(alpha, bits, "int")) == pytest.approx(ref, rel=2e-4)


def test_shifted_family_site_against_quadrature():
    u = unit_variance("laplace")
    site = FamilySite(u.with_scale(float(u.scale) * 0.7), loc=3.0)
    x = np.linspace(-60, 60, 3_000_001)
    dens = u.pdf((x - 3.0) / 0.7) / 0.7
    ref = float(np.sum((x - quantize(x, "int", 4.0, 3)) ** 2 * dens) * (x[1] - x[0]))
    assert float(site.mse(4.0, 3, "int")) == pytest.approx(ref, rel=1e-5)
    assert float(site_mse_on_levels(u, 3.0, 0.7, 1.0, 4.0, 3, "int")) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("fam,shape", SHAPES)
def test_one_channel_optimum_equals_theory(fam, shape):
    u = unit_variance(fam, *shape)
    cm = ChannelMixture(fam, shape, [0.0], [3.0], [1.0])
    ref = optimal_alpha(u.with_scale(float(u.scale) * 3.0), 4, "int")
    assert cm.optimal_alpha(4, "int") == pytest.approx(ref, rel=1e-5)


def test_mixture_is_the_weighted_sum_of_channels():
    rng = np.random.default_rng(1)
    cm = ChannelMixture("student_t", (5.0,), rng.normal(size=6), np.exp(rng.normal(size=6)), rng.random(6) + 0.1)
    per = cm.channel_mse(2.0, 4, "int")
    assert float(cm.mse(2.0, 4, "int")) == pytest.approx(float(np.sum(per * cm.weight)), rel=1e-12)


def test_from_power_sums_moments():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(5000, 4)) * np.array([1, 2, 3, 4])
    cm = ChannelMixture.from_power_sums(np.full(4, 5000), x.sum(0), (x * x).sum(0))
    np.testing.assert_allclose(cm.loc, x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(cm.scale, x.std(0), rtol=1e-10)


def test_bulk_plus_outlier_channels_beats_unimodal():
    """A bulk of 255 narrow channels and one channel 50x wider: the mixture's alpha* is within
    1% MSE of the exact sweep of a large sample, a unimodal Gaussian fit's is not."""
    from empirical.optimal import empirical_optimal_alpha
    from empirical.sweep import prepare
    from theory import Gaussian

    rng = np.random.default_rng(3)
    C, T = 256, 4000
    s = np.full(C, 1.0)
    s[17] = 50.0
    x = rng.standard_normal((T, C)) * s
    flat = x.ravel()
    sm = prepare(flat)
    opt = empirical_optimal_alpha(sm, 4, "int")
    cm = ChannelMixture.from_power_sums(np.full(C, T), x.sum(0), (x * x).sum(0), absmax=np.abs(x).max(0))
    a_cm = cm.optimal_alpha(4, "int")
    assert float(sm.mse(a_cm, 4, "int")) / opt.mse - 1 < 0.01
    a_uni = optimal_alpha(Gaussian(float(flat.std())), 4, "int")
    assert float(sm.mse(a_uni, 4, "int")) / opt.mse - 1 > 0.05
    out = outlier_channels(cm.loc, cm.scale)
    assert list(out) == [17]
    bulk = FamilySite(Gaussian(1.0))
    bo = bulk_outlier_model(bulk, cm, out)
    assert float(sm.mse(bo.optimal_alpha(4, "int"), 4, "int")) / opt.mse - 1 < 0.01


def test_fit_unit_shape_recovers_nu_and_beta():
    rng = np.random.default_rng(4)
    from scipy import stats

    z = stats.t.rvs(5.0, size=40000, random_state=rng)
    z = z / z.std()
    (nu,) = fit_unit_shape(z, "student_t")
    assert 4.0 < nu < 6.5
    g = rng.laplace(size=40000)
    (beta,) = fit_unit_shape(g / g.std(), "gennorm")
    assert 0.9 < beta < 1.1
    assert fit_unit_shape(g, "gaussian") == ()
    with pytest.raises(ValueError, match="NaN"):
        fit_unit_shape(np.array([np.nan] * 20), "student_t")


def test_curve_distance_and_selection():
    a = np.geomspace(0.5, 20, 30)
    models = {f: ChannelMixture(f, sh, [0.0], [1.0], [1.0]) for f, sh in SHAPES}
    truth = models["laplace"].mse(a, 4, "int")
    name, d = select_site_model(models, a, truth, 4, "int")
    assert name == "laplace" and d["laplace"] == pytest.approx(0.0, abs=1e-12)
    assert curve_distance(truth * 7.0, truth) == pytest.approx(0.0, abs=1e-12)  # level-free
    assert curve_distance([1.0, 2.0], [1.0, 2.0]) == float("inf")


def test_mixture_refusals():
    with pytest.raises(ValueError, match="NaN or inf"):
        ChannelMixture("gaussian", (), [np.nan], [1.0], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        ChannelMixture("gaussian", (), [0.0], [-1.0], [1.0])
    with pytest.raises(ValueError, match="one weight per component"):
        Mixture([FamilySite(unit_variance("gaussian"))], [0.5, 0.5])
    with pytest.raises(ValueError, match="bits"):
        ChannelMixture("gaussian", (), [0.0], [1.0], [1.0]).mse(1.0, 0, "int")


def test_language_alphas_accept_site_models():
    """theory.language_alphas on channel mixtures: a one-channel mixture gives the same alphas
    and penalties as its family; two languages whose outlier channel differs get different
    alpha* and a positive penalty for the one farther from the mix."""
    from theory import language_alphas

    u1, u2 = unit_variance("laplace"), unit_variance("laplace")
    d = {"a": u1.with_scale(float(u1.scale) * 1.0), "b": u2.with_scale(float(u2.scale) * 3.0)}
    cm = {"a": ChannelMixture("laplace", (), [0.0], [1.0], [1.0]),
          "b": ChannelMixture("laplace", (), [0.0], [3.0], [1.0])}
    r_d, r_cm = language_alphas(d, 4, "int", mix_weights=[3, 1]), language_alphas(cm, 4, "int", mix_weights=[3, 1])
    for c in ("mix", "minimax", "weighted"):
        assert r_cm.alpha[c] == pytest.approx(r_d.alpha[c], rel=1e-5)
        np.testing.assert_allclose(r_cm.penalty[c], r_d.penalty[c], rtol=1e-3, atol=1e-7)
    bulk = np.ones(64)
    s_a, s_b = bulk.copy(), bulk.copy()
    s_b[5] = 40.0
    two = {"a": ChannelMixture("gaussian", (), np.zeros(64), s_a, np.ones(64)),
           "b": ChannelMixture("gaussian", (), np.zeros(64), s_b, np.ones(64))}
    r = language_alphas(two, 4, "int")
    assert r.alpha_star[1] > 2 * r.alpha_star[0]
    # the mix is dominated by b's far larger MSE: a pays, and minimax lowers the worst penalty
    assert r.penalty["mix"][0] > 1.0 and r.penalty["mix"][1] < 1e-3
    assert r.penalty["minimax"].max() < 0.5 * r.penalty["mix"].max()


@pytest.mark.parametrize("fam,shape", SHAPES)
@pytest.mark.parametrize("bits", [12, 16])
def test_one_channel_mixture_at_fine_grids(fam, shape, bits):
    """The cell differences stay within 1e-7 of theory.expected_mse (which integrates rounding by
    quadrature above 256 levels) up to 16 bits."""
    u = unit_variance(fam, *shape)
    cm = ChannelMixture(fam, shape, [0.0], [2.0], [1.0])
    a = np.array([3.0, 11.0, 40.0])
    np.testing.assert_allclose(cm.mse(a, bits, "int"),
                               expected_mse(u.with_scale(float(u.scale) * 2.0), a, bits, "int"), rtol=1e-7)


@pytest.mark.parametrize("nu", [2.05, 2.5, 3.0, 7.0, 50.0, 390.0])
def test_student_t_joint_tail_moments_equal_separate(nu):
    """StudentT._tail_moments (one incomplete beta, DLMF 8.17.20) equals the three separate
    tail moments."""
    from theory import StudentT

    d = StudentT(nu)
    t = np.array([0.0, 0.3, 1.0, 3.0, 10.0, 100.0, 1e4, np.inf])
    for k, u in enumerate(d.tail_moments(t)):
        np.testing.assert_allclose(u, d.tail_moment(k, t), rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad,needle", [(np.nan, "finite"), (-1.0, "positive"), (np.array([]), "empty")])
def test_mixture_refuses_bad_alpha(bad, needle):
    cm = ChannelMixture("gaussian", (), [0.0, 1.0], [1.0, 2.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=needle):
        cm.mse(bad, 4, "int")
