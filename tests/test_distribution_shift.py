"""empirical.shift and validate.distribution_shift: histogram KL, moments, captures and the run."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import assert_refused

from empirical import shift
from validate import _mechanisms as mech
from validate import distribution_shift as ds
from validate._common import ResultCache, read_json

RNG = np.random.default_rng(7)


# ---- histogram KL --------------------------------------------------------------------------------

def _independent_kl(x, y, bins, eps):
    """Quantile bins by np.percentile, counts by explicit interval tests, KL by scipy."""
    e = np.unique(np.percentile(x, 100.0 * np.arange(1, bins) / bins))
    lo = np.concatenate([[-np.inf], e])
    hi = np.concatenate([e, [np.inf]])
    cx = np.array([np.sum((x >= a) & (x < b)) for a, b in zip(lo, hi)], dtype=float)
    cy = np.array([np.sum((y >= a) & (y < b)) for a, b in zip(lo, hi)], dtype=float)
    assert cx.sum() == x.size and cy.sum() == y.size
    return stats.entropy(cx + eps, cy + eps, base=2)


@pytest.mark.parametrize("bins,eps", [(10, 0.5), (50, 1.0), (7, 1e-3)])
def test_activation_kl_equals_scipy_entropy_on_independently_binned_counts(bins, eps):
    x = RNG.standard_t(5, size=4000)
    y = 1.3 * RNG.standard_t(5, size=3000) + 0.2   # different sizes: the KL compares distributions
    got = shift.activation_kl(x, y, bins=bins, eps=eps)
    want = _independent_kl(x, y, bins, eps)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got > 0.01


def test_quantized_values_outside_the_baseline_range_land_in_the_open_end_bins():
    x = np.linspace(-1, 1, 101)
    edges = shift.quantile_edges(x, 4)
    np.testing.assert_allclose(edges, [-0.5, 0.0, 0.5])
    c = shift.histogram_counts(np.array([-100.0, -0.5, 0.0, 0.49, 7.0, 1e9]), edges)
    assert c.tolist() == [1, 1, 2, 2]


def test_kl_is_zero_for_identical_samples_and_grows_with_the_shift():
    x = RNG.normal(size=5000)
    assert shift.activation_kl(x, x.copy()) == 0.0
    assert shift.histogram_kl([3, 0, 5], [3, 0, 5], eps=0.1) == 0.0
    kls = [shift.activation_kl(x, x + d) for d in (0.05, 0.2, 0.8)]
    assert 0 < kls[0] < kls[1] < kls[2]


def test_discrete_baseline_merges_duplicate_quantiles():
    x = np.repeat([0.0, 1.0, 2.0], 100)
    e = shift.quantile_edges(x, 10)
    assert np.all(np.diff(e) > 0) and set(e.tolist()) <= {0.0, 1.0, 2.0}
    assert shift.histogram_counts(x, e).sum() == x.size


# ---- moments -------------------------------------------------------------------------------------

@pytest.mark.parametrize("gen", [lambda r: r.normal(2, 3, 5000), lambda r: r.lognormal(0, 0.7, 5000),
                                 lambda r: r.standard_t(4, 5000)])
def test_moments_match_scipy(gen):
    x = gen(np.random.default_rng(3))
    m = shift.moments(x.astype(np.float32))
    x64 = x.astype(np.float32).astype(np.float64)
    assert m["mean"] == pytest.approx(np.mean(x64), rel=1e-12)
    assert m["std"] == pytest.approx(np.std(x64), rel=1e-12)
    assert m["skewness"] == pytest.approx(stats.skew(x64, bias=True), rel=1e-9)
    assert m["excess_kurtosis"] == pytest.approx(stats.kurtosis(x64, fisher=True, bias=True), rel=1e-9)
    assert m["max_abs"] == pytest.approx(np.max(np.abs(x64)))


def test_moment_shift_is_quantized_minus_baseline():
    x = RNG.normal(size=2000)
    y = 2 * x + 1
    d = shift.moment_shift(x, y)
    mx, my = shift.moments(x), shift.moments(y)
    for k in shift.MOMENTS:
        assert d[k] == pytest.approx(my[k] - mx[k], abs=1e-12)
    assert d["mean"] == pytest.approx(1.0 + np.mean(x), abs=1e-9)
    assert d["std"] == pytest.approx(mx["std"], rel=1e-9)
    assert abs(d["skewness"]) < 1e-9 and abs(d["excess_kurtosis"]) < 1e-9   # affine maps keep shape
    assert shift.moment_shift(mx, mx) == {k: 0.0 for k in shift.MOMENTS}


def test_bad_input_is_refused():
    x = RNG.normal(size=100)
    with pytest.raises(ValueError, match="empty"):
        shift.moments([])
    with pytest.raises(ValueError, match="NaN or inf"):
        shift.activation_kl(np.array([1.0, np.nan]), x)
    with pytest.raises(ValueError, match="NaN or inf"):
        shift.activation_kl(x, np.array([np.inf, 1.0]))
    with pytest.raises(ValueError, match="share the bins"):
        shift.histogram_kl([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        shift.histogram_kl([1, -2], [1, 2])
    with pytest.raises(ValueError, match="no bins"):
        shift.histogram_kl([], [])
    for eps in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            shift.histogram_kl([1, 2], [2, 1], eps=eps)
    for bins in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="bins"):
            shift.quantile_edges(x, bins)
    with pytest.raises(ValueError, match="increasing"):
        shift.histogram_counts(x, [1.0, 0.0])
    with pytest.raises(ValueError, match="lack"):
        shift.moment_shift({"mean": 0.0}, {"mean": 1.0})


# ---- captures on a tiny model --------------------------------------------------------------------

def _windows(n=3, t=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([[1]]), torch.randint(3, 250, (1, t - 1), generator=g)], dim=1)
            for _ in range(n)]


def test_capture_equals_the_models_hidden_states_without_bos(tiny_llama):
    from empirical.models import model_view

    model, _ = tiny_llama
    view = model_view(model)
    ws = _windows()
    got = shift.capture_block_outputs(model, view.blocks, ws)
    assert len(got) == len(view.blocks)
    with torch.no_grad():
        hs = [model(input_ids=w, output_hidden_states=True).hidden_states for w in ws]
    # hidden_states[i + 1] is block i's output for every block but the last (after the final norm)
    for i in range(len(view.blocks) - 1):
        want = np.concatenate([h[i + 1][0, 1:].reshape(-1).numpy() for h in hs])
        np.testing.assert_array_equal(got[i], want)
    with_bos = shift.capture_block_outputs(model, view.blocks, ws, skip_first=False)
    assert with_bos[0].size == got[0].size + len(ws) * model.config.hidden_size


class _Identity:
    @contextlib.contextmanager
    def quantized(self):
        yield self


class _Perturb:
    """Adds seeded noise to every block Linear's weight inside, restores the originals after."""

    def __init__(self, linears, scale):
        self.linears, self.scale = linears, scale

    @contextlib.contextmanager
    def quantized(self):
        saved = [q.module.weight.data for q in self.linears]
        g = torch.Generator().manual_seed(0)
        try:
            for q in self.linears:
                w = q.module.weight.data
                q.module.weight.data = w + self.scale * w.std() * torch.randn(w.shape, generator=g)
            yield self
        finally:
            for q, w in zip(self.linears, saved):
                q.module.weight.data = w


