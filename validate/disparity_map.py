"""Where does quantization hurt other languages more than English? A map of disparity over bit
width, granularity and clipping, with nothing protected, on one or more corpora.

``python -m validate.disparity_map [--quick] [--corpus udhr DIR ...] [--bits ...] [--out DIR]``
(``--help`` lists every flag with its default)

For every corpus and every cell (bits x granularity x clipping) of the weight quantizer, one forward
pass with every quantizable Linear quantized gives each language's degradation and the disparity
``D`` against the reference group (docs/design.md, "Degradation and disparity"), by both
estimators of ``empirical.disparity`` from the same paired bootstrap resamples: bits per byte,
and KL bits per byte (the KL divergence from the baseline's next-token distribution, computed in
the same vocabulary sweep). ``--metric`` names the primary one; the JSON keeps both, with the
interval widths per scored token that decide which one resolves disparity at lower cost.

Corpus effects are measured beside the map: per language and corpus, the baseline bits per byte
and a *familiarity* indicator, ``bpb(text) / bpb(natural text of the same language)`` (below 1: the
model predicts the text better than ordinary text of its language, e.g. because it saw it in
training; the natural corpus is ``--natural``, by default the first folder corpus). Their rank
correlation with each language's degradation at the ``--deployed`` cell says whether disparity
tracks the language or the model's familiarity with the text.

Writes ``disparity_map.json`` (provenance, every cell, corpus effects), ``cells.csv``,
``corpus_effects.csv``, ``disparity_map_table.tex``, ``disparity_map.png`` (heatmap of D per
corpus, significance marked) and ``strongest.png`` (per-language degradations with intervals for
the deployed cell and the most significant cells). Each cell's pass is cached under
``<out>/cache`` (``validate._passes``): a rerun performs no forward pass and an interrupted map
resumes. ``--executor ray [--workers N]`` computes every corpus's baseline and cells on Ray actors
that each load the model once (``validate._executor``); the numbers are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from validate import _protocol as protocol
from validate._common import ResultCache, save_figure, spearman, use_agg, write_csv, write_json
from validate._latex import MacroSet, Tex, tex_text, write_latex_table

EXPERIMENT = "disparity_map"
CELL_VERSION = 1
#: The grid ``--executor ray`` distributes (validate._executor).
EXECUTOR_GRIDS = "every corpus's baseline and cells"
GRANULARITIES = ("tensor", "channel", "group")
DEFAULT_BITS = (2, 3, 4, 8)
NATURAL_SEGMENTS = 20  # sentences per language of a natural corpus in validate.all's full run
CLIPPINGS = ("absmax", "sweep")


@dataclass(frozen=True)
class Config:
    model: str = protocol.param("gemma-3-270m", "embedded name (gemma-3-270m, smollm2-135m), tiny-* test "
                                "model, local folder or hub id")
    corpus: tuple[str, ...] = protocol.param(("udhr",), "corpora: 'udhr' (embedded) and/or one-file-per-"
                                             "language folders (e.g. NTREX-128)")
    languages: tuple[str, ...] = protocol.param(("en", "he", "ar", "ja", "hi", "ru", "zh", "fr"),
                                                "languages (FLORES, ISO 639-1 or 639-3 codes)")
    reference: tuple[str, ...] | None = protocol.param(None, "reference group (none: the first language)")
    bits: tuple[int, ...] = protocol.param(DEFAULT_BITS, "weight bit widths")
    granularity: tuple[str, ...] = protocol.param(GRANULARITIES, "one alpha per tensor, output channel or "
                                                  "group of --group-size weights")
    clipping: tuple[str, ...] = protocol.param(CLIPPINGS, "absmax, or the MSE sweep of each row's alpha")
    grid: str = protocol.param("int", "signed grid: aciq, midrise, midtread or int")
    group_size: int = protocol.param(128, "weights per group (granularity group)")
    deployed: str = protocol.param("4/channel/absmax", "the cell whose per-language degradations the "
                                   "corpus effects and the headline use (bits/granularity/clipping)")
    natural: str | None = protocol.param(None, "the corpus of natural text for the familiarity indicator "
                                         "(none: the first folder among --corpus, if any)")
    segments: int | None = protocol.param(None, "segments per language and corpus (none: all)")
    max_length: int = protocol.param(512, "token window for bits per byte")
    metric: str = protocol.param("kl", "primary degradation estimator", choices=("kl", "bpb"))
    bootstrap: int = protocol.param(1000, "bootstrap resamples for the confidence intervals")
    device: str = protocol.param("cpu", "cpu, cuda or cuda:N")
    seed: int = protocol.param(0, "random seed")

    def __post_init__(self):
        if not self.corpus:
            raise protocol.ConfigError("--corpus: give at least one corpus")
        for c in self.corpus:
            protocol.check_corpus(c)
        if len(set(self.corpus)) != len(self.corpus):
            raise protocol.ConfigError("--corpus: a corpus is given twice")
        langs = protocol.check_sources(self.model, self.corpus[0], self.languages)
        ref = protocol.check_reference(self.reference, langs)
        grid = protocol.check_bits_grid(tuple(self.bits), self.grid, signed="weights")
        for name, vals, known in (("granularity", self.granularity, GRANULARITIES),
                                  ("clipping", self.clipping, CLIPPINGS)):
            if not vals or any(v not in known for v in vals):
                raise protocol.ConfigError(f"--{name}: expected some of {', '.join(known)}, got {' '.join(vals) or 'none'}")
        if "group" in self.granularity and self.group_size < 2:
            raise protocol.ConfigError(f"--group-size must be >= 2, got {self.group_size}")
        parts = self.deployed.split("/")
        if (len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) not in self.bits
                or parts[1] not in self.granularity or parts[2] not in self.clipping):
            raise protocol.ConfigError(f"--deployed {self.deployed}: expected bits/granularity/clipping of a "
                                       f"cell in the map, e.g. {self.bits[0]}/{self.granularity[0]}/{self.clipping[0]}")
        natural = self.natural
        if natural is not None and natural not in self.corpus:
            raise protocol.ConfigError(f"--natural {natural}: not among --corpus")
        if natural is None:
            natural = next((c for c in self.corpus if c != "udhr"), None)
        protocol.check_positive("segments", self.segments, optional=True)
        protocol.check_positive("max_length", self.max_length)
        protocol.check_positive("bootstrap", self.bootstrap)
        protocol.check_device(self.device)
        protocol.frozen_set(self, languages=langs, reference=ref, grid=grid, natural=natural,
                            bits=tuple(int(b) for b in self.bits))

    @classmethod
    def quick(cls) -> "Config":
        # a few hundred tokens per pass and six cells (about a minute on two cores)
        return cls(languages=("en", "he", "ja"), segments=4, max_length=128, bits=(3, 4),
                   granularity=("channel", "group"), clipping=("absmax",), deployed="4/channel/absmax",
                   bootstrap=200)


def natural_corpus_args(path) -> list[str]:
    """Flags ``validate.all`` adds in a full run with a natural-text corpus: the map on UDHR and
    on that corpus, ``NATURAL_SEGMENTS`` sentences per language (UDHR has fewer, so all of it)."""
    return ["--corpus", "udhr", str(path), "--segments", str(NATURAL_SEGMENTS)]


def cells_of(bits, granularity, clipping) -> list[tuple[int, str, str]]:
    """Every (bits, granularity, clipping) cell of the map, bits outermost."""
    return [(int(b), g, k) for b in bits for g in granularity for k in clipping]


def cell_name(cell) -> str:
    return "/".join(str(x) for x in cell)


# ---- the experiment -----------------------------------------------------------------------------

def corpus_passes(c: Config, spec: str, model, tok, cache):
    """The text of corpus ``spec``, its scoring engine and its cached passes
    (``validate._passes.ScoredPasses``): what ``run`` and a remote worker (:class:`CellsWorker`)
    both build, so that they name every pass by the same cache key."""
    from empirical.bpb import BpbEngine
    from validate._passes import ScoredPasses

    corpus = protocol.load_corpus(spec, c.languages, c.segments)
    langs = corpus.languages
    engine = BpbEngine(model, tok, {l: corpus[l] for l in langs}, max_length=c.max_length, device=c.device)
    key = {"experiment": EXPERIMENT, "version": CELL_VERSION, "model": c.model, "corpus": spec,
           "languages": langs, "max_length": c.max_length, "seed": c.seed,
           "corpus_digest": protocol.corpus_digest(corpus)}
    return corpus, engine, ScoredPasses(engine, cache, key)


def cell_quant(c: Config, cell):
    """The weight quantizer configuration (``empirical.fakequant.QuantConfig``) of one cell."""
    from empirical.fakequant import QuantConfig

    b, g, k = cell
    return QuantConfig(bits=int(b), grid=c.grid, granularity=g, group_size=c.group_size, clipping=k)


def cell_scores(c: Config, passes, lins, cell):
    """Scores of the pass with every Linear of ``lins`` quantized as ``cell`` says (cached)."""
    from empirical.fakequant import FakeQuantizer

    qcfg = cell_quant(c, cell)
    fq = FakeQuantizer(lins, qcfg, seed=c.seed)
    s = passes.get({"quant": qcfg.key()}, fq.quantized)
    del fq
    return s


def layout_key(passes) -> dict:
    """Cache key of a worker's report of its engine's layout (``packed``, decided at its first
    scoring): the driver of a distributed run scores nothing itself."""
    return {**passes.key, "engine_layout": 1}


def run(config: Config, cache: ResultCache | None = None) -> protocol.Result:
    """Baseline and one quantized pass per cell, per corpus; statistics from the cached scores.

    Under a Ray executor (``--executor ray``) the baselines and cells of every corpus are computed
    on the workers (:class:`CellsWorker`) in one grid ahead of being read from the cache."""
    import torch

    from empirical.models import load_model, model_view
    from validate._executor import WorkerSpec, current

    c = config
    torch.manual_seed(c.seed)
    model, tok, meta = load_model(c.model, device=c.device, seed=c.seed, return_metadata=True)
    lins = model_view(model).linears
    cells = cells_of(c.bits, c.granularity, c.clipping)
    bar = protocol.progress(total=len(c.corpus) * (1 + len(cells)), desc="forward passes", unit="pass")
    per_corpus, run_count, tokens_per_pass = {}, 0, {}
    setups, remote = {}, {}
    if current().prefetches:  # every corpus's baseline and cells on the workers, one grid
        setups = {spec: corpus_passes(c, spec, model, tok, cache) for spec in c.corpus}
        tasks = []
        for spec, (_, _, passes) in setups.items():
            tasks.append(passes.task({}, {"corpus": spec}, f"{_corpus_label(spec)} baseline"))
            tasks += [passes.task({"quant": cell_quant(c, cell).key()}, {"corpus": spec, "cell": list(cell)},
                                  f"{_corpus_label(spec)} {cell_name(cell)}") for cell in cells]
        # passes of each corpus the workers compute now (all of them, or the grid raises)
        pending = [t for t in tasks if cache is None or cache.get(t.key) is None]
        for t in pending:
            remote[t.payload["corpus"]] = remote.get(t.payload["corpus"], 0) + 1
        spec_ = WorkerSpec(f"{__name__}:cells_worker",
                           (c, None if cache is None or cache.folder is None else str(cache.folder)), c.device)
        run_count += current().map(spec_, tasks, cache=cache, bar=bar).computed
    for spec in c.corpus:
        corpus, engine, passes = setups.pop(spec, None) or corpus_passes(c, spec, model, tok, cache)
        langs = corpus.languages
        base = passes.get({})
        bar.update()
        n_bytes = {l: engine.n_bytes[l] for l in langs}
        tokens = engine.tokens
        tokens_per_pass[spec] = int(sum(v.sum() for v in tokens.values()))
        rows = []
        for cell in cells:
            s = cell_scores(c, passes, lins, cell)
            bar.update()
            rows.append(cell_stats(cell, cell_quant(c, cell).key(), s, base, tokens, n_bytes, list(c.reference),
                                   corpus.parallel, c))
        run_count += passes.run_count
        packed = engine.packed if passes.run_count else None
        if packed is None and remote.get(spec):  # the workers scored this corpus: their layout
            packed = (cache.get(layout_key(passes)) or {}).get("packed")
        per_corpus[spec] = {
            "languages": langs, "parallel": corpus.parallel, "segments": {l: len(corpus[l]) for l in langs},
            "scored_tokens_per_pass": tokens_per_pass[spec],
            "baseline_bpb": {l: float(base.nll[l].sum() / (math.log(2) * n_bytes[l].sum())) for l in langs},
            "cells": rows,
            "packed": packed,
        }
    bar.close()
    data = {
        "model_metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "baseline_note": ("baseline is the dequantized Q4_K_M GGUF (weights already quantized to about 4-5 "
                          "bits before this experiment)") if meta.get("prequantized") else
                         "baseline is the model's own weights",
        "metric": c.metric,
        "disparity_map": per_corpus,
        "corpus_effects": corpus_effects(per_corpus, c),
        "metric_cost": metric_cost(per_corpus),
        "strongest": strongest(per_corpus, c),
    }
    return protocol.Result(EXPERIMENT, config, data, timing={"forward_passes_run": run_count})


class CellsWorker:
    """The map's passes on a remote worker (``validate._executor.Worker``): one model, and one
    engine and ``ScoredPasses`` per corpus, built when first asked for. The payload
    ``{"corpus": spec}`` is that corpus's baseline; ``{"corpus": spec, "cell": [bits,
    granularity, clipping]}`` is that cell's pass. Returns the cache entries the pass produced
    (the recorded baseline's among them, the first time, and the engine's layout)."""

    def __init__(self, c: Config, folder: str | None = None):
        import torch

        from empirical.models import load_model, model_view
        from validate._executor import RecordingCache

        self.c = c
        torch.manual_seed(c.seed)
        self.model, self.tok = load_model(c.model, device=c.device, seed=c.seed)
        self.lins = model_view(self.model).linears
        self.cache = RecordingCache(read_from=folder)
        self.corpora: dict = {}
        self.cells = cells_of(c.bits, c.granularity, c.clipping)

    def compute(self, payload) -> list:
        spec = payload.get("corpus")
        if spec not in self.c.corpus:
            raise ValueError(f"corpus {spec!r} is not among this map's corpora {list(self.c.corpus)}")
        if spec not in self.corpora:
            self.corpora[spec] = corpus_passes(self.c, spec, self.model, self.tok, self.cache)
        _, engine, passes = self.corpora[spec]
        if payload.get("cell") is None:
            passes.get({})
        else:
            cell = tuple(payload["cell"])
            if cell not in self.cells:
                raise ValueError(f"cell {cell_name(cell)} is not among this map's cells "
                                 f"({', '.join(cell_name(x) for x in self.cells)})")
            cell_scores(self.c, passes, self.lins, cell)
        if engine.baseline_recorded:
            self.cache.put(layout_key(passes), {"packed": engine.packed})
        return self.cache.drain()


def cells_worker(c: Config, folder: str | None = None) -> CellsWorker:
    """A remote worker's passes (``validate._executor.WorkerSpec`` factory); ``folder`` is the
    driver's cache folder, read where this machine sees it."""
    return CellsWorker(c, folder)


