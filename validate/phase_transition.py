"""Headline experiment: how much of a model must stay in high precision before quantization stops
hurting other languages more than English, and does the additive theory predict it?

``python -m validate.phase_transition [--quick] [--model ...] [--languages ...] [--out DIR]``
(``--help`` lists every flag with its default)

Load -> run -> compare with theory -> write:

1. Full-precision bits per byte per language (docs/design.md, "Bits per byte"), then one pass per *unit* (a decoder
   block by default, or a single Linear with ``--unit linear``) with only that unit quantized:
   the single-unit degradations ``d_{l,i}``.
2. Theory (``theory.protection``): the additive model ``d_l(P) = sum_{i not in P} s_{l,i} eps_i``
   with ``eps_i`` the quantization MSE theory predicts for the unit's weights (best-fit family per
   Linear, ``theory.expected_mse``) and ``s_{l,i} = d_{l,i} / eps_i``; it ranks the units
   (``--ranking``), predicts the disparity curve D(p) and the critical protected fraction p*.
3. Measurement: protect units in ranked order, from none to all (or ``--stop-after`` steps past
   the crossing), one pass each: the measured D(p) with paired bootstrap confidence intervals over
   sentences (``empirical.disparity``), and the measured p*.
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

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from empirical.disparity import bootstrap_disparity, degradation, disparity, r_squared
from validate import _protocol as protocol
from validate._common import ResultCache, save_figure, use_agg, write_csv, write_json
from validate._latex import MacroSet, Tex, finite, tex_text, write_latex_table

EXPERIMENT = "phase_transition"
PREQUANTIZED_NOTE = ("baseline is the dequantized Q4_K_M GGUF (weights already quantized to about "
                     "4-5 bits before this experiment)")


@dataclass(frozen=True)
class Config:
    model: str = protocol.param("gemma-3-270m", "embedded name (gemma-3-270m, smollm2-135m), tiny-* test "
                                "model, local folder or hub id")
    corpus: str = protocol.param("udhr", "'udhr' (embedded) or a one-file-per-language folder")
    # English reference plus languages spanning scripts, French as a Latin-script control
    languages: tuple[str, ...] = protocol.param(("en", "he", "ar", "ja", "hi", "ru", "zh", "fr"),
                                                "languages (FLORES, ISO 639-1 or 639-3 codes)")
    reference: tuple[str, ...] | None = protocol.param(None, "reference group (none: the first language)")
    bits: int = protocol.param(4, "weight bit width")
    grid: str = protocol.param("int", "signed grid: aciq, midrise, midtread or int")
    granularity: str = protocol.param("channel", "one alpha per tensor, output channel or group",
                                      choices=("tensor", "channel", "group"))
    group_size: int = protocol.param(128, "weights per group (granularity group)")
    clipping: str = protocol.param("absmax", "how each channel's alpha is chosen",
                                   choices=("absmax", "theory", "sweep"))
    unit: str = protocol.param("block", "what is protected together: a decoder block or one Linear",
                               choices=("block", "linear"))
    ranking: str = protocol.param("excess", "protection order",
                                  choices=("excess", "position", "reverse_position", "kurtosis", "size"))
    segments: int | None = protocol.param(None, "segments per language (none: all)")
    max_length: int = protocol.param(512, "token window for bits per byte")
    stop_after: int = protocol.param(3, "stop the measured curve this many steps past the crossing "
                                     "(negative: measure the whole curve)")
    bootstrap: int = protocol.param(1000, "bootstrap resamples for the confidence intervals")
    device: str = protocol.param("cpu", "cpu, cuda or cuda:N")
    seed: int = protocol.param(0, "random seed")

    def __post_init__(self):
        langs = protocol.check_sources(self.model, self.corpus, self.languages)
        ref = protocol.check_languages(self.reference or langs[:1], flag="--reference")
        if missing := [r for r in ref if r not in langs]:
            raise protocol.ConfigError(f"--reference: {', '.join(missing)} not among --languages")
        if len(ref) == len(langs):
            raise protocol.ConfigError("--languages: every language is in the reference group; give at "
                                       "least one non-reference language")
        grid = protocol.check_bits_grid(self.bits, self.grid, signed="weights")
        protocol.check_positive("segments", self.segments, optional=True)
        protocol.check_positive("max_length", self.max_length)
        protocol.check_positive("bootstrap", self.bootstrap)
        if self.granularity == "group" and self.group_size < 2:
            raise protocol.ConfigError(f"--group-size must be >= 2, got {self.group_size}")
        protocol.check_device(self.device)
        protocol.frozen_set(self, languages=langs, reference=ref, grid=grid)

    @classmethod
    def quick(cls) -> "Config":
        # A gemma-3-270m pass costs milliseconds per token on two CPU cores (about half of it the
        # 262k-way output layer), so the quick run keeps to a few hundred tokens per pass.
        return cls(languages=("en", "he", "ja"), segments=4, max_length=128, stop_after=1, bootstrap=200)


# ---- units and passes ---------------------------------------------------------------------------

def units_of(view, unit: str) -> tuple[list[str], list[list]]:
    """Protection units: names and their Linears (grouped by decoder block, or one per Linear)."""
    if unit == "linear":
        return [q.name for q in view.linears], [[q] for q in view.linears]
    groups: dict[str, list] = {}
    for q in view.linears:
        key = f"block{q.block}" if q.block is not None else q.name
        groups.setdefault(key, []).append(q)
    return list(groups), list(groups.values())


class Passes:
    """Per-language per-segment NLL of the model with a set of units quantized, one forward pass
    each, cached by configuration (``<out>/cache``) so that a rerun runs none.

    The first pass run records the full-precision residual stream; a pass whose first quantized
    unit sits in block b replays blocks 0..b-1 from that record (``BpbEngine.nll(start_block)``).
    """

    def __init__(self, engine, quantizer, names, unit_linears, cache: ResultCache | None, key: dict,
                 sentences: dict[str, int]):
        self.engine, self.fq = engine, quantizer
        self.names, self.unit_linears = names, unit_linears
        self.cache, self.key = cache, key
        self.sentences = sentences  # sentences per language: the shape every cached pass must have
        # first decoder block each unit touches (a unit outside the blocks forces a full pass)
        self.first_block = [min((q.block if q.block is not None else 0) for q in lins) for lins in unit_linears]
        self.run_count = 0

    def nll(self, quantized: Sequence[int]) -> dict[str, np.ndarray]:
        config = {**self.key, "quantized": sorted(self.names[i] for i in quantized)}
        hit = self.cache.get(config, check=self._check) if self.cache is not None else None
        if hit is not None:
            return {k: np.asarray(v, dtype=float) for k, v in hit.items()}
        nll = self._forward(set(quantized))
        self.run_count += 1
        if self.cache is not None:
            self.cache.put(config, {k: v.tolist() for k, v in nll.items()})
        return nll

    def _check(self, nll: dict) -> None:
        """A cached pass holds one finite NLL per sentence of every language."""
        if not isinstance(nll, dict) or set(nll) != set(self.sentences):
            raise ValueError(f"languages {sorted(nll) if isinstance(nll, dict) else nll!r}, expected "
                             f"{sorted(self.sentences)}")
        for lang, n in self.sentences.items():
            v = np.asarray(nll[lang], dtype=float)
            if v.shape != (n,):
                raise ValueError(f"{lang}: {v.size} sentence NLLs, expected {n}")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"{lang}: NaN or inf NLL")

    def _forward(self, qset: set[int]) -> dict[str, np.ndarray]:
        import torch

        if not self.engine.recorded and not self.engine.replay_unavailable:
            reference = self.engine.record()  # also on a resumed run: later passes replay it
            if not qset:
                return reference
        protect = {q.name for i, lins in enumerate(self.unit_linears) if i not in qset for q in lins}
        start = min((self.first_block[i] for i in qset), default=0)
        with torch.no_grad(), self.fq.quantized(protect=protect):
            return self.engine.nll(start_block=start)


# ---- theory's per-unit eps ----------------------------------------------------------------------

FIT_SAMPLES = 8000


def weight_fits(linears, seed: int, cache: ResultCache | None = None) -> dict[str, dict]:
    """Best-fit family (BIC) of every Linear's weights, as theory distributions' parameters.

    Fitted with the location fixed at 0, since the quantizer is centred at 0, on a
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

