"""Per-layer, per-language activation distributions, their MSE-optimal clipping, and how much of
their energy a few outlier channels hold.

``python -m validate.distributions [--quick] [--model gemma-3-270m] [--corpus udhr|DIR]
[--languages eng_Latn heb_Hebr ...] [--sites residual|linear_input|all] [--include-bos] [--out DIR]``
(``--help`` lists every flag with its default)

For each layer x language this experiment captures activations of a real model on a multilingual
corpus (:mod:`empirical.capture`), fits the docs/design.md families to the reservoir sample
(:func:`empirical.fits.fit_all`, best by BIC), and computes theory's ``alpha*`` for the best fit
(:func:`theory.optimal_alpha`), and the measured optimum: the exact MSE sweep of the stratified
sample (the exact top ``--top-k`` magnitudes plus the weighted reservoir,
:func:`empirical.optimal.stratified_optimal_alpha`: an estimate over all captured values), with
what theory's alpha* costs against it (``theory_penalty``). The BOS position is left out unless
``--include-bos`` (:func:`empirical.capture.capture_corpus`).

Site models (issue #14, docs/design.md "Site models"). For every site x language, from the same
capture pass, :func:`empirical.site_fit.fit_site_models` fits the unimodal model, the channel scale
mixtures, bulk plus outlier channels, body plus generalized Pareto tail and the held-out selection;
each model's alpha* is priced at ``--excess-bits`` against the stratified sweep
(``alpha_excess_mse`` in the JSON: per site kind, model and bit width the median, 90th percentile
and share within 5% of the extra MSE), and each language's penalty under the calibration-mix
alpha is predicted by every model and measured (``penalty_spearman``, ``penalty_agreement``,
``penalties``); ``goals`` says which of the issue's goals the run met and by how much. Linear
inputs read by several projections (q/k/v, gate/up) are modelled once (``shares_input_with``).

In the same capture pass every site keeps the sum of squares of each channel (hidden unit) over
all its values (:meth:`empirical.capture.StreamingStats.channel_energy`). A shared clipping
threshold's MSE is a sum over those squares, so for every residual layer ``channel_energy``
reports the share of the total held by the single largest channel, that channel's index and the
number of channels that hold half of it, per language and with the languages pooled (their sums
of squares added: the energy of every captured token).

Outputs under ``--out`` (default ``results/distributions``):

* ``kurtosis_heatmap.png/.pdf`` - excess kurtosis, layer x language;
* ``best_fit_families.tex`` - the best-fit family per layer x language;
* ``alpha_spread.tex`` - the layers whose swept alpha* differs most across languages, with the
  same ratio of theory's alpha*;
* ``channel_energy.png`` and ``channel_energy.csv`` - per residual layer, the top channel's share
  of the sum of squares and the channels holding half of it;
* ``alpha_excess.png``, ``alpha_excess.csv`` and ``alpha_excess.tex`` - the extra MSE of every
  site model's alpha* (4 bits in the figure and table; every bit width in the CSV);
* ``distributions.csv`` - one row per (site, language);
* ``distributions.json`` - all rows, the spread table, the channel energy and provenance.

``alpha*`` comes from the best family by BIC for which it is finite: a Student-t fit with
``nu <= 2`` (common for the residual stream's massive activations) has infinite variance and no
MSE-optimal clipping, so the next family is used; ``alpha_family`` names it.

Excess kurtosis is the streaming moment estimate over *all* captured values; the fit uses the
seeded reservoir sample. With the embedded ``gemma-3-270m`` the "full precision" model is the
dequantized Q4_K_M GGUF (already about 4-5 bits per weight); every output says so.

Languages are FLORES-200 codes (docs/design.md, "Language codes"). The default list is trimmed to
the languages the corpus has; a list given on the command line must be there in full. Each
language (its capture, fits and sweeps) is one cached item under ``<out>/cache``, keyed by what
determines it, so a rerun loads no model and an interrupted run resumes at the next language.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from validate import _protocol as protocol
from validate._common import save_figure, spearman, to_jsonable, use_agg, write_csv, write_json
from validate._latex import MacroSet, finite, median, tex_text, vmax, vmin, write_latex_table
from validate._synthetic import family_label

EXPERIMENT = "distributions"
#: The grids ``--executor ray`` distributes (validate._executor).
EXECUTOR_GRIDS = "each language's capture, fits and sweeps"
DEFAULT_LANGUAGES = ("eng_Latn", "fra_Latn", "rus_Cyrl", "zho_Hans", "hin_Deva", "arb_Arab",
                     "heb_Hebr", "swh_Latn", "yor_Latn")
QUICK_LANGUAGES = ("eng_Latn", "heb_Hebr", "zho_Hans")
SITES = ("residual", "linear_input", "all")
#: Part of every cache key: bump it when an item's stored format changes.
ITEM_VERSION = 4

_CSV_COLUMNS = [
    "site", "kind", "layer", "language", "count", "mean", "std", "skewness", "excess_kurtosis",
    "absmax", "best_family", "alpha_family", "fitted_scale", "bic", "ks", "alpha_star",
    "alpha_swept", "theory_penalty", "alpha_over_std", "alpha_over_absmax", "top_channel",
    "top_channel_share", "channels_for_half", "error",
]
_ENERGY_COLUMNS = ["site", "layer", "language", "channels", "top_channel", "top_share",
                   "top_absmax", "channels_for_half"]


@dataclass(frozen=True)
class Config:
    model: str = protocol.param("gemma-3-270m", "embedded name, tiny-* test model, local folder or hub id")
    corpus: str = protocol.param("udhr", "'udhr' (embedded) or a one-file-per-language folder")
    languages: tuple[str, ...] = protocol.param(
        DEFAULT_LANGUAGES, "languages (FLORES-200, ISO 639-3 or 639-1 codes); the default list is "
                           "trimmed to those the corpus has")
    sites: str = protocol.param("all", "which activations to fit per layer", choices=SITES)
    bits: int = protocol.param(4, "bit width of the clipping threshold alpha*")
    grid: str = protocol.param("int", "quantizer grid of alpha* (aciq, midrise, midtread, int)")
    max_segments: int | None = protocol.param(None, "segments per language (none: all)")
    reservoir: int = protocol.param(8192, "reservoir sample per site x language (what the fits and sweeps see)")
    include_bos: bool = protocol.param(False, "also record the BOS position (it is the same token for every "
                                              "language and often carries massive activations)")
    device: str = protocol.param("cpu", "cpu, cuda or cuda:N")
    seed: int = protocol.param(0, "seed of the reservoir samples and the fits")
    top: int = protocol.param(5, "layers listed in the alpha* spread table")
    excess_bits: tuple[int, ...] = protocol.param(
        (3, 4, 8), "bit widths (int grid) at which every site model's alpha* is priced against the sweep")
    top_k: int = protocol.param(1024, "largest magnitudes kept exactly per site x language (the sweep "
                                      "reference: these plus a weighted reservoir of the rest)")
    models: bool = protocol.param(True, "fit the site models of theory.site_models and price them "
                                        "(--no-models: moments, fits and channel energy only)")

    def __post_init__(self):
        langs = protocol.check_sources(self.model, self.corpus, self.languages)
        grid = protocol.check_bits_grid(self.bits, self.grid, signed="activations")
        if self.sites not in SITES:
            raise protocol.ConfigError(f"--sites {self.sites}: expected one of {', '.join(SITES)}")
        protocol.check_positive("max_segments", self.max_segments, optional=True)
        protocol.check_positive("reservoir", self.reservoir)
        if self.reservoir < 100:
            raise protocol.ConfigError(f"--reservoir: {self.reservoir} values are too few for a "
                                       "distribution fit (use >= 100)")
        protocol.check_positive("seed", self.seed, allow_zero=True)
        protocol.check_positive("top", self.top)
        protocol.check_bits_grid(tuple(self.excess_bits), "int", flag="--excess-bits", signed="activations")
        if not self.excess_bits or len(set(self.excess_bits)) != len(self.excess_bits):
            raise protocol.ConfigError(f"--excess-bits {' '.join(map(str, self.excess_bits))}: give "
                                       "distinct bit widths")
        protocol.check_positive("top_k", self.top_k)
        protocol.check_device(self.device)
        protocol.frozen_set(self, languages=langs, grid=grid)

    @classmethod
    def quick(cls) -> "Config":
        return cls(languages=QUICK_LANGUAGES, max_segments=4, reservoir=2048, top_k=256, sites="residual")

    @property
    def strict_languages(self) -> bool:
        """Whether every language must be in the corpus (a list other than the defaults)."""
        return self.languages not in (DEFAULT_LANGUAGES, QUICK_LANGUAGES)


# ---- corpus -------------------------------------------------------------------------------------

def _load_corpus(spec: str, languages: Sequence[str], strict: bool = True, segments: int | None = None):
    """The corpus restricted to ``languages``; unless ``strict``, those it lacks are dropped."""
    try:
        return protocol.load_corpus(spec, languages, segments)
    except ValueError:
        if strict:
            raise
    keep = []
    for lang in languages:  # the default list need not be fully present in every corpus
        try:
            protocol.load_corpus(spec, [lang], 1)
            keep.append(lang)
        except ValueError:
            pass
    if not keep:
        raise ValueError(f"none of the languages {', '.join(languages)} is in corpus {spec!r}")
    return protocol.load_corpus(spec, keep, segments)


# ---- one language: capture, fit, sweep ----------------------------------------------------------

def _site_row(st, site, lang: str, bits: int, grid: str, seed: int) -> dict[str, Any]:
    """Moments, channel energy, best fit, theory's alpha* and the swept optimum of one site x language."""
    from empirical.fits import fit_all
    from empirical.optimal import empirical_optimal_alpha, stratified_mse, stratified_optimal_alpha
    from empirical.sweep import prepare
    from theory import optimal_alpha

    x = st.sample()
    e = st.channel_energy()
    row: dict[str, Any] = dict(site=site.name, kind=site.kind, layer=site.block, language=lang,
                               count=st.n, mean=st.mean, std=st.std, skewness=st.skewness,
                               excess_kurtosis=st.excess_kurtosis, absmax=st.absmax,
                               top_channel=e["top_channel"], top_channel_share=e["top_share"],
                               channels_for_half=e["channels_for_half"])
    # The measured optimum: the exact MSE sweep of the stratified sample (the exact top
    # magnitudes plus the weighted reservoir: an estimate of the MSE over all captured values,
    # docs/design.md "Site models"); the plain reservoir when the stream has no top store.
    sm = prepare(x)
    strat = None
    try:
        strat = st.stratified()
    except (ValueError, AttributeError):
        pass
    if float(sm.absmax[0]) > 0:
        if strat is not None:
            opt = stratified_optimal_alpha(strat, bits, grid)
        else:
            opt = empirical_optimal_alpha(sm, bits, grid)
        row.update(alpha_swept=opt.alpha, swept_mse=opt.mse)
    try:
        fits = fit_all(x, seed=seed)
    except Exception as exc:  # one bad fit must not lose the others; it is reported
        row.update(best_family=None, error=f"{type(exc).__name__}: {exc}")
        return row
    best = fits[0]
    row.update(best_family=best.family, best_params=dict(best.params), best_loc=best.loc,
               bic=best.bic, ks=best.ks, bic_by_family={f.family: f.bic for f in fits})
    # alpha* needs a finite-variance model (Student-t with nu <= 2 has none): take the best family
    # by BIC for which theory gives one, and say which it was.
    errors = []
    for f in fits:
        try:
            dist = f.to_theory()
            a = float(optimal_alpha(dist, bits, grid))
        except Exception as exc:
            errors.append(f"{f.family}: {type(exc).__name__}: {exc}")
            continue
        row.update(alpha_family=f.family, fitted_scale=float(np.asarray(dist.scale)), alpha_star=a,
                   alpha_over_std=a / st.std if st.std > 0 else math.nan,
                   alpha_over_absmax=a / st.absmax if st.absmax > 0 else math.nan)
        if row.get("swept_mse"):
            # what theory's alpha* costs on all values (or the sample), relative to the swept optimum
            m_a = (float(stratified_mse(strat, np.array([a]), bits, grid)[0]) if strat is not None
                   else float(sm.mse(a, bits, grid)))
            row["theory_penalty"] = m_a / row["swept_mse"] - 1.0
        break
    if errors:
        row["error"] = "; ".join(errors)
    return row


