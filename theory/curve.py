"""Curve models: each language's degradation with a *set* of units quantized, predicted from
single-unit (and a few pair) measurements, chosen on training points and judged out of sample.

Notation
--------
Units ``i = 0..n-1`` (decoder blocks or Linears); a *quantized set* ``S``; language ``l``'s
degradation (docs/design.md, "Degradation and disparity") with ``S`` quantized is ``d_l(S)``.
The measurements a model is fitted on, its *training points*, are

* the singles ``d_{l,i} = d_l({i})``, one pass per unit (every model's inputs);
* optional pairs ``d_{l,ij} = d_l({i, j})``, e.g. among the top-ranked units;
* optional larger sets ``d_l(S)``, e.g. the all-quantized point ``S = {0..n-1}``.

``x_l(S) = sum_{i in S} d_{l,i}`` is the additive sum. The models (:data:`CURVE_MODELS`):

* ``additive``: ``d_l(S) = x_l(S)`` (no fitted parameter);
* ``compounding`` (log-additive): ``1 + d_l(S) = prod_{i in S} (1 + d_{l,i})`` (none);
* ``calibrated``: ``d_l(S) = g_l x_l(S)`` (``g_l``);
* ``second_order``: ``d_l(S) = x_l(S) + sum_{i<j in S} I_{l,ij}``, unmeasured pairs 0 (none);
* ``second_order_scaled``: the same, unmeasured pairs ``c_l d_{l,i} d_{l,j}`` (``c_l``, below);
* ``second_order_calibrated``: the same, ``c_l`` also fitted to the larger sets (``c_l``);
* ``power_mean``: ``d_l(S) = (sum_{i in S} (d_{l,i})_+^{1/b_l})^{b_l}`` (``b_l``);
* ``power_sum``: ``d_l(S) = a_l (x_l(S))_+^{b_l}`` (``a_l, b_l``);

with ``(v)_+ = max(v, 0)`` (a negative single is measurement noise: only bits per byte can go
below zero). In the second-order models a measured pair keeps its measured interaction
``I_{l,ij} = d_{l,ij} - d_{l,i} - d_{l,j}``; an unmeasured pair gets ``I_{l,ij} = 0``
(``second_order``) or ``I_{l,ij} = c_l d_{l,i} d_{l,j}``, the per-language interaction per unit
of damage product (a mean-field rule: every pair interacts alike relative to its damages). ``c_l``
is fitted by least squares to the measured pairs' interactions (``second_order_scaled``; ``c_l =
0`` without pairs), or to those and to the larger sets' residuals ``d_l(S) - x_l(S) -
sum_{measured ij in S} I_{l,ij} = c_l sum_{unmeasured ij in S} d_{l,i} d_{l,j}``
(``second_order_calibrated``). Summed over a set, the mean-field term is ``c_l / 2 (x_l(S)^2 -
sum_{i in S} d_{l,i}^2)``: it grows with the square of the damage left, so an interaction seen
with everything quantized fades as units are protected.

``power_mean`` adds the units' damages as a p-norm with ``p = 1/b_l``; it is exact at every single
and reads as how unit errors add in the output: damage grows like the squared size of the output
error, and if unit errors are mutually orthogonal the squares add (``b = 1``, additive); if they
are aligned their sizes add (``b = 2``, super-additive); ``b < 1`` is saturation (``b -> 0``: the
worst unit alone). ``power_sum`` is the power law of the additive sum, fitted with the singles
as training points (so it is not exact at them).

Parameters are fitted by least squares on absolute degradations (so larger sets, the ones a
protection curve consists of, weigh most): ``g_l`` and ``c_l`` in closed form, ``b_l`` by a
log-spaced grid over ``[B_RANGE]`` refined by golden-section search, ``a_l`` in closed form for
each ``b_l``.

Model selection (:func:`select_curve_model`) uses the training points only: leave one multi-unit
training set out, refit, predict it (:func:`loo_errors`); the model with the least mean squared
error summed over languages wins (ties: the simpler, earlier in :data:`CURVE_MODELS`). Singles
are the models' inputs, never left out. A protection curve's points that are not training sets are then
the out-of-sample test (:func:`r2_out_of_sample`).

Disparity ``D(S) = mean_{l not in R} d_l(S) / mean_{r in R} d_r(S)`` (NaN when the reference
mean is not positive), as in :mod:`theory.protection` and ``empirical.disparity``. The crossing
``D <= 1`` is equivalent to the *excess* ``E(S) = mean_{l not in R} d_l(S) - mean_{r in R}
d_r(S) <= 0`` (reference mean positive), which is what :func:`greedy_order` lowers.

Numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .protection import critical_fraction

__all__ = ["CurveData", "CurveModel", "CURVE_MODELS", "B_RANGE", "fit_curve_model", "loo_errors",
           "select_curve_model", "curve_disparity", "excess", "predict_curve", "greedy_order", "r_squared",
           "held_out_mask", "r2_out_of_sample", "quantized_masks", "first_crossing"]

#: The curve models, simplest first (the order breaks ties in :func:`select_curve_model`).
CURVE_MODELS = ("additive", "compounding", "calibrated", "second_order", "second_order_scaled",
                "second_order_calibrated",
          "power_mean", "power_sum")

#: Range of the exponents ``b_l`` of the power models.
B_RANGE = (0.1, 10.0)


# ---- data -----------------------------------------------------------------------------------------

def _finite_vector(name: str, v, n_lang: int) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.shape != (n_lang,):
        raise ValueError(f"{name}: expected one degradation per language ({n_lang}), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: NaN or inf degradation {a.tolist()}")
    return a


@dataclass
class CurveData:
    """The training points of a curve model.

    Attributes
    ----------
    single : array [language, unit]
        ``d_{l,i}``, degradation with unit i alone quantized.
    pairs : mapping (i, j) -> array [language]
        ``d_{l,ij}`` for measured pairs (``i != j``; stored with ``i < j``).
    points : mapping set of units -> array [language]
        ``d_l(S)`` for measured sets of three or more units (e.g. all quantized); a two-unit set
        given here is moved to ``pairs``.
    """

    single: np.ndarray
    pairs: dict = field(default_factory=dict)
    points: dict = field(default_factory=dict)

    def __post_init__(self):
        d = np.asarray(self.single, dtype=np.float64)
        if d.ndim != 2 or 0 in d.shape:
            raise ValueError(f"single must be a non-empty 2-d array [language, unit], got shape {d.shape}")
        if not np.all(np.isfinite(d)):
            raise ValueError("single contains NaN or inf")
        self.single = d
        n_lang, n = d.shape
        pairs: dict[tuple[int, int], np.ndarray] = {}
        points: dict[frozenset, np.ndarray] = {}

        def units(key, what) -> frozenset:
            s = [int(i) for i in key]
            if any(i < 0 or i >= n for i in s):
                raise ValueError(f"{what} {sorted(s)}: unit indices must be in 0..{n - 1}")
            if len(set(s)) != len(s):
                raise ValueError(f"{what} {s}: a unit given twice")
            return frozenset(s)

        for key, v in dict(self.pairs).items():
            s = units(key, "pair")
            if len(s) != 2:
                raise ValueError(f"pair {sorted(s)}: a pair has two distinct units")
            k = tuple(sorted(s))
            if k in pairs:
                raise ValueError(f"pair {k} given twice")
            pairs[k] = _finite_vector(f"pair {k}", v, n_lang)
        for key, v in dict(self.points).items():
            s = units(key, "point")
            if len(s) < 2:
                raise ValueError(f"point {sorted(s)}: a training point has two or more units "
                                 "(singles go in `single`)")
            if len(s) == 2:
                k = tuple(sorted(s))
                if k in pairs:
                    raise ValueError(f"set {k} given as a pair and as a point")
                pairs[k] = _finite_vector(f"point {k}", v, n_lang)
            else:
                if s in points:
                    raise ValueError(f"point {sorted(s)} given twice")
                points[s] = _finite_vector(f"point {sorted(s)}", v, n_lang)
        self.pairs, self.points = pairs, points

    @property
    def n_languages(self) -> int:
        return self.single.shape[0]

    @property
    def n_units(self) -> int:
        return self.single.shape[1]

    def multi(self) -> list[tuple[frozenset, np.ndarray]]:
        """Every training set of two or more units with its measured degradations (pairs first)."""
        return ([(frozenset(k), v) for k, v in self.pairs.items()]
                + [(s, v) for s, v in self.points.items()])

    def training_sets(self) -> set[frozenset]:
        """Every set this data measures: the singles, pairs and points."""
        return {frozenset([i]) for i in range(self.n_units)} | {s for s, _ in self.multi()}

    def without(self, s: Iterable[int]) -> "CurveData":
        """The same data less one multi-unit training set."""
        s = frozenset(int(i) for i in s)
        return CurveData(self.single, {k: v for k, v in self.pairs.items() if frozenset(k) != s},
                         {k: v for k, v in self.points.items() if k != s})


def quantized_masks(sets, n: int) -> np.ndarray:
    """Boolean ``[set, unit]`` masks of quantized sets (a bool array is checked and returned)."""
    if isinstance(sets, np.ndarray) and sets.dtype == bool:
        if sets.ndim != 2 or sets.shape[1] != n:
            raise ValueError(f"masks must be [set, unit] with {n} units, got shape {sets.shape}")
        return sets
    sets = list(sets)
    m = np.zeros((len(sets), n), dtype=bool)
    for r, s in enumerate(sets):
        idx = [int(i) for i in s]
        if any(i < 0 or i >= n for i in idx):
            raise ValueError(f"set {sorted(idx)}: unit indices must be in 0..{n - 1}")
        m[r, idx] = True
    return m


# ---- scalar search ------------------------------------------------------------------------------

_GOLDEN = (math.sqrt(5) - 1) / 2


def _minimize_log(f, lo: float, hi: float, n_grid: int = 121, tol: float = 1e-12) -> float:
    """argmin of ``f`` over ``[lo, hi]``: a log-spaced grid, then golden-section search in log
    space between the best grid point's neighbours."""
    u = np.linspace(math.log(lo), math.log(hi), n_grid)
    vals = np.array([f(math.exp(t)) for t in u])
    k = int(np.nanargmin(vals)) if np.any(np.isfinite(vals)) else n_grid // 2
    a, b = u[max(k - 1, 0)], u[min(k + 1, n_grid - 1)]
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(math.exp(d))
    best = math.exp((a + b) / 2)
    return best if f(best) <= vals[k] else float(math.exp(u[k]))


