"""Attention sinks, massive activations and super weights of a decoder-only model (issue #17, S-009).

Three published outlier phenomena, measured as their authors define them, on one sequence at a
time (each window starts with BOS; no padding):

* **Attention sinks** (Gu et al., "When Attention Sink Emerges in Language Models: An Empirical
  View", ICLR 2025; reference code ``sail-sg/Attention-Sink``, ``eval_sink_open_source.py``). With
  ``A^{l,h}`` the eager (softmax) attention matrix of head ``h`` in layer ``l`` over ``T`` tokens
  (rows queries ``i``, columns keys ``k``, 0-indexed), the importance of position ``k`` is

  .. math:: \\alpha^{l,h}_k = \\frac{1}{T-k} \\sum_{i=k}^{T-1} A^{l,h}_{i,k},

  the mean attention that the ``T - k`` queries which can see ``k`` pay to it, and
  ``Sink_k^eps`` is the share of (layer, head) pairs with ``alpha_k > eps`` (eps = 0.3, k = 0).
  Over several sequences the reference code averages the *indicator* over (sequence, layer, head)
  (``(importance > eps).mean(dim=(0, 1, 2))``), i.e. the mean over sequences of each sequence's
  share; :func:`attention_sinks` does the same and keeps each sequence's share for a bootstrap.

* **Massive activations** (Sun et al., "Massive Activations in Large Language Models", COLM 2024;
  reference code ``locuslab/massive-activations``, ``main_llm.py``): in the output hidden state
  ``H`` (``T x d``) of a decoder block for one sequence, an entry is massive when
  ``|H[t, j]| > 100`` and ``|H[t, j]| > 1000 * median(|H|)``, the median taken over every entry of
  that layer's hidden state for that sequence (``torch.median(feat_abs)`` there). The reference
  also reports the top magnitudes and the median per layer; :func:`massive_activations` reports
  ``max |H| / median |H|`` per layer so that a model without massive activations still says how
  close it comes.

* **Super weights** (Yu et al., "The Super Weight in Large Language Models", 2024; reference code
  ``mengxiayu/LLMSuperWeight`` ``analyze.py``): hooks on every MLP down-projection record its
  input ``X`` (``T x d_ff``) and output ``Y`` (``T x d``); in a layer where both
  ``max |X| > 50`` and ``max |Y| > 50``, the input channel ``c`` of the largest ``|X|`` and the
  output channel ``r`` of the largest ``|Y|`` give the super weight ``W_down[r, c]``. The paper
  then removes the weights found and repeats until no spike remains; :func:`super_weights` does
  so (at most ``max_iter`` rounds) and restores every weight afterwards.

The functions take a model and a list of ``(1, T)`` LongTensors (``validate._mechanisms
.language_windows``) and never change the model for good: the attention implementation and every
zeroed weight are restored on exit, also on error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from empirical.devices import param_tensor, swap_param

__all__ = [
    "sink_importance", "sink_metric", "eager_attention", "attention_sinks", "SinkResult",
    "massive_entries", "massive_activations", "MassiveResult", "down_proj_modules", "down_proj_spikes",
    "super_weights", "SuperWeight", "SINK_EPS", "MASSIVE_ABS", "MASSIVE_RATIO", "SUPER_THRESHOLD",
]

SINK_EPS = 0.3        # Gu et al.
MASSIVE_ABS = 100.0   # Sun et al.
MASSIVE_RATIO = 1000.0
SUPER_THRESHOLD = 50.0  # Yu et al.


# ---- input checks -------------------------------------------------------------------------------

def _finite_array(x, name: str, ndim_min: int = 1) -> np.ndarray:
    a = np.asarray(x.detach().cpu().float().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimensions, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds NaN or inf")
    return a


def _check_windows(windows) -> list:
    ws = list(windows)
    if not ws:
        raise ValueError("no windows given")
    for i, w in enumerate(ws):
        shape = tuple(getattr(w, "shape", ()))
        if len(shape) != 2 or shape[0] != 1 or shape[1] < 1:
            raise ValueError(f"window {i}: expected a (1, T) LongTensor with T >= 1, got shape {shape}")
    return ws


def _positive(name: str, v: float) -> float:
    v = float(v)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return v


# ---- attention sinks ----------------------------------------------------------------------------

def sink_importance(attn) -> np.ndarray:
    """Importance of every key position, ``alpha_k = sum_{i >= k} A[i, k] / (T - k)`` (Gu et al.).

    Parameters
    ----------
    attn : array (..., T, T)
        Attention probabilities, rows = queries, columns = keys (causal: ``A[i, k] = 0`` for
        ``k > i``; the sum starts at ``i = k`` anyway).

    Returns
    -------
    np.ndarray (..., T)
        ``alpha[..., k]``.
    """
    a = _finite_array(attn, "attention", ndim_min=2)
    T = a.shape[-1]
    if a.shape[-2] != T:
        raise ValueError(f"attention must be square in its last two axes, got {a.shape}")
    if np.any(a < 0):
        raise ValueError("attention holds negative values (expected softmax probabilities)")
    lower = np.tril(np.ones((T, T)))          # [i, k] = 1 where i >= k
    return (a * lower).sum(axis=-2) / np.arange(T, 0, -1, dtype=np.float64)


def sink_metric(attn_layers: Sequence, eps: float = SINK_EPS, position: int = 0) -> dict:
    """Sink metric of one sequence: ``Sink_k^eps = mean_{l,h} 1[alpha^{l,h}_k > eps]``.

    Parameters
    ----------
    attn_layers : sequence of arrays (H, T, T) or (1, H, T, T)
        One attention tensor per layer (``model(..., output_attentions=True).attentions``).
    eps : float
        Threshold (0.3 in the paper).
    position : int
        Key position ``k`` (0: the first token).

    Returns
    -------
    dict
        ``alpha`` (layers x heads) the importance of ``position``, ``sink`` (bool, same shape),
        ``share`` the share of (layer, head) pairs that are sinks, ``layer_share`` per layer.
    """
    if not 0 < float(eps) < 1:
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    layers = list(attn_layers)
    if not layers:
        raise ValueError("no attention layers given")
    rows = []
    for l, a in enumerate(layers):
        alpha = sink_importance(a)
        if alpha.ndim == 3:
            if alpha.shape[0] != 1:
                raise ValueError(f"layer {l}: one sequence expected, got batch {alpha.shape[0]}")
            alpha = alpha[0]
        if alpha.ndim != 2:
            raise ValueError(f"layer {l}: expected (H, T, T) or (1, H, T, T) attention, got {np.shape(a)}")
        if not 0 <= position < alpha.shape[-1]:
            raise ValueError(f"position {position} outside 0..{alpha.shape[-1] - 1}")
        rows.append(alpha[:, position])
    if len({r.size for r in rows}) != 1:
        raise ValueError("layers have different numbers of heads")
    alpha = np.stack(rows)
    sink = alpha > eps
    return {"alpha": alpha, "sink": sink, "share": float(sink.mean()), "layer_share": sink.mean(axis=1)}


@contextlib.contextmanager
def eager_attention(model) -> Iterator[Any]:
    """Switch ``model`` to eager (materialised softmax) attention and back on exit, always.

    transformers >= 4.48 has ``model.set_attn_implementation``; older versions read
    ``config._attn_implementation`` at every forward, which is set directly instead.
    """
    cfg = model.config
    before = getattr(cfg, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter is not None:
            setter("eager")
        else:
            cfg._attn_implementation = "eager"
        yield model
    finally:
        if before is not None and getattr(cfg, "_attn_implementation", None) != before:
            if setter is not None:
                setter(before)
            else:
                cfg._attn_implementation = before


@dataclass
class SinkResult:
    """Attention-sink importances of a set of sequences.

    Attributes
    ----------
    alpha : np.ndarray (sequences, layers, heads)
        ``alpha_k`` of the key position ``position`` in every sequence.
    eps, position
    """

    alpha: np.ndarray
    eps: float
    position: int

    @property
    def sink(self) -> np.ndarray:
        return self.alpha > self.eps

    @property
    def segment_share(self) -> np.ndarray:
        """Each sequence's ``Sink^eps`` (share of its (layer, head) pairs)."""
        return self.sink.mean(axis=(1, 2))

    @property
    def share(self) -> float:
        """Gu et al.'s metric over the sequences: the indicator averaged over (sequence, layer,
        head), equal to the mean of :attr:`segment_share`."""
        return float(self.sink.mean())

    @property
    def layer_share(self) -> np.ndarray:
        """Per layer, the share of (sequence, head) pairs that are sinks."""
        return self.sink.mean(axis=(0, 2))

    @property
    def layer_alpha(self) -> np.ndarray:
        """Per layer, the mean ``alpha_k`` over sequences and heads."""
        return self.alpha.mean(axis=(0, 2))


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _forward_each(model, windows, attentions: bool, on_block=None) -> Iterator[tuple]:
    """Run each window alone (no grad); yields ``(index, attentions or None)``. ``on_block(i, b,
    hidden)`` is called with every decoder block's output hidden state (1, T, d)."""
    import torch

    from empirical.models import model_view

    hooks = []
    state = {"i": -1}
    if on_block is not None:
        for b, blk in enumerate(model_view(model).blocks):
            def fn(m, a, out, b=b):  # returns None: the output is left as it is
                on_block(state["i"], b, _block_output(out).detach())

            hooks.append(blk.register_forward_hook(fn))
    try:
        with torch.no_grad():
            for i, w in enumerate(windows):
                state["i"] = i
                out = model(w, output_attentions=attentions, use_cache=False)
                yield i, (out.attentions if attentions else None)
    finally:
        for h in hooks:
            h.remove()


