"""Experiment (issue #17, S-004): how much does each decoder block's residual update matter, per
language, and is that what makes a block's quantization damaging?

``python -m validate.residual_ablation [--quick] [--modes mean zero] [--model M] [--out DIR]``
(``--help`` lists every flag with its default)

For every decoder block ``b`` and language ``l``, the block's residual update ``u = f(h) - h``
(``empirical.ablation``) is replaced in one scoring pass by

* its **mean** (``mean`` ablation): a fixed vector measured in a first full-precision pass over
  every language's segment windows (each starting with BOS, truncated to ``--max-length``) with
  one mean for the BOS position (position 0 of a window) and one over every other position: the
  BOS update is orders of magnitude larger, so a single mean would shift text positions by a
  share of it; and by
* **zero** (``zero`` ablation): the block is skipped, output = input.

Scoring is the project's bits per byte (``empirical.bpb.BpbEngine``: total NLL / ln 2 / UTF-8
bytes per language), replayed from the recorded residual stream entering block ``b`` (the hook acts
during the replay, blocks before ``b`` are unchanged). Positions 0 of the engine's windows get the
BOS mean; a segment longer than ``--max-length`` tokens is scored in sliding windows whose position
0 is a context token, and these get the BOS mean too (their count is reported,
``split_segments``). Per language, block and mode the result holds the ablated bits per byte,
``delta_bpb`` (ablated minus baseline) with a 95% percentile bootstrap interval over segments
(the same resampled segment ids for every block and mode, and for every language with as many
segments), the relative damage ``nll_ablated / nll_baseline - 1`` (the ratio of bits per byte
minus one, the scale of ``empirical.disparity.degradation``) and the KL bits per byte from the
baseline's next-token distributions.

Relation to quantization: ``validate._mechanisms.block_damage`` gives each block's single-block
``--bits``-bit damage per language (``--damage-metric``: KL or bpb estimator). Reported, with
bootstrap intervals (``correlation_ci``): the Spearman correlation between the ablation damage
and the quantization damage over blocks, per language (pairs resampled) and pooled over
languages (whole blocks resampled); the blocks whose ablation matters most per language; and
whether the ranking differs across languages: the mean and the smallest pairwise Spearman
correlation between languages' ablation profiles, with intervals from resampling segments.

Outputs under ``--out`` (default ``results/residual_ablation``): ``residual_ablation.json``
(provenance, every number, every correlation with its interval), ``residual_ablation.csv`` (one row
per language, block and mode), ``residual_ablation_table.tex`` (per block: ablation damage per
language and the quantization damage) and ``residual_ablation.png`` (ablation damage per block and
language, and against the quantization damage). Forward passes are cached per block and mode, so
a rerun computes none. With ``--executor ray [--workers N]`` the quantized and ablation passes run
on Ray workers (``validate._executor``), with the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from validate import _protocol as protocol
from validate._common import ResultCache, save_figure, use_agg, write_csv, write_json
from validate._latex import MacroSet, Tex, tex_text, write_latex_table
from validate._mechanisms import MechanismConfig, block_damage, correlation_ci, resolved, setup

EXPERIMENT = "residual_ablation"
ABLATION_VERSION = 1
MODES = ("mean", "zero")
#: The grids ``--executor ray`` distributes (validate._executor).
EXECUTOR_GRIDS = "the baseline and single-block quantized passes; the baseline and every block's ablation passes"


@dataclass(frozen=True)
class Config(MechanismConfig):
    modes: tuple[str, ...] = protocol.param(MODES, "ablations: mean (update -> its mean, BOS apart) and/or "
                                            "zero (block skipped)", choices=MODES)
    damage_metric: str = protocol.param("kl", "estimator of the single-block quantization damage related to",
                                        choices=("kl", "bpb"))
    top: int = protocol.param(3, "blocks listed as the most important per language")

    def __post_init__(self):
        super().__post_init__()
        modes = tuple(self.modes)
        if not modes:
            raise protocol.ConfigError("--modes: give at least one of mean, zero")
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise protocol.ConfigError(f"--modes: unknown ablation {bad[0]!r}; expected mean and/or zero")
        if len(set(modes)) != len(modes):
            raise protocol.ConfigError(f"--modes: {modes} names an ablation twice")
        if self.damage_metric not in ("kl", "bpb"):
            raise protocol.ConfigError(f"--damage-metric must be kl or bpb, got {self.damage_metric!r}")
        protocol.check_positive("top", self.top)
        protocol.frozen_set(self, modes=modes)


# ---- measuring ------------------------------------------------------------------------------------

class _Passes:
    """Cached scoring passes; the model and engine are touched only for a missing item.

    ``spec`` (``validate._executor.WorkerSpec``) says how a remote worker builds these same
    passes (:func:`ablation_worker`); :meth:`prefetch` hands the baseline and ablation passes to
    the current executor."""

    def __init__(self, s, cache: ResultCache | None, key: dict, spec=None):
        self.s, self.cache, self.key, self.run_count = s, cache, key, 0
        self.spec = spec
        self._engine = None
        self._means = None

    def _get(self, item: dict, compute):
        k = {**self.key, **item}
        got = self.cache.get(k) if self.cache is not None else None
        if got is None:
            got = compute()
            if self.cache is not None:
                self.cache.put(k, got)
        return got

    def engine(self):
        if self._engine is None:
            from empirical.bpb import BpbEngine

            c, s = self.s.config, self.s
            self._engine = BpbEngine(s.model, s.tokenizer, {l: s.corpus[l] for l in s.languages},
                                     max_length=c.max_length, device=c.device)
            self._record_nll = self._engine.record()
            self.run_count += 1
        return self._engine

    def means(self):
        from empirical.ablation import UpdateMeans, update_means

        def compute():
            wins = self.s.windows()
            self.run_count += 1
            return update_means(self.s.model, [w for l in self.s.languages for w in wins[l]]).to_json()

        if self._means is None:  # a worker asks once per mean-ablation task
            self._means = UpdateMeans.from_json(self._get({"item": "means"}, compute))
        return self._means

    def baseline(self):
        def compute():
            e = self.engine()
            nll = self._record_nll
            tok = self.s.tokenizer
            split = {l: int(sum(len(ids) + 1 > self.s.config.max_length for ids in
                                tok(list(self.s.corpus[l]), add_special_tokens=False)["input_ids"]))
                     for l in self.s.languages}
            return {"nll": {l: v.tolist() for l, v in nll.items()},
                    "tokens": {l: v.tolist() for l, v in e.tokens.items()}, "split_segments": split}

        return self._get({"item": "baseline"}, compute)

    def ablation(self, block: int, mode: str, means):
        from empirical.ablation import ablate_block

        def compute():
            e = self.engine()
            with ablate_block(self.s.model, block, mode, means if mode == "mean" else None):
                sc = e.score(start_block=block)
            self.run_count += 1
            return {"nll": {l: v.tolist() for l, v in sc.nll.items()},
                    "kl": None if sc.kl is None else {l: v.tolist() for l, v in sc.kl.items()}}

        return self._get({"item": "ablation", "block": int(block), "mode": mode}, compute)

    def task(self, item: dict):
        """The executor task (``validate._executor.Task``) of the baseline (``{"item":
        "baseline"}``) or of one ablation (``{"item": "ablation", "block": b, "mode": m}``)."""
        from validate._executor import Task

        name = "baseline" if item["item"] == "baseline" else f"{item['mode']}-ablated block{item['block']}"
        return Task(name, {**self.key, **item}, dict(item))

    def prefetch(self, modes, n_blocks: int, bar=None):
        """Hand the baseline and every (mode, block) ablation pass to the current executor ahead
        of reading them: a Ray executor computes the uncached ones on its workers and writes them
        into the cache; in process nothing happens (each pass is computed when first read)."""
        from validate._executor import current

        ex = current()
        if not ex.prefetches:
            return None
        items = [{"item": "baseline"}, *({"item": "ablation", "block": b, "mode": m}
                                         for m in modes for b in range(n_blocks))]
        report = ex.map(self.spec, [self.task(i) for i in items], cache=self.cache, bar=bar)
        self.run_count += report.computed
        return report


class AblationWorker:
    """The ablation passes as an executor worker (``validate._executor.Worker``): the payload is
    an item of :meth:`_Passes.task`; returns the cache entries computed (the update means among
    them when the driver's cache was not readable here)."""

    def __init__(self, passes: _Passes):
        self.passes = passes

    def compute(self, payload) -> list:
        p = self.passes
        if payload.get("item") == "baseline":
            p.baseline()
        elif payload.get("item") == "ablation":
            block, mode = int(payload["block"]), payload["mode"]
            if mode not in MODES:
                raise ValueError(f"unknown ablation {mode!r}; expected one of {MODES}")
            if not 0 <= block < p.s.n_blocks:
                raise ValueError(f"block {block} out of range: the model has {p.s.n_blocks} blocks")
            p.ablation(block, mode, p.means() if mode == "mean" else None)
        else:
            raise ValueError(f"unknown item {payload.get('item')!r}; expected baseline or ablation")
        return p.cache.drain()


def _key(s) -> dict:
    return {**s.key, "experiment": EXPERIMENT, "version": ABLATION_VERSION}


def ablation_worker(c: Config, folder: str | None) -> AblationWorker:
    """A remote worker (``validate._executor``): the setup of ``c`` and its ablation passes under
    the keys ``run`` uses, recording into a ``RecordingCache`` that reads the driver's cache
    ``folder`` where it is visible (the update means, say)."""
    from validate._executor import RecordingCache
    from validate._mechanisms import worker_setup

    s = worker_setup(c)  # the model this process's block-pass worker uses, if any
    return AblationWorker(_Passes(s, RecordingCache(read_from=folder), _key(s)))


def _resamples(sizes: dict, n_boot: int, seed: int) -> dict:
    """Segment ids per language, ``(n_boot, n)``: the same ids for languages of the same size."""
    by_size = {}
    for n in sorted(set(sizes.values())):
        by_size[n] = np.random.default_rng([seed, n]).integers(0, n, size=(n_boot, n))
    return {l: by_size[n] for l, n in sizes.items()}


def _interval(v: np.ndarray) -> tuple[float | None, float | None]:
    v = v[np.isfinite(v)]
    if not v.size:
        return None, None
    lo, hi = np.percentile(v, [2.5, 97.5])
    return float(lo), float(hi)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import stats

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def concordance(profiles: np.ndarray, boot: np.ndarray | None = None) -> dict:
    """Agreement of the languages' per-block profiles: pairwise Spearman correlations.

    Parameters
    ----------
    profiles : array (languages, blocks)
    boot : array (n_boot, languages, blocks), optional
        Resampled profiles, for the intervals.

    Returns
    -------
    dict
        ``pairs`` (``[l_i, l_j, rho]``), ``mean`` (mean pairwise rho), ``min`` and ``min_pair``, with
        ``mean_ci``/``min_ci`` (95% percentile intervals over ``boot``; the minimum's interval
        is that of the pair that is smallest unresampled).
    """
    p = np.asarray(profiles, dtype=float)
    k = p.shape[0]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    if not pairs:
        return {"pairs": [], "mean": None, "min": None, "min_pair": None, "mean_ci": [None, None],
                "min_ci": [None, None]}
    rho = np.array([_spearman(p[i], p[j]) for i, j in pairs])
    out = {"pairs": [[i, j, float(r)] for (i, j), r in zip(pairs, rho)], "mean": float(np.nanmean(rho))}
    m = int(np.nanargmin(rho)) if np.isfinite(rho).any() else 0
    out["min"], out["min_pair"] = float(rho[m]), list(pairs[m])
    out["mean_ci"] = out["min_ci"] = [None, None]
    if boot is not None:
        br = np.array([[_spearman(b[i], b[j]) for i, j in pairs] for b in boot])
        with np.errstate(all="ignore"):
            out["mean_ci"] = list(_interval(np.nanmean(br, axis=1)))
        out["min_ci"] = list(_interval(br[:, m]))
    return out


def run(config: Config, cache: ResultCache | None = None) -> protocol.Result:
    """Ablation passes per block and mode (cached), their statistics and the relation to the
    single-block quantization damage.

    Under a Ray executor (``--executor ray``) the single-block quantized passes (one grid), then
    the baseline and every (mode, block) ablation pass (another) are computed on the workers
    ahead of being read from the cache; the update means are measured here first."""
    from validate._executor import WorkerSpec

    c = config
    s = setup(c)
    dmg = block_damage(s, cache)
    folder = None if cache is None or cache.folder is None else str(cache.folder)
    passes = _Passes(s, cache, _key(s), spec=WorkerSpec(f"{__name__}:ablation_worker", (c, folder), c.device))
    langs, names = s.languages, s.block_names
    nb = len(names)
    bar = protocol.progress(total=1 + nb * len(c.modes), desc="residual ablation", unit="pass")
    means = passes.means() if "mean" in c.modes else None
    passes.prefetch(c.modes, nb, bar)  # after the means, so that workers on this machine read them
    base = passes.baseline()
    bar.update()
    abl = {}
    for m in c.modes:
        for b in range(nb):
            abl[m, b] = passes.ablation(b, m, means)
            bar.update()
    bar.close()

    n_bytes = {l: np.array([len(t.encode("utf-8")) for t in s.corpus[l]], dtype=np.float64) for l in langs}
    fp = {l: np.asarray(base["nll"][l]) for l in langs}
    idx = _resamples({l: fp[l].size for l in langs}, c.bootstrap, c.seed)
    ln2 = math.log(2)
    base_bpb = {l: float(fp[l].sum() / ln2 / n_bytes[l].sum()) for l in langs}
    damage = dmg.metric(c.damage_metric)  # (languages, blocks)
    rows, modes = [], {}
    for m in c.modes:
        rel = np.zeros((len(langs), nb))
        rel_boot = np.zeros((c.bootstrap, len(langs), nb))
        per = {}
        for li, l in enumerate(langs):
            bl, bb, ix = fp[l], n_bytes[l], idx[l]
            per[l] = []
            for b in range(nb):
                q = np.asarray(abl[m, b]["nll"][l])
                kl = abl[m, b]["kl"]
                dbpb = float((q.sum() - bl.sum()) / ln2 / bb.sum())
                boot = (q[ix].sum(1) - bl[ix].sum(1)) / ln2 / bb[ix].sum(1)
                rel[li, b] = q.sum() / bl.sum() - 1
                rel_boot[:, li, b] = q[ix].sum(1) / bl[ix].sum(1) - 1
                lo, hi = _interval(boot)
                row = {"language": l, "block": names[b], "mode": m, "bpb": base_bpb[l] + dbpb, "delta_bpb": dbpb,
                       "delta_bpb_ci_low": lo, "delta_bpb_ci_high": hi, "relative": float(rel[li, b]),
                       "kl_bpb": None if kl is None else float(np.sum(kl[l]) / ln2 / bb.sum()),
                       "quant_damage": float(damage[li, b])}
                per[l].append(row)
                rows.append(row)
        corr = {l: correlation_ci(rel[li], damage[li], "spearman", c.bootstrap, c.seed) for li, l in enumerate(langs)}
        pooled = correlation_ci(rel.ravel(), damage.ravel(), "spearman", c.bootstrap, c.seed,
                                groups=np.tile(np.arange(nb), len(langs)))
        top = {l: [names[i] for i in np.argsort(-rel[li], kind="stable")[: c.top]] for li, l in enumerate(langs)}
        conc = concordance(rel, rel_boot)
        conc["pairs"] = [[langs[i], langs[j], r] for i, j, r in conc["pairs"]]
        if conc["min_pair"] is not None:
            conc["min_pair"] = [langs[i] for i in conc["min_pair"]]
        modes[m] = {
            "relative": rel.tolist(), "per_language": per, "spearman_vs_quant": corr, "spearman_vs_quant_pooled": pooled,
            "verdict_pooled": resolved(pooled), "top_blocks": top,
            "top_block_shared": len({t[0] for t in top.values()}) == 1, "concordance": conc,
            "mean_ranking": [names[i] for i in np.argsort(-rel.mean(axis=0), kind="stable")],
        }
    both = None
    if len(c.modes) == 2:
        r0, r1 = (np.asarray(modes[m]["relative"]) for m in c.modes)
        both = correlation_ci(r0.ravel(), r1.ravel(), "spearman", c.bootstrap, c.seed,
                              groups=np.tile(np.arange(nb), len(langs)))
    norms = means.norms() if means is not None else None
    return protocol.Result(EXPERIMENT, c, {
        "languages": langs, "blocks": names, "modes": list(c.modes), "damage_metric": c.damage_metric,
        "baseline_bpb": base_bpb, "tokens": {l: int(np.sum(base["tokens"][l])) for l in langs},
        "bytes": {l: int(n_bytes[l].sum()) for l in langs}, "split_segments": base["split_segments"],
        "mean_definition": "BOS (position 0 of each window) and text (positions >= 1) means of u = f(h) - h over "
                           "every language's windows",
        "mean_norms": norms, "means_positions": None if means is None else {"bos": means.n_first, "text": means.n_text},
        "quant_damage": dmg.to_json(), "ablation": modes, "mean_vs_zero": both,
        "passes_run": passes.run_count, "block_damage_passes_run": dmg.passes_run,
    })


# ---- output ---------------------------------------------------------------------------------------

def _primary(res) -> str:
    return "mean" if "mean" in res["modes"] else res["modes"][0]


def write(result: protocol.Result, out: Path) -> list[Path]:
    use_agg()
    import matplotlib.pyplot as plt

    res = result
    out = Path(out)
    langs, names, m0 = res["languages"], res["blocks"], _primary(res)
    rows = [r for m in res["modes"] for l in langs for r in res["ablation"][m]["per_language"][l]]
    files = [write_csv(out / f"{EXPERIMENT}.csv", rows,
                       ["language", "block", "mode", "bpb", "delta_bpb", "delta_bpb_ci_low", "delta_bpb_ci_high",
                        "relative", "kl_bpb", "quant_damage"])]
    qd = np.asarray(res["quant_damage"][res["damage_metric"]] or np.full((len(langs), len(names)), np.nan))
    rel = np.asarray(res["ablation"][m0]["relative"])
    trows = [{"block": names[b], **{l: float(rel[li, b]) for li, l in enumerate(langs)},
              "quant": float(np.mean(qd[:, b]))} for b in range(len(names))]
    files.append(write_latex_table(
        out / f"{EXPERIMENT}_table.tex", trows, ["block", *langs, "quant"],
        ["block", *[tex_text(l) for l in langs], Tex(r"quant.\ (mean)")],
        caption=(f"Relative damage $\\mathrm{{bpb}}_{{\\mathrm{{abl}}}}/\\mathrm{{bpb}}-1$ of {m0}-ablating each "
                 f"block's residual update per language ({tex_text(result.config_dict.get('model', ''))}), and the "
                 f"block's single-block quantization damage ({res['damage_metric']} estimator), mean over languages."),
        label="tab:residual-ablation", digits=3))

    fig, ax = plt.subplots(1, 1 + len(res["modes"]), figsize=(5 * (1 + len(res["modes"])), 4))
    for j, m in enumerate(res["modes"]):
        r = np.asarray(res["ablation"][m]["relative"])
        im = ax[j].imshow(np.log10(np.clip(r, 1e-6, None)), aspect="auto", cmap="viridis")
        ax[j].set_yticks(range(len(langs)), langs)
        ax[j].set_xticks(range(len(names)), [n[5:] for n in names], fontsize=6)
        ax[j].set_xlabel("block")
        ax[j].set_title(f"{m} ablation: log10 relative damage", fontsize=8)
        fig.colorbar(im, ax=ax[j])
    a = ax[-1]
    for li, l in enumerate(langs):
        a.loglog(np.clip(qd[li], 1e-8, None), np.clip(rel[li], 1e-8, None), "o", ms=3, label=l)
    p = res["ablation"][m0]["spearman_vs_quant_pooled"]
    a.set_xlabel(f"single-block {res['damage_metric']} quantization damage")
    a.set_ylabel(f"{m0}-ablation relative damage")
    rtxt = "n/a" if p["r"] is None else f"{p['r']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}]"
    a.set_title(f"pooled Spearman {rtxt}", fontsize=8)
    a.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    files.append(save_figure(fig, out / f"{EXPERIMENT}.png"))
    plt.close(fig)
    files.append(write_json(out / f"{EXPERIMENT}.json", result.to_json()))
    return files


def summary(result: protocol.Result) -> str:
    m0 = _primary(result)
    p = result["ablation"][m0]["spearman_vs_quant_pooled"]
    if p["r"] is None:
        return f"{m0} ablation vs quantization damage: no correlation (constant or too few blocks)"
    return (f"{m0} ablation vs quantization damage, pooled Spearman {p['r']:.2f} "
            f"[{p['ci_low']:.2f}, {p['ci_high']:.2f}] ({resolved(p)}); top block per language: "
            + ", ".join(f"{l} {t[0]}" for l, t in result["ablation"][m0]["top_blocks"].items()))


def macros(result: protocol.Result) -> MacroSet:
    ms = MacroSet(f"{EXPERIMENT}.json")
    res = result
    langs = res.get("languages", [])
    ms.add("AblModel", result.config_dict.get("model"), "provenance.config.model")
    ms.add("AblLanguages", len(langs), "len(languages)")
    ms.add("AblSegments", result.config_dict.get("segments"), "provenance.config.segments")
    ms.add("AblBlocks", len(res.get("blocks", [])), "len(blocks)")
    ms.add("AblDamageMetric", {"kl": "KL", "bpb": "bits per byte"}.get(res.get("damage_metric")), "damage_metric")
    for m in res.get("modes", []):
        a = res["ablation"][m]
        M = m.capitalize()
        p = a["spearman_vs_quant_pooled"]
        w = f"ablation.{m}.spearman_vs_quant_pooled"
        ms.add(["Abl", M, "Spearman"], p.get("r"), f"{w}.r")
        ms.add(["Abl", M, "SpearmanLow"], p.get("ci_low"), f"{w}.ci_low")
        ms.add(["Abl", M, "SpearmanHigh"], p.get("ci_high"), f"{w}.ci_high")
        ms.add(["Abl", M, "Verdict"], a.get("verdict_pooled"), f"ablation.{m}.verdict_pooled")
        con = a["concordance"]
        ms.add(["Abl", M, "Concordance"], con.get("mean"), f"ablation.{m}.concordance.mean")
        ms.add(["Abl", M, "ConcordanceLow"], (con.get("mean_ci") or [None])[0], f"ablation.{m}.concordance.mean_ci[0]")
        ms.add(["Abl", M, "ConcordanceHigh"], (con.get("mean_ci") or [None, None])[1],
               f"ablation.{m}.concordance.mean_ci[1]")
        ms.add(["Abl", M, "ConcordanceMin"], con.get("min"), f"ablation.{m}.concordance.min")
        mp = con.get("min_pair")
        ms.add(["Abl", M, "ConcordanceMinPair"], None if not mp else " and ".join(mp), f"ablation.{m}.concordance.min_pair")
        ms.add(["Abl", M, "TopBlockShared"], "yes" if a.get("top_block_shared") else "no", f"ablation.{m}.top_block_shared")
        rk = a.get("mean_ranking") or []
        ms.add(["Abl", M, "TopBlock"], rk[0].replace("block", "") if rk else None, f"ablation.{m}.mean_ranking[0]")
        for l in langs:
            c = a["spearman_vs_quant"][l]
            ms.add(["Abl", M, "Spearman", l], c.get("r"), f"ablation.{m}.spearman_vs_quant.{l}.r")
            top = a["top_blocks"][l]
            ms.add(["Abl", M, "TopBlock", l], top[0].replace("block", "") if top else None,
                   f"ablation.{m}.top_blocks.{l}[0]")
    mz = res.get("mean_vs_zero") or {}
    ms.add("AblMeanVsZeroSpearman", mz.get("r"), "mean_vs_zero.r")
    return ms


main = protocol.entry_point(__name__)


if __name__ == "__main__":
    raise SystemExit(main())
