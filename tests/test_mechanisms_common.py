"""validate._mechanisms: the shared config, the per-language windows, the single-block damage and
the correlation intervals, each against a direct computation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from validate import _protocol as protocol
from validate._common import ResultCache
from validate._mechanisms import (MechanismConfig, block_damage, correlation_ci, language_windows, resolved,
                                  setup, shared_cache)

TINY = dict(model="tiny-llama", languages=("en", "he", "ja"), segments=2, max_length=32, bootstrap=50)


# ---- correlation with a bootstrap interval -----------------------------------------------------

def test_correlation_matches_scipy_and_the_interval_holds_it():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = x + rng.normal(scale=0.5, size=40)
    for method, fn in (("spearman", stats.spearmanr), ("pearson", stats.pearsonr)):
        ci = correlation_ci(x, y, method, n_boot=300, seed=0)
        assert ci["r"] == pytest.approx(fn(x, y).statistic, abs=1e-12)
        assert ci["p"] == pytest.approx(fn(x, y).pvalue, rel=1e-9)
        assert ci["ci_low"] < ci["r"] < ci["ci_high"]
        assert ci["n"] == 40 and resolved(ci) == "positive"
    # y = x^2 on a symmetric grid: Pearson r is exactly 0, and the interval contains it
    x = np.linspace(-1, 1, 41)
    ci = correlation_ci(x, x ** 2, "pearson", n_boot=300)
    assert ci["r"] == pytest.approx(0.0, abs=1e-12)
    assert ci["ci_low"] < 0 < ci["ci_high"] and resolved(ci) == "not resolved"


def test_correlation_is_deterministic_and_drops_non_finite_pairs():
    x = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 6.0, 7.0])
    y = np.array([2.0, 1.0, 3.0, np.inf, 5.0, 7.0, 6.0])
    a, b = correlation_ci(x, y, n_boot=100, seed=3), correlation_ci(x, y, n_boot=100, seed=3)
    assert a == b and a["n"] == 5
    assert a["r"] == pytest.approx(stats.spearmanr([1, 2, 5, 6, 7], [2, 1, 5, 7, 6]).statistic)


def test_group_resampling_keeps_groups_whole():
    # two groups with opposite within-group relations: resampling whole groups sees only these
    x = np.array([0, 1, 2, 10, 11, 12], dtype=float)
    y = np.array([2, 1, 0, 12, 11, 10], dtype=float)
    ci = correlation_ci(x, y, "pearson", n_boot=200, seed=0, groups=["a", "a", "a", "b", "b", "b"])
    # a resample of group a alone (x, y anti-correlated) gives -1, of b alone -1, of both the pooled r
    pooled = stats.pearsonr(x, y).statistic
    assert ci["ci_low"] == pytest.approx(-1.0) and ci["ci_high"] == pytest.approx(pooled)


def test_correlation_refuses_bad_input():
    assert correlation_ci([1, 2], [3, 4])["r"] is None
    assert correlation_ci([1, 1, 1], [1, 2, 3])["r"] is None
    with pytest.raises(ValueError, match="unknown correlation method"):
        correlation_ci([1, 2, 3], [1, 2, 3], "kendall")
    with pytest.raises(ValueError, match="equal length"):
        correlation_ci([1, 2, 3], [1, 2])


# ---- config and text -----------------------------------------------------------------------------

def test_config_refuses_bad_values():
    with pytest.raises(protocol.ConfigError):
        MechanismConfig(bits=0)
    with pytest.raises(protocol.ConfigError):
        MechanismConfig(languages=("en", "xx-not-a-language"))
    with pytest.raises(protocol.ConfigError):
        MechanismConfig(segments=0)
    with pytest.raises(protocol.ConfigError):
        MechanismConfig(reference=("de",))
    c = MechanismConfig(**TINY)
    assert c.languages == ("eng_Latn", "heb_Hebr", "jpn_Jpan") and c.reference == ("eng_Latn",)


def test_language_windows_start_with_bos_and_are_truncated(tiny_llama):
    _, tok = tiny_llama
    from empirical.bpb import _start_id

    corpus = {"eng_Latn": ["hello world", "a"], "heb_Hebr": ["שלום " * 30]}
    w = language_windows(tok, corpus, ["eng_Latn", "heb_Hebr"], max_length=16)
    assert [x.shape for x in w["eng_Latn"]] == [(1, 12), (1, 2)]
    assert w["heb_Hebr"][0].shape == (1, 16)
    assert all(int(x[0, 0]) == _start_id(tok) for v in w.values() for x in v)
    assert w["eng_Latn"][0][0, 1:].tolist() == tok("hello world", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="no text"):
        language_windows(tok, {"eng_Latn": []}, ["eng_Latn"], 16)


def test_shared_cache_sits_beside_the_experiments(tmp_path):
    sc = shared_cache(ResultCache(tmp_path / "results" / "cka" / "cache"))
    assert sc.folder == tmp_path / "results" / "_shared" / "block_damage"
    assert shared_cache(None) is None


# ---- single-block damage ---------------------------------------------------------------------------

def test_block_damage_equals_a_direct_computation(tmp_path):
    import torch

    from empirical.bpb import bits_per_byte
    from empirical.fakequant import FakeQuantizer

    c = MechanismConfig(**TINY)
    s = setup(c)
    cache = ResultCache(tmp_path / "res" / "exp" / "cache")
    d = block_damage(s, cache, progress=False)
    assert d.blocks == ["block0", "block1"] and d.kl.shape == d.bpb.shape == (3, 2)
    assert d.passes_run == 3
    lins = s.block_linears()
    fq = FakeQuantizer([q for b in lins for q in b], c.quant_config(), seed=c.seed)
    base = {l: bits_per_byte(s.model, s.tokenizer, s.corpus[l], max_length=c.max_length) for l in s.languages}
    for b in range(2):
        protect = {q.name for i, blk in enumerate(lins) if i != b for q in blk}
        with torch.no_grad(), fq.quantized(protect=protect):
            q = {l: bits_per_byte(s.model, s.tokenizer, s.corpus[l], max_length=c.max_length) for l in s.languages}
        for j, l in enumerate(s.languages):
            assert d.bpb[j, b] == pytest.approx(q[l].bpb / base[l].bpb - 1.0, rel=1e-4, abs=1e-9)
    for j, l in enumerate(s.languages):
        assert d.baseline_bpb[l] == pytest.approx(base[l].bpb, rel=1e-5)
    # the same damages from the shared cache, with no pass
    again = block_damage(setup(c), ResultCache(tmp_path / "res" / "other" / "cache"), progress=False)
    assert again.passes_run == 0 and np.array_equal(again.bpb, d.bpb)
    assert d.ranking("bpb") == [int(i) for i in np.argsort(-d.bpb.mean(axis=0), kind="stable")]
    assert set(d.to_json()) >= {"blocks", "languages", "kl", "bpb", "ranking_kl"}
    other = dataclasses.replace(c, bits=3)
    assert block_damage(setup(other), cache, progress=False).passes_run == 3
