"""The sympy side of ``theory``: symbols, special functions and lambdify, imported on demand.

``import theory`` does not import sympy (it takes about 0.2 s, and the numeric path never needs
it). Everything that builds a sympy expression imports this module, or sympy itself, inside the
function that needs it: a derivation, its LaTeX, any ``*_expr``, and the tests that compare the
hand-written numeric forms of :mod:`theory.distributions` with ``lambdify`` of these expressions.
"""

from __future__ import annotations

import functools

import sympy as sp

__all__ = ["X", "T", "RegIncBeta", "LAMBDIFY_MODULES", "lambdify", "shape_symbol", "tail_form"]

#: the variable of a unit-scale density
X = sp.Symbol("x", real=True)
#: the lower limit of an upper partial moment, ``t >= 0``
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


def _betainc(a, b, x):
    from scipy.special import betainc

    return betainc(a, b, x)


LAMBDIFY_MODULES = [{"RegIncBeta": _betainc}, "scipy", "numpy"]


def lambdify(args, expr):
    """``sympy.lambdify`` with the modules every expression of ``theory`` needs."""
    return sp.lambdify(args, expr, modules=LAMBDIFY_MODULES)


@functools.cache
def shape_symbol(name: str) -> sp.Symbol:
    """The (positive) sympy symbol of a shape parameter; equal symbols for equal names."""
    return sp.Symbol(name, positive=True)


def tail_form(expr: sp.Expr) -> sp.Expr:
    """Write a tail integral with erfc instead of ``1/2 - erf/2``.

    sympy returns Gaussian tails as ``1/2 - erf(t/sqrt 2)/2``, which cancels to 0 in floating
    point beyond t ~ 8; ``erfc`` keeps full relative precision far into the tail.
    """
    if isinstance(expr, sp.Integral) or expr.has(sp.Integral):
        raise RuntimeError(f"sympy could not integrate the tail moment: {expr}")
    return sp.simplify(expr.rewrite(sp.erfc))
