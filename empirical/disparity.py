"""Degradation, disparity and their paired bootstrap intervals (docs/design.md, "Degradation and disparity").

This module is the one implementation every experiment uses. Inputs are per-sentence NLL sums
(nats) per language, under the quantized model (``nll_q``) and the full-precision one
(``nll_fp``), over the same sentences. For language ``l``

    d_l = bpb_q,l / bpb_fp,l - 1 = sum_s nll_q[l][s] / sum_s nll_fp[l][s] - 1          (1)

(the byte counts are the same in both and cancel). Against a reference group ``R`` (default:
English) the disparity of ``l`` is ``d_l / dbar_R`` with ``dbar_R = mean_{r in R} d_r``, and the
run's disparity is the mean over the non-reference languages ``L \\ R``

    D = mean_{l not in R} d_l / dbar_R,       NaN when dbar_R <= 0                      (2)

(the reference is not degraded, so no ratio is meaningful).

Confidence intervals are paired bootstrap intervals over sentences: a resample draws ``n``
sentence ids with replacement; when the corpus is parallel (line-aligned) the *same* ids are used
in every language, so sentence difficulty cancels between languages; otherwise each language is
resampled on its own. Intervals are 95% percentile intervals. All ``n_boot`` resamples are
evaluated at once: ``degradation`` accepts ``(n_boot, n)`` id arrays and ``disparity`` works
elementwise on the resulting ``(n_boot,)`` arrays, so (1) and (2) are written once.

Numpy only (no torch), so statistics can be recomputed from cached NLLs anywhere.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["degradation", "disparity", "bootstrap_disparity", "bootstrap_degradation", "r_squared"]

CI_QUANTILES = (0.025, 0.975)  # 95% percentile interval


# ---- input checks ---------------------------------------------------------------------------

def _nll_arrays(nll_q: Mapping[str, Sequence[float]], nll_fp: Mapping[str, Sequence[float]]
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Float64 copies of both NLL mappings, after checking they describe the same sentences."""
    if not nll_fp:
        raise ValueError("no languages given")
    if set(nll_q) != set(nll_fp):
        missing, extra = sorted(set(nll_fp) - set(nll_q)), sorted(set(nll_q) - set(nll_fp))
        raise ValueError(f"nll_q and nll_fp must name the same languages; only in nll_fp: {missing}, "
                         f"only in nll_q: {extra}")
    q, fp = {}, {}
    for l in nll_fp:
        a, b = np.asarray(nll_q[l], dtype=np.float64), np.asarray(nll_fp[l], dtype=np.float64)
        if a.ndim != 1 or b.ndim != 1:
            raise ValueError(f"{l}: per-sentence NLL must be 1-d, got shapes {a.shape} and {b.shape}")
        if a.size != b.size:
            raise ValueError(f"{l}: {a.size} quantized but {b.size} full-precision sentence NLLs; "
                             "both must score the same sentences")
        if a.size == 0:
            raise ValueError(f"{l}: no sentences")
        for name, v in (("nll_q", a), ("nll_fp", b)):
            if not np.all(np.isfinite(v)):
                raise ValueError(f"{l}: {name} has NaN or inf at sentence {int(np.flatnonzero(~np.isfinite(v))[0])}")
            if np.any(v < 0):
                raise ValueError(f"{l}: {name} is negative at sentence {int(np.flatnonzero(v < 0)[0])}; "
                                 "give negative log-likelihoods (nats), not log-likelihoods")
        if b.sum() <= 0:
            raise ValueError(f"{l}: the full-precision NLL sums to zero; degradation is undefined")
        q[l], fp[l] = a, b
    return q, fp


def _reference_group(reference: str | Sequence[str], languages) -> list[str]:
    ref = [reference] if isinstance(reference, str) else list(reference)
    if not ref:
        raise ValueError("the reference group is empty")
    unknown = [r for r in ref if r not in languages]
    if unknown:
        raise ValueError(f"reference language(s) {unknown} not among the languages {list(languages)}")
    if all(l in ref for l in languages):
        raise ValueError("every language is in the reference group; give at least one non-reference language")
    return ref


# ---- statistics -----------------------------------------------------------------------------

def degradation(nll_q: Mapping[str, Sequence[float]], nll_fp: Mapping[str, Sequence[float]],
                idx: Mapping[str, np.ndarray] | None = None) -> dict:
    """Degradation ``d_l`` of every language, eq. (1).

    Parameters
    ----------
    nll_q, nll_fp : mapping language -> per-sentence NLL (nats)
        Quantized and full-precision scores of the same sentences, in the same order.
    idx : mapping language -> int array, optional
        Sentence ids to sum over instead of all sentences. A ``(n_boot, n)`` array gives one
        ``d_l`` per row (one bootstrap resample each).

    Returns
    -------
    dict language -> float, or -> ``(n_boot,)`` array when ``idx`` holds 2-d id arrays.

    Examples
    --------
    >>> round(degradation({"eng": [1.1, 2.2]}, {"eng": [1.0, 2.0]})["eng"], 12)
    0.1
    """
    q, fp = _nll_arrays(nll_q, nll_fp)
    if idx is not None and set(idx) != set(fp):
        raise ValueError(f"idx must give sentence ids for exactly the languages {sorted(fp)}, got {sorted(idx)}")
    out = {}
    for l in fp:
        sel = slice(None) if idx is None else np.asarray(idx[l])
        d = q[l][sel].sum(axis=-1) / fp[l][sel].sum(axis=-1) - 1.0
        out[l] = float(d) if np.ndim(d) == 0 else d
    return out


