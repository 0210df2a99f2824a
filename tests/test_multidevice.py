"""Models placed by accelerate (issue 18): dispatched over a device map, offloaded to CPU memory
(parameters on ``meta``, the values in the hooks' weights maps) or to disk, score, quantize and
capture exactly like the same model held plainly on one device.

Everything runs on the CPU: the "devices" of the maps are all ``"cpu"`` (under hooks, with
``force_hooks``) or ``"disk"``, and ``cpu_offload`` executes on the CPU. Each variant then runs the
same floating-point operations on the same weight values in the same order (the hooks only lend
the weights and move tensors to the device they are already on), so the comparisons are exact
(``np.array_equal``, ``torch.equal``), not to a tolerance. Where a CUDA device is present,
``load_model(device="auto"/"offload")`` executes there instead, and those comparisons are made
to float32 round-off (:func:`_same`); the test of a map with GPU entries runs only there.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from empirical.bpb import BpbEngine
from empirical.capture import capture_activations, capture_corpus
from empirical.corpora import Corpus, LanguageInfo
from empirical.devices import execution_device, is_dispatched, is_offloaded, named_tensors, param_tensor, swap_param
from empirical.fakequant import FakeQuantizer, QuantConfig
from empirical.models import _build_cache, load_model, model_view

HAVE_ACCELERATE = importlib.util.find_spec("accelerate") is not None
needs_accelerate = pytest.mark.skipif(not HAVE_ACCELERATE, reason="accelerate is not installed (models extra)")
if HAVE_ACCELERATE:
    import accelerate
CUDA = torch.cuda.is_available()

TEXTS = {"eng": ["The cat sat on the mat.", "Hello there, world! A second, longer segment of text."],
         "heb": ["שלום עולם", "כל בני אדם נולדו בני חורין ושווים בערכם ובזכויותיהם"],
         "jpn": ["日本語の文です。" * 6]}
ARCHS = ("tiny-llama", "tiny-gemma")
VARIANTS = ("dispatched", "offload", "disk")


def _plain(name):
    return load_model(name, seed=0)


def _placed(name, how, tmp_path):
    """A fresh tiny model placed by accelerate: over an explicit all-CPU device map under hooks,
    offloaded to CPU memory by cpu_offload, or with its blocks and head offloaded to disk."""
    model, tok = load_model(name, seed=0)
    blocks = [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    if how == "dispatched":
        dm = {"model.embed_tokens": "cpu", **{b: "cpu" for b in blocks}, "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}
        model = accelerate.dispatch_model(model, dm, force_hooks=True)
    elif how == "offload":
        model = accelerate.cpu_offload(model, execution_device="cpu")
    else:
        dm = {"model.embed_tokens": "cpu", blocks[0]: "cpu", **{b: "disk" for b in blocks[1:]},
              "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "disk"}
        model = accelerate.dispatch_model(model, dm, offload_dir=str(tmp_path / "offload"))
    assert is_dispatched(model)
    assert is_offloaded(model) == (how != "dispatched")  # the path under test is really taken
    return model, tok


def _flat(d):
    return np.concatenate([np.asarray(d[k]) for k in sorted(d)])


def _same(a, b):
    """Exactly equal where everything ran on the CPU; to float32 round-off where load_model
    placed the model on a CUDA device (other kernels)."""
    if CUDA:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_array_equal(a, b)


def _passes(model, tok):
    """Baseline record, a quantized pass (all blocks, first Linear protected) with KL, and a
    quantized pass of block 1 only replayed from block 1; plus the real weights around them."""
    eng = BpbEngine(model, tok, TEXTS, max_length=64, stride=32)
    rec = eng.record()
    view = model_view(model)
    fq = FakeQuantizer(view.linears, QuantConfig(bits=3, grid="int", granularity="channel"))
    before = {n: t.clone() for n, t in named_tensors(model)}
    with fq.quantized(protect={view.linears[0].name}):
        q = eng.score()
    with fq.quantized(protect={l.name for l in view.linears if l.block != 1}):
        q1 = eng.score(start_block=1)
    after = dict(named_tensors(model))
    return eng, rec, q, q1, before, after


@needs_accelerate
@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("how", VARIANTS)
def test_placed_model_scores_and_quantizes_exactly_like_the_plain_one(name, how, tmp_path):
    ref = _passes(*_plain(name))
    got = _passes(*_placed(name, how, tmp_path))
    e0, e1 = ref[0], got[0]
    assert e1.device == torch.device("cpu")
    assert (e1.packed, e1.packing_exact, e1.head_exact, e1.recorded) == (e0.packed, e0.packing_exact, True, True)
    assert e1.replay_unavailable is None and e1.kl_unavailable is None
    np.testing.assert_array_equal(_flat(got[1]), _flat(ref[1]))  # baseline NLL
    for a, b in ((got[2], ref[2]), (got[3], ref[3])):
        np.testing.assert_array_equal(_flat(a.nll), _flat(b.nll))
        np.testing.assert_array_equal(_flat(a.kl), _flat(b.kl))
        np.testing.assert_array_equal(_flat(a.agree), _flat(b.agree))
    # the quantized passes did change the model's output, and by a real amount
    assert np.all(_flat(got[2].kl) > 0) and not np.array_equal(_flat(got[2].nll), _flat(got[1]))
    assert not np.array_equal(_flat(got[3].nll), _flat(got[1]))
    before, after = got[4], got[5]
    plain = dict(named_tensors(_plain(name)[0]))
    assert before.keys() == after.keys() and plain.keys() <= before.keys()
    # a tied head offloaded to disk is read from its own file: it comes under its own name too
    assert before.keys() - plain.keys() <= ({"lm_head.weight"} if how == "disk" else set())
    assert all(torch.equal(before[n], plain.get(n, plain["model.embed_tokens.weight"])) for n in before)
    assert all(torch.equal(before[n], after[n]) for n in before)  # restored bit for bit


@needs_accelerate
def test_quantizer_under_offload_swaps_what_the_forward_loads_and_restores_the_same_tensors():
    model, tok = load_model("tiny-llama", seed=0)
    plain, _ = _plain("tiny-llama")
    accelerate.cpu_offload(model, execution_device="cpu")
    view, pview = model_view(model), model_view(plain)
    lin = view.linears[3]
    assert lin.module.weight.device.type == "meta"
    stored = lin.module._hf_hook.weights_map["weight"]
    assert lin.weight is stored and torch.equal(stored, pview.linears[3].weight)
    cfg = QuantConfig(bits=2, grid="int", granularity="channel")
    fq, pfq = FakeQuantizer(view.linears, cfg), FakeQuantizer(pview.linears, cfg)
    ids = torch.tensor([tok.encode("The quick brown fox.")])
    with torch.no_grad():
        out0 = model(ids).logits
        with fq.quantized(), pfq.quantized():
            assert torch.equal(lin.weight, pfq.quantized_weight(pview.linears[3].name))
            assert not torch.equal(lin.weight, stored)
            assert lin.module.weight.device.type == "meta"  # the parameter itself is left alone
            outq, pout = model(ids).logits, plain(ids).logits
        out1 = model(ids).logits
    assert torch.equal(outq, pout) and not torch.equal(outq, out0)
    assert torch.equal(out1, out0)
    assert lin.module._hf_hook.weights_map["weight"] is stored  # the very tensor is back
    with pytest.raises(KeyError), fq.quantized():
        raise KeyError("inside")
    assert all(q.weight is q.module._hf_hook.weights_map["weight"] for q in view.linears)
    assert lin.weight is stored


@needs_accelerate
def test_swap_param_on_disk_offload_overrides_the_file_and_restores(tmp_path):
    model, tok = _placed("tiny-llama", "disk", tmp_path)
    lin = model_view(model).linears[-1]  # in block 1, on disk
    loader = lin.module._hf_hook.weights_map.dataset
    key = lin.module._hf_hook.weights_map.prefix + "weight"
    assert key not in loader.state_dict and key in loader.index
    w0 = lin.weight.clone()
    restore = swap_param(lin.module, "weight", torch.zeros_like(w0))
    assert torch.equal(lin.weight, torch.zeros_like(w0))
    restore()
    assert key not in loader.state_dict and torch.equal(lin.weight, w0)


@needs_accelerate
def test_capture_on_offloaded_model_equals_plain():
    corpus = Corpus("t", {k: list(v) for k, v in TEXTS.items()}, {k: LanguageInfo(k, k) for k in TEXTS})
    caps = []
    for offload in (False, True):
        model, tok = load_model("tiny-gemma", seed=0)
        if offload:
            accelerate.cpu_offload(model, execution_device="cpu")
            assert is_offloaded(model)
        with capture_activations(model, reservoir_size=64, bins=64, seed=0, top_k=16) as cap:
            capture_corpus(cap, tok, corpus, batch_size=2)
        caps.append(cap)
    a, b = caps
    assert a.stats.keys() == b.stats.keys() and len(a.stats) > 0
    for key, sa in a.stats.items():
        sb = b.stats[key]
        assert sa.summary() == sb.summary(), key
        np.testing.assert_array_equal(sa.sample(), sb.sample())
        np.testing.assert_array_equal(sa.channel_sumsq, sb.channel_sumsq)
        np.testing.assert_array_equal(sa.top_values(), sb.top_values())


@needs_accelerate
def test_sensitivity_and_calibration_passes_under_offload_equal_plain():
    from empirical.actquant import capture_inputs
    from empirical.sensitivity import sensitivity_pass, zero_pass_damage

    texts = {"eng": TEXTS["eng"], "heb": TEXTS["heb"]}
    res = []
    for offload in (False, True):
        model, tok = load_model("tiny-llama", seed=0)
        if offload:
            accelerate.cpu_offload(model, execution_device="cpu")
        eng = BpbEngine(model, tok, texts, max_length=64)
        view = model_view(model)
        sp = sensitivity_pass(eng, view.linears, full=True)
        zp = zero_pass_damage(eng, [[q] for q in view.linears[:4]], QuantConfig(bits=4), nll_fp=eng.nll(),
                              variants=("actual",))
        ci = capture_inputs(model, view.linears[:4], tok, texts, max_length=32)
        res.append((sp, zp, ci))
    (sp0, zp0, ci0), (sp1, zp1, ci1) = res
    np.testing.assert_array_equal(sp0.nll, sp1.nll)
    for name, lin in sp0.linears.items():
        for k in ("h_sum", "x2_sum", "grad_w"):
            np.testing.assert_array_equal(lin[k], sp1.linears[name][k])
    assert np.abs(zp0["actual"]).max() > 0
    np.testing.assert_array_equal(zp0["actual"], zp1["actual"])
    assert ci0.sites == ci1.sites
    for site, per in ci0.values.items():
        for lang, v in per.items():
            np.testing.assert_array_equal(v, ci1.values[site][lang])


@needs_accelerate
def test_ablation_under_offload_equals_plain_and_gradients_refuse():
    from empirical.ablation import ablate_block, update_means
    from empirical.gradients import language_gradients

    ids = torch.tensor([[256] + list("A short window of text.".encode())])
    outs = []
    for offload in (False, True):
        model, _ = load_model("tiny-llama", seed=0)
        if offload:
            accelerate.cpu_offload(model, execution_device="cpu")
        with torch.no_grad():
            means = update_means(model, [ids])
            with ablate_block(model, 1, "mean", means):
                outs.append(model(ids).logits)
    assert torch.equal(outs[0], outs[1])
    view = model_view(model)
    with pytest.raises(ValueError, match="offloaded by accelerate"):
        language_gradients(model, view.blocks, [[q for q in view.linears if q.block == b] for b in range(2)],
                           [ids])


@needs_accelerate
def test_preloaded_blocks_score_but_their_linears_refuse_quantization():
    """accelerate's ``preload_module_classes`` loads a whole block from the block's hook: the
    checksums find those weights (through the enclosing hook), a Linear alone cannot."""
    plain, tok = _plain("tiny-llama")
    model, _ = load_model("tiny-llama", seed=0)
    accelerate.cpu_offload(model, execution_device="cpu", preload_module_classes=["LlamaDecoderLayer"])
    ref = dict(named_tensors(plain))
    got = dict(named_tensors(model))
    assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)
    e0, e1 = BpbEngine(plain, tok, TEXTS, max_length=64), BpbEngine(model, tok, TEXTS, max_length=64)
    np.testing.assert_array_equal(_flat(e1.record()), _flat(e0.record()))
    np.testing.assert_array_equal(_flat(e1.nll(start_block=1)), _flat(e0.nll(start_block=1)))
    lin = model_view(model).linears[0]
    with pytest.raises(ValueError, match="enclosing module's hook"):
        param_tensor(lin.module)
    with pytest.raises(ValueError, match="enclosing module's hook"):
        FakeQuantizer(model_view(model).linears, QuantConfig(bits=4)).quantized_weight(lin.name)


# ---- load_model ----------------------------------------------------------------------------------

def _nll(model, tok):
    return _flat(BpbEngine(model, tok, TEXTS, max_length=64).nll())


@needs_accelerate
def test_load_model_auto_offload_and_disk_record_the_map(tmp_path):
    plain, tok = _plain("tiny-llama")
    ref = _nll(plain, tok)
    _, _, pmeta = load_model("tiny-llama", seed=0, return_metadata=True)
    assert "device_map" not in pmeta  # the default path is unchanged

    m, tok, meta = load_model("tiny-llama", seed=0, device="auto", return_metadata=True)
    first = "cuda:0" if CUDA else "cpu"
    assert meta["device_map"] == {"": "0" if CUDA else "cpu"} and meta["offloaded"] is False  # all fits
    assert meta["device"] == "auto" and meta["execution_device"] == first
    _same(_nll(m, tok), ref)

    m, tok, meta = load_model("tiny-llama", seed=0, device="offload", return_metadata=True)
    assert meta["device_map"] == {"": "cpu"} and meta["offloaded"] is True
    assert meta["execution_device"] == first
    assert all(p.device.type == "meta" for p in m.parameters())
    assert meta["n_params"] == pmeta["n_params"]
    _same(_nll(m, tok), ref)

    m, tok, meta = load_model("tiny-llama", seed=0, device_map="auto", max_memory={"cpu": 250_000},
                              offload_folder=tmp_path / "off", return_metadata=True)
    assert "disk" in meta["device_map"].values() and "cpu" in meta["device_map"].values()
    assert meta["device_map"] == {k: str(v) for k, v in m.hf_device_map.items()}
    assert meta["offloaded"] is True and meta["n_params"] == pmeta["n_params"]
    np.testing.assert_array_equal(_nll(m, tok), ref)


def _save_folder(path, poison: str | None = None):
    """tiny-llama (seed 0) saved as a local model folder with a two-word tokenizer; with
    ``poison`` one weight holds a NaN."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model, _ = _plain("tiny-llama")
    if poison:
        with torch.no_grad():
            model.get_parameter(poison)[0, 3] = float("nan")
    model.save_pretrained(path, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
                            ).save_pretrained(path)
    return path