def run(config: Config, cache: ResultCache | None = None) -> protocol.Result:
    """Single-unit damages, theory's prediction, the measured curve, and their comparison."""
    import torch

    from empirical.bpb import BpbEngine
    from empirical.fakequant import FakeQuantizer, QuantConfig
    from empirical.models import cache_dir, load_model, model_view
    from theory.protection import DamageModel, critical_fraction, disparity_curve, rank_layers

    c = config
    torch.manual_seed(c.seed)
    model, tok, meta = load_model(c.model, device=c.device, seed=c.seed, return_metadata=True)
    corpus = protocol.load_corpus(c.corpus, c.languages, c.segments)
    langs, reference = corpus.languages, list(c.reference)
    view = model_view(model)
    qcfg = QuantConfig(bits=c.bits, grid=c.grid, granularity=c.granularity, group_size=c.group_size,
                       clipping=c.clipping)
    names, unit_lins = units_of(view, c.unit)
    all_lins = [q for lins in unit_lins for q in lins]
    n_params = np.array([sum(q.n_params for q in lins) for lins in unit_lins], dtype=float)
    engine = BpbEngine(model, tok, {l: corpus[l] for l in langs}, max_length=c.max_length, device=c.device)
    key = {"model": c.model, "corpus": c.corpus, "languages": langs, "segments": c.segments,
           "max_length": c.max_length, "quant": qcfg.key(), "unit": c.unit, "seed": c.seed,
           "corpus_digest": protocol.corpus_digest(corpus)}
    passes = Passes(engine, FakeQuantizer(all_lins, qcfg, seed=c.seed), names, unit_lins, cache, key,
                    {l: len(corpus[l]) for l in langs})
    n = len(names)
    bar = protocol.progress(total=2 + 2 * n, desc="forward passes", unit="pass")

    # 1. single-unit damages d_{l,i}
    nll_fp = passes.nll([])
    bar.update()
    single = []
    for i in range(n):
        single.append(degradation(passes.nll([i]), nll_fp))
        bar.update()
    damage = np.array([[single[i][l] for i in range(n)] for l in langs])

    # 2. theory: eps_i from the weights' fitted families, the additive model, its ranking and curve
    fits = weight_fits(all_lins, c.seed, ResultCache(cache_dir() / "weight_fits"))
    eps, slb, fit_rows = predicted_eps(unit_lins, fits, c.bits, c.grid)
    dm = DamageModel.from_sensitivities(damage / eps[None, :], eps, n_params, langs, reference)
    kurt = np.array([np.mean([r["excess_kurtosis"] for r in fit_rows if r["layer"] in {q.name for q in lins}])
                     for lins in unit_lins])
    order = rank_layers(dm, c.ranking, kurtosis=kurt)
    p_pred, d_pred, per_pred = disparity_curve(dm, order)

    # 3. the measured curve: protect the first k units of the ranking
    # lowest disparity reachable (additive model) by quantizers between the per-layer Shannon bound
    # at the same rate and the one in use
    shrink = np.clip(slb / eps, 0.0, 1.0)
    curve = measure_curve(passes, nll_fp, order, n_params, dm, shrink, d_pred, reference,
                          corpus.parallel, c, bar)
    bar.close()

    # 4. compare
    p_meas = np.array([m["protected_fraction"] for m in curve])
    d_meas = np.array([m["disparity"] for m in curve])
    gamma, d_cal = calibrated_curve(damage, curve[0], langs, reference, n_params, order)
    for m in curve:
        m["predicted_calibrated"] = float(d_cal[m["k"]])
    data = {
        "model_metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "baseline_note": PREQUANTIZED_NOTE if meta.get("prequantized") else "baseline is the model's own weights",
        "units": [{"name": nm, "n_params": int(n_params[i]), "predicted_eps": float(eps[i]),
                   "shannon_lower_bound": float(slb[i]), "excess_damage": float(dm.excess_damage()[i]),
                   "single_unit_degradation": {l: single[i][l] for l in langs}} for i, nm in enumerate(names)],
        "baseline_bpb": {l: float(nll_fp[l].sum() / (math.log(2) * sum(len(s.encode()) for s in corpus[l])))
                         for l in langs},
        "order": [names[i] for i in order],
        "curve": curve,
        "predicted_curve": {"protected_fraction": p_pred.tolist(), "disparity": d_pred.tolist(),
                            "per_language": {l: per_pred[:, j].tolist()
                                             for j, l in enumerate([x for x in langs if x not in reference])}},
        "pstar_predicted": critical_fraction(p_pred, d_pred),
        "pstar_measured": critical_fraction(p_meas, d_meas),  # nan when a stopped curve never crossed
        "r2_curve": r_squared(d_pred[: len(curve)], d_meas),
        "interaction_factor": dict(zip(langs, gamma.tolist())),
        # the calibrated model uses the k = 0 point, so its R^2 is taken over k >= 1 only
        "r2_curve_calibrated": r_squared(d_cal[1: len(curve)], d_meas[1:]),
        "pstar_predicted_calibrated": critical_fraction(p_pred, d_cal),
        "disparity_bound": bound_check(curve, shrink),
        "fits": fit_rows,
        # distinct forward passes this result consists of: the baseline, one per unit, and one per
        # curve point with two or more units quantized (k = n - 1 is a single-unit pass, k = n the
        # baseline)
        "passes_in_result": 1 + n + sum(1 for m in curve if m["k"] < n - 1),
        "scored_tokens_per_pass": engine.n_tokens,
        "padding_fraction": engine.padding_fraction,
    }
    return protocol.Result(EXPERIMENT, config, data,
                           timing={"forward_passes_run": passes.run_count,
                                   "packed": engine.packed if passes.run_count else None})


