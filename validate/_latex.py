"""LaTeX output shared by every experiment: text escaping, number formatting, booktabs tables
and the macros (``\\newcommand``) through which the paper quotes a measured number.

One escaping rule (:func:`tex_text`) and one number format (:func:`format_number`) serve the
tables, the figure captions and the macros, so a number prints the same wherever it appears.
An experiment lists the numbers it quotes in its own ``macros(result)`` (docs/design.md,
"Experiment protocol"), with :class:`MacroSet`; ``validate.all`` only renders them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "Tex", "tex_text", "format_number", "write_latex_table", "Macro", "MacroSet", "macro_name",
    "number_word", "render_macros", "NA", "finite", "median", "vmax", "vmin", "find_pdf_tool",
    "build_pdf", "PDF_HELP",
]

NA = r"\textit{n/a}"

_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}


def tex_text(s: Any) -> str:
    """Escape text for LaTeX (every special character, backslash included); non-ASCII
    characters become ``?`` so that any engine compiles it."""
    return "".join(_TEX_SPECIAL.get(c, c) if c.isascii() else "?" for c in str(s))


class Tex(str):
    """Text that is LaTeX already (``Tex(r"$R^2$")``): tables and macros print it unescaped."""


def format_number(x: float, sig: int = 3) -> str:
    """A finite number as LaTeX, ``sig`` significant digits: ``0.0893``, ``5.03``, ``15660``,
    ``\\ensuremath{1.21\\times 10^{-5}}``, ``\\ensuremath{-0.00106}`` (never ``1.566e+04``)."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"not a finite number: {x!r}")
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 1e9:
        s = _scientific(x, sig)
    elif ax >= 10 ** sig:
        s = f"{x:.0f}"
    elif ax >= 1e-3:
        s = f"{x:.{sig}g}"
        if "e" in s:  # 999.7 -> 1e+03
            s = f"{x:.0f}"
    else:
        s = _scientific(x, sig)
    return rf"\ensuremath{{{s}}}" if ("\\" in s or s.startswith("-")) else s


def _scientific(x: float, sig: int) -> str:
    mant, exp = f"{x:.{sig - 1}e}".split("e")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    return rf"{mant}\times 10^{{{int(exp)}}}"


def _cell(v: Any, digits: int) -> str:
    if isinstance(v, Tex):
        return str(v)
    if v is None:
        return "--"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return rf"\ensuremath{{{int(v)}}}" if v < 0 else str(int(v))
    if isinstance(v, (float, np.floating)):
        return format_number(v, digits) if math.isfinite(float(v)) else "--"
    return tex_text(v)


def _is_numeric(rows: Sequence[Mapping[str, Any]], c: str) -> bool:
    vals = [r.get(c) for r in rows if r.get(c) is not None]
    return bool(vals) and all(isinstance(v, (int, float, np.integer, np.floating))
                              and not isinstance(v, bool) for v in vals)


def write_latex_table(path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                      headers: Sequence[str] | None = None, caption: str | None = None,
                      label: str | None = None, digits: int = 4):
    """Atomically write a booktabs ``tabular`` (in a ``table`` float when ``caption`` is given).

    ``headers`` are LaTeX already; cells are escaped (unless :class:`Tex`) and numbers formatted
    by :func:`format_number`.
    """
    from validate._common import atomic_write_text

    headers = list(headers) if headers is not None else [tex_text(c) for c in columns]
    align = "".join("r" if _is_numeric(rows, c) else "l" for c in columns)
    body = [rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(headers) + r" \\", r"\midrule"]
    body += [" & ".join(_cell(r.get(c), digits) for c in columns) + r" \\" for r in rows]
    body += [r"\bottomrule", r"\end{tabular}"]
    lines = []
    if caption is not None:
        lines += [r"\begin{table}[htbp]", r"\centering", rf"\caption{{{caption}}}"]
        if label:
            lines.append(rf"\label{{{label}}}")
    lines += body
    if caption is not None:
        lines.append(r"\end{table}")
    return atomic_write_text(path, "\n".join(lines) + "\n")


# ---- macros ----------------------------------------------------------------------------------

_MACRO_NAME = re.compile(r"^[A-Z][A-Za-z]*$")
_SMALL = ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten",
          "Eleven", "Twelve", "Thirteen", "Fourteen", "Fifteen", "Sixteen", "Seventeen",
          "Eighteen", "Nineteen", "Twenty")
_TENS = {30: "Thirty", 40: "Forty", 50: "Fifty", 60: "Sixty", 70: "Seventy", 80: "Eighty",
         90: "Ninety"}


