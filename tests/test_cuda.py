"""The CUDA paths of capture, scoring and fake quantization agree with the CPU.

Skipped where no CUDA device is present (CI and the usual development machine). On the CPU,
capture takes its power sums from a numba kernel; on CUDA from torch reductions
(:meth:`empirical.capture.StreamingStats.batch_moments_torch`), so these tests compare two
different implementations, not one with itself.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from empirical.bpb import BpbEngine
from empirical.capture import capture_activations
from empirical.fakequant import FakeQuantizer, QuantConfig
from empirical.models import model_view

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

TEXTS = ["Hello world.", "Une phrase en français, avec des accents.", "שלום עולם", "日本語の文です。"]


def _capture(model, tok, device: str, dtype=torch.float32):
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    with capture_activations(m, reservoir_size=64, bins=64, seed=0) as cap:
        with cap.for_language("eng"), torch.no_grad():
            for t in TEXTS:
                ids = [tok.bos_token_id] + tok([t], add_special_tokens=False)["input_ids"][0]
                m(input_ids=torch.tensor([ids], device=device))
    return cap


def test_capture_on_cuda_matches_cpu(tiny_model):
    name, model, tok = tiny_model
    cpu, gpu = _capture(model, tok, "cpu"), _capture(model, tok, "cuda")
    assert [s.key for s in gpu.sites] == [s.key for s in cpu.sites]
    for site in cpu.sites:
        a, b = cpu.get(site, "eng"), gpu.get(site, "eng")
        assert a.n == b.n, (name, site.key)
        np.testing.assert_allclose([b.mean, b.std, b.absmax], [a.mean, a.std, a.absmax],
                                   rtol=1e-3, atol=1e-5, err_msg=f"{name} {site.key}")
        np.testing.assert_allclose(b.excess_kurtosis, a.excess_kurtosis, rtol=1e-2, atol=1e-3,
                                   err_msg=f"{name} {site.key}")
        # per-channel energy and absmax (the torch path against the CPU numba kernel)
        np.testing.assert_allclose(b.channel_sumsq, a.channel_sumsq, rtol=1e-4, err_msg=f"{name} {site.key}")
        np.testing.assert_allclose(b.channel_absmax, a.channel_absmax, rtol=1e-4, err_msg=f"{name} {site.key}")


def test_capture_on_cuda_in_bfloat16(tiny_model):
    name, model, tok = tiny_model
    cap = _capture(model, tok, "cuda", torch.bfloat16)
    ref = _capture(model, tok, "cpu")
    for site in ref.sites:
        st = cap.get(site, "eng")
        assert st.n == ref.get(site, "eng").n
        assert np.isfinite([st.mean, st.std, st.excess_kurtosis, st.absmax]).all(), (name, site.key)
        assert np.isfinite(st.sample()).all()


def test_bpb_engine_on_cuda_matches_cpu_and_replays(tiny_model):
    name, model, tok = tiny_model
    ref = BpbEngine(model, tok, {"x": TEXTS}).nll()["x"]
    m = copy.deepcopy(model).to("cuda")
    eng = BpbEngine(m, tok, {"x": TEXTS})
    np.testing.assert_allclose(eng.record()["x"], ref, rtol=1e-4, err_msg=name)
    assert eng.recorded == (name != "tiny-bloom"), eng.replay_unavailable  # BLOOM: ALiBi is not rebuilt
    view = model_view(m)
    fq = FakeQuantizer(view.linears, QuantConfig(bits=4, grid="int"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with fq.quantized(protect={q.name for q in view.linears if q.block < 1}):
        full = eng.nll()["x"]
        np.testing.assert_allclose(eng.nll(start_block=1)["x"], full, rtol=1e-5, err_msg=name)
    assert not np.allclose(full, ref)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights not restored exactly on CUDA"


def test_activation_calibration_and_quantization_on_cuda_match_cpu(tiny_llama):
    """Calibration capture, a calibrator and static activation quantization (with int4 weights) on
    CUDA give the CPU's values, and the model comes back exactly on both devices."""
    from empirical.actquant import ActivationQuantizer, ActQuantConfig, capture_inputs, combined, linear_thresholds
    from empirical.calibrate import calibrate

    model, tok = tiny_llama
    texts = {"eng_Latn": TEXTS[:2], "heb_Hebr": TEXTS[2:]}
    out = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        lins = model_view(m).linears
        cs = capture_inputs(m, lins, tok, texts, max_length=32)
        th = linear_thresholds({s: calibrate(cs.of(s), "minimax", 4, "int", "tensor") for s in cs.sites}, cs.sites)
        aq = ActivationQuantizer(lins, th, ActQuantConfig(bits=4))
        fq = FakeQuantizer(lins, QuantConfig(bits=4))
        eng = BpbEngine(m, tok, texts, max_length=32, device=device)
        base = eng.record()
        with combined(fq.quantized(), aq.quantized()):
            q = eng.score(0)
        again = eng.score(0)
        for l in texts:
            np.testing.assert_array_equal(again.nll[l], base[l])  # restored exactly
        out[device] = (cs, th, q)
    (c_cs, c_th, c_q), (g_cs, g_th, g_q) = out["cpu"], out["cuda"]
    assert c_cs.sites == g_cs.sites
    for s in c_cs.sites:
        for l in texts:
            np.testing.assert_allclose(g_cs.values[s][l], c_cs.values[s][l], rtol=1e-4, atol=1e-5)
    for k in c_th:
        np.testing.assert_allclose(g_th[k], c_th[k], rtol=1e-3)
    for l in texts:
        np.testing.assert_allclose(g_q.nll[l], c_q.nll[l], rtol=2e-3)
        np.testing.assert_allclose(g_q.kl[l], c_q.kl[l], rtol=0.05, atol=1e-4)


