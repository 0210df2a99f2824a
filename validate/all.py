"""Regenerate every result the paper uses with one command.

``python -m validate.all [--quick] [--out DIR] [--only EXP ...] [--pdf]`` (or ``python -m validate``)

Runs every experiment in :data:`EXPERIMENTS`, in order, each as ``python -m validate.<name>
[--quick] --out <root>/<name>`` in its own process, into one results root (default ``results/``,
or ``$LANGQUANT_RESULTS``, or ``--out``). Then it writes, under the root:

* ``derivations.tex`` and ``derivations/<name>.tex``: the LaTeX of the sympy derivations in
  ``theory`` (the expressions that the tests evaluate);
* ``macros.tex``: one ``\\newcommand`` per number (or label) the paper quotes, read from the
  experiments' JSON results; names are letters only (``\\PstarMeasured``, ``\\RsqCurve``, ...);
* ``manifest.json``: run id, start time, quick flag, git commit, what each experiment did, and
  every file this run wrote (path relative to the root, sha256, size, writer);
* with ``--pdf``: ``paper/main.pdf``, built with latexmk or tectonic from a copy of ``paper/``
  whose ``paths.tex`` points at the root (``\\resultsdir`` = ``..``).

An experiment that fails is reported by name; the others still run, and the command exits
non-zero. An experiment whose module does not exist yet (``optional``) is skipped with a message.
Each experiment caches its items under ``<root>/<name>/cache``, so a rerun is fast and an
interrupted run resumes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from validate._common import (
    ROOT, atomic_write_text, default_out_dir, git_commit, package_versions, read_json, write_json,
)

PAPER_DIR = ROOT / "paper"


# ---- the experiments -------------------------------------------------------------------------

@dataclass(frozen=True)
class Experiment:
    """One ``validate`` module: run as ``python -m <module> [--quick] --out <root>/<name>``."""

    name: str
    module: str
    result_json: str
    optional: bool = False  # skipped (with a message) while its module does not exist
    command_override: tuple[str, ...] | None = None  # tests: run this instead of the module

    def available(self) -> bool:
        if self.command_override is not None:
            return True
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def command(self, out: Path, quick: bool) -> list[str]:
        flags = [*(["--quick"] if quick else []), "--out", str(out)]
        if self.command_override is not None:
            return [*self.command_override, *flags]
        return [sys.executable, "-m", self.module, *flags]


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment("optimal_alpha", "validate.optimal_alpha", "optimal_alpha.json"),
    Experiment("distributions", "validate.distributions", "distributions.json"),
    Experiment("rate_distortion", "validate.rate_distortion", "rate_distortion.json"),
    Experiment("phase_transition", "validate.phase_transition", "phase_transition.json"),
    Experiment("language_alpha", "validate.language_alpha", "language_alpha.json"),
)


@dataclass
class Outcome:
    name: str
    module: str
    status: str  # ok | failed | skipped | not_selected
    command: list[str] = field(default_factory=list)
    returncode: int | None = None
    wall_seconds: float | None = None
    reason: str | None = None
    files: list[str] = field(default_factory=list)  # written by this run, relative to the root


# ---- files written by a run ----------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Identity of every file under ``folder``: (inode, mtime_ns, size). The atomic writers
    replace a file by a new one, so a rewritten file always changes identity."""
    out = {}
    if folder.is_dir():
        for p in folder.rglob("*"):
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp")):
                st = p.stat()
                out[str(p)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def _written(before: Mapping[str, tuple], after: Mapping[str, tuple]) -> list[Path]:
    return sorted(Path(p) for p, ident in after.items() if before.get(p) != ident)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rel(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


# ---- LaTeX macros -------------------------------------------------------------------------------

_MACRO_NAME = re.compile(r"^[A-Z][A-Za-z]*$")
_SMALL = ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten",
          "Eleven", "Twelve", "Thirteen", "Fourteen", "Fifteen", "Sixteen", "Seventeen",
          "Eighteen", "Nineteen", "Twenty")
_TENS = {30: "Thirty", 40: "Forty", 50: "Fifty", 60: "Sixty", 70: "Seventy", 80: "Eighty",
         90: "Ninety"}


def number_word(n: int) -> str:
    """Letters for a non-negative integer inside a macro name: 4 -> Four, 90 -> Ninety,
    128 -> OneTwoEight (digit by digit beyond the words above)."""
    n = int(n)
    if n < 0:
        return "Minus" + number_word(-n)
    if n < len(_SMALL):
        return _SMALL[n]
    if n in _TENS:
        return _TENS[n]
    return "".join(_SMALL[int(c)] for c in str(n))


def macro_name(*parts: Any) -> str:
    """CamelCase letters-only macro name: ``macro_name("RDGap", "student_t", 4)`` ->
    ``RDGapStudentTFour``. Digits become words, every other character separates words."""
    words = []
    for part in parts:
        if isinstance(part, int) and not isinstance(part, bool):
            words.append(number_word(part))
            continue
        for tok in re.findall(r"[A-Za-z]+|\d+", str(part)):
            words.append(number_word(int(tok)) if tok.isdigit() else tok[0].upper() + tok[1:])
    name = "".join(words)
    if not _MACRO_NAME.match(name):
        raise ValueError(f"cannot make a macro name from {parts!r} (got {name!r})")
    return name


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}


def tex_text(s: str) -> str:
    """Escape text for LaTeX (every special character, backslash included); non-ASCII
    characters become ``?`` so that any engine compiles the macro."""
    return "".join(_TEX_SPECIAL.get(c, c) if c.isascii() else "?" for c in str(s))


