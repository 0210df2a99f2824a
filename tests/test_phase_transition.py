"""End-to-end validate.phase_transition: structure, caching, and the real embedded model."""

import math

import pytest

from conftest import assert_refused

from validate import phase_transition as pt
from validate._common import read_json

ARGS = ["--languages", "en", "he", "ja", "ru", "--segments", "4", "--bootstrap", "50", "--max-length", "128"]
# eight units (the Linears of tiny-gpt2's two blocks): pairs, held-out curve points and rankings that differ
TINY = ["--model", "tiny-gpt2", "--unit", "linear", "--stop-after", "-1", *ARGS]


def _sets(order, curve):
    return [frozenset(order[m["k"]:]) for m in curve]


def test_quick_run_on_tiny_model_writes_everything_and_reruns_from_cache(tmp_path):
    import importlib.util
    import json as _json

    import numpy as np

    from theory.curve import CURVE_MODELS, CurveData, fit_curve_model, predict_curve, select_curve_model

    out = tmp_path / "pt"
    assert pt.main([*TINY, "--out", str(out)]) == 0
    res = read_json(out / "phase_transition.json")
    for f in ("phase_transition.png", "phase_transition_table.tex", "curve.csv", "rankings.csv"):
        assert (out / f).stat().st_size > 0
    cfg = res["provenance"]["config"]
    assert cfg["bits"] == 4 and cfg["grid"] == "int" and cfg["model"] == "tiny-gpt2"
    assert cfg["metric"] == "kl" and res["metric"] == "kl" and res["metrics"] == ["kl", "bpb"]
    assert res["provenance"]["packages"]["torch"]
    langs = cfg["languages"]
    names = [u["name"] for u in res["units"]]
    n = len(names)
    assert n == 8
    for key in ("kl_bpb", "zero_pass_spearman", "r2_out_of_sample", "pstar_predicted", "pstar_measured"):
        assert key in res, key
    curve = res["curve"]
    assert len(curve) == n + 1  # --stop-after -1: the full curve
    assert curve[-1]["protected_fraction"] == pytest.approx(1.0)
    # protecting every unit gives exactly zero degradation
    assert all(curve[-1][f"d_{l}"] == 0.0 for l in langs)
    assert all(math.isfinite(v) for v in res["baseline_bpb"].values())
    # both metrics at every quantized point; the flat d_l are the primary (KL) ones
    for m in curve[:-1]:
        assert set(m["by_metric"]) == {"kl", "bpb"}
        assert all(m[f"d_{l}"] == m["by_metric"]["kl"]["degradation"][l] for l in langs)
        assert m["disparity_other_metric"] == m["by_metric"]["bpb"]["disparity"]
        assert all(v >= 0 for v in m["by_metric"]["kl"]["degradation"].values())
    for u in res["units"]:
        assert set(u["single_unit_degradation_by_metric"]) == {"kl", "bpb"}
    # KL bits per byte = d^KL x baseline bits per byte (d^KL = sum KL / sum NLL_fp), in its interval
    for l, v in res["kl_bpb"]["per_language"].items():
        assert v["kl_bpb"] == pytest.approx(curve[0][f"d_{l}"] * res["baseline_bpb"][l], rel=1e-9)
        assert v["ci_low"] <= v["kl_bpb"] <= v["ci_high"]
    summ = res["kl_bpb"]["metric_summary"]
    assert summ["kl"]["disparity"] == pytest.approx(curve[0]["by_metric"]["kl"]["disparity"])
    assert math.isfinite(summ["token_cost_ratio"]) and summ["token_cost_ratio"] > 0
    # the training points are the singles, the pairs of the top four units, two random sets (of
    # 5 and 3 units) and the all-quantized set; every other curve point is held out, and R^2 is
    # taken over those only
    assert len(res["pairs"]) == 6
    pair_sets = {frozenset(names.index(x) for x in p["units"]) for p in res["pairs"]}
    random_sets = {frozenset(names.index(x) for x in p["units"]) for p in res["training_sets"]}
    assert sorted(len(x) for x in random_sets) == [3, 5]
    order = [names.index(x) for x in res["order"]]
    train = pair_sets | random_sets | {frozenset(range(n))} | {frozenset([i]) for i in range(n)}
    want_held = [len(s) >= 2 and s not in train for s in _sets(order, curve)]
    assert [m["held_out"] for m in curve] == want_held and sum(want_held) >= 2
    r2 = res["r2_out_of_sample"]
    assert set(r2["models"]) == set(CURVE_MODELS) and r2["held_out_points"] == sum(want_held)
    # the selection and the predicted curve, recomputed from the JSON through theory.curve
    single = np.array([[u["single_unit_degradation"][l] for u in res["units"]] for l in langs])
    pairs = {tuple(sorted(names.index(x) for x in p["units"])): [p["degradation_by_metric"]["kl"][l] for l in langs]
             for p in res["pairs"]}
    points = {frozenset(names.index(x) for x in p["units"]): [p["degradation_by_metric"]["kl"][l] for l in langs]
              for p in res["training_sets"]}
    data = CurveData(single, pairs, {**points, frozenset(range(n)): [curve[0][f"d_{l}"] for l in langs]})
    selected, _ = select_curve_model(data)
    assert r2["selected"] == res["curve_models"]["selected"] == selected
    ref = np.array([l in cfg["reference"] for l in langs])
    pc = predict_curve(fit_curve_model(selected, data), order, [u["n_params"] for u in res["units"]], ref)
    assert res["pstar_predicted"] == pytest.approx(pc["pstar"], nan_ok=True)
    np.testing.assert_allclose([m["predicted_by_model"][selected] for m in curve[:-1]], pc["D"][:-1], rtol=1e-9)
    # the main curve follows the selected model's greedy ranking; every compared ranking is measured
    assert cfg["ranking"] == "model" and res["rankings"]["model"]["order"] == res["order"]
    assert set(res["rankings"]) == {"model", "excess", "position", "kurtosis", "size"}
    for r, info in res["rankings"].items():
        if info["same_as"] is None:
            assert info["steps_measured"] == n + 1
        else:
            assert info["order"] == res["rankings"][info["same_as"]]["order"]
    # the zero-pass predictor: one Spearman per variant against the measured single-unit damages
    if importlib.util.find_spec("empirical.sensitivity") is not None:
        assert res["zero_pass"]["available"] is True
        assert res["zero_pass_spearman"] and all(-1 <= v["pooled"] <= 1 for v in res["zero_pass_spearman"].values())
    else:
        assert res["zero_pass"]["available"] is False and "sensitivity" in res["zero_pass"]["reason"]
    # every distinct quantized set is one pass, run once (plus the baseline)
    distinct = {s for info in res["rankings"].values()
                for s in _sets([names.index(x) for x in info["order"]], info["curve"]) if s} | train
    assert res["passes_in_result"] == 1 + len(distinct) == res["timing"]["forward_passes_run"]

    # a rerun performs no forward pass (nor the zero-pass predictor's backward pass)
    assert pt.main([*TINY, "--out", str(out)]) == 0
    res2 = read_json(out / "phase_transition.json")
    assert res2["timing"]["forward_passes_run"] == 0 and res2["timing"]["zero_pass_seconds"] is None
    assert res2["curve"] == res["curve"] and res2["passes_in_result"] == res["passes_in_result"]
    assert res2["r2_out_of_sample"] == res["r2_out_of_sample"] and res2["rankings"] == res["rankings"]
    # an altered cache entry (a single pass's values x10, checksum kept) is recomputed with a
    # warning naming it (after recording the baseline it is measured against), and the rerun
    # gives the same result
    entry = next(p for p in sorted((out / "cache").glob("*.json"))
                 if _json.loads(p.read_text())["config"].get("setting", {}).get("quantized") == [names[0]])
    doc = _json.loads(entry.read_text())
    doc["result"]["nll"] = {k: [10 * x for x in v] for k, v in doc["result"]["nll"].items()}
    entry.write_text(_json.dumps(doc))
    with pytest.warns(UserWarning, match=entry.name):
        assert pt.main([*TINY, "--out", str(out)]) == 0
    res3 = read_json(out / "phase_transition.json")
    assert res3["timing"]["forward_passes_run"] == 2 and res3["curve"] == res["curve"]
    # the macros quote the passes the result consists of, also when every pass came from the cache
    ms = pt.macros(pt.protocol.Result.from_json(res2))
    assert ms["PTPassesCurve"].value == res["passes_in_result"]
    assert ms["PTSelectedModel"].value == selected.replace("_", " ")
    assert ms["DisparityNoneKl"].value == pytest.approx(summ["kl"]["disparity"])


