"""Loss-gradient magnitudes per decoder block, one language at a time.

The loss of a language is its mean next-token NLL in nats over its windows ``w_1..w_S`` (each a
``(1, T_s)`` token tensor, BOS first, no padding):

    L = (1 / N) sum_s sum_{t=0}^{T_s - 2} -log p(w_s[t + 1] | w_s[..t]),   N = sum_s (T_s - 1),

from the model's own logits. Its gradient is accumulated over the windows, one backward pass per
window of the window's summed NLL divided by ``N``: the windows are independent, so the
accumulated weight gradients are exactly those of ``L``, and each position's output gradient is
exactly ``dL/dh_t`` (one backward of ``L`` over all windows at once would give the same numbers
with all windows' activations and logits in memory together).

Per block ``b`` (:func:`language_gradients`):

* ``weight``: the Frobenius norm of ``dL/dW`` over all of the block's Linear weights,
  ``sqrt(sum_{W in b} ||dL/dW||_F^2)``; also per Linear (``linear_weight``);
* ``output_rms``: the root mean square over tokens of the Euclidean norm of the gradient with
  respect to the block's output hidden state (the residual stream after the block),
  ``sqrt(mean_t ||dL/dh_t||^2)`` over the positions ``t = 1..T_s - 2`` of every window: not BOS
  (position 0, the attention sink, whose gradient collects every later token's attention) and not
  the last position (it predicts no scored token, so its gradient is 0 at every block);
* ``output_fro``: the Frobenius norm ``||dL/dH||_F`` over every position of every window
  (BOS and the last position included): the plain gradient norm with respect to the block's
  output;
* with quantization errors ``Delta W = Q(W) - W`` given (``errors``), the first-order damage proxies
  ``taylor = |sum_{W in b} <dL/dW, Delta W>|`` (the first-order change of ``L``) and
  ``fisher = sum_{W in b} sum (dL/dW * Delta W)^2`` (elementwise).

The model is left as it was: every parameter's ``requires_grad`` and ``.grad`` are restored, and
its training flag too (the passes run in evaluation mode); the weights are never written.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

__all__ = ["GradientNorms", "language_gradients", "language_loss", "frozen_except"]


@dataclass
class GradientNorms:
    """Gradient magnitudes of one language (module notes); arrays have one entry per block."""

    weight: np.ndarray
    output_rms: np.ndarray
    output_fro: np.ndarray
    linear_weight: dict
    loss: float
    tokens: int
    positions_rms: int
    taylor: np.ndarray | None = None
    fisher: np.ndarray | None = None
    output_grads: list | None = field(default=None, repr=False)   # [block][window] (T, d), with keep=True
    weight_grads: dict | None = field(default=None, repr=False)   # name -> dL/dW, with keep=True

    def to_json(self) -> dict:
        f = lambda a: None if a is None else [float(x) for x in a]  # noqa: E731
        return {"weight": f(self.weight), "output_rms": f(self.output_rms), "output_fro": f(self.output_fro),
                "linear_weight": {k: float(v) for k, v in self.linear_weight.items()},
                "loss_nats": float(self.loss), "tokens": int(self.tokens), "positions_rms": int(self.positions_rms),
                "taylor": f(self.taylor), "fisher": f(self.fisher)}


def _check_windows(windows: Sequence) -> int:
    if len(windows) == 0:
        raise ValueError("no windows: the language has no text")
    n = 0
    for w in windows:
        if getattr(w, "dim", lambda: 0)() != 2 or w.shape[0] != 1:
            raise ValueError(f"windows must be (1, T) token tensors, got {getattr(w, 'shape', type(w))}")
        n += max(int(w.shape[1]) - 1, 0)
    if n == 0:
        raise ValueError("no window has two tokens: there is no next token to predict")
    return n


def _window_nll_sum(model, w):
    """Summed next-token NLL (nats) of one window from the model's logits (in float32, or the
    logits' own dtype when wider)."""
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=w, use_cache=False).logits[0, :-1]
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), w[0, 1:], reduction="sum")


def language_loss(model, windows: Sequence) -> float:
    """``L`` of the module notes (mean NLL in nats per predicted token), without gradients."""
    import torch

    n = _check_windows(windows)
    with torch.no_grad():
        return float(sum(float(_window_nll_sum(model, w)) for w in windows if w.shape[1] > 1) / n)


@contextlib.contextmanager
def frozen_except(model, params: Sequence):
    """Only ``params`` require gradients inside; on exit every parameter's ``requires_grad`` and
    ``.grad`` are what they were, and the model's training flag too (evaluation mode inside)."""
    all_params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in all_params]
    training = model.training
    wanted = {id(p) for p in params}
    try:
        model.eval()
        for p in all_params:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        yield
    finally:
        for p, rg, g in saved:
            p.grad = g
            p.requires_grad_(rg)
        model.train(training)