def attention_sinks(model, windows: Sequence, eps: float = SINK_EPS, position: int = 0) -> SinkResult:
    """Gu et al.'s ``alpha_k`` of every (layer, head) in every window, under eager attention.

    Parameters
    ----------
    model : causal LM
    windows : sequence of (1, T) LongTensor
        Each scored alone; ``T > position``.
    eps : float
        Sink threshold (0.3).
    position : int
        Key position (0: BOS).

    Returns
    -------
    SinkResult
    """
    ws = _check_windows(windows)
    rows = []
    with eager_attention(model):
        for _, att in _forward_each(model, ws, attentions=True):
            if att is None or any(a is None for a in att):
                raise RuntimeError("the model returned no attention probabilities under eager attention")
            rows.append(sink_metric([a[0] for a in att], eps, position)["alpha"])
    return SinkResult(np.stack(rows), float(eps), int(position))


# ---- massive activations ------------------------------------------------------------------------

def massive_entries(hidden, abs_threshold: float = MASSIVE_ABS, ratio: float = MASSIVE_RATIO) -> dict:
    """Massive activations of one hidden state (Sun et al.).

    An entry ``H[t, j]`` is massive when ``|H[t, j]| > abs_threshold`` and
    ``|H[t, j]| > ratio * median(|H|)``, the median over every entry of ``H``.

    Parameters
    ----------
    hidden : array (T, d) (or (1, T, d))
    abs_threshold, ratio : float
        100 and 1000 in the paper.

    Returns
    -------
    dict
        ``positions``, ``dims`` (int arrays), ``values`` (signed), ``median`` of ``|H|``, ``max``
        of ``|H|``, ``top_ratio = max / median`` (inf when the median is 0) and ``argmax``
        ``(t, j)`` of the largest ``|H|``.
    """
    h = _finite_array(hidden, "hidden state", ndim_min=2)
    if h.ndim == 3 and h.shape[0] == 1:
        h = h[0]
    if h.ndim != 2:
        raise ValueError(f"hidden state must be (T, d) or (1, T, d), got {h.shape}")
    abs_threshold = _positive("abs_threshold", abs_threshold)
    ratio = _positive("ratio", ratio)
    a = np.abs(h)
    med = float(np.median(a))
    mask = (a > abs_threshold) & (a > ratio * med)
    t, j = np.nonzero(mask)
    top = float(a.max())
    am = np.unravel_index(int(np.argmax(a)), a.shape)
    return {"positions": t, "dims": j, "values": h[t, j], "median": med, "max": top,
            "top_ratio": top / med if med > 0 else float("inf"), "argmax": (int(am[0]), int(am[1]))}


