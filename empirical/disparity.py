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

Two estimators of the same degradation (:func:`metric_summary`)
--------------------------------------------------------------
* ``bpb``: (1) from the quantized pass's NLL of the text.
* ``kl``: the quantized NLL replaced by ``nll_fp + KL``, with ``KL`` the per-sentence sum of
  KL(baseline || quantized) over the scored tokens, so

      d_l^KL = sum_s KL[l][s] / sum_s nll_fp[l][s]                                         (3)

  the expected relative NLL increase if each next token were drawn from the baseline's own
  distribution (KL bits per byte over baseline bits per byte). It averages over the next token
  instead of sampling it, so it needs fewer tokens for the same interval; the two agree in
  expectation only where the baseline's distribution is the text's.

Both go through (1) and (2) with the same resamples, and :func:`metric_summary` reports each
interval's width and its width times the square root of the scored tokens ("width per token":
the width one scored token would give under the usual ``1/sqrt(n)`` law), so that the metrics can
be compared for cost, and top-1 agreement with the baseline per language.

Numpy only (no torch), so statistics can be recomputed from cached NLLs anywhere.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import math

import numpy as np

__all__ = ["degradation", "disparity", "bootstrap_disparity", "bootstrap_degradation", "r_squared",
           "METRICS", "metric_nll", "metric_summary", "paired_difference"]

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


# ---- metrics: bits per byte and KL bits per byte ------------------------------------------------

METRICS = ("kl", "bpb")


def metric_nll(metric: str, nll_q: Mapping[str, Sequence[float]], nll_fp: Mapping[str, Sequence[float]],
               kl: Mapping[str, Sequence[float]] | None = None) -> dict[str, np.ndarray]:
    """The per-sentence "quantized NLL" that (1) turns into the degradation of ``metric``:
    ``nll_q`` for ``"bpb"``, ``nll_fp + kl`` for ``"kl"`` (eq. (3)).

    Raises
    ------
    ValueError
        Unknown metric; ``"kl"`` without KL values, or with negative, NaN or inf ones.
    """
    if metric == "bpb":
        return {l: np.asarray(v, dtype=np.float64) for l, v in nll_q.items()}
    if metric != "kl":
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if kl is None:
        raise ValueError("metric 'kl' needs the per-sentence KL sums (the pass kept no baseline reference)")
    if set(kl) != set(nll_fp):
        raise ValueError(f"kl and nll_fp must name the same languages, got {sorted(kl)} and {sorted(nll_fp)}")
    out = {}
    for l, v in kl.items():
        v = np.asarray(v, dtype=np.float64)
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{l}: KL has NaN or inf")
        # float rounding leaves KL of an unchanged distribution at about -1e-7 per token
        if np.any(v < -1e-3):
            raise ValueError(f"{l}: KL is negative ({v.min():.3g} nats) at sentence {int(np.argmin(v))}")
        out[l] = np.asarray(nll_fp[l], dtype=np.float64) + np.maximum(v, 0.0)
    return out


