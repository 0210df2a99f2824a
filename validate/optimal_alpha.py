"""Experiment: is the analytic MSE-optimal clipping threshold the measured one?

``python -m validate.optimal_alpha [--quick] [--model none|gemma-3-270m|...] [--out DIR]``

Part 1, synthetic. For every family x grid x bit width, draw seeded samples of the family and
compare theory (``theory.optimal_alpha``, ``theory.optimal_mse``, ``theory.expected_mse``) with
the exact empirical sweep (``empirical.sweep``, ``empirical.optimal``):

* ``alpha_rel_diff = alpha*_swept / alpha*_theory - 1``
* ``mse_rel_diff = MSE*_swept / MSE*_theory - 1``
* ``mse_z``: measured MSE at alpha*_theory minus theory, in standard errors of the sample mean
  (per-value squared errors), i.e. whether the disagreement is sampling noise. When only a few
  samples exceed alpha* (high bit widths, small samples) the standard error itself is unreliable;
  ``n_clipped_at_theory_alpha`` is reported next to it.

``MSE*_swept`` is the minimum of the sample's own curve, so it is biased low (it is fitted to
the sample); the measured MSE at the theoretical alpha* is the unbiased comparison.

Part 2, real weights. For every quantizable linear layer of a model: maximum-likelihood fits
(``empirical.fits``, location fixed at 0 because the grids are symmetric about 0), the best
family by BIC, the alpha* that theory predicts from it, the swept alpha* of the weight itself and
the MSE penalty ``MSE(alpha_predicted) / MSE(alpha*_swept) - 1`` (per tensor: one alpha per
weight matrix). The same penalty for absmax clipping (``alpha = max|w|``) and OCTAV (Sakr et al.
2022) is reported for scale. The distribution of penalties over layers is summarised by its
quantiles, not only its mean. The embedded ``gemma-3-270m`` ships as a Q4_K_M GGUF, so its
"full precision" weights are the dequantized GGUF, already quantized to ~4-5 bits; the JSON says
so.

Outputs under ``--out`` (default ``results/optimal_alpha``): ``optimal_alpha.json`` (provenance +
all numbers), ``synthetic.csv``, ``synthetic_table.tex``, ``mse_vs_alpha.png``, and with a model
``real_weights.csv``, ``real_weights_table.tex``, ``real_penalty.png``. Every item is cached in
``cache/`` under the out folder (keyed by its configuration), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from validate._common import (
    ResultCache,
    config_key,
    default_out_dir,
    provenance,
    save_figure,
    use_agg,
    write_csv,
    write_json,
    write_latex_table,
)

EXPERIMENT = "optimal_alpha"
DEFAULT_BITS = (2, 3, 4, 5, 6, 7, 8)
DEFAULT_GRIDS = ("aciq", "midrise", "midtread", "int", "uint")
DEFAULT_FAMILIES = ("gaussian", "laplace", "gennorm", "student_t", "lognormal")
DEFAULT_MODEL = "gemma-3-270m"
PENALTY_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
_CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def synthetic_distribution(family: str):
    """The representative member of each family used in the synthetic part (unit-ish scale)."""
    from theory import Gaussian, GeneralizedGaussian, Laplace, Lognormal, StudentT

    table = {
        "gaussian": lambda: Gaussian(1.0),
        "laplace": lambda: Laplace(1.0),
        "gennorm": lambda: GeneralizedGaussian(0.8, 1.0),  # heavier than Laplace
        "student_t": lambda: StudentT(6.0, 1.0),  # finite 4th moment: MSE has a standard error
        "lognormal": lambda: Lognormal(0.0, 0.6),
    }
    if family not in table:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(table)}")
    return table[family]()


def valid_pair(family: str, grid: str) -> bool:
    """One-sided data goes with the one-sided grid only (docs/design.md)."""
    return (family == "lognormal") == (grid == "uint")


def _key(obj: Mapping[str, Any]) -> str:
    return config_key(obj, _CACHE_VERSION)


def ItemCache(folder: Path | None) -> ResultCache:
    """This experiment's cache: :class:`validate._common.ResultCache` at its cache version."""
    return ResultCache(folder, version=_CACHE_VERSION)