def format_number(x: float, sig: int = 3) -> str:
    """A finite number as LaTeX, ``sig`` significant digits: ``0.0893``, ``5.03``, ``15660``,
    ``\\ensuremath{1.21\\times 10^{-5}}``, ``\\ensuremath{-0.00106}``."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"not a finite number: {x!r}")
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 10 ** sig:
        s = f"{x:.0f}"
    elif ax >= 1e-3:
        s = f"{x:.{sig}g}"
        if "e" in s:  # 999.7 -> 1e+03
            s = f"{x:.0f}"
    else:
        mant, exp = f"{x:.{sig - 1}e}".split("e")
        s = rf"{mant}\times 10^{{{int(exp)}}}"
    return rf"\ensuremath{{{s}}}" if ("\\" in s or s.startswith("-")) else s


NA = r"\textit{n/a}"


@dataclass(frozen=True)
class Macro:
    """One generated macro. ``value``: a number, a text label, or None when the result has no
    finite value (written as ``n/a`` and listed in the manifest as unavailable)."""

    name: str
    value: Any
    source: str
    percent: bool = False

    @property
    def is_number(self) -> bool:
        return isinstance(self.value, (int, float)) and not isinstance(self.value, bool)

    @property
    def available(self) -> bool:
        return self.value is not None and not (self.is_number and not math.isfinite(self.value))

    def tex(self) -> str:
        v = self.value
        if not self.available:
            return NA
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, int):
            return rf"\ensuremath{{{v}}}" if v < 0 else str(v)
        if isinstance(v, float):
            return format_number(100.0 * v) + r"\%" if self.percent else format_number(v)
        return tex_text(v)


class MacroSet:
    """Collects macros; a name given twice is an error (silently overwriting a number the
    paper quotes is how a wrong number gets printed)."""

    def __init__(self) -> None:
        self.macros: dict[str, Macro] = {}

    def add(self, parts: str | Sequence[Any], value: Any, source: str, percent: bool = False) -> None:
        name = macro_name(*([parts] if isinstance(parts, str) else parts))
        if name in self.macros:
            raise ValueError(f"macro \\{name} defined twice ({self.macros[name].source}; {source})")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            try:
                value = float(value)  # numpy scalars
            except (TypeError, ValueError):
                raise TypeError(f"macro \\{name}: unsupported value {value!r}") from None
        self.macros[name] = Macro(name, value, source, percent)

    def add_pct(self, parts: str | Sequence[Any], value: Any, source: str) -> None:
        """The value as a fraction and, under ``<name>Pct``, as a percentage."""
        parts = [parts] if isinstance(parts, str) else list(parts)
        self.add(parts, value, source)
        self.add([*parts, "Pct"], value, source, percent=True)

    def __len__(self) -> int:
        return len(self.macros)

    def __iter__(self):
        return iter(self.macros.values())


def render_macros(macros: Iterable[Macro], header: Sequence[str] = ()) -> str:
    """``macros.tex``: one ``\\newcommand`` per macro (``\\newcommand`` so that a clash with a
    LaTeX command fails loudly), each with a comment naming its source."""
    lines = ["% Generated by `python -m validate.all`; do not edit. Every number the paper quotes.",
             *(f"% {h}" for h in header)]
    seen = set()
    for m in macros:
        if not _MACRO_NAME.match(m.name):
            raise ValueError(f"bad macro name {m.name!r}: letters only, starting upper case")
        if m.name in seen:
            raise ValueError(f"macro \\{m.name} defined twice")
        seen.add(m.name)
        lines.append(rf"\newcommand{{\{m.name}}}{{{m.tex()}}}% {tex_comment(m.source)}")
    return "\n".join(lines) + "\n"


def tex_comment(s: str) -> str:
    return " ".join(str(s).split()).encode("ascii", "replace").decode()


# ---- per-experiment macro extraction -------------------------------------------------------------

_SIGNED = ("gaussian", "laplace", "gennorm", "student_t")
_FAMILY_LABEL = {"gaussian": "Gaussian", "laplace": "Laplace", "gennorm": "generalized Gaussian",
                 "student_t": "Student-t", "lognormal": "lognormal"}


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _median(values: Iterable[Any]) -> float | None:
    v = sorted(_finite(values))
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def _max(values: Iterable[Any]) -> float | None:
    v = _finite(values)
    return max(v) if v else None


def _min(values: Iterable[Any]) -> float | None:
    v = _finite(values)
    return min(v) if v else None


def macros_optimal_alpha(doc: Mapping[str, Any], ms: MacroSet, src: str) -> None:
    cfg = doc.get("provenance", {}).get("config", {})
    syn = doc.get("synthetic") or {}
    rows, summary = syn.get("rows", []), syn.get("summary", [])
    ms.add("OASamples", cfg.get("samples"), f"{src}: provenance.config.samples")
    ms.add("OANumComparisons", len(rows), f"{src}: len(synthetic.rows)")
    ms.add("OANumFamilies", len({r["family"] for r in rows}), f"{src}: synthetic families")
    ms.add("OAElapsedSeconds", doc.get("elapsed_s"), f"{src}: elapsed_s")
    if summary:
        for key, name in (("max_abs_alpha_rel_diff", "OAMaxAlphaRelDiff"),
                          ("max_abs_mse_rel_diff", "OAMaxMseRelDiff"),
                          ("max_abs_mse_z", "OAMaxAbsZ"),
                          ("max_penalty_theory_alpha", "OAMaxPenalty")):
            add = ms.add if key == "max_abs_mse_z" else ms.add_pct  # z is in standard errors
            add(name, _max(s.get(key) for s in summary), f"{src}: max of synthetic.summary[].{key}")
            for grid in dict.fromkeys(s["grid"] for s in summary):
                add([name, grid], _max(s.get(key) for s in summary if s["grid"] == grid),
                           f"{src}: max of synthetic.summary[grid={grid}].{key}")
    for r in rows:
        key = (r["family"], r["grid"], int(r["bits"]))
        where = f"{src}: synthetic.rows[family={key[0]}, grid={key[1]}, bits={key[2]}]"
        ms.add(["OAAlphaTheory", *key], r.get("alpha_theory"), f"{where}.alpha_theory")
        ms.add(["OAAlphaSwept", *key], r.get("alpha_swept"), f"{where}.alpha_swept")
        ms.add_pct(["OAAlphaRelDiff", *key], r.get("alpha_rel_diff"), f"{where}.alpha_rel_diff")
        ms.add_pct(["OAPenalty", *key], r.get("penalty_theory_alpha"), f"{where}.penalty_theory_alpha")
    real = doc.get("real_weights")
    if real:
        ms.add("OARealModel", real.get("model"), f"{src}: real_weights.model")
        ms.add("OARealGrid", real.get("grid"), f"{src}: real_weights.grid")
        ms.add("OARealLayers", len(real.get("layers", [])), f"{src}: len(real_weights.layers)")
        counts = real.get("best_family_counts") or {}
        for fam in (*_SIGNED, *(f for f in counts if f not in _SIGNED)):
            ms.add(["OARealBestFit", fam], int(counts.get(fam, 0)), f"{src}: real_weights.best_family_counts")
        kq = real.get("excess_kurtosis") or {}
        ms.add("OARealKurtosisMedian", kq.get("median"), f"{src}: real_weights.excess_kurtosis.median")
        for s in real.get("summary", []):
            b = int(s["bits"])
            where = f"{src}: real_weights.summary[bits={b}]"
            pp, po, pa = (s.get(k) or {} for k in ("penalty_predicted", "penalty_octav", "penalty_absmax"))
            ms.add_pct(["OARealPenaltyMedian", b], pp.get("median"), f"{where}.penalty_predicted.median")
            ms.add_pct(["OARealPenaltyQNinety", b], pp.get("q90"), f"{where}.penalty_predicted.q90")
            ms.add_pct(["OARealPenaltyMax", b], pp.get("max"), f"{where}.penalty_predicted.max")
            ms.add_pct(["OARealShareBelowOnePct", b], pp.get("frac_below_1pct"),
                       f"{where}.penalty_predicted.frac_below_1pct")
            ms.add_pct(["OARealOctavMedian", b], po.get("median"), f"{where}.penalty_octav.median")
            ms.add_pct(["OARealAbsmaxMedian", b], pa.get("median"), f"{where}.penalty_absmax.median")
            ms.add_pct(["OARealAlphaRelDiffMedian", b], (s.get("alpha_rel_diff") or {}).get("median"),
                       f"{where}.alpha_rel_diff.median")


def macros_distributions(doc: Mapping[str, Any], ms: MacroSet, src: str) -> None:
    rows = doc.get("rows", [])
    corpus = doc.get("corpus", {})
    model = doc.get("model", {})
    ms.add("DistModel", model.get("name"), f"{src}: model.name")
    ms.add("DistCorpus", corpus.get("name"), f"{src}: corpus.name")
    ms.add("DistBits", doc.get("bits"), f"{src}: bits")
    ms.add("DistGrid", doc.get("grid"), f"{src}: grid")
    ms.add("DistSites", doc.get("sites"), f"{src}: sites")
    ms.add("DistNumLanguages", len(corpus.get("languages", [])), f"{src}: len(corpus.languages)")
    ms.add("DistNumSites", len({r["site"] for r in rows}), f"{src}: distinct rows[].site")
    fitted = [r for r in rows if r.get("best_family")]
    ms.add("DistNumFits", len(fitted), f"{src}: rows with a best_family")
    ms.add("DistNumFitErrors", len(rows) - len(fitted), f"{src}: rows without a best_family")
    counts: dict[str, int] = {}
    for r in fitted:
        counts[r["best_family"]] = counts.get(r["best_family"], 0) + 1
    for fam in (*_SIGNED, *(f for f in counts if f not in _SIGNED)):
        ms.add(["DistBestFit", fam], counts.get(fam, 0), f"{src}: count of rows[].best_family == {fam}")
    if counts:
        top = max(counts, key=lambda f: (counts[f], f))
        ms.add("DistTopFamily", _FAMILY_LABEL.get(top, top), f"{src}: most frequent rows[].best_family")
        ms.add_pct("DistTopFamilyShare", counts[top] / len(fitted), f"{src}: share of the most frequent best_family")
    fallbacks = sum(1 for r in fitted if r.get("alpha_family") and r["alpha_family"] != r["best_family"])
    ms.add("DistAlphaFallbacks", fallbacks, f"{src}: rows whose alpha_family differs from best_family")
    kurt = [r.get("excess_kurtosis") for r in rows]
    ms.add("DistKurtosisMedian", _median(kurt), f"{src}: median rows[].excess_kurtosis")
    ms.add("DistKurtosisMin", _min(kurt), f"{src}: min rows[].excess_kurtosis")
    ms.add("DistKurtosisMax", _max(kurt), f"{src}: max rows[].excess_kurtosis")
    spread = doc.get("alpha_spread", [])
    ms.add("DistSpreadMedianRatio", _median(d.get("ratio") for d in spread), f"{src}: median alpha_spread[].ratio")
    ms.add("DistTheorySpreadMedianRatio", _median(d.get("theory_ratio") for d in spread),
           f"{src}: median alpha_spread[].theory_ratio")
    ms.add_pct("DistTheoryPenaltyMedian", _median(r.get("theory_penalty") for r in rows),
               f"{src}: median rows[].theory_penalty")
    if spread:
        top = spread[0]
        ms.add("DistSpreadMaxRatio", top.get("ratio"), f"{src}: alpha_spread[0].ratio")
        ms.add("DistSpreadMaxLayer", top.get("layer") if top.get("layer") is not None else top.get("site"),
               f"{src}: alpha_spread[0].layer")
        ms.add("DistSpreadMaxLowLanguage", top.get("min_language"), f"{src}: alpha_spread[0].min_language")
        ms.add("DistSpreadMaxHighLanguage", top.get("max_language"), f"{src}: alpha_spread[0].max_language")
    ms.add("DistCaptureSeconds", doc.get("capture_seconds"), f"{src}: capture_seconds")


_RD_GAPS = (("Uniform", "gap_uniform_bits"), ("Swept", "gap_swept_bits"),
            ("LloydMax", "gap_lloyd_max_bits"), ("PanterDite", "gap_panter_dite_bits"))


def macros_rate_distortion(doc: Mapping[str, Any], ms: MacroSet, src: str) -> None:
    cfg = doc.get("provenance", {}).get("config", {})
    ms.add("RDECSQGapBits", doc.get("ecsq_gap_bits"), f"{src}: ecsq_gap_bits")
    ms.add("RDECSQGapDb", doc.get("ecsq_gap_db"), f"{src}: ecsq_gap_db")
    ms.add("RDSamples", cfg.get("samples"), f"{src}: provenance.config.samples")
    ms.add("RDElapsedSeconds", doc.get("elapsed_s"), f"{src}: elapsed_s")
    items = doc.get("families", [])
    bits = sorted({int(r["bits"]) for it in items for r in it["rows"]})
    if bits:
        ms.add("RDMinBits", bits[0], f"{src}: smallest bit width")
        ms.add("RDMaxBits", bits[-1], f"{src}: largest bit width")
    for it in items:
        fam = it["family"]
        ms.add(["RDKurtosis", fam], it.get("excess_kurtosis"), f"{src}: families[{fam}].excess_kurtosis")
        for r in it["rows"]:
            b = int(r["bits"])
            where = f"{src}: families[{fam}].rows[bits={b}]"
            for label, key in _RD_GAPS:
                ms.add(["RDGap", label, fam, b], r.get(key), f"{where}.{key}")
            ms.add(["RDLloydMaxOverPanterDite", fam, b], r.get("lloyd_max_over_panter_dite"),
                   f"{where}.lloyd_max_over_panter_dite")
            ms.add(["RDUniformOverLloydMax", fam, b], r.get("uniform_over_lloyd_max"),
                   f"{where}.uniform_over_lloyd_max")
            ms.add(["RDLloydMaxMse", fam, b], r.get("d_lloyd_max"), f"{where}.d_lloyd_max")
    # summaries across families: at 4 bits, and Lloyd-Max against Panter-Dite at the top rate
    for b in sorted({4, *bits[-1:]} & set(bits)):
        rows = [(it["family"], r) for it in items for r in it["rows"] if int(r["bits"]) == b]
        for label, key in _RD_GAPS:
            vals = [(r.get(key), fam) for fam, r in rows if _finite([r.get(key)])]
            if vals:
                hi, lo = max(vals), min(vals)
                where = f"{src}: families[].rows[bits={b}].{key}"
                ms.add(["RDGap", label, "Max", b], hi[0], f"max over families of {where}")
                ms.add(["RDGap", label, "Max", b, "Family"], _FAMILY_LABEL.get(hi[1], hi[1]), f"argmax of {where}")
                ms.add(["RDGap", label, "Min", b], lo[0], f"min over families of {where}")
                ms.add(["RDGap", label, "Min", b, "Family"], _FAMILY_LABEL.get(lo[1], lo[1]), f"argmin of {where}")
    if bits:
        top = bits[-1]
        dev = [abs(r["lloyd_max_over_panter_dite"] - 1.0) for it in items for r in it["rows"]
               if int(r["bits"]) == top and _finite([r.get("lloyd_max_over_panter_dite")])]
        ms.add_pct("RDLloydMaxPanterDiteWorstDevAtMaxBits", max(dev) if dev else None,
                   f"{src}: max over families of |lloyd_max_over_panter_dite - 1| at bits={top}")


def macros_phase_transition(doc: Mapping[str, Any], ms: MacroSet, src: str) -> None:
    cfg = doc.get("provenance", {}).get("config", {})
    curve = doc.get("curve", [])
    timing = doc.get("timing", {})
    first = curve[0] if curve else {}
    pm, pp = doc.get("pstar_measured"), doc.get("pstar_predicted")
    ms.add("PstarMeasured", pm, f"{src}: pstar_measured")
    ms.add("PstarPredicted", pp, f"{src}: pstar_predicted")
    ms.add("PstarAbsDiff", abs(pm - pp) if _finite([pm]) and _finite([pp]) else None,
           f"{src}: |pstar_measured - pstar_predicted|")
    ms.add("RsqCurve", doc.get("r2_curve"), f"{src}: r2_curve")
    ms.add("RsqCurveCalibrated", doc.get("r2_curve_calibrated"), f"{src}: r2_curve_calibrated")
    ms.add("PstarPredictedCalibrated", doc.get("pstar_predicted_calibrated"), f"{src}: pstar_predicted_calibrated")
    gamma = doc.get("interaction_factor") or {}
    for lang, g in gamma.items():
        ms.add(["PTInteraction", lang], g, f"{src}: interaction_factor.{lang}")
    if gamma:
        lo, hi = min(gamma, key=gamma.get), max(gamma, key=gamma.get)
        ms.add("PTInteractionMin", gamma[lo], f"{src}: min interaction_factor")
        ms.add("PTInteractionMinLanguage", lo, f"{src}: argmin interaction_factor")
        ms.add("PTInteractionMax", gamma[hi], f"{src}: max interaction_factor")
        ms.add("PTInteractionMaxLanguage", hi, f"{src}: argmax interaction_factor")
    bound = doc.get("disparity_bound") or {}
    ms.add("PTBoundPoints", bound.get("points"), f"{src}: disparity_bound.points")
    ms.add("PTBoundAbove", bound.get("measured_above_bound_at_rate"),
           f"{src}: disparity_bound.measured_above_bound_at_rate")
    ms.add("PTBoundMedianShrink", bound.get("median_shrink"), f"{src}: disparity_bound.median_shrink")
    ms.add("DisparityNone", first.get("disparity"), f"{src}: curve[0].disparity")
    ms.add("DisparityNoneCILow", first.get("ci_low"), f"{src}: curve[0].ci_low")
    ms.add("DisparityNoneCIHigh", first.get("ci_high"), f"{src}: curve[0].ci_high")
    ms.add("DisparityPredictedNone", first.get("predicted"), f"{src}: curve[0].predicted")
    ms.add("DisparityBoundAtRateNone", first.get("bound_at_rate"), f"{src}: curve[0].bound_at_rate")
    ms.add("DisparityBoundAnyNone", first.get("bound_any_quantizer"), f"{src}: curve[0].bound_any_quantizer")
    if curve:
        last = curve[-1]
        ms.add("DisparityLastMeasured", last.get("disparity"), f"{src}: curve[-1].disparity")
        ms.add_pct("PTLastProtectedFraction", last.get("protected_fraction"), f"{src}: curve[-1].protected_fraction")
    ms.add("PTStepsMeasured", len(curve), f"{src}: len(curve)")
    ms.add("PTNumUnits", len(doc.get("units", [])), f"{src}: len(units)")
    order = doc.get("order", [])
    ms.add("PTFirstProtected", order[0] if order else None, f"{src}: order[0]")
    for key, name in (("model", "PTModel"), ("bits", "PTBits"), ("grid", "PTGrid"),
                      ("granularity", "PTGranularity"), ("clipping", "PTClipping"),
                      ("unit", "PTUnit"), ("ranking", "PTRanking"), ("corpus", "PTCorpus")):
        ms.add(name, cfg.get(key), f"{src}: provenance.config.{key}")
    segments = cfg.get("segments")
    ms.add("PTSegments", segments if segments is not None else "all", f"{src}: provenance.config.segments")
    langs = cfg.get("languages", [])
    ref = cfg.get("reference", [])
    ms.add("PTNumLanguages", len(langs), f"{src}: len(provenance.config.languages)")
    ms.add("PTLanguages", ", ".join(langs), f"{src}: provenance.config.languages")
    ms.add("PTReference", ", ".join(ref), f"{src}: provenance.config.reference")
    ms.add("PTBaselineNote", doc.get("baseline_note"), f"{src}: baseline_note")
    for lang, bpb in (doc.get("baseline_bpb") or {}).items():
        ms.add(["PTBaselineBpb", lang], bpb, f"{src}: baseline_bpb.{lang}")
        ms.add_pct(["PTDegradationNone", lang], first.get(f"d_{lang}"), f"{src}: curve[0].d_{lang}")
    for key, name in (("wall_seconds", "PTWallSeconds"), ("forward_seconds", "PTForwardSeconds"),
                      ("load_seconds", "PTLoadSeconds"), ("fit_seconds", "PTFitSeconds"),
                      ("forward_passes_run", "PTForwardPasses"),
                      ("scored_tokens_per_pass", "PTTokensPerPass")):
        ms.add(name, timing.get(key), f"{src}: timing.{key}")


def macros_language_alpha(doc: Mapping[str, Any], ms: MacroSet, src: str) -> None:
    ag = doc.get("agreement") or {}
    ms.add("LAModel", doc.get("provenance", {}).get("config", {}).get("model"), f"{src}: provenance.config.model")
    ms.add("LABits", doc.get("bits"), f"{src}: bits")
    ms.add("LAGrid", doc.get("grid"), f"{src}: grid")
    ms.add("LANumSites", len(doc.get("sites", [])), f"{src}: len(sites)")
    ms.add("LANumLanguages", len(doc.get("languages", [])), f"{src}: len(languages)")
    ms.add("LASpearman", ag.get("spearman_penalty_mix"), f"{src}: agreement.spearman_penalty_mix")
    ms.add_pct("LAWorstAgreement", ag.get("worst_language_agreement"), f"{src}: agreement.worst_language_agreement")
    ms.add_pct("LAAlphaStarRelError", ag.get("median_rel_error_alpha_star"),
               f"{src}: agreement.median_rel_error_alpha_star")
    ms.add_pct("LAOwnPenalty", ag.get("median_penalty_own_at_theory_alpha"),
               f"{src}: agreement.median_penalty_own_at_theory_alpha")
    ms.add_pct("LAWorstMixMeasured", ag.get("median_worst_penalty_mix_measured"),
               f"{src}: agreement.median_worst_penalty_mix_measured")
    ms.add_pct("LAWorstMinimaxMeasured", ag.get("median_worst_penalty_minimax_measured"),
               f"{src}: agreement.median_worst_penalty_minimax_measured")
    ms.add_pct("LAWorstMixTheory", ag.get("median_worst_penalty_mix"), f"{src}: agreement.median_worst_penalty_mix")
    per = doc.get("per_language", [])
    for p in per:
        l = p["language"]
        ms.add_pct(["LAPenaltyMix", l], p.get("median_penalty_mix_measured"),
                   f"{src}: per_language[{l}].median_penalty_mix_measured")
        ms.add_pct(["LAPenaltyMinimax", l], p.get("median_penalty_minimax_measured"),
                   f"{src}: per_language[{l}].median_penalty_minimax_measured")
        ms.add(["LAWorstLayers", l], p.get("worst_in_layers_mix"), f"{src}: per_language[{l}].worst_in_layers_mix")
    if per:
        top = max(per, key=lambda p: p.get("median_penalty_mix_measured") or -1.0)
        ms.add("LAMostPenalised", top["language"], f"{src}: argmax per_language[].median_penalty_mix_measured")
        ms.add_pct("LAMostPenalisedMix", top.get("median_penalty_mix_measured"),
                   f"{src}: max per_language[].median_penalty_mix_measured")


def macros_generic(prefix: str) -> Callable[[Mapping[str, Any], MacroSet, str], None]:
    """For an experiment without a dedicated extractor: every scalar number (and short ASCII
    label) in the JSON's top level and the dicts below it, two levels deep."""

    def extract(doc: Mapping[str, Any], ms: MacroSet, src: str) -> None:
        def walk(obj: Mapping[str, Any], path: list[str], depth: int) -> None:
            for k, v in obj.items():
                if k in ("provenance", "files", "experiment"):
                    continue
                p = [*path, str(k)]
                if isinstance(v, Mapping) and depth < 2:
                    walk(v, p, depth + 1)
                    continue
                # short ASCII labels; not paths (machine-specific) nor long descriptions
                ok_text = isinstance(v, str) and len(v) <= 60 and v.isascii() and "/" not in v
                if not (isinstance(v, (int, float)) or ok_text or v is None):
                    continue
                try:
                    name = macro_name(prefix, *p)
                except ValueError:
                    continue
                if name not in ms.macros:
                    ms.add(name, v, f"{src}: {'.'.join(p)}")

        walk(doc, [], 0)

    return extract


