"""Residual-update ablation (empirical.ablation, validate.residual_ablation): each ablation against a
forward pass edited by hand from the model's own modules, the hooks' lifetime, the replayed
scoring against a full pass, and the experiment end to end on a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from empirical.ablation import UpdateMeans, ablate_block, block_update, update_means
from empirical.models import load_model, model_view

TINY = dict(model="tiny-llama", languages=("en", "he", "ja"), segments=2, max_length=32, bootstrap=50)


@pytest.fixture(scope="module")
def llama():
    model, tok = load_model("tiny-llama", seed=0)
    model.eval()
    return model, tok


def _ids(tok, n=12, seed=0, rows=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (rows, n), generator=g)
    ids[:, 0] = tok.bos_token_id
    return ids


@torch.no_grad()
def manual_logits(model, ids, edit=None):
    """Llama forward written out from the model's modules; ``edit(b, h_in, h_out) -> h_out``."""
    from transformers.masking_utils import create_causal_mask

    m = model.model
    h = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    pe = m.rotary_emb(h, pos)
    mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=None, cache=None,
                              position_ids=pos)
    for b, layer in enumerate(m.layers):
        out = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        out = out[0] if isinstance(out, tuple) else out
        h = out if edit is None else edit(b, h, out)
    return model.lm_head(m.norm(h))


def test_manual_forward_is_the_model(llama):
    model, tok = llama
    ids = _ids(tok, rows=2)
    with torch.no_grad():
        ref = model(ids).logits
    assert torch.allclose(manual_logits(model, ids), ref, atol=1e-5)


@pytest.mark.parametrize("block", [0, 1])
def test_zero_ablation_skips_the_block(llama, block):
    model, tok = llama
    ids = _ids(tok, rows=2, seed=block)
    want = manual_logits(model, ids, lambda b, h, out: h if b == block else out)
    with torch.no_grad(), ablate_block(model, block, "zero"):
        got = model(ids).logits
        base = None
    with torch.no_grad():
        base = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the ablation did something