# ---- the models ---------------------------------------------------------------------------------

class CurveModel:
    """A fitted curve model: :meth:`predict` gives ``d_l(S)`` for any quantized sets.

    Attributes
    ----------
    name : str
    data : CurveData
    params : dict
        The fitted parameters, one list entry per language (JSON-able).
    n_fitted : int
        Number of fitted parameters.
    """

    name = "?"

    def __init__(self, data: CurveData):
        self.data = data
        self.params: dict = {}
        self.n_fitted = 0
        self._fit()

    def _fit(self) -> None:
        pass

    def predict(self, sets) -> np.ndarray:
        """``d_l(S)`` for every set: an array ``[set, language]``. ``sets``: iterables of unit
        indices, or a boolean ``[set, unit]`` mask."""
        m = quantized_masks(sets, self.data.n_units)
        return self._predict(m.astype(np.float64))

    def _predict(self, m: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _x(self, m: np.ndarray) -> np.ndarray:
        return m @ self.data.single.T


class Additive(CurveModel):
    """``d_l(S) = sum_{i in S} d_{l,i}``."""

    name = "additive"

    def _predict(self, m):
        return self._x(m)


class Compounding(CurveModel):
    """``1 + d_l(S) = prod_{i in S} (1 + d_{l,i})``; needs every ``d_{l,i} > -1``."""

    name = "compounding"

    def _fit(self):
        if np.any(self.data.single <= -1):
            raise ValueError("compounding needs every single-unit degradation > -1")

    def _predict(self, m):
        return np.expm1(m @ np.log1p(self.data.single).T)


class Calibrated(CurveModel):
    """``d_l(S) = g_l x_l(S)``, ``g_l = sum_S d_l(S) x_l(S) / sum_S x_l(S)^2`` over the multi-unit
    training sets (1 without them, or where every ``x_l(S)`` is 0)."""

    name = "calibrated"

    def _fit(self):
        multi = self.data.multi()
        g = np.ones(self.data.n_languages)
        if multi:
            m = quantized_masks([s for s, _ in multi], self.data.n_units).astype(np.float64)
            x, y = self._x(m), np.array([v for _, v in multi])
            den = (x * x).sum(axis=0)
            g = np.where(den > 0, (x * y).sum(axis=0) / np.where(den > 0, den, 1.0), 1.0)
        self.g = g
        self.params = {"g": g.tolist()}
        self.n_fitted = g.size

    def _predict(self, m):
        return self._x(m) * self.g[None, :]


class SecondOrder(CurveModel):
    """``d_l(S) = x_l(S) + sum_{i<j in S} I_{l,ij}``: measured pairs keep their interaction,
    unmeasured ones get 0 (module docstring)."""

    name = "second_order"
    scaled = False  # unmeasured pairs: c_l d_{l,i} d_{l,j} instead of 0
    use_points = False  # c_l also fitted to the multi-unit points

    def _fit(self):
        d, n = self.data.single, self.data.n_units
        n_lang = d.shape[0]
        measured = np.zeros((n, n), dtype=bool)
        inter = np.zeros((n_lang, n, n))
        num, den = np.zeros(n_lang), np.zeros(n_lang)
        for (i, j), v in self.data.pairs.items():
            measured[i, j] = measured[j, i] = True
            val = v - d[:, i] - d[:, j]
            inter[:, i, j] = inter[:, j, i] = val
            prod = d[:, i] * d[:, j]
            num += val * prod
            den += prod * prod
        self._measured, self._inter = measured, inter
        prod_all = np.einsum("li,lj->lij", d, d)
        unmeasured = ~measured & ~np.eye(n, dtype=bool)
        self._prod_unmeasured = prod_all * unmeasured[None]
        if self.use_points and self.data.points:
            m = quantized_masks(list(self.data.points), n).astype(np.float64)
            y = np.array(list(self.data.points.values()))
            base = self._x(m) + 0.5 * np.einsum("si,lij,sj->sl", m, inter, m)
            p = 0.5 * np.einsum("si,lij,sj->sl", m, self._prod_unmeasured, m)
            num += ((y - base) * p).sum(axis=0)
            den += (p * p).sum(axis=0)
        self.c = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
        if not self.scaled:
            self.c = np.zeros(n_lang)
        self.params = {"c": self.c.tolist()} if self.scaled else {}
        self.n_fitted = n_lang if self.scaled else 0
        self._matrix = inter + self.c[:, None, None] * self._prod_unmeasured

    def _predict(self, m):
        return self._x(m) + 0.5 * np.einsum("si,lij,sj->sl", m, self._matrix, m)


class SecondOrderScaled(SecondOrder):
    """:class:`SecondOrder` with unmeasured pairs ``c_l d_{l,i} d_{l,j}``, ``c_l`` fitted to the
    measured pairs."""

    name = "second_order_scaled"
    scaled = True


class SecondOrderCalibrated(SecondOrder):
    """:class:`SecondOrderScaled` with ``c_l`` also fitted to the multi-unit points."""

    name = "second_order_calibrated"
    scaled = True
    use_points = True


class PowerMean(CurveModel):
    """``d_l(S) = (sum_{i in S} (d_{l,i})_+^{1/b_l})^{b_l}``, exact at singles; ``b_l`` fitted to
    the multi-unit training sets (1 without them)."""

    name = "power_mean"

    def _fit(self):
        multi = self.data.multi()
        d = np.clip(self.data.single, 0.0, None)
        b = np.ones(self.data.n_languages)
        if multi:
            m = quantized_masks([s for s, _ in multi], self.data.n_units).astype(np.float64)
            y = np.array([v for _, v in multi])
            for l in range(b.size):
                def sse(bl, l=l):
                    return float(np.sum((self._f(m, d[l], bl) - y[:, l]) ** 2))
                b[l] = _minimize_log(sse, *B_RANGE)
        self.b = b
        self.params = {"b": b.tolist()}
        self.n_fitted = b.size

    @staticmethod
    def _f(m: np.ndarray, dl: np.ndarray, bl: float) -> np.ndarray:
        return (m @ dl ** (1.0 / bl)) ** bl

    def _predict(self, m):
        d = np.clip(self.data.single, 0.0, None)
        return np.stack([self._f(m, d[l], self.b[l]) for l in range(self.b.size)], axis=1)


class PowerSum(CurveModel):
    """``d_l(S) = a_l (x_l(S))_+^{b_l}`` fitted by least squares to every training point,
    singles included (``a_l = 1, b_l = 1`` without multi-unit sets)."""

    name = "power_sum"

    def _fit(self):
        multi = self.data.multi()
        n_lang, n = self.data.single.shape
        a, b = np.ones(n_lang), np.ones(n_lang)
        if multi:
            sets = [frozenset([i]) for i in range(n)] + [s for s, _ in multi]
            m = quantized_masks(sets, n).astype(np.float64)
            x = np.clip(self._x(m), 0.0, None)
            y = np.concatenate([self.data.single.T, np.array([v for _, v in multi])])
            for l in range(n_lang):
                xl, yl = x[:, l], y[:, l]

                def a_of(bl, xl=xl, yl=yl):
                    xb = xl ** bl
                    den = float(xb @ xb)
                    return float(yl @ xb) / den if den > 0 else 0.0

                def sse(bl, xl=xl, yl=yl):
                    return float(np.sum((a_of(bl) * xl ** bl - yl) ** 2))

                b[l] = _minimize_log(sse, *B_RANGE)
                a[l] = a_of(b[l])
        self.a, self.b = a, b
        self.params = {"a": a.tolist(), "b": b.tolist()}
        self.n_fitted = 2 * n_lang

    def _predict(self, m):
        x = np.clip(self._x(m), 0.0, None)
        return self.a[None, :] * x ** self.b[None, :]


_CLASSES = {c.name: c for c in (Additive, Compounding, Calibrated, SecondOrder, SecondOrderScaled,
                                SecondOrderCalibrated, PowerMean, PowerSum)}


def fit_curve_model(name: str, data: CurveData) -> CurveModel:
    """The model ``name`` (one of :data:`CURVE_MODELS`) fitted to ``data``."""
    if name not in _CLASSES:
        raise ValueError(f"unknown curve model {name!r}; known: {', '.join(CURVE_MODELS)}")
    return _CLASSES[name](data)


# ---- selection on training points ---------------------------------------------------------------

def loo_errors(name: str, data: CurveData) -> tuple[list[frozenset], np.ndarray]:
    """Leave-one-out errors of model ``name`` over the multi-unit training sets.

    For each training set ``S`` of two or more units: refit on the data without ``S``, predict
    ``d_l(S)``. Returns ``(sets, errors)`` with ``errors[s, l] = predicted - measured``.
    """
    multi = data.multi()
    errs = np.empty((len(multi), data.n_languages))
    for r, (s, v) in enumerate(multi):
        errs[r] = fit_curve_model(name, data.without(s)).predict([s])[0] - v
    return [s for s, _ in multi], errs


def select_curve_model(data: CurveData, names: Sequence[str] = CURVE_MODELS
                       ) -> tuple[str, dict[str, float]]:
    """The model with the least leave-one-out error on the training points.

    Score of a model: ``mean_S sum_l (predicted - measured)^2`` over the multi-unit training
    sets (:func:`loo_errors`). Ties go to the earlier name; a model that cannot be fitted to the
    data scores NaN and is never selected. Without multi-unit training sets nothing can be checked
    and ``additive`` (no fitted parameter) is returned with NaN scores.

    Returns ``(name, {name: score})``.
    """
    names = list(names)
    if not names:
        raise ValueError("no models to select from")
    if not data.multi():
        return "additive", {n: float("nan") for n in names}
    scores = {}
    for n in names:
        try:
            _, e = loo_errors(n, data)
        except ValueError:  # the model cannot be fitted to this data (e.g. compounding, a damage <= -1)
            scores[n] = float("nan")
            continue
        scores[n] = float(np.mean(np.sum(e * e, axis=1)))
    finite = [n for n in names if np.isfinite(scores[n])]
    best = min(finite, key=lambda n: (scores[n], names.index(n))) if finite else "additive"
    return best, scores


# ---- curves, disparity, greedy ranking ----------------------------------------------------------

def _ref_mask(reference, n_lang: int) -> np.ndarray:
    r = np.asarray(reference)
    if r.dtype != bool or r.shape != (n_lang,):
        raise ValueError(f"reference must be a boolean mask over the {n_lang} languages, got {r!r}")
    if not r.any() or r.all():
        raise ValueError("the reference mask must mark some, but not all, languages")
    return r


def curve_disparity(d, reference) -> np.ndarray:
    """``D = mean_{l not in R} d_l / mean_{r in R} d_r`` over the last axis (languages); NaN
    where the reference mean is not positive. ``reference``: boolean mask over languages."""
    d = np.asarray(d, dtype=np.float64)
    r = _ref_mask(reference, d.shape[-1])
    ref = d[..., r].mean(axis=-1)
    other = d[..., ~r].mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ref > 0, other / np.where(ref > 0, ref, 1.0), np.nan)


