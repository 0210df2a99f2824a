"""Language-aware clipping (LA-ACIQ): what one calibration-mix alpha costs each language.

``python -m validate.language_alpha [--quick] [--model ...] [--languages ...] [--bits 4] [--out DIR]``
(``--help`` lists every flag with its default)

For every quantizable Linear's input of a real model (inputs shared by several Linears, such as
q/k/v, are analysed once):

1. capture per-language activations on a multilingual corpus (:mod:`empirical.capture`: a seeded
   reservoir sample and the token count per language);
2. fit each language's sample (best family by BIC that theory can quantize, location fixed at 0
   because the grid is symmetric about 0) and ask theory (:func:`theory.language_alphas`) for
   each language's ``alpha*_l``, the alpha of the token-weighted calibration mix, the minimax
   alpha and the equally weighted relative one, and every language's penalty
   ``MSE_l(alpha) / MSE_l(alpha*_l) - 1`` under each;
3. measure the same on the samples with the exact empirical kernels
   (:func:`empirical.optimal.measured_penalties`, :func:`empirical.optimal.empirical_mixture_alpha`):
   the penalty each language really pays at theory's alphas, against its own swept optimum.

Writes ``language_alpha.json`` (rows per layer x language, per-language summary, agreement of
theory with measurement, provenance), ``language_alpha.csv``, ``language_alpha_table.tex`` and
``language_alpha.png`` (penalty heatmap; theory vs measured penalty). Languages are FLORES-200
codes (docs/design.md, "Language codes"). Each language's capture (its samples, stored as
``.npz`` beside the cache entry) and each layer's analysis are cached items under
``<out>/cache``, so a rerun loads no model and an interrupted run resumes.

With the embedded ``gemma-3-270m`` the "full precision" model is the dequantized Q4_K_M GGUF
(weights already about 4-5 bits); activations are what that model computes. Every output says so.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from validate import _protocol as protocol
from validate._common import ResultCache, atomic_write_bytes, save_figure, spearman, to_jsonable, use_agg, write_csv, write_json
from validate._latex import MacroSet, tex_text, write_latex_table

EXPERIMENT = "language_alpha"
DEFAULT_LANGUAGES = ("eng_Latn", "heb_Hebr", "arb_Arab", "jpn_Jpan", "hin_Deva", "rus_Cyrl", "zho_Hans",
                     "fra_Latn")
QUICK_LANGUAGES = ("eng_Latn", "heb_Hebr", "jpn_Jpan")
PREQUANTIZED_NOTE = ("baseline is the dequantized Q4_K_M GGUF (weights already quantized to about "
                     "4-5 bits before this experiment)")
CHOICES = ("mix", "minimax", "weighted")
#: Part of every cache key: bump it when an item's stored format changes.
ITEM_VERSION = 1
#: The grids ``--executor ray`` distributes (validate._executor).
EXECUTOR_GRIDS = "each language's activation capture (the per-layer analyses run in the driver)"


@dataclass(frozen=True)
class Config:
    model: str = protocol.param("gemma-3-270m", "embedded name, tiny-* test model, local folder or hub id")
    corpus: str = protocol.param("udhr", "'udhr' (embedded) or a one-file-per-language folder")
    languages: tuple[str, ...] = protocol.param(DEFAULT_LANGUAGES,
                                                "languages (FLORES-200, ISO 639-3 or 639-1 codes)")
    bits: int = protocol.param(4, "activation bit width")
    grid: str = protocol.param("int", "quantizer grid (aciq, midrise, midtread, int)")
    segments: int | None = protocol.param(None, "segments per language (none: all)")
    reservoir: int = protocol.param(8192, "reservoir sample per layer x language")
    fit_samples: int = protocol.param(4000, "values per fit (a subsample of the reservoir)")
    min_samples: int = protocol.param(500, "fewer captured values for a language is an error")
    include_bos: bool = protocol.param(False, "also record the BOS position (it is the same token for "
                                              "every language)")
    device: str = protocol.param("cpu", "cpu, cuda or cuda:N")
    seed: int = protocol.param(0, "seed of the reservoir samples, subsamples and fits")

    def __post_init__(self):
        langs = protocol.check_sources(self.model, self.corpus, self.languages)
        if len(langs) < 2:
            raise protocol.ConfigError("--languages: give at least two languages (the experiment "
                                       "compares them)")
        grid = protocol.check_bits_grid(self.bits, self.grid, signed="activations")
        protocol.check_positive("segments", self.segments, optional=True)
        for name in ("reservoir", "fit_samples", "min_samples"):
            protocol.check_positive(name, getattr(self, name))
        if self.reservoir < self.min_samples:
            raise protocol.ConfigError(f"--reservoir: {self.reservoir} values per language are fewer than "
                                       f"--min-samples {self.min_samples}")
        if self.fit_samples < self.min_samples:
            raise protocol.ConfigError(f"--fit-samples: {self.fit_samples} values per fit are fewer than "
                                       f"--min-samples {self.min_samples}")
        protocol.check_positive("seed", self.seed, allow_zero=True)
        protocol.check_device(self.device)
        protocol.frozen_set(self, languages=langs, grid=grid)

    @classmethod
    def quick(cls) -> "Config":
        return cls(languages=QUICK_LANGUAGES, segments=4, reservoir=2048, fit_samples=2048, min_samples=200)


# ---- capture: one cached item per language ----------------------------------------------------

def capture_language(config: Config, loaded, corpus, lang: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Capture the Linear inputs of ``lang`` alone: ``(meta, samples)`` with per site its block,
    value count, mean and variance in ``meta["sites"]`` and, for one site of each group reading the
    very same tensor (same count, mean and variance: q/k/v, gate/up), the reservoir sample;
    ``meta["same_as"]`` maps every site to that site."""
    from empirical.capture import capture_activations, capture_corpus

    model, tok, view = loaded
    t0 = time.perf_counter()
    with capture_activations(model, view, [lang], reservoir_size=config.reservoir, seed=config.seed,
                             linear_inputs=True, linear_outputs=False, residual=False) as cap:
        capture_corpus(cap, tok, corpus, languages=[lang], device=config.device,
                       include_bos=config.include_bos)
    sites, same_as, samples, first = {}, {}, {}, {}
    for site in cap.sites:
        st = cap.get(site, lang)
        sites[site.name] = {"block": site.block, "count": int(st.n), "mean": st.mean, "variance": st.variance}
        sig = (site.block, int(st.n), round(st.mean, 12), round(st.variance, 12))
        rep = first.setdefault(sig, site.name)
        same_as[site.name] = rep
        if rep == site.name:
            samples[site.name] = st.sample()
    return to_jsonable({"sites": sites, "same_as": same_as,
                        "capture_seconds": time.perf_counter() - t0}), samples


