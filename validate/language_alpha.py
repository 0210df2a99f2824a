"""Language-aware clipping (LA-ACIQ): what one calibration-mix alpha costs each language.

``python -m validate.language_alpha [--quick] [--model ...] [--languages ...] [--bits 4] [--out DIR]``

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
``language_alpha.png`` (penalty heatmap; theory vs measured penalty). Captured samples are cached
under ``<out>/cache`` (atomic), so a rerun skips the model.

With the embedded ``gemma-3-270m`` the "full precision" model is the dequantized Q4_K_M GGUF
(weights already about 4-5 bits); activations are what that model computes. Every output says so.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from validate._common import (
    ResultCache, atomic_write_bytes, default_out_dir, provenance, save_figure, use_agg, write_csv, write_json,
    write_latex_table,
)

EXPERIMENT = "language_alpha"
DEFAULT_LANGUAGES = ("en", "he", "ar", "ja", "hi", "ru", "zh", "fr")
QUICK_LANGUAGES = ("en", "he", "ja")
PREQUANTIZED_NOTE = ("baseline is the dequantized Q4_K_M GGUF (weights already quantized to about "
                     "4-5 bits before this experiment)")
CHOICES = ("mix", "minimax", "weighted")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m validate.language_alpha", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m", help="embedded name, tiny-* test model, local dir or hub id")
    p.add_argument("--corpus", default="udhr", help="'udhr' (embedded) or a one-file-per-language directory")
    p.add_argument("--languages", nargs="+", default=None,
                   help=f"language codes (default {' '.join(DEFAULT_LANGUAGES)})")
    p.add_argument("--bits", type=int, default=4, help="activation bit width (default 4)")
    p.add_argument("--grid", default="int", help="aciq, midrise, midtread or int (default int)")
    p.add_argument("--segments", type=int, default=None, help="segments per language (default: all)")
    p.add_argument("--reservoir", type=int, default=8192, help="reservoir sample per layer x language")
    p.add_argument("--fit-samples", type=int, default=4000, help="values per fit (subsample of the reservoir)")
    p.add_argument("--min-samples", type=int, default=500, help="fewer captured values for a language is an error")
    p.add_argument("--include-bos", action="store_true",
                   help="also record the BOS position (default: left out; it is the same token for every language)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"output folder (default results/{EXPERIMENT})")
    p.add_argument("--quick", action="store_true",
                   help="small run: English, Hebrew, Japanese, 4 segments, 2048-value reservoirs")
    a = p.parse_args(argv)
    if a.languages is None:
        a.languages = list(QUICK_LANGUAGES if a.quick else DEFAULT_LANGUAGES)
    if a.quick:
        a.segments = a.segments or 4
        a.reservoir = min(a.reservoir, 2048)
        a.fit_samples = min(a.fit_samples, 2048)
        a.min_samples = min(a.min_samples, 200)
    return a


# ---- capture (cached) ------------------------------------------------------------------------

def capture_inputs(args, model, tok, view, corpus, cache_dir: Path) -> tuple[dict, dict, dict]:
    """Per site (distinct Linear input) and language: reservoir sample and value count.

    Returns ``(samples, counts, shared)`` with ``samples[site][lang]`` arrays, ``counts[site][lang]``
    and ``shared[site]`` the other Linears reading the very same input.
    """
    from empirical.capture import capture_activations, capture_corpus

    key = hashlib.sha256(json.dumps({
        "model": args.model, "corpus_digest": _digest(corpus), "languages": corpus.languages,
        "reservoir": args.reservoir, "seed": args.seed, "segments": args.segments,
        "include_bos": args.include_bos,
    }, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir / f"capture-{key}.npz"
    meta_cache = ResultCache(cache_dir)
    meta = meta_cache.get({"capture": key})
    if meta is not None and path.exists():
        data = np.load(path)
        samples = {s: {l: data[f"{s}|{l}"] for l in corpus.languages} for s in meta["sites"]}
        return samples, meta["counts"], meta["shared"]

    with capture_activations(model, view, corpus.languages, reservoir_size=args.reservoir, seed=args.seed,
                             linear_inputs=True, linear_outputs=False, residual=False) as cap:
        capture_corpus(cap, tok, corpus, device=args.device, include_bos=args.include_bos)
    # Linears reading the same tensor (q/k/v, gate/up) have identical statistics: keep the first.
    groups: dict[tuple, list[str]] = {}
    for site in cap.sites:
        sig = (site.block,) + tuple((cap.get(site, l).n, round(cap.get(site, l).mean, 12),
                                     round(cap.get(site, l).variance, 12)) for l in corpus.languages)
        groups.setdefault(sig, []).append(site)
    samples, counts, shared = {}, {}, {}
    for sites in groups.values():
        s = sites[0]
        samples[s.name] = {l: cap.get(s, l).sample() for l in corpus.languages}
        counts[s.name] = {l: int(cap.get(s, l).n) for l in corpus.languages}
        shared[s.name] = [t.name for t in sites[1:]]
    buf = io.BytesIO()
    np.savez(buf, **{f"{s}|{l}": v for s, d in samples.items() for l, v in d.items()})
    atomic_write_bytes(path, buf.getvalue())
    meta_cache.put({"capture": key}, {"sites": list(samples), "counts": counts, "shared": shared})
    return samples, counts, shared


def _digest(corpus) -> str:
    return hashlib.sha256(json.dumps(corpus.texts, sort_keys=True).encode()).hexdigest()[:16]


# ---- per-site analysis ------------------------------------------------------------------------

def analyse_site(samples: dict, counts: dict, args) -> dict:
    """Theory and measurement for one site; returns ``{"rows": [...], "summary": {...}}``.

    Three views of every penalty: theory's (fitted families), the measured one (exact sweeps of
    the samples, the alphas chosen on the samples too) and what theory's alphas really cost on the
    samples (``*_at_theory_alpha``), which adds the fit's own error to the language mismatch.
    """
    from empirical.fits import fit_languages
    from empirical.optimal import empirical_language_alphas, measured_penalties
    from theory import language_alphas

    langs = list(samples)
    weights = [counts[l] for l in langs]
    fits = fit_languages(samples, min_samples=args.min_samples, max_samples=args.fit_samples,
                         seed=args.seed, fix_loc=True)
    la = language_alphas({l: fits[l][1] for l in langs}, args.bits, args.grid, mix_weights=weights)
    em = empirical_language_alphas(samples, args.bits, args.grid, mix_weights=weights,
                                   min_samples=args.min_samples)
    priced = measured_penalties(samples, la.alpha, args.bits, args.grid, min_samples=args.min_samples)
    rows = []
    for j, l in enumerate(langs):
        f = fits[l][0]
        own = measured_penalties({l: samples[l]}, {"own": float(la.alpha_star[j])}, args.bits, args.grid,
                                 min_samples=args.min_samples)[l]["own"]
        rows.append({"language": l, "count": counts[l], "family": f.family,
                     "excess_kurtosis": f.excess_kurtosis,
                     "alpha_star": float(la.alpha_star[j]), "alpha_star_measured": float(em.alpha_star[j]),
                     "penalty_own_at_theory_alpha": own,
                     **{f"alpha_{c}": la.alpha[c] for c in CHOICES},
                     **{f"alpha_{c}_measured": em.alpha[c] for c in CHOICES},
                     **{f"penalty_{c}": float(la.penalty[c][j]) for c in CHOICES},
                     **{f"penalty_{c}_measured": float(em.penalty[c][j]) for c in CHOICES},
                     **{f"penalty_{c}_at_theory_alpha": priced[l][c] for c in CHOICES}})
    return {"rows": rows, "summary": {
        **{f"alpha_{c}": la.alpha[c] for c in CHOICES},
        **{f"alpha_{c}_measured": em.alpha[c] for c in CHOICES},
        "worst_language_mix": la.worst("mix")[0], "worst_penalty_mix": la.worst("mix")[1],
        "worst_language_mix_measured": em.worst("mix")[0], "worst_penalty_mix_measured": em.worst("mix")[1],
        "worst_penalty_minimax": la.worst("minimax")[1],
        "worst_penalty_minimax_measured": em.worst("minimax")[1],
        "worst_penalty_mix_at_theory_alpha": max(r["penalty_mix_at_theory_alpha"] for r in rows),
        "worst_penalty_minimax_at_theory_alpha": max(r["penalty_minimax_at_theory_alpha"] for r in rows),
    }}


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def run(args: argparse.Namespace) -> dict:
    import torch
    from tqdm.auto import tqdm

    from empirical.corpora import load_parallel_dir, load_udhr
    from empirical.models import load_model, model_view

    t0 = time.perf_counter()
    out = Path(args.out) if args.out else default_out_dir(EXPERIMENT)
    torch.manual_seed(args.seed)
    model, tok, meta = load_model(args.model, device=args.device, seed=args.seed, return_metadata=True)
    corpus = load_udhr(args.languages) if args.corpus == "udhr" else load_parallel_dir(args.corpus, args.languages)
    if args.segments:
        corpus = corpus.head(args.segments)
    view = model_view(model)
    samples, counts, shared = capture_inputs(args, model, tok, view, corpus, out / "cache")
    t_capture = time.perf_counter() - t0

    cache = ResultCache(out / "cache")
    base = {"model": args.model, "corpus_digest": _digest(corpus), "languages": corpus.languages,
            "bits": args.bits, "grid": args.grid, "reservoir": args.reservoir, "fit_samples": args.fit_samples,
            "seed": args.seed, "segments": args.segments}
    block_of = {q.name: q.block for q in view.linears}
    rows, sites = [], []
    for site in tqdm(list(samples), desc="layers", unit="layer"):
        cfg = {**base, "site": site}
        res = cache.get(cfg)
        if res is None:
            res = analyse_site(samples[site], counts[site], args)
            cache.put(cfg, res)
        sites.append({"site": site, "block": block_of.get(site), "shares_input_with": shared[site],
                      **res["summary"]})
        rows += [{"site": site, "block": block_of.get(site), **r} for r in res["rows"]]

    langs = corpus.languages
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
        "spearman_penalty_mix": _spearman(theory_pen, meas_pen),
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
    result = {
        "experiment": EXPERIMENT,
        "provenance": provenance(model=args.model, corpus=args.corpus, languages=langs, bits=args.bits,
                                 grid=args.grid, segments=args.segments, reservoir=args.reservoir,
                                 fit_samples=args.fit_samples, seed=args.seed, device=args.device,
                                 quick=args.quick, include_bos=args.include_bos),
        "model_metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "baseline_note": PREQUANTIZED_NOTE if meta.get("prequantized") else "baseline is the model's own weights",
        "languages": langs, "bits": args.bits, "grid": args.grid,
        "agreement": agreement, "per_language": per_language, "sites": sites, "rows": rows,
        "timing": {"capture_seconds": t_capture, "wall_seconds": time.perf_counter() - t0},
    }
    write_outputs(out, result)
    return result


def write_outputs(out: Path, res: dict) -> None:
    use_agg()
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{EXPERIMENT}.json", res)
    cols = ["site", "block", "language", "count", "family", "excess_kurtosis", "alpha_star", "alpha_star_measured",
            "penalty_own_at_theory_alpha", *[f"alpha_{c}" for c in CHOICES], *[f"alpha_{c}_measured" for c in CHOICES],
            *[f"penalty_{c}" for c in CHOICES], *[f"penalty_{c}_measured" for c in CHOICES],
            *[f"penalty_{c}_at_theory_alpha" for c in CHOICES]]
    write_csv(out / f"{EXPERIMENT}.csv", res["rows"], cols)
    trows = [{"language": p["language"], "mix_theory": p["median_penalty_mix"],
              "mix_measured": p["median_penalty_mix_measured"],
              "minimax_measured": p["median_penalty_minimax_measured"],
              "weighted_measured": p["median_penalty_weighted_measured"],
              "worst_layers": p["worst_in_layers_mix"]} for p in res["per_language"]]
    write_latex_table(out / f"{EXPERIMENT}_table.tex", trows,
                      ["language", "mix_theory", "mix_measured", "minimax_measured", "weighted_measured",
                       "worst_layers"],
                      ["Language", "Mix (theory)", "Mix (measured)", "Minimax (measured)",
                       "Weighted (measured)", "Worst in layers"],
                      caption=(f"Median over layers of each language's MSE penalty "
                               f"$\\mathrm{{MSE}}_l(\\alpha)/\\mathrm{{MSE}}_l(\\alpha^*_l)-1$ of "
                               f"{res['bits']}-bit {res['grid']} activation clipping at the calibration-mix, "
                               "minimax and equally weighted alphas, and the number of layers in which "
                               "the language pays most under the mix."),
                      label="tab:language-alpha")
    langs, sites = res["languages"], [s["site"] for s in res["sites"]]
    P = np.full((len(sites), len(langs)), np.nan)
    for r in res["rows"]:
        P[sites.index(r["site"]), langs.index(r["language"])] = r["penalty_mix_measured"]
    fig, ax = plt.subplots(1, 2, figsize=(12, max(4, 0.12 * len(sites) + 2)),
                           gridspec_kw={"width_ratios": [1, 1.2]})
    im = ax[0].imshow(100 * P, aspect="auto", cmap="magma_r")
    ax[0].set_xticks(range(len(langs)), langs, rotation=45, ha="right")
    ax[0].set_yticks(range(len(sites)), [s.split(".")[-3] + "." + s.split(".")[-1] if s.count(".") >= 2 else s
                                         for s in sites], fontsize=5)
    fig.colorbar(im, ax=ax[0]).set_label("measured penalty of the mix alpha (%)")
    ax[0].set_title("penalty of the calibration-mix alpha", fontsize=9)
    t = np.array([r["penalty_mix"] for r in res["rows"]])
    m = np.array([r["penalty_mix_measured"] for r in res["rows"]])
    for l in langs:
        sel = np.array([r["language"] == l for r in res["rows"]])
        ax[1].scatter(np.clip(t[sel], 1e-5, None), np.clip(m[sel], 1e-5, None), s=8, label=l, alpha=0.7)
    lim = [1e-5, max(1e-4, float(np.nanmax(np.r_[t, m])) * 2)]
    ax[1].plot(lim, lim, "k--", lw=0.8)
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("theory penalty (fitted families)")
    ax[1].set_ylabel("measured penalty (exact sweep on samples)")
    ax[1].set_title(f"Spearman {res['agreement']['spearman_penalty_mix']:.2f}", fontsize=9)
    ax[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{res['provenance']['config']['model']}, {res['bits']}-bit {res['grid']} activations: "
                 f"{res['baseline_note']}", fontsize=8)
    save_figure(fig, out / f"{EXPERIMENT}.png")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    res = run(args)
    a = res["agreement"]
    print(f"{len(res['sites'])} layer inputs x {len(res['languages'])} languages; theory vs measured penalty of "
          f"the mix alpha: Spearman {a['spearman_penalty_mix']:.2f}, median |error| "
          f"{a['median_abs_error_penalty_mix']:.3g}; worst language agrees in "
          f"{100 * a['worst_language_agreement']:.0f}% of layers; theory's own alpha*_l costs a median "
          f"{100 * a['median_penalty_own_at_theory_alpha']:.1f}% (fit error), alpha* within "
          f"{100 * a['median_rel_error_alpha_star']:.1f}% (median)")
    for p in res["per_language"]:
        print(f"  {p['language']}: median penalty mix {100 * p['median_penalty_mix_measured']:.2f}% "
              f"(theory {100 * p['median_penalty_mix']:.2f}%), minimax "
              f"{100 * p['median_penalty_minimax_measured']:.2f}%, worst in {p['worst_in_layers_mix']} layers")
    return res


if __name__ == "__main__":
    main()
