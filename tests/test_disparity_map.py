"""validate.disparity_map on a tiny model: cells, both metrics, corpus effects, caching."""

import json

import numpy as np
import pytest

from validate import _protocol as protocol
from validate import disparity_map as dm

ARGS = ["--model", "tiny-llama", "--languages", "en", "he", "ja", "--segments", "3", "--max-length", "64",
        "--bits", "2", "4", "--granularity", "channel", "group", "--group-size", "16", "--bootstrap", "100"]


def _run(out, extra=()):
    assert dm.main([*ARGS, *extra, "--out", str(out)]) == 0
    return json.loads((out / "disparity_map.json").read_text())


def test_map_cells_both_metrics_and_a_rerun_without_forward_passes(tmp_path):
    doc = _run(tmp_path / "m")
    pc = doc["disparity_map"]["udhr"]
    assert [c["cell"] for c in pc["cells"]] == [f"{b}/{g}/{k}" for b in (2, 4) for g in ("channel", "group")
                                                 for k in ("absmax", "sweep")]
    assert doc["timing"]["forward_passes_run"] == 1 + 8
    for c in pc["cells"]:
        s = c["summary"]
        assert c["metric"] == "kl" and c["disparity"] == s["kl"]["disparity"]
        assert c["resolved"] == (c["ci_low"] > 1 or c["ci_high"] < 1)
        # D is the mean over non-reference languages of d_l / d_ref (docs/design.md)
        d = c["degradation"]
        assert c["disparity"] == pytest.approx(np.mean([d["heb_Hebr"], d["jpn_Jpan"]]) / d["eng_Latn"])
        for l, v in c["kl_bpb"].items():  # KL bits per byte over baseline bpb is d^KL
            assert v / pc["baseline_bpb"][l] == pytest.approx(d[l], rel=1e-9)
        assert {"kl", "bpb", "token_cost_ratio", "top1_agreement"} <= set(s)
    for f in ("cells.csv", "corpus_effects.csv", "disparity_map_table.tex", "disparity_map.png", "strongest.png"):
        assert (tmp_path / "m" / f).stat().st_size > 0
    again = _run(tmp_path / "m")
    assert again["timing"]["forward_passes_run"] == 0
    for k in ("cells", "baseline_bpb", "scored_tokens_per_pass"):
        assert again["disparity_map"]["udhr"][k] == pc[k]
    ms = dm.macros(protocol.Result.from_json(doc))
    assert "MapUdhrDeployedD" in ms and "MapUdhrTokenCostRatio" in ms


def test_bpb_metric_and_coarser_cells_reuse_the_cache(tmp_path):
    """The primary metric is a reading of the same passes: switching it runs no new pass."""
    _run(tmp_path / "m")
    doc = _run(tmp_path / "m", ["--metric", "bpb"])
    assert doc["timing"]["forward_passes_run"] == 0
    for c in doc["disparity_map"]["udhr"]["cells"]:
        assert c["metric"] == "bpb" and c["disparity"] == c["summary"]["bpb"]["disparity"]


def test_corpus_effects_against_a_natural_corpus(tmp_path, ntrex_path):
    doc = _run(tmp_path / "m", ["--corpus", "udhr", str(ntrex_path), "--bits", "4", "--clipping", "absmax"])
    eff = doc["corpus_effects"]
    assert eff["natural_corpus"] == str(ntrex_path)
    rows = {(r["corpus"], r["language"]): r for r in eff["rows"]}
    for l in ("eng_Latn", "heb_Hebr", "jpn_Jpan"):
        nat = rows[(str(ntrex_path), l)]
        assert nat["familiarity"] == pytest.approx(1.0)
        u = rows[("udhr", l)]
        assert u["familiarity"] == pytest.approx(u["baseline_bpb"] / nat["baseline_bpb"])
    assert "udhr vs " + str(ntrex_path) in eff["across_corpora_spearman"]


@pytest.mark.parametrize("argv, needle", [
    (["--bits", "1"], "--bits"), (["--granularity", "row"], "--granularity"),
    (["--deployed", "3/channel/absmax"], "--deployed"), (["--natural", "/nowhere"], "--natural"),
    (["--corpus", "udhr", "udhr"], "twice"), (["--corpus", "/no/such/dir"], "--corpus"),
])
def test_bad_flags_refused_with_one_line(argv, needle, capsys):
    assert dm.main([*ARGS, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_validate_all_passes_a_natural_corpus_to_the_map_in_full_runs_only(tmp_path):
    from validate import all as va

    assert va.natural_args("validate.disparity_map", tmp_path, quick=False) == [
        "--corpus", "udhr", str(tmp_path), "--segments", str(dm.NATURAL_SEGMENTS)]
    assert va.natural_args("validate.disparity_map", tmp_path, quick=True) == []
    assert va.natural_args("validate.disparity_map", None, quick=False) == []
    assert va.natural_args("validate.rate_distortion", tmp_path, quick=False) == []  # no hook
    with pytest.raises(SystemExit):
        va.parse_args(["--natural", str(tmp_path / "missing")], ["disparity_map"])


def test_macros_define_both_corpora_even_when_one_was_not_run(tmp_path):
    """The paper quotes the embedded and the natural corpus; a run without the latter leaves its
    macros n/a instead of undefined."""
    doc = _run(tmp_path / "m", ["--bits", "4", "--granularity", "channel", "--clipping", "absmax"])
    ms = dm.macros(protocol.Result.from_json(doc))
    assert ms["MapUdhrDeployedD"].available and not ms["MapNaturalDeployedD"].available
    assert ms["MapUdhrDeployedD"].value == doc["disparity_map"]["udhr"]["cells"][0]["disparity"]