def _capture_key(config: Config, corpus, lang: str) -> dict[str, Any]:
    return {"v": ITEM_VERSION, "experiment": EXPERIMENT, "item": "capture", "model": config.model,
            "language": lang, "corpus_digest": protocol.corpus_digest(corpus.select([lang])),
            "reservoir": config.reservoir, "include_bos": config.include_bos, "seed": config.seed,
            "device": config.device}


def _cached_capture(cache: ResultCache | None, key: dict) -> tuple[dict, dict] | None:
    meta = cache.get(key) if cache is not None else None
    npz = cache.path(key).with_suffix(".npz") if meta is not None else None
    if meta is None or not npz.exists():
        return None
    try:
        with np.load(npz) as data:
            return meta, {s: data[s] for s in set(meta["same_as"].values())}
    except (OSError, ValueError, KeyError):
        return None  # unreadable: captured again


def _npz_bytes(samples: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **samples)
    return buf.getvalue()


def _store_capture(cache: ResultCache | None, key: dict, meta: dict, samples: dict) -> None:
    if cache is None or cache.folder is None:
        return
    atomic_write_bytes(cache.path(key).with_suffix(".npz"), _npz_bytes(samples))
    cache.put(key, meta)  # written last: the entry exists only when its samples do


def group_sites(captures: dict[str, dict]) -> dict[str, list[str]]:
    """Sites that read the same tensor in every language, as ``{representative: [others]}``."""
    langs = list(captures)
    groups: dict[tuple, list[str]] = {}
    for site in captures[langs[0]]["sites"]:
        groups.setdefault(tuple(captures[l]["same_as"][site] for l in langs), []).append(site)
    return {g[0]: g[1:] for g in groups.values()}


