"""Experiment (issue #17, S-009): attention sinks, massive activations and super weights per
language, and how they relate to each block's quantization damage.

``python -m validate.outliers [--quick] [--model M] [--languages ...] [--out DIR]``
(``--help`` lists every flag with its default)

Per language, on each segment alone (BOS first, ``--max-length`` tokens, no padding;
``validate._mechanisms.language_windows``), with the primitives of :mod:`empirical.outliers`:

1. **Attention sinks** (Gu et al., ICLR 2025). Under eager attention, the importance of the first
   position for head ``h`` of layer ``l`` is ``alpha = sum_{i>=0} A[i, 0] / T``; a (layer, head)
   pair is a sink when ``alpha > --sink-eps`` (0.3). Reported: the share of (segment, layer, head)
   triples that are sinks (the reference code's average over sequences), with a percentile
   bootstrap interval over segments, and the share per layer.
2. **Massive activations** (Sun et al., 2024). Entries of each block's output hidden state with
   ``|x| > --massive-abs`` (100) and ``|x| > --massive-ratio`` (1000) times the median ``|x|`` of
   that hidden state: counts, where (layer, feature dimension), on which tokens (position 0, or the
   decoded token), and per layer ``max |x| / median |x|`` (how close a model without any comes).
3. **Super weights** (Yu et al., 2024). Spikes (``max |.| > --super-threshold``, 50) of every MLP
   down-projection's input and output give ``W_down[row, column]``; found iteratively (zeroing the
   ones found, at most ``--super-max-iter`` rounds) on ``--detect-segments`` segments of every
   language. Then three scored passes (cached, ``validate._passes``): the all-quantized model
   (``--bits``, ``--grid``, ``--granularity``, ``--clipping`` over every block Linear), the same with
   the super weights put back to their full-precision values after quantization (``restore``), and
   with them held out of the quantization (set to 0 while their rows are quantized, then put back:
   the paper's recipe, ``holdout``). Each language's KL degradation (``empirical.disparity``) and
   the paired difference ``all-quantized - with super weights`` with a bootstrap interval
   (``empirical.disparity.paired_difference``). A model with no super weight skips these passes.
4. **Sinks against outliers.** Across layers, per language and pooled (bootstrap over whole
   layers), the correlation (Spearman and Pearson, ``validate._mechanisms.correlation_ci``) of each
   layer's sink share (and mean ``alpha``) with its outlier magnitude (mean over segments of
   ``max |x| / median |x|`` of the block output), against the research notes' claim that they are
   distinct (``r = -0.23``); and both statistics against the single-block damage of
   ``validate._mechanisms.block_damage`` (pooled over languages with whole blocks resampled, and
   per language).

Everything per language is cached (``<out>/cache``; the block damage in ``<results>/_shared``), so
a rerun performs no forward pass. Writes ``outliers.json`` (provenance, every number, every
correlation with its interval), ``outliers.csv`` (one row per language and layer),
``outliers_table.tex`` and ``outliers.png``. With ``--executor ray [--workers N]`` the scored passes
(block damage, all-quantized, restore, holdout) run on Ray workers (``validate._executor``), with
the same numbers; the hooked captures (sinks, massive activations, the super-weight search) run in
this process.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from validate import _protocol as protocol
from validate._common import ResultCache, save_figure, use_agg, write_csv, write_json
from validate._latex import MacroSet, write_latex_table
from validate._mechanisms import (MechanismConfig, base_config, block_damage, block_key, block_passes, correlation_ci,
                                  resolved, setup)
from validate._sinks import PROFILE_VERSION, correlations, language_profile, summarize_language

EXPERIMENT = "outliers"
SUPER_VERSION = 1
#: The grids ``--executor ray`` distributes (validate._executor).
EXECUTOR_GRIDS = ("the baseline and all-quantized passes, the super-weight restore and holdout passes, the single-block "
         "passes")


@dataclass(frozen=True)
class Config(MechanismConfig):
    sink_eps: float = protocol.param(0.3, "attention-sink threshold on alpha (Gu et al.)")
    sink_position: int = protocol.param(0, "key position whose importance is measured (0: BOS)")
    massive_abs: float = protocol.param(100.0, "massive activation: |x| above this (Sun et al.)")
    massive_ratio: float = protocol.param(1000.0, "massive activation: |x| above this times the median |x|")
    super_threshold: float = protocol.param(50.0, "super weight: down_proj input and output spikes above this (Yu et al.)")
    super_max_iter: int = protocol.param(5, "super weight search: most rounds (found weights zeroed between rounds)")
    detect_segments: int | None = protocol.param(4, "segments per language used to find super weights (none: all)")

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.sink_eps, (int, float)) and 0 < self.sink_eps < 1):
            raise protocol.ConfigError(f"--sink-eps must lie in (0, 1), got {self.sink_eps!r}")
        protocol.check_positive("sink_position", self.sink_position, allow_zero=True)
        if self.sink_position >= self.max_length:
            raise protocol.ConfigError(f"--sink-position must be below --max-length {self.max_length}, "
                                       f"got {self.sink_position}")
        for name in ("massive_abs", "massive_ratio", "super_threshold"):
            v = getattr(self, name)
            protocol.check_positive(name, v)
            if not np.isfinite(v):
                raise protocol.ConfigError(f"--{name.replace('_', '-')} must be finite, got {v!r}")
        protocol.check_positive("super_max_iter", self.super_max_iter)
        protocol.check_positive("detect_segments", self.detect_segments, optional=True)


# ---- measurement --------------------------------------------------------------------------------

@contextlib.contextmanager
def super_weight_setting(fq, linears: dict, weights: list[dict], mode: str):
    """Every Linear fake-quantized (``fq``), then the super weights in full precision.

    ``restore``: the quantized weight with ``W[r, c]`` put back to its original value.
    ``holdout``: each affected weight quantized with its super weights set to 0 (so they do not
    set their rows' scale), then ``W[r, c]`` put back (Yu et al.'s recipe). The quantizer's cached
    weights are never changed (copies are swapped in) and everything is restored on exit.
    """
    import torch

    from empirical.devices import param_tensor, swap_param
    from empirical.fakequant import fake_quantize_weight

    if mode not in ("restore", "holdout"):
        raise ValueError(f"unknown super-weight mode {mode!r}")
    by_name: dict[str, list[dict]] = {}
    for w in weights:
        by_name.setdefault(w["name"], []).append(w)
    # the real weights (also under an accelerate offload hook, empirical.devices)
    originals = {n: param_tensor(linears[n].module, "weight").detach() for n in by_name}
    with fq.quantized():
        saved = []
        try:
            with torch.no_grad():
                for n, ws in by_name.items():
                    mod = linears[n].module
                    transposed = type(mod).__name__ == "Conv1D"
                    idx = [(w["column"], w["row"]) if transposed else (w["row"], w["column"]) for w in ws]
                    if mode == "restore":
                        new = param_tensor(mod, "weight").detach().clone()  # the quantized weight in use
                    else:
                        held = originals[n].clone()
                        for i in idx:
                            held[i] = 0.0
                        new = fake_quantize_weight(held, fq.config, transposed=transposed, seed=fq.seed)
                    for i in idx:
                        new[i] = originals[n][i]
                    saved.append(swap_param(mod, "weight", new))
            yield
        finally:
            for restore in reversed(saved):
                restore()


def _super_key(s) -> dict:
    """The cache key the super-weight passes share (the block passes' plus this experiment's)."""
    return {**block_key(s), "outliers_super_version": SUPER_VERSION}


def _super_setting(weights: list[dict], mode: str) -> dict:
    coords = sorted([w["name"], w["row"], w["column"]] for w in weights)
    return {"quantized": "all", "super_weights": coords, "mode": mode}


def super_weight_passes(s, weights: list[dict], cache: ResultCache | None, c: Config, progress: bool = True) -> dict:
    """Per-language degradation of the all-quantized model with and without the super weights in
    full precision, and their paired differences (module docstring).

    Under a Ray executor (``--executor ray``) the baseline and the all-quantized pass (one grid),
    then the ``restore`` and ``holdout`` passes (another, :class:`SuperWeightWorker`) are computed
    on the workers ahead of being read from the cache."""
    from empirical.disparity import paired_difference
    from validate._executor import WorkerSpec, current
    from validate._passes import ScoredPasses, degradations

    if not weights:
        return {"skipped": "no super weight found", "passes_run": 0}
    lins = s.block_linears()
    passes = block_passes(s, cache)
    before = passes.run_count
    fq, engine = passes.fq, passes.scored.engine
    mine = ScoredPasses(engine, cache, _super_key(s))
    linears = {q.name: q for b in lins for q in b}
    missing = sorted({w["name"] for w in weights} - set(linears))
    if missing:
        raise ValueError(f"super weights in layers the quantizer does not know: {missing}")
    modes = ("restore", "holdout")
    bar = protocol.progress(total=4, desc="super-weight passes", unit="pass") if progress else None
    passes.prefetch([[], list(range(len(lins)))], bar)
    ex = current()
    if ex.prefetches:
        folder = None if cache is None or cache.folder is None else str(cache.folder)
        shared = None if passes.scored.cache is None else str(passes.scored.cache.folder)
        spec = WorkerSpec(f"{__name__}:super_weight_worker", (base_config(c), shared, folder), c.device)
        tasks = [mine.task(_super_setting(weights, m), {"weights": weights, "mode": m}, f"{m} super weights")
                 for m in modes]
        mine.run_count += ex.map(spec, tasks, cache=cache, bar=bar).computed
    base = passes.scores([])
    allq = passes.scores(list(range(len(lins))))
    if bar is not None:
        bar.update(2)
    out = {"modes": {}}
    scores = {}
    for mode in modes:
        scores[mode] = mine.get(_super_setting(weights, mode),
                                lambda mode=mode: super_weight_setting(fq, linears, weights, mode))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    metric = "kl" if allq.kl is not None and all(v.kl is not None for v in scores.values()) else "bpb"
    parallel = bool(getattr(s.corpus, "parallel", False))
    out["metric"] = metric
    out["all_quantized"] = degradations(allq, base)[metric]
    for mode, sc in scores.items():
        pd = paired_difference((allq.nll, allq.kl), (sc.nll, sc.kl), base.nll, metric, parallel,
                               c.bootstrap, c.seed)
        out["modes"][mode] = {"degradation": degradations(sc, base)[metric],
                              "difference": {l: {"diff": e["diff"], "ci": list(e["ci"]), "resolved": e["resolved"]}
                                             for l, e in pd["language"].items()},
                              "worst": {"diff": pd["worst"]["diff"], "ci": list(pd["worst"]["ci"]),
                                        "resolved": pd["worst"]["resolved"]}}
    out["quantized_values"] = {f"{w['name']}[{w['row']},{w['column']}]":
                               float(fq.quantized_weight(w["name"])[(w["column"], w["row"]) if type(linears[w["name"]].module).__name__ == "Conv1D" else (w["row"], w["column"])])
                               for w in weights}
    out["passes_run"] = passes.run_count - before + mine.run_count
    return out


class SuperWeightWorker:
    """The ``restore``/``holdout`` passes as an executor worker (``validate._executor.Worker``):
    payload ``{"weights": [super weights], "mode": mode}``. It uses the model, engine and
    quantizer of this process's block passes (``validate._mechanisms.worker_block_passes``) and
    records into a ``RecordingCache`` reading the driver's cache ``folder`` where visible."""

    def __init__(self, config: MechanismConfig, shared: str | None, folder: str | None):
        from validate._executor import RecordingCache
        from validate._mechanisms import worker_block_passes, worker_setup
        from validate._passes import ScoredPasses

        self.s = worker_setup(config)
        self.passes = worker_block_passes(config, shared)
        self.mine = ScoredPasses(self.passes.scored.engine, RecordingCache(read_from=folder), _super_key(self.s))
        self.linears = {q.name: q for b in self.s.block_linears() for q in b}

    def compute(self, payload) -> list:
        weights, mode = list(payload["weights"]), payload["mode"]
        if mode not in ("restore", "holdout"):
            raise ValueError(f"unknown super-weight mode {mode!r}")
        missing = sorted({w["name"] for w in weights} - set(self.linears))
        if missing:
            raise ValueError(f"super weights in layers the quantizer does not know: {missing}")
        self.mine.get(_super_setting(weights, mode),
                      lambda: super_weight_setting(self.passes.fq, self.linears, weights, mode))
        return self.mine.cache.drain()