MACRO_EXTRACTORS: dict[str, Callable[[Mapping[str, Any], MacroSet, str], None]] = {
    "optimal_alpha": macros_optimal_alpha,
    "distributions": macros_distributions,
    "rate_distortion": macros_rate_distortion,
    "phase_transition": macros_phase_transition,
    "language_alpha": macros_language_alpha,
}


def collect_macros(sources: Mapping[str, Path], run: Mapping[str, Any] | None = None) -> MacroSet:
    """Macros of every experiment JSON in ``sources`` (experiment name -> path), plus the run's
    own (mode, commit, timings) from ``run``."""
    ms = MacroSet()
    if run is not None:
        ms.add("RunMode", "quick" if run.get("quick") else "full", "validate.all --quick flag")
        ms.add("RunGitCommit", (run.get("git_commit") or "unknown")[:12]
               + ("-dirty" if str(run.get("git_commit", "")).endswith("-dirty") else ""),
               "git commit of the checkout")
        ms.add("RunDate", str(run.get("started_utc", ""))[:10] or None, "run start date (UTC)")
        for name, secs in (run.get("timings") or {}).items():
            ms.add(["Time", name], secs, f"validate.all: wall seconds of {name}")
    for exp, path in sources.items():
        extract = MACRO_EXTRACTORS.get(exp) or macros_generic(macro_name(exp))
        extract(read_json(path), ms, Path(path).name)
    return ms


