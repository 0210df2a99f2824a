"""Degradation, disparity and the paired bootstrap (docs/design.md, "Degradation and disparity")."""

import math

import numpy as np
import pytest

from empirical.disparity import bootstrap_degradation, bootstrap_disparity, degradation, disparity, r_squared

# Two languages, three sentences; every number below is worked out by hand in the comments.
FP = {"eng": [1.0, 2.0, 3.0], "heb": [2.0, 2.0, 4.0]}   # sums 6 and 8
Q = {"eng": [1.2, 2.1, 3.3], "heb": [2.4, 2.6, 4.6]}    # sums 6.6 and 9.6


def test_hand_computed_example():
    d = degradation(Q, FP)
    assert d["eng"] == pytest.approx(6.6 / 6 - 1)  # 0.1
    assert d["heb"] == pytest.approx(9.6 / 8 - 1)  # 0.2
    assert disparity(d, ["eng"]) == pytest.approx(2.0)  # 0.2 / 0.1
    # resample [0, 0, 0]: eng 3.6 / 3 - 1 = 0.2, heb 7.2 / 6 - 1 = 0.2, D = 1
    # resample [2, 2, 1]: eng (3.3+3.3+2.1) / (3+3+2) - 1 = 0.0875, heb (4.6+4.6+2.6) / (4+4+2) - 1 = 0.18,
    #                     D = 0.18 / 0.0875 = 2.0571428...
    ids = np.array([[0, 0, 0], [2, 2, 1]])
    dd = degradation(Q, FP, {"eng": ids, "heb": ids})
    np.testing.assert_allclose(dd["eng"], [0.2, 0.0875])
    np.testing.assert_allclose(dd["heb"], [0.2, 0.18])
    np.testing.assert_allclose(disparity(dd, "eng"), [1.0, 0.18 / 0.0875])


def test_undegraded_reference_gives_nan():
    d = degradation({"eng": FP["eng"], "heb": Q["heb"]}, FP)  # eng: d = 0
    assert d["eng"] == 0.0 and math.isnan(disparity(d, ["eng"]))
    assert np.isnan(disparity({"eng": np.array([0.1, 0.0, -0.1]), "heb": np.array([0.2, 0.2, 0.2])}, ["eng"])[1:]).all()


def test_reference_group_is_averaged():
    d = {"eng": 0.1, "fra": 0.3, "heb": 0.4, "jpn": 0.8}
    # dbar_R = (0.1 + 0.3) / 2 = 0.2; D = mean(0.4, 0.8) / 0.2 = 3
    assert disparity(d, ["eng", "fra"]) == pytest.approx(3.0)


def test_disparity_and_bootstrap_statistics():
    rng = np.random.default_rng(0)
    fp = {"eng": rng.uniform(10, 20, 50), "heb": rng.uniform(10, 20, 50)}
    q = {"eng": fp["eng"] * 1.01, "heb": fp["heb"] * 1.03}
    d = degradation(q, fp)
    assert d["eng"] == pytest.approx(0.01) and d["heb"] == pytest.approx(0.03)
    assert disparity(d, ["eng"]) == pytest.approx(3.0)
    lo, hi = bootstrap_disparity(q, fp, ["eng"], parallel=True, n_boot=200, seed=0)
    assert lo == pytest.approx(3.0) and hi == pytest.approx(3.0)  # constant ratios: no spread
    ci = bootstrap_degradation(q, fp, parallel=True, n_boot=200, seed=0)
    assert ci["eng"] == pytest.approx((0.01, 0.01)) and ci["heb"] == pytest.approx((0.03, 0.03))
    q2 = {"eng": fp["eng"] * rng.uniform(1.0, 1.02, 50), "heb": fp["heb"] * rng.uniform(1.0, 1.06, 50)}
    lo, hi = bootstrap_disparity(q2, fp, ["eng"], parallel=True, n_boot=300, seed=0)
    assert lo < disparity(degradation(q2, fp), ["eng"]) < hi
    ci = bootstrap_degradation(q2, fp, parallel=True, n_boot=300, seed=0)
    for l, v in degradation(q2, fp).items():
        assert ci[l][0] < v < ci[l][1]
    assert r_squared([1, 2, 3], [1, 2, 3]) == 1.0


