"""Distribution families for clipping analysis, each defined once, symbolically.

In the manner of ``scipy.stats``, a family is a small class that fills in a few symbolic hooks on
the *unit-scale* form of its density; everything numeric (fast tail moments, variance, kurtosis,
entropy for any scale) is derived from those hooks by the shared base class with
:func:`sympy.lambdify`, so the expression a test checks is the one the numeric code runs.

Hooks (all on unit scale, in the symbol ``x`` or ``t`` and the family's shape symbols):

``_pdf(x)``
    density.
``_tail_moment(k, t)``
    upper partial moment ``U_k(t) = int_t^inf x^k f(x) dx`` for ``k = 0, 1, 2`` and ``t >= 0``.
    Quantizer MSE is a sum of these over cells (``theory.mse``). Gaussian and Laplace let sympy
    integrate the density; the other families give closed forms (incomplete gamma, regularised
    incomplete beta, erfc) that the tests check by differentiation and by quadrature.
``_variance()``, ``_excess_kurtosis()``, ``_entropy()``
    on unit scale; scaling by ``s`` multiplies variance by ``s^2`` and adds ``ln s`` to entropy.

Two-sided families are symmetric about 0 (data is centred before fitting). ``Lognormal`` is
one-sided: support ``x > 0``, for magnitudes and post-activation values; its scale is ``exp(mu)``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, ClassVar

import numpy as np
import scipy.stats as st
import sympy as sp

__all__ = [
    "Distribution",
    "Gaussian",
    "Laplace",
    "Lognormal",
    "GeneralizedGaussian",
    "StudentT",
    "FAMILIES",
    "family",
]

X = sp.Symbol("x", real=True)
T = sp.Symbol("t", nonnegative=True)

class RegIncBeta(sp.Function):
    """Regularised incomplete beta ``I_x(a, b)``, printed as ``scipy.special.betainc``.

    sympy's own ``betainc_regularized(a, b, 0, x)`` is lambdified to ``betainc(a,b,x) -
    betainc(a,b,0)`` without parentheses, which is wrong inside a product; this one-argument
    form avoids that and still differentiates symbolically in ``x``.
    """

    nargs = 3

    def fdiff(self, argindex=3):
        a, b, x = self.args
        if argindex == 3:
            return x ** (a - 1) * (1 - x) ** (b - 1) / sp.beta(a, b)
        raise sp.ArgumentIndexError(self, argindex)

    def _latex(self, printer):
        a, b, x = (printer._print(v) for v in self.args)
        return rf"I_{{{x}}}\left({a}, {b}\right)"

    def _eval_evalf(self, prec):
        a, b, x = self.args
        return sp.betainc_regularized(a, b, 0, x)._eval_evalf(prec)


_LAMBDIFY_MODULES = [{"RegIncBeta": __import__("scipy.special", fromlist=["betainc"]).betainc},
                     "scipy", "numpy"]


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


def _tail_form(expr: sp.Expr) -> sp.Expr:
    """Write a tail integral with erfc instead of ``1/2 - erf/2``.

    sympy returns Gaussian tails as ``1/2 - erf(t/sqrt 2)/2``, which cancels to 0 in floating
    point beyond t ~ 8; ``erfc`` keeps full relative precision far into the tail.
    """
    if isinstance(expr, sp.Integral) or expr.has(sp.Integral):
        raise RuntimeError(f"sympy could not integrate the tail moment: {expr}")
    return sp.simplify(expr.rewrite(sp.erfc))


class Distribution:
    """Base class: one family = one subclass filling in the symbolic hooks.

    Instances hold parameter values: ``scale`` (a float or an array, for vectorised
    evaluation over many layers or channels) and the family's shape parameters (floats).
    """

    #: family name used in tables, fits and error messages
    name: ClassVar[str] = "distribution"
    #: True when the support is x > 0
    one_sided: ClassVar[bool] = False
    #: names of shape parameters, in the order the hooks take them
    shape_names: ClassVar[tuple[str, ...]] = ()
    #: sympy symbols of the shape parameters
    shape_symbols: ClassVar[tuple[sp.Symbol, ...]] = ()

    scale: float | np.ndarray
    shape: tuple[float, ...]

    # ---- symbolic hooks (unit scale) -------------------------------------------------------
    @classmethod
    def _pdf(cls, x: sp.Symbol) -> sp.Expr:
        raise NotImplementedError

    @classmethod
    def _tail_moment(cls, k: int, t: sp.Symbol) -> sp.Expr:
        """Default: let sympy integrate the density (fast for Gaussian and Laplace)."""
        return _tail_form(sp.integrate(X**k * cls._pdf(X), (X, t, sp.oo), conds="none"))

    @classmethod
    def _variance(cls) -> sp.Expr:
        raise NotImplementedError

    @classmethod
    def _excess_kurtosis(cls) -> sp.Expr:
        raise NotImplementedError

    @classmethod
    def _entropy(cls) -> sp.Expr:
        raise NotImplementedError

    # ---- symbolic API ----------------------------------------------------------------------
    @classmethod
    @functools.cache
    def pdf_expr(cls) -> sp.Expr:
        """Unit-scale density in ``x`` (sympy)."""
        return cls._pdf(X)

    @classmethod
    @functools.cache
    def tail_moment_expr(cls, k: int) -> sp.Expr:
        """``U_k(t) = int_t^inf x^k f(x) dx`` on unit scale, ``t >= 0`` (sympy)."""
        if k not in (0, 1, 2):
            raise ValueError(f"tail moments are defined for k in 0, 1, 2; got {k}")
        return cls._tail_moment(k, T)

    @classmethod
    @functools.cache
    def variance_expr(cls) -> sp.Expr:
        return sp.sympify(cls._variance())

    @classmethod
    @functools.cache
    def excess_kurtosis_expr(cls) -> sp.Expr:
        return sp.sympify(cls._excess_kurtosis())

    @classmethod
    @functools.cache
    def entropy_expr(cls) -> sp.Expr:
        return sp.sympify(cls._entropy())

    # ---- fast numeric forms, lambdified once per family ---------------------------------------
    @classmethod
    @functools.cache
    def tail_moment_fn(cls, k: int) -> Callable[..., np.ndarray]:
        """Vectorised ``U_k(t, *shape)`` lambdified from :meth:`tail_moment_expr`."""
        return sp.lambdify((T, *cls.shape_symbols), cls.tail_moment_expr(k), modules=_LAMBDIFY_MODULES)

    @classmethod
    @functools.cache
    def pdf_fn(cls) -> Callable[..., np.ndarray]:
        """Vectorised unit-scale density ``f(x, *shape)`` lambdified from :meth:`pdf_expr`."""
        return sp.lambdify((X, *cls.shape_symbols), cls.pdf_expr(), modules=_LAMBDIFY_MODULES)

    @classmethod
    @functools.cache
    def _scalar_fn(cls, what: str) -> Callable[..., float]:
        expr = getattr(cls, f"{what}_expr")()
        return sp.lambdify(cls.shape_symbols, expr, modules=_LAMBDIFY_MODULES)

    # ---- instance API ---------------------------------------------------------------------
    def tail_moment(self, k: int, t) -> np.ndarray:
        """Unit-scale upper partial moment ``U_k`` at ``t`` (array), ``t >= 0``."""
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            out = np.asarray(self.tail_moment_fn(k)(t, *self.shape), dtype=np.float64)
        # Lambdified closed forms can produce nan at t = inf (inf * 0); the tail there is 0.
        return np.where(np.isposinf(t), 0.0, np.broadcast_to(out, np.broadcast(t, out).shape))

    @property
    def variance(self):
        """Variance ``scale^2 * Var_unit`` (inf where the family has none)."""
        return np.asarray(self.scale) ** 2 * float(self._scalar_fn("variance")(*self.shape))

    @property
    def std(self):
        return np.sqrt(self.variance)

    @property
    def excess_kurtosis(self) -> float:
        """Excess kurtosis (scale-free; inf where the fourth moment diverges)."""
        return float(self._scalar_fn("excess_kurtosis")(*self.shape))

    @property
    def entropy(self):
        """Differential entropy in nats: ``h_unit + ln(scale)``."""
        return float(self._scalar_fn("entropy")(*self.shape)) + np.log(self.scale)

    def pdf(self, x) -> np.ndarray:
        """Density at ``x`` (numpy), through scipy's frozen distribution."""
        return self.scipy.pdf(x)

    @property
    def scipy(self):
        """The equivalent frozen ``scipy.stats`` distribution (scalar scale only)."""
        if np.ndim(self.scale):
            raise ValueError("scipy view needs a scalar scale; index the distribution first")
        return self._scipy()

    def _scipy(self):
        raise NotImplementedError

    def with_scale(self, scale) -> "Distribution":
        """Same shape, new scale (for lognormal, scale = exp(mu))."""
        return self._from_scale(_check_positive("scale", scale, allow_array=True))

    def _from_scale(self, scale):
        raise NotImplementedError

    def __getitem__(self, idx) -> "Distribution":
        return self.with_scale(np.asarray(self.scale)[idx])

    @property
    def params(self) -> dict[str, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        return f"{type(self).__name__}({ps})"

    def __eq__(self, other) -> bool:
        return (type(self) is type(other) and self.shape == other.shape
                and np.array_equal(np.asarray(self.scale), np.asarray(other.scale)))

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.shape, np.asarray(self.scale).tobytes()))


