"""Experiment: is the analytic MSE-optimal clipping threshold the measured one?

``python -m validate.optimal_alpha [--quick] [--model none|gemma-3-270m|...] [--bits 2 4 ...]
[--grids ...] [--families ...] [--samples N] [--real-grid int] [--out DIR]``
(``--help`` lists every flag with its default)

Part 1, synthetic. For every family (the synthetic members of ``validate._synthetic``) x grid x
bit width, draw seeded samples of the family and compare theory (``theory.optimal_alpha``,
``theory.optimal_mse``, ``theory.expected_mse``) with the exact empirical sweep
(``empirical.sweep``, ``empirical.optimal``):

* ``alpha_rel_diff = alpha*_swept / alpha*_theory - 1``
* ``mse_rel_diff = MSE*_swept / MSE*_theory - 1``
* ``mse_z``: measured MSE at alpha*_theory minus theory, in standard errors of the sample mean
  (per-value squared errors), i.e. whether the disagreement is sampling noise. When only a few
  samples exceed alpha* (high bit widths, small samples) the standard error itself is unreliable;
  ``n_clipped_at_theory_alpha`` is reported next to it.

``MSE*_swept`` is the minimum of the sample's own curve, so it is biased low (it is fitted to
the sample); the measured MSE at the theoretical alpha* is the unbiased comparison.

Part 2, real weights (``--model none`` skips it). For every quantizable linear layer of a model:
maximum-likelihood fits (``empirical.fits``, location fixed at 0 because the grids are symmetric
about 0), the best family by BIC, the alpha* that theory predicts from it, the swept alpha* of the
weight itself and the MSE penalty ``MSE(alpha_predicted) / MSE(alpha*_swept) - 1`` (per tensor:
one alpha per weight matrix). The same penalty for absmax clipping (``alpha = max|w|``) and OCTAV
(Sakr et al. 2022) is reported for scale. The distribution of penalties over layers is summarised
by its quantiles, not only its mean. The embedded ``gemma-3-270m`` ships as a Q4_K_M GGUF, so its
"full precision" weights are the dequantized GGUF, already quantized to ~4-5 bits; the JSON says
so.

Outputs under ``--out`` (default ``results/optimal_alpha``): ``optimal_alpha.json`` (provenance +
all numbers), ``synthetic.csv``, ``synthetic_table.tex``, ``mse_vs_alpha.png``, and with a model
``real_weights.csv``, ``real_weights_table.tex``, ``real_penalty.png``. Every synthetic case
(family x grid) and every layer is cached under ``<out>/cache``, keyed by what determines it (a
layer by a checksum of its weights), so a rerun only loads the model again and an interrupted
run resumes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from validate import _protocol as protocol
from validate._common import ResultCache, save_figure, to_jsonable, use_agg, write_csv, write_json
from validate._latex import MacroSet, finite, format_number, tex_text, vmax, write_latex_table
from validate._synthetic import SYNTHETIC_FAMILIES, sample_family, synthetic_distribution, valid_pair

EXPERIMENT = "optimal_alpha"
GRIDS = ("aciq", "midrise", "midtread", "int", "uint")
SIGNED_GRIDS = ("int", "midrise", "midtread", "aciq")
PENALTY_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
CURVE_POINTS = 25
#: Part of every cache key: bump it when an item's stored format changes (2: the protocol's
#: keys, layers keyed by a checksum of their weights).
ITEM_VERSION = 2
_MIN_SAMPLES = 1000

_SYNTHETIC_COLUMNS = [
    "family", "grid", "bits", "alpha_theory", "alpha_swept", "alpha_rel_diff", "mse_theory",
    "mse_swept", "mse_rel_diff", "mse_at_theory_alpha", "mse_at_theory_alpha_se", "mse_z",
    "n_clipped_at_theory_alpha", "penalty_theory_alpha", "samples",
]
_REAL_COLUMNS = [
    "layer", "n_params", "best_family", "used_family", "excess_kurtosis", "bits", "alpha_predicted",
    "alpha_swept", "alpha_rel_diff", "mse_predicted", "mse_swept", "penalty", "alpha_absmax",
    "penalty_absmax", "alpha_octav", "penalty_octav",
]


def _no_duplicates(flag: str, values: Sequence[Any]) -> None:
    dup = sorted({str(v) for v in values if list(values).count(v) > 1})
    if dup:
        raise protocol.ConfigError(f"{flag}: {', '.join(dup)} given twice")


@dataclass(frozen=True)
class Config:
    samples: int = protocol.param(1_000_000, "seeded synthetic samples per family")
    bits: tuple[int, ...] = protocol.param((2, 3, 4, 5, 6, 7, 8), "bit widths")
    grids: tuple[str, ...] = protocol.param(GRIDS, "grids of the synthetic part (the lognormal goes "
                                                   "with uint only, the others with the signed grids)")
    families: tuple[str, ...] = protocol.param(SYNTHETIC_FAMILIES, "synthetic families")
    model: str = protocol.param("gemma-3-270m", "model of the real-weights part (embedded name, tiny-* "
                                                "test model, local folder or hub id), or none to skip it")
    real_grid: str = protocol.param("int", "grid of the real-weights part (signed: int, midrise, "
                                           "midtread, aciq)")
    real_bits: tuple[int, ...] | None = protocol.param(None, "bit widths of the real-weights part "
                                                              "(none: the same as --bits)")
    max_fit_samples: int = protocol.param(200_000, "values per layer used by the maximum-likelihood fits")
    max_layers: int | None = protocol.param(None, "only the first N quantizable linears (none: all)")
    seed: int = protocol.param(0, "random seed of the samples and of the fits' subsamples")

    def __post_init__(self):
        protocol.check_bits_grid(self.bits)
        if not self.bits:
            raise protocol.ConfigError("--bits: give at least one bit width")
        _no_duplicates("--bits", self.bits)
        for f in self.families:
            if f not in SYNTHETIC_FAMILIES:
                raise protocol.ConfigError(f"--families: unknown family {f!r}; known: "
                                           f"{', '.join(SYNTHETIC_FAMILIES)}")
        _no_duplicates("--families", self.families)
        for g in self.grids:
            protocol.check_bits_grid(self.bits, g, grid_flag="--grids")
        _no_duplicates("--grids", self.grids)
        if not any(valid_pair(f, g) for f in self.families for g in self.grids):
            raise protocol.ConfigError(
                f"--families {' '.join(self.families)} / --grids {' '.join(self.grids)}: no family "
                "goes with any of these grids (one-sided families need uint, two-sided ones a signed grid)")
        protocol.check_positive("samples", self.samples)
        if self.samples < _MIN_SAMPLES:
            raise protocol.ConfigError(f"--samples: {self.samples} samples are too few for a swept MSE "
                                       f"and its standard error (use >= {_MIN_SAMPLES})")
        if self.model.lower() == "none":
            protocol.frozen_set(self, model="none")
        else:
            protocol.check_model(self.model)
        real_grid = protocol.check_bits_grid((), self.real_grid, grid_flag="--real-grid", signed="weights")
        protocol.frozen_set(self, real_grid=real_grid)
        if self.real_bits is not None:
            if not self.real_bits:
                raise protocol.ConfigError("--real-bits: give at least one bit width")
            _no_duplicates("--real-bits", self.real_bits)
        protocol.check_bits_grid(self.real_bits_used, real_grid,
                                 flag="--real-bits" if self.real_bits is not None else "--bits")
        protocol.check_positive("max_fit_samples", self.max_fit_samples)
        if self.max_fit_samples < _MIN_SAMPLES:
            raise protocol.ConfigError(f"--max-fit-samples: {self.max_fit_samples} values are too few "
                                       f"for a maximum-likelihood fit of the tails (use >= {_MIN_SAMPLES})")
        protocol.check_positive("max_layers", self.max_layers, optional=True)
        protocol.check_positive("seed", self.seed, allow_zero=True)

    @property
    def real_bits_used(self) -> tuple[int, ...]:
        return tuple(self.real_bits) if self.real_bits is not None else tuple(self.bits)

    @classmethod
    def quick(cls) -> "Config":
        return cls(samples=50_000, bits=(2, 4, 8), max_fit_samples=20_000, max_layers=4)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _per_value_sq_error(x: np.ndarray, grid: str, alpha: float, bits: int) -> np.ndarray:
    """Per-value squared errors at one alpha (for the standard error of the measured MSE)."""
    from theory.grids import quantize

    if grid == "aciq":
        return (x - np.clip(x, -alpha, alpha)) ** 2  # the noise term is a constant
    return (x - quantize(x, grid, alpha, bits)) ** 2


def _quantiles(v: Sequence[float | None]) -> dict[str, Any]:
    a = np.asarray(finite(v), dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    out: dict[str, Any] = {"n": int(a.size), "mean": float(a.mean()), "max": float(a.max())}
    for q in PENALTY_QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = float(np.quantile(a, q))
    out["median"] = out["q50"]
    out["frac_below_1pct"] = float(np.mean(a < 0.01))
    out["frac_below_5pct"] = float(np.mean(a < 0.05))
    return out


def weights_digest(w: np.ndarray) -> str:
    """Checksum of a weight matrix (dtype, shape and every value): the cache key of its layer."""
    a = np.ascontiguousarray(w)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.view(np.uint8).reshape(-1))
    return h.hexdigest()[:24]


# --------------------------------------------------------------------------------------------
# part 1: synthetic
# --------------------------------------------------------------------------------------------

def synthetic_item(family: str, grid: str, bits: Sequence[int], samples: int, seed: int,
                   x: np.ndarray | None = None, curve_points: int = CURVE_POINTS) -> dict[str, Any]:
    """Theory vs sweep for one family and grid over all ``bits`` (JSON-able).

    Returns a dict with ``rows`` (one per bit width) and ``curves`` (MSE vs alpha, theory and
    measured, for the figure).
    """
    from empirical.optimal import empirical_optimal_alpha
    from empirical.sweep import prepare
    from theory import expected_mse, optimal_alpha, optimal_mse

    dist = synthetic_distribution(family)
    if x is None:
        x = sample_family(family, samples, seed)
    sm = prepare(x)
    sd = float(np.sqrt(dist.variance))
    rows, curves = [], []
    for m in bits:
        a_th = float(optimal_alpha(dist, m, grid))
        mse_th = float(optimal_mse(dist, m, grid))
        opt = empirical_optimal_alpha(sm, m, grid)
        mse_at_th = float(sm.mse(a_th, m, grid))
        err = _per_value_sq_error(x, grid, a_th, m)
        se = float(err.std(ddof=1) / math.sqrt(err.size))
        rows.append({
            "family": family, "grid": grid, "bits": int(m), "params": dist.params,
            "samples": int(x.size), "alpha_theory": a_th, "alpha_swept": opt.alpha,
            "alpha_rel_diff": opt.alpha / a_th - 1.0, "alpha_theory_over_sd": a_th / sd,
            "mse_theory": mse_th, "mse_swept": opt.mse, "mse_rel_diff": opt.mse / mse_th - 1.0,
            "mse_at_theory_alpha": mse_at_th, "mse_at_theory_alpha_se": se,
            "mse_z": (mse_at_th - mse_th) / se if se > 0 else None,
            # Few clipped values make the clipping error (and its estimated standard error) rest
            # on a handful of draws: z is only meaningful when this count is not tiny.
            "n_clipped_at_theory_alpha": int(np.count_nonzero(np.abs(x) > a_th)),
            "penalty_theory_alpha": mse_at_th / opt.mse - 1.0,
        })
        alphas = a_th * np.linspace(0.3, 2.5, curve_points)
        curves.append({
            "bits": int(m), "alpha": alphas,
            "mse_measured": sm.mse(alphas, m, grid),
            "mse_theory": np.asarray(expected_mse(dist, alphas, m, grid), dtype=np.float64),
            "alpha_theory": a_th, "mse_theory_opt": mse_th,
            "alpha_swept": opt.alpha, "mse_swept": opt.mse,
        })
    return to_jsonable({"family": family, "grid": grid, "sd": sd, "rows": rows, "curves": curves})


def run_synthetic(config: Config, cache: ResultCache | None = None) -> list[dict[str, Any]]:
    """Every valid family x grid case of ``config``, one cached item each."""
    pairs = [(f, g) for f in config.families for g in config.grids if valid_pair(f, g)]
    items = []
    x, x_family = None, None  # one family's samples in memory at a time
    for f, g in protocol.progress(pairs, total=len(pairs), desc="synthetic", unit="case"):
        key = {"part": "synthetic", "v": ITEM_VERSION, "family": f,
               "distribution": repr(synthetic_distribution(f)), "grid": g, "bits": list(config.bits),
               "samples": config.samples, "seed": config.seed, "curve_points": CURVE_POINTS}
        item = cache.get(key) if cache is not None else None
        if item is None:
            if x_family != f:
                x, x_family = sample_family(f, config.samples, config.seed), f
            item = synthetic_item(f, g, config.bits, config.samples, config.seed, x=x)
            if cache is not None:
                cache.put(key, item)
        items.append(item)
    return items


def synthetic_summary(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per family x grid: worst agreement over the bit widths."""
    out = []
    for it in items:
        rows = it["rows"]
        out.append({
            "family": it["family"], "grid": it["grid"],
            "max_abs_alpha_rel_diff": max(abs(r["alpha_rel_diff"]) for r in rows),
            "max_abs_mse_rel_diff": max(abs(r["mse_rel_diff"]) for r in rows),
            "max_abs_mse_z": vmax(abs(r["mse_z"]) for r in rows if r["mse_z"] is not None),
            "max_penalty_theory_alpha": max(r["penalty_theory_alpha"] for r in rows),
        })
    return out


