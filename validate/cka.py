"""Experiment (issue #17, S-005): how similar are the residual streams of the blocks, per
language, and does how much a block changes the stream predict its quantization damage?

``python -m validate.cka [--quick] [--top-pairs K] [--model M] [--out DIR]``
(``--help`` lists every flag with its default)

For each language, the residual stream at ``L + 1`` depths, ``h_0`` (the embedding output, as
block 0 receives it: scaled in Gemma) and ``h_{b+1}`` (the output of block ``b``, before the final
norm), is captured with forward hooks on the decoder blocks over the language's segment windows
(each from BOS, truncated to ``--max-length``, no padding). The BOS position is excluded: its
stream is the attention sink, huge and nearly text-independent, and would dominate every
similarity. Linear CKA (``empirical.similarity``, Kornblith et al. 2019),

    CKA(X, Y) = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F),

with ``X``, ``Y`` the two depths' streams over the language's tokens (``n x d``, columns centred,
float64), gives each language an ``(L+1) x (L+1)`` matrix.

Reported: per depth pair, the range (max - min) and standard deviation of CKA across languages;
for the ``--top-pairs`` pairs of largest range, a 95% percentile bootstrap interval of the range
over segments (each resample draws segments with replacement, the same segment ids in every
language of the same segment count, and CKA is recomputed exactly on the resampled tokens,
``empirical.similarity.SegmentMoments``); and, per block ``b``, how much it changes the stream,
``1 - CKA(h_b, h_{b+1})``, related to the block's single-block quantization damage
(``validate._mechanisms.block_damage``, ``--damage-metric``) by Spearman correlation with a
bootstrap interval per language and pooled over languages (whole blocks resampled).

Outputs under ``--out`` (default ``results/cka``): ``cka.json`` (provenance, every matrix, every
interval and correlation), ``cka.csv`` (one row per language and depth pair), ``cka_table.tex``
(the pairs that differ most across languages) and ``cka.png`` (each language's matrix, the
across-language standard deviation, and change against damage). Each language's captures are
cached, so a rerun computes no forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from validate import _protocol as protocol
from validate._common import ResultCache, save_figure, use_agg, write_csv, write_json
from validate._latex import MacroSet, Tex, tex_text, write_latex_table
from validate._mechanisms import MechanismConfig, block_damage, correlation_ci, resolved, setup, worker_setup

EXPERIMENT = "cka"
CKA_VERSION = 1
#: The grids ``--executor ray`` distributes (validate._executor).
EXECUTOR_GRIDS = "each language's CKA matrix, then its bootstrap of the top pairs (one capture each)"


@dataclass(frozen=True)
class Config(MechanismConfig):
    top_pairs: int = protocol.param(5, "depth pairs (largest range of CKA across languages) given a bootstrap "
                                    "interval of the range")
    damage_metric: str = protocol.param("kl", "estimator of the single-block quantization damage related to",
                                        choices=("kl", "bpb"))

    def __post_init__(self):
        super().__post_init__()
        protocol.check_positive("top_pairs", self.top_pairs)
        if self.damage_metric not in ("kl", "bpb"):
            raise protocol.ConfigError(f"--damage-metric must be kl or bpb, got {self.damage_metric!r}")
        if len(self.languages) < 2:
            raise protocol.ConfigError("--languages: the spread across languages needs at least two")


def depth_names(n_blocks: int) -> list[str]:
    """``embedding`` (h_0) then ``block<b>`` (the output of block b)."""
    return ["embedding", *[f"block{b}" for b in range(n_blocks)]]


def capture_streams(model, windows) -> tuple[list[np.ndarray], np.ndarray]:
    """Residual streams of every depth over ``windows`` (each ``(1, T)``, BOS first), BOS excluded.

    Returns
    -------
    (streams, segments)
        ``streams[k]``: float64 ``(n, d)``, depth ``k`` (0: input of block 0, ``b+1``: output of
        block ``b``) at every non-BOS position of every window, windows in order; ``segments``:
        ``(n,)`` index of the window of each row (windows with no token after BOS are skipped and
        not numbered).
    """
    import torch

    from empirical.models import model_view

    blocks = model_view(model).blocks
    got: dict[int, torch.Tensor] = {}

    def out_hook(i):
        def hook(mod, args, kwargs, out):
            got[i + 1] = (out[0] if isinstance(out, tuple) else out)[0, 1:].double().cpu()
        return hook

    def in_hook(mod, args, kwargs):
        got[0] = (args[0] if args else kwargs["hidden_states"])[0, 1:].double().cpu()

    handles = [blocks[0].register_forward_pre_hook(in_hook, with_kwargs=True)]
    handles += [b.register_forward_hook(out_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    per = [[] for _ in range(len(blocks) + 1)]
    seg = []
    try:
        with torch.no_grad():
            for w in windows:
                if w.shape[1] < 2:
                    continue
                got.clear()
                model.base_model(input_ids=w, use_cache=False)
                for k in range(len(per)):
                    per[k].append(got[k].numpy())
                seg.append(np.full(w.shape[1] - 1, len(seg), dtype=np.int64))
    finally:
        for h in handles:
            h.remove()
    if not seg:
        raise ValueError("no window has a token after BOS")
    return [np.concatenate(p) for p in per], np.concatenate(seg)


def _weights(idx: np.ndarray, n_seg: int) -> np.ndarray:
    """Resampled segment ids ``(B, S)`` -> draw counts ``(B, S)``."""
    return np.stack([np.bincount(r, minlength=n_seg) for r in idx]).astype(np.float64)


def _interval(v) -> list:
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return [None, None]
    return [float(x) for x in np.percentile(v, [2.5, 97.5])]


def bootstrap_draws(seed: int, n_boot: int, n_seg: int) -> np.ndarray:
    """Resampled segment ids ``(n_boot, n_seg)``, the same for every language of ``n_seg`` segments."""
    return np.random.default_rng([seed, n_seg]).integers(0, n_seg, size=(n_boot, n_seg))


class CkaItems:
    """Each language's cached items, a CKA matrix and the bootstrap of the top pairs (each one
    capture of its windows), computed where the cache lacks them; ``run`` and the remote
    :class:`CkaWorker` both use it, so that they build identical cache keys."""

    def __init__(self, c: Config, s, cache):
        self.c, self.s, self.cache = c, s, cache
        self.base = {**s.key, "experiment": EXPERIMENT, "version": CKA_VERSION}
        self._windows = None
        self.passes = 0   # captures computed here

    def key(self, lang: str, top=None) -> dict:
        """The matrix item's key, or with ``top`` (the depth pairs) the bootstrap item's."""
        if top is None:
            return {**self.base, "item": "matrix", "language": lang}
        return {**self.base, "item": "bootstrap", "language": lang, "pairs": [list(p) for p in top],
                "n_boot": self.c.bootstrap, "seed": self.c.seed}

    def task(self, lang: str, top=None):
        from validate._executor import Task

        payload = {"language": lang} if top is None else {"language": lang, "pairs": [list(p) for p in top]}
        return Task(f"CKA {'matrix' if top is None else 'bootstrap'} {lang}", self.key(lang, top), payload)

    def _streams(self, lang: str):
        if self._windows is None:
            self._windows = self.s.windows()
        self.passes += 1
        return capture_streams(self.s.model, self._windows[lang])

    def _cached(self, key: dict, compute):
        got = self.cache.get(key) if self.cache is not None else None
        if got is None:
            got = compute()
            if self.cache is not None:
                self.cache.put(key, got)
        return got

    def matrix(self, lang: str) -> dict:
        """``{"matrix", "tokens", "segments"}`` of the language (module docstring)."""
        from empirical.similarity import cka_matrix

        def compute():
            st, seg = self._streams(lang)
            return {"matrix": cka_matrix(st).tolist(), "tokens": int(seg.size), "segments": int(seg.max()) + 1}
        return self._cached(self.key(lang), compute)

    def bootstrap(self, lang: str, top) -> dict:
        """``{"i-j": [CKA of each resample]}`` of the pairs ``top`` over the language's segments."""
        from empirical.similarity import SegmentMoments

        top = [(int(i), int(j)) for i, j in top]

        def compute():
            st, seg = self._streams(lang)
            depths = sorted({d for p in top for d in p})
            sm = SegmentMoments([st[k] for k in depths], seg)
            pos = {d: k for k, d in enumerate(depths)}
            n_seg = int(seg.max()) + 1
            w = _weights(bootstrap_draws(self.c.seed, self.c.bootstrap, n_seg), n_seg)
            return {f"{i}-{j}": sm.cka(pos[i], pos[j], w).tolist() for i, j in top}
        return self._cached(self.key(lang, top), compute)

    def prefetch(self, langs, top=None) -> int:
        """Hand the languages' matrix (or, with ``top``, bootstrap) items to the current executor
        ahead of reading them (a Ray executor computes the uncached ones on its workers and writes
        them into the cache; in process nothing happens). Returns the captures those workers ran."""
        from validate._executor import WorkerSpec, current

        ex = current()
        if not ex.prefetches or not langs:
            return 0
        cache = self.cache
        tasks = [self.task(l, top) for l in langs]
        todo = [t for t in tasks if cache is None or cache.get(t.key) is None]
        folder = None if cache is None or cache.folder is None else str(cache.folder)
        spec = WorkerSpec(f"{__name__}:cka_worker", (self.c, folder), device=self.c.device)
        return ex.map(spec, todo, cache=cache).computed