def _fmt(v) -> str:
    return repr(float(v)) if np.ndim(v) == 0 else f"array(shape={np.shape(v)})"


class Gaussian(Distribution):
    """Normal distribution N(0, sigma^2)."""

    name = "gaussian"

    def __init__(self, sigma=1.0):
        self.scale = _check_positive("sigma", sigma, allow_array=True)
        self.shape = ()

    @classmethod
    def _pdf(cls, x):
        return sp.exp(-x**2 / 2) / sp.sqrt(2 * sp.pi)

    @classmethod
    def _variance(cls):
        return sp.Integer(1)

    @classmethod
    def _excess_kurtosis(cls):
        return sp.Integer(0)

    @classmethod
    def _entropy(cls):
        return sp.log(2 * sp.pi * sp.E) / 2

    def _scipy(self):
        return st.norm(0.0, self.scale)

    def _from_scale(self, scale):
        return Gaussian(scale)

    @property
    def sigma(self):
        return self.scale

    @property
    def params(self):
        return {"sigma": self.scale}


class Laplace(Distribution):
    """Laplace distribution with density exp(-|x|/b) / (2b)."""

    name = "laplace"

    def __init__(self, b=1.0):
        self.scale = _check_positive("b", b, allow_array=True)
        self.shape = ()

    @classmethod
    def _pdf(cls, x):
        return sp.exp(-sp.Abs(x)) / 2

    @classmethod
    def _tail_moment(cls, k, t):
        # For t >= 0 only the positive branch matters; integrate it without Abs so sympy is quick.
        return _tail_form(sp.integrate(X**k * sp.exp(-X) / 2, (X, t, sp.oo), conds="none"))

    @classmethod
    def _variance(cls):
        return sp.Integer(2)

    @classmethod
    def _excess_kurtosis(cls):
        return sp.Integer(3)

    @classmethod
    def _entropy(cls):
        return 1 + sp.log(2)

    def _scipy(self):
        return st.laplace(0.0, self.scale)

    def _from_scale(self, scale):
        return Laplace(scale)

    @property
    def b(self):
        return self.scale

    @property
    def params(self):
        return {"b": self.scale}


