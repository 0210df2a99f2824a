"""Language-aware calibration end to end: every language's damage under the calibrators people use,
beside LA-ACIQ's thresholds, in a quantized model.

``python -m validate.language_calibration [--quick] [--corpus DIR] [--settings ...] [--out DIR]``
(``--help`` lists every flag with its default)

Static activation quantization (:mod:`empirical.actquant`) rounds the input of every Linear with a
threshold fixed on calibration text. For every *setting* (activation bits x granularity, alone or
with int4 per-channel absmax weights: ``a8-tensor``, ``w4a8-tensor``, ``a4-channel``...), every
*calibrator* of :mod:`empirical.calibrate` (max, percentile 99.9 and 99.99, the exact MSE sweep,
TensorRT's entropy calibrator, theory's alpha* of the selected site model, and LA-ACIQ minimax and
weighted) and every *calibration set*:

* ``en``: the reference language(s) only, what an English calibration set gives;
* ``mix``: every evaluation language's calibration text pooled (the token-weighted mix);
* ``per_language``: each language calibrated alone, the thresholds then combined
  (:func:`empirical.calibrate.combine_thresholds`); LA-ACIQ is per language by construction and
  runs on this set (on ``en`` it would be the MSE sweep of English, on ``mix`` this same set);
* ``heldout``: calibrated on ``--heldout`` languages only (pooled; LA-ACIQ across them), evaluated
  on all, with the languages it never saw reported apart,

one forward pass over the evaluation text gives each language's degradation (``--metric``, KL bits
per byte by default, with paired bootstrap intervals), the worst language's, the disparity and
English's own cost. Weights get the same treatment at ``--weight-bits``: absmax, the MSE sweep and
activation-weighted (imatrix-style) clipping whose importance is English's, the mix's, or minimax
over languages (:mod:`empirical.weight_clipping`). A real library (:mod:`empirical.baselines`) runs
with its own calibration on ``en`` and ``mix`` wherever it supports the setting.

The question it answers: at equal bits, does LA-ACIQ minimax lower the worst language's
degradation against every English-calibrated calibrator, and what does it cost English? Each
comparison is a paired bootstrap difference (:func:`empirical.disparity.paired_difference`) on the
same sentences.

Calibration and evaluation text are disjoint: calibration takes ``--calib-segments`` segments per
language after the evaluation ones (parallel corpora: the same lines in every language). The
thresholds are cached as safetensors files (``<out>/cache/thresholds``) and the ones of LA-ACIQ
are exported to ``<out>/thresholds`` (:func:`empirical.actquant.load_thresholds` reads them); every
pass is cached (``validate._passes``), so a rerun performs no forward pass and an interrupted run
resumes. Activation thresholds are calibrated on the model with its own weights, also for settings
that then quantize the weights. ``--executor ray [--workers N]`` computes the passes on Ray actors
that each load the model once (``validate._executor``); the numbers are the same.

Writes ``language_calibration.json`` (provenance, every cell, the comparisons, the verdict per
setting), ``cells.csv``, ``language_calibration_table.tex`` and ``language_calibration.png``
(worst language's degradation against English's, one point per method and setting).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from validate import _protocol as protocol
from validate._common import ResultCache, config_key, save_figure, use_agg, write_csv, write_json
from validate._latex import MacroSet, Tex, tex_text, write_latex_table

EXPERIMENT = "language_calibration"
CELL_VERSION = 1
#: The grid ``--executor ray`` distributes (validate._executor).
EXECUTOR_GRIDS = "the baseline and every cell's pass (activation, weight and library cells)"
DEFAULT_LANGUAGES = ("en", "he", "ar", "ja", "hi", "ru", "zh", "fr")
CALIBRATION_SETS = ("en", "mix", "per_language", "heldout")
WEIGHT_METHODS = ("absmax", "sweep", "imatrix", "imatrix_minimax")
SETTING_RE = re.compile(r"^(?:w(\d+))?a(\d+)-(tensor|channel)$")


def _calibrators():
    from empirical.calibrate import CALIBRATORS, LANGUAGE_AWARE

    return CALIBRATORS, LANGUAGE_AWARE


@dataclass(frozen=True)
class Setting:
    """``w<bits>a<bits>-<granularity>`` or ``a<bits>-<granularity>``: activation bits and granularity,
    and the int weight bits (per channel, absmax) when weights are quantized too."""

    act_bits: int
    granularity: str
    weight_bits: int | None = None

    @classmethod
    def parse(cls, s: str) -> "Setting":
        m = SETTING_RE.match(s)
        if not m:
            raise protocol.ConfigError(f"--settings {s}: expected a<bits>-tensor|channel or w<bits>a<bits>-..., "
                                       "e.g. a8-tensor, w4a8-tensor, a4-channel")
        return cls(int(m.group(2)), m.group(3), int(m.group(1)) if m.group(1) else None)

    @property
    def name(self) -> str:
        return f"{'w%d' % self.weight_bits if self.weight_bits else ''}a{self.act_bits}-{self.granularity}"


@dataclass(frozen=True)
class Config:
    model: str = protocol.param("gemma-3-270m", "embedded name, tiny-* test model, local folder or hub id")
    corpus: str = protocol.param("udhr", "'udhr' (embedded) or a one-file-per-language folder (e.g. NTREX-128)")
    languages: tuple[str, ...] = protocol.param(DEFAULT_LANGUAGES, "languages (FLORES, ISO 639-1 or 639-3 codes)")
    reference: tuple[str, ...] | None = protocol.param(None, "reference group, also the 'en' calibration set "
                                                       "(none: the first language)")
    segments: int | None = protocol.param(None, "evaluation segments per language (none: all but the "
                                          "calibration ones)")
    calib_segments: int = protocol.param(3, "calibration segments per language, after the evaluation ones")
    settings: tuple[str, ...] = protocol.param(("w8a8-tensor", "a6-tensor", "a4-channel"),
                                               "activation settings: a<bits>-tensor|channel, w<bits>a<bits>-...")
    calibrators: tuple[str, ...] | None = protocol.param(None, "activation calibrators (none: all of "
                                                         "empirical.calibrate.CALIBRATORS)")
    calibration_sets: tuple[str, ...] = protocol.param(CALIBRATION_SETS, "calibration sets: en, mix, "
                                                       "per_language, heldout")
    heldout: tuple[str, ...] | None = protocol.param(None, "calibration languages of the held-out split (none: "
                                                     "the first half of --languages)")
    heldout_calibrators: tuple[str, ...] = protocol.param(("mse", "minimax", "weighted"), "calibrators run "
                                                          "on the held-out split")
    weight_bits: int | None = protocol.param(4, "bits of the weight-clipping cells (0: none)")
    weight_methods: tuple[str, ...] = protocol.param(WEIGHT_METHODS, "weight clipping: absmax, sweep, imatrix "
                                                     "(en and mix importance), imatrix_minimax")
    libraries: tuple[str, ...] = protocol.param(("quanto",), "quantization libraries run as baselines "
                                                "where installed (empirical.baselines; 'none': no library)")
    grid: str = protocol.param("int", "signed grid of activations and weights")
    max_length: int = protocol.param(512, "token window")
    metric: str = protocol.param("kl", "primary degradation estimator", choices=("kl", "bpb"))
    bootstrap: int = protocol.param(1000, "bootstrap resamples for the confidence intervals")
    device: str = protocol.param("cpu", "cpu, cuda or cuda:N")
    seed: int = protocol.param(0, "random seed")

    def __post_init__(self):
        protocol.check_corpus(self.corpus)
        langs = protocol.check_sources(self.model, self.corpus, self.languages)
        if len(langs) < 2:
            raise protocol.ConfigError("--languages: give at least two languages")
        ref = protocol.check_reference(self.reference, langs)
        settings = tuple(Setting.parse(s) for s in self.settings)
        if not settings:
            raise protocol.ConfigError("--settings: give at least one setting")
        for s in settings:
            protocol.check_bits_grid(s.act_bits, self.grid, signed="activations")
            if s.weight_bits:
                protocol.check_bits_grid(s.weight_bits, self.grid, signed="weights")
        calibrators, la = _calibrators()
        cals = tuple(calibrators) if self.calibrators is None else tuple(self.calibrators)
        for name, vals, known in (("calibrators", cals, calibrators),
                                  ("heldout-calibrators", self.heldout_calibrators, calibrators),
                                  ("calibration-sets", self.calibration_sets, CALIBRATION_SETS),
                                  ("weight-methods", self.weight_methods, WEIGHT_METHODS)):
            bad = [v for v in vals if v not in known]
            if bad:
                raise protocol.ConfigError(f"--{name}: unknown {' '.join(bad)}; known: {', '.join(known)}")
        if self.weight_bits:
            protocol.check_bits_grid(self.weight_bits, self.grid, signed="weights")
        held = langs[: max(1, len(langs) // 2)] if self.heldout is None else protocol.check_languages(
            self.heldout, flag="--heldout")
        if missing := [h for h in held if h not in langs]:
            raise protocol.ConfigError(f"--heldout: {', '.join(missing)} not among --languages")
        if "heldout" in self.calibration_sets and len(held) == len(langs):
            raise protocol.ConfigError("--heldout: give some but not all of --languages (the others are the "
                                       "languages the split never sees)")
        protocol.check_positive("segments", self.segments, optional=True)
        protocol.check_positive("calib_segments", self.calib_segments)
        protocol.check_positive("max_length", self.max_length)
        protocol.check_positive("bootstrap", self.bootstrap)
        protocol.check_device(self.device)
        libs = () if tuple(self.libraries) == ("none",) else tuple(self.libraries)
        if self.heldout is not None:
            protocol.frozen_set(self, heldout=held)
        protocol.frozen_set(self, languages=langs, reference=ref, calibrators=cals, libraries=libs,
                            settings=tuple(s.name for s in settings), weight_bits=self.weight_bits or None)

    @property
    def held(self) -> tuple[str, ...]:
        """The held-out split's calibration languages (``--heldout``, default the first half of
        ``--languages``; computed, not stored, so that changing ``--languages`` moves it)."""
        return self.heldout if self.heldout is not None else self.languages[: max(1, len(self.languages) // 2)]

    @classmethod
    def quick(cls) -> "Config":
        # three languages, four short evaluation segments, one setting, three calibrators, absmax
        # weights and the library: about a dozen passes of a few hundred tokens (activation-weighted
        # weight clipping costs about a second per Linear, so the quick run leaves it to the tests)
        return cls(languages=("en", "he", "ja"), segments=4, calib_segments=2, max_length=128, settings=("a6-tensor",),
                   calibrators=("max", "mse", "minimax"), heldout=("en", "he"), heldout_calibrators=("minimax",),
                   weight_methods=("absmax",), bootstrap=200)


def natural_corpus_args(path) -> list[str]:
    """Flags ``validate.all`` adds in a full run with a natural-text corpus: this experiment on
    that corpus instead of UDHR (UDHR's few segments per language leave little to calibrate on),
    ``NATURAL_SEGMENTS`` evaluation and ``NATURAL_CALIB`` calibration sentences per language."""
    return ["--corpus", str(path), "--segments", str(NATURAL_SEGMENTS), "--calib-segments", str(NATURAL_CALIB)]


NATURAL_SEGMENTS = 24
NATURAL_CALIB = 16


# ---- the plan ------------------------------------------------------------------------------------

def plan(c: Config) -> tuple[list[dict], list[dict]]:
    """Every cell: activation (setting x calibrator x set), library (setting x set) and weight
    (method x set) cells, with the reason for each combination left out."""
    _, la = _calibrators()
    cells, skipped = [], []
    for sname in c.settings:
        s = Setting.parse(sname)
        for cal in c.calibrators:
            for cs in c.calibration_sets:
                why = None
                if cal in la and cs in ("en", "mix"):
                    why = ("one language: LA-ACIQ is the MSE sweep" if cs == "en" else
                           "LA-ACIQ is per language: the same thresholds as per_language")
                elif cs == "heldout" and cal not in c.heldout_calibrators:
                    why = "not among --heldout-calibrators"
                elif cal == "entropy" and s.granularity == "channel":
                    why = "the entropy calibrator is per tensor (as in TensorRT and ModelOpt)"
                if why:
                    skipped.append({"setting": sname, "calibrator": cal, "set": cs, "why": why})
                else:
                    cells.append({"kind": "activation", "setting": sname, "calibrator": cal, "set": cs})
        for lib in c.libraries:
            for cs in ("en", "mix"):
                if cs in c.calibration_sets:
                    cells.append({"kind": "library", "setting": sname, "calibrator": lib, "set": cs})
    if c.weight_bits:
        for m in c.weight_methods:
            sets = {"absmax": ["none"], "sweep": ["none"], "imatrix": [x for x in ("en", "mix") if x in c.calibration_sets],
                    "imatrix_minimax": [x for x in ("per_language", "heldout") if x in c.calibration_sets]}[m]
            for cs in sets:
                cells.append({"kind": "weight", "setting": f"w{c.weight_bits}", "calibrator": m, "set": cs})
    for cell in cells:
        cell["name"] = f"{cell['setting']}/{cell['calibrator']}/{cell['set']}"
    return cells, skipped


def set_languages(cs: str, c: Config) -> list[str]:
    """The calibration languages of set ``cs``."""
    if cs == "en":
        return list(c.reference)
    if cs == "heldout":
        return list(c.held)
    return list(c.languages)


def split_segments(corpus, c: Config) -> tuple[dict, dict]:
    """Evaluation and calibration segments per language, disjoint by position: calibration takes
    the ``calib_segments`` after the first ``segments`` (all but the last ``calib_segments`` when
    ``segments`` is None). A parallel corpus uses the same positions in every language."""
    ev, cal = {}, {}
    sizes = {l: len(corpus[l]) for l in corpus.languages}
    for l, n in sizes.items():
        n_eval = c.segments if c.segments is not None else n - c.calib_segments
        if n_eval < 1 or n_eval + c.calib_segments > n:
            raise ValueError(f"{l}: {n} segments, cannot take {c.segments or 'the rest'} for evaluation and "
                             f"{c.calib_segments} disjoint ones for calibration")
        if corpus.parallel and c.segments is None:
            n_eval = min(sizes.values()) - c.calib_segments
        segs = list(corpus[l])
        ev[l] = segs[:n_eval]
        cal[l] = segs[n_eval: n_eval + c.calib_segments]
    return ev, cal


# ---- thresholds ----------------------------------------------------------------------------------

def site_thresholds(samples, calibrator: str, bits: int, granularity: str, cs: str, c: Config) -> dict:
    """Per-site thresholds of one calibrator on calibration set ``cs``; only the set's languages'
    samples are read."""
    from empirical.calibrate import calibrate

    langs = set_languages(cs, c)
    mode = "separate" if cs == "per_language" else "pooled"
    out = {}
    for site in samples.sites:
        out[site] = np.asarray(calibrate(samples.of(site, langs), calibrator, bits, c.grid, granularity, mode=mode,
                                         seed=c.seed), dtype=np.float64)
    return out


#: Version of each calibrator's rule, part of its cached thresholds' key: bump it when the rule
#: changes (then its thresholds, and through their digest its passes, are computed again).
#: ``theory`` per channel is 2 since it models each channel's mean (empirical.calibrate.ShiftTable).
CALIBRATOR_VERSIONS = {("theory", "channel"): 2}


def calibrator_version(calibrator: str, granularity: str) -> int:
    return CALIBRATOR_VERSIONS.get((calibrator, granularity), 1)


class Calibration:
    """The calibration samples (captured once, when first needed) and the thresholds, each cached as
    a safetensors file keyed by its configuration."""

    def __init__(self, model, lins, tok, texts: dict, c: Config, cache: ResultCache | None, key: dict,
                 write: bool = True):
        self.model, self.lins, self.tok, self.texts, self.c = model, lins, tok, texts, c
        self.folder = None if cache is None or cache.folder is None else cache.folder / "thresholds"
        #: whether computed thresholds are saved (a remote worker reads the driver's, writes none)
        self.write = write
        self._kept: dict = {}
        self.key = key
        self._samples = None
        self.computed = 0

    @property
    def samples(self):
        if self._samples is None:
            from empirical.actquant import capture_inputs

            self._samples = capture_inputs(self.model, self.lins, self.tok, self.texts, max_length=self.c.max_length,
                                           device=self.c.device)
        return self._samples

    def thresholds(self, calibrator: str, bits: int, granularity: str, cs: str) -> tuple[dict, Path | None]:
        """``Linear name -> threshold`` and the file that holds it."""
        from empirical.actquant import linear_thresholds, load_thresholds, save_thresholds

        meta = {**self.key, "calibrator": calibrator, "bits": bits, "granularity": granularity, "set": cs,
                "calibration_languages": set_languages(cs, self.c), "grid": self.c.grid,
                "calibrator_version": calibrator_version(calibrator, granularity)}
        path = None if self.folder is None else self.folder / f"{config_key(meta)}.safetensors"
        kept = self._kept.get(config_key(meta))
        if kept is not None:
            return kept, path
        if path is not None and path.exists():
            try:
                th, stored = load_thresholds(path)
                if stored.get("config") == meta:
                    return th, path
            except Exception:  # noqa: BLE001 - a damaged file is recomputed
                pass
        sites = site_thresholds(self.samples, calibrator, bits, granularity, cs, self.c)
        th = linear_thresholds(sites, self.samples.sites)
        self.computed += 1
        if path is not None and self.write:
            save_thresholds(path, th, {"config": meta, "sites": {k: list(v) for k, v in self.samples.sites.items()}})
        elif not self.write:  # a remote worker saves nothing: kept for the next cell that asks
            self._kept[config_key(meta)] = th
        return th, path

    def importance(self, cs: str) -> dict:
        """Per Linear: E[x_j^2] of the set's pooled tokens (``en``, ``mix``), or per language
        (``per_language``, ``heldout``: for minimax)."""
        s = self.samples
        langs = set_languages(cs, self.c)
        out = {}
        for site, members in s.sites.items():
            v = s.second_moment(site, langs) if cs in ("per_language", "heldout") else s.pooled_second_moment(site, langs)
            for name in members:
                out[name] = v
        return out


# ---- the experiment -----------------------------------------------------------------------------

@dataclass
class Built:
    """What ``run`` and a remote worker (:class:`CalibrationWorker`) both build from a ``Config``:
    the model, the evaluation and calibration text, the scoring engine, the cached passes and the
    calibration, under the same cache keys."""

    model: object
    tok: object
    meta: dict
    lins: list
    corpus: object
    ev: dict
    cal: dict
    engine: object
    key: dict
    passes: object
    calib: "Calibration"


def build(c: Config, cache, write_thresholds: bool = True) -> Built:
    """Load the model and text of ``c`` and set up its passes and calibration (``write_thresholds``:
    whether computed thresholds are saved under the cache folder; a remote worker only reads them)."""
    import torch

    from empirical.bpb import BpbEngine
    from empirical.models import load_model, model_view
    from validate._passes import ScoredPasses

    torch.manual_seed(c.seed)
    model, tok, meta = load_model(c.model, device=c.device, seed=c.seed, return_metadata=True)
    lins = model_view(model).linears
    corpus = protocol.load_corpus(c.corpus, c.languages, None)
    langs = corpus.languages
    ev, cal = split_segments(corpus, c)
    engine = BpbEngine(model, tok, ev, max_length=c.max_length, device=c.device)
    digest = protocol.corpus_digest({"eval": ev, "calib": cal})
    key = {"experiment": EXPERIMENT, "version": CELL_VERSION, "model": c.model, "corpus": c.corpus, "languages": langs,
           "max_length": c.max_length, "seed": c.seed, "texts_digest": digest}
    passes = ScoredPasses(engine, cache, key)
    calib = Calibration(model, lins, tok, cal, c, cache, {k: key[k] for k in ("model", "corpus", "texts_digest",
                                                                               "max_length", "seed")},
                        write=write_thresholds)
    return Built(model, tok, meta, lins, corpus, ev, cal, engine, key, passes, calib)


class CellPasses:
    """The pass of each cell of :func:`plan`: the setting that names it in the cache and the weight
    setting (a context manager factory) that runs it; shared by ``run`` and the remote worker.

    ``library_info`` collects what each library cell's run reported (its provenance, also cached
    beside its pass, so that a rerun reports the same call)."""

    def __init__(self, b: Built, c: Config, cache):
        self.b, self.c, self.cache = b, c, cache
        self.weight_q: dict = {}
        self.library_info: dict = {}

    def library_unavailable(self, cell: dict) -> str | None:
        """Why a library cell cannot run here (None: it can)."""
        from empirical.baselines import available

        return _library_support(cell["calibrator"], Setting.parse(cell["setting"])) or available(cell["calibrator"])

    def library_provenance_key(self, cell: dict) -> dict:
        return {**self.b.key, "library_provenance": cell["name"]}

    def pass_of(self, cell: dict):
        """``(setting, apply, thresholds file)`` of ``cell``; the file is None but for activation
        cells (whose thresholds this computes, or reads from the cache)."""
        from empirical.actquant import ActivationQuantizer, ActQuantConfig, combined
        from empirical.fakequant import FakeQuantizer, QuantConfig

        c, b, lins = self.c, self.b, self.b.lins
        setting, path = {"cell": cell["name"], "grid": c.grid}, None
        if cell["kind"] == "activation":
            s = Setting.parse(cell["setting"])
            th, path = b.calib.thresholds(cell["calibrator"], s.act_bits, s.granularity, cell["set"])
            # a pass is named by what it quantizes with: cells whose thresholds are equal (max on
            # the mix and max per language, say) share one pass
            setting = {"act": ActQuantConfig(s.act_bits, c.grid, s.granularity).key(), "thresholds": digest_of(th),
                       "weight_bits": s.weight_bits}
            weight_q = self.weight_q

            def apply(th=th, s=s):
                aq = ActivationQuantizer(lins, th, ActQuantConfig(s.act_bits, c.grid, s.granularity))
                managers = [aq.quantized()]
                if s.weight_bits:
                    wq = weight_q.setdefault(s.weight_bits, FakeQuantizer(lins, QuantConfig(bits=s.weight_bits, grid=c.grid)))
                    managers.insert(0, wq.quantized())
                return combined(*managers)
        elif cell["kind"] == "weight":
            def apply(cell=cell):
                qcfg = QuantConfig(bits=c.weight_bits, grid=c.grid, granularity="channel",
                                   clipping="sweep" if cell["calibrator"] == "sweep" else "absmax")
                if cell["calibrator"] in ("absmax", "sweep"):
                    return FakeQuantizer(lins, qcfg, seed=c.seed).quantized()
                from empirical.weight_clipping import ImportanceQuantizer

                mode = "minimax" if cell["calibrator"] == "imatrix_minimax" else "mean"
                return ImportanceQuantizer(lins, qcfg, b.calib.importance(cell["set"]), mode=mode).quantized()
        else:  # library
            s = Setting.parse(cell["setting"])
            cache, info = self.cache, self.library_info

            def apply(cell=cell, s=s):
                from empirical.baselines import LibraryQuantizer

                lq = LibraryQuantizer(b.model, cell["calibrator"], weight_bits=s.weight_bits, act_bits=s.act_bits)
                lq.calibrate(library_batches(b.tok, b.cal, set_languages(cell["set"], c), c.max_length, c.device))
                info[cell["name"]] = lq.provenance()
                if cache is not None:
                    cache.put(self.library_provenance_key(cell), info[cell["name"]])
                return lq.quantized()
        return setting, apply, path


def calibration_tokens_key(b: Built) -> dict:
    """Cache key of a worker's report of the calibration tokens it captured (the driver of a
    distributed run captures none for the passes that need only the samples, imatrix's)."""
    return {**b.calib.key, "calibration_tokens": 1}