def plot_synthetic(items: Sequence[Mapping[str, Any]], path: Path) -> Path:
    use_agg()
    import matplotlib.pyplot as plt

    fams = list(dict.fromkeys(it["family"] for it in items))
    grids = list(dict.fromkeys(it["grid"] for it in items if it["grid"] != "uint"))
    ncols = max(1, len(grids))
    fig, axes = plt.subplots(len(fams), ncols, figsize=(3.2 * ncols, 2.6 * len(fams)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    cmap = plt.get_cmap("viridis")
    for it in items:
        r = fams.index(it["family"])
        c = 0 if it["grid"] == "uint" else grids.index(it["grid"])
        ax = axes[r, c]
        ax.set_visible(True)
        sd = it["sd"]
        nb = max(1, len(it["curves"]) - 1)
        for i, cv in enumerate(it["curves"]):
            col = cmap(i / nb)
            a = np.asarray(cv["alpha"]) / sd
            ax.plot(a, cv["mse_theory"], "-", color=col, lw=1.2, label=f"M={cv['bits']}")
            ax.plot(a, cv["mse_measured"], "o", color=col, ms=2.5, mfc="none")
            ax.plot(cv["alpha_theory"] / sd, cv["mse_theory_opt"], "*", color="k", ms=6)
            ax.plot(cv["alpha_swept"] / sd, cv["mse_swept"], "x", color="tab:red", ms=5)
        ax.set_yscale("log")
        ax.set_title(f"{it['family']} / {it['grid']}", fontsize=8)
        ax.set_xlabel(r"$\alpha/\sigma$", fontsize=8)
        ax.set_ylabel("MSE", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = next((ax.get_legend_handles_labels() for ax in axes.ravel()
                            if ax.get_visible()), ([], []))
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(8, len(labels)), fontsize=7,
                   title="line: theory, circles: measured, *: theory $\\alpha^*$, x: swept $\\alpha^*$",
                   title_fontsize=7, bbox_to_anchor=(0.5, 1.0 + 0.02 / len(fams)))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.06 / max(1, len(fams) ** 0.5)))
    out = save_figure(fig, path)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------