#: the common alpha grid of the per-language curves (log10 steps of 1/40): a site's
#: languages are compared on the same points to find the calibration-mix alpha
CURVE_STEP = 1.0 / 40.0
CURVE_WINDOW = 12.0  # each language's curves span its own optimum / 12 .. x 12
#: the measured curves of two disjoint halves of each stratified sample
HALVES = ("measured_half1", "measured_half2")


def _site_models_row(st, config: Config) -> dict[str, Any]:
    """Every site model (:func:`empirical.site_fit.fit_site_models`), its alpha* and extra MSE at
    each of ``excess_bits`` and, at ``bits``, its MSE curve and the measured one on the common
    grid (for the per-language penalties of the calibration mix, computed across languages)."""
    from empirical.site_fit import excess_rows, fit_site_models

    try:
        models, info = fit_site_models(st, config.bits, "int", seed=config.seed, select_bits=config.bits)
    except (ValueError, RuntimeError) as exc:
        return {"models_error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, Any] = {"model_info": info}
    try:
        out["excess"] = excess_rows(st, models, config.excess_bits, "int", detail_bits=config.bits)
        out.update(_curves(st, models, out["excess"], config))
    except (ValueError, RuntimeError) as exc:  # a degenerate site (constant, too few values) is reported
        out["models_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _curves(st, models, excess: Sequence[dict], config: Config) -> dict[str, Any]:
    """The measured curve, its two halves' and every model's, at ``bits`` on the common grid."""
    from empirical.site_fit import model_curve, reference_curve

    out: dict[str, Any] = {}
    own = next((r["alpha_swept"] for r in excess if r["bits"] == config.bits), None)
    if own and own > 0:
        lo = math.floor((math.log10(own / CURVE_WINDOW)) / CURVE_STEP)
        hi = math.ceil((math.log10(own * CURVE_WINDOW)) / CURVE_STEP)
        alphas = 10.0 ** (np.arange(lo, hi + 1) * CURVE_STEP)
        curves = {"measured": reference_curve(st, alphas, config.bits, "int")}
        # two disjoint halves of the stratified sample: how reproducible the measured penalties
        # are (their split-half agreement bounds what any model's agreement can reach)
        from empirical.optimal import stratified_mse

        for name, half in zip(HALVES, st.stratified().split(config.seed + 1)):
            curves[name] = np.asarray(stratified_mse(half, alphas, config.bits, "int"), dtype=np.float64)
        for name, m in models.items():
            if not isinstance(m, Exception) and name != "channel_mixture":
                curves[name] = model_curve(m, alphas, config.bits, "int")
        out["curves"] = {"start": int(lo), **{k: [float(v) for v in c] for k, c in curves.items()}}
    return out


def language_item(config: Config, loaded, corpus, lang: str) -> dict[str, Any]:
    """Capture ``lang`` alone and analyse every site: ``rows`` (one per site), the residual
    sites' per-channel sums of squares and absmax (``channel_sumsq``, ``channel_absmax``: pooled
    across languages later) and the capture's wall time."""
    from empirical.capture import capture_activations, capture_corpus

    model, tok, view = loaded
    kinds = {"residual": ("residual",), "linear_input": ("linear_input",),
             "all": ("residual", "linear_input")}[config.sites]
    t0 = time.perf_counter()
    with capture_activations(model, view, [lang], reservoir_size=config.reservoir, seed=config.seed,
                             linear_inputs="linear_input" in kinds, linear_outputs=False,
                             residual="residual" in kinds, top_k=config.top_k) as cap:
        capture_corpus(cap, tok, corpus, languages=[lang], device=config.device,
                       include_bos=config.include_bos)
    capture_s = time.perf_counter() - t0
    rows, sumsq, absmax = [], {}, {}
    seen: dict[tuple, str] = {}  # q/k/v (and gate/up) read one input: its models are fitted once
    for site in protocol.progress(cap.sites, desc=f"fits {lang}", unit="site"):
        st = cap.get(site, lang)
        row = _site_row(st, site, lang, config.bits, config.grid, config.seed)
        if config.models:
            key = (site.kind, st.n, None if st.channel_sum is None else st.channel_sum.tobytes())
            if key in seen:
                row["shares_input_with"] = seen[key]
            else:
                seen[key] = site.name
                row.update(_site_models_row(st, config))
        rows.append(row)
        if site.kind == "residual":
            sumsq[site.name], absmax[site.name] = st.channel_sumsq, st.channel_absmax
    return to_jsonable({"rows": rows, "channel_sumsq": sumsq, "channel_absmax": absmax,
                        "capture_seconds": capture_s})


def _item_key(config: Config, corpus, lang: str) -> dict[str, Any]:
    """Everything that determines one language's item."""
    return {"v": ITEM_VERSION, "experiment": EXPERIMENT, "model": config.model, "language": lang,
            "corpus_digest": protocol.corpus_digest(corpus.select([lang])), "sites": config.sites,
            "bits": config.bits, "grid": config.grid, "reservoir": config.reservoir,
            "include_bos": config.include_bos, "seed": config.seed, "device": config.device,
            "excess_bits": list(config.excess_bits), "top_k": config.top_k, "models": config.models}


# ---- summaries ----------------------------------------------------------------------------------

def channel_energy_rows(items: dict[str, dict], rows: Sequence[dict]) -> list[dict[str, Any]]:
    """Per residual layer: one row per language and one with the languages pooled (language
    ``all``: the sums of squares added over languages, the absmax the largest of theirs)."""
    from empirical.capture import channel_energy

    layer_of = {r["site"]: r["layer"] for r in rows}
    by_site: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for lang, it in items.items():
        for site, sq in (it.get("channel_sumsq") or {}).items():
            am = it["channel_absmax"][site]
            by_site.setdefault(site, {})[lang] = (np.asarray(sq, dtype=np.float64),
                                                  np.asarray(am, dtype=np.float64))
    out = []
    for site, per_lang in by_site.items():
        pooled = (np.sum([sq for sq, _ in per_lang.values()], axis=0),
                  np.max([am for _, am in per_lang.values()], axis=0))
        for lang, (sq, am) in [*per_lang.items(), ("all", pooled)]:
            out.append({"site": site, "layer": layer_of.get(site), "language": lang,
                        **channel_energy(sq, am)})
    return to_jsonable(out)


def _alpha_spread(rows, languages) -> list[dict]:
    """Per site: the swept (measured) alpha* across languages, its max/min ratio and the extreme
    languages, and the same ratio of theory's alpha* (from the fitted families). Sorted by the
    measured ratio: a layer where only the fits disagree (a Student-t near nu = 2 moves alpha* a
    lot) is not a layer where languages need different thresholds."""
    swept: dict[tuple, dict] = {}
    theory: dict[tuple, dict] = {}
    for r in rows:
        key = (r["site"], r["kind"], r["layer"])
        if r.get("alpha_swept") is not None:
            swept.setdefault(key, {})[r["language"]] = r["alpha_swept"]
        if r.get("alpha_star") is not None and math.isfinite(r["alpha_star"]):
            theory.setdefault(key, {})[r["language"]] = r["alpha_star"]
    out = []
    for (site, kind, layer), a in swept.items():
        if len(a) < 2:
            continue
        lo, hi = min(a, key=a.get), max(a, key=a.get)
        t = theory.get((site, kind, layer), {})
        t_ratio = max(t.values()) / min(t.values()) if len(t) >= 2 and min(t.values()) > 0 else None
        out.append(dict(site=site, kind=kind, layer=layer, ratio=a[hi] / a[lo] if a[lo] > 0 else math.inf,
                        min_language=lo, min_alpha=a[lo], max_language=hi, max_alpha=a[hi],
                        theory_ratio=t_ratio, alpha_by_language=a, theory_alpha_by_language=t))
    out.sort(key=lambda d: -d["ratio"])
    return out


# ---- site models: extra MSE and per-language penalties -------------------------------------------

GOAL_MEDIAN, GOAL_SHARE, GOAL_SPEARMAN, GOAL_BITS = 0.02, 0.9, 0.8, 4


def _quantile_summary(v: Sequence[float]) -> dict[str, Any]:
    a = np.asarray([x for x in v if x is not None and math.isfinite(x)], dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "median": None, "q90": None, "share_within_5pct": None}
    return {"n": int(a.size), "median": float(np.median(a)), "q90": float(np.quantile(a, 0.9)),
            "share_within_5pct": float(np.mean(a <= 0.05))}


def alpha_excess_summary(rows: Sequence[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{site kind: {model: {bits: {median, q90, share_within_5pct, n, failed}}}}`` of the extra
    MSE that each model's alpha* costs over the stratified sweep's optimum, over layers x
    languages (a model that could not be fitted at a site counts in ``failed``, not in the
    quantiles)."""
    acc: dict[tuple, list] = {}
    failed: dict[tuple, int] = {}
    for r in rows:
        for e in r.get("excess") or []:
            key = (r["kind"], e["model"], str(e["bits"]))
            if e.get("excess") is None:
                failed[key] = failed.get(key, 0) + 1
                acc.setdefault(key, [])
            else:
                acc.setdefault(key, []).append(e["excess"])
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (kind, model, bits), v in sorted(acc.items()):
        out.setdefault(kind, {}).setdefault(model, {})[bits] = {**_quantile_summary(v),
                                                                "failed": failed.get((kind, model, bits), 0)}
    return out


def alpha_distance_summary(rows: Sequence[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{site kind: {model: {bits: median |alpha_model / alpha_swept - 1|}}}`` over layers x
    languages: how far each model puts the threshold from the sweep's (a flat curve can hide a
    large distance in a small extra MSE, and the reverse)."""
    acc: dict[tuple, list] = {}
    for r in rows:
        for e in r.get("excess") or []:
            if e.get("alpha") and e.get("alpha_swept"):
                acc.setdefault((r["kind"], e["model"], str(e["bits"])), []).append(
                    abs(e["alpha"] / e["alpha_swept"] - 1.0))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (kind, model, bits), v in sorted(acc.items()):
        out.setdefault(kind, {}).setdefault(model, {})[bits] = float(np.median(v))
    return out


def language_penalties(rows: Sequence[dict], weights: Mapping[str, float]) -> list[dict[str, Any]]:
    """Per site and model: the calibration-mix alpha (minimising the ``weights``-weighted sum of
    the languages' curves on the common grid) and each language's penalty under it,
    ``MSE_l(alpha_mix) / min MSE_l - 1``, by the model's curves and by the measured ones."""
    by_site: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r.get("curves"):
            by_site.setdefault(r["site"], {})[r["language"]] = r
    out = []
    for site, per_lang in by_site.items():
        langs = list(per_lang)
        if len(langs) < 2:
            continue
        starts = {l: per_lang[l]["curves"]["start"] for l in langs}
        lo = min(starts.values())
        hi = max(starts[l] + len(per_lang[l]["curves"]["measured"]) for l in langs)
        models = set.intersection(*(set(per_lang[l]["curves"]) - {"start"} for l in langs))
        for model in sorted(models):
            M = np.full((len(langs), hi - lo), np.nan)
            for j, l in enumerate(langs):
                c = np.asarray(per_lang[l]["curves"][model], dtype=np.float64)
                M[j, starts[l] - lo: starts[l] - lo + c.size] = c
            w = np.array([weights.get(l, 1.0) for l in langs], dtype=np.float64)
            total = np.sum(M * w[:, None], axis=0)  # NaN where a language's window ends
            if not np.any(np.isfinite(total)):
                continue
            k = int(np.nanargmin(total))
            x_mix = k + _parabola_vertex(total, k)[0]
            best = np.array([_parabola_vertex(M[j], int(np.nanargmin(M[j])))[1] for j in range(len(langs))])
            at = np.array([_quadratic_at(M[j], x_mix) for j in range(len(langs))])
            pen = np.maximum(at / best - 1.0, 0.0)
            for j, l in enumerate(langs):
                out.append({"site": site, "kind": per_lang[l]["kind"], "layer": per_lang[l]["layer"],
                            "model": model, "language": l, "alpha_mix": 10.0 ** ((lo + x_mix) * CURVE_STEP),
                            "penalty": float(pen[j]) if np.isfinite(pen[j]) else None})
    return out


def _parabola_vertex(y: np.ndarray, k: int) -> tuple[float, float]:
    """``(offset, value)`` of the minimum of the parabola through ``y[k-1], y[k], y[k+1]`` (the
    grid's minimum at ``k``): the curve's minimum between grid points (a step of the grid is 6% in
    alpha, and a penalty of a few tenths of a per cent must not be the grid's). ``(0, y[k])`` at an
    end of the curve or next to a missing point."""
    if k <= 0 or k >= y.size - 1 or not np.all(np.isfinite(y[k - 1: k + 2])):
        return 0.0, float(y[k])
    a, b, c = float(y[k - 1]), float(y[k]), float(y[k + 1])
    den = a - 2 * b + c
    if den <= 0:
        return 0.0, b
    d = 0.5 * (a - c) / den
    return d, b - 0.25 * (a - c) * d


def _quadratic_at(y: np.ndarray, x: float) -> float:
    """``y`` at fractional index ``x`` by the parabola through its three nearest grid points (NaN
    where one is missing)."""
    j = int(round(x))
    j = min(max(j, 1), y.size - 2)
    if not np.all(np.isfinite(y[j - 1: j + 2])):
        return float(y[int(round(x))]) if 0 <= int(round(x)) < y.size else math.nan
    t = x - j
    a, b, c = float(y[j - 1]), float(y[j]), float(y[j + 1])
    return b + 0.5 * t * (c - a) + 0.5 * t * t * (a - 2 * b + c)


def penalty_agreement(pen_rows: Sequence[dict]) -> dict[str, Any]:
    """Spearman correlation of each model's per-language penalties of the calibration-mix alpha
    with the measured ones (pooled over sites x languages, and per site kind), and how often the
    model names the same worst language as the measurement."""
    meas = {(p["site"], p["language"]): p["penalty"] for p in pen_rows if p["model"] == "measured"}
    out: dict[str, Any] = {}
    models = sorted({p["model"] for p in pen_rows} - {"measured", *HALVES})
    for model in models:
        mine = [p for p in pen_rows if p["model"] == model and (p["site"], p["language"]) in meas]
        t = [p["penalty"] if p["penalty"] is not None else math.nan for p in mine]
        m = [meas[(p["site"], p["language"])] if meas[(p["site"], p["language"])] is not None else math.nan
             for p in mine]
        kinds = sorted({p["kind"] for p in mine})
        same, sites = 0, 0
        for site in {p["site"] for p in mine}:
            ps = [p for p in mine if p["site"] == site and p["penalty"] is not None
                  and meas[(site, p["language"])] is not None]
            if len(ps) >= 2:
                sites += 1
                same += max(ps, key=lambda p: p["penalty"])["language"] == \
                    max(ps, key=lambda p: meas[(site, p["language"])])["language"]
        out[model] = {"spearman": spearman(t, m), "n": len(mine),
                      "same_worst_language_share": same / sites if sites else None,
                      "by_kind": {k: spearman([a for a, p in zip(t, mine) if p["kind"] == k],
                                               [b for b, p in zip(m, mine) if p["kind"] == k]) for k in kinds}}
    return out


def penalty_reliability(pen_rows: Sequence[dict]) -> dict[str, Any]:
    """Split-half reliability of the measured penalties: the Spearman correlation between the
    penalties measured on two disjoint halves of every stratified sample (pooled, and per site
    kind), and its Spearman-Brown step-up to the full sample, ``2 r / (1 + r)``. A model's
    agreement with the measurement cannot be expected to exceed it: the rest is sampling noise of
    the reference."""
    h1 = {(p["site"], p["language"]): p for p in pen_rows if p["model"] == HALVES[0]}
    h2 = {(p["site"], p["language"]): p["penalty"] for p in pen_rows if p["model"] == HALVES[1]}
    keys = [k for k in h1 if k in h2 and h1[k]["penalty"] is not None and h2[k] is not None]
    if len(keys) < 3:
        return {"spearman_halves": None, "spearman_brown": None, "n": len(keys), "by_kind": {}}

    def pair(ks):
        r = spearman([h1[k]["penalty"] for k in ks], [h2[k] for k in ks])
        return {"spearman_halves": r, "spearman_brown": None if r is None else 2 * r / (1 + r) if r > -1 else None,
                "n": len(ks)}

    kinds = sorted({h1[k]["kind"] for k in keys})
    return {**pair(keys), "by_kind": {kd: pair([k for k in keys if h1[k]["kind"] == kd]) for kd in kinds}}


def goals(excess: Mapping[str, Any], agreement: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals for the selected model, met or not and by how much (nothing is tuned
    to them: the numbers are what the run measured)."""
    out = []
    for kind in ("residual", "linear_input"):
        s = ((excess.get(kind) or {}).get("selected") or {}).get(str(GOAL_BITS))
        if not s or s.get("median") is None:
            continue
        out.append({"goal": f"{kind}: median extra MSE <= {GOAL_MEDIAN}", "value": s["median"],
                    "met": s["median"] <= GOAL_MEDIAN})
        out.append({"goal": f"{kind}: share within 5% >= {GOAL_SHARE}", "value": s["share_within_5pct"],
                    "met": s["share_within_5pct"] >= GOAL_SHARE})
    sel = (agreement.get("selected") or {}).get("spearman")
    if sel is not None:
        out.append({"goal": f"penalty Spearman >= {GOAL_SPEARMAN}", "value": sel, "met": sel >= GOAL_SPEARMAN})
    return out


# ---- run ----------------------------------------------------------------------------------------

def _model_meta(meta: dict) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))}


def _load(config: Config):
    """``(model, tokenizer, view)`` and the model's metadata."""
    from empirical.models import load_model, model_view

    model, tok, meta = load_model(config.model, device=config.device, seed=config.seed, return_metadata=True)
    return (model, tok, model_view(model)), meta


def _corpus(config: Config):
    return _load_corpus(config.corpus, config.languages, strict=config.strict_languages,
                        segments=config.max_segments)


class LanguageWorker:
    """An executor worker (``validate._executor.Worker``): loads the model and text of ``config``
    once; the payload ``{"language": l}`` captures, fits and sweeps that language and returns its
    cache entry (JSON, as stored)."""

    def __init__(self, config: Config):
        self.config, self.corpus = config, _corpus(config)
        self.loaded, self.meta = _load(config)

    def compute(self, payload) -> list:
        lang = payload["language"]
        if lang not in self.corpus.languages:
            raise ValueError(f"language {lang!r} is not one of this run's {self.corpus.languages}")
        item = {**language_item(self.config, self.loaded, self.corpus, lang), "model": _model_meta(self.meta)}
        return [(_item_key(self.config, self.corpus, lang), item)]


def language_worker(config: Config) -> LanguageWorker:
    """The factory of :class:`LanguageWorker` (``validate._executor.WorkerSpec``)."""
    return LanguageWorker(config)


def prefetch(config: Config, corpus, cache) -> int:
    """Hand the languages' items to the current executor ahead of reading them (a Ray executor
    computes the uncached ones on its workers and writes them into ``cache``; in process nothing
    happens). Returns the languages those workers captured."""
    from validate._executor import Task, WorkerSpec, current

    ex = current()
    if not ex.prefetches:
        return 0
    tasks = [Task(f"language {l}", _item_key(config, corpus, l), {"language": l}) for l in corpus.languages]
    spec = WorkerSpec(f"{__name__}:language_worker", (config,), device=config.device)
    return ex.map(spec, tasks, cache=cache).computed


def run(config: Config, cache=None) -> protocol.Result:
    """Every language's capture, fits and sweeps (one cached item each), then the spread of
    alpha* across languages and the channel energy of the residual layers."""
    corpus = _corpus(config)
    languages = corpus.languages
    items: dict[str, dict] = {}
    loaded, meta, captured = None, None, prefetch(config, corpus, cache)
    for lang in protocol.progress(languages, desc="languages", unit="language"):
        key = _item_key(config, corpus, lang)
        item = cache.get(key) if cache is not None else None
        if item is None:
            if loaded is None:  # a rerun from the cache loads no model
                loaded, meta = _load(config)
            item = {**language_item(config, loaded, corpus, lang), "model": _model_meta(meta)}
            captured += 1
            if cache is not None:
                cache.put(key, item)
        items[lang] = item
    rows = [r for lang in languages for r in items[lang]["rows"]]
    weights = {lang: float(max((r.get("count") or 0) for r in items[lang]["rows"]) or 1.0) for lang in languages}
    pen_rows = language_penalties(rows, weights)
    # the curves stay in the cached items: the JSON keeps what they gave
    rows = [{k: v for k, v in r.items() if k != "curves"} for r in rows]
    excess = alpha_excess_summary(rows)
    agreement = penalty_agreement(pen_rows)
    model_meta = items[languages[0]]["model"]
    data = {
        "model": model_meta, "note": model_meta.get("note"),
        "corpus": {"name": corpus.name, "source": corpus.source, "languages": languages,
                   "max_segments": config.max_segments},
        "bits": config.bits, "grid": config.grid, "sites": config.sites, "include_bos": config.include_bos,
        "rows": rows, "alpha_spread": _alpha_spread(rows, languages),
        "channel_energy": channel_energy_rows(items, rows),
        "alpha_excess_mse": excess, "alpha_distance": alpha_distance_summary(rows), "penalty_spearman": {m: a["spearman"] for m, a in agreement.items()},
        "penalty_agreement": agreement, "penalty_reliability": penalty_reliability(pen_rows),
        "penalties": pen_rows, "goals": goals(excess, agreement),
        "excess_bits": list(config.excess_bits),
    }
    # capture time as measured when each language was captured (also when read from the cache)
    timing = {"capture_seconds": sum(items[lang]["capture_seconds"] for lang in languages),
              "languages_captured_now": captured}
    return protocol.Result(EXPERIMENT, config, to_jsonable(data), timing=timing)


# ---- figures and tables -------------------------------------------------------------------------

def plot_kurtosis(rows: Sequence[dict], langs: Sequence[str], model: str, note: str | None,
                  out: Path) -> list[Path]:
    """Heatmap of log10 kurtosis, layer (or linear) x language, of the first kind of site."""
    use_agg()
    import matplotlib.pyplot as plt

    kind0 = rows[0]["kind"] if rows else "residual"
    sel = [r for r in rows if r["kind"] == kind0]
    sites = list(dict.fromkeys(r["site"] for r in sel))
    label = {r["site"]: (str(r["layer"]) if kind0 == "residual" else r["site"]) for r in sel}
    K = np.full((len(sites), len(langs)), np.nan)
    for r in sel:
        k = r.get("excess_kurtosis")
        K[sites.index(r["site"]), list(langs).index(r["language"])] = np.nan if k is None else k
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(langs), 1.0 + 0.3 * len(sites)))
    im = ax.imshow(np.log10(np.clip(K + 3.0, 1e-3, None)), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(langs)), langs, rotation=45, ha="right")
    ax.set_yticks(range(len(sites)), [label[s] for s in sites], fontsize=7)
    ax.set_xlabel("language")
    ax.set_ylabel("layer" if kind0 == "residual" else "linear")
    fig.colorbar(im, ax=ax).set_label("log10(kurtosis) = log10(excess + 3)")
    title = f"{model}: {kind0} excess kurtosis"
    if note:
        title += "\n(baseline: dequantized GGUF)"
    ax.set_title(title, fontsize=9)
    files = [save_figure(fig, out / f"kurtosis_heatmap{suffix}") for suffix in (".png", ".pdf")]
    plt.close(fig)
    return files


def plot_channel_energy(energy: Sequence[dict], model: str, path: Path) -> Path:
    """Per residual layer: the top channel's share of the sum of squares (languages pooled, and
    each language as a dot) and the number of channels holding half of it."""
    use_agg()
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.2))
    pooled = sorted((e for e in energy if e["language"] == "all" and e["top_share"] is not None),
                    key=lambda e: e["layer"])
    langs = list(dict.fromkeys(e["language"] for e in energy if e["language"] != "all"))
    for j, lang in enumerate(langs):
        pts = [(e["layer"], e["top_share"], e["channels_for_half"]) for e in energy
               if e["language"] == lang and e["top_share"] is not None]
        if pts:
            lx, ls, lh = zip(*pts)
            dx = 0.3 * (j / max(1, len(langs) - 1) - 0.5)
            ax.plot(np.add(lx, dx), np.multiply(ls, 100), ".", ms=3, alpha=0.6, label=lang)
            ax2.plot(np.add(lx, dx), lh, ".", ms=3, alpha=0.6)
    if pooled:
        x = [e["layer"] for e in pooled]
        ax.plot(x, [100 * e["top_share"] for e in pooled], "k-o", ms=3, lw=1, label="pooled")
        ax2.plot(x, [e["channels_for_half"] for e in pooled], "k-o", ms=3, lw=1)
        for e in pooled:
            ax.annotate(str(e["top_channel"]), (e["layer"], 100 * e["top_share"]), fontsize=5,
                        xytext=(0, 3), textcoords="offset points", ha="center")
        ax2.axhline(pooled[0]["channels"] / 2, color="tab:gray", lw=0.6, ls=":")
        ax2.set_yscale("log")
    ax.set_ylim(0, 100)
    ax.set_xlabel("residual layer", fontsize=8)
    ax.set_ylabel("largest channel's share of sum of squares (%)", fontsize=8)
    ax.set_title("share of the top channel (labels: its index)", fontsize=9)
    ax2.set_xlabel("residual layer", fontsize=8)
    ax2.set_ylabel("channels holding 50% of it", fontsize=8)
    ax2.set_title("channels holding half (dotted: half of all channels)", fontsize=9)
    for a in (ax, ax2):
        a.tick_params(labelsize=7)
        a.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{model}: energy of the residual stream by channel", fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


