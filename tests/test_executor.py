"""validate._executor: the in-process and Ray executors on probe grids and on a tiny-model experiment.

The Ray tests share one local Ray of two CPUs (``ray_local`` in conftest.py; skipped where Ray is not
installed, ``pip install -e ".[distributed]"``, except under CI, which installs it).
"""

from __future__ import annotations

import os
import sys

import pytest

from validate._common import ResultCache, read_json
from validate._executor import (GridError, InProcessExecutor, RayExecutor, Task, WorkerSpec, make_executor,
                                probe_key, using)

# in-process and Ray numbers are compared at equal torch thread counts (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

PROBE = WorkerSpec("validate._executor:probe_worker", ("t",))


def probe_tasks(values, extra=None):
    extra = extra or {}
    return [Task(f"value {v}", probe_key("t", v), {"value": v, **extra.get(v, {})}) for v in values]


def squares(cache, values):
    return {v: cache.get(probe_key("t", v))["square"] for v in values}


# ---- in process (no Ray needed) -------------------------------------------------------------------

def test_in_process_map_computes_only_missing_tasks_and_reports_a_failing_one(tmp_path):
    cache = ResultCache(tmp_path / "c")
    ex = InProcessExecutor()
    r = ex.map(PROBE, probe_tasks([1, 2]), cache=cache)
    assert (r.computed, r.cached) == (2, 0)
    r = ex.map(PROBE, probe_tasks([1, 2, 3, 3]), cache=cache)  # a repeated key counts once
    assert (r.computed, r.cached) == (1, 2)
    with pytest.raises(GridError) as err:
        ex.map(PROBE, probe_tasks([4, 5, 6], {5: {"fail": True}}), cache=cache)
    assert list(err.value.failures) == ["value 5"] and "always fails" in err.value.failures["value 5"]
    assert "value 5" in str(err.value) and "2 completed" in str(err.value)
    assert squares(cache, [1, 2, 3, 4, 6]) == {1: 1, 2: 4, 3: 9, 4: 16, 6: 36}
    assert cache.get(probe_key("t", 5)) is None


def test_in_process_executor_does_not_prefetch_and_the_default_is_in_process():
    from validate._executor import current

    assert not InProcessExecutor().prefetches and InProcessExecutor().width == 1
    assert isinstance(current(), InProcessExecutor)
    ex = InProcessExecutor()
    with using(ex):
        assert current() is ex
    assert current() is not ex


def test_make_executor_refuses_bad_names_and_an_address_without_ray():
    with pytest.raises(ValueError, match="expected one of inprocess, ray"):
        make_executor("dask")
    with pytest.raises(ValueError, match="--address is for --executor ray"):
        make_executor("inprocess", address="auto")
    with pytest.raises(ValueError, match="--workers must be a positive integer"):
        RayExecutor(workers=0)
    with pytest.raises(ValueError, match="factory"):
        WorkerSpec("no_colon")


def test_ray_executor_without_ray_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    ex = RayExecutor(workers=1)
    with pytest.raises(RuntimeError, match=r"pip install -e \"\.\[distributed\]\""):
        ex.map(PROBE, probe_tasks([1]), cache=ResultCache(tmp_path / "c"))


def test_ray_executor_needs_a_cache_and_a_spec():
    ex = RayExecutor(workers=1)
    with pytest.raises(ValueError, match="needs a results cache"):
        ex.map(PROBE, probe_tasks([1]), cache=None)
    with pytest.raises(ValueError, match="no worker spec"):
        ex.map(None, probe_tasks([1]), cache=ResultCache(None))


def test_experiments_with_grids_take_executor_flags_and_refuse_bad_ones(tmp_path, capsys):
    from validate import _protocol as protocol
    from validate import phase_transition as pt

    helptext = protocol.build_parser(pt).format_help()
    assert "--executor" in helptext and "--address" in helptext and "--workers" in helptext
    assert pt.main(["--model", "tiny-gpt2", "--address", "auto", "--out", str(tmp_path)]) == 2
    assert "--address is for --executor ray" in capsys.readouterr().err


