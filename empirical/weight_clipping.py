"""Activation-weighted (imatrix-style) clipping thresholds for Linear weights.

A Linear ``y = W x`` with weight ``W`` (out, in) sees the weight error ``W - Q(W)`` through its
inputs: ``E||(W - Q(W)) x||^2 = sum_i sum_j E[x_j^2] (W_ij - Q(W_ij))^2`` when the input
channels are uncorrelated. llama.cpp's importance matrix (imatrix) keeps exactly this diagonal,
``s_j = E[x_j^2]``, the mean square of input channel ``j`` over the calibration tokens, and so do
we. For every row ``i`` that shares one threshold (an output channel, or a group of
``group_size`` consecutive inputs of one output) the threshold minimises the activation-weighted
error

    E_i(alpha) = sum_j s_j (W_ij - Q_alpha(W_ij))^2,

with ``Q_alpha`` the grid quantizer of :mod:`empirical.fakequant` (``_round_to_grid``: nearest
level, ties up, clipped; the ``aciq`` grid is realised on its midrise levels, as there). With
calibration text in several languages ``l`` there is one importance ``s^l_j = E_l[x_j^2]`` per
language and one error ``E^l_i`` per language, and three ways to choose (``mode``):

* ``mean``: minimise ``E_i`` for ONE importance vector; the caller passes English's, or the
  token-weighted mix ``sum_l n_l s^l / sum_l n_l`` (E is linear in s, so the mix's error is the
  token-weighted mix of the languages' errors);
* ``minimax``: ``alpha_i = argmin_alpha max_l pi^l_i(alpha)`` with the relative penalty
  ``pi^l_i(alpha) = E^l_i(alpha) / min_a E^l_i(a) - 1`` (LA-ACIQ's penalty,
  ``theory.language_alpha``, here on the row's actual weights);
* ``weighted``: ``argmin_alpha sum_l v_l pi^l_i(alpha)`` with fairness weights ``v_l``
  (``fair_weights``, normalised; equal by default).

Search
------
Each row's candidates are fractions of its absmax (``absmax`` of the whole tensor for
granularity ``tensor``, whose one threshold minimises the error summed over all rows): the grid
``f_a = a / n`` for ``a = 1..n`` (``n = n_alphas``, the grid of ``choose_alpha(clipping="sweep")``),
then ONE refinement level: ``n`` points evenly spaced strictly inside
``[f_best - 1/n, f_best + 1/n]`` (capped at 1), i.e. a spacing of ``2 / (n (n + 1))``. The answer
is the best candidate of grid and refinement together, so refinement never makes the objective
worse. For ``minimax``/``weighted`` the denominators ``min_a E^l_i(a)`` are each language's best
over the grid, a refinement around its own best grid point (computed once per distinct point
per row) and the final refinement; the objective is then minimised over grid and final
refinement with those denominators. Where a language's error is 0 at its best (an exactly
representable row, or a group whose inputs that language never uses) its penalty is measured
relative to ``max(1e-12 max_a E^l_i(a), tiny)`` instead, i.e. 0 where its error stays 0.

The search is local: at 2-4 bits the error of a 640-wide row is smooth enough in alpha that it
lands within 1e-3 (relative) of a dense 8000-point grid's best (measured on Student-t rows); at 6
and 8 bits the error wiggles with the rounding of individual weights and a narrow dip elsewhere
can beat it by up to ~5% (8 bits) of a small error.

Cost. Each candidate alpha costs one rounding of the row (about ten float64 operations per
weight); a weight of ``R`` rows x ``k`` inputs costs ``R k (2n)`` such element evaluations for
``mean`` and ``R k n (2 + d)`` for ``minimax``/``weighted``, with ``d <= L`` the number of
distinct best grid points among the ``L`` languages of a row (1 when they agree). The work is
done on the weight's device in blocks of at most ``2^17`` (rows x alphas x inputs) elements on a
CPU (1 MiB per float64 temporary) and ``2^21`` on a GPU (16 MiB per temporary, about 100 MiB at
peak); beside them live the (rows x n x L) float64 errors of the grid and of the final
refinement (2 x 5 MiB per language for a 2048 x 640 weight in groups of 128). Measured at 4 bits
on one CPU thread (a loaded two-core machine): 2048 x 640 per channel 0.5 s (``mean``), 1.5 s
(``minimax``, 3 languages), 3.2 s (10 languages); 640 x 2048 about the same; on an H200,
15 ms / 37 ms / 80 ms.

``config.clipping`` is ignored here (the threshold is always the importance-weighted search
above); ``config.n_alphas`` sets ``n`` for :class:`ImportanceQuantizer` and
:func:`quantize_weight_weighted`.

Rows of a group whose importance is zero in every language would make every alpha equally good;
they fall back to uniform importance (the plain weight MSE, ``choose_alpha(clipping="sweep")``
refined).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from empirical.devices import param_tensor

from .fakequant import FakeQuantizer, QuantConfig, _round_to_grid, _rows

__all__ = ["IMPORTANCE_MODES", "importance_alpha", "quantize_weight_weighted", "ImportanceQuantizer"]

IMPORTANCE_MODES = ("mean", "minimax", "weighted")

# Elements (rows x alphas x inputs) of one block of the error computation: 1 MiB in float64 on a
# CPU, where a block that stays in cache is ~3x faster than a 16 MiB one (measured, 2048x640
# weight, one thread), and 16 MiB on a GPU, where fewer kernel launches matter more.
_BLOCK = 1 << 17
_BLOCK_GPU = 1 << 21
# Relative floor of a language's best error in its penalty's denominator (see module docstring).
_REL_FLOOR = 1e-12


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

def _as_numpy(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        if v.dtype in (torch.bfloat16, torch.float16):
            v = v.to(torch.float32)
        v = v.numpy()
    return np.asarray(v)


def _check_vector(v, what: str) -> np.ndarray:
    """A 1-D, finite, non-negative, not all-zero importance vector as float64, or ValueError."""
    a = _as_numpy(v)
    if a.dtype.kind not in "fiub":
        raise ValueError(f"{what}: importance must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim != 1:
        raise ValueError(f"{what}: importance must be a 1-D vector (one value per input channel), "
                         f"got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{what}: importance is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: importance contains NaN or inf")
    if np.any(a < 0):
        raise ValueError(f"{what}: importance has negative values (it is a mean square E[x_j^2] "
                         f">= 0), e.g. {float(a.min())!r}")
    if not np.any(a > 0):
        raise ValueError(f"{what}: importance is all zero (no input channel carries weight)")
    return a


def _check_mode(mode) -> str:
    if mode not in IMPORTANCE_MODES:
        raise ValueError(f"unknown importance mode {mode!r}; known: {', '.join(IMPORTANCE_MODES)}")
    return mode


def _parse_importance(importance, mode: str, k: int, fair_weights, what: str
                      ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """``(S, v, names)``: importance as a (k, L) float64 matrix (one column per language), the
    normalised fairness weights (``weighted`` only) and the language names."""
    mode = _check_mode(mode)
    if mode == "mean":
        if isinstance(importance, Mapping):
            raise ValueError(f"{what}: mode 'mean' takes one importance vector, got a mapping of "
                             f"{len(importance)} language(s); pool them first "
                             f"(sum_l n_l s^l / sum_l n_l) or use mode 'minimax'/'weighted'")
        if fair_weights is not None:
            raise ValueError(f"{what}: fair_weights are only used by mode 'weighted'")
        s = _check_vector(importance, what)
        if s.size != k:
            raise ValueError(f"{what}: importance has length {s.size}, the weight has {k} input "
                             f"channels (per row)")
        return s[:, None], None, ["mean"]
    if not isinstance(importance, Mapping):
        raise ValueError(f"{what}: mode {mode!r} needs a mapping language -> importance vector, "
                         f"got {type(importance).__name__}")
    if not importance:
        raise ValueError(f"{what}: no languages given (the importance mapping is empty)")
    names = [str(n) for n in importance]
    vecs = [_check_vector(v, f"{what}, language {n!r}") for n, v in zip(names, importance.values())]
    lengths = {n: v.size for n, v in zip(names, vecs)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{what}: the languages' importance vectors have different lengths: {lengths}")
    if vecs[0].size != k:
        raise ValueError(f"{what}: importance vectors have length {vecs[0].size}, the weight has "
                         f"{k} input channels (per row)")
    s = np.stack(vecs, axis=1)
    if mode == "minimax":
        if fair_weights is not None:
            raise ValueError(f"{what}: fair_weights are only used by mode 'weighted'")
        return s, None, names
    if fair_weights is None:
        v = np.full(len(names), 1.0 / len(names))
    else:
        if isinstance(fair_weights, Mapping):
            missing = [n for n in importance if n not in fair_weights]
            if missing:
                raise ValueError(f"{what}: fair_weights has no weight for language(s) {missing}")
            extra = [n for n in fair_weights if n not in importance]
            if extra:
                raise ValueError(f"{what}: fair_weights names language(s) without importance: {extra}")
            fair_weights = [fair_weights[n] for n in importance]
        v = np.asarray(_as_numpy(fair_weights), dtype=np.float64).ravel()
        if v.size != len(names):
            raise ValueError(f"{what}: got {v.size} fair_weights for {len(names)} languages")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{what}: fair_weights contain NaN or inf")
        if np.any(v < 0) or v.sum() <= 0:
            raise ValueError(f"{what}: fair_weights must be non-negative with a positive sum, "
                             f"got {v.tolist()}")
        v = v / v.sum()
    return s, v, names


def _check_rows(rows) -> torch.Tensor:
    if not isinstance(rows, torch.Tensor):
        rows = torch.as_tensor(np.asarray(rows))
    if rows.ndim != 2:
        raise ValueError(f"rows must be 2-D (n_rows, k), got shape {tuple(rows.shape)}")
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(f"rows is empty (shape {tuple(rows.shape)})")
    if not rows.dtype.is_floating_point:
        rows = rows.to(torch.float64)
    if not torch.isfinite(rows).all():
        raise ValueError("weight rows contain NaN or inf")
    return rows.detach().to(torch.float64).contiguous()


def _check_n_alphas(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n_alphas must be a positive integer, got {n!r}")
    return int(n)


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------

def _errors(x: torch.Tensor, alphas: torch.Tensor, imp: torch.Tensor, ids: torch.Tensor,
            cfg: QuantConfig, sum_rows: bool) -> torch.Tensor:
    """``E[r, a, l] = sum_j imp[ids[r] % P, j, l] (x[r, j] - Q_{alphas[r, a]}(x[r, j]))^2``.

    ``x`` (N, k) float64; ``alphas`` (N, A), or (1, A) shared by every row; ``imp`` (P, k, L);
    ``ids`` (N,) the rows' indices in the full weight (row ``r`` uses importance slice
    ``ids[r] % P``). With ``sum_rows`` the result is summed over rows, shape (1, A, L).
    Evaluated in blocks of at most ``_BLOCK`` (``_BLOCK_GPU`` off the CPU) rows x alphas x inputs elements.
    """
    n, k = x.shape
    n_a = alphas.shape[1]
    period, _, n_l = imp.shape
    out = torch.zeros((1 if sum_rows else n, n_a, n_l), dtype=torch.float64, device=x.device)
    block = _BLOCK if x.device.type == "cpu" else _BLOCK_GPU
    cc = min(k, block)
    ac = min(n_a, max(1, block // cc))
    rc = min(n, max(1, block // (ac * cc)))
    shared = alphas.shape[0] == 1
    for r0 in range(0, n, rc):
        r1 = min(n, r0 + rc)
        slots = ids[r0:r1] % period
        for a0 in range(0, n_a, ac):
            a1 = min(n_a, a0 + ac)
            al = (alphas[:, a0:a1] if shared else alphas[r0:r1, a0:a1])[:, :, None]
            acc = torch.zeros((r1 - r0, a1 - a0, n_l), dtype=torch.float64, device=x.device)
            for c0 in range(0, k, cc):
                c1 = min(k, c0 + cc)
                xs = x[r0:r1, None, c0:c1]
                d2 = _round_to_grid(xs, al, cfg)  # (r, a, c), a new tensor
                d2.sub_(xs).square_()
                if period == 1:
                    acc += d2 @ imp[0, c0:c1]
                else:
                    acc += torch.bmm(d2, imp[slots, c0:c1])
                del d2
            if sum_rows:
                out[0, a0:a1] += acc.sum(0)
            else:
                out[r0:r1, a0:a1] = acc
    return out


def _fractions(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid ``a/n`` (a = 1..n; numpy's linspace, as ``choose_alpha``) and the refinement
    offsets: ``n`` points strictly inside ``(-1/n, 1/n)``."""
    grid = torch.from_numpy(np.linspace(1.0 / n, 1.0, n)).to(device)
    offsets = torch.from_numpy(np.linspace(-1.0, 1.0, n + 2)[1:-1] / n).to(device)
    return grid, offsets


