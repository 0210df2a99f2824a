"""Scale behaviour of theory checked by computations that can fail.

``optimal_alpha`` and ``expected_mse`` solve at unit scale and rescale, so a test that compares
``optimal_alpha(Laplace(c))`` with ``c * optimal_alpha(Laplace(1))`` passes by construction. Here
the MSE at scale ``c`` is integrated directly in data units (scipy quadrature over the int grid's
cells, levels written out from docs/design.md: ``k * alpha / (2^(M-1) - 1)``), and its minimiser is
found by a bounded scalar search: both must agree with theory at every scale from 1e-6 to 1e6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, optimize

from theory import Gaussian, Laplace, expected_mse, optimal_alpha

SCALES = (1e-6, 1e-3, 1.0, 37.0, 1e6)


def quad_mse_int_grid(pdf, alpha: float, bits: int, scale: float) -> float:
    """E[(X - Q(X))^2] for a symmetric density on the int grid, by quadrature in data units."""
    n = 2 ** (bits - 1) - 1
    step = alpha / n
    total = 0.0
    for k in range(n):  # cell of level k*step on the positive side: [(k-1/2) step, (k+1/2) step]
        lo, hi = max(0.0, (k - 0.5) * step), (k + 0.5) * step
        total += integrate.quad(lambda x: (x - k * step) ** 2 * pdf(x), lo, hi, epsabs=0, epsrel=1e-12)[0]
    # the top level alpha takes everything above (n - 1/2) step, clipped values included
    lo = (n - 0.5) * step
    total += integrate.quad(lambda x: (x - alpha) ** 2 * pdf(x), lo, alpha, epsabs=0, epsrel=1e-12)[0]
    # the tail, up to 60 scales beyond alpha (the rest is below 1e-24 of it): a finite interval,
    # since quad's map of [alpha, inf) loses accuracy at large scales
    total += integrate.quad(lambda x: (x - alpha) ** 2 * pdf(x), alpha, alpha + 60 * scale,
                            epsabs=0, epsrel=1e-12, limit=200)[0]
    return 2.0 * total


def _laplace_pdf(b):
    return lambda x: math.exp(-abs(x) / b) / (2 * b)


def _gauss_pdf(s):
    return lambda x: math.exp(-0.5 * (x / s) ** 2) / (s * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("family, pdf", [(Laplace, _laplace_pdf), (Gaussian, _gauss_pdf)])
def test_expected_mse_equals_quadrature_in_data_units(family, pdf, scale):
    d = family(scale)
    for a_unit in (1.5, 3.0, 6.0):
        a = a_unit * scale
        exact = quad_mse_int_grid(pdf(scale), a, 4, scale)
        assert float(expected_mse(d, a, 4, "int")) == pytest.approx(exact, rel=1e-7)


@pytest.mark.parametrize("scale", SCALES)
def test_optimal_alpha_is_the_minimiser_of_the_integrated_mse(scale):
    pdf = _laplace_pdf(scale)
    res = optimize.minimize_scalar(lambda a: quad_mse_int_grid(pdf, a * scale, 4, scale) / scale**2,
                                   bounds=(2.0, 12.0), method="bounded", options={"xatol": 1e-7})
    got = optimal_alpha(Laplace(scale), 4, "int") / scale
    # the MSE is flat at its minimum: the minimiser is known to about sqrt(quadrature error)
    assert got == pytest.approx(res.x, rel=1e-3)
    assert quad_mse_int_grid(pdf, got * scale, 4, scale) <= res.fun * scale**2 * (1 + 1e-9)


def test_the_check_fails_for_a_wrong_scaling():
    """A planted bug (alpha* scaling with sqrt(c) instead of c) is caught by the same comparison."""
    scale = 37.0
    pdf = _laplace_pdf(scale)
    wrong = optimal_alpha(Laplace(1.0), 4, "int") * np.sqrt(scale)
    right = optimal_alpha(Laplace(scale), 4, "int")
    assert quad_mse_int_grid(pdf, wrong, 4, scale) > 1.5 * quad_mse_int_grid(pdf, right, 4, scale)
