"""Protection theory: how much of a model to keep in high precision before languages are equal.

First-order additive damage model. Quantizing layer i adds quantization noise of MSE ``eps_i``
(theory's prediction for the layer's fitted distribution, grid and bits); language l's
degradation (docs/design.md: ``d_l = bpb_q / bpb_full - 1``) with protected set P is

    d_l(P) = sum_{i not in P} s_{l,i} eps_i                                            (1)

with ``s_{l,i}`` a per-language sensitivity, fitted from single-layer measurements
(``s_{l,i} = d_l({i} quantized alone) / eps_i``). Disparity against a reference group R is

    D(P) = mean_{l not in R} d_l(P) / dbar_R(P),    dbar_R = mean_{r in R} d_r(P).    (2)

Under (1) both numerator and denominator are sums over unprotected layers, so with
``e_i = mean_{l not in R} s_{l,i} eps_i - mean_{r in R} s_{r,i} eps_i`` (layer i's *excess damage*)

    D(P) <= 1   <=>   sum_{i not in P} e_i <= 0     (when dbar_R(P) > 0).              (3)

Protecting layers in a ranked order gives the curve D(p) over the protected fraction p (share of
quantizable parameters, docs/design.md); the phase transition p* is the smallest p with D(p) <= 1.
By (3), choosing the protected set of least parameter count is a knapsack problem whose
continuous relaxation is solved exactly by ranking layers by excess damage per parameter,
``e_i / n_i``, descending (:func:`rank_layers` ``"excess"``); so that ranking minimises p* up to
the granularity of one layer. :func:`sharpness_derivation` derives, in sympy, the slope of D at
the crossing and the condition for a sharp transition.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["DamageModel", "fit_sensitivities", "rank_layers", "disparity_curve", "critical_fraction",
           "sharpness_derivation", "RANKINGS", "min_linear_fractional", "disparity_bound"]

RANKINGS = ("position", "reverse_position", "kurtosis", "excess", "size")


def _as_2d(name, a):
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name} must be a non-empty 2-d array [language, layer], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _shown(a: np.ndarray, most: int = 10) -> str:
    """The first ``most`` values of ``a`` for an error message."""
    vals = a.ravel().tolist()
    return str(vals) if len(vals) <= most else f"[{', '.join(map(str, vals[:most]))}, ...] ({len(vals)} values)"


def _per_layer(name, a, n_layers: int) -> np.ndarray:
    """``a`` as finite float64, one entry per layer."""
    a = np.asarray(a, dtype=np.float64)
    if a.shape != (n_layers,):
        raise ValueError(f"{name} must have one entry per layer ({n_layers}), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got {_shown(a)}")
    return a


def fit_sensitivities(single_layer_damage, eps) -> np.ndarray:
    """``s_{l,i} = d_l({i}) / eps_i`` from single-layer degradations ``[language, layer]``."""
    d = _as_2d("single_layer_damage", single_layer_damage)
    e = np.asarray(eps, dtype=np.float64)
    if e.shape != (d.shape[1],):
        raise ValueError(f"eps must have one entry per layer ({d.shape[1]}), got shape {e.shape}")
    if not np.all(np.isfinite(e)) or np.any(e <= 0):
        raise ValueError("eps must be positive and finite")
    return d / e[None, :]


@dataclass
class DamageModel:
    """The additive model (1) for a set of languages and layers.

    Attributes
    ----------
    damage : array [language, layer]
        ``s_{l,i} eps_i``: language l's degradation from quantizing layer i alone.
    n_params : array [layer]
        Quantizable weight parameters per layer.
    languages : list of str
    reference : list of str
        Reference group R (default English).
    """

    damage: np.ndarray
    n_params: np.ndarray
    languages: list[str]
    reference: list[str]

    def __post_init__(self):
        self.damage = _as_2d("damage", self.damage)
        self.n_params = _per_layer("n_params", self.n_params, self.damage.shape[1])
        # NaN passes "<= 0" and would make every protected fraction NaN
        if np.any(self.n_params <= 0):
            raise ValueError(f"n_params must be positive, got {_shown(self.n_params)}")
        if len(self.languages) != self.damage.shape[0]:
            raise ValueError("one language name per damage row is required")
        missing = [r for r in self.reference if r not in self.languages]
        if missing or not self.reference:
            raise ValueError(f"reference languages {missing or self.reference} not among {self.languages}")
        if len(set(self.reference)) == len(self.languages):
            raise ValueError("every language is in the reference group; nothing to compare")

    @classmethod
    def from_sensitivities(cls, s, eps, n_params, languages, reference=("eng",)):
        s = _as_2d("s", s)
        return cls(s * np.asarray(eps, dtype=np.float64)[None, :], n_params, list(languages), list(reference))

    @property
    def _ref_mask(self) -> np.ndarray:
        return np.array([l in self.reference for l in self.languages])

    def _protected(self, protected_mask) -> np.ndarray:
        """``protected_mask`` checked: booleans, one per layer. Integers are refused, not cast:
        [0, 1, 2] read as booleans protects layers 1 and 2, never what the caller meant."""
        mask = np.asarray(protected_mask)
        if mask.dtype != bool:
            if mask.dtype.kind in "iu":
                raise ValueError(f"protected_mask must be booleans, got integers {_shown(mask)}: pass a "
                                 "boolean mask or use protected indices")
            raise ValueError(f"protected_mask must be booleans, got dtype {mask.dtype}")
        n = self.damage.shape[1]
        if mask.shape != (n,):
            raise ValueError(f"protected_mask must have one entry per layer ({n}), got shape {mask.shape}")
        return mask

    def excess_damage(self) -> np.ndarray:
        """``e_i``: mean non-reference damage minus mean reference damage, per layer."""
        m = self._ref_mask
        return self.damage[~m].mean(axis=0) - self.damage[m].mean(axis=0)

    def degradation(self, protected_mask) -> np.ndarray:
        """``d_l(P)`` per language, eq. (1); ``protected_mask`` is a boolean array over layers."""
        keep = ~self._protected(protected_mask)
        return self.damage[:, keep].sum(axis=1)

    def disparity(self, protected_mask) -> float:
        """``D(P)``, eq. (2); nan when the reference group has no degradation left."""
        d = self.degradation(protected_mask)
        m = self._ref_mask
        ref = d[m].mean()
        if ref <= 0:
            return float("nan")
        return float(np.mean(d[~m] / ref))

    def per_language_disparity(self, protected_mask) -> np.ndarray:
        d = self.degradation(protected_mask)
        ref = d[self._ref_mask].mean()
        return d[~self._ref_mask] / ref if ref > 0 else np.full((~self._ref_mask).sum(), np.nan)


def rank_layers(model: DamageModel, ranking: str, kurtosis=None, positions=None) -> np.ndarray:
    """Order in which layers are protected.

    ``position``: by block position (``positions``, default layer order); ``reverse_position``;
    ``kurtosis``: by weight excess kurtosis, highest first; ``excess``: by predicted excess damage
    per parameter ``e_i / n_i``, highest first (minimises p*, see module docstring); ``size``: by
    parameter count, largest first.
    """
    n = model.damage.shape[1]
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; known: {', '.join(RANKINGS)}")
    if ranking in ("position", "reverse_position"):
        pos = np.arange(n) if positions is None else _per_layer("positions", positions, n)
        order = np.argsort(pos, kind="stable")
        return order[::-1] if ranking == "reverse_position" else order
    if ranking == "kurtosis":
        if kurtosis is None:
            raise ValueError("ranking 'kurtosis' needs the layers' kurtosis")
        k = np.asarray(kurtosis, dtype=np.float64)
        if k.shape != (n,) or not np.all(np.isfinite(k)):
            raise ValueError("kurtosis must be finite, one per layer")
        return np.argsort(-k, kind="stable")
    if ranking == "size":
        return np.argsort(-model.n_params, kind="stable")
    return np.argsort(-model.excess_damage() / model.n_params, kind="stable")


def disparity_curve(model: DamageModel, order) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Protected fraction p_k and disparity D(p_k) after protecting the first k layers of ``order``.

    Returns ``(p, D, per_language)`` with k = 0..n_layers (D is nan once nothing degrades).
    """
    order = np.asarray(order)
    n = model.damage.shape[1]
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError("order must be a permutation of the layer indices")
    mask = np.zeros(n, dtype=bool)
    total = model.n_params.sum()
    ps, ds, per = [0.0], [model.disparity(mask)], [model.per_language_disparity(mask)]
    for i in order:
        mask[i] = True
        ps.append(model.n_params[mask].sum() / total)
        ds.append(model.disparity(mask))
        per.append(model.per_language_disparity(mask))
    return np.array(ps), np.array(ds), np.array(per)