def _progress(it: Iterable, total: int | None, desc: str, enabled: bool):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, total=total, desc=desc, file=sys.stderr, leave=False)


def _per_value_sq_error(x: np.ndarray, grid: str, alpha: float, bits: int) -> np.ndarray:
    """Per-value squared errors at one alpha (for the standard error of the measured MSE)."""
    from theory.grids import quantize

    if grid == "aciq":
        return (x - np.clip(x, -alpha, alpha)) ** 2  # the noise term is a constant
    return (x - quantize(x, grid, alpha, bits)) ** 2


def _quantiles(v: Sequence[float]) -> dict[str, float | None]:
    a = np.asarray([t for t in v if t is not None and math.isfinite(t)], dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    out: dict[str, Any] = {"n": int(a.size), "mean": float(a.mean()), "max": float(a.max())}
    for q in PENALTY_QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = float(np.quantile(a, q))
    out["median"] = out["q50"]
    out["frac_below_1pct"] = float(np.mean(a < 0.01))
    out["frac_below_5pct"] = float(np.mean(a < 0.05))
    return out


# --------------------------------------------------------------------------------------------
# part 1: synthetic
# --------------------------------------------------------------------------------------------

def synthetic_item(family: str, grid: str, bits: Sequence[int], samples: int, seed: int,
                   x: np.ndarray | None = None, curve_points: int = 25) -> dict[str, Any]:
    """Theory vs sweep for one family and grid over all ``bits``.

    Returns a dict with ``rows`` (one per bit width) and ``curves`` (MSE vs alpha, theory and
    measured, for the figure).
    """
    from empirical.optimal import empirical_optimal_alpha
    from empirical.sweep import prepare
    from theory import expected_mse, optimal_alpha, optimal_mse

    dist = synthetic_distribution(family)
    if x is None:
        x = sample_family(family, samples, seed)
    sm = prepare(x)
    sd = float(np.sqrt(dist.variance))
    rows, curves = [], []
    for m in bits:
        a_th = float(optimal_alpha(dist, m, grid))
        mse_th = float(optimal_mse(dist, m, grid))
        opt = empirical_optimal_alpha(sm, m, grid)
        mse_at_th = float(sm.mse(a_th, m, grid))
        err = _per_value_sq_error(x, grid, a_th, m)
        se = float(err.std(ddof=1) / math.sqrt(err.size))
        rows.append({
            "family": family, "grid": grid, "bits": int(m), "params": dist.params,
            "samples": int(x.size), "alpha_theory": a_th, "alpha_swept": opt.alpha,
            "alpha_rel_diff": opt.alpha / a_th - 1.0, "alpha_theory_over_sd": a_th / sd,
            "mse_theory": mse_th, "mse_swept": opt.mse, "mse_rel_diff": opt.mse / mse_th - 1.0,
            "mse_at_theory_alpha": mse_at_th, "mse_at_theory_alpha_se": se,
            "mse_z": (mse_at_th - mse_th) / se if se > 0 else None,
            # Few clipped values make the clipping error (and its estimated standard error) rest
            # on a handful of draws: z is only meaningful when this count is not tiny.
            "n_clipped_at_theory_alpha": int(np.count_nonzero(np.abs(x) > a_th)),
            "penalty_theory_alpha": mse_at_th / opt.mse - 1.0,
        })
        alphas = a_th * np.linspace(0.3, 2.5, curve_points)
        curves.append({
            "bits": int(m), "alpha": alphas,
            "mse_measured": sm.mse(alphas, m, grid),
            "mse_theory": np.asarray(expected_mse(dist, alphas, m, grid), dtype=np.float64),
            "alpha_theory": a_th, "mse_theory_opt": mse_th,
            "alpha_swept": opt.alpha, "mse_swept": opt.mse,
        })
    return {"family": family, "grid": grid, "sd": sd, "rows": rows, "curves": curves}


def sample_family(family: str, samples: int, seed: int) -> np.ndarray:
    """Seeded float64 samples of the synthetic member of ``family`` (independent per family)."""
    dist = synthetic_distribution(family)
    fam_id = sorted(DEFAULT_FAMILIES).index(family) if family in DEFAULT_FAMILIES else 99
    rng = np.random.default_rng([int(seed), fam_id])
    return np.asarray(dist.scipy.rvs(size=int(samples), random_state=rng), dtype=np.float64)


def run_synthetic(families: Sequence[str], grids: Sequence[str], bits: Sequence[int],
                  samples: int, seed: int, cache: ItemCache, progress: bool = True
                  ) -> list[dict[str, Any]]:
    items = []
    pairs = [(f, g) for f in families for g in grids if valid_pair(f, g)]
    samples_cache: dict[str, np.ndarray] = {}
    for f, g in _progress(pairs, len(pairs), "synthetic", progress):
        cfg = {"part": "synthetic", "family": f, "grid": g, "bits": list(bits),
               "samples": int(samples), "seed": int(seed)}
        res = cache.get(cfg)
        if res is None:
            if f not in samples_cache:
                samples_cache = {f: sample_family(f, samples, seed)}  # one family in memory
            res = synthetic_item(f, g, bits, samples, seed, x=samples_cache[f])
            res = json.loads(json.dumps(res, default=_np_default))
            cache.put(cfg, res)
        items.append(res)
    return items


def _np_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))


