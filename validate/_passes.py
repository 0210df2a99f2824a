"""Cached scored passes shared by the experiments that quantize a model and score it.

:class:`Passes` runs the passes of a set of protection units (decoder blocks or Linears) with some
of them quantized (``validate.phase_transition`` and the mechanism experiments);
:func:`degradations` turns a pass into every metric's per-language degradation.

One forward pass gives, per language and sentence, the NLL, the KL divergence from the baseline's
next-token distribution and the top-1 agreements with it (:meth:`empirical.bpb.BpbEngine.score`).
:class:`ScoredPasses` runs a pass under a weight setting (a context manager that changes and
restores the weights) once per configuration and caches its scores (``validate._common.ResultCache``,
atomic writes), so a rerun performs no forward pass and an interrupted run resumes.

The baseline is scored by :meth:`empirical.bpb.BpbEngine.record`, which also keeps the per-token
head statistics KL is measured against (and the residual stream for replay). They are not cached
on disk: a run whose every pass is cached never records; the first pass it has to compute records
first.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Mapping, Sequence

import numpy as np

from empirical.bpb import Scores
from empirical.disparity import degradation, metric_nll
from validate._common import ResultCache

__all__ = ["ScoredPasses", "Passes", "PassesWorker", "degradations", "SCORES_VERSION"]

SCORES_VERSION = 2  # cache entries hold {"nll", "kl", "agree"} per language (version 1: NLL only)


class ScoredPasses:
    """Scores of ``engine``'s texts under weight settings, one forward pass each, cached.

    Parameters
    ----------
    engine : empirical.bpb.BpbEngine
    cache : ResultCache or None
    key : dict
        What identifies the texts, model and anything else every pass shares; each pass adds its
        own ``setting``.
    """

    def __init__(self, engine, cache: ResultCache | None, key: Mapping):
        self.engine, self.cache = engine, cache
        self.key = {**key, "scores_version": SCORES_VERSION}
        self.sentences = {k: len(v) for k, v in engine.n_bytes.items()}
        self.run_count = 0

    def task(self, setting: Mapping, payload: Mapping, name: str):
        """The executor task (``validate._executor.Task``) of the pass ``setting``: done when the
        cache holds its scores."""
        from validate._executor import Task

        return Task(name, {**self.key, "setting": dict(setting)}, dict(payload))

    def _check(self, doc) -> None:
        """A cached pass holds finite per-sentence arrays of every language, of the right size."""
        if not isinstance(doc, dict) or not {"nll", "kl", "agree"} <= set(doc):
            raise ValueError("not a scores entry (nll, kl, agree)")
        for part in ("nll", "kl", "agree"):
            v = doc[part]
            if v is None and part != "nll":
                continue
            if not isinstance(v, dict) or set(v) != set(self.sentences):
                raise ValueError(f"{part}: languages {sorted(v) if isinstance(v, dict) else v!r}, "
                                 f"expected {sorted(self.sentences)}")
            for lang, n in self.sentences.items():
                a = np.asarray(v[lang], dtype=float)
                if a.shape != (n,):
                    raise ValueError(f"{part} of {lang}: {a.size} values, expected {n}")
                if not np.all(np.isfinite(a)):
                    raise ValueError(f"{part} of {lang}: NaN or inf")

    @staticmethod
    def _from_doc(doc) -> Scores:
        arr = lambda d: None if d is None else {k: np.asarray(v, dtype=float) for k, v in d.items()}  # noqa: E731
        return Scores(arr(doc["nll"]), arr(doc["kl"]), arr(doc["agree"]))

    def _ensure_reference(self) -> Scores | None:
        """Record the baseline (and its head statistics) if the engine has not; returns its
        scores when this call recorded it."""
        if self.engine.baseline_recorded:
            return None
        nll = self.engine.record()
        self.run_count += 1
        if self.engine.kl_unavailable is None:
            scores = Scores(nll, {k: np.zeros_like(v) for k, v in nll.items()}, self.engine.tokens)
        else:
            scores = Scores(nll)
        self._put({}, scores)
        return scores

    def _put(self, setting: Mapping, scores: Scores) -> None:
        if self.cache is not None:
            tolist = lambda d: None if d is None else {k: np.asarray(v).tolist() for k, v in d.items()}  # noqa: E731
            self.cache.put({**self.key, "setting": dict(setting)},
                           {"nll": tolist(scores.nll), "kl": tolist(scores.kl), "agree": tolist(scores.agree)})

    def get(self, setting: Mapping, apply: Callable[[], ContextManager] | None = None,
            start_block: int = 0) -> Scores:
        """Scores with the weights ``apply()`` sets (None: the baseline).

        Parameters
        ----------
        setting : mapping
            What distinguishes this pass in the cache (e.g. the quantized units). The baseline is
            ``{}`` with ``apply=None``.
        apply : callable returning a context manager, optional
            Entered around the pass; it must restore the weights on exit.
        start_block : int
            First block the setting changes (earlier blocks are replayed).
        """
        config = {**self.key, "setting": dict(setting)}
        hit = self.cache.get(config, check=self._check) if self.cache is not None else None
        if hit is not None:
            return self._from_doc(hit)
        recorded = self._ensure_reference()
        if apply is None and not setting and recorded is not None:
            return recorded
        with apply() if apply is not None else contextlib.nullcontext():
            scores = self.engine.score(start_block)
        self.run_count += 1
        self._put(setting, scores)
        return scores


class Passes:
    """Scores (NLL, KL from the baseline, top-1 agreement; ``empirical.bpb.Scores``) of the model
    with a set of units quantized, one forward pass each, cached by configuration
    (``validate._passes.ScoredPasses``) so that a rerun runs none.

    The first pass computed records the baseline (its residual stream and head statistics); a pass
    whose first quantized unit sits in block b replays blocks 0..b-1 from that record.
    """

    def __init__(self, engine, quantizer, names, unit_linears, cache: ResultCache | None, key: dict,
                 spec=None):
        self.scored = ScoredPasses(engine, cache, key)
        #: how a remote worker builds these same passes (``validate._executor.WorkerSpec``; its
        #: factory returns a :class:`PassesWorker`); None: they run in this process only
        self.spec = spec
        self.fq = quantizer
        self.names, self.unit_linears = names, unit_linears
        # first decoder block each unit touches (a unit outside the blocks forces a full pass)
        self.first_block = [min((q.block if q.block is not None else 0) for q in lins) for lins in unit_linears]

    @property
    def run_count(self) -> int:
        """Forward passes computed (not read from the cache), the baseline's recording included."""
        return self.scored.run_count

    @staticmethod
    def _setting(names: Sequence[str]) -> dict:
        return {"quantized": sorted(names)} if names else {}

    def scores(self, quantized: Sequence[int]):
        """Scores with the units ``quantized`` quantized and every other unit in full precision."""
        qset = sorted({int(i) for i in quantized})
        if not qset:
            return self.scored.get({})
        protect = {q.name for i, lins in enumerate(self.unit_linears) if i not in qset for q in lins}
        setting = self._setting([self.names[i] for i in qset])
        start = min(self.first_block[i] for i in qset)
        return self.scored.get(setting, lambda: self.fq.quantized(protect=protect), start)

    def task(self, quantized: Sequence[int]):
        """The executor task of the pass with ``quantized`` quantized (the baseline when empty)."""
        names = sorted(self.names[i] for i in {int(i) for i in quantized})
        label = "baseline" if not names else "quantized " + (",".join(names) if len(names) <= 4 else
                                                               f"{len(names)} units ({names[0]}, ...)")
        return self.scored.task(self._setting(names), {"quantized": names}, label)

    def prefetch(self, sets: Sequence[Sequence[int]], bar=None):
        """Hand the passes of ``sets`` to the current executor (``validate._executor.current``)
        ahead of reading them: a Ray executor computes the uncached ones on its workers and writes
        them into the cache; the in-process executor does nothing (each pass is computed when
        :meth:`scores` first asks for it). Returns the executor's ``GridReport`` (None in process)."""
        from validate._executor import current

        ex = current()
        if not ex.prefetches or not sets:
            return None
        if self.spec is None:
            raise ValueError("these passes have no worker spec, so they cannot run on remote workers")
        report = ex.map(self.spec, [self.task(s) for s in sets], cache=self.scored.cache, bar=bar)
        self.scored.run_count += report.computed
        return report


class PassesWorker:
    """A :class:`Passes` as an executor worker (``validate._executor.Worker``): the payload
    ``{"quantized": [unit names]}`` runs that pass. Built with a ``RecordingCache``, it returns the
    entries the pass produced (its recorded baseline's among them, the first time)."""

    def __init__(self, passes: Passes):
        self.passes = passes

    def compute(self, payload: Mapping) -> list:
        names = list(payload.get("quantized", []))
        unknown = [n for n in names if n not in self.passes.names]
        if unknown:
            raise ValueError(f"unknown units {unknown}; this model's units are {self.passes.names[:3]}...")
        self.passes.scores([self.passes.names.index(n) for n in names])
        drain = getattr(self.passes.scored.cache, "drain", None)
        return drain() if drain is not None else []


def degradations(scores, base) -> dict[str, dict[str, float]]:
    """``{metric: {language: d_l}}`` of one pass against the baseline, for every metric it has."""
    out = {"bpb": degradation(scores.nll, base.nll)}
    if scores.kl is not None:
        out["kl"] = degradation(metric_nll("kl", scores.nll, base.nll, scores.kl), base.nll)
    return out
