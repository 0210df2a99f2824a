"""End-to-end smoke test of validate.optimal_alpha and its real-weights report on plain arrays."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from validate import optimal_alpha as exp


def _finite_numbers(obj, path="$"):
    """Yield (path, value) of every number in a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_quick_run_without_model(tmp_path):
    out = tmp_path / "oa"
    argv = ["--quick", "--model", "none", "--out", str(out), "--samples", "20000",
            "--bits", "2", "4", "--families", "laplace", "lognormal", "--no-progress"]
    exp.main(argv)
    doc = json.loads((out / "optimal_alpha.json").read_text())
    assert doc["experiment"] == "optimal_alpha"
    assert doc["provenance"]["config"]["samples"] == 20000
    assert "git_commit" in doc["provenance"] and "packages" in doc["provenance"]
    assert doc["real_weights"] is None
    rows = doc["synthetic"]["rows"]
    # laplace x 4 signed grids + lognormal x uint, 2 bit widths each
    assert len(rows) == (4 + 1) * 2
    assert {(r["family"], r["grid"]) for r in rows if r["family"] == "lognormal"} == {("lognormal", "uint")}
    for r in rows:
        for k in ("alpha_theory", "alpha_swept", "mse_theory", "mse_swept", "mse_at_theory_alpha",
                  "mse_z", "alpha_rel_diff", "mse_rel_diff"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r)
        assert r["alpha_theory"] > 0 and r["mse_theory"] > 0
        # 2e4 samples: the MSE curve is flat near its minimum, so alpha* scatters by ~10%
        # (lognormal) while the MSE at theory's alpha* agrees within sampling error.
        assert abs(r["alpha_rel_diff"]) < 0.25
        assert abs(r["mse_z"]) < 6
    assert len(doc["synthetic"]["summary"]) == 5
    for name in ("synthetic.csv", "synthetic_table.tex", "mse_vs_alpha.png"):
        assert (out / name).stat().st_size > 0
    assert all(math.isfinite(v) for _, v in _finite_numbers(doc))
    # A rerun resumes from the per-item cache and reproduces the numbers.
    n_cache = len(list((out / "cache").glob("*.json")))
    assert n_cache == 5
    exp.main(argv)
    doc2 = json.loads((out / "optimal_alpha.json").read_text())
    assert doc2["synthetic"]["rows"] == rows


def test_real_weights_report_on_arrays(tmp_path):
    rng = np.random.default_rng(0)
    weights = {
        "layers.0.mlp": rng.laplace(0, 0.02, size=(64, 96)).astype(np.float32),
        "layers.0.attn": rng.normal(0, 0.05, size=(48, 64)).astype(np.float32),
        "layers.1.mlp": (rng.standard_t(4, size=(80, 64)) * 0.01),
    }
    rep = exp.real_weights_report(weights, bits=[3, 4], grid="int", max_samples=5000,
                                  cache_dir=tmp_path, cache_tag="unit", progress=False)
    assert [lay["name"] for lay in rep["layers"]] == list(weights)
    for lay in rep["layers"]:
        assert lay["best_family"] in ("gaussian", "laplace", "gennorm", "student_t")
        assert lay["fits"][0]["bic"] <= lay["fits"][-1]["bic"]
        for pb in lay["per_bits"]:
            assert pb["penalty"] >= -1e-9  # the swept optimum is the minimum
            assert pb["penalty_absmax"] >= -1e-9 and pb["penalty_octav"] >= -1e-9
            assert pb["alpha_predicted"] > 0 and pb["alpha_swept"] > 0
    for s in rep["summary"]:
        q = s["penalty_predicted"]
        assert q["n"] == 3 and q["q10"] <= q["median"] <= q["q90"] <= q["max"]
    assert sum(rep["best_family_counts"].values()) == 3
    assert len(list(tmp_path.glob("*.json"))) == 3
    again = exp.real_weights_report(weights, bits=[3, 4], grid="int", max_samples=5000,
                                    cache_dir=tmp_path, cache_tag="unit", progress=False)
    assert again["summary"] == json.loads(json.dumps(rep["summary"]))


def test_real_weights_report_rejects_bad_input():
    with pytest.raises(ValueError, match="signed"):
        exp.real_weights_report({"w": np.ones((8, 8))}, bits=4, grid="uint", progress=False)
    with pytest.raises(ValueError, match="no weights"):
        exp.real_weights_report({}, bits=4, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        exp.real_weights_report({"w": np.full((8, 8), np.nan)}, bits=4, progress=False)


@pytest.mark.slow
def test_quick_run_with_tiny_model(tmp_path):
    pytest.importorskip("transformers")
    models = pytest.importorskip("empirical.models")
    if "tiny-llama" not in getattr(models, "TINY_MODELS", ()):
        pytest.skip("empirical.models has no tiny-llama")
    out = tmp_path / "oa"
    doc = exp.main(["--quick", "--model", "tiny-llama", "--out", str(out), "--samples", "5000",
                    "--bits", "4", "--families", "gaussian", "--grids", "int", "--no-progress"])
    real = doc["real_weights"]
    assert real["model"] == "tiny-llama"
    assert len(real["layers"]) == 4
    assert (out / "real_weights.csv").exists() and (out / "real_penalty.png").exists()