def critical_fraction(p, disparity) -> float:
    """Phase transition: the smallest protected fraction with disparity <= 1.

    Linear interpolation between the last point above 1 and the first at or below it. When D
    stays above 1 until nothing degrades any more (D undefined, as at p = 1 where every layer is
    protected), the transition is the first such p: only full protection equalises. nan when the
    curve ends above 1 (it stopped early).
    """
    p = np.asarray(p, dtype=np.float64)
    d = np.asarray(disparity, dtype=np.float64)
    if p.shape != d.shape or p.ndim != 1 or p.size == 0:
        raise ValueError("p and disparity must be 1-d arrays of the same length")
    finite = np.isfinite(d)
    # An undefined D in the trailing run (no reference damage left, e.g. everything protected)
    # counts as equalised; an undefined D inside the curve is skipped.
    tail = d.size
    while tail > 0 and not finite[tail - 1]:
        tail -= 1
    if tail == 0:
        return float("nan")  # D undefined everywhere: no reference degradation to compare with
    below = np.flatnonzero(finite & (d <= 1.0))
    if below.size == 0:
        return float(p[tail]) if tail < d.size else float("nan")
    k = below[0]
    if k == 0 or not finite[k - 1]:
        return float(p[k])
    # D crosses 1 between k-1 and k
    t = (d[k - 1] - 1.0) / (d[k - 1] - d[k])
    return float(p[k - 1] + t * (p[k] - p[k - 1]))


