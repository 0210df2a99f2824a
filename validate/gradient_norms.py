"""Experiment (issue #17, S-008): are the blocks with the largest loss gradients the blocks whose
quantization does the most damage, per language?

``python -m validate.gradient_norms [--quick] [--model M] [--languages ...] [--top-k K] [--out DIR]``
(``--help`` lists every flag with its default)

Measured, per language and decoder block (``empirical.gradients``), with the loss ``L`` = the mean
next-token NLL (nats) of the language's windows (``validate._mechanisms.language_windows``: each
segment alone, BOS first; ``--grad-segments`` keeps only the first ones, since the backward pass
through Gemma's 262k-word output layer is where the run's time goes), one backward pass per
language (accumulated over its windows, which is
exactly the gradient of ``L``):

* ``weight``: ``sqrt(sum ||dL/dW||_F^2)`` over the block's Linear weights (per Linear in the JSON);
* ``output_rms``: ``sqrt(mean_t ||dL/dh_t||^2)``, the RMS over tokens of the gradient norm with
  respect to the block's output hidden state, over the positions that are neither BOS nor the last
  of a window (``output_fro``, the Frobenius norm over all positions, is in the JSON too);
* ``taylor`` ``= |sum <dL/dW, Q(W) - W>|`` and ``fisher`` ``= sum (dL/dW * (Q(W) - W))^2`` over the
  block's weights, with ``Q`` the config's quantizer (``empirical.fakequant``): gradient times
  quantization error, first-order proxies of the damage.

Against the measured criticality (``validate._mechanisms.block_damage``: each block's single-block
quantization damage per language, KL estimator): per language, Spearman over blocks of each
statistic with that language's damage, with a percentile-bootstrap interval over blocks; pooled
over languages, the bootstrap resampling whole blocks; and the overlap of the top ``--top-k``
blocks by the statistic (mean over languages) with the top of the measured ranking.

Outputs under ``--out`` (default ``results/gradient_norms``): ``gradient_norms.json`` (provenance,
every number and correlation with its interval), ``gradient_norms.csv`` (one row per language and
block), ``gradient_norms_table.tex`` (correlations per statistic) and ``gradient_norms.png``
(statistics and damage per block). Each language's gradients are cached, so a rerun makes no
forward or backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from validate import _mechanisms as mech
from validate import _protocol as protocol
from validate._common import ResultCache, save_figure, use_agg, write_csv, write_json
from validate._latex import MacroSet, tex_text, write_latex_table

EXPERIMENT = "gradient_norms"
#: The grids ``--executor ray`` distributes (validate._executor).
EXECUTOR_GRIDS = "one backward pass per language"
GRAD_VERSION = 2
STATISTICS = ("weight", "output_rms", "taylor", "fisher")
_LABELS = {"weight": "weight-gradient norm", "output_rms": "output-gradient RMS",
           "taylor": "|gradient . quantization error|", "fisher": "sum (gradient x error)^2"}


@dataclass(frozen=True)
class Config(mech.MechanismConfig):
    top_k: int = protocol.param(3, "size of the top sets compared with the measured criticality ranking")
    grad_segments: int | None = protocol.param(None, "windows per language in the loss whose gradient is taken "
                                               "(the first ones; none: all --segments)")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise protocol.ConfigError(f"--top-k must be an integer >= 1, got {self.top_k!r}")
        protocol.check_positive("grad_segments", self.grad_segments, optional=True)


def _errors(fq, lins) -> dict:
    return {q.name: fq.quantized_weight(q.name) - q.weight.detach() for b in lins for q in b}


class LanguageGradients:
    """Each language's cached gradient statistics (one backward pass per window), computed where
    the cache lacks them; ``run`` and the remote worker (:func:`gradient_worker`) both use it, so that they
    build identical cache keys."""

    def __init__(self, c: Config, s: mech.Setup, cache):
        from empirical.fakequant import FakeQuantizer

        self.c, self.s, self.cache = c, s, cache
        self.lins = s.block_linears()
        self.fq = FakeQuantizer([q for b in self.lins for q in b], c.quant_config(), seed=c.seed)
        self._windows = self._errors = None
        self.passes = 0   # backward passes (windows) computed here

    def key(self, lang: str) -> dict:
        c = self.c
        return {**self.s.key, "language": lang, "quant": c.quant_config().key(), "grad_segments": c.grad_segments,
                "grad_version": GRAD_VERSION, "what": "gradient_norms"}

    def task(self, lang: str):
        from validate._executor import Task

        return Task(f"gradients {lang}", self.key(lang), {"language": lang})

    def get(self, lang: str) -> dict:
        """The language's item: read from the cache, else computed and cached."""
        from empirical.gradients import language_gradients

        key = self.key(lang)
        item = self.cache.get(key) if self.cache is not None else None
        if item is None:
            if self._windows is None:
                self._windows, self._errors = self.s.windows(), _errors(self.fq, self.lins)
            ws = self._windows[lang][: self.c.grad_segments]
            item = {**language_gradients(self.s.model, self.s.view.blocks, self.lins, ws, self._errors).to_json(),
                    "windows": len(ws)}
            self.passes += len(ws)
            if self.cache is not None:
                self.cache.put(key, item)
        return item


