"""Bits per UTF-8 byte, the project's tokenizer-independent per-language cost.

bpb = (total next-token negative log-likelihood in nats) / (ln 2 x UTF-8 bytes), docs/design.md.

Counting conventions
--------------------
* Every segment is scored on its own, starting from the tokenizer's BOS token (EOS when it has
  no BOS), so that the *first* token of a segment is predicted too and every byte of the
  segment is paid for by some prediction. Nothing after the segment (no EOS) is scored.
* A segment longer than ``max_length`` tokens is scored with a sliding window: each window
  scores only tokens not scored before, and keeps ``max_length - stride`` earlier tokens as
  context, so every token after the first window has at least that much context.
* Segments (or windows) are packed, several to a row, by first-fit decreasing: each keeps its
  own positions (``position_ids`` restart at 0) and, with no 2-D attention mask given,
  transformers builds a block-diagonal causal mask from the restarts, so no segment sees another.
  Rows of similar fill are batched together; what padding is left (:attr:`BpbEngine.padding_fraction`)
  is the tail of the last rows. Not every architecture reads positions that way (BLOOM's ALiBi
  comes from the attention mask), so the first scoring compares a packed batch with the same
  windows scored one per row and falls back, with a warning, to length-sorted padded batches
  (about 6% padding on the UDHR default) when they differ. ``pack=False`` asks for the latter.
* The loss is computed at the scored positions only, from the last hidden state and the output
  embedding in chunks, so the vocabulary-sized logits (262k for Gemma) are never held for a
  whole batch (:class:`BpbEngine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import warnings
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BpbEngine", "BpbResult", "bits_per_byte", "corpus_bits_per_byte", "segment_windows"]


@dataclass
class BpbResult:
    """Bits per byte of a list of segments, with per-segment totals for paired bootstraps.

    Attributes
    ----------
    bpb : float
        ``nll_nats / (ln 2 * n_bytes)``.
    nll_nats : float
        Total negative log-likelihood (nats).
    n_bytes : int
        Total UTF-8 bytes.
    n_tokens : int
        Number of scored tokens.
    per_segment_nll : np.ndarray
        NLL sum (nats) of each segment, in input order.
    per_segment_bytes : np.ndarray
        UTF-8 bytes of each segment, in input order.
    """

    bpb: float
    nll_nats: float
    n_bytes: int
    n_tokens: int
    per_segment_nll: np.ndarray = field(repr=False)
    per_segment_bytes: np.ndarray = field(repr=False)

    def subset_bpb(self, idx: Sequence[int] | np.ndarray) -> float:
        """bpb over the segments ``idx`` (e.g. a bootstrap resample of sentence ids)."""
        idx = np.asarray(idx)
        return float(self.per_segment_nll[idx].sum() / (math.log(2) * self.per_segment_bytes[idx].sum()))


def _start_id(tokenizer) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start segments with")


def segment_windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """Sliding windows over ``ids`` (which start with BOS).

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


def bits_per_byte(model, tokenizer, texts: Sequence[str], *, max_length: int = 1024,
                  stride: int | None = None, batch_size: int = 16, max_batch_tokens: int = 4096,
                  device=None) -> BpbResult:
    """Bits per UTF-8 byte of ``texts`` under ``model``.

    Parameters
    ----------
    model : transformers causal LM
    tokenizer
        Hugging Face tokenizer or :class:`empirical.models.ByteTokenizer`.
    texts : sequence of str
        Segments (sentences, lines or documents); each is scored independently from BOS.
    max_length : int
        Longest window in tokens (BOS included).
    stride : int, optional
        New tokens per sliding window step for longer segments (default ``max_length // 2``).
    batch_size : int
        Most windows per forward pass.
    max_batch_tokens : int
        Most padded tokens per forward pass.
    device : optional
        Where inputs go (default: the model's device).

    Returns
    -------
    BpbResult

    Raises
    ------
    ValueError
        Empty ``texts`` or a segment with no bytes.

    Notes
    -----
    To score the same texts under many weight settings use :class:`BpbEngine`, which does the
    tokenization and batching once and can skip unchanged leading blocks.
    """
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise ValueError("no texts given")
    eng = BpbEngine(model, tokenizer, {"texts": texts}, max_length=max_length, stride=stride,
                    batch_size=batch_size, max_batch_tokens=max_batch_tokens, device=device)
    return eng.result("texts", eng.nll())


