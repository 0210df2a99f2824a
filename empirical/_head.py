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

KL divergence and top-1 agreement without the baseline's logits
----------------------------------------------------------------
With ``p`` the baseline's next-token distribution (hidden state ``h_b``) and ``q`` the current
one (``h_q``), same output layer, no soft-capping:

    KL(p || q) = sum_v p_v (z_b,v - z_q,v) + log Z_q - log Z_b
               = mu . (h_b - h_q) + log Z_q - log Z_b,      mu = sum_v p_v w_v              (1)

(the bias cancels), so the baseline leaves per token only ``log Z_b``, the d-vector ``mu``
(its expected output embedding), the scalar ``c = mu . h_b`` and its argmax
(:class:`HeadReference`, from :meth:`ChunkedHead.reference`, one extra matmul per chunk, once).
Every later sweep (:meth:`ChunkedHead.scores`) already computes ``log Z_q`` and tracks its own
argmax; (1) adds one dot product per token. Under soft-capping ``z = cap tanh(u / cap)`` is not
linear in ``h`` and (1) does not hold: the reference then keeps ``h_b`` and the sweep recomputes
the baseline's capped logits chunk by chunk to accumulate ``sum_v p_v z_q,v`` (twice the
output-layer cost). Both need the output layer unchanged since the reference (checked by a
checksum; the quantizers here leave it alone by default).

``mu`` is also the gradient of the NLL with respect to the logits' input: d NLL / d h =
``mu(h) - w_target`` (no soft-capping), which :meth:`ChunkedHead.hidden_grad` returns for
backward passes that must not hold N x vocabulary logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from empirical.devices import module_device, param_tensor

__all__ = ["ChunkedHead", "HeadReference", "HeadScores", "logits_nll", "scored"]


def scored(h: torch.Tensor, batch) -> torch.Tensor:
    """The rows of ``h`` (B x L x ...) at the scored positions of ``batch``, on ``h``'s device
    (a model spread over several devices hands back its last state where its last block ran)."""
    return h[batch.rows.to(h.device), batch.cols.to(h.device)]


def logits_nll(model, batch) -> torch.Tensor:
    """NLL of the scored predictions of ``batch`` from ``model(...).logits`` (the model's own
    output layer, all positions)."""
    logits = model(**batch.inputs(), use_cache=False).logits
    return F.cross_entropy(scored(logits, batch).float(), batch.targets.to(logits.device), reduction="none")


class HeadReference(NamedTuple):
    """What the baseline's output layer leaves per scored token, for KL and top-1 agreement
    (module notes): ``log_z`` (N,) float64, ``mu`` (N x d) the baseline's expected output
    embedding ``sum_v p_v w_v``, ``c`` (N,) float64 ``mu . h_base``, ``top1`` (N,) the baseline's
    argmax, ``h`` (N x d) the baseline's hidden states (kept only under soft-capping, where
    ``mu`` does not suffice), and ``fingerprint`` of the output layer it was computed with."""

    log_z: torch.Tensor
    mu: torch.Tensor | None
    c: torch.Tensor | None
    top1: torch.Tensor
    h: torch.Tensor | None
    fingerprint: tuple


class HeadScores(NamedTuple):
    """Per scored token: ``nll`` (float32 nats), and against a :class:`HeadReference`, ``kl``
    (float64 nats, KL(baseline || current)) and ``agree`` (bool, same argmax); None without one."""

    nll: torch.Tensor
    kl: torch.Tensor | None
    agree: torch.Tensor | None


