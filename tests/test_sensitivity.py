"""The zero-quantized-pass damage predictor (empirical.sensitivity)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from empirical.bpb import BpbEngine
from empirical.disparity import degradation
from empirical.fakequant import FakeQuantizer, QuantConfig, fake_quantize_weight
from empirical.models import load_model, model_view
from empirical.sensitivity import (VARIANTS, agreement, contract, expected_weight_error, sensitivity_pass,
                                   zero_pass_damage)

EN = ["The quick brown fox jumps over the lazy dog.", "All human beings are born free.",
      "Everyone has the right to life.", "No one shall be held in slavery.", "Hello world.",
      "A short one.", "Education shall be free, at least in the elementary stages."]
RU = ["Все люди рождаются свободными.", "Каждый человек имеет право на жизнь.", "Привет, мир.",
      "Никто не должен содержаться в рабстве.", "Короткая фраза."]


def _units(view):
    groups = {}
    for q in view.linears:
        groups.setdefault(q.block, []).append(q)
    return list(groups.values())


# ---- 1. exactness on a loss quadratic in the Linear's output -----------------------------------

def _quadratic_case(seed=0, T=60, n_in=7, n_out=5):
    gen = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64, generator=gen)
    x = torch.randn(T, n_in, **d)
    w = torch.randn(n_out, n_in, **d)
    target = torch.randn(T, n_out, **d)
    c = torch.rand(T, n_out, **d) + 0.1  # known positive curvature per position and output
    keys = torch.randint(0, 2, (T,), generator=gen)

    def loss(wm, key):  # L_key = sum_{t in key} sum_o 1/2 c_to (y_to - y*_to)^2
        m = keys == key
        return float((0.5 * c[m] * (x[m] @ wm.T - target[m]) ** 2).sum())

    g = c * (x @ w.T - target)  # dL/dy_t at every position (each position's own language)
    return x, w, c, g, keys, loss, gen


def test_actual_error_prediction_is_exact_for_a_quadratic_loss():
    x, w, c, g, keys, loss, gen = _quadratic_case()
    dw = 0.3 * torch.randn(w.shape, dtype=torch.float64, generator=gen)
    s = contract(x, g, c, keys=keys, n_keys=2, dw=dw)
    for k in range(2):
        true = loss(w + dw, k) - loss(w, k)
        assert s["first"][k] + s["second"][k] == pytest.approx(true, rel=1e-12, abs=1e-12)
        m = keys == k
        # first-order term = <dL/dW, dW>, dL/dW = sum_t g_t x_t^T
        assert float(s["first"][k]) == pytest.approx(float(((g[m].T @ x[m]) * dw).sum()), rel=1e-12)
        assert s["count"][k] == int(m.sum())
    # the Fisher default differs from the true curvature here, so it is not exact
    fisher = contract(x, g, keys=keys, n_keys=2, dw=dw)
    assert not np.allclose(fisher["second"], s["second"], rtol=1e-3)
    np.testing.assert_allclose(fisher["h_sum"], [(g[keys == k] ** 2).sum(0).numpy() for k in range(2)], rtol=1e-12)


def test_expected_change_under_random_errors_is_half_f_dot_s2():
    x, w, c, g, keys, loss, gen = _quadratic_case(seed=1)
    s2 = 0.05 * (torch.rand(w.shape, dtype=torch.float64, generator=gen) + 0.2)
    s = contract(x, g, c, keys=keys, n_keys=2, s2=s2, full=True)
    for k in range(2):
        m = keys == k
        # analytic: E[dL] = 1/2 sum_t sum_o c_to sum_j x_tj^2 s2_oj, F = C^T X^2
        analytic = 0.5 * float(torch.einsum("to,tj,oj->", c[m], x[m] ** 2, s2))
        assert s["theory"][k] == pytest.approx(analytic, rel=1e-12)
        np.testing.assert_allclose(s["fisher_w"][k], (c[m].T @ x[m] ** 2).numpy(), rtol=1e-12)
        # seeded Monte Carlo over independent zero-mean errors of variance s2
        n = 4000
        draws = np.array([loss(w + s2.sqrt() * torch.randn(w.shape, dtype=torch.float64, generator=gen), k)
                          for _ in range(n)]) - loss(w, k)
        se = draws.std(ddof=1) / np.sqrt(n)
        assert abs(draws.mean() - s["theory"][k]) < 4 * se
        assert 4 * se < 0.5 * s["theory"][k]  # the check has power: the MC mean is far from 0


def test_contract_weight_diagonal_term_and_full_gradient():
    x, w, c, g, keys, loss, gen = _quadratic_case(seed=2)
    dw = torch.randn(w.shape, dtype=torch.float64, generator=gen)
    s = contract(x, g, c, keys=keys, n_keys=2, dw=dw, full=True)
    for k in range(2):
        # diagonal = 1/2 sum F dW^2 (eq. 2), the expectation form with s2 = dW^2
        assert s["diagonal"][k] == pytest.approx(0.5 * float((s["fisher_w"][k] * dw ** 2).sum()), rel=1e-12)
    # dL/dW by autograd for each key (the target that makes g = c (y - y*))
    target = x @ w.T - g / c
    for k in range(2):
        m = keys == k
        wr = w.clone().requires_grad_(True)
        (0.5 * c[m] * (x[m] @ wr.T - target[m]) ** 2).sum().backward()
        np.testing.assert_allclose(s["grad_w"][k], wr.grad.numpy(), rtol=1e-10, atol=1e-12)


# ---- 2. the per-position language mapping -------------------------------------------------------

def test_position_keys_follow_the_segments(tiny_llama):
    model, tok = tiny_llama
    eng = BpbEngine(model, tok, {"en": EN, "ru": RU}, max_length=128)
    first_seg = np.cumsum([0, len(EN), len(RU)])
    mixed = False
    for b in eng.batches:
        pk = eng.position_keys(b)
        assert pk.shape == b.ids.shape and pk.dtype == torch.long
        assert torch.equal(pk < 0, b.seg < 0)
        # every scored prediction's key is that of the segment it belongs to
        expect = np.searchsorted(first_seg, b.owner.numpy(), side="right") - 1
        np.testing.assert_array_equal(pk[b.rows, b.cols].cpu().numpy(), expect)
        mixed |= any(len(set(r[r >= 0].tolist())) > 1 for r in pk)
    assert mixed, "no packed row holds both languages; the test would not exercise the mapping"


def test_per_language_gradients_equal_separate_passes(tiny_llama):
    model, tok = tiny_llama
    view = model_view(model)
    lins = view.linears
    both = BpbEngine(model, tok, {"en": EN, "ru": RU}, max_length=128)
    nll_both = both.nll()
    assert both.packed
    sp = sensitivity_pass(both, lins, full=True)
    for j, (key, texts) in enumerate((("en", EN), ("ru", RU))):
        alone = BpbEngine(model, tok, {key: texts}, max_length=128)
        sa = sensitivity_pass(alone, lins, full=True)
        assert sp.nll[j] == pytest.approx(sa.nll[0], rel=1e-5)
        assert sp.nll[j] == pytest.approx(nll_both[key].sum(), rel=1e-5)
        for q in lins:
            for part in ("grad_w", "fisher_w", "h_sum", "x2_sum"):
                ours, ref = sp.linears[q.name][part][j], sa.linears[q.name][part][0]
                np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(),
                                           err_msg=f"{q.name} {part} {key}")


# ---- 3. hooks against autograd; the model is left as it was ----------------------------------------

def _autograd_reference(model, eng, n_keys):
    """Per key: dL_k/dW (as stored) and F = sum_t g_t^2 x_t^2 (out, in) from the model's own
    logits, with every parameter's gradient by autograd."""
    ref = copy.deepcopy(model)
    view = model_view(ref)
    seg_first = np.cumsum([0] + [len(eng.n_bytes[k]) for k in eng.keys])
    win_seg = np.array([w.segment for w in eng._windows])
    out = {}
    for k in range(n_keys):
        for p in ref.parameters():
            p.requires_grad_(True)
            p.grad = None
        fisher = {q.name: 0.0 for q in view.linears}
        for b in eng.batches:
            seg = b.seg.cpu().numpy()
            pos_key = np.where(seg >= 0, np.searchsorted(seg_first, win_seg[np.maximum(seg, 0)], side="right") - 1, -1)
            store = {}

            def keep(module, inputs, output, store=store):
                output.retain_grad()
                store[module] = (inputs[0].detach(), output)

            hooks = [q.module.register_forward_hook(keep) for q in view.linears]
            logits = ref(**b.inputs(), use_cache=False).logits
            nll = F.cross_entropy(logits[b.rows, b.cols].float(), b.targets, reduction="none")
            tok_key = pos_key[b.rows.cpu().numpy(), b.cols.cpu().numpy()]
            nll[torch.from_numpy(tok_key == k)].sum().backward()
            for h in hooks:
                h.remove()
            m = torch.from_numpy(pos_key.reshape(-1) == k)
            for q in view.linears:
                xi, o = store[q.module]
                xx = xi.reshape(-1, xi.shape[-1])[m].double()
                gg = o.grad.reshape(-1, o.shape[-1])[m].double()
                fisher[q.name] = fisher[q.name] + (gg ** 2).T @ (xx ** 2)
        out[k] = ({q.name: q.module.weight.grad.double().clone() for q in view.linears}, fisher)
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_hook_gradients_equal_autograd_and_model_is_unchanged(name):
    model, tok = load_model(name, seed=0)
    # one window per row (padded batches, the attention-mask path; packing is covered above)
    eng = BpbEngine(model, tok, {"en": EN[:4], "ru": RU[:3]}, max_length=128, pack=False)
    view = model_view(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ref = _autograd_reference(model, eng, 2)
    sp = sensitivity_pass(eng, view.linears, full=True, max_tokens=100)  # several chunks per batch
    assert sp.chunks > len(eng.batches)
    for k in range(2):
        grads, fisher = ref[k]
        for q in view.linears:
            g_ref = grads[q.name].numpy()
            if type(q.module).__name__ == "Conv1D":  # stored (in, out); ours is (out, in)
                g_ref = g_ref.T
            ours = sp.linears[q.name]
            np.testing.assert_allclose(ours["grad_w"][k], g_ref, rtol=1e-3, atol=1e-4 * np.abs(g_ref).max(),
                                       err_msg=f"{name} {q.name} dL/dW")
            f_ref = fisher[q.name].numpy()
            np.testing.assert_allclose(ours["fisher_w"][k], f_ref, rtol=1e-3, atol=1e-4 * np.abs(f_ref).max(),
                                       err_msg=f"{name} {q.name} F")
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.grad is None, n
        assert p.requires_grad == flags[n], n


def test_pass_sums_against_independent_formulas(tiny_llama):
    """theory, factorized and the actual terms of the pass from its own F, dL/dW and moments."""
    model, tok = tiny_llama
    eng = BpbEngine(model, tok, {"en": EN, "ru": RU}, max_length=128)
    view = model_view(model)
    qc = QuantConfig(bits=3, grid="int", granularity="channel")
    errors = {}
    for q in view.linears:
        w = q.module.weight.detach()
        errors[q.name] = {"dw": fake_quantize_weight(w, qc) - w,
                          "s2": expected_weight_error(w, qc, {"family": "laplace", "params": {"b": 1.0}}).float()}
    sp = sensitivity_pass(eng, view.linears, errors, full=True)
    for q in view.linears:
        s = sp.linears[q.name]
        dw, s2 = errors[q.name]["dw"].double().numpy(), errors[q.name]["s2"].double().numpy()
        for k in range(2):
            assert s["first"][k] == pytest.approx((s["grad_w"][k] * dw).sum(), rel=1e-3, abs=1e-9)
            assert s["theory"][k] == pytest.approx(0.5 * (s["fisher_w"][k] * s2).sum(), rel=1e-4)
            assert s["diagonal"][k] == pytest.approx(0.5 * (s["fisher_w"][k] * dw ** 2).sum(), rel=1e-4)
            xbar = s["x2_sum"][k] / s["count"][k]
            assert s["factorized"][k] == pytest.approx(0.5 * s["h_sum"][k] @ s2 @ xbar, rel=1e-10)
            # the split form: eq. (4) over window starts and over the other positions, added
            split = sum(0.5 * s["h_sum_split"][k, c] @ s2 @ (s["x2_sum_split"][k, c] / s["count_split"][k, c])
                        for c in range(2))
            assert s["factorized_split"][k] == pytest.approx(split, rel=1e-10)
            np.testing.assert_allclose(s["h_sum_split"][k].sum(0), s["h_sum"][k], rtol=1e-12)
            assert s["h_sum"][k].shape == (dw.shape[0],)
        # every text here is one window: one window start per segment
        np.testing.assert_array_equal(s["count_split"][:, 0], [len(EN), len(RU)])


# ---- the sampled (true Fisher) curvature ----------------------------------------------------------

def test_sampled_targets_follow_the_model_distribution(tiny_llama):
    from empirical._head import ChunkedHead
    from empirical.sensitivity import _sample_targets

    model, _ = tiny_llama
    head = ChunkedHead(model, chunk=100, rows=4096)  # several vocabulary chunks (259 tokens)
    h = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 40
    n = 20000
    drawn = _sample_targets(head, h.expand(n, -1), torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = torch.softmax(model.lm_head(h).double(), dim=-1)[0].numpy()
    freq = np.bincount(drawn.numpy(), minlength=p.size) / n
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * se + 1e-4)
    assert p.max() > 0.02  # a non-flat distribution, so the check has power


def test_sampled_curvature_is_the_squared_gradient_at_drawn_targets(tiny_llama):
    """With curvature 'sampled' the pass's h_sum is sum_t (dL(v)/dy_t)^2 for targets v drawn
    from the model (same generator), computed here by autograd through the model's logits."""
    from empirical.sensitivity import _sample_targets

    model, tok = tiny_llama
    eng = BpbEngine(model, tok, {"en": EN[:4]}, max_length=64)
    view = model_view(model)
    sp = sensitivity_pass(eng, view.linears, curvature="sampled", seed=3)
    fisher = sensitivity_pass(eng, view.linears)
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    h_ref = {}
    for b in eng.batches:  # the pass's chunking (one chunk per batch here)
        assert b.ids.numel() <= 1024
        store = {}

        def keep(module, inputs, output, store=store):
            output.retain_grad()
            store[module] = output

        hooks = [q.module.register_forward_hook(keep) for q in model_view(ref).linears]
        hooks.append(ref.get_input_embeddings().register_forward_hook(lambda m, i, o: o.detach().requires_grad_(True)))
        with torch.no_grad():
            h_sel = eng._replay.model_pass(b)[0][b.rows, b.cols]
        drawn = _sample_targets(eng._head, h_sel, gen)
        logits = ref(**b.inputs(), use_cache=False).logits
        F.cross_entropy(logits[b.rows, b.cols].float(), drawn, reduction="sum").backward()
        for hk in hooks:
            hk.remove()
        real = (b.seg >= 0).reshape(-1)
        for q, q_ref in zip(view.linears, model_view(ref).linears):
            g = store[q_ref.module].grad
            h_ref[q.name] = h_ref.get(q.name, 0) + (g.reshape(-1, g.shape[-1])[real].double() ** 2).sum(0)
    for q in view.linears:
        ours = sp.linears[q.name]["h_sum"][0]
        np.testing.assert_allclose(ours, h_ref[q.name].numpy(), rtol=1e-3, atol=1e-4 * ours.max(), err_msg=q.name)
        # the first-order term does not depend on the curvature; the curvature does change
        assert not np.allclose(ours, fisher.linears[q.name]["h_sum"][0], rtol=0.05)
    np.testing.assert_allclose(sp.nll, fisher.nll)


# ---- error models ---------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_expected_weight_error_matches_the_realised_error(granularity):
    """Gaussian weights, per-row scales: theory's s2 (fitted family = Gaussian) is the mean
    squared rounding error the quantizer realises, row by row in aggregate."""
    gen = torch.Generator().manual_seed(0)
    # rows of different scales where each row (or group) is a site of its own; one scale for a
    # per-tensor site, so the Gaussian is the true family in every case
    scales = torch.exp(torch.randn(64, 1, generator=gen) * 0.5) if granularity != "tensor" else torch.ones(64, 1)
    w = torch.randn(64, 1024, generator=gen, dtype=torch.float64) * scales
    qc = QuantConfig(bits=4, grid="int", granularity=granularity, group_size=128)
    s2 = expected_weight_error(w, qc, {"family": "gaussian", "params": {"sigma": 3.0}})
    assert s2.shape == w.shape and s2.dtype == torch.float64
    real = (fake_quantize_weight(w, qc) - w) ** 2
    # per output row: the mean realised error against theory's (absmax alpha is the sample max)
    ratio = real.mean(1) / s2.mean(1)
    assert abs(float(ratio.mean()) - 1) < 0.1
    assert float((real.mean(1).log() - s2.mean(1).log()).std()) < 0.2
    # aciq is realised on midrise levels: its s2 is midrise's
    a = expected_weight_error(w, QuantConfig(bits=4, grid="aciq", granularity=granularity),
                              {"family": "gaussian", "params": {"sigma": 1.0}})
    m = expected_weight_error(w, QuantConfig(bits=4, grid="midrise", granularity=granularity),
                              {"family": "gaussian", "params": {"sigma": 1.0}})
    assert torch.equal(a, m)


def test_expected_weight_error_transposed_and_zero_rows():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 256, generator=gen, dtype=torch.float64)
    w[3] = 0.0
    qc = QuantConfig(bits=4)
    fit = {"family": "laplace", "params": {"b": 1.0}}
    s2 = expected_weight_error(w, qc, fit)
    assert torch.all(s2[3] == 0) and torch.all(s2[[0, 1, 2, 4]] > 0)
    torch.testing.assert_close(expected_weight_error(w.t().contiguous(), qc, fit, transposed=True), s2.t(),
                               rtol=1e-12, atol=0)


