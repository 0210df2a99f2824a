"""Experiment: how far is the MSE-optimal uniform quantizer from the rate-distortion bound?

``python -m validate.rate_distortion [--quick] [--bits 1 2 ...] [--samples N] [--seed S] [--out DIR]``
(``--help`` lists every flag with its default)

For every family (the synthetic members of ``validate._synthetic``: Gaussian, Laplace,
generalized Gaussian beta=0.8, Student-t nu=6, lognormal sigma=0.6) and bit width M, the distortion
``D`` (MSE) at rate ``R = M`` bits of

* the Shannon lower bound ``2^{2h}/(2 pi e) 2^{-2R}`` (``theory.shannon_lower_bound``),
* the high-rate entropy-coded uniform quantizer, ``pi e / 6`` above it (0.2546 bits),
* the Panter-Dite high-resolution value of the optimal fixed-rate quantizer
  (``theory.panter_dite``),
* the Lloyd-Max quantizer, solved exactly (``theory.lloyd_max``),
* theory's MSE-optimal clipped uniform quantizer (``theory.optimal_mse``; grid ``midrise`` for
  two-sided families, ``uint`` for the lognormal: ``2^M`` levels like Lloyd-Max), and
* the same uniform quantizer swept on seeded samples (``empirical.optimal.empirical_optimal_alpha``:
  the minimum of the sample's exact MSE curve, biased low because it is fitted to the sample).

Gaps are rates, in bits: ``gap = 1/2 log2(D / D_SLB)``.

Outputs under ``--out`` (default ``results/rate_distortion``): ``rate_distortion.json`` (provenance
+ every number), ``rate_distortion.csv`` (one row per family and bit width),
``gap_table.tex`` (gaps in bits, family x quantizer by bit width) and ``d_vs_r.png`` (one panel
per family, log D against R).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from validate import _protocol as protocol
from validate._common import save_figure, use_agg, write_csv, write_json
from validate._latex import MacroSet, finite, format_number, write_latex_table
from validate._synthetic import SYNTHETIC_FAMILIES, family_label, sample_family, synthetic_distribution

EXPERIMENT = "rate_distortion"

_CSV_COLUMNS = [
    "family", "params", "excess_kurtosis", "entropy_bits", "grid", "bits", "samples",
    "d_slb", "d_ecsq_high_rate", "d_panter_dite", "d_lloyd_max", "d_uniform_theory",
    "alpha_uniform_theory", "d_uniform_swept", "alpha_uniform_swept",
    "gap_uniform_bits", "gap_lloyd_max_bits", "gap_panter_dite_bits", "gap_swept_bits",
    "gap_ecsq_bits", "lloyd_max_over_panter_dite", "uniform_over_lloyd_max",
    "lloyd_max_iterations",
]


@dataclass(frozen=True)
class Config:
    bits: tuple[int, ...] = protocol.param((1, 2, 3, 4, 5, 6, 7, 8), "bit widths (rates R = M)")
    samples: int = protocol.param(1_000_000, "seeded samples per family for the swept points (0 skips the sweep)")
    families: tuple[str, ...] = protocol.param(SYNTHETIC_FAMILIES, "distribution families",
                                               choices=SYNTHETIC_FAMILIES)
    seed: int = protocol.param(0, "random seed of the samples")

    def __post_init__(self):
        protocol.check_bits_grid(self.bits)
        protocol.check_positive("samples", self.samples, allow_zero=True)
        if 0 < self.samples < 1000:
            raise protocol.ConfigError(f"--samples: {self.samples} samples are too few for a swept MSE "
                                       "(use >= 1000, or 0 to skip the sweep)")

    @classmethod
    def quick(cls) -> "Config":
        return cls(bits=(1, 2, 4, 8), samples=20_000)


def _gap(d: float, d_slb: float) -> float:
    return 0.5 * math.log2(d / d_slb)


def family_item(family: str, bits: Sequence[int], samples: int, seed: int) -> dict[str, Any]:
    """All rate-distortion numbers of one family over ``bits`` (theory and, if ``samples > 0``,
    the swept uniform quantizer on seeded samples)."""
    from theory import (
        differential_entropy_bits,
        ecsq_gap_bits,
        ecsq_high_rate,
        lloyd_max,
        optimal_alpha,
        panter_dite,
        shannon_lower_bound,
        uniform_mse,
    )
    dist = synthetic_distribution(family)
    grid = "uint" if dist.one_sided else "midrise"
    sm = None
    if samples > 0:
        from empirical.sweep import prepare

        sm = prepare(sample_family(family, samples, seed))
    rows = []
    for m in bits:
        d_slb = float(shannon_lower_bound(dist, m))
        lm = lloyd_max(dist, m)
        d_u = float(uniform_mse(dist, m, grid))
        row: dict[str, Any] = {
            "family": family, "params": repr(dist), "excess_kurtosis": dist.excess_kurtosis,
            "entropy_bits": float(differential_entropy_bits(dist)), "grid": grid, "bits": int(m),
            "samples": int(samples), "d_slb": d_slb,
            "d_ecsq_high_rate": float(ecsq_high_rate(dist, m)),
            "d_panter_dite": float(panter_dite(dist, m)), "d_lloyd_max": float(lm.mse),
            "d_uniform_theory": d_u, "alpha_uniform_theory": float(optimal_alpha(dist, m, grid)),
            "gap_uniform_bits": _gap(d_u, d_slb), "gap_lloyd_max_bits": _gap(float(lm.mse), d_slb),
            "gap_panter_dite_bits": _gap(float(panter_dite(dist, m)), d_slb),
            "gap_ecsq_bits": ecsq_gap_bits(),
            "lloyd_max_over_panter_dite": float(lm.mse) / float(panter_dite(dist, m)),
            "uniform_over_lloyd_max": d_u / float(lm.mse),
            "lloyd_max_iterations": lm.iterations,
            "d_uniform_swept": None, "alpha_uniform_swept": None, "gap_swept_bits": None,
        }
        if sm is not None:
            from empirical.optimal import empirical_optimal_alpha

            opt = empirical_optimal_alpha(sm, m, grid)
            row.update(d_uniform_swept=float(opt.mse), alpha_uniform_swept=float(opt.alpha),
                       gap_swept_bits=_gap(float(opt.mse), d_slb))
        rows.append(row)
    return {"family": family, "params": repr(dist), "grid": grid,
            "excess_kurtosis": dist.excess_kurtosis, "rows": rows}


def gap_table_rows(items: Sequence[dict[str, Any]], bits: Sequence[int]) -> list[dict[str, Any]]:
    """Rows family x quantizer, columns one gap (bits) per bit width."""
    out = []
    for it in items:
        by_bits = {r["bits"]: r for r in it["rows"]}
        for label, key in (("uniform (theory)", "gap_uniform_bits"),
                           ("uniform (swept)", "gap_swept_bits"),
                           ("Lloyd-Max", "gap_lloyd_max_bits"),
                           ("Panter-Dite", "gap_panter_dite_bits")):
            if all(by_bits[m][key] is None for m in bits):
                continue
            row = {"family": it["family"], "kurtosis": it["excess_kurtosis"], "quantizer": label}
            row.update({f"M{m}": by_bits[m][key] for m in bits})
            out.append(row)
    return out


def plot(items: Sequence[dict[str, Any]], path: Path) -> Path:
    use_agg()
    import matplotlib.pyplot as plt

    n = len(items)
    ncols = min(3, n)
    nrows = int(math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for ax, it in zip(axes.ravel(), items):
        rows = it["rows"]
        r = np.array([x["bits"] for x in rows], dtype=float)
        rr = np.linspace(max(r.min() - 0.25, 0), r.max() + 0.25, 100)
        slb0 = rows[0]["d_slb"] * 4.0 ** rows[0]["bits"]
        pd0 = rows[0]["d_panter_dite"] * 4.0 ** rows[0]["bits"]
        ax.plot(rr, slb0 * 4.0 ** -rr, "k-", lw=1.2, label="Shannon lower bound")
        ax.plot(rr, math.pi * math.e / 6 * slb0 * 4.0 ** -rr, "k:", lw=1,
                label=r"ECSQ high rate ($\pi e/6$)")
        ax.plot(rr, pd0 * 4.0 ** -rr, "--", color="tab:gray", lw=1, label="Panter-Dite")
        ax.plot(r, [x["d_lloyd_max"] for x in rows], "s", color="tab:blue", ms=4, mfc="none",
                label="Lloyd-Max")
        ax.plot(r, [x["d_uniform_theory"] for x in rows], "o-", color="tab:red", ms=3.5, lw=0.8,
                label="optimal uniform (theory)")
        sw = [x["d_uniform_swept"] for x in rows]
        if any(v is not None for v in sw):
            ax.plot(r, [np.nan if v is None else v for v in sw], "x", color="tab:green", ms=5,
                    label="uniform, swept on samples")
        ax.set_yscale("log")
        ax.set_title(f"{it['params']} [{it['grid']}]", fontsize=7)
        ax.set_xlabel("R (bits)", fontsize=8)
        ax.set_ylabel("D (MSE)", fontsize=8)
        ax.tick_params(labelsize=7)
    h, lab = axes[0, 0].get_legend_handles_labels()
    fig.legend(h, lab, loc="upper center", ncol=3, fontsize=7, bbox_to_anchor=(0.5, 1.0 + 0.04 / nrows))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.06 / nrows))
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def run(config: Config, cache=None) -> protocol.Result:
    """Every family's rate-distortion numbers; one cached item per family."""
    from theory import ecsq_gap_bits, ecsq_gap_db

    items = []
    for f in protocol.progress(config.families, desc="families", unit="family"):
        key = {"family": f, "bits": list(config.bits), "samples": config.samples, "seed": config.seed}
        item = cache.get(key) if cache is not None else None
        if item is None:
            item = family_item(f, config.bits, config.samples, config.seed)
            if cache is not None:
                cache.put(key, item)
        items.append(item)
    gap4 = {it["family"]: {k: r[k] for k in ("gap_uniform_bits", "gap_lloyd_max_bits",
                                               "gap_panter_dite_bits", "gap_swept_bits")}
            for it in items for r in it["rows"] if r["bits"] == 4}
    return protocol.Result(EXPERIMENT, config, {
        "ecsq_gap_bits": ecsq_gap_bits(), "ecsq_gap_db": ecsq_gap_db(), "families": items,
        "gap_at_4_bits": gap4 or None})


