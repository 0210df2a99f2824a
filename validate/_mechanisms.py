"""What the mechanism experiments share (issue #17): their common parameters, the loaded model
and text, each block's measured quantization damage per language, and correlations with
bootstrap intervals.

The mechanism experiments (``validate.residual_ablation``, ``validate.cka``,
``validate.distribution_shift``, ``validate.gradient_norms``, ``validate.outliers``,
``validate.bottleneck``, ``validate.cross_architecture``) each relate a per-block or per-language
statistic of the model to the damage that quantizing it does. That damage is measured once here,
the way ``validate.phase_transition`` measures its single-unit damages: one pass per decoder
block with only that block's Linears fake-quantized (``empirical.fakequant``), scored as KL
degradation (and bits per byte) per language against the full-precision model. The passes are
cached in a cache *shared by the mechanism experiments of one results folder*
(``<results>/_shared/block_damage``), keyed by content, so the seven modules measure it once.

Per-language forward passes with hooks (hidden states, attention, gradients) use
:func:`language_windows`: each segment alone, from BOS, truncated to ``max_length`` tokens, with no
padding, so every position is real text of one language.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from validate import _protocol as protocol
from validate._common import ResultCache

__all__ = [
    "MechanismConfig", "Setup", "setup", "block_damage", "block_passes", "block_key", "BlockDamage", "language_windows",
    "correlation_ci", "resolved", "shared_cache", "DAMAGE_VERSION", "METHODS",
    "base_config", "block_passes_worker", "worker_setup", "worker_block_passes", "LanguageWorker",
]

DAMAGE_VERSION = 1
METHODS = ("spearman", "pearson")


@dataclass(frozen=True)
class MechanismConfig:
    """Parameters every mechanism experiment has; a module's ``Config`` subclasses it (adding its
    own fields, all with defaults) and calls ``super().__post_init__()`` first."""

    model: str = protocol.param("gemma-3-270m", "embedded name (gemma-3-270m, smollm2-135m), tiny-* test "
                                "model, local folder or hub id")
    corpus: str = protocol.param("udhr", "'udhr' (embedded) or a one-file-per-language folder")
    languages: tuple[str, ...] = protocol.param(("en", "he", "ar", "ja", "hi", "ru", "zh", "fr"),
                                                "languages (FLORES, ISO 639-1 or 639-3 codes)")
    reference: tuple[str, ...] | None = protocol.param(None, "reference group (none: the first language)")
    segments: int | None = protocol.param(16, "segments per language (none: all)")
    max_length: int = protocol.param(256, "tokens per segment window")
    bits: int = protocol.param(4, "weight bit width of the quantized model whose damage is explained")
    grid: str = protocol.param("int", "signed grid: aciq, midrise, midtread or int")
    granularity: str = protocol.param("channel", "one alpha per tensor, output channel or group",
                                      choices=("tensor", "channel", "group"))
    group_size: int = protocol.param(128, "weights per group (granularity group)")
    clipping: str = protocol.param("absmax", "how each channel's alpha is chosen",
                                   choices=("absmax", "theory", "sweep"))
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
        if self.granularity == "group" and self.group_size < 2:
            raise protocol.ConfigError(f"--group-size must be >= 2, got {self.group_size}")
        protocol.check_device(self.device)
        protocol.frozen_set(self, languages=langs, reference=ref, grid=grid)

    @classmethod
    def quick(cls) -> "MechanismConfig":
        """Smoke size: three languages of three scripts, a few short segments."""
        return cls(languages=("en", "he", "ja"), segments=3, max_length=64, bootstrap=200)

    def quant_config(self):
        from empirical.fakequant import QuantConfig

        return QuantConfig(bits=self.bits, grid=self.grid, granularity=self.granularity,
                           group_size=self.group_size, clipping=self.clipping)

    def text_key(self) -> dict:
        """What identifies the model and text (part of every cache key)."""
        return {"model": self.model, "corpus": self.corpus, "languages": list(self.languages),
                "segments": self.segments, "max_length": self.max_length, "seed": self.seed}


@dataclass
class Setup:
    """The loaded model and text of one run."""

    config: MechanismConfig
    model: Any
    tokenizer: Any
    metadata: dict
    corpus: Any
    languages: list[str]   # normalised (FLORES) codes, in order
    reference: list[str]
    view: Any              # empirical.models.ModelView
    key: dict              # text_key() plus the corpus digest

    @property
    def n_blocks(self) -> int:
        return len(self.block_names)

    @property
    def block_names(self) -> list[str]:
        return sorted({f"block{q.block}" for q in self.view.linears if q.block is not None},
                      key=lambda s: int(s[5:]))

    def block_linears(self) -> list[list]:
        """The quantizable Linears of each decoder block, in block order."""
        out: dict[int, list] = {}
        for q in self.view.linears:
            if q.block is not None:
                out.setdefault(q.block, []).append(q)
        return [out[b] for b in sorted(out)]

    def windows(self) -> dict[str, list]:
        from empirical.devices import resolve_device

        # on the model's execution device (also for --device auto/offload, where that is not the flag)
        return language_windows(self.tokenizer, self.corpus, self.languages, self.config.max_length,
                                resolve_device(self.model, self.config.device))


def setup(c: MechanismConfig) -> Setup:
    """Load the model (seeded, in evaluation mode) and the text of ``c``."""
    import torch

    from empirical.models import load_model, model_view

    torch.manual_seed(c.seed)
    model, tok, meta = load_model(c.model, device=c.device, seed=c.seed, return_metadata=True)
    model.eval()
    corpus = protocol.load_corpus(c.corpus, c.languages, c.segments)
    key = {**c.text_key(), "corpus_digest": protocol.corpus_digest(corpus)}
    return Setup(c, model, tok, dict(meta or {}), corpus, list(corpus.languages), list(c.reference),
                 model_view(model), key)


def language_windows(tokenizer, corpus, languages: Sequence[str], max_length: int, device="cpu") -> dict[str, list]:
    """Per language, one ``(1, T)`` LongTensor per segment: BOS then the segment's tokens,
    truncated to ``max_length`` (no padding, so every position is that language's text)."""
    import torch

    from empirical.bpb import _start_id

    bos = _start_id(tokenizer)
    out: dict[str, list] = {}
    for lang in languages:
        segs = corpus[lang]
        if not segs:
            raise ValueError(f"no text for language {lang!r}")
        enc = tokenizer(list(segs), add_special_tokens=False)["input_ids"]
        out[lang] = [torch.tensor([[bos, *ids][:max_length]], dtype=torch.long, device=device)
                     for ids in enc if len(ids) > 0]
        if not out[lang]:
            raise ValueError(f"language {lang!r}: every segment tokenizes to nothing")
    return out


def shared_cache(cache: ResultCache | None, name: str = "block_damage") -> ResultCache | None:
    """A cache shared by the experiments of one results folder: ``<results>/_shared/<name>`` when
    ``cache`` is the protocol's ``<results>/<experiment>/cache`` (None stays None)."""
    if cache is None or cache.folder is None:
        return None
    return ResultCache(Path(cache.folder).parent.parent / "_shared" / name)


@dataclass
class BlockDamage:
    """Each block's single-block quantization damage per language.

    Attributes
    ----------
    blocks : list of str
    languages : list of str
    kl, bpb : np.ndarray, shape (languages, blocks)
        Relative degradation (``empirical.disparity.degradation``) with only that block quantized,
        KL estimator (None when the model gives no KL) and bits per byte.
    baseline_bpb : dict language -> float
    passes_run : int
        Forward passes computed in this call (0 when every pass was cached).
    """

    blocks: list[str]
    languages: list[str]
    kl: np.ndarray | None
    bpb: np.ndarray
    baseline_bpb: dict
    passes_run: int
    tokens: dict = dataclasses.field(default_factory=dict)

    def metric(self, name: str = "kl") -> np.ndarray:
        m = self.kl if name == "kl" else self.bpb
        if m is None:
            raise ValueError(f"no {name} damage (the model gives no KL); use bpb")
        return m

    def ranking(self, metric: str = "kl") -> list[int]:
        """Blocks from the most to the least damaging, by the mean damage over languages."""
        return [int(i) for i in np.argsort(-self.metric(metric).mean(axis=0), kind="stable")]

    def to_json(self) -> dict:
        return {"blocks": self.blocks, "languages": self.languages,
                "kl": None if self.kl is None else self.kl.tolist(), "bpb": self.bpb.tolist(),
                "baseline_bpb": self.baseline_bpb, "passes_run": self.passes_run,
                "ranking_kl": [self.blocks[i] for i in self.ranking("kl")] if self.kl is not None else None,
                "ranking_bpb": [self.blocks[i] for i in self.ranking("bpb")]}


def block_key(s: Setup) -> dict:
    """The cache key every pass of ``s``'s quantized blocks shares (text, model, quantizer)."""
    return {**s.key, "quant": s.config.quant_config().key(), "unit": "block", "damage_version": DAMAGE_VERSION}


def block_passes(s: Setup, cache: ResultCache | None = None, quantizer=None):
    """Scored passes (``validate._passes.Passes``) of ``s``'s decoder blocks, each unit one block,
    cached in the shared cache under :func:`block_key`.

    With the default quantizer (the config's, over every block's Linears) one ``Passes`` is kept
    per setup and cache folder, so that every experiment step reuses its engine and recorded
    baseline; ``run_count`` then counts the passes of all of them (take differences). These
    passes carry a worker spec (:func:`block_passes_worker`), so ``Passes.prefetch`` can compute
    them on remote workers (``validate._executor``), which write into the same shared cache; a
    custom ``quantizer`` has none (its passes run in this process only).
    """
    sc = shared_cache(cache)
    memo = s.__dict__.setdefault("_block_passes", {})
    slot = None if sc is None else str(sc.folder)
    if quantizer is None and slot in memo:
        return memo[slot]
    spec = None
    if quantizer is None:
        from validate._executor import WorkerSpec

        spec = WorkerSpec(f"{__name__}:block_passes_worker", (base_config(s.config), slot), s.config.device)
    passes = _block_passes(s, sc, quantizer, spec)
    if quantizer is None:
        memo[slot] = passes
    return passes


def _block_passes(s: Setup, cache, quantizer=None, spec=None):
    """The ``Passes`` of ``s``'s blocks over ``cache`` (the shared cache itself, or a worker's
    ``RecordingCache``): one engine over the setup's text, the config's quantizer unless given."""
    from empirical.bpb import BpbEngine
    from empirical.fakequant import FakeQuantizer
    from validate._passes import Passes

    c = s.config
    lins = s.block_linears()
    engine = BpbEngine(s.model, s.tokenizer, {l: s.corpus[l] for l in s.languages},
                       max_length=c.max_length, device=c.device)
    fq = quantizer or FakeQuantizer([q for b in lins for q in b], c.quant_config(), seed=c.seed)
    return Passes(engine, fq, s.block_names, lins, cache, block_key(s), spec=spec)


def base_config(c: MechanismConfig) -> MechanismConfig:
    """The :class:`MechanismConfig` part of an experiment's config (what the model, text and
    block passes depend on): workers of every mechanism experiment build the same setup from it."""
    if type(c) is MechanismConfig:
        return c
    return MechanismConfig(**{f.name: getattr(c, f.name) for f in dataclasses.fields(MechanismConfig)})


_WORKER_SETUPS: dict = {}
_WORKER_PASSES: dict = {}


def worker_setup(config: MechanismConfig) -> Setup:
    """The setup of ``config`` in a worker process, loaded once per process: the workers of one
    actor (block passes, an experiment's own passes) share one model."""
    c = base_config(config)
    if c not in _WORKER_SETUPS:
        _WORKER_SETUPS[c] = setup(c)
    return _WORKER_SETUPS[c]


def worker_block_passes(config: MechanismConfig, folder: str | None):
    """The block passes of :func:`worker_setup` under the keys of :func:`block_passes`, once per
    process and shared cache ``folder``, recording into a ``RecordingCache`` that reads that
    folder where it is visible (one machine or a shared filesystem)."""
    from validate._executor import RecordingCache

    k = (base_config(config), folder)
    if k not in _WORKER_PASSES:
        _WORKER_PASSES[k] = _block_passes(worker_setup(config), RecordingCache(read_from=folder))
    return _WORKER_PASSES[k]


def block_passes_worker(config: MechanismConfig, folder: str | None):
    """A remote worker of the block passes (``validate._passes.PassesWorker``; the spec that
    :func:`block_passes` gives its passes)."""
    from validate._passes import PassesWorker

    return PassesWorker(worker_block_passes(config, folder))


class LanguageWorker:
    """An executor worker (``validate._executor.Worker``) over an experiment's per-language items:
    ``items`` has ``s`` (its :class:`Setup`, the model loaded once), ``get(language)`` (computes
    and caches one language's item) and ``cache`` (a ``RecordingCache``). The payload
    ``{"language": l}`` computes that language's item and returns its cache entries."""

    def __init__(self, items):
        self.items = items

    def compute(self, payload) -> list:
        lang = payload["language"]
        if lang not in self.items.s.languages:
            raise ValueError(f"language {lang!r} is not one of this run's {self.items.s.languages}")
        self.items.get(lang)
        return self.items.cache.drain()


def block_damage(s: Setup, cache: ResultCache | None = None, progress: bool = True) -> BlockDamage:
    """Single-block damages of every decoder block per language (module docstring), cached.

    Under a Ray executor (``--executor ray``) the baseline and every single-block pass are
    computed on the workers in one grid, ahead of being read from the shared cache; in process
    each is computed when first read."""
    from validate._passes import degradations

    passes = block_passes(s, cache)
    before = passes.run_count
    names = s.block_names
    bar = protocol.progress(total=1 + len(names), desc="single-block damage", unit="pass") if progress else None
    passes.prefetch([[], *[[i] for i in range(len(names))]], bar)
    base = passes.scores([])
    rows = []
    for i in range(len(names)):
        rows.append(degradations(passes.scores([i]), base))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.update()
        bar.close()
    langs = s.languages
    engine = passes.scored.engine
    mat = lambda m: np.array([[rows[i][m][l] for i in range(len(names))] for l in langs])  # noqa: E731
    nb = {l: float(np.sum(engine.n_bytes[l])) for l in langs}
    base_bpb = {l: float(np.sum(base.nll[l]) / np.log(2) / nb[l]) for l in langs}
    return BlockDamage(names, langs, mat("kl") if "kl" in rows[0] else None, mat("bpb"), base_bpb,
                       passes.run_count - before, {l: int(np.sum(engine.tokens[l])) for l in langs})


def correlation_ci(x: Sequence[float], y: Sequence[float], method: str = "spearman", n_boot: int = 1000,
                   seed: int = 0, groups: Sequence[Any] | None = None, level: float = 0.95) -> dict:
    """Correlation of paired values with a percentile bootstrap interval.

    Pairs are resampled with replacement (or, with ``groups``, whole groups: e.g. all pairs of one
    block, when the same block appears once per language). Non-finite pairs are dropped first.

    Returns
    -------
    dict
        ``{"method", "r", "ci_low", "ci_high", "n", "n_boot", "p"}``: ``r`` None with fewer than
        three pairs or a constant side; ``p`` the two-sided p-value of scipy's test for the
        unresampled pairs (treats pairs as independent).
    """
    from scipy import stats

    if method not in METHODS:
        raise ValueError(f"unknown correlation method {method!r}; expected one of {METHODS}")
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"x and y must be 1-d of equal length, got {xa.shape} and {ya.shape}")
    ok = np.isfinite(xa) & np.isfinite(ya)
    g = None if groups is None else np.asarray(groups, dtype=object)[ok]
    xa, ya = xa[ok], ya[ok]
    out = {"method": method, "r": None, "ci_low": None, "ci_high": None, "n": int(xa.size),
           "n_boot": int(n_boot), "p": None}
    if xa.size < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return out
    fn = stats.spearmanr if method == "spearman" else stats.pearsonr

    def corr(a, b):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return np.nan
        return float(fn(a, b).statistic)

    res = fn(xa, ya)
    out["r"], out["p"] = float(res.statistic), float(res.pvalue)
    rng = np.random.default_rng(seed)
    if g is None:
        idx = [rng.integers(0, xa.size, xa.size) for _ in range(n_boot)]
    else:
        labels = list(dict.fromkeys(g.tolist()))
        members = [np.flatnonzero(g == lab) for lab in labels]
        idx = [np.concatenate([members[j] for j in rng.integers(0, len(labels), len(labels))])
               for _ in range(n_boot)]
    vals = np.array([corr(xa[i], ya[i]) for i in idx])
    vals = vals[np.isfinite(vals)]
    if vals.size:
        lo, hi = np.percentile(vals, [50 * (1 - level), 50 * (1 + level)])
        out["ci_low"], out["ci_high"] = float(lo), float(hi)
    return out


def resolved(ci: Mapping) -> str:
    """``"positive"``, ``"negative"`` or ``"not resolved"`` (the interval contains 0 or is missing)."""
    lo, hi = ci.get("ci_low"), ci.get("ci_high")
    if lo is None or hi is None:
        return "not resolved"
    return "positive" if lo > 0 else "negative" if hi < 0 else "not resolved"