# ---- 4. against a measured quantized pass ------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 2])
def test_actual_prediction_against_measured_single_block_damage(tiny_llama, bits):
    """One block of tiny-llama quantized per channel: the 'actual' prediction (eq. 1 with the
    real rounding error) against the measured degradation, every language and block.

    At 4 bits the Taylor expansion is in its regime: every prediction lies within 20% of the
    largest measured damage of the measured value. At 2 bits (weights rounded to -1, 0 or +1 times
    their row's absmax) it is not, and the honest claim is weaker: the predictions have the
    measured order of magnitude and order the (language, block) damages alike (Spearman > 0.5
    over the four). On a random model the first-order term dominates (it is far from a minimum),
    so theory's second-order expectation is not held to this."""
    from scipy.stats import spearmanr

    model, tok = tiny_llama
    eng = BpbEngine(model, tok, {"en": EN, "ru": RU}, max_length=128)
    nll_fp = eng.nll()
    view = model_view(model)
    units = _units(view)
    qc = QuantConfig(bits=bits, grid="int", granularity="channel")
    pred = zero_pass_damage(eng, units, qc, nll_fp=nll_fp, variants=("actual",))
    fq = FakeQuantizer(view.linears, qc)
    meas = np.zeros((2, len(units)))
    for i, u in enumerate(units):
        names = {q.name for q in u}
        with fq.quantized(protect={q.name for q in view.linears if q.name not in names}):
            d = degradation(eng.nll(), nll_fp)
        meas[:, i] = [d[k] for k in eng.keys]
    p = pred["actual"]
    top = np.abs(meas).max()
    assert top > 1e-4  # measurable at all
    if bits == 4:
        assert np.all(np.abs(p - meas) <= 0.2 * top), (p, meas)
    else:
        assert 1 / 3 < np.abs(p).max() / top < 3, (p, meas)
        assert spearmanr(p.ravel(), meas.ravel()).statistic > 0.5, (p, meas)
    assert pred.timing["backward_passes"] == 1
    np.testing.assert_allclose(pred.nll_fp, [nll_fp[k].sum() for k in eng.keys])


