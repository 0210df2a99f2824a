"""Linear probes of the residual stream: how much of the input each block's output still keeps.

The estimator (issue #17, S-010) is the held-out accuracy of a *closed-form ridge least-squares
classifier* on standardized features:

* features ``X`` (n, d): hidden states, one row per token position; each column standardized
  with the mean and standard deviation of the rows the probe is fitted on
  (``z = (x - mu) / sd``; a constant column keeps ``sd = 1``);
* targets: one-hot rows ``Y`` (n, C) over the classes present in the fitting rows;
* weights ``W = (Z^T Z + lambda n I)^{-1} Z^T (Y - 1 ybar^T)``, bias ``b = ybar`` (the class
  frequencies, unpenalized), prediction ``argmax_c (z W + b)_c`` (ties: the first class);
* ``lambda`` is chosen from a small grid (:data:`LAMBDAS`, relative to the number of fitting rows
  ``n``) by accuracy on a validation part of the training split (whole segments when the training
  split has at least two, else the last part of each training segment's positions), then the
  probe is refitted on the whole training split with that ``lambda``;
* the split is by segment (:func:`segment_split`): no position of a test segment is seen in
  training or in choosing ``lambda``;
* accuracy intervals are percentile bootstraps over test segments (:func:`accuracy_ci`,
  :func:`paired_difference_ci`), stratified by language when segments of several languages are
  pooled.

The hidden states come from forward hooks on the decoder blocks (:func:`block_states`): the input
of the first block (the embedding output, with any embedding scale the model applies) and the
output of every block (before the final norm).

numpy only, apart from :func:`block_states` (torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = [
    "LAMBDAS", "RidgeProbe", "fit_ridge", "ridge_path", "select_lambda", "train_probe",
    "segment_split", "validation_mask", "top_k_classes", "token_labels", "accuracy",
    "accuracy_ci", "paired_difference_ci", "bootstrap_indices", "find_bottleneck", "block_states",
]

#: Ridge penalties tried, relative to the number of fitting rows (penalty ``lambda * n``).
LAMBDAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


# ---- input checks ---------------------------------------------------------------------------------

def _features(X: Any, name: str = "X") -> np.ndarray:
    a = np.asarray(X, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-d (positions, features), got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name} is empty (no positions): the split left nothing to fit or test")
    if a.shape[1] == 0:
        raise ValueError(f"{name} has no feature columns")
    if not np.all(np.isfinite(a)):
        bad = int(np.sum(~np.isfinite(a)))
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf)")
    return a


def _labels(y: Any, n: int, name: str = "y") -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {a.shape}")
    if a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} labels for {n} feature rows")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer class labels")
    return a.astype(np.int64)


def _lambdas(lambdas: Sequence[float]) -> np.ndarray:
    lam = np.asarray(list(lambdas), dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0:
        raise ValueError("give at least one ridge penalty")
    if not np.all(np.isfinite(lam)) or np.any(lam <= 0):
        raise ValueError(f"ridge penalties must be finite and positive, got {lam.tolist()}")
    return lam


# ---- the probe ------------------------------------------------------------------------------------

@dataclass
class RidgeProbe:
    """A fitted ridge classifier: ``argmax((x - mean) / scale @ weights + bias)`` over ``classes``.

    Attributes
    ----------
    mean, scale : np.ndarray, shape (d,)
        Standardization of the fitting rows.
    weights : np.ndarray, shape (d, C)
    bias : np.ndarray, shape (C,)
        Class frequencies of the fitting rows.
    classes : np.ndarray, shape (C,)
        The labels, in column order (sorted).
    lam : float
        Relative penalty (the penalty is ``lam * n_fit``).
    n_fit : int
    """

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    classes: np.ndarray
    lam: float
    n_fit: int
    validation: dict = field(default_factory=dict)

    def scores(self, X: Any) -> np.ndarray:
        """Class scores ``(n, C)``: ``z W + b``."""
        a = _features(X)
        if a.shape[1] != self.mean.shape[0]:
            raise ValueError(f"X has {a.shape[1]} features; the probe was fitted on {self.mean.shape[0]}")
        return ((a - self.mean) / self.scale) @ self.weights + self.bias

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels: the class of the largest score (the first on ties)."""
        return self.classes[np.argmax(self.scores(X), axis=1)]