def _setup():
    return mech.setup(ds.Config(model="tiny-llama", languages=("en", "he"), segments=2, max_length=32,
                                bootstrap=20))


def test_shift_is_zero_under_an_identity_quantizer_and_positive_under_perturbed_weights():
    s = _setup()
    ws = s.windows()[s.languages[0]]
    zero = ds.language_shift(s, _Identity(), ws, bins=20, eps=0.5)
    assert zero["kl_bits"] == [0.0] * s.n_blocks
    assert all(v == 0.0 for sh in zero["moment_shift"] for v in sh.values())
    lins = [q for b in s.block_linears() for q in b]
    before = [q.module.weight.detach().clone() for q in lins]
    small = ds.language_shift(s, _Perturb(lins, 0.05), ws, bins=20, eps=0.5)
    big = ds.language_shift(s, _Perturb(lins, 0.5), ws, bins=20, eps=0.5)
    assert all(k > 0 for k in small["kl_bits"])
    assert sum(big["kl_bits"]) > sum(small["kl_bits"])
    assert all(torch.equal(q.module.weight, b) for q, b in zip(lins, before))
    # the recorded numbers are those of the functions on the captured samples
    base = shift.capture_block_outputs(s.model, s.view.blocks, ws)
    with _Perturb(lins, 0.05).quantized():
        quant = shift.capture_block_outputs(s.model, s.view.blocks, ws)
    for i in range(s.n_blocks):
        assert small["kl_bits"][i] == pytest.approx(shift.activation_kl(base[i], quant[i], 20, 0.5), rel=1e-12)
        assert small["baseline_moments"][i] == shift.moments(base[i])
        assert small["moment_shift"][i] == shift.moment_shift(base[i], quant[i])