def measure_curve(passes: Passes, nll_fp, order, n_params, dm, shrink, d_pred, reference, parallel: bool,
                  c: Config, bar) -> list[dict]:
    """D(p) with bootstrap CIs and the additive model's bounds at every step k (the first k units
    of ``order`` protected), stopping ``c.stop_after`` steps past the first crossing of D = 1."""
    from theory.protection import disparity_bound

    n, total = len(order), n_params.sum()
    curve, crossed_at = [], None
    for k in range(n + 1):
        quantized = [int(i) for i in order[k:]]
        nll_q = passes.nll(quantized) if quantized else nll_fp
        bar.update()
        d = degradation(nll_q, nll_fp)
        if quantized:
            D = disparity(d, reference)
            lo, hi = bootstrap_disparity(nll_q, nll_fp, reference, parallel, c.bootstrap, c.seed + k)
        else:
            D = lo = hi = float("nan")
        mask = np.zeros(n, dtype=bool)
        mask[order[:k]] = True
        curve.append({"k": k, "protected_fraction": n_params[order[:k]].sum() / total,
                      "disparity": D, "ci_low": lo, "ci_high": hi, "predicted": float(d_pred[k]),
                      "bound_any_quantizer": disparity_bound(dm, mask),
                      "bound_at_rate": disparity_bound(dm, mask, shrink),
                      "protected_unit": passes.names[order[k - 1]] if k else None,
                      **{f"d_{l}": d[l] for l in d}})
        if crossed_at is None and np.isfinite(D) and D <= 1:
            crossed_at = k
        if c.stop_after >= 0 and crossed_at is not None and k >= crossed_at + c.stop_after:
            break
    bar.update(bar.total - bar.n)  # passes skipped past the crossing
    return curve


