"""Replay of the residual stream, for :class:`empirical.bpb.BpbEngine`.

A pass whose first changed decoder block is ``b`` gives blocks ``0..b-1`` the weights and inputs
of a pass recorded earlier, so what enters block ``b`` is what entered it then.
:class:`ResidualReplay` records that residual stream once, from the model's own pass
(``output_hidden_states``: ``h_b`` entering block ``b``, for ``b = 1..n-1`` and every batch), and
later computes

    h_{i+1} = block_i(h_i, **inputs_i)   for i = b..n-1,      final = final_norm(h_n)      (1)

by calling the decoder blocks and the final norm directly. ``inputs_i`` is what the base model
computes before its first block and hands to block ``i`` besides the residual stream. It depends
on the layout of the batch only, never on the weights, and :class:`BlockInputs` rebuilds it from
the positions and windows of the batch (:class:`empirical._packing.Batch`):

* the attention mask: token ``j`` is visible to token ``i`` when both lie in the same window and
  ``j <= i`` (causal, block-diagonal over packed windows), and, in a sliding-window layer, also
  ``i - j < sliding_window``. ``sdpa`` attention takes it as booleans, ``eager`` attention as an
  additive mask (0, or the dtype's minimum);
* in rotary models, the cos/sin of the positions (Gemma 3: one pair per layer type, its local
  and global layers having different bases).

One subclass of :class:`BlockInputs` per family of architecture owns these details
(:data:`FAMILIES`). Exactness is checked, not assumed: :meth:`ResidualReplay.verify` replays one
recorded row from block 1 (through every block a replay can call) by (1) and compares the final
hidden states with the model's own pass. Where a family is unknown or the check fails, replay is
refused with the reason and every pass runs in full.
"""

from __future__ import annotations

from typing import Sequence

import torch

from empirical._head import scored
from empirical._packing import Batch
from empirical.devices import named_tensors
from empirical.models import ModelView, model_view

__all__ = ["BlockInputs", "LearnedPositions", "Rotary", "Gemma3", "FAMILIES", "ResidualReplay", "attention_mask"]

# Architectures whose blocks need more than (1) supplies.
UNSUPPORTED = {
    "bloom": "BLOOM's blocks take an ALiBi bias built from the attention mask, which replay does not rebuild",
}


def attention_mask(seg: torch.Tensor, dtype: torch.dtype, implementation: str,
                   window: int | None = None) -> torch.Tensor:
    """``(B, 1, L, L)`` mask: query ``i`` sees key ``j`` when ``seg[i] == seg[j]``, ``j <= i``
    and (with ``window``) ``i - j < window``. Boolean for ``sdpa``, additive for ``eager``."""
    i = torch.arange(seg.shape[1], device=seg.device)
    seen = (seg[:, :, None] == seg[:, None, :]) & (i[:, None] >= i[None, :])
    if window is not None:
        seen &= (i[:, None] - i[None, :]) < window
    seen = seen[:, None]
    if implementation == "sdpa":
        return seen
    return torch.zeros(seen.shape, dtype=dtype, device=seg.device).masked_fill_(~seen, torch.finfo(dtype).min)


class BlockInputs:
    """What the decoder blocks of one family of architectures take besides the residual stream.

    Subclasses name their ``model_types`` (``config.model_type``) and implement
    :meth:`for_batch`.
    """

    model_types: tuple[str, ...] = ()
    implementations = ("sdpa", "eager")

    def __init__(self, view: ModelView):
        self.config = view.model.config
        self.n_blocks = len(view.blocks)
        self.rotary = view.rotary
        self.implementation = getattr(self.config, "_attn_implementation", None) or "eager"

    def unsupported(self) -> str | None:
        """Why blocks of this model cannot be called from (1), or None."""
        if self.implementation not in self.implementations:
            return f"attention implementation {self.implementation!r} (replay builds masks for {self.implementations})"
        return None

    def mask(self, h: torch.Tensor, batch: Batch, window: int | None = None) -> torch.Tensor:
        return attention_mask(batch.seg, h.dtype, self.implementation, window)

    def for_batch(self, h: torch.Tensor, batch: Batch) -> list[dict]:
        """Keyword arguments of every block for ``batch``; ``h`` is a hidden state of it (for
        dtype and device)."""
        raise NotImplementedError