def super_weight_worker(config: MechanismConfig, shared: str | None, folder: str | None) -> SuperWeightWorker:
    """The :class:`SuperWeightWorker` of a remote process (the factory of its ``WorkerSpec``)."""
    return SuperWeightWorker(config, shared, folder)


def run(config: Config, cache: ResultCache | None = None) -> protocol.Result:
    """Per-language sinks, massive activations, super weights and their relation to block damage."""
    from empirical.outliers import super_weights

    c = config
    s = setup(c)
    windows = s.windows()
    hook_passes = 0
    profiles = {}
    base_key = {**s.key, "sink_eps": c.sink_eps, "sink_position": c.sink_position,
                "massive_abs": c.massive_abs, "massive_ratio": c.massive_ratio, "profile_version": PROFILE_VERSION}
    for lang in protocol.progress(s.languages, desc="sinks and massive activations", unit="language"):
        key = {**base_key, "language": lang}
        item = cache.get(key) if cache is not None else None
        if item is None:
            item = language_profile(s.model, windows[lang], s.tokenizer, c)
            hook_passes += 2 * len(windows[lang])
            if cache is not None:
                cache.put(key, item)
        profiles[lang] = item
    summ = {l: summarize_language(profiles[l], c, c.seed + i) for i, l in enumerate(s.languages)}

    # super weights: found on a few segments of every language, pooled
    det = {l: windows[l][: c.detect_segments] if c.detect_segments else windows[l] for l in s.languages}
    skey = {**s.key, "super_threshold": c.super_threshold, "super_max_iter": c.super_max_iter,
            "detect_segments": c.detect_segments, "super_version": SUPER_VERSION}
    sw = cache.get(skey) if cache is not None else None
    if sw is None:
        pooled = [w for l in s.languages for w in det[l]]
        found = super_weights(s.model, pooled, c.super_threshold, c.super_max_iter)
        n_found = len(found["weights"])
        hook_passes += found["rounds"] * len(pooled) + n_found
        first = found["first"]
        owner = [l for l in s.languages for _ in det[l]]
        per_lang = {}
        for l in s.languages:
            rows = [i for i, o in enumerate(owner) if o == l]
            per_lang[l] = {k: [first[k][i].tolist() for i in rows] for k in first}
        sw = {"weights": [{k: (float(v) if isinstance(v, np.floating) else v) for k, v in w.to_json().items()}
                          for w in found["weights"]],
              "rounds": found["rounds"], "detect_segments_used": {l: len(det[l]) for l in s.languages},
              "first_round": per_lang}
        if cache is not None:
            cache.put(skey, sw)
    # per layer and language: max |input| / |output| of the down-projection in the first round
    spikes = {}
    for l, fr in sw["first_round"].items():
        iv, ov = np.abs(np.asarray(fr["in_value"])), np.abs(np.asarray(fr["out_value"]))
        spikes[l] = {"max_abs_input": iv.max(axis=0).tolist(), "max_abs_output": ov.max(axis=0).tolist(),
                     "windows_with_spike": int(np.sum((iv > c.super_threshold) & (ov > c.super_threshold)))}

    sw_passes = super_weight_passes(s, sw["weights"], cache, c)
    damage = block_damage(s, cache)
    corr = correlations(summ, damage, c, s.languages)

    # across languages: sink share against the all-quantized model's degradation
    lang_corr = None
    if "all_quantized" in sw_passes:
        lang_corr = correlation_ci([summ[l]["sink_share"] for l in s.languages],
                                   [sw_passes["all_quantized"][l] for l in s.languages],
                                   "spearman", c.bootstrap, c.seed)
        lang_corr["verdict"] = resolved(lang_corr)
    data = {
        "model": c.model, "metadata": s.metadata, "languages": s.languages, "blocks": s.block_names,
        "n_heads": int(np.asarray(profiles[s.languages[0]]["alpha"]).shape[2]),
        "thresholds": {"sink_eps": c.sink_eps, "sink_position": c.sink_position, "massive_abs": c.massive_abs,
                       "massive_ratio": c.massive_ratio, "super_threshold": c.super_threshold},
        "per_language": summ,
        "super_weights": {"weights": sw["weights"], "rounds": sw["rounds"], "spikes": spikes,
                          "detect_segments_used": sw["detect_segments_used"]},
        "super_weight_passes": sw_passes,
        "correlations": corr, "sink_vs_damage_across_languages": lang_corr,
        "block_damage": damage.to_json(),
        "passes": {"hooks": hook_passes, "scored": sw_passes.get("passes_run", 0),
                   "block_damage": damage.passes_run,
                   "total": hook_passes + sw_passes.get("passes_run", 0) + damage.passes_run},
    }
    return protocol.Result(EXPERIMENT, c, data)


