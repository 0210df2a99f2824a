"""The mechanism experiments' passes on the executors (validate._executor, issue 18): the shared
single-block damage (validate._mechanisms), residual_ablation, outliers and cross_architecture run
on two local Ray workers give exactly the numbers of the in-process run, run no scored pass in the
driver, and a rerun after some cache entries are lost computes only those. cross_architecture hands
the target's passes to the workers only after its prediction is written.

Uses the session's local Ray of two CPUs (``ray_local`` in conftest.py; skipped where Ray is not
installed, except under CI).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

from validate._common import ResultCache, read_json
from validate._executor import RayExecutor, using

# in-process and Ray numbers are compared at equal torch thread counts (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "tiny-llama", "--languages", "en", "he", "ja", "--segments", "2", "--max-length", "32",
        "--bootstrap", "50"]
RAY = ["--executor", "ray", "--workers", "2"]
#: fields that say when (and at which commit) a run happened, not what it measured
WALL = {"recorded_at", "measured_at", "seconds", "git_commit"}


def _scrub(doc, drop):
    if isinstance(doc, dict):
        return {k: _scrub(v, drop) for k, v in doc.items() if k not in drop}
    if isinstance(doc, list):
        return [_scrub(v, drop) for v in doc]
    return doc


def numbers(doc, drop=()):
    """A result document's measured numbers: no provenance, timing or wall-clock field (nor ``drop``)."""
    return _scrub({k: v for k, v in doc.items() if k not in ("provenance", "timing")}, WALL | set(drop))


@contextlib.contextmanager
def no_scored_pass_in_driver(monkeypatch):
    """Every BpbEngine pass (baseline record, scored pass) must run on the workers."""
    from empirical.bpb import BpbEngine

    def refuse(*a, **k):
        raise AssertionError("a scored pass ran in the driver")

    with monkeypatch.context() as m:
        m.setattr(BpbEngine, "score", refuse)
        m.setattr(BpbEngine, "record", refuse)
        yield


def entries(folder: Path, where) -> list[Path]:
    """The cache files in ``folder`` whose stored configuration satisfies ``where``."""
    return sorted(p for p in Path(folder).glob("*.json") if where(json.loads(p.read_text())["config"]))


def run_main(module, args, out: Path, ray: bool, monkeypatch=None) -> dict:
    with (no_scored_pass_in_driver(monkeypatch) if ray else contextlib.nullcontext()):
        assert module.main([*args, *(RAY if ray else []), "--out", str(out)]) == 0
    return read_json(out / f"{module.EXPERIMENT}.json")


# ---- the shared single-block damage -----------------------------------------------------------------

def test_block_damage_on_ray_matches_in_process_and_recomputes_only_lost_passes(ray_local, tmp_path, monkeypatch):
    from validate._mechanisms import MechanismConfig, block_damage, setup

    c = MechanismConfig(model="tiny-llama", languages=("en", "he", "ja"), segments=2, max_length=32, bootstrap=50)
    serial = block_damage(setup(c), ResultCache(tmp_path / "serial" / "x" / "cache"), progress=False)
    shared = tmp_path / "ray" / "_shared" / "block_damage"
    with RayExecutor(workers=2) as ex, using(ex):
        with no_scored_pass_in_driver(monkeypatch):
            remote = block_damage(setup(c), ResultCache(tmp_path / "ray" / "x" / "cache"), progress=False)
        assert serial.passes_run == remote.passes_run == 3  # baseline and two blocks, counted alike
        np.testing.assert_array_equal(remote.kl, serial.kl)
        np.testing.assert_array_equal(remote.bpb, serial.bpb)
        assert remote.baseline_bpb == serial.baseline_bpb and remote.tokens == serial.tokens
        # the workers' entries went into the shared cache: the baseline and each block
        settings = sorted(json.dumps(json.loads(p.read_text())["config"]["setting"]) for p in shared.glob("*.json"))
        assert settings == ['{"quantized": ["block0"]}', '{"quantized": ["block1"]}', "{}"]
        # a lost pass: only it is computed again, on the workers, by another experiment's setup
        lost = entries(shared, lambda k: k["setting"] == {"quantized": ["block1"]})
        assert len(lost) == 1
        lost[0].unlink()
        with no_scored_pass_in_driver(monkeypatch):
            again = block_damage(setup(c), ResultCache(tmp_path / "ray" / "y" / "cache"), progress=False)
    assert again.passes_run == 1
    np.testing.assert_array_equal(again.kl, serial.kl)


# ---- residual_ablation ---------------------------------------------------------------------------

def test_residual_ablation_on_ray_matches_in_process_and_resumes(ray_local, tmp_path, monkeypatch):
    from validate import residual_ablation as ra

    serial = run_main(ra, TINY, tmp_path / "serial" / ra.EXPERIMENT, ray=False)
    out = tmp_path / "ray" / ra.EXPERIMENT
    remote = run_main(ra, TINY, out, ray=True, monkeypatch=monkeypatch)
    assert numbers(remote) == numbers(serial)
    # means (in the driver), baseline, 2 blocks x 2 modes; and the block damage's 3 passes
    assert remote["passes_run"] == serial["passes_run"] == 6
    assert remote["block_damage_passes_run"] == serial["block_damage_passes_run"] == 3
    assert remote["provenance"]["executor"]["executor"] == "ray" and remote["provenance"]["executor"]["workers"] == 2
    # lose two ablation passes (one per mode) and the baseline: only these three are computed again
    lost = [*entries(out / "cache", lambda k: k.get("item") == "ablation" and k["block"] == 1),
            *entries(out / "cache", lambda k: k.get("item") == "baseline")]
    assert len(lost) == 3
    for p in lost:
        p.unlink()
    again = run_main(ra, TINY, out, ray=True, monkeypatch=monkeypatch)
    assert again["passes_run"] == 3 and again["block_damage_passes_run"] == 0
    counts = {"passes_run", "block_damage_passes_run"}
    assert numbers(again, counts) == numbers(serial, counts)


