"""Bits per UTF-8 byte, the project's tokenizer-independent per-language cost.

bpb = (total next-token negative log-likelihood in nats) / (ln 2 x UTF-8 bytes), DESIGN.md.

Counting conventions
--------------------
* Every segment is scored on its own, starting from the tokenizer's BOS token (EOS when it has
  no BOS), so that the *first* token of a segment is predicted too and every byte of the
  segment is paid for by some prediction. Nothing after the segment (no EOS) is scored.
* A segment longer than ``max_length`` tokens is scored with a sliding window: each window
  scores only tokens not scored before, and keeps ``max_length - stride`` earlier tokens as
  context, so every token after the first window has at least that much context.
* Segments (or windows) are sorted by length and batched under a budget of logits elements, so
  padding is small and the vocabulary-sized logits (262k for Gemma) stay bounded in memory.
  Segments are never packed into one sequence, because that would let them attend to each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BpbResult", "bits_per_byte", "corpus_bits_per_byte", "segment_windows"]


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


@torch.no_grad()
def bits_per_byte(model, tokenizer, texts: Sequence[str], *, max_length: int = 1024,
                  stride: int | None = None, batch_size: int = 16,
                  max_logits_elements: int = 2 ** 27, device=None) -> BpbResult:
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
    max_logits_elements : int
        Bound on ``batch x length x vocabulary`` per forward pass (memory of the logits).
    device : optional
        Where inputs go (default: the model's device).

    Returns
    -------
    BpbResult

    Raises
    ------
    ValueError
        Empty ``texts`` or a segment with no bytes.
    """
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise ValueError("no texts given")
    n_bytes = np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)
    if (n_bytes == 0).any():
        raise ValueError(f"segment {int(np.argmin(n_bytes))} is empty; bits per byte is undefined")
    stride = stride or max(1, max_length // 2)
    device = device or next(model.parameters()).device
    bos = _start_id(tokenizer)
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    windows: list[tuple[int, list[int], int]] = []
    for i, ids in enumerate(enc):
        for w, ctx in segment_windows([bos] + list(ids), max_length, stride):
            windows.append((i, w, ctx))
    order = sorted(range(len(windows)), key=lambda j: len(windows[j][1]))
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else 1
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = bos if pad is None else int(pad)

    nll = np.zeros(len(texts), dtype=np.float64)
    n_tok = 0
    j = 0
    while j < len(order):
        # Grow the batch while the padded logits stay under the memory budget.
        k = j + 1
        while (k < len(order) and k - j < batch_size
               and (k - j + 1) * len(windows[order[k]][1]) * vocab <= max_logits_elements):
            k += 1
        batch = [windows[o] for o in order[j:k]]
        L = max(len(w) for _, w, _ in batch)
        ids = torch.full((len(batch), L), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        score = torch.zeros((len(batch), L - 1), dtype=torch.bool)
        for r, (_, w, ctx) in enumerate(batch):
            ids[r, : len(w)] = torch.tensor(w)
            mask[r, : len(w)] = 1
            score[r, ctx: len(w) - 1] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        lp = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:].to(device),
                             reduction="none")
        lp = (lp * score.to(device)).sum(dim=1).double().cpu().numpy()
        for r, (seg, _, _) in enumerate(batch):
            nll[seg] += lp[r]
        n_tok += int(score.sum())
        j = k
    total, nb = float(nll.sum()), int(n_bytes.sum())
    return BpbResult(total / (math.log(2) * nb), total, nb, n_tok, nll, n_bytes)


def corpus_bits_per_byte(model, tokenizer, corpus, languages: Sequence[str] | None = None,
                         **kwargs) -> dict[str, BpbResult]:
    """:func:`bits_per_byte` for each language of an :class:`empirical.corpora.Corpus`."""
    langs = languages if languages is not None else corpus.languages
    return {l: bits_per_byte(model, tokenizer, corpus[l], **kwargs) for l in langs}