def cell_stats(cell, quant_key: str, s, base, tokens, n_bytes, reference, parallel: bool, c: Config) -> dict:
    """One cell: both metrics' degradations and disparity with intervals, KL bits per byte, top-1
    agreement, and the primary metric's numbers at the top level."""
    from empirical.disparity import metric_summary

    summ = metric_summary(s.nll, base.nll, s.kl, s.agree, tokens, reference, parallel, c.bootstrap, c.seed,
                          n_bytes=n_bytes)
    primary = summ[c.metric] if c.metric in summ else summ["bpb"]
    out = {"bits": cell[0], "granularity": cell[1], "clipping": cell[2], "cell": cell_name(cell),
           "quant": quant_key, "metric": c.metric if c.metric in summ else "bpb",
           "disparity": primary["disparity"], "ci_low": primary["disparity_ci"][0],
           "ci_high": primary["disparity_ci"][1], "resolved": primary["resolved"],
           "degradation": primary["degradation"], "degradation_ci": primary["degradation_ci"],
           "summary": summ}
    if "kl_bpb" in summ:
        out["kl_bpb"] = {l: v["kl_bpb"] for l, v in summ["kl_bpb"].items()}
    return out


def _cell(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["cell"] == name), None)


def corpus_effects(per_corpus: dict, c: Config) -> dict:
    """Per corpus and language: baseline bpb, familiarity (bpb over the natural corpus's), and the
    deployed cell's degradation with its interval; rank correlations across (language, corpus)."""
    nat = per_corpus.get(c.natural, {}).get("baseline_bpb") if c.natural else None
    rows = []
    for spec, pc in per_corpus.items():
        dep = _cell(pc["cells"], c.deployed)
        for l in pc["languages"]:
            rows.append({"corpus": spec, "language": l, "baseline_bpb": pc["baseline_bpb"][l],
                         "familiarity": (pc["baseline_bpb"][l] / nat[l]) if nat and l in nat else None,
                         "degradation": dep["degradation"][l] if dep else None,
                         "degradation_ci": dep["degradation_ci"][l] if dep else None,
                         "relative_to_reference": (dep["degradation"][l] / np.mean(
                             [dep["degradation"][r] for r in c.reference]) if dep else None)})
    fam = [r for r in rows if r["familiarity"] is not None and r["degradation"] is not None]
    out = {"natural_corpus": c.natural, "deployed": c.deployed, "rows": rows,
           "indicator": "baseline bpb of the text / baseline bpb of the natural corpus, same language",
           "spearman_degradation_vs_baseline_bpb": spearman([r["baseline_bpb"] for r in rows if r["degradation"] is not None],
                                                            [r["degradation"] for r in rows if r["degradation"] is not None]),
           "spearman_degradation_vs_familiarity": spearman([r["familiarity"] for r in fam],
                                                           [r["degradation"] for r in fam]) if fam else None}
    # within each corpus: does the language ranking of degradation follow the baseline's bpb?
    out["within_corpus_spearman_vs_baseline_bpb"] = {
        spec: spearman([r["baseline_bpb"] for r in rows if r["corpus"] == spec and r["degradation"] is not None],
                       [r["degradation"] for r in rows if r["corpus"] == spec and r["degradation"] is not None])
        for spec in per_corpus}
    # across corpora: is the languages' order of relative degradation the same?
    specs = list(per_corpus)
    if len(specs) > 1:
        rel = {s: {r["language"]: r["relative_to_reference"] for r in rows if r["corpus"] == s} for s in specs}
        common = [l for l in rel[specs[0]] if all(l in rel[s] and rel[s][l] is not None for s in specs)
                  and l not in c.reference]
        out["across_corpora_spearman"] = {f"{a} vs {b}": spearman([rel[a][l] for l in common], [rel[b][l] for l in common])
                                          for i, a in enumerate(specs) for b in specs[i + 1:]}
    return out