@needs_accelerate
def test_load_model_folder_with_device_map_and_offload(tmp_path):
    folder = _save_folder(tmp_path / "m")
    plain, btok = _plain("tiny-llama")
    ref = _nll(plain, btok)  # scored with the byte tokenizer: same weights, same ids
    m, _, meta = load_model(str(folder), device="auto", max_memory={"cpu": 250_000},
                            offload_folder=tmp_path / "off", return_metadata=True)
    assert meta["source"] == "from_pretrained" and "disk" in meta["device_map"].values()
    assert is_offloaded(m) and execution_device(m) == torch.device("cpu")
    np.testing.assert_array_equal(_nll(m, btok), ref)
    m, _, meta = load_model(str(folder), device="offload", return_metadata=True)
    assert meta["offloaded"] is True and meta["device_map"] == {"": "cpu"}
    _same(_nll(m, btok), ref)


@needs_accelerate
@pytest.mark.parametrize("kw", [dict(device="offload"), dict(device="auto", max_memory={"cpu": 250_000})])
def test_nonfinite_weight_found_in_offloaded_storage(tmp_path, kw):
    name = "model.layers.1.mlp.down_proj.weight"
    folder = _save_folder(tmp_path / "m", poison=name)
    if "max_memory" in kw:
        kw = dict(kw, offload_folder=tmp_path / "off")
    with pytest.raises(ValueError, match=rf"{name}.*non-finite"):
        load_model(str(folder), **kw)