def run(config: Config, cache: ResultCache | None = None) -> protocol.Result:
    """The baseline and one pass per distinct quantizer of :func:`plan`'s cells; statistics, the
    comparisons and the verdict from the cached scores.

    Under a Ray executor (``--executor ray``) the passes are computed on the workers
    (:class:`CalibrationWorker`) in one grid ahead of being read from the cache. The driver
    calibrates the activation cells first (a pass is named by its thresholds' digest, so the
    driver needs them to know which passes are cached); a worker on the same machine reads those
    thresholds from the cache, one elsewhere calibrates itself and checks it found the same digest."""
    from validate._executor import WorkerSpec, current

    c = config
    b = build(c, cache)
    meta, corpus, ev, cal, engine = b.meta, b.corpus, b.ev, b.cal, b.engine
    passes, calib = b.passes, b.calib
    langs = corpus.languages
    overlap = {l: len(set(ev[l]) & set(cal[l])) for l in langs}
    cp = CellPasses(b, c, cache)
    cells, skipped = plan(c)
    bar = protocol.progress(total=1 + len(cells), desc="forward passes", unit="pass")
    remote_run, imatrix_remote = 0, False
    if current().prefetches:  # the baseline and every cell's pass on the workers, one grid
        tasks = [passes.task({}, {"cell": None}, "baseline")]
        for cell in cells:
            if cell["kind"] == "library" and cp.library_unavailable(cell) is not None:
                continue
            setting = cp.pass_of(cell)[0]
            tasks.append(passes.task(setting, {"cell": dict(cell), "thresholds": setting.get("thresholds")},
                                     cell["name"]))
        # whether the workers compute a pass that needs the calibration samples (imatrix's)
        imatrix_remote = any(t.payload["cell"] and t.payload["cell"]["calibrator"].startswith("imatrix")
                             and (cache is None or cache.get(t.key) is None) for t in tasks)
        spec = WorkerSpec(f"{__name__}:calibration_worker",
                          (c, None if cache is None or cache.folder is None else str(cache.folder)), c.device)
        remote_run = current().map(spec, tasks, cache=cache, bar=bar).computed
    base = passes.get({})
    bar.update()
    n_bytes = {l: engine.n_bytes[l] for l in langs}
    results, exported = [], {}
    library_info = cp.library_info
    for cell in cells:
        if cell["kind"] == "library":
            why = cp.library_unavailable(cell)
            if why is not None:
                library_info[cell["name"]] = why
                bar.update()
                continue
            from empirical.baselines import library_version

            # the library's provenance is cached beside its pass, so a rerun reports the same call
            cached = cache.get(cp.library_provenance_key(cell)) if cache is not None else None
            library_info[cell["name"]] = cached or {"library": cell["calibrator"],
                                                    "version": library_version(cell["calibrator"]),
                                                    "note": "pass read from the cache; provenance not recorded"}
        setting, apply, path = cp.pass_of(cell)
        if cell["kind"] == "activation":
            if cell["calibrator"] in ("minimax", "weighted") and path is not None:
                exported[cell["name"]] = path
            cell["thresholds_digest"] = setting["thresholds"]
        scores = passes.get(setting, apply)
        bar.update()
        results.append({**cell, **cell_stats(scores, base, engine.tokens, n_bytes, c, corpus.parallel)})
        results[-1]["_scores"] = scores
    bar.close()
    comparisons = compare(results, base, c, corpus.parallel)
    for r in results:
        r.pop("_scores", None)
    calibration_tokens = calib._samples.tokens if calib._samples is not None else None
    if calibration_tokens is None and imatrix_remote:  # the workers captured the samples
        calibration_tokens = cache.get(calibration_tokens_key(b))
    data = {
        "model_metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "baseline_note": ("baseline is the dequantized Q4_K_M GGUF (weights already quantized to about 4-5 "
                          "bits before this experiment)") if meta.get("prequantized") else
                         "baseline is the model's own weights",
        "metric": c.metric, "languages": langs, "reference": list(c.reference), "heldout": list(c.held),
        "unseen": [l for l in langs if l not in c.held],
        "segments": {"evaluation": {l: len(ev[l]) for l in langs}, "calibration": {l: len(cal[l]) for l in langs},
                     "text_overlap": overlap},
        "calibration_tokens": calibration_tokens,
        "scored_tokens_per_pass": int(sum(v.sum() for v in engine.tokens.values())),
        "cells": results, "skipped": skipped, "libraries": library_info,
        "comparisons": comparisons, "verdict": verdict(comparisons, c),
        "exported_thresholds": {k: str(v) for k, v in exported.items()},
    }
    return protocol.Result(EXPERIMENT, config, data,
                           timing={"forward_passes_run": passes.run_count + remote_run,
                                   "thresholds_computed": calib.computed})