def synthetic_summary(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per family x grid: worst agreement over the bit widths."""
    out = []
    for it in items:
        rows = it["rows"]
        zs = [abs(r["mse_z"]) for r in rows if r["mse_z"] is not None]
        out.append({
            "family": it["family"], "grid": it["grid"],
            "max_abs_alpha_rel_diff": max(abs(r["alpha_rel_diff"]) for r in rows),
            "max_abs_mse_rel_diff": max(abs(r["mse_rel_diff"]) for r in rows),
            "max_abs_mse_z": max(zs) if zs else None,
            "max_penalty_theory_alpha": max(r["penalty_theory_alpha"] for r in rows),
        })
    return out


def plot_synthetic(items: Sequence[Mapping[str, Any]], path: Path) -> Path:
    use_agg()
    import matplotlib.pyplot as plt

    fams = list(dict.fromkeys(it["family"] for it in items))
    grids = list(dict.fromkeys(it["grid"] for it in items if it["grid"] != "uint"))
    ncols = max(1, len(grids))
    fig, axes = plt.subplots(len(fams), ncols, figsize=(3.2 * ncols, 2.6 * len(fams)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    cmap = plt.get_cmap("viridis")
    for it in items:
        r = fams.index(it["family"])
        c = 0 if it["grid"] == "uint" else grids.index(it["grid"])
        ax = axes[r, c]
        ax.set_visible(True)
        sd = it["sd"]
        nb = max(1, len(it["curves"]) - 1)
        for i, cv in enumerate(it["curves"]):
            col = cmap(i / nb)
            a = np.asarray(cv["alpha"]) / sd
            ax.plot(a, cv["mse_theory"], "-", color=col, lw=1.2, label=f"M={cv['bits']}")
            ax.plot(a, cv["mse_measured"], "o", color=col, ms=2.5, mfc="none")
            ax.plot(cv["alpha_theory"] / sd, cv["mse_theory_opt"], "*", color="k", ms=6)
            ax.plot(cv["alpha_swept"] / sd, cv["mse_swept"], "x", color="tab:red", ms=5)
        ax.set_yscale("log")
        ax.set_title(f"{it['family']} / {it['grid']}", fontsize=8)
        ax.set_xlabel(r"$\alpha/\sigma$", fontsize=8)
        ax.set_ylabel("MSE", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = next((ax.get_legend_handles_labels() for ax in axes.ravel()
                            if ax.get_visible()), ([], []))
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(8, len(labels)), fontsize=7,
                   title="line: theory, circles: measured, *: theory $\\alpha^*$, x: swept $\\alpha^*$",
                   title_fontsize=7, bbox_to_anchor=(0.5, 1.0 + 0.02 / len(fams)))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.06 / max(1, len(fams) ** 0.5)))
    out = save_figure(fig, path)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------
# part 2: real weights
# --------------------------------------------------------------------------------------------

def weight_item(name: str, w: np.ndarray, bits: Sequence[int], grid: str,
                max_samples: int = 200_000, seed: int = 0,
                families: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit, predict and sweep one weight matrix (per tensor: one alpha for the whole matrix)."""
    from empirical.fits import first_theory_fit, fit_all
    from empirical.optimal import empirical_optimal_alpha, octav_alpha
    from empirical.sweep import prepare
    from theory import optimal_alpha

    w = np.asarray(w)
    fits = fit_all(w, families=families, max_samples=max_samples, seed=seed, fix_loc=True)
    used, dist, skipped = first_theory_fit(fits)  # best BIC first, skipping e.g. Student-t nu <= 2
    sm = prepare(w)
    absmax = float(sm.absmax[0])
    rec: dict[str, Any] = {
        "name": name, "shape": list(w.shape), "n_params": int(w.size),
        "excess_kurtosis": fits[0].excess_kurtosis, "best_family": fits[0].family,
        "used_family": used.family if used else None,
        "fits": [f.to_dict() for f in fits], "skipped_fits": skipped,
        "absmax": absmax, "std": float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))),
        "per_bits": [],
    }
    for m in bits:
        opt = empirical_optimal_alpha(sm, m, grid)
        entry: dict[str, Any] = {"bits": int(m), "alpha_swept": opt.alpha, "mse_swept": opt.mse}
        if dist is not None:
            a_pred = float(optimal_alpha(dist, m, grid))
            mse_pred = float(sm.mse(a_pred, m, grid))
            entry.update(alpha_predicted=a_pred, mse_predicted=mse_pred,
                         alpha_rel_diff=a_pred / opt.alpha - 1.0,
                         penalty=mse_pred / opt.mse - 1.0)
        mse_abs = float(sm.mse(absmax, m, grid))
        a_oct = octav_alpha(sm, m, grid)
        mse_oct = float(sm.mse(a_oct, m, grid))
        entry.update(alpha_absmax=absmax, penalty_absmax=mse_abs / opt.mse - 1.0,
                     alpha_octav=a_oct, penalty_octav=mse_oct / opt.mse - 1.0)
        rec["per_bits"].append(entry)
    return rec


