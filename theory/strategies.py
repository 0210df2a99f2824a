"""Hypothesis strategies and ready checks for property-testing quantization bounds.

In the manner of ``hypothesis.extra.numpy``: strategies that only produce values the formulas of
:mod:`theory` accept, and plain check functions a user calls inside their own ``@given`` test.
This module imports hypothesis; ``import theory`` does not import it (import this submodule
explicitly: ``from theory import strategies as lst``).

Example
-------
>>> from hypothesis import given, settings
>>> from theory import shannon_lower_bound
>>> from theory import strategies as lst
>>> @settings(max_examples=20, deadline=None)
... @given(lst.cases(max_bits=8, grids=["midrise", "midtread", "int", "uint"]))
... def test_slb(case):
...     dist, grid, bits = case
...     lst.check_lower_bound(shannon_lower_bound, dist, bits, grid)
>>> test_slb()

Ranges (defaults, chosen where optimal_alpha and expected_mse are finite, positive and accurate):

============  ==========================  ==========================================
family        shape                       drawn
============  ==========================  ==========================================
gaussian      -                           -
laplace       -                           -
gennorm       beta in [0.3, 20]           log-uniform
student_t     nu in [2.05, 400]           ``nu = 2 + 10^u``, log-uniform in ``nu - 2``
                                          (heavy tails near the limit nu > 2 as often
                                          as near-Gaussian ones)
lognormal     sigma in [1e-3, 3]          log-uniform
============  ==========================  ==========================================

Scales are log-uniform in ``[1e-6, 1e6]`` (for the lognormal, ``scale = exp(mu)``).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
from hypothesis import strategies as st

from .distributions import FAMILIES, Distribution
from .grids import MAX_BITS, Grid, check_bits
from .mse import expected_mse
from .optimal import optimal_alpha

__all__ = [
    "SHAPE_RANGES", "SCALE_RANGE", "distributions", "grids", "bits", "cases", "alphas", "samples",
    "check_lower_bound", "check_alpha", "check_estimator_converges", "check_scale_equivariance",
]

#: default (low, high) of each shape parameter, by family and shape name
SHAPE_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "gennorm": {"beta": (0.3, 20.0)},
    "student_t": {"nu": (2.05, 400.0)},
    "lognormal": {"sigma": (1e-3, 3.0)},
}
#: default (low, high) of the scale
SCALE_RANGE: tuple[float, float] = (1e-6, 1e6)

#: relative slack of :func:`check_lower_bound`: float64 noise of the exact MSE (its relative
#: error is below 1e-9 wherever the tests compare it with quadrature)
LOWER_BOUND_RTOL = 1e-9


def _family_classes(families) -> list[type[Distribution]]:
    if families is None:
        return [FAMILIES[k] for k in sorted(FAMILIES)]
    if isinstance(families, (str, type)):
        families = [families]
    out = []
    for f in families:
        if isinstance(f, type) and issubclass(f, Distribution):
            out.append(f)
        elif isinstance(f, str) and f in FAMILIES:
            out.append(FAMILIES[f])
        else:
            raise ValueError(f"unknown family {f!r}; known families: {', '.join(sorted(FAMILIES))}")
    if not out:
        raise ValueError("families must not be empty")
    return out


def _range(lo, hi, what: str) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(f"{what} range must be finite with 0 < low <= high, got ({lo}, {hi})")
    return lo, hi


def _log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    """``10^u``, ``u`` uniform in ``[log10 lo, log10 hi]``; shrinks towards ``lo``."""
    if lo == hi:
        return st.just(lo)
    a, b = math.log10(lo), math.log10(hi)
    return st.floats(a, b, allow_nan=False, allow_infinity=False).map(
        lambda u: min(max(10.0**u, lo), hi))


def _shape_strategy(name: str, lo: float, hi: float) -> st.SearchStrategy[float]:
    if name == "nu":  # log-uniform in nu - 2: as many heavy tails near nu = 2 as light ones
        return _log_uniform(lo - 2.0, hi - 2.0).map(lambda x: min(max(2.0 + x, lo), hi))
    return _log_uniform(lo, hi)


def distributions(families=None, scales: tuple[float, float] = SCALE_RANGE,
                  shapes: dict | None = None) -> st.SearchStrategy[Distribution]:
    """Strategy for theory distributions with parameters the formulas accept.

    Parameters
    ----------
    families : None, str, class or sequence of them
        Families to draw from (default: every family in ``theory.FAMILIES``).
    scales : (low, high)
        Scale range, drawn log-uniformly (default ``1e-6 .. 1e6``).
    shapes : dict, optional
        Overrides of :data:`SHAPE_RANGES`, keyed by shape name (``{"nu": (2.5, 100.0)}``) or by
        family then shape name.

    Returns a strategy of ``Family.from_scipy(shape, scale)`` instances. Shrinks towards the first
    family (alphabetical), the smallest shape and the smallest scale.
    """
    classes = _family_classes(families)
    s_lo, s_hi = _range(*scales, what="scale")
    shapes = dict(shapes or {})
    per_family = []
    for cls in classes:
        ranges = dict(SHAPE_RANGES.get(cls.name, {}))
        for k, v in shapes.items():
            if k == cls.name:
                ranges.update(v)
            elif k in cls.shape_names:
                ranges[k] = v
        shape_sts = [_shape_strategy(n, *_range(*ranges[n], what=f"{cls.name} {n}"))
                     for n in cls.shape_names]
        per_family.append(_family_draws(cls, st.tuples(*shape_sts), _log_uniform(s_lo, s_hi)))
    return st.one_of(*per_family)


@st.composite
def _family_draws(draw, cls, shape_st, scale_st):
    # a composite (not st.builds) so that hypothesis reports the drawn distribution's repr
    return cls.from_scipy(tuple(draw(shape_st)), draw(scale_st))


def _grid_names(family_or_dist) -> list[str]:
    if family_or_dist is None:
        return [g.value for g in Grid]
    if isinstance(family_or_dist, Distribution):
        one_sided = type(family_or_dist).one_sided
    elif isinstance(family_or_dist, type) and issubclass(family_or_dist, Distribution):
        one_sided = family_or_dist.one_sided
    elif isinstance(family_or_dist, str) and family_or_dist in FAMILIES:
        one_sided = FAMILIES[family_or_dist].one_sided
    else:
        raise ValueError(f"expected a distribution, a family class or a family name "
                         f"({', '.join(sorted(FAMILIES))}), got {family_or_dist!r}")
    return [g.value for g in Grid if g.one_sided == one_sided]


def grids(family_or_dist=None, allowed: Iterable[str] | None = None) -> st.SearchStrategy[str]:
    """Strategy for grid names compatible with a family: ``uint`` for one-sided families, the
    two-sided grids (``aciq``, ``midrise``, ``midtread``, ``int``) otherwise; every grid when
    ``family_or_dist`` is None. ``allowed`` restricts the choice further."""
    names = _grid_names(family_or_dist)
    if allowed is not None:
        allowed = {Grid.parse(g).value for g in allowed}
        names = [g for g in names if g in allowed]
    if not names:
        raise ValueError(f"no grid of {sorted(allowed or [])} suits {family_or_dist!r}")
    return st.sampled_from(names)


def bits(grid=None, min_bits: int | None = None, max_bits: int = MAX_BITS) -> st.SearchStrategy[int]:
    """Strategy for bit widths valid on ``grid`` (``theory.grids.check_bits``): 1..16, 2..16 for
    ``int``; ``min_bits``/``max_bits`` narrow the range. Shrinks towards the fewest bits."""
    g = Grid.parse(grid) if grid is not None else None
    lo = g.min_bits if g is not None else 1
    if min_bits is not None:
        lo = max(lo, check_bits(min_bits))
    hi = check_bits(max_bits)
    if lo > hi:
        raise ValueError(f"no valid bit width in {lo}..{hi} for grid {grid!r}")
    return st.integers(lo, hi)


def cases(families=None, grids=None, min_bits: int | None = None, max_bits: int = MAX_BITS,
          scales: tuple[float, float] = SCALE_RANGE, shapes: dict | None = None):
    """Strategy for ``(distribution, grid, bits)`` triples valid together.

    The grid is drawn among those that suit the drawn family (and lie in ``grids`` when given);
    families with no allowed grid are left out."""
    allowed = None if grids is None else [Grid.parse(g).value for g in
                                          ([grids] if isinstance(grids, str) else grids)]
    classes = [c for c in _family_classes(families)
               if allowed is None or set(_grid_names(c)) & set(allowed)]
    if not classes:
        raise ValueError(f"no family suits the grids {allowed}")
    grid_st = globals()["grids"]
    bits_st = globals()["bits"]

    @st.composite
    def _case(draw):
        d = draw(distributions(classes, scales=scales, shapes=shapes))
        g = draw(grid_st(d, allowed))
        return d, g, draw(bits_st(g, min_bits, max_bits))

    return _case()


def alphas(dist: Distribution, bits: int, grid="int", spread: float = 4.0) -> st.SearchStrategy[float]:
    """Strategy for clipping thresholds ``alpha* x f``, ``f`` log-uniform in
    ``[1/spread, spread]``, ``alpha* = optimal_alpha(dist, bits, grid)``. Shrinks towards
    ``alpha*`` itself (``f = 1``)."""
    spread = float(spread)
    if not math.isfinite(spread) or spread < 1:
        raise ValueError(f"spread must be a finite factor >= 1, got {spread!r}")
    a = float(optimal_alpha(dist, bits, grid))
    u = math.log(spread)
    return st.floats(-u, u, allow_nan=False).map(lambda x: a * math.exp(x))


def _draw(dist: Distribution, size: int, seed: int) -> np.ndarray:
    return np.asarray(dist.scipy.rvs(size=size, random_state=np.random.default_rng(seed)),
                      dtype=np.float64)


def samples(dist: Distribution, min_size: int = 1, max_size: int = 10_000) -> st.SearchStrategy[np.ndarray]:
    """Strategy for seeded samples of ``dist``: a seed and a size are drawn, then
    ``size`` values of ``dist`` from ``numpy.random.default_rng(seed)``. Shrinking lowers the seed
    and the size, and every shrunk value is still a true draw of ``dist``."""
    min_size, max_size = int(min_size), int(max_size)
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    if np.ndim(dist.scale):
        raise ValueError("samples needs a distribution with a scalar scale")
    return _sample_draws(dist, min_size, max_size)


@st.composite
def _sample_draws(draw, dist, min_size, max_size):
    seed = draw(st.integers(0, 2**32 - 1))
    return _draw(dist, draw(st.integers(min_size, max_size)), seed)


# --------------------------------------------------------------------------------------------
# ready checks
# --------------------------------------------------------------------------------------------

def _where(dist, bits, grid, alpha=None) -> str:
    s = f"{dist!r}, grid={Grid.parse(grid).value!r}, bits={bits}"
    return s + (f", alpha={alpha:.10g}" if alpha is not None else "")


def _finite_scalar(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AssertionError(f"{what} returned {value!r}, not a number") from None
    if not math.isfinite(v):
        raise AssertionError(f"{what} returned {v}, not a finite number")
    return v


def check_lower_bound(bound_fn: Callable, dist: Distribution, bits: int, grid="int",
                      alpha: float | None = None, rtol: float = LOWER_BOUND_RTOL) -> None:
    """Assert ``bound_fn(dist, bits) <= expected_mse(dist, alpha, bits, grid) * (1 + rtol)``.

    ``alpha`` defaults to ``optimal_alpha(dist, bits, grid)``: the bound is then compared with the
    smallest MSE the grid reaches. ``rtol`` (default 1e-9) absorbs float64 error of the exact MSE.
    Raises AssertionError naming the distribution, grid, bits, alpha and both values.
    """
    check_bits(bits, grid)
    a = float(optimal_alpha(dist, bits, grid)) if alpha is None else float(alpha)
    mse = float(expected_mse(dist, a, bits, grid))
    b = _finite_scalar(bound_fn(dist, bits), "bound_fn")
    if not b <= mse * (1 + rtol):
        raise AssertionError(
            f"lower bound exceeds the exact MSE at {_where(dist, bits, grid, a)}: "
            f"bound={b:.10g} > mse={mse:.10g} (ratio {b / mse:.6g}, rtol {rtol:g})")


def check_alpha(alpha_fn: Callable, dist: Distribution, bits: int, grid="int",
                rtol: float = 1e-6) -> None:
    """Assert ``|alpha_fn(dist, bits, grid) / optimal_alpha(dist, bits, grid) - 1| <= rtol``.

    Raises AssertionError naming the distribution, grid, bits and both alphas."""
    want = float(optimal_alpha(dist, bits, grid))
    got = _finite_scalar(alpha_fn(dist, bits, grid), "alpha_fn")
    if not abs(got / want - 1) <= rtol:
        raise AssertionError(
            f"alpha is off at {_where(dist, bits, grid)}: proposed {got:.10g}, optimal_alpha "
            f"{want:.10g} (relative error {abs(got / want - 1):.3g} > rtol {rtol:g})")


def check_estimator_converges(estimator: Callable, dist: Distribution, bits: int, grid="int",
                              sizes: Sequence[int] = (1_000, 10_000, 100_000), seed: int = 0,
                              rtol: float = 0.05, margin: float = 0.02) -> None:
    """Assert an estimator of alpha from samples approaches ``optimal_alpha`` as samples grow.

    ``estimator(x, bits, grid)`` gets ``n`` draws of ``dist`` (``numpy.random.default_rng(seed)``)
    for each ``n`` in ``sizes`` (increasing). With ``e_n = |estimate_n / alpha* - 1|``, it checks
    ``e_{n_max} <= rtol`` and ``e_{n_max} <= e_{n_min} + margin`` (the error at the largest sample
    is not larger than at the smallest by more than ``margin``).
    Raises AssertionError naming the distribution, grid, bits, the sizes and every estimate.
    """
    sizes = [int(n) for n in sizes]
    if len(sizes) < 2 or any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
        raise ValueError(f"sizes must be at least two increasing positive integers, got {sizes}")
    want = float(optimal_alpha(dist, bits, grid))
    x = _draw(dist, sizes[-1], seed)
    est = [_finite_scalar(estimator(x[:n], bits, grid), "estimator") for n in sizes]
    err = [abs(e / want - 1) for e in est]
    table = ", ".join(f"n={n}: {e:.6g} (err {r:.3g})" for n, e, r in zip(sizes, est, err))
    if not err[-1] <= rtol:
        raise AssertionError(
            f"estimator does not converge to optimal_alpha={want:.10g} at "
            f"{_where(dist, bits, grid)}, seed={seed}: error {err[-1]:.3g} > rtol {rtol:g} at "
            f"n={sizes[-1]}; {table}")
    if not err[-1] <= err[0] + margin:
        raise AssertionError(
            f"estimator error grows with the sample at {_where(dist, bits, grid)}, seed={seed}: "
            f"{err[0]:.3g} at n={sizes[0]} -> {err[-1]:.3g} at n={sizes[-1]} (margin {margin:g}); "
            f"{table}")


def check_scale_equivariance(fn: Callable, dist: Distribution, c: float, power: float = 1,
                             rtol: float = 1e-9) -> None:
    """Assert ``fn(dist.with_scale(c * dist.scale)) == c**power * fn(dist)`` within ``rtol``.

    ``power`` is 1 for a threshold, 2 for an MSE, 0 for a scale-free quantity. Raises
    AssertionError naming the distribution, ``c`` and both values."""
    c = float(c)
    if not math.isfinite(c) or c <= 0:
        raise ValueError(f"c must be a positive finite factor, got {c!r}")
    base = _finite_scalar(fn(dist), "fn")
    scaled_dist = dist.with_scale(np.asarray(dist.scale, dtype=np.float64) * c)
    got = _finite_scalar(fn(scaled_dist), "fn")
    want = c**power * base
    if not abs(got - want) <= rtol * abs(want):
        rel = abs(got / want - 1) if want else math.inf
        raise AssertionError(
            f"not scale-equivariant with power {power:g}: fn({scaled_dist!r}) = {got:.10g}, "
            f"c**{power:g} * fn({dist!r}) = {want:.10g} with c={c:.10g} "
            f"(relative error {rel:.3g} > rtol {rtol:g})")
