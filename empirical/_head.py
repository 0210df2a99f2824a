"""The output layer at the scored positions only, for :class:`empirical.bpb.BpbEngine`.

The NLL of target ``t`` given a final hidden state ``h`` is ``logsumexp_v z_v - z_t`` with
``z = W h (+ b)``, soft-capped to ``cap * tanh(z / cap)`` where the config asks for it (Gemma's
``final_logit_softcapping``). :class:`ChunkedHead` computes it for N scored positions at once,
sweeping the vocabulary in chunks with an online log-sum-exp (running maximum ``m`` and
``sum exp(z - m)``, rescaled when ``m`` grows), so each chunk of the (often tied) output
embedding is read once for all N rows and no N x vocabulary array (262k wide for Gemma) is ever
formed.

A model whose head does something else (another kind of logit scaling) would be scored wrongly,
so the engine compares :meth:`ChunkedHead.nll` with :func:`logits_nll`, the model's own logits,
on the first batch it scores, and falls back to the latter when they differ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ChunkedHead", "logits_nll"]


def logits_nll(model, batch) -> torch.Tensor:
    """NLL of the scored predictions of ``batch`` from ``model(...).logits`` (the model's own
    output layer, all positions)."""
    logits = model(**batch.inputs(), use_cache=False).logits
    return F.cross_entropy(logits[batch.rows, batch.cols].float(), batch.targets, reduction="none")


class ChunkedHead:
    """Output projection plus cross entropy from final hidden states, in vocabulary chunks.

    Parameters
    ----------
    model : transformers causal LM
        Its ``get_output_embeddings()`` (weight and bias) and ``config.final_logit_softcapping``
        are read at every call, so weight changes are seen.
    chunk : int
        Vocabulary rows per matmul.
    rows : int
        Hidden states per vocabulary sweep (memory ``rows x chunk`` floats).
    """

    def __init__(self, model, chunk: int = 4096, rows: int = 4096):
        self.model = model
        self.chunk = int(chunk)
        self.rows = int(rows)

    @property
    def is_projection(self) -> bool:
        """Whether the output layer has a 2-d weight this class can apply."""
        w = getattr(self.model.get_output_embeddings(), "weight", None)
        return isinstance(w, torch.Tensor) and w.dim() == 2

    def nll(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NLL (nats, float32) of ``targets`` (N,) given final hidden states ``h`` (N x d)."""
        head = self.model.get_output_embeddings()
        w = head.weight
        bias = getattr(head, "bias", None)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        h = h.to(w.dtype)

        def capped(z):
            return torch.tanh(z / cap) * cap if cap else z

        out = []
        for r0 in range(0, h.shape[0], self.rows):
            rows, t = h[r0: r0 + self.rows], targets[r0: r0 + self.rows]
            zt = (rows.float() * w[t].float()).sum(dim=1)
            if bias is not None:
                zt += bias[t].float()
            zt = capped(zt)
            m = torch.full((rows.shape[0],), -math.inf, device=h.device)
            acc = torch.zeros(rows.shape[0], device=h.device)
            for v0 in range(0, w.shape[0], self.chunk):
                z = (rows @ w[v0: v0 + self.chunk].T).float()
                if bias is not None:
                    z += bias[v0: v0 + self.chunk].float()
                z = capped(z)
                m_new = torch.maximum(m, z.amax(dim=1))
                acc = acc * torch.exp(m - m_new) + z.sub_(m_new[:, None]).exp_().sum(dim=1)
                m = m_new
            out.append(acc.log() + m - zt)
        return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)

    def agrees(self, h: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor) -> bool:
        """Whether :meth:`nll` reproduces ``reference`` (the model's own NLL of the same
        predictions) to 1e-3."""
        return self.is_projection and bool(torch.allclose(self.nll(h, targets), reference, rtol=1e-3, atol=1e-3))
