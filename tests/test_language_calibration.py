"""validate.language_calibration on a tiny model: the plan, disjoint calibration and evaluation text,
a held-out split that never reads its unseen languages, caching, exported thresholds, comparisons."""

import json

import numpy as np
import pytest

from empirical.actquant import CalibrationSamples, load_thresholds
from empirical.corpora import Corpus
from empirical.disparity import paired_difference
from validate import _protocol as protocol
from validate import language_calibration as lc

ARGS = ["--model", "tiny-llama", "--languages", "en", "he", "ja", "--calib-segments", "2", "--max-length", "64",
        "--settings", "a4-tensor", "w4a8-channel", "--calibrators", "max", "p99.9", "entropy", "minimax",
        "--heldout", "en", "he", "--heldout-calibrators", "minimax", "--weight-methods", "absmax", "imatrix",
        "imatrix_minimax", "--libraries", "none", "--bootstrap", "100"]


def _run(out, extra=()):
    assert lc.main([*ARGS, *extra, "--out", str(out)]) == 0
    return json.loads((out / "language_calibration.json").read_text())


def test_config_refuses_what_it_cannot_run():
    with pytest.raises(protocol.ConfigError, match="settings"):
        lc.Config(settings=("a8",))
    with pytest.raises(protocol.ConfigError, match="calibrators"):
        lc.Config(calibrators=("max", "magic"))
    with pytest.raises(protocol.ConfigError, match="heldout"):
        lc.Config(languages=("en", "he"), heldout=("en", "he"))
    with pytest.raises(protocol.ConfigError, match="heldout"):
        lc.Config(languages=("en", "he"), heldout=("ja",))
    with pytest.raises(protocol.ConfigError, match="bits"):
        lc.Config(settings=("a0-tensor",))
    c = lc.Config(languages=("en", "he", "ja", "ru"))
    assert c.held == ("eng_Latn", "heb_Hebr") and c.reference == ("eng_Latn",)
    import dataclasses
    assert dataclasses.replace(c, languages=("en", "ja")).held == ("eng_Latn",)  # the default follows --languages
    assert lc.Setting.parse("w4a8-channel") == lc.Setting(8, "channel", 4)
    assert lc.Setting.parse("a6-tensor").name == "a6-tensor"


def test_plan_skips_redundant_cells_and_says_why():
    c = lc.Config(settings=("a8-tensor", "a4-channel"), calibrators=("mse", "entropy", "minimax"),
                  heldout_calibrators=("minimax",), libraries=("none",), weight_methods=("absmax", "imatrix"))
    cells, skipped = lc.plan(c)
    names = {x["name"] for x in cells}
    assert "a8-tensor/minimax/per_language" in names and "a8-tensor/minimax/heldout" in names
    assert "a8-tensor/minimax/en" not in names and "a8-tensor/minimax/mix" not in names
    assert "a8-tensor/entropy/en" in names and "a4-channel/entropy/en" not in names
    assert "a8-tensor/mse/heldout" not in names
    assert {"w4/absmax/none", "w4/imatrix/en", "w4/imatrix/mix"} <= names
    why = {(s["setting"], s["calibrator"], s["set"]): s["why"] for s in skipped}
    assert "per tensor" in why[("a4-channel", "entropy", "en")]
    assert "MSE sweep" in why[("a8-tensor", "minimax", "en")]


def _corpus(n, parallel=True):
    texts = {l: [f"{l} sentence {i}" for i in range(n)] for l in ("eng_Latn", "heb_Hebr")}
    return Corpus("t", texts, {}, parallel=parallel)


def test_calibration_and_evaluation_segments_are_disjoint():
    c = lc.Config(languages=("en", "he"), segments=5, calib_segments=3, calibration_sets=("en", "mix"))
    corpus = _corpus(10)
    ev, cal = lc.split_segments(corpus, c)
    for l in corpus.languages:
        assert ev[l] == corpus[l][:5] and cal[l] == corpus[l][5:8]
        assert not set(ev[l]) & set(cal[l])
    c = lc.Config(languages=("en", "he"), calib_segments=3, calibration_sets=("en", "mix"))
    ev, cal = lc.split_segments(corpus, c)
    assert all(len(ev[l]) == 7 and cal[l] == corpus[l][7:] for l in corpus.languages)
    with pytest.raises(ValueError, match="disjoint"):
        lc.split_segments(_corpus(6), lc.Config(languages=("en", "he"), segments=5, calib_segments=3,
                                                calibration_sets=("en", "mix")))


