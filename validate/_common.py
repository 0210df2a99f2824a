"""Shared helpers for experiments: output folders, provenance, atomic writes, CSV, figures, caches.

Every experiment in ``validate/`` reads as load -> run -> compare with theory -> write, and writes
through these helpers so that every artefact is written atomically (an interruption never leaves
a half-written file) and every JSON result carries the same provenance block.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "default_out_dir",
    "provenance",
    "atomic_write_text",
    "atomic_write_bytes",
    "write_json",
    "read_json",
    "write_csv",
    "save_figure",
    "to_jsonable",
    "config_key",
    "ResultCache",
]

_PACKAGES = (
    "numpy", "scipy", "sympy", "statsmodels", "numba", "torch", "transformers",
    "safetensors", "gguf", "matplotlib", "gflanguages",
)

ROOT = Path(__file__).resolve().parent.parent


def default_out_dir(experiment: str) -> Path:
    """``results/<experiment>`` under the project root (or ``$LANGQUANT_RESULTS``)."""
    base = Path(os.environ.get("LANGQUANT_RESULTS", ROOT / "results"))
    return base / experiment


def git_commit() -> str | None:
    """The commit of the project checkout, with ``-dirty`` when it has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(names: Iterable[str] = _PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def provenance(**config: Any) -> dict[str, Any]:
    """Provenance block for a result: the experiment's configuration plus environment.

    Pass what defines the run (model, corpus, languages, bits, grid, seed, ...) as keywords.
    """
    return {
        "config": to_jsonable(config),
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
    }


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths and enums to JSON types; non-finite floats to None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "value") and isinstance(getattr(obj, "value"), (str, int)):
        return obj.value
    return obj


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman correlation over the pairs where both are finite; None with fewer than three such
    pairs or a constant side (no ranking to compare)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if np.count_nonzero(ok) < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(x[ok], y[ok]).statistic)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN/inf become null, never invalid JSON)."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False,
                                              allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
              columns: Sequence[str] | None = None) -> Path:
    """Atomically write a list of dict rows as CSV."""
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _fmt_csv(r.get(c)) for c in columns})
    return atomic_write_text(path, buf.getvalue())


def _fmt_csv(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return v


def save_figure(fig, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Atomically save a matplotlib figure; the format follows the suffix (.png, .pdf)."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def config_key(config: Mapping[str, Any], version: int = 1) -> str:
    """Short stable hash of a JSON-able configuration (the name of its cache entry)."""
    blob = json.dumps({"v": version, **to_jsonable(config)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class ResultCache:
    """One atomically written JSON file per finished item, keyed by its configuration.

    A rerun finds every finished item and an interrupted run resumes where it stopped. What it
    returns is what was written: each entry stores the sha256 of its payload, and an entry that is
    unreadable, not a cache document, without a checksum or whose payload no longer matches it
    (altered or cut by hand, a disk fault) is recomputed with a warning that names the file; so is
    one that fails the caller's ``check`` (e.g. the number of sentences per language). An entry
    whose stored configuration differs (a key collision) is recomputed silently. ``folder=None``
    disables caching.
    """

    def __init__(self, folder: str | os.PathLike | None, version: int = 1):
        self.folder = Path(folder) if folder is not None else None
        self.version = version

    def path(self, config: Mapping[str, Any]) -> Path | None:
        return None if self.folder is None else self.folder / f"{config_key(config, self.version)}.json"

    @staticmethod
    def checksum(result: Any) -> str:
        blob = json.dumps(to_jsonable(result), sort_keys=True, allow_nan=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, config: Mapping[str, Any], check: Callable[[Any], None] | None = None) -> Any | None:
        """The cached result of ``config``, or None (compute it). ``check(result)`` raises
        ValueError, naming the problem, when a payload that matches its checksum is still not
        what the caller needs."""
        p = self.path(config)
        if p is None or not p.exists():
            return None
        try:
            doc = read_json(p)
        except (OSError, ValueError) as exc:
            return self._reject(p, f"unreadable ({type(exc).__name__})")
        if not isinstance(doc, dict) or "result" not in doc or "config" not in doc:
            return self._reject(p, "not a cache entry (a JSON object with config, result and sha256)")
        if doc["config"] != to_jsonable(config):
            return None
        if doc.get("sha256") != self.checksum(doc["result"]):
            return self._reject(p, "its payload does not match its checksum (altered, cut, or written "
                                   "by an older version)")
        if check is not None:
            try:
                check(doc["result"])
            except (ValueError, TypeError, KeyError) as exc:
                return self._reject(p, str(exc))
        return doc["result"]

    def put(self, config: Mapping[str, Any], result: Any) -> None:
        p = self.path(config)
        if p is not None:
            write_json(p, {"config": config, "result": result, "sha256": self.checksum(result)})

    @staticmethod
    def _reject(path: Path, why: str) -> None:
        warnings.warn(f"cache entry {path}: {why}; recomputing it", stacklevel=3)
        return None


def use_agg() -> None:
    """Select matplotlib's non-interactive backend (no display on CI machines)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