# ---- derivations ------------------------------------------------------------------------------------

def derivation_blocks() -> list[tuple[str, str, str]]:
    """(file stem, title, LaTeX) of every derivation the paper prints, from ``theory``."""
    import sympy as sp

    from theory import FAMILIES, Derivation, to_latex
    from theory.derivations import aciq_clipping, gaussian_aciq, laplace_aciq
    from theory.protection import sharpness_derivation
    from theory.rate_distortion import panter_dite_expr, shannon_lower_bound_expr

    out = [("laplace_aciq", "ACIQ for a Laplace density", to_latex(laplace_aciq())),
           ("gaussian_aciq", "ACIQ for a Gaussian density", to_latex(gaussian_aciq()))]
    for name, cls in FAMILIES.items():
        if not cls.one_sided:
            out.append((f"aciq_mse_{name}", f"Unit-scale ACIQ MSE, {_FAMILY_LABEL.get(name, name)}",
                        to_latex(aciq_clipping(name))))
    for name in ("gaussian", "laplace"):
        cls = FAMILIES[name]
        d = Derivation(f"rate_distortion_{name}", {
            "Shannon lower bound": sp.Eq(sp.Symbol("D_SLB"), shannon_lower_bound_expr(cls)),
            "Panter-Dite": sp.Eq(sp.Symbol("D_PD"), panter_dite_expr(cls)),
        })
        out.append((d.name, f"Rate-distortion reference points, {_FAMILY_LABEL[name]}", to_latex(d)))
    out.append(("protection_sharpness", "Slope of the disparity curve at the crossing",
                to_latex(Derivation("protection_sharpness", sharpness_derivation()))))
    return out


