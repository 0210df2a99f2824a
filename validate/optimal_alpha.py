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

Part 3, per-unit clipping of the same weights (``--unit-bits``, ``--group-size``). Deployed weight
quantizers give every output channel (row), or every group of ``--group-size`` consecutive input
weights of a row, its own alpha. For each tensor and unit granularity: every unit's exact swept
optimum (one vectorised sweep of all units, :class:`WeightUnits`) and models that predict each
unit's alpha as ``t* x std_u`` with ONE ``t*`` per tensor and bit width, from a shape shared by
all units (:func:`unit_clipping`): the pooled best-BIC family's shape (``unimodal_shape``), a
shape fitted to the values standardized by their own unit (``scale_mixture/<shape>``), the one
of those whose curve best matches held-out units (``selected``), and per-unit absmax for scale.
``excess = MSE(model alphas) / MSE(per-unit swept optima) - 1`` per tensor, summarised over
tensors in the JSON's ``alpha_excess_mse``. The excess also measures a finite-sample effect: a
unit of n values is a sample, its swept optimum fits that sample, and ``t*`` is the optimum of
the shape's infinite tails (synthetic Laplace rows at 4 bits: ~20% for n = 128, ~1% for 2048,
~0.2% for 8192).

Outputs under ``--out`` (default ``results/optimal_alpha``): ``optimal_alpha.json`` (provenance +
all numbers), ``synthetic.csv``, ``synthetic_table.tex``, ``mse_vs_alpha.png``, and with a model
``real_weights.csv``, ``real_weights_table.tex``, ``real_penalty.png``,
``real_weights_units.csv`` (one row per tensor x granularity x bit width x model) and
``alpha_excess_weights.png``. Every synthetic case (family x grid) and every layer (all three
parts) is cached under ``<out>/cache``, keyed by what determines it (a layer by a checksum of
its weights), so a rerun only loads the model again and an interrupted run resumes.
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
#: keys, layers keyed by a checksum of their weights; 3: a layer also holds its per-channel and
#: per-group clipping).
ITEM_VERSION = 4
#: standardized values per shape fit of the per-unit part (a seeded subsample)
UNIT_FIT_SAMPLES = 20_000
_MIN_SAMPLES = 1000

_SYNTHETIC_COLUMNS = [
    "family", "grid", "bits", "alpha_theory", "alpha_swept", "alpha_rel_diff", "mse_theory",
    "mse_swept", "mse_rel_diff", "mse_at_theory_alpha", "mse_at_theory_alpha_se", "mse_z",
    "n_clipped_at_theory_alpha", "penalty_theory_alpha", "samples",
]
_UNIT_COLUMNS = [
    "layer", "granularity", "group_size", "bits", "model", "t_star", "excess", "mse", "mse_swept",
    "selected_shape", "n_units", "unit_size", "n_short_units", "n_constant_units",
    "mean_over_std_median", "alpha_over_std_swept_median",
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
    unit_bits: tuple[int, ...] = protocol.param((3, 4, 8), "bit widths of the per-unit part of the real "
                                                           "weights (one alpha per output channel and per group)")
    group_size: int = protocol.param(128, "input weights per group of the per-group part (>= 8; the last "
                                          "group of a row is shorter when it does not divide the row)")
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
        if not self.unit_bits:
            raise protocol.ConfigError("--unit-bits: give at least one bit width")
        _no_duplicates("--unit-bits", self.unit_bits)
        protocol.check_bits_grid(self.unit_bits, real_grid, flag="--unit-bits")
        try:
            check_group_size(self.group_size)
        except ValueError as exc:
            raise protocol.ConfigError(f"--group-size: {exc}") from None
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
                families: Sequence[str] | None = None, unit_bits: Sequence[int] | None = None,
                group_size: int = 128) -> dict[str, Any]:
    """Fit, predict and sweep one weight matrix (per tensor: one alpha for the whole matrix).

    With ``unit_bits`` the record also holds ``units``: :func:`unit_clipping` per output channel
    and per group of ``group_size`` (keys :func:`granularity_key`), its ``unimodal_shape`` model
    the shape of the pooled best-BIC fit used here.
    """
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
    if unit_bits:
        uni = (type(dist).name, tuple(dist.shape)) if dist is not None else None
        rec["units"] = {granularity_key(gs): unit_clipping(w, unit_bits, grid, group_size=gs, unimodal=uni,
                                                           fit_samples=UNIT_FIT_SAMPLES, seed=seed)
                        for gs in (None, group_size)}
    return to_jsonable(rec)


