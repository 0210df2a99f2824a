"""validate.distributions end to end on a tiny model; the channel-energy summary against numpy; bad
flags refused before any work; macros equal on the fresh and the reloaded result."""

import json
import math

import numpy as np
import pytest

from conftest import assert_refused

from validate import _protocol as protocol
from validate._common import ResultCache
from validate import distributions

ARGV = ["--model", "tiny-llama", "--quick", "--languages", "eng", "heb", "zho_Hans", "--max-segments", "3"]


def test_quick_run_on_tiny_model(tmp_path, monkeypatch):
    assert distributions.main([*ARGV, "--out", str(tmp_path)]) == 0
    for f in ["kurtosis_heatmap.png", "kurtosis_heatmap.pdf", "best_fit_families.tex",
              "alpha_spread.tex", "channel_energy.png", "channel_energy.csv", "distributions.csv",
              "distributions.json"]:
        assert (tmp_path / f).stat().st_size > 0
    data = json.loads((tmp_path / "distributions.json").read_text())
    assert data["experiment"] == "distributions"
    cfg = data["provenance"]["config"]
    assert cfg["model"] == "tiny-llama" and cfg["include_bos"] is False
    assert cfg["languages"] == ["eng_Latn", "heb_Hebr", "zho_Hans"] == data["corpus"]["languages"]
    assert cfg["reservoir"] == 2048 and cfg["max_segments"] == 3  # --quick, then the explicit flag
    rows = data["rows"]
    assert len(rows) == 2 * 3  # 2 blocks x 3 languages, residual stream
    for r in rows:
        assert r["best_family"] in {"gaussian", "laplace", "gennorm", "student_t"}
        assert r["alpha_star"] > 0 and math.isfinite(r["excess_kurtosis"])
        assert r["alpha_family"] in {"gaussian", "laplace", "gennorm", "student_t"}
        # the sweep's optimum is the minimum of the sample's MSE: theory's alpha* cannot beat it
        assert r["theory_penalty"] >= -1e-9
        assert 0 < r["alpha_swept"] <= r["absmax"] * (1 + 1e-6)
        assert 0 <= r["top_channel"] < 64 and 1 / 64 <= r["top_channel_share"] <= 1
        assert 1 <= r["channels_for_half"] <= 32
    spread = data["alpha_spread"]
    assert [d["ratio"] for d in spread] == sorted((d["ratio"] for d in spread), reverse=True)
    for d in spread:
        swept = {r["language"]: r["alpha_swept"] for r in rows if r["site"] == d["site"]}
        assert d["ratio"] == pytest.approx(max(swept.values()) / min(swept.values()))
        assert d["max_alpha"] == max(swept.values()) and d["min_alpha"] == min(swept.values())
        assert d["theory_ratio"] >= 1.0
    # channel energy: per layer one row per language (the same numbers as its row) and the pool
    energy = data["channel_energy"]
    assert len(energy) == 2 * (3 + 1)
    for e in energy:
        assert e["channels"] == 64
        if e["language"] == "all":
            per = [x for x in energy if x["site"] == e["site"] and x["language"] != "all"]
            # pooled: a weighted mean of the languages' shares of that channel, so it is no
            # larger than the largest language's top share
            assert e["top_share"] <= max(x["top_share"] for x in per) + 1e-12
            continue
        r = next(r for r in rows if r["site"] == e["site"] and r["language"] == e["language"])
        assert (e["top_channel"], e["top_share"], e["channels_for_half"]) == (
            r["top_channel"], r["top_channel_share"], r["channels_for_half"])
    # macros: the same on the fresh result and on the JSON read back, values from the result
    assert cfg.pop("quick") is True
    res = distributions.run(distributions.Config(**{**cfg, "languages": tuple(cfg["languages"])}),
                            cache=ResultCache(tmp_path / "cache"))
    assert res.timing["languages_captured_now"] == 0  # every language from the cache
    distributions.write(res, tmp_path / "again")
    a = distributions.macros(res)
    for path in (tmp_path / "distributions.json", tmp_path / "again" / "distributions.json"):
        b = distributions.macros(protocol.Result.load(path))
        assert {m.name: m.tex() for m in a} == {m.name: m.tex() for m in b}
    pooled = [e for e in energy if e["language"] == "all"]
    top = max(pooled, key=lambda e: e["top_share"])
    assert a["DistTopChannelShareMedian"].value == pytest.approx(np.median([e["top_share"] for e in pooled]))
    assert a["DistTopChannelShareMax"].value == top["top_share"]
    assert a["DistTopChannelShareMaxLayer"].value == top["layer"]
    assert a["DistTopChannelShareMax"].tex().endswith(r"\%")
    assert a["DistNumLanguages"].value == 3 and a["DistNumFits"].value == 6
    assert a["DistBestFitStudentT"].value == sum(r["best_family"] == "student_t" for r in rows)
    # a rerun reads every language from the cache: no model is loaded
    import empirical.models

    monkeypatch.setattr(empirical.models, "load_model", lambda *a, **k: pytest.fail("model loaded again"))
    assert distributions.main([*ARGV, "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "distributions.json").read_text())
    assert again["rows"] == rows and again["channel_energy"] == energy


def test_channel_energy_rows_against_numpy():
    rng = np.random.default_rng(0)
    sq = {l: rng.uniform(1, 2, 16) for l in ("eng_Latn", "heb_Hebr")}
    sq["eng_Latn"][3] = 40.0   # a planted outlier in one language only
    sq["heb_Hebr"][3] = 0.5
    am = {l: np.sqrt(v) for l, v in sq.items()}
    items = {l: {"channel_sumsq": {"L5": sq[l]}, "channel_absmax": {"L5": am[l]}} for l in sq}
    rows = [{"site": "L5", "layer": 5, "language": l} for l in sq]
    out = {e["language"]: e for e in distributions.channel_energy_rows(items, rows)}
    assert set(out) == {"eng_Latn", "heb_Hebr", "all"}
    total = sq["eng_Latn"] + sq["heb_Hebr"]
    share = np.sort(total)[::-1] / total.sum()
    half = int(np.argmax(np.cumsum(share) >= 0.5)) + 1
    assert out["all"]["top_channel"] == 3 and out["all"]["layer"] == 5
    assert out["all"]["top_share"] == pytest.approx(40.5 / total.sum())
    assert out["all"]["channels_for_half"] == half
    assert out["all"]["top_absmax"] == pytest.approx(max(am["eng_Latn"][3], am["heb_Hebr"][3]))
    assert out["eng_Latn"]["top_share"] == pytest.approx(40.0 / sq["eng_Latn"].sum())
    assert out["eng_Latn"]["channels_for_half"] == 1
    assert out["heb_Hebr"]["top_channel"] == int(np.argmax(sq["heb_Hebr"]))


@pytest.mark.parametrize("argv, flag", [
    (["--bits", "0"], "--bits"), (["--bits", "17"], "--bits"), (["--grid", "foo"], "--grid"),
    (["--grid", "uint"], "--grid"), (["--corpus", "/nonexistent/corpus"], "--corpus"),
    (["--languages", "eng", "xx_Qqqq"], "--languages"), (["--languages", "eng", "en"], "--languages"),
    (["--model", "/nonexistent/model"], "--model"), (["--reservoir", "10"], "--reservoir"),
    (["--max-segments", "0"], "--max-segments"), (["--top", "0"], "--top"),
    (["--excess-bits", "0"], "--excess-bits: "), (["--excess-bits", "4", "4"], "--excess-bits"),
    (["--top-k", "-1"], "--top-k"),
])
def test_bad_flags_refused_before_any_work(tmp_path, capsys, argv, flag):
    assert_refused(distributions.main, argv, tmp_path / "out", flag, capsys)


def test_cuda_refused_without_a_device(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert_refused(distributions.main, ["--device", "cuda"], tmp_path / "out", "--device cuda", capsys)


def test_default_languages_dropped_when_missing(ntrex_path, tmp_path):
    c = distributions._load_corpus(str(ntrex_path), ["eng_Latn", "yor_Latn", "heb_Hebr"], strict=False)
    assert set(c.languages) == {"eng_Latn", "heb_Hebr"}
    with pytest.raises(ValueError, match="yor"):
        distributions._load_corpus(str(ntrex_path), ["eng_Latn", "yor_Latn"], strict=True)


def test_default_list_is_lenient_and_an_explicit_one_strict():
    assert not distributions.Config().strict_languages
    assert not distributions.Config.quick().strict_languages
    assert distributions.Config(languages=("eng", "heb")).strict_languages


@pytest.mark.slow
def test_quick_run_on_the_real_embedded_model(quick_results):
    """``python -m validate.distributions --quick`` on gemma-3-270m (run by validate.all): the
    residual stream's energy sits in a few channels."""
    root, _ = quick_results
    data = json.loads((root / "distributions" / "distributions.json").read_text())
    assert "dequantized" in data["note"]
    pooled = [e for e in data["channel_energy"] if e["language"] == "all"]
    assert len(pooled) == 18 and all(e["channels"] == 640 for e in pooled)
    shares = [e["top_share"] for e in pooled]
    assert all(1 / 640 <= s <= 1 for s in shares)
    # far from an even spread (a channel's fair share is 1/640)
    assert np.median(shares) > 20 / 640
    # site models (issue #14): the channel structure moves alpha* to where the sweep puts it
    ex = data["alpha_excess_mse"]["residual"]
    assert ex["selected"]["4"]["n"] == 18 * 3
    assert ex["selected"]["4"]["median"] < 0.05 < 1.0 < ex["unimodal"]["4"]["median"]
    assert set(data["penalty_spearman"]) >= {"unimodal", "selected", "bulk_outlier"}
    assert {g["goal"] for g in data["goals"]} >= {"residual: median extra MSE <= 0.02"}


# ---- site models: summaries of the extra MSE and of the per-language penalties ---------------------

def _excess_row(kind, lang, site, values):
    return {"site": site, "kind": kind, "layer": 0, "language": lang,
            "excess": [{"bits": b, "model": m, "excess": v} for (b, m), v in values.items()]}


def test_alpha_excess_summary_quantiles_against_numpy():
    rng = np.random.default_rng(0)
    vals = rng.exponential(0.03, size=40)
    rows = [_excess_row("residual", f"l{i}", "s", {(4, "selected"): float(v), (4, "unimodal"): float(10 * v)})
            for i, v in enumerate(vals)]
    rows.append(_excess_row("residual", "bad", "s", {(4, "selected"): None}))
    s = distributions.alpha_excess_summary(rows)["residual"]
    sel = s["selected"]["4"]
    assert sel["n"] == 40 and sel["failed"] == 1
    assert sel["median"] == pytest.approx(np.median(vals))
    assert sel["q90"] == pytest.approx(np.quantile(vals, 0.9))
    assert sel["share_within_5pct"] == pytest.approx(np.mean(vals <= 0.05))
    assert s["unimodal"]["4"]["median"] == pytest.approx(10 * np.median(vals))


def test_language_penalties_on_the_common_grid():
    """Two languages with parabolic log-curves centred 1 grid point apart per language: the mix
    alpha (equal weights) lies between them and each pays its own curve's excess there."""
    step = distributions.CURVE_STEP
    grid = np.arange(-30, 31)
    rows = []
    for lang, centre, start in (("a", 0, -30), ("b", 12, -20)):
        x = np.arange(start, start + 61)
        curve = 1.0 + 0.01 * (x - centre) ** 2
        rows.append({"site": "s", "kind": "residual", "layer": 3, "language": lang,
                     "curves": {"start": int(start), "measured": curve.tolist(),
                                "selected": (2.0 * curve).tolist()}})
    pen = distributions.language_penalties(rows, {"a": 1.0, "b": 1.0})
    meas = {p["language"]: p for p in pen if p["model"] == "measured"}
    assert meas["a"]["alpha_mix"] == pytest.approx(10 ** (6 * step))
    assert meas["a"]["penalty"] == pytest.approx(0.01 * 36)
    assert meas["b"]["penalty"] == pytest.approx(0.01 * 36)
    agree = distributions.penalty_agreement(pen + [
        {**p, "site": "t", "penalty": p["penalty"] * (2 if p["language"] == "a" else 1)}
        for p in pen])
    # the model's curves are the measured ones doubled: identical penalties, same worst language
    assert agree["selected"]["spearman"] == pytest.approx(1.0)
    assert agree["selected"]["same_worst_language_share"] == 1.0


def test_goals_report_met_and_missed():
    excess = {"residual": {"selected": {"4": {"median": 0.01, "share_within_5pct": 0.8}}}}
    g = {x["goal"]: x for x in distributions.goals(excess, {"selected": {"spearman": 0.85}})}
    assert g["residual: median extra MSE <= 0.02"]["met"] is True
    assert g["residual: share within 5% >= 0.9"]["met"] is False
    assert g["penalty Spearman >= 0.8"]["met"] is True


def test_language_penalties_between_grid_points():
    """The mix alpha and the minima are located between grid points (a parabola through the three
    nearest): centres 11 points apart put the equal-weight mix half-way between two grid points,
    and each language pays 0.01 x 5.5^2 on its own parabola."""
    rows = []
    for lang, centre in (("a", 0), ("b", 11)):
        x = np.arange(-30, 31)
        rows.append({"site": "s", "kind": "linear_input", "layer": 0, "language": lang,
                     "curves": {"start": -30, "measured": (1.0 + 0.01 * (x - centre) ** 2).tolist()}})
    pen = {p["language"]: p for p in distributions.language_penalties(rows, {"a": 1.0, "b": 1.0})}
    assert pen["a"]["penalty"] == pytest.approx(0.01 * 5.5**2, rel=1e-12)
    assert pen["b"]["penalty"] == pytest.approx(0.01 * 5.5**2, rel=1e-12)
    assert pen["a"]["alpha_mix"] == pytest.approx(10 ** (5.5 * distributions.CURVE_STEP))


def test_penalty_reliability_of_the_halves():
    """Halves that rank the languages alike give split-half Spearman 1 (and Spearman-Brown 1);
    reversed rankings give -1 and no step-up."""
    def rows(order2):
        out = []
        for site in ("s", "t"):
            for i, lang in enumerate("abcd"):
                out.append({"site": site, "kind": "residual", "language": lang, "model": "measured_half1",
                            "penalty": 0.01 * (i + 1)})
                out.append({"site": site, "kind": "residual", "language": lang, "model": "measured_half2",
                            "penalty": 0.01 * (order2(i) + 1)})
        return out

    same = distributions.penalty_reliability(rows(lambda i: i))
    assert same["spearman_halves"] == pytest.approx(1.0) and same["spearman_brown"] == pytest.approx(1.0)
    assert same["n"] == 8 and same["by_kind"]["residual"]["n"] == 8
    rev = distributions.penalty_reliability(rows(lambda i: 3 - i))
    assert rev["spearman_halves"] == pytest.approx(-1.0) and rev["spearman_brown"] is None


def test_alpha_distance_summary():
    rows = [{"kind": "residual", "excess": [{"bits": 4, "model": "m", "alpha": a, "alpha_swept": 2.0}]}
            for a in (1.0, 2.0, 3.0, 5.0)]
    assert distributions.alpha_distance_summary(rows)["residual"]["m"]["4"] == pytest.approx(0.5)
