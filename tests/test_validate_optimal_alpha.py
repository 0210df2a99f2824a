"""validate.optimal_alpha in the experiment protocol: the quick synthetic run end to end, the
real-weights report on plain arrays, the per-channel and per-group clipping models, the macros
the paper quotes, and bad flags refused."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_refused

from validate import _protocol as protocol
from validate import optimal_alpha as exp
from validate._common import ResultCache

PAPER = Path(__file__).resolve().parent.parent / "paper"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("LANGQUANT_PROGRESS", "0")


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


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layers.0.mlp": rng.laplace(0, 0.02, size=(64, 96)).astype(np.float32),
        "layers.0.attn": rng.normal(0, 0.05, size=(48, 64)).astype(np.float32),
        "layers.1.mlp": (rng.standard_t(4, size=(80, 64)) * 0.01),
    }


def test_quick_run_without_model(tmp_path):
    out = tmp_path / "oa"
    argv = ["--quick", "--model", "none", "--out", str(out), "--samples", "20000",
            "--bits", "2", "4", "--families", "laplace", "lognormal"]
    assert exp.main(argv) == 0
    doc = json.loads((out / "optimal_alpha.json").read_text())
    assert doc["experiment"] == "optimal_alpha"
    cfg = doc["provenance"]["config"]
    assert cfg["samples"] == 20000 and cfg["bits"] == [2, 4] and cfg["model"] == "none"
    assert cfg["max_fit_samples"] == exp.Config.quick().max_fit_samples  # --quick, then explicit flags
    assert "git_commit" in doc["provenance"] and "packages" in doc["provenance"]
    assert doc["timing"]["wall_seconds"] > 0
    assert doc["real_weights"] is None
    rows = doc["synthetic"]["rows"]
    # laplace x 4 signed grids + lognormal x uint, 2 bit widths each
    assert len(rows) == (4 + 1) * 2
    assert {(r["family"], r["grid"]) for r in rows if r["family"] == "lognormal"} == {("lognormal", "uint")}
    for r in rows:
        for k in ("alpha_theory", "alpha_swept", "mse_theory", "mse_swept", "mse_at_theory_alpha",
                  "mse_z", "alpha_rel_diff", "mse_rel_diff"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r)
        assert r["alpha_theory"] > 0 and r["mse_theory"] > 0 and r["samples"] == 20000
        # 2e4 samples: the MSE curve is flat near its minimum, so alpha* scatters by ~10%
        # (lognormal) while the MSE at theory's alpha* agrees within sampling error.
        assert abs(r["alpha_rel_diff"]) < 0.25
        assert abs(r["mse_z"]) < 6
        # the swept optimum is the minimum of the sample's own curve
        assert r["mse_swept"] <= r["mse_at_theory_alpha"] * (1 + 1e-12)
        assert r["penalty_theory_alpha"] >= -1e-12
    assert len(doc["synthetic"]["summary"]) == 5
    for name in ("synthetic.csv", "synthetic_table.tex", "mse_vs_alpha.png"):
        assert (out / name).stat().st_size > 0
    assert not (out / "real_weights.csv").exists()
    assert "20000 seeded samples" in (out / "synthetic_table.tex").read_text()
    assert all(math.isfinite(v) for _, v in _finite_numbers(doc))
    # A rerun reads every case from the per-item cache and reproduces the numbers.
    assert len(list((out / "cache").glob("*.json"))) == 5
    assert exp.main(argv) == 0
    doc2 = json.loads((out / "optimal_alpha.json").read_text())
    assert doc2["synthetic"] == doc["synthetic"]
    assert len(list((out / "cache").glob("*.json"))) == 5
    # another seed is another item
    assert exp.main([*argv, "--seed", "1"]) == 0
    assert len(list((out / "cache").glob("*.json"))) == 10


@pytest.mark.parametrize("argv, flag", [
    (["--bits", "0"], "--bits"), (["--bits", "17"], "--bits"), (["--grids", "foo"], "--grids"),
    (["--grids", "int", "--bits", "1"], "--bits"), (["--model", "/nonexistent"], "--model"),
    (["--real-grid", "uint"], "--real-grid"), (["--real-bits", "0"], "--real-bits"),
    (["--families", "cauchy"], "--families"), (["--samples", "10"], "--samples"),
    (["--max-layers", "0"], "--max-layers"), (["--families", "lognormal", "--grids", "int"], "--grids"),
    (["--bits", "4", "4"], "--bits"),
    (["--group-size", "7"], "--group-size"), (["--group-size", "0"], "--group-size"),
    (["--unit-bits", "1"], "--unit-bits"), (["--unit-bits", "4", "4"], "--unit-bits"),
    (["--unit-bits", "17"], "--unit-bits"),
])
def test_bad_flags_refused_before_any_work(tmp_path, capsys, argv, flag):
    assert_refused(exp.main, argv, tmp_path / "x", flag, capsys)


def test_config_normalises_and_resolves():
    cfg = exp.Config(model="None", real_grid="INT", bits=(3, 4))
    assert cfg.model == "none" and cfg.real_grid == "int"
    assert cfg.real_bits_used == (3, 4)
    assert exp.Config(real_bits=(8,)).real_bits_used == (8,)


def test_real_weights_report_on_arrays(tmp_path):
    weights = _arrays()
    cache = ResultCache(tmp_path)
    rep = exp.real_weights_report(weights, bits=[3, 4], grid="int", max_samples=5000,
                                  cache=cache, model="unit")
    assert [lay["name"] for lay in rep["layers"]] == list(weights)
    for lay in rep["layers"]:
        assert lay["best_family"] in ("gaussian", "laplace", "gennorm", "student_t")
        assert lay["fits"][0]["bic"] <= lay["fits"][-1]["bic"]
        for pb in lay["per_bits"]:
            assert pb["penalty"] >= -1e-9  # the swept optimum is the minimum
            assert pb["penalty_absmax"] >= -1e-9 and pb["penalty_octav"] >= -1e-9
            assert pb["alpha_predicted"] > 0 and pb["alpha_swept"] > 0
            assert pb["alpha_absmax"] == pytest.approx(float(np.abs(weights[lay["name"]]).max()))
    for s in rep["summary"]:
        q = s["penalty_predicted"]
        assert q["n"] == 3 and q["q10"] <= q["median"] <= q["q90"] <= q["max"]
    assert sum(rep["best_family_counts"].values()) == 3
    assert len(list(tmp_path.glob("*.json"))) == 3
    again = exp.real_weights_report(weights, bits=[3, 4], grid="int", max_samples=5000,
                                    cache=cache, model="unit")
    assert again == rep
    # an entry is keyed by the weights themselves: changed weights under the same name are refitted
    changed = dict(weights, **{"layers.0.mlp": weights["layers.0.mlp"] * 2})
    rep2 = exp.real_weights_report(changed, bits=[3, 4], grid="int", max_samples=5000,
                                   cache=cache, model="unit")
    assert len(list(tmp_path.glob("*.json"))) == 4
    assert rep2["layers"][0]["absmax"] == pytest.approx(2 * rep["layers"][0]["absmax"])
    assert rep2["layers"][1:] == rep["layers"][1:]


def test_real_weights_report_rejects_bad_input():
    with pytest.raises(ValueError, match="signed"):
        exp.real_weights_report({"w": np.ones((8, 8))}, bits=4, grid="uint")
    with pytest.raises(ValueError, match="no weights"):
        exp.real_weights_report({}, bits=4)
    with pytest.raises(ValueError, match="w: .*NaN"):
        exp.real_weights_report({"w": np.full((8, 8), np.nan)}, bits=4)


def test_weights_digest_sees_values_dtype_and_shape():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert exp.weights_digest(a) == exp.weights_digest(a.copy())
    assert exp.weights_digest(a) != exp.weights_digest(a.reshape(4, 3))
    assert exp.weights_digest(a) != exp.weights_digest(a.astype(np.float64))
    b = a.copy()
    b[2, 3] = np.nextafter(b[2, 3], np.float32(100))
    assert exp.weights_digest(a) != exp.weights_digest(b)


def test_macros_with_real_part(tmp_path, monkeypatch):
    """Every \\OA macro the paper uses comes out of a result, fresh and read back alike."""
    calls = []

    def fake_model_weights(name, limit):
        calls.append((name, limit))
        return _arrays(), {"name": name, "prequantized": "Q4_K_M"}

    monkeypatch.setattr(exp, "model_weights", fake_model_weights)
    cfg = exp.Config(samples=20_000, bits=(2, 4, 8), grids=("aciq", "int"),
                     families=("gaussian", "laplace"), model="tiny-llama", max_fit_samples=5000)
    res = exp.run(cfg, cache=ResultCache(tmp_path / "cache"))
    assert calls == [("tiny-llama", None)]
    real = res["real_weights"]
    assert real["model"] == "tiny-llama" and real["grid"] == "int" and real["bits"] == [2, 4, 8]
    assert "Q4_K_M" in real["note"]
    res.timing = {"wall_seconds": 1.5}
    files = exp.write(res, tmp_path / "out")
    names = {p.name for p in files}
    assert names == {"synthetic.csv", "synthetic_table.tex", "mse_vs_alpha.png", "real_weights.csv",
                     "real_weights_table.tex", "real_penalty.png", "optimal_alpha.json",
                     "real_weights_units.csv", "alpha_excess_weights.png"}
    # the per-unit part: both granularities, every model, every bit width, over the 3 tensors
    ex = res["alpha_excess_mse"]
    assert ex["bits"] == [3, 4, 8] and ex["group_size"] == 128 and "Q4_K_M" in ex["note"]
    assert "weight_per_channel" in ex and "weight_per_group128" in ex
    for gk in ("weight_per_channel", "weight_per_group128"):
        assert set(ex[gk]) == set(exp.unit_models())
        for mo, row in ex[gk].items():
            assert set(row) == {"3", "4", "8"}, mo
            for st in row.values():
                assert set(st) == {"median", "q90", "share_within_5pct", "n"} and st["n"] == 3
                assert 0 <= st["median"] <= st["q90"] and 0 <= st["share_within_5pct"] <= 1
        # the summary is the quantiles of the per-tensor excesses
        per = [lay[gk]["per_bits"][1]["excess"]["selected"] for lay in ex["layers"]]
        assert ex[gk]["selected"]["4"]["median"] == pytest.approx(float(np.median(per)))
        assert ex[gk]["selected"]["4"]["share_within_5pct"] == pytest.approx(np.mean(np.array(per) <= 0.05))
    # rows of 64/96 values: a group of 128 is the whole row (the short last group)
    assert ex["layers"][0]["weight_per_group128"]["unit_size"] == 96
    units_csv = (tmp_path / "out" / "real_weights_units.csv").read_text().splitlines()
    assert len(units_csv) == 1 + 3 * 2 * 3 * len(exp.unit_models())
    assert r"Q4\_K\_M GGUF" in (tmp_path / "out" / "real_weights_table.tex").read_text()
    back = protocol.Result.load(tmp_path / "out" / "optimal_alpha.json")
    a, b = exp.macros(res), exp.macros(back)
    assert {m.name: m.tex() for m in a} == {m.name: m.tex() for m in b}
    used = set()
    for tex in PAPER.rglob("*.tex"):
        used |= set(re.findall(r"\\(OA[A-Za-z]+)", tex.read_text()))
    assert used, "the paper quotes no \\OA macro?"
    missing = sorted(n for n in used if n not in a)
    assert not missing, missing
    assert all(a[n].available for n in used), [n for n in used if not a[n].available]
    # values are the result's, checked against published constants and independent counts
    assert a["OAAlphaTheoryLaplaceAciqFour"].value == pytest.approx(5.0286, abs=1e-4)  # ACIQ: W(3 4^4)
    assert a["OAAlphaTheoryGaussianAciqTwo"].value == pytest.approx(1.71, abs=0.01)  # ACIQ table
    assert a["OASamples"].value == 20_000 and a["OANumFamilies"].value == 2
    assert a["OANumComparisons"].value == 2 * 2 * 3
    assert a["OARealLayers"].value == 3 and a["OARealModel"].value == "tiny-llama"
    assert sum(a[f"OARealBestFit{f}"].value for f in ("Gaussian", "Laplace", "Gennorm", "StudentT")) == 3
    assert a["OAElapsedSeconds"].value == 1.5
    at4 = next(s for s in real["summary"] if s["bits"] == 4)
    assert a["OARealPenaltyMedianFour"].value == at4["penalty_predicted"]["median"]
    assert a["OAMaxAlphaRelDiff"].value == max(abs(r["alpha_rel_diff"]) for r in res["synthetic"]["rows"])
    assert a["OptWeightChannelSelectedMedianFour"].value == ex["weight_per_channel"]["selected"]["4"]["median"]
    assert a["OptWeightGroupSelectedMedianFour"].value == ex["weight_per_group128"]["selected"]["4"]["median"]
    assert a["OptWeightGroupSelectedShareFiveFourPct"].percent
    assert a["OptWeightChannelScaleMixtureStudentTQNinetyEight"].value == \
        ex["weight_per_channel"]["scale_mixture/student_t"]["8"]["q90"]
    assert a["OptWeightGroupSize"].value == 128 and a["OptWeightChannelTensors"].value == 3
    assert sum(a[f"OptWeightChannelSelectedCount{s}Four"].value
               for s in ("Gaussian", "Laplace", "Gennorm", "StudentT")) == 3
    # a rerun of the same configuration is served from the cache: same numbers
    again = exp.run(cfg, cache=ResultCache(tmp_path / "cache"))
    assert again.data == res.data


@pytest.mark.slow
def test_quick_run_with_tiny_model(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "oa"
    assert exp.main(["--quick", "--model", "tiny-llama", "--out", str(out), "--samples", "5000",
                     "--bits", "4", "--families", "gaussian", "--grids", "int"]) == 0
    doc = json.loads((out / "optimal_alpha.json").read_text())
    real = doc["real_weights"]
    assert real["model"] == "tiny-llama"
    assert len(real["layers"]) == 4
    assert real["model_metadata"]["source"] == "random-config" and real["note"] is None
    assert (out / "real_weights.csv").exists() and (out / "real_penalty.png").exists()


# --------------------------------------------------------------------------------------------
# per-channel and per-group clipping
# --------------------------------------------------------------------------------------------

def _scaled_rows(kind: str, rows: int, n: int, seed: int) -> np.ndarray:
    """Rows of one shape with log-uniform scales over a decade (a scale mixture)."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(np.log(0.005), np.log(0.05), size=rows))
    z = rng.laplace(size=(rows, n)) if kind == "laplace" else rng.standard_t(3, size=(rows, n))
    return (z * scale[:, None]).astype(np.float32)


