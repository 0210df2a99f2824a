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
* Beside the NLL, :meth:`BpbEngine.score` returns, per segment, the KL divergence from the
  recorded baseline's next-token distribution to the current one (summed over scored tokens,
  nats) and the number of tokens whose argmax agrees with the baseline's, both from the same
  vocabulary sweep (:mod:`empirical._head`, eq. (1)); ``KL / (ln 2 x bytes)`` is KL bits per
  byte (docs/design.md, "KL bits per byte").

:class:`BpbEngine` puts three parts together, each a module of its own: the layout of windows
into packed rows and batches with the packing check (:mod:`empirical._packing`), the chunked
output layer with its check against the model's logits (:mod:`empirical._head`), and the replay
of a recorded residual stream through explicitly called decoder blocks (:mod:`empirical._replay`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from empirical._head import ChunkedHead, HeadReference, logits_nll, scored
from empirical._packing import Batch, Layout, Window, packed_layout, packing_is_exact, padded_layout, segment_windows
from empirical._replay import ResidualReplay
from empirical.devices import resolve_device

__all__ = ["BpbEngine", "BpbResult", "Scores", "bits_per_byte", "corpus_bits_per_byte", "segment_windows"]


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


@dataclass
class Scores:
    """Per-segment scores of one pass, per key (e.g. language), in input order.

    Attributes
    ----------
    nll : dict str -> np.ndarray
        NLL sum (nats) of each segment.
    kl : dict str -> np.ndarray, or None
        KL(baseline || current) summed over each segment's scored tokens (nats); None when the
        engine holds no baseline reference (:attr:`BpbEngine.kl_unavailable` says why).
    agree : dict str -> np.ndarray, or None
        Scored tokens of each segment whose argmax equals the baseline's.
    """

    nll: dict[str, np.ndarray]
    kl: dict[str, np.ndarray] | None = None
    agree: dict[str, np.ndarray] | None = None


def _start_id(tokenizer) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start segments with")


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
        Where inputs go; None, ``"auto"`` or ``"offload"``: the model's execution device (as in
        :class:`BpbEngine`).

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
    langs = [corpus.key(l) for l in languages] if languages is not None else corpus.languages
    return {l: bits_per_byte(model, tokenizer, corpus[l], **kwargs) for l in langs}


# ---- repeated scoring of fixed texts ---------------------------------------------------------

