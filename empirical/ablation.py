"""Ablation of one decoder block's residual update (issue #17, S-004).

A decoder block maps the residual stream ``h`` entering it to ``f(h)``; its *residual update* is

    u = f(h) - h.                                                                          (1)

Two ablations replace ``u`` at every position of a pass:

* **zero** ablation: ``u -> 0``, so the block's output is its input (the block is skipped);
* **mean** ablation: ``u -> ubar_p``, a fixed vector, so the output is ``h + ubar_p``. The mean is
  taken over the real (non-padding) positions of reference text, separately for the *first*
  position of a window (``position_ids == 0``, the BOS token of a segment) and for every other
  position:

      ubar_first = mean over windows of u at position 0,
      ubar_text  = mean over all positions t >= 1 of every window of u_t.                 (2)

  The BOS position carries updates orders of magnitude larger than text positions (the
  "attention sink"), so a single mean would push every text position by a share of the BOS
  update. :func:`update_means` measures (2) from windows that each start with BOS (as
  :func:`validate._mechanisms.language_windows` makes them), so ``ubar_first`` is the BOS mean.

Both are applied by a forward hook on the block (:func:`ablate_block`), which reads the block's
input from the call (positional or ``hidden_states=``) and the positions from the
``position_ids`` keyword that Llama/Gemma base models and :mod:`empirical._replay` pass to every
block (without one, position ``t`` of the call is taken as ``t``). A block that returns a tuple
(older transformers) gets its first element replaced. The hook is removed when the ``with`` block
exits, also after an exception, and it acts during :class:`empirical.bpb.BpbEngine` replays as
well as full passes (both call the block module).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

__all__ = ["MODES", "UpdateMeans", "update_means", "ablate_block", "block_update"]

MODES = ("zero", "mean")


def _blocks(model) -> list:
    from empirical.models import model_view

    return model_view(model).blocks


def _check_block(block: int, n_blocks: int) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
        raise ValueError(f"block must be an integer index, got {block!r}")
    if not 0 <= int(block) < n_blocks:
        raise ValueError(f"block {block} out of range: the model has {n_blocks} decoder blocks (0..{n_blocks - 1})")
    return int(block)


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("cannot find the decoder block's input (no positional argument, no hidden_states=)")


def _first_position(h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``(B, T, 1)`` boolean: which positions of ``h`` are the first of their window."""
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.arange(h.shape[1], device=h.device)[None]
    return (pos == 0).expand(h.shape[0], h.shape[1])[..., None]


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace(out, h_new: torch.Tensor):
    return (h_new, *out[1:]) if isinstance(out, tuple) else h_new


@dataclass
class UpdateMeans:
    """Mean residual update of every block, eq. (2).

    Attributes
    ----------
    first : np.ndarray, shape (n_blocks, d)
        Mean of ``u`` at position 0 of each window (BOS).
    text : np.ndarray, shape (n_blocks, d)
        Mean of ``u`` over positions ``>= 1``.
    n_first, n_text : int
        Positions averaged.
    """

    first: np.ndarray
    text: np.ndarray
    n_first: int
    n_text: int

    def to_json(self) -> dict:
        return {"first": self.first.tolist(), "text": self.text.tolist(), "n_first": self.n_first,
                "n_text": self.n_text}

    @classmethod
    def from_json(cls, doc: dict) -> "UpdateMeans":
        return cls(np.asarray(doc["first"], dtype=np.float64), np.asarray(doc["text"], dtype=np.float64),
                   int(doc["n_first"]), int(doc["n_text"]))

    def norms(self) -> dict:
        """Euclidean norm of each block's two means (how large the BOS update is against text's)."""
        return {"first": np.linalg.norm(self.first, axis=1).tolist(), "text": np.linalg.norm(self.text, axis=1).tolist()}


