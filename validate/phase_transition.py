"""Headline experiment: how much of a model must stay in high precision before quantization stops
hurting other languages more than English, and which model of the damage predicts it out of sample?

``python -m validate.phase_transition [--quick] [--model ...] [--languages ...] [--out DIR]``
(``--help`` lists every flag with its default)

Load -> measure -> fit -> predict -> measure the prediction -> write:

1. Full-precision scores per language (docs/design.md, "Bits per byte"), then one pass per *unit*
   (a decoder block by default, or a single Linear with ``--unit linear``) with only that unit
   quantized: the single-unit degradations ``d_{l,i}``. Every pass yields both metrics
   (``empirical.disparity.metric_summary``): bits per byte (``d = NLL_q / NLL_fp - 1``) and KL
   (``d = sum KL(baseline || quantized) / NLL_fp``, the expected NLL increase on the baseline's
   own next-token distribution). ``--metric`` (default ``kl``) is the *primary* one: single-unit
   damages, the curve D(p), p* and every model fit use it; the JSON keeps both everywhere.
2. The all-quantized pass (the curve's first point) and pair passes among the top ``--pairs``
   units of the additive model's ranking: the training points of the curve models
   (``theory.curve``: additive, compounding, calibrated, second-order, power laws). One model is
   selected by leave-one-out error on those training points only.
3. The measured curve: protect units in the order ``--ranking`` gives (default ``model``: the
   selected model's greedy ranking, ``theory.curve.greedy_order``), from none to all (or
   ``--stop-after`` steps past the crossing of D = 1), one pass each, D(p) with paired bootstrap
   confidence intervals over sentences, and the measured p*. Every curve point that is not a
   training set is held out: ``r2_out_of_sample`` is each model's R^2 on those points only.
4. With ``--compare-rankings`` the curves of the rankings by excess damage (additive model),
   position, weight kurtosis and size are measured the same way: the measured p* of each.
5. The zero-pass predictor (``empirical.sensitivity.zero_pass_damage``, one backward pass, no
   quantized pass) against the measured single-unit damages: Spearman and R^2 per variant.
6. Write ``phase_transition.json`` (provenance included), ``curve.csv``, ``rankings.csv``,
   ``phase_transition_table.tex`` and ``phase_transition.png`` under ``--out``.

Theory's per-unit quantization error ``eps_i`` (best-fit family per Linear,
``theory.expected_mse``) still gives the additive model's disparity bounds
(``theory.protection.disparity_bound``).

Every forward result is cached under ``<out>/cache`` by its configuration (model, corpus,
languages, segments, quantization, quantized set; ``validate._passes.ScoredPasses``), written
atomically, so a rerun performs no forward pass and an interrupted run resumes where it stopped.

The embedded ``gemma-3-270m`` ships as a Q4_K_M GGUF: its "full precision" baseline is the
dequantized GGUF, already quantized to about 4-5 bits. The JSON and the figure say so.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from empirical.disparity import METRICS, metric_summary, r_squared
from validate import _protocol as protocol
from validate._passes import Passes, degradations
from validate._common import ResultCache, save_figure, spearman, use_agg, write_csv, write_json
from validate._latex import MacroSet, Tex, finite, format_number, tex_text, write_latex_table

EXPERIMENT = "phase_transition"
#: The grids ``--executor ray`` distributes (validate._executor).
EXECUTOR_GRIDS = "baseline and single-unit passes, pairs and training sets, the curves' next steps"
RESULT_VERSION = 2  # 2: both metrics, curve models out of sample, rankings measured, zero-pass predictor
PREQUANTIZED_NOTE = ("baseline is the dequantized Q4_K_M GGUF (weights already quantized to about "
                     "4-5 bits before this experiment)")
#: Rankings whose measured curves ``--compare-rankings`` adds (``theory.protection.rank_layers``).
COMPARED_RANKINGS = ("excess", "position", "kurtosis", "size")


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
    metric: str = protocol.param("kl", "primary degradation metric: KL from the baseline over its NLL, or "
                                 "bits per byte (both are always reported)", choices=METRICS)
    ranking: str = protocol.param("model", "protection order of the main curve: 'model' is the selected "
                                  "curve model's greedy ranking",
                                  choices=("model", "excess", "position", "reverse_position", "kurtosis", "size"))
    pairs: int = protocol.param(4, "pair passes among the top K units of the additive ranking "
                                "(K(K-1)/2 passes; 0: none)")
    train_sets: int = protocol.param(2, "training passes with a random set of units quantized (sizes 2n/3, "
                                     "n/3 for 2): points between the pairs and the all-quantized one")
    compare_rankings: bool = protocol.param(True, "also measure the curves of the rankings by excess damage, "
                                            "position, kurtosis and size")
    compare_steps: int | None = protocol.param(None, "most points of a compared ranking's curve (none: as many "
                                               "as the main curve measured)")
    zero_pass: bool = protocol.param(True, "predict single-unit damages with no quantized pass "
                                     "(empirical.sensitivity; one backward pass)")
    segments: int | None = protocol.param(None, "segments per language (none: all)")
    max_length: int = protocol.param(512, "token window for bits per byte")
    stop_after: int = protocol.param(3, "stop each measured curve this many steps past the crossing "
                                     "(negative: measure the whole curve)")
    bootstrap: int = protocol.param(1000, "bootstrap resamples for the confidence intervals")
    device: str = protocol.param("cpu", "cpu, cuda or cuda:N")
    seed: int = protocol.param(0, "random seed")

    def __post_init__(self):
        langs = protocol.check_sources(self.model, self.corpus, self.languages)
        ref = protocol.check_reference(self.reference, langs)
        grid = protocol.check_bits_grid(self.bits, self.grid, signed="weights")
        protocol.check_positive("segments", self.segments, optional=True)
        protocol.check_positive("max_length", self.max_length)
        protocol.check_positive("bootstrap", self.bootstrap)
        protocol.check_positive("pairs", self.pairs, allow_zero=True)
        protocol.check_positive("train_sets", self.train_sets, allow_zero=True)
        protocol.check_positive("compare_steps", self.compare_steps, optional=True)
        if self.pairs == 1:
            raise protocol.ConfigError("--pairs 1 gives no pair; use 0 (no pair passes) or at least 2")
        if self.granularity == "group" and self.group_size < 2:
            raise protocol.ConfigError(f"--group-size must be >= 2, got {self.group_size}")
        protocol.check_device(self.device)
        protocol.frozen_set(self, languages=langs, reference=ref, grid=grid)

    @classmethod
    def quick(cls) -> "Config":
        # A gemma-3-270m pass costs milliseconds per token on two CPU cores (about half of it the
        # 262k-way output layer), so the quick run keeps to a few hundred tokens per pass; three
        # pairs, and no compared rankings (their curves would double its passes).
        return cls(languages=("en", "he", "ja"), segments=4, max_length=128, stop_after=1, bootstrap=200,
                   pairs=3, compare_rankings=False)


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
        [[q.name, float(q.weight.detach().sum(dtype=torch.float64))] for q in linears]
    ).encode()).hexdigest()[:16]
    config = {"weight_fits": digest, "n": len(linears), "samples": FIT_SAMPLES, "seed": seed}
    hit = cache.get(config) if cache is not None else None
    if hit is not None:
        return hit
    out = {}
    for q in linears:
        w = q.weight.detach().double().cpu().numpy().ravel()  # the real weight, also under offload
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

@dataclass
class Built:
    """What ``run`` and a remote worker both build from a ``Config``: the model, its text, the
    quantizer and the cached passes (``validate._passes.Passes``)."""

    model: object
    tokenizer: object
    meta: dict
    corpus: object
    engine: object
    qcfg: object
    names: list
    unit_lins: list
    passes: Passes
    key: dict


def build(c: Config, cache) -> Built:
    """Load the model and text of ``c`` and set up its passes (cache keys shared with workers)."""
    import torch

    from empirical.bpb import BpbEngine
    from empirical.fakequant import FakeQuantizer, QuantConfig
    from empirical.models import load_model, model_view
    from validate._executor import WorkerSpec

    torch.manual_seed(c.seed)
    model, tok, meta = load_model(c.model, device=c.device, seed=c.seed, return_metadata=True)
    corpus = protocol.load_corpus(c.corpus, c.languages, c.segments)
    langs = corpus.languages
    view = model_view(model)
    qcfg = QuantConfig(bits=c.bits, grid=c.grid, granularity=c.granularity, group_size=c.group_size,
                       clipping=c.clipping)
    names, unit_lins = units_of(view, c.unit)
    all_lins = [q for lins in unit_lins for q in lins]
    engine = BpbEngine(model, tok, {l: corpus[l] for l in langs}, max_length=c.max_length, device=c.device)
    key = {"model": c.model, "corpus": c.corpus, "languages": langs, "segments": c.segments,
           "max_length": c.max_length, "quant": qcfg.key(), "unit": c.unit, "seed": c.seed,
           "corpus_digest": protocol.corpus_digest(corpus)}
    passes = Passes(engine, FakeQuantizer(all_lins, qcfg, seed=c.seed), names, unit_lins, cache, key,
                    spec=WorkerSpec(f"{__name__}:passes_worker", (c,), c.device))
    return Built(model, tok, meta, corpus, engine, qcfg, names, unit_lins, passes, key)


def passes_worker(c: Config):
    """A remote worker's passes (``validate._executor``): the same model, text and keys as ``run``'s."""
    from validate._executor import RecordingCache
    from validate._passes import PassesWorker

    return PassesWorker(build(c, RecordingCache()).passes)


def run(config: Config, cache: ResultCache | None = None) -> protocol.Result:
    """Single-unit and pair damages, the curve models, the measured curves, and their comparison.

    Under a Ray executor (``--executor ray``) each group of independent passes (the baseline and
    single units; the pairs and training sets; the curve's next steps, as many as there are workers)
    is computed on the workers ahead of being read from the cache."""
    from empirical.models import cache_dir
    from theory.curve import CurveData, fit_curve_model, greedy_order, select_curve_model
    from theory.protection import DamageModel, critical_fraction, disparity_curve, rank_layers

    c = config
    b = build(c, cache)
    meta, corpus, engine, qcfg, key = b.meta, b.corpus, b.engine, b.qcfg, b.key
    names, unit_lins, passes = b.names, b.unit_lins, b.passes
    langs, reference = corpus.languages, list(c.reference)
    ref_mask = np.array([l in reference for l in langs])
    all_lins = [q for lins in unit_lins for q in lins]
    n_params = np.array([sum(q.n_params for q in lins) for lins in unit_lins], dtype=float)
    n = len(names)
    tokens = engine.tokens
    bar = protocol.progress(total=2 + n, desc="passes and curve points", unit="pass")

    # 1. baseline and single-unit damages d_{l,i}, both metrics
    passes.prefetch([[], *[[i] for i in range(n)], range(n)], bar)
    base = passes.scores([])
    bar.update()
    single_scores = []
    for i in range(n):
        single_scores.append(degradations(passes.scores([i]), base))
        bar.update()
    if c.metric not in single_scores[0]:
        raise RuntimeError(f"--metric {c.metric}: the passes carry no KL ({engine.kl_unavailable}); "
                           "run with --metric bpb")
    metrics = [m for m in METRICS if m in single_scores[0]]
    single = {m: np.array([[single_scores[i][m][l] for i in range(n)] for l in langs]) for m in metrics}
    damage = single[c.metric]

    # 2. the all-quantized pass: KL bits per byte and both metrics' statistics
    all_scores = passes.scores(range(n))
    bar.update()
    kl_bpb = kl_bpb_report(all_scores, base, engine.n_bytes, tokens, reference, corpus.parallel, c)

    # theory: eps_i from the weights' fitted families, the additive model and its bounds
    fits = weight_fits(all_lins, c.seed, ResultCache(cache_dir() / "weight_fits"))
    eps, slb, fit_rows = predicted_eps(unit_lins, fits, c.bits, c.grid)
    dm = DamageModel.from_sensitivities(damage / eps[None, :], eps, n_params, langs, reference)
    kurt = np.array([np.mean([r["excess_kurtosis"] for r in fit_rows if r["layer"] in {q.name for q in lins}])
                     for lins in unit_lins])
    shrink = np.clip(slb / eps, 0.0, 1.0)

    # 3. pair passes among the additive ranking's top units, then the curve models
    top = sorted(int(i) for i in rank_layers(dm, "excess")[: min(c.pairs, n)])
    pair_sets = list(itertools.combinations(top, 2))
    everything = tuple(range(n))
    train_sets = random_sets(n, c.train_sets, c.seed, exclude={everything, *pair_sets})
    passes.prefetch([*pair_sets, *train_sets], bar)
    bar.total += len(pair_sets)
    pair_d = {}
    for ij in pair_sets:
        pair_d[ij] = degradations(passes.scores(ij), base)
        bar.update()
    bar.total += len(train_sets)
    train_d = {}
    for s in train_sets:
        train_d[s] = degradations(passes.scores(s), base)
        bar.update()
    if n >= 2 and everything not in pair_d:
        train_d[everything] = degradations(all_scores, base)
    pairs = {ij: np.array([v[c.metric][l] for l in langs]) for ij, v in pair_d.items()}
    data = CurveData(damage, pairs, {frozenset(s): np.array([v[c.metric][l] for l in langs])
                                     for s, v in train_d.items()})
    selected, loo = select_curve_model(data)
    models, model_errors = {}, {}
    for name in loo:
        try:
            models[name] = fit_curve_model(name, data)
        except ValueError as exc:  # e.g. compounding with a single damage <= -1
            model_errors[name] = str(exc)
    if selected not in models:
        selected = "additive"

    # 4. the main curve, in the order the ranking gives
    orders = {r: rank_layers(dm, r, kurtosis=kurt) for r in ("excess", "position", "reverse_position",
                                                             "kurtosis", "size")}
    orders["model"] = greedy_order(models[selected], n_params, ref_mask)
    order = orders[c.ranking]
    bar.total += n + 1
    curve = measure_curve(passes, base, order, n_params, tokens, reference, corpus.parallel, c, bar)
    add_theory(curve, dm, order, shrink, n)

    # 5. the compared rankings (cached passes are shared: an identical set costs nothing)
    rankings = {}
    measured_sets: dict[frozenset, np.ndarray] = {}
    compared = [r for r in COMPARED_RANKINGS if r != c.ranking] if c.compare_rankings else []
    for r in [c.ranking, *compared]:
        o = orders[r]
        same = next((q for q, v in rankings.items() if v["order"] == [names[i] for i in o]), None)
        if r == c.ranking:
            pts = curve
        elif same is not None:
            pts = rankings[same]["_points"]
        else:
            bar.total += n + 1
            pts = measure_curve(passes, base, o, n_params, tokens, reference, corpus.parallel, c, bar,
                                max_points=c.compare_steps or len(curve))
        rankings[r] = {"order": [names[i] for i in o], "same_as": same, "_points": pts}
        for m in pts:
            measured_sets.setdefault(frozenset(int(i) for i in o[m["k"]:]),
                                     np.array([m[f"d_{l}"] for l in langs]))
    bar.close()

    # 6. predictions against measurements, on held-out points only
    prediction = compare_models(models, selected, data, order, curve, measured_sets, rankings, orders,
                                n_params, langs, ref_mask)

    # 7. the zero-pass predictor against the measured single-unit damages
    zero = (zero_pass_report(engine, unit_lins, qcfg, fits, base.nll, single, c.metric, names, n_params, langs,
                             reference, cache, key, c.seed) if c.zero_pass else {"available": False,
                                                                                 "reason": "--no-zero-pass"})

    p_meas = np.array([m["protected_fraction"] for m in curve])
    d_meas = np.array([m["disparity"] for m in curve])
    p_add, d_add, per_add = disparity_curve(dm, order)
    gamma, d_cal = calibrated_curve(damage, curve[0], langs, reference, n_params, order)
    for m in curve:
        m["predicted_calibrated"] = float(d_cal[m["k"]])
    nonref = [x for x in langs if x not in reference]
    data_out = {
        "result_version": RESULT_VERSION,
        "metric": c.metric,
        "metrics": metrics,
        "model_metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "baseline_note": PREQUANTIZED_NOTE if meta.get("prequantized") else "baseline is the model's own weights",
        "units": [{"name": nm, "n_params": int(n_params[i]), "predicted_eps": float(eps[i]),
                   "shannon_lower_bound": float(slb[i]), "excess_damage": float(dm.excess_damage()[i]),
                   "excess_kurtosis": float(kurt[i]),
                   "single_unit_degradation": single_scores[i][c.metric],
                   "single_unit_degradation_by_metric": single_scores[i]} for i, nm in enumerate(names)],
        "baseline_bpb": {l: float(base.nll[l].sum() / (math.log(2) * engine.n_bytes[l].sum())) for l in langs},
        "kl_bpb": kl_bpb,
        "pairs": [{"units": [names[i] for i in ij], "degradation_by_metric": pair_d[ij],
                   "interaction": {l: pair_d[ij][c.metric][l] - sum(single_scores[i][c.metric][l] for i in ij)
                                   for l in langs}} for ij in pair_sets],
        "training_sets": [{"units": [names[i] for i in s], "degradation_by_metric": train_d[s]}
                          for s in train_sets],
        "order": [names[i] for i in order],
        "curve": curve,
        "curve_models": {"selected": selected, "loo_score": loo, "errors": model_errors,
                         "params": {k: m.params for k, m in models.items()},
                         "n_fitted": {k: m.n_fitted for k, m in models.items()},
                         "training_sets": ["all units" if len(s) == n else [names[i] for i in sorted(s)]
                                           for s, _ in data.multi()],
                         "selection": "least leave-one-out error over the multi-unit training sets "
                                      "(pairs and the all-quantized point); held-out curve points never used"},
        "predicted_curves": prediction["curves"],
        "r2_out_of_sample": prediction["r2"],
        "pstar_predicted": prediction["curves"][selected]["pstar"],
        "pstar_predicted_by_model": {k: v["pstar"] for k, v in prediction["curves"].items()},
        "pstar_measured": critical_fraction(p_meas, d_meas),  # nan when a stopped curve never crossed
        "pstar_steps": prediction["steps"],
        "rankings": {r: {k: v for k, v in info.items() if k != "_points"} for r, info in rankings.items()},
        "zero_pass": zero,
        "zero_pass_spearman": zero.get("spearman"),
        # the additive model of theory.protection along the measured order (R^2 over every point)
        "predicted_curve": {"protected_fraction": p_add.tolist(), "disparity": d_add.tolist(),
                            "per_language": {l: per_add[:, j].tolist() for j, l in enumerate(nonref)}},
        "pstar_predicted_additive": critical_fraction(p_add, d_add),
        "r2_curve": r_squared(d_add[: len(curve)], d_meas),
        "interaction_factor": dict(zip(langs, gamma.tolist())),
        # the one-factor calibration uses the k = 0 point, so its R^2 is taken over k >= 1 only
        "r2_curve_calibrated": r_squared(d_cal[1: len(curve)], d_meas[1:]),
        "pstar_predicted_calibrated": critical_fraction(p_add, d_cal),
        "disparity_bound": bound_check(curve, shrink),
        "fits": fit_rows,
        "passes_in_result": 1 + len({s for s in measured_sets if s} | {frozenset([i]) for i in range(n)}
                                    | {frozenset(ij) for ij in pair_sets} | {frozenset(s) for s in train_sets}
                                    | {frozenset(everything)}),
        "scored_tokens_per_pass": engine.n_tokens,
        "padding_fraction": engine.padding_fraction,
    }
    for r, info in data_out["rankings"].items():
        pts = rankings[r]["_points"]
        info["pstar_measured"] = critical_fraction([m["protected_fraction"] for m in pts],
                                                   [m["disparity"] for m in pts])
        # a curve stopped before crossing: p* lies beyond its last measured point
        info["pstar_above"] = (pts[-1]["protected_fraction"] if not np.isfinite(info["pstar_measured"])
                               else None)
        info["pstar_predicted"] = prediction["ranking_pstar"][r]
        info["steps_measured"] = len(pts)
        info["curve"] = [{k: m.get(k) for k in ("k", "protected_fraction", "disparity", "ci_low", "ci_high",
                                                "disparity_other_metric")} for m in pts]
    return protocol.Result(EXPERIMENT, config, data_out,
                           timing={"forward_passes_run": passes.run_count,
                                   "packed": engine.packed if passes.run_count else None,
                                   "zero_pass_seconds": zero.get("seconds")})


def kl_bpb_report(scores, base, n_bytes, tokens, reference, parallel: bool, c: Config) -> dict:
    """KL bits per byte of a pass per language, ``sum_s KL_s / (ln 2 x sum_s bytes_s)``, with its
    95% bootstrap interval over sentences, and ``empirical.disparity.metric_summary`` of the pass
    (both metrics, from the same resamples)."""
    summary = metric_summary(scores.nll, base.nll, scores.kl, scores.agree, tokens, reference, parallel,
                             c.bootstrap, c.seed, n_bytes=n_bytes)
    return {"per_language": summary.pop("kl_bpb", None), "metric_summary": summary}


def random_sets(n: int, count: int, seed: int, exclude=()) -> list[tuple[int, ...]]:
    """``count`` seeded random sets of units of sizes ``round(n (1 - m / (count + 1)))``, m = 1..count
    (2n/3 and n/3 for two), each of three or more units and fewer than ``n``; sets in ``exclude``
    and repeats are skipped."""
    rng = np.random.default_rng([seed, 15])
    out: list[tuple[int, ...]] = []
    for m in range(1, count + 1):
        size = int(round(n * (1 - m / (count + 1))))
        if not 3 <= size < n:
            continue
        s = tuple(sorted(int(i) for i in rng.choice(n, size, replace=False)))
        if s not in out and s not in set(exclude):
            out.append(s)
    return out


def measure_curve(passes: Passes, base, order, n_params, tokens, reference, parallel: bool, c: Config,
                  bar, max_points: int | None = None) -> list[dict]:
    """D(p) of the primary metric with bootstrap CIs (and the other metric's beside it) at every
    step k (the first k units of ``order`` protected), stopping ``c.stop_after`` steps past the
    first crossing of D = 1, or after ``max_points`` points."""
    from validate._executor import current

    n, total = len(order), n_params.sum()
    width = current().width if current().prefetches else 1
    other = [m for m in METRICS if m != c.metric][0]
    curve, crossed_at = [], None
    for k in range(n + 1):
        quantized = [int(i) for i in order[k:]]
        point = {"k": k, "protected_fraction": float(n_params[order[:k]].sum() / total),
                 "protected_unit": passes.names[order[k - 1]] if k else None, "quantized_units": len(quantized)}
        if quantized:
            if k % width == 0:  # the next steps at once, one per worker (Ray); none in process
                passes.prefetch([[int(i) for i in order[j:]] for j in range(k, min(n, k + width))], bar)
            s = passes.scores(quantized)
            ms = metric_summary(s.nll, base.nll, s.kl, s.agree, tokens, reference, parallel, c.bootstrap,
                                c.seed + k)
            prim = ms[c.metric]
            point.update({"disparity": prim["disparity"], "ci_low": prim["disparity_ci"][0],
                          "ci_high": prim["disparity_ci"][1], "resolved": prim["resolved"],
                          **{f"d_{l}": v for l, v in prim["degradation"].items()}})
            if other in ms:
                point.update({"disparity_other_metric": ms[other]["disparity"],
                              "ci_low_other_metric": ms[other]["disparity_ci"][0],
                              "ci_high_other_metric": ms[other]["disparity_ci"][1]})
            point["by_metric"] = {m: {"disparity": ms[m]["disparity"], "disparity_ci": ms[m]["disparity_ci"],
                                      "degradation": ms[m]["degradation"],
                                      "degradation_ci": ms[m]["degradation_ci"]} for m in METRICS if m in ms}
            point["top1_agreement"] = ms.get("top1_agreement")
        else:
            nan = float("nan")
            point.update({"disparity": nan, "ci_low": nan, "ci_high": nan, "resolved": False,
                          **{f"d_{l}": 0.0 for l in base.nll}, "disparity_other_metric": nan})
        bar.update()
        curve.append(point)
        D = point["disparity"]
        if crossed_at is None and np.isfinite(D) and D <= 1:
            crossed_at = k
        if c.stop_after >= 0 and crossed_at is not None and k >= crossed_at + c.stop_after:
            break
        if max_points is not None and len(curve) >= max_points:
            break
    bar.update(n + 1 - len(curve))  # points skipped past the crossing
    return curve


def add_theory(curve: list[dict], dm, order, shrink, n: int) -> None:
    """The additive model's prediction and disparity bounds at every measured step."""
    from theory.protection import disparity_bound, disparity_curve

    _, d_pred, _ = disparity_curve(dm, order)
    for m in curve:
        mask = np.zeros(n, dtype=bool)
        mask[order[: m["k"]]] = True
        m.update({"predicted": float(d_pred[m["k"]]), "bound_any_quantizer": disparity_bound(dm, mask),
                  "bound_at_rate": disparity_bound(dm, mask, shrink)})


def compare_models(models: dict, selected: str, data, order, curve, measured_sets, rankings, orders,
                   n_params, langs, ref_mask) -> dict:
    """Each curve model's predicted curve along ``order``, its p*, and its R^2 against the
    measured curve over the held-out points (every measured set that is not a training set),
    on the main curve and pooled over every measured curve; the selected model's predicted p*
    along each compared ranking."""
    from theory.curve import first_crossing, held_out_mask, predict_curve, r2_out_of_sample

    sets = [frozenset(int(i) for i in order[m["k"]:]) for m in curve]
    held = held_out_mask(sets, data)
    meas = np.array([[m[f"d_{l}"] for l in langs] for m in curve])
    for m, h in zip(curve, held):
        m["held_out"] = bool(h)
    all_sets = list(measured_sets)
    all_held = held_out_mask(all_sets, data)
    all_meas = np.array([measured_sets[s] for s in all_sets])
    k_meas = first_crossing([m["disparity"] for m in curve])
    curves, r2, steps = {}, {}, {}
    for name, model in models.items():
        pc = predict_curve(model, order, n_params, ref_mask)
        curves[name] = {"p": pc["p"].tolist(), "disparity": pc["D"].tolist(), "pstar": pc["pstar"],
                        "per_language": {l: pc["d"][:, j].tolist() for j, l in enumerate(langs)}}
        for m in curve:
            m.setdefault("predicted_by_model", {})[name] = float(pc["D"][m["k"]])
        main = r2_out_of_sample(model.predict(sets), meas, ref_mask, held)
        pooled = r2_out_of_sample(model.predict(all_sets), all_meas, ref_mask, all_held)
        r2[name] = {"disparity": main["disparity"], "degradation": dict(zip(langs, main["degradation"])),
                    "degradation_pooled": main["degradation_pooled"], "n_points": main["n_points"],
                    "disparity_all_curves": pooled["disparity"],
                    "degradation_pooled_all_curves": pooled["degradation_pooled"],
                    "n_points_all_curves": pooled["n_points"]}
        k_pred = first_crossing(pc["D"])
        steps[name] = {"predicted": k_pred, "measured": k_meas,
                       "within_one_unit": (k_pred is not None and k_meas is not None and abs(k_pred - k_meas) <= 1)}
    ranking_pstar = {r: predict_curve(models[selected], orders[r], n_params, ref_mask)["pstar"] for r in rankings}
    return {"curves": curves, "ranking_pstar": ranking_pstar,
            "r2": {"selected": selected, "held_out_points": int(held.sum()),
                   "held_out_points_all_curves": int(all_held.sum()), "models": r2},
            "steps": {"selected": selected, "measured": k_meas, "models": steps}}


def zero_pass_report(engine, unit_lins, qcfg, fits, nll_fp, single, metric, names, n_params, langs, reference,
                     cache: ResultCache | None, key: dict, seed: int) -> dict:
    """Single-unit damages predicted with no quantized pass (``empirical.sensitivity``), once per
    configuration (cached), against the measured ones of the primary metric: Spearman pooled over
    (language, unit) and per language, R^2 of the raw prediction, and the protection ranking the
    prediction implies (excess damage per parameter, ``theory.protection.rank_layers``).

    ``{"available": False, "reason"}`` when the predictor refuses the model (e.g. a unit it cannot
    map), so that the measured curve is still reported.
    """
    from theory.protection import DamageModel, rank_layers

    config = {**key, "zero_pass": 1, "n_units": len(unit_lins)}
    hit = cache.get(config) if cache is not None else None
    seconds = None
    if hit is None:
        from empirical.sensitivity import zero_pass_damage

        t0 = time.perf_counter()
        try:
            z = zero_pass_damage(engine, unit_lins, qcfg, fits, nll_fp, seed=seed)
        except (ValueError, RuntimeError) as exc:
            return {"available": False, "reason": f"zero_pass_damage failed: {exc}"}
        seconds = time.perf_counter() - t0
        hit = {"variants": {v: {l: np.asarray(a)[z.keys.index(l)].tolist() for l in langs}
                            for v, a in z.variants.items()},
               "timing": {**z.timing, "seconds": seconds}}
        if cache is not None:
            cache.put(config, hit)
    measured = single[metric]
    out = {"available": True, "metric": metric, "variants": {}, "timing": hit.get("timing"),
           "seconds": seconds}
    rho_all = {}
    for v, per in hit["variants"].items():
        pred = np.array([per[l] for l in langs], dtype=float)
        if pred.shape != measured.shape or not np.all(np.isfinite(pred)):
            out["variants"][v] = {"error": f"prediction of shape {pred.shape} with non-finite values"}
            continue
        dm = DamageModel(pred, n_params, langs, reference)
        rho = {"pooled": spearman(pred.ravel(), measured.ravel()),
               "per_language": {l: spearman(pred[j], measured[j]) for j, l in enumerate(langs)}}
        rho_all[v] = rho
        out["variants"][v] = {"spearman": rho, "r2": r_squared(pred.ravel(), measured.ravel()),
                              "r2_per_language": {l: r_squared(pred[j], measured[j]) for j, l in enumerate(langs)},
                              "ranking": [names[i] for i in rank_layers(dm, "excess")],
                              "predicted": {l: pred[j].tolist() for j, l in enumerate(langs)}}
    out["spearman"] = rho_all
    return out


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


# ---- writing ------------------------------------------------------------------------------------

METRIC_WORDS = {"kl": "KL", "bpb": "bits per byte"}
RANKING_WORDS = {"model": "the selected model's greedy ranking",
                 "excess": "the additive model's ranking by excess damage", "position": "the ranking by position",
                 "reverse_position": "the ranking by reverse position",
                 "kurtosis": "the ranking by weight kurtosis", "size": "the ranking by size"}


def _num(v):
    return float("nan") if v is None else float(v)


def table_rows(res) -> list[dict]:
    """The table's rows: quantity, value and (where there is one) its 95% interval."""
    metric = res.get("metric", "bpb")
    summ = (res.get("kl_bpb") or {}).get("metric_summary") or {}
    rows = [{"quantity": "primary metric", "value": METRIC_WORDS.get(metric, metric)}]
    for m in METRICS:
        if m in summ:
            ci = summ[m]["disparity_ci"]
            rows.append({"quantity": f"disparity, nothing protected ({METRIC_WORDS[m]})",
                         "value": summ[m]["disparity"], "low": ci[0], "high": ci[1]})
    if summ.get("token_cost_ratio") is not None:
        rows.append({"quantity": "tokens bits per byte needs for KL's relative interval width",
                     "value": summ["token_cost_ratio"]})
    r2 = res.get("r2_out_of_sample") or {}
    sel = r2.get("selected")
    rows.append({"quantity": "curve model selected on training points", "value": sel})
    for name, v in (r2.get("models") or {}).items():
        rows.append({"quantity": Tex(rf"$R^2$ out of sample, {tex_text(name)} ({r2.get('held_out_points')} points)"),
                     "value": v["disparity"]})
    rows.append({"quantity": Tex(r"$p^\ast$ measured"), "value": res.get("pstar_measured")})
    rows.append({"quantity": Tex(rf"$p^\ast$ predicted ({tex_text(sel)})"), "value": res.get("pstar_predicted")})
    rows.append({"quantity": Tex(r"$p^\ast$ predicted (additive)"), "value": res.get("pstar_predicted_additive")})
    for r, info in (res.get("rankings") or {}).items():
        v, above = info.get("pstar_measured"), info.get("pstar_above")
        if (v is None or not np.isfinite(v)) and above is not None:
            v = Tex(rf"$> {format_number(above)}$")
        rows.append({"quantity": Tex(rf"$p^\ast$ measured, ranking {tex_text(r)}"), "value": v})
    zp = (res.get("zero_pass") or {})
    for v, info in (zp.get("variants") or {}).items():
        if "spearman" in info:
            rows.append({"quantity": f"zero-pass Spearman, {v} (pooled)", "value": info["spearman"]["pooled"]})
    return rows


def write(result: protocol.Result, out: Path) -> list[Path]:
    use_agg()
    import matplotlib.pyplot as plt

    res, cfg = result, result.config_dict
    langs, reference = list(res["baseline_bpb"]), list(cfg["reference"])
    metric = res.get("metric", "bpb")
    models = list((res.get("predicted_curves") or {}))
    files = [write_csv(out / "curve.csv", [{**m, **{f"predicted_{k}": v for k, v in
                                                    (m.get("predicted_by_model") or {}).items()}}
                                           for m in res["curve"]],
                       ["k", "protected_fraction", "protected_unit", "held_out", "disparity", "ci_low", "ci_high",
                        "disparity_other_metric", "ci_low_other_metric", "ci_high_other_metric", "predicted",
                        "predicted_calibrated", *[f"predicted_{k}" for k in models], "bound_at_rate",
                        "bound_any_quantizer", *[f"d_{l}" for l in langs]])]
    rank_rows = [{"ranking": r, "same_as": info.get("same_as"), "pstar_measured": info.get("pstar_measured"),
                  "pstar_predicted": info.get("pstar_predicted"), **m}
                 for r, info in (res.get("rankings") or {}).items() for m in info.get("curve", [])]
    files.append(write_csv(out / "rankings.csv", rank_rows,
                           ["ranking", "same_as", "k", "protected_fraction", "disparity", "ci_low", "ci_high",
                            "disparity_other_metric", "pstar_measured", "pstar_predicted"]))
    files.append(write_latex_table(
        out / f"{EXPERIMENT}_table.tex", table_rows(res), ["quantity", "value", "low", "high"],
        ["Quantity", "Value", "95\\% CI low", "high"],
        caption=f"Phase transition of disparity with the protected fraction ({tex_text(cfg['model'])}, "
                f"{cfg['bits']} bits, primary metric {METRIC_WORDS.get(metric, metric)}; $R^2$ over curve points "
                "no model was fitted on).", label="tab:phase-transition"))

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.4))
    c = res["curve"]
    p = np.array([m["protected_fraction"] for m in c])
    col = lambda key, pts=c: np.array([_num(m.get(key)) for m in pts])  # noqa: E731
    ax[0].fill_between(p, col("ci_low"), col("ci_high"), alpha=0.2, color="C0", label=f"measured 95% CI ({metric})")
    ax[0].plot(p, col("disparity"), "-", color="C0")
    held = np.array([bool(m.get("held_out")) for m in c])
    ax[0].plot(p[held], col("disparity")[held], "o", color="C0", label="measured, held out")
    ax[0].plot(p[~held], col("disparity")[~held], "o", mfc="white", color="C0", label="measured, training point")
    if np.any(np.isfinite(col("disparity_other_metric"))):
        other = [m for m in METRICS if m != metric][0]
        ax[0].plot(p, col("disparity_other_metric"), "s:", color="grey", ms=3, label=f"measured ({other})")
    sel = (res.get("r2_out_of_sample") or {}).get("selected")
    r2m = (res.get("r2_out_of_sample") or {}).get("models") or {}
    colors = iter(["C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9", "C1", "C2"])
    for name, pc in (res.get("predicted_curves") or {}).items():
        r2v = (r2m.get(name) or {}).get("disparity")
        lab = f"{name} (R² {r2v:.2f})" if r2v is not None and np.isfinite(_num(r2v)) else name
        lab += ", selected" if name == sel else ""
        ax[0].plot(pc["p"], [_num(v) for v in pc["disparity"]], "-" if name == sel else "--",
                   lw=2.2 if name == sel else 0.9, color="k" if name == sel else next(colors), label=lab)
    ax[0].axhline(1.0, color="k", lw=0.8)
    for v, ls in ((res.get("pstar_measured"), "-"), (res.get("pstar_predicted"), "--")):
        if v is not None and np.isfinite(v):
            ax[0].axvline(v, color="grey", ls=ls, lw=0.8)
    right = max([p.max(), *[v for v in (res.get("pstar_measured"), res.get("pstar_predicted")) if v is not None
                            and np.isfinite(v)]])
    ax[0].set_xlim(-0.01, min(1.0, right + 0.15))
    finite_d = col("disparity")[np.isfinite(col("disparity"))]
    if finite_d.size:
        hi = max(2.0, float(np.nanmax(col("ci_high"))) if np.any(np.isfinite(col("ci_high"))) else 2.0)
        ax[0].set_ylim(0, min(hi * 1.1, 5 * float(np.max(finite_d))))
    ax[0].set_xlabel("protected fraction p")
    ax[0].set_ylabel(f"disparity D(p), {metric}")
    ax[0].set_title(f"ranking {cfg.get('ranking')}; models fitted on singles, pairs, random sets and p = 0; "
                    "R² over held-out points", fontsize=7)
    ax[0].legend(fontsize=6)
    ref = np.array([np.mean([m[f"d_{r}"] for r in reference]) for m in c])
    for l in langs:
        if l not in reference:
            ax[1].plot(p, col(f"d_{l}") / np.where(ref > 0, ref, np.nan), ".-", label=l)
    ax[1].axhline(1.0, color="k", lw=0.8)
    ax[1].set_xlabel("protected fraction p")
    ax[1].set_ylabel(f"d_l / d_ref ({', '.join(reference)}), {metric}")
    ax[1].legend(fontsize=7, ncol=2)
    for j, (r, info) in enumerate((res.get("rankings") or {}).items()):
        pts = info.get("curve") or []
        pr = [m["protected_fraction"] for m in pts]
        d = np.array([_num(m["disparity"]) for m in pts])
        lo, hi_ = np.array([_num(m["ci_low"]) for m in pts]), np.array([_num(m["ci_high"]) for m in pts])
        ps, above = info.get("pstar_measured"), info.get("pstar_above")
        lab = (f"{r}: p* {ps:.3f}" if ps is not None and np.isfinite(_num(ps))
               else f"{r}: p* > {above:.2f}" if above is not None else f"{r}: no crossing measured")
        ax[2].errorbar(pr, d, yerr=[d - lo, hi_ - d], fmt="o-", ms=3, capsize=2, color=f"C{j}", label=lab,
                       alpha=0.8)
    ax[2].axhline(1.0, color="k", lw=0.8)
    ax[2].set_xlabel("protected fraction p")
    ax[2].set_ylabel(f"measured D(p), {metric}")
    ax[2].set_title("rankings, each measured to its crossing + stop-after", fontsize=8)
    ax[2].legend(fontsize=7)
    fig.suptitle(f"{cfg['model']}: {res['baseline_note']}", fontsize=8)
    files.append(save_figure(fig, out / f"{EXPERIMENT}.png"))
    plt.close(fig)
    files.append(write_json(out / f"{EXPERIMENT}.json", res.to_json()))
    return files