@needs_accelerate
def test_load_model_embedded_with_offload(tmp_path, monkeypatch):
    """The embedded GGUF path (its cache a local folder; the GGUF conversion stood in for)."""
    import empirical.models as models

    monkeypatch.setenv("LANGQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_convert_embedded",
                        lambda name, target: _build_cache(target, lambda out: _save_folder(out)))
    m, _, meta = load_model("smollm2-135m", device="offload", return_metadata=True)
    assert meta["source"] == "embedded-gguf" and meta["offloaded"] is True
    assert meta["prequantized"] == "Q4_1"
    ref, _ = load_model("smollm2-135m")
    got, want = dict(named_tensors(m)), dict(named_tensors(ref))
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


@needs_accelerate
@pytest.mark.parametrize("kw, match", [
    (dict(device="offload", device_map="auto"), "device='offload'"),
    (dict(device="cuda", device_map="auto"), "give one"),
    (dict(offload_folder="x"), "apply to a device map"),
    (dict(max_memory={"cpu": 1}), "apply to a device map"),
    (dict(device_map="everywhere"), "unknown device_map"),
    (dict(device_map={"": "disk"}), "offload_folder"),
])
def test_load_model_placement_arguments_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        load_model("tiny-llama", **kw)


@pytest.mark.parametrize("kw", [dict(device="auto"), dict(device="offload"), dict(device_map={"": "cpu"})])
def test_missing_accelerate_is_named(monkeypatch, kw):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate now raises ImportError
    with pytest.raises(ImportError, match="pip install accelerate"):
        load_model("tiny-llama", **kw)
    load_model("tiny-llama", device="cpu")  # the plain path needs no accelerate


