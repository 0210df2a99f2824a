"""The paper is regenerated from code: validate.all's macros and manifest, and paper/'s inputs.

Fast tests run validate.all on stand-in experiments (tiny scripts that write synthetic result
JSONs) and check the macros it writes and the manifest. The slow test runs the real
``python -m validate.all --quick`` once and checks that every file the LaTeX source includes was
written by that run (listed in its manifest) and every generated macro the source uses is defined.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

from test_paper_source import PAPER, _balanced, paper_sources
from validate import _latex as latex
from validate import all as va
from validate._common import read_json

# ---- reading LaTeX ------------------------------------------------------------------------------

_NEWCOMMAND = re.compile(r"^\\newcommand\{\\([^{}]*)\}\{(.*)\}%(.*)$")


def parse_macros(text: str) -> dict[str, str]:
    """name -> value of a generated macros.tex; fails on any line that is neither a comment nor
    one well-formed \\newcommand, and on a name defined twice."""
    out: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("%"):
            continue
        m = _NEWCOMMAND.match(line)
        assert m, f"line {i} is not a \\newcommand: {line!r}"
        name, value = m.group(1), m.group(2)
        assert re.fullmatch(r"[A-Za-z]+", name), f"macro name {name!r} is not letters only"
        assert name not in out, f"\\{name} defined twice"
        assert _balanced(value), f"\\{name}: unbalanced braces in {value!r}"
        out[name] = value
    return out


def tex_number(value: str) -> float | None:
    """The number a generated numeric macro prints, or None when it is text."""
    v = value.strip()
    m = re.fullmatch(r"\\ensuremath\{(.*)\}", v)
    if m:
        v = m.group(1)
    pct = v.endswith(r"\%")
    if pct:
        v = v[:-2]
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)\\times 10\^\{(-?\d+)\}", v)
    if m:
        x = float(m.group(1)) * 10.0 ** int(m.group(2))
    elif re.fullmatch(r"-?\d+(?:\.\d+)?", v):
        x = float(v)
    else:
        return None
    return x / 100 if pct else x


_GENERATED = re.compile(r"\\(input|includegraphics|optionalinput|optionalgraphics)(?:\[[^\]]*\])?"
                        r"\{\\resultsdir/([^}]*)\}")


def generated_inputs(sources: dict[Path, str]) -> list[tuple[str, str]]:
    """(command, path relative to the results root) of every generated file the paper reads."""
    out = []
    for text in sources.values():
        for cmd, rel in _GENERATED.findall(text):
            if cmd in ("input", "optionalinput") and not Path(rel).suffix:
                rel += ".tex"  # what \input does
            out.append((cmd, rel))
    return out


# Upper-case control sequences that are LaTeX's, not generated.
LATEX_UPPER = {"LaTeX", "TeX", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Pi", "Sigma", "Phi",
               "Psi", "Omega", "Pr", "S", "P", "L", "O", "AA", "AE", "OE", "Large", "LARGE",
               "Huge", "IfFileExists"}


def used_generated_macros(sources: dict[Path, str]) -> set[str]:
    text = "\n".join(sources.values())
    defined_here = set(re.findall(r"\\(?:newcommand|providecommand|renewcommand)\{?\\([A-Za-z]+)", text))
    return {m for m in re.findall(r"\\([A-Za-z]+)", text)
            if m[0].isupper() and m not in LATEX_UPPER and m not in defined_here}


# ---- synthetic results ------------------------------------------------------------------------------

def _prov(**config):
    return {"config": config, "git_commit": "0" * 40, "packages": {}}


#: The mechanism experiments (issue #17): their stand-in results are real runs on tiny random
#: models (a few seconds each), so their macros read documents of exactly the shape they write.
MECHANISMS = ("residual_ablation", "cka", "distribution_shift", "gradient_norms", "outliers", "bottleneck",
              "cross_architecture")


@functools.lru_cache(maxsize=1)
def mechanism_results() -> dict[str, dict]:
    import tempfile

    from validate import _protocol as protocol
    from validate._common import ResultCache

    tiny = dict(model="tiny-llama", languages=("en", "he", "ja"), segments=3, max_length=32, bootstrap=30)
    extra = {"cross_architecture": dict(target="tiny-gemma")}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MECHANISMS:
            mod = protocol.experiment_module(name)
            cfg = mod.Config(**tiny, **extra.get(name, {}))
            res = mod.run(cfg, ResultCache(Path(tmp) / name / "cache"))
            out[name] = json.loads(json.dumps(res.to_json()))
    return out


def synthetic_results() -> dict[str, dict]:
    """Result JSONs shaped like each experiment's, small and with known values (the mechanism
    experiments: :func:`mechanism_results`)."""
    fams = ("gaussian", "laplace", "gennorm", "student_t", "lognormal")
    oa_rows, oa_summary = [], []
    for fam in fams:
        for grid in (("uint",) if fam == "lognormal" else ("aciq", "int")):
            for b in (2, 4, 8):
                oa_rows.append({"family": fam, "grid": grid, "bits": b, "alpha_theory": 5.0286 if
                                (fam, grid, b) == ("laplace", "aciq", 4) else 1.5 + b / 10,
                                "alpha_swept": 5.05 if (fam, grid, b) == ("laplace", "aciq", 4) else 1.52,
                                "alpha_rel_diff": 0.004, "penalty_theory_alpha": 1.5e-5})
            oa_summary.append({"family": fam, "grid": grid, "max_abs_alpha_rel_diff": 0.0123,
                               "max_abs_mse_rel_diff": 0.02, "max_abs_mse_z": 1.7,
                               "max_penalty_theory_alpha": 2e-4})
    pen = {"median": 0.0025, "q90": 0.0066, "max": 0.0081, "frac_below_1pct": 1.0}
    oa = {"experiment": "optimal_alpha", "provenance": _prov(samples=50000, bits=[2, 4, 8]),
          "synthetic": {"rows": oa_rows, "summary": oa_summary},
          "real_weights": {"model": "gemma-3-270m", "grid": "int", "layers": [{}] * 4,
                           "best_family_counts": {"student_t": 3, "gennorm": 1},
                           "excess_kurtosis": {"median": 3.99},
                           "summary": [{"bits": b, "penalty_predicted": pen,
                                        "penalty_octav": {"median": 5e-5},
                                        "penalty_absmax": {"median": 5.33},
                                        "alpha_rel_diff": {"median": 0.03}} for b in (2, 4, 8)]},
          "timing": {"wall_seconds": 8.3}}
    unit_stats = {"median": 0.067, "q90": 0.14, "share_within_5pct": 0.33, "n": 4}
    grans = ["weight_per_channel", "weight_per_group128"]
    oa["alpha_excess_mse"] = {
        "grid": "int", "bits": [3, 4, 8], "group_size": 128, "granularities": grans, "within": 0.05,
        "models": ["unimodal_shape", "scale_mixture/student_t", "selected", "absmax", "sampling_floor"],
        **{g: {m: {str(b): unit_stats for b in (3, 4, 8)}
               for m in ("unimodal_shape", "scale_mixture/student_t", "selected", "absmax", "sampling_floor")}
           for g in grans},
        "selected_shape_counts": {g: {str(b): {"student_t": 3, "gennorm": 1} for b in (3, 4, 8)} for g in grans},
        "mean_over_std_median": {g: 0.03 for g in grans}, "layers": []}
    langs = ["eng_Latn", "heb_Hebr", "zho_Hans"]
    dist_rows = [{"site": f"model.layers.{i}", "kind": "residual", "layer": i, "language": l,
                  "excess_kurtosis": 100.0 * (i + 1), "best_family": "student_t" if i else "gennorm",
                  "alpha_family": "gennorm", "alpha_star": 1.0 + i, "alpha_swept": 2.0 + i,
                  "theory_penalty": 0.25 * (i + 1)}
                 for i in range(3) for l in langs]
    dist = {"experiment": "distributions", "model": {"name": "gemma-3-270m"},
            "corpus": {"name": "udhr", "languages": langs}, "bits": 4, "grid": "int",
            "sites": "residual", "rows": dist_rows, "capture_seconds": 15.7,
            "alpha_spread": [{"site": "model.layers.2", "kind": "residual", "layer": 2, "ratio": 5.42,
                              "theory_ratio": 2.0, "min_language": "eng_Latn", "max_language": "heb_Hebr"},
                             {"site": "model.layers.1", "kind": "residual", "layer": 1, "ratio": 1.2,
                              "theory_ratio": 3.0, "min_language": "zho_Hans", "max_language": "eng_Latn"}],
            "channel_energy": [{"site": f"model.layers.{i}", "layer": i, "language": "all", "channels": 640,
                                "top_channel": 163, "top_share": 0.5 + 0.1 * i, "channels_for_half": 3 - i}
                               for i in range(3)],
            "provenance": _prov(model="gemma-3-270m")}
    q = {"median": 0.0014, "q90": 0.014, "share_within_5pct": 0.944, "n": 9, "failed": 0}
    dist["alpha_excess_mse"] = {k: {m: {str(b): q for b in (3, 4, 8)} for m in ("unimodal", "selected")}
                                for k in ("residual", "linear_input")}
    dist["alpha_distance"] = {k: {m: {"4": 0.02} for m in ("unimodal", "selected")}
                              for k in ("residual", "linear_input")}
    dist["penalty_spearman"] = {"unimodal": 0.19, "selected": 0.91}
    dist["penalty_agreement"] = {m: {"spearman": v, "same_worst_language_share": 0.8,
                                     "by_kind": {"residual": v, "linear_input": v}}
                                 for m, v in (("unimodal", 0.19), ("selected", 0.91))}
    dist["penalty_reliability"] = {"spearman_halves": 0.9, "spearman_brown": 0.947}
    dist["goals"] = [{"goal": "penalty Spearman >= 0.8", "value": 0.91, "met": True}]
    rd_items = []
    for k, fam in enumerate(fams):
        rows = [{"bits": b, "gap_uniform_bits": 0.3 * b + k / 10, "gap_swept_bits": 0.3 * b + k / 10,
                 "gap_lloyd_max_bits": 0.25 * b + k / 10, "gap_panter_dite_bits": 0.72,
                 "lloyd_max_over_panter_dite": 1.0 + 0.01 * k / b, "uniform_over_lloyd_max": 1.2,
                 "d_lloyd_max": 0.3633802276324184 if (fam, b) == ("gaussian", 1) else 0.1}
                for b in (1, 2, 4, 8)]
        rd_items.append({"family": fam, "excess_kurtosis": float(k), "rows": rows})
    rd = {"experiment": "rate_distortion", "provenance": _prov(samples=20000, bits=[1, 2, 4, 8]),
          "ecsq_gap_bits": 0.25461433482006296, "ecsq_gap_db": 1.53293104213742,
          "families": rd_items, "timing": {"wall_seconds": 2.5}}
    pt_langs = ["eng_Latn", "heb_Hebr", "jpn_Jpan"]
    curve = [{"k": k, "protected_fraction": k / 18, "disparity": 1.337 - 0.2 * k,
              "ci_low": None if k == 0 else 0.9, "ci_high": 7.93, "predicted": 1.30 - 0.2 * k,
              "bound_at_rate": 0.47 - 0.03 * k, "bound_any_quantizer": 0.165,
              **{f"d_{l}": 0.25 + 0.01 * j for j, l in enumerate(pt_langs)}} for k in range(4)]
    pt = {"experiment": "phase_transition",
          "provenance": _prov(model="gemma-3-270m", corpus="udhr", languages=pt_langs,
                              reference=["eng_Latn"], bits=4, grid="int", granularity="channel",
                              clipping="absmax", unit="block", ranking="excess", segments=4),
          "baseline_note": "baseline is the dequantized Q4_K_M GGUF (weights already quantized to about 4-5 bits)",
          "units": [{"name": f"block{i}"} for i in range(18)], "order": [f"block{i}" for i in range(18)],
          "baseline_bpb": {l: 1.0 + j / 10 for j, l in enumerate(pt_langs)},
          "curve": curve, "pstar_predicted": 0.0893313367246131, "pstar_measured": 0.13359602203336737,
          "r2_curve": 0.6187338316374016, "r2_curve_calibrated": 0.435, "pstar_predicted_calibrated": 0.105,
          "interaction_factor": {"eng_Latn": 1.01, "heb_Hebr": 0.96, "jpn_Jpan": 1.16},
          "disparity_bound": {"points": 4, "measured_above_bound_at_rate": 4, "median_shrink": 0.097},
          "passes_in_result": 24, "scored_tokens_per_pass": 538,
          "timing": {"wall_seconds": 122.05, "forward_passes_run": 0}}
    # both metrics, the curve models out of sample, the measured rankings and the zero-pass predictor
    from theory.curve import CURVE_MODELS

    pt["provenance"]["config"]["ranking"] = "model"
    pt.update({
        "metric": "kl", "pstar_predicted_additive": 0.0611,
        "kl_bpb": {"per_language": {l: {"kl_bpb": 0.05 + 0.01 * j, "ci_low": 0.04, "ci_high": 0.07}
                                    for j, l in enumerate(pt_langs)},
                   "metric_summary": {
                       "kl": {"disparity": 1.594, "disparity_ci": [1.261, 2.065], "relative_width": 0.504,
                              "resolved": True},
                       "bpb": {"disparity": 1.337, "disparity_ci": [0.913, 7.93], "relative_width": 5.25,
                               "resolved": False},
                       "token_cost_ratio": 108.3, "top1_agreement": {l: 0.8 for l in pt_langs}}},
        "r2_out_of_sample": {"selected": "second_order_calibrated", "held_out_points": 6,
                             "held_out_points_all_curves": 30,
                             "models": {m: {"disparity": 0.5 + 0.01 * i, "disparity_all_curves": 0.4,
                                            "degradation_pooled": 0.9} for i, m in enumerate(CURVE_MODELS)}},
        "pstar_steps": {"selected": "second_order_calibrated", "measured": 6,
                        "models": {"second_order_calibrated": {"predicted": 7, "measured": 6,
                                                               "within_one_unit": True}}},
        "pairs": [{}] * 6, "training_sets": [{}] * 2,
        "rankings": {"model": {"pstar_measured": 0.3136, "pstar_above": None},
                     "excess": {"pstar_measured": 0.3216, "pstar_above": None},
                     "position": {"pstar_measured": None, "pstar_above": 0.5},
                     "kurtosis": {"pstar_measured": None, "pstar_above": 0.5},
                     "size": {"pstar_measured": None, "pstar_above": 0.5, "same_as": "position"}},
        "zero_pass": {"available": True, "variants": {
            "theory": {"spearman": {"pooled": 0.849,
                                    "per_language": {l: 0.73 + 0.1 * j for j, l in enumerate(pt_langs)}}},
            "factorized": {"spearman": {"pooled": 0.34, "per_language": {l: 0.3 for l in pt_langs}}}}},
    })
    la = {"experiment": "language_alpha", "provenance": _prov(model="gemma-3-270m"), "bits": 4, "grid": "int",
          "languages": pt_langs, "sites": [{}] * 72,
          "agreement": {"spearman_penalty_mix": 0.23, "worst_language_agreement": 0.56,
                        "median_rel_error_alpha_star": 0.417, "median_penalty_own_at_theory_alpha": 0.31,
                        "median_worst_penalty_mix_measured": 0.09, "median_worst_penalty_minimax_measured": 0.05,
                        "median_worst_penalty_mix": float("nan")},
          "per_language": [{"language": l, "median_penalty_mix_measured": 0.07 - 0.02 * j,
                            "median_penalty_minimax_measured": 0.042, "worst_in_layers_mix": 42 - 10 * j}
                           for j, l in enumerate(pt_langs)]}
    nat = "/data/ntrex128"

    def map_cell(b, scale):
        d = {l: 0.2 * scale * (1 + j / 2) for j, l in enumerate(pt_langs)}
        ci = {l: [0.9 * v, 1.1 * v] for l, v in d.items()}
        summ = {m: {"disparity": 1.5 * scale, "disparity_ci": [1.2, 1.9], "degradation": d, "degradation_ci": ci,
                    "relative_width": 0.4, "width_per_token": 20.0, "resolved": True} for m in ("kl", "bpb")}
        return {"cell": f"{b}/channel/absmax", "bits": b, "granularity": "channel", "clipping": "absmax",
                "metric": "kl", "disparity": 1.5 * scale, "ci_low": 1.2, "ci_high": 1.9, "resolved": True,
                "degradation": d, "degradation_ci": ci, "summary": {**summ, "token_cost_ratio": 2.7}}

    dmap = {"experiment": "disparity_map", "metric": "kl",
            "provenance": _prov(model="gemma-3-270m", corpus=["udhr", nat], languages=pt_langs, reference=["eng_Latn"],
                                bits=[3, 4], granularity=["channel"], clipping=["absmax"], deployed="4/channel/absmax",
                                natural=nat),
            "disparity_map": {c: {"languages": pt_langs, "scored_tokens_per_pass": 538 * (1 + k),
                                  "baseline_bpb": {l: 1.0 + k / 4 for l in pt_langs},
                                  "cells": [map_cell(3, 1.0 + k), map_cell(4, 1.2 + k)]}
                              for k, c in enumerate(("udhr", nat))},
            "metric_cost": {c: {"median_token_cost_ratio": 2.7, "resolved_cells": {"kl": 2, "bpb": 1}} for c in ("udhr", nat)},
            "corpus_effects": {"rows": [{"corpus": c, "language": l, "baseline_bpb": 1.0 + k / 4,
                                         "familiarity": 0.8 if c == "udhr" else 1.0}
                                        for k, c in enumerate(("udhr", nat)) for l in pt_langs],
                               "spearman_degradation_vs_familiarity": -0.4, "spearman_degradation_vs_baseline_bpb": 0.2,
                               "across_corpora_spearman": {f"udhr vs {nat}": 0.5}},
            "strongest": {"udhr": ["4/channel/absmax"], nat: ["4/channel/absmax"]}, "timing": {"wall_seconds": 60.0}}
    def calib_cell(name, kind, worst, ref):
        setting, cal, cs = name.split("/")
        d = {l: ref if l == "eng_Latn" else worst * (0.5 + j / 8) for j, l in enumerate(pt_langs)}
        d[pt_langs[-1]] = worst
        return {"name": name, "kind": kind, "setting": setting, "calibrator": cal, "set": cs, "metric": "kl",
                "degradation": d, "degradation_ci": {l: [0.9 * v, 1.1 * v] for l, v in d.items()},
                "disparity": 1.3, "disparity_ci": [1.1, 1.5], "resolved": True, "worst_language": pt_langs[-1],
                "worst": worst, "worst_ci": [0.9 * worst, 1.1 * worst], "worst_unseen": worst,
                "reference_degradation": ref}

    lcal = {"experiment": "language_calibration", "metric": "kl",
            "provenance": _prov(model="gemma-3-270m", corpus=nat, settings=["a8-tensor", "a4-channel"], weight_bits=4),
            "heldout": pt_langs[:2], "scored_tokens_per_pass": 6100,
            "segments": {"calibration": {l: 16 for l in pt_langs}},
            "cells": [calib_cell("a8-tensor/max/en", "activation", 0.21, 0.1),
                      calib_cell("a8-tensor/mse/en", "activation", 0.15, 0.08),
                      calib_cell("a8-tensor/minimax/per_language", "activation", 0.12, 0.09),
                      calib_cell("a8-tensor/minimax/heldout", "activation", 0.13, 0.09),
                      calib_cell("a8-tensor/quanto/en", "library", 0.3, 0.12),
                      calib_cell("w4/imatrix_minimax/per_language", "weight", 0.4, 0.3)],
            "libraries": {"a8-tensor/quanto/en": {"library": "optimum-quanto", "version": "0.2.7"}},
            "verdict": {"a8-tensor/minimax/per_language": {
                "lower": ["a8-tensor/max/en"], "not_resolved": ["a8-tensor/mse/en"], "higher": [], "baselines": 2,
                "best_english_baseline": {"name": "a8-tensor/mse/en", "worst": 0.15, "diff": -0.03,
                                          "ci": [-0.05, 0.004], "reference_diff": 0.01, "reference_ci": [0.002, 0.02]}}}}
    return {"optimal_alpha": oa, "distributions": dist, "rate_distortion": rd, "disparity_map": dmap,
            "phase_transition": pt, "language_alpha": la, "language_calibration": lcal, **mechanism_results()}


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """Stand-in experiments (``tests/_standin.py``): each writes the synthetic result of its
    experiment; ``validate.all`` then applies the real module's ``macros`` to it."""
    tmp = tmp_path_factory.mktemp("standin")
    for name, doc in synthetic_results().items():
        (tmp / f"{name}.src.json").write_text(json.dumps(doc, allow_nan=True))
    here = str(Path(__file__).resolve().parent)
    saved = {k: os.environ.get(k) for k in ("LANGQUANT_STANDIN_DIR", "LANGQUANT_STANDIN_FAIL", "PYTHONPATH")}
    os.environ["LANGQUANT_STANDIN_DIR"] = str(tmp)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, saved["PYTHONPATH"]]))
    yield tmp, {name: "_standin" for name in synthetic_results()}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def standin_run(standins):
    tmp, modules = standins
    root = tmp / "results"
    stale = root / "phase_transition" / "stale_from_an_earlier_run.tex"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    rc = va.run_all(["--quick", "--out", str(root)], modules)
    return rc, root


