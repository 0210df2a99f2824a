"""Benchmark: exact MSE sweep, empirical.sweep vs plain vectorised numpy vs torch (CPU).

``python benchmarks/bench_sweep.py [--n 1e7] [--alphas 128] [--grid int] [--full]``

Same data (float32 Gaussian samples), same (bits, alpha) points, one run, printed side by side
as ratios (docs/design.md, "Measuring speed"). Each baseline evaluates one (bits, alpha) pair at a
time on the whole array with in-place float64 array operations, which is how the sweep is
written without a kernel. When a baseline's full sweep would take longer than ``--budget``
seconds it is timed on the first pairs only and scaled by the pair count; the output says so.
Results are checked to agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from empirical.sweep import mse_sweep  # noqa: E402
from theory.grids import Grid, step_factor  # noqa: E402


def _pairs(alphas, bits, grid):
    for j, m in enumerate(bits):
        f, kmin, kmax, off = step_factor(grid, m)
        for k, a in enumerate(alphas):
            yield j, k, m, f * a, kmin, kmax, off, a


def numpy_sweep(x, alphas, bits, grid, max_pairs=None):
    """One (bits, alpha) at a time, in-place float64 numpy; returns (mse, pairs done)."""
    g = Grid.parse(grid)
    x64 = x.astype(np.float64)
    buf = np.empty_like(x64)
    out = np.full((len(bits), len(alphas)), np.nan)
    done = 0
    for j, k, m, step, kmin, kmax, off, a in _pairs(alphas, bits, g):
        if max_pairs is not None and done >= max_pairs:
            break
        if g is Grid.ACIQ:
            np.clip(x64, -a, a, out=buf)
            np.subtract(x64, buf, out=buf)
            out[j, k] = np.dot(buf, buf) / x64.size + a * a / (3.0 * 4.0**m)
        else:
            np.divide(x64, step, out=buf)
            buf += 0.5 - off
            np.floor(buf, out=buf)
            np.clip(buf, kmin, kmax, out=buf)
            buf += off
            buf *= step
            np.subtract(x64, buf, out=buf)
            out[j, k] = np.dot(buf, buf) / x64.size
        done += 1
    return out, done


def torch_sweep(x, alphas, bits, grid, max_pairs=None):
    """The same computation with torch tensors on the CPU (float64, in place)."""
    import torch

    g = Grid.parse(grid)
    x64 = torch.from_numpy(x).to(torch.float64)
    buf = torch.empty_like(x64)
    out = np.full((len(bits), len(alphas)), np.nan)
    done = 0
    with torch.inference_mode():
        for j, k, m, step, kmin, kmax, off, a in _pairs(alphas, bits, g):
            if max_pairs is not None and done >= max_pairs:
                break
            if g is Grid.ACIQ:
                torch.clamp(x64, -a, a, out=buf)
                torch.sub(x64, buf, out=buf)
                out[j, k] = float(torch.dot(buf, buf)) / x64.numel() + a * a / (3.0 * 4.0**m)
            else:
                torch.div(x64, step, out=buf)
                buf.add_(0.5 - off).floor_().clamp_(kmin, kmax).add_(off).mul_(step)
                torch.sub(x64, buf, out=buf)
                out[j, k] = float(torch.dot(buf, buf)) / x64.numel()
            done += 1
    return out, done


def timed_baseline(fn, x, alphas, bits, grid, budget, full):
    total = len(alphas) * len(bits)
    if full:
        t = time.perf_counter()
        res, done = fn(x, alphas, bits, grid)
        return res, time.perf_counter() - t, False, done
    # Time a few pairs first to decide whether the whole sweep fits in the budget.
    probe = min(total, 8)
    t = time.perf_counter()
    res, done = fn(x, alphas, bits, grid, max_pairs=probe)
    per_pair = (time.perf_counter() - t) / done
    if per_pair * total <= budget:
        t = time.perf_counter()
        res, done = fn(x, alphas, bits, grid)
        return res, time.perf_counter() - t, False, done
    n_meas = max(probe, int(budget / 4 / per_pair))
    t = time.perf_counter()
    res, done = fn(x, alphas, bits, grid, max_pairs=n_meas)
    dt = time.perf_counter() - t
    return res, dt * total / done, True, done


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=float, default=1e7)
    p.add_argument("--alphas", type=int, default=128)
    p.add_argument("--bits", type=int, nargs="+", default=list(range(2, 9)))
    p.add_argument("--grid", default="int")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=120.0,
                   help="seconds a baseline may take in full before it is measured on a subset")
    p.add_argument("--full", action="store_true", help="always run the baselines in full")
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args(argv)

    import numba

    n = int(args.n)
    x = np.random.default_rng(args.seed).standard_normal(n).astype(np.float32)
    if Grid.parse(args.grid) is Grid.UINT:
        x = np.abs(x)
    alphas = np.linspace(0.05, 5.0, args.alphas)
    bits = list(args.bits)
    pairs = len(alphas) * len(bits)
    print(f"data: {n:.3g} float32 N(0,1) samples; {args.alphas} alphas x bits {bits} "
          f"({pairs} sweep points), grid {args.grid}")
    print(f"cpu cores: {os.cpu_count()}, numba threads: {numba.get_num_threads()}")

    mse_sweep(x[:1000], alphas[:2], bits[:1], args.grid)  # compile / load the cache first
    t = time.perf_counter()
    ours = mse_sweep(x, alphas, bits, args.grid)
    t_ours = time.perf_counter() - t
    print(f"empirical.sweep (numba, sorted blocks): {t_ours:8.3f} s")

    res_np, t_np, scaled, done = timed_baseline(numpy_sweep, x, alphas, bits, args.grid,
                                                args.budget, args.full)
    note = f" (scaled from {done}/{pairs} points)" if scaled else " (full run)"
    print(f"numpy, vectorised per point:          {t_np:8.3f} s{note}")
    m = np.isfinite(res_np)
    print(f"  max rel. difference to ours: {np.max(np.abs(res_np[m] / ours[m] - 1)):.2e}")

    t_th = None
    if not args.no_torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        res_th, t_th, scaled, done = timed_baseline(torch_sweep, x, alphas, bits, args.grid,
                                                    args.budget, args.full)
        note = f" (scaled from {done}/{pairs} points)" if scaled else " (full run)"
        print(f"torch {torch.__version__} CPU, {torch.get_num_threads()} threads:    {t_th:8.3f} s{note}")
        m = np.isfinite(res_th)
        print(f"  max rel. difference to ours: {np.max(np.abs(res_th[m] / ours[m] - 1)):.2e}")

    print(f"speed-up vs numpy: {t_np / t_ours:8.1f}x  (target >= 30x)")
    if t_th is not None:
        print(f"speed-up vs torch: {t_th / t_ours:8.1f}x  (target > 1x)")


if __name__ == "__main__":
    main()