# ---- the experiment ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [(["--bins", "1"], "--bins"), (["--eps", "0"], "--eps"),
                                         (["--eps", "nan"], "--eps"), (["--bits", "1"], "bits"),
                                         (["--segments", "0"], "--segments"),
                                         (["--shift-segments", "0"], "--shift-segments")])
def test_bad_flags_are_refused_before_the_model_loads(tmp_path, capsys, argv, needle):
    assert_refused(ds.main, ["--model", "tiny-llama", *argv], tmp_path / "out", needle, capsys)


def test_config_refuses_bad_values_directly():
    from validate._protocol import ConfigError

    for kw in ({"bins": 1}, {"bins": 2.5}, {"eps": -1.0}, {"eps": float("inf")}):
        with pytest.raises(ConfigError):
            ds.Config(model="tiny-llama", **kw)
    q = ds.Config.quick()
    assert q.bins == ds.Config().bins and q.segments == 3


def _count_block_calls(monkeypatch):
    calls = [0]
    real = mech.setup

    def counting(c):
        s = real(c)
        for b in s.view.blocks:
            b.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        return s

    monkeypatch.setattr(mech, "setup", counting)
    return calls


def test_run_write_macros_and_a_rerun_without_passes(tmp_path, monkeypatch):
    calls = _count_block_calls(monkeypatch)
    cfg = ds.Config(model="tiny-llama", languages=("en", "he", "ja"), segments=2, max_length=32, bootstrap=50)
    cache = ResultCache(tmp_path / "distribution_shift" / "cache")
    res = ds.run(cfg, cache)
    assert calls[0] > 0 and res.timing["forward_passes_run"] > 0
    langs, blocks = res["languages"], res["blocks"]
    assert len(langs) == 3 and len(blocks) == 2
    kl = np.array(res["kl_bits"])
    assert kl.shape == (3, 2) and np.all(kl > 0)
    assert res["windows_used"] == {l: 2 for l in langs}
    fewer = ds.run(dataclasses.replace(cfg, shift_segments=1), ResultCache(tmp_path / "other" / "cache"))
    assert fewer["windows_used"] == {l: 1 for l in langs}
    assert all(fewer["per_language"][l]["positions"] < res["per_language"][l]["positions"] for l in langs)
    d = res["language_damage"]["values"]
    assert res["language_damage"]["metric"] == "kl" and set(d) == set(langs)
    # the all-quantized pass is cached beside the shared block damage
    assert (tmp_path / "_shared" / "block_damage").is_dir()
    for key, c in res["correlations"].items():
        assert {"r", "ci_low", "ci_high", "n", "verdict"} <= set(c), key
    assert res["correlations"]["language_damage_vs_last_block_kl"]["n"] == 3
    assert res["correlations"]["block_damage_vs_kl_pooled"]["n"] == 6
    want = stats.spearmanr([d[l] for l in langs], kl[:, -1]).statistic
    assert res["correlations"]["language_damage_vs_last_block_kl"]["r"] == pytest.approx(want)

    files = ds.write(res, tmp_path / "out")
    assert {f.name for f in files} == {"distribution_shift.csv", "distribution_shift_table.tex",
                                       "distribution_shift.png", "distribution_shift.json"}
    doc = read_json(tmp_path / "out" / "distribution_shift.json")
    assert doc["experiment"] == "distribution_shift" and "provenance" in doc
    assert doc["kl_bits"] == res["kl_bits"]
    ms = ds.macros(res)
    assert ms["ShiftLangLastR"].value == pytest.approx(want)
    assert ms["ShiftLanguages"].value == 3 and ms["ShiftBins"].value == cfg.bins
    assert ms["ShiftWindowsMin"].value == ms["ShiftWindowsMax"].value == 2
    assert ms["ShiftLastKLMax"].value == pytest.approx(kl[:, -1].max())
    assert all(m.name.startswith("Shift") for m in ms)

    calls[0] = 0
    again = ds.run(cfg, cache)
    assert calls[0] == 0 and again.timing["forward_passes_run"] == 0
    assert again["kl_bits"] == res["kl_bits"] and again["correlations"] == res["correlations"]
    assert dataclasses.asdict(cfg)["bins"] == 100 and math.isfinite(kl.sum())