def write(result: protocol.Result, out: Path) -> list[Path]:
    bits = sorted({int(r["bits"]) for it in result["families"] for r in it["rows"]})
    items = result["families"]
    samples = result.config_dict["samples"]
    rows = [r for it in items for r in it["rows"]]
    files = [write_csv(out / "rate_distortion.csv", rows, _CSV_COLUMNS)]
    files.append(write_latex_table(
        out / "gap_table.tex", gap_table_rows(items, bits),
        ["family", "kurtosis", "quantizer", *[f"M{m}" for m in bits]],
        headers=["family", "ex.\\ kurt.", "quantizer", *[f"$M={m}$" for m in bits]],
        caption=(r"Rate gap $\tfrac12\log_2(D/D_{\mathrm{SLB}})$ in bits of fixed-rate quantizers "
                 r"with $2^M$ levels against the Shannon lower bound. The entropy-coded uniform "
                 r"quantizer's high-rate gap is $\tfrac12\log_2(\pi e/6)=" + format_number(result["ecsq_gap_bits"], 4)
                 + r"$ bits. Swept: " + (f"{format_number(samples)} seeded samples per family." if samples
                                         else "not run.")),
        label="tab:rate-distortion-gap", digits=3))
    files.append(plot(items, out / "d_vs_r.png"))
    files.append(write_json(out / f"{EXPERIMENT}.json", result.to_json()))
    return files


