"""A stand-in experiment for the tests of ``validate.all`` (tests/test_paper.py).

``python -m _standin [--quick] --out <root>/<name>`` writes the synthetic result of experiment
``<name>`` (``$LANGQUANT_STANDIN_DIR/<name>.src.json``) and a figure-like file, or fails with
exit status 3 when ``$LANGQUANT_STANDIN_FAIL`` names it; ``macros`` is the real experiment's, so
``validate.all`` quotes numbers through the code the paper depends on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from validate import _protocol as protocol


def macros(result):
    return protocol.experiment_module(result.experiment).macros(result)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(argv[argv.index("--out") + 1])
    name = out.name
    if os.environ.get("LANGQUANT_STANDIN_FAIL") == name:
        print(f"{name}: boom", file=sys.stderr)
        return 3
    doc = json.loads((Path(os.environ["LANGQUANT_STANDIN_DIR"]) / f"{name}.src.json").read_text())
    doc["quick_flag_seen"] = "--quick" in argv
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc))
    (out / "figure.png").write_bytes(b"png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
