"""Fake quantization: the torch quantizer equals theory's reference, and weights always come back."""

import numpy as np
import pytest
import torch

from empirical.fakequant import FakeQuantizer, QuantConfig, choose_alpha, fake_quantize_weight, protected_fraction
from empirical.sweep import mse_sweep
from theory import quantize


def _w(shape=(16, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32) * 0.05


@pytest.mark.parametrize("grid", ["aciq", "midrise", "midtread", "int"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_absmax_fake_quant_equals_numpy_reference(grid, granularity):
    w = _w().to(torch.float64)
    cfg = QuantConfig(bits=3, grid=grid, granularity=granularity, group_size=16)
    got = fake_quantize_weight(w, cfg).numpy()
    x = w.numpy()
    rows = {"tensor": x.reshape(1, -1), "channel": x, "group": x.reshape(-1, 16)}[granularity]
    ref = np.stack([quantize(r, grid, np.abs(r).max(), 3) for r in rows]).reshape(x.shape)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-15)


def test_conv1d_layout_quantizes_output_channels():
    w = _w((64, 16))  # Conv1D stores (in, out)
    cfg = QuantConfig(bits=4, granularity="channel")
    a = fake_quantize_weight(w, cfg, transposed=True)
    b = fake_quantize_weight(w.t().contiguous(), cfg).t()
    assert torch.equal(a, b)


def test_sweep_clipping_is_the_per_channel_minimiser():
    w = _w((4, 256), seed=3).to(torch.float64)
    cfg = QuantConfig(bits=3, grid="int", clipping="sweep", n_alphas=32)
    alpha = choose_alpha(w, cfg).numpy()[:, 0]
    absmax = w.abs().amax(dim=1).numpy()
    for r in range(4):
        fr = np.linspace(1 / 32, 1, 32)
        mse = mse_sweep(w[r].numpy(), fr * absmax[r], 3, "int")
        assert alpha[r] == pytest.approx(fr[np.argmin(mse)] * absmax[r])
    # and it is no worse than absmax on the quantization error
    q_sweep = fake_quantize_weight(w, cfg)
    q_abs = fake_quantize_weight(w, QuantConfig(bits=3, grid="int"))
    assert torch.mean((q_sweep - w) ** 2) <= torch.mean((q_abs - w) ** 2)


def test_theory_clipping_clips_below_absmax_on_heavy_tails():
    torch.manual_seed(1)  # torch.distributions samples from the global generator
    w = torch.distributions.StudentT(4.0).sample((32, 512)).to(torch.float64) * 0.02
    cfg = QuantConfig(bits=4, grid="int", clipping="theory")
    alpha = choose_alpha(w, cfg)
    assert torch.all(alpha <= w.abs().amax(dim=1, keepdim=True))
    q = fake_quantize_weight(w, cfg)
    q_abs = fake_quantize_weight(w, QuantConfig(bits=4, grid="int"))
    assert torch.mean((q - w) ** 2) < torch.mean((q_abs - w) ** 2)


class _Lin:
    def __init__(self, name, module):
        self.name, self.module, self.n_params, self.block = name, module, module.weight.numel(), 0


def _toy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    lins = [_Lin("0", model[0]), _Lin("2", model[2])]
    return model, lins


def test_quantized_context_restores_exactly_also_after_an_exception():
    model, lins = _toy()
    before = [l.module.weight.detach().clone() for l in lins]
    fq = FakeQuantizer(lins, QuantConfig(bits=2, grid="int"))
    with fq.quantized(protect={"2"}):
        assert not torch.equal(lins[0].module.weight, before[0])
        assert torch.equal(lins[1].module.weight, before[1])
    assert all(torch.equal(l.module.weight, b) for l, b in zip(lins, before))
    with pytest.raises(RuntimeError, match="boom"):
        with fq.quantized():
            raise RuntimeError("boom")
    assert all(torch.equal(l.module.weight, b) for l, b in zip(lins, before))


def test_protecting_every_layer_changes_nothing():
    model, lins = _toy()
    x = torch.randn(5, 32)
    ref = model(x)
    fq = FakeQuantizer(lins, QuantConfig(bits=2))
    with fq.quantized(protect={"0", "2"}):
        assert torch.equal(model(x), ref)
    with fq.quantized():
        assert not torch.equal(model(x), ref)


def test_protected_fraction_counts_weight_parameters():
    _, lins = _toy()
    assert protected_fraction(lins, {"0"}) == pytest.approx(32 * 64 / (32 * 64 + 64 * 8))
    assert protected_fraction(lins, []) == 0.0
    with pytest.raises(ValueError, match="unknown layers"):
        protected_fraction(lins, {"nope"})


@pytest.mark.parametrize("kw,match", [
    ({"bits": 0}, "bits"), ({"bits": 17}, "bits"), ({"grid": "uint"}, "signed"),
    ({"grid": "nf4"}, "unknown grid"), ({"granularity": "row"}, "granularity"),
    ({"clipping": "mse"}, "clipping"), ({"granularity": "group", "group_size": 1}, "group_size"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kw)


def test_nan_weight_and_bad_group_size():
    w = _w()
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fake_quantize_weight(w, QuantConfig())
    with pytest.raises(ValueError, match="does not divide"):
        fake_quantize_weight(_w((4, 10)), QuantConfig(granularity="group", group_size=4))
