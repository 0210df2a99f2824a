"""Benchmark: vectorised theory.expected_mse against a plain scipy.integrate evaluation.

Prints evaluations per second for Gaussian and Laplace at 4 bits on the int and aciq grids, and
the ratio against integrating (x - q)^2 f(x) cell by cell with scipy.integrate.quad (the
baseline the closed forms replace). Both are measured in this run, on this machine.

    python benchmarks/bench_theory.py [--n 100000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import integrate

from theory import Gaussian, Laplace, expected_mse, grid_spec


def quad_mse(dist, alpha, bits, grid):
    s = grid_spec(grid, alpha, bits)
    lv = s.levels()
    edges = np.concatenate([[-np.inf], s.thresholds(), [np.inf]])
    pdf = dist.scipy.pdf
    return sum(integrate.quad(lambda x: (x - q) ** 2 * pdf(x), edges[j], edges[j + 1])[0]
               for j, q in enumerate(lv))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="alphas per vectorised call")
    p.add_argument("--n-quad", type=int, default=30, help="alphas for the quad baseline")
    args = p.parse_args()
    bits = 4
    for dist in (Gaussian(1.0), Laplace(1.0)):
        alphas = np.linspace(0.5, 8.0, args.n) * float(dist.std)
        expected_mse(dist, alphas[:10], bits, "int")  # lambdify / warm-up outside the timing
        expected_mse(dist, alphas[:10], bits, "aciq")
        for grid in ("int", "aciq"):
            t0 = time.perf_counter()
            ours = expected_mse(dist, alphas, bits, grid)
            t_ours = time.perf_counter() - t0
            sub = alphas[:: max(1, args.n // args.n_quad)][: args.n_quad]
            t0 = time.perf_counter()
            if grid == "aciq":
                ref = [2 * integrate.quad(lambda x: (x - a) ** 2 * dist.scipy.pdf(x), a, np.inf)[0]
                       + a**2 / (3 * 4**bits) for a in sub]
            else:
                ref = [quad_mse(dist, a, bits, grid) for a in sub]
            t_quad = time.perf_counter() - t0
            idx = np.searchsorted(alphas, sub)
            err = np.max(np.abs(np.asarray(ref) / ours[idx] - 1))
            rate_ours, rate_quad = args.n / t_ours, len(sub) / t_quad
            print(f"{dist!r:22s} {grid:5s} bits={bits}: theory {rate_ours:12,.0f} evals/s | "
                  f"scipy.integrate {rate_quad:8,.0f} evals/s | ratio {rate_ours / rate_quad:9,.0f}x | "
                  f"max rel diff {err:.1e}")


if __name__ == "__main__":
    main()