def _prepare(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(Z, Yc, mean, scale, classes, ybar) of the fitting rows."""
    a = _features(X)
    lab = _labels(y, a.shape[0])
    classes = np.unique(lab)
    if classes.size < 2:
        raise ValueError(f"y has one class only ({int(classes[0])}): a probe needs at least two")
    mean = a.mean(axis=0)
    scale = a.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    Z = (a - mean) / scale
    Y = (lab[:, None] == classes[None, :]).astype(np.float64)
    ybar = Y.mean(axis=0)
    return Z, Y - ybar, mean, scale, classes, ybar


def ridge_path(X: Any, y: Any, lambdas: Sequence[float] = LAMBDAS) -> list[RidgeProbe]:
    """Ridge probes of ``(X, y)`` for every relative penalty, from one eigendecomposition.

    ``Z^T Z = V diag(s) V^T`` gives ``W(lambda) = V diag(1 / (s + lambda n)) V^T Z^T Yc``
    (the closed form in the module docstring).
    """
    lam = _lambdas(lambdas)
    Z, Yc, mean, scale, classes, ybar = _prepare(X, y)
    n = Z.shape[0]
    s, V = np.linalg.eigh(Z.T @ Z)
    s = np.clip(s, 0.0, None)
    R = V.T @ (Z.T @ Yc)
    return [RidgeProbe(mean, scale, V @ (R / (s + l * n)[:, None]), ybar.copy(), classes, float(l), n)
            for l in lam]


def fit_ridge(X: Any, y: Any, lam: float = 1e-2) -> RidgeProbe:
    """The ridge probe of ``(X, y)`` with relative penalty ``lam`` (module docstring)."""
    return ridge_path(X, y, [lam])[0]


def accuracy(pred: Any, y: Any) -> float:
    """Share of positions whose prediction equals the label."""
    p, t = np.asarray(pred), np.asarray(y)
    if p.shape != t.shape or p.ndim != 1:
        raise ValueError(f"predictions and labels must be 1-d of equal length, got {p.shape} and {t.shape}")
    if p.size == 0:
        raise ValueError("no positions to score")
    return float(np.mean(p == t))


def select_lambda(X_fit: Any, y_fit: Any, X_val: Any, y_val: Any,
                  lambdas: Sequence[float] = LAMBDAS) -> tuple[float, dict[float, float]]:
    """The relative penalty with the best validation accuracy (the larger on ties: more
    regularization), and the validation accuracy of each."""
    Xv = _features(X_val, "X_val")
    yv = _labels(y_val, Xv.shape[0], "y_val")
    accs = {p.lam: accuracy(p.predict(Xv), yv) for p in ridge_path(X_fit, y_fit, lambdas)}
    best = max(accs, key=lambda l: (accs[l], l))
    return best, accs


def validation_mask(groups: Any, positions: Any | None = None, fraction: float = 0.25,
                    strata: Any | None = None) -> np.ndarray:
    """Which training rows validate ``lambda``: the last ``ceil(fraction * G)`` groups (segments,
    in order of first appearance; never all of them) when there are at least two, else (one
    segment) the rows whose position is in the last ``fraction`` of that segment's positions.
    With ``strata`` (one label per row, e.g. the language) the rule applies within each stratum."""
    g = np.asarray(groups, dtype=object)
    if g.ndim != 1 or g.size == 0:
        raise ValueError("groups must be a non-empty 1-d array (one group per training row)")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    pos = np.arange(g.size) if positions is None else np.asarray(positions)
    if pos.shape != g.shape:
        raise ValueError(f"positions has shape {pos.shape}, groups {g.shape}")
    if strata is not None:
        st = np.asarray(strata, dtype=object)
        if st.shape != g.shape:
            raise ValueError(f"strata has shape {st.shape}, groups {g.shape}")
        mask = np.zeros(g.size, dtype=bool)
        for lab in dict.fromkeys(st.tolist()):
            rows = np.flatnonzero(st == lab)
            mask[rows] = validation_mask(g[rows], pos[rows], fraction)
        return mask
    labels = list(dict.fromkeys(g.tolist()))
    if len(labels) >= 2:
        k = min(len(labels) - 1, max(1, int(np.ceil(fraction * len(labels)))))
        held = set(labels[-k:])
        return np.array([x in held for x in g.tolist()], dtype=bool)
    cut = np.quantile(pos, 1 - fraction)
    mask = pos > cut
    if mask.all() or not mask.any():
        raise ValueError("one training segment too short to hold out a validation part")
    return mask


def train_probe(X: Any, y: Any, groups: Any, positions: Any | None = None,
                lambdas: Sequence[float] = LAMBDAS, val_fraction: float = 0.25,
                strata: Any | None = None) -> RidgeProbe:
    """Choose ``lambda`` on a validation part of the training rows (:func:`validation_mask`), then
    refit on all of them. ``probe.validation`` records the penalties' validation accuracies.

    When the fitting part holds one class only (so no penalty can be compared), ``lambda`` is the
    middle of the grid."""
    a = _features(X)
    lab = _labels(y, a.shape[0])
    val = validation_mask(groups, positions, val_fraction, strata)
    grid = _lambdas(lambdas)
    if np.unique(lab[~val]).size >= 2:
        best, accs = select_lambda(a[~val], lab[~val], a[val], lab[val], grid)
    else:
        best, accs = float(grid[len(grid) // 2]), {}
    probe = fit_ridge(a, lab, best)
    probe.validation = {"accuracy": {repr(k): v for k, v in accs.items()}, "n_fit": int((~val).sum()),
                        "n_val": int(val.sum()), "chosen": best}
    return probe


# ---- splits and labels ------------------------------------------------------------------------------

def segment_split(n_segments: int, train_fraction: float = 0.7) -> tuple[list[int], list[int]]:
    """Segments ``0..floor(train_fraction * n) - 1`` (at least one) train, the rest test (at
    least one)."""
    if not isinstance(n_segments, (int, np.integer)) or n_segments < 2:
        raise ValueError(f"a train/test split by segment needs at least two segments, got {n_segments!r}")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    k = min(n_segments - 1, max(1, int(np.floor(train_fraction * n_segments))))
    return list(range(k)), list(range(k, n_segments))


def top_k_classes(train_ids: Any, k: int) -> np.ndarray:
    """The ``k`` most frequent token ids of the training positions (ties: the smaller id first),
    most frequent first; fewer when fewer distinct ids occur."""
    ids = np.asarray(train_ids, dtype=np.int64).ravel()
    if ids.size == 0:
        raise ValueError("no training token ids")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    uniq, counts = np.unique(ids, return_counts=True)
    order = np.lexsort((uniq, -counts))
    return uniq[order[:k]]


def token_labels(ids: Any, classes: Any) -> np.ndarray:
    """Class index of each token id: its position in ``classes``, or ``len(classes)`` ("other")."""
    ids = np.asarray(ids, dtype=np.int64)
    cls = np.asarray(classes, dtype=np.int64)
    lookup = {int(c): i for i, c in enumerate(cls)}
    other = len(cls)
    return np.array([lookup.get(int(t), other) for t in ids.ravel()], dtype=np.int64).reshape(ids.shape)


# ---- intervals ----------------------------------------------------------------------------------------

def bootstrap_indices(strata: Sequence[Any], n_boot: int, seed: int = 0) -> np.ndarray:
    """``(n_boot, G)`` resampled group indices: within each stratum, its groups drawn with
    replacement (so every replicate keeps each stratum's number of groups)."""
    s = np.asarray(strata, dtype=object)
    if s.ndim != 1 or s.size == 0:
        raise ValueError("strata must be a non-empty 1-d sequence (one entry per group)")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, s.size), dtype=np.int64)
    for lab in dict.fromkeys(s.tolist()):
        members = np.flatnonzero(s == lab)
        out[:, members] = members[rng.integers(0, members.size, (n_boot, members.size))]
    return out