class CkaWorker:
    """An executor worker (``validate._executor.Worker``): loads the model of ``c`` once; the
    payload ``{"language": l}`` computes that language's CKA matrix, ``{"language": l, "pairs":
    [[i, j], ...]}`` its bootstrap of those pairs; returns the cache entry."""

    def __init__(self, c: Config, folder=None):
        from validate._executor import RecordingCache

        # the model this process's block-pass worker loaded, if any
        self.items = CkaItems(c, worker_setup(c), RecordingCache(read_from=folder))

    def compute(self, payload) -> list:
        lang = payload["language"]
        if lang not in self.items.s.languages:
            raise ValueError(f"language {lang!r} is not one of this run's {self.items.s.languages}")
        if "pairs" in payload:
            self.items.bootstrap(lang, payload["pairs"])
        else:
            self.items.matrix(lang)
        return self.items.cache.drain()


def cka_worker(c: Config, folder: str | None = None) -> CkaWorker:
    """The factory of :class:`CkaWorker` (``validate._executor.WorkerSpec``)."""
    return CkaWorker(c, folder)


def run(config: Config, cache: ResultCache | None = None) -> protocol.Result:
    """Per-language CKA matrices, their spread across languages with bootstrap intervals for the
    top pairs, and the per-block change against the quantization damage."""
    c = config
    s = setup(c)
    dmg = block_damage(s, cache)
    langs = s.languages
    nb = s.n_blocks
    depths = depth_names(nb)
    items = CkaItems(c, s, cache)
    remote = items.prefetch(langs)

    mats, n_tok, n_seg = {}, {}, {}
    for l in protocol.progress(langs, desc="CKA matrices", unit="language"):
        got = items.matrix(l)
        mats[l], n_tok[l], n_seg[l] = np.asarray(got["matrix"]), got["tokens"], got["segments"]
    m = np.stack([mats[l] for l in langs])  # (languages, L+1, L+1)
    iu = np.triu_indices(nb + 1, k=1)
    rng = (m.max(axis=0) - m.min(axis=0))[iu]
    std = m.std(axis=0)[iu]
    order = np.argsort(-rng, kind="stable")[: c.top_pairs]
    top = [(int(iu[0][k]), int(iu[1][k])) for k in order]

    # bootstrap of the top pairs' range over segments
    remote += items.prefetch(langs, top)
    boot = {l: items.bootstrap(l, top) for l in protocol.progress(langs, desc="CKA bootstrap", unit="language")}
    top_rows = []
    for i, j in top:
        b = np.array([boot[l][f"{i}-{j}"] for l in langs], dtype=float)  # (languages, B)
        with np.errstate(all="ignore"):
            brange = np.nanmax(b, axis=0) - np.nanmin(b, axis=0)
        vals = m[:, i, j]
        top_rows.append({"pair": [depths[i], depths[j]], "index": [i, j], "range": float(np.ptp(vals)),
                         "range_ci": _interval(brange), "std": float(vals.std()),
                         "lowest": langs[int(np.argmin(vals))], "highest": langs[int(np.argmax(vals))],
                         "cka": {l: float(v) for l, v in zip(langs, vals)}})

    # how much each block changes the stream, against its quantization damage
    change = np.array([[1.0 - mats[l][b, b + 1] for b in range(nb)] for l in langs])
    damage = dmg.metric(c.damage_metric)
    corr = {l: correlation_ci(change[li], damage[li], "spearman", c.bootstrap, c.seed) for li, l in enumerate(langs)}
    pooled = correlation_ci(change.ravel(), damage.ravel(), "spearman", c.bootstrap, c.seed,
                            groups=np.tile(np.arange(nb), len(langs)))
    pooled_pearson = correlation_ci(change.ravel(), damage.ravel(), "pearson", c.bootstrap, c.seed,
                                    groups=np.tile(np.arange(nb), len(langs)))
    pairs = [{"pair": [depths[i], depths[j]], "range": float(r), "std": float(sd)}
             for i, j, r, sd in zip(iu[0], iu[1], rng, std)]
    return protocol.Result(EXPERIMENT, c, {
        "languages": langs, "depths": depths, "blocks": s.block_names, "damage_metric": c.damage_metric,
        "bos_excluded": True, "tokens": n_tok, "segments": n_seg,
        "matrices": {l: mats[l].tolist() for l in langs},
        "pairs": pairs, "top_pairs": top_rows,
        "mean_range": float(rng.mean()), "max_range": float(rng.max()),
        "change": {l: change[li].tolist() for li, l in enumerate(langs)},
        "change_vs_quant": corr, "change_vs_quant_pooled": pooled, "change_vs_quant_pooled_pearson": pooled_pearson,
        "verdict_pooled": resolved(pooled), "quant_damage": dmg.to_json(),
        "most_changing_block": {l: s.block_names[int(np.argmax(change[li]))] for li, l in enumerate(langs)},
        "passes_run": items.passes + remote, "block_damage_passes_run": dmg.passes_run,
    })