# ---- the mechanism experiments (issue #17) ------------------------------------------------------

def _mech_setups():
    from validate._mechanisms import MechanismConfig, setup

    kw = dict(model="tiny-llama", languages=("en", "he", "ja"), segments=2, max_length=32, bootstrap=20, bits=2)
    return setup(MechanismConfig(**kw)), setup(MechanismConfig(**kw, device="cuda"))


def test_mechanism_measurements_on_cuda_match_cpu(tmp_path):
    """Block damage, ablation, block outputs (CKA, shift), gradients, sinks and probe features:
    each computed on the GPU equals the CPU's."""
    from empirical.ablation import ablate_block
    from empirical.gradients import language_gradients
    from empirical.models import _find_blocks
    from empirical.outliers import attention_sinks
    from empirical.shift import capture_block_outputs
    from empirical.similarity import linear_cka
    from validate._common import ResultCache
    from validate._mechanisms import block_damage

    cpu, gpu = _mech_setups()
    assert next(gpu.model.parameters()).is_cuda
    dc = block_damage(cpu, ResultCache(tmp_path / "a" / "x" / "cache"), progress=False)
    dg = block_damage(gpu, ResultCache(tmp_path / "b" / "x" / "cache"), progress=False)
    np.testing.assert_allclose(dg.bpb, dc.bpb, rtol=2e-3, atol=1e-6)
    wc, wg = cpu.windows(), gpu.windows()
    lang = cpu.languages[1]
    with torch.no_grad(), ablate_block(cpu.model, 1, "zero"):
        lc = cpu.model(wc[lang][0]).logits
    with torch.no_grad(), ablate_block(gpu.model, 1, "zero"):
        lg = gpu.model(wg[lang][0]).logits
    torch.testing.assert_close(lg.cpu(), lc, rtol=1e-4, atol=1e-4)
    bc = capture_block_outputs(cpu.model, list(_find_blocks(cpu.model)[1]), wc[lang])
    bg = capture_block_outputs(gpu.model, list(_find_blocks(gpu.model)[1]), wg[lang])
    for x, y in zip(bc, bg):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)
    d = 64
    assert linear_cka(bg[0].reshape(-1, d), bg[1].reshape(-1, d)) == pytest.approx(
        linear_cka(bc[0].reshape(-1, d), bc[1].reshape(-1, d)), abs=1e-5)
    gc = language_gradients(cpu.model, list(_find_blocks(cpu.model)[1]), cpu.block_linears(), wc[lang])
    gg = language_gradients(gpu.model, list(_find_blocks(gpu.model)[1]), gpu.block_linears(), wg[lang])
    np.testing.assert_allclose(gg.weight, gc.weight, rtol=1e-3)
    np.testing.assert_allclose(gg.output_rms, gc.output_rms, rtol=1e-3)
    sc, sg = attention_sinks(cpu.model, wc[lang]), attention_sinks(gpu.model, wg[lang])
    np.testing.assert_allclose(sg.alpha, sc.alpha, atol=1e-5)