@dataclass
class MassiveResult:
    """Massive activations over a set of windows.

    Attributes
    ----------
    events : list of dict
        One per massive entry: ``segment``, ``layer``, ``position``, ``dim``, ``value``,
        ``ratio`` (|value| / median), ``token`` (the decoded token string, ``None`` without a
        tokenizer) and ``first`` (position 0, the BOS).
    layer_max, layer_median : np.ndarray (segments, layers)
        ``max |H|`` and ``median |H|`` of each block output.
    layer_argmax : np.ndarray (segments, layers, 2)
        ``(position, dim)`` of the largest ``|H|``.
    """

    events: list
    layer_max: np.ndarray
    layer_median: np.ndarray
    layer_argmax: np.ndarray
    abs_threshold: float
    ratio: float

    @property
    def layer_ratio(self) -> np.ndarray:
        """``max |H| / median |H|`` (segments, layers)."""
        with np.errstate(divide="ignore"):
            return self.layer_max / self.layer_median

    def counts(self) -> dict:
        """Counts of the events: total, per layer, per (layer, dim), at position 0 and per token."""
        from collections import Counter

        ev = self.events
        return {"total": len(ev),
                "segments_with": len({e["segment"] for e in ev}),
                "first_position": sum(1 for e in ev if e["first"]),
                "by_layer": dict(sorted(Counter(e["layer"] for e in ev).items())),
                "by_layer_dim": {f"{l}:{d}": n for (l, d), n in
                                 Counter((e["layer"], e["dim"]) for e in ev).most_common()},
                "by_token": dict(Counter("<position 0>" if e["first"] else str(e["token"])
                                         for e in ev).most_common())}


