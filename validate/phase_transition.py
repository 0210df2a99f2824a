"""Headline experiment: how much of a model must stay in high precision before quantization stops
hurting other languages more than English, and does the additive theory predict it?

``python -m validate.phase_transition [--quick] [--model ...] [--languages ...] [--out DIR]``

Load -> run -> compare with theory -> write:

1. Full-precision bits per byte per language (docs/design.md), then one pass per *unit* (a decoder
   block by default, or a single Linear with ``--unit linear``) with only that unit quantized:
   the single-unit degradations ``d_{l,i}``.
2. Theory (``theory.protection``): the additive model ``d_l(P) = sum_{i not in P} s_{l,i} eps_i``
   with ``eps_i`` the quantization MSE theory predicts for the unit's weights (best-fit family per
   Linear, ``theory.expected_mse``) and ``s_{l,i} = d_{l,i} / eps_i``; it ranks the units
   (``--ranking``), predicts the disparity curve D(p) and the critical protected fraction p*.
3. Measurement: protect units in ranked order, from none to all (or ``--stop-after`` steps past
   the crossing), one pass each: the measured D(p) with paired bootstrap confidence intervals over
   sentences, and the measured p*.
4. Compare predicted and measured curves (R^2, p*) and write ``phase_transition.json``
   (provenance included), ``curve.csv``, ``phase_transition_table.tex`` and
   ``phase_transition.png`` under ``--out``.

Every forward result is cached under ``<out>/cache`` by its configuration (model, corpus,
languages, segments, quantization, protected set), written atomically, so a rerun performs no
forward pass and an interrupted run resumes where it stopped.

The embedded ``gemma-3-270m`` ships as a Q4_K_M GGUF: its "full precision" baseline is the
dequantized GGUF, already quantized to about 4-5 bits. The JSON and the figure say so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from validate._common import (
    ResultCache, default_out_dir, provenance, save_figure, use_agg, write_csv, write_json, write_latex_table,
)

EXPERIMENT = "phase_transition"
# English reference plus languages spanning scripts: Hebrew, Arabic, Japanese, Hindi, Russian,
# Chinese, and French as a Latin-script control.
DEFAULT_LANGUAGES = ("en", "he", "ar", "ja", "hi", "ru", "zh", "fr")
PREQUANTIZED_NOTE = ("baseline is the dequantized Q4_K_M GGUF (weights already quantized to about "
                     "4-5 bits before this experiment)")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m validate.phase_transition", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m",
                   help="embedded name (gemma-3-270m, smollm2-135m), tiny-* test model, local dir or hub id")
    p.add_argument("--corpus", default="udhr", help="'udhr' (embedded) or a one-file-per-language directory")
    p.add_argument("--languages", nargs="+", default=list(DEFAULT_LANGUAGES),
                   help="language codes; the first is the reference unless --reference is given")
    p.add_argument("--reference", nargs="+", default=None, help="reference group (default: first language)")
    p.add_argument("--bits", type=int, default=4, help="weight bit width (default 4)")
    p.add_argument("--grid", default="int", help="aciq, midrise, midtread or int (default int)")
    p.add_argument("--granularity", default="channel", choices=["tensor", "channel", "group"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--clipping", default="absmax", choices=["absmax", "theory", "sweep"])
    p.add_argument("--unit", default="block", choices=["block", "linear"],
                   help="what is protected together: a decoder block or one Linear")
    p.add_argument("--ranking", default="excess",
                   choices=["excess", "position", "reverse_position", "kurtosis", "size"])
    p.add_argument("--segments", type=int, default=None, help="segments per language (default: all)")
    p.add_argument("--max-length", type=int, default=512, help="token window for bits per byte")
    p.add_argument("--stop-after", type=int, default=3,
                   help="stop the measured curve this many steps past the crossing (default 3; "
                        "a negative value measures the full curve, none to all)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"output folder (default results/{EXPERIMENT})")
    p.add_argument("--quick", action="store_true",
                   help="small run: English, Hebrew, Japanese, 4 segments each, 128-token windows, "
                        "stop 1 step past the crossing, 200 resamples")
    a = p.parse_args(argv)
    if a.stop_after is not None and a.stop_after < 0:
        a.stop_after = None
    if a.quick:
        # On two CPU cores a gemma-3-270m pass costs ~6 ms per token (about half of it the
        # 262k-way output layer), so the quick run keeps to a few hundred tokens per pass.
        if a.languages == list(DEFAULT_LANGUAGES):
            a.languages = ["en", "he", "ja"]
        a.segments = a.segments or 4
        a.max_length = min(a.max_length, 128)
        a.stop_after = min(a.stop_after, 1) if a.stop_after >= 0 else a.stop_after
        a.bootstrap = min(a.bootstrap, 200)
    return a


# ---- loading --------------------------------------------------------------------------------

def load_corpus(spec: str, languages: Sequence[str], segments: int | None):
    from empirical.corpora import load_parallel_dir, load_udhr

    corpus = load_udhr(languages) if spec == "udhr" else load_parallel_dir(spec, languages)
    return corpus.head(segments) if segments else corpus


def units_of(view, unit: str) -> tuple[list[str], list[list]]:
    """Protection units: names and their Linears (grouped by decoder block, or one per Linear)."""
    if unit == "linear":
        return [q.name for q in view.linears], [[q] for q in view.linears]
    groups: dict[str, list] = {}
    for q in view.linears:
        key = f"block{q.block}" if q.block is not None else q.name
        groups.setdefault(key, []).append(q)
    return list(groups), list(groups.values())


# ---- cached forward passes ------------------------------------------------------------------

class PassCache:
    """Per-language per-segment NLL of one pass (a set of quantized units), cached by config;
    counts the passes actually run and their time."""

    def __init__(self, folder: Path, base: dict):
        self.cache = ResultCache(folder)
        self.base = base
        self.forward_seconds = 0.0
        self.n_forward = 0

    def get(self, quantized: Sequence[str], compute) -> dict[str, np.ndarray]:
        config = {**self.base, "quantized": sorted(quantized)}
        hit = self.cache.get(config)
        if hit is not None:
            return {k: np.asarray(v) for k, v in hit.items()}
        t0 = time.perf_counter()
        nll = compute()
        self.forward_seconds += time.perf_counter() - t0
        self.n_forward += 1
        self.cache.put(config, {k: v.tolist() for k, v in nll.items()})
        return nll


# ---- statistics -------------------------------------------------------------------------------

def degradation(nll_q: dict, nll_fp: dict, idx: dict | None = None) -> dict:
    """d_l = bpb_q / bpb_full - 1 (bytes cancel, so it is a ratio of NLL sums over the same ids).

    ``idx[l]`` selects sentence ids; a ``(n_boot, n)`` array gives one d_l per resample."""
    out = {}
    for l in nll_fp:
        sel = slice(None) if idx is None else idx[l]
        d = nll_q[l][sel].sum(axis=-1) / nll_fp[l][sel].sum(axis=-1) - 1.0
        out[l] = float(d) if np.ndim(d) == 0 else d
    return out


def disparity(d: dict, reference: Sequence[str]):
    """Mean over non-reference languages of d_l / mean_{r in R} d_r (docs/design.md); nan where the
    reference is not degraded. Array values (bootstrap resamples) give an array."""
    ref = np.mean([d[r] for r in reference], axis=0)
    others = np.mean([d[l] for l in d if l not in reference], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(ref > 0, others / np.where(ref > 0, ref, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


def bootstrap_disparity(nll_q, nll_fp, reference, parallel: bool, n_boot: int, seed: int):
    """Paired bootstrap over sentences: the same resampled ids in every language when parallel.
    Returns the 2.5% and 97.5% quantiles of D (nan when fewer than half the resamples give a
    finite D)."""
    rng = np.random.default_rng(seed)
    n0 = len(next(iter(nll_fp.values())))
    shared = rng.integers(0, n0, (n_boot, n0)) if parallel else None
    idx = {l: shared if parallel else rng.integers(0, len(nll_fp[l]), (n_boot, len(nll_fp[l])))
           for l in nll_fp}
    vals = disparity(degradation(nll_q, nll_fp, idx), reference)
    vals = vals[np.isfinite(vals)]
    if vals.size < max(10, n_boot // 2):
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [0.025, 0.975])
    return float(lo), float(hi)


def r_squared(pred, meas) -> float:
    pred, meas = np.asarray(pred, float), np.asarray(meas, float)
    ok = np.isfinite(pred) & np.isfinite(meas)
    if ok.sum() < 2:
        return float("nan")
    ss_res = np.sum((meas[ok] - pred[ok]) ** 2)
    ss_tot = np.sum((meas[ok] - meas[ok].mean()) ** 2)
    return float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


# ---- theory's per-unit eps ------------------------------------------------------------------

FIT_SAMPLES = 8000


def weight_fits(linears, seed: int, cache: ResultCache | None = None) -> dict[str, dict]:
    """Best-fit family (BIC) of every Linear's weights, as theory distributions' parameters.

    Fitted with the location fixed at 0, since the quantizer grid is symmetric about 0, on a
    seeded subsample of ``FIT_SAMPLES`` weights. Cached by the Linears' names and a float64
    checksum of their weights, so every run on the same model (quick or full, any corpus) fits
    once.
    """
    import torch

    from empirical.fits import best_theory_fit

    digest = hashlib.sha256(json.dumps(
        [[q.name, float(q.module.weight.detach().sum(dtype=torch.float64))] for q in linears]
    ).encode()).hexdigest()[:16]
    config = {"weight_fits": digest, "n": len(linears), "samples": FIT_SAMPLES, "seed": seed}
    hit = cache.get(config) if cache is not None else None
    if hit is not None:
        return hit
    out = {}
    for q in linears:
        w = q.module.weight.detach().double().cpu().numpy().ravel()
        fit, _ = best_theory_fit(w, max_samples=FIT_SAMPLES, seed=seed, fix_loc=True)
        out[q.name] = {"family": fit.family, "params": fit.params, "excess_kurtosis": fit.excess_kurtosis}
    if cache is not None:
        cache.put(config, out)
    return out


def predicted_eps(unit_linears, fits: dict[str, dict], bits: int, grid: str):
    """Theory's predicted total squared weight error of each unit, the Shannon lower bound on it
    at the same rate, and per-Linear records: theory's alpha* for the Linear's fitted family,
    ``n_params * expected_mse`` at it and ``n_params * shannon_lower_bound(bits)``.

    Returns ``(eps, slb, rows)``.
    """
    from empirical.fits import theory_distribution
    from theory import expected_mse, optimal_alpha, shannon_lower_bound

    g = "midrise" if grid == "aciq" else grid
    eps, slb, rows = [], [], []
    for lins in unit_linears:
        tot = low = 0.0
        for q in lins:
            f = fits[q.name]
            dist = theory_distribution(f["family"], f["params"])
            a = optimal_alpha(dist, bits, g)
            mse = float(expected_mse(dist, a, bits, g))
            bound = float(shannon_lower_bound(dist, bits))
            tot += mse * q.n_params
            low += bound * q.n_params
            rows.append({"layer": q.name, "family": f["family"], "excess_kurtosis": f["excess_kurtosis"],
                         "alpha_star": a, "predicted_mse": mse, "shannon_lower_bound": bound,
                         "n_params": q.n_params})
        eps.append(tot)
        slb.append(low)
    return np.asarray(eps), np.asarray(slb), rows


# ---- the experiment -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    import torch
    from tqdm.auto import tqdm

    from empirical.bpb import BpbEngine
    from empirical.fakequant import FakeQuantizer, QuantConfig
    from empirical.models import cache_dir, load_model, model_view
    from theory.protection import DamageModel, critical_fraction, disparity_bound, disparity_curve, rank_layers

    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    out = Path(args.out) if args.out else default_out_dir(EXPERIMENT)
    torch.manual_seed(args.seed)
    model, tok, meta = load_model(args.model, device=args.device, seed=args.seed, return_metadata=True)
    corpus = load_corpus(args.corpus, args.languages, args.segments)
    langs = corpus.languages
    reference = [corpus.select([r]).languages[0] for r in (args.reference or args.languages[:1])]
    view = model_view(model)
    cfg = QuantConfig(bits=args.bits, grid=args.grid, granularity=args.granularity,
                      group_size=args.group_size, clipping=args.clipping)
    names, unit_lins = units_of(view, args.unit)
    all_lins = [q for lins in unit_lins for q in lins]
    n_params = np.array([sum(q.n_params for q in lins) for lins in unit_lins], dtype=float)
    # first decoder block each unit touches (a unit outside the blocks forces a full pass)
    first_block = [min((q.block if q.block is not None else 0) for q in lins) for lins in unit_lins]
    fq = FakeQuantizer(all_lins, cfg, seed=args.seed)
    n_bytes = {l: np.array([len(s.encode()) for s in corpus[l]]) for l in langs}
    engine = BpbEngine(model, tok, {l: corpus[l] for l in langs}, max_length=args.max_length,
                       device=args.device)
    timing["load_seconds"] = time.perf_counter() - t_start

    base = {"model": args.model, "corpus": args.corpus, "languages": langs, "segments": args.segments,
            "max_length": args.max_length, "quant": cfg.key(), "unit": args.unit, "seed": args.seed,
            "corpus_digest": hashlib.sha256(json.dumps(corpus.texts, sort_keys=True).encode()).hexdigest()[:16]}
    cache = PassCache(out / "cache", base)
    quantize_seconds = [0.0]

    def forward(quantized_units: Sequence[int]):
        qset = set(quantized_units)
        protect = {q.name for i, lins in enumerate(unit_lins) if i not in qset for q in lins}
        start = min((first_block[i] for i in qset), default=0)

        def compute():
            if engine._recorded is None:
                # The reference pass, recorded once so that later passes replay the blocks
                # before their first quantized one (also on a resumed run).
                ref = engine.record()
                if not qset:
                    return ref
            t0 = time.perf_counter()
            for q in all_lins:
                if q.name not in protect:
                    fq.quantized_weight(q.name)  # computed once per Linear, then cached
            quantize_seconds[0] += time.perf_counter() - t0
            with torch.no_grad(), fq.quantized(protect=protect):
                return engine.nll(start_block=start)
        return cache.get([names[i] for i in quantized_units], compute)

    n = len(names)
    bar = tqdm(total=1 + n + n + 1, desc="forward passes", unit="pass")
    nll_fp = forward([])
    bar.update()
    single = []
    for i in range(n):
        single.append(degradation(forward([i]), nll_fp))
        bar.update()
    damage = np.array([[single[i][l] for i in range(n)] for l in langs])

    # Weight fits (~0.2 s per Linear) are cached by the weights' checksum, in the shared cache.
    t0 = time.perf_counter()
    fits = weight_fits(all_lins, args.seed, ResultCache(cache_dir() / "weight_fits"))
    eps, slb, fit_rows = predicted_eps(unit_lins, fits, args.bits, args.grid)
    timing["fit_seconds"] = time.perf_counter() - t0
    dm = DamageModel.from_sensitivities(damage / eps[None, :], eps, n_params, langs, reference)
    kurt = np.array([np.mean([r["excess_kurtosis"] for r in fit_rows if r["layer"] in {q.name for q in lins}])
                     for lins in unit_lins])
    order = rank_layers(dm, args.ranking, kurtosis=kurt)
    excess = dm.excess_damage()
    p_pred, d_pred, per_pred = disparity_curve(dm, order)
    # Lowest disparity reachable (additive model) by any quantizer, and by quantizers between
    # the Shannon lower bound at the same rate and the one in use, layer by layer.
    shrink = np.clip(slb / eps, 0.0, 1.0)
    pstar_pred = critical_fraction(p_pred, d_pred)

    # measured curve: protect the first k units of the ranking
    meas, crossed_at = [], None
    total = n_params.sum()
    for k in range(n + 1):
        quantized = [int(i) for i in order[k:]]
        nll_q = forward(quantized) if quantized else nll_fp
        bar.update()
        d = degradation(nll_q, nll_fp)
        D = disparity(d, reference) if quantized else float("nan")
        lo, hi = (bootstrap_disparity(nll_q, nll_fp, reference, corpus.parallel, args.bootstrap, args.seed + k)
                  if quantized else (float("nan"), float("nan")))
        mask = np.zeros(n, dtype=bool)
        mask[order[:k]] = True
        meas.append({"k": k, "protected_fraction": n_params[order[:k]].sum() / total,
                     "disparity": D, "ci_low": lo, "ci_high": hi, "predicted": float(d_pred[k]),
                     "bound_any_quantizer": disparity_bound(dm, mask),
                     "bound_at_rate": disparity_bound(dm, mask, shrink),
                     "protected_unit": names[order[k - 1]] if k else None,
                     **{f"d_{l}": d[l] for l in langs}})
        if crossed_at is None and np.isfinite(D) and D <= 1:
            crossed_at = k
        if args.stop_after is not None and crossed_at is not None and k >= crossed_at + args.stop_after:
            break
    bar.update(bar.total - bar.n)  # passes skipped past the crossing (--stop-after)
    bar.close()
    p_meas = np.array([m["protected_fraction"] for m in meas])
    d_meas = np.array([m["disparity"] for m in meas])
    # nan when a curve stopped early (--stop-after) never crossed
    pstar_meas = critical_fraction(p_meas, d_meas)
    r2 = r_squared(d_pred[: len(meas)], d_meas)
    # Calibrated variant: one factor per language, gamma_l = d_l(all quantized) / sum_i d_{l,i},
    # absorbs interactions between layers that scale every damage of a language alike; it uses
    # the k = 0 point, so its R^2 is taken over k >= 1 only.
    d0 = meas[0]
    gamma = np.array([d0[f"d_{l}"] / damage[j].sum() if damage[j].sum() > 0 else np.nan
                      for j, l in enumerate(langs)])
    if np.all(np.isfinite(gamma)) and np.all(gamma > 0):
        _, d_cal, _ = disparity_curve(DamageModel(damage * gamma[:, None], n_params, langs, reference), order)
    else:  # a language with no net single-unit damage: nothing to calibrate against
        d_cal = np.full(n + 1, np.nan)
    for m in meas:
        m["predicted_calibrated"] = float(d_cal[m["k"]])
    r2_cal = r_squared(d_cal[1: len(meas)], d_meas[1:])
    fin = [m for m in meas if m["disparity"] is not None and np.isfinite(m["disparity"])
           and np.isfinite(m["bound_at_rate"])]
    bound_check = {
        "points": len(fin),
        "measured_above_bound_at_rate": int(sum(m["disparity"] >= m["bound_at_rate"] for m in fin)),
        "ci_high_above_bound_at_rate": int(sum(m["ci_high"] >= m["bound_at_rate"] for m in fin
                                               if np.isfinite(m["ci_high"]))),
        "measured_above_bound_any": int(sum(m["disparity"] >= m["bound_any_quantizer"] for m in fin)),
        "median_shrink": float(np.median(shrink)),
        "note": ("bounds hold for the additive model (1); measured points below them mean the model, "
                 "not the bound, is off (interactions between layers, noise)"),
    }
    wall = time.perf_counter() - t_start
    result = {
        "experiment": EXPERIMENT,
        "provenance": provenance(model=args.model, corpus=args.corpus, languages=langs, reference=reference,
                                 bits=args.bits, grid=args.grid, granularity=args.granularity,
                                 group_size=args.group_size, clipping=args.clipping, unit=args.unit,
                                 ranking=args.ranking, segments=args.segments, seed=args.seed,
                                 device=args.device, quick=args.quick),
        "model_metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "baseline_note": PREQUANTIZED_NOTE if meta.get("prequantized") else "baseline is the model's own weights",
        "units": [{"name": nm, "n_params": int(n_params[i]), "predicted_eps": float(eps[i]),
                   "shannon_lower_bound": float(slb[i]),
                   "excess_damage": float(excess[i]),
                   "single_unit_degradation": {l: single[i][l] for l in langs}} for i, nm in enumerate(names)],
        "baseline_bpb": {l: float(nll_fp[l].sum() / (math.log(2) * n_bytes[l].sum())) for l in langs},
        "order": [names[i] for i in order],
        "curve": meas,
        "predicted_curve": {"protected_fraction": p_pred.tolist(), "disparity": d_pred.tolist(),
                            "per_language": {l: per_pred[:, j].tolist()
                                             for j, l in enumerate([x for x in langs if x not in reference])}},
        "pstar_predicted": pstar_pred,
        "pstar_measured": pstar_meas,
        "r2_curve": r2,
        "interaction_factor": dict(zip(langs, gamma.tolist())),
        "r2_curve_calibrated": r2_cal,
        "pstar_predicted_calibrated": critical_fraction(p_pred, d_cal),
        "disparity_bound": bound_check,
        "fits": fit_rows,
        "timing": {**timing, "wall_seconds": wall,
                   "forward_seconds": cache.forward_seconds - quantize_seconds[0],
                   "quantize_seconds": quantize_seconds[0],
                   "forward_passes_run": cache.n_forward, "scored_tokens_per_pass": engine.n_tokens,
                   "padding_fraction": engine.padding_fraction,
                   "packed": engine.packed if cache.n_forward else None,  # decided at the first pass
                   "outside_forward_fraction": (1 - (cache.forward_seconds - quantize_seconds[0]) / wall)
                   if cache.n_forward else None},
    }
    write_outputs(out, result, langs, reference)
    return result


def write_outputs(out: Path, res: dict, langs, reference) -> None:
    use_agg()
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{EXPERIMENT}.json", res)
    cols = ["k", "protected_fraction", "disparity", "ci_low", "ci_high", "predicted", "predicted_calibrated",
            "bound_at_rate",
            "bound_any_quantizer", "protected_unit",
            *[f"d_{l}" for l in langs]]
    write_csv(out / "curve.csv", res["curve"], cols)
    rows = [{"quantity": "p* measured", "value": res["pstar_measured"]},
            {"quantity": "p* predicted", "value": res["pstar_predicted"]},
            {"quantity": "R^2 predicted vs measured D(p)", "value": res["r2_curve"]},
            {"quantity": "p* predicted, calibrated (one factor per language)",
             "value": res["pstar_predicted_calibrated"]},
            {"quantity": "R^2 calibrated prediction (k >= 1)", "value": res["r2_curve_calibrated"]},
            {"quantity": "disparity, nothing protected", "value": res["curve"][0]["disparity"]},
            {"quantity": "lowest reachable disparity at this rate, nothing protected",
             "value": res["curve"][0]["bound_at_rate"]},
            {"quantity": "share of measured points above that bound",
             "value": res["disparity_bound"]["measured_above_bound_at_rate"] / max(res["disparity_bound"]["points"], 1)}]
    write_latex_table(out / f"{EXPERIMENT}_table.tex", rows, ["quantity", "value"], ["Quantity", "Value"],
                      caption="Phase transition of disparity with the protected fraction "
                              f"({latex_safe(res['provenance']['config']['model'])}, "
                              f"{res['provenance']['config']['bits']} bits).",
                      label="tab:phase-transition")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    c = res["curve"]
    p = [m["protected_fraction"] for m in c]
    d = [m["disparity"] for m in c]
    lo = [m["ci_low"] for m in c]
    hi = [m["ci_high"] for m in c]
    ax[0].fill_between(p, lo, hi, alpha=0.25, label="measured 95% CI")
    ax[0].plot(p, d, "o-", label="measured")
    pc = res["predicted_curve"]
    ax[0].plot(pc["protected_fraction"], pc["disparity"], "--", label="predicted (additive model)")
    ax[0].plot(p, [m.get("predicted_calibrated", np.nan) for m in c], "-.", color="C2",
               label="predicted, calibrated at p = 0")
    ax[0].plot(p, [m.get("bound_at_rate", np.nan) for m in c], ":", color="C3",
               label="lowest reachable at this rate (Shannon bound per layer)")
    ax[0].plot(p, [m.get("bound_any_quantizer", np.nan) for m in c], ":", color="C4",
               label="lowest reachable by any quantizer")
    ax[0].axhline(1.0, color="k", lw=0.8)
    for v, ls, lab in ((res["pstar_measured"], "-", "p* measured"), (res["pstar_predicted"], "--", "p* predicted")):
        if v is not None and np.isfinite(v):
            ax[0].axvline(v, color="grey", ls=ls, lw=0.8)
    ax[0].set_xlabel("protected fraction p")
    ax[0].set_ylabel("disparity D(p)")
    ax[0].legend(fontsize=8)
    for l in langs:
        if l in reference:
            continue
        ref = np.array([np.mean([m[f"d_{r}"] for r in reference]) for m in c])
        y = np.array([m[f"d_{l}"] for m in c]) / np.where(ref > 0, ref, np.nan)
        ax[1].plot(p, y, ".-", label=l)
    ax[1].axhline(1.0, color="k", lw=0.8)
    ax[1].set_xlabel("protected fraction p")
    ax[1].set_ylabel(f"d_l / d_ref ({', '.join(reference)})")
    ax[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{res['provenance']['config']['model']}: {res['baseline_note']}", fontsize=8)
    save_figure(fig, out / f"{EXPERIMENT}.png")
    plt.close(fig)


def latex_safe(s: str) -> str:
    return str(s).replace("_", r"\_")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    res = run(args)
    print(f"p* measured {res['pstar_measured']:.3f}, predicted {res['pstar_predicted']:.3f} "
          f"(calibrated {res['pstar_predicted_calibrated']:.3f}), R^2 {res['r2_curve']:.3f} "
          f"(calibrated {res['r2_curve_calibrated']:.3f}); {res['timing']['forward_passes_run']} forward passes in "
          f"{res['timing']['wall_seconds']:.0f} s -> {Path(args.out) if args.out else default_out_dir(EXPERIMENT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
