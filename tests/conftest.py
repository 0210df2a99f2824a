"""Shared fixtures: tiny random models of each architecture, offline hub settings, data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_ARCHS = ("tiny-gpt2", "tiny-opt", "tiny-bloom", "tiny-llama", "tiny-gemma")


def ntrex_dir() -> Path | None:
    """NTREX-128 folder: ``$LANGQUANT_NTREX`` or ``<repo>/../shared/data/ntrex128``, if present."""
    env = os.environ.get("LANGQUANT_NTREX")
    p = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "ntrex128"
    return p if p.is_dir() else None


@pytest.fixture(scope="session")
def ntrex_path() -> Path:
    p = ntrex_dir()
    if p is None:
        pytest.skip("NTREX-128 not found (set LANGQUANT_NTREX or provide ../shared/data/ntrex128)")
    return p


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny_model(request):
    """(name, model, tokenizer) for each tiny random architecture, float32 on CPU, seeded."""
    from empirical.models import load_model

    model, tok = load_model(request.param, seed=0)
    return request.param, model, tok


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray of two CPUs for the session (``validate._executor.RayExecutor`` uses it).
    Skipped where Ray is not installed (``pip install -e ".[distributed]"``); under CI, which
    installs it, a missing Ray fails instead."""
    if os.environ.get("CI"):
        import ray
    else:
        ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[distributed]')")
    import logging

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             object_store_memory=200 * 1024 * 1024)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """torch on one thread in this process for the test, as in a one-CPU Ray actor: CPU reductions
    split over threads round differently, so in-process and Ray numbers are compared exactly only
    at equal thread counts (docs/design.md, "Executors")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama():
    from empirical.models import load_model

    return load_model("tiny-llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2():
    from empirical.models import load_model

    return load_model("tiny-gpt2", seed=0)


@pytest.fixture(scope="session")
def quick_results(tmp_path_factory):
    """One ``python -m validate.all --quick`` run on the real embedded model, shared by the slow
    tests (the paper check, the phase-transition and language-alpha end-to-end checks).

    Where LaTeX is installed (CI installs it) the run also builds the PDF (``--pdf``). Under CI a
    missing models extra or missing LaTeX fails these tests instead of skipping them.

    Returns ``(results root, manifest)``.
    """
    import shutil
    import subprocess
    import sys

    from validate._common import ROOT, read_json

    if os.environ.get("CI"):
        import gguf  # noqa: F401  (the models extra: CI must run the real-model tests)

        assert shutil.which("latexmk"), "CI builds the paper: latexmk is missing (.ci/run installs TeX)"
    else:
        pytest.importorskip("gguf")
    pdf = ["--pdf"] if shutil.which("latexmk") else []
    root = tmp_path_factory.mktemp("quick") / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "validate.all", "--quick", "--out", str(root), *pdf],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"validate.all --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return root, read_json(root / "manifest.json")


def assert_refused(main, argv, out: Path, needle: str, capsys) -> None:
    """``main([..., *argv])`` refuses before any work: exit status 2, one stderr line (no
    traceback) that contains ``needle``, nothing written under ``out``."""
    assert main(["--out", str(out), *argv]) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], (argv, err)
    assert not out.exists(), argv
