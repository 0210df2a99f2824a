"""What ``import theory`` and the numeric path bring into ``sys.modules``, in a fresh interpreter.

Speed itself is measured by benchmarks/bench_import.py, not here; these tests pin the cause of
it: no torch or numba ever, no sympy until a derivation or expression is asked for, and not the
slow scipy submodules (scipy.stats 0.5 s, scipy.optimize 0.3 s) at import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEVER = ("torch", "numba", "sympy")


def _modules_after(code: str) -> dict[str, list[str]]:
    """Run ``code`` in a fresh interpreter; it calls ``snap(label)`` to record sys.modules."""
    prog = (
        "import json, sys\n"
        "seen = {}\n"
        "def snap(label):\n"
        "    seen[label] = sorted(sys.modules)\n"
        + code
        + "\nprint(json.dumps(seen))\n"
    )
    out = subprocess.run([sys.executable, "-c", prog], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _top(mods: list[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in mods)


def test_import_and_first_optimal_alpha_bring_no_sympy_torch_or_numba():
    seen = _modules_after(
        "import theory\n"
        "snap('import')\n"
        "a = theory.optimal_alpha(theory.Laplace(1.0), 4, 'int')\n"
        "assert 3.0 < a < 6.0, a\n"
        "snap('first call')\n"
    )
    for label, mods in seen.items():
        for name in NEVER:
            assert not _top(mods, name), f"{name} is imported after {label}"
    for slow in ("scipy.stats", "scipy.optimize", "scipy.integrate"):
        assert slow not in seen["import"], f"{slow} is imported by `import theory`"


def test_numeric_path_of_every_family_needs_no_sympy():
    seen = _modules_after(
        "import theory\n"
        "for name, cls in theory.FAMILIES.items():\n"
        "    d = cls()\n"
        "    grids = ['uint'] if cls.one_sided else ['aciq', 'midrise', 'midtread', 'int']\n"
        "    for g in grids:\n"
        "        a = theory.optimal_alpha(d, 4, g)\n"
        "        theory.expected_mse(d, [0.5 * a, a], 4, g)\n"
        "    theory.shannon_lower_bound(d, 4); theory.panter_dite(d, 4); theory.lloyd_max(d, 3)\n"
        "    d.entropy; d.variance; d.excess_kurtosis\n"
        "snap('numeric')\n"
        "theory.laplace_aciq()\n"
        "snap('derivation')\n"
    )
    for name in NEVER:
        assert not _top(seen["numeric"], name), f"{name} is imported by the numeric path"
    # the check is not vacuous: asking for a derivation does import sympy
    assert "sympy" in seen["derivation"]
    assert not _top(seen["derivation"], "torch") and not _top(seen["derivation"], "numba")