@pytest.mark.parametrize("grid", ["int", "midtread"])
@pytest.mark.parametrize("group_size", [None, 8, 24])
def test_unit_sse_is_the_quantizer_error_of_each_unit(grid, group_size):
    """WeightUnits.sse_at against theory.grids.quantize applied unit by unit (groups of 24 in
    rows of 60: two full groups and a short one of 12 per row; midtread is not symmetric)."""
    from theory.grids import quantize

    rng = np.random.default_rng(5)
    w = (rng.standard_t(4, size=(5, 60)) * rng.uniform(0.5, 2.0, size=(5, 1))).astype(np.float32)
    units = exp.WeightUnits(w, group_size)
    if group_size is None:
        vals = [w[r].astype(np.float64) for r in range(5)]
    else:
        full = 60 // group_size * group_size
        vals = [w[r, c:c + group_size].astype(np.float64) for r in range(5) for c in range(0, full, group_size)]
        vals += [w[r, full:].astype(np.float64) for r in range(5)] if full < 60 else []
    assert units.n_units == len(vals) and list(units.n) == [v.size for v in vals]
    assert np.allclose(units.std, [v.std() for v in vals]) and np.allclose(units.mean, [v.mean() for v in vals])
    ks = np.array([0.7, 1.9, 3.1])
    for bits in (3, 4):
        sse = units.sse_at(units.std, ks, bits, grid)
        ref = np.array([[np.sum((v - quantize(v, grid, k * v.std(), bits)) ** 2) for v in vals] for k in ks])
        np.testing.assert_allclose(sse, ref, rtol=1e-9, atol=1e-12)


