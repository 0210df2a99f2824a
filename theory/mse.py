"""Expected quantization MSE of a distribution on every grid of docs/design.md.

The error of quantizing X onto levels ``q_j`` with nearest-level decision edges ``e_j`` is

    MSE = sum_j int_{e_j}^{e_{j+1}} (x - q_j)^2 f(x) dx
        = sum_j [U_2(e_j) - U_2(e_{j+1})] - 2 q_j [U_1(e_j) - U_1(e_{j+1})] + q_j^2 [U_0(e_j) - U_0(e_{j+1})]

with ``U_k`` the upper partial moments of the family (``theory.distributions``). It splits into

* the **clipping error**, ``int_{|x| > alpha} (x - q_outer)^2 f``: the part of the line beyond the
  clipping threshold, mapped to the outermost level, and
* the **rounding error**, everything inside ``[-alpha, alpha]``.

"Exact" integrates both over the real levels. "Approximate" keeps the exact clipping error and
replaces rounding by the high-resolution term ``step^2/12 * P(|X| <= alpha)``. The ``aciq`` grid is
the ACIQ model itself (Banner et al., NeurIPS 2019, eq. 5): clipping at alpha plus
``alpha^2 / (3 * 4^M)``, so for it exact and approximate coincide.

Symmetric families are evaluated on the positive half and doubled, except on ``midtread``, whose
levels (``-alpha .. alpha - step``) do not mirror about 0: its two halves are evaluated apart.
Everything is computed on unit scale, ``MSE(alpha; s) = s^2 * MSE(alpha/s; 1)``, so the formulas
hold from 1e-6 to 1e6; squares of levels are formed as ``q (q P)``, which overflows only where the
MSE itself does, so ``alpha / scale`` may go up to the largest float (at ``1e155`` the ``int`` grid
gives the variance: every value rounds to 0). An MSE past float64 (``aciq`` at ``alpha = 1e300``:
``alpha^2 / (3 4^M)``) is a ValueError that says so, never inf or NaN.

With more than ``_QUADRATURE_LEVELS`` positive levels the closed-form cell differences lose
precision (each cell's error is ~step^3 while its partial moments are ~step), so rounding error
is then integrated per cell by Gauss-Legendre quadrature on the density, which is exact to
machine precision on cells that narrow.
"""

from __future__ import annotations

import functools

import numpy as np

from .distributions import Distribution
from .grids import Grid, check_bits, step_factor

__all__ = ["expected_mse", "clipping_mse", "rounding_mse", "mse_derivative", "positive_cells"]

_QUADRATURE_LEVELS = 256  # positive levels above which rounding error uses quadrature
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)
_CHUNK = 2_000_000  # evaluations held in memory at once


def _check_pair(dist: Distribution, grid) -> Grid:
    g = Grid.parse(grid)
    if not isinstance(dist, Distribution):
        raise ValueError(f"dist must be a theory distribution (Gaussian(...), ...), got {dist!r}")
    if dist.one_sided and not g.one_sided:
        raise ValueError(f"{dist.name} is one-sided (x > 0) but grid {g.value!r} is two-sided; "
                         f"use grid 'uint' for non-negative data")
    if g.one_sided and not dist.one_sided:
        raise ValueError(f"grid {g.value!r} is one-sided (levels in [0, alpha]) but {dist.name} is "
                         f"two-sided; use a symmetric grid, or fit a one-sided family to magnitudes")
    return g