# part 2: real weights
# --------------------------------------------------------------------------------------------

def weight_item(name: str, w: np.ndarray, bits: Sequence[int], grid: str,
                max_samples: int = 200_000, seed: int = 0,
                families: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit, predict and sweep one weight matrix (per tensor: one alpha for the whole matrix)."""
    from empirical.fits import first_theory_fit, fit_all
    from empirical.optimal import empirical_optimal_alpha, octav_alpha
    from empirical.sweep import prepare
    from theory import optimal_alpha

    w = np.asarray(w)
    fits = fit_all(w, families=families, max_samples=max_samples, seed=seed, fix_loc=True)
    used, dist, skipped = first_theory_fit(fits)  # best BIC first, skipping e.g. Student-t nu <= 2
    sm = prepare(w)
    absmax = float(sm.absmax[0])
    rec: dict[str, Any] = {
        "name": name, "shape": list(w.shape), "n_params": int(w.size),
        "excess_kurtosis": fits[0].excess_kurtosis, "best_family": fits[0].family,
        "used_family": used.family if used else None,
        "fits": [f.to_dict() for f in fits], "skipped_fits": skipped,
        "absmax": absmax, "std": float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))),
        "per_bits": [],
    }
    for m in bits:
        opt = empirical_optimal_alpha(sm, m, grid)
        entry: dict[str, Any] = {"bits": int(m), "alpha_swept": opt.alpha, "mse_swept": opt.mse}
        if dist is not None:
            a_pred = float(optimal_alpha(dist, m, grid))
            mse_pred = float(sm.mse(a_pred, m, grid))
            entry.update(alpha_predicted=a_pred, mse_predicted=mse_pred,
                         alpha_rel_diff=a_pred / opt.alpha - 1.0,
                         penalty=mse_pred / opt.mse - 1.0)
        mse_abs = float(sm.mse(absmax, m, grid))
        a_oct = octav_alpha(sm, m, grid)
        mse_oct = float(sm.mse(a_oct, m, grid))
        entry.update(alpha_absmax=absmax, penalty_absmax=mse_abs / opt.mse - 1.0,
                     alpha_octav=a_oct, penalty_octav=mse_oct / opt.mse - 1.0)
        rec["per_bits"].append(entry)
    return to_jsonable(rec)


def real_weights_report(named_weights: Mapping[str, np.ndarray], bits=(4,), grid: str = "int",
                        *, max_samples: int = 200_000, seed: int = 0,
                        families: Sequence[str] | None = None, cache: ResultCache | None = None,
                        model: str = "") -> dict[str, Any]:
    """Predicted vs swept clipping for a set of weight matrices (plain arrays; no model needed).

    Parameters
    ----------
    named_weights : mapping of str to array
        Layer name -> weight matrix.
    bits : int or sequence of int
        Bit widths.
    grid : str
        Signed grid (weights are signed): ``int`` (deployed), ``midrise``, ``midtread``, ``aciq``.
    max_samples, seed, families
        Passed to :func:`empirical.fits.fit_all`.
    cache : ResultCache, optional
        One entry per layer, keyed by ``model``, the layer's name and a checksum of its weights
        (so an entry is never used for other weights) and the fit and sweep settings.

    Returns
    -------
    dict
        ``layers`` (per-layer records) and ``summary``: for every bit width the quantiles of the
        MSE penalty of the predicted alpha, of absmax and of OCTAV, and the count of best-fit
        families.
    """
    from empirical.sweep import validate_data
    from theory.grids import Grid

    g = Grid.parse(grid)
    if g.one_sided:
        raise ValueError("weights are signed; use a signed grid (int, midrise, midtread, aciq)")
    bits = [int(b) for b in np.atleast_1d(bits)]
    if not named_weights:
        raise ValueError("no weights given")
    layers = []
    for name, w in protocol.progress(named_weights.items(), total=len(named_weights), desc="layers",
                                     unit="layer"):
        w = validate_data(np.asarray(w), name)
        if not np.isfinite(w).all():  # refused by name before any fit (and before the cache)
            raise ValueError(f"{name}: the weights contain NaN or inf")
        key = {"part": "real", "v": ITEM_VERSION, "model": model, "name": name,
               "shape": list(w.shape), "weights": weights_digest(w), "bits": bits, "grid": g.value,
               "max_samples": max_samples, "seed": seed,
               "families": list(families) if families else None}
        rec = cache.get(key) if cache is not None else None
        if rec is None:
            rec = weight_item(name, w, bits, g.value, max_samples, seed, families)
            if cache is not None:
                cache.put(key, rec)
        layers.append(rec)
    summary = []
    for j, m in enumerate(bits):
        pb = [lay["per_bits"][j] for lay in layers]
        summary.append({
            "bits": m, "grid": g.value, "n_layers": len(layers),
            "penalty_predicted": _quantiles([p.get("penalty") for p in pb]),
            "penalty_absmax": _quantiles([p["penalty_absmax"] for p in pb]),
            "penalty_octav": _quantiles([p["penalty_octav"] for p in pb]),
            "alpha_rel_diff": _quantiles([abs(p["alpha_rel_diff"]) for p in pb
                                          if p.get("alpha_rel_diff") is not None]),
        })
    fam_counts: dict[str, int] = {}
    for lay in layers:
        fam_counts[lay["best_family"]] = fam_counts.get(lay["best_family"], 0) + 1
    return {"grid": g.value, "bits": bits, "layers": layers, "summary": summary,
            "best_family_counts": fam_counts,
            "excess_kurtosis": _quantiles([lay["excess_kurtosis"] for lay in layers])}


def model_weights(model_name: str, limit: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Weights of every quantizable linear of ``model_name`` as float32 numpy arrays, and the
    model's metadata (scalars only)."""
    from empirical.models import load_model, quantizable_linears

    model, _tok, meta = load_model(model_name, return_metadata=True)
    lins = quantizable_linears(model)
    if limit is not None:
        lins = lins[: int(limit)]
    out = {lin.name: lin.module.weight.detach().float().cpu().numpy() for lin in lins}
    return out, {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None)))}


