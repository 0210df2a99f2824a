"""Attention sinks, massive activations and super weights (empirical.outliers, validate.outliers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from empirical.models import load_model
from empirical.outliers import (
    attention_sinks,
    down_proj_modules,
    eager_attention,
    massive_activations,
    massive_entries,
    sink_importance,
    sink_metric,
    super_weights,
)


def _windows(*texts: bytes) -> list[torch.Tensor]:
    return [torch.tensor([[256, *t]]) for t in texts]  # ByteTokenizer: 256 is <bos>


WINDOWS = _windows(b"The quick brown fox jumps over the lazy dog.", b"Shalom, olam! 12345")


@pytest.fixture()
def llama():
    model, tok = load_model("tiny-llama", seed=0)
    model.eval()
    return model, tok


# ---- sink metric --------------------------------------------------------------------------------

def test_sink_importance_on_a_hand_built_matrix():
    # rows = queries, columns = keys; causal, rows sum to 1
    A = np.array([[1.0, 0, 0, 0],
                  [0.5, 0.5, 0, 0],
                  [0.2, 0.3, 0.5, 0],
                  [0.7, 0.1, 0.1, 0.1]])
    alpha = sink_importance(A)
    # alpha_k = sum_{i >= k} A[i, k] / (T - k)
    assert alpha[0] == pytest.approx((1 + 0.5 + 0.2 + 0.7) / 4)
    assert alpha[1] == pytest.approx((0.5 + 0.3 + 0.1) / 3)
    assert alpha[2] == pytest.approx((0.5 + 0.1) / 2)
    assert alpha[3] == pytest.approx(0.1)
    # the reference code's form: (A / (T - k) per column).sum over rows
    T = 4
    ref = (A / np.arange(T, 0, -1)[None, :]).sum(axis=0)
    np.testing.assert_allclose(alpha, ref)


def test_sink_metric_shares():
    T = 5
    sinky = np.zeros((T, T))
    sinky[:, 0] = 1.0                               # every query on BOS: alpha_0 = 1
    uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]   # alpha_0 = mean 1/(i+1)
    assert sink_importance(uniform)[0] == pytest.approx(np.mean(1 / np.arange(1, T + 1)))
    layer0 = np.stack([sinky, uniform])             # 2 heads
    layer1 = np.stack([uniform, uniform])
    m = sink_metric([layer0, layer1[None]], eps=0.5)
    assert m["alpha"].shape == (2, 2)
    assert m["sink"].tolist() == [[True, False], [False, False]]
    assert m["share"] == pytest.approx(0.25)
    np.testing.assert_allclose(m["layer_share"], [0.5, 0.0])
    # uniform alpha_0 = 0.4567 > 0.3: with the paper's eps every head is a sink
    assert sink_metric([layer0, layer1], eps=0.3)["share"] == 1.0


@pytest.mark.parametrize("bad, msg", [
    (np.full((3, 3), np.nan), "NaN"),
    (np.zeros((2, 3)), "square"),
    (np.zeros((0, 0)), "empty"),
    (-np.eye(3), "negative"),
    (np.ones(3), "dimensions"),
])
def test_sink_importance_refuses_bad_input(bad, msg):
    with pytest.raises(ValueError, match=msg):
        sink_importance(bad)


def test_sink_metric_refuses_bad_eps_and_position():
    a = np.eye(3)[None]
    with pytest.raises(ValueError, match="eps"):
        sink_metric([a], eps=1.5)
    with pytest.raises(ValueError, match="position"):
        sink_metric([a], position=3)
    with pytest.raises(ValueError, match="no attention"):
        sink_metric([])


def test_attention_sinks_match_the_eager_attention_and_restore_it(llama):
    model, _ = llama
    before = model.config._attn_implementation
    assert before != "eager"
    res = attention_sinks(model, WINDOWS, eps=0.3)
    assert model.config._attn_implementation == before            # switched back
    assert res.alpha.shape == (2, model.config.num_hidden_layers, model.config.num_attention_heads)
    # direct computation from the eager attention of the first window
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(WINDOWS[0], output_attentions=True).attentions
    finally:
        model.set_attn_implementation(before)
    T = WINDOWS[0].shape[1]
    direct = np.array([[float(a[0, h, :, 0].sum()) / T for h in range(a.shape[1])] for a in att])
    np.testing.assert_allclose(res.alpha[0], direct, rtol=1e-5)
    assert res.share == pytest.approx(float((res.alpha > 0.3).mean()))
    assert res.share == pytest.approx(res.segment_share.mean())


def test_eager_switch_is_restored_after_an_error(llama):
    model, _ = llama
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with eager_attention(model):
            assert model.config._attn_implementation == "eager"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before


# ---- massive activations ------------------------------------------------------------------------

def test_planted_massive_activation_is_found_and_none_below_thresholds():
    rng = np.random.default_rng(0)
    h = rng.normal(0, 0.1, (12, 32))           # median |x| ~ 0.067
    h[3, 17] = -500.0                            # |x| > 100 and > 1000 * median
    r = massive_entries(h)
    assert r["positions"].tolist() == [3] and r["dims"].tolist() == [17]
    assert r["values"].tolist() == [-500.0]
    assert r["median"] == pytest.approx(np.median(np.abs(h)))
    assert r["argmax"] == (3, 17)
    # below the absolute threshold (> 1000 x median, but < 100)
    h2 = h.copy()
    h2[3, 17] = 90.0
    assert massive_entries(h2)["positions"].size == 0
    # above 100 but not 1000 x median: a wide hidden state
    h3 = rng.normal(0, 1.0, (12, 32))
    h3[5, 2] = 200.0
    assert np.median(np.abs(h3)) * 1000 > 200
    assert massive_entries(h3)["positions"].size == 0
    assert massive_entries(h3, ratio=100)["positions"].tolist() == [5]


def test_massive_entries_refuses_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        massive_entries(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match="empty"):
        massive_entries(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="dimensions"):
        massive_entries(np.zeros(4))
    with pytest.raises(ValueError, match="ratio"):
        massive_entries(np.ones((2, 2)), ratio=0)


def test_massive_activations_found_at_layer_position_and_dim_in_a_model(llama):
    model, tok = llama
    none = massive_activations(model, WINDOWS, tok)
    assert none.counts()["total"] == 0                       # a random tiny model has none
    assert np.all(none.layer_ratio < 1000)
    # plant one: block 1's output gets +5000 at (position 4, dim 9) through a hook on the block
    blk = model.model.layers[1]

    def plant(m, a, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[0, 4, 9] += 5000.0
        return (h, *out[1:]) if isinstance(out, tuple) else h

    hook = blk.register_forward_hook(plant)
    try:
        r = massive_activations(model, WINDOWS, tok)
    finally:
        hook.remove()
    assert {(e["segment"], e["layer"], e["position"], e["dim"]) for e in r.events} == {(0, 1, 4, 9), (1, 1, 4, 9)}
    ids = WINDOWS[0][0].tolist()
    assert r.events[0]["token"] == tok.decode([ids[4]])
    assert r.counts()["by_layer_dim"] == {"1:9": 2}
    assert tuple(r.layer_argmax[0, 1]) == (4, 9)


# ---- super weights ------------------------------------------------------------------------------

def _plant_super_weight(model, layer=0, row=11, col=7):
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[col] = 20.0          # the down_proj input channel col spikes
        mlp.up_proj.weight[col] = 20.0
        mlp.down_proj.weight[:, col] = 0.0
        mlp.down_proj.weight[row, col] = 5.0      # ... and only W[row, col] carries it out


def test_planted_super_weight_is_found_at_its_coordinates(llama):
    model, _ = llama
    assert super_weights(model, WINDOWS)["weights"] == []          # none before planting
    _plant_super_weight(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = super_weights(model, WINDOWS, threshold=50.0)
    ws = res["weights"]
    assert [(w.layer, w.row, w.column) for w in ws] == [(0, 11, 7)]
    assert ws[0].value == 5.0 and ws[0].name == "model.layers.0.mlp.down_proj"
    assert abs(ws[0].input_spike) > 50 and abs(ws[0].output_spike) > 50
    assert ws[0].extra["share"] == pytest.approx(1.0, rel=1e-4)   # the weight makes the whole spike
    assert ws[0].extra["same_token"] is True
    assert res["rounds"] == 2                                        # a second round found nothing more
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)     # zeroed weight restored


def test_down_proj_spikes_direct_and_bad_input(llama):
    model, _ = llama
    mods = down_proj_modules(model)
    assert [b for b, _, _ in mods] == [0, 1]
    with pytest.raises(ValueError, match="no windows"):
        super_weights(model, [])
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        super_weights(model, [torch.tensor([1, 2, 3])])
    with pytest.raises(ValueError, match="threshold"):
        super_weights(model, WINDOWS, threshold=float("nan"))
    with pytest.raises(ValueError, match="max_iter"):
        super_weights(model, WINDOWS, max_iter=0)


# ---- the experiment -----------------------------------------------------------------------------

def test_config_refuses_bad_values():
    from validate._protocol import ConfigError
    from validate.outliers import Config

    for kw, msg in [({"sink_eps": 0.0}, "sink-eps"), ({"sink_eps": 1.0}, "sink-eps"),
                    ({"massive_abs": -1.0}, "massive-abs"), ({"massive_ratio": float("inf")}, "massive-ratio"),
                    ({"super_threshold": 0}, "super-threshold"), ({"super_max_iter": 0}, "super-max-iter"),
                    ({"detect_segments": 0}, "detect-segments"), ({"sink_position": -1}, "sink-position"),
                    ({"sink_position": 64, "max_length": 64}, "sink-position")]:
        with pytest.raises(ConfigError, match=msg):
            Config(model="tiny-llama", **kw)


def test_super_weight_setting_restores_and_holds_out(llama):
    from empirical.fakequant import FakeQuantizer, QuantConfig, fake_quantize_weight
    from empirical.models import model_view
    from validate.outliers import super_weight_setting

    model, _ = llama
    _plant_super_weight(model)
    view = model_view(model)
    lins = {q.name: q for q in view.linears}
    cfg = QuantConfig(bits=4, grid="int", granularity="channel", clipping="absmax")
    fq = FakeQuantizer(view.linears, cfg)
    name = "model.layers.0.mlp.down_proj"
    W = lins[name].module.weight.data.clone()
    sw = [{"name": name, "row": 11, "column": 7}]
    with super_weight_setting(fq, lins, sw, "holdout"):
        got = lins[name].module.weight.data.clone()
        other = lins["model.layers.0.mlp.up_proj"].module.weight.data.clone()
    held = W.clone()
    held[11, 7] = 0
    expect = fake_quantize_weight(held, cfg)
    expect[11, 7] = W[11, 7]
    assert torch.equal(got, expect)
    assert torch.equal(other, fq.quantized_weight("model.layers.0.mlp.up_proj"))
    with super_weight_setting(fq, lins, sw, "restore"):
        got = lins[name].module.weight.data.clone()
    expect = fq.quantized_weight(name).clone()
    expect[11, 7] = W[11, 7]
    assert torch.equal(got, expect)
    assert torch.equal(lins[name].module.weight.data, W)              # original back
    assert torch.equal(fq.quantized_weight(name), fake_quantize_weight(W, cfg))   # its cache untouched


def test_end_to_end_write_macros_and_cached_rerun(tmp_path):
    from validate import outliers
    from validate._common import ResultCache

    # low thresholds so that the tiny model has sinks that vary and "super weights" to hold out
    c = outliers.Config(model="tiny-llama", languages=("en", "he", "ja"), segments=2, max_length=32,
                        bootstrap=50, sink_eps=0.1, super_threshold=0.001, super_max_iter=1)
    cache = ResultCache(tmp_path / "out" / "cache")
    r = outliers.run(c, cache)
    assert r["passes"]["hooks"] > 0 and r["passes"]["scored"] > 0
    langs = r["languages"]
    assert len(langs) == 3 and len(r["blocks"]) == 2
    p = r["per_language"][langs[0]]
    assert 0 <= p["sink_share_ci"][0] <= p["sink_share"] <= p["sink_share_ci"][1] <= 1
    assert len(p["layer_sink_share"]) == 2
    assert r["super_weights"]["weights"], "the low threshold must find some"
    swp = r["super_weight_passes"]
    assert set(swp["modes"]) == {"restore", "holdout"} and swp["metric"] == "kl"
    for l in langs:
        d = swp["modes"]["holdout"]["difference"][l]
        assert d["diff"] == pytest.approx(swp["all_quantized"][l] - swp["modes"]["holdout"]["degradation"][l])
        assert d["ci"][0] <= d["ci"][1]
    corr = r["correlations"]
    for key in ("sink_share__outlier_ratio", "sink_share__damage", "outlier_ratio__damage"):
        assert set(corr[key]["pooled"]) == {"spearman", "pearson"}
        assert set(corr[key]["per_language"]) == set(langs)
    files = outliers.write(r, tmp_path / "out")
    assert {f.name for f in files} == {"outliers.csv", "outliers_table.tex", "outliers.png", "outliers.json"}
    from validate._protocol import Result

    back = Result.load(tmp_path / "out" / "outliers.json")
    ms = outliers.macros(back)
    names = {m.name for m in ms}
    assert {"OutlSinkEps", "OutlSuperWeights", "OutlHoldoutWorstDiff", "OutlSinkOutlierPearson"} <= names
    assert all(n.startswith("Outl") for n in names)
    assert ms["OutlSuperWeights"].value == len(r["super_weights"]["weights"])
    # rerun: everything from the cache
    r2 = outliers.run(c, cache)
    assert r2["passes"] == {"hooks": 0, "scored": 0, "block_damage": 0, "total": 0}
    assert r2["per_language"] == r["per_language"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed")
def test_gemma_sinks_smoke():
    model, tok = load_model("gemma-3-270m", seed=0)
    ids = tok("Hello world, this is a test.", add_special_tokens=True, return_tensors="pt")["input_ids"]
    res = attention_sinks(model, [ids])
    assert res.alpha.shape[1] == model.config.num_hidden_layers
    assert 0 <= res.share <= 1