def test_metric_bpb_makes_bits_per_byte_primary_and_keeps_kl(tmp_path):
    out = tmp_path / "bpb"
    argv = ["--model", "tiny-gpt2", "--metric", "bpb", "--pairs", "0", "--no-compare-rankings",
            "--no-zero-pass", "--out", str(out), *ARGS]
    assert pt.main(argv) == 0
    res = read_json(out / "phase_transition.json")
    assert res["metric"] == "bpb" and res["pairs"] == [] and set(res["rankings"]) == {"model"}
    first = res["curve"][0]
    assert all(first[f"d_{l}"] == first["by_metric"]["bpb"]["degradation"][l] for l in res["baseline_bpb"])
    assert first["disparity_other_metric"] == first["by_metric"]["kl"]["disparity"]
    # two blocks: no pair passes and no random set of three or more units; the models are fitted
    # on the all-quantized point alone
    assert res["curve_models"]["training_sets"] == ["all units"] and res["training_sets"] == []
    assert res["zero_pass"] == {"available": False, "reason": "--no-zero-pass"}


def test_bad_flags_are_refused_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "bad"
    for argv, needle in ((["--languages", "en"], "every language is in the reference group"),
                         (["--bits", "0"], "--bits"), (["--bits", "17"], "--bits"), (["--grid", "foo"], "--grid"),
                         (["--grid", "uint"], "--grid"), (["--model", "/nonexistent"], "no such folder"),
                         (["--corpus", "/nonexistent"], "--corpus"), (["--languages", "en", "xx-nope"], "--languages"),
                         (["--reference", "sw"], "--reference"), (["--pairs", "1"], "--pairs"),
                         (["--pairs", "-2"], "--pairs"), (["--train-sets", "-1"], "--train-sets"),
                         (["--compare-steps", "0"], "--compare-steps")):
        assert_refused(pt.main, argv, out, needle, capsys)
    for argv in (["--metric", "nll"], ["--ranking", "best"]):  # argparse's choices: usage and the error
        assert pt.main(["--out", str(out), *argv]) == 2
        assert "invalid choice" in capsys.readouterr().err and not out.exists()