# ---- per-site analysis ------------------------------------------------------------------------

def analyse_site(samples: dict, counts: dict, config: Config) -> dict:
    """Theory and measurement for one site; returns ``{"rows": [...], "summary": {...}}``.

    Three views of every penalty: theory's (fitted families), the measured one (exact sweeps of
    the samples, the alphas chosen on the samples too) and what theory's alphas really cost on the
    samples (``*_at_theory_alpha``), which adds the fit's own error to the language mismatch.
    """
    from empirical.fits import fit_languages
    from empirical.optimal import empirical_language_alphas, measured_penalties
    from theory import language_alphas

    bits, grid, min_n = config.bits, config.grid, config.min_samples
    langs = list(samples)
    weights = [counts[l] for l in langs]
    fits = fit_languages(samples, min_samples=min_n, max_samples=config.fit_samples, seed=config.seed,
                         fix_loc=True)
    la = language_alphas({l: fits[l][1] for l in langs}, bits, grid, mix_weights=weights)
    em = empirical_language_alphas(samples, bits, grid, mix_weights=weights, min_samples=min_n)
    priced = measured_penalties(samples, la.alpha, bits, grid, min_samples=min_n)
    rows = []
    for j, l in enumerate(langs):
        f = fits[l][0]
        own = measured_penalties({l: samples[l]}, {"own": float(la.alpha_star[j])}, bits, grid,
                                 min_samples=min_n)[l]["own"]
        rows.append({"language": l, "count": counts[l], "family": f.family,
                     "excess_kurtosis": f.excess_kurtosis,
                     "alpha_star": float(la.alpha_star[j]), "alpha_star_measured": float(em.alpha_star[j]),
                     "penalty_own_at_theory_alpha": own,
                     **{f"alpha_{c}": la.alpha[c] for c in CHOICES},
                     **{f"alpha_{c}_measured": em.alpha[c] for c in CHOICES},
                     **{f"penalty_{c}": float(la.penalty[c][j]) for c in CHOICES},
                     **{f"penalty_{c}_measured": float(em.penalty[c][j]) for c in CHOICES},
                     **{f"penalty_{c}_at_theory_alpha": priced[l][c] for c in CHOICES}})
    return to_jsonable({"rows": rows, "summary": {
        **{f"alpha_{c}": la.alpha[c] for c in CHOICES},
        **{f"alpha_{c}_measured": em.alpha[c] for c in CHOICES},
        "worst_language_mix": la.worst("mix")[0], "worst_penalty_mix": la.worst("mix")[1],
        "worst_language_mix_measured": em.worst("mix")[0], "worst_penalty_mix_measured": em.worst("mix")[1],
        "worst_penalty_minimax": la.worst("minimax")[1],
        "worst_penalty_minimax_measured": em.worst("minimax")[1],
        "worst_penalty_mix_at_theory_alpha": max(r["penalty_mix_at_theory_alpha"] for r in rows),
        "worst_penalty_minimax_at_theory_alpha": max(r["penalty_minimax_at_theory_alpha"] for r in rows),
    }})


def _model_meta(meta: dict) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))}


