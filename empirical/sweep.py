"""Exact empirical quantization MSE over many clipping thresholds and bit widths at once.

For data ``x_1..x_N``, a grid (docs/design.md, "Quantizer grids"), clipping thresholds
``alpha_1..alpha_K`` and bit widths ``M_1..M_B`` this module computes

    MSE(M, alpha) = 1/N sum_i (x_i - Q_{M,alpha}(x_i))^2

with ``Q`` the reference quantizer :func:`theory.grids.quantize` (nearest level, ties up, clipped
to the outermost levels), for every ``(M, alpha)`` pair, per tensor, per channel or per group.
The ``aciq`` grid is the ACIQ noise model of Banner, Nahshan & Soudry (NeurIPS 2019, eq. 5),

    MSE_aciq(M, alpha) = 1/N sum_i (x_i - clip(x_i, -alpha, alpha))^2 + alpha^2 / (3 * 4^M),

i.e. the measured clipping error plus the model's uniform rounding noise, the same quantity that
``theory.expected_mse(..., grid="aciq")`` returns.

Algorithm
---------
Every grid except ``midtread`` and ``uint`` is symmetric about zero and the tie rule only
matters at exact midpoints, where both neighbours give the same squared error, so the error of
``x`` depends on ``|x|`` alone (``uint`` requires ``x >= 0``). The values of each row
(tensor / channel / group) are sorted once, folded into ascending magnitudes by one merge of the
negative and the non-negative run, and cut into blocks of ``B`` consecutive values. For each
block we store its anchor ``c`` (smallest value), ``S1 = sum (x - c)`` and ``S2 = sum (x - c)^2``.
A block whose first and last value round to the same level ``q`` contributes

    sum (x - q)^2 = S2 + 2 (c - q) S1 + n (c - q)^2

in O(1); because every term is bounded by ``n max|x - q|^2`` there is no catastrophic
cancellation (unlike global prefix sums of ``x`` and ``x^2``). Blocks that straddle a decision
threshold are summed element by element with the reference rounding rule. One sweep point then
costs ``O(N/B + L*B)`` for ``L`` levels instead of ``O(N)``; with ``B ~ sqrt(N/64)`` a sweep of
1e7 values x 128 alphas x 7 bit widths is dominated by the single sort. All sums are float64;
the input (float32 or float64) is copied exactly once (its sorted magnitudes).

``midtread`` (levels ``-alpha .. alpha - step``) is not symmetric: magnitudes above
``alpha - step/2`` round to ``alpha - step`` when the value is positive and to ``alpha`` when it
is negative. For data with negative values the fold therefore also records each magnitude's sign
(one byte per value) and each block's count, ``S1`` and ``S2`` over its positive values; a block
then rounds its positive and its negative values each to one level in O(1), and a straddling
block reads the signs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba as nb
import numpy as np

from theory.grids import Grid, check_bits, step_factor

__all__ = ["mse_sweep", "SortedMagnitudes", "prepare", "validate_data"]


# --------------------------------------------------------------------------------------------
# numba kernels
# --------------------------------------------------------------------------------------------

@nb.njit(parallel=True, cache=True)
def _fold_signs(v, positive):  # pragma: no cover - compiled
    """In place: each ascending row of signed values becomes its ascending magnitudes, and
    ``positive[r, i]`` records whether magnitude ``i`` came from a value ``>= 0``.

    The negative run (a prefix, descending in magnitude) is copied out reversed and merged with
    the non-negative run from the front; the write position never passes the read position."""
    rows, n = v.shape
    for r in nb.prange(rows):
        p = np.searchsorted(v[r], 0.0)  # values < 0; -0.0 counts as non-negative
        neg = np.empty(p, dtype=v.dtype)
        for i in range(p):
            neg[i] = -v[r, p - 1 - i]
        i = 0
        j = p
        w = 0
        while i < p and j < n:
            # Branch-free: the signs of random data would mispredict half of all branches.
            a = neg[i]
            b = v[r, j]
            take = a <= b
            v[r, w] = a if take else b
            positive[r, w] = not take
            i += np.int64(take)
            j += 1 - np.int64(take)
            w += 1
        while i < p:
            v[r, w] = neg[i]
            positive[r, w] = False
            i += 1
            w += 1
        while j < n:  # here w == j: the rest is already in place
            positive[r, j] = True
            j += 1


@nb.njit(parallel=True, cache=True)
def _block_stats(s, block, positive, signed):  # pragma: no cover - compiled
    """Per block: anchor, S1, S2 over all values and, when ``signed``, count, S1, S2 over the
    values whose sign is positive (``positive`` is not read otherwise)."""
    rows, n = s.shape
    nblk = (n + block - 1) // block
    anchor = np.empty((rows, nblk), dtype=np.float64)
    s1 = np.empty((rows, nblk), dtype=np.float64)
    s2 = np.empty((rows, nblk), dtype=np.float64)
    pn = np.zeros((rows, nblk if signed else 0), dtype=np.int64)
    p1 = np.zeros((rows, nblk if signed else 0), dtype=np.float64)
    p2 = np.zeros((rows, nblk if signed else 0), dtype=np.float64)
    for t in nb.prange(rows * nblk):
        r = t // nblk
        b = t - r * nblk
        lo = b * block
        hi = min(lo + block, n)
        c = np.float64(s[r, lo])
        a1 = 0.0
        a2 = 0.0
        c1 = 0.0
        c2 = 0.0
        cn = 0
        for i in range(lo, hi):
            y = np.float64(s[r, i]) - c
            a1 += y
            a2 += y * y
            if signed and positive[r, i]:
                cn += 1
                c1 += y
                c2 += y * y
        anchor[r, b] = c
        s1[r, b] = a1
        s2[r, b] = a2
        if signed:
            pn[r, b] = cn
            p1[r, b] = c1
            p2[r, b] = c2
    return anchor, s1, s2, pn, p1, p2


@nb.njit(parallel=True, cache=True)
def _sweep_sorted(s, block, anchor, s1, s2, steps, kmax, offset, kmax_neg, offset_neg, signed,
                  positive, pn, p1, p2, clip_only, alphas, out):  # pragma: no cover
    """out[j, k, r] = sum_i err(s[r, i]) for bit index j and alpha index k (sums, not means).

    Magnitudes of positive values round onto levels ``(k + offset) * step``, ``k <= kmax[j]``;
    with ``signed``, those of negative values onto ``(k + offset_neg) * step``,
    ``k <= kmax_neg[j]`` (the mirror image of the grid's negative half).
    """
    rows, n = s.shape
    nbits, nalpha = steps.shape
    nblk = anchor.shape[1]
    for t in nb.prange(nbits * nalpha * rows):
        j = t // (nalpha * rows)
        rem = t - j * nalpha * rows
        k = rem // rows
        r = rem - k * rows
        step = steps[j, k]
        km = np.float64(kmax[j])
        kn = np.float64(kmax_neg[j])
        a = alphas[k]
        total = 0.0
        for b in range(nblk):
            lo = b * block
            hi = min(lo + block, n)
            xa = np.float64(s[r, lo])
            xb = np.float64(s[r, hi - 1])
            if clip_only:
                # ACIQ model: only the clipped part is measured, the noise is added analytically.
                if xb <= a:
                    continue
                if xa >= a:
                    d = anchor[r, b] - a
                    total += s2[r, b] + 2.0 * d * s1[r, b] + (hi - lo) * d * d
                else:
                    for i in range(lo, hi):
                        x = np.float64(s[r, i])
                        if x > a:
                            total += (x - a) * (x - a)
                continue
            # Same rounding rule as theory.grids.quantize: floor(x/step - offset + 1/2), clipped.
            ka = min(np.floor(xa / step - offset + 0.5), km)
            kb = min(np.floor(xb / step - offset + 0.5), km)
            if not signed:
                if ka == kb:
                    d = anchor[r, b] - (ka + offset) * step
                    total += s2[r, b] + 2.0 * d * s1[r, b] + (hi - lo) * d * d
                else:
                    # Per-value rounding; a plain division loop vectorises better than walking
                    # the sorted thresholds (measured), and it is the reference rule verbatim.
                    for i in range(lo, hi):
                        x = np.float64(s[r, i])
                        q = (min(np.floor(x / step - offset + 0.5), km) + offset) * step
                        total += (x - q) * (x - q)
                continue
            na = min(np.floor(xa / step - offset_neg + 0.5), kn)
            nb_ = min(np.floor(xb / step - offset_neg + 0.5), kn)
            if ka == kb and na == nb_:
                # positive values all go to one level, negative values all to another
                cnt = pn[r, b]
                dp = anchor[r, b] - (ka + offset) * step
                dn = anchor[r, b] - (na + offset_neg) * step
                total += p2[r, b] + 2.0 * dp * p1[r, b] + cnt * dp * dp
                total += (s2[r, b] - p2[r, b]) + 2.0 * dn * (s1[r, b] - p1[r, b]) + (hi - lo - cnt) * dn * dn
            else:
                for i in range(lo, hi):
                    x = np.float64(s[r, i])
                    # selects, not branches: the signs are random
                    ps = positive[r, i]
                    o = offset if ps else offset_neg
                    q = (min(np.floor(x / step - o + 0.5), km if ps else kn) + o) * step
                    total += (x - q) * (x - q)
        out[j, k, r] = total


# --------------------------------------------------------------------------------------------
# Python front end
# --------------------------------------------------------------------------------------------

def validate_data(x, name: str = "x") -> np.ndarray:
    """Return ``x`` as a float32/float64 array (no copy when it already is one) or raise.

    Raises ValueError for empty arrays; NaN/inf are detected later, after sorting, for free.
    """
    arr = np.asarray(x)
    if arr.dtype not in (np.float32, np.float64):
        if arr.dtype.kind not in "fiub":
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _default_block(n: int) -> int:
    # Balances N/B whole-block updates against ~levels*B element updates at straddled thresholds.
    return int(min(4096, max(16, round(math.sqrt(n / 64.0)))))


@dataclass
class SortedMagnitudes:
    """Sorted ``|x|`` of each row plus block sums: the reusable state of a sweep.

    Build it with :func:`prepare`; then :meth:`mse` evaluates any alphas and bit widths without
    touching the raw data again (what :mod:`empirical.optimal` uses for refinement).
    """

    sorted_abs: np.ndarray  # (rows, n) float32/float64, each row ascending
    block: int
    anchor: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    nonnegative: bool
    row_shape: tuple  # shape of the row axis in the result (() per tensor)
    # Only when some value is negative (None otherwise): the sign of each sorted magnitude and,
    # per block, the count, S1 and S2 of its positive values; grids that are not symmetric
    # about zero (midtread) read them.
    positive: np.ndarray | None = None
    pos_count: np.ndarray | None = None
    pos_s1: np.ndarray | None = None
    pos_s2: np.ndarray | None = None

    @property
    def n(self) -> int:
        """Values per row."""
        return self.sorted_abs.shape[1]

    @property
    def absmax(self) -> np.ndarray:
        """Largest magnitude of each row."""
        return self.sorted_abs[:, -1].astype(np.float64)

    def _check_range(self, alpha_max: float) -> None:
        """ValueError where a sum of squared errors could overflow float64 (it would be NaN).

        Each error is at most ``max(|x|, alpha)`` (a value clipped or rounded to a level no
        farther than ``2 max``), so a row's sum stays below ``n (2 max)^2``, which must be finite;
        the bound is a square root of float64's largest number, ~1e154 / sqrt(n)."""
        data_max = float(self.absmax.max())
        limit = math.sqrt(np.finfo(np.float64).max / (4.0 * self.n)) / 2.0
        if data_max > limit:
            raise ValueError(f"x has magnitudes up to {data_max:.3g}, beyond {limit:.3g}: squared "
                             f"errors summed over {self.n} values would overflow float64; rescale "
                             f"x (the MSE of c x at c alpha is c^2 times that of x at alpha)")
        if alpha_max > limit:
            raise ValueError(f"alpha up to {alpha_max:.3g} is beyond {limit:.3g}: its squared "
                             f"error over {self.n} values would overflow float64; rescale x and "
                             f"alpha")

    def mse(self, alphas, bits, grid: Grid | str = "int") -> np.ndarray:
        """Exact mean squared error for every ``(bits, alpha)``; see :func:`mse_sweep`."""
        g = Grid.parse(grid)
        if g is Grid.UINT and not self.nonnegative:
            raise ValueError("grid 'uint' is one-sided: the data has negative values "
                             "(quantize magnitudes or use a signed grid)")
        scalar_bits = np.ndim(bits) == 0
        scalar_alpha = np.ndim(alphas) == 0
        bits_list = [check_bits(b, g) for b in np.atleast_1d(np.asarray(bits, dtype=object))]
        a = np.atleast_1d(np.asarray(alphas, dtype=np.float64)).ravel()
        if a.size == 0:
            raise ValueError("alphas is empty")
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ValueError("alphas must be positive finite numbers")
        self._check_range(float(a.max()))
        nbits = len(bits_list)
        steps = np.empty((nbits, a.size), dtype=np.float64)
        kmax = np.empty(nbits, dtype=np.int64)
        kmax_neg = np.empty(nbits, dtype=np.int64)
        offset = 0.0
        symmetric = True
        for j, m in enumerate(bits_list):
            f, kmin, km, offset = step_factor(g, m)
            steps[j] = f * a  # the same product grid_spec forms, so levels match bit for bit
            kmax[j] = km
            # The negative half's levels, mirrored: magnitudes (k - offset) step, k <= -kmin.
            kmax_neg[j] = -kmin
            symmetric = symmetric and kmin + km + 2 * offset == 0
        # Magnitudes alone decide the error on a symmetric grid, and on any grid for data
        # without negative values.
        signed = not symmetric and self.positive is not None
        if signed:
            extra = (-float(offset), True, self.positive, self.pos_count, self.pos_s1, self.pos_s2)
        else:
            extra = (float(offset), False, *_NO_SIGNS)
        out = np.empty((nbits, a.size, self.sorted_abs.shape[0]), dtype=np.float64)
        _sweep_sorted(self.sorted_abs, self.block, self.anchor, self.s1, self.s2, steps, kmax,
                      float(offset), kmax_neg if signed else kmax, *extra, g is Grid.ACIQ, a, out)
        out /= self.n
        if g is Grid.ACIQ:
            noise = np.array([1.0 / (3.0 * 4.0**m) for m in bits_list])
            out += (a[None, :] * (noise[:, None] * a[None, :]))[:, :, None]
        out = out.reshape((nbits, a.size) + tuple(self.row_shape))
        if scalar_alpha:
            out = out[:, 0]
        if scalar_bits:
            out = out[0]
        return out


# Typed placeholders for the sign arrays when the kernel does not read them.
_NO_SIGNS = (np.zeros((0, 0), dtype=np.bool_), np.zeros((0, 0), dtype=np.int64),
             np.zeros((0, 0), dtype=np.float64), np.zeros((0, 0), dtype=np.float64))


def _copy_c_order(arr: np.ndarray) -> np.ndarray:
    # np.copy keeps a non-contiguous input's layout, and reshape would then copy a second time.
    out = np.empty(arr.shape, dtype=arr.dtype)
    np.copyto(out, arr)
    return out


def prepare(x, axis: int | None = None, group_size: int | None = None,
            block: int | None = None) -> SortedMagnitudes:
    """Sort ``|x|`` per tensor, per channel (``axis``) or per group and form the block sums
    (with each magnitude's sign when ``x`` has negative values; see the module docstring).

    Parameters
    ----------
    x : array_like
        Data (weights or activations); float32 and float64 are read as they are.
    axis : int, optional
        Channel axis: one MSE per index along ``axis``, reduced over every other axis (for an
        ``nn.Linear`` weight ``(out, in)``, ``axis=0`` is per output channel).
    group_size : int, optional
        Groups of ``group_size`` consecutive values along the last axis (which it must divide);
        groups are numbered in C order, i.e. as ``x.reshape(-1, group_size)``.
    block : int, optional
        Block length of the algorithm (tuning only; results do not depend on it).
    """
    arr = validate_data(x)
    if axis is not None and group_size is not None:
        raise ValueError("give either axis (per channel) or group_size (per group), not both")
    if axis is not None:
        ax = int(axis)
        if not -arr.ndim <= ax < arr.ndim:
            raise ValueError(f"axis {axis} out of range for an array with {arr.ndim} dimensions")
        moved = np.moveaxis(arr, ax, 0)
        row_shape = (moved.shape[0],)
        vals = _copy_c_order(moved).reshape(moved.shape[0], -1)  # the one copy, channel-major
    elif group_size is not None:
        gs = int(group_size)
        if gs < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size}")
        if arr.ndim == 0 or arr.shape[-1] % gs:
            raise ValueError(f"group_size {gs} does not divide the last axis "
                             f"(shape {arr.shape})")
        vals = _copy_c_order(arr).reshape(-1, gs)
        row_shape = (vals.shape[0],)
    else:
        vals = _copy_c_order(arr).reshape(1, -1)
        row_shape = ()
    if vals.shape[1] == 0:
        raise ValueError("x has no values per channel/group")
    vals.sort(axis=1)
    # NaN sorts last and -inf/inf first/last: checking the outer columns is enough.
    if not (np.all(np.isfinite(vals[:, 0])) and np.all(np.isfinite(vals[:, -1]))):
        raise ValueError("x contains NaN or infinite values")
    nonneg = not bool(np.any(vals[:, 0] < 0))
    blk = _default_block(vals.shape[1]) if block is None else int(block)
    if blk < 1:
        raise ValueError("block must be positive")
    if nonneg:
        mags, positive = vals, None  # already the sorted magnitudes
        anchor, s1, s2, *_ = _block_stats(mags, blk, _NO_SIGNS[0], False)
        pos = (None, None, None)
    else:
        positive = np.empty(vals.shape, dtype=np.bool_)
        _fold_signs(vals, positive)
        mags = vals
        anchor, s1, s2, *pos = _block_stats(mags, blk, positive, True)
    return SortedMagnitudes(mags, blk, anchor, s1, s2, nonneg, row_shape, positive, *pos)