def test_unit_optima_match_a_per_row_search():
    """The vectorised per-unit optimum agrees with empirical_optimal_alpha run row by row (a
    coarse grid, a 257-point bracket and Brent per row): never worse by more than 1e-4."""
    from empirical.optimal import empirical_optimal_alpha

    w = _scaled_rows("laplace", 12, 1024, 2)
    for bits in (3, 4, 8):
        rec = exp.unit_clipping(w, bits, "int", fit_samples=2000)
        ref = sum(empirical_optimal_alpha(row.astype(np.float64), bits, "int").mse for row in w) / 12
        mse = rec["per_bits"][0]["mse_swept"]
        assert mse <= ref * (1 + 1e-4), bits
        assert mse >= ref * (1 - 1e-2), bits  # both are MSEs of real thresholds near the minimum


def test_shared_laplace_shape_predicts_per_unit_optima():
    """Laplace rows with scales over a decade: the Laplace scale mixture (one t* for all units)
    is within 1% of the swept per-unit optima per channel and per group at 4 bits, while a
    Gaussian shape is far off. Units are large (16384 per row, groups of 4096) because a small
    unit is a small sample: its swept optimum fits the sample (~20% at 128 values)."""
    from theory import Laplace, optimal_alpha

    w = _scaled_rows("laplace", 16, 16384, 3)
    for gs in (None, 4096):
        rec = exp.unit_clipping(w, (3, 4), "int", group_size=gs, unimodal=("laplace", ()), seed=1)
        assert rec["n_units"] == (16 if gs is None else 64) and rec["n_constant_units"] == 0
        assert rec["shapes"]["gennorm"][0] == pytest.approx(1.0, abs=0.06)  # Laplace is beta = 1
        assert rec["mean_over_std"]["median"] < 0.05
        pb4 = rec["per_bits"][1]
        assert pb4["bits"] == 4
        # t* is theory's optimum of the unit-variance Laplace (b = 1/sqrt 2), independently built
        assert pb4["t_star"]["scale_mixture/laplace"] == pytest.approx(
            optimal_alpha(Laplace(1 / math.sqrt(2)), 4, "int"), rel=1e-9)
        assert pb4["t_star"]["unimodal_shape"] == pb4["t_star"]["scale_mixture/laplace"]
        ex = pb4["excess"]
        assert 0 <= ex["scale_mixture/laplace"] < 0.01, (gs, ex)
        assert 0 <= ex["selected"] < 0.01, (gs, ex)
        assert ex["scale_mixture/gaussian"] > 0.3, (gs, ex)
        for pb in rec["per_bits"]:
            assert all(v >= 0 for v in pb["excess"].values())  # the swept optimum is the minimum
            assert pb["selected_shape"] in ("laplace", "gennorm")


