"""validate.disparity_map and validate.language_calibration on the executor (issue 18): a tiny-model
run in process and one on two local Ray actors give the same numbers, the driver runs no quantized
pass on Ray, a rerun after losing some cached passes computes only those, and a worker that
calibrates by itself finds the driver's thresholds (their digest names the pass in the cache).

The Ray tests share the session's local Ray of two CPUs (``ray_local`` in conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from validate._common import read_json

# in-process and Ray numbers are compared at equal torch thread counts (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _numbers(doc, drop=()):
    """The measured numbers of a result (everything but provenance, timing and ``drop``)."""
    return {k: v for k, v in doc.items() if k not in ("provenance", "timing", *drop)}


def _no_pass_here(monkeypatch):
    """Make a forward pass of the scoring engine in this process (the driver) fail the test."""
    from empirical.bpb import BpbEngine

    def no_pass(*a, **k):
        raise AssertionError("a pass ran in the driver")

    monkeypatch.setattr(BpbEngine, "score", no_pass)
    monkeypatch.setattr(BpbEngine, "record", no_pass)


def _pass_entries(cache: Path, *needles: str) -> list[Path]:
    """Cached scored passes (entries with a non-empty ``setting``) whose setting mentions a needle."""
    out = []
    for p in sorted(cache.glob("*.json")):
        cfg = json.loads(p.read_text())["config"]
        setting = cfg.get("setting")
        if setting and any(n in json.dumps(setting) for n in needles):
            out.append(p)
    return out


# ---- disparity_map ---------------------------------------------------------------------------------

def _folder_corpus(root: Path) -> Path:
    """A second, folder corpus (FLORES layout): UDHR segments 4-6 of each language, line-aligned."""
    from empirical.corpora import load_udhr

    c = load_udhr(["en", "he", "ja"])
    root.mkdir(parents=True)
    for lang in c.languages:
        (root / f"{lang}.dev").write_text("\n".join(c[lang][4:7]) + "\n", encoding="utf-8")
    return root


def _map_args(tmp_path):
    return ["--model", "tiny-llama", "--languages", "en", "he", "ja", "--segments", "2", "--max-length", "48",
            "--corpus", "udhr", str(_folder_corpus(tmp_path / "corpus")), "--bits", "2", "4",
            "--granularity", "channel", "group", "--group-size", "16", "--clipping", "absmax",
            "--bootstrap", "50"]


def test_disparity_map_on_ray_matches_in_process_and_resumes(ray_local, tmp_path, monkeypatch):
    from validate import disparity_map as dm

    args = _map_args(tmp_path)
    assert dm.main([*args, "--out", str(tmp_path / "serial")]) == 0
    with monkeypatch.context() as m:  # every baseline and cell of both corpora runs on the actors
        _no_pass_here(m)
        assert dm.main([*args, "--executor", "ray", "--workers", "2", "--out", str(tmp_path / "ray")]) == 0
    serial, remote = read_json(tmp_path / "serial/disparity_map.json"), read_json(tmp_path / "ray/disparity_map.json")
    assert _numbers(remote) == _numbers(serial)
    assert len(serial["disparity_map"]) == 2  # both corpora, four cells each
    assert all(len(pc["cells"]) == 4 and pc["packed"] is not None for pc in serial["disparity_map"].values())
    assert remote["provenance"]["executor"]["executor"] == "ray"
    assert remote["provenance"]["executor"]["workers"] == 2
    assert remote["timing"]["forward_passes_run"] == serial["timing"]["forward_passes_run"] == 2 * (1 + 4)

    # an interrupted map: two cells of the folder corpus and one of UDHR lost; a rerun on Ray
    # computes only those three
    cache = tmp_path / "ray/cache"
    folder = [p for p in _pass_entries(cache, "int2-") if "udhr" not in json.loads(p.read_text())["config"]["corpus"]]
    udhr = [p for p in _pass_entries(cache, "int4-") if json.loads(p.read_text())["config"]["corpus"] == "udhr"]
    dropped = folder[:2] + udhr[:1]
    assert len(dropped) == 3, [p.name for p in dropped]
    for p in dropped:
        p.unlink()
    with monkeypatch.context() as m:
        _no_pass_here(m)
        assert dm.main([*args, "--executor", "ray", "--workers", "2", "--out", str(tmp_path / "ray")]) == 0
    again = read_json(tmp_path / "ray/disparity_map.json")
    assert again["timing"]["forward_passes_run"] == 3
    assert _numbers(again) == _numbers(serial)
    # and a rerun with everything cached computes nothing, on Ray or in process
    assert dm.main([*args, "--executor", "ray", "--workers", "2", "--out", str(tmp_path / "ray")]) == 0
    assert read_json(tmp_path / "ray/disparity_map.json")["timing"]["forward_passes_run"] == 0


def test_disparity_map_worker_refuses_a_cell_or_corpus_outside_its_map(tmp_path):
    from validate import _protocol as protocol
    from validate import disparity_map as dm

    c = protocol.parse_config(dm, ["--model", "tiny-llama", "--languages", "en", "he", "--segments", "2",
                                   "--max-length", "32", "--bits", "4", "--granularity", "channel",
                                   "--clipping", "absmax", "--deployed", "4/channel/absmax"])[0]
    w = dm.cells_worker(c, None)
    with pytest.raises(ValueError, match="not among this map's corpora"):
        w.compute({"corpus": "elsewhere"})
    with pytest.raises(ValueError, match="3/channel/absmax is not among this map's cells"):
        w.compute({"corpus": "udhr", "cell": [3, "channel", "absmax"]})


# ---- language_calibration ---------------------------------------------------------------------------

LC = ["--model", "tiny-llama", "--languages", "en", "he", "ja", "--segments", "3", "--calib-segments", "2",
      "--max-length", "48", "--settings", "w8a8-tensor", "--calibrators", "max", "minimax",
      "--calibration-sets", "en", "mix", "per_language", "--weight-bits", "4", "--weight-methods", "absmax",
      "imatrix", "--libraries", "quanto", "--bootstrap", "50"]


def _lc_numbers(doc):
    """A language_calibration result's numbers; the exported thresholds by file name (the paths
    name the run's own folder)."""
    out = _numbers(doc, drop=("exported_thresholds",))
    out["exported"] = {k: Path(v).name for k, v in doc["exported_thresholds"].items()}
    return out