def test_heldout_thresholds_never_read_the_unseen_languages():
    rng = np.random.default_rng(0)
    langs = ("eng_Latn", "heb_Hebr", "jpn_Jpan")
    vals = {"s": {l: rng.laplace(size=(300, 4)).astype(np.float32) * (1 + i) for i, l in enumerate(langs)}}
    cs = CalibrationSamples({"s": ("s",)}, vals, {l: 300 for l in langs})
    c = lc.Config(languages=("en", "he", "ja"), heldout=("en", "he"))
    for cal in ("mse", "minimax", "max"):
        held = lc.site_thresholds(cs, cal, 4, "tensor", "heldout", c)["s"]
        mix = lc.site_thresholds(cs, cal, 4, "tensor", "mix", c)["s"]
        vals["s"]["jpn_Jpan"] = vals["s"]["jpn_Jpan"] * 50  # only the unseen language changes
        assert lc.site_thresholds(cs, cal, 4, "tensor", "heldout", c)["s"] == held
        assert lc.site_thresholds(cs, cal, 4, "tensor", "mix", c)["s"] != mix
        vals["s"]["jpn_Jpan"] = vals["s"]["jpn_Jpan"] / 50
    assert lc.set_languages("en", c) == ["eng_Latn"]
    assert not set(lc.set_languages("heldout", c)) & {"jpn_Jpan"}


def test_paired_difference_against_a_direct_computation():
    rng = np.random.default_rng(3)
    fp = {l: rng.uniform(5, 9, 12) for l in ("a", "b", "c")}
    qa = {l: v * (1 + rng.uniform(0.0, 0.2, 12)) for l, v in fp.items()}
    qb = {l: v * (1 + rng.uniform(0.1, 0.3, 12)) for l, v in fp.items()}
    pd = paired_difference((qa, None), (qb, None), fp, "bpb", parallel=True, n_boot=400, seed=1)
    da = {l: qa[l].sum() / fp[l].sum() - 1 for l in fp}
    db = {l: qb[l].sum() / fp[l].sum() - 1 for l in fp}
    assert pd["worst"]["a"] == pytest.approx(max(da.values())) and pd["worst"]["b"] == pytest.approx(max(db.values()))
    assert pd["worst"]["diff"] == pytest.approx(max(da.values()) - max(db.values()))
    assert pd["worst"]["ci"][1] < 0 and pd["worst"]["resolved"]  # b is worse everywhere by construction
    # the interval is the percentile interval of the same resamples computed by hand
    idx = np.random.default_rng(1).integers(0, 12, (400, 12))
    diff = np.max([qa[l][idx].sum(1) / fp[l][idx].sum(1) - 1 for l in fp], axis=0) - \
        np.max([qb[l][idx].sum(1) / fp[l][idx].sum(1) - 1 for l in fp], axis=0)
    assert pd["worst"]["ci"] == pytest.approx(tuple(np.quantile(diff, (0.025, 0.975))))
    same = paired_difference((qa, None), (qa, None), fp, "bpb", True, 100, 0)
    assert same["worst"]["diff"] == 0 and same["worst"]["ci"] == (0.0, 0.0) and not same["worst"]["resolved"]
    sub = paired_difference((qa, None), (qb, None), fp, "bpb", True, 100, 0, worst_over=["c"])
    assert sub["worst"]["a"] == pytest.approx(da["c"]) and sub["worst"]["language_a"] == "c"
    with pytest.raises(ValueError, match="worst_over"):
        paired_difference((qa, None), (qb, None), fp, "bpb", True, 100, 0, worst_over=["zz"])