def language_gradients(model, blocks: Sequence, block_linears: Sequence[Sequence], windows: Sequence,
                       errors: Mapping[str, "object"] | None = None, keep: bool = False) -> GradientNorms:
    """Gradient magnitudes of one language's loss per block (module notes).

    Parameters
    ----------
    model : causal LM
        Called as ``model(input_ids=w, use_cache=False).logits``.
    blocks : sequence of nn.Module
        The decoder blocks; a forward hook on each takes its output hidden state.
    block_linears : sequence (per block) of sequences of QuantLinear
        The Linears (``.name``, ``.module``) whose weight gradients are measured, per block.
    windows : sequence of LongTensor ``(1, T)``
        The language's token windows (BOS first).
    errors : mapping name -> Tensor, optional
        ``Q(W) - W`` for each Linear: adds the ``taylor`` and ``fisher`` proxies.
    keep : bool
        Also return the raw gradients (``output_grads`` per block and window, ``weight_grads``).

    Returns
    -------
    GradientNorms

    Raises
    ------
    ValueError
        Mismatched blocks and Linears, empty lists, missing errors, or a Linear whose weight is
        offloaded by accelerate (on ``meta`` between calls: each forward lends it a fresh copy,
        so no gradient can accumulate on the module's parameter).
    """
    import torch

    if len(blocks) == 0 or len(blocks) != len(block_linears):
        raise ValueError(f"{len(blocks)} blocks but {len(block_linears)} lists of Linears; "
                         "need one non-empty list per block")
    if any(len(b) == 0 for b in block_linears):
        raise ValueError("a block has no Linears")
    n = _check_windows(windows)
    names = [q.name for b in block_linears for q in b]
    if errors is not None:
        missing = [nm for nm in names if nm not in errors]
        if missing:
            raise ValueError(f"errors lack the Linears {missing[:3]}")
    weights = [q.module.weight for b in block_linears for q in b]
    offloaded = [q.name for b in block_linears for q in b if q.module.weight.device.type == "meta"]
    if offloaded:
        raise ValueError(f"weight gradients need the weights in their modules, but {offloaded[0]} (and "
                         f"{len(offloaded) - 1} more) is offloaded by accelerate (on the meta device between "
                         "calls); load the model without offload (device='cpu'/'cuda' or a device map "
                         "without 'cpu'/'disk' offload entries)")
    nb = len(blocks)
    sq_rms = np.zeros(nb)
    sq_all = np.zeros(nb)
    n_rms = 0
    loss = 0.0
    kept = [[] for _ in range(nb)] if keep else None
    current: list = [None] * nb

    def fwd_hook(i):
        def fn(module, inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            if h.requires_grad:
                h.register_hook(lambda g: current.__setitem__(i, g.detach()))
        return fn

    with frozen_except(model, weights):
        handles = [b.register_forward_hook(fwd_hook(i)) for i, b in enumerate(blocks)]
        try:
            for w in windows:
                if w.shape[1] < 2:
                    continue
                current[:] = [None] * nb
                nll = _window_nll_sum(model, w)
                (nll / n).backward()
                loss += float(nll.detach())
                for i in range(nb):
                    g = current[i]
                    if g is None:
                        raise RuntimeError(f"no gradient reached block {i}'s output")
                    g = g[0].double()
                    sq = (g * g).sum(dim=-1)                    # ||dL/dh_t||^2 per position
                    sq_all[i] += float(sq.sum())
                    sq_rms[i] += float(sq[1:-1].sum())
                    if keep:
                        kept[i].append(g.clone())
                n_rms += max(int(w.shape[1]) - 2, 0)
            grads = {nm: (torch.zeros_like(wt) if wt.grad is None else wt.grad.detach().clone())
                     for nm, wt in zip(names, weights)}
        finally:
            for h in handles:
                h.remove()
    lin_norm = {nm: float(torch.linalg.vector_norm(g.double())) for nm, g in grads.items()}
    wnorm = np.array([np.sqrt(sum(lin_norm[q.name] ** 2 for q in b)) for b in block_linears])
    taylor = fisher = None
    if errors is not None:
        taylor, fisher = np.zeros(nb), np.zeros(nb)
        for i, b in enumerate(block_linears):
            dot = 0.0
            for q in b:
                g, e = grads[q.name].double(), errors[q.name].detach().to(grads[q.name].device).double()
                if e.shape != g.shape:
                    raise ValueError(f"error of {q.name} has shape {tuple(e.shape)}, weight {tuple(g.shape)}")
                dot += float((g * e).sum())
                fisher[i] += float(((g * e) ** 2).sum())
            taylor[i] = abs(dot)
    return GradientNorms(weight=wnorm, output_rms=np.sqrt(sq_rms / max(n_rms, 1)), output_fro=np.sqrt(sq_all),
                         linear_weight=lin_norm, loss=loss / n, tokens=n, positions_rms=n_rms,
                         taylor=taylor, fisher=fisher, output_grads=kept,
                         weight_grads=grads if keep else None)