def prequantized_note(model: str, meta: Mapping[str, Any]) -> str | None:
    """What the baseline weights are, when the model was already quantized before this run."""
    q = meta.get("prequantized")
    if not q:
        return None
    return (f"{model} is a {q} GGUF: its 'full precision' weights are the dequantized GGUF, "
            "already quantized to about 4-5 bits before this run.")


def plot_real(real: Mapping[str, Any], path: Path) -> Path:
    """Cumulative share of layers against the MSE penalty over the swept optimum. Left: theory's
    predicted alpha at every bit width; right: predicted, OCTAV and absmax at one bit width (4, or
    the one nearest to it)."""
    use_agg()
    import matplotlib.pyplot as plt

    bits = list(real["bits"])
    layers = real["layers"]
    floor = 1e-7

    def cdf(ax, j, key, **kw):
        pen = np.sort(finite(lay["per_bits"][j].get(key) for lay in layers))
        if pen.size:
            ax.step(np.maximum(pen, floor), np.arange(1, pen.size + 1) / pen.size, where="post", **kw)

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4), sharey=True)
    cmap = plt.get_cmap("viridis")
    for j, m in enumerate(bits):
        cdf(left, j, "penalty", color=cmap(j / max(1, len(bits) - 1)), lw=1.2, label=f"M={m}")
    left.set_title(r"predicted $\alpha^*$ (best-fit family)", fontsize=9)
    j = min(range(len(bits)), key=lambda i: (abs(bits[i] - 4), bits[i]))
    for key, color, what in (("penalty", "tab:blue", r"predicted $\alpha^*$"),
                             ("penalty_octav", "tab:orange", "OCTAV"),
                             ("penalty_absmax", "tab:red", "absmax")):
        cdf(right, j, key, color=color, lw=1.2, label=what)
    right.set_title(f"M={bits[j]}: predicted, OCTAV and absmax", fontsize=9)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel(f"MSE penalty over the swept optimum (floored at {floor:g})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left")
    left.set_ylabel("fraction of layers", fontsize=8)
    fig.suptitle(f"{real['model']}, grid {real['grid']}, one alpha per tensor, {len(layers)} layers",
                 fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------
# protocol
# --------------------------------------------------------------------------------------------

def run(config: Config, cache: ResultCache | None = None) -> protocol.Result:
    """Synthetic theory vs sweep, then (unless ``model`` is none) every layer of the model."""
    items = run_synthetic(config, cache)
    synthetic = {
        "distributions": {f: synthetic_distribution(f).params for f in config.families},
        "rows": [r for it in items for r in it["rows"]],
        "summary": synthetic_summary(items),
        "curves": [{"family": it["family"], "grid": it["grid"], "sd": it["sd"], "curves": it["curves"]}
                   for it in items],
    }
    real = None
    if config.model != "none":
        weights, meta = model_weights(config.model, config.max_layers)
        report = real_weights_report(weights, config.real_bits_used, config.real_grid,
                                     max_samples=config.max_fit_samples, seed=config.seed,
                                     cache=cache, model=config.model)
        real = {"model": config.model, "model_metadata": meta,
                "note": prequantized_note(config.model, meta), **report}
    return protocol.Result(EXPERIMENT, config, to_jsonable({"synthetic": synthetic, "real_weights": real}))


def write(result: protocol.Result, out: Path) -> list[Path]:
    out = Path(out)
    syn = result["synthetic"]
    rows, summary = syn["rows"], syn["summary"]
    bits = sorted({int(r["bits"]) for r in rows})
    samples = result.config_dict.get("samples")
    files = [write_csv(out / "synthetic.csv", rows, _SYNTHETIC_COLUMNS)]
    files.append(write_latex_table(
        out / "synthetic_table.tex", summary,
        ["family", "grid", "max_abs_alpha_rel_diff", "max_abs_mse_rel_diff", "max_abs_mse_z",
         "max_penalty_theory_alpha"],
        headers=["family", "grid", r"$\max|\Delta\alpha^*|/\alpha^*$",
                 r"$\max|\Delta\mathrm{MSE}^*|/\mathrm{MSE}^*$", r"$\max|z|$", "max penalty"],
        caption=(f"Theory vs exact empirical sweep, {format_number(samples)} seeded samples per family, "
                 f"bits {bits[0]}--{bits[-1]}. $z$: measured minus theoretical MSE at the theoretical "
                 r"$\alpha^*$ in standard errors; penalty: excess measured MSE of the theoretical "
                 r"$\alpha^*$ over the swept optimum."),
        label="tab:optimal-alpha-synthetic"))
    files.append(plot_synthetic(syn["curves"], out / "mse_vs_alpha.png"))
    real = result.get("real_weights")
    if real:
        rrows = [{"layer": lay["name"], "n_params": lay["n_params"], "best_family": lay["best_family"],
                  "used_family": lay["used_family"], "excess_kurtosis": lay["excess_kurtosis"], **pb}
                 for lay in real["layers"] for pb in lay["per_bits"]]
        files.append(write_csv(out / "real_weights.csv", rrows, _REAL_COLUMNS))
        trows = []
        for s in real["summary"]:
            pp, pa, po = s["penalty_predicted"], s["penalty_absmax"], s["penalty_octav"]
            trows.append({"bits": s["bits"], "n": pp.get("n"), "median": pp.get("median"),
                          "q75": pp.get("q75"), "q90": pp.get("q90"), "max": pp.get("max"),
                          "frac1": pp.get("frac_below_1pct"), "octav_median": po.get("median"),
                          "absmax_median": pa.get("median")})
        prequant = (real.get("model_metadata") or {}).get("prequantized")
        files.append(write_latex_table(
            out / "real_weights_table.tex", trows,
            ["bits", "n", "median", "q75", "q90", "max", "frac1", "octav_median", "absmax_median"],
            headers=["$M$", "layers", "median", "$q_{75}$", "$q_{90}$", "max", r"share $<1\%$",
                     "OCTAV median", "absmax median"],
            caption=(f"MSE penalty of the clipping threshold predicted from each layer's best-fit "
                     f"distribution over the swept optimum, {tex_text(real['model'])}, grid "
                     f"{tex_text(real['grid'])}, per tensor."
                     + (f" Weights are the dequantized {tex_text(prequant)} GGUF." if prequant else "")),
            label="tab:optimal-alpha-real"))
        files.append(plot_real(real, out / "real_penalty.png"))
    files.append(write_json(out / f"{EXPERIMENT}.json", result.to_json()))
    return files


def summary(result: protocol.Result) -> str:
    syn = result["synthetic"]
    s = syn["summary"]
    text = (f"{len(syn['rows'])} synthetic cases, max |alpha swept/theory - 1| "
            f"{100 * max(x['max_abs_alpha_rel_diff'] for x in s):.2g}%, max theory-alpha penalty "
            f"{100 * max(x['max_penalty_theory_alpha'] for x in s):.2g}%")
    real = result.get("real_weights")
    if real:
        at = {x["bits"]: x for x in real["summary"]}
        b = 4 if 4 in at else real["bits"][0]
        pp, po, pa = (at[b][k] for k in ("penalty_predicted", "penalty_octav", "penalty_absmax"))
        if pp.get("n"):
            text += (f"; {real['model']} ({len(real['layers'])} layers, {real['grid']}, M={b}): median "
                     f"penalty {100 * pp['median']:.2g}% (OCTAV {100 * po['median']:.2g}%, "
                     f"absmax {100 * pa['median']:.3g}%)")
    return text


def macros(result: protocol.Result) -> MacroSet:
    """The numbers section "Optimal clipping" of the paper quotes (``\\OA...``)."""
    from empirical.fits import FAMILIES_SIGNED

    ms = MacroSet(f"{EXPERIMENT}.json")
    syn = result.get("synthetic") or {}
    rows, summ = syn.get("rows", []), syn.get("summary", [])
    ms.add("OASamples", result.config_dict.get("samples"), "provenance.config.samples")
    ms.add("OANumComparisons", len(rows), "len(synthetic.rows)")
    ms.add("OANumFamilies", len({r["family"] for r in rows}), "synthetic families")
    ms.add("OAElapsedSeconds", result.timing.get("wall_seconds"), "timing.wall_seconds")
    if summ:
        for key, name in (("max_abs_alpha_rel_diff", "OAMaxAlphaRelDiff"),
                          ("max_abs_mse_rel_diff", "OAMaxMseRelDiff"),
                          ("max_abs_mse_z", "OAMaxAbsZ"),
                          ("max_penalty_theory_alpha", "OAMaxPenalty")):
            add = ms.add if key == "max_abs_mse_z" else ms.add_pct  # z is in standard errors
            add(name, vmax(s.get(key) for s in summ), f"max of synthetic.summary[].{key}")
            for grid in dict.fromkeys(s["grid"] for s in summ):
                add([name, grid], vmax(s.get(key) for s in summ if s["grid"] == grid),
                    f"max of synthetic.summary[grid={grid}].{key}")
    for r in rows:
        key = (r["family"], r["grid"], int(r["bits"]))
        where = f"synthetic.rows[family={key[0]}, grid={key[1]}, bits={key[2]}]"
        ms.add(["OAAlphaTheory", *key], r.get("alpha_theory"), f"{where}.alpha_theory")
        ms.add(["OAAlphaSwept", *key], r.get("alpha_swept"), f"{where}.alpha_swept")
        ms.add_pct(["OAAlphaRelDiff", *key], r.get("alpha_rel_diff"), f"{where}.alpha_rel_diff")
        ms.add_pct(["OAPenalty", *key], r.get("penalty_theory_alpha"), f"{where}.penalty_theory_alpha")
    real = result.get("real_weights")
    if real:
        ms.add("OARealModel", real.get("model"), "real_weights.model")
        ms.add("OARealGrid", real.get("grid"), "real_weights.grid")
        ms.add("OARealLayers", len(real.get("layers", [])), "len(real_weights.layers)")
        counts = real.get("best_family_counts") or {}
        # every signed family is named (count 0 when no layer chose it): the paper lists them all
        for fam in (*FAMILIES_SIGNED, *(f for f in counts if f not in FAMILIES_SIGNED)):
            ms.add(["OARealBestFit", fam], int(counts.get(fam, 0)), f"real_weights.best_family_counts[{fam}]")
        kq = real.get("excess_kurtosis") or {}
        ms.add("OARealKurtosisMedian", kq.get("median"), "real_weights.excess_kurtosis.median")
        for s in real.get("summary", []):
            b = int(s["bits"])
            where = f"real_weights.summary[bits={b}]"
            pp, po, pa = (s.get(k) or {} for k in ("penalty_predicted", "penalty_octav", "penalty_absmax"))
            ms.add_pct(["OARealPenaltyMedian", b], pp.get("median"), f"{where}.penalty_predicted.median")
            ms.add_pct(["OARealPenaltyQNinety", b], pp.get("q90"), f"{where}.penalty_predicted.q90")
            ms.add_pct(["OARealPenaltyMax", b], pp.get("max"), f"{where}.penalty_predicted.max")
            ms.add_pct(["OARealShareBelowOnePct", b], pp.get("frac_below_1pct"),
                       f"{where}.penalty_predicted.frac_below_1pct")
            ms.add_pct(["OARealOctavMedian", b], po.get("median"), f"{where}.penalty_octav.median")
            ms.add_pct(["OARealAbsmaxMedian", b], pa.get("median"), f"{where}.penalty_absmax.median")
            ms.add_pct(["OARealAlphaRelDiffMedian", b], (s.get("alpha_rel_diff") or {}).get("median"),
                       f"{where}.alpha_rel_diff.median")
    return ms


main = protocol.entry_point(__name__)


if __name__ == "__main__":
    raise SystemExit(main())
