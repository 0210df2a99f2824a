"""Static activation quantization: the torch quantizer equals theory's reference, inputs are
captured exactly per site, the model always comes back, and thresholds survive a safetensors trip."""

import numpy as np
import pytest
import torch

from empirical.actquant import (ActivationQuantizer, ActQuantConfig, CalibrationSamples, calibration_batches,
                                capture_inputs, combined, fake_quantize_activation, linear_thresholds,
                                load_thresholds, save_thresholds)
from empirical.fakequant import FakeQuantizer, QuantConfig
from empirical.models import model_view
from theory import quantize

TEXTS = {"eng_Latn": ["The quick brown fox jumps.", "A second, longer sentence about the weather today."],
         "heb_Hebr": ["שלום עולם, זה משפט.", "משפט שני ארוך יותר."]}


@pytest.mark.parametrize("grid", ["aciq", "midrise", "midtread", "int"])
def test_per_tensor_fake_quant_equals_numpy_reference(grid):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64) * 2
    got = fake_quantize_activation(x, 1.7, ActQuantConfig(bits=4, grid=grid)).numpy()
    ref = quantize(x.numpy(), grid, 1.7, 4)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def test_per_channel_fake_quant_uses_each_channels_threshold():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64)
    alpha = np.linspace(0.5, 3.0, 6)
    got = fake_quantize_activation(x, alpha, ActQuantConfig(bits=3, granularity="channel")).numpy()
    for j in range(6):
        np.testing.assert_allclose(got[:, j], quantize(x[:, j].numpy(), "int", alpha[j], 3), rtol=0, atol=1e-12)


def test_bad_thresholds_and_configs_are_refused():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="one value"):
        fake_quantize_activation(x, [1.0, 2.0], ActQuantConfig())
    with pytest.raises(ValueError, match="3 values"):
        fake_quantize_activation(x, [1.0, 2.0], ActQuantConfig(granularity="channel"))
    with pytest.raises(ValueError, match="finite and positive"):
        fake_quantize_activation(x, 0.0, ActQuantConfig())
    with pytest.raises(ValueError, match="finite and positive"):
        fake_quantize_activation(x, float("nan"), ActQuantConfig())
    with pytest.raises(ValueError, match="granularity"):
        ActQuantConfig(granularity="group")
    with pytest.raises(ValueError, match="uint"):
        ActQuantConfig(grid="uint")
    with pytest.raises(ValueError):
        ActQuantConfig(bits=0)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_capture_finds_shared_sites_and_records_every_real_position(tiny_llama):
    model, tok = tiny_llama
    lins = model_view(model).linears
    cs = capture_inputs(model, lins, tok, TEXTS, max_length=32, batch_size=2)
    # q/k/v read one tensor, gate/up another: one site each
    sites = cs.sites
    names = {q.name for q in lins}
    assert sorted(n for m in sites.values() for n in m) == sorted(names)
    qkv = [m for m in sites.values() if any(n.endswith("q_proj") for n in m)]
    assert all(len(m) == 3 for m in qkv) and len(qkv) == model_view(model).n_layers
    gu = [m for m in sites.values() if any(n.endswith("gate_proj") for n in m)]
    assert all(len(m) == 2 for m in gu)
    # every real token (BOS included), no padding
    for lang, segs in TEXTS.items():
        n = sum(int(b["attention_mask"].sum()) for b in calibration_batches(tok, segs, max_length=32))
        assert cs.tokens[lang] == n
        for site in sites:
            assert cs.values[site][lang].shape[0] == n
    assert _hooks(model) == 0
    # the recorded rows are the inputs a plain hook sees, in the same order
    site = next(iter(sites))
    lin = next(q for q in lins if q.name == site)
    seen = []
    h = lin.module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            for b in calibration_batches(tok, TEXTS["heb_Hebr"], max_length=32, batch_size=2):
                model(**b)
                seen[-1] = seen[-1][b["attention_mask"].bool()]
    finally:
        h.remove()
    np.testing.assert_array_equal(np.concatenate([s.numpy() for s in seen]), cs.values[site]["heb_Hebr"])
    # importance: E[x_j^2] per language and pooled
    sm = cs.second_moment(site)
    x = cs.values[site]["eng_Latn"].astype(np.float64)
    np.testing.assert_allclose(sm["eng_Latn"], (x ** 2).mean(axis=0), rtol=1e-12)
    both = np.concatenate([cs.values[site][l].astype(np.float64) for l in TEXTS])
    np.testing.assert_allclose(cs.pooled_second_moment(site), (both ** 2).mean(axis=0), rtol=1e-12)


def test_capture_refuses_empty_text(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="empty"):
        capture_inputs(model, model_view(model).linears, tok, {"eng_Latn": ["  "]})
    with pytest.raises(ValueError, match="no calibration texts"):
        capture_inputs(model, model_view(model).linears, tok, {})
    cs = CalibrationSamples({"a": ("a",)}, {"a": {"eng_Latn": np.zeros((2, 3), np.float32)}}, {"eng_Latn": 2})
    with pytest.raises(ValueError, match="heb_Hebr"):
        cs.of("a", ["heb_Hebr"])