@pytest.mark.parametrize("block", [0, 1])
def test_mean_ablation_adds_the_given_mean(llama, block):
    model, tok = llama
    d, n = model.config.hidden_size, model.config.num_hidden_layers
    rng = np.random.default_rng(block)
    means = UpdateMeans(rng.normal(size=(n, d)) * 3, rng.normal(size=(n, d)), 1, 1)
    ids = _ids(tok, rows=2, seed=5)

    def edit(b, h, out):
        if b != block:
            return out
        add = torch.tensor(means.text[b], dtype=h.dtype).expand_as(h).clone()
        add[:, 0] = torch.tensor(means.first[b], dtype=h.dtype)  # position 0: the BOS mean
        return h + add

    want = manual_logits(model, ids, edit)
    with torch.no_grad(), ablate_block(model, block, "mean", means):
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_update_means_are_the_averaged_updates(llama):
    model, tok = llama
    wins = [_ids(tok, n=k, seed=k) for k in (5, 9, 3)]
    got = update_means(model, wins)
    ups = {b: [] for b in range(model.config.num_hidden_layers)}

    def edit(b, h, out):
        ups[b].append((out - h).double()[0])
        return out

    for w in wins:
        manual_logits(model, w, edit)
    assert (got.n_first, got.n_text) == (3, 4 + 8 + 2)
    for b, us in ups.items():
        np.testing.assert_allclose(got.first[b], torch.stack([u[0] for u in us]).mean(0).numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got.text[b], torch.cat([u[1:] for u in us]).mean(0).numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(block_update(model, wins[0], b)[0].numpy(), us[0].numpy(), rtol=1e-6, atol=1e-9)
    # the BOS update differs from the text positions' (why the two means are kept apart)
    assert not np.allclose(got.first, got.text)


def test_update_means_refuses_bad_windows(llama):
    model, tok = llama
    with pytest.raises(ValueError, match="no windows"):
        update_means(model, [])
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        update_means(model, [_ids(tok, rows=2)])
    with pytest.raises(ValueError, match="single token"):
        update_means(model, [_ids(tok, n=1)])


def test_hooks_removed_on_exit_and_on_exception(llama):
    model, tok = llama
    blocks = model_view(model).blocks
    ids = _ids(tok)
    with torch.no_grad():
        base = model(ids).logits
    with ablate_block(model, 1, "zero"):
        assert len(blocks[1]._forward_hooks) == 1
    assert all(len(b._forward_hooks) == 0 for b in blocks)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate_block(model, 0, "zero"):
            raise RuntimeError("boom")
    assert all(len(b._forward_hooks) == 0 for b in blocks)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_bad_arguments_refused(llama):
    model, _ = llama
    n, d = model.config.num_hidden_layers, model.config.hidden_size
    for bad in (-1, n, 1.5, True, "0"):
        with pytest.raises(ValueError, match="block"):
            with ablate_block(model, bad, "zero"):
                pass
    with pytest.raises(ValueError, match="unknown ablation mode"):
        with ablate_block(model, 0, "noise"):
            pass
    with pytest.raises(ValueError, match="needs the mean"):
        with ablate_block(model, 0, "mean"):
            pass
    with pytest.raises(ValueError, match="shape"):
        with ablate_block(model, 0, "mean", UpdateMeans(np.zeros((n, d + 1)), np.zeros((n, d)), 1, 1)):
            pass
    nan = np.zeros((n, d))
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        with ablate_block(model, 0, "mean", UpdateMeans(np.zeros((n, d)), nan, 1, 1)):
            pass
    with pytest.raises(ValueError, match="block"):
        block_update(model, torch.zeros((1, 3), dtype=torch.long), n)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma"])
def test_hook_acts_during_replay(name):
    """Scoring from the recorded stream entering block b (what the experiment does) gives the NLL
    of a full pass with the same ablation."""
    from empirical.bpb import BpbEngine
    from empirical.corpora import load_udhr

    model, tok = load_model(name, seed=0)
    model.eval()
    corpus = load_udhr(["en", "ja"]).head(2)
    eng = BpbEngine(model, tok, {l: corpus[l] for l in corpus.languages}, max_length=24)
    base = eng.record()
    assert eng.recorded
    n = len(eng.blocks)
    rng = np.random.default_rng(0)
    d = model.config.hidden_size
    means = UpdateMeans(rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 0.1, 1, 1)
    for b in range(n):
        for mode in ("zero", "mean"):
            with ablate_block(model, b, mode, means):
                replay = eng.nll(start_block=b)
                full = eng.nll(start_block=0)
            for l in base:
                np.testing.assert_allclose(replay[l], full[l], rtol=1e-5)
                assert not np.allclose(replay[l], base[l])


# ---- the experiment -------------------------------------------------------------------------------

def test_config_validation():
    from validate._protocol import ConfigError
    from validate.residual_ablation import Config

    Config(**TINY)
    for bad in ({"modes": ()}, {"modes": ("mean", "mean")}, {"modes": ("noise",)}, {"top": 0},
                {"damage_metric": "mse"}, {"bootstrap": 0}, {"max_length": 0}):
        with pytest.raises(ConfigError):
            Config(**{**TINY, **bad})
    q = Config.quick()
    assert q.segments == 3 and q.max_length == 64


def test_concordance_of_profiles():
    from validate.residual_ablation import concordance

    p = np.array([[1.0, 2, 3, 4], [2, 4, 6, 8], [4, 3, 2, 1]])
    c = concordance(p, np.stack([p, p]))
    assert c["pairs"][0][2] == pytest.approx(1.0)
    assert c["min"] == pytest.approx(-1.0) and c["min_pair"] in ([0, 2], [1, 2])
    assert c["mean"] == pytest.approx((1 - 1 - 1) / 3)
    assert c["mean_ci"] == pytest.approx([c["mean"], c["mean"]])


def test_end_to_end_and_cached_rerun(tmp_path):
    from validate import residual_ablation as ra
    from validate._common import ResultCache

    cache = ResultCache(tmp_path / "residual_ablation" / "cache")
    cfg = ra.Config(**TINY)
    res = ra.run(cfg, cache)
    nb = len(res["blocks"])
    assert nb == 2
    assert res["passes_run"] == 1 + 1 + 2 * nb  # means, baseline record, one per block and mode
    langs = res["languages"]
    for m in ("mean", "zero"):
        a = res["ablation"][m]
        for l in langs:
            for b, row in enumerate(a["per_language"][l]):
                # relative damage is the ratio of bits per byte minus one
                assert row["relative"] == pytest.approx(row["bpb"] / res["baseline_bpb"][l] - 1, rel=1e-9, abs=1e-12)
                assert row["delta_bpb"] == pytest.approx(row["bpb"] - res["baseline_bpb"][l])
                assert row["delta_bpb_ci_low"] <= row["delta_bpb_ci_high"]
                assert row["kl_bpb"] is not None and row["kl_bpb"] > 0
        assert set(a["top_blocks"]) == set(langs)
        for c in (a["spearman_vs_quant_pooled"], *a["spearman_vs_quant"].values()):
            assert {"r", "ci_low", "ci_high", "n"} <= set(c)
        assert a["spearman_vs_quant_pooled"]["n"] == nb * len(langs)
    files = ra.write(res, tmp_path / "out")
    names = {f.name for f in files}
    assert {"residual_ablation.json", "residual_ablation.csv", "residual_ablation_table.tex",
            "residual_ablation.png"} <= names
    doc = json.loads((tmp_path / "out" / "residual_ablation.json").read_text())
    assert doc["ablation"]["mean"]["spearman_vs_quant_pooled"]["ci_low"] is not None
    ms = ra.macros(res)
    assert "AblMeanSpearman" in ms and "AblZeroVerdict" in ms
    assert ms["AblMeanVerdict"].value in ("positive", "negative", "not resolved")
    again = ra.run(cfg, cache)
    assert again["passes_run"] == 0 and again["block_damage_passes_run"] == 0
    assert again["ablation"]["zero"]["relative"] == res["ablation"]["zero"]["relative"]