@functools.cache
def sharpness_derivation() -> dict[str, sp.Basic]:
    """Continuum form of the model and the slope of D at the crossing, derived by sympy.

    With layers ranked and spread over the protected fraction p in [0, 1], let ``a(p)`` and
    ``b(p)`` be the reference and mean non-reference damage densities; the remaining damages are
    ``A(p) = int_p^1 a``, ``B(p) = int_p^1 b`` and ``D(p) = B(p) / A(p)``. At the crossing
    ``B = A``:

        dD/dp |_{p*} = (a(p*) - b(p*)) / A(p*)

    so the transition is sharp (|dD/dp| large) when the excess density ``b - a`` at p* is large
    compared with the reference damage still unprotected, ``A(p*)``; it is gradual when much
    reference damage remains. Returned keys: ``D``, ``dD``, ``slope_at_crossing``.
    """
    import sympy as sp  # only here: `import theory` does not import sympy

    p, q = sp.symbols("p q", real=True)
    a, b = sp.Function("a"), sp.Function("b")
    A = sp.Integral(a(q), (q, p, 1))
    B = sp.Integral(b(q), (q, p, 1))
    D = B / A
    dD = sp.diff(D, p)
    # impose B = A at the crossing
    slope = sp.simplify(dD.subs(B, A))
    return {"D": sp.Eq(sp.Symbol("D"), D), "dD": sp.Eq(sp.Symbol("dD/dp"), dD),
            "slope_at_crossing": sp.Eq(sp.Symbol("dD/dp|_{p^*}"), slope)}


