"""Fake quantization of Linear weights, with protected layers left in full precision.

Weights are rounded onto a grid of docs/design.md (``theory.grids``: the same levels theory
integrates over) per tensor, per output channel or per group of input weights, with the
clipping threshold chosen by

* ``absmax``: alpha = max |w| over the channel/group (what deployed int4/int8 does);
* ``theory``: alpha = (alpha*/sigma of the tensor's best-fit family) x the channel's std, i.e.
  one maximum-likelihood fit per tensor (``empirical.fits``), theory's alpha* for that family's
  shape, rescaled to each channel/group by its own standard deviation;
* ``sweep``: the exact empirical MSE minimiser of each channel/group (``empirical.sweep``), on a
  grid of fractions of its absmax.

:class:`FakeQuantizer` quantizes every layer once and caches the result, so experiments that
switch many protected sets (``validate.phase_transition``) only swap tensors. Its context
manager always restores the original weights, also after an exception.

Under accelerate hooks (a model dispatched over devices or offloaded) the weight quantized is the
real one, where it is stored (:func:`empirical.devices.param_tensor`: for an offloaded layer the
hook's weights map, in CPU memory or read from disk), and the swap replaces the entry that the
next forward loads (:func:`empirical.devices.swap_param`); the original tensor objects are put
back on exit, so the weights are restored bit for bit there too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from empirical.devices import param_tensor, swap_param
from theory.grids import Grid, check_bits, step_factor

__all__ = ["QuantConfig", "fake_quantize_weight", "choose_alpha", "FakeQuantizer", "protected_fraction",
           "GRANULARITIES", "CLIPPINGS"]

GRANULARITIES = ("tensor", "channel", "group")
CLIPPINGS = ("absmax", "theory", "sweep")


@dataclass(frozen=True)
class QuantConfig:
    """How weights are quantized: bits, grid, granularity, group size and clipping rule."""

    bits: int = 4
    grid: str = "int"
    granularity: str = "channel"
    group_size: int = 128
    clipping: str = "absmax"
    n_alphas: int = 64  # sweep resolution (fractions of absmax) for clipping="sweep"

    def __post_init__(self):
        g = Grid.parse(self.grid)
        if g.one_sided:
            raise ValueError("weights are signed; grid 'uint' is for non-negative data")
        object.__setattr__(self, "grid", g.value)
        object.__setattr__(self, "bits", check_bits(self.bits, g))
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; known: {', '.join(GRANULARITIES)}")
        if self.clipping not in CLIPPINGS:
            raise ValueError(f"unknown clipping rule {self.clipping!r}; known: {', '.join(CLIPPINGS)}")
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size < 2):
            raise ValueError(f"group_size must be an integer >= 2, got {self.group_size!r}")

    def key(self) -> str:
        gs = f"-g{self.group_size}" if self.granularity == "group" else ""
        return f"{self.grid}{self.bits}-{self.granularity}{gs}-{self.clipping}"


def _rows(w: torch.Tensor, transposed: bool, cfg: QuantConfig) -> tuple[torch.Tensor, callable]:
    """Reshape a weight into rows that share one alpha, and the inverse reshape.

    ``nn.Linear`` weights are (out, in); GPT-2's ``Conv1D`` stores (in, out) (``transposed``).
    A channel is one output unit; a group is ``group_size`` consecutive inputs of one output.
    """
    m = w.t() if transposed else w
    shape = m.shape
    if cfg.granularity == "tensor":
        rows = m.reshape(1, -1)
    elif cfg.granularity == "channel":
        rows = m.reshape(shape[0], -1)
    else:
        if shape[-1] % cfg.group_size:
            raise ValueError(f"group_size {cfg.group_size} does not divide the input dimension {shape[-1]}")
        rows = m.reshape(-1, cfg.group_size)

    def back(r: torch.Tensor) -> torch.Tensor:
        out = r.reshape(shape)
        return out.t() if transposed else out

    return rows, back


def choose_alpha(rows: torch.Tensor, cfg: QuantConfig, seed: int = 0) -> torch.Tensor:
    """Per-row clipping threshold (float64, shape (n_rows, 1)) under ``cfg.clipping``."""
    r64 = rows.detach().to(torch.float64)
    absmax = r64.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    if cfg.clipping == "absmax":
        return absmax
    if cfg.clipping == "theory":
        from theory import optimal_alpha

        from .fits import best_theory_fit

        flat = r64.reshape(-1).cpu().numpy()
        _, dist = best_theory_fit(flat - flat.mean(), seed=seed)
        ratio = optimal_alpha(dist, cfg.bits, cfg.grid) / float(np.sqrt(dist.variance))
        std = r64.std(dim=1, keepdim=True, unbiased=False)
        # A constant row has std 0; fall back to its absmax (it quantizes exactly anyway).
        return torch.where(std > 0, torch.minimum(ratio * std, absmax), absmax)
    from .sweep import mse_sweep

    x = (r64 / absmax).cpu().numpy()
    fracs = np.linspace(1.0 / cfg.n_alphas, 1.0, cfg.n_alphas)
    # aciq is realised on the midrise levels, so sweep the error of those levels.
    grid = "midrise" if cfg.grid == "aciq" else cfg.grid
    mse = mse_sweep(x, fracs, cfg.bits, grid, axis=0)  # [alpha, row]
    best = fracs[np.argmin(np.asarray(mse).reshape(fracs.size, -1), axis=0)]
    return torch.from_numpy(best).to(absmax)[:, None] * absmax


def _round_to_grid(rows: torch.Tensor, alpha: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Nearest level, ties up, clipped to the outermost levels (same rule as theory.grids.quantize)."""
    f, kmin, kmax, off = step_factor(cfg.grid, cfg.bits)
    step = alpha * f
    x = rows.detach().to(torch.float64)
    k = torch.floor(x / step - off + 0.5).clamp_(kmin, kmax)
    return (k + off) * step