def _loop_ids(sizes, parallel, n_boot, seed):
    draw = np.random.default_rng(seed)  # the same stream the bootstrap draws from
    n = next(iter(sizes.values()))
    shared = draw.integers(0, n, (n_boot, n)) if parallel else None
    return {l: shared if parallel else draw.integers(0, m, (n_boot, m)) for l, m in sizes.items()}


@pytest.mark.parametrize("parallel", [True, False])
def test_vectorised_bootstrap_equals_a_loop_over_resamples(parallel):
    """The (n_boot, n) resampling gives, resample by resample, the scalar D of docs/design.md."""
    rng = np.random.default_rng(1)
    sizes = {"eng": 40, "heb": 40 if parallel else 33, "jpn": 40 if parallel else 47}
    fp = {l: rng.uniform(10, 20, n) for l, n in sizes.items()}
    q = {l: v * rng.uniform(1.0, 1.05, v.size) for l, v in fp.items()}
    n_boot = 120
    ids = _loop_ids(sizes, parallel, n_boot, 7)
    loop, loop_d = [], {l: [] for l in sizes}
    for b in range(n_boot):
        d = {l: float(q[l][ids[l][b]].sum() / fp[l][ids[l][b]].sum() - 1.0) for l in sizes}
        for l in sizes:
            loop_d[l].append(d[l])
        ref = d["eng"]
        loop.append(np.mean([d[l] / ref for l in ("heb", "jpn")]) if ref > 0 else np.nan)
    loop = np.asarray(loop)
    loop = loop[np.isfinite(loop)]
    lo, hi = bootstrap_disparity(q, fp, ["eng"], parallel=parallel, n_boot=n_boot, seed=7)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(loop, [0.025, 0.975])), rel=1e-12)
    ci = bootstrap_degradation(q, fp, parallel=parallel, n_boot=n_boot, seed=7)
    for l in sizes:
        assert ci[l] == pytest.approx(tuple(np.quantile(loop_d[l], [0.025, 0.975])), rel=1e-12)


def test_bootstrap_gives_nan_when_the_reference_is_rarely_degraded():
    fp = {"eng": [1.0, 1.0, 1.0, 1.0], "heb": [1.0, 1.0, 1.0, 1.0]}
    q = {"eng": [1.0, 1.0, 1.0, 1.0], "heb": [1.1, 1.2, 1.1, 1.3]}  # eng never degraded: D undefined
    assert bootstrap_disparity(q, fp, ["eng"], parallel=True, n_boot=100, seed=0) == pytest.approx(
        (math.nan, math.nan), nan_ok=True)


def test_r_squared_hand_computed():
    # meas mean 2: SS_tot = 1 + 0 + 1 = 2; SS_res = (3 - 4)^2 = 1; R^2 = 1 - 1/2
    assert r_squared([1, 2, 4], [1, 2, 3]) == pytest.approx(0.5)
    assert r_squared([1, np.nan, 4, 2], [1, 7, 3, 2]) == pytest.approx(0.5)  # the NaN pair is left out
    assert math.isnan(r_squared([1, 2], [3, 3]))  # measurements do not vary
    assert math.isnan(r_squared([1.0], [1.0]))
    with pytest.raises(ValueError, match="same length"):
        r_squared([1, 2, 3], [1, 2])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same languages.*only in nll_fp: \\['heb'\\]"):
        degradation({"eng": Q["eng"]}, FP)
    with pytest.raises(ValueError, match="heb: 2 quantized but 3"):
        degradation({"eng": Q["eng"], "heb": Q["heb"][:2]}, FP)
    with pytest.raises(ValueError, match="heb: nll_q has NaN or inf at sentence 1"):
        degradation({"eng": Q["eng"], "heb": [2.4, math.nan, 4.6]}, FP)
    with pytest.raises(ValueError, match="eng: nll_fp has NaN or inf"):
        bootstrap_disparity(Q, {"eng": [1.0, math.inf, 3.0], "heb": FP["heb"]}, ["eng"], parallel=True)
    with pytest.raises(ValueError, match="negative"):
        degradation({"eng": [-1.0, -2.0, -3.0], "heb": Q["heb"]}, FP)
    with pytest.raises(ValueError, match="not among the languages"):
        disparity(degradation(Q, FP), ["fra"])
    with pytest.raises(ValueError, match="every language is in the reference group; give at least one non-reference"):
        disparity(degradation(Q, FP), ["eng", "heb"])
    with pytest.raises(ValueError, match="every language is in the reference group"):
        bootstrap_disparity(Q, FP, ["eng", "heb"], parallel=True)
    with pytest.raises(ValueError, match="parallel corpus needs the same number"):
        bootstrap_disparity({"eng": Q["eng"], "heb": Q["heb"][:2]}, {"eng": FP["eng"], "heb": FP["heb"][:2]},
                            ["eng"], parallel=True)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_degradation(Q, FP, parallel=True, n_boot=0)