# ---- local Ray ---------------------------------------------------------------------------------------

def test_ray_grid_matches_in_process_and_spreads_over_two_workers(ray_local, tmp_path):
    serial, remote = ResultCache(tmp_path / "serial"), ResultCache(tmp_path / "ray")
    values = list(range(8))
    InProcessExecutor().map(PROBE, probe_tasks(values), cache=serial)
    with RayExecutor(workers=2) as ex:
        r = ex.map(PROBE, probe_tasks(values, {v: {"sleep": 0.2} for v in values}), cache=remote)
        assert (r.computed, r.cached, r.failed) == (8, 0, {})
        assert ex.width == 2
    assert squares(remote, values) == squares(serial, values)
    pids = {remote.get(probe_key("t", v))["pid"] for v in values}
    assert len(pids) == 2 and os.getpid() not in pids
    # each actor built its worker once: the worker's pid is the actor's
    assert all(remote.get(probe_key("t", v))["built_pid"] == remote.get(probe_key("t", v))["pid"] for v in values)


def test_ray_retries_a_task_whose_worker_died_on_another_worker(ray_local, tmp_path):
    cache = ResultCache(tmp_path / "c")
    marker = tmp_path / "died"
    with RayExecutor(workers=2) as ex:
        r = ex.map(PROBE, probe_tasks([1, 2, 3], {2: {"die_once": str(marker)}}), cache=cache)
    assert marker.exists()  # the first try killed its worker ...
    dead = int(marker.read_text())
    assert (r.computed, r.workers_lost, r.retries, r.failed) == (3, 1, 1, {})
    assert cache.get(probe_key("t", 2))["pid"] != dead  # ... and the retry ran in another process
    assert squares(cache, [1, 2, 3]) == {1: 1, 2: 4, 3: 9}


def test_ray_reports_a_poisoned_configuration_by_name_and_completes_the_rest(ray_local, tmp_path):
    cache = ResultCache(tmp_path / "c")
    with RayExecutor(workers=2, max_retries=1) as ex:
        with pytest.raises(GridError) as err:
            ex.map(PROBE, probe_tasks(range(6), {2: {"fail": True}, 4: {"die": True}}), cache=cache)
    f = err.value.failures
    assert set(f) == {"value 2", "value 4"}
    assert "ValueError: configuration 2 always fails" in f["value 2"]
    assert "died on each of 2 tries" in f["value 4"]
    assert squares(cache, [0, 1, 3, 5]) == {0: 0, 1: 1, 3: 9, 5: 25}


def test_ray_rerun_after_an_interruption_computes_only_the_missing_tasks(ray_local, tmp_path):
    cache = ResultCache(tmp_path / "c")
    InProcessExecutor().map(PROBE, probe_tasks([0, 1, 2]), cache=cache)  # the run that was cut short
    with RayExecutor(workers=2) as ex:
        r = ex.map(PROBE, probe_tasks(range(7)), cache=cache)
        assert (r.computed, r.cached) == (4, 3)
        assert ex.map(PROBE, probe_tasks(range(7)), cache=cache).computed == 0
    assert squares(cache, range(7)) == {v: v * v for v in range(7)}


def test_a_killed_actor_is_replaced_between_grids(ray_local, tmp_path):
    import signal

    cache = ResultCache(tmp_path / "c")
    with RayExecutor(workers=2) as ex:
        pid = ex.actor_pids()[0]
        os.kill(pid, signal.SIGKILL)
        r = ex.map(PROBE, probe_tasks(range(4)), cache=cache)
        assert r.computed == 4 and r.failed == {}
        assert r.workers_lost >= 0 and len(set(ex.actor_pids())) == 2 and pid not in ex.actor_pids()


TINY_PT = ["--model", "tiny-gpt2", "--unit", "linear", "--languages", "en", "he", "ja", "--segments", "3",
           "--bootstrap", "50", "--max-length", "64", "--pairs", "3", "--stop-after", "1"]


