"""Every quantizer against level tables typed by hand (docs/design.md, "Quantizer grids").

The tables below are the definition, written out as fractions of alpha for M = 2 and 3. Nothing
on the reference side asks ``theory.grids`` where the levels are (no ``grid_spec``, ``levels`` or
``step_factor``): nearest levels are found by brute force over the table, exactly (fractions),
ties going to the upper level. Checked against them: ``theory.grids.levels``, the numpy
reference ``theory.grids.quantize``, the numba sweep, the torch fake quantizer and theory's
exact MSE.
"""

from __future__ import annotations

from fractions import Fraction as F

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from empirical.fakequant import QuantConfig, _round_to_grid, fake_quantize_weight
from empirical.sweep import mse_sweep, prepare
from theory import Gaussian, Laplace, Lognormal, expected_mse
from theory.grids import levels, quantize

# Levels in units of alpha, from the "Level tables" of docs/design.md.
LEVELS = {
    ("midrise", 2): (F(-3, 4), F(-1, 4), F(1, 4), F(3, 4)),
    ("midrise", 3): (F(-7, 8), F(-5, 8), F(-3, 8), F(-1, 8), F(1, 8), F(3, 8), F(5, 8), F(7, 8)),
    # aciq is the ACIQ noise model; data quantized "on aciq" lands on the midrise levels.
    ("aciq", 2): (F(-3, 4), F(-1, 4), F(1, 4), F(3, 4)),
    ("aciq", 3): (F(-7, 8), F(-5, 8), F(-3, 8), F(-1, 8), F(1, 8), F(3, 8), F(5, 8), F(7, 8)),
    # 2^M levels, the signed M-bit range [-2^(M-1), 2^(M-1) - 1] x step: -alpha is a level,
    # +alpha is not.
    ("midtread", 2): (F(-1), F(-1, 2), F(0), F(1, 2)),
    ("midtread", 3): (F(-1), F(-3, 4), F(-1, 2), F(-1, 4), F(0), F(1, 4), F(1, 2), F(3, 4)),
    # 2^M - 1 levels, symmetric, absmax-style.
    ("int", 2): (F(-1), F(0), F(1)),
    ("int", 3): (F(-1), F(-2, 3), F(-1, 3), F(0), F(1, 3), F(2, 3), F(1)),
    ("uint", 2): (F(0), F(1, 3), F(2, 3), F(1)),
    ("uint", 3): (F(0), F(1, 7), F(2, 7), F(3, 7), F(4, 7), F(5, 7), F(6, 7), F(1)),
}
CASES = sorted(LEVELS)
SIGNED = [c for c in CASES if c[0] != "uint"]

# 21 * 2^e makes every level and every midpoint of the tables an exact float (denominators
# 2, 3, 4, 6, 7, 8, 14, 16 all divide 21 * 2^4), and every grid's float step too, so exact ties
# can be tested there.
ALPHAS = (1e-3, 21 * 2.0**-20, 0.37, 1.0, 21 / 16, 21 * 2.0**6, 1e3)


def _id(case):
    return f"{case[0]}{case[1]}"


def table(grid: str, bits: int, alpha: float) -> list[F]:
    """The hand-table levels times alpha, exactly."""
    return [lv * F(alpha) for lv in LEVELS[(grid, bits)]]


def nearest(x: float, lv: list[F]) -> tuple[F, bool]:
    """Nearest level to ``x`` by brute force (ties up) and whether the choice is clear-cut.

    Not clear-cut: ``x`` within 1e-9 of the level spacing of a midpoint, exact ties included.
    There an implementation's float step (e.g. ``(1/3) * alpha``, one ulp from ``alpha / 3``)
    legitimately decides; ties are checked where the levels are exact floats
    (:func:`test_numpy_quantize_ties_go_up`).
    """
    xf = F(x)
    d = sorted((abs(xf - q), -q) for q in lv)  # equal distance: the larger level first
    (d1, q1), (d2, _) = d[0], d[1]
    spacing = abs(lv[-1] - lv[0]) / (len(lv) - 1)
    return -q1, d2 - d1 > F(1, 10**9) * spacing


def probe_points(grid: str, bits: int, alpha: float, seed: int = 0) -> np.ndarray:
    """Exact levels, midpoints, values beyond the outer levels and a dense random fill."""
    lv = LEVELS[(grid, bits)]
    mids = [(a + b) / 2 for a, b in zip(lv[:-1], lv[1:])]
    special = [float(v * F(alpha)) for v in (*lv, *mids)]
    beyond = [s * alpha for s in (1.0001, 1.3, 2.0, 17.0, 1e6)]
    rng = np.random.default_rng(seed)
    dense = rng.uniform(-1.6, 1.6, 400) * alpha
    pts = np.concatenate([special, beyond, np.negative(beyond), dense, np.linspace(-1.6, 1.6, 257) * alpha])
    return np.abs(pts) if grid == "uint" else pts