def test_heavy_tailed_rows_penalise_a_light_shape():
    """Student-t (nu = 3) rows: the fitted Student-t shape has the smallest excess, the Laplace
    and Gaussian shapes larger ones in order of their tails, and the held-out selection picks
    the Student-t. Per channel it is within 2%; per group of 4096 a single extreme value inflates
    its group's standard deviation (nu = 3 has no fourth moment), so only the order is asserted."""
    from empirical.sweep import mse_sweep

    w = _scaled_rows("t3", 16, 16384, 4)
    for gs in (None, 4096):
        rec = exp.unit_clipping(w, 4, "int", group_size=gs, seed=2)
        assert rec["shapes"]["student_t"][0] == pytest.approx(3.0, abs=0.3)
        pb = rec["per_bits"][0]
        ex = pb["excess"]
        assert ex["scale_mixture/gaussian"] > ex["scale_mixture/laplace"] > ex["scale_mixture/student_t"] >= 0
        assert ex["scale_mixture/gaussian"] > ex["scale_mixture/student_t"] + 0.2, (gs, ex)
        assert ex["scale_mixture/student_t"] == min(v for k, v in ex.items() if k.startswith("scale_mixture/"))
        assert pb["selected_shape"] == "student_t" and ex["selected"] == ex["scale_mixture/student_t"]
        assert "unimodal_shape" not in ex  # no pooled fit given
        if gs is None:
            assert ex["scale_mixture/student_t"] < 0.02, ex
            # the model's MSE is each row's exact sweep at t* std_u, summed (an independent check)
            t = pb["t_star"]["scale_mixture/student_t"]
            own = np.mean([mse_sweep(r, t * r.astype(np.float64).std(), 4, "int") for r in w])
            assert pb["mse"]["scale_mixture/student_t"] == pytest.approx(own, rel=1e-9)