def test_agreement_values():
    meas = np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0]])
    pred = 2 * meas
    a = agreement(pred, meas, ["x", "y"])
    assert a["per_key"]["x"]["spearman"] == pytest.approx(1.0)
    assert a["pooled"]["scale"] == pytest.approx(0.5)
    assert a["pooled"]["r2_scaled"] == pytest.approx(1.0)
    # raw R^2: 1 - sum (2m - m)^2 / sum (m - mean)^2 over the pooled pairs
    m = meas.ravel()
    assert a["pooled"]["r2"] == pytest.approx(1 - (m ** 2).sum() / ((m - m.mean()) ** 2).sum())
    rev = agreement(meas[:, ::-1].copy(), meas)
    assert rev["per_key"]["0"]["spearman"] == pytest.approx(-1.0)


# ---- 5. bad input ---------------------------------------------------------------------------------

def test_bad_input(tiny_llama):
    model, tok = tiny_llama
    eng = BpbEngine(model, tok, {"en": EN[:2]}, max_length=64)
    view = model_view(model)
    units = _units(view)
    qc = QuantConfig(bits=4)
    with pytest.raises(ValueError, match="unknown variant"):
        zero_pass_damage(eng, units, qc, variants=("theory", "oracle"))
    other, _ = load_model("tiny-llama", seed=1)
    foreign = model_view(other).linears[0]
    with pytest.raises(ValueError, match="not a quantizable Linear"):
        zero_pass_damage(eng, [units[0], [foreign]], qc)
    with pytest.raises(ValueError, match="non-empty"):
        zero_pass_damage(eng, [], qc)
    with pytest.raises(ValueError, match="nll_fp has keys"):
        zero_pass_damage(eng, units, qc, nll_fp={"fr": np.ones(2)})
    bad = copy.deepcopy(model)
    bad_view = model_view(bad)
    with torch.no_grad():
        bad_view.linears[2].module.weight[0, 0] = float("nan")
    bad_eng = BpbEngine(bad, tok, {"en": EN[:2]}, max_length=64)
    with pytest.raises(ValueError, match=f"weight of {bad_view.linears[2].name} contains NaN"):
        zero_pass_damage(bad_eng, _units(bad_view), qc)
    with pytest.raises(ValueError, match="NaN"):
        expected_weight_error(bad_view.linears[2].module.weight, qc, {"family": "laplace", "params": {"b": 1.0}})
    with pytest.raises(ValueError, match="unknown curvature"):
        sensitivity_pass(eng, view.linears, curvature="hessian")
    x, g = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match="dw must be"):
        contract(x, g, dw=torch.randn(3, 2))
    with pytest.raises(ValueError, match="h must have"):
        contract(x, g, torch.randn(5, 3))
    with pytest.raises(ValueError, match="out of range"):
        contract(x, g, keys=torch.tensor([0, 1, 2, 0, 0]), n_keys=2)
    with pytest.raises(ValueError, match="NaN"):
        contract(x, g * float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        agreement(np.array([[np.nan, 1.0]]), np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="one shape"):
        agreement(np.ones((2, 3)), np.ones((3, 2)))
    assert set(VARIANTS) >= {"theory", "factorized", "actual", "actual_second_order"}
