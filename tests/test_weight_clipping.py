"""Activation-weighted (imatrix-style) weight clipping against brute force on synthetic weights."""

import numpy as np
import pytest
import torch

import empirical.weight_clipping as wc
from empirical.fakequant import QuantConfig, choose_alpha
from empirical.weight_clipping import (ImportanceQuantizer, importance_alpha, quantize_weight_weighted)
from theory import quantize


def _weights(shape, seed=0, df=5.0):
    rng = np.random.default_rng(seed)
    return rng.standard_t(df, size=shape) * 0.05


def _err(row, s, alpha, bits, grid):
    """Plain numpy E(alpha) = sum_j s_j (w_j - Q_alpha(w_j))^2 with theory's reference quantizer."""
    return float(np.sum(s * (row - quantize(row, grid, alpha, bits)) ** 2))


def _dense(row, s, bits, grid, n=4000):
    """(alphas, E) on a dense grid of fractions of the row's absmax (a plain Python loop)."""
    am = np.abs(row).max()
    alphas = np.arange(1, n + 1) / n * am
    return alphas, np.array([_err(row, s, a, bits, grid) for a in alphas])


# --------------------------------------------------------------------------------------------
# mode "mean"
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", ["int", "midtread", "midrise", "aciq"])
@pytest.mark.parametrize("bits", [2, 4])
def test_uniform_importance_is_the_sweep_and_refinement_never_hurts(grid, bits):
    w = torch.from_numpy(_weights((12, 96), seed=bits))
    cfg = QuantConfig(bits=bits, grid=grid, clipping="sweep", n_alphas=32)
    coarse = importance_alpha(w, np.ones(96), bits, grid, n_alphas=32, refine=False)
    assert coarse.shape == (12, 1) and coarse.dtype == torch.float64
    assert torch.equal(coarse, choose_alpha(w, cfg))
    fine = importance_alpha(w, np.ones(96), bits, grid, n_alphas=32)
    ref_grid = "midrise" if grid == "aciq" else grid  # aciq is realised on its midrise levels
    ones = np.ones(96)
    x = w.numpy()
    e_coarse = [_err(x[i], ones, coarse[i, 0].item(), bits, ref_grid) for i in range(12)]
    e_fine = [_err(x[i], ones, fine[i, 0].item(), bits, ref_grid) for i in range(12)]
    assert all(f <= c * (1 + 1e-12) for f, c in zip(e_fine, e_coarse))
    assert sum(f < c * (1 - 1e-9) for f, c in zip(e_fine, e_coarse)) >= 3  # refinement does work
    # refined thresholds stay within one coarse step of the coarse ones
    am = w.abs().amax(dim=1, keepdim=True)
    assert torch.all((fine - coarse).abs() < am / 32)


@pytest.mark.parametrize("bits,grid", [(2, "int"), (3, "midtread"), (4, "int"), (4, "midrise")])
def test_mean_mode_against_dense_brute_force(bits, grid):
    rng = np.random.default_rng(10 + bits)
    x = _weights((4, 640), seed=bits)
    s = rng.gamma(0.5, size=640)  # skewed importance, as real E[x_j^2] is
    alpha = importance_alpha(torch.from_numpy(x), s, bits, grid).numpy()[:, 0]
    for i in range(4):
        _, e_dense = _dense(x[i], s, bits, grid)
        e = _err(x[i], s, alpha[i], bits, grid)
        assert e <= e_dense.min() * (1 + 1e-3), (i, e / e_dense.min() - 1)


def test_importance_decides_whether_an_outlier_is_kept():
    x = _weights((1, 256), seed=3, df=50.0)
    x[0, 7] = 12 * np.abs(x).max()  # one huge weight on input channel 7
    big, tiny = np.ones(256), np.ones(256)
    big[7], tiny[7] = 1e4, 1e-4
    a_big = importance_alpha(torch.from_numpy(x), big, 4).item()
    a_tiny = importance_alpha(torch.from_numpy(x), tiny, 4).item()
    assert a_big >= 0.9 * x[0, 7]  # the outlier's input matters: keep it
    assert a_tiny <= 0.4 * x[0, 7]  # it does not: clip it for the resolution of the rest
    # and each is what brute force picks for its importance
    for a, s in ((a_big, big), (a_tiny, tiny)):
        _, e = _dense(x[0], s, 4, "int")
        assert _err(x[0], s, a, 4, "int") <= e.min() * (1 + 1e-3)


