"""Experiment I/O helpers: the configuration-keyed result cache and atomic JSON."""

import json

import numpy as np

from validate._common import ResultCache, config_key, write_json


def test_result_cache_roundtrip_and_config_check(tmp_path):
    c = ResultCache(tmp_path)
    cfg = {"model": "m", "bits": np.int64(4), "langs": ("eng", "heb")}
    assert c.get(cfg) is None
    c.put(cfg, {"nll": [1.0, 2.0]})
    assert c.get(cfg) == {"nll": [1.0, 2.0]}
    assert c.get({**cfg, "bits": 3}) is None
    # a damaged entry is recomputed, not trusted
    c.path(cfg).write_text("{not json")
    assert c.get(cfg) is None
    # a version bump invalidates old entries
    assert config_key(cfg, 1) != config_key(cfg, 2)
    assert ResultCache(None).get(cfg) is None


def test_write_json_turns_non_finite_into_null(tmp_path):
    p = write_json(tmp_path / "r.json", {"a": float("nan"), "b": np.float32(1.5), "c": [np.inf]})
    assert json.loads(p.read_text()) == {"a": None, "b": 1.5, "c": [None]}
    assert not list(tmp_path.glob(".*.tmp"))


def test_latex_numbers_have_no_e_notation():
    from validate._common import _fmt_tex

    assert _fmt_tex(15660.19, 4) == "15660"
    assert _fmt_tex(0.0893, 4) == "0.0893"
    assert _fmt_tex(1.2e-5, 4) == r"$1.2\times 10^{-5}$"
    assert _fmt_tex(3e12, 3) == r"$3\times 10^{12}$"
    assert _fmt_tex(float("nan"), 3) == "--"