_LN_SIGMA = sp.Symbol("sigma", positive=True)


class Lognormal(Distribution):
    """Lognormal: ln X ~ N(mu, sigma^2), support x > 0 (one-sided).

    Unit scale means ``mu = 0``; ``scale = exp(mu)``, ``sigma`` is the shape.
    Tail moments: ``U_k(t) = exp(k^2 sigma^2 / 2) * Phi_c((ln t - k sigma^2) / sigma)``.
    """

    name = "lognormal"
    one_sided = True
    shape_names = ("sigma",)
    shape_symbols = (_LN_SIGMA,)

    def __init__(self, mu=0.0, sigma=1.0):
        mu_arr = np.asarray(mu, dtype=np.float64)
        if mu_arr.size == 0 or not np.all(np.isfinite(mu_arr)):
            raise ValueError(f"mu must be finite (got {mu!r})")
        if not (np.all(mu_arr < 700)):
            raise ValueError(f"mu={mu!r} overflows exp(mu)")
        self.scale = np.exp(mu_arr) if mu_arr.ndim else float(np.exp(mu_arr))
        self.shape = (_check_positive("sigma", sigma),)

    @classmethod
    def _pdf(cls, x):
        s = _LN_SIGMA
        return sp.exp(-sp.log(x) ** 2 / (2 * s**2)) / (x * s * sp.sqrt(2 * sp.pi))

    @classmethod
    def _tail_moment(cls, k, t):
        s = _LN_SIGMA
        return sp.exp(k**2 * s**2 / 2) * sp.erfc((sp.log(t) - k * s**2) / (s * sp.sqrt(2))) / 2

    @classmethod
    def _variance(cls):
        s = _LN_SIGMA
        return (sp.exp(s**2) - 1) * sp.exp(s**2)

    @classmethod
    def _excess_kurtosis(cls):
        s = _LN_SIGMA
        return sp.exp(4 * s**2) + 2 * sp.exp(3 * s**2) + 3 * sp.exp(2 * s**2) - 6

    @classmethod
    def _entropy(cls):
        s = _LN_SIGMA
        return sp.Rational(1, 2) + sp.log(s * sp.sqrt(2 * sp.pi))

    def tail_moment(self, k, t):
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(divide="ignore"):  # log(0) = -inf gives erfc(-inf) = 2: the full moment
            return super().tail_moment(k, t)

    def _scipy(self):
        return st.lognorm(self.shape[0], loc=0.0, scale=self.scale)

    def _from_scale(self, scale):
        return Lognormal(np.log(scale), self.shape[0])

    @property
    def mu(self):
        return np.log(self.scale)

    @property
    def sigma(self) -> float:
        return self.shape[0]

    @property
    def params(self):
        return {"mu": self.mu, "sigma": self.sigma}