def _numbers(doc):
    """The measured numbers of a phase_transition result (everything but provenance and timing)."""
    return {k: v for k, v in doc.items() if k not in ("provenance", "timing", "zero_pass")}


def test_phase_transition_on_ray_matches_in_process_and_resumes(ray_local, tmp_path, monkeypatch):
    from empirical.bpb import BpbEngine
    from validate import phase_transition as pt

    assert pt.main([*TINY_PT, "--out", str(tmp_path / "serial")]) == 0

    def no_pass_here(*a, **k):
        raise AssertionError("a quantized pass ran in the driver")

    with monkeypatch.context() as m:  # every pass runs on the actors (other processes)
        m.setattr(BpbEngine, "score", no_pass_here)
        m.setattr(BpbEngine, "record", no_pass_here)
        assert pt.main([*TINY_PT, "--executor", "ray", "--workers", "2", "--out", str(tmp_path / "ray")]) == 0
    serial, remote = read_json(tmp_path / "serial/phase_transition.json"), read_json(tmp_path / "ray/phase_transition.json")
    assert _numbers(remote) == _numbers(serial)
    assert remote["provenance"]["executor"]["executor"] == "ray"
    assert remote["provenance"]["executor"]["workers"] == 2
    assert remote["timing"]["forward_passes_run"] == serial["timing"]["forward_passes_run"]
    # an interrupted run: drop some cached passes, rerun on Ray; only those are computed
    entries = sorted((tmp_path / "ray/cache").glob("*.json"))
    dropped = [p for p in entries if "quantized" in p.read_text()][:3]
    for p in dropped:
        p.unlink()
    assert pt.main([*TINY_PT, "--executor", "ray", "--workers", "2", "--out", str(tmp_path / "ray")]) == 0
    again = read_json(tmp_path / "ray/phase_transition.json")
    assert again["timing"]["forward_passes_run"] == len(dropped)
    assert _numbers(again) == _numbers(serial)


def test_device_flags_accept_accelerate_placements_and_gpu_flags_need_ray(tmp_path, capsys, monkeypatch):
    import importlib.util

    from validate import _protocol as protocol
    from validate import phase_transition as pt

    if importlib.util.find_spec("accelerate") is not None:
        protocol.check_device("auto")
        protocol.check_device("offload")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(protocol.ConfigError, match="pip install accelerate"):
        protocol.check_device("offload")
    monkeypatch.undo()
    with pytest.raises(protocol.ConfigError, match="expected cpu, cuda, cuda:N, auto"):
        protocol.check_device("tpu")
    assert pt.main(["--model", "tiny-gpt2", "--gpus-per-worker", "2", "--out", str(tmp_path)]) == 2
    assert "--gpus-per-worker is for --executor ray" in capsys.readouterr().err
    with pytest.raises(ValueError, match="gpus_per_worker must be >= 0"):
        RayExecutor(gpus_per_worker=-1)


def test_phase_transition_with_an_offloaded_model_matches_the_plain_one(tmp_path):
    """--device offload (accelerate's CPU offload: parameters on meta, weights loaded per block)
    gives the same numbers as --device cpu, end to end."""
    pytest.importorskip("accelerate")
    from validate import phase_transition as pt

    args = [*TINY_PT, "--no-compare-rankings"]
    assert pt.main([*args, "--out", str(tmp_path / "cpu")]) == 0
    assert pt.main([*args, "--device", "offload", "--out", str(tmp_path / "offload")]) == 0
    cpu, off = read_json(tmp_path / "cpu/phase_transition.json"), read_json(tmp_path / "offload/phase_transition.json")
    assert off["model_metadata"]["offloaded"] is True and cpu["model_metadata"].get("offloaded") in (None, False)
    a, b = _numbers(cpu), _numbers(off)
    a.pop("model_metadata"), b.pop("model_metadata")
    assert a == b
    assert off["zero_pass"]["available"] and off["zero_pass"]["variants"] == cpu["zero_pass"]["variants"]


