"""Linear centred kernel alignment between representations (issue #17, S-005).

For two representations of the same ``n`` inputs, ``X`` (``n x p``) and ``Y`` (``n x q``), with
columns centred (``X_c = X - 1 mean(X)``), linear CKA (Kornblith et al., 2019) is

    CKA(X, Y) = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)                    (1)

which equals the HSIC form ``tr(K H L H) / sqrt(tr(K H K H) tr(L H L H))`` with ``K = X X^T``,
``L = Y Y^T`` and ``H = I - 11^T/n``, since ``||Y_c^T X_c||_F^2 = <X_c X_c^T, Y_c Y_c^T>_F``. It
lies in ``[0, 1]``, is 1 for identical inputs, symmetric, and invariant to orthogonal transforms
and isotropic scaling of either input (not to arbitrary invertible linear maps).

Everything is computed in float64. :func:`cka_matrix` computes every pair of a list of
representations from ``n x n`` Gram matrices when ``n`` is below the width and from ``p x q``
cross-products otherwise, whichever is cheaper.

Bootstrap over segments
-----------------------
When the ``n`` rows come from segments (sentences) and a bootstrap resamples whole segments with
replacement, a resample is a weight vector ``w`` (how often each segment was drawn; every row of
segment ``s`` counts ``w_s`` times). With ``N = sum_i w_i``, ``A = X^T W Y = sum_s w_s X_s^T Y_s``
and the weighted means ``m_x = X^T w / N``,

    ||X_c^T W Y_c||_F^2 = ||A||_F^2 - 2 N m_x^T A m_y + N^2 |m_x|^2 |m_y|^2                 (2)

and every term is a polynomial in ``w`` over per-segment aggregates (``<X_s^T Y_s, X_t^T Y_t>_F``,
``x_t^T X_s^T Y_s y_u`` with ``x_t`` the row sums of segment ``t``, ``x_s^T x_t``).
:func:`segment_cka` evaluates (1) through (2) for many resamples at once, exactly as (1) on the
explicitly repeated rows would.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["linear_cka", "cka_matrix", "segment_cka", "SegmentMoments"]


def _as_matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-d (tokens x features) array, got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{name} has {a.shape[0]} rows; CKA needs at least 2")
    if a.shape[1] < 1:
        raise ValueError(f"{name} has no columns")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or inf")
    return a


def _same_rows(reps) -> list[np.ndarray]:
    """The representations as float64 matrices, refused unless non-empty with one row count."""
    if len(reps) == 0:
        raise ValueError("no representations given")
    mats = [_as_matrix(r, f"reps[{i}]") for i, r in enumerate(reps)]
    n = mats[0].shape[0]
    for i, m in enumerate(mats):
        if m.shape[0] != n:
            raise ValueError(f"reps[{i}] has {m.shape[0]} rows, reps[0] has {n}; rows must be the same inputs")
    return mats


def _centre(a: np.ndarray) -> np.ndarray:
    return a - a.mean(axis=0, keepdims=True)


def linear_cka(x, y) -> float:
    """Linear CKA of eq. (1).

    Parameters
    ----------
    x, y : array-like, shapes (n, p) and (n, q)
        Two representations of the same ``n`` inputs (rows paired).

    Returns
    -------
    float in [0, 1]

    Raises
    ------
    ValueError
        Not 2-d, fewer than 2 rows, different row counts, NaN/inf, or a representation that is
        constant over the rows (zero after centring: CKA undefined).
    """
    xa, ya = _as_matrix(x, "x"), _as_matrix(y, "y")
    if xa.shape[0] != ya.shape[0]:
        raise ValueError(f"x and y must have the same rows (inputs), got {xa.shape[0]} and {ya.shape[0]}")
    return float(cka_matrix([xa, ya])[0, 1])


def cka_matrix(reps: Sequence) -> np.ndarray:
    """Linear CKA (1) of every pair of ``reps`` (each ``n x p_i``, same ``n``), a symmetric
    ``len(reps) x len(reps)`` matrix with ones on the diagonal.

    Raises
    ------
    ValueError
        As :func:`linear_cka`; also an empty list.
    """
    mats = _same_rows(reps)
    n = mats[0].shape[0]
    cen = [_centre(m) for m in mats]
    k = len(cen)
    cross = np.empty((k, k))
    widths = [m.shape[1] for m in cen]
    gram_cost = n * n * sum(widths) + k * k * n * n / 2
    cross_cost = sum(n * widths[i] * widths[j] for i in range(k) for j in range(i, k))
    if gram_cost < cross_cost:
        grams = [c @ c.T for c in cen]  # X_c X_c^T, n x n
        for i in range(k):
            for j in range(i, k):
                cross[i, j] = cross[j, i] = float(np.vdot(grams[i], grams[j]))
    else:
        for i in range(k):
            for j in range(i, k):
                cross[i, j] = cross[j, i] = float(np.sum((cen[i].T @ cen[j]) ** 2))
    self_ = np.sqrt(np.diag(cross))
    for i, s in enumerate(self_):
        if not s > 0:
            raise ValueError(f"reps[{i}] is constant over the rows (zero after centring); CKA is undefined")
    out = cross / np.outer(self_, self_)
    np.fill_diagonal(out, 1.0)
    return np.clip(out, 0.0, 1.0)


class SegmentMoments:
    """Per-segment aggregates of a list of representations of the same rows, for eq. (2).

    Parameters
    ----------
    reps : sequence of arrays (n, p_i)
    segments : int array (n,)
        Segment id of each row, ``0..S-1`` (every id present).

    Notes
    -----
    The aggregates of a pair ``(i, j)`` (``S x S`` Gram of the per-segment cross-products and the
    ``S x S x S`` tensor of eq. (2)'s middle term) are computed when first asked for and kept, so
    pairs sharing a representation share its self-terms.
    """

    def __init__(self, reps, segments):
        mats = _same_rows(reps)
        n = mats[0].shape[0]
        seg = np.asarray(segments)
        if seg.shape != (n,) or not np.issubdtype(seg.dtype, np.integer):
            raise ValueError(f"segments must be {n} integer ids, got shape {seg.shape} ({seg.dtype})")
        s = int(seg.max()) + 1
        if seg.min() < 0 or len(np.unique(seg)) != s:
            raise ValueError("segment ids must be 0..S-1 with every id present")
        self.n_segments = s
        self.rows = np.bincount(seg, minlength=s).astype(np.float64)
        # shift by the overall mean first: CKA is unchanged, the aggregates are better conditioned
        self._reps = [_centre(m) for m in mats]
        self._seg = [np.flatnonzero(seg == i) for i in range(s)]
        onehot = np.zeros((s, n))
        onehot[seg, np.arange(n)] = 1.0
        self._sums = [onehot @ m for m in self._reps]  # segment row sums, (S, p_i)
        self._parts: dict = {}

    def _pair(self, i: int, j: int):
        if (i, j) not in self._parts:
            a, b, sa, sb = self._reps[i], self._reps[j], self._sums[i], self._sums[j]
            ms = np.stack([a[r].T @ b[r] for r in self._seg])               # M_s, (S, p, q)
            flat = ms.reshape(self.n_segments, -1)
            g = flat @ flat.T                                                  # <M_s, M_t>_F
            q = np.einsum("tp,spu->stu", sa, ms @ sb.T)                       # sa_t^T M_s sb_u
            self._parts[i, j] = (g, q)
        return self._parts[i, j]

    def _hsic(self, w, n, i, j):
        g, q = self._pair(i, j)
        pa, pb = self._sums[i] @ self._sums[i].T, self._sums[j] @ self._sums[j].T
        a2 = np.einsum("bs,st,bt->b", w, g, w)
        cross = np.einsum("bs,bt,bu,stu->b", w, w, w, q)
        ma = np.einsum("bs,st,bt->b", w, pa, w)
        mb = np.einsum("bs,st,bt->b", w, pb, w)
        return a2 - 2.0 * cross / n + ma * mb / n ** 2

    def cka(self, i: int, j: int, weights) -> np.ndarray:
        """Eq. (1) between ``reps[i]`` and ``reps[j]`` on the rows of segment ``s`` repeated
        ``weights[b, s]`` times, for every row ``b`` of ``weights``.

        Parameters
        ----------
        i, j : int
        weights : array (B, S) or (S,)
            Non-negative counts (a bootstrap resample's draws of each segment).

        Returns
        -------
        np.ndarray (B,), or float for 1-d weights (NaN where a resample leaves a side constant)
        """
        k = len(self._reps)
        for v in (i, j):
            if not 0 <= v < k:
                raise ValueError(f"representation index {v} out of range 0..{k - 1}")
        w = np.asarray(weights, dtype=np.float64)
        one = w.ndim == 1
        w = np.atleast_2d(w)
        if w.ndim != 2 or w.shape[1] != self.n_segments:
            raise ValueError(f"weights must have {self.n_segments} columns (segments), got shape {w.shape}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and non-negative")
        n = w @ self.rows
        if (n <= 0).any():
            raise ValueError("a row of weights selects no tokens")
        hxy = self._hsic(w, n, i, j)
        den = np.sqrt(np.clip(self._hsic(w, n, i, i), 0, None) * np.clip(self._hsic(w, n, j, j), 0, None))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(den > 0, hxy / den, np.nan)
        out = np.clip(out, 0.0, 1.0)
        return float(out[0]) if one else out


def segment_cka(x, y, segments, weights) -> np.ndarray:
    """Linear CKA (1) of ``x`` and ``y`` under segment resampling weights (``(B, S)`` or ``(S,)``),
    via eq. (2) (:class:`SegmentMoments`)."""
    xa, ya = _as_matrix(x, "x"), _as_matrix(y, "y")
    if xa.shape[0] != ya.shape[0]:
        raise ValueError(f"x and y must have the same rows (inputs), got {xa.shape[0]} and {ya.shape[0]}")
    return SegmentMoments([xa, ya], segments).cka(0, 1, weights)