def metric_summary(nll_q: Mapping[str, Sequence[float]], nll_fp: Mapping[str, Sequence[float]],
                   kl: Mapping[str, Sequence[float]] | None, agree: Mapping[str, Sequence[float]] | None,
                   tokens: Mapping[str, Sequence[float]], reference: str | Sequence[str], parallel: bool,
                   n_boot: int = 1000, seed: int = 0,
                   n_bytes: Mapping[str, Sequence[float]] | None = None) -> dict:
    """Degradation and disparity by both metrics, with paired bootstrap intervals from the same
    resamples, their widths per scored token, and top-1 agreement.

    Parameters
    ----------
    nll_q, nll_fp : mapping language -> per-sentence NLL (nats)
    kl : mapping language -> per-sentence KL sums (nats), or None (then only ``bpb``)
    agree : mapping language -> per-sentence count of tokens whose argmax equals the baseline's, or None
    tokens : mapping language -> per-sentence scored tokens
    reference, parallel, n_boot, seed
        As in :func:`bootstrap_disparity`.
    n_bytes : mapping language -> per-sentence UTF-8 bytes, optional
        With ``kl``: also each language's KL bits per byte, ``sum_s KL_s / (ln 2 x sum_s bytes_s)``,
        with its interval from the same resamples.

    Returns
    -------
    dict with, per metric (``"bpb"``, and ``"kl"`` when given), ``degradation`` and
    ``degradation_ci`` per language, ``disparity`` and ``disparity_ci``, ``disparity_ci_width``,
    ``width_per_token`` (the D interval's width times ``sqrt(scored tokens)``) and
    ``relative_width`` (width over D) and ``resolved`` (the D interval excludes 1); ``top1_agreement`` and ``top1_agreement_ci`` per
    language (when ``agree`` is given); ``scored_tokens``; and ``token_cost_ratio``,
    ``(relative_width_bpb / relative_width_kl)^2``: how many times the scored tokens bits per
    byte needs for the relative interval width KL has (``1/sqrt(n)`` law; relative widths, since
    the two metrics' D need not be equal). With ``n_bytes``, ``kl_bpb``: per language ``kl_bpb``,
    ``ci_low``, ``ci_high`` and ``bpb_increase`` (the realised bits-per-byte increase).
    """
    q, fp = _nll_arrays(nll_q, nll_fp)
    ref = _reference_group(reference, list(fp))
    n_tok = {l: np.asarray(tokens[l], dtype=np.float64) for l in fp}
    for l in fp:
        if n_tok[l].shape != fp[l].shape:
            raise ValueError(f"{l}: {n_tok[l].size} token counts for {fp[l].size} sentences")
    total = float(sum(v.sum() for v in n_tok.values()))
    idx = _resampled_ids({l: v.size for l, v in fp.items()}, parallel, n_boot, seed)
    out: dict = {"scored_tokens": int(total), "reference": ref}
    for metric in (("kl", "bpb") if kl is not None else ("bpb",)):
        mq = metric_nll(metric, q, fp, kl)
        d = degradation(mq, fp)
        d_boot = degradation(mq, fp, idx)
        lo_hi = _percentile_interval(disparity(d_boot, ref), int(n_boot))
        width = lo_hi[1] - lo_hi[0]
        out[metric] = {
            "degradation": d,
            "degradation_ci": {l: _percentile_interval(np.asarray(v), int(n_boot)) for l, v in d_boot.items()},
            "disparity": disparity(d, ref),
            "disparity_ci": lo_hi,
            "disparity_ci_width": width,
            "width_per_token": width * math.sqrt(total),
            "relative_width": width / abs(disparity(d, ref)) if disparity(d, ref) else float("nan"),
            "resolved": bool(np.isfinite(width) and (lo_hi[0] > 1 or lo_hi[1] < 1)),
        }
    if agree is not None:
        agr = {l: np.asarray(agree[l], dtype=np.float64) for l in fp}
        out["top1_agreement"] = {l: float(agr[l].sum() / n_tok[l].sum()) for l in fp}
        out["top1_agreement_ci"] = {
            l: _percentile_interval(agr[l][idx[l]].sum(axis=-1) / n_tok[l][idx[l]].sum(axis=-1), int(n_boot))
            for l in fp}
    if kl is not None and n_bytes is not None:
        out["kl_bpb"] = {}
        for l in fp:
            k = metric_nll("kl", q, fp, kl)[l] - fp[l]  # KL, tiny negative rounding set to 0
            nb = np.asarray(n_bytes[l], dtype=np.float64)
            if nb.shape != fp[l].shape:
                raise ValueError(f"{l}: {nb.size} byte counts for {fp[l].size} sentences")
            boot = k[idx[l]].sum(axis=-1) / (math.log(2) * nb[idx[l]].sum(axis=-1))
            lo, hi = _percentile_interval(boot, int(n_boot))
            out["kl_bpb"][l] = {"kl_bpb": float(k.sum() / (math.log(2) * nb.sum())), "ci_low": lo, "ci_high": hi,
                                "bpb_increase": float((q[l].sum() - fp[l].sum()) / (math.log(2) * nb.sum()))}
    if kl is not None:
        wb, wk = out["bpb"]["relative_width"], out["kl"]["relative_width"]
        out["token_cost_ratio"] = float((wb / wk) ** 2) if wk > 0 and np.isfinite(wb / wk) else float("nan")
    return out


def paired_difference(a: tuple, b: tuple, nll_fp: Mapping[str, Sequence[float]], metric: str, parallel: bool,
                      n_boot: int = 1000, seed: int = 0, worst_over: Sequence[str] | None = None) -> dict:
    """Two quantized settings scored on the same sentences, compared by paired bootstrap.

    Parameters
    ----------
    a, b : (nll_q, kl)
        Each setting's per-sentence NLL and KL sums (``kl`` may be None for ``metric="bpb"``).
    nll_fp : mapping language -> per-sentence baseline NLL
    metric : "kl" or "bpb"
    parallel, n_boot, seed
        As in :func:`metric_summary`: the same ``seed`` draws the same resamples, so the intervals
        here describe the resamples of the settings' own intervals there.
    worst_over : sequence of str, optional
        The languages the worst is taken over (default all; e.g. the languages a held-out
        calibration never saw).

    Returns
    -------
    dict
        ``worst``: the worst language's degradation ``max_l d_l`` of ``a`` and of ``b``, their
        difference ``a - b`` with its 95% interval (each resample takes the maximum of its own
        ``d_l``, whichever language that is) and ``resolved`` (the interval excludes 0); and
        ``language``: the same for every language's own ``d_l``.
    """
    fp = {l: np.asarray(v, dtype=np.float64) for l, v in nll_fp.items()}
    qa = metric_nll(metric, a[0], fp, a[1])
    qb = metric_nll(metric, b[0], fp, b[1])
    idx = _resampled_ids({l: v.size for l, v in fp.items()}, parallel, n_boot, seed)
    da, db = degradation(qa, fp), degradation(qb, fp)
    ba, bb = degradation(qa, fp, idx), degradation(qb, fp, idx)

    def entry(x, y, xs, ys):
        lo, hi = _percentile_interval(np.asarray(xs) - np.asarray(ys), int(n_boot))
        return {"a": float(x), "b": float(y), "diff": float(x - y), "ci": (lo, hi),
                "resolved": bool(np.isfinite(lo) and (lo > 0 or hi < 0))}

    over = list(fp) if worst_over is None else list(worst_over)
    if not over or any(l not in fp for l in over):
        raise ValueError(f"worst_over must name some of {sorted(fp)}, got {over}")
    worst = entry(max(da[l] for l in over), max(db[l] for l in over), np.max([ba[l] for l in over], axis=0),
                  np.max([bb[l] for l in over], axis=0))
    worst["language_a"] = max(over, key=da.get)
    worst["language_b"] = max(over, key=db.get)
    worst["over"] = over
    return {"worst": worst, "language": {l: entry(da[l], db[l], ba[l], bb[l]) for l in fp}}
