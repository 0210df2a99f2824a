"""Linear CKA (empirical.similarity, validate.cka): the definition against the HSIC form computed
directly, its invariances, the segment-bootstrap identity, the captured residual streams against a
hand-written forward, and the experiment end to end on a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from empirical.similarity import SegmentMoments, cka_matrix, linear_cka, segment_cka

TINY = dict(model="tiny-llama", languages=("en", "he", "ja"), segments=2, max_length=32, bootstrap=50)


def hsic_cka(x, y):
    """tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = X X^T, L = Y Y^T, H = I - 11^T/n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    return np.trace(k @ h @ l @ h) / np.sqrt(np.trace(k @ h @ k @ h) * np.trace(l @ h @ l @ h))


def _pair(seed=0, n=40, p=6, q=9):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)) + rng.normal(size=p) * 3
    y = np.tanh(x @ rng.normal(size=(p, q))) + 0.5 * rng.normal(size=(n, q))
    return x, y


@pytest.mark.parametrize("shape", [(40, 6, 9), (8, 30, 20), (25, 25, 3)])
def test_equals_hsic_form(shape):
    x, y = _pair(1, *shape)
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-10)


def test_identity_symmetry_and_range():
    x, y = _pair(2)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)
    assert 0 < linear_cka(x, y) < 1
    rng = np.random.default_rng(3)
    assert linear_cka(rng.normal(size=(500, 4)), rng.normal(size=(500, 4))) < 0.1  # independent: near 0


def test_invariances():
    x, y = _pair(4)
    rng = np.random.default_rng(5)
    qx, _ = np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))
    qy, _ = np.linalg.qr(rng.normal(size=(y.shape[1], y.shape[1])))
    ref = linear_cka(x, y)
    assert linear_cka(x @ qx, y) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(x, y @ qy) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(x + 100.0, y - 3.0) == pytest.approx(ref, rel=1e-8)  # centring
    # not invariant to a general (anisotropic) linear map
    assert linear_cka(x * np.arange(1, x.shape[1] + 1), y) != pytest.approx(ref, rel=1e-3)


def test_matrix_paths_agree():
    rng = np.random.default_rng(6)
    for n in (5, 60):  # Gram path (n below the width) and cross-product path
        reps = [rng.normal(size=(n, 12)) for _ in range(3)]
        reps.append(reps[0] @ rng.normal(size=(12, 12)))
        m = cka_matrix(reps)
        assert m.shape == (4, 4) and np.allclose(m, m.T) and np.allclose(np.diag(m), 1)
        for i in range(4):
            for j in range(i + 1, 4):
                assert m[i, j] == pytest.approx(hsic_cka(reps[i], reps[j]), rel=1e-9)


def test_bad_input_refused():
    x, y = _pair(7)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(bad, y)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        linear_cka(x, bad)
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(x, y[:-1])
    with pytest.raises(ValueError, match="at least 2"):
        linear_cka(x[:1], y[:1])
    with pytest.raises(ValueError, match="2-d"):
        linear_cka(x[None], y)
    with pytest.raises(ValueError, match="constant"):
        linear_cka(np.ones_like(x), y)
    with pytest.raises(ValueError, match="no representations"):
        cka_matrix([])


def test_segment_bootstrap_equals_repeated_rows():
    x, y = _pair(8, n=36)
    seg = np.repeat(np.arange(6), [3, 8, 5, 6, 7, 7])
    rng = np.random.default_rng(9)
    w = np.stack([np.bincount(rng.integers(0, 6, 6), minlength=6) for _ in range(5)])
    got = segment_cka(x, y, seg, w)
    for row, g in zip(w, got):
        idx = np.concatenate([np.flatnonzero(seg == s) for s in range(6) for _ in range(row[s])])
        assert g == pytest.approx(linear_cka(x[idx], y[idx]), rel=1e-8)
    assert segment_cka(x, y, seg, np.ones(6)) == pytest.approx(linear_cka(x, y), rel=1e-10)
    sm = SegmentMoments([x, y, x], seg)
    assert sm.cka(0, 2, np.ones(6)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="columns"):
        sm.cka(0, 1, np.ones(5))
    with pytest.raises(ValueError, match="non-negative"):
        sm.cka(0, 1, -np.ones(6))
    with pytest.raises(ValueError, match="0..S-1"):
        SegmentMoments([x, y], seg + 1)