class LearnedPositions(BlockInputs):
    """GPT-2, OPT: position embeddings are added before the first block; blocks take the mask."""

    model_types = ("gpt2", "opt")

    def for_batch(self, h, batch):
        return [{"attention_mask": self.mask(h, batch), "position_ids": batch.pos}] * self.n_blocks


class Rotary(BlockInputs):
    """Llama: one rotary cos/sin pair, computed once from the positions, shared by every block."""

    model_types = ("llama",)

    def unsupported(self):
        if self.rotary is None:
            return "no rotary embedding module found outside the blocks"
        return super().unsupported()

    def for_batch(self, h, batch):
        return [{"attention_mask": self.mask(h, batch), "position_ids": batch.pos,
                 "position_embeddings": self.rotary(h, batch.pos)}] * self.n_blocks


class Gemma3(Rotary):
    """Gemma 3: layers are ``sliding_attention`` (banded mask of ``config.sliding_window``
    tokens, local rotary base) or ``full_attention`` (causal mask, global rotary base), as
    ``config.layer_types`` lists them."""

    model_types = ("gemma3_text",)

    def unsupported(self):
        if getattr(self.config, "use_bidirectional_attention", False):
            return "bidirectional attention (replay builds causal masks)"
        return super().unsupported()

    def for_batch(self, h, batch):
        per_type = {}
        for kind in set(self.config.layer_types):
            window = self.config.sliding_window if kind == "sliding_attention" else None
            per_type[kind] = {"attention_mask": self.mask(h, batch, window), "position_ids": batch.pos,
                              "position_embeddings": self.rotary(h, batch.pos, kind)}
        return [per_type[kind] for kind in self.config.layer_types[: self.n_blocks]]


FAMILIES: tuple[type[BlockInputs], ...] = (LearnedPositions, Rotary, Gemma3)


def _family(view: ModelView) -> tuple[BlockInputs | None, str | None]:
    kind = getattr(view.model.config, "model_type", None)
    if kind in UNSUPPORTED:
        return None, UNSUPPORTED[kind]
    for fam in FAMILIES:
        if kind in fam.model_types:
            inputs = fam(view)
            reason = inputs.unsupported()
            return (None, reason) if reason else (inputs, None)
    return None, f"explicit block calls are not implemented for model_type {kind!r}"