def mse_sweep(x, alphas, bits, grid: Grid | str = "int", axis: int | None = None,
              group_size: int | None = None) -> np.ndarray:
    """Exact empirical quantization MSE of ``x`` for every bit width and clipping threshold.

    Parameters
    ----------
    x : array_like
        Data; float32 and float64 are read in place (one sorted copy of ``|x|`` is made).
    alphas : float or array_like
        Clipping thresholds (> 0, data units).
    bits : int or sequence of int
        Bit widths ``M`` (checked with :func:`theory.grids.check_bits`).
    grid : str
        ``aciq``, ``midrise``, ``midtread``, ``int`` or ``uint`` (docs/design.md). ``aciq`` returns
        the measured clipping error plus ``alpha^2/(3*4^M)`` (Banner et al. 2019, eq. 5); the
        others the exact error of rounding onto the grid's levels
        (:func:`theory.grids.quantize`).
    axis : int, optional
        Per-channel MSE along this axis.
    group_size : int, optional
        Per-group MSE for groups of this many consecutive values along the last axis.

    Returns
    -------
    numpy.ndarray
        float64 array indexed ``[bits, alpha]`` per tensor or ``[bits, alpha, channel_or_group]``;
        the ``bits`` (``alpha``) axis is dropped when ``bits`` (``alphas``) is a scalar.

    Raises
    ------
    ValueError
        Empty data, NaN/inf, non-positive alphas, bits out of range, unknown grid, the
        one-sided ``uint`` grid on data with negative values, or data or alphas so large
        (~1e154 / sqrt(n)) that the sums of squared errors would overflow float64.
    """
    g = Grid.parse(grid)
    for b in np.atleast_1d(np.asarray(bits, dtype=object)):
        check_bits(b, g)  # fail before the sort on bad arguments
    a = np.asarray(alphas, dtype=np.float64)
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError("alphas must be a non-empty set of positive finite numbers")
    return prepare(x, axis=axis, group_size=group_size).mse(alphas, bits, g)