MODEL_ORDER = ("unimodal", "channel_mixture/gaussian", "channel_mixture/laplace", "channel_mixture/gennorm",
               "channel_mixture/student_t", "channel_mixture", "bulk_outlier", "body_tail", "selected")


def plot_alpha_excess(rows: Sequence[dict], bits: int, model: str, path: Path) -> Path:
    """Per site kind: the distribution (over layers x languages) of the extra MSE each model's
    alpha* costs at ``bits``, as a box per model on a log axis (values below 0.01% drawn there)."""
    use_agg()
    import matplotlib.pyplot as plt

    floor = 1e-4
    kinds = sorted({r["kind"] for r in rows if r.get("excess")})
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(5.0 * max(1, len(kinds)), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        data, labels = [], []
        present = {e["model"] for r in rows if r["kind"] == kind for e in r.get("excess") or []}
        for m in [*MODEL_ORDER, *sorted(present - set(MODEL_ORDER))]:
            v = [e["excess"] for r in rows if r["kind"] == kind for e in r.get("excess") or []
                 if e["model"] == m and e["bits"] == bits and e.get("excess") is not None]
            if v:
                data.append(np.maximum(np.asarray(v), floor))
                labels.append(m.replace("channel_mixture", "mixture"))
        if data:
            ax.boxplot(data, orientation="horizontal", whis=(5, 95), showfliers=True,
                       flierprops={"markersize": 2})
            ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.set_xscale("log")
        ax.axvline(0.05, color="tab:red", lw=0.8, ls="--")
        ticks = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
        ax.set_xticks(ticks, ["<0.01%", "0.1%", "1%", "10%", "100%", "10x", "100x"], fontsize=7)
        ax.set_xlabel(f"extra MSE of the model's alpha* over the sweep's ({bits}-bit int; dashed: 5%)",
                      fontsize=8)
        ax.set_title(f"{kind} (layers x languages)", fontsize=9)
    fig.suptitle(f"{model}: what each model's clipping threshold costs", fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def write(result: protocol.Result, out: Path) -> list[Path]:
    """Figures, LaTeX tables, CSVs and JSON under ``out``."""
    out = Path(out)
    rows, langs = result["rows"], result["corpus"]["languages"]
    model, note = result["model"].get("name") or result.config_dict.get("model"), result.get("note")
    top = int(result.config_dict.get("top") or 5)
    files = plot_kurtosis(rows, langs, model, note, out)
    kind0 = rows[0]["kind"] if rows else "residual"
    sel = [r for r in rows if r["kind"] == kind0]
    sites = list(dict.fromkeys(r["site"] for r in sel))
    label = {r["site"]: (str(r["layer"]) if kind0 == "residual" else r["site"]) for r in sel}
    fam = {(r["site"], r["language"]): r.get("best_family") or "--" for r in sel}
    fam_rows = [dict(layer=label[s], **{l: fam.get((s, l), "--") for l in langs}) for s in sites]
    cap = f"Best-fit family (BIC) of {tex_text(kind0)} activations, {tex_text(model)}."
    if note:
        cap += " Baseline is the dequantized GGUF (already about 4-5 bits)."
    files.append(write_latex_table(out / "best_fit_families.tex", fam_rows, ["layer", *langs],
                                   caption=cap, label="tab:best-fit-families"))
    sp_rows = [dict(site=d["site"], layer=d["layer"], kind=d["kind"], ratio=d["ratio"],
                    theory_ratio=d.get("theory_ratio"), min_language=d["min_language"],
                    min_alpha=d["min_alpha"], max_language=d["max_language"], max_alpha=d["max_alpha"])
               for d in result["alpha_spread"][:top]]
    files.append(write_latex_table(
        out / "alpha_spread.tex", sp_rows,
        ["layer", "kind", "ratio", "theory_ratio", "min_language", "min_alpha", "max_language", "max_alpha"],
        caption=f"Layers whose MSE-optimal clipping threshold ({result['bits']}-bit {tex_text(result['grid'])} "
                "grid, swept on each language's sample) differs most across languages: max/min ratio, "
                "the same ratio of theory's alpha* from the fitted families, and the extreme languages.",
        label="tab:alpha-spread"))
    energy = result.get("channel_energy") or []
    if energy:
        files.append(write_csv(out / "channel_energy.csv", energy, _ENERGY_COLUMNS))
        files.append(plot_channel_energy(energy, model, out / "channel_energy.png"))
    if any(r.get("excess") for r in rows):
        bits = 4 if 4 in result.get("excess_bits", []) else (result.get("excess_bits") or [result["bits"]])[0]
        files.append(plot_alpha_excess(rows, bits, model, out / "alpha_excess.png"))
        ex_rows = [{"site": r["site"], "kind": r["kind"], "layer": r["layer"], "language": r["language"],
                    **e, "selected": (r.get("model_info") or {}).get("selected")}
                   for r in rows for e in r.get("excess") or []]
        files.append(write_csv(out / "alpha_excess.csv", ex_rows,
                               ["site", "kind", "layer", "language", "bits", "model", "alpha", "alpha_swept",
                                "excess", "mse_swept", "selected", "error"]))
        summ = []
        for kind, per_model in (result.get("alpha_excess_mse") or {}).items():
            for m in [*MODEL_ORDER, *sorted(set(per_model) - set(MODEL_ORDER))]:
                if m in per_model and str(bits) in per_model[m]:
                    q = per_model[m][str(bits)]
                    summ.append({"kind": kind, "model": m, "median": q["median"], "q90": q["q90"],
                                 "share_within_5pct": q["share_within_5pct"], "n": q["n"]})
        files.append(write_latex_table(
            out / "alpha_excess.tex", summ, ["kind", "model", "median", "q90", "share_within_5pct", "n"],
            caption=f"Extra MSE of each site model's $\\alpha^\\ast$ over the exact sweep's optimum "
                    f"({bits}-bit int grid), over layers $\\times$ languages: median, 90th percentile and "
                    "the share of sites within 5\\%.", label="tab:alpha-excess"))
    files.append(write_csv(out / "distributions.csv", rows, _CSV_COLUMNS))
    files.append(write_json(out / f"{EXPERIMENT}.json", result.to_json()))
    return files


def _pooled_energy(result: protocol.Result) -> list[dict]:
    return [e for e in result.get("channel_energy") or []
            if e.get("language") == "all" and finite([e.get("top_share")])]


def summary(result: protocol.Result) -> str:
    parts = []
    spread = result.get("alpha_spread") or []
    if spread:
        d = spread[0]
        parts.append(f"largest swept alpha* ratio across languages {d['ratio']:.3g} at layer {d['layer']} "
                     f"({d['min_language']} .. {d['max_language']})")
    pooled = _pooled_energy(result)
    if pooled:
        hi = max(pooled, key=lambda e: e["top_share"])
        parts.append(f"top channel holds a median {100 * median(e['top_share'] for e in pooled):.0f}% of a "
                     f"residual layer's sum of squares, {100 * hi['top_share']:.0f}% at layer {hi['layer']} "
                     f"(channel {hi['top_channel']})")
    if result.get("note"):
        parts.append("baseline: dequantized GGUF")
    return "; ".join(parts)


def macros(result: protocol.Result) -> MacroSet:
    """The numbers section "Distributions" of the paper quotes (``\\Dist...``)."""
    from empirical.fits import FAMILIES_SIGNED

    ms = MacroSet(f"{EXPERIMENT}.json")
    rows = result.get("rows", [])
    corpus = result.get("corpus") or {}
    ms.add("DistModel", (result.get("model") or {}).get("name"), "model.name")
    ms.add("DistCorpus", corpus.get("name"), "corpus.name")
    ms.add("DistBits", result.get("bits"), "bits")
    ms.add("DistGrid", result.get("grid"), "grid")
    ms.add("DistSites", result.get("sites"), "sites")
    ms.add("DistNumLanguages", len(corpus.get("languages", [])), "len(corpus.languages)")
    ms.add("DistNumSites", len({r["site"] for r in rows}), "distinct rows[].site")
    fitted = [r for r in rows if r.get("best_family")]
    ms.add("DistNumFits", len(fitted), "rows with a best_family")
    ms.add("DistNumFitErrors", len(rows) - len(fitted), "rows without a best_family")
    counts: dict[str, int] = {}
    for r in fitted:
        counts[r["best_family"]] = counts.get(r["best_family"], 0) + 1
    # every signed family is named (count 0 when no fit chose it): the paper lists them all
    for f in (*FAMILIES_SIGNED, *(f for f in counts if f not in FAMILIES_SIGNED)):
        ms.add(["DistBestFit", f], counts.get(f, 0), f"count of rows[].best_family == {f}")
    if counts:
        top = max(counts, key=lambda f: (counts[f], f))
        ms.add("DistTopFamily", family_label(top), "most frequent rows[].best_family")
        ms.add_pct("DistTopFamilyShare", counts[top] / len(fitted), "share of the most frequent best_family")
    fallbacks = sum(1 for r in fitted if r.get("alpha_family") and r["alpha_family"] != r["best_family"])
    ms.add("DistAlphaFallbacks", fallbacks, "rows whose alpha_family differs from best_family")
    kurt = [r.get("excess_kurtosis") for r in rows]
    ms.add("DistKurtosisMedian", median(kurt), "median rows[].excess_kurtosis")
    ms.add("DistKurtosisMin", vmin(kurt), "min rows[].excess_kurtosis")
    ms.add("DistKurtosisMax", vmax(kurt), "max rows[].excess_kurtosis")
    spread = result.get("alpha_spread") or []
    ms.add("DistSpreadMedianRatio", median(d.get("ratio") for d in spread), "median alpha_spread[].ratio")
    ms.add("DistTheorySpreadMedianRatio", median(d.get("theory_ratio") for d in spread),
           "median alpha_spread[].theory_ratio")
    ms.add_pct("DistTheoryPenaltyMedian", median(r.get("theory_penalty") for r in rows),
               "median rows[].theory_penalty")
    if spread:
        top = spread[0]
        ms.add("DistSpreadMaxRatio", top.get("ratio"), "alpha_spread[0].ratio")
        ms.add("DistSpreadMaxLayer", top.get("layer") if top.get("layer") is not None else top.get("site"),
               "alpha_spread[0].layer")
        ms.add("DistSpreadMaxLowLanguage", top.get("min_language"), "alpha_spread[0].min_language")
        ms.add("DistSpreadMaxHighLanguage", top.get("max_language"), "alpha_spread[0].max_language")
    # outlier channels: the share of a residual layer's sum of squares held by its largest
    # channel, languages pooled (printed as percentages)
    pooled = _pooled_energy(result)
    where = "channel_energy[language=all]"
    ms.add("DistTopChannelShareMedian", median(e["top_share"] for e in pooled),
           f"median over layers of {where}.top_share", percent=True)
    hi = max(pooled, key=lambda e: e["top_share"]) if pooled else {}
    ms.add("DistTopChannelShareMax", hi.get("top_share"), f"max over layers of {where}.top_share", percent=True)
    ms.add("DistTopChannelShareMaxLayer", hi.get("layer"), f"argmax over layers of {where}.top_share")
    ms.add("DistTopChannelShareMaxChannel", hi.get("top_channel"), f"{where}.top_channel at that layer")
    ms.add("DistChannelsForHalfMedian", median(e.get("channels_for_half") for e in pooled),
           f"median over layers of {where}.channels_for_half")
    ms.add("DistCaptureSeconds", result.timing.get("capture_seconds"), "timing.capture_seconds")
    # site models (issue #14): what each model's alpha* costs at 4 bits, and the penalties
    excess = result.get("alpha_excess_mse") or {}
    for kind, kname in (("residual", "Residual"), ("linear_input", "Linear")):
        for model, mname in (("unimodal", "Unimodal"), ("selected", "Selected"),
                             ("channel_mixture/gaussian", "MixGauss"), ("bulk_outlier", "BulkOutlier"),
                             ("body_tail", "BodyTail")):
            q = ((excess.get(kind) or {}).get(model) or {}).get(str(GOAL_BITS)) or {}
            where = f"alpha_excess_mse.{kind}.{model}.{GOAL_BITS}"
            ms.add(["DistExcess", kname, mname, "Median"], q.get("median"), f"{where}.median", percent=True)
            ms.add(["DistExcess", kname, mname, "QNinety"], q.get("q90"), f"{where}.q90", percent=True)
            ms.add(["DistExcess", kname, mname, "ShareFive"], q.get("share_within_5pct"),
                   f"{where}.share_within_5pct", percent=True)
    for kind, kname in (("residual", "Residual"), ("linear_input", "Linear")):
        for model, mname in (("unimodal", "Unimodal"), ("selected", "Selected")):
            for b in (3, 8):
                q = ((excess.get(kind) or {}).get(model) or {}).get(str(b)) or {}
                where = f"alpha_excess_mse.{kind}.{model}.{b}"
                ms.add(["DistExcess", kname, mname, "Median", b], q.get("median"), f"{where}.median", percent=True)
                ms.add(["DistExcess", kname, mname, "ShareFive", b], q.get("share_within_5pct"),
                       f"{where}.share_within_5pct", percent=True)
    for model, mname in (("unimodal", "Unimodal"), ("selected", "Selected"),
                         ("channel_mixture/gaussian", "MixGauss"), ("bulk_outlier", "BulkOutlier")):
        ms.add(["DistPenaltySpearman", mname], (result.get("penalty_spearman") or {}).get(model),
               f"penalty_spearman.{model}")
    sel = [((r.get("model_info") or {}).get("selected")) for r in rows]
    sel = [x for x in sel if x]
    if sel:
        top = max(set(sel), key=lambda m: (sel.count(m), m))
        ms.add("DistSelectedTopModel", top, "most frequent rows[].model_info.selected")
        ms.add_pct("DistSelectedTopShare", sel.count(top) / len(sel), "its share of the sites")
    by_kind = ((result.get("penalty_agreement") or {}).get("selected") or {}).get("by_kind") or {}
    ms.add("DistPenaltySpearmanSelectedResidual", by_kind.get("residual"), "penalty_agreement.selected.by_kind.residual")
    ms.add("DistPenaltySpearmanSelectedLinear", by_kind.get("linear_input"),
           "penalty_agreement.selected.by_kind.linear_input")
    ms.add_pct("DistSameWorstSelected", ((result.get("penalty_agreement") or {}).get("selected") or {})
               .get("same_worst_language_share"), "penalty_agreement.selected.same_worst_language_share")
    ms.add_pct("DistSameWorstUnimodal", ((result.get("penalty_agreement") or {}).get("unimodal") or {})
               .get("same_worst_language_share"), "penalty_agreement.unimodal.same_worst_language_share")
    failed = sum(1 for r in rows for e in r.get("excess") or [] if e["model"] == "body_tail" and e.get("excess") is None)
    ms.add("DistBodyTailFailed", failed, "rows[].excess with model body_tail and no excess")
    dist = result.get("alpha_distance") or {}
    for kind, kname in (("residual", "Residual"), ("linear_input", "Linear")):
        for model, mname in (("unimodal", "Unimodal"), ("selected", "Selected")):
            ms.add(["DistAlphaDistance", kname, mname], ((dist.get(kind) or {}).get(model) or {}).get(str(GOAL_BITS)),
                   f"alpha_distance.{kind}.{model}.{GOAL_BITS}", percent=True)
    rel = result.get("penalty_reliability") or {}
    ms.add("DistPenaltyReliabilityHalves", rel.get("spearman_halves"), "penalty_reliability.spearman_halves")
    ms.add("DistPenaltyReliability", rel.get("spearman_brown"), "penalty_reliability.spearman_brown")
    ms.add("DistGoalSpearman", GOAL_SPEARMAN, "the goal's Spearman correlation (GOAL_SPEARMAN)")
    ms.add("DistGoalsMet", sum(1 for g in result.get("goals") or [] if g.get("met")), "goals met")
    ms.add("DistGoalsTotal", len(result.get("goals") or []), "goals evaluated")
    return ms


main = protocol.entry_point(__name__)


if __name__ == "__main__":
    raise SystemExit(main())
