"""Experiment (issue #17, S-006): how far quantization moves each block's output distribution,
per language, and whether the languages (and blocks) whose activations move more are the ones
that lose more.

``python -m validate.distribution_shift [--quick] [--model M] [--languages ...] [--bins B] [--eps E] [--out DIR]``
(``--help`` lists every flag with its default)

Measured, per language and decoder block (``empirical.shift``): the block's output hidden states
(forward hook on the block: the residual stream after it, before the final norm) over the
language's windows (``validate._mechanisms.language_windows``: each segment alone, BOS first, no
padding; ``--shift-segments`` keeps only the first ones), at every position except BOS
(dropped: its state is the same for every language and holds the attention sink's massive
activations) and every hidden dimension, pooled into one sample, once from the baseline and once with every block Linear fake-quantized (the config's
bits, grid, granularity and clipping; ``empirical.fakequant.FakeQuantizer``). Then

* ``KL(P_base || P_quant)`` in bits between the two histograms on ``--bins`` bins whose interior
  edges are the baseline's quantiles ``j / B`` (outer bins open), with ``--eps`` added to every
  count;
* the moment shifts, quantized minus baseline: mean, std, skewness, excess kurtosis, max |x|
  (population moments in float64), and the baseline's own moments.

Related to damage:

* across languages: each language's degradation with every block quantized (KL estimator,
  ``validate._passes.degradations``; the same cached scored passes as
  ``validate._mechanisms.block_damage``) against the last block's KL and against the mean over
  blocks; Spearman with a percentile-bootstrap interval over languages (with eight languages the
  interval is wide);
* across blocks: each (language, block)'s KL against that block's single-block damage
  (``block_damage``), pooled over languages, the bootstrap resampling whole blocks; and the
  baseline's excess kurtosis against the same damage (the claim that critical layers have extreme
  kurtosis).

Outputs under ``--out`` (default ``results/distribution_shift``): ``distribution_shift.json``
(provenance, every number, every correlation with its interval), ``distribution_shift.csv`` (one
row per language and block), ``distribution_shift_table.tex`` (per language) and
``distribution_shift.png`` (KL per block and language; damage against the last block's KL).
Each language's captures are cached, so a rerun makes no forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from validate import _mechanisms as mech
from validate import _protocol as protocol
from validate._common import ResultCache, save_figure, use_agg, write_csv, write_json
from validate._latex import MacroSet, tex_text, write_latex_table

EXPERIMENT = "distribution_shift"
#: The grids ``--executor ray`` distributes (validate._executor).
EXECUTOR_GRIDS = "the two activation captures of each language"
SHIFT_VERSION = 1


@dataclass(frozen=True)
class Config(mech.MechanismConfig):
    bins: int = protocol.param(100, "histogram bins (interior edges at the baseline's quantiles j/B)")
    eps: float = protocol.param(0.5, "pseudo-count added to every histogram bin before the KL")
    shift_segments: int | None = protocol.param(None, "windows per language whose activations are compared "
                                                "(the first ones; none: all --segments)")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 2:
            raise protocol.ConfigError(f"--bins must be an integer >= 2, got {self.bins!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) \
                or not math.isfinite(self.eps) or self.eps <= 0:
            raise protocol.ConfigError(f"--eps must be a finite number > 0, got {self.eps!r}")
        protocol.check_positive("shift_segments", self.shift_segments, optional=True)


def language_shift(s: mech.Setup, fq, windows, bins: int, eps: float) -> dict[str, Any]:
    """Per block of one language: the histogram KL (bits), the baseline's moments and the moment
    shifts (module docstring). Two captures of the language's windows (baseline, quantized)."""
    from empirical.shift import capture_block_outputs, histogram_counts, histogram_kl, moment_shift, moments, \
        quantile_edges

    blocks = s.view.blocks
    base = capture_block_outputs(s.model, blocks, windows)
    edges, counts, mb = [], [], []
    for x in base:
        e = quantile_edges(x, bins)
        edges.append(e)
        counts.append(histogram_counts(x, e))
        mb.append(moments(x))
    n_values = int(base[0].size)
    del base
    with fq.quantized():
        quant = capture_block_outputs(s.model, blocks, windows)
    kl, shifts, mq = [], [], []
    for i, y in enumerate(quant):
        kl.append(histogram_kl(counts[i], histogram_counts(y, edges[i]), eps))
        m = moments(y)
        mq.append(m)
        shifts.append(moment_shift(mb[i], m))
    return {"kl_bits": kl, "baseline_moments": mb, "quantized_moments": mq, "moment_shift": shifts,
            "bins_used": [int(len(e) + 1) for e in edges], "values_per_block": n_values,
            "positions": int(sum(max(w.shape[1] - 1, 0) for w in windows))}