def summary(result: protocol.Result) -> str:
    r, c0 = result, result["curve"][0]
    r2 = (r.get("r2_out_of_sample") or {})
    sel = r2.get("selected")
    r2sel = ((r2.get("models") or {}).get(sel) or {}).get("disparity")
    zp = r.get("zero_pass") or {}
    zs = ", ".join(f"{v} {i['spearman']['pooled']:.2f}" for v, i in (zp.get("variants") or {}).items()
                   if "spearman" in i and i["spearman"]["pooled"] is not None)
    return (f"D(0) {c0['disparity']:.3f} [95% CI {c0['ci_low']:.3f}, {c0['ci_high']:.3f}] ({r.get('metric')}); "
            f"p* measured {_num(r['pstar_measured']):.3f}, predicted {_num(r['pstar_predicted']):.3f} ({sel}, "
            f"R^2 out of sample {_num(r2sel):.3f}); zero-pass Spearman {zs or 'n/a'}; "
            f"{result.timing.get('forward_passes_run', 0)} forward passes run")


def macros(result: protocol.Result) -> MacroSet:
    ms = MacroSet(f"{EXPERIMENT}.json")
    r, cfg = result, result.config_dict
    curve = r.get("curve", [])
    first = curve[0] if curve else {}
    pm, pp = r.get("pstar_measured"), r.get("pstar_predicted")
    ms.add("PstarMeasured", pm, "pstar_measured")
    ms.add("PstarPredicted", pp, "pstar_predicted (the selected curve model)")
    ms.add("PstarAbsDiff", abs(pm - pp) if finite([pm]) and finite([pp]) else None,
           "|pstar_measured - pstar_predicted|")
    ms.add("PstarPredictedAdditive", r.get("pstar_predicted_additive"), "pstar_predicted_additive")
    ms.add("RsqCurve", r.get("r2_curve"), "r2_curve (additive model, every measured point)")
    ms.add("RsqCurveCalibrated", r.get("r2_curve_calibrated"), "r2_curve_calibrated")
    ms.add("PstarPredictedCalibrated", r.get("pstar_predicted_calibrated"), "pstar_predicted_calibrated")
    # the primary metric and both metrics' disparity with nothing protected
    metric = r.get("metric")
    ms.add("PTMetric", METRIC_WORDS.get(metric, metric), "metric")
    summ = (r.get("kl_bpb") or {}).get("metric_summary") or {}
    for m in METRICS:
        s = summ.get(m) or {}
        ci = s.get("disparity_ci") or (None, None)
        tag = "Kl" if m == "kl" else "Bpb"
        ms.add(f"DisparityNone{tag}", s.get("disparity"), f"kl_bpb.metric_summary.{m}.disparity")
        ms.add(f"DisparityNone{tag}CILow", ci[0], f"kl_bpb.metric_summary.{m}.disparity_ci[0]")
        ms.add(f"DisparityNone{tag}CIHigh", ci[1], f"kl_bpb.metric_summary.{m}.disparity_ci[1]")
        ms.add(f"PTRelativeWidth{tag}", s.get("relative_width"), f"kl_bpb.metric_summary.{m}.relative_width")
        ms.add(f"PTResolved{tag}", None if not s else ("yes" if s.get("resolved") else "no"),
               f"kl_bpb.metric_summary.{m}.resolved")
    ms.add("PTTokenCostRatio", summ.get("token_cost_ratio"), "kl_bpb.metric_summary.token_cost_ratio")
    for lang, v in ((r.get("kl_bpb") or {}).get("per_language") or {}).items():
        ms.add(["PTKlBpb", lang], v.get("kl_bpb"), f"kl_bpb.per_language.{lang}.kl_bpb")
    for lang, v in (summ.get("top1_agreement") or {}).items():
        ms.add_pct(["PTTopOneAgreement", lang], v, f"kl_bpb.metric_summary.top1_agreement.{lang}")
    # curve models, out of sample
    r2 = r.get("r2_out_of_sample") or {}
    sel = r2.get("selected")
    ms.add("PTSelectedModel", sel.replace("_", " ") if isinstance(sel, str) else None, "r2_out_of_sample.selected")
    ms.add("PTHeldOutPoints", r2.get("held_out_points"), "r2_out_of_sample.held_out_points")
    ms.add("PTHeldOutPointsAll", r2.get("held_out_points_all_curves"), "r2_out_of_sample.held_out_points_all_curves")
    from theory.curve import CURVE_MODELS

    models = r2.get("models") or {}
    for name in CURVE_MODELS:
        v = models.get(name) or {}
        ms.add(["RsqOOS", name], v.get("disparity"), f"r2_out_of_sample.models.{name}.disparity")
        ms.add(["RsqOOSAll", name], v.get("disparity_all_curves"),
               f"r2_out_of_sample.models.{name}.disparity_all_curves")
    ms.add("RsqOOSSelected", (models.get(sel) or {}).get("disparity"), "r2_out_of_sample.models[selected].disparity")
    ms.add("RsqOOSSelectedAll", (models.get(sel) or {}).get("disparity_all_curves"),
           "r2_out_of_sample.models[selected].disparity_all_curves")
    ms.add("RsqOOSSelectedDegradation", (models.get(sel) or {}).get("degradation_pooled"),
           "r2_out_of_sample.models[selected].degradation_pooled")
    steps = r.get("pstar_steps") or {}
    sm = ((steps.get("models") or {}).get(sel) or {})
    ms.add("PTCrossingStepMeasured", steps.get("measured"), "pstar_steps.measured")
    ms.add("PTCrossingStepPredicted", sm.get("predicted"), "pstar_steps.models[selected].predicted")
    ms.add("PTCrossingWithinOne", None if not sm else ("yes" if sm.get("within_one_unit") else "no"),
           "pstar_steps.models[selected].within_one_unit")
    ms.add("PTPairPasses", len(r.get("pairs") or []), "len(pairs)")
    ms.add("PTTrainingSets", len(r.get("training_sets") or []), "len(training_sets)")
    # the rankings, measured
    rk = r.get("rankings") or {}
    for name in ("model", *COMPARED_RANKINGS):
        info = rk.get(name) or {}
        ms.add(["PTRankingPstar", name], info.get("pstar_measured"), f"rankings.{name}.pstar_measured")
        ms.add(["PTRankingPstarAbove", name], info.get("pstar_above"), f"rankings.{name}.pstar_above")
    crossing = {k: v["pstar_measured"] for k, v in rk.items() if finite([v.get("pstar_measured")])}
    best = min(crossing, key=crossing.get) if crossing else None
    ms.add("PTBestRanking", RANKING_WORDS.get(best, best) if best else None, "argmin rankings.*.pstar_measured")
    ms.add("PTRankingsCompared", len(rk), "len(rankings)")
    # the zero-pass predictor
    zp = r.get("zero_pass") or {}
    rho = {v: i["spearman"]["pooled"] for v, i in (zp.get("variants") or {}).items()
           if "spearman" in i and finite([i["spearman"]["pooled"]])}
    for v in ("theory", "factorized", "actual", "actual_second_order"):
        ms.add(["ZPSpearman", v], rho.get(v), f"zero_pass.variants.{v}.spearman.pooled")
    zbest = max(rho, key=rho.get) if rho else None
    ms.add("ZPSpearmanBest", rho.get(zbest) if zbest else None, "max zero_pass.variants.*.spearman.pooled")
    ms.add("ZPBestVariant", zbest.replace("_", " ") if zbest else None, "argmax zero_pass.variants.*.spearman.pooled")
    if zbest:
        per = zp["variants"][zbest]["spearman"]["per_language"]
        vals = [v for v in per.values() if finite([v])]
        ms.add("ZPSpearmanBestMinLanguage", min(vals) if vals else None,
               "min zero_pass.variants[best].spearman.per_language")
    else:
        ms.add("ZPSpearmanBestMinLanguage", None, "min zero_pass.variants[best].spearman.per_language")
    # the earlier quantities
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
    lo_hi = [(m.get("ci_low"), m.get("ci_high")) for m in curve]
    ms.add("PTCurvePointsResolved", sum(1 for lo, hi in lo_hi if lo is not None and hi is not None
                                        and math.isfinite(lo) and math.isfinite(hi) and (lo > 1 or hi < 1)),
           "curve points whose interval excludes 1")
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