_GG_BETA = sp.Symbol("beta", positive=True)


class GeneralizedGaussian(Distribution):
    """Generalized Gaussian: density beta / (2 s Gamma(1/beta)) exp(-|x/s|^beta).

    beta = 2 is Gaussian with sigma = s / sqrt(2); beta = 1 is Laplace with b = s; beta < 1 has
    heavier tails. Same parametrisation as ``scipy.stats.gennorm``.
    Tail moments: ``U_k(t) = Gamma((k+1)/beta, t^beta) / (2 Gamma(1/beta))``.
    """

    name = "gennorm"
    shape_names = ("beta",)
    shape_symbols = (_GG_BETA,)

    def __init__(self, beta=2.0, scale=1.0):
        self.shape = (_check_positive("beta", beta),)
        self.scale = _check_positive("scale", scale, allow_array=True)

    @classmethod
    def _pdf(cls, x):
        b = _GG_BETA
        return b / (2 * sp.gamma(1 / b)) * sp.exp(-sp.Abs(x) ** b)

    @classmethod
    def _tail_moment(cls, k, t):
        b = _GG_BETA
        return sp.uppergamma(sp.Integer(k + 1) / b, t**b) / (2 * sp.gamma(1 / b))

    @classmethod
    def _variance(cls):
        b = _GG_BETA
        return sp.gamma(3 / b) / sp.gamma(1 / b)

    @classmethod
    def _excess_kurtosis(cls):
        b = _GG_BETA
        return sp.gamma(5 / b) * sp.gamma(1 / b) / sp.gamma(3 / b) ** 2 - 3

    @classmethod
    def _entropy(cls):
        b = _GG_BETA
        return 1 / b - sp.log(b / (2 * sp.gamma(1 / b)))

    def _scipy(self):
        return st.gennorm(self.shape[0], loc=0.0, scale=self.scale)

    def _from_scale(self, scale):
        return GeneralizedGaussian(self.shape[0], scale)

    @property
    def beta(self) -> float:
        return self.shape[0]

    @property
    def params(self):
        return {"beta": self.beta, "scale": self.scale}