def excess(d, reference) -> np.ndarray:
    """``E = mean_{l not in R} d_l - mean_{r in R} d_r`` over the last axis; ``D <= 1`` iff
    ``E <= 0`` where the reference mean is positive."""
    d = np.asarray(d, dtype=np.float64)
    r = _ref_mask(reference, d.shape[-1])
    return d[..., ~r].mean(axis=-1) - d[..., r].mean(axis=-1)


def _check_order(order, n: int) -> np.ndarray:
    order = np.asarray(order, dtype=int)
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"order must be a permutation of the {n} unit indices")
    return order


def _check_sizes(n_params, n: int) -> np.ndarray:
    w = np.asarray(n_params, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"n_params must be {n} positive finite numbers, got {w.tolist()}")
    return w


def predict_curve(model: CurveModel, order, n_params, reference) -> dict:
    """The model's curve when the units are protected in ``order``: at step ``k`` (0..n) the
    first ``k`` units of ``order`` keep full precision and ``order[k:]`` is quantized.

    Returns a dict with ``p`` (protected fraction of parameters, ``[k]``), ``d`` (``[k,
    language]``), ``D`` (``[k]``) and ``pstar`` (:func:`theory.protection.critical_fraction`).
    """
    n = model.data.n_units
    order = _check_order(order, n)
    w = _check_sizes(n_params, n)
    masks = np.ones((n + 1, n), dtype=bool)
    for k in range(1, n + 1):
        masks[k:, order[k - 1]] = False
    d = model.predict(masks)
    d[-1] = 0.0  # nothing quantized: no degradation under every model
    p = np.concatenate([[0.0], np.cumsum(w[order]) / w.sum()])
    D = curve_disparity(d, reference)
    return {"p": p, "d": d, "D": D, "pstar": critical_fraction(p, D)}