@pytest.fixture(scope="module")
def lc_runs(ray_local, tmp_path_factory):
    """The tiny configuration in process, then on two Ray actors with no pass allowed in the driver."""
    from validate import language_calibration as lc

    root = tmp_path_factory.mktemp("lc")
    assert lc.main([*LC, "--out", str(root / "serial")]) == 0
    with pytest.MonkeyPatch.context() as m:
        _no_pass_here(m)
        assert lc.main([*LC, "--executor", "ray", "--workers", "2", "--out", str(root / "ray")]) == 0
    return root, read_json(root / "serial/language_calibration.json"), read_json(root / "ray/language_calibration.json")


def test_language_calibration_on_ray_matches_in_process(lc_runs):
    from empirical.actquant import load_thresholds

    root, serial, remote = lc_runs
    assert _lc_numbers(remote) == _lc_numbers(serial)
    names = {c["name"] for c in serial["cells"]}
    assert {"w8a8-tensor/max/mix", "w8a8-tensor/max/per_language", "w8a8-tensor/minimax/per_language",
            "w4/absmax/none", "w4/imatrix/en", "w4/imatrix/mix"} <= names
    # cells with equal thresholds share one pass, computed once on Ray too
    by = {c["name"]: c for c in serial["cells"]}
    assert by["w8a8-tensor/max/mix"]["thresholds_digest"] == by["w8a8-tensor/max/per_language"]["thresholds_digest"]
    distinct = {c.get("thresholds_digest") or c["name"] for c in serial["cells"]}
    assert remote["timing"]["forward_passes_run"] == serial["timing"]["forward_passes_run"] == 1 + len(distinct)
    assert len(distinct) < len(serial["cells"])
    # the driver calibrated (it names the passes by their thresholds); the workers read its files
    assert remote["timing"]["thresholds_computed"] == serial["timing"]["thresholds_computed"] > 0
    assert remote["calibration_tokens"] == serial["calibration_tokens"] is not None
    assert remote["provenance"]["executor"]["executor"] == "ray"
    # the driver still writes the exported LA-ACIQ thresholds, the same bytes
    exp_s, exp_r = sorted((root / "serial/thresholds").glob("*")), sorted((root / "ray/thresholds").glob("*"))
    assert [p.name for p in exp_r] == [p.name for p in exp_s] and len(exp_s) == 1
    # same thresholds and metadata (not the same bytes: safetensors orders its header's metadata
    # differently in each process)
    (th_s, meta_s), (th_r, meta_r) = load_thresholds(exp_s[0]), load_thresholds(exp_r[0])
    assert meta_r == meta_s and meta_s["config"]["calibrator"] == "minimax"
    assert th_r.keys() == th_s.keys() and all(np.array_equal(th_r[k], th_s[k]) for k in th_s)
    lib = [c for c in serial["cells"] if c["kind"] == "library"]
    if lib:  # quanto installed: its cells ran on the actors and reported the same provenance
        assert remote["libraries"] == serial["libraries"]
        assert all(v.get("library") == "quanto" for k, v in remote["libraries"].items() if k.startswith("w8a8"))