def disparity(d: Mapping[str, float | np.ndarray], reference: str | Sequence[str] = ("eng_Latn",)):
    """Disparity ``D``, eq. (2): mean over non-reference languages of ``d_l / dbar_R``.

    Parameters
    ----------
    d : mapping language -> degradation
        Floats, or equal-shape arrays (one entry per bootstrap resample).
    reference : str or sequence of str
        The reference group ``R``; every member must be in ``d``, and at least one language of
        ``d`` must be outside it.

    Returns
    -------
    float, or an array shaped like the values of ``d``; NaN where ``dbar_R <= 0``.
    """
    ref = _reference_group(reference, list(d))
    dbar = np.mean([np.asarray(d[r], dtype=np.float64) for r in ref], axis=0)
    others = np.mean([np.asarray(d[l], dtype=np.float64) for l in d if l not in ref], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(dbar > 0, others / np.where(dbar > 0, dbar, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


def _resampled_ids(sizes: Mapping[str, int], parallel: bool, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """``(n_boot, n_l)`` sentence ids per language: one shared draw when ``parallel``, else one
    draw per language in the mapping's order."""
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    if parallel:
        n = set(sizes.values())
        if len(n) != 1:
            raise ValueError(f"a parallel corpus needs the same number of sentences in every language, got {dict(sizes)}")
        shared = rng.integers(0, n.pop(), (int(n_boot), next(iter(sizes.values()))))
        return {l: shared for l in sizes}
    return {l: rng.integers(0, n, (int(n_boot), n)) for l, n in sizes.items()}


def _percentile_interval(vals: np.ndarray, n_boot: int) -> tuple[float, float]:
    vals = vals[np.isfinite(vals)]
    if vals.size < max(10, n_boot // 2):
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, CI_QUANTILES)
    return float(lo), float(hi)


def bootstrap_disparity(nll_q: Mapping[str, Sequence[float]], nll_fp: Mapping[str, Sequence[float]],
                        reference: str | Sequence[str], parallel: bool, n_boot: int = 1000,
                        seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval of ``D`` over sentences.

    Parameters
    ----------
    nll_q, nll_fp, reference
        As in :func:`degradation` and :func:`disparity`.
    parallel : bool
        Whether the corpus is line-aligned: then every resample uses the same sentence ids in
        every language (and every language must have the same number of sentences).
    n_boot : int
        Number of resamples.
    seed : int
        Seed of ``numpy.random.default_rng``; the ids are drawn as one ``(n_boot, n)`` array
        (parallel) or one per language in the order of ``nll_fp``.

    Returns
    -------
    (low, high)
        The 2.5% and 97.5% quantiles of the resampled ``D``; NaN, NaN when fewer than
        ``max(10, n_boot // 2)`` resamples give a finite ``D`` (reference not degraded).
    """
    q, fp = _nll_arrays(nll_q, nll_fp)
    _reference_group(reference, list(fp))
    idx = _resampled_ids({l: v.size for l, v in fp.items()}, parallel, n_boot, seed)
    return _percentile_interval(disparity(degradation(q, fp, idx), reference), int(n_boot))


def bootstrap_degradation(nll_q: Mapping[str, Sequence[float]], nll_fp: Mapping[str, Sequence[float]],
                          parallel: bool, n_boot: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% paired bootstrap interval of each language's ``d_l``.

    The resamples are the ones :func:`bootstrap_disparity` draws with the same ``parallel``,
    ``n_boot`` and ``seed``, so the intervals of ``d_l`` and of ``D`` describe the same resamples.

    Returns
    -------
    dict language -> (low, high)
    """
    q, fp = _nll_arrays(nll_q, nll_fp)
    idx = _resampled_ids({l: v.size for l, v in fp.items()}, parallel, n_boot, seed)
    return {l: _percentile_interval(np.asarray(v), int(n_boot)) for l, v in degradation(q, fp, idx).items()}


def r_squared(pred: Sequence[float], meas: Sequence[float]) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` of predictions against measurements,
    over the pairs where both are finite; NaN with fewer than two such pairs or when the
    measurements do not vary."""
    pred, meas = np.asarray(pred, dtype=np.float64), np.asarray(meas, dtype=np.float64)
    if pred.shape != meas.shape or pred.ndim != 1:
        raise ValueError(f"pred and meas must be 1-d of the same length, got shapes {pred.shape} and {meas.shape}")
    ok = np.isfinite(pred) & np.isfinite(meas)
    if ok.sum() < 2:
        return float("nan")
    ss_res = np.sum((meas[ok] - pred[ok]) ** 2)
    ss_tot = np.sum((meas[ok] - meas[ok].mean()) ** 2)
    return float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan")
