"""empirical.gradients and validate.gradient_norms: gradient norms against autograd and finite
differences, the model left unchanged, and the run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from conftest import assert_refused

from empirical.gradients import frozen_except, language_gradients, language_loss
from empirical.models import load_model, model_view
from validate import _mechanisms as mech
from validate import gradient_norms as gn
from validate._common import ResultCache, read_json


def _windows(lengths=(12, 9, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([[1]]), torch.randint(3, 250, (1, t - 1), generator=g)], dim=1)
            for t in lengths]


def _per_block(view):
    out: dict[int, list] = {}
    for q in view.linears:
        out.setdefault(q.block, []).append(q)
    return [out[b] for b in sorted(out)]


def _total_loss(model, ws):
    n = sum(w.shape[1] - 1 for w in ws)
    return sum(F.cross_entropy(model(input_ids=w).logits[0, :-1], w[0, 1:], reduction="sum")
               for w in ws) / n


@pytest.fixture(scope="module")
def llama64():
    model, _ = load_model("tiny-llama", dtype=torch.float64, seed=0)
    return model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma"])
def test_weight_gradient_norms_equal_autograd_of_the_whole_loss(name):
    model, _ = load_model(name, seed=0)
    view = model_view(model)
    lins = _per_block(view)
    ws = _windows()
    res = language_gradients(model, view.blocks, lins, ws, keep=True)
    weights = [q.module.weight for b in lins for q in b]
    flags = [p.requires_grad for p in model.parameters()]
    grads = torch.autograd.grad(_total_loss(model, ws), weights)   # one graph over all windows
    assert [p.requires_grad for p in model.parameters()] == flags
    names = [q.name for b in lins for q in b]
    for nm, g in zip(names, grads):
        assert res.linear_weight[nm] == pytest.approx(float(g.double().norm()), rel=1e-4)
    k = 0
    for bi, b in enumerate(lins):
        want = float(torch.sqrt(sum(grads[k + j].double().pow(2).sum() for j in range(len(b)))))
        assert res.weight[bi] == pytest.approx(want, rel=1e-4)
        k += len(b)
    assert res.tokens == sum(w.shape[1] - 1 for w in ws)
    with torch.no_grad():
        assert res.loss == pytest.approx(float(_total_loss(model, ws)), rel=1e-5)


def test_output_gradients_equal_autograd_wrt_captured_block_outputs(llama64):
    model = llama64
    view = model_view(model)
    ws = _windows()
    res = language_gradients(model, view.blocks, _per_block(view), ws, keep=True)
    for bi, block in enumerate(view.blocks):
        captured = []
        h = block.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
        try:
            with frozen_except(model, [p for p in model.parameters()]):
                loss = _total_loss(model, ws)
                gs = torch.autograd.grad(loss, captured)
        finally:
            h.remove()
        for s, g in enumerate(gs):
            torch.testing.assert_close(res.output_grads[bi][s], g[0].double(), rtol=1e-9, atol=1e-12)
        # the reported statistics from the raw gradients: RMS without BOS and last, Frobenius of all
        sq = torch.cat([(g[0] ** 2).sum(-1)[1:-1] for g in gs])
        assert res.output_rms[bi] == pytest.approx(float(sq.mean().sqrt()), rel=1e-10)
        assert res.output_fro[bi] == pytest.approx(float(torch.sqrt(sum((g ** 2).sum() for g in gs))), rel=1e-10)
    assert res.positions_rms == sum(w.shape[1] - 2 for w in ws)


def test_output_gradient_matches_a_finite_difference_directional_derivative(llama64):
    model = llama64
    view = model_view(model)
    ws = _windows()
    res = language_gradients(model, view.blocks, _per_block(view), ws, keep=True)
    gen = torch.Generator().manual_seed(1)
    eps = 1e-2   # the blocks' RMSNorm computes in float32: a smaller step drowns in its rounding
    for bi, block in enumerate(view.blocks):
        vs = [torch.randn(w.shape[1], model.config.hidden_size, generator=gen, dtype=torch.float64) for w in ws]
        norm = float(torch.sqrt(sum((v ** 2).sum() for v in vs)))
        vs = [v / norm for v in vs]   # a unit direction in the space of all windows' block outputs
        state = {"k": 0, "scale": 0.0}

        def bump(m, i, o):
            v = vs[state["k"]]
            state["k"] += 1
            if isinstance(o, tuple):
                return (o[0] + state["scale"] * v, *o[1:])
            return o + state["scale"] * v

        h = block.register_forward_hook(bump)
        try:
            vals = []
            for scale in (eps, -eps):
                state.update(k=0, scale=scale)
                vals.append(language_loss(model, ws))
        finally:
            h.remove()
        fd = (vals[0] - vals[1]) / (2 * eps)
        analytic = sum(float((g * v).sum()) for g, v in zip(res.output_grads[bi], vs))
        assert fd == pytest.approx(analytic, rel=5e-4)
        assert abs(analytic) > 1e-3   # a direction the loss actually depends on


def test_model_is_left_unchanged():
    model, _ = load_model("tiny-llama", seed=0)
    view = model_view(model)
    lins = _per_block(view)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    # a state to restore: training mode, one frozen block weight, a stale gradient elsewhere
    model.train()
    lins[0][0].module.weight.requires_grad_(False)
    sentinel = torch.ones_like(params[0])
    params[0].grad = sentinel
    flags = [p.requires_grad for p in params]
    language_gradients(model, view.blocks, lins, _windows())
    assert model.training
    assert [p.requires_grad for p in params] == flags
    assert params[0].grad is sentinel and all(p.grad is None for p in params[1:])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_taylor_and_fisher_proxies_from_the_weight_gradients():
    model, _ = load_model("tiny-llama", seed=0)
    view = model_view(model)
    lins = _per_block(view)
    gen = torch.Generator().manual_seed(2)
    errors = {q.name: 1e-3 * torch.randn(q.module.weight.shape, generator=gen) for b in lins for q in b}
    res = language_gradients(model, view.blocks, lins, _windows(), errors=errors, keep=True)
    for bi, b in enumerate(lins):
        dot = sum(float((res.weight_grads[q.name].double() * errors[q.name].double()).sum()) for q in b)
        fis = sum(float(((res.weight_grads[q.name].double() * errors[q.name].double()) ** 2).sum()) for q in b)
        assert res.taylor[bi] == pytest.approx(abs(dot), rel=1e-12)
        assert res.fisher[bi] == pytest.approx(fis, rel=1e-12)
    assert language_gradients(model, view.blocks, lins, _windows()).taylor is None


def test_bad_input_is_refused(tiny_llama):
    model, _ = tiny_llama
    view = model_view(model)
    lins = _per_block(view)
    with pytest.raises(ValueError, match="no windows"):
        language_gradients(model, view.blocks, lins, [])
    with pytest.raises(ValueError, match="two tokens"):
        language_gradients(model, view.blocks, lins, [torch.tensor([[1]])])
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        language_gradients(model, view.blocks, lins, [torch.tensor([1, 2, 3])])
    with pytest.raises(ValueError, match="one non-empty list per block"):
        language_gradients(model, view.blocks, lins[:1], _windows())
    with pytest.raises(ValueError, match="no Linears"):
        language_gradients(model, view.blocks, [lins[0], []], _windows())
    with pytest.raises(ValueError, match="errors lack"):
        language_gradients(model, view.blocks, lins, _windows(), errors={})
    with pytest.raises(ValueError, match="no windows"):
        language_loss(model, [])


# ---- the experiment ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [(["--top-k", "0"], "--top-k"), (["--bootstrap", "0"], "--bootstrap"),
                                         (["--grid", "uint"], "--grid"),
                                         (["--grad-segments", "-1"], "--grad-segments")])
def test_bad_flags_are_refused_before_the_model_loads(tmp_path, capsys, argv, needle):
    assert_refused(gn.main, ["--model", "tiny-llama", *argv], tmp_path / "out", needle, capsys)


def test_config_refuses_bad_values_directly():
    from validate._protocol import ConfigError

    for kw in ({"top_k": 0}, {"top_k": 1.5}, {"top_k": True}, {"grad_segments": 0}):
        with pytest.raises(ConfigError):
            gn.Config(model="tiny-llama", **kw)


def test_run_write_macros_and_a_rerun_without_passes(tmp_path, monkeypatch):
    calls = [0]
    real = mech.setup

    def counting(c):
        s = real(c)
        for b in s.view.blocks:
            b.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        return s

    monkeypatch.setattr(mech, "setup", counting)
    cfg = gn.Config(model="tiny-llama", languages=("en", "he", "ja"), segments=2, max_length=32, bootstrap=50,
                    top_k=1)
    cache = ResultCache(tmp_path / "gradient_norms" / "cache")
    res = gn.run(cfg, cache)
    assert calls[0] > 0 and res.timing["backward_passes_run"] == 6
    assert res["windows_used"] == {l: 2 for l in res["languages"]}
    langs, blocks = res["languages"], res["blocks"]
    D = np.array(res["block_damage"]["kl"])
    for st in gn.STATISTICS:
        X = np.array([res["per_language"][l][st] for l in langs])
        assert X.shape == (3, 2) and np.all(X > 0)
        pooled = res["statistics"][st]["pooled"]
        assert pooled["n"] == 6 and {"ci_low", "ci_high", "verdict"} <= set(pooled)
        assert pooled["r"] == pytest.approx(stats.spearmanr(X.ravel(), D.ravel()).statistic)
        top = blocks[int(np.argmax(X.mean(axis=0)))]
        assert res["statistics"][st]["top_k"] == [top]
        assert res["statistics"][st]["top_k_overlap"] == int(top == res["measured_ranking"][0])
    # the per-language item is what the function gives for that language's windows
    s = real(cfg)
    one = language_gradients(s.model, s.view.blocks, s.block_linears(), s.windows()[langs[0]])
    np.testing.assert_allclose(res["per_language"][langs[0]]["weight"], one.weight, rtol=1e-6)

    files = gn.write(res, tmp_path / "out")
    assert {f.name for f in files} == {"gradient_norms.csv", "gradient_norms_table.tex", "gradient_norms.png",
                                       "gradient_norms.json"}
    doc = read_json(tmp_path / "out" / "gradient_norms.json")
    assert doc["experiment"] == "gradient_norms" and doc["statistics"]["weight"]["pooled"]["r"] is not None
    ms = gn.macros(res)
    assert ms["GradWeightPooledR"].value == pytest.approx(res["statistics"]["weight"]["pooled"]["r"])
    assert ms["GradTopK"].value == 1 and all(m.name.startswith("Grad") for m in ms)
    assert ms["GradWindowsMin"].value == ms["GradWindowsMax"].value == 2 and ms["GradDamageMetric"].value == "KL"

    calls[0] = 0
    again = gn.run(cfg, cache)
    assert calls[0] == 0 and again.timing["forward_passes_run"] == 0 and again.timing["backward_passes_run"] == 0
    assert again["per_language"] == res["per_language"] and again["statistics"] == res["statistics"]