def summary(result: protocol.Result) -> str:
    g = result.get("gap_at_4_bits") or {}
    worst = max(g.items(), key=lambda kv: kv[1]["gap_uniform_bits"], default=None)
    return (f"largest 4-bit gap of the optimal uniform quantizer: {worst[1]['gap_uniform_bits']:.3f} bits "
            f"({worst[0]})") if worst else "no 4-bit rows"


_RD_GAPS = (("Uniform", "gap_uniform_bits"), ("Swept", "gap_swept_bits"),
            ("LloydMax", "gap_lloyd_max_bits"), ("PanterDite", "gap_panter_dite_bits"))


def macros(result: protocol.Result) -> MacroSet:
    ms = MacroSet(f"{EXPERIMENT}.json")
    ms.add("RDECSQGapBits", result.get("ecsq_gap_bits"), "ecsq_gap_bits")
    ms.add("RDECSQGapDb", result.get("ecsq_gap_db"), "ecsq_gap_db")
    ms.add("RDSamples", result.config_dict.get("samples"), "provenance.config.samples")
    ms.add("RDElapsedSeconds", result.timing.get("wall_seconds"), "timing.wall_seconds")
    items = result.get("families", [])
    bits = sorted({int(r["bits"]) for it in items for r in it["rows"]})
    if bits:
        ms.add("RDMinBits", bits[0], "smallest bit width")
        ms.add("RDMaxBits", bits[-1], "largest bit width")
    for it in items:
        fam = it["family"]
        ms.add(["RDKurtosis", fam], it.get("excess_kurtosis"), f"families[{fam}].excess_kurtosis")
        for r in it["rows"]:
            b = int(r["bits"])
            where = f"families[{fam}].rows[bits={b}]"
            for label, key in _RD_GAPS:
                ms.add(["RDGap", label, fam, b], r.get(key), f"{where}.{key}")
            for name, key in (("RDLloydMaxOverPanterDite", "lloyd_max_over_panter_dite"),
                              ("RDUniformOverLloydMax", "uniform_over_lloyd_max"),
                              ("RDLloydMaxMse", "d_lloyd_max")):
                ms.add([name, fam, b], r.get(key), f"{where}.{key}")
    # summaries across families: at 4 bits, and at the top rate
    for b in sorted({4, *bits[-1:]} & set(bits)):
        rows = [(it["family"], r) for it in items for r in it["rows"] if int(r["bits"]) == b]
        for label, key in _RD_GAPS:
            vals = [(r.get(key), fam) for fam, r in rows if finite([r.get(key)])]
            if vals:
                hi, lo = max(vals), min(vals)
                where = f"families[].rows[bits={b}].{key}"
                ms.add(["RDGap", label, "Max", b], hi[0], f"max over families of {where}")
                ms.add(["RDGap", label, "Max", b, "Family"], family_label(hi[1]), f"argmax of {where}")
                ms.add(["RDGap", label, "Min", b], lo[0], f"min over families of {where}")
                ms.add(["RDGap", label, "Min", b, "Family"], family_label(lo[1]), f"argmin of {where}")
    if bits:
        top = bits[-1]
        dev = [abs(r["lloyd_max_over_panter_dite"] - 1.0) for it in items for r in it["rows"]
               if int(r["bits"]) == top and finite([r.get("lloyd_max_over_panter_dite")])]
        ms.add_pct("RDLloydMaxPanterDiteWorstDevAtMaxBits", max(dev) if dev else None,
                   f"max over families of |lloyd_max_over_panter_dite - 1| at bits={top}")
    return ms


main = protocol.entry_point(__name__)


if __name__ == "__main__":
    raise SystemExit(main())