def real_weights_report(named_weights: Mapping[str, np.ndarray], bits=(4,), grid: str = "int",
                        *, max_samples: int = 200_000, seed: int = 0,
                        families: Sequence[str] | None = None, cache: ResultCache | None = None,
                        model: str = "", unit_bits: Sequence[int] | None = None,
                        group_size: int = 128) -> dict[str, Any]:
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
    unit_bits : sequence of int, optional
        Bit widths of the per-unit part (:func:`unit_clipping` per output channel and per group
        of ``group_size``); none: no per-unit part.
    group_size : int
        Input weights per group (>= :data:`MIN_GROUP_SIZE`).

    Returns
    -------
    dict
        ``layers`` (per-layer records) and ``summary``: for every bit width the quantiles of the
        MSE penalty of the predicted alpha, of absmax and of OCTAV, and the count of best-fit
        families. With ``unit_bits`` also ``alpha_excess_mse`` (:func:`alpha_excess_summary`).
    """
    from empirical.sweep import validate_data
    from theory.grids import Grid

    g = Grid.parse(grid)
    if g.one_sided:
        raise ValueError("weights are signed; use a signed grid (int, midrise, midtread, aciq)")
    bits = [int(b) for b in np.atleast_1d(bits)]
    if not named_weights:
        raise ValueError("no weights given")
    if unit_bits is not None:
        unit_bits = [int(b) for b in np.atleast_1d(unit_bits)]
        if not unit_bits:
            raise ValueError("unit_bits: give at least one bit width")
        group_size = check_group_size(group_size)
    layers, unit_layers = [], []
    for name, w in protocol.progress(named_weights.items(), total=len(named_weights), desc="layers",
                                     unit="layer"):
        w = validate_data(np.asarray(w), name)
        if not np.isfinite(w).all():  # refused by name before any fit (and before the cache)
            raise ValueError(f"{name}: the weights contain NaN or inf")
        key = {"part": "real", "v": ITEM_VERSION, "model": model, "name": name,
               "shape": list(w.shape), "weights": weights_digest(w), "bits": bits, "grid": g.value,
               "max_samples": max_samples, "seed": seed,
               "families": list(families) if families else None, "unit_bits": unit_bits,
               "group_size": group_size if unit_bits else None, "unit_fit_samples": UNIT_FIT_SAMPLES}
        rec = cache.get(key) if cache is not None else None
        if rec is None:
            rec = weight_item(name, w, bits, g.value, max_samples, seed, families, unit_bits, group_size)
            if cache is not None:
                cache.put(key, rec)
        rec = dict(rec)
        units = rec.pop("units", None)
        if units is not None:
            unit_layers.append({"name": rec["name"], "shape": rec["shape"], "n_params": rec["n_params"],
                                **units})
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
    out = {"grid": g.value, "bits": bits, "layers": layers, "summary": summary,
           "best_family_counts": fam_counts,
           "excess_kurtosis": _quantiles([lay["excess_kurtosis"] for lay in layers])}
    if unit_bits:
        out["alpha_excess_mse"] = alpha_excess_summary(unit_layers, unit_bits, g.value, group_size)
    return out


# --------------------------------------------------------------------------------------------
# part 3: per-unit clipping (one alpha per output channel or per group) from a shared shape
# --------------------------------------------------------------------------------------------

#: the smallest group the per-group part accepts: fewer values leave no tail to fit or clip
MIN_GROUP_SIZE = 8
#: coarse sweep of every unit's optimum, in units of the unit's own max|w|
_UNIT_COARSE = np.geomspace(0.01, 1.0, 64)
_UNIT_RATIO = float(_UNIT_COARSE[1] / _UNIT_COARSE[0])
#: points of the first linear refinement (over the coarse bracket) and of the two after it
_UNIT_FINE = (33, 17, 17)
#: points of the common alpha-multiplier grid on which "selected" compares curves
SELECT_POINTS = 25
#: the excess a tensor may have and still count as "within 5%"
WITHIN = 0.05


def unit_models() -> tuple[str, ...]:
    """The per-unit models, in report order: the tensor's best-BIC shape, one shared-shape scale
    mixture per :data:`theory.site_models.SHAPES`, the held-out selection among them, and per-unit
    absmax (the deployed default, for scale)."""
    from theory.site_models import SHAPES

    return ("unimodal_shape", *(f"scale_mixture/{s}" for s in SHAPES), "selected", "absmax",
            "sampling_floor")


#: synthetic units drawn per tensor and bit width for the sampling floor
FLOOR_UNITS = 256


def sampling_floor(dist, t_star: float, unit_size: int, bits: int, grid: str, seed: int = 0) -> float:
    """What the *true* shape's threshold costs against each unit's own sweep: ``FLOOR_UNITS``
    units of ``unit_size`` values drawn from ``dist`` (unit variance), each clipped at
    ``t_star`` times its own sample standard deviation, as the models clip real units. A unit's
    swept optimum is fitted to its own few values, so no model that predicts from a distribution
    can beat this on average: it is the floor under the models' excess at that unit size."""
    rng = np.random.default_rng(seed)
    z = np.asarray(dist.scipy.rvs(size=(FLOOR_UNITS, int(unit_size)), random_state=rng), dtype=np.float64)
    units = WeightUnits(z, None)
    kept = units.kept
    coarse = units.sse_at(units.absmax[kept], _UNIT_COARSE, [bits], grid)
    _, sse_opt = _unit_optima(units, bits, grid, coarse[0])
    sse = units.sse_at(units.std[kept], [t_star], bits, grid)[0]
    sse_opt = np.minimum(sse_opt, sse)
    return float(np.sum(sse) / np.sum(sse_opt) - 1.0)