def number_word(n: int) -> str:
    """Letters for an integer inside a macro name: 4 -> Four, 90 -> Ninety,
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


@dataclass(frozen=True)
class Macro:
    """One quoted number (or label). ``value`` None or non-finite prints ``n/a`` and is listed
    in the manifest as unavailable."""

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
        if isinstance(v, float) and self.percent:
            return format_number(100.0 * v) + r"\%"
        return _cell(v, 3)


class MacroSet:
    """The macros of one experiment (or of a whole run). A name given twice is an error:
    silently overwriting a number the paper quotes is how a wrong number gets printed.

    ``src`` is the result file the values come from; each macro's source reads
    ``<src>: <where>`` so that ``macros.tex`` says where every number was read.
    """

    def __init__(self, src: str = "") -> None:
        self.src = src
        self.macros: dict[str, Macro] = {}

    def add(self, parts: str | Sequence[Any], value: Any, where: str, percent: bool = False) -> None:
        name = macro_name(*([parts] if isinstance(parts, str) else parts))
        source = f"{self.src}: {where}" if self.src else where
        if name in self.macros:
            raise ValueError(f"macro \\{name} defined twice ({self.macros[name].source}; {source})")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            try:
                value = float(value)  # numpy scalars
            except (TypeError, ValueError):
                raise TypeError(f"macro \\{name}: unsupported value {value!r}") from None
        self.macros[name] = Macro(name, value, source, percent)

    def add_pct(self, parts: str | Sequence[Any], value: Any, where: str) -> None:
        """The value as a fraction and, under ``<name>Pct``, as a percentage."""
        parts = [parts] if isinstance(parts, str) else list(parts)
        self.add(parts, value, where)
        self.add([*parts, "Pct"], value, where, percent=True)

    def update(self, other: Iterable[Macro]) -> None:
        for m in other:
            if m.name in self.macros:
                raise ValueError(f"macro \\{m.name} defined twice ({self.macros[m.name].source}; {m.source})")
            self.macros[m.name] = m

    def __len__(self) -> int:
        return len(self.macros)

    def __iter__(self):
        return iter(self.macros.values())

    def __getitem__(self, name: str) -> Macro:
        return self.macros[name]

    def __contains__(self, name: str) -> bool:
        return name in self.macros


def render_macros(macros: Iterable[Macro], header: Sequence[str] = ()) -> str:
    """``macros.tex``: one ``\\newcommand`` per macro (``\\newcommand`` so that a clash with a
    LaTeX command fails loudly), each with a comment naming its source."""
    lines = ["% Generated by `python -m validate.all`; do not edit. Every number the paper quotes.",
             *(f"% {_comment(h)}" for h in header)]
    seen = set()
    for m in macros:
        if not _MACRO_NAME.match(m.name):
            raise ValueError(f"bad macro name {m.name!r}: letters only, starting upper case")
        if m.name in seen:
            raise ValueError(f"macro \\{m.name} defined twice")
        seen.add(m.name)
        lines.append(rf"\newcommand{{\{m.name}}}{{{m.tex()}}}% {_comment(m.source)}")
    return "\n".join(lines) + "\n"


def _comment(s: str) -> str:
    return " ".join(str(s).split()).encode("ascii", "replace").decode()


# ---- summaries the macros quote ------------------------------------------------------------------

def finite(values: Iterable[Any]) -> list[float]:
    """The finite numbers among ``values`` (None, NaN, inf, text and booleans dropped)."""
    return [float(v) for v in values
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            and math.isfinite(float(v))]


def median(values: Iterable[Any]) -> float | None:
    v = finite(values)
    return float(np.median(v)) if v else None


def vmax(values: Iterable[Any]) -> float | None:
    v = finite(values)
    return max(v) if v else None


def vmin(values: Iterable[Any]) -> float | None:
    v = finite(values)
    return min(v) if v else None


# ---- the PDF ------------------------------------------------------------------------------------

PDF_TOOLS = ("latexmk", "tectonic")
PDF_HELP = (
    "--pdf needs a LaTeX build tool on PATH: neither latexmk nor tectonic was found. Install one:\n"
    "  Debian/Ubuntu: sudo apt-get install latexmk texlive-latex-recommended texlive-latex-extra "
    "texlive-fonts-recommended\n"
    "  or tectonic (self-contained, fetches packages on first use): https://tectonic-typesetting.github.io\n"
    "then rerun with --pdf, or build by hand: cd paper && latexmk -pdf main.tex"
)


def find_pdf_tool() -> tuple[str, str] | None:
    """``(name, path)`` of the first LaTeX build tool on PATH, or None."""
    import shutil

    for tool in PDF_TOOLS:
        path = shutil.which(tool)
        if path:
            return tool, path
    return None


def build_pdf(root, tool: tuple[str, str]):
    """Copy ``paper/`` to ``<root>/paper`` with ``\\resultsdir`` = ``..`` (the root) and build
    ``main.pdf`` there; the source tree stays clean and any root works."""
    import shutil
    import subprocess
    from pathlib import Path

    from validate._common import ROOT, atomic_write_text

    build = Path(root) / "paper"
    shutil.copytree(ROOT / "paper", build, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.pdf", "*.aux", "*.log", "*.fls", "*.fdb_latexmk",
                                                  "*.bbl", "*.blg", "*.out"))
    atomic_write_text(build / "paths.tex", "% written by validate.all --pdf: the results root is "
                                           "this folder's parent\n\\newcommand{\\resultsdir}{..}\n")
    name, path = tool
    cmd = ([path, "-pdf", "-interaction=nonstopmode", "-halt-on-error", "main.tex"] if name == "latexmk"
           else [path, "main.tex"])
    print(f"[validate.all] building the PDF: {' '.join(cmd)} (in {build})", flush=True)
    rc = subprocess.run(cmd, cwd=build, stdout=subprocess.DEVNULL if name == "latexmk" else None).returncode
    if rc != 0 or not (build / "main.pdf").exists():
        raise RuntimeError(f"{name} failed (exit {rc}); see {build / 'main.log'}")
    return build / "main.pdf"