def _search(x: torch.Tensor, imp: torch.Tensor, cfg: QuantConfig, mode: str, n: int,
            v: torch.Tensor | None, shared: bool, refine: bool) -> torch.Tensor:
    """Best fraction of absmax per row, shape (n_rows or 1,), float64 (see module docstring)."""
    dev = x.device
    absmax = x.abs().amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    if shared:
        absmax = absmax.max().reshape(1)
    m_rows = absmax.shape[0]
    all_ids = torch.arange(x.shape[0], device=dev)
    grid, offsets = _fractions(n, dev)

    def evaluate(fr: torch.Tensor, sel: torch.Tensor | None = None) -> torch.Tensor:
        """E at fractions ``fr`` (m, A) of the rows ``sel`` (all when None): (m, A, L)."""
        if shared:
            return _errors(x, fr * absmax[:, None], imp, all_ids, cfg, sum_rows=True)
        if sel is None:
            return _errors(x, fr * absmax[:, None], imp, all_ids, cfg, sum_rows=False)
        return _errors(x[sel], fr * absmax[sel, None], imp, all_ids[sel], cfg, sum_rows=False)

    def window(center: torch.Tensor) -> torch.Tensor:
        return (center[:, None] + offsets[None, :]).clamp_(max=1.0)

    base = grid.expand(m_rows, n)
    e1 = evaluate(base)  # (m, n, L)
    if mode == "mean":
        obj1 = e1[..., 0]
        best = obj1.argmin(dim=1)
        if not refine:
            return grid[best]
        ref = window(grid[best])
        obj = torch.cat([obj1, evaluate(ref)[..., 0]], dim=1)
        return torch.cat([base, ref], dim=1).gather(1, obj.argmin(dim=1, keepdim=True))[:, 0]

    # minimax / weighted: each language's best error (denominator of its penalty)
    lo = e1.amin(dim=1)  # (m, L)
    hi = e1.amax(dim=1)
    if refine:
        own = e1.argmin(dim=1)  # (m, L): each language's best grid point
        for lang in range(own.shape[1]):
            new = torch.ones(m_rows, dtype=torch.bool, device=dev)
            for q in range(lang):
                new &= own[:, lang] != own[:, q]
            rows_new = new.nonzero()[:, 0]
            # (rows x n x L) errors only feed the minima: at most 2^22 of them (32 MiB) at once
            step = max(1, (1 << 22) // (n * own.shape[1]))
            for s0 in range(0, rows_new.numel(), step):  # none: windows refined already
                sel = rows_new[s0:s0 + step]
                e2 = evaluate(window(grid[own[sel, lang]]), None if shared else sel)
                lo[sel] = torch.minimum(lo[sel], e2.amin(dim=1))
                hi[sel] = torch.maximum(hi[sel], e2.amax(dim=1))
                del e2

    def objective(e: torch.Tensor) -> torch.Tensor:
        """max_l or sum_l v_l of the penalties, (m, A); one language at a time, so that no
        (rows x alphas x languages) temporary is formed beside ``e``."""
        den = torch.maximum(lo, torch.clamp(_REL_FLOOR * hi, min=torch.finfo(torch.float64).tiny))
        out = None
        for lang in range(e.shape[2]):
            if mode == "weighted" and v[lang] == 0:
                continue
            pen = (e[:, :, lang] - lo[:, lang, None]).clamp_min_(0).div_(den[:, lang, None])
            if mode == "weighted":
                pen.mul_(v[lang])
            out = pen if out is None else (torch.maximum(out, pen) if mode == "minimax" else out.add_(pen))
        return out

    best = objective(e1).argmin(dim=1)
    if not refine:
        return grid[best]
    ref = window(grid[best])
    e3 = evaluate(ref)
    lo = torch.minimum(lo, e3.amin(dim=1))
    hi = torch.maximum(hi, e3.amax(dim=1))
    obj = torch.cat([objective(e1), objective(e3)], dim=1)
    return torch.cat([base, ref], dim=1).gather(1, obj.argmin(dim=1, keepdim=True))[:, 0]


def _importance_tensor(s: np.ndarray, period: int, device) -> torch.Tensor:
    """(k_total, L) importance -> (period, k_total/period, L); a slice that is zero in every
    language falls back to uniform importance (every alpha would tie otherwise)."""
    imp = torch.from_numpy(np.ascontiguousarray(s)).to(device=device, dtype=torch.float64)
    imp = imp.reshape(period, -1, imp.shape[1]).clone()
    dead = ~(imp > 0).any(dim=2).any(dim=1)
    if dead.any():
        imp[dead] = 1.0
    return imp


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def importance_alpha(rows, importance, bits, grid="int", mode="mean", n_alphas=64,
                     fair_weights=None, refine: bool = True) -> torch.Tensor:
    """Per-row clipping threshold minimising the activation-weighted weight error.

    For row ``i`` of ``rows`` and importance ``s`` (one value per column ``j``),

        E_i(alpha) = sum_j s_j (rows_ij - Q_alpha(rows_ij))^2,

    and ``alpha_i`` is chosen by ``mode`` (module docstring): ``argmin E_i`` (``mean``),
    ``argmin max_l (E^l_i / min E^l_i - 1)`` (``minimax``) or
    ``argmin sum_l v_l (E^l_i / min E^l_i - 1)`` (``weighted``), searched over the fractions
    ``a / n_alphas`` of the row's absmax and one refinement level around the best of them.

    Parameters
    ----------
    rows : (n_rows, k) tensor or array
        Rows that each get one threshold (e.g. output channels of an ``nn.Linear`` weight).
    importance : (k,) array, or mapping language -> (k,) array
        ``E[x_j^2]`` of the input channels: one vector for ``mean``, one per language for
        ``minimax`` and ``weighted``.
    bits : int
    grid : str
        Quantizer grid (``theory.grids``; signed grids only).
    mode : {"mean", "minimax", "weighted"}
    n_alphas : int
        Size of the fraction grid and of the refinement level.
    fair_weights : sequence or mapping language -> weight, optional
        ``v_l`` for ``weighted`` (normalised; equal by default).
    refine : bool
        False returns the best point of the fraction grid alone (no refinement level).

    Returns
    -------
    torch.Tensor
        (n_rows, 1) float64 thresholds, on the device of ``rows``.
    """
    x = _check_rows(rows)
    cfg = QuantConfig(bits=bits, grid=grid, granularity="channel")
    n = _check_n_alphas(n_alphas)
    s, v, _ = _parse_importance(importance, mode, x.shape[1], fair_weights, "importance_alpha")
    imp = _importance_tensor(s, 1, x.device)
    vt = None if v is None else torch.from_numpy(v).to(x.device)
    frac = _search(x, imp, cfg, mode, n, vt, shared=False, refine=bool(refine))
    absmax = x.abs().amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return (frac * absmax)[:, None]


def _quantize(w: torch.Tensor, cfg: QuantConfig, s: np.ndarray, v: np.ndarray | None, mode: str,
              transposed: bool) -> torch.Tensor:
    m = w.t() if transposed else w
    rows, back = _rows(w, transposed, cfg)
    x = rows.detach().to(torch.float64).contiguous()
    vt = None if v is None else torch.from_numpy(v).to(w.device)
    n = _check_n_alphas(cfg.n_alphas)
    if cfg.granularity == "tensor":
        # one alpha for the tensor: search on the (out, in) layout with the error summed over rows
        full = m.detach().to(torch.float64).contiguous()
        frac = _search(full, _importance_tensor(s, 1, w.device), cfg, mode, n, vt, shared=True,
                       refine=True)
        alpha = (frac * full.abs().max().clamp_min(torch.finfo(torch.float64).tiny)).reshape(1, 1)
    else:
        period = 1 if cfg.granularity == "channel" else m.shape[1] // cfg.group_size
        frac = _search(x, _importance_tensor(s, period, w.device), cfg, mode, n, vt, shared=False,
                       refine=True)
        alpha = (frac * x.abs().amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny))[:, None]
    return back(_round_to_grid(x, alpha, cfg)).to(dtype=w.dtype, device=w.device)