def metric_cost(per_corpus: dict) -> dict:
    """Median over cells of each metric's D-interval width per token and of the token cost ratio
    (how many times the scored tokens bits per byte needs for KL's relative width), per corpus;
    and which metric resolves more cells."""
    out = {}
    for spec, pc in per_corpus.items():
        s = [r["summary"] for r in pc["cells"]]
        if not s or "kl" not in s[0]:
            out[spec] = None
            continue
        ratio = [x["token_cost_ratio"] for x in s if np.isfinite(x.get("token_cost_ratio", np.nan))]
        out[spec] = {
            "median_token_cost_ratio": float(np.median(ratio)) if ratio else None,
            "cells_with_ratio_above_1": int(sum(r > 1 for r in ratio)), "cells_with_ratio": len(ratio),
            "resolved_cells": {m: int(sum(x[m]["resolved"] for x in s)) for m in ("kl", "bpb")},
            "median_relative_width": {m: float(np.nanmedian([x[m]["relative_width"] for x in s])) for m in ("kl", "bpb")},
            "median_width_per_token": {m: float(np.nanmedian([x[m]["width_per_token"] for x in s])) for m in ("kl", "bpb")},
        }
    return out


def strongest(per_corpus: dict, c: Config, n: int = 3) -> dict:
    """Per corpus, the cells whose D interval lies farthest from 1 in units of its half-width."""
    out = {}
    for spec, pc in per_corpus.items():
        scored = []
        for r in pc["cells"]:
            half = (r["ci_high"] - r["ci_low"]) / 2
            if r["resolved"] and np.isfinite(half) and half > 0:
                scored.append((abs(r["disparity"] - 1) / half, r["cell"]))
        out[spec] = [name for _, name in sorted(scored, reverse=True)[:n]]
    return out


