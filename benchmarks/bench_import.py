"""Benchmark: time to ``import theory`` and to the first ``optimal_alpha`` call, in fresh processes.

Issue #12's goal: ``import theory`` under 0.3 s and the first ``optimal_alpha(Laplace(1.0), 4,
"int")`` under 50 ms on two cores. The baseline is the previous path measured in the same run:
the ``theory/`` package of ``--baseline-rev`` (default: the last commit before the numeric forms
were hand-written, where import pulled in sympy and scipy.stats and the first call derived and
lambdified the family's expressions), extracted by ``git archive`` into a temporary folder and
imported from there. Every number is the median over ``--repeat`` fresh interpreters, run
alternately; a Gaussian first call (which pays the one-time ``scipy.special`` import) is
printed beside the goal's Laplace call.

    python benchmarks/bench_import.py [--repeat 7] [--baseline-rev 4370d51]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the last commit whose theory/ lambdified sympy expressions at first use
DEFAULT_BASELINE = "4370d51"
GOAL_IMPORT_S = 0.3
GOAL_FIRST_CALL_S = 0.05

_PROG = """
import json, time
t0 = time.perf_counter()
import theory
t1 = time.perf_counter()
theory.optimal_alpha(theory.{family}(1.0), 4, "int")
t2 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "first": t2 - t1, "file": theory.__file__}}))
"""


_SPECIAL = """
import json, time
import numpy
t0 = time.perf_counter()
import scipy.special
print(json.dumps({"special": time.perf_counter() - t0}))
"""


def _special_import() -> float:
    out = subprocess.run([sys.executable, "-c", _SPECIAL], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["special"]


def _run(where: Path, family: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(where)}
    out = subprocess.run([sys.executable, "-c", _PROG.format(family=family)], cwd=where, env=env,
                         capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(res["file"]).resolve().is_relative_to(where.resolve()):
        raise RuntimeError(f"imported {res['file']}, not the copy under {where}")
    return res


def _extract(rev: str, dest: Path) -> None:
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "theory"], capture_output=True,
                         check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=7, help="fresh interpreters per measurement")
    p.add_argument("--baseline-rev", default=DEFAULT_BASELINE,
                   help=f"git revision whose theory/ is the baseline (default {DEFAULT_BASELINE})")
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp)
        _extract(args.baseline_rev, old)
        times: dict[tuple[str, str], list[dict]] = {}
        special = []
        for _ in range(args.repeat):
            for family in ("Laplace", "Gaussian"):
                for label, where in (("new", ROOT), ("old", old)):
                    times.setdefault((label, family), []).append(_run(where, family))
            special.append(_special_import())

    def med(label, family, what):
        return statistics.median(r[what] for r in times[(label, family)])

    print(f"python {sys.version.split()[0]}, {_cores()} cores; median of {args.repeat} fresh "
          f"interpreters; baseline: theory/ at {args.baseline_rev}")
    rows = [("import theory", "Laplace", "import"),
            ('first optimal_alpha(Laplace(1.0), 4, "int")', "Laplace", "first"),
            ('first optimal_alpha(Gaussian(1.0), 4, "int")', "Gaussian", "first")]
    for name, family, what in rows:
        new, base = med("new", family, what), med("old", family, what)
        print(f"{name:46s} {new * 1e3:8.1f} ms | baseline {base * 1e3:8.1f} ms | "
              f"{base / new:6.1f}x faster")
    print(f"  (the Gaussian's first call imports scipy.special for erfc, once: "
          f"{statistics.median(special) * 1e3:.1f} ms of it in a bare interpreter)")
    t_imp, t_first = med("new", "Laplace", "import"), med("new", "Laplace", "first")
    for name, t, goal in (("import theory", t_imp, GOAL_IMPORT_S),
                          ("first optimal_alpha (Laplace, 4 bits, int)", t_first, GOAL_FIRST_CALL_S)):
        print(f"goal: {name} < {goal * 1e3:.0f} ms: {t * 1e3:.1f} ms, "
              f"{'met' if t < goal else 'NOT met'}")


if __name__ == "__main__":
    main()