# ---- outputs ------------------------------------------------------------------------------------

def _lang_rows(result) -> list[dict]:
    rows = []
    swp = result["super_weight_passes"]
    for l in result["languages"]:
        p = result["per_language"][l]
        row = {"language": l, "sink_share": p["sink_share"], "sink_lo": p["sink_share_ci"][0],
               "sink_hi": p["sink_share_ci"][1], "massive": p["massive"]["total"],
               "massive_first": p["massive"]["first_position"], "top_ratio": p["top_outlier_ratio"],
               "d_allq": None, "d_holdout": None, "diff_holdout": None, "diff_lo": None, "diff_hi": None}
        if "all_quantized" in swp:
            h = swp["modes"]["holdout"]
            row.update(d_allq=swp["all_quantized"][l], d_holdout=h["degradation"][l],
                       diff_holdout=h["difference"][l]["diff"], diff_lo=h["difference"][l]["ci"][0],
                       diff_hi=h["difference"][l]["ci"][1])
        rows.append(row)
    return rows


def plot(result, path: Path) -> Path:
    use_agg()
    import matplotlib.pyplot as plt

    langs = result["languages"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for l in langs:
        p = result["per_language"][l]
        axes[0].plot(p["layer_sink_share"], marker="o", ms=3, lw=1, label=l)
        axes[1].semilogy(p["layer_outlier_ratio"], marker="o", ms=3, lw=1, label=l)
        axes[2].scatter(p["layer_outlier_ratio"], p["layer_sink_share"], s=10)
    axes[0].set(xlabel="layer", ylabel=f"sink share (alpha > {result['thresholds']['sink_eps']})",
                title="attention sinks per layer")
    axes[1].axhline(result["thresholds"]["massive_ratio"], color="k", ls=":", lw=0.8)
    axes[1].set(xlabel="layer", ylabel="max|x| / median|x|", title="block-output outliers")
    axes[2].set_xscale("log")
    cl = result["correlations"]["claim"]
    r = "n/a" if cl["r"] is None else f"{cl['r']:.2f}"
    axes[2].set(xlabel="outlier ratio of the layer", ylabel="sink share of the layer",
                title=f"sinks vs outliers (pooled Pearson r = {r})")
    axes[0].legend(fontsize=6, ncol=2)
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def write(result: protocol.Result, out: Path) -> list[Path]:
    files = []
    rows = []
    for l in result["languages"]:
        p = result["per_language"][l]
        for b, name in enumerate(result["blocks"]):
            rows.append({"language": l, "layer": b, "block": name, "sink_share": p["layer_sink_share"][b],
                         "alpha": p["layer_alpha"][b], "outlier_ratio": p["layer_outlier_ratio"][b],
                         "max_abs": p["layer_max_abs"][b], "median_abs": p["layer_median_abs"][b],
                         "massive": p["massive"]["by_layer"].get(b, p["massive"]["by_layer"].get(str(b), 0)),
                         "block_damage": (result["block_damage"]["kl"] or result["block_damage"]["bpb"])
                         [result["block_damage"]["languages"].index(l)][b]})
    files.append(write_csv(out / f"{EXPERIMENT}.csv", rows, list(rows[0])))
    swp = result["super_weight_passes"]
    n_sw = len(result["super_weights"]["weights"])
    cap = (r"Per language: share of (segment, layer, head) triples that are attention sinks "
           r"(Gu et al.; 95\% bootstrap interval over segments), massive activations "
           r"(Sun et al.; all, and at position 0), the largest max/median ratio of a block output, ")
    cap += (r"and the KL degradation of the all-quantized model, of the same with the super weights "
            r"held out of quantization, and the difference (95\% paired bootstrap interval)."
            if "all_quantized" in swp else r"and no super-weight pass (no super weight found).")
    files.append(write_latex_table(
        out / f"{EXPERIMENT}_table.tex", _lang_rows(result),
        ["language", "sink_share", "sink_lo", "sink_hi", "massive", "massive_first", "top_ratio",
         "d_allq", "d_holdout", "diff_holdout", "diff_lo", "diff_hi"],
        headers=["language", "sinks", "lo", "hi", "massive", "at 0", "max ratio", r"$d$ all", r"$d$ SW",
                 r"$\Delta$", "lo", "hi"],
        caption=cap + f" Super weights found: {n_sw}.", label="tab:outliers", digits=3))
    files.append(plot(result, out / f"{EXPERIMENT}.png"))
    files.append(write_json(out / f"{EXPERIMENT}.json", result.to_json()))
    return files


def summary(result: protocol.Result) -> str:
    langs = result["languages"]
    sh = ", ".join(f"{l} {result['per_language'][l]['sink_share']:.2f}" for l in langs)
    m = sum(result["per_language"][l]["massive"]["total"] for l in langs)
    cl = result["correlations"]["claim"]
    r = "n/a" if cl["r"] is None else f"{cl['r']:.2f} [{cl['ci'][0]:.2f}, {cl['ci'][1]:.2f}]"
    return (f"sink share {sh}; {m} massive activations; {len(result['super_weights']['weights'])} super weights; "
            f"sinks vs outliers r = {r} ({cl['verdict']})")


def macros(result: protocol.Result) -> MacroSet:
    ms = MacroSet(f"{EXPERIMENT}.json")
    langs = result.get("languages", [])
    th = result.get("thresholds", {})
    ms.add("OutlModel", result.get("model"), "model")
    ms.add("OutlSinkEps", th.get("sink_eps"), "thresholds.sink_eps")
    ms.add("OutlMassiveAbs", th.get("massive_abs"), "thresholds.massive_abs")
    ms.add("OutlMassiveRatio", th.get("massive_ratio"), "thresholds.massive_ratio")
    ms.add("OutlSuperThreshold", th.get("super_threshold"), "thresholds.super_threshold")
    ms.add("OutlLanguages", len(langs), "languages")
    ms.add("OutlLayers", len(result.get("blocks", [])), "blocks")
    ms.add("OutlHeads", result.get("n_heads"), "n_heads")
    shares = []
    for l in langs:
        p = result["per_language"][l]
        ms.add(["OutlSinkShare", l], p["sink_share"], f"per_language[{l}].sink_share")
        ms.add(["OutlSinkShare", l, "Low"], p["sink_share_ci"][0], f"per_language[{l}].sink_share_ci[0]")
        ms.add(["OutlSinkShare", l, "High"], p["sink_share_ci"][1], f"per_language[{l}].sink_share_ci[1]")
        ms.add(["OutlMassive", l], p["massive"]["total"], f"per_language[{l}].massive.total")
        shares.append((p["sink_share"], l))
    if shares:
        ms.add("OutlSinkShareMin", min(shares)[0], "min over languages of sink_share")
        ms.add("OutlSinkShareMinLanguage", min(shares)[1], "argmin")
        ms.add("OutlSinkShareMax", max(shares)[0], "max over languages of sink_share")
        ms.add("OutlSinkShareMaxLanguage", max(shares)[1], "argmax")
        tot = sum(result["per_language"][l]["massive"]["total"] for l in langs)
        first = sum(result["per_language"][l]["massive"]["first_position"] for l in langs)
        ms.add("OutlMassiveTotal", tot, "sum over languages of massive.total")
        ms.add("OutlMassiveFirstPosition", first, "sum over languages of massive.first_position")
        top = max((result["per_language"][l]["top_outlier_ratio"], l) for l in langs)
        ms.add("OutlTopRatio", top[0], "max over languages of top_outlier_ratio")
        ms.add("OutlTopRatioLayer", result["per_language"][top[1]]["top_outlier_layer"],
               f"per_language[{top[1]}].top_outlier_layer")
    sws = result.get("super_weights", {}).get("weights", [])
    ms.add("OutlSuperWeights", len(sws), "super_weights.weights")
    ms.add("OutlSuperWeightsCarrying", sum(1 for w in sws if (w.get("share") or 0) >= 0.5),
           "super weights whose own product carries at least half of their output spike (share >= 0.5)")
    w = max(sws, key=lambda w: abs(w["output_spike"])) if sws else {}   # n/a without super weights
    for key in ("layer", "row", "column", "value"):
        ms.add(["OutlSuperWeight", key], w.get(key), f"super_weights.weights[largest output spike].{key}")
    swp = result.get("super_weight_passes", {})
    for mode in ("restore", "holdout"):
        m = (swp.get("modes") or {}).get(mode)   # absent (n/a) when no super weight was found
        worst = m["worst"] if m else {"diff": None, "ci": [None, None]}
        ms.add(["Outl", mode, "WorstDiff"], worst["diff"], f"super_weight_passes.modes.{mode}.worst.diff")
        ms.add(["Outl", mode, "WorstDiffLow"], worst["ci"][0], f"super_weight_passes.modes.{mode}.worst.ci[0]")
        ms.add(["Outl", mode, "WorstDiffHigh"], worst["ci"][1], f"super_weight_passes.modes.{mode}.worst.ci[1]")
        ms.add(["Outl", mode, "Resolved"],
               sum(bool(e["resolved"]) for e in m["difference"].values()) if m else None,
               f"languages whose {mode} difference is resolved")
        for l in langs:
            ms.add(["Outl", mode, "Diff", l], m["difference"][l]["diff"] if m else None,
                   f"super_weight_passes.modes.{mode}.difference[{l}].diff")
    corr = result.get("correlations", {})
    names = {"sink_share__outlier_ratio": "SinkOutlier", "sink_alpha__outlier_ratio": "AlphaOutlier",
             "sink_share__damage": "SinkDamage", "sink_alpha__damage": "AlphaDamage",
             "outlier_ratio__damage": "OutlierDamage"}
    for key, tag in names.items():
        if key not in corr:
            continue
        for method in ("spearman", "pearson"):
            e = corr[key]["pooled"][method]
            base = ["Outl", tag, method]
            ms.add(base, e["r"], f"correlations.{key}.pooled.{method}.r")
            ms.add([*base, "Low"], e["ci_low"], f"correlations.{key}.pooled.{method}.ci_low")
            ms.add([*base, "High"], e["ci_high"], f"correlations.{key}.pooled.{method}.ci_high")
            ms.add([*base, "Verdict"], e["verdict"], f"correlations.{key}.pooled.{method}.verdict")
    cl = corr.get("claim")
    if cl:
        ms.add("OutlClaimR", cl["r_claimed"], "correlations.claim.r_claimed")
        ms.add("OutlClaimInCi", None if cl["claimed_r_in_ci"] is None else ("yes" if cl["claimed_r_in_ci"] else "no"),
               "correlations.claim.claimed_r_in_ci")
    lc = result.get("sink_vs_damage_across_languages") or {}
    ms.add("OutlSinkLanguageDamageSpearman", lc.get("r"), "sink_vs_damage_across_languages.r")
    ms.add("OutlSinkLanguageDamageSpearmanLow", lc.get("ci_low"), "sink_vs_damage_across_languages.ci_low")
    ms.add("OutlSinkLanguageDamageSpearmanHigh", lc.get("ci_high"), "sink_vs_damage_across_languages.ci_high")
    return ms


main = protocol.entry_point(__name__)


if __name__ == "__main__":
    raise SystemExit(main())