class BpbEngine:
    """Per-segment NLL of a fixed set of texts, scored again and again under changing weights.

    Everything that does not depend on the weights is done once: tokenization, windows, packed
    rows and batches (:mod:`empirical._packing`) and the indices of the scored positions. Two
    further savings keep the result exact:

    * **Output layer.** The loss is computed from the base model's last hidden state, only at
      the scored positions, by a chunked matmul with the output embedding and an online
      log-sum-exp (:class:`empirical._head.ChunkedHead`), never materialising
      ``batch x length x vocabulary`` logits. At the first scoring it is checked against the
      model's own logits; a model whose head does something else (logit scaling of an unknown
      kind) is scored from ``model(...).logits`` instead.
    * **Residual stream reuse.** :meth:`record` scores the texts with the reference weights and
      keeps the residual stream entering every decoder block. A later :meth:`nll` with
      ``start_block=b`` starts from the recorded stream entering block ``b`` and calls blocks
      ``b..n-1``, the final norm and the head directly (:class:`empirical._replay.ResidualReplay`):
      exact whenever blocks ``0..b-1`` still hold the weights they had when recorded, which is
      checked (a float64 checksum of their parameters) on every call, and checked once at
      recording against the model's own pass.

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
        Most rows per forward pass.
    head_chunk : int
        Output-vocabulary rows per matmul of the output layer.
    head_rows : int
        Scored positions per output-layer sweep (memory ``head_rows x head_chunk`` floats).
    device : optional
        Where inputs go; None, ``"auto"`` or ``"offload"``: the model's execution device
        (:func:`empirical.devices.execution_device`, also for a model dispatched over several
        devices or offloaded by accelerate).
    max_record_bytes : int
        Refuse to record the residual stream beyond this many bytes (then every pass runs in full).
    pack : bool
        Pack several windows per row (module notes); checked on first use, with a fallback.
    pack_length : int
        Tokens per packed row (a longer window gets a row of its own). Attention within a row
        costs ``pack_length^2`` whatever the mask, so short rows waste less of it.

    Attributes
    ----------
    keys : list of str
        The keys of ``texts``, in order.
    n_bytes : dict str -> np.ndarray
        UTF-8 bytes of every segment, per key.
    n_segments : int
        Segments over all keys.
    blocks : list of nn.Module
        The model's decoder blocks.
    blocks_run : int
        Decoder-block evaluations so far (for benchmarks).
    """

    def __init__(self, model, tokenizer, texts: Mapping[str, Sequence[str]], *, max_length: int = 1024,
                 stride: int | None = None, max_batch_tokens: int = 4096, batch_size: int = 64,
                 head_chunk: int = 4096, head_rows: int = 4096, device=None, max_record_bytes: int = 2 ** 31,
                 pack: bool = True, pack_length: int = 256):
        if not texts:
            raise ValueError("no texts given")
        self.model = model
        self.keys = list(texts)
        # where inputs go: the input embedding's execution device (also under accelerate hooks,
        # where parameters may sit on meta), unless given
        self.device = resolve_device(model, device)
        self.max_record_bytes = int(max_record_bytes)
        self.n_bytes: dict[str, np.ndarray] = {}
        self._slices: dict[str, slice] = {}
        self._windows = self._tokenize(tokenizer, texts, max_length, stride or max(1, max_length // 2))
        self._pad = _pad_id(tokenizer)
        self._batching = (int(max_batch_tokens), int(batch_size))

        layout = packed_layout(self._windows, self._pad, pack_length, *self._batching, self.device) if pack else None
        self._layout: Layout = layout or padded_layout(self._windows, self._pad, *self._batching, self.device)
        self._head = ChunkedHead(model, head_chunk, head_rows)
        self._replay = ResidualReplay(model)
        self.blocks = self._replay.blocks
        self.blocks_run = 0
        self._packing_exact: bool | None = None
        self._head_exact: bool | None = None
        self._replay_unavailable: str | None = None
        self._reference: HeadReference | None = None
        self._kl_unavailable: str | None = "record() has not been called"
        self._baseline_recorded = False

    def _tokenize(self, tokenizer, texts, max_length: int, stride: int) -> list[Window]:
        bos = _start_id(tokenizer)
        windows: list[Window] = []
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
                    windows.append(Window(n_seg + i, w, ctx))
            self.n_bytes[key] = nb
            self._slices[key] = slice(n_seg, n_seg + len(segs))
            n_seg += len(segs)
        self.n_segments = n_seg
        return windows

    # -- what the first scoring decides ------------------------------------------------------

    @property
    def batches(self) -> list[Batch]:
        """The batches scoring uses (packed rows, or one window per row)."""
        return self._layout.batches

    @property
    def packed(self) -> bool:
        """Whether scoring uses packed rows (decided at the first scoring)."""
        return self._layout.packed

    @property
    def padding_fraction(self) -> float:
        """Share of the tokens in the batches that are padding."""
        return self._layout.padding_fraction

    @property
    def n_tokens(self) -> int:
        """Scored tokens per pass."""
        return self._layout.n_tokens

    @property
    def packing_exact(self) -> bool | None:
        """Whether packed rows gave each window the NLL it has alone (checked at the first
        scoring; False means padded batches are used); None before, or when nothing was packed."""
        return self._packing_exact

    @property
    def head_exact(self) -> bool | None:
        """Whether the chunked output layer reproduced the model's logits (checked at the first
        scoring; False means scoring uses ``model(...).logits``); None before."""
        return self._head_exact

    @property
    def recorded(self) -> bool:
        """Whether :meth:`record` kept a residual stream that :meth:`nll` can replay."""
        return self._replay.recorded

    @property
    def replay_unavailable(self) -> str | None:
        """Why :meth:`record` kept nothing to replay (every pass then runs in full); None when it
        did or has not been called."""
        return self._replay_unavailable

    @property
    def baseline_recorded(self) -> bool:
        """Whether :meth:`record` has run (so :meth:`score` has a baseline to measure KL against,
        unless :attr:`kl_unavailable` says otherwise)."""
        return self._baseline_recorded

    @property
    def kl_unavailable(self) -> str | None:
        """Why :meth:`score` returns no KL and agreement (None when it does)."""
        return self._kl_unavailable

    @property
    def tokens(self) -> dict[str, np.ndarray]:
        """Scored tokens of every segment, per key."""
        count = np.bincount(self._layout.owner, minlength=self.n_segments)
        return {k: count[self._slices[k]].copy() for k in self.keys}

    def position_keys(self, batch: Batch) -> torch.Tensor:
        """Index into :attr:`keys` of the text every token of ``batch`` belongs to.

        A token's key is that of its window's segment (``batch.seg`` holds the window, -1 for
        padding). Attention never crosses windows, so a token's hidden states, and the gradient
        of the total NLL with respect to them, involve only its own window's text.

        Returns
        -------
        torch.Tensor
            ``(B, L)`` long, on the batch's device: the key index of each token, -1 for padding.
        """
        seg_key = np.full(self.n_segments, -1, dtype=np.int64)
        for i, k in enumerate(self.keys):
            seg_key[self._slices[k]] = i
        win_key = torch.from_numpy(seg_key[[w.segment for w in self._windows]]).to(batch.seg.device)
        out = torch.full_like(batch.seg, -1)
        real = batch.seg >= 0
        out[real] = win_key[batch.seg[real]]
        return out

    def _check_first_use(self) -> None:
        """Packing check, then head check; each runs once."""
        if self._layout.packed and self._packing_exact is None:
            score = lambda b: logits_nll(self.model, b)  # noqa: E731
            self._packing_exact = packing_is_exact(self._layout, self._windows, self._pad, score, self.device)
            if not self._packing_exact:
                warnings.warn(f"{type(self.model).__name__} does not keep packed segments apart through "
                              "restarted position ids; scoring uses padded batches instead", RuntimeWarning,
                              stacklevel=4)
                self._layout = padded_layout(self._windows, self._pad, *self._batching, self.device)
        if self._head_exact is None:
            b = self.batches[-1]  # the longest rows
            mini = b.take(0, min(2, b.ids.shape[0]))
            h = scored(self._replay.model_pass(mini)[0], mini)
            self._head_exact = self._head.agrees(h, mini.targets, logits_nll(self.model, mini))
            if not self._head_exact:
                warnings.warn(f"{type(self.model).__name__}: the output layer is not a plain projection "
                              "of the base model's last hidden state; scoring falls back to the full "
                              "logits", RuntimeWarning, stacklevel=4)

    # -- scoring -----------------------------------------------------------------------------

    def _collect(self, per_token: torch.Tensor) -> dict[str, np.ndarray]:
        """Per-token values in batch order -> per-segment sums per key."""
        seg = np.zeros(self.n_segments, dtype=np.float64)
        np.add.at(seg, self._layout.owner, per_token.double().cpu().numpy())
        return {k: seg[self._slices[k]].copy() for k in self.keys}

    def _targets(self) -> torch.Tensor:
        return torch.cat([b.targets for b in self.batches])

    @torch.no_grad()
    def record(self) -> dict[str, np.ndarray]:
        """Score with the current (reference) weights, keep the residual stream entering every
        block for :meth:`nll` to replay, and keep the baseline's per-token head statistics that
        :meth:`score` measures KL and top-1 agreement against.

        Returns the per-segment NLL (nats) per key, like :meth:`nll`. When replay is not possible
        (:attr:`replay_unavailable` says why, and a warning is issued) no stream is kept and
        every later pass runs all blocks; the head statistics are kept all the same.
        """
        self._check_first_use()
        reason = self._replay.unsupported
        if reason is None and not self._head_exact:
            reason = "the output layer is scored from the model's own logits, not from hidden states"
        need = self._replay.record_bytes(self.batches)
        if reason is None and need > self.max_record_bytes:
            reason = f"recording would take {need / 2**20:.0f} MiB (> max_record_bytes)"
        if reason is None:
            finals = self._replay.record(self.batches)
            self.blocks_run += len(self.blocks) * len(self.batches)
            last = len(self.batches) - 1
            reason = self._replay.verify(last, self.batches[last], finals[last])
            if reason is not None:
                self._replay.forget()
        elif self._head_exact:
            finals = [scored(self._replay.model_pass(b)[0], b) for b in self.batches]
            self.blocks_run += len(self.blocks) * len(self.batches)
        if self._head_exact:
            nll_tok, self._reference = self._head.reference(torch.cat(finals), self._targets())
            self._kl_unavailable = None
            nll = self._collect(nll_tok)
        else:
            nll = self.nll()
            self._kl_unavailable = "the output layer is scored from the model's own logits"
        self._baseline_recorded = True
        if reason is not None and reason != self._replay_unavailable:  # once, however often retried
            warnings.warn(f"{type(self.model).__name__}: no residual stream kept for replay ({reason}); "
                          "every pass will run all blocks", RuntimeWarning, stacklevel=3)
        self._replay_unavailable = reason
        return nll

    @torch.no_grad()
    def nll(self, start_block: int = 0) -> dict[str, np.ndarray]:
        """Per-segment NLL (nats) per key under the current weights (:meth:`score` without the
        KL and agreement)."""
        return self.score(start_block, against_reference=False).nll

    @torch.no_grad()
    def score(self, start_block: int = 0, against_reference: bool = True) -> Scores:
        """Per-segment NLL, and (after :meth:`record`) KL from the baseline and top-1 agreement
        with it, per key, under the current weights.

        Parameters
        ----------
        start_block : int
            First block to run; blocks before it are replayed from what :meth:`record` kept. The
            caller promises they are unchanged since then, and it is checked. Without a recorded
            stream (:attr:`recorded` False) every block runs.
        against_reference : bool
            Also measure KL and agreement (when a reference is held and the output layer is
            unchanged since :meth:`record`; else they are None and :attr:`kl_unavailable` says
            why).

        Raises
        ------
        ValueError
            ``start_block`` outside ``0..len(blocks)``.
        RuntimeError
            A block before ``start_block`` changed since :meth:`record`.
        """
        start_block = int(start_block)
        if not 0 <= start_block <= len(self.blocks):
            raise ValueError(f"start_block must be in 0..{len(self.blocks)}, got {start_block}")
        if not self.recorded:
            start_block = 0
        self._replay.check_unchanged(start_block)
        self._check_first_use()
        ref = self._reference if against_reference else None
        if ref is not None:
            if self._head.fingerprint() != ref.fingerprint:
                self._kl_unavailable = "the output layer changed since record(); KL needs the baseline's"
                ref = None
            else:
                self._kl_unavailable = None
        self.blocks_run += (len(self.blocks) - start_block) * len(self.batches)
        if not self._head_exact:
            return Scores(self._collect(torch.cat([logits_nll(self.model, b) for b in self.batches])))
        h = [scored(self._replay.final_hidden(i, b, start_block), b) for i, b in enumerate(self.batches)]
        s = self._head.scores(torch.cat(h), self._targets(), ref, check=False)
        if ref is None:
            return Scores(self._collect(s.nll))
        return Scores(self._collect(s.nll), self._collect(s.kl), self._collect(s.agree))

    def result(self, key: str, nll: Mapping[str, np.ndarray]) -> BpbResult:
        """A :class:`BpbResult` for ``key`` from the output of :meth:`nll`."""
        seg = np.asarray(nll[key], dtype=np.float64)
        nb = self.n_bytes[key]
        sl = self._slices[key]
        owner = self._layout.owner
        n_tok = int(((owner >= sl.start) & (owner < sl.stop)).sum())
        total = float(seg.sum())
        return BpbResult(total / (math.log(2) * int(nb.sum())), total, int(nb.sum()), n_tok, seg, nb)


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return _start_id(tokenizer) if pad is None else int(pad)