def _counts(correct: Any, n: Any) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(correct, dtype=np.float64)
    m = np.asarray(n, dtype=np.float64)
    if c.shape[-1:] != m.shape or m.ndim != 1:
        raise ValueError(f"correct (..., groups) and n (groups,) disagree: {c.shape} and {m.shape}")
    if m.size == 0 or m.sum() <= 0:
        raise ValueError("no test positions")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(m))) or np.any(c < 0) or np.any(c > m):
        raise ValueError("correct counts must be finite and between 0 and the group's positions")
    return c, m


def accuracy_ci(correct: Any, n: Any, n_boot: int = 1000, seed: int = 0, strata: Sequence[Any] | None = None,
                level: float = 0.95) -> dict:
    """Accuracy ``sum(correct) / sum(n)`` over groups (test segments) with a percentile bootstrap
    interval over groups (within ``strata`` when given). ``correct`` may carry leading axes
    (e.g. blocks): every entry then gets its interval from the same resamples.

    Returns
    -------
    dict
        ``{"acc", "ci_low", "ci_high", "n_positions", "n_groups"}`` (arrays when ``correct`` has
        leading axes).
    """
    c, m = _counts(correct, n)
    idx = bootstrap_indices(strata if strata is not None else [0] * m.size, n_boot, seed)
    acc = c.sum(axis=-1) / m.sum()
    boot = c[..., idx].sum(axis=-1) / m[idx].sum(axis=-1)  # (..., n_boot)
    lo, hi = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)], axis=-1)
    conv = (lambda v: float(v)) if acc.ndim == 0 else (lambda v: np.asarray(v).tolist())
    return {"acc": conv(acc), "ci_low": conv(lo), "ci_high": conv(hi), "n_positions": int(m.sum()),
            "n_groups": int(m.size)}