def test_captured_streams_are_the_residual_stream():
    from empirical.models import load_model
    from validate.cka import capture_streams

    model, tok = load_model("tiny-llama", seed=0)
    model.eval()
    g = torch.Generator().manual_seed(0)
    wins = []
    for n in (6, 1, 9):
        w = torch.randint(5, 200, (1, n), generator=g)
        w[0, 0] = tok.bos_token_id
        wins.append(w)
    streams, seg = capture_streams(model, wins)
    assert len(streams) == model.config.num_hidden_layers + 1
    assert seg.tolist() == [0] * 5 + [1] * 8  # the one-token window has no text and is skipped
    with torch.no_grad():
        for k, w in enumerate([wins[0], wins[2]]):
            rows = seg == k
            h = model.model.embed_tokens(w)
            np.testing.assert_allclose(streams[0][rows], h[0, 1:].double().numpy(), rtol=1e-6)
            pos = torch.arange(w.shape[1])[None]
            pe = model.model.rotary_emb(h, pos)
            from transformers.masking_utils import create_causal_mask

            mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=None, cache=None,
                                      position_ids=pos)
            for b, layer in enumerate(model.model.layers):
                h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
                h = h[0] if isinstance(h, tuple) else h
                np.testing.assert_allclose(streams[b + 1][rows], h[0, 1:].double().numpy(), rtol=1e-5, atol=1e-6)


def test_config_validation():
    from validate._protocol import ConfigError
    from validate.cka import Config

    Config(**TINY)
    for bad in ({"top_pairs": 0}, {"damage_metric": "mse"}, {"languages": ("en",)}, {"bootstrap": -1},
                {"segments": 0}):
        with pytest.raises(ConfigError):
            Config(**{**TINY, **bad})


def test_end_to_end_and_cached_rerun(tmp_path):
    from validate import cka
    from validate._common import ResultCache

    cache = ResultCache(tmp_path / "cka" / "cache")
    res = cka.run(cka.Config(**TINY), cache)
    langs, depths = res["languages"], res["depths"]
    assert depths == ["embedding", "block0", "block1"]
    assert res["passes_run"] == 2 * len(langs)  # one capture for the matrices, one for the bootstrap
    for l in langs:
        m = np.asarray(res["matrices"][l])
        assert m.shape == (3, 3) and np.allclose(m, m.T) and np.allclose(np.diag(m), 1)
        assert res["change"][l] == pytest.approx([1 - m[0, 1], 1 - m[1, 2]])
    mats = np.stack([np.asarray(res["matrices"][l]) for l in langs])
    t = res["top_pairs"][0]
    i, j = t["index"]
    assert t["range"] == pytest.approx(np.ptp(mats[:, i, j]))
    assert t["range"] == pytest.approx(max(p["range"] for p in res["pairs"]))
    assert t["range_ci"][0] <= t["range_ci"][1]
    assert res["change_vs_quant_pooled"]["n"] == 2 * len(langs)
    files = cka.write(res, tmp_path / "out")
    assert {"cka.json", "cka.csv", "cka_table.tex", "cka.png"} <= {f.name for f in files}
    doc = json.loads((tmp_path / "out" / "cka.json").read_text())
    assert doc["bos_excluded"] is True and "ci_low" in doc["change_vs_quant_pooled"]
    ms = cka.macros(res)
    assert "CkaSpearman" in ms and "CkaMaxRange" in ms and "CkaVerdict" in ms
    again = cka.run(cka.Config(**TINY), cache)
    assert again["passes_run"] == 0 and again["block_damage_passes_run"] == 0
    assert again["matrices"] == res["matrices"]