def test_language_calibration_rerun_on_ray_computes_only_the_lost_passes(lc_runs, monkeypatch):
    from validate import language_calibration as lc

    root, serial, _ = lc_runs
    cache = root / "ray/cache"
    lost = _pass_entries(cache, "w4/imatrix/en")[:1] + _pass_entries(cache, '"thresholds"')[:1]
    assert len(lost) == 2
    for p in lost:
        p.unlink()
    with monkeypatch.context() as m:
        _no_pass_here(m)
        assert lc.main([*LC, "--executor", "ray", "--workers", "2", "--out", str(root / "ray")]) == 0
    again = read_json(root / "ray/language_calibration.json")
    assert again["timing"]["forward_passes_run"] == 2 and again["timing"]["thresholds_computed"] == 0
    # imatrix needed the calibration samples: the workers captured them and reported their tokens
    assert _lc_numbers(again) == _lc_numbers(serial)


def test_a_worker_that_calibrates_by_itself_finds_the_drivers_thresholds(lc_runs, ray_local):
    """On a machine that cannot see the driver's cache, a worker calibrates (its own samples,
    in another process) and must reach the same digests, or its passes would be cached under keys
    the driver never reads; it then scores the cell exactly as the driver did."""
    from validate import _protocol as protocol
    from validate import language_calibration as lc
    from validate._common import ResultCache

    root, serial, _ = lc_runs
    c = protocol.parse_config(lc, LC)[0]
    cell = next(x for x in lc.plan(c)[0] if x["name"] == "w8a8-tensor/minimax/per_language")
    digest = next(x for x in serial["cells"] if x["name"] == cell["name"])["thresholds_digest"]

    @ray_local.remote(num_cpus=1)
    def calibrate_elsewhere(c, cell, digest):
        import os

        w = lc.calibration_worker(c, None)  # reads nothing: calibrates itself
        digests = {}
        for x in lc.plan(c)[0]:
            if x["kind"] == "activation":
                digests[x["name"]] = w.cells.pass_of(dict(x))[0]["thresholds"]
        entries = w.compute({"cell": dict(cell), "thresholds": digest})
        wrong = None
        try:
            w.compute({"cell": dict(cell), "thresholds": "0" * 24})
        except RuntimeError as exc:
            wrong = str(exc)
        return digests, entries, w.b.calib.computed, os.getpid(), wrong

    digests, entries, computed, pid, wrong = ray_local.get(calibrate_elsewhere.remote(c, cell, digest))
    import os

    assert pid != os.getpid() and computed == len(digests) > 0
    assert digests == {x["name"]: x["thresholds_digest"] for x in serial["cells"] if x["kind"] == "activation"}
    assert wrong is not None and "digest" in wrong and digest in wrong
    serial_cache = ResultCache(root / "serial/cache")
    scored = [(cfg, res) for cfg, res in entries if cfg.get("setting", {}).get("thresholds") == digest]
    assert len(scored) == 1
    assert scored[0][1] == serial_cache.get(scored[0][0])


def test_language_calibration_worker_refuses_a_cell_outside_the_plan(tmp_path):
    from validate import _protocol as protocol
    from validate import language_calibration as lc

    c = protocol.parse_config(lc, [*LC, "--libraries", "none", "--weight-bits", "0"])[0]
    w = lc.calibration_worker(c, None)
    with pytest.raises(ValueError, match="not a cell of this run's plan"):
        w.compute({"cell": {"kind": "activation", "setting": "a4-tensor", "calibrator": "max", "set": "en",
                            "name": "a4-tensor/max/en"}, "thresholds": None})
