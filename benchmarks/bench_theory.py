"""Benchmark: vectorised theory.expected_mse against a plain scipy.integrate evaluation, and the
hand-written numeric tail moments against lambdify of their sympy expressions.

Prints evaluations per second for Gaussian and Laplace at 4 bits on the int and aciq grids, and
the ratio against integrating (x - q)^2 f(x) cell by cell with scipy.integrate.quad (the
baseline the closed forms replace). Then, for every family, tail-moment evaluations per second
of the numeric hooks (theory.distributions) against ``sympy.lambdify`` of the same expressions
(what the numeric path ran before; lambdify time itself not counted). Both sides are measured
in this run, on this machine.

    python benchmarks/bench_theory.py [--n 100000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import integrate

from theory import FAMILIES, Gaussian, Laplace, expected_mse, grid_spec


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
        expected_mse(dist, alphas[:10], bits, "int")  # warm-up (first scipy.special import) outside the timing
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
    bench_tail_moments(args.n)


def _rate(fn, n: int) -> float:
    """Calls per second of ``fn`` (best of 5), times ``n`` evaluations per call."""
    best = min(_timed(fn) for _ in range(5))
    return n / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_tail_moments(n: int) -> None:
    from theory._symbolic import T, lambdify

    t = np.linspace(0.01, 12.0, n)
    for name, cls in FAMILIES.items():
        d = cls()
        shape = d.shape
        ours = [cls.tail_moment_fn(k) for k in range(3)]
        lam = [lambdify((T, *cls.shape_symbols()), cls.tail_moment_expr(k)) for k in range(3)]
        with np.errstate(all="ignore"):
            r_ours = _rate(lambda: [f(t, *shape) for f in ours], 3 * n)
            r_lam = _rate(lambda: [f(t, *shape) for f in lam], 3 * n)
            err = max(float(np.nanmax(np.abs(a(t, *shape) / b(t, *shape) - 1)))
                      for a, b in zip(ours, lam))
        print(f"tail moments U_0..U_2 {name:10s}{str(shape):8s}: numeric {r_ours:14,.0f} evals/s | "
              f"lambdified sympy {r_lam:14,.0f} evals/s | ratio {r_ours / r_lam:5.2f}x | "
              f"max rel diff {err:.1e}")


if __name__ == "__main__":
    main()