def massive_activations(model, windows: Sequence, tokenizer=None, abs_threshold: float = MASSIVE_ABS,
                        ratio: float = MASSIVE_RATIO) -> MassiveResult:
    """Massive activations (Sun et al.) in every decoder block's output, per window.

    Parameters
    ----------
    model : causal LM
    windows : sequence of (1, T) LongTensor
    tokenizer : optional
        Decodes the token of each massive entry (``tokenizer.decode([id])``).
    abs_threshold, ratio : float
        The criteria of :func:`massive_entries` (defaults as in the paper; never lowered here).

    Returns
    -------
    MassiveResult
    """
    ws = _check_windows(windows)
    abs_threshold = _positive("abs_threshold", abs_threshold)
    ratio = _positive("ratio", ratio)
    stats: dict[tuple[int, int], dict] = {}

    def on_block(i, b, h):
        stats[(i, b)] = massive_entries(h[0].float().cpu().numpy(), abs_threshold, ratio)

    for _ in _forward_each(model, ws, attentions=False, on_block=on_block):
        pass
    n_layers = 1 + max(b for _, b in stats)
    events = []
    mx = np.zeros((len(ws), n_layers))
    md = np.zeros((len(ws), n_layers))
    am = np.zeros((len(ws), n_layers, 2), dtype=int)
    for (i, b), st in sorted(stats.items()):
        mx[i, b], md[i, b], am[i, b] = st["max"], st["median"], st["argmax"]
        ids = ws[i][0].tolist()
        for t, j, v in zip(st["positions"], st["dims"], st["values"]):
            tok = tokenizer.decode([ids[int(t)]]) if tokenizer is not None else None
            events.append({"segment": int(i), "layer": int(b), "position": int(t), "dim": int(j),
                           "value": float(v), "ratio": abs(float(v)) / st["median"] if st["median"] > 0 else None,
                           "token": tok, "first": int(t) == 0})
    return MassiveResult(events, mx, md, am, abs_threshold, ratio)


