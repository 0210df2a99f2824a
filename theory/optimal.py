"""MSE-optimal clipping: alpha*, OCTAV, ACIQ's per-channel bit allocation and bias correction.

``optimal_alpha`` solves ``d MSE / d alpha = 0`` on unit scale and multiplies by the scale, so
``alpha*(c X) = c alpha*(X)`` holds by construction. The derivative comes from the same
partial moments as the MSE: for the ``aciq`` grid it is ``-4 (U_1(a) - a U_0(a)) + 2a / (3 4^M)``,
the derivative of the symbolic ACIQ MSE (``theory.mse.aciq_mse_expr``; the ``U_k'`` terms cancel,
and tests/test_theory_distributions.py checks this form against ``sympy.diff`` of it for every
family); for the exact grids it is Leibniz's rule over the cells (``theory.mse.mse_derivative``).
The root is bracketed by a scan of the MSE on a log grid (over the family's ``_alpha_range``
where it gives one: a lognormal's optimum is near 1 for sigma = 1e-6 and near exp(2 sigma^2) for
sigma = 17, far from any multiple of its std; else 1e-2 to 1e6 std) and refined with Brent's method
(:func:`_brentq`, here so that the first call does not import ``scipy.optimize``, 0.3 s); where
the derivative has no sign change in the bracket (approximate MSE) a bounded Brent minimisation
(``scipy.optimize.minimize_scalar``) is used instead.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .distributions import Distribution
from .grids import Grid, check_bits
from .mse import _check_pair, _parts, expected_mse, mse_derivative, positive_cells

__all__ = ["optimal_alpha", "optimal_mse", "octav_alpha", "octav_objective",
           "allocate_bits", "bias_correct"]


def aciq_mse_derivative(dist: Distribution, t, bits: int):
    """``d/dalpha`` of the unit-scale ACIQ MSE ``2 (U_2 - 2a U_1 + a^2 U_0) + a^2 / (3 4^M)`` at
    ``a = t``: ``-4 (U_1(t) - t U_0(t)) + 2 t / (3 4^M)`` (``U_k' = -t^k f`` cancel)."""
    t = np.asarray(t, dtype=np.float64)
    return -4.0 * (dist.tail_moment(1, t) - t * dist.tail_moment(0, t)) + 2.0 * t / (3.0 * 4.0**bits)


def _brentq(f, a: float, b: float, xtol: float, rtol: float, maxiter: int = 200) -> float:
    """Root of ``f`` in ``[a, b]`` (``f(a) f(b) < 0``) by Brent's method (Brent 1973, ch. 4):
    inverse quadratic interpolation or secant steps, each accepted only if it stays well inside
    the bracket and shrinks fast enough, else bisection; stops when the bracket is below
    ``xtol + rtol |x|``."""
    fa, fb = f(a), f(b)
    if fa * fb > 0:
        raise ValueError(f"f(a) and f(b) must have opposite signs, got {fa} and {fb}")
    c, fc = a, fa
    d = e = b - a
    for _ in range(maxiter):
        if fb * fc > 0:  # keep the root between b and c
            c, fc = a, fa
            d = e = b - a
        if abs(fc) < abs(fb):  # b is the best estimate
            a, fa, b, fb, c, fc = b, fb, c, fc, b, fb
        tol = 0.5 * (xtol + rtol * abs(b))
        m = 0.5 * (c - b)
        if abs(m) <= tol or fb == 0:
            return b
        if abs(e) >= tol and abs(fa) > abs(fb):
            s = fb / fa
            if a == c:  # two points: secant
                p, q = 2.0 * m * s, 1.0 - s
            else:  # three points: inverse quadratic interpolation
                q, r = fa / fc, fb / fc
                p = s * (2.0 * m * q * (q - r) - (b - a) * (r - 1.0))
                q = (q - 1.0) * (r - 1.0) * (s - 1.0)
            if p > 0:
                q = -q
            else:
                p = -p
            if 2.0 * p < min(3.0 * m * q - abs(tol * q), abs(e * q)):
                e, d = d, p / q
            else:
                d = e = m
        else:
            d = e = m
        a, fa = b, fb
        b += d if abs(d) > tol else (tol if m > 0 else -tol)
        fb = f(b)
    raise RuntimeError(f"Brent's method did not converge in {maxiter} iterations")


def _unit(dist: Distribution) -> Distribution:
    return dist.with_scale(1.0)


def _unit_std(dist: Distribution) -> float:
    v = float(np.asarray(_unit(dist).variance))
    return math.sqrt(v) if math.isfinite(v) and v > 0 else 1.0


def _log_grid(lo: float, hi: float) -> np.ndarray:
    """Scan points from lo to hi, 241 or one every 5% (a wide lognormal spans e^-140..e^700)."""
    n = int(min(max(241, math.ceil((math.log(hi) - math.log(lo)) / 0.05)), 20_000))
    return np.geomspace(lo, hi, n)


@functools.cache
def _unit_optimal_alpha(cls, shape: tuple, bits: int, grid: Grid, exact: bool) -> float:
    d = cls.__new__(cls)
    d.scale, d.shape = 1.0, shape
    std = _unit_std(d)

    def mse(t):  # inf where the MSE exceeds float64: a scan only compares values
        c, r = _parts(d, t, bits, grid, exact, finite=False)
        return np.asarray(c + r, dtype=np.float64)

    if grid is Grid.ACIQ:
        def deriv(t):
            return float(aciq_mse_derivative(d, t, bits))
    elif exact:
        def deriv(t):
            return float(mse_derivative(d, t, bits, grid))
    else:
        deriv = None

    # Families whose optimum lies far from a multiple of the std (the lognormal: near 1 for a
    # tiny sigma, near exp(2 sigma^2) for a wide one) say where to scan; others scan from the std.
    scan = getattr(cls, "_alpha_range", None)
    lo, hi = scan(*shape) if scan is not None else (1e-2 * std, 1e6 * std)
    n_pos = positive_cells(grid, bits)[0].size if grid is not Grid.ACIQ else 0
    ts = vals = None
    if n_pos > 256 and exact:
        # Fine grids: the exact optimum usually lies near the cheap high-resolution one; scan
        # around it.
        try:
            centre = _unit_optimal_alpha(cls, shape, bits, grid, False)
            ts = np.geomspace(centre / 2, centre * 2, 48)
            vals = mse(ts)
        except RuntimeError:  # the model has no optimum in the range (a lognormal, sigma ~ 17)
            pass
        if vals is None or int(np.nanargmin(vals)) in (0, ts.size - 1):
            # Heavy tails (a lognormal with sigma >= 3) mislead the high-resolution model: the
            # real grid rounds most values to 0 and its optimum lies orders of magnitude higher.
            # Scan the family's whole range coarsely (a point per factor e, at most 256), then
            # around the best point.
            n = int(min(max(64, math.ceil(math.log(hi) - math.log(lo))), 256))
            coarse = np.geomspace(lo, hi, n)
            j = int(np.nanargmin(mse(coarse)))
            ts = np.geomspace(coarse[max(j - 1, 0)], coarse[min(j + 1, n - 1)], 48)
            vals = mse(ts)
    else:
        ts = _log_grid(lo, hi)
        vals = mse(ts)
    i = int(np.nanargmin(vals))
    if i in (0, ts.size - 1):
        raise RuntimeError(f"optimal alpha for {cls.name}{shape} at {bits} bits on {grid.value!r} "
                           f"lies outside the scanned range [{ts[0]:.3g}, {ts[-1]:.3g}] x scale")
    a, b = ts[i - 1], ts[i + 1]
    if deriv is not None:
        da, db = deriv(a), deriv(b)
        if da < 0 < db:
            return _brentq(deriv, a, b, xtol=1e-15 * b, rtol=4 * np.finfo(float).eps, maxiter=200)
    from scipy import optimize

    res = optimize.minimize_scalar(lambda t: float(mse(t)), bounds=(a, b), method="bounded",
                                   options={"xatol": 1e-12 * b, "maxiter": 500})
    return float(res.x)


def optimal_alpha(dist: Distribution, bits: int, grid: Grid | str = "int", exact: bool = True):
    """MSE-optimal clipping threshold ``alpha*`` in data units.

    For ``aciq`` this is ACIQ's alpha* (Banner et al., NeurIPS 2019, Table 1): for Laplace(b)
    ``alpha* = b W(3 4^M)`` (Lambert W; see ``theory.derivations.laplace_aciq``), for a Gaussian
    the root of ``2 alpha/(3 4^M) = 4 (phi(alpha) - alpha Q(alpha))`` (sigma = 1). For the exact
    grids it minimises the MSE integrated over the real levels (``exact=False``: the
    high-resolution approximation).

    Vectorised over ``dist.scale``; shape parameters must be scalars.

    Examples
    --------
    >>> from theory import Laplace, Gaussian, optimal_alpha
    >>> round(optimal_alpha(Laplace(1.0), 4, grid="aciq"), 2)
    5.03
    >>> round(optimal_alpha(Gaussian(2.0), 4, grid="aciq") / 2.0, 2)
    2.55
    """
    g = _check_pair(dist, grid)
    m = check_bits(bits, g)
    t = _unit_optimal_alpha(type(dist), tuple(float(s) for s in dist.shape), m, g,
                            bool(exact) or g is Grid.ACIQ)
    out = t * np.asarray(dist.scale, dtype=np.float64)
    return float(out) if out.ndim == 0 else out


def optimal_mse(dist: Distribution, bits: int, grid: Grid | str = "int", exact: bool = True):
    """``MSE* = expected_mse(dist, optimal_alpha(dist, bits, grid), bits, grid)``."""
    a = optimal_alpha(dist, bits, grid, exact)
    return expected_mse(dist, a, bits, grid, exact=exact)


def octav_objective(dist: Distribution, alpha, bits: int):
    """OCTAV's MSE model (Sakr et al., ICML 2022, eq. 3), two-sided:

    ``J(alpha) = 4^-M / 3 alpha^2 P(|X| <= alpha) + E[(|X| - alpha)^2 1{|X| > alpha}]``.

    It differs from the ``aciq`` grid's model by the in-range probability on the noise term.
    """
    m = check_bits(bits)
    if dist.one_sided:
        raise ValueError("OCTAV here is the two-sided (symmetric) form; got a one-sided family")
    a = np.asarray(alpha, dtype=np.float64)
    scale = np.asarray(dist.scale, dtype=np.float64)
    t = a / scale
    u0, u1, u2 = (dist.tail_moment(k, t) for k in range(3))
    p_out = 2 * u0
    clip = 2 * (u2 - 2 * t * u1 + t**2 * u0)
    return (4.0**-m / 3.0 * t**2 * (1 - p_out) + clip) * scale**2


def octav_alpha(dist: Distribution, bits: int, alpha0: float | None = None, tol: float = 1e-12,
                max_iter: int = 10_000) -> float:
    """OCTAV fixed point (Sakr et al., ICML 2022, eq. 5) on a distribution:

    ``alpha_{n+1} = E[|X| 1{|X|>alpha_n}] / (4^-M/3 P(|X|<=alpha_n) + P(|X|>alpha_n))``.

    The recursion is a Newton-style step on ``J'(alpha) = 0`` that holds the in-range probability
    fixed, so its fixed point is not exactly the minimiser of :func:`octav_objective`: for a
    Gaussian they differ by 3% at M = 2, 0.4% at M = 4 and 4e-5 at M = 8, converging as M grows.
    """
    m = check_bits(bits)
    if dist.one_sided:
        raise ValueError("OCTAV here is the two-sided (symmetric) form; got a one-sided family")
    if np.ndim(dist.scale):
        return np.array([octav_alpha(dist[i], m, alpha0, tol, max_iter)
                         for i in np.ndindex(np.shape(dist.scale))]).reshape(np.shape(dist.scale))
    scale = float(dist.scale)
    u = dist.with_scale(1.0)
    t = (alpha0 / scale) if alpha0 else 3.0 * _unit_std(u)
    c = 4.0**-m / 3.0
    for _ in range(max_iter):
        p_out = 2 * float(u.tail_moment(0, t))
        e_abs_out = 2 * float(u.tail_moment(1, t))
        t_new = e_abs_out / (c * (1 - p_out) + p_out)
        if abs(t_new - t) <= tol * t:
            return t_new * scale
        t = t_new
    raise RuntimeError(f"OCTAV did not converge in {max_iter} iterations (last alpha {t * scale})")


def allocate_bits(alphas, budget: float, integer: bool = False) -> np.ndarray:
    """ACIQ per-channel bit allocation (Banner et al., NeurIPS 2019, Sec. 4).

    Minimising ``sum_i alpha_i^2 / (3 4^{M_i})`` subject to a total number of levels
    ``sum_i 2^{M_i} = budget`` gives ``2^{M_i} = budget * alpha_i^{2/3} / sum_j alpha_j^{2/3}``.

    Parameters
    ----------
    alphas : array
        Per-channel clipping thresholds (> 0).
    budget : float
        Total number of quantization levels over all channels (``len(alphas) * 2^M`` for an
        average of M bits).
    integer : bool
        Round to whole bits, greedily, keeping ``sum 2^{M_i} <= budget``.
    """
    a = np.asarray(alphas, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError("alphas must be a non-empty 1-d array")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError("alphas must be positive and finite")
    if not (math.isfinite(budget) and budget >= a.size):
        raise ValueError(f"budget must be at least one level per channel ({a.size}), got {budget}")
    w = a ** (2.0 / 3.0)
    bits = np.log2(budget * w / w.sum())
    if not integer:
        return bits
    mb = np.maximum(np.floor(bits), 0).astype(int)
    left = budget - np.sum(2.0**mb)
    # Greedy: give one more bit where it removes the most noise per level spent.
    gain = a**2 * (4.0**-mb - 4.0 ** -(mb + 1)) / 2.0**mb
    for i in np.argsort(-gain):
        if 2.0 ** mb[i] <= left:
            left -= 2.0 ** mb[i]
            mb[i] += 1
    return mb


def bias_correct(w, w_q, axis: int | None = -1) -> np.ndarray:
    """ACIQ bias correction of quantized weights (Banner et al., NeurIPS 2019, Sec. 5).

    Quantization shifts each channel's mean and shrinks its spread. The correction restores both:
    ``w_c = E[W_c] + xi_c (W^q_c - E[W^q_c])``, ``xi_c = ||W_c - E W_c|| / ||W^q_c - E W^q_c||``.
    (The paper writes ``xi_c (W^q_c + mu_c)`` with ``mu_c = E W_c - E W^q_c``; this form keeps the
    mean exactly when xi_c != 1.) ``axis`` is the reduction axis within a channel; ``None``
    treats the whole tensor as one channel.
    """
    w = np.asarray(w, dtype=np.float64)
    w_q = np.asarray(w_q, dtype=np.float64)
    if w.shape != w_q.shape:
        raise ValueError(f"w and w_q must have the same shape, got {w.shape} and {w_q.shape}")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(w_q))):
        raise ValueError("w and w_q must be finite (got NaN or inf)")
    mu = w.mean(axis=axis, keepdims=True)
    mu_q = w_q.mean(axis=axis, keepdims=True)
    dev_q = w_q - mu_q
    nq = np.sqrt((dev_q**2).sum(axis=axis, keepdims=True))
    n = np.sqrt(((w - mu) ** 2).sum(axis=axis, keepdims=True))
    xi = np.divide(n, nq, out=np.ones_like(n), where=nq > 0)
    return mu + xi * dev_q