def _load(config: Config):
    """``(model, tokenizer, view)`` and the model's metadata."""
    from empirical.models import load_model, model_view

    model, tok, meta = load_model(config.model, device=config.device, seed=config.seed, return_metadata=True)
    return (model, tok, model_view(model)), meta


class _CaptureCache:
    """The driver's cache as the executor sees it for the capture grid: an entry counts as cached
    only with its samples beside it (``_cached_capture``), and an entry that a worker sends,
    ``{"meta": ..., "npz": bytes}``, is stored as ``_store_capture`` stores one (samples first)."""

    def __init__(self, cache: ResultCache):
        self.cache, self.folder = cache, cache.folder

    def get(self, config, check=None):
        hit = _cached_capture(self.cache, config)
        return None if hit is None else hit[0]

    def put(self, config, result) -> None:
        atomic_write_bytes(self.cache.path(config).with_suffix(".npz"), result["npz"])
        self.cache.put(config, result["meta"])


class CaptureWorker:
    """An executor worker (``validate._executor.Worker``): loads the model and text of ``config``
    once; the payload ``{"language": l}`` captures that language and returns its entry, the
    metadata with its samples as ``.npz`` bytes (a few MB on a real model: a reservoir per input)."""

    def __init__(self, config: Config):
        self.config = config
        self.corpus = protocol.load_corpus(config.corpus, config.languages, config.segments)
        self.loaded, self.meta = _load(config)

    def compute(self, payload) -> list:
        lang = payload["language"]
        if lang not in self.corpus.languages:
            raise ValueError(f"language {lang!r} is not one of this run's {self.corpus.languages}")
        cap_meta, samples = capture_language(self.config, self.loaded, self.corpus, lang)
        return [(_capture_key(self.config, self.corpus, lang),
                 {"meta": {**cap_meta, "model": _model_meta(self.meta)}, "npz": _npz_bytes(samples)})]


def capture_worker(config: Config) -> CaptureWorker:
    """The factory of :class:`CaptureWorker` (``validate._executor.WorkerSpec``)."""
    return CaptureWorker(config)


def prefetch_captures(config: Config, corpus, cache: ResultCache | None) -> int:
    """Hand the languages' captures to the current executor ahead of reading them (a Ray executor
    captures the uncached ones on its workers and stores them, samples and all, in ``cache``; in
    process nothing happens). Returns the languages those workers captured."""
    from validate._executor import Task, WorkerSpec, current

    ex = current()
    if not ex.prefetches:
        return 0
    if cache is None or cache.folder is None:
        raise ValueError("--executor ray needs a results cache (the captures come back through it)")
    tasks = [Task(f"capture {l}", _capture_key(config, corpus, l), {"language": l}) for l in corpus.languages]
    spec = WorkerSpec(f"{__name__}:capture_worker", (config,), device=config.device)
    return ex.map(spec, tasks, cache=_CaptureCache(cache)).computed


