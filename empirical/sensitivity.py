"""Damage of quantizing a unit, per language, predicted with no quantized forward pass.

``validate.phase_transition`` measures the single-unit degradation
``d_{l,i} = NLL_l(only unit i quantized) / NLL_l(baseline) - 1`` with one quantized pass per
unit. This module predicts it from the baseline alone: the weight errors (the real rounding
error, or the one theory expects), each Linear's inputs per language, and the gradient of each
language's loss with respect to each Linear's output from ONE backward pass over the corpus.

The model (second order in the Linear's output)
-----------------------------------------------
A Linear computes ``y_t = W x_t`` at token positions ``t`` (``o`` output rows, ``j`` input
columns). A weight error ``dW`` changes its output by ``dy_to = sum_j dW_oj x_tj``. With
``L_l`` language ``l``'s total NLL (nats), ``g_t = dL_l / dy_t`` and a per-position *diagonal*
curvature ``h_to`` of ``L_l`` with respect to ``y_to``, the second-order Taylor expansion is

    dL_l ~= sum_t g_t . dy_t  +  1/2 sum_t sum_o h_to dy_to^2                                 (1)

(the sums run over the positions of language ``l``). Both curvature estimates are
approximations of the Hessian's diagonal (off-diagonal terms between outputs and positions are
dropped by (1) itself):

* ``"fisher"`` (the default): ``h_to = g_to^2``, the empirical Fisher of each position's
  gradient. ``g_t = sum_s dl_s/dy_t`` sums over every later token ``s`` of the window whose loss
  ``y_t`` influences, so ``g_to^2`` carries the cross terms ``dl_s/dy dl_s'/dy`` as well, and the
  text's own next tokens stand where the model's distribution should (the Fisher identity
  holds in expectation under the model's distribution, not the data's).
* ``"sampled"``: the Gauss-Newton (true Fisher) diagonal of the NLL, ``sum_s E_{v ~ p_s}
  [(dl_s(v)/dy_to)^2]``, estimated by a backward pass with every target ``v_s`` drawn from the
  model's own next-token distribution ``p_s`` (Gumbel-max over the output layer, in chunks):
  ``h_to = (sum_s dl_s(v_s)/dy_to)^2``. The cross terms have zero mean (``E_v[dl_s(v)/dy] = 0``
  under ``p_s``, and the draws are independent), so this is an unbiased estimate of the diagonal,
  whatever the text. It costs one more backward pass per sample (the forward is shared).

Any user-given curvature can be passed to :func:`contract` instead (eq. (1) is exact for a loss
that is quadratic in ``y`` with that diagonal curvature; tests/test_sensitivity.py checks it).

Error models
------------
* **Actual** (``dW = Q(W) - W``, the quantizer's real rounding error, weights only): (1) itself,
  ``first = sum_t g_t . dy_t = sum_oj (dL_l/dW)_oj dW_oj`` with ``dL_l/dW = sum_t g_t x_t^T``,
  and ``second = 1/2 sum_t sum_o h_to dy_to^2``. Also the weight-diagonal form of the second
  term, ``diagonal = 1/2 sum_oj F_oj dW_oj^2`` with

      F_oj = sum_t h_to x_tj^2 = (H^T X^2)_oj                                                 (2)

  which drops the cross terms ``dW_oj dW_oj' x_tj x_tj'`` between inputs of one output.
* **Theory** (independent zero-mean errors of variance ``s2_oj``): the first-order term
  vanishes in expectation, and so do the cross terms of ``second``, so

      E[dL_l] = 1/2 sum_oj F_oj s2_oj.                                                        (3)

  ``s2_oj`` is the expected MSE of the quantizer applied to the row (channel, group or tensor)
  holding ``W_oj`` (:func:`expected_weight_error`): the Linear's fitted family rescaled to the
  row's second moment, at the clipping threshold the quantizer will use.
* **Factorized** (the issue's literal form): ``F_oj`` replaced by ``Hbar_o Xbar_j`` with
  ``Hbar_o = sum_t h_to`` (the sensitivity of the loss to output ``o``) and
  ``Xbar_j = (1/T_l) sum_t x_tj^2`` (the language's input second moment, ``E_l[x_j^2]``):

      E[dL_l] ~= 1/2 sum_o Hbar_o sum_j Xbar_j s2_oj.                                          (4)

  Exact when ``h_to`` and ``x_tj^2`` are uncorrelated over positions; :func:`contract` keeps
  ``Hbar`` and ``sum_t x_tj^2`` per language so (4) needs nothing more. They are not
  uncorrelated where a window's first position (BOS, the attention sink) carries most of the
  loss's sensitivity to a Linear's output but not of its input energy (on gemma-3-270m's later
  ``down_proj`` layers 98% of ``sum_t h_to`` sits there, with under 0.01% of ``sum_t x_tj^2``).
  **Factorized, split** (``factorized_split``) applies (4) separately to the window-start
  positions (``position 0``) and to the rest, and adds the two.

The predicted relative degradation of a unit (a decoder block, or one Linear) for language
``l`` is the sum of ``dL_l`` over the unit's Linears divided by ``NLL_fp,l``, the language's
baseline total NLL (:func:`zero_pass_damage`). Interactions between the Linears of a unit (an
error in one changes the inputs and gradients of the next) are ignored: that is part of the
model.

The one backward pass
---------------------
The engine's packed rows mix windows of several languages, but attention is block-diagonal per
window, so with ``L = sum over every language of L_l`` the gradient ``dL/dy_t`` at a position
involves only its own window's losses: it *is* ``dL_l/dy_t`` for the position's language
(:meth:`empirical.bpb.BpbEngine.position_keys`). One forward and backward pass over all batches
gives every language's gradients at once. The loss gradient at the final hidden state comes
from :meth:`empirical._head.ChunkedHead.hidden_grad` (no vocabulary-sized autograd); forward
hooks keep each Linear's input ``x_t`` and a hook on its output's gradient receives ``g_t``,
where the per-language sums above are accumulated and both are dropped. Parameters do not
require grad during the pass (the gradient enters at the token embeddings' output), so no weight
gradient is formed or left behind. Batches are cut into row chunks of at most ``max_tokens``
tokens to bound what autograd keeps. Curvature ``"sampled"`` adds one backward pass per draw
over the same forward graph (drawn targets first, then the text's own).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from empirical.devices import param_tensor

__all__ = ["VARIANTS", "DEFAULT_VARIANTS", "contract", "expected_weight_error", "actual_weight_error",
           "LinearSensitivity", "SensitivityPass", "sensitivity_pass", "ZeroPassDamage", "zero_pass_damage",
           "agreement"]

#: What :func:`zero_pass_damage` can predict, each a sum over the unit's Linears divided by
#: ``NLL_fp,l`` (module notes): ``theory`` eq. (3); ``factorized`` eq. (4) (``factorized_split``:
#: (4) over window starts and the other positions apart); ``actual`` eq. (1)
#: with the real rounding error; ``actual_second_order`` and ``actual_first_order`` its two terms;
#: ``actual_diagonal`` eq. (2)'s weight-diagonal second-order term with the real error.
VARIANTS = ("theory", "factorized", "factorized_split", "actual", "actual_second_order", "actual_first_order",
            "actual_diagonal")
DEFAULT_VARIANTS = ("theory", "factorized", "actual", "actual_second_order")
CURVATURES = ("fisher", "sampled")

# which per-Linear sums each variant needs (error models: "dw" actual, "s2" theory)
_NEEDS = {"theory": "s2", "factorized": "s2", "factorized_split": "s2", "actual": "dw", "actual_second_order": "dw",
          "actual_first_order": "dw", "actual_diagonal": "dw"}


def _check_variants(variants) -> tuple[str, ...]:
    if isinstance(variants, str):
        variants = (variants,)
    variants = tuple(variants)
    if not variants:
        raise ValueError("no variants asked for")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    return variants


# ---- the contraction ---------------------------------------------------------------------------

def contract(x: torch.Tensor, g: torch.Tensor, h: torch.Tensor | None = None, *,
             keys: torch.Tensor | None = None, n_keys: int = 1, dw: torch.Tensor | None = None,
             s2: torch.Tensor | None = None, full: bool = False) -> dict[str, torch.Tensor]:
    """Per-key sums of eqs. (1)-(4) over the positions of one Linear's input and output gradient.

    Parameters
    ----------
    x : torch.Tensor
        ``(T, n_in)`` inputs ``x_t`` of the Linear.
    g : torch.Tensor
        ``(T, n_out)`` gradients ``g_t = dL/dy_t`` of the loss with respect to its output.
    h : torch.Tensor, optional
        ``(T, n_out)`` per-position diagonal curvature ``h_to``; default ``g^2`` (empirical
        Fisher, an approximation: module notes).
    keys : torch.Tensor, optional
        ``(T,)`` key (language) index of every position in ``0..n_keys-1``; -1 drops the
        position (padding). Default: every position is key 0.
    n_keys : int
        Number of keys.
    dw : torch.Tensor, optional
        ``(n_out, n_in)`` weight error for the ``actual`` sums.
    s2 : torch.Tensor, optional
        ``(n_out, n_in)`` error variances for the ``theory`` sum.
    full : bool
        Also return, per key, ``grad_w = sum_t g_t x_t^T`` (``dL/dW``) and ``fisher_w`` (``F``,
        eq. (2)), each ``(n_keys, n_out, n_in)``: for checks on small layers.

    Returns
    -------
    dict str -> torch.Tensor (float64)
        ``count`` (n_keys,) positions; ``h_sum`` (n_keys, n_out) ``sum_t h_to``; ``x2_sum``
        (n_keys, n_in) ``sum_t x_tj^2``; with ``dw``: ``first`` ``sum_t g_t . dy_t``, ``second``
        ``1/2 sum_t h_t . dy_t^2`` and ``diagonal`` ``1/2 sum_oj F_oj dw_oj^2`` (n_keys,) with
        ``dy_t = dw x_t``; with ``s2``: ``theory`` ``1/2 sum_oj F_oj s2_oj`` (n_keys,).

    Raises
    ------
    ValueError
        Shapes that do not match, keys out of range, NaN or inf in the inputs.
    """
    if x.dim() != 2 or g.dim() != 2 or x.shape[0] != g.shape[0]:
        raise ValueError(f"x and g must be (T, n_in) and (T, n_out), got {tuple(x.shape)} and {tuple(g.shape)}")
    n_out, n_in = g.shape[1], x.shape[1]
    if h is not None and h.shape != g.shape:
        raise ValueError(f"the curvature h must have g's shape {tuple(g.shape)}, got {tuple(h.shape)}")
    for name, e in (("dw", dw), ("s2", s2)):
        if e is not None and tuple(e.shape) != (n_out, n_in):
            raise ValueError(f"{name} must be (n_out, n_in) = ({n_out}, {n_in}), got {tuple(e.shape)}")
    n_keys = int(n_keys)
    if n_keys < 1:
        raise ValueError(f"n_keys must be >= 1, got {n_keys}")
    if keys is None:
        keys = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    elif keys.shape != (x.shape[0],):
        raise ValueError(f"keys must be (T,) = ({x.shape[0]},), got {tuple(keys.shape)}")
    elif keys.numel() and int(keys.max()) >= n_keys:
        raise ValueError(f"key index {int(keys.max())} out of range for n_keys={n_keys}")
    for name, t in (("x", x), ("g", g), ("h", h)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")
    keep = keys >= 0
    if not bool(keep.all()):
        x, g, keys = x[keep], g[keep], keys[keep]
        h = h[keep] if h is not None else None
    if h is None:
        h = g * g
    dt = torch.promote_types(x.dtype, g.dtype)
    x, g, h = x.to(dt), g.to(dt), h.to(dt)
    x2 = x * x
    f64 = dict(dtype=torch.float64, device=x.device)

    def per_key(v: torch.Tensor) -> torch.Tensor:
        return torch.zeros((n_keys,) + tuple(v.shape[1:]), **f64).index_add_(0, keys, v.double())

    out = {"count": per_key(torch.ones(x.shape[0], **f64)), "h_sum": per_key(h), "x2_sum": per_key(x2)}
    if dw is not None:
        dw = dw.to(dt)
        dy = x @ dw.T
        out["first"] = per_key((g * dy).sum(dim=1))
        out["second"] = per_key(0.5 * (h * dy * dy).sum(dim=1))
        out["diagonal"] = per_key(0.5 * (h * (x2 @ (dw * dw).T)).sum(dim=1))
    if s2 is not None:
        out["theory"] = per_key(0.5 * (h * (x2 @ s2.to(dt).T)).sum(dim=1))
    if full:
        gw = torch.zeros(n_keys, n_out, n_in, **f64)
        fw = torch.zeros(n_keys, n_out, n_in, **f64)
        for k in keys.unique().tolist():
            m = keys == k
            gw[k] = g[m].double().T @ x[m].double()
            fw[k] = h[m].double().T @ x2[m].double()
        out["grad_w"], out["fisher_w"] = gw, fw
    return out


# ---- error models ------------------------------------------------------------------------------

def _is_transposed(module) -> bool:
    """GPT-2's ``Conv1D`` stores its weight as (in, out) (as :mod:`empirical.fakequant` treats it)."""
    return type(module).__name__ == "Conv1D"


