"""The paper's LaTeX source, checked without LaTeX: no typed numbers, citations that resolve,
references that resolve, balanced braces and environments.

Every number the paper quotes comes from a generated file (``\\resultsdir/macros.tex``, tables and
derivations that ``python -m validate.all`` writes); a number typed into ``paper/*.tex`` goes
stale the next time the code runs. The rule checked here, on ``main.tex`` and every section it
``\\input``s (comments removed; the preamble of ``main.tex``, before ``\\begin{document}``, is
configuration, not prose; generated files and ``refs.bib`` are not checked):

1. LaTeX syntax is not prose. Removed before looking for numbers: the arguments of
   ``\\label``, ``\\ref``-like, ``\\cite``-like, ``\\input``, ``\\includegraphics``, ``\\begin``,
   ``\\end``, ``\\usepackage``, ``\\documentclass`` and the bibliography commands; every optional
   argument ``[...]`` that follows a control word, a ``}`` or ``\\\\`` (``[t]``, ``[11pt]``,
   ``\\\\[2pt]``, ``[width=0.8\\linewidth]``); and dimensions (``4pt``, ``0.9\\linewidth``).
2. Code is not prose: the argument of ``\\texttt`` when it contains a letter
   (``\\texttt{gemma-3-270m}``, ``\\texttt{int8}``).
3. A percentage (a digit followed by ``\\%``) is refused everywhere, in text and in math.
4. A decimal number (``0.5``, ``.5``) is refused everywhere, in text and in math.
5. In text (outside math), an integer is refused unless it is part of a name: a letter or an
   underscore touches it (``Q4\\_K\\_M``, ``int8``), or it follows a word and a hyphen
   (``UTF-8``, ``FLORES-200``, ``gemma-3-270m``). "15 pages", "a 15-page paper", "4--5 bits"
   and "at 4 bits" are refused; bit widths and counts the text needs are macros or words
   ("four bits").
6. In math, integers of one or two digits are the formula's own constants
   (``$3\\cdot 4^M$``, ``$2^M - 1$``, ``$\\tfrac{1}{12}$``, ``$D = 1$``) and are allowed; an integer
   of three or more digits in math is refused (a typed count or measurement such as
   ``$N = 15660$``).

``test_the_rule_catches_planted_numbers`` shows the checker failing on planted strings, and
``test_the_rule_leaves_latex_syntax_alone`` shows what it deliberately lets through.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "paper"

# ---- reading the source -------------------------------------------------------------------------


def strip_comments(tex: str) -> str:
    """Remove ``%`` comments (an escaped ``\\%`` is text)."""
    return re.sub(r"(?<!\\)%.*", "", tex)


def paper_sources(paper: Path = PAPER) -> dict[Path, str]:
    """``main.tex`` and every source file it ``\\input``s, recursively (not the generated files
    under ``\\resultsdir``), comments removed."""
    seen: dict[Path, str] = {}
    todo = [paper / "main.tex"]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        assert f.is_file(), f"the paper inputs {f}, which does not exist"
        seen[f] = strip_comments(f.read_text(encoding="utf-8"))
        for arg in re.findall(r"\\input\{([^}]*)\}", seen[f]):
            if "\\resultsdir" not in arg and "#" not in arg:
                todo.append(paper / (arg if arg.endswith(".tex") else arg + ".tex"))
    return seen


# ---- rule 1 and 2: what is not prose ---------------------------------------------------------------

_SYNTAX_COMMANDS = ("label", "ref", "eqref", "pageref", "autoref", "nameref", "cref", "Cref",
                    "cite", "citet", "citep", "citealt", "citealp", "citeauthor", "citeyear",
                    "input", "include", "includegraphics", "begin", "end", "usepackage",
                    "RequirePackage", "documentclass", "bibliography", "bibliographystyle",
                    "graphicspath", "hypersetup")
_SYNTAX_ARG = re.compile(r"\\(?:" + "|".join(_SYNTAX_COMMANDS) + r")\*?(?:\[[^\]]*\])*\{[^{}]*\}")
_OPTIONAL_ARG = re.compile(r"(\\[A-Za-z]+\*?|\\\\\*?|\})\s*\[[^\]]*\]")
_DIMENSION = re.compile(r"\d*\.?\d+\s*(?:\\(?:line|text|column)width|\\textheight"
                        r"|(?:pt|em|ex|in|cm|mm|bp|sp|pc)(?![A-Za-z]))")
_TEXTTT = re.compile(r"\\texttt\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def _without_syntax(tex: str) -> str:
    tex = strip_comments(tex)
    prev = None
    while prev != tex:  # \begin{figure}[t] -> the [t] goes once \begin{figure} has gone
        prev = tex
        tex = _OPTIONAL_ARG.sub(r"\1", tex)
        tex = _SYNTAX_ARG.sub(" ", tex)
    tex = _DIMENSION.sub(" ", tex)
    tex = _TEXTTT.sub(lambda m: " " if re.search(r"[A-Za-z]", m.group(1)) else m.group(1), tex)
    return tex


# ---- math and text --------------------------------------------------------------------------------

_MATH_ENVS = ("equation", "align", "gather", "multline", "flalign", "alignat", "dmath", "dgroup",
              "displaymath", "math", "eqnarray")
_MATH = re.compile(
    r"\$\$.*?\$\$"
    r"|(?<!\\)\$.*?(?<!\\)\$"
    r"|\\\(.*?\\\)"
    r"|\\\[.*?\\\]"
    r"|\\begin\{(" + "|".join(_MATH_ENVS) + r")\*?\}.*?\\end\{\1\*?\}",
    flags=re.S)


def split_math(tex: str) -> tuple[str, list[str]]:
    """``(text with every math region blanked, [math regions])``."""
    maths: list[str] = []

    def take(m: re.Match) -> str:
        maths.append(m.group(0))
        return " "

    return _MATH.sub(take, tex), maths


_PERCENT = re.compile(r"\d\s*\\%")
_DECIMAL = re.compile(r"(?<![\d.])\d*\.\d+")
_INTEGER = re.compile(r"\d+")


def typed_numbers(tex: str) -> list[str]:
    """Every number the rule in this module's docstring refuses in ``tex``, as short excerpts."""
    tex = _without_syntax(tex)
    hits: list[str] = []

    def excerpt(s: str, m: re.Match) -> str:
        return s[max(0, m.start() - 20):m.end() + 20].replace("\n", " ").strip()

    for m in _PERCENT.finditer(tex):
        hits.append("percentage: " + excerpt(tex, m))
    text, maths = split_math(tex)
    for part in (text, *maths):
        for m in _DECIMAL.finditer(part):
            if not _PERCENT.match(part, m.end() - 1):  # counted once, as a percentage
                hits.append("decimal: " + excerpt(part, m))
    plain = re.sub(r"\\_", "_", text)
    for m in _INTEGER.finditer(plain):
        before = plain[m.start() - 1] if m.start() else " "
        after = plain[m.end()] if m.end() < len(plain) else " "
        if re.match(r"[A-Za-z_]", before) or re.match(r"[A-Za-z_]", after):
            continue  # identifier: Q4_K_M, int8
        if re.search(r"[A-Za-z]-$", plain[max(0, m.start() - 2):m.start()]):
            continue  # a name: UTF-8, FLORES-200
        if after == "." and re.match(r"\.\d", plain[m.end():m.end() + 2]):
            continue  # the integer part of a decimal, already reported
        if before == "." and re.match(r"\d\.", plain[m.start() - 2:m.start()]):
            continue
        if re.match(r"\s*\\%", plain[m.end():]):
            continue  # already reported as a percentage
        hits.append("integer in text: " + excerpt(plain, m))
    for part in maths:
        for m in re.finditer(r"(?<![\d.])\d{3,}(?![\d.])", part):
            hits.append("integer of three or more digits in math: " + excerpt(part, m))
    return hits