# ---- output -------------------------------------------------------------------------------------

def write(result: protocol.Result, out: Path) -> list[Path]:
    cfg = result.config_dict
    maps = result["disparity_map"]
    cell_rows = []
    for spec, pc in maps.items():
        for r in pc["cells"]:
            row = {"corpus": spec, **{k: r[k] for k in ("cell", "bits", "granularity", "clipping", "metric",
                                                        "disparity", "ci_low", "ci_high", "resolved")}}
            for m in ("kl", "bpb"):
                if m in r["summary"]:
                    row[f"D_{m}"] = r["summary"][m]["disparity"]
                    row[f"D_{m}_width"] = r["summary"][m]["disparity_ci_width"]
            for l, v in r["degradation"].items():
                row[f"d_{l}"] = v
            cell_rows.append(row)
    cols = list(dict.fromkeys(k for r in cell_rows for k in r))
    files = [write_csv(out / "cells.csv", cell_rows, cols)]
    eff = result["corpus_effects"]["rows"]
    files.append(write_csv(out / "corpus_effects.csv",
                           [{**r, "ci_low": (r["degradation_ci"] or [None, None])[0],
                             "ci_high": (r["degradation_ci"] or [None, None])[1]} for r in eff],
                           ["corpus", "language", "baseline_bpb", "familiarity", "degradation", "ci_low", "ci_high",
                            "relative_to_reference"]))
    table = [{"corpus": Tex(tex_text(_corpus_label(r["corpus"]))), "language": Tex(tex_text(r["language"])),
              "bpb": r["baseline_bpb"], "fam": r["familiarity"], "d": r["degradation"],
              "lo": (r["degradation_ci"] or [None])[0], "hi": (r["degradation_ci"] or [None, None])[1],
              "rel": r["relative_to_reference"]} for r in eff]
    files.append(write_latex_table(
        out / "disparity_map_table.tex", table, ["corpus", "language", "bpb", "fam", "d", "lo", "hi", "rel"],
        headers=["corpus", "language", "baseline bpb", "familiarity", "$d_l$", "2.5\\%", "97.5\\%",
                 "$d_l / d_{\\mathrm{ref}}$"],
        caption=(f"Corpus effects at the deployed cell ({tex_text(cfg['deployed'])}, nothing protected): baseline "
                 "bits per byte, familiarity (baseline bits per byte over the natural corpus's, same language), "
                 f"each language's degradation by the {tex_text(result['metric'])} estimator with its 95\\% "
                 "paired bootstrap interval, and its ratio to the reference's."),
        label="tab:disparity-map", digits=3))
    files += plot(result, out)
    files.append(write_json(out / f"{EXPERIMENT}.json", result.to_json()))
    return files


