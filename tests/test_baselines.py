"""empirical.baselines: optimum-quanto run for real on a copy, swapped into the model and back.

The tests that need the library skip, with the reason from ``available("quanto")``, where the
``baselines`` extra is not installed.
"""

from __future__ import annotations

import copy
import importlib.metadata

import numpy as np
import pytest
import torch

from empirical import baselines
from empirical.baselines import LIBRARIES, LibraryQuantizer, available
from empirical.models import load_model


# ------------------------------------------------------------------------------------------
# available(): runs without the library
# ------------------------------------------------------------------------------------------

def test_available_unknown_name_raises_naming_it():
    with pytest.raises(ValueError, match="'torchao-nightly'"):
        available("torchao-nightly")
    with pytest.raises(ValueError, match="unknown quantization library"):
        LibraryQuantizer(torch.nn.Linear(2, 2), "nope")
    assert LIBRARIES == ("quanto",)


def test_available_reports_missing_and_wrong_version(monkeypatch):
    def missing(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(baselines.importlib.metadata, "version", missing)
    reason = available("quanto")
    assert reason is not None and "optimum-quanto is not installed" in reason

    monkeypatch.setattr(baselines.importlib.metadata, "version", lambda dist: "0.1.0")
    reason = available("quanto")
    assert reason is not None and "0.1.0" in reason and "0.2.7" in reason
    with pytest.raises(ImportError, match="0.1.0"):
        LibraryQuantizer(torch.nn.Linear(2, 2), "quanto")


# ------------------------------------------------------------------------------------------
# with optimum-quanto
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quanto():
    reason = available("quanto")
    if reason is not None:
        pytest.skip(f"optimum-quanto unusable: {reason}")
    import optimum.quanto

    return optimum.quanto


@pytest.fixture()
def llama(quanto):
    """A fresh tiny Llama per test, so that a failing test cannot leave a swapped model behind."""
    model, _ = load_model("tiny-llama", seed=0)
    return model


def _batches(seed: int, n: int = 3, lo: int = 0, hi: int = 256, shape=(2, 24)):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(lo, hi, shape, generator=g)} for _ in range(n)]


def _snapshot(model):
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    modules = dict(model.named_modules())
    return tensors, modules


def _assert_restored(model, snap):
    tensors, modules = snap
    now = dict(model.named_modules())
    assert list(now) == list(modules)
    for name, mod in modules.items():
        assert now[name] is mod, name
    state = model.state_dict()
    assert list(state) == list(tensors)
    for k, v in tensors.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("weight_bits", [4, 8])
def test_quantized_changes_logits_and_restores_exactly(llama, quanto, weight_bits):
    ids = _batches(99, n=1)[0]["input_ids"]
    ref = _logits(llama, ids)
    snap = _snapshot(llama)
    head, emb = llama.lm_head, llama.get_input_embeddings()
    lq = LibraryQuantizer(llama, "quanto", weight_bits=weight_bits, act_bits=8)
    assert "lm_head" not in lq.names and len(lq.names) == 14  # 2 blocks x 7 Linears
    lq.calibrate(_batches(0))
    _assert_restored(llama, snap)  # calibration ran on a copy
    with lq.quantized() as same:
        assert same is lq
        for n in lq.names:
            assert isinstance(llama.get_submodule(n), quanto.QModuleMixin)
        assert llama.lm_head is head and llama.get_input_embeddings() is emb
        assert not isinstance(llama.lm_head, quanto.QModuleMixin)
        out = _logits(llama, ids)
    diff = float((out - ref).abs().max())
    assert diff > 1e-4 * float(ref.abs().max())
    _assert_restored(llama, snap)
    assert torch.equal(_logits(llama, ids), ref)
    with lq.quantized():  # the same quantized modules again: the same logits
        assert torch.equal(_logits(llama, ids), out)


