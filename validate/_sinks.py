"""Per-layer attention sinks and outlier magnitudes of one language's text, and their correlations
with each other and with single-block damage: shared by ``validate.outliers`` (issue #17, S-009)
and ``validate.cross_architecture`` (the research notes' claim r = -0.23, on both models).

The settings are any object with ``sink_eps``, ``sink_position``, ``massive_abs``,
``massive_ratio``, ``bootstrap`` and ``seed`` (``validate.outliers.Config``, or
:class:`SinkSettings`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from validate._mechanisms import correlation_ci, resolved

PROFILE_VERSION = 1
CLAIM_R = -0.23          # the research notes' sink-outlier correlation
MAX_EVENTS = 200         # massive-activation events listed per language in the JSON (all are counted)


@dataclass(frozen=True)
class SinkSettings:
    """The published definitions' thresholds (Gu et al.; Sun et al.) and the bootstrap."""

    sink_eps: float = 0.3
    sink_position: int = 0
    massive_abs: float = 100.0
    massive_ratio: float = 1000.0
    bootstrap: int = 1000
    seed: int = 0


def language_profile(model, windows, tokenizer, c) -> dict:
    """Sink importances and massive-activation statistics of one language's windows (JSON-able)."""
    from empirical.outliers import attention_sinks, massive_activations

    sk = attention_sinks(model, windows, c.sink_eps, c.sink_position)
    ma = massive_activations(model, windows, tokenizer, c.massive_abs, c.massive_ratio)
    return {"alpha": sk.alpha.tolist(), "events": ma.events, "counts": ma.counts(),
            "layer_max": ma.layer_max.tolist(), "layer_median": ma.layer_median.tolist(),
            "layer_argmax": ma.layer_argmax.tolist(), "segments": len(windows)}


def bootstrap_mean(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` (resampled along axis 0)."""
    v = np.asarray(values, dtype=float)
    if v.shape[0] < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.array([v[rng.integers(0, v.shape[0], v.shape[0])].mean(axis=0) for _ in range(n_boot)])
    lo, hi = np.percentile(means, [2.5, 97.5], axis=0)
    return lo, hi


def summarize_language(item: dict, c, seed: int) -> dict:
    """Per-language sink share (with its interval), per-layer statistics and massive-activation counts."""
    alpha = np.asarray(item["alpha"], dtype=float)          # segments x layers x heads
    sink = alpha > c.sink_eps
    seg_share = sink.mean(axis=(1, 2))
    lo, hi = bootstrap_mean(seg_share, c.bootstrap, seed)
    layer_seg = sink.mean(axis=2)                          # segments x layers
    llo, lhi = bootstrap_mean(layer_seg, c.bootstrap, seed)
    mx, md = np.asarray(item["layer_max"]), np.asarray(item["layer_median"])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(md > 0, mx / md, np.inf)
    return {"sink_share": float(sink.mean()), "sink_share_ci": [float(lo), float(hi)],
            "segment_sink_share": seg_share.tolist(),
            "layer_sink_share": layer_seg.mean(axis=0).tolist(),
            "layer_sink_share_ci": [np.atleast_1d(llo).tolist(), np.atleast_1d(lhi).tolist()],
            "layer_alpha": alpha.mean(axis=(0, 2)).tolist(),
            "layer_outlier_ratio": ratio.mean(axis=0).tolist(),
            "layer_max_abs": mx.mean(axis=0).tolist(), "layer_median_abs": md.mean(axis=0).tolist(),
            "top_outlier_ratio": float(np.max(ratio)),
            "top_outlier_layer": int(np.unravel_index(int(np.argmax(ratio)), ratio.shape)[1]),
            "massive": item["counts"], "massive_events": item["events"][:MAX_EVENTS],
            "segments": item["segments"]}


def correlations(summ: dict, damage, c, langs: list[str]) -> dict:
    """Sinks against outliers across layers, and both against the single-block damage."""
    L = len(summ[langs[0]]["layer_sink_share"])
    stats = {"sink_share": {l: np.asarray(summ[l]["layer_sink_share"]) for l in langs},
             "sink_alpha": {l: np.asarray(summ[l]["layer_alpha"]) for l in langs},
             "outlier_ratio": {l: np.asarray(summ[l]["layer_outlier_ratio"]) for l in langs}}
    dmg_metric = "kl" if damage.kl is not None else "bpb"
    dm = damage.metric(dmg_metric)
    if dm.shape[1] != L:
        raise ValueError(f"block damage has {dm.shape[1]} blocks, the model {L} layers")
    stats["damage"] = {l: dm[damage.languages.index(l)] for l in langs}
    groups = [b for _ in langs for b in range(L)]
    out: dict = {"damage_metric": dmg_metric}
    pairs = [("sink_share", "outlier_ratio"), ("sink_alpha", "outlier_ratio"),
             ("sink_share", "damage"), ("sink_alpha", "damage"), ("outlier_ratio", "damage")]
    for x, y in pairs:
        name = f"{x}__{y}"
        entry = {"pooled": {}, "per_language": {}}
        for method in ("spearman", "pearson"):
            xs = np.concatenate([stats[x][l] for l in langs])
            ys = np.concatenate([stats[y][l] for l in langs])
            ci = correlation_ci(xs, ys, method, c.bootstrap, c.seed, groups=groups)
            entry["pooled"][method] = {**ci, "verdict": resolved(ci)}
        for l in langs:
            ci = correlation_ci(stats[x][l], stats[y][l], "spearman", c.bootstrap, c.seed)
            entry["per_language"][l] = {**ci, "verdict": resolved(ci)}
        out[name] = entry
    pooled = out["sink_share__outlier_ratio"]["pooled"]["pearson"]
    lo, hi = pooled.get("ci_low"), pooled.get("ci_high")
    out["claim"] = {"r_claimed": CLAIM_R, "method": "pearson",
                    "r": pooled.get("r"), "ci": [lo, hi],
                    "claimed_r_in_ci": None if lo is None else bool(lo <= CLAIM_R <= hi),
                    "verdict": pooled.get("verdict")}
    return out
