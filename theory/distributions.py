"""Distribution families for clipping analysis: one family = one class.

In the manner of ``scipy.stats``, a family is a small class that fills in a few hooks on the
*unit-scale* form of its density; the shared machinery (scaling, vectorisation, scipy views,
maximum-likelihood fits, parameter mappings) lives once in :class:`Distribution`. Fits, tables,
rate-distortion and the generic tests iterate over :data:`FAMILIES` (docs/design.md,
"Distribution families"), so adding a family means adding one class.

Numeric hooks (numpy / ``scipy.special``, vectorised, the fast path)
    ``_pdf(x, *shape)`` density; ``_tail_moment(k, t, *shape)`` upper partial moment
    ``U_k(t) = int_t^inf x^k f(x) dx`` for ``k = 0, 1, 2`` and ``t >= 0`` (quantizer MSE is a sum
    of these over cells, ``theory.mse``); ``_variance``, ``_excess_kurtosis``, ``_entropy`` (nats)
    and ``_cube_root_integral`` (``int f^{1/3}``, for Panter-Dite) of the shape parameters.
Symbolic hooks (sympy, the same quantities; imported only when an expression is asked for)
    ``_pdf_sym(x, *shape)``, ``_tail_moment_sym(k, t, *shape)`` (default: sympy integrates the
    density), ``_variance_sym``, ``_excess_kurtosis_sym``, ``_entropy_sym``.
Fits and scipy
    ``scipy_name`` (the ``scipy.stats`` family with the same ``(*shape, loc, scale)``),
    ``param_names`` and, where theory's parameters are not ``(*shape, scale)``, the mapping
    ``_params_of`` / ``_shape_scale_of``; ``_fit`` (the maximum-likelihood estimate, default
    ``scipy.stats.<name>.fit``); ``one_sided``; ``_cube_root_density`` (optional: the density
    ``f^{1/3} / int f^{1/3}`` that spaces the Panter-Dite compander's levels, a Lloyd-Max start).

Why the numeric forms are hand-written rather than lambdified at first use: lambdify needs sympy
(0.2 s to import) and its derivations (up to a second) before the first number, and the printed
code is not what one would write for floating point (``1/2 - erf/2`` instead of ``erfc``,
``Gamma(a)`` overflowing where a log-gamma ratio does not). The closed forms are a line each and
were written from the expressions the symbolic hooks give; tests/test_theory_distributions.py
checks every numeric hook against ``sympy.lambdify`` of its symbolic twin on a grid of points
for every family, so the formula printed in the paper is the one tested.

Two-sided families are symmetric about 0 (data is centred before fitting). ``Lognormal`` is
one-sided: support ``x > 0``, for magnitudes and post-activation values; its scale is ``exp(mu)``.
``scipy.stats`` (0.5 s to import) and ``scipy.special`` are imported inside the functions that
use them, so ``import theory`` stays fast and the Laplace path never needs either.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

__all__ = [
    "Distribution",
    "FamilyFit",
    "Gaussian",
    "Laplace",
    "Lognormal",
    "GeneralizedGaussian",
    "StudentT",
    "FAMILIES",
    "family",
]

_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


def _special():
    # scipy.special costs ~0.16 s to import; only families that need it pay, at first use.
    import scipy.special

    return scipy.special


def _check_positive(name: str, value, allow_array: bool = False):
    arr = np.asarray(value, dtype=np.float64) if allow_array else None
    if allow_array:
        if arr.size == 0:
            raise ValueError(f"{name} must not be empty")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite (got NaN or inf): {value!r}")
        if np.any(arr <= 0):
            raise ValueError(f"{name} must be positive, got {value!r}")
        return arr if arr.ndim else float(arr)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite (got {value!r})")
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return v


@dataclass(frozen=True)
class FamilyFit:
    """A maximum-likelihood fit of one family (:meth:`Distribution.fit`).

    ``params`` are in theory's parametrisation (``Distribution.param_names``); ``loc`` is the
    fitted (or fixed) location; ``k`` the number of free parameters. The fit may lie outside
    what theory can quantize (a Student-t with ``nu <= 2``): :meth:`to_theory` then raises.
    """

    family: str
    params: dict[str, float]
    loc: float
    k: int

    def scipy(self):
        """The fitted frozen ``scipy.stats`` distribution, location included."""
        return family(self.family).scipy_frozen(self.params, self.loc)

    def to_theory(self) -> "Distribution":
        """The theory distribution with these parameters (location dropped: data centred)."""
        return family(self.family).from_params(self.params)


class Distribution:
    """Base class: one family = one subclass filling in the hooks of the module docstring.

    Instances hold parameter values: ``scale`` (a float or an array, for vectorised
    evaluation over many layers or channels) and the family's shape parameters (floats).
    """

    #: family name used in tables, fits and error messages
    name: ClassVar[str] = "distribution"
    #: the name in prose (tables, captions)
    label: ClassVar[str] = "distribution"
    #: True when the support is x > 0
    one_sided: ClassVar[bool] = False
    #: names of shape parameters, in the order the hooks take them
    shape_names: ClassVar[tuple[str, ...]] = ()
    #: theory's parameters, in constructor order (``Family(**params)`` builds the distribution)
    param_names: ClassVar[tuple[str, ...]] = ("scale",)
    #: the ``scipy.stats`` family with the same ``(*shape, loc, scale)``
    scipy_name: ClassVar[str] = ""

    scale: float | np.ndarray
    shape: tuple[float, ...]

    # ---- numeric hooks (unit scale, numpy) ---------------------------------------------------
    @staticmethod
    def _pdf(x, *shape):
        raise NotImplementedError

    @staticmethod
    def _tail_moment(k: int, t, *shape):
        raise NotImplementedError

    @staticmethod
    def _variance(*shape) -> float:
        raise NotImplementedError

    @staticmethod
    def _excess_kurtosis(*shape) -> float:
        raise NotImplementedError

    @staticmethod
    def _entropy(*shape) -> float:
        raise NotImplementedError

    @staticmethod
    def _cube_root_integral(*shape) -> float:
        raise NotImplementedError

    # ---- symbolic hooks (unit scale, sympy) --------------------------------------------------
    @classmethod
    def _pdf_sym(cls, x, *shape):
        raise NotImplementedError

    @classmethod
    def _tail_moment_sym(cls, k: int, t, *shape):
        """Default: let sympy integrate the density (fast for Gaussian)."""
        import sympy as sp

        from ._symbolic import X, tail_form

        return tail_form(sp.integrate(X**k * cls._pdf_sym(X, *shape), (X, t, sp.oo), conds="none"))

    @classmethod
    def _variance_sym(cls, *shape):
        raise NotImplementedError

    @classmethod
    def _excess_kurtosis_sym(cls, *shape):
        raise NotImplementedError

    @classmethod
    def _entropy_sym(cls, *shape):
        raise NotImplementedError

    # ---- fit and scipy hooks -----------------------------------------------------------------
    @classmethod
    def _params_of(cls, shape: tuple, scale) -> dict[str, Any]:
        """Theory parameters from scipy's ``(shape, scale)``."""
        return dict(zip(cls.param_names, (*shape, scale)))

    @classmethod
    def _shape_scale_of(cls, params: dict) -> tuple[tuple, Any]:
        """scipy's ``(shape, scale)`` from theory parameters (inverse of :meth:`_params_of`)."""
        vals = [params[n] for n in cls.param_names]
        return tuple(vals[:-1]), vals[-1]

    @classmethod
    def _fit(cls, y: np.ndarray, fix_loc: bool) -> tuple[tuple, float, float]:
        """Maximum-likelihood ``(shape, loc, scale)`` on ``y``; default ``scipy.stats`` fit."""
        out = cls._scipy_family().fit(y, **({"floc": 0.0} if fix_loc else {}))
        return tuple(out[:-2]), out[-2], out[-1]

    @staticmethod
    def _cube_root_density(*shape):
        """Unit-scale frozen scipy distribution with density ``f^{1/3} / int f^{1/3}``, or None."""
        return None

    # ---- symbolic API ----------------------------------------------------------------------
    @classmethod
    def shape_symbols(cls) -> tuple:
        """sympy symbols of the shape parameters (positive), in hook order."""
        from ._symbolic import shape_symbol

        return tuple(shape_symbol(n) for n in cls.shape_names)

    @classmethod
    @functools.cache
    def pdf_expr(cls):
        """Unit-scale density in ``x`` (sympy)."""
        from ._symbolic import X

        return cls._pdf_sym(X, *cls.shape_symbols())

    @classmethod
    @functools.cache
    def tail_moment_expr(cls, k: int):
        """``U_k(t) = int_t^inf x^k f(x) dx`` on unit scale, ``t >= 0`` (sympy)."""
        from ._symbolic import T

        _check_k(k)
        return cls._tail_moment_sym(k, T, *cls.shape_symbols())

    @classmethod
    @functools.cache
    def variance_expr(cls):
        import sympy as sp

        return sp.sympify(cls._variance_sym(*cls.shape_symbols()))

    @classmethod
    @functools.cache
    def excess_kurtosis_expr(cls):
        import sympy as sp

        return sp.sympify(cls._excess_kurtosis_sym(*cls.shape_symbols()))

    @classmethod
    @functools.cache
    def entropy_expr(cls):
        """Unit-scale differential entropy in nats (sympy)."""
        import sympy as sp

        return sp.sympify(cls._entropy_sym(*cls.shape_symbols()))

    # ---- numeric forms -----------------------------------------------------------------------
    @classmethod
    def tail_moment_fn(cls, k: int) -> Callable[..., np.ndarray]:
        """Vectorised unit-scale ``U_k(t, *shape)`` (the numeric hook)."""
        _check_k(k)
        return functools.partial(cls._tail_moment, k)

    @classmethod
    def pdf_fn(cls) -> Callable[..., np.ndarray]:
        """Vectorised unit-scale density ``f(x, *shape)`` (the numeric hook)."""
        return cls._pdf

    # ---- instance API ---------------------------------------------------------------------
    def tail_moment(self, k: int, t) -> np.ndarray:
        """Unit-scale upper partial moment ``U_k`` at ``t`` (array), ``t >= 0``."""
        _check_k(k)
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            out = np.asarray(self._tail_moment(k, t, *self.shape), dtype=np.float64)
        # Closed forms can give nan at t = inf (inf * 0); the tail there is 0.
        return np.where(np.isposinf(t), 0.0, np.broadcast_to(out, np.broadcast(t, out).shape))

    def tail_moments(self, t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(U_0, U_1, U_2)`` at ``t`` (unit scale, ``t >= 0``) in one call: families whose three
        moments share work (the Student-t's incomplete beta) define ``_tail_moments``."""
        joint = getattr(type(self), "_tail_moments", None)
        if joint is None:
            return self.tail_moment(0, t), self.tail_moment(1, t), self.tail_moment(2, t)
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            out = joint(t, *self.shape)
        return tuple(np.where(np.isposinf(t), 0.0, np.asarray(u, dtype=np.float64)) for u in out)

    @property
    def variance(self):
        """Variance ``scale^2 * Var_unit`` (inf where the family has none)."""
        return np.asarray(self.scale) ** 2 * float(self._variance(*self.shape))

    @property
    def std(self):
        return np.sqrt(self.variance)

    @property
    def excess_kurtosis(self) -> float:
        """Excess kurtosis (scale-free; inf where the fourth moment diverges)."""
        return float(self._excess_kurtosis(*self.shape))

    @property
    def entropy(self):
        """Differential entropy in nats: ``h_unit + ln(scale)``."""
        return float(self._entropy(*self.shape)) + np.log(self.scale)

    def cube_root_integral(self) -> float:
        """``int f^{1/3}`` of the unit-scale density (Panter-Dite; scale it by ``scale^{2/3}``)."""
        return float(self._cube_root_integral(*self.shape))

    def cube_root_density(self):
        """Frozen scipy distribution (unit scale) with density ``f^{1/3} / int f^{1/3}``: the
        level density of the Panter-Dite compander; None where the family gives none."""
        return self._cube_root_density(*self.shape)

    def pdf(self, x) -> np.ndarray:
        """Density at ``x`` (vectorised over ``x`` and ``scale``)."""
        s = np.asarray(self.scale, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return self._pdf(np.asarray(x, dtype=np.float64) / s, *self.shape) / s

    @classmethod
    def _scipy_family(cls):
        import scipy.stats

        return getattr(scipy.stats, cls.scipy_name)

    @classmethod
    def scipy_frozen(cls, params: dict, loc: float = 0.0):
        """Frozen ``scipy.stats`` distribution of theory ``params`` at ``loc`` (not validated, so
        it also serves fits theory refuses, e.g. a Student-t with ``nu <= 2``)."""
        shape, scale = cls._shape_scale_of(_checked_params(cls, params))
        return cls._scipy_family()(*shape, loc=loc, scale=scale)

    @property
    def scipy(self):
        """The equivalent frozen ``scipy.stats`` distribution (scalar scale only)."""
        if np.ndim(self.scale):
            raise ValueError("scipy view needs a scalar scale; index the distribution first")
        return self._scipy_family()(*self.shape, loc=0.0, scale=self.scale)

    @classmethod
    def from_params(cls, params: dict) -> "Distribution":
        """``cls(**params)`` with theory's parameters (e.g. a stored fit's ``params``)."""
        return cls(**_checked_params(cls, params))

    @classmethod
    def from_scipy(cls, shape: tuple, scale) -> "Distribution":
        """The distribution of scipy's ``(*shape, loc=0, scale)``."""
        return cls.from_params(cls._params_of(tuple(shape), scale))

    @classmethod
    def check_support(cls, x) -> None:
        """ValueError if data ``x`` lies outside the family's support (one-sided: ``x > 0``)."""
        if not cls.one_sided:
            return
        x = np.asarray(x)
        if np.any(x < 0):
            raise ValueError(f"{cls.name} is one-sided but the data has negative values; "
                             "fit magnitudes (np.abs(x)) or use a signed family")
        if np.any(x == 0):
            raise ValueError(f"{cls.name} needs strictly positive data; the data has exact zeros")

    @classmethod
    def fit(cls, y, fix_loc: bool = False) -> FamilyFit:
        """Maximum-likelihood fit to the values ``y`` (via scipy.stats; see ``_fit``).

        ``fix_loc`` fixes the location at 0 (ignored by one-sided families, whose location is
        always 0). The free parameters are theory's, plus the location if it was fitted.
        """
        y = np.asarray(y, dtype=np.float64).ravel()
        cls.check_support(y)
        fix = bool(fix_loc) or cls.one_sided
        shape, loc, scale = cls._fit(y, fix)
        params = cls._params_of(tuple(float(s) for s in shape), float(scale))
        return FamilyFit(cls.name, {k: float(v) for k, v in params.items()}, float(loc),
                         len(cls.param_names) + (not fix))

    def with_scale(self, scale) -> "Distribution":
        """Same shape, new scale (for lognormal, scale = exp(mu))."""
        return type(self).from_scipy(self.shape, _check_positive("scale", scale, allow_array=True))

    def __getitem__(self, idx) -> "Distribution":
        return self.with_scale(np.asarray(self.scale)[idx])

    @property
    def params(self) -> dict[str, Any]:
        """Theory's parameters (``type(self)(**params)`` rebuilds the distribution)."""
        return self._params_of(self.shape, self.scale)

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        return f"{type(self).__name__}({ps})"

    def __eq__(self, other) -> bool:
        return (type(self) is type(other) and self.shape == other.shape
                and np.array_equal(np.asarray(self.scale), np.asarray(other.scale)))

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.shape, np.asarray(self.scale).tobytes()))


def _check_k(k) -> None:
    if k not in (0, 1, 2):
        raise ValueError(f"tail moments are defined for k in 0, 1, 2; got {k}")


def _checked_params(cls, params) -> dict:
    if not isinstance(params, Mapping):
        raise ValueError(f"{cls.name} parameters must be a dict, got {params!r}")
    missing = [n for n in cls.param_names if n not in params]
    extra = [n for n in params if n not in cls.param_names]
    if missing or extra:
        raise ValueError(f"{cls.name} takes parameters {', '.join(cls.param_names)}; "
                         f"got {', '.join(map(str, params)) or 'none'}")
    return {n: params[n] for n in cls.param_names}


def _fmt(v) -> str:
    return repr(float(v)) if np.ndim(v) == 0 else f"array(shape={np.shape(v)})"


class Gaussian(Distribution):
    """Normal distribution N(0, sigma^2)."""

    name = "gaussian"
    label = "Gaussian"
    param_names = ("sigma",)
    scipy_name = "norm"

    def __init__(self, sigma=1.0):
        self.scale = _check_positive("sigma", sigma, allow_array=True)
        self.shape = ()

    @staticmethod
    def _pdf(x):
        return np.exp(-0.5 * np.square(x)) / _SQRT2PI

    @staticmethod
    def _tail_moment(k, t):
        if k == 1:
            return np.exp(-0.5 * np.square(t)) / _SQRT2PI
        sf = 0.5 * _special().erfc(t / _SQRT2)
        return sf if k == 0 else t * np.exp(-0.5 * np.square(t)) / _SQRT2PI + sf

    @staticmethod
    def _variance():
        return 1.0

    @staticmethod
    def _excess_kurtosis():
        return 0.0

    @staticmethod
    def _entropy():
        return 0.5 * math.log(2 * math.pi * math.e)

    @staticmethod
    def _cube_root_integral():
        # (2 pi)^(-1/6) int exp(-x^2/6) = (2 pi)^(-1/6) sqrt(6 pi)
        return (2 * math.pi) ** (-1 / 6) * math.sqrt(6 * math.pi)

    @classmethod
    def _pdf_sym(cls, x):
        import sympy as sp

        return sp.exp(-x**2 / 2) / sp.sqrt(2 * sp.pi)

    @classmethod
    def _variance_sym(cls):
        return 1

    @classmethod
    def _excess_kurtosis_sym(cls):
        return 0

    @classmethod
    def _entropy_sym(cls):
        import sympy as sp

        return sp.log(2 * sp.pi * sp.E) / 2

    @classmethod
    def _fit(cls, y, fix_loc):
        if fix_loc:  # closed form; scipy's optimiser would only reproduce it
            return (), 0.0, float(np.sqrt(np.mean(y * y)))
        return super()._fit(y, fix_loc)

    @staticmethod
    def _cube_root_density():
        import scipy.stats

        return scipy.stats.norm(0.0, math.sqrt(3.0))

    @property
    def sigma(self):
        return self.scale


class Laplace(Distribution):
    """Laplace distribution with density exp(-|x|/b) / (2b)."""

    name = "laplace"
    label = "Laplace"
    param_names = ("b",)
    scipy_name = "laplace"

    def __init__(self, b=1.0):
        self.scale = _check_positive("b", b, allow_array=True)
        self.shape = ()

    @staticmethod
    def _pdf(x):
        return 0.5 * np.exp(-np.abs(x))

    @staticmethod
    def _tail_moment(k, t):
        # int_t^inf x^k e^-x / 2 = e^-t (1, t + 1, t^2 + 2t + 2) / 2
        e = 0.5 * np.exp(-t)
        return e if k == 0 else (t + 1) * e if k == 1 else (t * t + 2 * t + 2) * e

    @staticmethod
    def _variance():
        return 2.0

    @staticmethod
    def _excess_kurtosis():
        return 3.0

    @staticmethod
    def _entropy():
        return 1.0 + math.log(2.0)

    @staticmethod
    def _cube_root_integral():
        return 6.0 * 2.0 ** (-1 / 3)  # 2^(-1/3) int exp(-|x|/3)

    @classmethod
    def _pdf_sym(cls, x):
        import sympy as sp

        return sp.exp(-sp.Abs(x)) / 2

    @classmethod
    def _tail_moment_sym(cls, k, t):
        # For t >= 0 only the positive branch matters; integrate it without Abs so sympy is quick.
        import sympy as sp

        from ._symbolic import X, tail_form

        return tail_form(sp.integrate(X**k * sp.exp(-X) / 2, (X, t, sp.oo), conds="none"))

    @classmethod
    def _variance_sym(cls):
        return 2

    @classmethod
    def _excess_kurtosis_sym(cls):
        return 3

    @classmethod
    def _entropy_sym(cls):
        import sympy as sp

        return 1 + sp.log(2)

    @classmethod
    def _fit(cls, y, fix_loc):
        if fix_loc:
            return (), 0.0, float(np.mean(np.abs(y)))
        return super()._fit(y, fix_loc)

    @staticmethod
    def _cube_root_density():
        import scipy.stats

        return scipy.stats.laplace(0.0, 3.0)

    @property
    def b(self):
        return self.scale


_LOGNORMAL_MU_MAX = 300.0  # |mu| bound: exp(2 mu) stays within float64 with room to spare
_LOGNORMAL_SIGMA_RANGE = (1e-6, 18.0)


class Lognormal(Distribution):
    """Lognormal: ln X ~ N(mu, sigma^2), support x > 0 (one-sided).

    Unit scale means ``mu = 0``; ``scale = exp(mu)``, ``sigma`` is the shape. Accepted:
    ``|mu| <= 300`` and ``1e-6 <= sigma <= 18``, where every MSE is a float64 number that the
    closed forms resolve (the constructor's error says which bound and why).
    Tail moments: ``U_k(t) = exp(k^2 sigma^2 / 2) * Phi_c((ln t - k sigma^2) / sigma)``.
    """

    name = "lognormal"
    label = "lognormal"
    one_sided = True
    shape_names = ("sigma",)
    param_names = ("mu", "sigma")
    scipy_name = "lognorm"

    def __init__(self, mu=0.0, sigma=1.0):
        mu_arr = np.asarray(mu, dtype=np.float64)
        if mu_arr.size == 0 or not np.all(np.isfinite(mu_arr)):
            raise ValueError(f"mu must be finite (got {mu!r})")
        if np.any(np.abs(mu_arr) > _LOGNORMAL_MU_MAX):
            # scale = exp(mu) underflows to 0 below mu ~ -745 and overflows above ~ 709; every
            # MSE is scale^2 times a unit-scale MSE, so scale^2 must be a float64 number too.
            raise ValueError(f"mu={mu!r} is outside [-{_LOGNORMAL_MU_MAX:g}, {_LOGNORMAL_MU_MAX:g}]:"
                             f" the scale exp(mu) and its square (every MSE is scale^2 x the "
                             f"unit-scale MSE) would under- or overflow float64; rescale the data")
        self.scale = np.exp(mu_arr) if mu_arr.ndim else float(np.exp(mu_arr))
        s = _check_positive("sigma", sigma)
        lo, hi = _LOGNORMAL_SIGMA_RANGE
        if not lo <= s <= hi:
            # Above 18, E[X^2] = exp(2 sigma^2) (1e281 at 18) leaves float64 and with it every
            # MSE. Below 1e-6 the MSE (~sigma^2) is a difference of partial moments of size 1,
            # which float64 resolves to ~1e-16: at sigma = 1e-8 it came out 2.2e-16, not 1e-16.
            raise ValueError(f"sigma={sigma!r} is outside [{lo:g}, {hi:g}]: above, E[X^2] = "
                             f"exp(2 sigma^2) exceeds float64; below, the MSE (~sigma^2) is "
                             f"lost in float64 rounding of moments of size 1")
        self.shape = (s,)

    @staticmethod
    def _pdf(x, s):
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            lx = np.log(x)
            v = np.exp(-lx * lx / (2 * s * s)) / (x * s * _SQRT2PI)
        return np.where(x > 0, v, 0.0)

    @staticmethod
    def _tail_moment(k, t, s):
        with np.errstate(divide="ignore"):  # log(0) = -inf gives erfc(-inf) = 2: the full moment
            z = (np.log(t) - k * s * s) / (s * _SQRT2)
        return np.exp(k * k * s * s / 2) * 0.5 * _special().erfc(z)

    @staticmethod
    def _alpha_range(s):
        """Unit-scale clipping thresholds that hold every MSE-optimal one, ``(lo, hi)``: from 8
        sigma below the median (ln x ~ N(0, s^2)) to 8 sigma above ``exp(2 s^2)``, where
        ``x^2 f(x)`` peaks (for s > 3 far above any multiple of the std that a scan would reach)."""
        return math.exp(-8.0 * s), math.exp(min(2.0 * s * s + 8.0 * s, 700.0))

    @staticmethod
    def _variance(s):
        return float(np.expm1(s * s) * np.exp(s * s))  # inf, not OverflowError, for huge s

    @staticmethod
    def _excess_kurtosis(s):
        e = np.exp(s * s)
        return float(e**4 + 2 * e**3 + 3 * e**2 - 6)

    @staticmethod
    def _entropy(s):
        return 0.5 + math.log(s * _SQRT2PI)

    @staticmethod
    def _cube_root_integral(s):
        # x = e^u: (s sqrt(2 pi))^(-1/3) int exp(-u^2/(6 s^2) + 2u/3) du
        return float((s * _SQRT2PI) ** (-1 / 3) * s * math.sqrt(6 * math.pi) * np.exp(2 * s * s / 3))

    @classmethod
    def _pdf_sym(cls, x, s):
        import sympy as sp

        return sp.exp(-sp.log(x) ** 2 / (2 * s**2)) / (x * s * sp.sqrt(2 * sp.pi))

    @classmethod
    def _tail_moment_sym(cls, k, t, s):
        import sympy as sp

        return sp.exp(k**2 * s**2 / 2) * sp.erfc((sp.log(t) - k * s**2) / (s * sp.sqrt(2))) / 2

    @classmethod
    def _variance_sym(cls, s):
        import sympy as sp

        return (sp.exp(s**2) - 1) * sp.exp(s**2)

    @classmethod
    def _excess_kurtosis_sym(cls, s):
        import sympy as sp

        return sp.exp(4 * s**2) + 2 * sp.exp(3 * s**2) + 3 * sp.exp(2 * s**2) - 6

    @classmethod
    def _entropy_sym(cls, s):
        import sympy as sp

        return sp.Rational(1, 2) + sp.log(s * sp.sqrt(2 * sp.pi))

    @classmethod
    def _params_of(cls, shape, scale):
        return {"mu": np.log(scale), "sigma": shape[0]}

    @classmethod
    def _shape_scale_of(cls, params):
        return (params["sigma"],), np.exp(params["mu"])

    @classmethod
    def _fit(cls, y, fix_loc):
        ly = np.log(y)
        return (float(ly.std()),), 0.0, math.exp(float(ly.mean()))  # the MLE at loc = 0

    @staticmethod
    def _cube_root_density(s):
        import scipy.stats

        return scipy.stats.lognorm(math.sqrt(3.0) * s, 0.0, math.exp(2 * s * s))

    @property
    def mu(self):
        return np.log(self.scale)

    @property
    def sigma(self) -> float:
        return self.shape[0]


class GeneralizedGaussian(Distribution):
    """Generalized Gaussian: density beta / (2 s Gamma(1/beta)) exp(-|x/s|^beta).

    beta = 2 is Gaussian with sigma = s / sqrt(2); beta = 1 is Laplace with b = s; beta < 1 has
    heavier tails. Same parametrisation as ``scipy.stats.gennorm``.
    Tail moments: ``U_k(t) = Gamma((k+1)/beta, t^beta) / (2 Gamma(1/beta))``.
    """

    name = "gennorm"
    label = "generalized Gaussian"
    shape_names = ("beta",)
    param_names = ("beta", "scale")
    scipy_name = "gennorm"

    def __init__(self, beta=2.0, scale=1.0):
        self.shape = (_check_positive("beta", beta),)
        self.scale = _check_positive("scale", scale, allow_array=True)

    @staticmethod
    def _pdf(x, b):
        return math.exp(math.log(b / 2) - math.lgamma(1 / b)) * np.exp(-np.abs(x) ** b)

    @staticmethod
    def _tail_moment(k, t, b):
        sc = _special()
        a = (k + 1) / b
        return sc.gammaincc(a, np.asarray(t, dtype=np.float64) ** b) * (
            0.5 * np.exp(math.lgamma(a) - math.lgamma(1 / b)))

    @staticmethod
    def _variance(b):
        return float(np.exp(math.lgamma(3 / b) - math.lgamma(1 / b)))

    @staticmethod
    def _excess_kurtosis(b):
        return float(np.exp(math.lgamma(5 / b) + math.lgamma(1 / b) - 2 * math.lgamma(3 / b))) - 3

    @staticmethod
    def _entropy(b):
        return 1 / b - math.log(b / 2) + math.lgamma(1 / b)

    @staticmethod
    def _cube_root_integral(b):
        # (b / (2 Gamma(1/b)))^(1/3) int exp(-|x|^b / 3) = ... * 2 * 3^(1/b) Gamma(1/b) / b
        return float(np.exp((math.log(b / 2) - math.lgamma(1 / b)) / 3 + math.log(2 / b)
                            + math.log(3) / b + math.lgamma(1 / b)))

    @classmethod
    def _pdf_sym(cls, x, b):
        import sympy as sp

        return b / (2 * sp.gamma(1 / b)) * sp.exp(-sp.Abs(x) ** b)

    @classmethod
    def _tail_moment_sym(cls, k, t, b):
        import sympy as sp

        return sp.uppergamma(sp.Integer(k + 1) / b, t**b) / (2 * sp.gamma(1 / b))

    @classmethod
    def _variance_sym(cls, b):
        import sympy as sp

        return sp.gamma(3 / b) / sp.gamma(1 / b)

    @classmethod
    def _excess_kurtosis_sym(cls, b):
        import sympy as sp

        return sp.gamma(5 / b) * sp.gamma(1 / b) / sp.gamma(3 / b) ** 2 - 3

    @classmethod
    def _entropy_sym(cls, b):
        import sympy as sp

        return 1 / b - sp.log(b / (2 * sp.gamma(1 / b)))

    @staticmethod
    def _cube_root_density(b):
        import scipy.stats

        return scipy.stats.gennorm(b, 0.0, 3.0 ** (1.0 / b))

    @property
    def beta(self) -> float:
        return self.shape[0]


def _t_log_const(nu: float) -> float:
    # log of the density's constant; Gamma(nu/2) alone overflows float64 beyond nu ~ 340
    return math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)