def calibrated_curve(damage, first, langs, reference, n_params, order):
    """One factor per language, gamma_l = d_l(all quantized) / sum_i d_{l,i}, absorbs interactions
    between units that scale every damage of a language alike; returns (gamma, D_calibrated)."""
    from theory.protection import DamageModel, disparity_curve

    tot = damage.sum(axis=1)
    gamma = np.array([first[f"d_{l}"] / t if t > 0 else np.nan for l, t in zip(langs, tot)])
    if not (np.all(np.isfinite(gamma)) and np.all(gamma > 0)):  # a language with no net damage
        return gamma, np.full(len(order) + 1, np.nan)
    _, d_cal, _ = disparity_curve(DamageModel(damage * gamma[:, None], n_params, langs, reference), order)
    return gamma, d_cal


def bound_check(curve: list[dict], shrink: np.ndarray) -> dict:
    fin = [m for m in curve if m["disparity"] is not None and np.isfinite(m["disparity"])
           and np.isfinite(m["bound_at_rate"])]
    return {
        "points": len(fin),
        "measured_above_bound_at_rate": int(sum(m["disparity"] >= m["bound_at_rate"] for m in fin)),
        "ci_high_above_bound_at_rate": int(sum(m["ci_high"] >= m["bound_at_rate"] for m in fin
                                               if np.isfinite(m["ci_high"]))),
        "measured_above_bound_any": int(sum(m["disparity"] >= m["bound_any_quantizer"] for m in fin)),
        "median_shrink": float(np.median(shrink)),
        "note": ("bounds hold for the additive model (1); measured points below them mean the model, "
                 "not the bound, is off (interactions between layers, noise)"),
    }