def _oriented(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A weight-shaped tensor as (out, in)."""
    return w.t() if transposed else w


def expected_weight_error(weight: torch.Tensor, qcfg, fit, transposed: bool = False, seed: int = 0) -> torch.Tensor:
    """Theory's expected squared rounding error of every weight under ``qcfg``.

    Every row that shares one clipping threshold (a channel, a group or the whole tensor,
    ``qcfg.granularity``) is modelled as the Linear's fitted family rescaled to the row's second
    moment about 0 (the family is fitted with location 0 and the quantizer is centred at 0):
    with the fit's unit-variance shape ``Z``, the row's values are ``sigma_r Z``,
    ``sigma_r^2 = mean_j W_rj^2``, so

        s2_rj = MSE(alpha_r; sigma_r Z) = expected_mse(family at scale sigma_r, alpha_r, bits, grid)

    with ``alpha_r`` the threshold the quantizer will use on that row
    (:func:`empirical.fakequant.choose_alpha`; absmax by default). Grid ``aciq`` is realised on the
    ``midrise`` levels (as the fake quantizer does), so its error is that of those levels.
    Evaluated exactly for every row (``theory.expected_mse`` is vectorised over scales). A
    constant-zero row has ``s2 = 0``.

    Parameters
    ----------
    weight : torch.Tensor
        The weight as stored (``(out, in)``; ``(in, out)`` when ``transposed``).
    qcfg : empirical.fakequant.QuantConfig
    fit : dict or theory Distribution
        ``{"family": ..., "params": ...}`` (as ``validate.phase_transition.weight_fits`` gives)
        or the distribution itself; its scale is irrelevant (only its shape is used).
    transposed : bool
        GPT-2 ``Conv1D`` layout.
    seed : int
        For ``qcfg.clipping`` rules that fit or sample.

    Returns
    -------
    torch.Tensor
        float64, ``weight``'s shape and device.

    Raises
    ------
    ValueError
        NaN or inf weights, a one-sided family, a family without a finite variance.
    """
    from empirical.fakequant import _rows, choose_alpha
    from empirical.fits import theory_distribution
    from theory import expected_mse

    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or inf")
    dist = theory_distribution(fit["family"], fit["params"]) if isinstance(fit, Mapping) else fit
    if dist.one_sided:
        raise ValueError(f"family {type(dist).__name__} is one-sided; weights are signed")
    var = float(np.asarray(dist.variance))
    if not (math.isfinite(var) and var > 0):
        raise ValueError(f"the fitted {type(dist).__name__} has no finite variance ({var}); "
                         "theory cannot scale it to a row's second moment")
    rows, back = _rows(weight.detach(), transposed, qcfg)
    alpha = choose_alpha(rows, qcfg, seed).reshape(-1).cpu().numpy()
    r64 = rows.detach().to(torch.float64)
    sigma = r64.pow(2).mean(dim=1).sqrt().cpu().numpy()
    grid = "midrise" if qcfg.grid == "aciq" else qcfg.grid
    mse = np.zeros(sigma.shape)
    live = sigma > 0
    if live.any():
        scale = float(np.asarray(dist.scale)) * sigma[live] / math.sqrt(var)
        mse[live] = np.asarray(expected_mse(dist.with_scale(scale), alpha[live], qcfg.bits, grid))
    s2 = torch.from_numpy(mse).to(r64.device)[:, None].expand_as(r64)
    return back(s2.contiguous())


def actual_weight_error(weight: torch.Tensor, qcfg, transposed: bool = False, seed: int = 0) -> torch.Tensor:
    """The quantizer's real rounding error ``Q(W) - W`` (float64, ``weight``'s shape), from
    :func:`empirical.fakequant.fake_quantize_weight` without any forward pass."""
    from empirical.fakequant import fake_quantize_weight

    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or inf")
    w64 = weight.detach().to(torch.float64)
    return fake_quantize_weight(w64, qcfg, transposed=transposed, seed=seed) - w64


# ---- the pass ----------------------------------------------------------------------------------

@dataclass
class LinearSensitivity:
    """Per-language sums of one Linear from :func:`sensitivity_pass` (float64 numpy, key order).

    ``count`` positions, ``h_sum`` (n_keys, n_out), ``x2_sum`` (n_keys, n_in); ``first``,
    ``second``, ``diagonal`` (with an actual error ``dw``); ``theory``, ``factorized`` and
    ``factorized_split`` (with variances ``s2``); ``grad_w`` and ``fisher_w`` ((n_keys, n_out,
    n_in), with ``full``). ``count_split``, ``h_sum_split`` and ``x2_sum_split`` hold the same
    moments with a second axis of two strata: window starts (position 0), then the other
    positions. All in the (out, in) orientation, eqs. (1)-(4).
    """

    name: str
    sums: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.sums[key]

    def __contains__(self, key: str) -> bool:
        return key in self.sums


@dataclass
class SensitivityPass:
    """What :func:`sensitivity_pass` returns.

    Attributes
    ----------
    keys : list of str
        The engine's keys (languages), the order of every per-key array.
    linears : dict str -> LinearSensitivity
    nll : np.ndarray
        Each key's total NLL (nats) in the pass (the baseline's, from the same forward).
    chunks : int
        Forward calls (row chunks of the engine's batches), each followed by one backward (plus
        one per draw of curvature ``"sampled"``); together one pass over the corpus.
    seconds : float
        Wall time of the pass; ``contract_seconds`` of it inside the hooks' contractions.
    """

    keys: list[str]
    linears: dict[str, LinearSensitivity]
    nll: np.ndarray
    chunks: int
    seconds: float
    contract_seconds: float


def _check_linears(engine, linears) -> None:
    from empirical.models import model_view

    known = {q.name: q.module for q in model_view(engine.model).linears}
    for q in linears:
        name = getattr(q, "name", None)
        if name not in known or known[name] is not getattr(q, "module", None):
            raise ValueError(f"Linear {name if name is not None else q!r} is not a quantizable Linear of this "
                             f"engine's model ({len(known)} known, e.g. {next(iter(known), None)!r})")


def _sample_targets(head, h: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One draw per row of ``h`` (N x d) from the model's next-token distribution
    ``softmax(z)``, ``z`` the (soft-capped) logits of the output layer: Gumbel-max,
    ``argmax_v z_v - log(-log U_v)``, swept over the vocabulary in the head's chunks."""
    w, bias, cap = head._parts()
    h = h.detach().to(w.dtype)
    out = []
    for r0 in range(0, h.shape[0], head.rows):
        rows = h[r0: r0 + head.rows]
        best = torch.full((rows.shape[0],), -math.inf, device=h.device)
        arg = torch.zeros(rows.shape[0], dtype=torch.long, device=h.device)
        for v0 in range(0, w.shape[0], head.chunk):
            z = (rows @ w[v0: v0 + head.chunk].T).float()
            if bias is not None:
                z += bias[v0: v0 + head.chunk].float()
            if cap:
                z = torch.tanh(z / cap) * cap
            u = torch.rand(z.shape, generator=gen, device=z.device).clamp_(min=1e-30)
            val, idx = (z - (-u.log_()).log_()).max(dim=1)
            better = val > best
            best = torch.where(better, val, best)
            arg = torch.where(better, idx + v0, arg)
        out.append(arg)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=h.device)