def test_restores_after_exception_and_is_not_reentrant(llama, quanto):
    snap = _snapshot(llama)
    lq = LibraryQuantizer(llama, "quanto", weight_bits=4, act_bits=8)
    lq.calibrate(_batches(0))
    with pytest.raises(KeyError, match="boom"):
        with lq.quantized():
            raise KeyError("boom")
    _assert_restored(llama, snap)
    with pytest.raises(RuntimeError, match="re-entrant"):
        with lq.quantized():
            with lq.quantized():
                pass
    _assert_restored(llama, snap)
    with pytest.raises(RuntimeError, match="inside quantized"):
        with lq.quantized():
            lq.calibrate(_batches(0))
    _assert_restored(llama, snap)
    with lq.quantized():  # usable again after all that
        pass
    _assert_restored(llama, snap)


def test_weights_on_the_library_grid(llama, quanto):
    # int8: symmetric absmax per output channel, s_r = max|w_r| / 127, computed here independently
    lq8 = LibraryQuantizer(llama, "quanto", weight_bits=8, act_bits=8)
    lq8.calibrate(_batches(0, n=1))
    lq4 = LibraryQuantizer(llama, "quanto", weight_bits=4, act_bits=8)
    lq4.calibrate(_batches(0, n=1))
    for n in lq8.names:
        w = llama.get_submodule(n).weight.detach()
        s = w.abs().amax(dim=1, keepdim=True) / 127
        expected = torch.round(w / s).clamp(-128, 127) * s
        we8 = lq8.effective_weight(n)
        assert torch.allclose(we8, expected, rtol=0, atol=1e-6 * float(s.max())), n
        assert not torch.equal(we8, w)
        # int4: 16 levels per group (a row on these 64/128-wide layers); affine min-max, so every
        # weight within half a step (max - min) / 15 / 2 of its level, and levels inside [min, max]
        we4 = lq4.effective_weight(n)
        g = lq4.quantized_module(n).weight_group_size or w.shape[1]
        wg, eg = w.reshape(-1, g), we4.reshape(-1, g)
        lo, hi = wg.min(dim=1, keepdim=True).values, wg.max(dim=1, keepdim=True).values
        step = (hi - lo) / 15
        assert max(len(torch.unique(r)) for r in eg) <= 16, n
        assert max(len(torch.unique(r)) for r in eg) >= 8, n  # really a grid of that size, not 2 levels
        assert bool(((eg - wg).abs() <= step / 2 * (1 + 1e-4) + 1e-7).all()), n
        assert bool((eg >= lo - 1e-6).all() and (eg <= hi + 1e-6).all()), n
        assert float((we4 - w).abs().max()) > float((we8 - w).abs().max())


def test_activations_quantized_statically_with_the_calibrated_scale(llama, quanto):
    lq = LibraryQuantizer(llama, "quanto", weight_bits=8, act_bits=8)
    lq.calibrate(_batches(0))
    scales = lq.activation_scales()
    assert set(scales) == set(lq.names)
    for n in lq.names[:7]:
        qm, s = lq.quantized_module(n), scales[n]
        w = lq.effective_weight(n)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 5, w.shape[1], generator=g) * (60 * s)  # up to ~4 x alpha = 127 s: clips
        xq = torch.round(x / s).clamp(-128, 127) * s
        with torch.no_grad():
            y = qm(x)
        expected = torch.nn.functional.linear(xq, w, qm.bias)
        assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())), n
        unquantized = torch.nn.functional.linear(x, w, qm.bias)
        assert float((y - unquantized).abs().max()) > 0.1 * float(unquantized.abs().max()), n