def fake_quantize_weight(w: torch.Tensor, cfg: QuantConfig, transposed: bool = False,
                         seed: int = 0) -> torch.Tensor:
    """Quantize-dequantize a weight tensor; returns a new tensor of ``w``'s dtype and device."""
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or inf")
    rows, back = _rows(w, transposed, cfg)
    alpha = choose_alpha(rows, cfg, seed)
    return back(_round_to_grid(rows, alpha, cfg)).to(dtype=w.dtype, device=w.device)


def protected_fraction(linears: Sequence, protected: Iterable[str]) -> float:
    """Share of quantizable weight parameters kept in full precision (docs/design.md, Protection)."""
    protected = set(protected)
    names = {q.name for q in linears}
    unknown = protected - names
    if unknown:
        raise ValueError(f"unknown layers in the protected set: {sorted(unknown)[:5]}")
    total = sum(q.n_params for q in linears)
    return sum(q.n_params for q in linears if q.name in protected) / total if total else 0.0


class FakeQuantizer:
    """Quantized copies of a model's linears, swapped in for every layer not protected.

    Parameters
    ----------
    linears : sequence of QuantLinear
        From ``empirical.models.model_view(model).linears`` (``name``, ``module``, ``n_params``).
    config : QuantConfig

    Examples
    --------
    >>> fq = FakeQuantizer(view.linears, QuantConfig(bits=4, grid="int"))   # doctest: +SKIP
    >>> with fq.quantized(protect={"model.layers.0.mlp.down_proj"}):       # doctest: +SKIP
    ...     loss = model(**batch).loss
    """

    def __init__(self, linears: Sequence, config: QuantConfig, seed: int = 0):
        self.linears = list(linears)
        self.config = config
        self.seed = seed
        self._q: dict[str, torch.Tensor] = {}
        self._active = False

    def quantized_weight(self, name: str) -> torch.Tensor:
        """The fake-quantized weight of layer ``name`` (computed once, then cached)."""
        if name not in self._q:
            q = self._by_name(name)
            self._q[name] = fake_quantize_weight(param_tensor(q.module, "weight").data, self.config,
                                                 transposed=type(q.module).__name__ == "Conv1D",
                                                 seed=self.seed)
        return self._q[name]

    def _by_name(self, name: str):
        for q in self.linears:
            if q.name == name:
                return q
        raise ValueError(f"no quantizable linear named {name!r}")

    def protected_fraction(self, protect: Iterable[str]) -> float:
        return protected_fraction(self.linears, protect)

    @contextlib.contextmanager
    def quantized(self, protect: Iterable[str] = ()) -> Iterator["FakeQuantizer"]:
        """Quantize every linear not in ``protect``; restore the originals on exit, always."""
        if self._active:
            raise RuntimeError("FakeQuantizer.quantized is not re-entrant")
        protect = set(protect)
        names = {q.name for q in self.linears}
        unknown = protect - names
        if unknown:
            raise ValueError(f"unknown layers in the protected set: {sorted(unknown)[:5]}")
        saved: list = []  # functions restoring what was there, in order of the swaps
        self._active = True
        try:
            with torch.no_grad():
                for q in self.linears:
                    if q.name in protect:
                        continue
                    saved.append(swap_param(q.module, "weight", self.quantized_weight(q.name)))
            yield self
        finally:
            # Put back the very tensors that were there: restoration is exact, not a copy.
            for restore in reversed(saved):
                restore()
            self._active = False
