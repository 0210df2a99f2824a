"""Per-language streaming statistics of activations, recorded with forward hooks.

For every quantizable linear layer (input and output) and every decoder block (its output, the
residual stream) and for each language, :class:`ActivationCapture` keeps a
:class:`StreamingStats`: count, mean, variance, skewness, excess kurtosis (central moments up to
the fourth, merged batch by batch in float64 with Pébay's formulas), min/max/absmax, a histogram
for quantiles, a seeded reservoir sample for distribution fits, and per channel the sum of squares
and absmax. Its memory is fixed by ``bins``, ``reservoir_size`` and the channel count,
independent of the number of tokens.

Precision and cost
------------------
On the CPU the power sums of a tensor come from one numba pass over its values, accumulated in
float64 about a shift (the mean of the first 4096 values) so that nothing cancels: one read of
the tensor instead of the ten tensor-sized operations of the torch expression. The pass keeps one
accumulator per channel and adds the channels at the end, so its inner loop vectorises across
channels; it runs on one thread, because a numba thread pool beside torch's OpenMP pool spins
against it (right after a torch matmul, a two-thread pass over 650k values took a median 24 ms
against 0.45 ms on one thread, on two cores). On other devices the sums are taken by torch in
the tensor's own precision (float32 at least; bfloat16 is upcast) about its mean, and only a few
scalars and the channel vectors leave the device. Either way they are merged in float64 (Pebay).
The reservoir uses Li's Algorithm L (vectorised), so after it fills its cost grows with
``reservoir_size x log(tokens)``, not with the tokens. Projections that read the same input
(q/k/v, gate/up) share one moment computation.

Channels
--------
The last dimension of a captured tensor is its channel axis (hidden units; a 1-D tensor is one
channel). In the same pass each :class:`StreamingStats` keeps, per channel, the float64 sum of
squares and the largest magnitude, so that :meth:`StreamingStats.channel_energy` can say how much
of the energy (and so of a shared clipping threshold's MSE) a few outlier channels hold.

Histogram range
---------------
The histogram is symmetric, ``[-R, R]`` with ``bins`` bins (a multiple of 4). ``R`` is the first
power of two at or above the first batch's absmax; when later data exceed ``R``, the range
doubles and adjacent bin pairs are merged, exactly (no re-binning error). Quantiles interpolate
linearly in the cumulative histogram, so their resolution is ``2R/bins`` of the final range.

Padding
-------
Set :attr:`ActivationCapture.token_mask` (a ``(batch, seq)`` bool tensor, e.g. the attention
mask) so that padded positions are left out; :func:`capture_corpus` does it.

The start token
---------------
:func:`capture_corpus` leaves the BOS position out of the statistics by default
(``include_bos=False``). It is the same token at the same position for every language, and in
many models its residual stream carries "massive activations" (Sun et al., 2024) orders of
magnitude above every other token: kept in, it sets every language's absmax to the same value
and makes the kurtosis of a language depend on how many tokens its segments have (the share of
BOS positions), not on the language. ``include_bos=True`` records what a deployed activation
quantizer would see, BOS included.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numba as nb
import numpy as np
import torch

from .models import ModelView, model_view

__all__ = ["StreamingStats", "Site", "ActivationCapture", "capture_activations", "capture_corpus",
           "channel_energy"]


def _next_prime(n: int) -> int:
    n = max(2, n)
    while any(n % p == 0 for p in range(2, int(n ** 0.5) + 1)):
        n += 1
    return n


@nb.njit(cache=True, fastmath=False)
def _power_sums(x, nchan):  # pragma: no cover - compiled
    """(c, [sum d, sum d^2, sum d^3, sum d^4, min, max], sum x^2 per channel, max |x| per
    channel) of d = x - c, in float64. ``x`` is a flat row-major (rows, nchan) array: value i is
    in channel i % nchan. The shift c is the mean of the first (at most) 4096 values, close to
    the mean even when the first value is an outlier; the channel sums of squares are raw (about
    0: the energy a quantizer's MSE is measured against).

    Every sum is accumulated per channel and the channels are added at the end, so the inner
    loop has no loop-carried dependency and vectorises across channels (module notes)."""
    n = x.size
    m = min(n, 4096)
    c = 0.0
    for i in range(m):
        c += np.float64(x[i])
    c /= m
    rows = n // nchan
    a1 = np.zeros(nchan)
    a2 = np.zeros(nchan)
    a3 = np.zeros(nchan)
    a4 = np.zeros(nchan)
    sq = np.zeros(nchan)
    mn = np.full(nchan, np.inf)
    mx = np.full(nchan, -np.inf)
    for r in range(rows):
        base = r * nchan
        for j in range(nchan):
            v = np.float64(x[base + j])
            d = v - c
            d2 = d * d
            a1[j] += d
            a2[j] += d2
            a3[j] += d2 * d
            a4[j] += d2 * d2
            sq[j] += v * v
            mn[j] = min(mn[j], v)
            mx[j] = max(mx[j], v)
    out = np.empty(6)
    out[0] = a1.sum()
    out[1] = a2.sum()
    out[2] = a3.sum()
    out[3] = a4.sum()
    out[4] = mn.min()
    out[5] = mx.max()
    return c, out, sq, np.maximum(np.abs(mn), np.abs(mx))


@nb.njit(cache=True)
def _assign_in_order(dst, idx, vals):  # pragma: no cover - compiled
    for j in range(idx.size):
        dst[idx[j]] = vals[j]


class StreamingStats:
    """Streaming moments, extremes, histogram and reservoir sample of a stream of values.

    Parameters
    ----------
    bins : int
        Histogram bins (multiple of 4, see module notes).
    reservoir_size : int
        Size of the uniform sample without replacement (Li's Algorithm L, seeded).
    seed : int
    hist_sample : int or None
        At most this many values of each update go into the histogram (a strided subsample with
        a prime stride and a seeded offset), which bounds its cost; None: all values. The
        moments, extremes and reservoir always see every value.
    """

    def __init__(self, bins: int = 2048, reservoir_size: int = 4096, seed: int = 0,
                 hist_sample: int | None = 16384) -> None:
        if bins % 4:
            raise ValueError("bins must be a multiple of 4")
        self.bins = bins
        self.k = reservoir_size
        self.hist_sample = hist_sample
        self.n = 0
        self.mean = 0.0
        self.m2 = self.m3 = self.m4 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.hist = np.zeros(bins, dtype=np.float64)
        self.range = 0.0
        self.reservoir = np.zeros(reservoir_size, dtype=np.float64)
        #: float64 sum of squares and largest magnitude per channel (None before any value)
        self.channel_sumsq: np.ndarray | None = None
        self.channel_absmax: np.ndarray | None = None
        self._rng = np.random.default_rng(seed)
        self._logw = 0.0       # Algorithm L state: log W
        self._next = 0         # global index of the next element to enter the reservoir
        self._started = False

    # -- merging ------------------------------------------------------------------------------
    def _merge_moments(self, n_b: int, mean_b: float, m2_b: float, m3_b: float, m4_b: float) -> None:
        n_a = self.n
        if n_a == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = n_b, mean_b, m2_b, m3_b, m4_b
            return
        n = n_a + n_b
        d = mean_b - self.mean
        dn = d / n
        m2 = self.m2 + m2_b + d * dn * n_a * n_b
        m3 = (self.m3 + m3_b + d * dn * dn * n_a * n_b * (n_a - n_b)
              + 3.0 * dn * (n_a * m2_b - n_b * self.m2))
        m4 = (self.m4 + m4_b + d * dn ** 3 * n_a * n_b * (n_a * n_a - n_a * n_b + n_b * n_b)
              + 6.0 * dn * dn * (n_a * n_a * m2_b + n_b * n_b * self.m2)
              + 4.0 * dn * (n_a * m3_b - n_b * self.m3))
        self.n, self.mean, self.m2, self.m3, self.m4 = n, self.mean + dn * n_b, m2, m3, m4

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().reshape(-1)
        return x if x.dtype in (torch.float32, torch.float64) else x.float()

    @staticmethod
    def channels(x: torch.Tensor) -> int:
        """The channel count of ``x``: its last dimension (one channel for a 1-D tensor)."""
        return int(x.shape[-1]) if x.dim() >= 2 else 1

    @staticmethod
    def batch_moments(x: torch.Tensor) -> tuple:
        """``(n, mean, M2, M3, M4, min, max, channel_sumsq, channel_absmax)`` of the values of
        ``x`` (any shape, float): central moments of all values, and per channel (the last
        dimension, see :meth:`channels`) the float64 sum of squares and the largest magnitude.
        On the CPU one numba pass (module notes), elsewhere :meth:`batch_moments_torch`."""
        nchan = StreamingStats.channels(x)
        flat = StreamingStats._flat(x)
        if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
            c, s, sq, am = _power_sums(flat.contiguous().numpy(), nchan)
            s1, s2, s3, s4, lo, hi = s.tolist()
            return StreamingStats._central(flat.numel(), float(c), s1, s2, s3, s4, lo, hi) + (sq, am)
        return StreamingStats.batch_moments_torch(x)

    @staticmethod
    def batch_moments_torch(x: torch.Tensor) -> tuple:
        """:meth:`batch_moments` with torch reductions on the tensor's device."""
        nchan = StreamingStats.channels(x)
        x = StreamingStats._flat(x)
        n_b = x.numel()
        # Batch sums in the input's precision (float32 at least; torch reduces with cascaded
        # sums), about the batch mean so that nothing cancels. Merged in float64.
        c = x.mean()
        d = x - c
        d2 = d * d
        lo, hi = torch.aminmax(x)
        # Third and fourth power sums as inner products: no temporaries, one read each.
        s = torch.stack([c, d.sum(), d2.sum(), torch.dot(d2, d), torch.dot(d2, d2), lo, hi])
        # Per channel: squares summed in float64 (like the numba kernel), magnitudes maxed.
        x2 = x.view(-1, nchan)
        sq = torch.sum(x2 * x2, dim=0, dtype=torch.float64)
        am = x2.abs().amax(dim=0)
        c, s1, s2, s3, s4, lo, hi = s.double().cpu().tolist()
        return StreamingStats._central(n_b, c, s1, s2, s3, s4, lo, hi) + (
            sq.cpu().numpy(), am.double().cpu().numpy())

    @staticmethod
    def _central(n_b: int, c: float, s1: float, s2: float, s3: float, s4: float, lo: float, hi: float) -> tuple:
        # Exact central moments from power sums about the shift c.
        mu = s1 / n_b
        m2 = s2 - s1 * mu
        m3 = s3 - 3.0 * mu * s2 + 2.0 * mu * mu * s1
        m4 = s4 - 4.0 * mu * s3 + 6.0 * mu * mu * s2 - 3.0 * mu ** 3 * s1
        return n_b, c + mu, max(m2, 0.0), m3, max(m4, 0.0), lo, hi

    def update(self, x: torch.Tensor, moments: tuple | None = None) -> None:
        """Add the values of tensor ``x`` (any shape, device, float dtype); its last dimension
        is the channel axis (:meth:`channels`), the same in every update.

        ``moments`` may pass :meth:`batch_moments` of the same values, already computed.
        """
        if x.numel() == 0:
            return
        nchan = self.channels(x)
        if self.channel_sumsq is not None and nchan != self.channel_sumsq.size:
            raise ValueError(f"an update with {nchan} channels (last dimension) after "
                             f"{self.channel_sumsq.size}: the channel axis must stay the same")
        n_b, mean_b, m2, m3, m4, lo, hi, sq, am = moments if moments is not None else self.batch_moments(x)
        x = self._flat(x)
        self._merge_moments(n_b, mean_b, m2, m3, m4)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if self.channel_sumsq is None:
            self.channel_sumsq, self.channel_absmax = np.zeros(nchan), np.zeros(nchan)
        self.channel_sumsq += sq
        np.maximum(self.channel_absmax, am, out=self.channel_absmax)
        self._update_hist(x, max(abs(lo), abs(hi)))
        self._update_reservoir(x)

    def _update_hist(self, x: torch.Tensor, absmax: float) -> None:
        if self.range == 0.0:
            self.range = 2.0 ** math.ceil(math.log2(absmax)) if absmax > 0 else 1.0
        while absmax > self.range:
            # Doubling the range maps old bin pairs onto one new bin in the middle half.
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.zeros(self.bins)
            q = self.bins // 4
            self.hist[q: q + self.bins // 2] = merged
            self.range *= 2.0
        if self.hist_sample and x.numel() > self.hist_sample:
            # A strided subsample: a prime stride walks through every channel of a
            # (tokens x channels) tensor instead of hitting the same few.
            stride = _next_prime(-(-x.numel() // self.hist_sample))
            x = x[int(self._rng.integers(stride))::stride]
        h = torch.histc(x.float(), bins=self.bins, min=-self.range, max=self.range)
        self.hist += h.double().cpu().numpy()

    def _update_reservoir(self, x: torch.Tensor) -> None:
        start, n_b, k = self.n - x.numel(), x.numel(), self.k
        end = start + n_b
        if start < k:  # filling phase
            take = min(k, end) - start
            self.reservoir[start: start + take] = x[:take].double().cpu().numpy()
            if end <= k:
                return
        if not self._started:  # the reservoir is full: Algorithm L takes over from index k
            self._started = True
            self._logw = math.log(self._rng.random()) / k
            self._next = k - 1 + self._skip()
        # Algorithm L, vectorised: W and the skips of m successive replacements come from
        # cumulative sums, m sized to the expected count k ln(end / start) of this batch.
        pos_all, slot_all = [], []
        while self._next < end:
            m = int(k * math.log(end / max(self._next, 1))) + 16
            logw = self._logw + np.cumsum(np.log(self._rng.random(m))) / k
            w = np.exp(logw)
            skips = np.where(w >= 1.0, 1,
                             np.floor(np.log(self._rng.random(m)) / np.log1p(-np.minimum(w, 1 - 1e-16))) + 1)
            nxt = self._next + np.concatenate([[0], np.cumsum(skips)]).astype(np.int64)
            inside = int(np.searchsorted(nxt, end))  # nxt[:inside] < end
            take = min(inside, m)
            pos_all.append(nxt[:take])
            slot_all.append(self._rng.integers(k, size=take))
            self._logw = float(logw[take - 1]) if take else self._logw
            self._next = int(nxt[take])
        if pos_all:
            pos = np.concatenate(pos_all) - start
            slots = np.concatenate(slot_all)
            vals = x[torch.from_numpy(pos).to(x.device)].double().cpu().numpy()
            # In stream order, so a later replacement of a slot wins (numpy's fancy assignment
            # leaves the winner of repeated indices unspecified).
            _assign_in_order(self.reservoir, slots, vals)

    def _skip(self) -> int:
        u = self._rng.random()
        w = math.exp(self._logw)
        if w >= 1.0:
            return 1
        return int(math.floor(math.log(u) / math.log1p(-w))) + 1

    # -- results --------------------------------------------------------------------------------
    @property
    def variance(self) -> float:
        """Population variance."""
        return self.m2 / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    @property
    def skewness(self) -> float:
        return math.sqrt(self.n) * self.m3 / self.m2 ** 1.5 if self.m2 > 0 else math.nan

    @property
    def excess_kurtosis(self) -> float:
        return self.n * self.m4 / (self.m2 * self.m2) - 3.0 if self.m2 > 0 else math.nan

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.n else math.nan

    def channel_energy(self) -> dict:
        """:func:`channel_energy` of this stream's per-channel sums of squares."""
        if self.channel_sumsq is None:
            return channel_energy(np.zeros(0))
        return channel_energy(self.channel_sumsq, self.channel_absmax)

    def sample(self) -> np.ndarray:
        """The reservoir sample (fewer than ``reservoir_size`` values if fewer were seen)."""
        return self.reservoir[: min(self.n, self.k)].copy()

    def quantile(self, q: float | Sequence[float]) -> np.ndarray | float:
        """Quantile(s) from the histogram (linear within bins, clamped to the observed range)."""
        qs = np.atleast_1d(np.asarray(q, dtype=float))
        edges = np.linspace(-self.range, self.range, self.bins + 1)
        cdf = np.concatenate([[0.0], np.cumsum(self.hist)])
        cdf /= cdf[-1]
        out = np.clip(np.interp(qs, cdf, edges), self.min, self.max)
        return float(out[0]) if np.ndim(q) == 0 else out

    def summary(self) -> dict:
        """Count, mean, std, skewness, excess kurtosis, min, max, absmax, a few quantiles."""
        q = self.quantile([0.001, 0.01, 0.5, 0.99, 0.999]) if self.n else [math.nan] * 5
        return dict(count=self.n, mean=self.mean, std=self.std, skewness=self.skewness,
                    excess_kurtosis=self.excess_kurtosis, min=self.min, max=self.max,
                    absmax=self.absmax, q001=q[0], q01=q[1], q50=q[2], q99=q[3], q999=q[4])

    def nbytes(self) -> int:
        """Bytes held by the state (fixed by ``bins`` and ``reservoir_size``)."""
        chan = 0 if self.channel_sumsq is None else self.channel_sumsq.nbytes + self.channel_absmax.nbytes
        return int(self.hist.nbytes + self.reservoir.nbytes + chan + 8 * 9)


def channel_energy(sumsq, absmax=None) -> dict:
    """How concentrated energy (sum of squares) is across channels.

    Parameters
    ----------
    sumsq : array of float
        Sum of squares per channel (e.g. :attr:`StreamingStats.channel_sumsq`, or several
        languages' added).
    absmax : array of float, optional
        Largest magnitude per channel.

    Returns
    -------
    dict
        ``channels`` (count), ``top_channel`` (index of the largest sum of squares, the first on a
        tie), ``top_share`` (its share of the total), ``top_absmax`` (that channel's absmax, when
        given) and ``channels_for_half``: the fewest channels whose sums of squares hold at least
        half of the total. A shared clipping threshold's MSE is a sum over these squares, so a
        channel holding most of them dominates it. With no energy at all the index, share and
        count are None/NaN.
    """
    sq = np.asarray(sumsq, dtype=np.float64).reshape(-1)
    total = float(sq.sum())
    if not total > 0:
        return dict(channels=int(sq.size), top_channel=None, top_share=math.nan, top_absmax=math.nan,
                    channels_for_half=None)
    order = np.argsort(-sq, kind="stable")
    cum = np.cumsum(sq[order]) / total
    top = int(order[0])
    return dict(channels=int(sq.size), top_channel=top, top_share=float(sq[top] / total),
                top_absmax=math.nan if absmax is None else float(np.asarray(absmax)[top]),
                channels_for_half=int(np.searchsorted(cum, 0.5) + 1))


@dataclass(frozen=True)
class Site:
    """Where values are recorded: ``kind`` is ``linear_input``, ``linear_output`` or ``residual``."""

    name: str
    kind: str
    block: int | None

    @property
    def key(self) -> str:
        return f"{self.name}:{self.kind}"


class ActivationCapture:
    """Forward hooks recording :class:`StreamingStats` per (site, language).

    Use through :func:`capture_activations`. Set the current language with
    ``cap.language = "heb"`` or ``with cap.for_language("heb"): ...``; nothing is recorded while
    it is None.

    Attributes
    ----------
    stats : dict of (site key, language) to StreamingStats
    sites : list of Site
    token_mask : torch.Tensor or None
        ``(batch, seq)`` bool mask of real tokens for the next forward passes.
    """

    def __init__(self, model, view: ModelView | None = None, languages: Iterable[str] | None = None,
                 reservoir_size: int = 4096, bins: int = 2048, seed: int = 0,
                 linear_inputs: bool = True, linear_outputs: bool = True, residual: bool = True,
                 hist_sample: int | None = 16384) -> None:
        self.model = model
        self.view = view or model_view(model)
        self.languages = None if languages is None else list(languages)
        self.reservoir_size, self.bins, self.seed = reservoir_size, bins, seed
        self.stats: dict[tuple[str, str], StreamingStats] = {}
        self.sites: list[Site] = []
        self.token_mask: torch.Tensor | None = None
        self._language: str | None = None
        self._last = None
        self._handles: list = []
        self._flags = (linear_inputs, linear_outputs, residual)
        self.hist_sample = hist_sample

    # -- language -----------------------------------------------------------------------------
    @property
    def language(self) -> str | None:
        return self._language

    @language.setter
    def language(self, lang: str | None) -> None:
        if lang is not None and self.languages is not None and lang not in self.languages:
            raise ValueError(f"language {lang!r} not among {self.languages}")
        self._language = lang

    @contextlib.contextmanager
    def for_language(self, lang: str):
        """Record under ``lang`` inside the block, restoring the previous language after."""
        prev = self._language
        self.language = lang
        try:
            yield self
        finally:
            self._language = prev

    # -- hooks --------------------------------------------------------------------------------
    def _record(self, site: Site, t) -> None:
        if self._language is None:
            return
        if isinstance(t, (tuple, list)):
            t = t[0]
        if not torch.is_tensor(t) or not t.is_floating_point():
            return
        orig = t
        m = self.token_mask
        if m is not None and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(m.shape):
            t = t[m.to(t.device, torch.bool)]
        key = (site.key, self._language)
        # q/k/v (and gate/up) projections read the same input tensor: its moments are computed
        # once. The reference held in _last keeps the tensor alive, so identity is not reused.
        last = self._last
        if last is not None and last[0] is orig and last[1] == orig._version and last[2] is m:
            moments = last[3]
        else:
            moments = StreamingStats.batch_moments(t)
            self._last = (orig, orig._version, m, moments)
        st = self.stats.get(key)
        if st is None:
            # One seed stream per (site, language), named by both: a language's sample does not
            # depend on hook order nor on which other languages the same capture records.
            tag = zlib.crc32(f"{site.key}\0{self._language}".encode())
            sub = np.random.SeedSequence([self.seed, tag]).generate_state(1)[0]
            st = self.stats[key] = StreamingStats(self.bins, self.reservoir_size, int(sub),
                                                          self.hist_sample)
        st.update(t, moments)

    def attach(self) -> None:
        """Register the hooks (done on entering :func:`capture_activations`)."""
        lin_in, lin_out, resid = self._flags
        self.detach()
        self.sites = []
        for q in self.view.linears:
            s_in, s_out = Site(q.name, "linear_input", q.block), Site(q.name, "linear_output", q.block)
            if lin_in:
                self.sites.append(s_in)
            if lin_out:
                self.sites.append(s_out)

            def hook(mod, args, out, s_in=s_in, s_out=s_out):
                if lin_in and args:
                    self._record(s_in, args[0])
                if lin_out:
                    self._record(s_out, out)
            self._handles.append(q.module.register_forward_hook(hook))
        if resid:
            for i, (name, blk) in enumerate(zip(self.view.block_names, self.view.blocks)):
                s = Site(name, "residual", i)
                self.sites.append(s)
                self._handles.append(blk.register_forward_hook(
                    lambda mod, args, out, s=s: self._record(s, out)))

    def detach(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    @property
    def n_hooks(self) -> int:
        return len(self._handles)

    # -- results ------------------------------------------------------------------------------
    def get(self, site: str | Site, language: str, kind: str | None = None) -> StreamingStats:
        """Stats of ``site`` (a Site, a ``name:kind`` key, or a name plus ``kind``) for ``language``."""
        key = site.key if isinstance(site, Site) else (f"{site}:{kind}" if kind else site)
        return self.stats[(key, language)]

    def rows(self) -> list[dict]:
        """One summary dict per (site, language), with site name, kind and block index."""
        by_key = {s.key: s for s in self.sites}
        out = []
        for (key, lang), st in self.stats.items():
            s = by_key[key]
            out.append(dict(site=s.name, kind=s.kind, block=s.block, language=lang, **st.summary()))
        return out

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.stats.values())


@contextlib.contextmanager
def capture_activations(model, view: ModelView | None = None, languages: Iterable[str] | None = None,
                        reservoir_size: int = 4096, bins: int = 2048, seed: int = 0, **flags):
    """Context manager recording per-language activation statistics of ``model``.

    Parameters
    ----------
    model : nn.Module
    view : ModelView, optional
        Default ``model_view(model)``.
    languages : iterable of str, optional
        Allowed language labels (checked when set).
    reservoir_size, bins, seed
        See :class:`StreamingStats`.
    **flags
        ``linear_inputs``, ``linear_outputs``, ``residual`` (all True by default) and
        ``hist_sample`` (see :class:`StreamingStats`).

    Yields
    ------
    ActivationCapture
        Hooks are removed on exit, also when the block raises.

    Examples
    --------
    >>> with capture_activations(model) as cap:          # doctest: +SKIP
    ...     with cap.for_language("heb"):
    ...         model(**batch)
    """
    cap = ActivationCapture(model, view, languages, reservoir_size, bins, seed, **flags)
    cap.attach()
    try:
        yield cap
    finally:
        cap.detach()


@torch.no_grad()
def capture_corpus(cap: ActivationCapture, tokenizer, corpus, languages: Sequence[str] | None = None,
                   max_length: int = 256, batch_size: int = 8, max_segments: int | None = None,
                   device=None, include_bos: bool = False) -> None:
    """Run each language's segments through ``cap.model`` (from BOS), recording under its code.

    Parameters
    ----------
    cap : ActivationCapture
    tokenizer
    corpus : empirical.corpora.Corpus
    languages : sequence of str, optional
        Codes to run (default: all of the corpus).
    max_length : int
        Tokens per segment, BOS included; longer segments are cut there (the statistics are of
        the first ``max_length`` tokens of each segment).
    batch_size : int
        Segments per forward pass (sorted by length, so padding stays small).
    max_segments : int, optional
        First segments per language (default: all).
    device : optional
        Where inputs go (default: the model's device).
    include_bos : bool
        Record the BOS position too (default False: it is the same for every language; see the
        module notes).

    Padded positions are excluded through ``cap.token_mask``.
    """
    model = cap.model
    device = device or next(model.parameters()).device
    bos = getattr(tokenizer, "bos_token_id", None)
    bos = getattr(tokenizer, "eos_token_id", None) if bos is None else bos
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = (bos if bos is not None else 0) if pad is None else pad
    for lang in (languages if languages is not None else corpus.languages):
        lang = corpus.key(lang)  # recorded under the corpus's code (eng_Latn), whatever form was given
        segs = list(corpus[lang])[:max_segments]
        enc = tokenizer(segs, add_special_tokens=False)["input_ids"]
        enc = [(([bos] if bos is not None else []) + list(e))[:max_length] for e in enc]
        enc.sort(key=len)
        with cap.for_language(lang):
            for j in range(0, len(enc), batch_size):
                b = enc[j: j + batch_size]
                L = max(len(e) for e in b)
                ids = torch.full((len(b), L), int(pad), dtype=torch.long)
                mask = torch.zeros((len(b), L), dtype=torch.bool)
                for r, e in enumerate(b):
                    ids[r, : len(e)] = torch.tensor(e)
                    mask[r, : len(e)] = True
                real = mask.clone()
                if bos is not None and not include_bos:
                    real[:, 0] = False  # every segment starts with BOS (module notes)
                cap.token_mask = real
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.long().to(device))
                finally:
                    cap.token_mask = None