def gradient_worker(c: Config, folder: str | None = None):
    """The remote worker of the per-language gradients (``validate._executor.WorkerSpec``): loads the
    model of ``c`` once; the payload ``{"language": l}`` computes that language's item
    (``validate._mechanisms.LanguageWorker``)."""
    from validate._executor import RecordingCache

    return mech.LanguageWorker(LanguageGradients(c, mech.worker_setup(c), RecordingCache(read_from=folder)))


def prefetch(grads: LanguageGradients, langs, cache) -> int:
    """Hand the languages' gradients to the current executor ahead of reading them (a Ray
    executor computes the uncached ones on its workers and writes them into ``cache``; in process
    nothing happens). Returns the backward passes (windows) those workers ran."""
    from validate._executor import WorkerSpec, current

    ex = current()
    if not ex.prefetches or not langs:
        return 0
    todo = [l for l in langs if cache is None or cache.get(grads.key(l)) is None]
    folder = None if cache is None or cache.folder is None else str(cache.folder)
    spec = WorkerSpec(f"{__name__}:gradient_worker", (grads.c, folder), device=grads.c.device)
    ex.map(spec, [grads.task(l) for l in todo], cache=cache)
    return sum(int(cache.get(grads.key(l))["windows"]) for l in todo)


def run(config: Config, cache: ResultCache | None = None) -> protocol.Result:
    c = config
    s = mech.setup(c)
    names, langs = s.block_names, s.languages
    grads = LanguageGradients(c, s, cache)
    remote = prefetch(grads, langs, cache)
    per_lang = {lang: grads.get(lang) for lang in protocol.progress(langs, desc="gradients", unit="language")}
    passes = grads.passes + remote
    used = {l: int(per_lang[l]["windows"]) for l in langs}
    dmg = mech.block_damage(s, cache)
    damage_metric = "kl" if dmg.kl is not None else "bpb"
    D = dmg.metric(damage_metric)                                      # [lang, block]
    ranking = dmg.ranking(damage_metric)
    k = min(c.top_k, len(names))
    top_measured = ranking[:k]
    groups = [b for _ in langs for b in names]
    boot = dict(n_boot=c.bootstrap, seed=c.seed)
    stats_out = {}
    for st in STATISTICS:
        X = np.array([per_lang[l][st] for l in langs], dtype=float)  # [lang, block]
        per = {l: mech.correlation_ci(X[i], D[i], **boot) for i, l in enumerate(langs)}
        pooled = mech.correlation_ci(X.ravel(), D.ravel(), groups=groups, **boot)
        for v in [*per.values(), pooled]:
            v["verdict"] = mech.resolved(v)
        order = [int(i) for i in np.argsort(-X.mean(axis=0), kind="stable")]
        overlap = len(set(order[:k]) & set(top_measured))
        per_lang_overlap = {l: len(set(np.argsort(-X[i], kind="stable")[:k].tolist())
                                   & set(np.argsort(-D[i], kind="stable")[:k].tolist()))
                            for i, l in enumerate(langs)}
        stats_out[st] = {"per_language": per, "pooled": pooled, "ranking": [names[i] for i in order],
                         "top_k": [names[i] for i in order[:k]], "top_k_overlap": overlap,
                         "top_k_overlap_per_language": per_lang_overlap,
                         "median_spearman_per_language": float(np.median([v["r"] for v in per.values()
                                                                          if v["r"] is not None]))
                         if any(v["r"] is not None for v in per.values()) else None}
    data = {
        "model": c.model, "blocks": names, "languages": langs, "top_k": k,
        "loss": "mean next-token NLL (nats) per language; one backward per window, accumulated",
        "output_rms_positions": "every position except BOS and the last of each window",
        "per_language": per_lang,
        "damage_metric": damage_metric,
        "measured_ranking": [names[i] for i in ranking],
        "measured_top_k": [names[i] for i in top_measured],
        "statistics": stats_out,
        "block_damage": dmg.to_json(),
        "windows_used": used,
        "passes": {"gradient_windows_run": passes, "block_damage_passes_run": dmg.passes_run},
    }
    return protocol.Result(EXPERIMENT, c, data, timing={"forward_passes_run": passes + dmg.passes_run,
                                                        "backward_passes_run": passes})