def test_cross_architecture_runs_on_cuda(tmp_path):
    from validate import cross_architecture as xa
    from validate._common import ResultCache

    c = xa.Config(model="tiny-llama", target="tiny-gemma", languages=("en", "he", "ja"), segments=2,
                  max_length=32, bootstrap=20, device="cuda")
    r = xa.run(c, ResultCache(tmp_path / "r" / xa.EXPERIMENT / "cache"))
    assert r["prediction_before_measurement"] is True and len(xa.claim_rows(r)) == 8


def test_phase_transition_on_cuda_ray_workers_matches_cuda_in_process(ray_local, tmp_path):
    """--device cuda --executor ray: a Ray actor that reserves the GPU computes the same passes as
    this process on the same GPU (same kernels, so exactly equal)."""
    import json

    from validate import phase_transition as pt

    if ray_local.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray sees no GPU")
    args = ["--model", "tiny-gpt2", "--unit", "linear", "--languages", "en", "he", "ja", "--segments", "3",
            "--bootstrap", "50", "--max-length", "64", "--pairs", "3", "--stop-after", "1", "--device", "cuda"]
    assert pt.main([*args, "--out", str(tmp_path / "serial")]) == 0
    assert pt.main([*args, "--executor", "ray", "--workers", "1", "--out", str(tmp_path / "ray")]) == 0
    docs = [json.loads((tmp_path / f / "phase_transition.json").read_text()) for f in ("serial", "ray")]
    drop = ("provenance", "timing", "zero_pass")
    assert [{k: v for k, v in d.items() if k not in drop} for d in docs][0] == \
        [{k: v for k, v in d.items() if k not in drop} for d in docs][1]
    assert docs[1]["provenance"]["executor"]["gpus_per_worker"] == 1.0


def test_phase_transition_with_device_auto_on_cuda_matches_cuda(tmp_path):
    """--device auto (accelerate's device map over the GPUs) gives the single-GPU numbers to float
    round-off (other kernels may run on several devices)."""
    import json

    from validate import phase_transition as pt

    args = ["--model", "tiny-gpt2", "--unit", "linear", "--languages", "en", "he", "ja", "--segments", "3",
            "--bootstrap", "50", "--max-length", "64", "--pairs", "0", "--no-compare-rankings", "--stop-after", "1"]
    assert pt.main([*args, "--device", "cuda", "--out", str(tmp_path / "cuda")]) == 0
    assert pt.main([*args, "--device", "auto", "--out", str(tmp_path / "auto")]) == 0
    a, b = [json.loads((tmp_path / f / "phase_transition.json").read_text()) for f in ("cuda", "auto")]
    for u, v in zip(a["units"], b["units"]):
        for lang, d in u["single_unit_degradation"].items():
            assert v["single_unit_degradation"][lang] == pytest.approx(d, rel=1e-3, abs=1e-6)