def write(result: protocol.Result, out: Path) -> list[Path]:
    use_agg()
    import matplotlib.pyplot as plt

    res, cfg = result, result.config_dict
    langs, reference = list(res["baseline_bpb"]), list(cfg["reference"])
    files = [write_csv(out / "curve.csv", res["curve"],
                       ["k", "protected_fraction", "disparity", "ci_low", "ci_high", "predicted",
                        "predicted_calibrated", "bound_at_rate", "bound_any_quantizer", "protected_unit",
                        *[f"d_{l}" for l in langs]])]
    bound = res["disparity_bound"]
    rows = [(Tex(r"$p^\ast$ measured"), res["pstar_measured"]),
            (Tex(r"$p^\ast$ predicted"), res["pstar_predicted"]),
            (Tex(r"$R^2$ of the predicted against the measured $D(p)$"), res["r2_curve"]),
            (Tex(r"$p^\ast$ predicted, calibrated (one factor per language)"), res["pstar_predicted_calibrated"]),
            (Tex(r"$R^2$ of the calibrated prediction ($k \ge 1$)"), res["r2_curve_calibrated"]),
            ("disparity, nothing protected", res["curve"][0]["disparity"]),
            ("its 95% confidence interval, low end", res["curve"][0]["ci_low"]),
            ("its 95% confidence interval, high end", res["curve"][0]["ci_high"]),
            ("lowest reachable disparity at this rate, nothing protected", res["curve"][0]["bound_at_rate"]),
            ("share of measured points above that bound",
             bound["measured_above_bound_at_rate"] / max(bound["points"], 1))]
    files.append(write_latex_table(
        out / f"{EXPERIMENT}_table.tex", [{"quantity": q, "value": v} for q, v in rows],
        ["quantity", "value"], ["Quantity", "Value"],
        caption=f"Phase transition of disparity with the protected fraction ({tex_text(cfg['model'])}, "
                f"{cfg['bits']} bits).", label="tab:phase-transition"))
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    c = res["curve"]
    p = [m["protected_fraction"] for m in c]
    col = lambda key: [np.nan if m.get(key) is None else m[key] for m in c]  # noqa: E731
    ax[0].fill_between(p, col("ci_low"), col("ci_high"), alpha=0.25, label="measured 95% CI")
    ax[0].plot(p, col("disparity"), "o-", label="measured")
    pc = res["predicted_curve"]
    ax[0].plot(pc["protected_fraction"], pc["disparity"], "--", label="predicted (additive model)")
    ax[0].plot(p, col("predicted_calibrated"), "-.", color="C2", label="predicted, calibrated at p = 0")
    ax[0].plot(p, col("bound_at_rate"), ":", color="C3", label="lowest reachable at this rate (Shannon bound per layer)")
    ax[0].plot(p, col("bound_any_quantizer"), ":", color="C4", label="lowest reachable by any quantizer")
    ax[0].axhline(1.0, color="k", lw=0.8)
    for v, ls in ((res["pstar_measured"], "-"), (res["pstar_predicted"], "--")):
        if v is not None and np.isfinite(v):
            ax[0].axvline(v, color="grey", ls=ls, lw=0.8)
    ax[0].set_xlabel("protected fraction p")
    ax[0].set_ylabel("disparity D(p)")
    ax[0].legend(fontsize=8)
    ref = np.array([np.mean([m[f"d_{r}"] for r in reference]) for m in c])
    for l in langs:
        if l not in reference:
            ax[1].plot(p, np.array(col(f"d_{l}")) / np.where(ref > 0, ref, np.nan), ".-", label=l)
    ax[1].axhline(1.0, color="k", lw=0.8)
    ax[1].set_xlabel("protected fraction p")
    ax[1].set_ylabel(f"d_l / d_ref ({', '.join(reference)})")
    ax[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{cfg['model']}: {res['baseline_note']}", fontsize=8)
    files.append(save_figure(fig, out / f"{EXPERIMENT}.png"))
    plt.close(fig)
    files.append(write_json(out / f"{EXPERIMENT}.json", res.to_json()))
    return files


def summary(result: protocol.Result) -> str:
    r, c0 = result, result["curve"][0]
    return (f"D(0) {c0['disparity']:.3f} [95% CI {c0['ci_low']:.3f}, {c0['ci_high']:.3f}]; p* measured "
            f"{r['pstar_measured']:.3f}, predicted {r['pstar_predicted']:.3f} (calibrated "
            f"{r['pstar_predicted_calibrated']:.3f}); R^2 {r['r2_curve']:.3f} (calibrated "
            f"{r['r2_curve_calibrated']:.3f}); {result.timing.get('forward_passes_run', 0)} forward passes run")


def macros(result: protocol.Result) -> MacroSet:
    ms = MacroSet(f"{EXPERIMENT}.json")
    r, cfg = result, result.config_dict
    curve = r.get("curve", [])
    first = curve[0] if curve else {}
    pm, pp = r.get("pstar_measured"), r.get("pstar_predicted")
    ms.add("PstarMeasured", pm, "pstar_measured")
    ms.add("PstarPredicted", pp, "pstar_predicted")
    ms.add("PstarAbsDiff", abs(pm - pp) if finite([pm]) and finite([pp]) else None,
           "|pstar_measured - pstar_predicted|")
    ms.add("RsqCurve", r.get("r2_curve"), "r2_curve")
    ms.add("RsqCurveCalibrated", r.get("r2_curve_calibrated"), "r2_curve_calibrated")
    ms.add("PstarPredictedCalibrated", r.get("pstar_predicted_calibrated"), "pstar_predicted_calibrated")
    gamma = {k: v for k, v in (r.get("interaction_factor") or {}).items() if finite([v])}
    for lang, g in gamma.items():
        ms.add(["PTInteraction", lang], g, f"interaction_factor.{lang}")
    if gamma:
        lo, hi = min(gamma, key=gamma.get), max(gamma, key=gamma.get)
        ms.add("PTInteractionMin", gamma[lo], "min interaction_factor")
        ms.add("PTInteractionMinLanguage", lo, "argmin interaction_factor")
        ms.add("PTInteractionMax", gamma[hi], "max interaction_factor")
        ms.add("PTInteractionMaxLanguage", hi, "argmax interaction_factor")
    bound = r.get("disparity_bound") or {}
    for name, key in (("PTBoundPoints", "points"), ("PTBoundAbove", "measured_above_bound_at_rate"),
                      ("PTBoundMedianShrink", "median_shrink")):
        ms.add(name, bound.get(key), f"disparity_bound.{key}")
    for name, key in (("DisparityNone", "disparity"), ("DisparityNoneCILow", "ci_low"),
                      ("DisparityNoneCIHigh", "ci_high"), ("DisparityPredictedNone", "predicted"),
                      ("DisparityBoundAtRateNone", "bound_at_rate"),
                      ("DisparityBoundAnyNone", "bound_any_quantizer")):
        ms.add(name, first.get(key), f"curve[0].{key}")
    if curve:
        ms.add("DisparityLastMeasured", curve[-1].get("disparity"), "curve[-1].disparity")
        ms.add_pct("PTLastProtectedFraction", curve[-1].get("protected_fraction"), "curve[-1].protected_fraction")
    ms.add("PTStepsMeasured", len(curve), "len(curve)")
    ms.add("PTNumUnits", len(r.get("units", [])), "len(units)")
    order = r.get("order", [])
    ms.add("PTFirstProtected", order[0] if order else None, "order[0]")
    for key, name in (("model", "PTModel"), ("bits", "PTBits"), ("grid", "PTGrid"),
                      ("granularity", "PTGranularity"), ("clipping", "PTClipping"),
                      ("unit", "PTUnit"), ("ranking", "PTRanking"), ("corpus", "PTCorpus")):
        ms.add(name, cfg.get(key), f"provenance.config.{key}")
    segments = cfg.get("segments")
    ms.add("PTSegments", segments if segments is not None else "all", "provenance.config.segments")
    langs, ref = cfg.get("languages", []), cfg.get("reference") or []
    ms.add("PTNumLanguages", len(langs), "len(provenance.config.languages)")
    ms.add("PTLanguages", ", ".join(langs), "provenance.config.languages")
    ms.add("PTReference", ", ".join(ref), "provenance.config.reference")
    ms.add("PTBaselineNote", r.get("baseline_note"), "baseline_note")
    for lang, bpb in (r.get("baseline_bpb") or {}).items():
        ms.add(["PTBaselineBpb", lang], bpb, f"baseline_bpb.{lang}")
        ms.add_pct(["PTDegradationNone", lang], first.get(f"d_{lang}"), f"curve[0].d_{lang}")
    ms.add("PTPassesCurve", r.get("passes_in_result"), "passes_in_result")
    ms.add("PTTokensPerPass", r.get("scored_tokens_per_pass"), "scored_tokens_per_pass")
    ms.add("PTWallSeconds", r.timing.get("wall_seconds"), "timing.wall_seconds (this invocation)")
    return ms


main = protocol.entry_point(__name__)


if __name__ == "__main__":
    raise SystemExit(main())