def granularity_key(group_size: int | None) -> str:
    """``weight_per_channel`` (``group_size`` None) or ``weight_per_group<group_size>``."""
    return "weight_per_channel" if group_size is None else f"weight_per_group{int(group_size)}"


def check_group_size(group_size: Any) -> int:
    """``group_size`` as an int, or ValueError when it is not an integer >= :data:`MIN_GROUP_SIZE`."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise ValueError(f"group size must be an integer, got {group_size!r}")
    if group_size < MIN_GROUP_SIZE:
        raise ValueError(f"group size {group_size} is below {MIN_GROUP_SIZE}: a group that small has "
                         "no tail to clip and its standard deviation is mostly noise")
    return int(group_size)


def _rescaled(sm, factor: np.ndarray, rows: np.ndarray):
    """The rows ``rows`` of a prepared sweep with every row divided by its ``factor`` (> 0).

    The sorted magnitudes stay sorted and every block sum is homogeneous in the data (``S1`` of
    degree 1, ``S2`` of degree 2), so this is the prepared state of ``x / factor`` without a
    second sort; values are carried in float64 (exact to rounding). The MSE of row ``u`` at
    ``alpha`` is then ``factor_u^2`` times the rescaled row's MSE at ``alpha / factor_u``.
    """
    from empirical.sweep import SortedMagnitudes

    inv = 1.0 / np.asarray(factor, dtype=np.float64)
    col = inv[:, None]

    def pick(a, power):
        if a is None:
            return None
        a = a[rows]
        return a if power == 0 else a * (col if power == 1 else col * col)

    return SortedMagnitudes(np.ascontiguousarray(sm.sorted_abs[rows], dtype=np.float64) * col,
                            sm.block, pick(sm.anchor, 1), pick(sm.s1, 1), pick(sm.s2, 2),
                            sm.nonnegative, (len(rows),), pick(sm.positive, 0),
                            pick(sm.pos_count, 0), pick(sm.pos_s1, 1), pick(sm.pos_s2, 2))


class WeightUnits:
    """The units of one weight matrix (rows = output channels), prepared for exact per-unit sweeps.

    Parameters
    ----------
    w : array_like
        Weight matrix ``(out, in)`` (more dimensions are flattened into ``in``).
    group_size : int, optional
        None: one unit per output channel (row). Otherwise groups of ``group_size`` consecutive
        input weights within a row; when ``group_size`` does not divide the row, the last group
        of every row is shorter (the row's remainder). At least :data:`MIN_GROUP_SIZE`.

    Attributes
    ----------
    n, mean, std, absmax : numpy.ndarray
        Per unit: values, mean, standard deviation (moment-matched, mean removed) and max|w|.
    kept : numpy.ndarray
        Indices of the units with ``std > 0``. A constant unit has no spread for a model to scale
        by; it is left out of every total (and counted as ``n_constant_units``).
    """

    def __init__(self, w, group_size: int | None = None):
        from empirical.sweep import prepare, validate_data

        w = validate_data(w, "weight matrix")
        if w.ndim < 2:
            raise ValueError(f"per-unit clipping needs a weight matrix (out, in), got shape {w.shape}")
        w = w.reshape(w.shape[0], -1)
        if group_size is None:
            pieces = [(w, None)]
        else:
            gs = check_group_size(group_size)
            full = (w.shape[1] // gs) * gs
            pieces = ([(w[:, :full], gs)] if full else []) + ([(w[:, full:], None)] if full < w.shape[1] else [])
        self.group_size = None if group_size is None else int(group_size)
        self.parts, self.values = [], []
        stats = []
        for vals, gs in pieces:
            sm = prepare(vals, axis=0) if gs is None else prepare(vals, group_size=gs)
            v = vals if gs is None else np.ascontiguousarray(vals).reshape(-1, gs)
            v64 = v.astype(np.float64)
            stats.append((np.full(v.shape[0], v.shape[1]), v64.mean(axis=1), v64.std(axis=1),
                          np.abs(v64).max(axis=1)))
            self.parts.append(sm)
            self.values.append(v)
        self.n, self.mean, self.std, self.absmax = (np.concatenate(c) for c in zip(*stats))
        self.n = self.n.astype(np.int64)
        sizes = [sm.sorted_abs.shape[0] for sm in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.part_of = np.repeat(np.arange(len(sizes)), sizes)
        self.row_of = np.arange(self.offsets[-1]) - self.offsets[self.part_of]
        self.kept = np.flatnonzero(self.std > 0)

    @property
    def n_units(self) -> int:
        return int(self.n.size)

    def sse_at(self, scale: np.ndarray, ks, bits, grid: str, units: np.ndarray | None = None) -> np.ndarray:
        """Sum of squared errors of every unit at ``alpha_u = k * scale_u`` for each shared ``k``.

        ``scale`` is indexed like ``units`` (default: :attr:`kept`). Returns ``[k, unit]`` for a
        scalar ``bits``, ``[bits, k, unit]`` for a sequence.
        """
        units = self.kept if units is None else np.asarray(units, dtype=np.int64)
        scale = np.asarray(scale, dtype=np.float64)
        ks = np.atleast_1d(np.asarray(ks, dtype=np.float64))
        lead = () if np.ndim(bits) == 0 else (len(bits),)
        out = np.empty(lead + (ks.size, units.size))
        for p, sm in enumerate(self.parts):
            sel = np.flatnonzero(self.part_of[units] == p)
            if sel.size == 0:
                continue
            c = scale[sel]
            mse = _rescaled(sm, c, self.row_of[units[sel]]).mse(ks, bits, grid)
            out[..., sel] = mse.reshape(lead + (ks.size, sel.size)) * (sm.n * c * c)
        return out

    def standardized_sample(self, units: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        """At most ``size`` values drawn without replacement from ``units``, each standardized by
        its own unit's mean and standard deviation."""
        units = np.asarray(units, dtype=np.int64)
        cnt = self.n[units]
        cum = np.cumsum(cnt)
        total = int(cum[-1])
        idx = np.sort(rng.choice(total, size, replace=False)) if total > size else np.arange(total)
        pos = np.searchsorted(cum, idx, side="right")
        col = idx - (cum[pos] - cnt[pos])
        g = units[pos]
        z = np.empty(idx.size)
        for p, v in enumerate(self.values):
            m = self.part_of[g] == p
            if np.any(m):
                z[m] = v[self.row_of[g[m]], col[m]]
        return (z - self.mean[g]) / self.std[g]


def _unit_optima(units: WeightUnits, bits: int, grid: str, coarse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every kept unit's swept optimum: ``(alpha, sse)``.

    ``coarse`` is the unit's SSE on :data:`_UNIT_COARSE` (times its max|w|); around its best point
    three vectorised linear refinements follow, each on all units at once: 33 points over the
    coarse bracket ``[1/r, r]`` (``r`` the coarse ratio, 1.076), then twice 17 points over one
    step of the previous grid either side of the best point (alpha resolved to ~1e-4 of itself).
    The MSE agrees with a per-row search (:func:`empirical.optimal.empirical_optimal_alpha`,
    coarse grid, 257-point bracket, Brent) to ~1e-6 typically and 1e-4 at worst, and is at
    times below it where the jagged curve of a short row misleads either search. The best point
    seen is kept, so a unit's MSE is never above any point of its sweep.
    """
    cols = np.arange(coarse.shape[1])
    i = np.argmin(coarse, axis=0)
    alpha = _UNIT_COARSE[i] * units.absmax[units.kept]
    sse = coarse[i, cols]
    ks = np.linspace(1.0 / _UNIT_RATIO, _UNIT_RATIO, _UNIT_FINE[0])
    for stage in range(len(_UNIT_FINE)):
        curve = units.sse_at(alpha, ks, bits, grid)
        j = np.argmin(curve, axis=0)
        better = curve[j, cols] < sse
        alpha = np.where(better, ks[j] * alpha, alpha)
        sse = np.where(better, curve[j, cols], sse)
        if stage + 1 < len(_UNIT_FINE):
            h = ks[1] - ks[0]
            ks = np.linspace(1.0 - h, 1.0 + h, _UNIT_FINE[stage + 1])
    return alpha, sse


def unit_clipping(w, bits: Sequence[int] | int = (3, 4, 8), grid: str = "int", *,
                  group_size: int | None = None, unimodal: tuple[str, Sequence[float]] | None = None,
                  fit_samples: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """Per-unit clipping of one weight matrix: every unit's swept optimum against the models.

    A unit is an output channel (row, ``group_size`` None) or a group of ``group_size``
    consecutive input weights within a row (:class:`WeightUnits`). Each unit ``u`` has its own
    threshold ``alpha_u``; the tensor's MSE is the sum of the units' squared errors over its
    values. The models give every unit ``alpha_u = t* std_u`` with ``std_u`` the unit's own
    standard deviation (mean removed) and ``t*`` one number per tensor and bit width, the
    optimum of a unit-variance shape (:func:`theory.optimal_alpha` of
    :func:`theory.site_models.unit_variance`):

    * ``unimodal_shape``: the shape of the tensor's pooled best-BIC fit (``unimodal``);
    * ``scale_mixture/<shape>`` for each of :data:`theory.site_models.SHAPES`: the shape fitted
      (:func:`theory.site_models.fit_unit_shape`) to at most ``fit_samples`` values standardized by
      their own unit's mean and standard deviation;
    * ``selected``: the scale mixture whose shape's predicted total-MSE curve best matches the
      measured one (:func:`theory.site_models.curve_distance`) on held-out units: a seeded
      permutation splits the units in halves A and B, each shape is fitted on A, and the curves
      are compared over a log grid of :data:`SELECT_POINTS` multipliers ``k`` (``alpha_u = k
      std_u``) from half the smallest to twice the largest ``t*`` of the A fits, on B. The
      chosen shape's fit on all units then gives the alphas;
    * ``absmax``: ``alpha_u = max|w_u|`` (the usual per-channel int scale), for scale.

    The unit mean is ignored by the models: the grids are symmetric about 0 and a unit's mean is
    a small fraction of its spread (``mean_over_std`` reports the median ``|mean_u| / std_u``).

    Parameters
    ----------
    w : array_like
        Weight matrix ``(out, in)``.
    bits : int or sequence of int
        Bit widths.
    grid : str
        Signed grid (``int``, ``midrise``, ``midtread``, ``aciq``).
    group_size : int, optional
        None: per output channel; else per group (>= :data:`MIN_GROUP_SIZE`).
    unimodal : (family, shape), optional
        The pooled best-BIC family and its shape parameters (``()`` for Gaussian/Laplace); no
        ``unimodal_shape`` model without it.
    fit_samples : int
        Standardized values per shape fit (a seeded subsample).
    seed : int
        Seed of the split and of the subsamples.

    Returns
    -------
    dict
        ``per_bits`` (one entry per bit width: ``t_star``, ``mse`` and ``excess`` per model,
        ``mse_swept``, the selection's ``selected_shape`` and ``selection_distance``) and the
        tensor's unit statistics and shape fits (JSON-able).
        ``excess = MSE(model alphas) / MSE(per-unit swept optima) - 1``; the per-unit optimum is
        the best of its sweep and of every model's alpha for that unit, so the excess is >= 0.
    """
    from theory import expected_mse, optimal_alpha
    from theory.grids import Grid, check_bits
    from theory.site_models import SHAPES, curve_distance, fit_unit_shape, unit_variance

    g = Grid.parse(grid)
    if g.one_sided:
        raise ValueError("weights are signed; use a signed grid (int, midrise, midtread, aciq)")
    bits = [check_bits(int(b), g) for b in np.atleast_1d(bits)]
    if not bits:
        raise ValueError("no bit widths given")
    if int(fit_samples) < 10:
        raise ValueError(f"fit_samples must be at least 10, got {fit_samples}")
    units = WeightUnits(w, group_size)
    kept = units.kept
    if kept.size == 0:
        raise ValueError("every unit of the weight matrix is constant: nothing to clip")
    std, n = units.std[kept], units.n[kept]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(kept)
    half = perm.size // 2
    part_a, part_b = (np.sort(perm[:half]), np.sort(perm[half:])) if half else (kept, kept)
    z_all = units.standardized_sample(kept, int(fit_samples), rng)
    z_a = units.standardized_sample(part_a, int(fit_samples), rng)
    shapes = {s: tuple(fit_unit_shape(z_all, s)) for s in SHAPES}
    shapes_a = {s: tuple(fit_unit_shape(z_a, s)) for s in SHAPES}
    dists = {s: unit_variance(s, *p) for s, p in shapes.items()}
    dists_a = {s: unit_variance(s, *p) for s, p in shapes_a.items()}
    uni = None
    if unimodal is not None:
        uni = unit_variance(unimodal[0], *unimodal[1])
    b_idx = np.searchsorted(kept, part_b)  # positions of half B among the kept units
    weight_b = float(np.sum(n[b_idx] * std[b_idx] ** 2))

    coarse = units.sse_at(units.absmax[kept], _UNIT_COARSE, bits, g.value)
    at_absmax = units.sse_at(units.absmax[kept], [1.0], bits, g.value)[:, 0]
    per_bits = []
    for j, m in enumerate(bits):
        alpha_opt, sse_opt = _unit_optima(units, m, g.value, coarse[j])
        t = {}
        if uni is not None:
            t["unimodal_shape"] = float(optimal_alpha(uni, m, g.value))
        for s in SHAPES:
            t[f"scale_mixture/{s}"] = float(optimal_alpha(dists[s], m, g.value))
        t_a = {s: float(optimal_alpha(dists_a[s], m, g.value)) for s in SHAPES}
        ks = np.geomspace(0.5 * min(t_a.values()), 2.0 * max(t_a.values()), SELECT_POINTS)
        measured = units.sse_at(std[b_idx], ks, m, g.value, units=part_b).sum(axis=1)
        distance = {s: curve_distance(weight_b * np.asarray(expected_mse(dists_a[s], ks, m, g.value),
                                                            dtype=np.float64), measured)
                    for s in SHAPES}
        chosen = min(distance, key=lambda s: (distance[s], s))
        t["selected"] = t[f"scale_mixture/{chosen}"]
        names = list(t)
        sse = units.sse_at(std, [t[k] for k in names], m, g.value)
        cand = np.vstack([sse, at_absmax[j][None, :]])
        cand_alpha = np.vstack([np.outer([t[k] for k in names], std), units.absmax[kept][None, :]])
        i_best = np.argmin(cand, axis=0)
        cols = np.arange(kept.size)
        better = cand[i_best, cols] < sse_opt
        alpha_opt = np.where(better, cand_alpha[i_best, cols], alpha_opt)
        sse_opt = np.where(better, cand[i_best, cols], sse_opt)
        total_opt = float(np.sum(sse_opt))
        totals = {k: float(np.sum(sse[i])) for i, k in enumerate(names)}
        totals["absmax"] = float(np.sum(at_absmax[j]))
        n_tot = float(np.sum(n))
        excess = {k: (v / total_opt - 1.0 if total_opt > 0 else None) for k, v in totals.items()}
        excess["sampling_floor"] = sampling_floor(dists[chosen], t["selected"], int(units.n.max()), m,
                                                  g.value, seed=seed + m)
        ratio = alpha_opt / std
        per_bits.append({
            "bits": int(m), "mse_swept": total_opt / n_tot,
            "alpha_over_std_swept": {"q10": float(np.quantile(ratio, 0.1)),
                                     "median": float(np.median(ratio)),
                                     "q90": float(np.quantile(ratio, 0.9))},
            "t_star": t, "t_star_half_a": t_a,
            "mse": {k: v / n_tot for k, v in totals.items()}, "excess": excess,
            "selected_shape": chosen, "selection_distance": distance,
            "selection_k": [float(ks[0]), float(ks[-1])],
        })
    mos = np.abs(units.mean[kept]) / std
    return to_jsonable({
        "granularity": "channel" if group_size is None else "group",
        "group_size": units.group_size, "n_units": units.n_units, "n_kept": int(kept.size),
        "n_constant_units": int(units.n_units - kept.size),
        "unit_size": int(units.n.max()), "n_short_units": int(np.count_nonzero(units.n < units.n.max())),
        "mean_over_std": {"median": float(np.median(mos)), "q90": float(np.quantile(mos, 0.9)),
                          "max": float(np.max(mos))},
        "std_spread": float(np.quantile(std, 0.9) / np.quantile(std, 0.1)),
        "unimodal": None if unimodal is None else {"family": type(uni).name, "shape": list(uni.shape)},
        "shapes": {s: list(p) for s, p in shapes.items()},
        "shapes_half_a": {s: list(p) for s, p in shapes_a.items()},
        "fit_values": int(z_all.size), "split": [int(part_a.size), int(part_b.size)],
        "per_bits": per_bits,
    })


def alpha_excess_summary(unit_layers: Sequence[Mapping[str, Any]], bits: Sequence[int], grid: str,
                         group_size: int) -> dict[str, Any]:
    """The distribution over tensors of every per-unit model's MSE excess.

    ``unit_layers`` holds one record per tensor with a :func:`unit_clipping` result under each
    :func:`granularity_key`. Returns ``weight_per_channel`` and ``weight_per_group<group_size>``,
    each ``model -> {str(bits): {"median", "q90", "share_within_5pct", "n"}}`` (``share_within_5pct``:
    the share of tensors whose excess is at most :data:`WITHIN`), with the count of shapes that
    ``selected`` chose (``selected_shape_counts``), the median over tensors of each tensor's median
    ``|mean_u| / std_u`` (``mean_over_std_median``) and the per-tensor records (``layers``).
    """
    grans = [granularity_key(None), granularity_key(group_size)]
    bits = [int(b) for b in bits]
    out: dict[str, Any] = {"grid": grid, "bits": bits, "group_size": int(group_size),
                           "granularities": grans, "models": list(unit_models()), "within": WITHIN}
    counts: dict[str, Any] = {}
    mos: dict[str, Any] = {}
    for gk in grans:
        recs = [lay[gk] for lay in unit_layers]
        table: dict[str, Any] = {}
        for model in unit_models():
            row = {}
            for j, m in enumerate(bits):
                ex = np.asarray(finite(r["per_bits"][j]["excess"].get(model) for r in recs), dtype=np.float64)
                row[str(m)] = ({"median": float(np.median(ex)), "q90": float(np.quantile(ex, 0.9)),
                                "share_within_5pct": float(np.mean(ex <= WITHIN)), "n": int(ex.size)}
                               if ex.size else {"median": None, "q90": None, "share_within_5pct": None, "n": 0})
            table[model] = row
        out[gk] = table
        counts[gk] = {str(m): {s: sum(r["per_bits"][j]["selected_shape"] == s for r in recs)
                               for s in dict.fromkeys(r["per_bits"][j]["selected_shape"] for r in recs)}
                      for j, m in enumerate(bits)}
        mos[gk] = float(np.median([r["mean_over_std"]["median"] for r in recs])) if recs else None
    out["selected_shape_counts"] = counts
    out["mean_over_std_median"] = mos
    out["layers"] = list(unit_layers)
    return to_jsonable(out)


def plot_alpha_excess(excess: Mapping[str, Any], path: Path, model: str = "") -> Path:
    """Box plots (log x) of the per-tensor MSE excess of each per-unit model over the swept per-unit
    optima, per output channel and per group, at 4 bits (or the bit width nearest to it)."""
    use_agg()
    import matplotlib
    import matplotlib.pyplot as plt

    bits = list(excess["bits"])
    j = min(range(len(bits)), key=lambda i: (abs(bits[i] - 4), bits[i]))
    grans = list(excess["granularities"])
    models = list(excess["models"])
    floor = 1e-6
    fig, axes = plt.subplots(1, len(grans), figsize=(4.6 * len(grans), 0.45 * len(models) + 1.6),
                             sharey=True, squeeze=False)
    rng = np.random.default_rng(0)  # jitter of the points only
    mpl_version = tuple(int(p) for p in matplotlib.__version__.split(".")[:2])
    horizontal = {"orientation": "horizontal"} if mpl_version >= (3, 10) else {"vert": False}
    for ax, gk in zip(axes[0], grans):
        data = [np.maximum(finite(lay[gk]["per_bits"][j]["excess"].get(mo) for lay in excess["layers"]), floor)
                for mo in models]
        pos = np.arange(len(models))[::-1]
        shown = [(d, p) for d, p in zip(data, pos) if len(d)]
        if shown:
            ax.boxplot([d for d, _ in shown], positions=[p for _, p in shown], widths=0.6,
                       showfliers=False, **horizontal)
            for d, p in shown:
                ax.plot(d, p + rng.uniform(-0.18, 0.18, len(d)), "o", ms=2.5, alpha=0.6, color="tab:blue")
        ax.axvline(WITHIN, color="tab:red", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yticks(pos)
        ax.set_yticklabels(models, fontsize=7)
        ax.set_title("per output channel" if gk == granularity_key(None)
                     else f"per group of {excess['group_size']}", fontsize=9)
        ax.set_xlabel(f"MSE excess over the swept per-unit optima (floored at {floor:g})", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{model}, grid {excess['grid']}, M={bits[j]}, {len(excess['layers'])} tensors "
                 f"(dashed: {WITHIN:.0%})", fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


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
    real = excess = None
    if config.model != "none":
        weights, meta = model_weights(config.model, config.max_layers)
        report = real_weights_report(weights, config.real_bits_used, config.real_grid,
                                     max_samples=config.max_fit_samples, seed=config.seed,
                                     cache=cache, model=config.model, unit_bits=config.unit_bits,
                                     group_size=config.group_size)
        excess = report.pop("alpha_excess_mse")
        note = prequantized_note(config.model, meta)
        real = {"model": config.model, "model_metadata": meta, "note": note, **report}
        excess = {"model": config.model, "note": unit_note(excess, note), **excess}
    return protocol.Result(EXPERIMENT, config, to_jsonable({"synthetic": synthetic, "real_weights": real,
                                                            "alpha_excess_mse": excess}))


def unit_note(excess: Mapping[str, Any], prequantized: str | None) -> str:
    """What the per-unit numbers are, for the JSON: the models' alpha, the ignored unit mean (with
    its measured size) and, for a pre-quantized model, why 8 bits look odd."""
    mos = excess.get("mean_over_std_median") or {}
    sizes = ", ".join(f"{k.replace('weight_', '')} {v:.3g}" for k, v in mos.items() if v is not None)
    text = ("Per unit (output channel, or group of consecutive input weights in a row) alpha_u = t* x "
            "std_u, t* the optimum of a unit-variance shape (one per tensor and bit width); the unit "
            "mean is ignored because the grids are symmetric about 0 (median over tensors of the "
            f"median |mean_u|/std_u: {sizes}). excess = MSE(model alphas) / MSE(swept per-unit optima) - 1.")
    if prequantized:
        text += (" " + prequantized + " At 8 bits the swept per-unit optimum can exploit that coarser "
                 "grid (absmax keeps its levels), so the 8-bit excesses are reported, not tuned.")
    return text


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
    excess = result.get("alpha_excess_mse")
    if excess:
        urows = []
        for lay in excess["layers"]:
            for gk in excess["granularities"]:
                r = lay[gk]
                for pb in r["per_bits"]:
                    for mo in excess["models"]:
                        if mo not in pb["excess"]:
                            continue
                        urows.append({
                            "layer": lay["name"], "granularity": gk, "group_size": r["group_size"],
                            "bits": pb["bits"], "model": mo, "t_star": pb["t_star"].get(mo),
                            "excess": pb["excess"][mo], "mse": pb["mse"].get(mo), "mse_swept": pb["mse_swept"],
                            "selected_shape": pb["selected_shape"], "n_units": r["n_units"],
                            "unit_size": r["unit_size"], "n_short_units": r["n_short_units"],
                            "n_constant_units": r["n_constant_units"],
                            "mean_over_std_median": r["mean_over_std"]["median"],
                            "alpha_over_std_swept_median": pb["alpha_over_std_swept"]["median"]})
        files.append(write_csv(out / "real_weights_units.csv", urows, _UNIT_COLUMNS))
        files.append(plot_alpha_excess(excess, out / "alpha_excess_weights.png", excess.get("model", "")))
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
    excess = result.get("alpha_excess_mse")
    if excess:
        b = 4 if 4 in excess["bits"] else excess["bits"][0]
        parts = [f"{gk.replace('weight_', '')} {100 * excess[gk]['selected'][str(b)]['median']:.2g}%"
                 for gk in excess["granularities"] if excess[gk]["selected"][str(b)]["n"]]
        if parts:
            text += f"; per-unit selected shape, M={b}, median excess: {', '.join(parts)}"
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
    _unit_macros(ms, result.get("alpha_excess_mse"))
    return ms


def _unit_macros(ms: MacroSet, excess: Mapping[str, Any] | None) -> None:
    """``\\OptWeight...``: the per-unit part. For granularity ``Channel``/``Group``, model
    (``Selected``, ``UnimodalShape``, ``ScaleMixtureLaplace``, ..., ``Absmax``) and bit width:
    ``OptWeight<Gran><Model>Median<Bits>``, ``...QNinety<Bits>`` and ``...ShareFive<Bits>`` (each
    also as ``...Pct``), plus ``OptWeight<Gran>Tensors``, ``OptWeight<Gran>MeanOverStdMedian``, the
    count of tensors whose selected shape is each shape (``OptWeight<Gran>SelectedCount<Shape><Bits>``)
    and ``OptWeightGroupSize``."""
    if not excess:
        return
    from theory.site_models import SHAPES

    ms.add("OptWeightGroupSize", excess.get("group_size"), "alpha_excess_mse.group_size")
    for gk in excess.get("granularities", []):
        gran = "Channel" if gk == "weight_per_channel" else "Group"
        table = excess.get(gk) or {}
        n = next((c.get("n") for row in table.values() for c in row.values()), None)
        ms.add(["OptWeight", gran, "Tensors"], n, f"alpha_excess_mse.{gk}[*][*].n")
        ms.add(["OptWeight", gran, "MeanOverStdMedian"], (excess.get("mean_over_std_median") or {}).get(gk),
               f"alpha_excess_mse.mean_over_std_median.{gk}")
        for mo, row in table.items():
            for b, st in row.items():
                where = f"alpha_excess_mse.{gk}[{mo}][{b}]"
                for key, word in (("median", "Median"), ("q90", "QNinety"), ("share_within_5pct", "ShareFive")):
                    ms.add_pct(["OptWeight", gran, mo, word, int(b)], st.get(key), f"{where}.{key}")
        for b, cnt in (excess.get("selected_shape_counts") or {}).get(gk, {}).items():
            for s in (*SHAPES, *(s for s in cnt if s not in SHAPES)):
                ms.add(["OptWeight", gran, "SelectedCount", s, int(b)], int(cnt.get(s, 0)),
                       f"alpha_excess_mse.selected_shape_counts.{gk}[{b}][{s}]")


main = protocol.entry_point(__name__)


if __name__ == "__main__":
    raise SystemExit(main())