def corpus_bits_per_byte(model, tokenizer, corpus, languages: Sequence[str] | None = None,
                         **kwargs) -> dict[str, BpbResult]:
    """:func:`bits_per_byte` for each language of an :class:`empirical.corpora.Corpus`."""
    langs = languages if languages is not None else corpus.languages
    return {l: bits_per_byte(model, tokenizer, corpus[l], **kwargs) for l in langs}


# ---- repeated scoring of fixed texts ---------------------------------------------------------

@dataclass
class _Batch:
    ids: torch.Tensor          # (B, L) token ids, padded
    mask: torch.Tensor | None  # (B, L) attention mask of a padded batch; None when packed
    rows: torch.Tensor         # (N,) batch row of each scored prediction
    cols: torch.Tensor         # (N,) position whose hidden state predicts it
    targets: torch.Tensor      # (N,) the predicted token
    owner: torch.Tensor        # (N,) global segment index the prediction belongs to
    pos: torch.Tensor | None = None  # (B, L) position ids of a packed batch (restart per window)
    win: torch.Tensor | None = None  # (N,) window index of each prediction (CPU)

    def inputs(self) -> dict:
        if self.pos is not None:
            return {"input_ids": self.ids, "position_ids": self.pos}
        return {"input_ids": self.ids, "attention_mask": self.mask}

    def take(self, r0: int, r1: int) -> "_Batch":
        """Rows ``r0..r1-1`` as a batch of their own."""
        keep = (self.rows >= r0) & (self.rows < r1)
        kc = keep.cpu()
        return _Batch(self.ids[r0:r1], None if self.mask is None else self.mask[r0:r1],
                      self.rows[keep] - r0, self.cols[keep], self.targets[keep], self.owner[kc],
                      None if self.pos is None else self.pos[r0:r1], self.win[kc])


def _pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
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