class CalibrationWorker:
    """The cells' passes on a remote worker (``validate._executor.Worker``): the same model, text,
    calibration and cache keys as ``run``'s (:func:`build`), built once. The payload
    ``{"cell": None}`` is the baseline; ``{"cell": <a cell of plan(c)>, "thresholds": digest}`` is
    that cell's pass. An activation cell's thresholds are read from the driver's cache folder where
    this machine sees it, else calibrated here; their digest must be the driver's (``thresholds``),
    or the pass would be cached under a key the driver never reads. Returns the cache entries the
    pass produced (the recorded baseline's among them, the first time; a library's provenance; the
    calibration tokens once the samples were captured here)."""

    def __init__(self, c: Config, folder: str | None = None):
        from validate._executor import RecordingCache

        self.c = c
        self.cache = RecordingCache(read_from=folder)
        self.b = build(c, self.cache, write_thresholds=False)
        self.cells = CellPasses(self.b, c, self.cache)
        self.plan = {cell["name"]: cell for cell in plan(c)[0]}

    def compute(self, payload) -> list:
        cell = payload.get("cell")
        if cell is None:
            self.b.passes.get({})
        else:
            known = self.plan.get(cell.get("name"))
            if known is None or any(cell.get(k) != v for k, v in known.items()):
                raise ValueError(f"cell {cell.get('name')!r} is not a cell of this run's plan")
            if known["kind"] == "library" and (why := self.cells.library_unavailable(known)) is not None:
                raise RuntimeError(f"{known['name']}: {why}")
            setting, apply, _ = self.cells.pass_of(dict(known))
            if setting.get("thresholds") != payload.get("thresholds"):
                raise RuntimeError(f"{known['name']}: this worker's thresholds have digest "
                                   f"{setting.get('thresholds')}, the driver's {payload.get('thresholds')} "
                                   "(is calibration deterministic here?)")
            self.b.passes.get(setting, apply)
        if self.b.calib._samples is not None:
            self.cache.put(calibration_tokens_key(self.b), self.b.calib._samples.tokens)
        return self.cache.drain()


