"""validate.language_alpha end to end on a tiny model, and its empirical helpers against theory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import assert_refused

from empirical.fits import fit_languages
from empirical.optimal import empirical_mixture_alpha, measured_penalties
from theory import Laplace, StudentT, language_alphas
from validate._common import ResultCache


def test_measured_penalties_agree_with_theory_on_large_samples():
    rng = np.random.default_rng(0)
    n = 2_000_000  # at 3e5 samples the penalties still scatter by +-0.02 across seeds
    samples = {"en": rng.laplace(0, 1.0, n), "he": 2.0 * rng.standard_t(6, n)}
    th = language_alphas({"en": Laplace(1.0), "he": StudentT(6.0, 2.0)}, 4, "int", mix_weights=[3, 1])
    meas = measured_penalties(samples, th.alpha, 4, "int")
    for j, l in enumerate(["en", "he"]):
        assert meas[l]["alpha_star"] == pytest.approx(th.alpha_star[j], rel=0.03)
        for c in ("mix", "minimax", "weighted"):
            assert meas[l][c] == pytest.approx(th.penalty[c][j], abs=0.012)
    emp = empirical_mixture_alpha(samples, 4, "int", weights=[3, 1])
    assert emp.alpha == pytest.approx(th.alpha["mix"], rel=0.03)


def test_helpers_name_the_language_with_too_few_samples():
    rng = np.random.default_rng(1)
    samples = {"en": rng.normal(size=5000), "yo": rng.normal(size=50)}
    with pytest.raises(ValueError, match="'yo' has 50 samples"):
        fit_languages(samples, min_samples=200)
    with pytest.raises(ValueError, match="'yo' has 50 samples"):
        measured_penalties(samples, {"mix": 1.0}, 4, "int", min_samples=200)
    with pytest.raises(ValueError, match="NaN or inf"):
        measured_penalties({"en": np.array([1.0, np.nan] * 100)}, {"mix": 1.0}, 4, "int")
    with pytest.raises(ValueError, match="no languages"):
        empirical_mixture_alpha({}, 4, "int")


ARGV = ["--model", "tiny-llama", "--languages", "en", "he", "ja", "--segments", "3", "--reservoir", "1024",
        "--fit-samples", "1024", "--min-samples", "200"]


def test_quick_run_on_tiny_model_and_cached_rerun(tmp_path, monkeypatch):
    from validate import _protocol as protocol
    from validate import language_alpha as exp

    out = tmp_path / "la"
    assert exp.main([*ARGV, "--out", str(out)]) == 0
    res = json.loads((out / "language_alpha.json").read_text())
    assert res["experiment"] == "language_alpha"
    assert res["provenance"]["config"]["languages"] == res["languages"] == ["eng_Latn", "heb_Hebr", "jpn_Jpan"]
    for f in ("language_alpha.csv", "language_alpha_table.tex", "language_alpha.png"):
        assert (out / f).stat().st_size > 0
    langs = set(res["languages"])
    # q/k/v (and gate/up) read the same tensor and are analysed once
    shared = [s for s in res["sites"] if s["shares_input_with"]]
    assert shared and all(s["site"].endswith(("q_proj", "gate_proj")) for s in shared)
    assert all(len(s["shares_input_with"]) == (2 if s["site"].endswith("q_proj") else 1) for s in shared)
    assert len(res["sites"]) == 2 * 4  # tiny-llama: 2 blocks x (q/k/v, o, gate/up, down)
    for r in res["rows"]:
        assert r["language"] in langs
        for c in ("mix", "minimax", "weighted"):
            assert r[f"penalty_{c}"] >= 0 and math.isfinite(r[f"penalty_{c}"])
            assert r[f"penalty_{c}_measured"] >= -1e-12
    for s in res["sites"]:
        # minimax is the best worst case under theory
        worst_theory_mix = max(r["penalty_mix"] for r in res["rows"] if r["site"] == s["site"])
        assert s["worst_penalty_minimax"] <= worst_theory_mix + 1e-9
    # the macros: equal on the fresh result and the JSON read back; values from the result
    cfg = {k: v for k, v in res["provenance"]["config"].items() if k != "quick"}
    fresh = exp.run(exp.Config(**{**cfg, "languages": tuple(cfg["languages"])}),
                    cache=ResultCache(out / "cache"))
    assert fresh.timing["languages_captured_now"] == 0
    a = exp.macros(fresh)
    b = exp.macros(protocol.Result.load(out / "language_alpha.json"))
    assert {m.name: m.tex() for m in a} == {m.name: m.tex() for m in b}
    top = max(res["per_language"], key=lambda p: p["median_penalty_mix_measured"])
    assert a["LAMostPenalised"].value == top["language"]
    assert a["LASpearman"].value == res["agreement"]["spearman_penalty_mix"]
    assert a["LANumSites"].value == 8 and a["LANumLanguages"].value == 3
    from validate._latex import macro_name

    assert a["LAWorstLayersHebHebr"].value == next(p["worst_in_layers_mix"] for p in res["per_language"]
                                                   if p["language"] == "heb_Hebr")
    assert sum(a[macro_name("LAWorstLayers", l)].value for l in langs) == 8
    # a rerun reads the cached captures and per-layer results: no model forward at all
    import empirical.capture as capture

    monkeypatch.setattr(capture, "capture_corpus", lambda *a, **k: pytest.fail("capture ran again"))
    assert exp.main([*ARGV, "--out", str(out)]) == 0
    again = json.loads((out / "language_alpha.json").read_text())
    assert again["agreement"] == res["agreement"] and again["rows"] == res["rows"]


@pytest.mark.parametrize("argv, flag", [
    (["--bits", "0"], "--bits"), (["--bits", "17"], "--bits"), (["--grid", "foo"], "--grid"),
    (["--grid", "uint"], "--grid"), (["--corpus", "/nonexistent/corpus"], "--corpus"),
    (["--languages", "en", "zz"], "--languages"), (["--languages", "en"], "--languages"),
    (["--model", "/nonexistent/model"], "--model"), (["--reservoir", "100"], "--reservoir"),
    (["--fit-samples", "0"], "--fit-samples"), (["--segments", "-1"], "--segments"),
])
def test_bad_flags_refused_before_any_work(tmp_path, capsys, argv, flag):
    from validate import language_alpha as exp

    assert_refused(exp.main, argv, tmp_path / "out", flag, capsys)


def test_cuda_refused_without_a_device(tmp_path, capsys):
    import torch

    from validate import language_alpha as exp

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert_refused(exp.main, ["--device", "cuda"], tmp_path / "out", "--device cuda", capsys)


def test_sites_grouped_only_when_every_language_agrees():
    from validate.language_alpha import group_sites

    caps = {"eng_Latn": {"sites": dict.fromkeys("qkvo"), "same_as": {"q": "q", "k": "q", "v": "q", "o": "o"}},
            "heb_Hebr": {"sites": dict.fromkeys("qkvo"), "same_as": {"q": "q", "k": "q", "v": "v", "o": "o"}}}
    assert group_sites(caps) == {"q": ["k"], "v": [], "o": []}


@pytest.mark.slow
def test_quick_run_on_the_real_embedded_model(quick_results):
    """``python -m validate.language_alpha --quick`` on gemma-3-270m (run by validate.all)."""
    from validate._common import read_json

    root, _ = quick_results
    res = read_json(root / "language_alpha" / "language_alpha.json")
    assert "dequantized" in res["baseline_note"]
    assert len(res["languages"]) == 3
    # gemma-3-270m: 18 blocks x (q/k/v input, o input, gate/up input, down input)
    assert len(res["sites"]) == 72
    for r in res["rows"]:
        assert r["alpha_star"] > 0 and r["alpha_star_measured"] > 0
        assert math.isfinite(r["penalty_mix_measured"]) and r["penalty_mix_measured"] >= 0
    a = res["agreement"]
    assert -1 <= a["spearman_penalty_mix"] <= 1 and 0 <= a["worst_language_agreement"] <= 1