def reference(x: np.ndarray, grid: str, bits: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force quantized values of ``x`` and a mask of the clear-cut ones."""
    lv = table(grid, bits, alpha)
    out = [nearest(float(v), lv) for v in x]
    return np.array([float(q) for q, _ in out]), np.array([c for _, c in out])


def nearest_mse(x: np.ndarray, grid: str, bits: int, alpha: float) -> float:
    """Mean squared distance to the nearest table level (ties cannot change it)."""
    lv = np.array([float(v) for v in table(grid, bits, alpha)])
    return float(np.mean(np.min((x[:, None] - lv[None, :]) ** 2, axis=1)))


# ---- (a) theory.grids.levels --------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_levels_equal_the_hand_table(case, alpha):
    grid, bits = case
    want = np.array([float(v) for v in table(grid, bits, alpha)])
    got = levels(grid, alpha, bits)
    assert got.shape == want.shape, (got / alpha, [str(v) for v in LEVELS[case]])
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("bits", range(1, 17))
def test_level_counts_and_outer_levels(bits):
    """The "count" column of docs/design.md for every bit width, and where the range ends."""
    n = 2**bits
    assert len(levels("midrise", 1.0, bits)) == n
    assert len(levels("aciq", 1.0, bits)) == n
    assert len(levels("uint", 1.0, bits)) == n
    mt = levels("midtread", 1.0, bits)
    assert len(mt) == n
    # the signed M-bit range: -alpha is a level, the top one is alpha - 2 alpha / 2^M
    assert mt[0] == -1.0 and mt[-1] == 1.0 - 2.0 / n and 0.0 in mt
    if bits >= 2:
        it = levels("int", 1.0, bits)
        assert len(it) == n - 1 and it[0] == -1.0 and it[-1] == 1.0


# ---- (b) the numpy reference quantizer -----------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_numpy_quantize_rounds_to_the_nearest_table_level(case, alpha):
    grid, bits = case
    x = probe_points(grid, bits, alpha)
    want, clear = reference(x, grid, bits, alpha)
    got = quantize(x, grid, alpha, bits)
    np.testing.assert_allclose(got[clear], want[clear], rtol=1e-14, atol=0)
    assert clear.sum() > 600


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_numpy_quantize_ties_go_up(case):
    grid, bits = case
    lv = LEVELS[case]
    for alpha in (21 * 2.0**-20, 21 / 16, 21 * 2.0**6):
        for lo, hi in zip(lv[:-1], lv[1:]):
            x = (lo + hi) / 2 * F(alpha)
            assert F(float(x)) == x  # an exact tie
            got = float(quantize(float(x), grid, alpha, bits))
            assert got == pytest.approx(float(hi * F(alpha)), rel=1e-14), (grid, bits, alpha, lo, hi)


# ---- (c) the numba sweep ---------------------------------------------------------------------------

def _sweep_ref(x, grid, bits, alpha):
    if grid == "aciq":
        # The ACIQ model (Banner et al. 2019, eq. 5): measured clipping error + alpha^2 / (3 4^M).
        return float(np.mean((x - np.clip(x, -alpha, alpha)) ** 2)) + alpha**2 / (3 * 4**bits)
    return nearest_mse(x, grid, bits, alpha)


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_sweep_mse_is_the_nearest_table_level_mse(case, alpha):
    grid, bits = case
    x = probe_points(grid, bits, alpha, seed=1)
    want = _sweep_ref(x, grid, bits, alpha)
    assert float(mse_sweep(x, alpha, bits, grid)) == pytest.approx(want, rel=1e-10)
    # block 1: every value its own block (the O(1) path); larger blocks straddle thresholds
    for block in (1, 7, 64):
        got = float(prepare(x, block=block).mse(alpha, bits, grid))
        assert got == pytest.approx(want, rel=1e-10), block


@pytest.mark.parametrize("case", SIGNED, ids=_id)
def test_sweep_one_sided_data_and_channels(case):
    """All-positive and all-negative data and mixed rows: midtread treats the two signs apart."""
    grid, bits = case
    alphas = np.array([1e-3, 0.6, 2.0, 1e3])
    x = probe_points(grid, bits, 1.0, seed=2)
    for data in (np.abs(x), -np.abs(x), x):
        got = mse_sweep(data, alphas, bits, grid)
        for k, a in enumerate(alphas):
            assert got[k] == pytest.approx(_sweep_ref(data, grid, bits, a), rel=1e-10), (data[0], a)
    rows = np.stack([np.abs(x), -np.abs(x), x, x[::-1] * 0.5])
    got = mse_sweep(rows, alphas, [bits], grid, axis=0)
    for r in range(rows.shape[0]):
        for k, a in enumerate(alphas):
            assert got[0, k, r] == pytest.approx(_sweep_ref(rows[r], grid, bits, a), rel=1e-10), (r, a)


# ---- (d) the torch fake quantizer ------------------------------------------------------------------

@pytest.mark.parametrize("case", SIGNED, ids=_id)  # weights are signed: QuantConfig refuses uint
@pytest.mark.parametrize("alpha", ALPHAS)
def test_torch_round_to_grid_rounds_to_the_nearest_table_level(case, alpha):
    grid, bits = case
    x = probe_points(grid, bits, alpha, seed=3)
    want, clear = reference(x, grid, bits, alpha)
    cfg = QuantConfig(bits=bits, grid=grid)
    got = _round_to_grid(torch.from_numpy(x)[None, :], torch.tensor([[alpha]], dtype=torch.float64), cfg)
    np.testing.assert_allclose(got[0].numpy()[clear], want[clear], rtol=1e-14, atol=0)


@pytest.mark.parametrize("case", SIGNED, ids=_id)
def test_torch_round_to_grid_ties_go_up(case):
    grid, bits = case
    lv = LEVELS[case]
    cfg = QuantConfig(bits=bits, grid=grid)
    for alpha in (21 * 2.0**-20, 21 / 16, 21 * 2.0**6):
        ties = torch.tensor([float((a + b) / 2 * F(alpha)) for a, b in zip(lv[:-1], lv[1:])],
                            dtype=torch.float64)
        got = _round_to_grid(ties[None, :], torch.tensor([[alpha]], dtype=torch.float64), cfg)[0]
        want = [float(b * F(alpha)) for b in lv[1:]]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-14, atol=0)


def test_fake_quant_absmax_on_midtread_is_int4_style():
    """absmax scale on midtread: the largest positive weight goes to alpha - step, not alpha."""
    w = torch.tensor([[1.0, -0.25, 0.3, -0.9], [-1.0, 0.5, 0.74, 0.76]])
    got = fake_quantize_weight(w, QuantConfig(bits=2, grid="midtread", granularity="channel"))
    # levels -1, -1/2, 0, 1/2 (alpha = 1 in both rows); -0.25 is a tie and goes up to 0
    assert got.tolist() == [[0.5, 0.0, 0.5, -1.0], [-1.0, 0.5, 0.5, 0.5]]


# ---- (e) theory's exact MSE ---------------------------------------------------------------------

_BREAKS = np.concatenate([[0.0], np.geomspace(0.25, 128, 10), -np.geomspace(0.25, 128, 10)])


def _quad(fn, lo, hi):
    """int_lo^hi fn, split at fixed breakpoints so a narrow density is not stepped over."""
    cuts = [lo, *sorted(b for b in _BREAKS if lo < b < hi), hi]
    return sum(integrate.quad(fn, a, b, epsabs=0, epsrel=1e-12, limit=200)[0]
               for a, b in zip(cuts[:-1], cuts[1:]))


def quad_mse(pdf, grid, bits, alpha, lower=-np.inf):
    """sum over table levels q of int_cell (x - q)^2 pdf(x) dx, cells between table midpoints."""
    lv = [float(v) for v in table(grid, bits, alpha)]
    edges = [lower] + [0.5 * (a + b) for a, b in zip(lv[:-1], lv[1:])] + [np.inf]
    return sum(_quad(lambda x, q=q: (x - q) ** 2 * pdf(x), max(lo, lower), hi)
               for q, lo, hi in zip(lv, edges[:-1], edges[1:]) if hi > lower)


THEORY_CASES = [(fam, dist, pdf, g, m)
                for fam, dist, pdf in (("gaussian", Gaussian(1.0), stats.norm(0, 1).pdf),
                                       ("laplace", Laplace(1.0), stats.laplace(0, 1).pdf))
                for g in ("midrise", "midtread", "int") for m in (2, 3)]
THEORY_CASES += [("lognormal", Lognormal(0.0, 1.0), stats.lognorm(s=1.0, scale=1.0).pdf, "uint", m)
                 for m in (2, 3)]


@pytest.mark.parametrize("fam,dist,pdf,grid,bits", THEORY_CASES,
                         ids=[f"{c[0]}-{c[3]}{c[4]}" for c in THEORY_CASES])
def test_theory_exact_mse_equals_integration_over_table_levels(fam, dist, pdf, grid, bits):
    lower = 0.0 if fam == "lognormal" else -np.inf
    for alpha in (1e-3, 0.5, 2.5, 1e3):
        want = quad_mse(pdf, grid, bits, alpha, lower)
        assert expected_mse(dist, alpha, bits, grid) == pytest.approx(want, rel=1e-9), alpha
