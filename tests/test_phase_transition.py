"""End-to-end validate.phase_transition: structure, caching, and the real embedded model."""

import math

import pytest

from conftest import assert_refused

from validate import phase_transition as pt
from validate._common import read_json

ARGS = ["--languages", "en", "he", "ja", "ru", "--segments", "4", "--bootstrap", "50", "--max-length", "128"]


def test_quick_run_on_tiny_model_writes_everything_and_reruns_from_cache(tmp_path):
    out = tmp_path / "pt"
    assert pt.main(["--model", "tiny-gpt2", "--out", str(out), *ARGS]) == 0
    res = read_json(out / "phase_transition.json")
    for f in ("phase_transition.png", "phase_transition_table.tex", "curve.csv"):
        assert (out / f).stat().st_size > 0
    cfg = res["provenance"]["config"]
    assert cfg["bits"] == 4 and cfg["grid"] == "int" and cfg["model"] == "tiny-gpt2"
    assert res["provenance"]["packages"]["torch"]
    n_units = len(res["units"])
    assert len(res["curve"]) == n_units + 1  # no --stop-after: the full curve
    assert res["curve"][-1]["protected_fraction"] == pytest.approx(1.0)
    # protecting every unit gives exactly zero degradation
    assert all(res["curve"][-1][f"d_{l}"] == 0.0 for l in res["provenance"]["config"]["languages"])
    assert all(math.isfinite(v) for v in res["baseline_bpb"].values())
    # baseline, singles, curve (k=0..n-1; k=n-1 is a single); the result consists of the same passes
    assert res["timing"]["forward_passes_run"] == 1 + 2 * n_units - 1
    assert res["passes_in_result"] == res["timing"]["forward_passes_run"]
    # a rerun performs no forward pass
    assert pt.main(["--model", "tiny-gpt2", "--out", str(out), *ARGS]) == 0
    res2 = read_json(out / "phase_transition.json")
    assert res2["timing"]["forward_passes_run"] == 0
    assert res2["curve"] == res["curve"] and res2["passes_in_result"] == res["passes_in_result"]
    # an altered cache entry (values x10, checksum kept) is recomputed with a warning naming it,
    # and the rerun gives the same result
    import json as _json

    entry = sorted((out / "cache").glob("*.json"))[0]
    doc = _json.loads(entry.read_text())
    doc["result"] = {k: [10 * x for x in v] for k, v in doc["result"].items()}
    entry.write_text(_json.dumps(doc))
    with pytest.warns(UserWarning, match=entry.name):
        assert pt.main(["--model", "tiny-gpt2", "--out", str(out), *ARGS]) == 0
    res3 = read_json(out / "phase_transition.json")
    assert res3["timing"]["forward_passes_run"] == 1 and res3["curve"] == res["curve"]
    # the macros quote the passes the result consists of, also when every pass came from the cache
    assert pt.macros(pt.protocol.Result.from_json(res2))["PTPassesCurve"].value == res["passes_in_result"]


def test_bad_flags_are_refused_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "bad"
    for argv, needle in ((["--languages", "en"], "every language is in the reference group"),
                         (["--bits", "0"], "--bits"), (["--bits", "17"], "--bits"), (["--grid", "foo"], "--grid"),
                         (["--grid", "uint"], "--grid"), (["--model", "/nonexistent"], "no such folder"),
                         (["--corpus", "/nonexistent"], "--corpus"), (["--languages", "en", "xx-nope"], "--languages"),
                         (["--reference", "sw"], "--reference")):
        assert_refused(pt.main, argv, out, needle, capsys)


def test_quick_accepts_a_negative_stop_after():
    cfg, _, _ = pt.protocol.parse_config(pt, ["--quick", "--stop-after", "-1"])
    assert cfg.stop_after == -1 and cfg.segments == 4
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