def paired_difference_ci(correct_a: Any, correct_b: Any, n: Any, n_boot: int = 1000, seed: int = 0,
                         strata: Sequence[Any] | None = None, level: float = 0.95) -> dict:
    """``acc_a - acc_b`` on the same test positions with a paired percentile bootstrap over groups."""
    a, m = _counts(correct_a, n)
    b, _ = _counts(correct_b, n)
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b differ in shape: {a.shape} and {b.shape}")
    idx = bootstrap_indices(strata if strata is not None else [0] * m.size, n_boot, seed)
    d = (a - b).sum(axis=-1) / m.sum()
    boot = (a - b)[..., idx].sum(axis=-1) / m[idx].sum(axis=-1)
    lo, hi = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)], axis=-1)
    return {"diff": float(d), "ci_low": float(lo), "ci_high": float(hi)}


def find_bottleneck(correct: Any, n: Any, names: Sequence[str], n_boot: int = 1000, seed: int = 0,
                    strata: Sequence[Any] | None = None) -> dict:
    """Where a probe's accuracy over depth is lowest, and whether that is a bottleneck.

    ``correct`` is ``(depths, groups)``: correct test predictions per depth (embedding output
    first, then each block's output) and test group. The minimum is at ``argmin acc`` (the
    shallowest on ties); it is a *bottleneck* when it is interior (neither the first nor the last
    depth) and both ends' accuracy exceeds it with a paired bootstrap interval above zero.
    The largest drop is the depth ``k >= 1`` maximizing ``acc[k-1] - acc[k]``.
    """
    c, m = _counts(correct, n)
    if c.ndim != 2 or c.shape[0] != len(names):
        raise ValueError(f"correct must be (depths, groups) with one name per depth; got {c.shape} "
                         f"and {len(names)} names")
    if c.shape[0] < 3:
        raise ValueError("a bottleneck needs at least three depths (embedding and two blocks)")
    acc = c.sum(axis=1) / m.sum()
    k = int(np.argmin(acc))
    ends = {}
    for label, j in (("first", 0), ("last", c.shape[0] - 1)):
        ends[label] = (paired_difference_ci(c[j], c[k], m, n_boot, seed, strata) if j != k
                       else {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0})
    interior = 0 < k < c.shape[0] - 1
    found = bool(interior and ends["first"]["ci_low"] > 0 and ends["last"]["ci_low"] > 0)
    drops = acc[:-1] - acc[1:]
    kd = int(np.argmax(drops)) + 1
    return {"min_index": k, "min_name": names[k], "min_acc": float(acc[k]), "interior": bool(interior),
            "first_minus_min": ends["first"], "last_minus_min": ends["last"], "bottleneck": found,
            "largest_drop_index": kd, "largest_drop_name": names[kd], "largest_drop": float(drops[kd - 1]),
            "largest_drop_ci": paired_difference_ci(c[kd - 1], c[kd], m, n_boot, seed, strata)}


# ---- hidden states --------------------------------------------------------------------------------------

def block_states(model, ids, blocks: Sequence[Any] | None = None) -> list:
    """Hidden states of one forward pass: ``[embedding output, block 0 output, ..., block n-1
    output]``, each ``(B, T, d)`` (float32, on the CPU), read by forward hooks on the decoder
    blocks (the first block's input is the embedding output, scaled as the model scales it).

    ``blocks`` defaults to ``empirical.models.model_view(model).blocks``.
    """
    import torch

    if blocks is None:
        from empirical.models import model_view

        blocks = model_view(model).blocks
    blocks = list(blocks)
    if not blocks:
        raise ValueError("the model has no decoder blocks")
    got: dict[int, Any] = {}

    def first(x):
        return x[0] if isinstance(x, (tuple, list)) else x

    def pre(mod, args, kwargs):
        got[-1] = (args[0] if args else kwargs["hidden_states"]).detach()

    def post(i):
        def hook(mod, args, out):
            got[i] = first(out).detach()
        return hook

    handles = [blocks[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(-1, len(blocks)) if i not in got]
    if missing:
        raise RuntimeError(f"hooks did not see blocks {missing}")
    return [got[i].float().cpu() for i in range(-1, len(blocks))]
