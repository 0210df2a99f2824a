"""Layout of scored windows into batches, for :class:`empirical.bpb.BpbEngine`.

Everything here depends on the texts only, never on the weights, so it is done once per engine.

* **Windows.** A segment (BOS + its tokens) longer than ``max_length`` is cut into sliding
  windows (:func:`segment_windows`); each window scores the tokens after its ``n_context``
  context tokens, so every token of the segment after BOS is scored exactly once.
* **Rows.** Windows are packed several to a row of at most ``pack_length`` tokens by first-fit
  decreasing (:func:`pack_rows`); each keeps its own positions (``position_ids`` restart at 0),
  from which transformers builds a block-diagonal causal mask, so no window sees another. Without
  packing each window is a row of its own, and the model gets a padding mask instead.
* **Batches.** Rows sorted by length are cut into contiguous batches by dynamic programming
  (:func:`split_batches`): fewest padded tokens plus a fixed cost per forward call.
* **Packing check.** Not every architecture reads restarted positions that way (OPT and BLOOM
  take positions and ALiBi from the attention mask), so :func:`packing_is_exact` scores the row
  holding the most windows both packed and one window per row, and the engine keeps packing only
  when they agree.

Each :class:`Batch` also knows, per token, its position and the window it belongs to
(:attr:`Batch.seg`), which is what an explicit call of the decoder blocks needs to rebuild the
attention mask (:mod:`empirical._replay`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

__all__ = ["Window", "Batch", "Layout", "segment_windows", "pack_rows", "split_batches",
           "packed_layout", "padded_layout", "packing_is_exact"]


class Window(NamedTuple):
    """One forward-pass window of a segment."""

    segment: int      # global index of the segment whose tokens it scores
    ids: list[int]    # token ids, starting with BOS for a segment's first window
    n_context: int    # leading tokens that are context only (their successors were scored before)


def segment_windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """Sliding windows over ``ids`` (which start with BOS).

    Each window after the first scores ``stride`` new tokens and keeps ``max_length - stride``
    earlier tokens as context.

    Returns
    -------
    list of (window_ids, n_context)
        Each window predicts ``window_ids[n_context+1:]`` from what precedes; together the windows
        predict every token of ``ids`` after the first exactly once.
    """
    if stride < 1 or stride > max_length - 1:
        raise ValueError(f"need 1 <= stride <= max_length - 1, got stride={stride}, max_length={max_length}")
    if len(ids) <= max_length:
        return [(ids, 0)]
    out = [(ids[:max_length], 0)]
    scored_upto = max_length  # tokens ids[1:scored_upto] are predicted
    while scored_upto < len(ids):
        end = min(scored_upto + stride, len(ids))
        start = end - max_length
        out.append((ids[start:end], scored_upto - 1 - start))
        scored_upto = end
    return out


@dataclass
class Batch:
    """One forward pass: rows of windows laid end to end, and where the scored predictions are.

    ``ids``, ``pos``, ``seg``, ``rows``, ``cols`` and ``targets`` live on the model's device;
    ``owner`` and ``win`` on the CPU.
    """

    ids: torch.Tensor      # (B, L) token ids, padded
    pos: torch.Tensor      # (B, L) position ids, restarting at 0 for every window and for the padding tail
    seg: torch.Tensor      # (B, L) window index of each token; -1 for padding
    packed: bool           # the model gets position ids (packed rows) rather than a padding mask
    rows: torch.Tensor     # (N,) batch row of each scored prediction
    cols: torch.Tensor     # (N,) position whose hidden state predicts it
    targets: torch.Tensor  # (N,) the predicted token
    owner: torch.Tensor    # (N,) global segment index the prediction belongs to
    win: torch.Tensor      # (N,) window index of each prediction

    def inputs(self) -> dict:
        """Keyword arguments of the model's forward for this batch."""
        if self.packed:
            return {"input_ids": self.ids, "position_ids": self.pos}
        return {"input_ids": self.ids, "attention_mask": (self.seg >= 0).long()}

    def take(self, r0: int, r1: int) -> "Batch":
        """Rows ``r0..r1-1`` as a batch of their own."""
        keep = (self.rows >= r0) & (self.rows < r1)
        kc = keep.cpu()
        return Batch(self.ids[r0:r1], self.pos[r0:r1], self.seg[r0:r1], self.packed, self.rows[keep] - r0,
                     self.cols[keep], self.targets[keep], self.owner[kc], self.win[kc])