# ---- super weights ------------------------------------------------------------------------------

_DOWN_NAMES = ("down_proj", "dense_4h_to_h", "fc2", "mlp.c_proj")


def down_proj_modules(model) -> list[tuple[int, str, Any]]:
    """``(block, qualified name, module)`` of every decoder block's MLP down-projection (the first
    submodule named ``down_proj``, ``dense_4h_to_h``, ``fc2`` or ``mlp.c_proj``)."""
    from empirical.models import model_view

    view = model_view(model)
    out = []
    for b, (bname, blk) in enumerate(zip(view.block_names, view.blocks)):
        found = [(n, m) for n, m in blk.named_modules() if n and any(n == s or n.endswith("." + s) for s in _DOWN_NAMES)
                 and hasattr(m, "weight")]
        if not found:
            raise ValueError(f"block {b} ({bname}) has no MLP down-projection (looked for {_DOWN_NAMES})")
        n, m = found[0]
        out.append((b, f"{bname}.{n}", m))
    return out


def _weight_index(module, row: int, col: int) -> tuple[int, int]:
    """Index into ``module.weight`` of the entry mapping input channel ``col`` to output ``row``
    (GPT-2's Conv1D stores the weight transposed)."""
    return (col, row) if type(module).__name__ == "Conv1D" else (row, col)


def down_proj_spikes(model, windows: Sequence) -> dict:
    """Largest ``|input|`` and ``|output|`` of every down-projection, per window.

    Returns
    -------
    dict of np.ndarray (windows, layers)
        ``in_value`` / ``out_value`` (signed value of the largest magnitude), ``in_channel`` /
        ``out_channel`` (its feature index), ``in_position`` / ``out_position`` (its token).
    """
    ws = _check_windows(windows)
    mods = down_proj_modules(model)
    L = len(mods)
    res = {k: np.zeros((len(ws), L), dtype=float if k.endswith("value") else int)
           for k in ("in_value", "in_channel", "in_position", "out_value", "out_channel", "out_position")}
    state = {"i": 0}

    def record(kind, b, x):
        x = x.detach()[0].float()
        flat = int(x.abs().argmax())
        t, c = divmod(flat, x.shape[-1])
        res[f"{kind}_value"][state["i"], b] = float(x[t, c])
        res[f"{kind}_channel"][state["i"], b] = c
        res[f"{kind}_position"][state["i"], b] = t

    hooks = []
    try:
        def hook(b):
            def fn(mod, inp, out):  # returns None: the output is left as it is
                record("in", b, inp[0])
                record("out", b, out)
            return fn

        for b, _, m in mods:
            hooks.append(m.register_forward_hook(hook(b)))
        import torch

        with torch.no_grad():
            for i, w in enumerate(ws):
                state["i"] = i
                model(w, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return res


@dataclass
class SuperWeight:
    """A super weight ``W_down[row, column]`` of block ``layer`` (Yu et al.)."""

    layer: int
    name: str
    row: int
    column: int
    value: float
    input_spike: float
    output_spike: float
    iteration: int
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"layer": self.layer, "name": self.name, "row": self.row, "column": self.column,
                "value": self.value, "input_spike": self.input_spike, "output_spike": self.output_spike,
                "iteration": self.iteration, **self.extra}


