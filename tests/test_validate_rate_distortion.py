"""End-to-end smoke test of ``python -m validate.rate_distortion --quick``."""

from __future__ import annotations

import csv
import json
import math

import pytest

from validate import rate_distortion as exp


def _numbers(obj, path="$"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_quick_run(tmp_path):
    out = tmp_path / "rd"
    assert exp.main(["--quick", "--out", str(out), "--bits", "1", "3", "4", "--samples", "20000",
                     "--seed", "3"]) == 0
    on_disk = json.loads((out / "rate_distortion.json").read_text())
    assert on_disk["experiment"] == "rate_distortion"
    prov = on_disk["provenance"]
    assert prov["config"]["samples"] == 20000 and prov["config"]["seed"] == 3
    assert prov["config"]["bits"] == [1, 3, 4]
    assert "git_commit" in prov and "packages" in prov
    assert on_disk["ecsq_gap_bits"] == pytest.approx(0.2546, abs=1e-4)
    fams = on_disk["families"]
    assert [f["family"] for f in fams] == list(exp.Config().families)
    for f in fams:
        assert f["grid"] == ("uint" if f["family"] == "lognormal" else "midrise")
        assert [r["bits"] for r in f["rows"]] == [1, 3, 4]
        for r in f["rows"]:
            for k in ("d_slb", "d_panter_dite", "d_lloyd_max", "d_uniform_theory",
                      "d_uniform_swept", "gap_uniform_bits", "gap_lloyd_max_bits", "gap_swept_bits"):
                assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r)
            assert r["d_slb"] <= r["d_lloyd_max"] <= r["d_uniform_theory"] * (1 + 1e-9)
            assert 0 <= r["gap_lloyd_max_bits"] <= r["gap_uniform_bits"] + 1e-9
            # the swept minimum is fitted to the sample: close to theory, not above the bound
            assert r["d_uniform_swept"] > r["d_slb"]
            assert abs(math.log(r["d_uniform_swept"] / r["d_uniform_theory"])) < 0.5  # heavy tails, 2e4 samples
    assert set(on_disk["gap_at_4_bits"]) == set(exp.Config().families)
    assert all(math.isfinite(v) for _, v in _numbers(on_disk))
    for name in ("rate_distortion.csv", "gap_table.tex", "d_vs_r.png"):
        assert (out / name).stat().st_size > 0
    with open(out / "rate_distortion.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 * 3
    tex = (out / "gap_table.tex").read_text()
    assert r"\begin{tabular}" in tex and "Lloyd-Max" in tex
    # a rerun reads every family from the cache and writes the same numbers
    assert exp.main(["--quick", "--out", str(out), "--bits", "1", "3", "4", "--samples", "20000",
                     "--seed", "3"]) == 0
    again = json.loads((out / "rate_distortion.json").read_text())
    assert again["families"] == on_disk["families"]
    assert len(list((out / "cache").glob("*.json"))) == 5


def test_theory_only_and_bad_args(tmp_path, capsys):
    res = exp.run(exp.Config(bits=(2,), samples=0, families=("laplace",)))
    row = res["families"][0]["rows"][0]
    assert row["d_uniform_swept"] is None and row["gap_uniform_bits"] > 0
    for argv in (["--samples", "10"], ["--families", "cauchy"], ["--bits", "0"]):
        assert exp.main(["--out", str(tmp_path / "x"), *argv]) == 2
    assert not (tmp_path / "x").exists()  # refused before any work