def test_ablation_worker_refuses_bad_payloads(tmp_path):
    from validate import residual_ablation as ra

    c = ra.Config(model="tiny-llama", languages=("en", "he", "ja"), segments=2, max_length=32, bootstrap=50)
    w = ra.ablation_worker(c, None)
    with pytest.raises(ValueError, match="unknown ablation 'half'"):
        w.compute({"item": "ablation", "block": 0, "mode": "half"})
    with pytest.raises(ValueError, match="block 2 out of range: the model has 2 blocks"):
        w.compute({"item": "ablation", "block": 2, "mode": "zero"})
    with pytest.raises(ValueError, match="unknown item 'means'"):
        w.compute({"item": "means"})


# ---- outliers ------------------------------------------------------------------------------------

# low thresholds, as tests/test_outliers.py: the tiny model then has "super weights" to restore and hold out
OUTLIERS = [*TINY, "--sink-eps", "0.1", "--super-threshold", "0.001", "--super-max-iter", "1"]


def test_outliers_on_ray_matches_in_process_and_resumes(ray_local, tmp_path, monkeypatch):
    from validate import outliers

    serial = run_main(outliers, OUTLIERS, tmp_path / "serial" / outliers.EXPERIMENT, ray=False)
    assert serial["super_weights"]["weights"], "the low threshold must find super weights"
    out = tmp_path / "ray" / outliers.EXPERIMENT
    remote = run_main(outliers, OUTLIERS, out, ray=True, monkeypatch=monkeypatch)
    assert numbers(remote) == numbers(serial)
    # baseline, all-quantized, restore, holdout; then the two single-block passes
    assert remote["passes"]["scored"] == serial["passes"]["scored"] == 4
    assert remote["passes"]["block_damage"] == serial["passes"]["block_damage"] == 2
    # lose the holdout pass and one single-block pass: only these two are computed again
    lost = [*entries(out / "cache", lambda k: k.get("setting", {}).get("mode") == "holdout"),
            *entries(tmp_path / "ray" / "_shared" / "block_damage",
                     lambda k: k["setting"] == {"quantized": ["block0"]})]
    assert len(lost) == 2
    for p in lost:
        p.unlink()
    again = run_main(outliers, OUTLIERS, out, ray=True, monkeypatch=monkeypatch)
    assert again["passes"] == {"hooks": 0, "scored": 1, "block_damage": 1, "total": 2}
    assert numbers(again, {"passes", "passes_run"}) == numbers(serial, {"passes", "passes_run"})


def test_super_weight_worker_refuses_bad_payloads():
    from validate import outliers
    from validate._mechanisms import MechanismConfig

    c = MechanismConfig(model="tiny-llama", languages=("en", "he", "ja"), segments=2, max_length=32, bootstrap=50)
    w = outliers.super_weight_worker(c, None, None)
    with pytest.raises(ValueError, match="unknown super-weight mode 'keep'"):
        w.compute({"weights": [], "mode": "keep"})
    with pytest.raises(ValueError, match="layers the quantizer does not know"):
        w.compute({"weights": [{"name": "lm_head", "row": 0, "column": 0}], "mode": "restore"})


# ---- cross_architecture -------------------------------------------------------------------------

def test_cross_architecture_on_ray_matches_in_process_with_the_prediction_first(ray_local, tmp_path, monkeypatch):
    from validate import cross_architecture as xa

    args = [*TINY, "--target", "tiny-gemma"]
    serial = run_main(xa, args, tmp_path / "serial" / xa.EXPERIMENT, ray=False)
    out = tmp_path / "ray" / xa.EXPERIMENT
    maps = []  # (models whose passes a grid holds, whether prediction.json existed when it was handed out)
    real = RayExecutor.map

    def spy(self, spec, tasks, **kw):
        maps.append(({t.key.get("model") for t in tasks}, (out / "prediction.json").exists()))
        return real(self, spec, tasks, **kw)

    monkeypatch.setattr(RayExecutor, "map", spy)
    remote = run_main(xa, args, out, ray=True, monkeypatch=monkeypatch)
    assert numbers(remote) == numbers(serial)
    assert remote["timing"]["forward_passes_run"] == serial["timing"]["forward_passes_run"]
    assert remote["prediction_before_measurement"] is True
    assert remote["prediction"]["recorded_at"] <= remote["target"]["measured_at"]
    # both models' passes went to the workers, the target's only once the prediction was on disk
    target = [existed for models, existed in maps if "tiny-gemma" in models]
    assert target and all(target)
    assert any(models == {"tiny-llama"} and not existed for models, existed in maps)
    assert all(len(models) == 1 for models, _ in maps)
    # lose the target's whole-model pass and one single-block pass: only these are computed again,
    # and the record keeps its order (the measurement stamp of the first run)
    shared = tmp_path / "ray" / "_shared" / "block_damage"
    lost = entries(shared, lambda k: k["model"] == "tiny-gemma" and k["setting"].get("quantized") in
                   (["block0"], ["block0", "block1"]))
    assert len(lost) == 2
    for p in lost:
        p.unlink()
    again = run_main(xa, args, out, ray=True, monkeypatch=monkeypatch)
    assert again["timing"]["forward_passes_run"] == 2
    assert again["target"]["measured_at"] == remote["target"]["measured_at"]
    assert again["prediction"]["recorded_at"] == remote["prediction"]["recorded_at"]
    counts = {"passes_run"}
    assert numbers(again, counts) == numbers(serial, counts)