@dataclass
class Layout:
    """All batches of one engine, and how much of them is padding."""

    batches: list[Batch]
    padding_fraction: float
    packed: bool

    @property
    def n_tokens(self) -> int:
        """Scored predictions per pass."""
        return sum(int(b.targets.numel()) for b in self.batches)

    @property
    def owner(self) -> np.ndarray:
        """Segment of every scored prediction, in batch order."""
        return torch.cat([b.owner for b in self.batches]).numpy()


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` grouped into rows of at most ``capacity``
    (a longer item gets a row of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free = np.zeros(0, dtype=np.int64)
    for i in order:
        fits = np.flatnonzero(free >= lengths[i])
        if fits.size:
            r = int(fits[0])
            rows[r].append(i)
            free[r] -= lengths[i]
        else:
            rows.append([i])
            free = np.append(free, max(capacity - lengths[i], 0))
    return rows


def split_batches(lengths: Sequence[int], max_tokens: int, max_size: int,
                  overhead_tokens: int = 32) -> list[tuple[int, int]]:
    """Split rows sorted by length into contiguous batches ``[j, k)`` that minimise padded
    tokens plus ``overhead_tokens`` per batch (a forward call's fixed cost), under at most
    ``max_size`` rows and ``max_tokens`` padded tokens per batch (a single longer row still
    gets a batch of its own). Dynamic programming over the sorted order, O(n * max_size)."""
    n = len(lengths)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for k in range(1, n + 1):
        for j in range(k - 1, max(-1, k - 1 - max_size), -1):
            size = (k - j) * lengths[k - 1]
            if size > max_tokens and k - j > 1:
                break
            c = best[j] + size + overhead_tokens
            if c < best[k]:
                best[k], cut[k] = c, j
    out, k = [], n
    while k > 0:
        out.append((cut[k], k))
        k = cut[k]
    return out[::-1]


def _layout(windows: Sequence[Window], rows: list[list[int]], pad: int, max_tokens: int, max_size: int,
            packed: bool, device) -> Layout:
    """Batches of ``rows`` (each a list of window indices laid end to end), rows taken in the
    given order (sorted by length)."""
    lengths = [sum(len(windows[o].ids) for o in row) for row in rows]
    out, real, padded = [], 0, 0
    for j, k in split_batches(lengths, max_tokens, max_size):
        L = max(lengths[j:k])
        ids = torch.full((k - j, L), pad, dtype=torch.long)
        seg = torch.full((k - j, L), -1, dtype=torch.long)
        pos = torch.zeros((k - j, L), dtype=torch.long)
        r_idx, c_idx, owner, win = [], [], [], []
        for r, row in enumerate(rows[j:k]):
            o = 0
            for wi in row:
                segment, w, ctx = windows[wi]
                ids[r, o: o + len(w)] = torch.tensor(w)
                seg[r, o: o + len(w)] = wi
                pos[r, o: o + len(w)] = torch.arange(len(w))
                n = len(w) - 1 - ctx
                r_idx += [r] * n
                c_idx += range(o + ctx, o + len(w) - 1)
                owner += [segment] * n
                win += [wi] * n
                o += len(w)
                real += len(w)
            pos[r, o:] = torch.arange(L - o)  # padding: a sequence of its own
        padded += (k - j) * L
        rows_t, cols_t = torch.tensor(r_idx, dtype=torch.long), torch.tensor(c_idx, dtype=torch.long)
        out.append(Batch(ids.to(device), pos.to(device), seg.to(device), packed, rows_t.to(device),
                         cols_t.to(device), ids[rows_t, cols_t + 1].to(device),
                         torch.tensor(owner, dtype=torch.long), torch.tensor(win, dtype=torch.long)))
    return Layout(out, 1.0 - real / padded if padded else 0.0, packed)


def packed_layout(windows: Sequence[Window], pad: int, pack_length: int, max_tokens: int, max_size: int,
                  device) -> Layout | None:
    """Windows packed several to a row of ``pack_length`` tokens, rows of similar fill batched
    together; None when no row would hold two windows (nothing to gain)."""
    rows = pack_rows([len(w.ids) for w in windows], max(int(pack_length), 2))
    if not any(len(r) > 1 for r in rows):
        return None
    rows.sort(key=lambda row: sum(len(windows[o].ids) for o in row))
    return _layout(windows, rows, pad, max_tokens, max_size, True, device)


def padded_layout(windows: Sequence[Window], pad: int, max_tokens: int, max_size: int, device) -> Layout:
    """One window per row, rows sorted by length (the layout without packing)."""
    order = sorted(range(len(windows)), key=lambda j: len(windows[j].ids))
    return _layout(windows, [[o] for o in order], pad, max_tokens, max_size, False, device)


def packing_is_exact(layout: Layout, windows: Sequence[Window], pad: int,
                     score: Callable[[Batch], torch.Tensor], device) -> bool:
    """Whether the model keeps packed windows apart: the row holding the most windows, scored
    packed and scored one window per row, gives each window the same NLL (to 1e-3).

    ``score`` maps a batch to the NLL of its predictions (the model's own logits path).
    """
    best = (0, None, 0)
    for b in layout.batches:
        rows = b.rows.cpu()
        for r in range(b.ids.shape[0]):
            n = int(b.win[rows == r].unique().numel())
            if n > best[0]:
                best = (n, b, r)
    _, b, r = best
    mini = b.take(r, r + 1)
    wins = sorted(set(mini.win.tolist()), key=lambda w: len(windows[w].ids))
    alone = _layout(windows, [[w] for w in wins], pad, 2 ** 62, len(wins), False, device)
    ours, ref = {}, {}
    for w, v in zip(mini.win.tolist(), score(mini).tolist()):
        ours.setdefault(w, []).append(v)
    for ab in alone.batches:  # the batch split may put very different lengths apart
        for w, v in zip(ab.win.tolist(), score(ab).tolist()):
            ref.setdefault(w, []).append(v)
    return ours.keys() == ref.keys() and all(
        len(ours[w]) == len(ref[w]) and np.allclose(ours[w], ref[w], rtol=1e-3, atol=1e-3) for w in ours)
