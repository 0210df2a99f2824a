"""Per-language streaming statistics of activations, recorded with forward hooks.

For every quantizable linear layer (input and output) and every decoder block (its output, the
residual stream) and for each language, :class:`ActivationCapture` keeps a
:class:`StreamingStats`: count, mean, variance, skewness, excess kurtosis (central moments up to
the fourth, merged batch by batch in float64 with Pébay's formulas), min/max/absmax, a histogram
for quantiles, a seeded reservoir sample for distribution fits (with each value's channel), per
channel the sum, the sum of squares and the absmax, and the ``top_k`` values of largest magnitude
(exact, with their channels). All of it comes from the one forward pass: a site model (a
per-channel mixture, a tail fit) needs no second pass. Its memory is fixed by ``bins``,
``reservoir_size``, ``top_k`` and the channel count, independent of the number of tokens.

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
(q/k/v, gate/up) share one moment computation. The top-K store needs only the batch's values above
the store's K-th magnitude ``tau``, and the batch's per-channel absmax (already computed) says
which channels hold any: usually none or a few outlier channels, read alone; otherwise, on the
CPU, a numba pass collects them (0.16 ms for 655k float32 values on two cores, against 1-8 ms for
``torch.topk``, 15 ms for 2M values), with a threshold from a strided subsample while the store
fills, and ``torch.topk`` only as the last resort. Elsewhere ``torch.topk`` runs on the device and
only the batch's K largest (values and indices) leave it.

Channels
--------
The last dimension of a captured tensor is its channel axis (hidden units; a 1-D tensor is one
channel): value ``i`` of the flat row-major ``(rows, nchan)`` tensor is in channel ``i % nchan``.
In the same pass each :class:`StreamingStats` keeps, per channel, the float64 sum
(:attr:`~StreamingStats.channel_sum`), the sum of squares and the largest magnitude; every
channel holds ``n / nchan`` values (:attr:`~StreamingStats.channel_count`), so each channel's
mean and standard deviation follow (``theory.site_models.ChannelMixture.from_power_sums``), and
:meth:`StreamingStats.channel_energy` can say how much of the energy (and so of a shared clipping
threshold's MSE) a few outlier channels hold. The reservoir and the top-K store record the
channel of each value they keep (:meth:`~StreamingStats.sample_channels`,
:meth:`~StreamingStats.top_channels`), also through Algorithm L's replacements.

The stratified sample
---------------------
A clipping threshold's MSE at low bit widths is decided by the few largest values, which a
uniform reservoir of 4096 out of millions rarely holds. :meth:`StreamingStats.stratified` joins
the two stores: the values above the K-th largest magnitude ``tau`` exactly (weight 1), and the
reservoir's values at or below ``tau``, each standing for ``(n - len(top)) / len(rest)`` values.
The sum of any function of the values (the squared quantization error at any alpha:
:func:`empirical.optimal.stratified_mse`) is then estimated without bias, exactly on the tail;
:meth:`~empirical.optimal.StratifiedSample.split` halves it for held-out model selection.

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

from .devices import resolve_device
from .models import ModelView, model_view
from .optimal import StratifiedSample

__all__ = ["StreamingStats", "StratifiedSample", "Site", "ActivationCapture", "capture_activations",
           "capture_corpus", "channel_energy"]


def _next_prime(n: int) -> int:
    n = max(2, n)
    while any(n % p == 0 for p in range(2, int(n ** 0.5) + 1)):
        n += 1
    return n


@nb.njit(cache=True, fastmath=False)
def _power_sums(x, nchan):  # pragma: no cover - compiled
    """(c, [sum d, sum d^2, sum d^3, sum d^4, min, max], sum x^2 per channel, max |x| per
    channel, sum x per channel) of d = x - c, in float64. ``x`` is a flat row-major
    (rows, nchan) array: value i is in channel i % nchan. The shift c is the mean of the first
    (at most) 4096 values, close to the mean even when the first value is an outlier; the
    channel sums of squares are raw (about 0: the energy a quantizer's MSE is measured
    against). A channel's sum of x is its sum of d plus ``rows * c``: no extra accumulator.

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
    return c, out, sq, np.maximum(np.abs(mn), np.abs(mx)), a1 + rows * c