# ---- lower bounds on disparity ------------------------------------------------------------------

def min_linear_fractional(a, r, lo, hi) -> tuple[float, np.ndarray]:
    """``min (a . x) / (r . x)`` over the box ``lo <= x <= hi`` (``r >= 0``), exactly.

    A linear-fractional objective over a box is minimised at a vertex: ``x_i = hi_i`` where
    ``a_i - lambda* r_i < 0`` and ``lo_i`` elsewhere, ``lambda*`` the optimum. Dinkelbach's
    iteration (set x by the sign rule at the current lambda, recompute lambda) reaches it in
    finitely many steps, since lambda strictly decreases over finitely many vertices.

    Returns ``(value, x)``; nan when ``r . x = 0`` on the whole box.
    """
    a, r, lo, hi = (np.asarray(v, dtype=np.float64) for v in (a, r, lo, hi))
    if not (a.shape == r.shape == lo.shape == hi.shape) or a.ndim != 1:
        raise ValueError("a, r, lo and hi must be 1-D arrays of one length")
    if np.any(r < 0) or np.any(lo < 0) or np.any(hi < lo) or not np.all(np.isfinite(hi)):
        raise ValueError("need r >= 0 and finite 0 <= lo <= hi")
    if not r @ hi > 0:
        return float("nan"), hi.copy()
    x = hi.copy()
    lam = float(a @ x / (r @ x))
    for _ in range(a.size + 2):
        new = np.where(a - lam * r < 0, hi, lo)
        den = r @ new
        lam_new = float(a @ new / den) if den > 0 else np.inf
        if not lam_new < lam - 1e-15 * abs(lam):
            return lam, x
        lam, x = lam_new, new
    return lam, x


def disparity_bound(model: DamageModel, protected_mask, shrink=None) -> float:
    """Lowest disparity any quantizer could reach under the additive model (1).

    Quantizing layer i with a different quantizer scales its error, so every language's damage
    from it, by some ``x_i`` (``d_l = sum_i s_{l,i} eps_i x_i``); the run's disparity is the
    linear-fractional ``sum_i abar_i x_i / sum_i r_i x_i`` with ``abar_i`` the mean non-reference
    and ``r_i`` the mean reference damage of layer i (both clipped at 0: a negative single-layer
    damage is measurement noise). Its minimum over ``x`` (:func:`min_linear_fractional`):

    * ``shrink=None``, ``x_i`` in ``(0, inf)``: ``min_{i not in P} abar_i / r_i``, a bound for every
      quantizer at every rate (no choice of per-layer errors does better than the most
      reference-heavy layer);
    * ``shrink`` given, ``x_i`` in ``[shrink_i, 1]``: the lowest disparity reachable by quantizers
      no worse than the one measured in any layer and no better than ``shrink_i`` times it, e.g.
      ``shrink_i = D_SLB,i(R) / eps_i``, the Shannon lower bound at the same rate R over the
      error in use (:func:`theory.shannon_lower_bound`).

    Returns nan when nothing unprotected damages the reference.
    """
    keep = ~model._protected(protected_mask)
    dmg = np.clip(model.damage[:, keep], 0.0, None)
    m = model._ref_mask
    a, r = dmg[~m].mean(axis=0), dmg[m].mean(axis=0)
    if a.size == 0 or not np.any(r > 0):
        return float("nan")
    if shrink is None:
        # x -> 0 elsewhere: the infimum is the best single layer's ratio (approached)
        pos = r > 0
        return float(np.min(a[pos] / r[pos]))
    lo = np.asarray(shrink, dtype=np.float64)
    if lo.shape != keep.shape or np.any(lo < 0) or np.any(lo > 1) or not np.all(np.isfinite(lo)):
        raise ValueError("shrink factors must be one per layer, in [0, 1]")
    return min_linear_fractional(a, r, lo[keep], np.ones(a.size))[0]