def calibration_worker(c: Config, folder: str | None = None) -> CalibrationWorker:
    """A remote worker's passes (``validate._executor.WorkerSpec`` factory); ``folder`` is the
    driver's cache folder, read where this machine sees it."""
    return CalibrationWorker(c, folder)


def digest_of(thresholds: dict) -> str:
    """sha256 of a ``Linear name -> threshold`` mapping's exact float64 bytes, names sorted."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(thresholds):
        a = np.asarray(thresholds[k], dtype=np.float64)
        h.update(k.encode() + b"\0" + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()[:24]


def _library_support(library: str, s: Setting) -> str | None:
    """None when ``library`` can run setting ``s``, else why not (quanto 0.2.7: static int8
    per-tensor activations, int4/int8 weights, never activations alone)."""
    if s.act_bits != 8 or s.granularity != "tensor":
        return f"{library} quantizes activations to static int8 per tensor only"
    if s.weight_bits not in (4, 8):
        return f"{library} 0.2.7 cannot quantize activations alone (its W8A8 is the comparable setting)"
    return None


LIBRARY_BATCH = 8  # calibration segments per batch of the library's own calibration


def library_batches(tok, texts: dict, langs: list[str], max_length: int, device) -> list[dict]:
    """The calibration segments of ``langs``, the languages interleaved, ``LIBRARY_BATCH`` per
    batch: the library's momentum average weights later batches less, so a set ordered by language
    would favour its first language. The library's absmax also sees the right-padding positions of
    a batch (quanto reads the whole input tensor); one segment per batch would avoid that at about
    ten times its calibration cost, which is already tens of our quantized passes."""
    from empirical.actquant import calibration_batches

    order = [texts[l][i] for i in range(max(len(texts[l]) for l in langs)) for l in langs if i < len(texts[l])]
    return list(calibration_batches(tok, order, max_length=max_length, batch_size=LIBRARY_BATCH, device=device))


def cell_stats(s, base, tokens, n_bytes, c: Config, parallel: bool) -> dict:
    """Each language's degradation with its interval, the disparity, the worst language (over all
    languages and over the languages the held-out split never saw) and English's cost."""
    from empirical.disparity import metric_summary

    summ = metric_summary(s.nll, base.nll, s.kl, s.agree, tokens, list(c.reference), parallel, c.bootstrap, c.seed,
                          n_bytes=n_bytes)
    m = c.metric if c.metric in summ else "bpb"
    p = summ[m]
    d = p["degradation"]
    worst = max(d, key=d.get)
    unseen = [l for l in d if l not in c.held]
    wu = max(unseen, key=d.get) if unseen else None
    ref = list(c.reference)
    return {"metric": m, "degradation": d, "degradation_ci": p["degradation_ci"],
            "disparity": p["disparity"], "disparity_ci": p["disparity_ci"], "resolved": p["resolved"],
            "worst_language": worst, "worst": d[worst], "worst_ci": p["degradation_ci"][worst],
            "worst_unseen_language": wu, "worst_unseen": d[wu] if wu else None,
            "reference_degradation": float(np.mean([d[r] for r in ref])),
            "reference_ci": p["degradation_ci"][ref[0]] if len(ref) == 1 else None,
            "top1_agreement": summ.get("top1_agreement")}