@needs_accelerate
def test_engine_device_auto_is_the_execution_device():
    model, tok = load_model("tiny-llama", seed=0)
    accelerate.cpu_offload(model, execution_device="cpu")
    assert next(model.parameters()).device.type == "meta"
    for dev in (None, "auto", "offload"):
        assert BpbEngine(model, tok, {"e": ["abc"]}, device=dev).device == torch.device("cpu")


@needs_accelerate
@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
@pytest.mark.parametrize("name", ARCHS)
def test_gpu_maps_with_cpu_offload_match_one_gpu(name):
    """A device map with GPU entries and CPU-offloaded blocks (accelerate lends their weights to
    the GPU for each call), and a model wholly offloaded to execute on the GPU, against the same
    model held on the GPU: the same kernels on the same values, compared to float32 round-off
    all the same (not yet run on a GPU when written)."""
    plain, tok = _plain(name)
    ref = _passes(plain.to("cuda"), tok)
    split, _ = _plain(name)
    dm = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": 0,
          "model.rotary_emb": 0, "lm_head": "cpu"}
    split = accelerate.dispatch_model(split, dm)
    offl, _ = _plain(name)
    offl = accelerate.cpu_offload(offl, execution_device=torch.device("cuda", 0))
    for m in (split, offl):
        assert is_offloaded(m) and execution_device(m) == torch.device("cuda", 0)
        got = _passes(m, tok)
        np.testing.assert_allclose(_flat(got[1]), _flat(ref[1]), rtol=1e-4, atol=1e-4)
        for a, b in ((got[2], ref[2]), (got[3], ref[3])):
            np.testing.assert_allclose(_flat(a.nll), _flat(b.nll), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(_flat(a.kl), _flat(b.kl), rtol=1e-3, atol=1e-5)
        assert all(torch.equal(got[4][n], got[5][n]) for n in got[4])


# ---- experiments end to end on an offloaded model ------------------------------------------------

def _measured(res) -> dict:
    """A result's measured numbers (the model's placement metadata left out)."""
    from validate._common import to_jsonable

    data = to_jsonable(res.data)
    data.pop("model_metadata", None)
    data.pop("metadata", None)
    return data


# outliers: thresholds low enough that the tiny model has "super weights" to find, restore and hold out
EXTRA = {"outliers": dict(sink_eps=0.1, super_threshold=0.001, super_max_iter=1)}


@pytest.mark.parametrize("name", ["cka", "residual_ablation", "outliers"])
def test_mechanism_experiments_under_cpu_offload_equal_the_plain_model(name, tmp_path):
    """--device offload runs the mechanism experiments (windows built on the execution device,
    passes, captures and super-weight edits through the hooks) with the plain model's numbers."""
    import importlib

    from validate._common import ResultCache

    mod = importlib.import_module(f"validate.{name}")
    tiny = dict(model="tiny-llama", languages=("en", "he", "ja"), segments=2, max_length=32, bootstrap=50,
                **EXTRA.get(name, {}))
    plain = mod.run(mod.Config(**tiny), ResultCache(tmp_path / "cpu" / name / "cache"))
    off = mod.run(mod.Config(**tiny, device="offload"), ResultCache(tmp_path / "off" / name / "cache"))
    assert _measured(off) == _measured(plain)
    if name == "outliers":  # the super-weight search and its restore/holdout passes ran
        assert plain["passes"]["scored"] > 0 and plain["super_weights"]["weights"]


@needs_accelerate
def test_importance_weighted_clipping_under_offload_equals_plain():
    """empirical.weight_clipping.ImportanceQuantizer quantizes the real weights (not the meta
    parameters) and its pass scores as on the plain model."""
    from empirical.fakequant import QuantConfig
    from empirical.models import model_view
    from empirical.weight_clipping import ImportanceQuantizer

    out = []
    for offload in (False, True):
        model, tok = load_model("tiny-llama", seed=0)
        if offload:
            accelerate.cpu_offload(model, execution_device="cpu")
        lins = model_view(model).linears
        rng = np.random.default_rng(0)
        imp = {q.name: rng.gamma(0.5, size=q.weight.shape[1]) for q in lins}
        fq = ImportanceQuantizer(lins, QuantConfig(bits=3, granularity="channel", n_alphas=16), imp, mode="mean")
        eng = BpbEngine(model, tok, TEXTS, max_length=64)
        eng.record()
        with fq.quantized():
            s = eng.score()
        out.append((_flat(s.nll), _flat(s.kl), [fq.quantized_weight(q.name) for q in lins]))
    (a_nll, a_kl, a_w), (b_nll, b_kl, b_w) = out
    np.testing.assert_array_equal(a_nll, b_nll)
    np.testing.assert_array_equal(a_kl, b_kl)
    assert all(torch.equal(x, y) for x, y in zip(a_w, b_w)) and a_w[0].device.type == "cpu"
