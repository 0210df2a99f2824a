"""Every experiment module has the protocol's parts (docs/design.md, "Experiment protocol"), and
the runner builds its command line from ``Config`` and refuses bad flags before any work.
(``import theory`` staying free of torch and numba is tests/test_theory_import.py.)"""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from validate import _protocol as protocol
from validate._latex import MacroSet


@pytest.mark.parametrize("name", protocol.EXPERIMENTS)
def test_experiment_has_the_protocol_parts(name):
    mod = protocol.experiment_module(name)
    assert mod.EXPERIMENT == name
    cfg = mod.Config
    assert dataclasses.is_dataclass(cfg) and cfg.__dataclass_params__.frozen, f"{name}.Config is not a frozen dataclass"
    hints = typing.get_type_hints(cfg)
    for f in dataclasses.fields(cfg):
        assert f.name in hints, f"{name}.Config.{f.name} has no type"
        assert f.metadata.get("help"), f"{name}.Config.{f.name} has no help text"
        assert f.default is not dataclasses.MISSING, f"{name}.Config.{f.name} has no default"
    full, quick = cfg(), cfg.quick()
    assert isinstance(quick, cfg) and quick != full, f"{name}.Config.quick() is not a smaller variant"
    assert list(inspect.signature(mod.run).parameters)[:2] == ["config", "cache"]
    assert list(inspect.signature(mod.write).parameters) == ["result", "out"]
    assert list(inspect.signature(mod.macros).parameters) == ["result"]
    assert inspect.signature(mod.main).parameters["argv"].default is None
    # every field is one flag, shown in --help with its default
    helptext = protocol.build_parser(mod).format_help()
    for f in dataclasses.fields(cfg):
        assert "--" + f.name.replace("_", "-") in helptext
    assert "--quick" in helptext and "--out" in helptext


@pytest.mark.parametrize("name", protocol.EXPERIMENTS)
def test_no_experiment_imports_another(name):
    src = inspect.getsource(protocol.experiment_module(name))
    for other in protocol.EXPERIMENTS:
        if other != name:
            assert f"validate.{other}" not in src.replace(f"python -m validate.{other}", ""), \
                f"validate.{name} imports validate.{other}"


def test_quick_then_explicit_flags_override():
    mod = protocol.experiment_module("rate_distortion")
    cfg, out, quick = protocol.parse_config(mod, ["--quick", "--samples", "0", "--out", "/tmp/x"])
    assert cfg.samples == 0 and cfg.bits == mod.Config.quick().bits and str(out) == "/tmp/x" and quick
    cfg, _, quick = protocol.parse_config(mod, ["--bits", "3", "5"])
    assert cfg.bits == (3, 5) and cfg.samples == mod.Config().samples and not quick


@pytest.mark.parametrize("argv, needle", [
    (["--bits", "0"], "--bits"), (["--bits", "17"], "--bits"), (["--samples", "5"], "--samples"),
    (["--samples", "-1"], "--samples"),
])
def test_bad_flags_refused_with_one_line(argv, needle, capsys):
    mod = protocol.experiment_module("rate_distortion")
    assert mod.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_result_round_trips_through_json(tmp_path):
    mod = protocol.experiment_module("rate_distortion")
    cfg = dataclasses.replace(mod.Config.quick(), families=("laplace",), bits=(2, 4), samples=0)
    res = mod.run(cfg)
    files = mod.write(res, tmp_path)
    assert (tmp_path / "rate_distortion.json") in files
    back = protocol.Result.load(tmp_path / "rate_distortion.json")
    assert back.config_dict["bits"] == [2, 4]
    a, b = mod.macros(res), mod.macros(back)
    assert isinstance(a, MacroSet) and len(a) > 10
    assert {m.name: m.tex() for m in a} == {m.name: m.tex() for m in b}