def test_unit_mean_and_constant_units_are_reported():
    rng = np.random.default_rng(6)
    w = rng.laplace(size=(10, 512))
    w[:5] += 0.5 * w[:5].std(axis=1, keepdims=True) / 1.0  # five rows with a mean of ~0.5 std
    w[9] = 0.0  # a constant row is left out of every total
    rec = exp.unit_clipping(w, 4, "int", fit_samples=2000)
    assert rec["n_constant_units"] == 1 and rec["n_kept"] == 9
    mos = np.abs(w[:9].mean(axis=1)) / w[:9].std(axis=1)
    assert rec["mean_over_std"]["median"] == pytest.approx(float(np.median(mos)))
    assert rec["mean_over_std"]["max"] == pytest.approx(float(mos.max()))
    assert all(math.isfinite(v) for _, v in _finite_numbers(rec))


def test_unit_clipping_refuses_bad_input():
    w = np.random.default_rng(0).normal(size=(4, 64))
    for gs in (7, 0, -128):
        with pytest.raises(ValueError, match="group size .* below 8"):
            exp.unit_clipping(w, 4, group_size=gs)
    with pytest.raises(ValueError, match="integer"):
        exp.unit_clipping(w, 4, group_size=16.5)
    with pytest.raises(ValueError, match="weight matrix"):
        exp.unit_clipping(w[0], 4)
    with pytest.raises(ValueError, match="signed"):
        exp.unit_clipping(w, 4, grid="uint")
    with pytest.raises(ValueError, match="NaN"):
        exp.unit_clipping(np.where(w > 2, np.nan, w), 4)
    with pytest.raises(ValueError, match="constant"):
        exp.unit_clipping(np.ones((3, 16)), 4)
    with pytest.raises(ValueError, match="group size"):
        exp.real_weights_report({"w": w}, bits=4, unit_bits=(4,), group_size=4)
    with pytest.raises(protocol.ConfigError, match="--group-size"):
        exp.Config(group_size=4)
    assert exp.Config(group_size=8).group_size == 8