def test_validate_all_passes_executor_flags_to_grids_and_device_to_model_experiments(capsys):
    from validate import all as vall

    pt = vall.placement_args("validate.phase_transition", "ray", "auto", 4, "cuda")
    assert pt == ["--executor", "ray", "--address", "auto", "--workers", "4", "--device", "cuda"]
    # rate_distortion runs no model and no grid: nothing is passed to it
    assert vall.placement_args("validate.rate_distortion", "ray", None, None, "cuda") == []
    assert vall.placement_args("validate.phase_transition") == []
    with pytest.raises(SystemExit):
        vall.parse_args(["--workers", "2"], ["phase_transition"])
    assert "--address and --workers are for --executor ray" in capsys.readouterr().err


def test_every_experiment_that_runs_passes_takes_the_executor_flags():
    """The experiments that run a model's passes declare their grids; the two that run none
    (rate_distortion: formulas; optimal_alpha: weights and synthetic samples) take no executor flags."""
    from validate import _protocol as protocol

    without = {"rate_distortion", "optimal_alpha"}
    for name in protocol.EXPERIMENTS:
        mod = protocol.experiment_module(name)
        grids = getattr(mod, "EXECUTOR_GRIDS", None)
        helptext = protocol.build_parser(mod).format_help()
        if name in without:
            assert grids is None and "--executor" not in helptext, name
        else:
            assert isinstance(grids, str) and grids, name
            assert "--executor" in helptext and "--gpus-per-worker" in helptext, name


def test_ray_refuses_workers_no_node_can_hold(ray_local, tmp_path):
    """A GPU worker on a cluster without GPUs would wait for ever: refused, naming what is missing."""
    if ray_local.cluster_resources().get("GPU", 0) >= 1:
        pytest.skip("this Ray has a GPU")
    with RayExecutor(workers=1, gpus_per_worker=1) as ex:
        with pytest.raises(RuntimeError, match=r"needs 1 CPU and 1 GPU, but the cluster has 2 CPU and 0 GPU; run with --device cpu"):
            ex.map(PROBE, probe_tasks([1]), cache=ResultCache(tmp_path / "c"))


def test_the_command_line_joins_a_running_ray_by_address(ray_local, tmp_path):
    """``python -m validate.phase_transition --executor ray --address ADDR`` in another process:
    the experiment runs as __main__ there, and its workers must still import its factory by the
    module's real name; the run joins this session's Ray instead of starting one."""
    import subprocess

    from validate import phase_transition as pt

    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "LANGQUANT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "validate.phase_transition", *TINY_PT, "--executor", "ray", "--address", address,
           "--workers", "2", "--out", str(tmp_path / "cli")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = read_json(tmp_path / "cli/phase_transition.json")
    assert doc["provenance"]["executor"]["address"] == address
    assert pt.main([*TINY_PT, "--out", str(tmp_path / "serial")]) == 0
    assert _numbers(doc) == _numbers(read_json(tmp_path / "serial/phase_transition.json"))


def test_a_spec_named_after_main_takes_the_module_it_was_run_as(monkeypatch):
    import types

    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="validate.phase_transition")
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert WorkerSpec("__main__:passes_worker").factory == "validate.phase_transition:passes_worker"
    main.__spec__ = None  # a script run by path: nothing a worker could import
    with pytest.raises(ValueError, match="cannot be imported by a worker"):
        WorkerSpec("__main__:f")


def test_executor_ray_without_ray_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import importlib.util

    from validate import phase_transition as pt

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    monkeypatch.setattr(pt, "build", lambda *a, **k: pytest.fail("the model loaded"))
    assert pt.main([*TINY_PT, "--executor", "ray", "--out", str(tmp_path)]) == 2
    assert 'Ray is not installed; install it with: pip install -e ".[distributed]"' in capsys.readouterr().err