def super_weights(model, windows: Sequence, threshold: float = SUPER_THRESHOLD, max_iter: int = 5) -> dict:
    """Super weights by activation spikes (Yu et al.), found iteratively.

    Round ``n``: with the weights found so far zeroed, run every window with hooks on the
    down-projections (:func:`down_proj_spikes`); in each layer take the largest ``|X|`` (input)
    and ``|Y|`` (output) over all windows; where both exceed ``threshold`` the weight
    ``W[r, c]`` (``c`` the input channel, ``r`` the output channel of those maxima) is a super
    weight, unless already found. Stop when a round finds none or after ``max_iter`` rounds. The
    zeroed weights are restored on exit, always.

    Each weight also carries ``share``: ``W[r, c] X[t, c] / Y[t, r]`` at the output spike's token
    ``t``, the part of the output spike that weight alone carries (about 1 for a weight that
    makes the spike), and ``same_token``: whether the input and output spikes are on the same
    token of the same window (the reference procedure does not require it; a super weight in the
    paper's sense has both, and a large ``share``).

    Returns
    -------
    dict
        ``weights`` (list of :class:`SuperWeight`), ``rounds`` (rounds run), ``first`` (the
        first round's :func:`down_proj_spikes`, for every window), ``threshold``.
    """
    import torch

    ws = _check_windows(windows)
    threshold = _positive("threshold", threshold)
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    mods = down_proj_modules(model)
    found: list[SuperWeight] = []
    saved: list = []  # functions restoring the swapped weights, in order
    first = None
    rounds = 0
    try:
        for it in range(int(max_iter)):
            sp = down_proj_spikes(model, ws)
            rounds += 1
            if first is None:
                first = sp
            new = []
            for b, name, m in mods:
                si = int(np.argmax(np.abs(sp["in_value"][:, b])))
                so = int(np.argmax(np.abs(sp["out_value"][:, b])))
                xin, yout = sp["in_value"][si, b], sp["out_value"][so, b]
                if abs(xin) <= threshold or abs(yout) <= threshold:
                    continue
                r, c = int(sp["out_channel"][so, b]), int(sp["in_channel"][si, b])
                if any(f.layer == b and f.row == r and f.column == c for f in found):
                    continue
                idx = _weight_index(m, r, c)
                w = float(param_tensor(m, "weight").detach()[idx])  # the real weight, also under offload
                # the input channel c at the output spike's token, for the weight's share of it
                x_at = _input_at(model, m, ws[so], int(sp["out_position"][so, b]), c)
                share = w * x_at / yout if yout != 0 else None
                same = si == so and int(sp["in_position"][si, b]) == int(sp["out_position"][so, b])
                new.append(SuperWeight(b, name, r, c, w, float(xin), float(yout), it,
                                       {"share": None if share is None else float(share), "window": so,
                                        "position": int(sp["out_position"][so, b]), "same_token": bool(same)}))
            if not new:
                break
            with torch.no_grad():
                for sw in new:
                    m = dict((n, mm) for _, n, mm in mods)[sw.name]
                    idx = _weight_index(m, sw.row, sw.column)
                    # a zeroed copy swapped in where the forward reads it (also under offload);
                    # restoring puts back the very tensor that was there
                    zeroed = param_tensor(m, "weight").detach().clone()
                    zeroed[idx] = 0.0
                    saved.append(swap_param(m, "weight", zeroed))
            found.extend(new)
    finally:
        for restore in reversed(saved):
            restore()
    return {"weights": found, "rounds": rounds, "first": first, "threshold": threshold}


def _input_at(model, module, window, position: int, channel: int) -> float:
    """``X[position, channel]`` of ``module``'s input for one window."""
    import torch

    box = {}
    def fn(m, inp, out):  # returns None: the output is left as it is
        box["x"] = inp[0].detach()[0, position, channel]

    h = module.register_forward_hook(fn)
    try:
        with torch.no_grad():
            model(window, use_cache=False)
    finally:
        h.remove()
    return float(box["x"])