def write(result: protocol.Result, out: Path) -> list[Path]:
    use_agg()
    import matplotlib.pyplot as plt

    res = result
    langs, blocks = res["languages"], res["blocks"]
    D = np.array(res["block_damage"]["kl"] if res["damage_metric"] == "kl" else res["block_damage"]["bpb"])
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for li, l in enumerate(langs):
        it = res["per_language"][l]
        for bi, b in enumerate(blocks):
            rows.append({"language": l, "block": b, "damage": D[li, bi],
                         **{st: (it[st][bi] if it.get(st) is not None else None) for st in STATISTICS},
                         "output_fro": it["output_fro"][bi]})
    files = [write_csv(out / f"{EXPERIMENT}.csv", rows, ["language", "block", "damage", *STATISTICS, "output_fro"])]
    trows = []
    for st in STATISTICS:
        v = res["statistics"][st]
        p = v["pooled"]
        trows.append({"statistic": _LABELS[st], "median_r": v["median_spearman_per_language"],
                      "pooled_r": p["r"], "low": p["ci_low"], "high": p["ci_high"],
                      "overlap": f"{v['top_k_overlap']}/{res['top_k']}"})
    files.append(write_latex_table(
        out / f"{EXPERIMENT}_table.tex", trows, ["statistic", "median_r", "pooled_r", "low", "high", "overlap"],
        headers=["statistic", "median $\\rho$ per language", "pooled $\\rho$", "95\\% CI low", "high",
                 "top-$k$ overlap"],
        caption=(f"Loss-gradient magnitude per block against each block's measured single-block quantization "
                 f"damage ({tex_text(res.config_dict.get('model', ''))}): Spearman $\\rho$ over blocks, the "
                 "median over languages and pooled over languages (bootstrap over blocks), and how many of "
                 "the top blocks by the statistic are among the measured top."),
        label="tab:gradient-norms", digits=3))
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    x = np.arange(len(blocks))
    for li, l in enumerate(langs):
        it = res["per_language"][l]
        ax[0].plot(x, it["weight"], "o-", ms=3, label=l)
        ax[1].plot(x, it["output_rms"], "o-", ms=3, label=l)
        ax[2].plot(x, D[li], "o-", ms=3, label=l)
    for a, t in zip(ax, ("||dL/dW||_F per block", "RMS_t ||dL/dh_t|| per block",
                         f"single-block damage ({res['damage_metric']})")):
        a.set_title(t)
        a.set_xlabel("block")
        a.set_yscale("log")
    ax[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    files.append(save_figure(fig, out / f"{EXPERIMENT}.png"))
    plt.close(fig)
    files.append(write_json(out / f"{EXPERIMENT}.json", result.to_json()))
    return files


def summary(result: protocol.Result) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    parts = []
    for st in ("weight", "output_rms"):
        p = result["statistics"][st]["pooled"]
        parts.append(f"{st} vs damage pooled Spearman {f(p['r'])} [{f(p['ci_low'])}, {f(p['ci_high'])}], "
                     f"top-{result['top_k']} overlap {result['statistics'][st]['top_k_overlap']}")
    return "; ".join(parts)


_STAT_NAMES = {"weight": "Weight", "output_rms": "Output", "taylor": "Taylor", "fisher": "Fisher"}


def macros(result: protocol.Result) -> MacroSet:
    ms = MacroSet(f"{EXPERIMENT}.json")
    cfg = result.config_dict
    ms.add("GradModel", cfg.get("model"), "provenance.config.model")
    ms.add("GradLanguages", len(result.get("languages", [])), "languages")
    ms.add("GradBlocks", len(result.get("blocks", [])), "blocks")
    ms.add("GradTopK", result.get("top_k"), "top_k")
    used = list((result.get("windows_used") or {}).values())
    ms.add("GradWindowsMin", min(used) if used else None, "min of windows_used")
    ms.add("GradWindowsMax", max(used) if used else None, "max of windows_used")
    ms.add("GradDamageMetric", {"kl": "KL", "bpb": "bits-per-byte"}.get(result.get("damage_metric")),
           "damage_metric")
    top = result.get("measured_top_k") or []
    ms.add("GradMeasuredTop", ", ".join(top) if top else None, "measured_top_k")
    for st, nm in _STAT_NAMES.items():
        v = (result.get("statistics") or {}).get(st) or {}
        p = v.get("pooled") or {}
        ms.add(["Grad", nm, "PooledR"], p.get("r"), f"statistics.{st}.pooled.r")
        ms.add(["Grad", nm, "PooledLow"], p.get("ci_low"), f"statistics.{st}.pooled.ci_low")
        ms.add(["Grad", nm, "PooledHigh"], p.get("ci_high"), f"statistics.{st}.pooled.ci_high")
        ms.add(["Grad", nm, "Verdict"], mech.resolved(p), f"statistics.{st}.pooled (interval vs 0)")
        ms.add(["Grad", nm, "MedianR"], v.get("median_spearman_per_language"),
               f"statistics.{st}.median_spearman_per_language")
        ms.add(["Grad", nm, "Overlap"], v.get("top_k_overlap"), f"statistics.{st}.top_k_overlap")
        resolved_langs = [l for l, c in (v.get("per_language") or {}).items() if mech.resolved(c) == "positive"]
        ms.add(["Grad", nm, "PositiveLanguages"], len(resolved_langs),
               f"statistics.{st}.per_language (intervals above 0)")
        tk = v.get("top_k") or []
        ms.add(["Grad", nm, "Top"], ", ".join(tk) if tk else None, f"statistics.{st}.top_k")
    return ms


main = protocol.entry_point(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