@contextlib.contextmanager
def _hooks(blocks: Sequence, hook, indices: Iterable[int]) -> Iterator[None]:
    handles = []
    try:
        for i in indices:
            handles.append(blocks[i].register_forward_hook(
                lambda mod, args, kwargs, out, i=i: hook(i, args, kwargs, out), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def update_means(model, windows: Iterable[torch.Tensor]) -> UpdateMeans:
    """Eq. (2) for every decoder block, from full-precision passes over ``windows``.

    Parameters
    ----------
    model : transformers causal LM
    windows : iterable of LongTensor, shape (1, T)
        Token ids, each window starting with BOS and holding no padding (every position is real
        text), e.g. all languages' windows of :func:`validate._mechanisms.language_windows`.

    Returns
    -------
    UpdateMeans
        Sums accumulated in float64: ``ubar_first = sum_w u_{w,0} / W`` and
        ``ubar_text = sum_w sum_{t>=1} u_{w,t} / sum_w (T_w - 1)``.

    Raises
    ------
    ValueError
        No windows, a window that is not ``(1, T)``, no text positions at all, or a non-finite update.
    """
    blocks = _blocks(model)
    n = len(blocks)
    acc = {"first": [None] * n, "text": [None] * n}
    counts = {"first": 0, "text": 0}

    def hook(i, args, kwargs, out):
        u = (_output(out) - _block_input(args, kwargs)).double()[0]
        for name, part in (("first", u[:1]), ("text", u[1:])):
            s = part.sum(dim=0)
            acc[name][i] = s if acc[name][i] is None else acc[name][i] + s

    base = model.base_model
    seen = 0
    with _hooks(blocks, hook, range(n)):
        for w in windows:
            if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.shape[0] != 1 or w.shape[1] < 1:
                raise ValueError(f"each window must be a (1, T) LongTensor with T >= 1, got "
                                 f"{getattr(w, 'shape', type(w).__name__)}")
            base(input_ids=w, use_cache=False)
            counts["first"] += 1
            counts["text"] += int(w.shape[1]) - 1
            seen += 1
    if seen == 0:
        raise ValueError("no windows given")
    if counts["text"] == 0:
        raise ValueError("every window is a single token: no text positions to average over")
    first = torch.stack(acc["first"]).cpu().numpy() / counts["first"]
    text = torch.stack(acc["text"]).cpu().numpy() / counts["text"]
    if not (np.isfinite(first).all() and np.isfinite(text).all()):
        raise ValueError("a block's residual update is not finite (NaN/inf in the model's pass)")
    return UpdateMeans(first, text, counts["first"], counts["text"])


@contextlib.contextmanager
def ablate_block(model, block: int, mode: str = "zero", means: UpdateMeans | None = None) -> Iterator[None]:
    """Within the ``with`` block, every call of decoder block ``block`` has its update (1) replaced.

    Parameters
    ----------
    model : transformers causal LM
    block : int
        Index of the decoder block, ``0..n_blocks-1``.
    mode : {"zero", "mean"}
        ``zero``: output = input. ``mean``: output = input + ``means.first[block]`` at positions
        whose ``position_ids`` are 0 and input + ``means.text[block]`` elsewhere.
    means : UpdateMeans
        Required for ``mode="mean"`` (:func:`update_means`).

    Raises
    ------
    ValueError
        Unknown mode, block index out of range, missing means, means whose shape is not
        ``(n_blocks, d)`` or that hold NaN/inf.
    """
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; expected one of {MODES}")
    blocks = _blocks(model)
    b = _check_block(block, len(blocks))
    mf = mt = None
    if mode == "mean":
        if means is None:
            raise ValueError("mode='mean' needs the mean updates (update_means)")
        d = int(getattr(model.config, "hidden_size", model.get_input_embeddings().embedding_dim))
        for name, arr in (("first", means.first), ("text", means.text)):
            a = np.asarray(arr)
            if a.shape != (len(blocks), d):
                raise ValueError(f"means.{name} has shape {a.shape}; expected (n_blocks, d) = ({len(blocks)}, {d})")
            if not np.isfinite(a).all():
                raise ValueError(f"means.{name} holds NaN or inf")
        p = next(model.parameters())
        home = p.device if p.device.type != "meta" else torch.device("cpu")  # meta: offloaded by accelerate
        mf = torch.as_tensor(np.asarray(means.first[b]), dtype=p.dtype, device=home)
        mt = torch.as_tensor(np.asarray(means.text[b]), dtype=p.dtype, device=home)

    def hook(i, args, kwargs, out):
        h = _block_input(args, kwargs)
        if mode == "zero":
            return _replace(out, h)
        first = _first_position(h, kwargs)
        return _replace(out, h + torch.where(first, mf.to(h.device, h.dtype), mt.to(h.device, h.dtype)))

    with _hooks(blocks, hook, [b]):
        yield


@torch.no_grad()
def block_update(model, ids: torch.Tensor, block: int) -> torch.Tensor:
    """The update (1) of ``block`` in a full-precision pass over ``ids`` (``(B, T)``), float64."""
    blocks = _blocks(model)
    b = _check_block(block, len(blocks))
    got = {}

    def hook(i, args, kwargs, out):
        got["u"] = (_output(out) - _block_input(args, kwargs)).double()

    with _hooks(blocks, hook, [b]):
        model.base_model(input_ids=ids, use_cache=False)
    return got["u"]