def compare(results: list[dict], base, c: Config, parallel: bool) -> list[dict]:
    """LA-ACIQ (and activation-weighted minimax) cells against every baseline of the same setting:
    paired bootstrap differences of the worst language's degradation and of English's."""
    from empirical.disparity import paired_difference

    out = []
    la = {"minimax", "weighted", "imatrix_minimax"}
    for a in results:
        if a["calibrator"] not in la:
            continue
        for b in results:
            if b["setting"] != a["setting"] or b["calibrator"] in la or b["set"] == "heldout":
                continue
            if a["set"] == "heldout" and b["set"] not in ("en", "none"):
                continue
            # a held-out calibration is judged on the languages it never saw
            unseen = [l for l in a["degradation"] if l not in c.held] if a["set"] == "heldout" else None
            pd = paired_difference((a["_scores"].nll, a["_scores"].kl), (b["_scores"].nll, b["_scores"].kl),
                                   base.nll, a["metric"], parallel, c.bootstrap, c.seed, worst_over=unseen)
            ref = c.reference[0]
            row = {"setting": a["setting"], "method": a["name"], "baseline": b["name"], "baseline_set": b["set"],
                   "baseline_kind": b["kind"], "worst": pd["worst"], "reference": pd["language"][ref],
                   "language": pd["language"]}
            out.append(row)
    return out