def all_quantized_damage(s: mech.Setup, cache: ResultCache | None) -> tuple[dict, int]:
    """Each language's degradation with every block quantized, ``({metric: {language: d_l}},
    passes run)``, from the scored passes ``block_damage`` shares (``validate._mechanisms.block_passes``:
    same engine, cache and key, so the baseline is not scored again)."""
    from validate._passes import degradations

    passes = mech.block_passes(s, cache)
    before = passes.run_count
    passes.prefetch([[], list(range(s.n_blocks))])   # on Ray workers (in process: nothing ahead)
    base = passes.scores([])
    deg = degradations(passes.scores(range(s.n_blocks)), base)
    return deg, passes.run_count - before


class LanguageShifts:
    """Each language's cached activation shift (two captures of its windows), computed where the
    cache lacks it; ``run`` and the remote worker (:func:`shift_worker`) both use it, so that they build
    identical cache keys."""

    def __init__(self, c: Config, s: mech.Setup, cache):
        from empirical.fakequant import FakeQuantizer

        self.c, self.s, self.cache = c, s, cache
        lins = s.block_linears()
        self.fq = FakeQuantizer([q for b in lins for q in b], c.quant_config(), seed=c.seed)
        self.windows = s.windows()
        self.passes = 0   # forward passes computed here

    def _windows(self, lang: str) -> list:
        return self.windows[lang][: self.c.shift_segments]

    def key(self, lang: str) -> dict:
        c = self.c
        return {**self.s.key, "language": lang, "quant": c.quant_config().key(), "bins": c.bins,
                "eps": float(c.eps), "windows": len(self._windows(lang)), "shift_version": SHIFT_VERSION,
                "what": "distribution_shift"}

    def task(self, lang: str):
        from validate._executor import Task

        return Task(f"activation shift {lang}", self.key(lang), {"language": lang})

    def get(self, lang: str) -> dict:
        """The language's item: read from the cache, else computed and cached."""
        key = self.key(lang)
        item = self.cache.get(key) if self.cache is not None else None
        if item is None:
            ws = self._windows(lang)
            item = language_shift(self.s, self.fq, ws, self.c.bins, float(self.c.eps))
            self.passes += 2 * len(ws)
            if self.cache is not None:
                self.cache.put(key, item)
        return item

    def prefetch(self, langs) -> int:
        """Hand the languages' items to the current executor ahead of reading them (a Ray executor
        computes the uncached ones on its workers and writes them into the cache; in process
        nothing happens). Returns the forward passes those workers ran."""
        from validate._executor import WorkerSpec, current

        ex = current()
        if not ex.prefetches or not langs:
            return 0
        cache = self.cache
        todo = [l for l in langs if cache is None or cache.get(self.key(l)) is None]
        folder = None if cache is None or cache.folder is None else str(cache.folder)
        spec = WorkerSpec(f"{__name__}:shift_worker", (self.c, folder), device=self.c.device)
        ex.map(spec, [self.task(l) for l in todo], cache=cache)
        return sum(2 * len(self._windows(l)) for l in todo)


def shift_worker(c: Config, folder: str | None = None):
    """The remote worker of the per-language activation shift (``validate._executor.WorkerSpec``):
    loads the model of ``c`` once; the payload ``{"language": l}`` computes that language's item
    (``validate._mechanisms.LanguageWorker``)."""
    from validate._executor import RecordingCache

    return mech.LanguageWorker(LanguageShifts(c, mech.worker_setup(c), RecordingCache(read_from=folder)))