def test_calibration_statistic_is_momentum_absmax(llama, quanto):
    """Block 0's q_proj sees the embedding through the first norm, untouched by quantization,
    so quanto's scale must equal s_1 = m_1, s_t = 0.9 s_{t-1} + 0.1 m_t, m_t = max|x_t| / 127,
    computed here from the float model's inputs to that Linear."""
    batches = _batches(5, n=4)
    name = "model.layers.0.self_attn.q_proj"
    seen = []
    handle = llama.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for b in batches:
            llama(**b)
    handle.remove()
    s = None
    for x in seen:
        m = float(x.abs().max()) / 127
        s = m if s is None else 0.9 * s + 0.1 * m
    lq = LibraryQuantizer(llama, "quanto", weight_bits=4, act_bits=8)
    lq.calibrate(batches)
    got = lq.activation_scales()
    assert got[name] == pytest.approx(s, rel=1e-5)
    # k_proj and v_proj read the same input
    assert got["model.layers.0.self_attn.k_proj"] == got[name] == got["model.layers.0.self_attn.v_proj"]
    # order matters under a momentum average: reversed batches give another scale
    lq.calibrate(batches[::-1])
    assert lq.activation_scales()[name] != pytest.approx(s, rel=1e-4)
    assert lq.n_calibration_batches == 4 and lq.n_calibration_tokens == 4 * 2 * 24


def test_scale_follows_the_scale_of_the_data(llama, quanto):
    """Data of scale s vs s/10 at block 0's q_proj: Llama's norm multiplies by its weight, so
    scaling that weight by 10 scales the Linear's input, and quanto's scale, by exactly 10."""
    batches = _batches(3)
    big = copy.deepcopy(llama)
    with torch.no_grad():
        big.model.layers[0].input_layernorm.weight.mul_(10.0)
    small_q = LibraryQuantizer(llama, "quanto", weight_bits=4, act_bits=8)
    small_q.calibrate(batches)
    big_q = LibraryQuantizer(big, "quanto", weight_bits=4, act_bits=8)
    big_q.calibrate(batches)
    name = "model.layers.0.self_attn.q_proj"
    ratio = big_q.activation_scales()[name] / small_q.activation_scales()[name]
    assert ratio == pytest.approx(10.0, rel=1e-5)


def test_different_calibration_sets_give_different_scales(llama, quanto):
    lq = LibraryQuantizer(llama, "quanto", weight_bits=4, act_bits=8)
    a, b = _batches(0, lo=0, hi=128), _batches(0, lo=128, hi=256)
    lq.calibrate(a)
    sa = lq.activation_scales()
    wa = lq.effective_weight(lq.names[0])
    lq.calibrate(b)
    sb = lq.activation_scales()
    differ = [n for n in lq.names if not np.isclose(sa[n], sb[n], rtol=1e-6)]
    assert len(differ) >= len(lq.names) // 2, differ
    # each calibration starts again from the float model: calibrating on a again gives a's scales
    lq.calibrate(a)
    assert lq.activation_scales() == sa
    # weights are calibration-free in quanto: the same whatever the calibration set
    assert torch.equal(lq.effective_weight(lq.names[0]), wa)
    # and the two calibrations give different models
    ids = _batches(7, n=1)[0]["input_ids"]
    with lq.quantized():
        out_a = _logits(llama, ids)
    lq.calibrate(b)
    with lq.quantized():
        out_b = _logits(llama, ids)
    assert not torch.equal(out_a, out_b)


def test_weight_only_is_calibration_free(llama, quanto):
    ids = _batches(99, n=1)[0]["input_ids"]
    ref = _logits(llama, ids)
    snap = _snapshot(llama)
    lq = LibraryQuantizer(llama, "quanto", weight_bits=4, act_bits=None)
    with pytest.raises(ValueError, match="calibration-free"):
        lq.calibrate(_batches(0))
    with pytest.raises(ValueError, match="no activation scales"):
        lq.activation_scales()
    with lq.quantized():
        out = _logits(llama, ids)
    assert not torch.equal(out, ref)
    _assert_restored(llama, snap)
    prov = lq.provenance()
    assert prov["activations"] is None and prov["weights"]["bits"] == 4 and prov["version"] == "0.2.7"