def _absmax_thresholds(cs, granularity="tensor"):
    site = {s: (np.abs(np.concatenate(list(v.values()))).max(axis=0) if granularity == "channel" else
                np.abs(np.concatenate(list(v.values()))).max()) for s, v in cs.values.items()}
    return linear_thresholds({s: np.maximum(a, np.finfo(float).tiny) for s, a in site.items()}, cs.sites)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_quantizer_changes_outputs_and_restores_exactly(tiny_llama, granularity):
    model, tok = tiny_llama
    lins = model_view(model).linears
    cs = capture_inputs(model, lins, tok, TEXTS, max_length=32)
    aq = ActivationQuantizer(lins, _absmax_thresholds(cs, granularity), ActQuantConfig(bits=3, granularity=granularity))
    batch = next(calibration_batches(tok, TEXTS["eng_Latn"], max_length=32))
    before, state = model(**batch).logits.detach(), _state(model)
    with aq.quantized():
        during = model(**batch).logits.detach()
    assert not torch.equal(before, during)
    assert aq.calls > 0
    assert torch.equal(model(**batch).logits.detach(), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert _hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with aq.quantized():
            raise RuntimeError("boom")
    assert _hooks(model) == 0
    assert torch.equal(model(**batch).logits.detach(), before)


def test_quantized_forward_equals_a_hand_quantized_linear(tiny_llama):
    """Inside the context, a Linear computes W Q(x) + b with Q the grid of theory."""
    model, tok = tiny_llama
    lins = model_view(model).linears
    th = {q.name: 0.37 for q in lins}
    aq = ActivationQuantizer(lins, th, ActQuantConfig(bits=4))
    lin = lins[0].module
    x = torch.randn(2, 5, lin.in_features, generator=torch.Generator().manual_seed(2))
    with aq.quantized():
        got = lin(x)
    xq = torch.from_numpy(quantize(x.numpy().astype(np.float64), "int", 0.37, 4)).to(torch.float32)
    torch.testing.assert_close(got, torch.nn.functional.linear(xq, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)
    with aq.quantized(protect={lins[0].name}):
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    with pytest.raises(ValueError, match="unknown layers"):
        with aq.quantized(protect={"nope"}):
            pass


def test_quantizer_refuses_missing_or_unknown_thresholds(tiny_llama):
    model, _ = tiny_llama
    lins = model_view(model).linears
    th = {q.name: 1.0 for q in lins}
    with pytest.raises(ValueError, match="no activation threshold"):
        ActivationQuantizer(lins, {k: v for k, v in list(th.items())[1:]}, ActQuantConfig())
    with pytest.raises(ValueError, match="unknown Linears"):
        ActivationQuantizer(lins, {**th, "ghost": 1.0}, ActQuantConfig())
    with pytest.raises(ValueError, match="channel"):
        ActivationQuantizer(lins, th, ActQuantConfig(granularity="channel"))


def test_weights_and_activations_together_restore_exactly(tiny_llama):
    model, tok = tiny_llama
    lins = model_view(model).linears
    aq = ActivationQuantizer(lins, {q.name: 2.0 for q in lins}, ActQuantConfig(bits=4))
    fq = FakeQuantizer(lins, QuantConfig(bits=4))
    batch = next(calibration_batches(tok, TEXTS["eng_Latn"], max_length=32))
    before, state = model(**batch).logits.detach(), _state(model)
    with pytest.raises(KeyError):
        with combined(fq.quantized(), aq.quantized()):
            assert not torch.equal(model(**batch).logits.detach(), before)
            raise KeyError("x")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert _hooks(model) == 0 and torch.equal(model(**batch).logits.detach(), before)


def test_thresholds_round_trip_bit_identical(tmp_path):
    rng = np.random.default_rng(0)
    th = {"model.layers.0.mlp.down_proj": rng.lognormal(size=37), "model.layers.0.self_attn.q_proj": np.float64(0.1 + 1e-17),
          "tiny": np.array(np.finfo(float).tiny)}
    p = save_thresholds(tmp_path / "t.safetensors", th, {"calibrator": "minimax", "languages": ["eng_Latn", "heb_Hebr"]})
    back, meta = load_thresholds(p)
    assert set(back) == set(th)
    for k, v in th.items():
        assert back[k].dtype == np.float64 and back[k].shape == np.shape(v)
        assert back[k].tobytes() == np.asarray(v, dtype=np.float64).tobytes()
    assert meta == {"calibrator": "minimax", "languages": ["eng_Latn", "heb_Hebr"]}
    with pytest.raises(ValueError, match="NaN"):
        save_thresholds(tmp_path / "bad.safetensors", {"a": np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match="no thresholds"):
        save_thresholds(tmp_path / "empty.safetensors", {})
    with pytest.raises(FileNotFoundError):
        load_thresholds(tmp_path / "missing.safetensors")
    assert not list(tmp_path.glob(".*tmp"))


def test_a_channel_calibrated_on_zeros_quantizes_to_zero_without_nan(tiny_llama):
    """np.finfo(float).tiny (what a calibrator gives an all-zero channel) underflows to 0 in float32:
    that channel maps to 0, the others are untouched, and nothing becomes NaN."""
    x = torch.tensor([[0.0, 1.0, -2.0], [3.0, 0.0, 0.5]])
    alpha = np.array([np.finfo(float).tiny, 1.0, 2.0])
    got = fake_quantize_activation(x, alpha, ActQuantConfig(bits=4, granularity="channel"))
    assert torch.isfinite(got).all() and torch.equal(got[:, 0], torch.zeros(2))
    ref = np.stack([quantize(x[:, 1].numpy().astype(np.float64), "int", 1.0, 4),
                    quantize(x[:, 2].numpy().astype(np.float64), "int", 2.0, 4)], 1)
    np.testing.assert_allclose(got[:, 1:].numpy(), ref, rtol=1e-6)
    model, tok = tiny_llama
    lins = model_view(model).linears
    th = {q.name: np.full(q.module.in_features, np.finfo(float).tiny) for q in lins}
    aq = ActivationQuantizer(lins, th, ActQuantConfig(bits=8, granularity="channel"))
    batch = next(calibration_batches(tok, TEXTS["eng_Latn"], max_length=32))
    with aq.quantized():
        assert torch.isfinite(model(**batch).logits).all()
