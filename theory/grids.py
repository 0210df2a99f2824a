"""Quantizer grids shared by theory and empirical code (docs/design.md, "Quantizer grids").

A grid is fully described by three numbers for a given clipping threshold ``alpha`` and bit
width ``M``: the step, the smallest and largest integer level index, and an offset, so that
level ``k`` sits at ``(k + offset) * step``.  Theory integrates its exact MSE over these levels
and empirical quantizers round onto them; both read them from :func:`grid_spec` so that the two
sides cannot drift apart.

=========  ======================================  =======================  ======
grid       levels                                  step                     offset
=========  ======================================  =======================  ======
aciq       ACIQ model: clip at alpha + uniform     2 alpha / 2^M            1/2
           noise alpha^2/(3*4^M); realised on the
           midrise levels when data is quantized
midrise    2^M levels, k = -2^(M-1) .. 2^(M-1)-1   2 alpha / 2^M            1/2
midtread   2^M levels, k = -2^(M-1) .. 2^(M-1)-1   2 alpha / 2^M            0
           (zero is a level; int4's [-8, 7])
int        2^M - 1 levels, |k| <= 2^(M-1) - 1      alpha / (2^(M-1) - 1)    0
           (int8: [-127, 127], absmax-style)
uint       2^M levels, k = 0 .. 2^M - 1            alpha / (2^M - 1)        0
           (non-negative data)
=========  ======================================  =======================  ======

Every two-sided grid but ``midtread`` is symmetric about zero. ``midtread`` is not: its levels
run from ``-alpha`` to ``alpha - step``, so values above ``alpha - step/2`` go to ``alpha - step``
while values below ``-alpha`` go to ``-alpha``. Code that folds the line onto ``|x|`` must treat
its two halves separately (:attr:`GridSpec.symmetric`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

MIN_BITS = 1
MAX_BITS = 16

__all__ = ["Grid", "GridSpec", "grid_spec", "levels", "quantize", "check_bits", "MIN_BITS", "MAX_BITS"]


class Grid(str, Enum):
    """Where the quantization levels lie (docs/design.md)."""

    ACIQ = "aciq"
    MIDRISE = "midrise"
    MIDTREAD = "midtread"
    INT = "int"
    UINT = "uint"

    @classmethod
    def parse(cls, grid: "Grid | str") -> "Grid":
        """Return the :class:`Grid` named by ``grid``; a clear ValueError for an unknown name."""
        if isinstance(grid, Grid):
            return grid
        if isinstance(grid, str):
            try:
                return cls(grid.strip().lower())
            except ValueError:
                pass
        known = ", ".join(g.value for g in cls)
        raise ValueError(f"unknown grid {grid!r}; known grids: {known}")

    @property
    def one_sided(self) -> bool:
        """True for grids whose levels cover only [0, alpha] (for non-negative data)."""
        return self is Grid.UINT

    @property
    def min_bits(self) -> int:
        # int needs 2^(M-1) - 1 >= 1 level on each side, so one bit has no non-zero level.
        return 2 if self is Grid.INT else MIN_BITS


def check_bits(bits, grid: "Grid | str | None" = None) -> int:
    """Validate a bit width: an integer in 1..16 (2..16 for the ``int`` grid)."""
    g = Grid.parse(grid) if grid is not None else None
    lo = g.min_bits if g is not None else MIN_BITS
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        if isinstance(bits, (float, np.floating)) and float(bits).is_integer():
            bits = int(bits)
        else:
            raise ValueError(f"bits must be an integer in {lo}..{MAX_BITS}, got {bits!r}")
    bits = int(bits)
    if not lo <= bits <= MAX_BITS:
        where = f" for grid {g.value!r}" if g is not None and lo != MIN_BITS else ""
        raise ValueError(f"bits must be in {lo}..{MAX_BITS}{where}, got {bits}")
    return bits


@dataclass(frozen=True)
class GridSpec:
    """Levels ``(k + offset) * step`` for integer ``k`` in ``[kmin, kmax]``."""

    grid: Grid
    bits: int
    alpha: float
    step: float
    kmin: int
    kmax: int
    offset: float

    @property
    def n_levels(self) -> int:
        return self.kmax - self.kmin + 1

    @property
    def symmetric(self) -> bool:
        """True when the levels mirror about zero (every two-sided grid but ``midtread``)."""
        return self.kmin + self.kmax + 2 * self.offset == 0

    def levels(self) -> np.ndarray:
        k = np.arange(self.kmin, self.kmax + 1, dtype=np.float64)
        return (k + self.offset) * self.step

    def thresholds(self) -> np.ndarray:
        """Decision thresholds between neighbouring levels (midpoints), length n_levels - 1."""
        lv = self.levels()
        return 0.5 * (lv[1:] + lv[:-1])


def step_factor(grid: "Grid | str", bits: int) -> tuple[float, int, int, float]:
    """Return ``(step/alpha, kmin, kmax, offset)`` for a grid and bit width."""
    g = Grid.parse(grid)
    m = check_bits(bits, g)
    if g in (Grid.ACIQ, Grid.MIDRISE):
        n = 2 ** (m - 1)
        return 2.0 / 2**m, -n, n - 1, 0.5
    if g is Grid.MIDTREAD:
        # 2^M levels, the full signed M-bit range: one more on the negative side than the positive.
        n = 2 ** (m - 1)
        return 2.0 / 2**m, -n, n - 1, 0.0
    if g is Grid.INT:
        n = 2 ** (m - 1) - 1
        return 1.0 / n, -n, n, 0.0
    # uint
    n = 2**m - 1
    return 1.0 / n, 0, n, 0.0


def grid_spec(grid: "Grid | str", alpha: float, bits: int) -> GridSpec:
    """The levels of ``grid`` at clipping threshold ``alpha`` (> 0, finite) and ``bits``."""
    g = Grid.parse(grid)
    m = check_bits(bits, g)
    a = float(alpha)
    if not math.isfinite(a) or a <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    f, kmin, kmax, off = step_factor(g, m)
    return GridSpec(g, m, a, f * a, kmin, kmax, off)


def levels(grid: "Grid | str", alpha: float, bits: int) -> np.ndarray:
    """All quantization levels of ``grid`` at ``alpha`` and ``bits``, ascending."""
    return grid_spec(grid, alpha, bits).levels()


def quantize(x, grid: "Grid | str", alpha: float, bits: int) -> np.ndarray:
    """Round ``x`` to the nearest level of ``grid`` (numpy reference quantizer).

    Values beyond the outermost levels are clipped to them. ``aciq`` is realised on the midrise
    levels. This is the plain reference that the numba kernels and torch fake quantization are
    tested against.
    """
    s = grid_spec(grid, alpha, bits)
    x = np.asarray(x, dtype=np.float64)
    # floor(. + 1/2) rather than rint: ties go up, the same rule the numba and torch code use.
    k = np.floor(x / s.step - s.offset + 0.5)
    k = np.clip(k, s.kmin, s.kmax)
    return (k + s.offset) * s.step
