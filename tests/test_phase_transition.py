"""End-to-end validate.phase_transition: structure, caching, and the real embedded model."""

import math

import numpy as np
import pytest

from validate import phase_transition as pt
from validate._common import read_json

ARGS = ["--languages", "en", "he", "ja", "ru", "--segments", "4", "--bootstrap", "50", "--max-length", "128"]


def test_quick_run_on_tiny_model_writes_everything_and_reruns_from_cache(tmp_path):
    out = tmp_path / "pt"
    pt.main(["--model", "tiny-gpt2", "--out", str(out), *ARGS])
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
    assert res["timing"]["forward_passes_run"] == 1 + 2 * n_units - 1  # baseline, singles, curve (k=0..n-1; k=n-1 is a single)
    # a rerun performs no forward pass
    pt.main(["--model", "tiny-gpt2", "--out", str(out), *ARGS])
    res2 = read_json(out / "phase_transition.json")
    assert res2["timing"]["forward_passes_run"] == 0
    assert res2["curve"] == res["curve"]


def test_disparity_and_bootstrap_statistics():
    rng = np.random.default_rng(0)
    fp = {"eng": rng.uniform(10, 20, 50), "heb": rng.uniform(10, 20, 50)}
    q = {"eng": fp["eng"] * 1.01, "heb": fp["heb"] * 1.03}
    d = pt.degradation(q, fp)
    assert d["eng"] == pytest.approx(0.01) and d["heb"] == pytest.approx(0.03)
    assert pt.disparity(d, ["eng"]) == pytest.approx(3.0)
    lo, hi = pt.bootstrap_disparity(q, fp, ["eng"], parallel=True, n_boot=200, seed=0)
    assert lo == pytest.approx(3.0) and hi == pytest.approx(3.0)  # constant ratios: no spread
    q2 = {"eng": fp["eng"] * rng.uniform(1.0, 1.02, 50), "heb": fp["heb"] * rng.uniform(1.0, 1.06, 50)}
    lo, hi = pt.bootstrap_disparity(q2, fp, ["eng"], parallel=True, n_boot=300, seed=0)
    assert lo < pt.disparity(pt.degradation(q2, fp), ["eng"]) < hi
    assert pt.r_squared([1, 2, 3], [1, 2, 3]) == 1.0


@pytest.mark.parametrize("parallel", [True, False])
def test_vectorised_bootstrap_equals_a_loop_over_resamples(parallel):
    """The (n_boot, n) resampling gives, resample by resample, the scalar D of docs/design.md."""
    rng = np.random.default_rng(1)
    sizes = {"eng": 40, "heb": 40 if parallel else 33, "jpn": 40 if parallel else 47}
    fp = {l: rng.uniform(10, 20, n) for l, n in sizes.items()}
    q = {l: v * rng.uniform(1.0, 1.05, v.size) for l, v in fp.items()}
    n_boot = 120
    draw = np.random.default_rng(7)  # the same stream bootstrap_disparity draws from
    shared = draw.integers(0, 40, (n_boot, 40)) if parallel else None
    ids = {l: shared if parallel else draw.integers(0, n, (n_boot, n)) for l, n in sizes.items()}
    loop = []
    for b in range(n_boot):
        d = {l: float(q[l][ids[l][b]].sum() / fp[l][ids[l][b]].sum() - 1.0) for l in sizes}
        ref = d["eng"]
        loop.append(np.mean([d[l] / ref for l in ("heb", "jpn")]) if ref > 0 else np.nan)
    loop = np.asarray(loop)
    loop = loop[np.isfinite(loop)]
    lo, hi = pt.bootstrap_disparity(q, fp, ["eng"], parallel=parallel, n_boot=n_boot, seed=7)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(loop, [0.025, 0.975])), rel=1e-12)


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
    assert res["timing"]["forward_passes_run"] > 0 and res["timing"]["padding_fraction"] < 0.25