def _folded_cells(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels ``q >= 0`` (ascending) and their decision edges on ``[0, inf)``, read-only."""
    q = np.sort(q[q >= 0])
    edges = np.concatenate([[0.0], 0.5 * (q[1:] + q[:-1]), [np.inf]])
    q.setflags(write=False)
    edges.setflags(write=False)
    return q, edges


@functools.cache
def positive_cells(grid: Grid | str, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Levels ``q_j >= 0`` and decision edges of the positive half, in units of alpha.

    Returns ``(levels, edges)`` with ``len(edges) == len(levels) + 1``, ``edges[0] = 0`` and
    ``edges[-1] = inf``. For symmetric grids the negative half mirrors this one; for ``midtread``
    it does not (see :func:`_halves`).
    """
    f, kmin, kmax, off = step_factor(grid, bits)
    return _folded_cells((np.arange(max(kmin, 0), kmax + 1, dtype=np.float64) + off) * f)


@functools.cache
def _halves(grid: Grid, bits: int) -> tuple[tuple[np.ndarray, np.ndarray, float], ...]:
    """``(levels, edges, weight)`` of each half of the line folded onto ``|x|``, units of alpha.

    The two-sided families are symmetric about 0, so a grid whose levels mirror about 0 is one
    half counted twice and ``uint`` is its positive half once. ``midtread`` (levels ``-alpha ..
    alpha - step``) has a positive half topped by ``alpha - step`` and a negative half topped by
    ``alpha``, each counted once.
    """
    g = Grid.parse(grid)
    pos = positive_cells(g, bits)
    if g.one_sided:
        return ((*pos, 1.0),)
    f, kmin, kmax, off = step_factor(g, bits)
    if kmin + kmax + 2 * off == 0:
        return ((*pos, 2.0),)
    neg = _folded_cells(-(np.arange(kmin, kmax + 1, dtype=np.float64) + off) * f)
    return ((*pos, 1.0), (*neg, 1.0))


def check_alpha(alpha) -> np.ndarray:
    """``alpha`` as a float64 array, refused (ValueError naming the problem) when empty, NaN or
    inf, or not positive."""
    a = np.asarray(alpha, dtype=np.float64)
    if a.size == 0:
        raise ValueError("alpha must not be empty")
    if not np.all(np.isfinite(a)):
        raise ValueError("alpha must be finite (got NaN or inf)")
    if np.any(a <= 0):
        raise ValueError("alpha must be positive")
    return a


def _alpha_units(dist: Distribution, alpha) -> tuple[np.ndarray, np.ndarray]:
    a = check_alpha(alpha)
    scale = np.asarray(dist.scale, dtype=np.float64)
    t, scale = np.broadcast_arrays(a / scale, scale)
    return t, scale


def _tail(dist: Distribution, k: int, t: np.ndarray) -> np.ndarray:
    """``dist.tail_moment(k, t)``, with 0 where a closed form gives NaN because the tail itself
    underflowed: e.g. Laplace's ``(t^2 + 2t + 2) e^-t / 2`` is ``inf * 0`` past t ~ 1e154,
    where ``U_0(t) = 0`` and so is the true ``U_k(t)`` (to far below the smallest float)."""
    u = dist.tail_moment(k, t)
    if k:
        bad = np.isnan(u)
        if bad.any():
            u = np.where(bad & (dist.tail_moment(0, t) == 0), 0.0, u)
    return u


def _cell_terms(dist: Distribution, t: np.ndarray, q: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                kind: str) -> np.ndarray:
    """Per-cell ``int_lo^hi g(x) f(x) dx`` on unit scale with g = (x - q)^2 ('sq') or x - q ('lin').

    ``t`` has shape (N, 1); q, lo, hi are in units of alpha with shape (C,).
    """
    lo_t, hi_t, q_t = lo * t, hi * t, q * t
    d0 = _tail(dist, 0, lo_t) - _tail(dist, 0, hi_t)
    d1 = _tail(dist, 1, lo_t) - _tail(dist, 1, hi_t)
    if kind == "lin":
        return d1 - q_t * d0
    d2 = _tail(dist, 2, lo_t) - _tail(dist, 2, hi_t)
    # q (q d0), not q^2 d0: q^2 overflows past alpha / scale ~ 1e154 where the product does not
    return d2 - 2 * q_t * d1 + q_t * (q_t * d0)


def _cell_sq_quadrature(dist: Distribution, t, q, lo, hi) -> np.ndarray:
    """Per-cell ``int (x-q)^2 f`` by Gauss-Legendre on [lo, q] and [q, hi] (finite cells).

    Quadrature is exact to machine precision on cells narrow against the density's features,
    but 8 nodes miss a density concentrated inside a wide cell (Lognormal(0, 1) at alpha = 5e11,
    step 1.2e8: ~0 for e^2). Such a cell is found by its probability, integrated by the same
    nodes and compared with the closed form ``U_0(lo) - U_0(hi)``; it takes the closed-form
    cell value instead, whose cancellation is then mild: the mass is not spread over the cell.
    """
    pdf = dist.pdf_fn()
    out = np.zeros((t.shape[0], q.size))
    mass = np.zeros_like(out)
    for a_, b_ in ((lo, q), (q, hi)):
        half = 0.5 * (b_ - a_)[None, :, None] * t[:, :, None]
        mid = 0.5 * (b_ + a_)[None, :, None] * t[:, :, None]
        x = mid + half * _GL_NODES[None, None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            fx = pdf(x, *dist.shape)
        # Only a zero-width cell at the edge of a one-sided support evaluates the density at 0.
        fx = np.where(np.isfinite(fx), fx, 0.0)
        dx = x - q[None, :, None] * t[:, :, None]
        g = dx * (dx * fx)  # not dx^2 fx: dx^2 overflows on huge cells where f is 0
        out += (half[..., 0]) * (g @ _GL_WEIGHTS)
        mass += (half[..., 0]) * (fx @ _GL_WEIGHTS)
    p = _tail(dist, 0, lo * t) - _tail(dist, 0, hi * t)
    unresolved = np.abs(mass - p) > 1e-9 * p + 1e-300
    if unresolved.any():
        out = np.where(unresolved, _cell_terms(dist, t, q, lo, hi, "sq"), out)
    return out


def _unit_parts(dist: Distribution, t: np.ndarray, bits: int, g: Grid, exact: bool):
    """(clipping, rounding) on unit scale for flat t, summed over both halves."""
    if g is Grid.ACIQ:
        # ACIQ eq. 5: 2 int_alpha^inf (x - alpha)^2 f + alpha^2 / (3 4^M)
        clip = _cell_terms(dist, t[:, None], np.ones(1), np.ones(1), np.array([np.inf]), "sq")[:, 0]
        return 2 * clip, t * (t / (3.0 * 4.0**bits))
    clip = np.zeros_like(t)
    rnd = np.zeros_like(t)
    for q, edges, w in _halves(g, bits):
        clip += w * _cell_terms(dist, t[:, None], q[-1:], np.ones(1), np.array([np.inf]), "sq")[:, 0]
        if not exact:
            step = step_factor(g, bits)[0] * t
            p_in = dist.tail_moment(0, np.zeros(1)) - dist.tail_moment(0, t)
            rnd += w * step * (step / 12.0 * p_in)
            continue
        lo, hi = edges[:-1].copy(), edges[1:].copy()
        hi[-1] = 1.0  # rounding covers up to alpha; beyond it is clipping
        n_cells = q.size
        rows = max(1, _CHUNK // (n_cells * (16 if n_cells > _QUADRATURE_LEVELS else 3)))
        for s in range(0, t.size, rows):
            tt = t[s:s + rows, None]
            if n_cells > _QUADRATURE_LEVELS:
                cells = _cell_sq_quadrature(dist, tt, q, lo, hi)
            else:
                cells = _cell_terms(dist, tt, q, lo, hi, "sq")
            rnd[s:s + rows] += w * cells.sum(axis=1)
    return clip, rnd


def _parts(dist, alpha, bits, grid, exact, finite: bool = True):
    """(clipping, rounding) in data units. ``finite``: ValueError where the MSE itself exceeds
    float64 (else inf there, for scans that only compare values)."""
    g = _check_pair(dist, grid)
    m = check_bits(bits, g)
    t, scale = _alpha_units(dist, alpha)
    with np.errstate(over="ignore"):  # an MSE past float64 is inf here and refused below
        clip, rnd = _unit_parts(dist, t.ravel(), m, g, bool(exact))
        s2 = scale**2
        clip = np.maximum(clip, 0.0).reshape(t.shape) * s2
        rnd = np.maximum(rnd, 0.0).reshape(t.shape) * s2
        total = clip + rnd
    if np.any(np.isnan(total)):  # a bug, never a range problem: say so rather than return it
        i = np.unravel_index(int(np.argmax(np.isnan(total))), t.shape)
        raise RuntimeError(f"{dist.name} MSE is NaN at alpha / scale = {t[i]:.6g} on grid "
                           f"{g.value!r} at {m} bits")
    if finite and not np.all(np.isfinite(total)):
        i = np.unravel_index(int(np.argmax(~np.isfinite(total))), t.shape)
        raise ValueError(f"the expected MSE at alpha = {np.broadcast_to(alpha, t.shape)[i]:.6g} "
                         f"(alpha / scale = {t[i]:.6g}) exceeds float64 (~1.8e308) on grid "
                         f"{g.value!r} at {m} bits; rescale the data and alpha")
    return clip, rnd


def _out(x):
    return float(x) if np.ndim(x) == 0 else x


def clipping_mse(dist: Distribution, alpha, bits: int, grid: Grid | str = "int") -> np.ndarray | float:
    """Clipping error: ``int_{|x|>alpha} (x - q_outer)^2 f(x) dx`` (both tails for two-sided,
    each with its own outermost level: ``-alpha`` and ``alpha - step`` on ``midtread``).

    For ``aciq`` the outer level is alpha itself (ACIQ eq. 5, first term). Closed form through
    the family's tail partial moments. Vectorised over ``alpha`` and ``dist.scale``.
    """
    return _out(_parts(dist, alpha, bits, grid, True)[0])


def rounding_mse(dist: Distribution, alpha, bits: int, grid: Grid | str = "int",
                 exact: bool = True) -> np.ndarray | float:
    """Rounding error inside ``[-alpha, alpha]``: exact over the real levels, or the
    high-resolution ``step^2/12 * P(|X| <= alpha)`` (``exact=False``); ``alpha^2/(3*4^M)`` for aciq."""
    return _out(_parts(dist, alpha, bits, grid, exact)[1])


def expected_mse(dist: Distribution, alpha, bits: int, grid: Grid | str = "int",
                 exact: bool = True) -> np.ndarray | float:
    """Expected squared error ``E[(X - Q_alpha(X))^2]`` of quantizing ``dist`` at clipping ``alpha``.

    Parameters
    ----------
    dist : Distribution
        A theory distribution; its ``scale`` may be an array (broadcast against ``alpha``).
    alpha : float or array
        Clipping threshold in data units, > 0.
    bits : int
        Bit width M, 1..16 (2..16 for ``int``).
    grid : {'aciq', 'midrise', 'midtread', 'int', 'uint'}
        Level placement (docs/design.md). ``uint`` only with one-sided families and vice versa.
    exact : bool
        Integrate rounding over the real levels (True) or use the high-resolution noise term.

    Raises
    ------
    ValueError
        Bad arguments, or an MSE that exceeds float64 (the message gives ``alpha / scale``).

    Examples
    --------
    >>> from theory import Laplace, expected_mse
    >>> round(expected_mse(Laplace(1.0), 2.83, 2, grid="aciq"), 4)
    0.2849
    """
    c, r = _parts(dist, alpha, bits, grid, exact)
    return _out(c + r)


def mse_derivative(dist: Distribution, alpha, bits: int, grid: Grid | str = "int") -> np.ndarray | float:
    """``d MSE / d alpha`` of the exact MSE, by Leibniz's rule.

    Edge terms cancel because each decision edge is the midpoint of its two levels, leaving
    ``dMSE/dalpha = -2 sum_j c_j int_cell_j (x - c_j alpha) f(x) dx`` with level ``q_j = c_j alpha``
    (doubled for two-sided). For ``aciq``: ``-4 (U_1(alpha) - alpha U_0(alpha)) + 2 alpha/(3 4^M)``.
    """
    g = _check_pair(dist, grid)
    m = check_bits(bits, g)
    t, scale = _alpha_units(dist, alpha)
    tf = t.ravel()[:, None]
    if g is Grid.ACIQ:
        lin = _cell_terms(dist, tf, np.ones(1), np.ones(1), np.array([np.inf]), "lin")[:, 0]
        d = -4.0 * lin + 2.0 * tf[:, 0] / (3.0 * 4.0**m)
    else:
        d = np.zeros(tf.shape[0])
        for q, edges, w in _halves(g, m):
            rows = max(1, _CHUNK // (3 * q.size))
            for s in range(0, tf.shape[0], rows):
                lin = _cell_terms(dist, tf[s:s + rows], q, edges[:-1], edges[1:], "lin")
                d[s:s + rows] -= 2.0 * w * (lin * q).sum(axis=1)
    return _out(d.reshape(t.shape) * scale)


def aciq_mse_expr(cls: type[Distribution]) -> tuple[sp.Expr, sp.Symbol, sp.Symbol]:
    """Symbolic ACIQ MSE on unit scale: ``2 int_a^inf (x-a)^2 f + a^2/(3 4^M)``.

    Built from the family's tail moments (``U_2 - 2 a U_1 + a^2 U_0``); returns
    ``(expr, a, M)``.
    """
    import sympy as sp  # here, not at module level: `import theory` does not import sympy

    from ._symbolic import T

    a = sp.Symbol("alpha", positive=True)
    M = sp.Symbol("M", positive=True, integer=True)
    u = [cls.tail_moment_expr(k).subs(T, a) for k in range(3)]
    return 2 * (u[2] - 2 * a * u[1] + a**2 * u[0]) + a**2 / (3 * 4**M), a, M