def verdict(comparisons: list[dict], c: Config) -> dict:
    """Per setting and language-aware method: against how many English-calibrated baselines its
    worst-language degradation is lower (interval below 0), not different, or higher; and the
    English cost against the English baseline with the lowest worst-language degradation."""
    out = {}
    for row in comparisons:
        # the multilingual counterpart that needs no language-aware rule: the MSE sweep (weights:
        # activation-weighted clipping) calibrated on the token-weighted mix
        if row["baseline"] in (f"{row['setting']}/mse/mix", f"{row['setting']}/imatrix/mix"):
            v = out.setdefault(row["method"], {"setting": row["setting"], "lower": [], "not_resolved": [], "higher": []})
            v["against_mix"] = {"name": row["baseline"], "worst": row["worst"]["b"], "diff": row["worst"]["diff"],
                                "ci": row["worst"]["ci"], "resolved": row["worst"]["resolved"],
                                "reference_diff": row["reference"]["diff"], "reference_ci": row["reference"]["ci"]}
        if row["baseline_set"] not in ("en", "none"):
            continue
        v = out.setdefault(row["method"], {"setting": row["setting"], "lower": [], "not_resolved": [], "higher": []})
        w = row["worst"]
        (v["lower"] if w["resolved"] and w["diff"] < 0 else v["higher"] if w["resolved"] else v["not_resolved"]).append(
            row["baseline"])
        best = v.get("best_english_baseline")
        if best is None or w["b"] < best["worst"]:
            v["best_english_baseline"] = {"name": row["baseline"], "worst": w["b"], "diff": w["diff"], "ci": w["ci"],
                                          "reference_diff": row["reference"]["diff"],
                                          "reference_ci": row["reference"]["ci"]}
    for v in out.values():
        n = len(v["lower"]) + len(v["not_resolved"]) + len(v["higher"])
        v["baselines"] = n
        v["lower_than_every_english_baseline"] = bool(n and len(v["lower"]) == n)
    return out


# ---- output -------------------------------------------------------------------------------------