def greedy_order(model: CurveModel, n_params, reference) -> np.ndarray:
    """Protection order that lowers the model's predicted excess fastest per parameter.

    From everything quantized, repeatedly protect the unit ``i`` that maximises
    ``(E(S) - E(S \\ {i})) / n_i`` (``S`` the units still quantized, ``E`` :func:`excess` of the
    model's prediction; ties: lowest index). Since ``D <= 1`` iff ``E <= 0``, this heads for the
    crossing. Under the additive model ``E(S) - E(S \\ {i}) = e_i``, the unit's excess damage, so
    the order is :func:`theory.protection.rank_layers` ``"excess"``, which needs the fewest units
    to cross when units are of equal size (the knapsack argument of :mod:`theory.protection`);
    for the other models it is a heuristic.
    """
    n = model.data.n_units
    w = _check_sizes(n_params, n)
    r = _ref_mask(reference, model.data.n_languages)
    left = np.ones(n, dtype=bool)
    order: list[int] = []
    e_now = float(excess(model.predict(left[None])[0], r))
    while left.any():
        cand = np.flatnonzero(left)
        masks = np.repeat(left[None], cand.size, axis=0)
        masks[np.arange(cand.size), cand] = False
        e_next = excess(model.predict(masks), r)
        gain = (e_now - e_next) / w[cand]
        gain = np.where(np.isfinite(gain), gain, -np.inf)
        j = int(np.argmax(gain))  # first maximum: lowest index among ties
        order.append(int(cand[j]))
        left[cand[j]] = False
        e_now = float(e_next[j])
    return np.array(order)