def test_real_weights_report_caches_the_unit_part(tmp_path):
    weights = _arrays()
    cache = ResultCache(tmp_path)
    rep = exp.real_weights_report(weights, bits=[4], grid="int", max_samples=5000, cache=cache,
                                  model="unit", unit_bits=(4,), group_size=32)
    ex = rep["alpha_excess_mse"]
    assert set(ex["granularities"]) == {"weight_per_channel", "weight_per_group32"}
    assert [lay["name"] for lay in ex["layers"]] == list(weights)
    assert all("units" not in lay for lay in rep["layers"])  # the per-tensor records are unchanged
    g = ex["layers"][0]["weight_per_group32"]
    assert g["n_units"] == 64 * 3 and g["unit_size"] == 32  # 96 = 3 groups of 32
    assert ex["layers"][0]["weight_per_channel"]["n_units"] == 64
    again = exp.real_weights_report(weights, bits=[4], grid="int", max_samples=5000, cache=cache,
                                    model="unit", unit_bits=(4,), group_size=32)
    assert again == rep and len(list(tmp_path.glob("*.json"))) == 3
    # another group size is another entry
    exp.real_weights_report(weights, bits=[4], grid="int", max_samples=5000, cache=cache,
                            model="unit", unit_bits=(4,), group_size=16)
    assert len(list(tmp_path.glob("*.json"))) == 6


def test_sampling_floor_falls_with_unit_size():
    """The true shape's threshold against each unit's own sweep: far above zero for groups of 128
    values (each unit's optimum is fitted to its own sample), near zero for large units."""
    from theory import optimal_alpha
    from theory.site_models import unit_variance

    from validate.optimal_alpha import sampling_floor

    d = unit_variance("laplace")
    t = optimal_alpha(d, 4, "int")
    small, large = (sampling_floor(d, t, n, 4, "int", seed=1) for n in (128, 4096))
    assert small > 0.08 and large < 0.03 and large < small / 4