def test_end_to_end_cells_exports_and_a_rerun_without_passes(tmp_path):
    doc = _run(tmp_path / "r")
    names = [c["name"] for c in doc["cells"]]
    assert "a4-tensor/entropy/en" in names and "w4a8-channel/entropy/en" not in names
    assert "w4/imatrix_minimax/per_language" in names and "w4/imatrix_minimax/heldout" in names
    # one pass per distinct quantizer: max on the mix and max per language have equal thresholds
    by = {c["name"]: c for c in doc["cells"]}
    assert by["a4-tensor/max/mix"]["thresholds_digest"] == by["a4-tensor/max/per_language"]["thresholds_digest"]
    assert by["a4-tensor/max/mix"]["degradation"] == by["a4-tensor/max/per_language"]["degradation"]
    assert by["a4-tensor/max/en"]["thresholds_digest"] != by["a4-tensor/max/mix"]["thresholds_digest"]
    distinct = {(c["setting"], c.get("thresholds_digest") or c["name"]) for c in doc["cells"]}
    assert doc["timing"]["forward_passes_run"] == 1 + len(distinct) < 1 + len(names)
    for c in doc["cells"]:
        d = c["degradation"]
        assert c["worst"] == max(d.values()) and c["worst_language"] == max(d, key=d.get)
        assert c["reference_degradation"] == d["eng_Latn"]
        assert c["worst_unseen"] == d["jpn_Jpan"]
    # calibration and evaluation text share no segment
    assert all(v == 0 for v in doc["segments"]["text_overlap"].values())
    # LA-ACIQ thresholds exported, readable, one per Linear
    exported = sorted((tmp_path / "r" / "thresholds").glob("*.safetensors"))
    assert len(exported) == 4  # minimax per_language and heldout, two settings
    th, meta = load_thresholds(exported[0])
    assert meta["config"]["calibrator"] == "minimax" and all(np.all(v > 0) for v in th.values())
    # comparisons: every LA cell against every baseline of its setting
    rows = [r for r in doc["comparisons"] if r["method"] == "a4-tensor/minimax/per_language"]
    assert {r["baseline"] for r in rows} == {f"a4-tensor/{k}/{s}" for k in ("max", "p99.9", "entropy")
                                            for s in ("en", "mix", "per_language")}
    held = [r for r in doc["comparisons"] if r["method"] == "a4-tensor/minimax/heldout"]
    assert held and all(r["baseline_set"] == "en" and r["worst"]["over"] == ["jpn_Jpan"] for r in held)
    v = doc["verdict"]["a4-tensor/minimax/per_language"]
    assert v["baselines"] == 3 and len(v["lower"]) + len(v["not_resolved"]) + len(v["higher"]) == 3
    for f in ("cells.csv", "language_calibration_table.tex", "language_calibration.png"):
        assert (tmp_path / "r" / f).stat().st_size > 0
    again = _run(tmp_path / "r")
    assert again["timing"]["forward_passes_run"] == 0 and again["timing"]["thresholds_computed"] == 0
    assert again["cells"] == doc["cells"]
    ms = lc.macros(protocol.Result.from_json(doc))
    assert "CalibMinimaxWorst" in ms and "CalibImatrixWorst" in ms and "CalibLibrary" in ms


def test_library_cells_run_the_library_and_leave_the_model_as_it_was(tmp_path):
    pytest.importorskip("optimum.quanto")
    from empirical.baselines import available

    if available("quanto") is not None:
        pytest.skip(available("quanto"))
    args = ["--model", "tiny-llama", "--languages", "en", "he", "ja", "--calib-segments", "2", "--max-length", "64",
            "--settings", "w8a8-tensor", "a6-tensor", "--calibrators", "max", "minimax", "--calibration-sets", "en",
            "mix", "per_language", "--weight-bits", "0", "--libraries", "quanto", "--bootstrap", "50",
            "--out", str(tmp_path / "r")]
    assert lc.main(args) == 0
    doc = json.loads((tmp_path / "r" / "language_calibration.json").read_text())
    lib = [c for c in doc["cells"] if c["kind"] == "library"]
    assert {c["name"] for c in lib} == {"w8a8-tensor/quanto/en", "w8a8-tensor/quanto/mix"}
    info = doc["libraries"]
    assert info["w8a8-tensor/quanto/mix"]["library"] == "quanto" and info["w8a8-tensor/quanto/mix"]["n_calibration_batches"] >= 1
    assert "alone" in info["a6-tensor/quanto/en"] or "int8" in info["a6-tensor/quanto/en"]
    # the two calibrations differ, and both quantize something
    assert doc["cells"][[c["name"] for c in doc["cells"]].index("w8a8-tensor/quanto/en")]["worst"] > 0
    # the library's pass sits among the comparisons of its setting
    assert any(r["baseline"] == "w8a8-tensor/quanto/en" for r in doc["comparisons"])
    # a rerun reads the pass and the library's provenance from the cache
    assert lc.main(args) == 0
    again = json.loads((tmp_path / "r" / "language_calibration.json").read_text())
    assert again["timing"]["forward_passes_run"] == 0
    assert again["libraries"]["w8a8-tensor/quanto/mix"] == info["w8a8-tensor/quanto/mix"]