def first_crossing(D) -> int | None:
    """Index of the first finite ``D <= 1`` (None when there is none)."""
    D = np.asarray(D, dtype=np.float64)
    hit = np.flatnonzero(np.isfinite(D) & (D <= 1.0))
    return int(hit[0]) if hit.size else None


# ---- out-of-sample judgement --------------------------------------------------------------------

def r_squared(pred, meas) -> float:
    """``1 - SS_res / SS_tot`` over the pairs where both are finite; NaN with fewer than two such
    pairs or no variation in ``meas``. A prediction equal to the mean of ``meas`` scores 0."""
    pred, meas = np.asarray(pred, dtype=np.float64).ravel(), np.asarray(meas, dtype=np.float64).ravel()
    if pred.shape != meas.shape:
        raise ValueError(f"pred and meas must have the same size, got {pred.size} and {meas.size}")
    ok = np.isfinite(pred) & np.isfinite(meas)
    if ok.sum() < 2:
        return float("nan")
    ss_tot = float(np.sum((meas[ok] - meas[ok].mean()) ** 2))
    if ss_tot <= 0:
        return float("nan")
    return 1.0 - float(np.sum((meas[ok] - pred[ok]) ** 2)) / ss_tot


def held_out_mask(sets, data: CurveData) -> np.ndarray:
    """True for every set that is not a training set of ``data`` and holds two or more units
    (an empty set is exact under every model, a single is a model input)."""
    train = data.training_sets()
    out = []
    for s in sets:
        s = frozenset(int(i) for i in s)
        out.append(len(s) >= 2 and s not in train)
    return np.array(out, dtype=bool)