def test_quick_accepts_a_negative_stop_after():
    cfg, _, _ = pt.protocol.parse_config(pt, ["--quick", "--stop-after", "-1"])
    assert cfg.stop_after == -1 and cfg.segments == 4 and cfg.pairs == 3 and not cfg.compare_rankings
    assert pt.Config().compare_rankings and pt.Config().metric == "kl" and pt.Config().ranking == "model"
    assert pt.Config().languages[0] == "eng_Latn" and pt.Config().reference == ("eng_Latn",)


@pytest.mark.slow
def test_quick_run_on_the_real_embedded_model(quick_results):
    """``python -m validate.phase_transition --quick`` on gemma-3-270m (run by validate.all)."""
    root, man = quick_results
    res = read_json(root / "phase_transition" / "phase_transition.json")
    assert res["provenance"]["config"]["quick"] is True
    assert "dequantized" in res["baseline_note"]
    assert len(res["units"]) == 18  # gemma-3-270m has 18 decoder blocks
    assert all(math.isfinite(v) and 0 < v < 20 for v in res["baseline_bpb"].values())
    first = res["curve"][0]
    assert first["protected_fraction"] == 0.0 and math.isfinite(first["disparity"])
    assert math.isfinite(first["ci_low"]) and first["ci_low"] <= first["disparity"] <= first["ci_high"]
    assert all(math.isfinite(u["predicted_eps"]) and u["predicted_eps"] > 0 for u in res["units"])
    assert all(v is None or math.isfinite(v) for v in res["predicted_curve"]["disparity"])
    # the disparity bounds lie below the additive model's own prediction (x = 1 is feasible)
    for m in res["curve"]:
        if m["bound_at_rate"] is not None and math.isfinite(m["predicted"]):
            assert m["bound_any_quantizer"] <= m["bound_at_rate"] <= m["predicted"] + 1e-9
    assert 0 < res["disparity_bound"]["median_shrink"] < 1
    assert all(g is None or g > 0 for g in res["interaction_factor"].values())
    assert res["passes_in_result"] > 0 and res["padding_fraction"] < 0.25
    # KL is the primary metric; KL bits per byte per language, and both metrics' intervals
    assert res["metric"] == "kl" and all(v["kl_bpb"] > 0 for v in res["kl_bpb"]["per_language"].values())
    assert {"kl", "bpb"} <= set(res["kl_bpb"]["metric_summary"])
    assert len(res["pairs"]) == 3 and res["r2_out_of_sample"]["selected"] in res["r2_out_of_sample"]["models"]
    assert math.isfinite(res["pstar_predicted"])