def test_importance_is_scale_free_and_a_zero_channel_is_ignored():
    x = torch.from_numpy(_weights((6, 128), seed=4))
    s = np.random.default_rng(4).gamma(0.5, size=128)
    assert torch.equal(importance_alpha(x, s, 3), importance_alpha(x, 1000.0 * s, 3))
    # a channel with zero importance: its weight may take any value without changing alpha
    s0 = s.copy()
    s0[5] = 0.0
    x2 = x.clone()
    x2[:, 5] = -x2[:, 5]  # the absmax (which sets the grid of fractions) stays the same
    assert torch.equal(importance_alpha(x, s0, 3), importance_alpha(x2, s0, 3))


# --------------------------------------------------------------------------------------------
# modes "minimax" and "weighted"
# --------------------------------------------------------------------------------------------

def _three_languages(k, seed=0):
    """Importances that put their weight on different thirds of the input channels."""
    rng = np.random.default_rng(seed)
    langs = {}
    for i, name in enumerate(("en", "zh", "sw")):
        s = rng.uniform(0.01, 0.05, size=k)
        s[i * k // 3:(i + 1) * k // 3] *= 400.0
        langs[name] = s
    return langs


def _row_with_region_outliers(k, seed):
    """A row whose thirds have different spreads (and outliers), so languages disagree."""
    x = _weights(k, seed=seed, df=4.0)
    x[: k // 3] *= 0.4
    x[2 * k // 3:] *= 2.5
    return x


def _dense_penalties(row, langs, bits, grid, n=3000):
    """[language, alpha] penalty E^l / min E^l - 1 on a dense grid (the brute-force reference)."""
    am = np.abs(row).max()
    alphas = np.arange(1, n + 1) / n * am
    e = np.array([[_err(row, s, a, bits, grid) for a in alphas] for s in langs.values()])
    return alphas, e.min(axis=1)


def _worst(row, langs, alpha, best, bits, grid):
    return max(_err(row, s, alpha, bits, grid) / b - 1 for s, b in zip(langs.values(), best))


def test_minimax_against_brute_force_and_never_worse_than_the_pooled_mean():
    k, bits, grid = 480, 3, "int"
    langs = _three_languages(k)
    pooled = sum(langs.values()) / 3
    x = np.stack([_row_with_region_outliers(k, seed) for seed in range(3)])
    a_mm = importance_alpha(torch.from_numpy(x), langs, bits, grid, mode="minimax").numpy()[:, 0]
    a_mean = importance_alpha(torch.from_numpy(x), pooled, bits, grid).numpy()[:, 0]
    improved = 0
    for i in range(x.shape[0]):
        alphas, best = _dense_penalties(x[i], langs, bits, grid)
        # brute force: the worst penalty over the same dense grid, minimised
        dense_worst = min(_worst(x[i], langs, a, best, bits, grid) for a in alphas[::3])
        w_mm = _worst(x[i], langs, a_mm[i], best, bits, grid)
        w_mean = _worst(x[i], langs, a_mean[i], best, bits, grid)
        assert w_mm <= dense_worst + 2e-3, (i, w_mm, dense_worst)
        assert w_mm <= w_mean + 1e-9, (i, w_mm, w_mean)
        improved += w_mm < w_mean - 1e-3
        assert w_mean > 0.01  # the languages really disagree on this row
    assert improved >= 2


def test_weighted_mode_against_brute_force_and_its_limits():
    k, bits, grid = 300, 4, "int"
    langs = _three_languages(k, seed=1)
    x = _row_with_region_outliers(k, seed=7)[None, :]
    v = {"en": 0.2, "zh": 0.5, "sw": 0.3}
    a = importance_alpha(torch.from_numpy(x), langs, bits, grid, mode="weighted", fair_weights=v).item()
    alphas, best = _dense_penalties(x[0], langs, bits, grid)
    vv = np.array([v[n] for n in langs])

    def obj(al):
        return float(vv @ np.array([_err(x[0], s, al, bits, grid) / b - 1
                                    for s, b in zip(langs.values(), best)]))

    assert obj(a) <= min(obj(al) for al in alphas[::3]) + 2e-3
    # a one-hot fairness weight is that language's own optimum (mode "mean" with its importance)
    for name, s in langs.items():
        one_hot = {n: float(n == name) for n in langs}
        got = importance_alpha(torch.from_numpy(x), langs, bits, grid, mode="weighted",
                               fair_weights=one_hot)
        assert torch.equal(got, importance_alpha(torch.from_numpy(x), s, bits, grid))


def test_minimax_is_invariant_to_each_languages_scale():
    k = 192
    langs = _three_languages(k, seed=2)
    x = torch.from_numpy(np.stack([_row_with_region_outliers(k, s) for s in range(4)]))
    scaled = {n: s * c for (n, s), c in zip(langs.items(), (1.0, 1e3, 1e-3))}
    a = importance_alpha(x, langs, 4, mode="minimax")
    b = importance_alpha(x, scaled, 4, mode="minimax")
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)
    # the token-weighted mix is not: a loud language dominates it
    pooled = sum(langs.values())
    loud = sum(scaled.values())
    assert not torch.equal(importance_alpha(x, pooled, 4), importance_alpha(x, loud, 4))


# --------------------------------------------------------------------------------------------
# Granularities, layouts, blocks
# --------------------------------------------------------------------------------------------

def _quant_rows(rows, alpha, bits, grid):
    return np.stack([quantize(r, grid, a, bits) for r, a in zip(rows, alpha)])


@pytest.mark.parametrize("mode", ["mean", "minimax"])
def test_group_rows_use_their_slice_of_the_importance(mode):
    x = _weights((5, 64), seed=11)
    langs = _three_languages(64, seed=3)
    imp = langs if mode == "minimax" else langs["zh"]
    cfg = QuantConfig(bits=3, granularity="group", group_size=16)
    got = quantize_weight_weighted(torch.from_numpy(x), cfg, imp, mode=mode).numpy()
    expect = np.empty_like(x)
    for g in range(4):
        sl = slice(16 * g, 16 * (g + 1))
        part = {n: s[sl] for n, s in langs.items()} if mode == "minimax" else imp[sl]
        a = importance_alpha(torch.from_numpy(np.ascontiguousarray(x[:, sl])), part, 3,
                             mode=mode).numpy()[:, 0]
        expect[:, sl] = _quant_rows(x[:, sl], a, 3, "int")
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-15)


def test_tensor_granularity_minimises_the_error_summed_over_rows():
    x = _weights((6, 80), seed=12)
    s = np.random.default_rng(12).gamma(0.5, size=80)
    cfg = QuantConfig(bits=3, granularity="tensor")
    q = quantize_weight_weighted(torch.from_numpy(x), cfg, s).numpy()
    am = np.abs(x).max()

    def total(a):
        return sum(_err(r, s, a, 3, "int") for r in x)

    assert np.unique(q).size <= 7  # one set of 2^3 - 1 levels for the whole tensor
    # the alpha actually used: the one whose quantization reproduces q
    dense = np.arange(1, 3001) / 3000 * am
    e = np.array([total(a) for a in dense])
    e_q = float(np.sum(s * (x - q) ** 2))
    assert e_q <= e.min() * (1 + 1e-3)


def test_conv1d_layout_equals_the_linear_layout():
    x = torch.from_numpy(_weights((24, 40), seed=13)).to(torch.float32)  # Linear (out=24, in=40)
    langs = _three_languages(40, seed=4)
    for gran in ("channel", "group", "tensor"):
        cfg = QuantConfig(bits=4, granularity=gran, group_size=8)
        a = quantize_weight_weighted(x, cfg, langs, mode="minimax")
        b = quantize_weight_weighted(x.t().contiguous(), cfg, langs, mode="minimax", transposed=True)
        assert a.dtype == torch.float32 and a.shape == x.shape
        assert torch.equal(a, b.t())


def test_blocks_bound_memory_and_do_not_change_the_result(monkeypatch):
    langs = _three_languages(50, seed=5)
    seen = []
    real = wc._round_to_grid

    def spy(rows, alpha, cfg):
        out = real(rows, alpha, cfg)
        seen.append(out.numel())
        return out

    # 400 elements: several rows per block; 16 < 50 inputs: the columns are split too
    for block, n_rows in ((400, 9), (16, 2)):
        x = torch.from_numpy(_weights((n_rows, 50), seed=14))
        for m in wc.IMPORTANCE_MODES:
            imp = langs if m != "mean" else langs["en"]
            ref = importance_alpha(x, imp, 4, mode=m, n_alphas=8)
            with monkeypatch.context() as mp:
                mp.setattr(wc, "_round_to_grid", spy)
                mp.setattr(wc, "_BLOCK", block)
                seen.clear()
                got = importance_alpha(x, imp, 4, mode=m, n_alphas=8)
            np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-12)
            assert max(seen) <= block and len(seen) > 4