def r2_out_of_sample(predicted, measured, reference, held_out) -> dict:
    """R^2 of predicted against measured degradations and disparity over held-out points only.

    Parameters
    ----------
    predicted, measured : array [point, language]
        ``d_l(S)`` per curve point.
    reference : boolean mask over languages
    held_out : boolean array [point]
        The points no model was fitted on (:func:`held_out_mask`); the others are ignored.

    Returns
    -------
    dict with ``disparity`` (R^2 of ``D`` over the held-out points), ``degradation`` (per
    language, R^2 over the held-out points), ``degradation_pooled`` (over every held-out
    (point, language) pair) and ``n_points``. NaN where fewer than two held-out points.
    """
    pred = np.asarray(predicted, dtype=np.float64)
    meas = np.asarray(measured, dtype=np.float64)
    if pred.shape != meas.shape or pred.ndim != 2:
        raise ValueError(f"predicted and measured must be [point, language] of one shape, got "
                         f"{pred.shape} and {meas.shape}")
    h = np.asarray(held_out, dtype=bool)
    if h.shape != (pred.shape[0],):
        raise ValueError(f"held_out must have one flag per point ({pred.shape[0]}), got shape {h.shape}")
    r = _ref_mask(reference, pred.shape[1])
    p, m = pred[h], meas[h]
    return {"disparity": r_squared(curve_disparity(p, r), curve_disparity(m, r)),
            "degradation": [r_squared(p[:, l], m[:, l]) for l in range(p.shape[1])],
            "degradation_pooled": r_squared(p, m),
            "n_points": int(h.sum())}