class BpbEngine:
    """Per-segment NLL of a fixed set of texts, scored again and again under changing weights.

    Everything that does not depend on the weights is done once: tokenization, windows, batches
    (windows of every language sorted by length together, so padding stays small) and the
    indices of the scored positions. Two further savings keep the result exact:

    * **Output layer.** The loss is computed from the base model's last hidden state, only at
      the scored positions, by a chunked matmul with the output embedding and a fused
      log-sum-exp, never materialising ``batch x length x vocabulary`` logits. The first batch
      is checked against the model's own logits; a model whose head does something else
      (logit scaling of an unknown kind) falls back to the plain ``model(...).logits`` path.
    * **Residual stream reuse.** :meth:`record` scores the texts with the reference weights and
      keeps every decoder block's output. A later :meth:`nll` with ``start_block=b`` replays the
      recorded output of block ``b-1`` instead of running blocks ``0..b-1``: exact whenever
      those blocks still hold the weights they had when recorded, which is checked (a float64
      checksum of their parameters) on every call.

    Parameters
    ----------
    model : transformers causal LM
    tokenizer
    texts : mapping str -> sequence of str
        Segments per key (e.g. per language); each is scored independently from BOS.
    max_length, stride
        As in :func:`bits_per_byte`.
    max_batch_tokens : int
        Most padded tokens per forward pass.
    batch_size : int
        Most windows per forward pass.
    head_chunk : int
        Output-vocabulary rows per matmul of the output layer.
    head_rows : int
        Scored positions per output-layer sweep (memory ``head_rows x head_chunk`` floats).
    max_record_bytes : int
        Refuse to record block outputs beyond this many bytes (then every pass runs in full).
    pack : bool
        Pack several windows per row (module notes); checked on first use, with a fallback.
        The attribute ``packed`` says which layout scoring uses.
    pack_length : int
        Tokens per packed row (a longer window gets a row of its own). Attention within a row
        costs ``pack_length^2`` whatever the mask, so short rows waste less of it.
    """

    def __init__(self, model, tokenizer, texts: Mapping[str, Sequence[str]], *, max_length: int = 1024,
                 stride: int | None = None, max_batch_tokens: int = 4096, batch_size: int = 64,
                 head_chunk: int = 4096, head_rows: int = 4096, device=None, max_record_bytes: int = 2 ** 31,
                 pack: bool = True, pack_length: int = 256):
        if not texts:
            raise ValueError("no texts given")
        self.model = model
        self.keys = list(texts)
        self.device = device or next(model.parameters()).device
        self.head_chunk = int(head_chunk)
        self.head_rows = int(head_rows)
        self.max_record_bytes = int(max_record_bytes)
        stride = stride or max(1, max_length // 2)
        bos = _start_id(tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = bos if pad is None else int(pad)

        self.n_bytes: dict[str, np.ndarray] = {}
        self._slices: dict[str, slice] = {}
        windows: list[tuple[int, list[int], int]] = []  # (global segment, ids, n_context)
        n_seg = 0
        for key in self.keys:
            segs = texts[key]
            if isinstance(segs, str):
                segs = [segs]
            if len(segs) == 0:
                raise ValueError(f"no texts given for {key!r}")
            nb = np.array([len(t.encode("utf-8")) for t in segs], dtype=np.int64)
            if (nb == 0).any():
                raise ValueError(f"segment {int(np.argmin(nb))} of {key!r} is empty; bits per byte is undefined")
            enc = tokenizer(list(segs), add_special_tokens=False)["input_ids"]
            for i, ids in enumerate(enc):
                for w, ctx in segment_windows([bos] + list(ids), max_length, stride):
                    windows.append((n_seg + i, w, ctx))
            self.n_bytes[key] = nb
            self._slices[key] = slice(n_seg, n_seg + len(segs))
            n_seg += len(segs)
        self.n_segments = n_seg

        self._windows, self._pad = windows, pad
        self._batching = (int(max_batch_tokens), int(batch_size))
        self._packed = None
        if pack:
            rows = _pack_rows([len(w) for _, w, _ in windows], max(int(pack_length), 2))
            rows.sort(key=lambda row: sum(len(windows[o][1]) for o in row))
            if any(len(r) > 1 for r in rows):
                self._packed = self._layout(rows, windows, pad, *self._batching, True)
        self._pack_ok: bool | None = None if self._packed is not None else False
        self._use(self._packed if self._packed is not None else self._padded_layout(), self._packed is not None)

        from empirical.models import model_view

        self.blocks = model_view(model).blocks
        self._recorded: list[dict] | None = None      # [block][batch] -> block output
        self._current = 0                               # batch being scored
        self._fingerprints: list[float] | None = None
        self._head_ok: bool | None = None
        self.blocks_run = 0                             # decoder-block evaluations, for benchmarks

    # -- layout ------------------------------------------------------------------------------

    def _layout(self, rows: list[list[int]], windows, pad: int, max_tokens: int, max_size: int,
                packed: bool) -> tuple[list[_Batch], float]:
        """Batches of ``rows`` (each a list of window indices laid end to end), rows taken in
        the given order (sorted by length), and the padding fraction."""
        lengths = [sum(len(windows[o][1]) for o in row) for row in rows]
        out, real, padded = [], 0, 0
        for j, k in _split_batches(lengths, max_tokens, max_size):
            L = max(lengths[j:k])
            ids = torch.full((k - j, L), pad, dtype=torch.long)
            mask = torch.zeros((k - j, L), dtype=torch.long)
            pos = torch.zeros((k - j, L), dtype=torch.long)
            r_idx, c_idx, owner, win = [], [], [], []
            for r, row in enumerate(rows[j:k]):
                o = 0
                for wi in row:
                    seg, w, ctx = windows[wi]
                    ids[r, o: o + len(w)] = torch.tensor(w)
                    mask[r, o: o + len(w)] = 1
                    pos[r, o: o + len(w)] = torch.arange(len(w))
                    n = len(w) - 1 - ctx
                    r_idx += [r] * n
                    c_idx += range(o + ctx, o + len(w) - 1)
                    owner += [seg] * n
                    win += [wi] * n
                    o += len(w)
                    real += len(w)
                pos[r, o:] = torch.arange(L - o)  # padding: a sequence of its own
            padded += (k - j) * L
            rows_t, cols_t = torch.tensor(r_idx, dtype=torch.long), torch.tensor(c_idx, dtype=torch.long)
            out.append(_Batch(ids.to(self.device), None if packed else mask.to(self.device),
                              rows_t.to(self.device), cols_t.to(self.device),
                              ids[rows_t, cols_t + 1].to(self.device), torch.tensor(owner, dtype=torch.long),
                              pos.to(self.device) if packed else None, torch.tensor(win, dtype=torch.long)))
        return out, (1.0 - real / padded if padded else 0.0)

    def _padded_layout(self) -> tuple[list[_Batch], float]:
        """One window per row, rows sorted by length (the layout without packing)."""
        order = sorted(range(len(self._windows)), key=lambda j: len(self._windows[j][1]))
        return self._layout([[o] for o in order], self._windows, self._pad, *self._batching, False)

    def _use(self, layout: tuple[list[_Batch], float], packed: bool) -> None:
        self.batches, self.padding_fraction = layout
        self.packed = packed  # whether scoring uses packed rows (decided at the first scoring)
        self.n_tokens = sum(int(b.targets.numel()) for b in self.batches)
        self._owner = torch.cat([b.owner for b in self.batches]).numpy()

    def _check_pack(self) -> None:
        """Score the packed row holding the most windows both packed and one window per row;
        keep packing only when the two agree (the model honours restarted positions)."""
        best = (0, None, 0)
        for b in self._packed[0]:
            rows = b.rows.cpu()
            for r in range(b.ids.shape[0]):
                n = int(b.win[rows == r].unique().numel())
                if n > best[0]:
                    best = (n, b, r)
        _, b, r = best
        mini = b.take(r, r + 1)
        wins = sorted(set(mini.win.tolist()), key=lambda w: len(self._windows[w][1]))
        alone, _ = self._layout([[w] for w in wins], self._windows, self._pad, 2 ** 62, len(wins), False)
        ours, ref = {}, {}
        for w, v in zip(mini.win.tolist(), self._logits_nll(mini).tolist()):
            ours.setdefault(w, []).append(v)
        for ab in alone:  # the batch split may put very different lengths apart
            for w, v in zip(ab.win.tolist(), self._logits_nll(ab).tolist()):
                ref.setdefault(w, []).append(v)
        ok = ours.keys() == ref.keys() and all(
            len(ours[w]) == len(ref[w]) and np.allclose(ours[w], ref[w], rtol=1e-3, atol=1e-3) for w in ours)
        self._pack_ok = ok
        if not ok:
            warnings.warn(f"{type(self.model).__name__} does not keep packed segments apart through "
                          "restarted position ids; scoring uses padded batches instead", RuntimeWarning,
                          stacklevel=4)
            self._use(self._padded_layout(), False)
            self._packed = None

    # -- helpers -----------------------------------------------------------------------------

    def _fingerprint(self, i: int) -> float:
        return float(sum(p.detach().sum(dtype=torch.float64) for p in self.blocks[i].parameters()))

    def _head_nll(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NLL of ``targets`` given final hidden states ``h`` (N x d): the output projection in
        vocabulary chunks with an online log-sum-exp, so each chunk of the (tied) output
        embedding is read once for all N rows and no N x vocabulary array is formed."""
        head = self.model.get_output_embeddings()
        w = head.weight
        bias = getattr(head, "bias", None)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        h = h.to(w.dtype)

        def logits(rows, v0, v1):
            z = (rows @ w[v0:v1].T).float()
            if bias is not None:
                z += bias[v0:v1].float()
            return torch.tanh(z / cap) * cap if cap else z

        out = []
        for r0 in range(0, h.shape[0], self.head_rows):
            rows, t = h[r0: r0 + self.head_rows], targets[r0: r0 + self.head_rows]
            zt = (rows.float() * w[t].float()).sum(dim=1)
            if bias is not None:
                zt += bias[t].float()
            if cap:
                zt = torch.tanh(zt / cap) * cap
            m = torch.full((rows.shape[0],), -math.inf, device=h.device)
            acc = torch.zeros(rows.shape[0], device=h.device)
            for v0 in range(0, w.shape[0], self.head_chunk):
                z = logits(rows, v0, v0 + self.head_chunk)
                m_new = torch.maximum(m, z.amax(dim=1))
                acc = acc * torch.exp(m - m_new) + z.sub_(m_new[:, None]).exp_().sum(dim=1)
                m = m_new
            out.append(acc.log() + m - zt)
        return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)

    def _logits_nll(self, b: _Batch) -> torch.Tensor:
        logits = self.model(**b.inputs(), use_cache=False).logits
        z = logits[b.rows, b.cols].float()
        return F.cross_entropy(z, b.targets, reduction="none")

    def _hidden(self, b: _Batch) -> torch.Tensor:
        """Final hidden states at the scored positions of batch ``b``."""
        hidden = self.model.base_model(**b.inputs(), use_cache=False).last_hidden_state
        return hidden[b.rows, b.cols]

    def _check_head(self) -> None:
        """Compare the hidden-state head with the model's own logits on two windows."""
        head = self.model.get_output_embeddings()
        b = self.batches[-1]  # the longest rows
        mini = b.take(0, min(2, b.ids.shape[0]))
        ok = isinstance(getattr(head, "weight", None), torch.Tensor) and head.weight.dim() == 2
        if ok:
            ours, ref = self._head_nll(self._hidden(mini), mini.targets), self._logits_nll(mini)
            ok = bool(torch.allclose(ours, ref, rtol=1e-3, atol=1e-3))
        self._head_ok = ok
        if not ok:
            warnings.warn(f"{type(self.model).__name__}: the output layer is not a plain projection "
                          "of the base model's last hidden state; scoring falls back to the full "
                          "logits", RuntimeWarning, stacklevel=4)

    def _score(self) -> np.ndarray:
        """Per-token NLL of every batch, in batch order, under the current weights."""
        if self._pack_ok is None:
            self._check_pack()
        if self._head_ok is None:
            self._check_head()
        parts, pending, pending_t = [], [], []
        for bi, b in enumerate(self.batches):
            self._current = bi
            if not self._head_ok:
                parts.append(self._logits_nll(b))
                continue
            pending.append(self._hidden(b))
            pending_t.append(b.targets)
        if pending:
            parts = [self._head_nll(torch.cat(pending), torch.cat(pending_t))]
        return torch.cat(parts).double().cpu().numpy()

    def _collect(self, nll: np.ndarray) -> dict[str, np.ndarray]:
        seg = np.zeros(self.n_segments, dtype=np.float64)
        np.add.at(seg, self._owner, nll)
        return {k: seg[self._slices[k]].copy() for k in self.keys}

    # -- public --------------------------------------------------------------------------------

    @torch.no_grad()
    def record(self) -> dict[str, np.ndarray]:
        """Score with the current (reference) weights and keep every block's output for reuse.

        Returns the per-segment NLL (nats) per key, like :meth:`nll`.
        """
        width = int(self.model.config.hidden_size) if hasattr(self.model.config, "hidden_size") else 0
        elem = next(self.model.parameters()).element_size()
        need = len(self.blocks) * sum(b.ids.numel() for b in self.batches) * width * elem
        if not width or need > self.max_record_bytes:
            warnings.warn(f"recording block outputs would take {need / 2**20:.0f} MiB "
                          f"(> max_record_bytes); every pass will run all blocks", RuntimeWarning,
                          stacklevel=2)
            return self.nll()
        store: list[dict] = [{} for _ in self.blocks]

        def keep(i, out):  # keyed by batch: the head check may run a batch twice
            store[i][self._current] = _detach(out)

        hooks = [blk.register_forward_hook(lambda _m, _i, out, i=i: keep(i, out))
                 for i, blk in enumerate(self.blocks)]
        try:
            res = self.nll()
        finally:
            for h in hooks:
                h.remove()
        self._recorded = store
        self._fingerprints = [self._fingerprint(i) for i in range(len(self.blocks))]
        return res

    @torch.no_grad()
    def nll(self, start_block: int = 0) -> dict[str, np.ndarray]:
        """Per-segment NLL (nats) per key under the current weights.

        Parameters
        ----------
        start_block : int
            First block to run; blocks before it replay what :meth:`record` saw. The caller
            promises they are unchanged since then, and it is checked.
        """
        start_block = int(start_block)
        if not 0 <= start_block <= len(self.blocks):
            raise ValueError(f"start_block must be in 0..{len(self.blocks)}, got {start_block}")
        if start_block and self._recorded is None:
            start_block = 0  # nothing recorded (or recording refused): run everything
        for i in range(start_block):
            if self._fingerprint(i) != self._fingerprints[i]:
                raise RuntimeError(f"block {i} changed since record(); cannot replay it "
                                   f"(start_block={start_block})")
        replay = self._recorded[start_block - 1] if start_block else None
        for blk in self.blocks[:start_block]:
            blk.forward = lambda *a, **k: replay[self._current]
        try:
            nll = self._score()
            self.blocks_run += (len(self.blocks) - start_block) * len(self.batches)
        finally:
            for blk in self.blocks[:start_block]:
                del blk.forward
        return self._collect(nll)

    def result(self, key: str, nll: Mapping[str, np.ndarray]) -> BpbResult:
        """A :class:`BpbResult` for ``key`` from the output of :meth:`nll`."""
        seg = np.asarray(nll[key], dtype=np.float64)
        nb = self.n_bytes[key]
        sl = self._slices[key]
        n_tok = int(((self._owner >= sl.start) & (self._owner < sl.stop)).sum())
        total = float(seg.sum())
        return BpbResult(total / (math.log(2) * int(nb.sum())), total, int(nb.sum()), n_tok, seg, nb)


def _split_batches(lengths: Sequence[int], max_tokens: int, max_size: int,
                   overhead_tokens: int = 32) -> list[tuple[int, int]]:
    """Split windows sorted by length into contiguous batches ``[j, k)`` that minimise padded
    tokens plus ``overhead_tokens`` per batch (a forward call's fixed cost), under at most
    ``max_size`` windows and ``max_tokens`` padded tokens per batch (a single longer window still
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


def _detach(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detach(o) for o in out)
    return out