def run(config: Config, cache: ResultCache | None = None) -> protocol.Result:
    c = config
    s = mech.setup(c)
    shifts = LanguageShifts(c, s, cache)
    windows = shifts.windows
    names, langs = s.block_names, s.languages
    remote = shifts.prefetch(langs)
    per_lang = {lang: shifts.get(lang)
                for lang in protocol.progress(langs, desc="activation shift", unit="language")}
    passes = shifts.passes + remote
    dmg = mech.block_damage(s, cache)
    deg, damage_passes = all_quantized_damage(s, cache)
    metric = "kl" if "kl" in deg else "bpb"
    d_all = deg[metric]
    kl = np.array([per_lang[l]["kl_bits"] for l in langs])                     # [lang, block]
    kurt = np.array([[m["excess_kurtosis"] for m in per_lang[l]["baseline_moments"]] for l in langs])
    single = dmg.metric("kl" if dmg.kl is not None else "bpb")                 # [lang, block]
    groups = [b for _ in langs for b in names]
    boot = dict(n_boot=c.bootstrap, seed=c.seed)
    corr = {
        "language_damage_vs_last_block_kl": mech.correlation_ci([d_all[l] for l in langs], kl[:, -1], **boot),
        "language_damage_vs_mean_block_kl": mech.correlation_ci([d_all[l] for l in langs], kl.mean(axis=1), **boot),
        "block_damage_vs_kl_pooled": mech.correlation_ci(kl.ravel(), single.ravel(), groups=groups, **boot),
        "block_damage_vs_mean_kl": mech.correlation_ci(kl.mean(axis=0), single.mean(axis=0), **boot),
        "block_damage_vs_baseline_kurtosis_pooled": mech.correlation_ci(kurt.ravel(), single.ravel(),
                                                                         groups=groups, **boot),
    }
    for v in corr.values():
        v["verdict"] = mech.resolved(v)
    by_block_kl = kl.mean(axis=0)
    data = {
        "model": c.model, "blocks": names, "languages": langs,
        "histogram": {"bins": c.bins, "edges": "baseline quantiles j/B, outer bins open", "eps": float(c.eps),
                      "kl": "KL(P_base || P_quant), bits", "bos": "dropped (position 0 of every window)"},
        "per_language": per_lang,
        "kl_bits": kl.tolist(),
        "language_damage": {"metric": metric, "values": d_all, "other": {k: v for k, v in deg.items() if k != metric}},
        "block_damage": dmg.to_json(),
        "correlations": corr,
        "largest_kl_block": names[int(np.argmax(by_block_kl))],
        "largest_last_kl_language": langs[int(np.argmax(kl[:, -1]))],
        "most_damaged_language": max(langs, key=lambda l: d_all[l]),
        "windows_used": {l: int(sum(1 for w in windows[l][: c.shift_segments])) for l in langs},
        "passes": {"capture_passes_run": passes, "block_damage_passes_run": dmg.passes_run,
                   "all_quantized_passes_run": damage_passes},
    }
    return protocol.Result(EXPERIMENT, c, data,
                           timing={"forward_passes_run": passes + dmg.passes_run + damage_passes})


def _rows(res) -> list[dict]:
    rows = []
    for li, l in enumerate(res["languages"]):
        it = res["per_language"][l]
        for bi, b in enumerate(res["blocks"]):
            m, sh = it["baseline_moments"][bi], it["moment_shift"][bi]
            rows.append({"language": l, "block": b, "kl_bits": it["kl_bits"][bi],
                         "single_block_damage": (res["block_damage"].get("kl") or res["block_damage"]["bpb"])[li][bi],
                         **{f"base_{k}": v for k, v in m.items()}, **{f"shift_{k}": v for k, v in sh.items()}})
    return rows