def write_derivations(root: Path) -> list[Path]:
    written, parts = [], [r"% Generated by `python -m validate.all` from theory.derivations; do not edit."]
    for stem, title, tex in derivation_blocks():
        written.append(atomic_write_text(root / "derivations" / f"{stem}.tex", tex))
        parts.append(rf"\paragraph{{{tex_text(title)}}}" + "\n" + tex)
    written.append(atomic_write_text(root / "derivations.tex", "\n".join(parts)))
    return written


# ---- PDF ------------------------------------------------------------------------------------------------

PDF_TOOLS = ("latexmk", "tectonic")
PDF_HELP = (
    "--pdf needs a LaTeX build tool on PATH: neither latexmk nor tectonic was found. Install one:\n"
    "  Debian/Ubuntu: sudo apt-get install latexmk texlive-latex-recommended texlive-latex-extra\n"
    "  or tectonic (self-contained, fetches packages on first use): https://tectonic-typesetting.github.io\n"
    "then rerun with --pdf, or build by hand: cd paper && latexmk -pdf main.tex"
)


def find_pdf_tool() -> tuple[str, str] | None:
    for tool in PDF_TOOLS:
        path = shutil.which(tool)
        if path:
            return tool, path
    return None


def build_pdf(root: Path, tool: tuple[str, str]) -> Path:
    """Copy ``paper/`` to ``<root>/paper`` with ``\\resultsdir`` = ``..`` (the root) and build
    ``main.pdf`` there; the source tree stays clean and any root works."""
    build = root / "paper"
    shutil.copytree(PAPER_DIR, build, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.pdf", "*.aux", "*.log", "*.fls", "*.fdb_latexmk",
                                                  "*.bbl", "*.blg", "*.out"))
    atomic_write_text(build / "paths.tex", "% written by validate.all --pdf: the results root is "
                                           "this folder's parent\n\\newcommand{\\resultsdir}{..}\n")
    name, path = tool
    cmd = ([path, "-pdf", "-interaction=nonstopmode", "-halt-on-error", "main.tex"] if name == "latexmk"
           else [path, "main.tex"])
    print(f"[validate.all] building the PDF: {' '.join(cmd)} (in {build})", flush=True)
    rc = subprocess.run(cmd, cwd=build).returncode
    if rc != 0 or not (build / "main.pdf").exists():
        raise RuntimeError(f"{name} failed (exit {rc}); see {build / 'main.log'}")
    return build / "main.pdf"