def run(config: Config, cache: ResultCache | None = None) -> protocol.Result:
    """Capture every language (one cached item each), then analyse every distinct Linear input
    (one cached item each) and summarise per language and over layers."""
    corpus = protocol.load_corpus(config.corpus, config.languages, config.segments)
    langs = corpus.languages
    captures, samples_by_lang = {}, {}
    loaded, captured = None, prefetch_captures(config, corpus, cache)
    for lang in protocol.progress(langs, desc="capture", unit="language"):
        key = _capture_key(config, corpus, lang)
        hit = _cached_capture(cache, key)
        if hit is None:
            if loaded is None:  # a rerun from the cache loads no model
                loaded, meta = _load(config)
            cap_meta, samples = capture_language(config, loaded, corpus, lang)
            hit = ({**cap_meta, "model": _model_meta(meta)}, samples)
            _store_capture(cache, key, *hit)
            captured += 1
        captures[lang], samples_by_lang[lang] = hit
    groups = group_sites(captures)
    model_meta = captures[langs[0]]["model"]

    base = {"v": ITEM_VERSION, "experiment": EXPERIMENT, "item": "site", "model": config.model,
            "corpus_digest": protocol.corpus_digest(corpus), "languages": langs, "bits": config.bits,
            "grid": config.grid, "reservoir": config.reservoir, "fit_samples": config.fit_samples,
            "min_samples": config.min_samples, "seed": config.seed, "include_bos": config.include_bos,
            "device": config.device}
    rows, sites = [], []
    t0 = time.perf_counter()
    for site in protocol.progress(list(groups), desc="layers", unit="layer"):
        key = {**base, "site": site}
        res = cache.get(key) if cache is not None else None
        if res is None:
            samples = {l: samples_by_lang[l][captures[l]["same_as"][site]] for l in langs}
            counts = {l: captures[l]["sites"][site]["count"] for l in langs}
            res = analyse_site(samples, counts, config)
            if cache is not None:
                cache.put(key, res)
        block = captures[langs[0]]["sites"][site]["block"]
        sites.append({"site": site, "block": block, "shares_input_with": groups[site], **res["summary"]})
        rows += [{"site": site, "block": block, **r} for r in res["rows"]]
    analysis_s = time.perf_counter() - t0

    per_language = []
    for l in langs:
        rl = [r for r in rows if r["language"] == l]
        per_language.append({
            "language": l, "script": corpus.info[l].script, "resource_level": corpus.info[l].resource_level,
            **{f"median_penalty_{c}": float(np.median([r[f"penalty_{c}"] for r in rl])) for c in CHOICES},
            **{f"median_penalty_{c}_measured": float(np.median([r[f"penalty_{c}_measured"] for r in rl]))
               for c in CHOICES},
            "worst_in_layers_mix": sum(s["worst_language_mix_measured"] == l for s in sites),
            "median_alpha_ratio": float(np.median([r["alpha_star"] / r["alpha_mix"] for r in rl])),
        })
    theory_pen = [r["penalty_mix"] for r in rows]
    meas_pen = [r["penalty_mix_measured"] for r in rows]
    agreement = {
        "median_penalty_own_at_theory_alpha": float(np.median([r["penalty_own_at_theory_alpha"] for r in rows])),
        "median_rel_error_alpha_star": float(np.median([abs(r["alpha_star"] / r["alpha_star_measured"] - 1)
                                                        for r in rows])),
        "median_worst_penalty_mix_at_theory_alpha": float(np.median(
            [s["worst_penalty_mix_at_theory_alpha"] for s in sites])),
        "median_worst_penalty_minimax_at_theory_alpha": float(np.median(
            [s["worst_penalty_minimax_at_theory_alpha"] for s in sites])),
        "spearman_penalty_mix": spearman(theory_pen, meas_pen),
        "median_abs_error_penalty_mix": float(np.nanmedian(np.abs(np.subtract(theory_pen, meas_pen)))),
        "worst_language_agreement": float(np.mean([s["worst_language_mix"] == s["worst_language_mix_measured"]
                                                   for s in sites])),
        "median_rel_error_alpha_mix": float(np.median([abs(s["alpha_mix"] / s["alpha_mix_measured"] - 1)
                                                       for s in sites])),
        "median_worst_penalty_mix": float(np.median([s["worst_penalty_mix"] for s in sites])),
        "median_worst_penalty_mix_measured": float(np.median([s["worst_penalty_mix_measured"] for s in sites])),
        "median_worst_penalty_minimax_measured": float(np.median([s["worst_penalty_minimax_measured"]
                                                                  for s in sites])),
    }
    data = {
        "model_metadata": model_meta,
        "baseline_note": PREQUANTIZED_NOTE if model_meta.get("prequantized") else "baseline is the model's own weights",
        "languages": langs, "bits": config.bits, "grid": config.grid,
        "agreement": agreement, "per_language": per_language, "sites": sites, "rows": rows,
    }
    # capture time as measured when each language was captured (also when read from the cache)
    timing = {"capture_seconds": sum(captures[l]["capture_seconds"] for l in langs),
              "languages_captured_now": captured, "analysis_seconds": analysis_s}
    return protocol.Result(EXPERIMENT, config, to_jsonable(data), timing=timing)