def test_a_gemma_sized_block_stays_bounded():
    # 2048 x 640 with 64 alphas is 84M elements (671 MB in float64) if done at once
    k, n = 640, 64
    cc = min(k, wc._BLOCK)
    ac = min(n, max(1, wc._BLOCK // cc))
    rc = max(1, wc._BLOCK // (ac * cc))
    assert rc * ac * cc * 8 <= 32 * 2**20 and wc._BLOCK_GPU * 8 * 6 <= 200 * 2**20


# --------------------------------------------------------------------------------------------
# ImportanceQuantizer on a model
# --------------------------------------------------------------------------------------------

def _importance_for(linears, langs=None, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for q in linears:
        k = q.module.weight.shape[0] if type(q.module).__name__ == "Conv1D" else q.module.weight.shape[1]
        out[q.name] = ({n: rng.gamma(0.5, size=k) for n in langs} if langs
                       else rng.gamma(0.5, size=k))
    return out


def test_importance_quantizer_on_gpt2_conv1d_restores_exactly(tiny_gpt2):
    from empirical.models import model_view

    model, _ = tiny_gpt2
    lins = model_view(model).linears
    assert type(lins[0].module).__name__ == "Conv1D"
    imp = _importance_for(lins, langs=("en", "zh"))
    cfg = QuantConfig(bits=3, granularity="channel", n_alphas=16)
    fq = ImportanceQuantizer(lins, cfg, imp, mode="minimax")
    originals = [q.module.weight.data for q in lins]
    copies = [t.clone() for t in originals]

    def same(q, o):  # the very tensor that was there (.data is a fresh view object each time)
        w = q.module.weight.data
        return w.data_ptr() == o.data_ptr() and w.shape == o.shape and torch.equal(w, o)

    with fq.quantized(protect={lins[1].name}):
        for q, o in zip(lins, originals):
            w = q.module.weight.data
            if q.name == lins[1].name:
                assert same(q, o)
                continue
            assert not torch.equal(w, o)
            # Conv1D is (in, out): quantized per output column, with importance per input row
            expect = quantize_weight_weighted(o.t().contiguous(), cfg, imp[q.name], mode="minimax").t()
            assert torch.equal(w, expect)
    assert all(same(q, o) for q, o in zip(lins, originals))
    assert all(torch.equal(o, c) for o, c in zip(originals, copies))
    with pytest.raises(RuntimeError, match="boom"):
        with fq.quantized():
            assert not torch.equal(lins[0].module.weight.data, copies[0])
            raise RuntimeError("boom")
    assert all(same(q, o) for q, o in zip(lins, originals))
    assert all(torch.equal(o, c) for o, c in zip(originals, copies))


def test_importance_quantizer_on_a_linear_differs_from_plain_clipping():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 32)

    class _Q:
        name, module, n_params, block = "lin", lin, lin.weight.numel(), 0

    s = np.full(96, 1e-3)
    s[:8] = 1.0  # the first 8 inputs carry almost all the signal
    cfg = QuantConfig(bits=3, clipping="sweep")
    fq = ImportanceQuantizer([_Q], cfg, {"lin": s, "unused.layer": np.ones(3)})
    w0 = lin.weight.data
    with fq.quantized():
        qw = lin.weight.data.clone()
    assert lin.weight.data.data_ptr() == w0.data_ptr() and torch.equal(lin.weight.data, w0)
    plain = quantize_weight_weighted(w0, cfg, np.ones(96))
    # config.clipping is ignored
    assert torch.equal(plain, quantize_weight_weighted(w0, QuantConfig(bits=3), np.ones(96)))

    def err(q):
        return ((q.double() - w0.double()) ** 2 @ torch.from_numpy(s)).sum().item()

    assert err(qw) < err(plain)  # weighted error: the importance-aware thresholds win
    assert ((qw - w0) ** 2).sum() > ((plain - w0) ** 2).sum()  # plain MSE: the sweep wins


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("importance,mode,needle", [
    (np.r_[np.ones(15), np.nan], "mean", "NaN or inf"),
    (np.r_[np.ones(15), np.inf], "mean", "NaN or inf"),
    (np.r_[np.ones(15), -1.0], "mean", "negative"),
    (np.zeros(16), "mean", "all zero"),
    (np.ones(15), "mean", "length 15"),
    (np.ones((16, 2)), "mean", "1-D"),
    (np.ones(16), "median", "unknown importance mode"),
    ({"en": np.ones(16)}, "mean", "mode 'mean' takes one importance vector"),
    (np.ones(16), "minimax", "needs a mapping language"),
    ({}, "minimax", "no languages"),
    ({"en": np.ones(16), "zh": np.ones(12)}, "minimax", "different lengths"),
    ({"en": np.ones(12), "zh": np.ones(12)}, "minimax", "length 12"),
    ({"en": np.ones(16), "zh": np.zeros(16)}, "weighted", "language 'zh': importance is all zero"),
])
def test_bad_importance_is_refused(importance, mode, needle):
    w = torch.from_numpy(_weights((4, 16)))
    with pytest.raises(ValueError, match=needle):
        importance_alpha(w, importance, 4, mode=mode)
    with pytest.raises(ValueError, match=needle):
        quantize_weight_weighted(w, QuantConfig(bits=4), importance, mode=mode)


def test_bad_weights_fair_weights_and_mappings_are_refused():
    w = torch.from_numpy(_weights((4, 16)))
    langs = {"en": np.ones(16), "zh": np.ones(16)}
    with pytest.raises(ValueError, match="NaN or inf"):
        importance_alpha(w.clone().fill_(float("nan")), np.ones(16), 4)
    with pytest.raises(ValueError, match="rows must be 2-D"):
        importance_alpha(w[0], np.ones(16), 4)
    with pytest.raises(ValueError, match="rows is empty"):
        importance_alpha(w[:0], np.ones(16), 4)
    with pytest.raises(ValueError, match="n_alphas"):
        importance_alpha(w, np.ones(16), 4, n_alphas=0)
    with pytest.raises(ValueError, match="bits"):
        importance_alpha(w, np.ones(16), 1)
    with pytest.raises(ValueError, match="no weight for language"):
        importance_alpha(w, langs, 4, mode="weighted", fair_weights={"en": 1.0})
    with pytest.raises(ValueError, match="2 fair_weights for 3"):
        importance_alpha(w, {**langs, "sw": np.ones(16)}, 4, mode="weighted", fair_weights=[1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        importance_alpha(w, langs, 4, mode="weighted", fair_weights=[1, -1])
    with pytest.raises(ValueError, match="only used by mode 'weighted'"):
        importance_alpha(w, langs, 4, mode="minimax", fair_weights=[1, 1])
    with pytest.raises(ValueError, match="group_size 5 does not divide"):
        quantize_weight_weighted(w, QuantConfig(bits=4, granularity="group", group_size=5), np.ones(16))
    with pytest.raises(ValueError, match="weight contains NaN"):
        quantize_weight_weighted(w.clone().fill_(float("inf")), QuantConfig(bits=4), np.ones(16))
    lin = torch.nn.Linear(16, 4)

    class _Q:
        name, module, n_params, block = "a", lin, 64, 0

    with pytest.raises(ValueError, match="no entry for 1 linear"):
        ImportanceQuantizer([_Q], QuantConfig(bits=4), {"b": np.ones(16)})
    with pytest.raises(ValueError, match="linear 'a': importance has length 4"):
        ImportanceQuantizer([_Q], QuantConfig(bits=4), {"a": np.ones(4)})
    with pytest.raises(ValueError, match="unknown importance mode"):
        ImportanceQuantizer([_Q], QuantConfig(bits=4), {"a": np.ones(16)}, mode="max")


def test_a_group_without_importance_falls_back_to_the_plain_error():
    x = torch.from_numpy(_weights((3, 32), seed=15))
    s = np.random.default_rng(15).gamma(0.5, size=32)
    s[16:] = 0.0  # the second group's inputs are never active
    cfg = QuantConfig(bits=3, granularity="group", group_size=16)
    got = quantize_weight_weighted(x, cfg, s)
    plain = quantize_weight_weighted(x, cfg, np.ones(32))
    assert torch.equal(got[:, 16:], plain[:, 16:])
    assert not torch.equal(got[:, :16], plain[:, :16])