def real_weights_report(named_weights: Mapping[str, np.ndarray], bits=(4,), grid: str = "int",
                        *, max_samples: int = 200_000, seed: int = 0,
                        families: Sequence[str] | None = None, cache_dir: Path | None = None,
                        cache_tag: str = "", progress: bool = True) -> dict[str, Any]:
    """Predicted vs swept clipping for a set of weight matrices (plain arrays; no model needed).

    Parameters
    ----------
    named_weights : mapping of str to array
        Layer name -> weight matrix.
    bits : int or sequence of int
        Bit widths.
    grid : str
        Signed grid (weights are signed): ``int`` (deployed), ``midrise``, ``midtread``, ``aciq``.
    max_samples, seed, families
        Passed to :func:`empirical.fits.fit_all`.
    cache_dir : Path, optional
        Per-layer JSON cache (resume); ``cache_tag`` identifies the model in the cache key.

    Returns
    -------
    dict
        ``layers`` (per-layer records) and ``summary``: for every bit width the quantiles of the
        MSE penalty of the predicted alpha, of absmax and of OCTAV, and the count of best-fit
        families.
    """
    from empirical.sweep import validate_data  # noqa: F401  (fail early on an unusable install)
    from theory.grids import Grid

    g = Grid.parse(grid)
    if g is Grid.UINT:
        raise ValueError("weights are signed; use a signed grid (int, midrise, midtread, aciq)")
    bits = [int(b) for b in np.atleast_1d(bits)]
    if not named_weights:
        raise ValueError("no weights given")
    cache = ItemCache(cache_dir)
    layers = []
    for name, w in _progress(named_weights.items(), len(named_weights), "layers", progress):
        cfg = {"part": "real", "tag": cache_tag, "name": name, "shape": list(np.shape(w)),
               "bits": bits, "grid": g.value, "max_samples": max_samples, "seed": seed,
               "families": list(families) if families else None}
        rec = cache.get(cfg) if cache_tag else None  # arrays without a tag are never cached
        if rec is None:
            rec = weight_item(name, np.asarray(w), bits, g.value, max_samples, seed, families)
            rec = json.loads(json.dumps(rec, default=_np_default))
            if cache_tag:
                cache.put(cfg, rec)
        layers.append(rec)
    summary = []
    for j, m in enumerate(bits):
        pb = [lay["per_bits"][j] for lay in layers]
        summary.append({
            "bits": m, "grid": g.value, "n_layers": len(layers),
            "penalty_predicted": _quantiles([p.get("penalty") for p in pb]),
            "penalty_absmax": _quantiles([p["penalty_absmax"] for p in pb]),
            "penalty_octav": _quantiles([p["penalty_octav"] for p in pb]),
            "alpha_rel_diff": _quantiles([abs(p["alpha_rel_diff"]) for p in pb
                                          if p.get("alpha_rel_diff") is not None]),
        })
    fam_counts: dict[str, int] = {}
    for lay in layers:
        fam_counts[lay["best_family"]] = fam_counts.get(lay["best_family"], 0) + 1
    return {"grid": g.value, "bits": bits, "layers": layers, "summary": summary,
            "best_family_counts": fam_counts,
            "excess_kurtosis": _quantiles([lay["excess_kurtosis"] for lay in layers])}