def _short_site(s: str) -> str:
    return s.split(".")[-3] + "." + s.split(".")[-1] if s.count(".") >= 2 else s


def plot(result: protocol.Result, path: Path) -> Path:
    """Left: measured penalty of the mix alpha, layer x language; right: theory's penalty against
    the measured one."""
    use_agg()
    import matplotlib.pyplot as plt

    langs, sites, rows = result["languages"], [s["site"] for s in result["sites"]], result["rows"]
    P = np.full((len(sites), len(langs)), np.nan)
    for r in rows:
        P[sites.index(r["site"]), langs.index(r["language"])] = r["penalty_mix_measured"]
    fig, ax = plt.subplots(1, 2, figsize=(12, max(4, 0.12 * len(sites) + 2)),
                           gridspec_kw={"width_ratios": [1, 1.2]}, layout="constrained")
    im = ax[0].imshow(100 * P, aspect="auto", cmap="magma_r")
    ax[0].set_xticks(range(len(langs)), langs, rotation=45, ha="right")
    ax[0].set_yticks(range(len(sites)), [_short_site(s) for s in sites], fontsize=5)
    fig.colorbar(im, ax=ax[0]).set_label("measured penalty of the mix alpha (%)")
    ax[0].set_title("penalty of the calibration-mix alpha", fontsize=9)
    t = np.array([np.nan if r["penalty_mix"] is None else r["penalty_mix"] for r in rows], dtype=float)
    m = np.array([np.nan if r["penalty_mix_measured"] is None else r["penalty_mix_measured"] for r in rows],
                 dtype=float)
    for l in langs:
        sel = np.array([r["language"] == l for r in rows])
        ax[1].scatter(np.clip(t[sel], 1e-5, None), np.clip(m[sel], 1e-5, None), s=8, label=l, alpha=0.7)
    lim = [1e-5, max(1e-4, float(np.nanmax(np.r_[t, m])) * 2)]
    ax[1].plot(lim, lim, "k--", lw=0.8)
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("theory penalty (fitted families)")
    ax[1].set_ylabel("measured penalty (exact sweep on samples)")
    rho = result["agreement"].get("spearman_penalty_mix")
    ax[1].set_title(f"Spearman {rho:.2f}" if rho is not None else "Spearman n/a", fontsize=9)
    ax[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{result.config_dict.get('model')}, {result['bits']}-bit {result['grid']} activations: "
                 f"{result['baseline_note']}", fontsize=8)
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def write(result: protocol.Result, out: Path) -> list[Path]:
    out = Path(out)
    cols = ["site", "block", "language", "count", "family", "excess_kurtosis", "alpha_star", "alpha_star_measured",
            "penalty_own_at_theory_alpha", *[f"alpha_{c}" for c in CHOICES], *[f"alpha_{c}_measured" for c in CHOICES],
            *[f"penalty_{c}" for c in CHOICES], *[f"penalty_{c}_measured" for c in CHOICES],
            *[f"penalty_{c}_at_theory_alpha" for c in CHOICES]]
    files = [write_csv(out / f"{EXPERIMENT}.csv", result["rows"], cols)]
    trows = [{"language": p["language"], "mix_theory": p["median_penalty_mix"],
              "mix_measured": p["median_penalty_mix_measured"],
              "minimax_measured": p["median_penalty_minimax_measured"],
              "weighted_measured": p["median_penalty_weighted_measured"],
              "worst_layers": p["worst_in_layers_mix"]} for p in result["per_language"]]
    files.append(write_latex_table(
        out / f"{EXPERIMENT}_table.tex", trows,
        ["language", "mix_theory", "mix_measured", "minimax_measured", "weighted_measured", "worst_layers"],
        ["Language", "Mix (theory)", "Mix (measured)", "Minimax (measured)", "Weighted (measured)",
         "Worst in layers"],
        caption=(f"Median over layers of each language's MSE penalty "
                 f"$\\mathrm{{MSE}}_l(\\alpha)/\\mathrm{{MSE}}_l(\\alpha^*_l)-1$ of "
                 f"{result['bits']}-bit {tex_text(result['grid'])} activation clipping at the calibration-mix, "
                 "minimax and equally weighted alphas, and the number of layers in which "
                 "the language pays most under the mix."),
        label="tab:language-alpha"))
    files.append(plot(result, out / f"{EXPERIMENT}.png"))
    files.append(write_json(out / f"{EXPERIMENT}.json", result.to_json()))
    return files