# ---- the rule, shown to work -------------------------------------------------------------------------

@pytest.mark.parametrize("planted, kind", [
    ("The paper builds to 15 pages from a quick run.", "integer in text"),
    ("Student-$t$ is the best fit in 38\\% of fits.", "percentage"),
    ("a median penalty of 0.5 over layers", "decimal"),
    ("At 4 bits the predicted threshold costs more.", "integer in text"),
    ("already quantized to about 4--5 bits", "integer in text"),
    ("crosses $D = 1$ at $p^\\ast = 0.134$", "decimal"),
    ("over $N = 15660$ tokens", "integer of three or more digits in math"),
    ("a median of $38\\%$", "percentage"),
    ("a 15-page paper", "integer in text"),
    ("\\caption{MSE penalty over 24 layers.}", "integer in text"),
    ("\\paragraph{Results at 8 bits.}", "integer in text"),
    ("(95\\% bootstrap interval)", "percentage"),
    ("it costs .5 bits", "decimal"),
])
def test_the_rule_catches_planted_numbers(planted, kind):
    hits = typed_numbers(planted)
    assert hits, f"the checker let a typed number through: {planted!r}"
    assert any(h.startswith(kind) for h in hits), hits


@pytest.mark.parametrize("syntax", [
    "\\begin{figure}[t] \\centering \\end{figure}",
    "\\begin{figure}[htbp]",
    "\\toprule a & b \\\\[2pt] c & d \\\\",
    "\\label{sec:3} Section~\\ref{sec:3}, Table~\\ref{tab:alpha-2}",
    "\\includegraphics[width=0.8\\linewidth]{\\resultsdir/optimal_alpha/a1.png}",
    "\\documentclass[11pt]{article} \\usepackage[margin=1in]{geometry}",
    "stationary point $u^\\ast = W(3\\cdot 4^M)$ and $\\tfrac12 \\log_2(\\pi e/6)$ bits",
    "levels: $2^M - 1$ on the int grid, noise $\\alpha^2/(3 \\cdot 4^M)$, $D(p) \\le 1$",
    "The embedded \\texttt{gemma-3-270m} ships as a Q4\\_K\\_M GGUF.",
    "the embedded gemma-3-270m; bits per UTF-8 byte; NTREX-128 and FLORES-200",
    "\\setlength{\\tabcolsep}{4pt}\\resizebox{0.95\\linewidth}{!}{x}",
    "A typed number in a comment is not in the paper % 15 pages, 0.5, 38%",
    "\\cite[p.~12]{cover2006elements}",
    "$R^2 = \\RsqCurve$ over \\PTStepsMeasured{} steps",
])
def test_the_rule_leaves_latex_syntax_alone(syntax):
    assert typed_numbers(syntax) == []