_T_NU = sp.Symbol("nu", positive=True)


def _t_sf(nu, t):
    """Student-t survival function for t >= 0 as a regularised incomplete beta."""
    return RegIncBeta(nu / 2, sp.S.Half, nu / (nu + t**2)) / 2


def _t_const(nu):
    # Gamma ratio through loggamma: Gamma(nu/2) alone overflows float64 beyond nu ~ 340.
    return sp.exp(sp.loggamma((nu + 1) / 2) - sp.loggamma(nu / 2)) / sp.sqrt(nu * sp.pi)


class StudentT(Distribution):
    """Student-t with ``nu > 2`` degrees of freedom (finite variance) and a scale.

    Tail moments on unit scale, ``t >= 0``, with ``c_nu`` the density's constant:
    ``U_0 = sf_nu(t)``,
    ``U_1 = c_nu nu/(nu-1) (1 + t^2/nu)^(-(nu-1)/2)``,
    ``U_2 = nu [ (nu-1)/(nu-2) sf_{nu-2}(t sqrt((nu-2)/nu)) - sf_nu(t) ]``
    (from ``x^2 = nu((1 + x^2/nu) - 1)`` and the change of variable that turns the first term
    into a t density with ``nu - 2`` degrees of freedom).
    """

    name = "student_t"
    shape_names = ("nu",)
    shape_symbols = (_T_NU,)

    def __init__(self, nu=5.0, scale=1.0):
        nu = _check_positive("nu", nu)
        if nu <= 2:
            raise ValueError(f"Student-t needs nu > 2 for a finite variance (clipping MSE is "
                             f"infinite otherwise), got nu={nu}")
        self.shape = (nu,)
        self.scale = _check_positive("scale", scale, allow_array=True)

    @classmethod
    def _pdf(cls, x):
        nu = _T_NU
        return _t_const(nu) * (1 + x**2 / nu) ** (-(nu + 1) / 2)

    @classmethod
    def _tail_moment(cls, k, t):
        nu = _T_NU
        if k == 0:
            return _t_sf(nu, t)
        if k == 1:
            return _t_const(nu) * nu / (nu - 1) * (1 + t**2 / nu) ** (-(nu - 1) / 2)
        return nu * ((nu - 1) / (nu - 2) * _t_sf(nu - 2, t * sp.sqrt((nu - 2) / nu)) - _t_sf(nu, t))

    @classmethod
    def _variance(cls):
        nu = _T_NU
        return nu / (nu - 2)

    @classmethod
    def _excess_kurtosis(cls):
        nu = _T_NU
        return sp.Piecewise((6 / (nu - 4), nu > 4), (sp.oo, True))

    @classmethod
    def _entropy(cls):
        nu = _T_NU
        return ((nu + 1) / 2 * (sp.digamma((nu + 1) / 2) - sp.digamma(nu / 2))
                + sp.log(sp.sqrt(nu) * sp.beta(nu / 2, sp.S.Half)))

    def _scipy(self):
        return st.t(self.shape[0], loc=0.0, scale=self.scale)

    def _from_scale(self, scale):
        return StudentT(self.shape[0], scale)

    @property
    def nu(self) -> float:
        return self.shape[0]

    @property
    def params(self):
        return {"nu": self.nu, "scale": self.scale}


FAMILIES: dict[str, type[Distribution]] = {
    c.name: c for c in (Gaussian, Laplace, Lognormal, GeneralizedGaussian, StudentT)
}
_ALIASES = {"normal": "gaussian", "norm": "gaussian", "generalized_gaussian": "gennorm",
            "t": "student_t", "studentt": "student_t", "lognorm": "lognormal"}


def family(name: str) -> type[Distribution]:
    """The family class called ``name`` (a clear ValueError for an unknown one)."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in FAMILIES:
        raise ValueError(f"unknown distribution family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[key]