def summary(result: protocol.Result) -> str:
    a = result["agreement"]
    worst = max(result["per_language"], key=lambda p: p["median_penalty_mix_measured"])
    return (f"{len(result['sites'])} layer inputs x {len(result['languages'])} languages; theory vs measured "
            f"penalty of the mix alpha: Spearman {a['spearman_penalty_mix']:.2f}; worst language agrees in "
            f"{100 * a['worst_language_agreement']:.0f}% of layers; most penalised {worst['language']} "
            f"(median {100 * worst['median_penalty_mix_measured']:.2f}% under the mix)")


def macros(result: protocol.Result) -> MacroSet:
    """The numbers section "Language-aware clipping" of the paper quotes (``\\LA...``)."""
    ms = MacroSet(f"{EXPERIMENT}.json")
    ag = result.get("agreement") or {}
    ms.add("LAModel", result.config_dict.get("model"), "provenance.config.model")
    ms.add("LABits", result.get("bits"), "bits")
    ms.add("LAGrid", result.get("grid"), "grid")
    ms.add("LANumSites", len(result.get("sites", [])), "len(sites)")
    ms.add("LANumLanguages", len(result.get("languages", [])), "len(languages)")
    ms.add("LASpearman", ag.get("spearman_penalty_mix"), "agreement.spearman_penalty_mix")
    for name, key in (("LAWorstAgreement", "worst_language_agreement"),
                      ("LAAlphaStarRelError", "median_rel_error_alpha_star"),
                      ("LAOwnPenalty", "median_penalty_own_at_theory_alpha"),
                      ("LAWorstMixMeasured", "median_worst_penalty_mix_measured"),
                      ("LAWorstMinimaxMeasured", "median_worst_penalty_minimax_measured"),
                      ("LAWorstMixTheory", "median_worst_penalty_mix")):
        ms.add_pct(name, ag.get(key), f"agreement.{key}")
    per = result.get("per_language", [])
    for p in per:
        l = p["language"]
        ms.add_pct(["LAPenaltyMix", l], p.get("median_penalty_mix_measured"),
                   f"per_language[{l}].median_penalty_mix_measured")
        ms.add_pct(["LAPenaltyMinimax", l], p.get("median_penalty_minimax_measured"),
                   f"per_language[{l}].median_penalty_minimax_measured")
        ms.add(["LAWorstLayers", l], p.get("worst_in_layers_mix"), f"per_language[{l}].worst_in_layers_mix")
    if per:
        top = max(per, key=lambda p: p.get("median_penalty_mix_measured") or -1.0)
        ms.add("LAMostPenalised", top["language"], "argmax per_language[].median_penalty_mix_measured")
        ms.add_pct("LAMostPenalisedMix", top.get("median_penalty_mix_measured"),
                   "max per_language[].median_penalty_mix_measured")
    return ms


main = protocol.entry_point(__name__)


if __name__ == "__main__":
    raise SystemExit(main())