def _t_sf_sym(nu, t):
    """Student-t survival function for t >= 0 as a regularised incomplete beta (sympy)."""
    import sympy as sp

    from ._symbolic import RegIncBeta

    return RegIncBeta(nu / 2, sp.S.Half, nu / (nu + t**2)) / 2


def _t_const_sym(nu):
    import sympy as sp

    return sp.exp(sp.loggamma((nu + 1) / 2) - sp.loggamma(nu / 2)) / sp.sqrt(nu * sp.pi)


class StudentT(Distribution):
    """Student-t with ``nu > 2`` degrees of freedom (finite variance) and a scale.

    Tail moments on unit scale, ``t >= 0``, with ``c_nu`` the density's constant:
    ``U_0 = sf_nu(t)``,
    ``U_1 = c_nu nu/(nu-1) (1 + t^2/nu)^(-(nu-1)/2)``,
    ``U_2 = nu [ (nu-1)/(nu-2) sf_{nu-2}(t sqrt((nu-2)/nu)) - sf_nu(t) ]``
    (from ``x^2 = nu((1 + x^2/nu) - 1)`` and the change of variable that turns the first term
    into a t density with ``nu - 2`` degrees of freedom). Both survival functions are
    regularised incomplete betas at the same point ``nu / (nu + t^2)``.
    """

    name = "student_t"
    label = "Student-t"
    shape_names = ("nu",)
    param_names = ("nu", "scale")
    scipy_name = "t"

    def __init__(self, nu=5.0, scale=1.0):
        nu = _check_positive("nu", nu)
        if nu <= 2:
            raise ValueError(f"Student-t needs nu > 2 for a finite variance (clipping MSE is "
                             f"infinite otherwise), got nu={nu}")
        self.shape = (nu,)
        self.scale = _check_positive("scale", scale, allow_array=True)

    @staticmethod
    def _pdf(x, nu):
        return math.exp(_t_log_const(nu)) * (1 + np.square(x) / nu) ** (-(nu + 1) / 2)

    @staticmethod
    def _tail_moment(k, t, nu):
        t = np.asarray(t, dtype=np.float64)
        if k == 1:
            return math.exp(_t_log_const(nu)) * nu / (nu - 1) * (1 + t * t / nu) ** (-(nu - 1) / 2)
        z = nu / (nu + t * t)
        betainc = _special().betainc
        sf = 0.5 * betainc(nu / 2, 0.5, z)
        if k == 0:
            return sf
        return nu * ((nu - 1) / (nu - 2) * 0.5 * betainc(nu / 2 - 1, 0.5, z) - sf)

    @staticmethod
    def _tail_moments(t, nu):
        """``(U_0, U_1, U_2)`` with one incomplete beta: with ``a = nu/2``, ``z = nu/(nu + t^2)``,
        ``I_z(a - 1, 1/2) = I_z(a, 1/2) + z^(a-1) (1 - z)^(1/2) / ((a - 1) B(a - 1, 1/2))``
        (DLMF 8.17.20), two positive terms, so nothing cancels."""
        a = nu / 2
        z = nu / (nu + t * t)
        sf = 0.5 * _special().betainc(a, 0.5, z)
        log_b = math.lgamma(a - 1) + math.lgamma(0.5) - math.lgamma(a - 0.5)
        extra = np.exp((a - 1) * np.log(z) + 0.5 * np.log1p(-z) - math.log(a - 1) - log_b)
        sf2 = sf + 0.5 * extra  # sf_{nu-2}(t sqrt((nu-2)/nu))
        u1 = math.exp(_t_log_const(nu)) * nu / (nu - 1) * (1 + t * t / nu) ** (-(nu - 1) / 2)
        return sf, u1, nu * ((nu - 1) / (nu - 2) * sf2 - sf)

    @staticmethod
    def _variance(nu):
        return nu / (nu - 2)

    @staticmethod
    def _excess_kurtosis(nu):
        return 6 / (nu - 4) if nu > 4 else math.inf

    @staticmethod
    def _entropy(nu):
        sc = _special()
        return float((nu + 1) / 2 * (sc.digamma((nu + 1) / 2) - sc.digamma(nu / 2))
                     + 0.5 * math.log(nu) + sc.betaln(nu / 2, 0.5))

    @staticmethod
    def _cube_root_integral(nu):
        # c^(1/3) int (1 + x^2/nu)^(-(nu+1)/6) dx = c^(1/3) sqrt(nu) B(1/2, (nu-2)/6)
        return math.exp(_t_log_const(nu) / 3 + 0.5 * math.log(nu)
                        + float(_special().betaln(0.5, (nu - 2) / 6)))

    @classmethod
    def _pdf_sym(cls, x, nu):
        return _t_const_sym(nu) * (1 + x**2 / nu) ** (-(nu + 1) / 2)

    @classmethod
    def _tail_moment_sym(cls, k, t, nu):
        import sympy as sp

        if k == 0:
            return _t_sf_sym(nu, t)
        if k == 1:
            return _t_const_sym(nu) * nu / (nu - 1) * (1 + t**2 / nu) ** (-(nu - 1) / 2)
        return nu * ((nu - 1) / (nu - 2) * _t_sf_sym(nu - 2, t * sp.sqrt((nu - 2) / nu))
                     - _t_sf_sym(nu, t))

    @classmethod
    def _variance_sym(cls, nu):
        return nu / (nu - 2)

    @classmethod
    def _excess_kurtosis_sym(cls, nu):
        import sympy as sp

        return sp.Piecewise((6 / (nu - 4), nu > 4), (sp.oo, True))

    @classmethod
    def _entropy_sym(cls, nu):
        import sympy as sp

        return ((nu + 1) / 2 * (sp.digamma((nu + 1) / 2) - sp.digamma(nu / 2))
                + sp.log(sp.sqrt(nu) * sp.beta(nu / 2, sp.S.Half)))

    @classmethod
    def _fit(cls, y, fix_loc):
        import scipy.stats

        # Start Nelder-Mead at the moment match (excess kurtosis 6 / (nu - 4)): same optimum,
        # about half the likelihood evaluations.
        k = float(scipy.stats.kurtosis(y))
        nu0 = 4.0 + 6.0 / k if k > 0.06 else 100.0
        s0 = float(np.std(y)) * math.sqrt((nu0 - 2.0) / nu0)
        kw = {"floc": 0.0} if fix_loc else {"loc": float(np.median(y))}
        nu, loc, scale = scipy.stats.t.fit(y, nu0, scale=s0, **kw)
        return (nu,), loc, scale

    @staticmethod
    def _cube_root_density(nu):
        # f^(1/3) ~ (1 + x^2/nu)^(-(nu+1)/6): a t with (nu - 2)/3 degrees of freedom
        import scipy.stats

        nu3 = (nu - 2.0) / 3.0
        return scipy.stats.t(nu3, 0.0, math.sqrt(nu / nu3))

    @property
    def nu(self) -> float:
        return self.shape[0]


FAMILIES: dict[str, type[Distribution]] = {
    c.name: c for c in (Gaussian, Laplace, Lognormal, GeneralizedGaussian, StudentT)
}
_ALIASES = {"normal": "gaussian", "norm": "gaussian", "generalized_gaussian": "gennorm",
            "t": "student_t", "studentt": "student_t", "lognorm": "lognormal"}


def family(name: str) -> type[Distribution]:
    """The family class called ``name`` (a clear ValueError for an unknown one)."""
    if isinstance(name, type) and issubclass(name, Distribution):
        return name
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in FAMILIES:
        raise ValueError(f"unknown family {name!r} (not a distribution family); known: "
                         f"{', '.join(FAMILIES)}")
    return FAMILIES[key]