def test_bad_input_is_refused_with_reasons(llama, quanto):
    with pytest.raises(ValueError, match="weight_bits"):
        LibraryQuantizer(llama, "quanto", weight_bits=3)
    with pytest.raises(ValueError, match="act_bits"):
        LibraryQuantizer(llama, "quanto", act_bits=4)
    with pytest.raises(ValueError, match="nothing to quantize"):
        LibraryQuantizer(llama, "quanto", weight_bits=None, act_bits=None)
    with pytest.raises(ValueError, match="activations alone"):
        LibraryQuantizer(llama, "quanto", weight_bits=None, act_bits=8)
    with pytest.raises(ValueError, match="no Linear left"):
        LibraryQuantizer(llama, "quanto", exclude=("*",))
    lq = LibraryQuantizer(llama, "quanto", exclude=("*.mlp.*",))
    assert len(lq.names) == 8 and not any(".mlp." in n for n in lq.names)
    with pytest.raises(RuntimeError, match="calibrate"):
        with lq.quantized():
            pass
    with pytest.raises(RuntimeError, match="calibrate"):
        lq.activation_scales()
    with pytest.raises(ValueError, match="no batch"):
        lq.calibrate([])
    with pytest.raises(ValueError, match="unexpected keys"):
        lq.calibrate([{"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4)}])
    with pytest.raises(ValueError, match="2-D integer"):
        lq.calibrate([{"input_ids": torch.zeros(4, dtype=torch.long)}])
    with pytest.raises(ValueError, match="2-D integer"):
        lq.calibrate([{"input_ids": torch.zeros(1, 4)}])
    bad = copy.deepcopy(llama)
    with torch.no_grad():
        bad.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        LibraryQuantizer(bad, "quanto").calibrate(_batches(0, n=1))
    gpt2, _ = load_model("tiny-gpt2", seed=0)
    with pytest.raises(ValueError, match="Conv1D"):
        LibraryQuantizer(gpt2, "quanto")


def test_swapped_module_is_detected(llama, quanto):
    lq = LibraryQuantizer(llama, "quanto", weight_bits=4, act_bits=8)
    lq.calibrate(_batches(0, n=1))
    name = lq.names[3]
    parent, _, attr = name.rpartition(".")
    setattr(llama.get_submodule(parent), attr, copy.deepcopy(llama.get_submodule(name)))
    with pytest.raises(RuntimeError, match="no longer the module"):
        with lq.quantized():
            pass


def test_tiny_gemma_runs_and_keeps_the_tied_head(quanto):
    model, _ = load_model("tiny-gemma", seed=0)
    snap = _snapshot(model)
    ids = _batches(99, n=1)[0]["input_ids"]
    ref = _logits(model, ids)
    lq = LibraryQuantizer(model, "quanto", weight_bits=4, act_bits=8)
    lq.calibrate(_batches(0))
    with lq.quantized():
        assert model.lm_head.weight is model.get_input_embeddings().weight
        out = _logits(model, ids)
    assert not torch.equal(out, ref)
    _assert_restored(model, snap)
    prov = lq.provenance()
    assert prov["activations"]["n_outputs_quantized"] == 0  # every output feeds a float-only op
    assert prov["n_calibration_batches"] == 3


def test_scored_by_the_engine_recorded_on_the_float_model(llama, quanto):
    """The design constraint: one BpbEngine, baseline recorded on the float model, scores the
    quantized model (same object) and the float model again, exactly, afterwards."""
    from empirical.bpb import BpbEngine
    from empirical.models import ByteTokenizer

    texts = ["Hello world.", "Une phrase en français, avec des accents.", "שלום עולם", "日本語の文です。"]
    eng = BpbEngine(llama, ByteTokenizer(), {"x": texts}, max_batch_tokens=40, pack_length=30)
    base = eng.record()
    lq = LibraryQuantizer(llama, "quanto", weight_bits=4, act_bits=8)
    lq.calibrate([b.inputs() for b in eng.batches])  # packed rows: input_ids + position_ids
    with lq.quantized():
        s = eng.score()
        assert not np.allclose(s.nll["x"], base["x"])
        assert bool((s.kl["x"] > 0).all())
        with pytest.raises(RuntimeError, match="block 0 changed"):
            eng.score(start_block=1)  # the swap is visible to the engine's replay check
    after = eng.score()
    np.testing.assert_array_equal(after.nll["x"], base["x"])
    np.testing.assert_array_equal(after.kl["x"], np.zeros(len(texts)))