def write(result: protocol.Result, out: Path) -> list[Path]:
    import shutil

    cells = result["cells"]
    rows = []
    for r in cells:
        row = {k: r[k] for k in ("setting", "kind", "calibrator", "set", "metric", "worst_language", "worst",
                                 "reference_degradation", "disparity")}
        row["worst_low"], row["worst_high"] = r["worst_ci"]
        row["D_low"], row["D_high"] = r["disparity_ci"]
        row["worst_unseen"] = r["worst_unseen"]
        for l, v in r["degradation"].items():
            row[f"d_{l}"] = v
        rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    files = [write_csv(out / "cells.csv", rows, cols)]
    table = [{"setting": Tex(tex_text(r["setting"])), "method": Tex(tex_text(f"{r['calibrator']} ({r['set']})")),
              "ref": r["reference_degradation"], "worst": r["worst"], "lo": r["worst_ci"][0], "hi": r["worst_ci"][1],
              "wl": Tex(tex_text(r["worst_language"].split("_")[0])), "D": r["disparity"]} for r in cells]
    files.append(write_latex_table(
        out / "language_calibration_table.tex", table, ["setting", "method", "ref", "worst", "lo", "hi", "wl", "D"],
        headers=["setting", "calibrator (set)", "$d_{\\mathrm{ref}}$", "worst $d_l$", "2.5\\%", "97.5\\%", "worst",
                 "$D$"],
        caption=("Every calibrator and calibration set: the reference language's degradation, the worst "
                 f"language's with its 95\\% paired bootstrap interval ({tex_text(result['metric'])} estimator), "
                 "which language that is, and the disparity."),
        label="tab:language-calibration", digits=3))
    exp = out / "thresholds"
    for name, src in (result.get("exported_thresholds") or {}).items():
        if Path(src).exists():
            exp.mkdir(parents=True, exist_ok=True)
            dst = exp / (name.replace("/", "__") + ".safetensors")
            shutil.copyfile(src, dst)
            files.append(dst)
    files += plot(result, out)
    files.append(write_json(out / f"{EXPERIMENT}.json", result.to_json()))
    return files