def _corpus_label(spec: str) -> str:
    return "UDHR" if spec == "udhr" else Path(spec).name


def plot(result: protocol.Result, out: Path) -> list[Path]:
    use_agg()
    import matplotlib.pyplot as plt

    cfg = result.config_dict
    maps = result["disparity_map"]
    cols = [(g, k) for g in cfg["granularity"] for k in cfg["clipping"]]
    bits = list(cfg["bits"])
    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 + 0.9 * len(cols), 0.55 * len(bits) + 1.6), squeeze=False,
                             sharey=True)
    vals = [r["disparity"] for pc in maps.values() for r in pc["cells"] if np.isfinite(r["disparity"])]
    span = max([abs(math.log(v)) for v in vals if v > 0] + [0.1])
    for ax, (spec, pc) in zip(axes[0], maps.items()):
        grid = np.full((len(bits), len(cols)), np.nan)
        for r in pc["cells"]:
            grid[bits.index(r["bits"]), cols.index((r["granularity"], r["clipping"]))] = r["disparity"]
        with np.errstate(divide="ignore", invalid="ignore"):
            im = ax.imshow(np.log(grid), cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")
        for r in pc["cells"]:
            i, j = bits.index(r["bits"]), cols.index((r["granularity"], r["clipping"]))
            txt = "n/a" if not np.isfinite(r["disparity"]) else f"{r['disparity']:.2f}" + ("*" if r["resolved"] else "")
            ax.text(j, i, txt, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(cols)), [f"{g}\n{k}" for g, k in cols], fontsize=7)
        ax.set_yticks(range(len(bits)), [f"{b} bits" for b in bits], fontsize=8)
        ax.set_title(f"{_corpus_label(spec)} ({pc['scored_tokens_per_pass']} tokens/pass)", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="log D (* : 95% CI excludes 1)", shrink=0.8)
    files = [save_figure(fig, out / "disparity_map.png")]
    plt.close(fig)

    # per-language degradations of the deployed and the strongest cells
    # one row per corpus: the deployed cell, then the strongest cells
    rows = [[(spec, name) for name in dict.fromkeys([cfg["deployed"], *result["strongest"].get(spec, [])])
             if _cell(pc["cells"], name)] for spec, pc in maps.items()]
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.3 * ncol + 0.4, 2.5 * len(rows)), squeeze=False)
    for ax in axes.ravel()[:]:
        ax.set_visible(False)
    for ax, (spec, name) in ((axes[i][j], p) for i, r in enumerate(rows) for j, p in enumerate(r)):
        ax.set_visible(True)
        r = _cell(maps[spec]["cells"], name)
        langs = list(r["degradation"])
        d = np.array([r["degradation"][l] for l in langs])
        lo = np.array([r["degradation_ci"][l][0] for l in langs])
        hi = np.array([r["degradation_ci"][l][1] for l in langs])
        ref = set(cfg["reference"])
        ax.bar(range(len(langs)), d, color=["0.6" if l in ref else "C0" for l in langs])
        ax.errorbar(range(len(langs)), d, yerr=[np.clip(d - lo, 0, None), np.clip(hi - d, 0, None)], fmt="none",
                    ecolor="k", lw=0.8)
        ax.set_xticks(range(len(langs)), [l.split("_")[0] for l in langs], fontsize=7, rotation=60)
        ax.set_title(f"{_corpus_label(spec)} {name}\nD = {r['disparity']:.2f} "
                     f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]", fontsize=7)
        ax.set_ylabel(f"degradation ({r['metric']})", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    files.append(save_figure(fig, out / "strongest.png"))
    plt.close(fig)
    return files


def summary(result: protocol.Result) -> str:
    dep = result.config_dict["deployed"]
    parts = []
    for spec, pc in result["disparity_map"].items():
        r = _cell(pc["cells"], dep)
        n_res = sum(x["resolved"] for x in pc["cells"])
        parts.append(f"{_corpus_label(spec)}: D({dep}) = {r['disparity']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}], "
                     f"{n_res}/{len(pc['cells'])} cells resolved")
    return "; ".join(parts)


def macros(result: protocol.Result) -> MacroSet:
    """Numbers of the embedded corpus (``MapUdhr...``) and of the natural-text corpus
    (``MapNatural...``); each set is defined, as n/a, when that corpus was not run, so the paper
    compiles from any run."""
    ms = MacroSet(f"{EXPERIMENT}.json")
    cfg = result.config_dict
    dep = cfg["deployed"]
    maps = result.get("disparity_map", {})
    ms.add("MapMetric", {"kl": "KL", "bpb": "bits per byte"}.get(result.get("metric")), "metric")
    ms.add("MapDeployedCell", dep, "provenance.config.deployed")
    run_cells = cells_of(cfg["bits"], cfg["granularity"], cfg["clipping"])
    ms.add("MapCells", len(run_cells), "cells per corpus")
    natural = cfg.get("natural")
    ms.add("MapNaturalCorpus", _corpus_label(natural) if natural else None, "provenance.config.natural")
    for tag, spec in (("Udhr", "udhr"), ("Natural", natural)):
        pc = maps.get(spec) if spec else None
        where = f"disparity_map[{spec}]"
        pc = pc or {"cells": []}
        ms.add(["Map", tag, "Tokens"], pc.get("scored_tokens_per_pass"), f"{where}.scored_tokens_per_pass")
        ms.add(["Map", tag, "Resolved"], sum(bool(x["resolved"]) for x in pc["cells"]) if pc["cells"] else None,
               f"{where}.cells[].resolved")
        r = _cell(pc["cells"], dep) or {"summary": {}}
        for name, key in (("D", "disparity"), ("Low", "ci_low"), ("High", "ci_high")):
            ms.add(["Map", tag, "Deployed", name], r.get(key), f"{where}.cells[{dep}].{key}")
        for m in ("kl", "bpb"):
            sm = r["summary"].get(m) or {}
            ci = sm.get("disparity_ci") or (None, None)
            ms.add(["Map", tag, "Deployed", m, "D"], sm.get("disparity"), f"{where}.cells[{dep}].summary.{m}.disparity")
            ms.add(["Map", tag, "Deployed", m, "Low"], ci[0], f"{where}.cells[{dep}].summary.{m}.disparity_ci[0]")
            ms.add(["Map", tag, "Deployed", m, "High"], ci[1], f"{where}.cells[{dep}].summary.{m}.disparity_ci[1]")
        d = r.get("degradation") or {}
        ref = [l for l in cfg.get("reference") or [] if l in d]
        rel = {l: v / np.mean([d[x] for x in ref]) for l, v in d.items() if l not in ref} if ref else {}
        worst = max(rel, key=rel.get) if rel else None
        best = min(rel, key=rel.get) if rel else None
        ms.add(["Map", tag, "Deployed", "Reference", "Degradation"], np.mean([d[x] for x in ref]) if ref else None,
               f"{where}.cells[{dep}].degradation[reference]", percent=True)
        ms.add(["Map", tag, "Deployed", "Worst", "Language"], worst, f"argmax of d_l / d_ref at {dep}")
        ms.add(["Map", tag, "Deployed", "Worst", "Ratio"], rel.get(worst), f"max of d_l / d_ref at {dep}")
        ms.add(["Map", tag, "Deployed", "Least", "Language"], best, f"argmin of d_l / d_ref at {dep}")
        ms.add(["Map", tag, "Deployed", "Least", "Ratio"], rel.get(best), f"min of d_l / d_ref at {dep}")
        # every cell's D, e.g. \MapNaturalCellFourChannelSweepD; the default grid's cells always
        # (n/a when a run left them out), so the paper compiles from a quick run too
        grid = dict.fromkeys([*cells_of(DEFAULT_BITS, GRANULARITIES, CLIPPINGS), *run_cells])
        for b, g, k in grid:
            rc = _cell(pc["cells"], f"{b}/{g}/{k}") or {}
            for name, key in (("D", "disparity"), ("Low", "ci_low"), ("High", "ci_high")):
                ms.add(["Map", tag, "Cell", b, g, k, name], rc.get(key), f"{where}.cells[{b}/{g}/{k}].{key}")
        cost = (result.get("metric_cost") or {}).get(spec) or {}
        ms.add(["Map", tag, "TokenCostRatio"], cost.get("median_token_cost_ratio"), f"metric_cost[{spec}]")
        for m in ("kl", "bpb"):
            ms.add(["Map", tag, "Resolved", m], (cost.get("resolved_cells") or {}).get(m),
                   f"metric_cost[{spec}].resolved_cells.{m}")
    eff = result.get("corpus_effects") or {}
    ms.add("MapSpearmanFamiliarity", eff.get("spearman_degradation_vs_familiarity"),
           "corpus_effects.spearman_degradation_vs_familiarity")
    ms.add("MapSpearmanBaselineBpb", eff.get("spearman_degradation_vs_baseline_bpb"),
           "corpus_effects.spearman_degradation_vs_baseline_bpb")
    across = eff.get("across_corpora_spearman") or {}
    ms.add("MapSpearmanAcrossCorpora", next(iter(across.values()), None), "corpus_effects.across_corpora_spearman")
    rows = {(r["corpus"], r["language"]): r for r in eff.get("rows", [])}
    eng = next((l for l in (cfg.get("reference") or [])), None)
    for tag, spec in (("Udhr", "udhr"), ("Natural", natural)):
        r = rows.get((spec, eng), {})
        ms.add(["Map", tag, "Reference", "Bpb"], r.get("baseline_bpb"), f"corpus_effects.rows[{spec}, {eng}].baseline_bpb")
        ms.add(["Map", tag, "Reference", "Familiarity"], r.get("familiarity"),
               f"corpus_effects.rows[{spec}, {eng}].familiarity")
    fam = [r["familiarity"] for (spec, _), r in rows.items() if spec == "udhr" and r.get("familiarity") is not None]
    ms.add("MapUdhrFamiliarityMedian", float(np.median(fam)) if fam else None, "median familiarity of UDHR")
    return ms


main = protocol.entry_point(__name__)


if __name__ == "__main__":
    raise SystemExit(main())
