"""Experiment I/O helpers: the configuration-keyed result cache and atomic JSON."""

import json

import numpy as np
import pytest

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
    with pytest.warns(UserWarning, match="unreadable"):
        assert c.get(cfg) is None
    # a version bump invalidates old entries
    assert config_key(cfg, 1) != config_key(cfg, 2)
    assert ResultCache(None).get(cfg) is None


def test_write_json_turns_non_finite_into_null(tmp_path):
    p = write_json(tmp_path / "r.json", {"a": float("nan"), "b": np.float32(1.5), "c": [np.inf]})
    assert json.loads(p.read_text()) == {"a": None, "b": 1.5, "c": [None]}
    assert not list(tmp_path.glob(".*.tmp"))


def test_latex_numbers_have_no_e_notation():
    from validate._latex import _cell

    assert _cell(15660.19, 4) == "15660"
    assert _cell(0.0893, 4) == "0.0893"
    assert _cell(1.2e-5, 4) == r"\ensuremath{1.2\times 10^{-5}}"
    assert _cell(3e12, 3) == r"\ensuremath{3\times 10^{12}}"
    assert _cell(float("nan"), 3) == "--" and _cell(None, 3) == "--"
    assert _cell(-3, 3) == r"\ensuremath{-3}"


def _entry(c, cfg):
    return json.loads(c.path(cfg).read_text())


def test_result_cache_refuses_altered_or_foreign_entries_with_a_warning_naming_the_file(tmp_path):
    c = ResultCache(tmp_path)
    cfg = {"model": "m", "quantized": ["block0"]}
    good = {"eng": [1.0, 2.0, 3.0, 4.0], "heb": [2.0, 3.0, 4.0, 5.0]}
    c.put(cfg, good)
    assert c.get(cfg) == good

    def plant(result=None, raw=None):
        doc = _entry(c, cfg)
        if result is not None:
            doc["result"] = result
        c.path(cfg).write_text(raw if raw is not None else json.dumps(doc))

    cases = [
        (lambda: plant({k: [10 * x for x in v] for k, v in good.items()}), "checksum"),  # NLL x10
        (lambda: plant({**good, "heb": good["heb"][:2]}), "checksum"),                    # a list cut
        (lambda: plant(raw="null"), "not a cache entry"),
        (lambda: plant(raw="[1, 2]"), "not a cache entry"),
        (lambda: plant(raw='{"config": {"model": "m", "quantized": ["block0"]}, "result": {"eng": [NaN]}}'),
         "checksum"),
        (lambda: plant(raw="{not json"), "unreadable"),
    ]
    for make, why in cases:
        c.put(cfg, good)
        make()
        with pytest.warns(UserWarning, match=why) as rec:
            assert c.get(cfg) is None
        assert str(c.path(cfg)) in str(rec[0].message)
    # a payload that matches its checksum but not the caller's shape is refused too
    c.put(cfg, {**good, "heb": good["heb"][:2]})

    def four_each(r):
        if any(len(v) != 4 for v in r.values()):
            raise ValueError("expected 4 sentence NLLs per language")

    with pytest.warns(UserWarning, match="expected 4 sentence NLLs"):
        assert c.get(cfg, check=four_each) is None
    c.put(cfg, good)
    assert c.get(cfg, check=four_each) == good
