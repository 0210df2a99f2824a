"""Experiment: how far is the MSE-optimal uniform quantizer from the rate-distortion bound?

``python -m validate.rate_distortion [--quick] [--bits 1 2 ...] [--samples N] [--seed S] [--out DIR]``

For every family (the synthetic members of ``validate.optimal_alpha``: Gaussian, Laplace,
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

import argparse
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from validate._common import (
    default_out_dir,
    provenance,
    save_figure,
    use_agg,
    write_csv,
    write_json,
    write_latex_table,
)

EXPERIMENT = "rate_distortion"
DEFAULT_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
DEFAULT_FAMILIES = ("gaussian", "laplace", "gennorm", "student_t", "lognormal")
DEFAULT_SAMPLES = 1_000_000
QUICK_SAMPLES = 20_000

_CSV_COLUMNS = [
    "family", "params", "excess_kurtosis", "entropy_bits", "grid", "bits", "samples",
    "d_slb", "d_ecsq_high_rate", "d_panter_dite", "d_lloyd_max", "d_uniform_theory",
    "alpha_uniform_theory", "d_uniform_swept", "alpha_uniform_swept",
    "gap_uniform_bits", "gap_lloyd_max_bits", "gap_panter_dite_bits", "gap_swept_bits",
    "gap_ecsq_bits", "lloyd_max_over_panter_dite", "uniform_over_lloyd_max",
    "lloyd_max_iterations",
]


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
    from validate.optimal_alpha import sample_family, synthetic_distribution

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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m validate.rate_distortion",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/rate_distortion)")
    p.add_argument("--bits", type=int, nargs="+", default=None, help="bit widths (default 1..8)")
    p.add_argument("--samples", type=float, default=None,
                   help=f"samples per family for the swept points (default {DEFAULT_SAMPLES:,}; "
                        f"--quick {QUICK_SAMPLES:,}; 0 skips the sweep)")
    p.add_argument("--families", nargs="+", default=None,
                   help=f"families (default {' '.join(DEFAULT_FAMILIES)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_SAMPLES:,} samples, bits 1 2 4 8")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out) if args.out is not None else default_out_dir(EXPERIMENT)
    bits = list(args.bits) if args.bits else ([1, 2, 4, 8] if args.quick else list(DEFAULT_BITS))
    if args.samples is None:
        samples = QUICK_SAMPLES if args.quick else DEFAULT_SAMPLES
    else:
        if not math.isfinite(args.samples) or args.samples < 0:
            raise ValueError(f"--samples must be >= 0, got {args.samples}")
        samples = int(args.samples)
    if 0 < samples < 1000:
        raise ValueError(f"--samples: {samples} samples are too few for a swept MSE (use >= 1000, or 0)")
    families = list(args.families or DEFAULT_FAMILIES)
    from theory.grids import check_bits
    from validate.optimal_alpha import synthetic_distribution

    for m in bits:
        check_bits(m)
    for f in families:
        synthetic_distribution(f)  # unknown family: ValueError before any work
    t0 = time.perf_counter()
    items = [family_item(f, bits, samples, args.seed) for f in families]
    rows = [r for it in items for r in it["rows"]]

    from theory import ecsq_gap_bits, ecsq_gap_db

    files = {"csv": write_csv(out / "rate_distortion.csv", rows, _CSV_COLUMNS)}
    table = gap_table_rows(items, bits)
    files["gap_table"] = write_latex_table(
        out / "gap_table.tex", table, ["family", "kurtosis", "quantizer", *[f"M{m}" for m in bits]],
        headers=["family", "ex.\\ kurt.", "quantizer", *[f"$M={m}$" for m in bits]],
        caption=(r"Rate gap $\tfrac12\log_2(D/D_{\mathrm{SLB}})$ in bits of fixed-rate quantizers "
                 r"with $2^M$ levels against the Shannon lower bound. The entropy-coded uniform "
                 r"quantizer's high-rate gap is $\tfrac12\log_2(\pi e/6)=" + f"{ecsq_gap_bits():.4f}" + r"$ bits. Swept: "
                 f"{samples:,} seeded samples per family."),
        label="tab:rate-distortion-gap", digits=3)
    files["figure"] = plot(items, out / "d_vs_r.png")

    gap4 = {it["family"]: {k: r[k] for k in ("gap_uniform_bits", "gap_lloyd_max_bits",
                                               "gap_panter_dite_bits", "gap_swept_bits")}
            for it in items for r in it["rows"] if r["bits"] == 4}
    doc = {
        "experiment": EXPERIMENT,
        "provenance": provenance(bits=bits, samples=samples, seed=args.seed, families=families,
                                 quick=bool(args.quick)),
        "ecsq_gap_bits": ecsq_gap_bits(),
        "ecsq_gap_db": ecsq_gap_db(),
        "families": items,
        "gap_at_4_bits": gap4 if 4 in bits else None,
        "files": {k: str(v) for k, v in files.items()},
        "elapsed_s": time.perf_counter() - t0,
    }
    write_json(out / "rate_distortion.json", doc)
    return doc


if __name__ == "__main__":
    main()