def _n_inputs(w: torch.Tensor, transposed: bool) -> int:
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(w.shape)}")
    return int(w.shape[0] if transposed else w.shape[1])


def quantize_weight_weighted(w, config: QuantConfig, importance, mode="mean", transposed=False,
                             fair_weights=None) -> torch.Tensor:
    """Quantize-dequantize a Linear weight with importance-weighted clipping thresholds.

    Parameters
    ----------
    w : torch.Tensor
        ``nn.Linear`` weight (out, in), or GPT-2 ``Conv1D`` weight (in, out) with ``transposed``.
    config : QuantConfig
        Bits, grid, granularity (``tensor``/``channel``/``group``), group size and ``n_alphas``;
        ``config.clipping`` is ignored.
    importance : (in,) array, or mapping language -> (in,) array
        ``E[x_j^2]`` per input channel of this Linear; for granularity ``group`` row ``(i, g)``
        uses the slice ``s[g*group_size:(g+1)*group_size]``, for ``tensor`` the one threshold
        minimises ``sum_i E_i(alpha)``.
    mode, fair_weights
        As in :func:`importance_alpha`.

    Returns
    -------
    torch.Tensor
        A new tensor of ``w``'s shape, dtype and device.
    """
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"w must be a torch.Tensor, got {type(w).__name__}")
    k = _n_inputs(w, transposed)
    if w.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(w.shape)})")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or inf")
    s, v, _ = _parse_importance(importance, mode, k, fair_weights, "quantize_weight_weighted")
    return _quantize(w, config, s, v, mode, transposed)