def document_body(text: str) -> str:
    """What follows ``\\begin{document}`` (a section file has no preamble: all of it)."""
    head, sep, body = text.partition("\\begin{document}")
    return body if sep else head


def test_the_paper_types_no_number():
    """Rule of the module docstring, on every source file of the paper."""
    found = {f.relative_to(PAPER).as_posix(): typed_numbers(document_body(text))
             for f, text in paper_sources().items()}
    found = {k: v for k, v in found.items() if v}
    assert not found, f"numbers typed into the LaTeX source (use a generated macro or words): {found}"


# ---- citations, references, structure -------------------------------------------------------------------

def _bib_keys() -> list[str]:
    bib = (PAPER / "refs.bib").read_text(encoding="utf-8")
    return re.findall(r"^@\w+\{([^,\s]+),", bib, flags=re.M)


def test_every_citation_is_in_the_bibliography_and_every_entry_is_cited():
    """An unknown key prints [?] silently; an uncited entry is not printed at all."""
    keys = _bib_keys()
    assert len(keys) == len(set(keys)), "a bibliography key is defined twice"
    cited: set[str] = set()
    for text in paper_sources().values():
        for group in re.findall(r"\\cite[a-z]*\*?(?:\[[^\]]*\])*\{([^}]*)\}", text):
            cited |= {k.strip() for k in group.split(",")}
    assert cited, "the paper cites nothing"
    assert cited - set(keys) == set(), f"cited but not in refs.bib: {sorted(cited - set(keys))}"
    assert set(keys) - cited == set(), f"in refs.bib but never cited: {sorted(set(keys) - cited)}"


def test_references_resolve_and_every_figure_is_referenced():
    """Labels are unique; every \\ref to a section, appendix or figure has its \\label in the
    source (``tab:`` labels live in the generated tables and are checked by the PDF build); every
    figure the source places is referenced from the text."""
    text = "\n".join(paper_sources().values())
    labels = re.findall(r"\\label\{([^}]*)\}", text)
    assert len(labels) == len(set(labels)), f"labels defined twice: {sorted({l for l in labels if labels.count(l) > 1})}"
    refs = set(re.findall(r"\\(?:ref|eqref|pageref|autoref|cref|Cref)\{([^}]*)\}", text))
    unresolved = {r for r in refs if not r.startswith("tab:") and r not in labels}
    assert not unresolved, f"references without a label in the source: {sorted(unresolved)}"
    figures = {l for l in labels if l.startswith("fig:")}
    assert figures, "the paper places no figure"
    assert figures - refs == set(), f"figures never referenced: {sorted(figures - refs)}"


def _balanced(s: str) -> bool:
    depth = 0
    for c in re.sub(r"\\(?:[A-Za-z@]+|.)", "", s):  # control sequences: \{ is text, \\ then { is not
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


@pytest.mark.parametrize("bad", ["\\textbf{a", "a}", "\\begin{figure}\\end{table}", "\\begin{itemize}",
                                 "\\def\\\\{x", "a \\{ b }"])
def test_structure_check_catches_broken_sources(bad):
    assert _structure_errors(bad)


def _structure_errors(text: str) -> list[str]:
    errors = []
    if not _balanced(text):
        errors.append("unbalanced braces")
    stack: list[str] = []
    for kind, env in re.findall(r"\\(begin|end)\{([^}]*)\}", text):
        if kind == "begin":
            stack.append(env)
        elif not stack or stack.pop() != env:
            errors.append(f"\\end{{{env}}} closes the wrong environment")
    if stack:
        errors.append(f"{stack} never closed")
    return errors


def test_sources_are_balanced():
    errors = {f.name: e for f, text in paper_sources().items() if (e := _structure_errors(text))}
    assert not errors, errors