# ---- fast tests ------------------------------------------------------------------------------------

def test_macro_names_and_numbers():
    assert latex.macro_name("RDGap", "student_t", 4) == "RDGapStudentTFour"
    assert latex.macro_name("PTBaselineBpb", "heb_Hebr") == "PTBaselineBpbHebHebr"
    assert latex.macro_name("X", 128, "q90") == "XOneTwoEightQNinety"
    assert latex.macro_name("123") == "OneTwoThree"
    for bad in ("", "_", "-+"):
        with pytest.raises(ValueError):
            latex.macro_name(bad)
    assert latex.format_number(5.028626) == "5.03"
    assert latex.format_number(0.0893313) == "0.0893"
    assert latex.format_number(15660.19) == "15660"
    assert latex.format_number(999.7) == "1000"
    assert latex.format_number(1.2117e-5) == r"\ensuremath{1.21\times 10^{-5}}"
    assert latex.format_number(-0.00106) == r"\ensuremath{-0.00106}"
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError):
            latex.format_number(bad)
    ms = latex.MacroSet()
    ms.add("PstarMeasured", 0.1, "a")
    with pytest.raises(ValueError, match="twice"):
        ms.add("PstarMeasured", 0.2, "b")
    assert latex.tex_text("a_b & 50% {x} \\ é") == r"a\_b \& 50\% \{x\} \textbackslash{} ?"