@nb.njit(cache=True)
def _above(x, tau, cap):  # pragma: no cover - compiled
    """Indices of the values with ``|x| > tau`` (at most ``cap``) and their count, or count -1
    as soon as more than ``cap`` qualify: one read of ``x`` (NaN never passes). The whole of
    ``x`` read as one channel by :func:`_above_in`."""
    return _above_in(x, 1, np.zeros(1, np.int64), tau, cap)


@nb.njit(cache=True)
def _above_in(x, nchan, cols, tau, cap):  # pragma: no cover - compiled
    """:func:`_above` reading only channels ``cols`` of the flat row-major (rows, nchan) ``x``."""
    out = np.empty(cap, np.int64)
    cnt = 0
    for r in range(x.size // nchan):
        base = r * nchan
        for j in range(cols.size):
            i = base + cols[j]
            if abs(x[i]) > tau:
                if cnt == cap:
                    return out, -1
                out[cnt] = i
                cnt += 1
    return out, cnt


def _hot_channels(tau: float, channel_absmax, nchan: int) -> np.ndarray | None:
    """The channels whose largest magnitude exceeds ``tau`` (None when that is not known)."""
    if tau < 0 or channel_absmax is None or len(channel_absmax) != nchan:
        return None
    return np.nonzero(np.asarray(channel_absmax) > tau)[0]


@nb.njit(cache=True)
def _assign_in_order(dst, idx, vals):  # pragma: no cover - compiled
    for j in range(idx.size):
        dst[idx[j]] = vals[j]


class StreamingStats:
    """Streaming moments, extremes, histogram, reservoir sample, per-channel sums and the
    largest magnitudes of a stream of values.

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
        moments, extremes, reservoir and top-K store always see every value.
    top_k : int
        Keep the ``top_k`` values of largest magnitude over all updates, exactly, with their
        channels (0: none). :meth:`stratified` combines them with the reservoir.

    Attributes
    ----------
    channel_sum, channel_sumsq, channel_absmax : numpy.ndarray or None
        Per channel (last axis): float64 sum of x, sum of x^2 and largest magnitude (None
        before any value). :attr:`channel_count` gives the values per channel.
    reservoir, reservoir_channel : numpy.ndarray
        The reservoir's values and the channel of each (read them with :meth:`sample` and
        :meth:`sample_channels`).
    """

    def __init__(self, bins: int = 2048, reservoir_size: int = 4096, seed: int = 0,
                 hist_sample: int | None = 16384, top_k: int = 1024) -> None:
        if bins % 4:
            raise ValueError("bins must be a multiple of 4")
        if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 disables the store), got {top_k!r}")
        if isinstance(reservoir_size, bool) or int(reservoir_size) != reservoir_size or reservoir_size < 1:
            raise ValueError(f"reservoir_size must be a positive integer, got {reservoir_size!r}")
        reservoir_size, top_k = int(reservoir_size), int(top_k)
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
        #: the channel of each reservoir value (aligned with ``reservoir``)
        self.reservoir_channel = np.zeros(reservoir_size, dtype=np.int64)
        #: float64 sum, sum of squares and largest magnitude per channel (None before any value)
        self.channel_sum: np.ndarray | None = None
        self.channel_sumsq: np.ndarray | None = None
        self.channel_absmax: np.ndarray | None = None
        # top-K store: fixed capacity, the first _top_n entries used (unordered); _top_tau is
        # the K-th largest magnitude once the store is full (-1 before: every value qualifies)
        self.top_k = top_k
        self._top_vals = np.zeros(top_k, dtype=np.float64)
        self._top_chan = np.zeros(top_k, dtype=np.int64)
        self._top_n = 0
        self._top_tau = -1.0
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
        """``(n, mean, M2, M3, M4, min, max, channel_sumsq, channel_absmax, channel_sum)`` of
        the values of ``x`` (any shape, float): central moments of all values, and per channel
        (the last dimension, see :meth:`channels`) the float64 sum of squares, the largest
        magnitude and the float64 sum. On the CPU one numba pass (module notes), elsewhere
        :meth:`batch_moments_torch`."""
        nchan = StreamingStats.channels(x)
        flat = StreamingStats._flat(x)
        if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
            c, s, sq, am, s1c = _power_sums(flat.contiguous().numpy(), nchan)
            s1, s2, s3, s4, lo, hi = s.tolist()
            return StreamingStats._central(flat.numel(), float(c), s1, s2, s3, s4, lo, hi) + (sq, am, s1c)
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
        # Per channel: values and squares summed in float64 (like the numba kernel),
        # magnitudes maxed.
        x2 = x.view(-1, nchan)
        sq = torch.sum(x2 * x2, dim=0, dtype=torch.float64)
        s1c = torch.sum(x2, dim=0, dtype=torch.float64)
        am = x2.abs().amax(dim=0)
        c, s1, s2, s3, s4, lo, hi = s.double().cpu().tolist()
        return StreamingStats._central(n_b, c, s1, s2, s3, s4, lo, hi) + (
            sq.cpu().numpy(), am.double().cpu().numpy(), s1c.cpu().numpy())

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
        n_b, mean_b, m2, m3, m4, lo, hi, sq, am, s1c = (moments if moments is not None
                                                        else self.batch_moments(x))
        x = self._flat(x)
        self._merge_moments(n_b, mean_b, m2, m3, m4)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if self.channel_sumsq is None:
            self.channel_sum, self.channel_sumsq, self.channel_absmax = (np.zeros(nchan), np.zeros(nchan),
                                                                         np.zeros(nchan))
        self.channel_sum += s1c
        self.channel_sumsq += sq
        np.maximum(self.channel_absmax, am, out=self.channel_absmax)
        self._update_hist(x, max(abs(lo), abs(hi)))
        self._update_reservoir(x, nchan)
        self._update_top(x, nchan, am)

    @staticmethod
    def batch_top(x: torch.Tensor, k: int, tau: float = -1.0,
                  channel_absmax: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Candidates of a batch for a top-``k`` store whose ``k``-th magnitude is ``tau``
        (negative: the store is not full).

        Returns ``(values, positions)`` (float64, int64; positions in the flattened ``x``): every
        value of ``x`` that is among its ``k`` largest magnitudes and above ``tau`` in magnitude,
        possibly more. ``channel_absmax``, the batch's largest magnitude per channel (last axis;
        from :meth:`batch_moments`), lets the usual case skip the pass: no channel above ``tau``
        means no candidate, and a few such channels are read alone. Otherwise, on the CPU, a
        numba pass collects the values above ``tau``, with ``torch.topk`` as the last resort
        (module notes); elsewhere :meth:`batch_top_torch`."""
        if x.device.type != "cpu":
            return StreamingStats.batch_top_torch(x, k, tau, channel_absmax)
        nchan = StreamingStats.channels(x)
        x = StreamingStats._flat(x)
        arr = x.contiguous().numpy()
        n = arr.size
        hot = _hot_channels(tau, channel_absmax, nchan)
        if hot is not None:
            if hot.size == 0:
                return np.zeros(0), np.zeros(0, dtype=np.int64)
            if 8 * hot.size <= nchan:  # a few outlier channels: read their columns only
                idx, cnt = _above_in(arr, nchan, hot, tau, 4 * k)
                if cnt >= 0:
                    return arr[idx[:cnt]].astype(np.float64), idx[:cnt]
        if n <= k:
            idx = np.arange(n) if tau < 0 else np.nonzero(np.abs(arr) > tau)[0]
            return arr[idx].astype(np.float64), idx
        idx, cnt = _above(arr, tau, 4 * k)
        if cnt < 0 and n > 8 * k:
            # More than 4k values above tau (the store is filling, or the batch is larger than
            # what came before): raise the threshold to about the batch's 2k-th magnitude, read
            # off a strided subsample. Valid when at least k values pass it, for then the
            # batch's k largest all do.
            stride = _next_prime(max(1, n // 16384))
            sub = np.abs(arr[int(n % stride) // 2::stride])
            r = int(sub.size * (1.0 - 2.0 * k / n))
            est = float(np.partition(sub, r)[r]) if 0 <= r < sub.size else -1.0
            if est > tau:
                idx, cnt = _above(arr, est, 4 * k)
                cnt = cnt if cnt >= k else -1
        idx = torch.topk(x.abs(), k, sorted=False).indices.numpy() if cnt < 0 else idx[:cnt]
        return arr[idx].astype(np.float64), idx.astype(np.int64, copy=False)

    @staticmethod
    def batch_top_torch(x: torch.Tensor, k: int, tau: float = -1.0,
                        channel_absmax: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`batch_top` with ``torch.topk`` on the tensor's device: exactly the batch's
        ``k`` largest magnitudes that exceed ``tau``; only those leave the device (none when
        ``channel_absmax`` shows no channel above ``tau``)."""
        hot = _hot_channels(tau, channel_absmax, StreamingStats.channels(x))
        if hot is not None and hot.size == 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        x = StreamingStats._flat(x)
        if x.numel() <= k:
            sel = torch.arange(x.numel(), device=x.device)
        else:
            sel = torch.topk(x.abs(), k, sorted=False).indices
        vals, idx = x[sel].double().cpu().numpy(), sel.cpu().numpy().astype(np.int64, copy=False)
        keep = np.abs(vals) > tau
        return vals[keep], idx[keep]

    def _update_top(self, x: torch.Tensor, nchan: int, channel_absmax: np.ndarray | None = None) -> None:
        """Merge the batch's values of largest magnitude into the top-K store (exact: a value
        of the final top K is among its own batch's K largest, and a batch value at or below
        the store's K-th magnitude cannot enter it)."""
        K = self.top_k
        if K == 0:
            return
        vals, idx = self.batch_top(x.view(-1, nchan), K, self._top_tau, channel_absmax)
        if idx.size == 0:
            return
        m = self._top_n
        allv = np.concatenate([self._top_vals[:m], vals])
        allc = np.concatenate([self._top_chan[:m], idx % nchan])  # a batch is whole rows
        if allv.size > K:
            sel = np.argpartition(-np.abs(allv), K - 1)[:K]
            allv, allc = allv[sel], allc[sel]
        self._top_n = allv.size
        self._top_vals[: allv.size] = allv
        self._top_chan[: allv.size] = allc
        if self._top_n == K:
            self._top_tau = float(np.min(np.abs(allv)))

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

    def _update_reservoir(self, x: torch.Tensor, nchan: int = 1) -> None:
        # Every update is whole rows of nchan values, so a value's channel is its position in
        # the batch (and in the stream) modulo nchan.
        start, n_b, k = self.n - x.numel(), x.numel(), self.k
        end = start + n_b
        if start < k:  # filling phase
            take = min(k, end) - start
            self.reservoir[start: start + take] = x[:take].double().cpu().numpy()
            self.reservoir_channel[start: start + take] = np.arange(take) % nchan
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
            _assign_in_order(self.reservoir_channel, slots, pos % nchan)

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

    @property
    def channel_count(self) -> np.ndarray | None:
        """Values per channel (float64 array, every channel ``n / channels``; None before any
        value): with :attr:`channel_sum` and :attr:`channel_sumsq` each channel's mean and
        variance follow."""
        if self.channel_sumsq is None:
            return None
        return np.full(self.channel_sumsq.size, self.n // self.channel_sumsq.size, dtype=np.float64)

    def sample(self) -> np.ndarray:
        """The reservoir sample (fewer than ``reservoir_size`` values if fewer were seen)."""
        return self.reservoir[: min(self.n, self.k)].copy()

    def sample_channels(self) -> np.ndarray:
        """The channel of each value of :meth:`sample` (int64, same order)."""
        return self.reservoir_channel[: min(self.n, self.k)].copy()

    def _top_order(self) -> np.ndarray:
        v = self._top_vals[: self._top_n]
        return np.argsort(-np.abs(v), kind="stable")

    def top_values(self) -> np.ndarray:
        """The ``top_k`` values of largest magnitude seen (signed, float64, by decreasing
        magnitude; all values when fewer were seen). Exact, not sampled."""
        return self._top_vals[: self._top_n][self._top_order()]

    def top_channels(self) -> np.ndarray:
        """The channel of each value of :meth:`top_values` (int64, same order)."""
        return self._top_chan[: self._top_n][self._top_order()]

    def stratified(self) -> StratifiedSample:
        """Every value seen, represented by the exact top magnitudes plus a weighted reservoir.

        Returns
        -------
        StratifiedSample
            * everything fits in the reservoir (``n <= reservoir_size``): exact, ``top`` empty,
              ``rest`` all values with weight 1;
            * everything fits in the top-K store (``n <= top_k``): exact, ``top`` all values;
            * otherwise, with ``tau`` the K-th largest magnitude: ``top`` the stored values with
              ``|x| > tau`` (every such value of the stream is there) and ``rest`` the
              reservoir values with ``|x| <= tau``, each standing for
              ``(n - len(top)) / len(rest)`` values. The reservoir is a uniform sample of the
              stream, so its values at or below ``tau`` are a uniform sample of the stream's
              values at or below ``tau``: the sum of any function of the values is estimated
              without bias, and exactly on the tail. (The K-th value itself, and any of equal
              magnitude, belong to the rest: so ties, common in bfloat16 activations, cannot
              bias the estimate; ``top`` then has fewer than K values.)

        Raises
        ------
        ValueError
            No values seen; NaN or infinite values in the stream; no reservoir value at or below
            ``tau`` (a reservoir smaller than the top-K store can miss the bulk).
        """
        if self.n == 0:
            raise ValueError("no values seen: there is nothing to sample")
        if not (math.isfinite(self.mean) and math.isfinite(self.m2)):
            raise ValueError("the stream contains NaN or infinite values: no stratified sample")
        empty_f, empty_i = np.zeros(0), np.zeros(0, dtype=np.int64)
        if self.n <= self.k:
            return StratifiedSample(empty_f, self.sample(), 1.0, self.n, empty_i, self.sample_channels())
        tv, tc = self.top_values(), self.top_channels()
        if self.n <= self.top_k:
            return StratifiedSample(tv, empty_f, 0.0, self.n, tc, empty_i)
        if self.top_k:
            tau = self._top_tau
            above = np.abs(tv) > tau
            tv, tc = tv[above], tc[above]
        else:
            tau = math.inf
        x, ch = self.sample(), self.sample_channels()
        below = np.abs(x) <= tau
        if not below.any():
            raise ValueError(f"no reservoir value is at or below the top-{self.top_k} threshold "
                             f"{tau:.4g}: the rest of the stream is not represented (use a "
                             f"reservoir_size larger than top_k)")
        rest, rc = x[below], ch[below]
        return StratifiedSample(tv, rest, (self.n - tv.size) / rest.size, self.n, tc, rc)

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
        """Bytes held by the state (fixed by ``bins``, ``reservoir_size``, ``top_k`` and the
        channel count)."""
        chan = 0 if self.channel_sumsq is None else 3 * self.channel_sumsq.nbytes
        return int(self.hist.nbytes + self.reservoir.nbytes + self.reservoir_channel.nbytes + chan
                   + self._top_vals.nbytes + self._top_chan.nbytes + 8 * 11)


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
                 hist_sample: int | None = 16384, top_k: int = 1024) -> None:
        if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 disables the store), got {top_k!r}")
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
        self.top_k = int(top_k)

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
                                                  self.hist_sample, self.top_k)
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
        ``linear_inputs``, ``linear_outputs``, ``residual`` (all True by default),
        ``hist_sample`` and ``top_k`` (see :class:`StreamingStats`).

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
        Where inputs go; None, ``"auto"`` or ``"offload"``: the model's execution device
        (:func:`empirical.devices.execution_device`, also under accelerate hooks).
    include_bos : bool
        Record the BOS position too (default False: it is the same for every language; see the
        module notes).

    Padded positions are excluded through ``cap.token_mask``.
    """
    model = cap.model
    device = resolve_device(model, device)
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
