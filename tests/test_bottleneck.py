"""Linear probes of the residual stream (empirical.probes) and the bottleneck experiment
(validate.bottleneck): the probe against its closed form, held-out accuracy on separable and on
random data, the split, the hooks against ``output_hidden_states``, bad input, and an end-to-end
run whose rerun computes no forward pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from empirical import probes
from validate import _protocol as protocol
from validate import bottleneck as B
from validate._common import ResultCache

# ---- the probe -----------------------------------------------------------------------------------------


def _clusters(n_per, k, d, sep, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * sep
    y = np.repeat(np.arange(k), n_per)
    return centres[y] + rng.normal(size=(y.size, d)), y


def test_separable_data_reaches_accuracy_one_on_held_out_points():
    X, y = _clusters(60, 4, 12, 10.0, 0)
    Xt, yt = _clusters(60, 4, 12, 10.0, 0)  # same centres (same seed), new noise below
    Xt = Xt + np.random.default_rng(1).normal(size=Xt.shape) * 0.5
    groups = np.repeat(np.arange(12), 20)
    p = probes.train_probe(X, y, groups)
    assert probes.accuracy(p.predict(Xt), yt) == 1.0


def test_random_labels_give_chance_accuracy_on_held_out_points():
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(3000, 20)), rng.integers(0, 4, 3000)
    Xt, yt = rng.normal(size=(4000, 20)), rng.integers(0, 4, 4000)
    p = probes.train_probe(X, y, np.repeat(np.arange(10), 300))
    acc = probes.accuracy(p.predict(Xt), yt)
    # chance 1/4; 4000 test points give a standard error of about 0.007
    assert abs(acc - 0.25) < 0.035


def test_ridge_equals_the_closed_form_computed_directly():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(80, 7)) * rng.uniform(0.1, 10, 7) + rng.normal(size=7)
    y = rng.integers(2, 6, 80)  # labels 2..5, not 0-based
    lam = 0.05
    p = probes.fit_ridge(X, y, lam)
    mu, sd = X.mean(0), X.std(0)
    Z = (X - mu) / sd
    classes = np.unique(y)
    Y = (y[:, None] == classes).astype(float)
    ybar = Y.mean(0)
    W = np.linalg.solve(Z.T @ Z + lam * len(y) * np.eye(7), Z.T @ (Y - ybar))
    Xt = rng.normal(size=(30, 7))
    direct = ((Xt - mu) / sd) @ W + ybar
    np.testing.assert_allclose(p.scores(Xt), direct, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(p.predict(Xt), classes[np.argmax(direct, 1)])
    # the path of penalties equals separate fits
    for q, l in zip(probes.ridge_path(X, y, (1e-3, 1.0)), (1e-3, 1.0)):
        np.testing.assert_allclose(q.weights, probes.fit_ridge(X, y, l).weights, rtol=1e-8, atol=1e-12)


def test_constant_feature_is_kept_finite():
    rng = np.random.default_rng(0)
    X = np.c_[rng.normal(size=(40, 3)), np.ones(40)]
    p = probes.fit_ridge(X, rng.integers(0, 2, 40))
    assert np.all(np.isfinite(p.scores(X)))


def test_train_probe_chooses_on_validation_then_refits_on_all_rows():
    X, y = _clusters(30, 3, 6, 1.0, 2)
    groups = np.repeat(np.arange(6), 15)
    val = probes.validation_mask(groups)
    assert val.sum() == 2 * 15 and set(groups[val]) == {4, 5}  # last ceil(0.25 * 6) = 2 segments
    best, accs = probes.select_lambda(X[~val], y[~val], X[val], y[val])
    p = probes.train_probe(X, y, groups)
    assert p.lam == best and p.n_fit == len(y)
    assert best == max(accs, key=lambda l: (accs[l], l))
    np.testing.assert_allclose(p.weights, probes.fit_ridge(X, y, best).weights)


def test_validation_mask_within_strata_and_within_one_segment():
    groups = np.array(["a0"] * 4 + ["a1"] * 4 + ["b0"] * 4 + ["b1"] * 4 + ["b2"] * 4, dtype=object)
    strata = np.array(["a"] * 8 + ["b"] * 12, dtype=object)
    m = probes.validation_mask(groups, fraction=0.25, strata=strata)
    assert set(groups[m]) == {"a1", "b2"}
    one = probes.validation_mask(np.zeros(10), np.arange(1, 11), fraction=0.3)
    np.testing.assert_array_equal(np.flatnonzero(one), [7, 8, 9])


# ---- split, labels, intervals --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5, 16])
def test_segment_split_shares_no_segment(n):
    train, test = probes.segment_split(n, 0.7)
    assert train and test and not set(train) & set(test)
    assert sorted(train + test) == list(range(n)) and max(train) < min(test)


def test_token_item_never_fits_on_a_test_segment(monkeypatch):
    seen = []
    real = probes.train_probe

    def spy(X, y, groups, positions=None, *a, **k):
        seen.append(np.unique(np.asarray(X)[:, 0]))
        return real(X, y, groups, positions, *a, **k)

    monkeypatch.setattr(probes, "train_probe", spy)
    rng = np.random.default_rng(0)
    ids, feats = [], []
    for j in range(6):
        t = 20
        ids.append(np.r_[1, rng.integers(2, 6, t - 1)])
        f = rng.normal(size=(t, 4))
        f[:, 0] = j  # a feature that names the segment
        feats.append([f, f + 1.0])
    item = B.token_item(feats, ids, B.Config(model="tiny-llama", languages=("en", "he"), segments=6, top_k=3))
    assert item["test_segments"] == [4, 5]
    assert seen and all(set(s) <= {0, 1, 2, 3} for s in seen[::2])  # depth 0 (depth 1 is shifted by one)
    assert all(len(c) == 2 for c in item["token"]["correct"])
    assert item["n_test"] == [19, 19]  # BOS excluded


def test_top_k_classes_and_labels():
    ids = np.array([5, 3, 3, 9, 9, 7, 3])
    np.testing.assert_array_equal(probes.top_k_classes(ids, 2), [3, 9])
    np.testing.assert_array_equal(probes.top_k_classes(ids, 10), [3, 9, 5, 7])  # ties: smaller id first
    np.testing.assert_array_equal(probes.token_labels([9, 3, 4], [3, 9]), [1, 0, 2])


def test_accuracy_ci_and_paired_difference():
    correct = np.array([[3, 5, 0, 8], [3, 5, 0, 8]])
    n = np.array([4, 5, 2, 10])
    ci = probes.accuracy_ci(correct, n, n_boot=300, seed=1)
    np.testing.assert_allclose(ci["acc"], [16 / 21] * 2)
    assert all(lo <= a <= hi for lo, a, hi in zip(ci["ci_low"], ci["acc"], ci["ci_high"]))
    assert ci["ci_low"][0] == ci["ci_low"][1]  # same resamples for every row
    d = probes.paired_difference_ci(correct[0], correct[1], n, 300)
    assert d == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    idx = probes.bootstrap_indices(["a", "a", "b", "b", "b"], 50, 0)
    assert np.all(idx[:, :2] < 2) and np.all(idx[:, 2:] >= 2)


def test_find_bottleneck_on_planted_curves():
    n = np.full(20, 50)
    rng = np.random.default_rng(0)
    acc = np.array([0.9, 0.6, 0.3, 0.5, 0.8])
    correct = rng.binomial(50, acc[:, None], (5, 20))
    names = ["emb", "block0", "block1", "block2", "block3"]
    bn = probes.find_bottleneck(correct, n, names, 300)
    assert bn["min_name"] == "block1" and bn["interior"] and bn["bottleneck"]
    assert bn["largest_drop_name"] in ("block0", "block1")
    mono = rng.binomial(50, np.linspace(0.9, 0.3, 5)[:, None], (5, 20))
    bm = probes.find_bottleneck(mono, n, names, 300)
    assert bm["min_name"] == "block3" and not bm["interior"] and not bm["bottleneck"]


@pytest.mark.parametrize("call, match", [
    (lambda: probes.fit_ridge(np.array([[0.0, np.nan], [1.0, 2.0]]), [0, 1]), "non-finite"),
    (lambda: probes.fit_ridge(np.ones((5, 2)), [1] * 5), "one class"),
    (lambda: probes.fit_ridge(np.zeros((0, 3)), []), "empty"),
    (lambda: probes.fit_ridge(np.ones((4, 2)), [0, 1, 0]), "3 labels for 4"),
    (lambda: probes.fit_ridge(np.ones(4), [0, 1, 0, 1]), "2-d"),
    (lambda: probes.fit_ridge(np.eye(2), [0, 1], lam=0.0), "positive"),
    (lambda: probes.fit_ridge(np.eye(2), [0.5, 1.0]), "integer"),
    (lambda: probes.segment_split(1), "at least two segments"),
    (lambda: probes.accuracy([], []), "no positions"),
    (lambda: probes.accuracy_ci([1, 2], [1, 1]), "between 0"),
    (lambda: probes.top_k_classes([], 3), "no training"),
    (lambda: probes.validation_mask([]), "non-empty"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_probe_refuses_features_of_another_width():
    p = probes.fit_ridge(np.random.default_rng(0).normal(size=(10, 3)), [0, 1] * 5)
    with pytest.raises(ValueError, match="fitted on 3"):
        p.predict(np.ones((2, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        p.predict(np.array([[np.inf, 0, 0]]))


# ---- hidden states ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma"])
def test_hook_states_equal_output_hidden_states(name):
    from empirical.models import load_model, model_view

    model, _ = load_model(name, seed=0)
    view = model_view(model)
    ids = torch.tensor([[1, 17, 42, 99, 5, 250, 8]])
    states = probes.block_states(model, ids, view.blocks)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    n = len(view.blocks)
    assert len(states) == n + 1 == len(hs)
    for i in range(n):  # embedding output and every block but the last, as the model reports them
        torch.testing.assert_close(states[i], hs[i].float(), rtol=1e-5, atol=1e-6)
    # the model reports the last block's output after the final norm; the hook reads it before
    with torch.no_grad():
        torch.testing.assert_close(view.final_norm(states[-1]), hs[-1].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_hook_states_on_gemma():
    pytest.importorskip("gguf")
    from empirical.models import load_model, model_view

    model, tok = load_model("gemma-3-270m", seed=0)
    view = model_view(model)
    ids = torch.tensor([[2, *tok("Hello world, all humans are born free.", add_special_tokens=False)["input_ids"]]])
    states = probes.block_states(model, ids, view.blocks)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for i in range(len(view.blocks)):
        torch.testing.assert_close(states[i], hs[i].float(), rtol=1e-4, atol=1e-4)


# ---- the experiment ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, flag", [
    ({"segments": 1}, "--segments"), ({"top_k": 0}, "--top-k"), ({"train_fraction": 1.0}, "--train-fraction"),
    ({"train_fraction": 0.0}, "--train-fraction"), ({"lambdas": (0.1, -1.0)}, "--lambdas"),
    ({"lambdas": ()}, "--lambdas"), ({"language_positions": 0}, "--language-positions"),
    ({"languages": ("en",)}, "--languages"),
])
def test_config_refuses_bad_values(kw, flag):
    with pytest.raises(protocol.ConfigError, match=flag):
        B.Config(model="tiny-llama", **kw)


def test_config_defaults_and_quick():
    c = B.Config()
    assert c.top_k == 64 and c.train_fraction == 0.7 and c.segments == 16 and c.previous
    q = B.Config.quick()
    assert q.segments == 3 and q.max_length == 64 and q.top_k == 64


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("bottleneck")
    cache = ResultCache(root / "res" / "bottleneck" / "cache")
    c = B.Config(model="tiny-llama", languages=("en", "he", "ja"), segments=3, max_length=32, bootstrap=50)
    before = B._Counter.passes
    res = B.run(c, cache)
    first = B._Counter.passes - before
    return c, cache, res, first, root


def test_end_to_end_counts_and_rerun_without_passes(e2e):
    c, cache, res, first, root = e2e
    assert first == res["forward_passes"] == 9  # three segments of three languages, once each
    before = B._Counter.passes
    again = B.run(c, cache)
    assert B._Counter.passes == before and again["forward_passes"] == 0 and again["block_damage_passes"] == 0
    assert again["token"]["pooled"]["acc"] == res["token"]["pooled"]["acc"]


def test_end_to_end_values_agree_with_a_direct_computation(e2e):
    c, _, res, _, _ = e2e
    from empirical.models import load_model
    from validate._mechanisms import setup

    s = setup(c)
    lang = s.languages[1]
    win = s.windows()[lang]
    model = load_model("tiny-llama", seed=0)[0]
    train, test = [0, 1], [2]  # floor(0.7 * 3) = 2
    assert res["split"][lang]["train"] == train and res["split"][lang]["test"] == test
    with torch.no_grad():
        hs = [model(w, output_hidden_states=True).hidden_states for w in win]
    ids = [w[0].numpy() for w in win]
    for depth in (0, 1):  # emb, block0: equal to output_hidden_states
        x_tr = np.concatenate([hs[j][depth][0, 1:].numpy() for j in train])
        classes = probes.top_k_classes(np.concatenate([ids[j][1:] for j in train]), c.top_k)
        y_tr = probes.token_labels(np.concatenate([ids[j][1:] for j in train]), classes)
        groups = np.concatenate([[j] * (len(ids[j]) - 1) for j in train])
        pos = np.concatenate([np.arange(1, len(ids[j])) for j in train])
        p = probes.train_probe(x_tr, y_tr, groups, pos, c.lambdas)
        pred = p.predict(hs[2][depth][0, 1:].numpy())
        n_ok = int(np.sum(pred == probes.token_labels(ids[2][1:], classes)))
        assert res["counts"]["token"][lang]["token"]["correct"][depth] == [n_ok]
        acc = res["token"]["per_language"][lang]["acc"][depth]
        assert acc == pytest.approx(n_ok / (len(ids[2]) - 1))
    # pooled accuracy is the pooled count ratio; the language probe's chance is 1/3
    tot = sum(res["counts"]["token"][l]["token"]["correct"][2][0] for l in s.languages)
    n = sum(res["counts"]["token"][l]["n_test"][0] for l in s.languages)
    assert res["token"]["pooled"]["acc"][2] == pytest.approx(tot / n)
    assert res["language"]["pooled"]["chance_uniform"] == pytest.approx(1 / 3)
    for key, cr in res["correlations"].items():
        assert {"r", "ci_low", "ci_high", "n", "verdict"} <= set(cr), key
    assert res["correlations"]["token_acc_vs_damage"]["n"] == 3 * 2  # languages x blocks
    p = res["protection"]
    assert p["first"] == p["ranking"][0] and p["top3"] == p["ranking"][:3]
    assert p["min_depth"] == res["depths"][int(np.argmin(res["token"]["pooled"]["acc"]))]


def test_end_to_end_write_and_macros(e2e):
    _, _, res, _, root = e2e
    out = root / "out"
    files = B.write(res, out)
    names = {f.name for f in files}
    assert names == {"bottleneck.csv", "bottleneck_table.tex", "bottleneck.png", "bottleneck.json"}
    doc = json.loads((out / "bottleneck.json").read_text())
    assert doc["provenance"]["config"]["top_k"] == 64 and doc["estimator"].startswith("held-out")
    back = protocol.Result.load(out / "bottleneck.json")
    ms = B.macros(back)
    assert all(m.name.startswith("Probe") for m in ms)
    assert ms["ProbeTokenAccEmb"].value == pytest.approx(res["token"]["pooled"]["acc"][0])
    assert ms["ProbeMinDepth"].value == res["token"]["pooled"]["bottleneck"]["min_name"]
    assert ms["ProbeCorrTokenDropVerdict"].value in ("positive", "negative", "not resolved")
    assert "ProbeCorrPrevAcc" in ms and ms["ProbeLangChance"].value == pytest.approx(1 / 3)
    assert len((out / "bottleneck.csv").read_text().splitlines()) == 1 + 3 * 3  # languages x depths
    assert B.summary(res).startswith("token accuracy lowest at")


def test_language_sample_draws_seeded_positions_without_bos():
    c = B.Config(model="tiny-llama", languages=("en", "he"), language_positions=5)
    rng = np.random.default_rng(0)
    ids = [np.arange(12), np.arange(4)]
    feats = [[rng.normal(size=(12, 3)), rng.normal(size=(12, 3))], [rng.normal(size=(4, 3))] * 2]
    a = B.language_sample(feats, ids, 1, c)
    b = B.language_sample(feats, ids, 1, c)
    (s0, x0), (s1, x1) = a
    assert len(s0) == 5 and 0 not in s0 and len(set(s0)) == 5
    np.testing.assert_array_equal(s1, [1, 2, 3])  # fewer positions than asked: all but BOS
    np.testing.assert_array_equal(x0[1], feats[0][1][s0])
    np.testing.assert_array_equal(s0, b[0][0])  # seeded
    assert not np.array_equal(s0, B.language_sample(feats, ids, 0, c)[0][0])