class ChunkedHead:
    """Output projection plus cross entropy from final hidden states, in vocabulary chunks.

    Parameters
    ----------
    model : transformers causal LM
        Its ``get_output_embeddings()`` (weight and bias) and ``config.final_logit_softcapping``
        are read at every call, so weight changes are seen. Under accelerate hooks the weight is
        the real one (:func:`empirical.devices.param_tensor`: the hook's weights map when the
        head is offloaded) and the sweep runs on the head's execution device.
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

    def _stored(self):
        """The output layer's real weight and bias (None without one), where they are stored."""
        head = self.model.get_output_embeddings()
        bias = param_tensor(head, "bias") if getattr(head, "bias", None) is not None else None
        return param_tensor(head, "weight"), bias

    def _parts(self):
        """Weight, bias (or None) on the head's execution device, and the soft-cap (or None)."""
        w, bias = self._stored()
        dev = module_device(self.model.get_output_embeddings())
        if dev is not None and w.device != dev:  # offloaded: lent to the execution device
            w, bias = w.to(dev), (bias.to(dev) if bias is not None else None)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return w, bias, (float(cap) if cap else None)

    def fingerprint(self) -> tuple[float, ...]:
        """Checksum of the output layer's weight (and bias): the sum and the Euclidean norm, in
        the weight's own dtype, neither of which allocates a copy (deterministic for the same
        tensor; about 40 ms for Gemma's 262k x 640 embedding, against 1.2 s for a float64 sum).
        Taken where the weight is stored (CPU memory when the head is offloaded)."""
        w, bias = self._stored()
        parts = [w.detach()] + ([bias.detach()] if bias is not None else [])
        return tuple(float(x) for p in parts for x in (p.sum(), torch.linalg.vector_norm(p)))

    def _sweep(self, rows: torch.Tensor, t: torch.Tensor, want_mu: bool, ref: HeadReference | None, r0: int,
               parts=None):
        """One pass over the vocabulary for ``rows`` (n x d): log Z, the target's logit, the
        argmax, and on request ``sum_v e_v w_v`` (``want_mu``) or, with a soft-capped
        ``ref``, ``sum_v p_v z_v``. ``parts``: :meth:`_parts`, when the caller has them."""
        w, bias, cap = parts or self._parts()

        def logits(h, v0):
            z = (h @ w[v0: v0 + self.chunk].T).float()
            if bias is not None:
                z += bias[v0: v0 + self.chunk].float()
            return torch.tanh(z / cap) * cap if cap else z

        n = rows.shape[0]
        zt = (rows.float() * w[t].float()).sum(dim=1)
        if bias is not None:
            zt += bias[t].float()
        if cap:
            zt = torch.tanh(zt / cap) * cap
        m = torch.full((n,), -math.inf, device=rows.device)
        acc = torch.zeros(n, device=rows.device)
        best = torch.zeros(n, dtype=torch.long, device=rows.device)
        mu = torch.zeros(n, w.shape[1], device=rows.device) if want_mu else None
        ep = torch.zeros(n, dtype=torch.float64, device=rows.device) if (ref is not None and cap) else None
        if ep is not None:
            hb, lzb = ref.h[r0: r0 + n].to(w.dtype), ref.log_z[r0: r0 + n]
        for v0 in range(0, w.shape[0], self.chunk):
            z = logits(rows, v0)
            if ep is not None:  # sum_v p_v z_v with the baseline's capped logits recomputed
                pb = (logits(hb, v0).double() - lzb[:, None]).exp_()
                ep += (pb * z.double()).sum(dim=1)
            zmax, arg = z.max(dim=1)
            best = torch.where(zmax > m, arg + v0, best)
            m_new = torch.maximum(m, zmax)
            scale = torch.exp(m - m_new)
            e = z.sub_(m_new[:, None]).exp_()
            acc = acc * scale + e.sum(dim=1)
            if mu is not None:
                mu = mu * scale[:, None] + e @ w[v0: v0 + self.chunk].float()
            m = m_new
        log_z = acc.double().log() + m.double()
        return log_z, zt, best, (mu / acc[:, None] if mu is not None else None), ep

    def nll(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NLL (nats, float32) of ``targets`` (N,) given final hidden states ``h`` (N x d)."""
        return self.scores(h, targets).nll

    def scores(self, h: torch.Tensor, targets: torch.Tensor, ref: HeadReference | None = None,
               check: bool = True) -> HeadScores:
        """NLL of ``targets`` given ``h``, and with ``ref`` the KL divergence from the baseline
        and top-1 agreement with it, eq. (1), in the same vocabulary sweep. ``check`` compares
        the output layer's checksum with the reference's (callers that did may skip it).

        Raises
        ------
        ValueError
            ``ref`` describes another number of tokens, or the output layer changed since it.
        """
        parts = self._parts()
        w, _, cap = parts
        if ref is not None:
            if ref.log_z.shape[0] != h.shape[0]:
                raise ValueError(f"the reference holds {ref.log_z.shape[0]} tokens, the hidden states {h.shape[0]}")
            if check and self.fingerprint() != ref.fingerprint:
                raise ValueError("the output layer changed since the reference was taken; KL needs the same one")
        h, targets = h.to(device=w.device, dtype=w.dtype), targets.to(w.device)
        nll, kl, agree = [], [], []
        for r0 in range(0, h.shape[0], self.rows):
            rows, t = h[r0: r0 + self.rows], targets[r0: r0 + self.rows]
            log_z, zt, best, _, ep = self._sweep(rows, t, False, ref, r0, parts)
            nll.append((log_z - zt.double()).float())
            if ref is not None:
                sl = slice(r0, r0 + rows.shape[0])
                if cap:  # KL = E_p[z_b] - log Z_b - E_p[z_q] + log Z_q, E_p[z_b] = ref.c
                    kl.append(ref.c[sl] - ep + log_z - ref.log_z[sl])
                else:
                    kl.append(ref.c[sl] - (ref.mu[sl].double() * rows.double()).sum(dim=1) + log_z - ref.log_z[sl])
                agree.append(best == ref.top1[sl])
        if not nll:
            empty = h.new_zeros(0, dtype=torch.float32)
            return HeadScores(empty, empty.double() if ref is not None else None,
                              empty.bool() if ref is not None else None)
        cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
        return HeadScores(torch.cat(nll), cat(kl), cat(agree))

    def reference(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, HeadReference]:
        """NLL of ``targets`` given the baseline's hidden states ``h``, and the
        :class:`HeadReference` that later :meth:`scores` calls measure KL and agreement against."""
        parts = self._parts()
        w, _, cap = parts
        h, targets = h.to(device=w.device, dtype=w.dtype), targets.to(w.device)
        nll, log_zs, mus, cs, tops = [], [], [], [], []
        for r0 in range(0, h.shape[0], self.rows):
            rows, t = h[r0: r0 + self.rows], targets[r0: r0 + self.rows]
            log_z, zt, best, mu, _ = self._sweep(rows, t, True, None, r0, parts)
            nll.append((log_z - zt.double()).float())
            log_zs.append(log_z)
            tops.append(best)
            if cap:  # E_p[z_b] directly: sum_v p_v z_v, from a second sweep over the same rows
                ref = HeadReference(log_z, None, None, best, rows, ())
                cs.append(self._sweep(rows, t, False, ref, 0, parts)[4])
            else:
                mus.append(mu)
                cs.append((mu.double() * rows.double()).sum(dim=1))
        cat = lambda xs, like: torch.cat(xs) if xs else like  # noqa: E731
        empty = h.new_zeros(0, dtype=torch.float64)
        ref = HeadReference(cat(log_zs, empty), None if cap else cat(mus, h.new_zeros(0, h.shape[1])),
                            cat(cs, empty), cat(tops, empty.long()), h.detach().clone() if cap else None,
                            self.fingerprint())
        return cat(nll, empty.float()), ref

    def hidden_grad(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL of ``targets`` (N,) and its gradient with respect to ``h`` (N x d), without
        autograd through the output layer: ``sum_v p_v w_v - w_target`` (module notes), times
        the soft-cap's derivative where there is one (computed then from the full chunk).

        Returns ``(nll, grad)``; ``grad`` has ``h``'s dtype and device (the sweep runs on the
        head's execution device).
        """
        parts = self._parts()
        w, bias, cap = parts
        home = h.device
        h, targets = h.detach().to(device=w.device, dtype=w.dtype), targets.to(w.device)
        if cap:  # d z_v / d u_v = 1 - tanh^2(u_v / cap): chain rule per chunk, exact, slower
            out_nll, out_g = [], []
            for r0 in range(0, h.shape[0], self.rows):
                rows, t = h[r0: r0 + self.rows], targets[r0: r0 + self.rows]
                log_z, zt, _, _, _ = self._sweep(rows, t, False, None, r0, parts)
                g = torch.zeros_like(rows, dtype=torch.float32)
                for v0 in range(0, w.shape[0], self.chunk):
                    u = (rows @ w[v0: v0 + self.chunk].T).float()
                    if bias is not None:
                        u += bias[v0: v0 + self.chunk].float()
                    th = torch.tanh(u / cap)
                    p = (th * cap - log_z.float()[:, None]).exp()
                    g += (p * (1 - th * th)) @ w[v0: v0 + self.chunk].float()
                ut = (rows.float() * w[t].float()).sum(dim=1) + (bias[t].float() if bias is not None else 0)
                g -= (1 - torch.tanh(ut / cap) ** 2)[:, None] * w[t].float()
                out_nll.append((log_z - zt.double()).float())
                out_g.append(g)
            return torch.cat(out_nll), torch.cat(out_g).to(device=home, dtype=w.dtype)
        nll, ref = self.reference(h, targets)
        return nll, (ref.mu - w[targets].float()).to(device=home, dtype=w.dtype)

    def agrees(self, h: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor) -> bool:
        """Whether :meth:`nll` reproduces ``reference`` (the model's own NLL of the same
        predictions) to 1e-3."""
        if not self.is_projection:
            return False
        ours = self.nll(h, targets)
        return bool(torch.allclose(ours, reference.to(ours.device), rtol=1e-3, atol=1e-3))