def _hidden(out) -> torch.Tensor:
    """A block's output residual stream (some architectures return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


class ResidualReplay:
    """The residual stream entering every decoder block, recorded once and replayed by (1).

    Parameters
    ----------
    model : transformers causal LM
    view : ModelView, optional
        Where the blocks, final norm and rotary embedding are (default ``model_view(model)``).

    Attributes
    ----------
    blocks : list of nn.Module
    unsupported : str or None
        Why this architecture cannot be replayed (known before any pass), or None.
    """

    def __init__(self, model, view: ModelView | None = None):
        view = view or model_view(model)
        self.model = model
        self.blocks = view.blocks
        self.final_norm = view.final_norm
        self.inputs, self.unsupported = _family(view)
        if self.unsupported is None and self.final_norm is None:
            self.inputs, self.unsupported = None, "no final norm found after the blocks"
        self._states: list[list[torch.Tensor]] | None = None  # [b - 1][batch]: h_b entering block b
        self._fingerprints: list[float] | None = None

    @property
    def recorded(self) -> bool:
        return self._states is not None

    def record_bytes(self, batches: Sequence[Batch]) -> int:
        """Memory that :meth:`record` would keep: ``n - 1`` states of every batch."""
        width = self.model.get_input_embeddings().embedding_dim
        width = int(getattr(self.model.config, "hidden_size", width))
        elem = next(self.model.parameters()).element_size()
        return (len(self.blocks) - 1) * sum(b.ids.numel() for b in batches) * width * elem

    def model_pass(self, batch: Batch, keep_states: bool = False):
        """The model's own pass over ``batch``: final hidden states ``(B, L, d)`` and, with
        ``keep_states``, the states entering blocks ``0..n-1`` (else None)."""
        out = self.model.base_model(**batch.inputs(), use_cache=False, output_hidden_states=keep_states)
        return out.last_hidden_state, (out.hidden_states[: len(self.blocks)] if keep_states else None)

    def run(self, h: torch.Tensor, batch: Batch, start: int) -> torch.Tensor:
        """Eq. (1): blocks ``start..n-1`` and the final norm, from ``h`` entering block ``start``."""
        kwargs = self.inputs.for_batch(h, batch)
        for i in range(start, len(self.blocks)):
            h = _hidden(self.blocks[i](h, **kwargs[i]))
        return self.final_norm(h)

    def record(self, batches: Sequence[Batch]) -> list[torch.Tensor]:
        """Run the model over every batch, keep what enters blocks ``1..n-1``, and remember the
        blocks' weights (a float64 checksum each). Returns the final hidden states at the scored
        positions."""
        finals, states = [], []
        for b in batches:
            final, entering = self.model_pass(b, keep_states=True)
            finals.append(scored(final, b))
            states.append([h.detach() for h in entering[1:]])
        self._states = [list(per_block) for per_block in zip(*states)]  # [block - 1][batch]
        self._fingerprints = [self._fingerprint(i) for i in range(len(self.blocks))]
        return finals

    def verify(self, bi: int, batch: Batch, final: torch.Tensor) -> str | None:
        """Replay the longest row of recorded batch number ``bi`` from block 1 by (1) and compare
        with ``final``, the model's own final hidden states at the batch's scored positions (as
        :meth:`record` returned them). Returns the reason replay cannot be trusted, or None."""
        if len(self.blocks) < 2:
            return None  # nothing is ever replayed
        r = batch.ids.shape[0] - 1  # rows are sorted by length
        mini = batch.take(r, r + 1)
        ref = final[(batch.rows == r).to(final.device)]
        try:
            ours = scored(self.run(self._states[0][bi][r: r + 1], mini, 1), mini).to(ref.device)
        except (TypeError, ValueError, RuntimeError) as exc:  # a block that wants other inputs
            return f"calling the blocks directly failed ({type(exc).__name__}: {exc})"
        if ours.shape != ref.shape:
            return f"the final norm gives shape {tuple(ours.shape)}, the model {tuple(ref.shape)}"
        err = float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        tol = max(1e-4, 8 * torch.finfo(ref.dtype).eps)
        if not err <= tol:
            return f"calling the blocks directly differs from the model's pass by {err:.1e} (relative; > {tol:.0e})"
        return None

    def forget(self) -> None:
        self._states = self._fingerprints = None

    def check_unchanged(self, start: int) -> None:
        """Raise if a block before ``start`` changed since :meth:`record`."""
        for i in range(start):
            if self._fingerprint(i) != self._fingerprints[i]:
                raise RuntimeError(f"block {i} changed since record(); cannot replay it (start_block={start})")

    def final_hidden(self, bi: int, batch: Batch, start: int) -> torch.Tensor:
        """Final hidden states ``(B, L, d)`` of batch number ``bi``, running blocks ``start..``
        only (``start = n`` runs the last block again: the stream after it is not kept)."""
        start = min(start, len(self.blocks) - 1)
        if start <= 0:
            return self.model_pass(batch)[0]
        return self.run(self._states[start - 1][bi], batch, start)

    def _fingerprint(self, i: int) -> float:
        """Float64 sum of block ``i``'s real parameters (the values its next forward uses, also
        when accelerate offloads them: :func:`empirical.devices.named_tensors`), each summed on
        the device that holds it."""
        return float(sum(float(p.detach().sum(dtype=torch.float64)) for _, p in named_tensors(self.blocks[i])))