def sensitivity_pass(engine, linears: Sequence, errors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                     *, curvature: str = "fisher", samples: int = 1, seed: int = 0, full: bool = False,
                     max_tokens: int = 1024, dtype: torch.dtype | None = None) -> SensitivityPass:
    """One forward and backward pass over the engine's texts, accumulating eqs. (1)-(4) per
    language for every Linear in ``linears`` (module notes).

    Parameters
    ----------
    engine : empirical.bpb.BpbEngine
    linears : sequence of QuantLinear
        From ``empirical.models.model_view(engine.model).linears``.
    errors : mapping name -> {"dw": tensor, "s2": tensor}, optional
        Per Linear, the actual weight error and/or the error variances, each in the weight's
        stored shape (transposed for ``Conv1D``, as the weight is). Without them only ``count``,
        ``h_sum`` and ``x2_sum`` (and with ``full`` the weight gradients) are kept.
    curvature : {"fisher", "sampled"}
        Per-position curvature estimate (module notes): ``g_to^2``, or the squared gradient with
        targets drawn from the model's own distribution (the Gauss-Newton diagonal, unbiased).
    samples : int
        Draws per token for ``"sampled"`` (the mean of their squared gradients; one backward
        pass each).
    seed : int
        Of the draws.
    full : bool
        Keep per-language ``dL/dW`` and ``F`` for every Linear (small models only).
    max_tokens : int
        Most tokens (rows x length) per forward/backward call.
    dtype : torch.dtype, optional
        Of the contractions (default: the model's).

    Raises
    ------
    ValueError
        An unknown curvature, a Linear not in the model, errors of the wrong shape, an output
        layer that is not a plain projection (no ``hidden_grad``).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; known: {', '.join(CURVATURES)}")
    if int(samples) < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if int(max_tokens) < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    linears = list(linears)
    if not linears:
        raise ValueError("no Linears given")
    _check_linears(engine, linears)
    errors = dict(errors or {})
    if unknown := sorted(set(errors) - {q.name for q in linears}):
        raise ValueError(f"errors given for Linears not in the list: {unknown[:5]}")
    model = engine.model
    engine._check_first_use()  # packing and head decided (as for any scoring)
    if not engine.head_exact:
        raise ValueError(f"{type(model).__name__}: the output layer is not a plain projection of the last "
                         "hidden state, so the loss gradient cannot be taken from hidden_grad")
    n_keys = len(engine.keys)
    cdt = dtype or next(model.parameters()).dtype
    prepared = {}
    for q in linears:
        tr = _is_transposed(q.module)
        e = {}
        for kind, t in errors.get(q.name, {}).items():
            if kind not in ("dw", "s2"):
                raise ValueError(f"{q.name}: unknown error kind {kind!r} (dw or s2)")
            if tuple(t.shape) != tuple(q.module.weight.shape):
                raise ValueError(f"{q.name}: {kind} has shape {tuple(t.shape)}, "
                                 f"the weight {tuple(q.module.weight.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{q.name}: {kind} contains NaN or inf")
            e[kind] = _oriented(t, tr).to(device=engine.device, dtype=cdt).contiguous()
        prepared[q.name] = e
    acc: dict[str, dict[str, torch.Tensor]] = {q.name: {} for q in linears}
    state = {"keys": None, "seconds": 0.0, "curvature": False}
    curv: dict[str, torch.Tensor] = {}  # squared sampled-target gradients of the current chunk
    n_samples = int(samples) if curvature == "sampled" else 0
    gen = torch.Generator(device=engine.device).manual_seed(int(seed))

    def on_grad(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            g = g.reshape(-1, g.shape[-1])
            if state["curvature"]:
                sq = g * g / n_samples
                curv[name] = curv[name] + sq if name in curv else sq
                state["seconds"] += time.perf_counter() - t0
                return
            e = prepared[name]
            sums = contract(x.reshape(-1, x.shape[-1]), g, curv.pop(name, None), keys=state["keys"],
                            n_keys=2 * n_keys, dw=e.get("dw"), s2=e.get("s2"), full=full)
            a = acc[name]
            for k, v in sums.items():
                a[k] = a[k] + v if k in a else v
        state["seconds"] += time.perf_counter() - t0

    def forward_hook(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                x = inputs[0].detach()
                output.register_hook(lambda g: on_grad(name, x, g.detach()))
        return hook

    def entry_hook(module, inputs, output):  # the gradient enters at the token embeddings
        return output.detach().requires_grad_(True)

    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = []
    nll = np.zeros(n_keys)
    chunks = 0
    t_start = time.perf_counter()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        handles.append(model.get_input_embeddings().register_forward_hook(entry_hook))
        for q in linears:
            handles.append(q.module.register_forward_hook(forward_hook(q.name)))
        for batch in engine.batches:
            B, L = batch.ids.shape
            step = max(1, int(max_tokens) // max(L, 1))
            for r0 in range(0, B, step):
                chunk = batch.take(r0, min(B, r0 + step))
                if chunk.targets.numel() == 0:
                    continue
                pk = engine.position_keys(chunk)
                # key and stratum: 2 key for a window's first position, 2 key + 1 for the others
                state["keys"] = torch.where(pk >= 0, 2 * pk + (chunk.pos != 0).long(), -1).reshape(-1)
                with torch.enable_grad():
                    hid = engine._replay.model_pass(chunk)[0]
                    h_sel = hid[chunk.rows, chunk.cols]
                    for _ in range(n_samples):  # curvature first: the hooks keep g^2 per Linear
                        state["curvature"] = True
                        drawn = _sample_targets(engine._head, h_sel, gen)
                        h_sel.backward(engine._head.hidden_grad(h_sel, drawn)[1].to(h_sel.dtype), retain_graph=True)
                    state["curvature"] = False
                    tok_nll, grad = engine._head.hidden_grad(h_sel, chunk.targets)
                    h_sel.backward(grad.to(h_sel.dtype))
                    if curv:
                        raise RuntimeError(f"no gradient reached {sorted(curv)[:3]} in the second backward")
                chunks += 1
                np.add.at(nll, pk[chunk.rows, chunk.cols].cpu().numpy(), tok_nll.double().cpu().numpy())
                del hid, h_sel, grad
    finally:
        state["curvature"] = False
        curv.clear()
        for hd in handles:
            hd.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    seconds = time.perf_counter() - t_start
    out = {}
    for q in linears:
        split = {k: v.cpu().numpy().reshape((n_keys, 2) + tuple(v.shape[1:])) for k, v in acc[q.name].items()}
        a = {k: v.sum(axis=1) for k, v in split.items()}  # per key: both strata
        if split:
            for k in ("count", "h_sum", "x2_sum"):
                a[f"{k}_split"] = split[k]
        if "s2" in prepared[q.name] and split:
            s2 = prepared[q.name]["s2"].double().cpu().numpy()

            def eq4(h_sum, x2_sum, count):
                return 0.5 * ((h_sum @ s2) * (x2_sum / np.maximum(count, 1)[..., None])).sum(axis=-1)

            a["factorized"] = eq4(a["h_sum"], a["x2_sum"], a["count"])
            a["factorized_split"] = eq4(split["h_sum"], split["x2_sum"], split["count"]).sum(axis=1)
        out[q.name] = LinearSensitivity(q.name, a)
    return SensitivityPass(list(engine.keys), out, nll, chunks, seconds, state["seconds"])


# ---- the prediction ----------------------------------------------------------------------------

@dataclass
class ZeroPassDamage:
    """Predicted single-unit degradations, per variant ``(n_keys, n_units)`` (key order =
    ``keys``), from :func:`zero_pass_damage`.

    Attributes
    ----------
    variants : dict str -> np.ndarray
    keys : list of str
    nll_fp : np.ndarray
        The baseline total NLL (nats) per key the damages are relative to.
    sensitivity : SensitivityPass
    timing : dict
        ``errors_seconds`` (quantizing and theory's variances), ``pass_seconds`` (the forward +
        backward pass, hooks included), ``contract_seconds`` (of which inside the hooks),
        ``backward_passes`` (over the corpus: 1, plus one per draw of curvature ``"sampled"``)
        and ``chunks`` (forward calls).
    """

    variants: dict[str, np.ndarray]
    keys: list[str]
    nll_fp: np.ndarray
    sensitivity: SensitivityPass = field(repr=False)
    timing: dict = field(default_factory=dict)

    def __getitem__(self, variant: str) -> np.ndarray:
        if variant not in self.variants:
            raise KeyError(f"variant {variant!r} was not computed; have {sorted(self.variants)}")
        return self.variants[variant]


def zero_pass_damage(engine, unit_linears: Sequence[Sequence], qcfg, fits: Mapping[str, Mapping] | None = None,
                     nll_fp: Mapping[str, np.ndarray | float] | None = None, *, seed: int = 0,
                     variants: Sequence[str] = DEFAULT_VARIANTS, curvature: str = "fisher",
                     samples: int = 1, max_tokens: int = 1024) -> ZeroPassDamage:
    """Predicted ``d_{l,i}`` of quantizing unit ``i`` alone, for every language ``l``, with no
    quantized forward pass:

        d_{l,i} ~= sum_{Linears q of unit i} dL_{l,q} / NLL_fp,l

    with ``dL_{l,q}`` from eqs. (1)-(4) (module notes; cross terms between Linears ignored).

    Parameters
    ----------
    engine : empirical.bpb.BpbEngine
        Holds the texts per language (``engine.keys`` is the row order of every result).
    unit_linears : sequence of sequences of QuantLinear
        The Linears of each unit (as ``validate.phase_transition.units_of`` gives them).
    qcfg : empirical.fakequant.QuantConfig
        The quantizer whose damage is predicted.
    fits : mapping name -> {"family", "params"}, optional
        Each Linear's fitted weight family (needed by ``theory`` and ``factorized``); a Linear
        missing from it is fitted here (``empirical.fits.best_theory_fit``, location 0, 8000
        weights, as ``validate.phase_transition.weight_fits`` does).
    nll_fp : mapping key -> per-segment NLL array or total, optional
        The baseline NLL the measured degradations are relative to; default the pass's own.
    seed : int
    variants : sequence of str
        Any of :data:`VARIANTS`.
    curvature : {"fisher", "sampled"}
        :func:`sensitivity_pass`.
    samples : int
        Draws per token for ``"sampled"``.
    max_tokens : int
        Tokens per forward + backward call.

    Returns
    -------
    ZeroPassDamage

    Raises
    ------
    ValueError
        An unknown variant, an empty unit or unit list, a Linear not in the engine's model,
        NaN or inf weights, ``nll_fp`` with other keys or a non-positive total.
    """
    variants = _check_variants(variants)
    units = [list(u) for u in unit_linears]
    if not units or any(not u for u in units):
        raise ValueError("unit_linears must be a non-empty list of non-empty lists of Linears")
    lins = [q for u in units for q in u]
    _check_linears(engine, lins)
    if nll_fp is not None:
        if set(nll_fp) != set(engine.keys):
            raise ValueError(f"nll_fp has keys {sorted(nll_fp)}, the engine {sorted(engine.keys)}")
        nfp = np.array([float(np.sum(nll_fp[k])) for k in engine.keys])
        if not (np.all(np.isfinite(nfp)) and np.all(nfp > 0)):
            raise ValueError(f"nll_fp totals must be finite and positive, got {nfp.tolist()}")
    need = {_NEEDS[v] for v in variants}
    t0 = time.perf_counter()
    errors: dict[str, dict[str, torch.Tensor]] = {}
    for q in lins:
        w = param_tensor(q.module, "weight").detach()  # the real weight, also under accelerate offload
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"weight of {q.name} contains NaN or inf")
        tr = _is_transposed(q.module)
        e = {}
        if "dw" in need:
            e["dw"] = actual_weight_error(w, qcfg, tr, seed).to(w.dtype)
        if "s2" in need:
            fit = (fits or {}).get(q.name)
            if fit is None:
                from empirical.fits import best_theory_fit

                f, _ = best_theory_fit(w.double().cpu().numpy().ravel(), max_samples=8000, seed=seed, fix_loc=True)
                fit = {"family": f.family, "params": f.params}
            e["s2"] = expected_weight_error(w, qcfg, fit, tr, seed).to(w.dtype)
        errors[q.name] = e
    t_err = time.perf_counter() - t0
    sp = sensitivity_pass(engine, lins, errors, curvature=curvature, samples=samples, seed=seed,
                          max_tokens=max_tokens)
    if nll_fp is None:
        nfp = sp.nll
    out = {}
    for v in variants:
        d = np.zeros((len(engine.keys), len(units)))
        for i, u in enumerate(units):
            for q in u:
                s = sp.linears[q.name]
                if v == "actual":
                    d[:, i] += s["first"] + s["second"]
                elif v == "actual_first_order":
                    d[:, i] += s["first"]
                elif v == "actual_second_order":
                    d[:, i] += s["second"]
                elif v == "actual_diagonal":
                    d[:, i] += s["diagonal"]
                else:
                    d[:, i] += s[v]
        out[v] = d / nfp[:, None]
    timing = {"errors_seconds": t_err, "pass_seconds": sp.seconds, "contract_seconds": sp.contract_seconds,
              "backward_passes": 1 + (samples if curvature == "sampled" else 0), "chunks": sp.chunks}
    return ZeroPassDamage(out, list(engine.keys), nfp, sp, timing)


# ---- agreement with the measurement ------------------------------------------------------------

def agreement(predicted: np.ndarray, measured: np.ndarray, keys: Sequence[str] | None = None) -> dict:
    """Spearman rank correlation and R^2 of predicted against measured single-unit damages.

    ``R^2 = 1 - SS_res / SS_tot`` (:func:`empirical.disparity.r_squared`) of the raw
    predictions; ``r2_scaled`` is the R^2 after one least-squares factor ``c`` through the origin
    (``c = sum p m / sum p^2`` over the pooled pairs, fitted on these measurements: an in-sample
    calibration of the overall scale only, reported as ``scale``).

    Parameters
    ----------
    predicted, measured : np.ndarray
        ``(n_keys, n_units)``.
    keys : sequence of str, optional
        Row names (default ``"0", "1", ...``).

    Returns
    -------
    dict
        ``per_key``: key -> {spearman, r2, r2_scaled}; ``pooled``: the same over all pairs, plus
        ``scale``; ``median_spearman`` over keys.
    """
    from scipy.stats import spearmanr

    from empirical.disparity import r_squared

    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if p.ndim != 2 or p.shape != m.shape:
        raise ValueError(f"predicted and measured must be (n_keys, n_units) of one shape, got {p.shape} and {m.shape}")
    if p.size == 0:
        raise ValueError("nothing to compare (empty arrays)")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(m))):
        raise ValueError("predicted or measured contains NaN or inf")
    keys = [str(i) for i in range(p.shape[0])] if keys is None else list(keys)
    if len(keys) != p.shape[0]:
        raise ValueError(f"{len(keys)} keys for {p.shape[0]} rows")
    denom = float((p * p).sum())
    scale = float((p * m).sum() / denom) if denom > 0 else float("nan")

    def stats(a, b):
        rho = spearmanr(a, b).statistic if a.size > 1 else float("nan")
        return {"spearman": float(rho), "r2": r_squared(a, b), "r2_scaled": r_squared(scale * a, b)}

    per = {k: stats(p[i], m[i]) for i, k in enumerate(keys)}
    pooled = stats(p.ravel(), m.ravel())
    pooled["scale"] = scale
    return {"per_key": per, "pooled": pooled,
            "median_spearman": float(np.nanmedian([v["spearman"] for v in per.values()]))}