def plot(result: protocol.Result, out: Path) -> list[Path]:
    use_agg()
    import matplotlib.pyplot as plt

    cells = result["cells"]
    settings = list(dict.fromkeys(r["setting"] for r in cells))
    fig, axes = plt.subplots(1, len(settings), figsize=(3.3 * len(settings) + 0.6, 3.4), squeeze=False)
    cals = list(dict.fromkeys(r["calibrator"] for r in cells))
    markers = {"en": "o", "mix": "s", "per_language": "D", "heldout": "^", "none": "x"}
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

    palette = plt.get_cmap("tab20")

    for ax, sname in zip(axes[0], settings):
        for r in (x for x in cells if x["setting"] == sname):
            col = palette(cals.index(r["calibrator"]) % 20)
            lo, hi = r["worst_ci"]
            ax.errorbar([r["reference_degradation"]], [r["worst"]],
                        yerr=[[max(r["worst"] - lo, 0)], [max(hi - r["worst"], 0)]], fmt=markers.get(r["set"], "o"),
                        color=col, ms=5, lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
        ax.plot(lims, lims, color="0.7", lw=0.6, zorder=0)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(LogFormatterSciNotation())
            axis.set_minor_formatter(NullFormatter())
        ax.set_title(sname, fontsize=9)
        ax.set_xlabel("reference language's degradation", fontsize=8)
        ax.set_ylabel("worst language's degradation", fontsize=8)
        ax.tick_params(labelsize=7)
    handles = [Line2D([], [], color=palette(i % 20), marker="s", ls="", ms=5, label=k) for i, k in enumerate(cals)]
    handles += [Line2D([], [], color="0.3", marker=m, ls="", ms=5, label=k.replace("_", " "))
                for k, m in markers.items() if any(x["set"] == k for x in cells)]
    fig.legend(handles=handles, fontsize=6, loc="lower center", ncol=min(8, len(handles)), frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    files = [save_figure(fig, out / f"{EXPERIMENT}.png")]
    plt.close(fig)
    return files


def summary(result: protocol.Result) -> str:
    parts = []
    for method, v in (result.get("verdict") or {}).items():
        if method.endswith("/minimax/per_language"):
            mix = v.get("against_mix")
            parts.append(f"{method}: worst lower than {len(v['lower'])}/{v['baselines']} English baselines"
                         + (f", {mix['diff']:+.3f} [{mix['ci'][0]:+.3f}, {mix['ci'][1]:+.3f}] against {mix['name']}"
                            if mix else ""))
    return "; ".join(parts)


def _cell(result, name):
    return next((r for r in result.get("cells", []) if r.get("name") == name), None)


def macros(result: protocol.Result) -> MacroSet:
    """The headline setting's numbers (the first of ``--settings``): LA-ACIQ minimax's worst
    language against the English-calibrated baselines, and the weight cells; n/a where absent."""
    ms = MacroSet(f"{EXPERIMENT}.json")
    cfg = result.config_dict
    settings = list(cfg.get("settings") or [])
    head = settings[0] if settings else None
    ms.add("CalibHeadlineSetting", head, "provenance.config.settings[0]")
    ms.add("CalibSettings", len(settings) if settings else None, "provenance.config.settings")
    ms.add("CalibCells", len(result.get("cells") or []) or None, "cells")
    pcts = [x[1:] for x in cfg.get("calibrators") or [] if re.fullmatch(r"p[0-9.]+", x)]
    ms.add("CalibPercentiles", " and ".join(pcts) or None, "provenance.config.calibrators")
    ms.add("CalibTokens", result.get("scored_tokens_per_pass"), "scored_tokens_per_pass")
    corpus = cfg.get("corpus")
    ms.add("CalibCorpus", None if corpus is None else ("UDHR" if corpus == "udhr" else Path(corpus).name),
           "provenance.config.corpus")
    seg = (result.get("segments") or {}).get("calibration") or {}
    ms.add("CalibCalibSegments", max(seg.values()) if seg else None, "segments.calibration")
    for tag, name in (("Minimax", f"{head}/minimax/per_language"), ("Weighted", f"{head}/weighted/per_language"),
                      ("Imatrix", f"w{cfg.get('weight_bits')}/imatrix_minimax/per_language")):
        r = _cell(result, name) or {}
        ci = r.get("worst_ci") or (None, None)
        ms.add(["Calib", tag, "Worst"], r.get("worst"), f"cells[{name}].worst", percent=True)
        ms.add(["Calib", tag, "Worst", "Low"], ci[0], f"cells[{name}].worst_ci[0]", percent=True)
        ms.add(["Calib", tag, "Worst", "High"], ci[1], f"cells[{name}].worst_ci[1]", percent=True)
        ms.add(["Calib", tag, "Worst", "Language"], (r.get("worst_language") or "").split("_")[0] or None,
               f"cells[{name}].worst_language")
        ms.add(["Calib", tag, "Reference"], r.get("reference_degradation"), f"cells[{name}].reference_degradation",
               percent=True)
        v = (result.get("verdict") or {}).get(name) or {}
        ms.add(["Calib", tag, "Lower"], len(v["lower"]) if v else None, f"verdict[{name}].lower")
        ms.add(["Calib", tag, "Higher"], len(v["higher"]) if v else None, f"verdict[{name}].higher")
        ms.add(["Calib", tag, "Baselines"], v.get("baselines"), f"verdict[{name}].baselines")
        best = v.get("best_english_baseline") or {}
        bci = best.get("ci") or (None, None)
        rci = best.get("reference_ci") or (None, None)
        ms.add(["Calib", tag, "Best", "Baseline"], best.get("name"), f"verdict[{name}].best_english_baseline.name")
        ms.add(["Calib", tag, "Best", "Worst"], best.get("worst"), f"verdict[{name}].best_english_baseline.worst",
               percent=True)
        ms.add(["Calib", tag, "Diff"], best.get("diff"), f"verdict[{name}].best_english_baseline.diff", percent=True)
        ms.add(["Calib", tag, "Diff", "Low"], bci[0], f"verdict[{name}].best_english_baseline.ci[0]", percent=True)
        ms.add(["Calib", tag, "Diff", "High"], bci[1], f"verdict[{name}].best_english_baseline.ci[1]", percent=True)
        ms.add(["Calib", tag, "Reference", "Diff"], best.get("reference_diff"),
               f"verdict[{name}].best_english_baseline.reference_diff", percent=True)
        ms.add(["Calib", tag, "Reference", "Diff", "Low"], rci[0], f"verdict[{name}].best_english_baseline.reference_ci[0]",
               percent=True)
        ms.add(["Calib", tag, "Reference", "Diff", "High"], rci[1], f"verdict[{name}].best_english_baseline.reference_ci[1]",
               percent=True)
        mix = v.get("against_mix") or {}
        mci = mix.get("ci") or (None, None)
        ms.add(["Calib", tag, "Mix", "Baseline"], mix.get("name"), f"verdict[{name}].against_mix.name")
        ms.add(["Calib", tag, "Mix", "Worst"], mix.get("worst"), f"verdict[{name}].against_mix.worst", percent=True)
        ms.add(["Calib", tag, "Mix", "Diff"], mix.get("diff"), f"verdict[{name}].against_mix.diff", percent=True)
        ms.add(["Calib", tag, "Mix", "Diff", "Low"], mci[0], f"verdict[{name}].against_mix.ci[0]", percent=True)
        ms.add(["Calib", tag, "Mix", "Diff", "High"], mci[1], f"verdict[{name}].against_mix.ci[1]", percent=True)
    # over every activation setting: where minimax beats every English baseline, and where the
    # mix-calibrated MSE sweep is lower (resolved), not different, or higher than minimax
    verdicts = [v for k, v in (result.get("verdict") or {}).items() if k.endswith("/minimax/per_language")
                and not k.startswith("w%s/" % cfg.get("weight_bits"))]
    ms.add("CalibSettingsMinimaxBeatsEnglish", sum(bool(v.get("lower_than_every_english_baseline")) for v in verdicts)
           if verdicts else None, "verdict[*/minimax/per_language].lower_than_every_english_baseline")
    mixes = [v["against_mix"] for v in verdicts if v.get("against_mix")]
    ms.add("CalibSettingsMixLower", sum(m["resolved"] and m["diff"] > 0 for m in mixes) if mixes else None,
           "verdict[*/minimax/per_language].against_mix")
    ms.add("CalibSettingsMixSame", sum(not m["resolved"] for m in mixes) if mixes else None,
           "verdict[*/minimax/per_language].against_mix")
    ms.add("CalibSettingsMixHigher", sum(m["resolved"] and m["diff"] < 0 for m in mixes) if mixes else None,
           "verdict[*/minimax/per_language].against_mix")
    name = f"{head}/minimax/heldout"
    v = (result.get("verdict") or {}).get(name) or {}
    r = _cell(result, name) or {}
    ms.add("CalibHeldoutLower", len(v["lower"]) if v else None, f"verdict[{name}].lower")
    ms.add("CalibHeldoutBaselines", v.get("baselines"), f"verdict[{name}].baselines")
    ms.add("CalibHeldoutWorstUnseen", r.get("worst_unseen"), f"cells[{name}].worst_unseen", percent=True)
    ms.add("CalibHeldoutLanguages", ", ".join(l.split("_")[0] for l in result.get("heldout") or []) or None, "heldout")
    libs = result.get("libraries") or {}
    ran = [v for v in libs.values() if isinstance(v, dict)]
    ms.add("CalibLibrary", (ran[0].get("library") if ran else None), "libraries[].library")
    ms.add("CalibLibraryVersion", (ran[0].get("version") if ran else None), "libraries[].version")
    lib_cells = [x for x in result.get("cells") or [] if x.get("kind") == "library" and x.get("setting") == head]
    for cs in ("en", "mix"):
        x = next((y for y in lib_cells if y["set"] == cs), {})
        tag = {"en": "En", "mix": "Mix"}[cs]
        ms.add(["Calib", "Library", tag, "Worst"], x.get("worst"), f"cells[{head}/<library>/{cs}].worst", percent=True)
        ms.add(["Calib", "Library", tag, "Reference"], x.get("reference_degradation"),
               f"cells[{head}/<library>/{cs}].reference_degradation", percent=True)
    return ms


main = protocol.entry_point(__name__)


if __name__ == "__main__":
    raise SystemExit(main())