def test_all_writes_well_formed_macros_from_results(standin_run):
    rc, root = standin_run
    assert rc == 0
    macros = parse_macros((root / "macros.tex").read_text())
    assert len(macros) > 200
    numbers = {k: tex_number(v) for k, v in macros.items()}
    for name, value in macros.items():
        if value == latex.NA:
            continue
        x = numbers[name]
        assert x is None or math.isfinite(x), (name, value)
        assert "nan" not in value.lower() and "inf" not in value.lower(), (name, value)
    # values come from the JSONs
    # three significant digits
    assert macros["PstarMeasured"] == "0.134" and macros["PstarPredicted"] == "0.0893"
    assert numbers["PstarAbsDiff"] == pytest.approx(0.1336 - 0.0893, rel=1e-2)
    assert numbers["RsqCurve"] == pytest.approx(0.619, rel=1e-3)
    assert numbers["DisparityNone"] == pytest.approx(1.34, rel=1e-3)
    assert macros["DisparityNoneCILow"] == latex.NA  # None in the JSON: printed n/a, never a number
    assert numbers["OAAlphaTheoryLaplaceAciqFour"] == pytest.approx(5.03)
    assert numbers["DistTheorySpreadMedianRatio"] == pytest.approx(2.5)
    assert macros["DistTheoryPenaltyMedianPct"] == r"50\%"
    assert numbers["OARealPenaltyMedianFourPct"] == pytest.approx(0.0025, rel=1e-3)
    assert numbers["OARealBestFitStudentT"] == 3 and numbers["OARealBestFitGaussian"] == 0
    assert numbers["DistBestFitStudentT"] == 6 and numbers["DistBestFitGennorm"] == 3
    assert numbers["DistAlphaFallbacks"] == 6
    assert numbers["DistSpreadMaxRatio"] == pytest.approx(5.42)
    assert numbers["DistSpreadMedianRatio"] == pytest.approx((5.42 + 1.2) / 2, rel=1e-2)
    assert macros["DistSpreadMaxHighLanguage"] == r"heb\_Hebr"
    assert macros["DistTopChannelShareMedian"] == r"60\%" and macros["DistTopChannelShareMax"] == r"70\%"
    assert numbers["DistTopChannelShareMaxLayer"] == 2 and numbers["DistChannelsForHalfMedian"] == 2
    assert numbers["RDECSQGapBits"] == pytest.approx(0.255)
    assert numbers["RDLloydMaxMseGaussianOne"] == pytest.approx(0.363)
    assert numbers["RDGapUniformMaxFour"] == pytest.approx(1.2 + 0.4)
    assert macros["RDGapUniformMaxFourFamily"] == "lognormal"
    assert numbers["PTPassesCurve"] == 24 and numbers["PTTokensPerPass"] == 538
    assert macros["PTInteractionMaxLanguage"] == r"jpn\_Jpan" and numbers["PTInteractionMin"] == pytest.approx(0.96)
    assert numbers["DisparityBoundAtRateNone"] == pytest.approx(0.47) and numbers["PTBoundAbove"] == 4
    assert numbers["PTBaselineBpbHebHebr"] == pytest.approx(1.1)
    assert numbers["DisparityNoneKl"] == pytest.approx(1.59, rel=1e-2)
    assert numbers["DisparityNoneBpbCIHigh"] == pytest.approx(7.93)
    assert numbers["PTTokenCostRatio"] == pytest.approx(108) and macros["PTResolvedKl"] == "yes"
    assert macros["PTSelectedModel"] == "second order calibrated" and numbers["PTHeldOutPoints"] == 6
    assert numbers["RsqOOSSelected"] == pytest.approx(0.55) and numbers["RsqOOSAdditive"] == pytest.approx(0.5)
    assert macros["PTCrossingWithinOne"] == "yes" and numbers["PTPairPasses"] == 6
    assert macros["PTBestRanking"] == "the selected model's greedy ranking" and numbers["PTRankingPstarAbovePosition"] == pytest.approx(0.5)
    assert macros["PTRankingPstarPosition"] == latex.NA
    assert numbers["ZPSpearmanBest"] == pytest.approx(0.849) and macros["ZPBestVariant"] == "theory"
    assert numbers["ZPSpearmanBestMinLanguage"] == pytest.approx(0.73) and macros["ZPSpearmanActual"] == latex.NA
    assert macros["RunMode"] == "quick"
    assert numbers["LASpearman"] == pytest.approx(0.23)
    assert numbers["LAAlphaStarRelErrorPct"] == pytest.approx(0.417)
    assert macros["LAMostPenalised"] == r"eng\_Latn" and numbers["LAMostPenalisedMixPct"] == pytest.approx(0.07)
    assert numbers["LAWorstLayersHebHebr"] == 32
    assert macros["LAWorstMixTheory"] == latex.NA
    assert macros["CalibHeadlineSetting"] == "a8-tensor" and macros["CalibMinimaxWorstLanguage"] == "jpn"
    assert numbers["CalibMinimaxLower"] == 1 and numbers["CalibMinimaxBaselines"] == 2
    assert macros["CalibMinimaxBestBaseline"] == "a8-tensor/mse/en" and macros["CalibLibrary"] == "optimum-quanto"
    assert macros["CalibWeightedWorst"] == latex.NA
    # every timing of this run is a finite number of seconds
    for exp in synthetic_results():
        assert numbers[latex.macro_name("Time", exp)] >= 0


