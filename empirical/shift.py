"""How far quantization moves the distribution of each block's output activations.

For one language and one decoder block, let ``x`` be the baseline model's block-output hidden
states and ``y`` the quantized model's, on the same text: every position except the first (BOS,
see :func:`capture_block_outputs`) and every hidden dimension, pooled into one sample each.

Histogram KL
------------
The bins are fixed by the baseline alone and used for both samples: the interior edges are the
baseline's quantiles ``e_j = Q_x(j / B)``, ``j = 1..B-1`` (duplicates removed, so discrete data
gives fewer, wider bins), and the outermost bins are open (``(-inf, e_1)`` and ``[e_{B-1}, inf)``),
so a quantized value outside the baseline's range is counted in an end bin, never dropped. The
baseline's histogram is then close to uniform, and the divergence measures where the quantized
model moves mass relative to the baseline's own quantiles. With counts ``c`` (baseline) and ``k``
(quantized) over the ``B`` bins and an additive pseudo-count ``eps`` per bin,

    P_i = (c_i + eps) / (sum c + B eps),   Q_i = (k_i + eps) / (sum k + B eps),
    KL(P || Q) = sum_i P_i log2(P_i / Q_i)   [bits].

Moments
-------
Population (biased) moments in float64: mean, standard deviation ``sqrt(m2)``, skewness
``m3 / m2^{3/2}``, excess kurtosis ``m4 / m2^2 - 3`` (``m_k`` the k-th central moment; the same as
``scipy.stats.skew`` and ``scipy.stats.kurtosis`` with ``bias=True``) and the largest magnitude
``max |x|``. A moment shift is quantized minus baseline.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["quantile_edges", "histogram_counts", "histogram_kl", "activation_kl", "moments",
           "moment_shift", "capture_block_outputs", "MOMENTS", "DEFAULT_BINS", "DEFAULT_EPS"]

MOMENTS = ("mean", "std", "skewness", "excess_kurtosis", "max_abs")
DEFAULT_BINS = 100
DEFAULT_EPS = 0.5


def _sample(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _check_bins(bins) -> int:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    return int(bins)


def _check_eps(eps) -> float:
    e = float(eps)
    if not np.isfinite(e) or e <= 0:
        raise ValueError(f"eps (the pseudo-count per bin) must be finite and > 0, got {eps!r}")
    return e


def quantile_edges(baseline, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Interior bin edges at the baseline's quantiles ``j / bins``, ``j = 1..bins-1``.

    Parameters
    ----------
    baseline : array_like
        The baseline sample (any shape; flattened). Finite, non-empty.
    bins : int
        Number of bins ``B >= 2`` before duplicate edges are merged.

    Returns
    -------
    np.ndarray
        Strictly increasing float64 edges (at most ``B - 1``; fewer when quantiles coincide). The
        bins are ``(-inf, e_1), [e_1, e_2), ..., [e_last, inf)``.
    """
    a = _sample(baseline, "baseline")
    b = _check_bins(bins)
    return np.unique(np.quantile(a, np.arange(1, b) / b))


def histogram_counts(x, edges) -> np.ndarray:
    """Counts of ``x`` in the bins ``(-inf, e_1), [e_1, e_2), ..., [e_last, inf)``.

    Returns an int64 array of ``len(edges) + 1`` counts summing to ``x.size``.
    """
    a = _sample(x, "sample")
    e = np.asarray(edges, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(e)):
        raise ValueError("edges contain NaN or inf")
    if e.size and np.any(np.diff(e) <= 0):
        raise ValueError("edges must be strictly increasing")
    return np.bincount(np.searchsorted(e, a, side="right"), minlength=e.size + 1).astype(np.int64)


def histogram_kl(p_counts, q_counts, eps: float = DEFAULT_EPS) -> float:
    """``KL(P || Q)`` in bits between two histograms on the same bins, with ``eps`` added to
    every count: ``P_i = (c_i + eps) / (sum c + B eps)`` (``Q`` likewise) and
    ``KL = sum_i P_i log2(P_i / Q_i)``.

    Raises
    ------
    ValueError
        Different numbers of bins, no bins, negative or non-finite counts, ``eps <= 0``.
    """
    p = np.asarray(p_counts, dtype=np.float64).reshape(-1)
    q = np.asarray(q_counts, dtype=np.float64).reshape(-1)
    if p.shape != q.shape:
        raise ValueError(f"histograms have {p.size} and {q.size} bins; they must share the bins")
    if p.size == 0:
        raise ValueError("histograms have no bins")
    for name, v in (("p_counts", p), ("q_counts", q)):
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise ValueError(f"{name} must be finite and non-negative")
    e = _check_eps(eps)
    P = (p + e) / (p.sum() + p.size * e)
    Q = (q + e) / (q.sum() + q.size * e)
    return float(max(np.sum(P * np.log2(P / Q)), 0.0))


