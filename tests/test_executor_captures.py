"""Per-language capture and backward grids on the executor (issue 18): each ported experiment's
tiny-model run gives the same numbers in process and on two Ray actors, the driver computes none
of its items on Ray, and a rerun after deleting some cached items computes only those.

The two runs have separate results roots, so that each has its own ``_shared/block_damage``
(``validate._mechanisms.shared_cache``): the Ray run computes the block-damage passes on its
workers too (``_mechanisms.block_damage`` distributes them), and the patched
``BpbEngine.score``/``record`` check that the driver scores nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from validate._common import read_json

# in-process and Ray numbers are compared at equal torch thread counts (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "tiny-llama", "--languages", "en", "he", "ja", "--segments", "2", "--max-length", "32",
        "--bootstrap", "50"]
RAY = ["--executor", "ray", "--workers", "2"]


_COUNTS = ("provenance", "timing", "passes", "passes_run", "block_damage_passes_run", "forward_passes",
           "block_damage_passes")


def _numbers(doc):
    """A result's measured numbers: everything but provenance, timing and the counts of passes run
    (the Ray run reads the block damage the in-process run cached in the shared folder)."""
    out = {k: v for k, v in doc.items() if k not in _COUNTS}
    for k in ("block_damage", "quant_damage", "damage"):
        if k in out:
            out[k] = {kk: v for kk, v in out[k].items() if kk != "passes_run"}
    return out


def _no_driver_compute(m, *targets):
    """Make each ``(object, attribute)`` raise in this process (Ray actors are other processes)."""
    from empirical.bpb import BpbEngine

    def refuse(*a, **k):
        raise AssertionError("an item or scored pass was computed in the driver")

    for obj, name in [(BpbEngine, "score"), (BpbEngine, "record"), *targets]:
        m.setattr(obj, name, refuse)


def _items(folder, what):
    """Cache files of ``folder`` whose stored configuration has ``what`` (a key, value pair)."""
    k, v = what
    return sorted(p for p in folder.glob("*.json") if json.loads(p.read_text())["config"].get(k) == v)


def _ray(tmp_path):
    return tmp_path / "ray" / "run"


def _serial_then_ray(module, argv, tmp_path, monkeypatch, targets):
    """Run ``module`` in process, then on Ray with ``targets`` refused in the driver; returns both
    result documents (the Ray run's folder is ``_ray(tmp_path)``)."""
    name = module.EXPERIMENT
    assert module.main([*argv, "--out", str(tmp_path / "serial" / "run")]) == 0
    with monkeypatch.context() as m:
        _no_driver_compute(m, *targets)
        assert module.main([*argv, *RAY, "--out", str(_ray(tmp_path))]) == 0
    serial = read_json(tmp_path / "serial" / "run" / f"{name}.json")
    remote = read_json(_ray(tmp_path) / f"{name}.json")
    assert remote["provenance"]["executor"]["executor"] == "ray"
    assert remote["provenance"]["executor"]["workers"] == 2
    assert "executor" in serial["provenance"] and serial["provenance"]["executor"]["executor"] == "inprocess"
    return serial, remote


def test_gradient_norms_on_ray_match_in_process_and_resume(ray_local, tmp_path, monkeypatch):
    import empirical.gradients
    from validate import gradient_norms as gn

    argv = [*TINY, "--top-k", "1"]
    serial, remote = _serial_then_ray(gn, argv, tmp_path, monkeypatch,
                                      [(empirical.gradients, "language_gradients")])
    assert _numbers(remote) == _numbers(serial)
    assert remote["timing"]["backward_passes_run"] == serial["timing"]["backward_passes_run"] == 6
    assert remote["passes"]["block_damage_passes_run"] == serial["passes"]["block_damage_passes_run"] == 3
    # an interrupted run: drop one language's item; the rerun computes that language only
    items = _items(_ray(tmp_path) / "cache", ("what", "gradient_norms"))
    assert len(items) == 3
    items[1].unlink()
    with monkeypatch.context() as m:
        _no_driver_compute(m, (empirical.gradients, "language_gradients"))
        assert gn.main([*argv, *RAY, "--out", str(_ray(tmp_path))]) == 0
    again = read_json(_ray(tmp_path) / "gradient_norms.json")
    assert again["timing"]["backward_passes_run"] == 2   # the two windows of one language
    assert _numbers(again) == _numbers(serial)


def test_gradient_worker_refuses_a_language_outside_the_run():
    from validate import gradient_norms as gn

    w = gn.gradient_worker(gn.Config(model="tiny-llama", languages=("en", "he"), segments=1, max_length=16))
    with pytest.raises(ValueError, match="'fr' is not one of this run's"):
        w.compute({"language": "fr"})
    entries = w.compute({"language": "heb_Hebr"})   # the run's (FLORES) code
    assert len(entries) == 1 and entries[0][0]["language"] == "heb_Hebr" and entries[0][1]["windows"] == 1
    assert entries[0][0] == w.items.key("heb_Hebr")


def test_distribution_shift_on_ray_matches_in_process_and_resumes(ray_local, tmp_path, monkeypatch):
    import empirical.shift
    from validate import distribution_shift as ds

    refuse = [(empirical.shift, "capture_block_outputs")]
    serial, remote = _serial_then_ray(ds, TINY, tmp_path, monkeypatch, refuse)
    assert _numbers(remote) == _numbers(serial)
    assert remote["passes"]["capture_passes_run"] == serial["passes"]["capture_passes_run"] == 12  # 2 x 2 x 3
    assert remote["passes"]["all_quantized_passes_run"] == serial["passes"]["all_quantized_passes_run"] == 1
    items = _items(_ray(tmp_path) / "cache", ("what", "distribution_shift"))
    assert len(items) == 3
    for p in items[:2]:
        p.unlink()
    with monkeypatch.context() as m:
        _no_driver_compute(m, *refuse)
        assert ds.main([*TINY, *RAY, "--out", str(_ray(tmp_path))]) == 0
    again = read_json(_ray(tmp_path) / "distribution_shift.json")
    assert again["timing"]["forward_passes_run"] == 8   # two languages, two captures of two windows
    assert _numbers(again) == _numbers(serial)


def test_cka_on_ray_matches_in_process_and_resumes(ray_local, tmp_path, monkeypatch):
    from validate import cka

    refuse = [(cka, "capture_streams")]
    argv = [*TINY, "--top-pairs", "2"]
    serial, remote = _serial_then_ray(cka, argv, tmp_path, monkeypatch, refuse)
    assert _numbers(remote) == _numbers(serial)
    assert remote["passes_run"] == serial["passes_run"] == 6   # a matrix and a bootstrap per language
    assert remote["block_damage_passes_run"] == serial["block_damage_passes_run"] == 3
    matrices = _items(_ray(tmp_path) / "cache", ("item", "matrix"))
    boots = _items(_ray(tmp_path) / "cache", ("item", "bootstrap"))
    assert len(matrices) == len(boots) == 3
    matrices[0].unlink()
    boots[2].unlink()
    with monkeypatch.context() as m:
        _no_driver_compute(m, *refuse)
        assert cka.main([*argv, *RAY, "--out", str(_ray(tmp_path))]) == 0
    again = read_json(_ray(tmp_path) / "cka.json")
    assert again["passes_run"] == 2
    assert _numbers(again) == _numbers(serial)


def test_bottleneck_on_ray_matches_in_process_and_resumes(ray_local, tmp_path, monkeypatch):
    from validate import bottleneck as B

    refuse = [(B, "_states")]
    argv = [*TINY, "--segments", "3", "--top-k", "8"]
    serial, remote = _serial_then_ray(B, argv, tmp_path, monkeypatch, refuse)
    assert _numbers(remote) == _numbers(serial)
    assert serial["forward_passes"] == 9
    assert remote["forward_passes"] == 18   # the language probe's worker runs every window again
    tokens = _items(_ray(tmp_path) / "cache", ("task", "token"))
    assert len(tokens) == 3 and len(_items(_ray(tmp_path) / "cache", ("task", "language"))) == 1
    tokens[1].unlink()
    with monkeypatch.context() as m:
        _no_driver_compute(m, *refuse)
        assert B.main([*argv, *RAY, "--out", str(_ray(tmp_path))]) == 0
    again = read_json(_ray(tmp_path) / "bottleneck.json")
    assert again["forward_passes"] == 3   # one language's three windows
    assert _numbers(again) == _numbers(serial)


def test_language_alpha_captures_on_ray_match_in_process_and_resume(ray_local, tmp_path, monkeypatch):
    import empirical.models
    from validate import language_alpha as la

    argv = ["--model", "tiny-llama", "--languages", "en", "he", "ja", "--segments", "3", "--reservoir", "1024",
            "--fit-samples", "1024", "--min-samples", "200"]
    # on Ray the driver neither loads the model nor captures anything
    refuse = [(la, "capture_language"), (empirical.models, "load_model")]
    serial, remote = _serial_then_ray(la, argv, tmp_path, monkeypatch, refuse)
    assert _numbers(remote) == _numbers(serial)
    assert remote["timing"]["languages_captured_now"] == serial["timing"]["languages_captured_now"] == 3
    for run in ("serial", "ray"):   # every capture's samples were stored beside its entry
        caps = _items(tmp_path / run / "run" / "cache", ("item", "capture"))
        assert len(caps) == 3 and all(p.with_suffix(".npz").exists() for p in caps)
    caps = _items(_ray(tmp_path) / "cache", ("item", "capture"))
    for p in caps:   # the same samples, bit for bit (the file names are the keys' hashes)
        twin = tmp_path / "serial" / "run" / "cache" / p.with_suffix(".npz").name
        with np.load(p.with_suffix(".npz")) as a, np.load(twin) as b:
            assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
    caps[0].with_suffix(".npz").unlink()   # an entry without its samples is not cached
    caps[2].unlink()
    with monkeypatch.context() as m:
        _no_driver_compute(m, *refuse)
        assert la.main([*argv, *RAY, "--out", str(_ray(tmp_path))]) == 0
    again = read_json(_ray(tmp_path) / "language_alpha.json")
    assert again["timing"]["languages_captured_now"] == 2
    assert _numbers(again) == _numbers(serial)


def test_distributions_on_ray_match_in_process_and_resume(ray_local, tmp_path, monkeypatch):
    import empirical.models
    from validate import distributions as dist

    argv = ["--model", "tiny-llama", "--quick", "--languages", "eng", "heb", "zho_Hans", "--max-segments", "3"]
    refuse = [(dist, "language_item"), (empirical.models, "load_model")]
    serial, remote = _serial_then_ray(dist, argv, tmp_path, monkeypatch, refuse)
    assert _numbers(remote) == _numbers(serial)
    assert remote["timing"]["languages_captured_now"] == serial["timing"]["languages_captured_now"] == 3
    items = sorted((_ray(tmp_path) / "cache").glob("*.json"))
    assert len(items) == 3
    items[1].unlink()
    with monkeypatch.context() as m:
        _no_driver_compute(m, *refuse)
        assert dist.main([*argv, *RAY, "--out", str(_ray(tmp_path))]) == 0
    again = read_json(_ray(tmp_path) / "distributions.json")
    assert again["timing"]["languages_captured_now"] == 1
    assert _numbers(again) == _numbers(serial)