def test_manifest_lists_exactly_the_files_this_run_wrote(standin_run):
    rc, root = standin_run
    man = read_json(root / "manifest.json")
    assert man["quick"] is True and man["run_id"] and man["started_utc"]
    assert "git_commit" in man
    assert [e["status"] for e in man["experiments"]] == ["ok"] * len(synthetic_results())
    paths = {f["path"] for f in man["files"]}
    for exp in synthetic_results():
        assert f"{exp}/{exp}.json" in paths and f"{exp}/figure.png" in paths
        assert read_json(root / exp / f"{exp}.json")["quick_flag_seen"] is True
    assert {"macros.tex", "derivations.tex", "derivations/laplace_aciq.tex",
            "derivations/protection_sharpness.tex"} <= paths
    assert "phase_transition/stale_from_an_earlier_run.tex" not in paths
    assert "manifest.json" not in paths
    for f in man["files"]:
        data = (root / f["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"]
    assert "DisparityNoneCILow" in man["macros"]["unavailable"]
    assert man["macros"]["values"]["PstarMeasured"]["value"] == pytest.approx(0.13359602203336737)
    assert all(s["written_by_this_run"] for s in man["macros"]["sources"].values())


def test_derivations_are_latex_of_the_theory(standin_run):
    _, root = standin_run
    text = (root / "derivations" / "laplace_aciq.tex").read_text()
    assert r"\begin{align*}" in text and r"\end{align*}" in text
    assert "W" in text  # alpha* = b W(3 4^M)
    stems = {p.stem for p in (root / "derivations").glob("*.tex")}
    assert {"gaussian_aciq", "student_t_aciq_mse", "rate_distortion_gaussian", "protection_sharpness"} <= stems
    assert _balanced((root / "derivations.tex").read_text())


def test_a_failing_experiment_fails_the_run_by_name(standins, tmp_path, capfd, monkeypatch):
    _, modules = standins
    monkeypatch.setenv("LANGQUANT_STANDIN_FAIL", "distributions")
    root = tmp_path / "results"
    rc = va.run_all(["--out", str(root)], {**modules, "language_alpha": "validate.language_alpha_does_not_exist"})
    assert rc == 1
    err = capfd.readouterr().err
    assert "distributions" in err and "FAILED" in err
    man = read_json(root / "manifest.json")
    status = {e["name"]: e["status"] for e in man["experiments"]}
    assert status == {"optimal_alpha": "ok", "distributions": "failed", "rate_distortion": "ok",
                      "disparity_map": "ok", "phase_transition": "ok", "language_alpha": "failed",
                      "language_calibration": "ok", **{m: "ok" for m in MECHANISMS}}
    assert man["quick"] is False
    macros = parse_macros((root / "macros.tex").read_text())
    assert "PstarMeasured" in macros and not any(k.startswith(("Dist", "LA")) for k in macros)


def test_only_runs_the_named_experiment_and_reads_earlier_results(standins, standin_run, tmp_path):
    _, modules = standins
    _, first = standin_run
    root = tmp_path / "r"
    root.mkdir()
    (root / "phase_transition").mkdir()
    (root / "phase_transition" / "phase_transition.json").write_bytes(
        (first / "phase_transition" / "phase_transition.json").read_bytes())
    assert va.run_all(["--out", str(root), "--only", "rate_distortion"], modules) == 0
    man = read_json(root / "manifest.json")
    status = {e["name"]: e["status"] for e in man["experiments"]}
    assert status["rate_distortion"] == "ok" and status["optimal_alpha"] == "not_selected"
    assert man["macros"]["sources"]["phase_transition"]["written_by_this_run"] is False
    assert "PstarMeasured" in parse_macros((root / "macros.tex").read_text())


def test_pdf_without_latex_says_what_to_install(standins, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    rc = va.run_all(["--pdf", "--out", str(tmp_path / "r")], standins[1])
    assert rc == 2
    err = capsys.readouterr().err
    assert "latexmk" in err and "tectonic" in err and "apt-get install" in err
    assert not (tmp_path / "r" / "manifest.json").exists()  # failed before running anything


def test_pdf_builds_a_copy_of_the_paper_that_reads_the_results_root(standins, tmp_path, monkeypatch):
    """--pdf with a stand-in latexmk: the build runs in <root>/paper, whose \\resultsdir is the
    root, and the PDF lands in the manifest. (The real LaTeX build needs TeX installed.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "latexmk"
    fake.write_text("#!" + sys.executable + "\n"
                    "import pathlib, re, sys\n"
                    "assert sys.argv[-1] == 'main.tex' and '-pdf' in sys.argv\n"
                    "paths = pathlib.Path('paths.tex').read_text()\n"
                    "root = re.search(r'\\\\newcommand\\{\\\\resultsdir\\}\\{([^}]*)\\}', paths).group(1)\n"
                    "assert (pathlib.Path(root) / 'macros.tex').is_file(), root\n"
                    "assert pathlib.Path('sections/results.tex').is_file()\n"
                    "pathlib.Path('main.pdf').write_bytes(b'%PDF-1.5 stand-in')\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    root = tmp_path / "r"
    rc = va.run_all(["--pdf", "--out", str(root)], standins[1])
    assert rc == 0
    man = read_json(root / "manifest.json")
    assert man["pdf"]["status"] == "ok" and man["pdf"]["tool"] == "latexmk"
    assert "paper/main.pdf" in {f["path"] for f in man["files"]}
    assert r"\newcommand{\resultsdir}{../results}" in (PAPER / "paths.tex").read_text()  # source untouched


def test_paper_uses_only_macros_the_writer_can_produce(standin_run):
    """Every generated macro the .tex uses is produced from results shaped like the real ones,
    so a misspelt macro fails here, without running an experiment."""
    _, root = standin_run
    defined = set(parse_macros((root / "macros.tex").read_text()))
    used = used_generated_macros(paper_sources())
    assert {"PstarMeasured", "PstarPredicted", "RsqOOSSelected", "DisparityNone", "MapNaturalDeployedD"} <= used
    assert used - defined == set()


# ---- the CI check: the real quick run ------------------------------------------------------------------

@pytest.mark.slow
def test_quick_run_produces_every_file_and_macro_the_paper_uses(quick_results):
    root, man = quick_results
    assert man["quick"] is True
    status = {e["name"]: e["status"] for e in man["experiments"]}
    assert all(s == "ok" for s in status.values()), status
    written = {f["path"]: f for f in man["files"]}
    sources = paper_sources()
    inputs = generated_inputs(sources)
    assert ("includegraphics", "phase_transition/phase_transition.png") in inputs
    assert len(inputs) >= 15
    for cmd, rel in inputs:
        path = root / rel
        assert path.is_file(), f"the paper reads {rel} ({cmd}), which the run did not write"
        assert rel in written, f"{rel} exists but was not written by this run (not in its manifest)"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == written[rel]["sha256"]
    macros = parse_macros((root / "macros.tex").read_text())
    missing = used_generated_macros(sources) - set(macros)
    assert not missing, f"the paper uses macros that macros.tex does not define: {sorted(missing)}"
    for name, value in macros.items():
        x = tex_number(value)
        assert x is None or math.isfinite(x), (name, value)
    if man["pdf"] is not None:  # LaTeX installed (always under CI): the PDF built, with no
        assert man["pdf"]["status"] == "ok", man["pdf"]  # undefined reference or citation
        assert (root / "paper" / "main.pdf").read_bytes()[:5] == b"%PDF-"
        log = (root / "paper" / "main.log").read_text(errors="replace")
        assert not re.search(r"(Reference|Citation) `[^']*' .*undefined", log), "undefined references in the PDF"