def activation_kl(baseline, quantized, bins: int = DEFAULT_BINS, eps: float = DEFAULT_EPS) -> float:
    """``KL(P_base || P_quant)`` in bits of the two samples' histograms on the baseline's quantile
    bins (module notes): :func:`quantile_edges` of ``baseline``, :func:`histogram_counts` of
    both, :func:`histogram_kl`."""
    edges = quantile_edges(baseline, bins)
    return histogram_kl(histogram_counts(baseline, edges), histogram_counts(quantized, edges), eps)


def moments(x) -> dict[str, float]:
    """Population moments of ``x`` (flattened, float64): ``mean``, ``std = sqrt(m2)``,
    ``skewness = m3 / m2^{3/2}``, ``excess_kurtosis = m4 / m2^2 - 3`` and ``max_abs = max |x|``.
    Skewness and kurtosis are NaN for a constant sample."""
    a = _sample(x, "sample")
    mu = float(a.mean())
    d = a - mu
    m2 = float(np.mean(d * d))
    m3 = float(np.mean(d ** 3))
    m4 = float(np.mean(d ** 4))
    skew = m3 / m2 ** 1.5 if m2 > 0 else float("nan")
    kurt = m4 / m2 ** 2 - 3.0 if m2 > 0 else float("nan")
    return {"mean": mu, "std": m2 ** 0.5, "skewness": skew, "excess_kurtosis": kurt,
            "max_abs": float(np.max(np.abs(a)))}


def moment_shift(baseline: Mapping[str, float] | np.ndarray,
                 quantized: Mapping[str, float] | np.ndarray) -> dict[str, float]:
    """Quantized minus baseline of every moment of :func:`moments`; either side may be a sample
    or an already computed :func:`moments` dict."""
    mb = dict(baseline) if isinstance(baseline, Mapping) else moments(baseline)
    mq = dict(quantized) if isinstance(quantized, Mapping) else moments(quantized)
    missing = [k for k in MOMENTS if k not in mb or k not in mq]
    if missing:
        raise ValueError(f"moment dicts lack {missing}")
    return {k: float(mq[k]) - float(mb[k]) for k in MOMENTS}


def capture_block_outputs(model, blocks: Sequence, windows: Sequence, skip_first: bool = True) -> list[np.ndarray]:
    """Every block's output hidden states over ``windows``, pooled per block.

    Parameters
    ----------
    model : causal LM
        Its ``base_model`` (the decoder without the output layer, which the block outputs do not
        need) is called as ``base(input_ids=w, use_cache=False)`` for every window, without
        gradients.
    blocks : sequence of nn.Module
        The decoder blocks (``empirical.models.model_view(model).blocks``); a forward hook on each
        takes its output (the residual stream after the block, before any final norm).
    windows : sequence of LongTensor ``(1, T)``
        Token windows of one language (``validate._mechanisms.language_windows``: BOS first).
    skip_first : bool
        Drop position 0 (BOS) of every window: its hidden state is the same for every language
        and carries the model's largest activations (the attention sink), which would dominate
        the moments without saying anything about the language.

    Returns
    -------
    list of np.ndarray
        One float32 array per block: the values at every kept position and every dimension,
        concatenated over windows (shape ``(positions * d,)``).
    """
    import torch

    if len(blocks) == 0:
        raise ValueError("no blocks to capture")
    if len(windows) == 0:
        raise ValueError("no windows to run")
    start = 1 if skip_first else 0
    got: list[list[np.ndarray]] = [[] for _ in blocks]

    def hook(i):
        def fn(module, inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            got[i].append(h[0, start:].detach().float().reshape(-1).cpu().numpy())
        return fn

    base = getattr(model, "base_model", None) or model
    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for w in windows:
                if w.dim() != 2 or w.shape[0] != 1:
                    raise ValueError(f"windows must be (1, T) tensors, got shape {tuple(w.shape)}")
                if w.shape[1] <= start:
                    continue
                base(input_ids=w, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not got[0]:
        raise ValueError("every window is too short to leave a position after BOS")
    return [np.concatenate(g) for g in got]