def write(result: protocol.Result, out: Path) -> list[Path]:
    use_agg()
    import matplotlib.pyplot as plt

    res = result
    out = Path(out)
    langs, depths = res["languages"], res["depths"]
    rows = [{"language": l, "depth_i": depths[i], "depth_j": depths[j], "cka": res["matrices"][l][i][j]}
            for l in langs for i in range(len(depths)) for j in range(i + 1, len(depths))]
    files = [write_csv(out / f"{EXPERIMENT}.csv", rows, ["language", "depth_i", "depth_j", "cka"])]
    trows = [{"pair": f"{t['pair'][0]} / {t['pair'][1]}", "range": t["range"], "low": t["range_ci"][0],
              "high": t["range_ci"][1], "std": t["std"], "lowest": t["lowest"], "highest": t["highest"]}
             for t in res["top_pairs"]]
    files.append(write_latex_table(
        out / f"{EXPERIMENT}_table.tex", trows, ["pair", "range", "low", "high", "std", "lowest", "highest"],
        ["depths", "range", "95\\% CI low", "high", "std", "lowest", "highest"],
        caption=(f"Depth pairs whose linear CKA differs most across languages "
                 f"({tex_text(result.config_dict.get('model', ''))}; BOS excluded): range and standard deviation "
                 "across languages, the range's bootstrap interval over segments, and the languages at the ends."),
        label="tab:cka", digits=3))

    k = len(langs)
    ncol = min(4, k + 2)
    nrow = int(np.ceil((k + 2) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False)
    for ax in axes.ravel()[k + 2:]:
        ax.set_visible(False)
    for ax, l in zip(axes.ravel(), langs):
        im = ax.imshow(np.asarray(res["matrices"][l]), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{l}: CKA", fontsize=8)
        ax.set_xlabel("depth", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes.ravel()[k - 1])
    sd = np.stack([np.asarray(res["matrices"][l]) for l in langs]).std(axis=0)
    ax = axes.ravel()[k]
    im2 = ax.imshow(sd, cmap="magma")
    ax.set_title("std across languages", fontsize=8)
    ax.tick_params(labelsize=6)
    fig.colorbar(im2, ax=ax)
    ax = axes.ravel()[k + 1]
    qd = np.asarray(res["quant_damage"][res["damage_metric"]] or np.full((k, len(depths) - 1), np.nan))
    for li, l in enumerate(langs):
        ax.loglog(np.clip(res["change"][l], 1e-8, None), np.clip(qd[li], 1e-8, None), "o", ms=3, label=l)
    p = res["change_vs_quant_pooled"]
    rtxt = "n/a" if p["r"] is None else f"{p['r']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}]"
    ax.set_xlabel("1 - CKA(h_b, h_b+1)", fontsize=7)
    ax.set_ylabel(f"{res['damage_metric']} quantization damage", fontsize=7)
    ax.set_title(f"pooled Spearman {rtxt}", fontsize=8)
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    files.append(save_figure(fig, out / f"{EXPERIMENT}.png"))
    plt.close(fig)
    files.append(write_json(out / f"{EXPERIMENT}.json", result.to_json()))
    return files


def summary(result: protocol.Result) -> str:
    p = result["change_vs_quant_pooled"]
    t = result["top_pairs"][0] if result["top_pairs"] else None
    s = ("block change vs quantization damage, pooled Spearman "
         + ("n/a" if p["r"] is None else f"{p['r']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}] ({resolved(p)})"))
    if t:
        s += f"; largest cross-language CKA range {t['range']:.3f} ({t['pair'][0]}/{t['pair'][1]})"
    return s


def macros(result: protocol.Result) -> MacroSet:
    ms = MacroSet(f"{EXPERIMENT}.json")
    res = result
    p = res.get("change_vs_quant_pooled") or {}
    ms.add("CkaModel", result.config_dict.get("model"), "provenance.config.model")
    ms.add("CkaLanguages", len(res.get("languages") or []), "len(languages)")
    ms.add("CkaDepths", len(res.get("depths") or []), "len(depths)")
    most = list((res.get("most_changing_block") or {}).values())
    common = max(set(most), key=most.count) if most else None
    ms.add("CkaMostChangingBlock", None if common is None else common.replace("block", ""),
           "most common most_changing_block over languages")
    ms.add("CkaMostChangingLanguages", most.count(common) if most else None,
           "languages whose most changing block is CkaMostChangingBlock")
    ms.add("CkaSpearman", p.get("r"), "change_vs_quant_pooled.r")
    ms.add("CkaSpearmanLow", p.get("ci_low"), "change_vs_quant_pooled.ci_low")
    ms.add("CkaSpearmanHigh", p.get("ci_high"), "change_vs_quant_pooled.ci_high")
    ms.add("CkaVerdict", res.get("verdict_pooled"), "verdict_pooled")
    ms.add("CkaDamageMetric", {"kl": "KL", "bpb": "bits per byte"}.get(res.get("damage_metric")), "damage_metric")
    for l, c in (res.get("change_vs_quant") or {}).items():
        ms.add(["CkaSpearman", l], c.get("r"), f"change_vs_quant.{l}.r")
    ms.add("CkaMeanRange", res.get("mean_range"), "mean_range")
    ms.add("CkaTopPairs", len(res.get("top_pairs") or []), "len(top_pairs)")
    tops = res.get("top_pairs") or []
    if tops:
        t = tops[0]
        ms.add("CkaMaxRange", t["range"], "top_pairs[0].range")
        ms.add("CkaMaxRangeLow", t["range_ci"][0], "top_pairs[0].range_ci[0]")
        ms.add("CkaMaxRangeHigh", t["range_ci"][1], "top_pairs[0].range_ci[1]")
        ms.add("CkaMaxRangePair", Tex(" and ".join(tex_text(d) for d in t["pair"])), "top_pairs[0].pair")
        ms.add("CkaMaxRangeLowest", t["lowest"], "top_pairs[0].lowest")
        ms.add("CkaMaxRangeHighest", t["highest"], "top_pairs[0].highest")
    return ms


main = protocol.entry_point(__name__)


if __name__ == "__main__":
    raise SystemExit(main())