def model_weights(model_name: str, limit: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Weights of every quantizable linear of ``model_name`` as float32 numpy arrays."""
    from empirical.models import load_model, quantizable_linears

    model, _tok, meta = load_model(model_name, return_metadata=True)
    lins = quantizable_linears(model)
    if limit is not None:
        lins = lins[: int(limit)]
    out = {}
    for lin in lins:
        out[lin.name] = lin.module.weight.detach().float().cpu().numpy()
    return out, {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))}


def plot_real(report: Mapping[str, Any], path: Path, model: str) -> Path:
    use_agg()
    import matplotlib.pyplot as plt

    bits = report["bits"]
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    cmap = plt.get_cmap("viridis")
    for j, m in enumerate(bits):
        pen = np.sort([lay["per_bits"][j].get("penalty") for lay in report["layers"]
                       if lay["per_bits"][j].get("penalty") is not None])
        if pen.size == 0:
            continue
        y = np.arange(1, pen.size + 1) / pen.size
        ax.step(np.maximum(pen, 1e-7), y, where="post", color=cmap(j / max(1, len(bits) - 1)),
                label=f"M={m}")
    ax.set_xscale("log")
    ax.set_xlabel(r"MSE penalty of predicted $\alpha^*$ vs swept optimum")
    ax.set_ylabel("fraction of layers")
    ax.set_title(f"{model}, grid {report['grid']}, per tensor", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m validate.optimal_alpha", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/optimal_alpha)")
    p.add_argument("--samples", type=float, default=1e6, help="synthetic samples per family")
    p.add_argument("--bits", type=int, nargs="+", default=None, help="bit widths (default 2..8)")
    p.add_argument("--grids", nargs="+", default=None, help=f"grids (default {' '.join(DEFAULT_GRIDS)})")
    p.add_argument("--families", nargs="+", default=None,
                   help=f"synthetic families (default {' '.join(DEFAULT_FAMILIES)})")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model for the real-weights part, or 'none'")
    p.add_argument("--real-grid", default="int", help="grid of the real-weights part (default int)")
    p.add_argument("--real-bits", type=int, nargs="+", default=None,
                   help="bit widths of the real-weights part (default: --bits)")
    p.add_argument("--max-fit-samples", type=int, default=200_000,
                   help="values per layer used by the maximum-likelihood fits")
    p.add_argument("--max-layers", type=int, default=None, help="only the first N linears")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 50k samples, bits 2 4 8, 4 layers, 20k fit samples")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out) if args.out is not None else default_out_dir(EXPERIMENT)
    bits = list(args.bits) if args.bits else ([2, 4, 8] if args.quick else list(DEFAULT_BITS))
    samples = int(min(args.samples, 50_000) if args.quick else args.samples)
    grids = list(args.grids or DEFAULT_GRIDS)
    families = list(args.families or DEFAULT_FAMILIES)
    real_bits = list(args.real_bits) if args.real_bits else bits
    max_fit = min(args.max_fit_samples, 20_000) if args.quick else args.max_fit_samples
    max_layers = args.max_layers if args.max_layers is not None else (4 if args.quick else None)
    progress = not args.no_progress
    from theory.grids import Grid, check_bits

    for gname in grids:
        g = Grid.parse(gname)
        for m in bits:
            check_bits(m, g)
    for f in families:
        synthetic_distribution(f)
    cache = ItemCache(out / "cache")
    t0 = time.perf_counter()

    items = run_synthetic(families, grids, bits, samples, args.seed, cache, progress)
    rows = [r for it in items for r in it["rows"]]
    summary = synthetic_summary(items)
    cols = ["family", "grid", "bits", "alpha_theory", "alpha_swept", "alpha_rel_diff",
            "mse_theory", "mse_swept", "mse_rel_diff", "mse_at_theory_alpha",
            "mse_at_theory_alpha_se", "mse_z", "n_clipped_at_theory_alpha", "penalty_theory_alpha",
            "samples"]
    files = {"synthetic_csv": write_csv(out / "synthetic.csv", rows, cols)}
    files["synthetic_table"] = write_latex_table(
        out / "synthetic_table.tex", summary,
        ["family", "grid", "max_abs_alpha_rel_diff", "max_abs_mse_rel_diff", "max_abs_mse_z",
         "max_penalty_theory_alpha"],
        headers=["family", "grid", r"$\max|\Delta\alpha^*|/\alpha^*$", r"$\max|\Delta\mathrm{MSE}^*|/\mathrm{MSE}^*$",
                 r"$\max|z|$", "max penalty"],
        caption=(f"Theory vs exact empirical sweep, {samples:,} seeded samples per family, bits "
                 f"{min(bits)}--{max(bits)}. $z$: measured minus theoretical MSE at the theoretical "
                 r"$\alpha^*$ in standard errors; penalty: excess measured MSE of the theoretical "
                 r"$\alpha^*$ over the swept optimum."),
        label="tab:optimal-alpha-synthetic")
    if items:
        files["figure"] = plot_synthetic(items, out / "mse_vs_alpha.png")

    real = None
    model = None if str(args.model).lower() == "none" else args.model
    if model is not None:
        weights, meta = model_weights(model, max_layers)
        tag = _key({"model": model, "meta": meta, "layers": max_layers})
        report = real_weights_report(weights, real_bits, args.real_grid, max_samples=max_fit,
                                     seed=args.seed, cache_dir=out / "cache", cache_tag=tag,
                                     progress=progress)
        note = None
        if meta.get("prequantized") or model == DEFAULT_MODEL:
            note = ("The embedded gemma-3-270m is a Q4_K_M GGUF: its 'full precision' weights are "
                    "the dequantized GGUF, already quantized to about 4-5 bits before this run.")
        real = {"model": model, "model_metadata": meta, "note": note, **report}
        rrows = [{"layer": lay["name"], "n_params": lay["n_params"], "best_family": lay["best_family"],
                  "used_family": lay["used_family"], "excess_kurtosis": lay["excess_kurtosis"], **pb}
                 for lay in report["layers"] for pb in lay["per_bits"]]
        files["real_csv"] = write_csv(out / "real_weights.csv", rrows,
                                      ["layer", "n_params", "best_family", "used_family",
                                       "excess_kurtosis", "bits", "alpha_predicted", "alpha_swept",
                                       "alpha_rel_diff", "mse_predicted", "mse_swept", "penalty",
                                       "alpha_absmax", "penalty_absmax", "alpha_octav", "penalty_octav"])
        trows = []
        for s in report["summary"]:
            pp, pa, po = s["penalty_predicted"], s["penalty_absmax"], s["penalty_octav"]
            trows.append({"bits": s["bits"], "n": pp.get("n"), "median": pp.get("median"),
                          "q75": pp.get("q75"), "q90": pp.get("q90"), "max": pp.get("max"),
                          "frac1": pp.get("frac_below_1pct"), "octav_median": po.get("median"),
                          "absmax_median": pa.get("median")})
        files["real_table"] = write_latex_table(
            out / "real_weights_table.tex", trows,
            ["bits", "n", "median", "q75", "q90", "max", "frac1", "octav_median", "absmax_median"],
            headers=["$M$", "layers", "median", "$q_{75}$", "$q_{90}$", "max", "share $<1\\%$",
                     "OCTAV median", "absmax median"],
            caption=(f"MSE penalty of the clipping threshold predicted from each layer's best-fit "
                     f"distribution over the swept optimum, {model}, grid {args.real_grid}, per tensor."
                     + (" Weights are the dequantized Q4\\_K\\_M GGUF." if note else "")),
            label="tab:optimal-alpha-real")
        files["real_figure"] = plot_real(report, out / "real_penalty.png", model)

    result = {
        "experiment": EXPERIMENT,
        "provenance": provenance(samples=samples, bits=bits, grids=grids, families=families,
                                 model=model, real_grid=args.real_grid, real_bits=real_bits,
                                 max_fit_samples=max_fit, max_layers=max_layers, seed=args.seed,
                                 quick=bool(args.quick)),
        "synthetic": {
            "distributions": {f: synthetic_distribution(f).params for f in families},
            "rows": rows, "summary": summary,
            "curves": [{"family": it["family"], "grid": it["grid"], "curves": it["curves"]} for it in items],
        },
        "real_weights": real,
        "files": {k: str(v) for k, v in files.items()},
        "elapsed_s": time.perf_counter() - t0,
    }
    files["json"] = write_json(out / f"{EXPERIMENT}.json", result)
    print(f"optimal_alpha: wrote {out}")
    for s in summary:
        z = s["max_abs_mse_z"]
        print(f"  {s['family']:>9} {s['grid']:>8}: max|dalpha|={s['max_abs_alpha_rel_diff']:.2e} "
              f"max|dMSE|={s['max_abs_mse_rel_diff']:.2e} max|z|={(z if z is not None else float('nan')):.2f}")
    if real is not None:
        for s in real["summary"]:
            pp = s["penalty_predicted"]
            print(f"  {model} M={s['bits']}: penalty median={pp.get('median', float('nan')):.3g} "
                  f"q90={pp.get('q90', float('nan')):.3g} max={pp.get('max', float('nan')):.3g} "
                  f"(OCTAV median={s['penalty_octav'].get('median', float('nan')):.3g}, "
                  f"absmax median={s['penalty_absmax'].get('median', float('nan')):.3g})")
    return result


if __name__ == "__main__":
    main()