class ImportanceQuantizer(FakeQuantizer):
    """:class:`~empirical.fakequant.FakeQuantizer` whose thresholds are importance-weighted.

    Every layer is quantized by :func:`quantize_weight_weighted` with its own input-channel
    importance; protection, caching and the exact restoration of the original tensors are
    inherited. ``config.clipping`` is ignored.

    Parameters
    ----------
    linears : sequence of QuantLinear
    config : QuantConfig
    importance : mapping linear name -> (in,) array, or -> {language: (in,) array}
        ``E[x_j^2]`` of each Linear's input channels (one vector for ``mean``, one per language
        for ``minimax``/``weighted``). Every Linear of ``linears`` needs an entry; entries for
        other names are ignored.
    mode : {"mean", "minimax", "weighted"}
    fair_weights : optional
        ``v_l`` for ``weighted``.
    seed : int
        Kept for the parent's interface (the search is deterministic).
    """

    def __init__(self, linears: Sequence, config: QuantConfig, importance: Mapping, mode: str = "mean",
                 fair_weights=None, seed: int = 0):
        super().__init__(linears, config, seed)
        self.mode = _check_mode(mode)
        if not isinstance(importance, Mapping):
            raise ValueError(f"importance must be a mapping linear name -> importance, got "
                             f"{type(importance).__name__}")
        missing = [q.name for q in self.linears if q.name not in importance]
        if missing:
            raise ValueError(f"importance has no entry for {len(missing)} linear(s), e.g. {missing[:5]}")
        self._importance: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for q in self.linears:
            k = _n_inputs(q.module.weight, _is_conv1d(q.module))
            s, v, _ = _parse_importance(importance[q.name], self.mode, k, fair_weights,
                                        f"linear {q.name!r}")
            self._importance[q.name] = (s, v)

    def quantized_weight(self, name: str) -> torch.Tensor:
        """The importance-weighted fake-quantized weight of layer ``name`` (cached)."""
        if name not in self._q:
            q = self._by_name(name)
            w = param_tensor(q.module, "weight").data  # the real weight, also under offload
            if not torch.isfinite(w).all():
                raise ValueError(f"linear {name!r}: weight contains NaN or inf")
            s, v = self._importance[name]
            self._q[name] = _quantize(w, self.config, s, v, self.mode, _is_conv1d(q.module))
        return self._q[name]


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"