# ---- the run --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None, experiments: Sequence[Experiment] = EXPERIMENTS):
    names = [e.name for e in experiments]
    p = argparse.ArgumentParser(prog="python -m validate.all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="pass --quick to every experiment (smoke-size numbers)")
    p.add_argument("--out", type=Path, default=None,
                   help="results root (default results/ or $LANGQUANT_RESULTS); experiment X writes <root>/X")
    p.add_argument("--only", nargs="+", choices=names, default=None, metavar="EXP",
                   help=f"run only these experiments ({', '.join(names)}); macros still read every "
                        "result JSON present under the root")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing experiment")
    p.add_argument("--pdf", action="store_true",
                   help="then build <root>/paper/main.pdf with latexmk or tectonic")
    return p.parse_args(argv)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def run_all(argv: Sequence[str] | None = None, experiments: Sequence[Experiment] = EXPERIMENTS) -> int:
    """Run the experiments, write derivations, macros and manifest; returns the exit status."""
    args = parse_args(argv, experiments)
    root = (args.out if args.out is not None else default_out_dir("")).resolve()
    tool = None
    if args.pdf:
        tool = find_pdf_tool()
        if tool is None:
            print(f"validate.all: {PDF_HELP}", file=sys.stderr)
            return 2
    started = _now()
    t_start = time.perf_counter()
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    commit = git_commit()
    root.mkdir(parents=True, exist_ok=True)
    print(f"[validate.all] run {run_id} -> {root} ({'quick' if args.quick else 'full'})", flush=True)
    own_files: list[Path] = []  # written by validate.all itself

    t0 = time.perf_counter()
    own_files += write_derivations(root)
    print(f"[validate.all] derivations.tex ({time.perf_counter() - t0:.1f} s)", flush=True)

    selected = [e for e in experiments if args.only is None or e.name in args.only]
    outcomes: list[Outcome] = []
    timings: dict[str, float] = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])}
    env.setdefault("MPLBACKEND", "Agg")
    stop = False
    for i, exp in enumerate(experiments, 1):
        if exp not in selected:
            outcomes.append(Outcome(exp.name, exp.module, "not_selected"))
            continue
        if stop:
            outcomes.append(Outcome(exp.name, exp.module, "not_run", reason="an earlier experiment failed (--fail-fast)"))
            continue
        if not exp.available():
            msg = f"module {exp.module} does not exist (yet)"
            if not exp.optional:
                print(f"[validate.all] ({i}/{len(experiments)}) {exp.name}: FAILED: {msg}", file=sys.stderr, flush=True)
                outcomes.append(Outcome(exp.name, exp.module, "failed", reason=msg))
                stop = args.fail_fast
                continue
            print(f"[validate.all] ({i}/{len(experiments)}) {exp.name}: skipped, {msg}", flush=True)
            outcomes.append(Outcome(exp.name, exp.module, "skipped", reason=msg))
            continue
        out = root / exp.name
        cmd = exp.command(out, args.quick)
        shown = " ".join(["python", *cmd[1:]]) if cmd[0] == sys.executable else " ".join(cmd)
        print(f"[validate.all] ({i}/{len(experiments)}) {exp.name}: {shown}", flush=True)
        before = _snapshot(out)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
            reason = None if rc == 0 else f"exit status {rc}"
        except OSError as exc:
            rc, reason = None, f"{type(exc).__name__}: {exc}"
        wall = time.perf_counter() - t0
        files = _written(before, _snapshot(out))
        if reason is None and not (out / exp.result_json).exists():
            reason = f"exited 0 but wrote no {exp.result_json}"
        if reason is None and out / exp.result_json not in files:
            reason = f"exited 0 but did not rewrite {exp.result_json}"
        status = "ok" if reason is None else "failed"
        timings[exp.name] = wall
        outcomes.append(Outcome(exp.name, exp.module, status, shown.split(), rc, wall, reason,
                                [_rel(p, root) for p in files]))
        if status == "ok":
            print(f"[validate.all] ({i}/{len(experiments)}) {exp.name}: ok, {wall:.1f} s, "
                  f"{len(files)} files", flush=True)
        else:
            print(f"[validate.all] ({i}/{len(experiments)}) {exp.name}: FAILED ({reason}) after "
                  f"{wall:.1f} s; command: {shown}", file=sys.stderr, flush=True)
            stop = args.fail_fast
    failed = [o for o in outcomes if o.status == "failed"]

    # macros: every experiment that succeeded now, and (for --only) earlier results still in the
    # root of experiments not run now; never the stale JSON of an experiment that failed now
    sources: dict[str, Path] = {}
    source_info: dict[str, dict] = {}
    for exp, o in zip(experiments, outcomes):
        path = root / exp.name / exp.result_json
        if o.status == "ok" or (o.status == "not_selected" and path.exists()):
            sources[exp.name] = path
            source_info[exp.name] = {"json": _rel(path, root), "sha256": sha256_file(path),
                                     "written_by_this_run": o.status == "ok"}
    run_info = {"quick": args.quick, "git_commit": commit, "started_utc": started.isoformat(timespec="seconds"),
                "timings": dict(timings)}
    macro_error = None
    try:
        ms = collect_macros(sources, run_info)
        header = [f"run {run_id}, {'quick' if args.quick else 'full'}, commit {commit}",
                  *(f"{k}: {v['json']} sha256 {v['sha256'][:16]}" + ("" if v["written_by_this_run"] else " (earlier run)")
                    for k, v in source_info.items())]
        own_files.append(atomic_write_text(root / "macros.tex", render_macros(ms, header)))
        unavailable = [m.name for m in ms if not m.available]
        print(f"[validate.all] macros.tex: {len(ms)} macros"
              + (f", {len(unavailable)} without a finite value (n/a): {', '.join(unavailable)}" if unavailable else ""),
              flush=True)
    except Exception as exc:  # a result the extractor cannot read must fail the run, by name
        ms, unavailable = MacroSet(), []
        macro_error = f"{type(exc).__name__}: {exc}"
        print(f"[validate.all] macros.tex FAILED: {macro_error}", file=sys.stderr, flush=True)

    pdf_info = None
    if tool is not None:
        if failed or macro_error:
            pdf_info = {"status": "not_built", "reason": "an experiment or the macros failed"}
        else:
            before = _snapshot(root / "paper")
            try:
                pdf = build_pdf(root, tool)
                pdf_info = {"status": "ok", "tool": tool[0], "pdf": _rel(pdf, root)}
                print(f"[validate.all] PDF: {pdf}", flush=True)
            except Exception as exc:
                pdf_info = {"status": "failed", "tool": tool[0], "reason": str(exc)}
                print(f"[validate.all] PDF FAILED: {exc}", file=sys.stderr, flush=True)
            own_files += _written(before, _snapshot(root / "paper"))

    finished = _now()
    files = []
    for o in outcomes:
        files += [{"path": p, "writer": o.name} for p in o.files]
    files += [{"path": _rel(p, root), "writer": "validate.all"} for p in own_files]
    for f in files:
        f["sha256"] = sha256_file(root / f["path"])
        f["bytes"] = (root / f["path"]).stat().st_size
    manifest = {
        "run_id": run_id,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": finished.isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - t_start,
        "quick": bool(args.quick),
        "command": " ".join(["python -m validate.all", *(argv if argv is not None else sys.argv[1:])]),
        "results_root": str(root),
        "git_commit": commit,
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "experiments": [o.__dict__ for o in outcomes],
        "macros": {"file": "macros.tex", "count": len(ms), "unavailable": unavailable,
                   "error": macro_error, "sources": source_info,
                   "values": {m.name: {"value": m.value, "tex": m.tex(), "source": m.source} for m in ms}},
        "pdf": pdf_info,
        "files": sorted(files, key=lambda f: f["path"]),
    }
    write_json(root / "manifest.json", manifest)
    print(f"[validate.all] manifest.json: {len(files)} files written by this run; total "
          f"{manifest['wall_seconds']:.1f} s", flush=True)
    problems = [f"experiment {o.name} failed ({o.reason})" for o in failed]
    if macro_error:
        problems.append(f"macros.tex failed ({macro_error})")
    if pdf_info and pdf_info["status"] == "failed":
        problems.append(f"PDF build failed ({pdf_info['reason']})")
    if problems:
        print("validate.all: FAILED: " + "; ".join(problems), file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_all(argv)


if __name__ == "__main__":
    raise SystemExit(main())