def test_metric_summary_kl_degradation_and_interval_widths():
    """d^KL = sum KL / sum NLL_fp per language (eq. 3), both metrics share resamples, a metric
    whose NLL carries sampling noise gets a wider interval, and top-1 agreement is the token-
    weighted share."""
    import math

    from empirical.disparity import metric_nll, metric_summary

    rng = np.random.default_rng(1)
    n = 80
    fp = {l: rng.uniform(20, 40, n) for l in ("eng", "heb", "jpn")}
    kl = {"eng": rng.uniform(0.5, 1.5, n), "heb": rng.uniform(1.5, 2.5, n), "jpn": rng.uniform(1.0, 3.0, n)}
    q = {l: fp[l] + kl[l] + rng.normal(0, 3, n) for l in fp}  # realised NLL: KL plus sampling noise
    tok = {l: rng.integers(5, 15, n) for l in fp}
    agree = {l: np.minimum(tok[l], rng.integers(3, 15, n)) for l in fp}
    out = metric_summary(q, fp, kl, agree, tok, "eng", parallel=True, n_boot=400, seed=3)
    for l in fp:
        assert out["kl"]["degradation"][l] == pytest.approx(kl[l].sum() / fp[l].sum())
        assert out["bpb"]["degradation"][l] == pytest.approx(q[l].sum() / fp[l].sum() - 1)
        assert out["top1_agreement"][l] == pytest.approx(agree[l].sum() / tok[l].sum())
    assert out["scored_tokens"] == sum(int(v.sum()) for v in tok.values())
    k, b = out["kl"], out["bpb"]
    assert k["disparity_ci_width"] < b["disparity_ci_width"]
    assert k["width_per_token"] == pytest.approx(k["disparity_ci_width"] * math.sqrt(out["scored_tokens"]))
    assert out["token_cost_ratio"] == pytest.approx((b["relative_width"] / k["relative_width"]) ** 2)
    assert out["token_cost_ratio"] > 1
    assert k["resolved"] == (k["disparity_ci"][0] > 1 or k["disparity_ci"][1] < 1)
    with pytest.raises(ValueError, match="unknown metric"):
        metric_nll("ppl", q, fp, kl)
    with pytest.raises(ValueError, match="needs the per-sentence KL"):
        metric_nll("kl", q, fp, None)
    with pytest.raises(ValueError, match="negative"):
        metric_nll("kl", q, fp, {**kl, "eng": -kl["eng"]})
    assert "kl" not in metric_summary(q, fp, None, None, tok, "eng", True, n_boot=50)
    nb = {l: rng.integers(20, 80, n) for l in fp}
    with_bytes = metric_summary(q, fp, kl, agree, tok, "eng", parallel=True, n_boot=400, seed=3, n_bytes=nb)
    assert with_bytes["kl"] == out["kl"]  # the same resamples
    for l in fp:
        r = with_bytes["kl_bpb"][l]
        assert r["kl_bpb"] == pytest.approx(kl[l].sum() / (math.log(2) * nb[l].sum()))
        assert r["bpb_increase"] == pytest.approx((q[l].sum() - fp[l].sum()) / (math.log(2) * nb[l].sum()))
        assert r["ci_low"] < r["kl_bpb"] < r["ci_high"]