def write(result: protocol.Result, out: Path) -> list[Path]:
    use_agg()
    import matplotlib.pyplot as plt

    from empirical.shift import MOMENTS

    res = result
    langs, blocks = res["languages"], res["blocks"]
    out.mkdir(parents=True, exist_ok=True)
    files = [write_csv(out / f"{EXPERIMENT}.csv", _rows(res),
                       ["language", "block", "kl_bits", "single_block_damage", *[f"base_{k}" for k in MOMENTS],
                        *[f"shift_{k}" for k in MOMENTS]])]
    d = res["language_damage"]["values"]
    trows = []
    for l in langs:
        it = res["per_language"][l]
        trows.append({"language": l, "damage": d[l], "kl_last": it["kl_bits"][-1],
                      "kl_mean": float(np.mean(it["kl_bits"])), "std_shift": it["moment_shift"][-1]["std"],
                      "kurt_shift": it["moment_shift"][-1]["excess_kurtosis"]})
    files.append(write_latex_table(
        out / f"{EXPERIMENT}_table.tex", trows, ["language", "damage", "kl_last", "kl_mean", "std_shift", "kurt_shift"],
        headers=["language", "$d_\\ell$ (all blocks)", "KL last block", "KL mean", "$\\Delta$std last",
                 "$\\Delta$kurt.\\ last"],
        caption=(f"Activation shift under quantization ({tex_text(res.config_dict.get('model', ''))}): "
                 "each language's degradation with every block quantized, the KL divergence (bits) between "
                 "the baseline's and the quantized model's histograms of block-output activations (last "
                 "block and mean over blocks), and the last block's shift of standard deviation and excess "
                 "kurtosis (quantized minus baseline)."),
        label="tab:distribution-shift", digits=3))
    kl = np.array(res["kl_bits"])
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(blocks))
    for li, l in enumerate(langs):
        ax[0].plot(x, kl[li], "o-", ms=3, label=l)
    ax[0].set_xlabel("block")
    ax[0].set_ylabel("KL(P_base || P_quant), bits")
    ax[0].set_yscale("log")
    ax[0].legend(fontsize=7, ncol=2)
    ax[0].set_title("activation-histogram shift per block")
    c = res["correlations"]["language_damage_vs_last_block_kl"]
    ax[1].scatter(kl[:, -1], [d[l] for l in langs])
    for li, l in enumerate(langs):
        ax[1].annotate(l, (kl[li, -1], d[l]), fontsize=8)
    ax[1].set_xlabel("KL of the last block's output, bits")
    ax[1].set_ylabel(f"degradation, all blocks quantized ({res['language_damage']['metric']})")
    r = c.get("r")
    ax[1].set_title("Spearman " + ("n/a" if r is None else
                                  f"{r:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]" if c.get("ci_low") is not None
                                  else f"{r:.2f}"))
    fig.tight_layout()
    files.append(save_figure(fig, out / f"{EXPERIMENT}.png"))
    plt.close(fig)
    files.append(write_json(out / f"{EXPERIMENT}.json", result.to_json()))
    return files


def summary(result: protocol.Result) -> str:
    c = result["correlations"]["language_damage_vs_last_block_kl"]
    p = result["correlations"]["block_damage_vs_kl_pooled"]
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"damage vs last-block KL across languages: Spearman {f(c['r'])} [{f(c['ci_low'])}, {f(c['ci_high'])}]; "
            f"single-block damage vs KL pooled: {f(p['r'])} [{f(p['ci_low'])}, {f(p['ci_high'])}]")


_CORR = (("LangLast", "language_damage_vs_last_block_kl"), ("LangMean", "language_damage_vs_mean_block_kl"),
         ("BlockPooled", "block_damage_vs_kl_pooled"), ("BlockMean", "block_damage_vs_mean_kl"),
         ("Kurtosis", "block_damage_vs_baseline_kurtosis_pooled"))


def macros(result: protocol.Result) -> MacroSet:
    ms = MacroSet(f"{EXPERIMENT}.json")
    cfg = result.config_dict
    ms.add("ShiftModel", cfg.get("model"), "provenance.config.model")
    ms.add("ShiftBins", cfg.get("bins"), "provenance.config.bins")
    ms.add("ShiftEps", cfg.get("eps"), "provenance.config.eps")
    used = list((result.get("windows_used") or {}).values())
    ms.add("ShiftWindowsMin", min(used) if used else None, "min of windows_used")
    ms.add("ShiftWindowsMax", max(used) if used else None, "max of windows_used")
    ms.add("ShiftLanguages", len(result.get("languages", [])), "languages")
    ms.add("ShiftBlocks", len(result.get("blocks", [])), "blocks")
    for name, key in _CORR:
        v = (result.get("correlations") or {}).get(key, {})
        ms.add(["Shift", name, "R"], v.get("r"), f"correlations.{key}.r")
        ms.add(["Shift", name, "Low"], v.get("ci_low"), f"correlations.{key}.ci_low")
        ms.add(["Shift", name, "High"], v.get("ci_high"), f"correlations.{key}.ci_high")
        ms.add(["Shift", name, "Verdict"], mech.resolved(v), f"correlations.{key} (interval vs 0)")
    ms.add("ShiftLargestBlock", result.get("largest_kl_block"), "largest_kl_block")
    ms.add("ShiftLargestLanguage", result.get("largest_last_kl_language"), "largest_last_kl_language")
    ms.add("ShiftMostDamagedLanguage", result.get("most_damaged_language"), "most_damaged_language")
    kl = np.array(result.get("kl_bits") or [[np.nan]], dtype=float)
    ms.add("ShiftLastKLMax", float(np.nanmax(kl[:, -1])), "max over languages of kl_bits[.][-1]")
    ms.add("ShiftLastKLMin", float(np.nanmin(kl[:, -1])), "min over languages of kl_bits[.][-1]")
    return ms


main = protocol.entry_point(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
