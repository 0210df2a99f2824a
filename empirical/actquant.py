"""Static fake quantization of every Linear's input, with thresholds fixed by calibration.

*Static* activation quantization (what TensorRT, ModelOpt and llm-compressor's static observers
deploy) rounds each Linear's input onto a grid whose clipping threshold ``alpha`` was chosen once,
on calibration text, and is then used for every input the model ever sees. The threshold is one
number per Linear input (granularity ``tensor``) or one per input channel (``channel``). The grid
and rounding rule are those of the weights (:mod:`empirical.fakequant`, docs/design.md "Grids"):
``k = clamp(floor(x / step - off + 0.5), kmin, kmax)``, value ``(k + off) step``,
``step = alpha f(grid, bits)``; it is computed in the input's dtype.

Three pieces:

* :func:`capture_inputs` runs calibration texts through the model and keeps, per *site* and
  language, every Linear input it saw as a ``(tokens, channels)`` float32 matrix
  (:class:`CalibrationSamples`). Linears that read the very same tensor (q/k/v, gate/up) are one
  site: its values are kept once, and a threshold chosen for it serves each of them.
* :class:`ActivationQuantizer` quantizes the inputs with a mapping ``Linear name -> threshold``
  (forward pre-hooks); its context manager removes every hook on exit, also after an exception, so
  the model is the model again: its parameters are never touched.
* :func:`save_thresholds` / :func:`load_thresholds` write and read such a mapping with safetensors
  (plus the configuration as string metadata), so a threshold chosen here (LA-ACIQ's, say) can be
  used inside any other quantization flow; loading gives the saved float64 values bit for bit.

Thresholds themselves are chosen by :mod:`empirical.calibrate`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from empirical.devices import resolve_device
from theory.grids import Grid, check_bits, step_factor

__all__ = ["ActQuantConfig", "ACT_GRANULARITIES", "fake_quantize_activation", "ActivationQuantizer",
           "CalibrationSamples", "capture_inputs", "calibration_batches", "save_thresholds", "load_thresholds", "linear_thresholds",
           "combined"]

ACT_GRANULARITIES = ("tensor", "channel")
SCALARS = "__scalars__"  # metadata key of save_thresholds: the names of 0-d thresholds


@dataclass(frozen=True)
class ActQuantConfig:
    """How Linear inputs are quantized: bits, grid and granularity (one threshold per input, or
    per input channel)."""

    bits: int = 8
    grid: str = "int"
    granularity: str = "tensor"

    def __post_init__(self):
        g = Grid.parse(self.grid)
        if g.one_sided:
            raise ValueError("Linear inputs are signed; grid 'uint' is for non-negative data")
        object.__setattr__(self, "grid", g.value)
        object.__setattr__(self, "bits", check_bits(self.bits, g))
        if self.granularity not in ACT_GRANULARITIES:
            raise ValueError(f"unknown activation granularity {self.granularity!r}; known: "
                             f"{', '.join(ACT_GRANULARITIES)}")

    def key(self) -> str:
        return f"a{self.grid}{self.bits}-{self.granularity}"


def _alpha_tensor(alpha, channels: int, granularity: str, name: str = "") -> torch.Tensor:
    """The threshold as a float64 tensor (shape ``()`` or ``(channels,)``), checked."""
    a = alpha.detach().to("cpu", torch.float64) if torch.is_tensor(alpha) else torch.as_tensor(
        np.asarray(alpha, dtype=np.float64))
    where = f" of {name}" if name else ""
    if granularity == "tensor" and a.numel() != 1:
        raise ValueError(f"threshold{where}: granularity 'tensor' needs one value, got shape {tuple(a.shape)}")
    if granularity == "channel" and tuple(a.reshape(-1).shape) != (channels,):
        raise ValueError(f"threshold{where}: granularity 'channel' needs {channels} values, got shape {tuple(a.shape)}")
    if not bool(torch.isfinite(a).all()) or bool((a <= 0).any()):
        raise ValueError(f"threshold{where} must be finite and positive")
    return a.reshape(-1) if granularity == "channel" else a.reshape(())


def _quantize(x: torch.Tensor, alpha: torch.Tensor, config: ActQuantConfig) -> torch.Tensor:
    """The rounding rule in ``x``'s dtype; a threshold whose step underflows to 0 in that dtype
    (a channel that was all zeros in calibration gets the smallest positive float64) quantizes
    everything to 0."""
    f, kmin, kmax, off = step_factor(config.grid, config.bits)
    step = alpha.to(device=x.device, dtype=x.dtype) * f
    live = step > 0
    safe = torch.where(live, step, torch.ones_like(step))
    k = torch.floor(x / safe - off + 0.5).clamp_(kmin, kmax)
    return torch.where(live, (k + off) * safe, torch.zeros_like(x))


def fake_quantize_activation(x: torch.Tensor, alpha, config: ActQuantConfig) -> torch.Tensor:
    """Quantize-dequantize ``x`` (last dimension = channels) with threshold ``alpha``.

    ``alpha`` is a positive scalar (``tensor``) or has one positive value per channel
    (``channel``). The arithmetic is in ``x``'s dtype; a threshold so small that its step is 0 in
    that dtype (the smallest positive float64: a channel that was all zeros in calibration) maps
    everything to 0.
    """
    return _quantize(x, _alpha_tensor(alpha, x.shape[-1], config.granularity), config)


def linear_thresholds(site_thresholds: Mapping[str, np.ndarray], sites: Mapping[str, Sequence[str]]) -> dict:
    """Expand per-site thresholds to every Linear that reads the site's input."""
    out = {}
    for site, members in sites.items():
        if site not in site_thresholds:
            raise ValueError(f"no threshold for site {site!r}")
        for name in members:
            out[name] = np.asarray(site_thresholds[site], dtype=np.float64)
    return out


class ActivationQuantizer:
    """Static fake quantization of the inputs of a model's Linears.

    Parameters
    ----------
    linears : sequence of QuantLinear
        From ``empirical.models.model_view(model).linears``.
    thresholds : mapping Linear name -> threshold
        A scalar (granularity ``tensor``) or one value per input channel (``channel``), positive
        and finite. Every Linear needs one (:func:`linear_thresholds` expands per-site values).
    config : ActQuantConfig

    Examples
    --------
    >>> aq = ActivationQuantizer(view.linears, thresholds, ActQuantConfig(bits=8))   # doctest: +SKIP
    >>> with aq.quantized():                                                         # doctest: +SKIP
    ...     loss = model(**batch).loss
    """

    def __init__(self, linears: Sequence, thresholds: Mapping[str, object], config: ActQuantConfig):
        self.linears = list(linears)
        self.config = config
        names = [q.name for q in self.linears]
        missing = [n for n in names if n not in thresholds]
        if missing:
            raise ValueError(f"no activation threshold for {len(missing)} Linear(s), e.g. {missing[:3]}")
        unknown = sorted(set(thresholds) - set(names))
        if unknown:
            raise ValueError(f"thresholds for unknown Linears: {unknown[:3]}")
        self._alpha: dict[str, torch.Tensor] = {}
        for q in self.linears:
            w = q.module.weight
            channels = w.shape[0] if type(q.module).__name__ == "Conv1D" else w.shape[-1]
            self._alpha[q.name] = _alpha_tensor(thresholds[q.name], channels, config.granularity, q.name)
        self._active = False
        self.calls = 0

    @contextlib.contextmanager
    def quantized(self, protect: Iterable[str] = ()) -> Iterator["ActivationQuantizer"]:
        """Quantize the inputs of every Linear not in ``protect``; every hook is removed on exit,
        also after an exception."""
        if self._active:
            raise RuntimeError("ActivationQuantizer.quantized is not re-entrant")
        protect = set(protect)
        unknown = protect - {q.name for q in self.linears}
        if unknown:
            raise ValueError(f"unknown layers in the protected set: {sorted(unknown)[:5]}")
        handles = []
        # q/k/v read the same tensor: quantize it once per forward and hand each the same result
        last: list = [None]
        self._active = True
        try:
            for q in self.linears:
                if q.name in protect:
                    continue
                alpha = self._alpha[q.name]

                def hook(mod, args, alpha=alpha):
                    if not args or not torch.is_tensor(args[0]):
                        return None
                    x = args[0]
                    prev = last[0]
                    if prev is not None and prev[0] is x and prev[1] == x._version and prev[2] is alpha:
                        xq = prev[3]
                    else:
                        xq = _quantize(x, alpha, self.config)
                        last[0] = (x, x._version, alpha, xq)
                    self.calls += 1
                    return (xq, *args[1:])
                handles.append(q.module.register_forward_pre_hook(hook))
            yield self
        finally:
            for h in handles:
                h.remove()
            last[0] = None
            self._active = False


@contextlib.contextmanager
def combined(*managers) -> Iterator[None]:
    """Enter several quantizers' context managers together (e.g. weights and activations);
    each one restores its own part on exit."""
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


# ---- calibration samples -------------------------------------------------------------------------

@dataclass
class CalibrationSamples:
    """Every Linear input seen on calibration text, per site and language.

    Attributes
    ----------
    sites : dict site -> tuple of Linear names
        A site is named by the first Linear that reads its input; the others read the same tensor.
    values : dict site -> dict language -> float32 array (tokens, channels)
    tokens : dict language -> int
        Token positions recorded per language (BOS included: deployment quantizes it too).
    texts : dict language -> list of str
        The calibration segments, for disjointness checks and provenance.
    """

    sites: dict[str, tuple[str, ...]]
    values: dict[str, dict[str, np.ndarray]]
    tokens: dict[str, int]
    texts: dict[str, list[str]] = field(default_factory=dict)

    @property
    def languages(self) -> list[str]:
        return list(self.tokens)

    def of(self, site: str, languages: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """``language -> (tokens, channels)`` of one site, for the given languages (default all)."""
        if site not in self.values:
            raise KeyError(f"unknown site {site!r}")
        langs = self.languages if languages is None else list(languages)
        unknown = [l for l in langs if l not in self.values[site]]
        if unknown:
            raise ValueError(f"no calibration samples of {unknown} (have {self.languages})")
        return {l: self.values[site][l] for l in langs}

    def second_moment(self, site: str, languages: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """``language -> E_l[x_j^2]`` per input channel ``j`` (float64), the importance that
        activation-weighted weight clipping uses."""
        return {l: np.mean(np.square(v, dtype=np.float64), axis=0) for l, v in self.of(site, languages).items()}

    def pooled_second_moment(self, site: str, languages: Sequence[str] | None = None) -> np.ndarray:
        """``E[x_j^2]`` over the pooled tokens of ``languages`` (the token-weighted mix)."""
        vals = self.of(site, languages)
        n = sum(v.shape[0] for v in vals.values())
        return sum(np.sum(np.square(v, dtype=np.float64), axis=0) for v in vals.values()) / n

    def nbytes(self) -> int:
        return int(sum(v.nbytes for d in self.values.values() for v in d.values()))


def calibration_batches(tokenizer, segments: Sequence[str], *, max_length: int = 512, batch_size: int = 8,
                        device=None) -> Iterator[dict]:
    """``{"input_ids", "attention_mask"}`` batches of ``segments``, each from BOS and cut at
    ``max_length`` tokens, right-padded; what :func:`capture_inputs` runs and what a library's own
    calibration (``empirical.baselines``) is given."""
    from .bpb import _pad_id, _start_id  # the start and padding tokens the scoring engine uses

    bos, pad = _start_id(tokenizer), _pad_id(tokenizer)
    enc = tokenizer(list(segments), add_special_tokens=False)["input_ids"]
    enc = [([bos] + list(e))[:max_length] for e in enc]
    for j in range(0, len(enc), batch_size):
        b = enc[j: j + batch_size]
        L = max(len(e) for e in b)
        ids = torch.full((len(b), L), pad, dtype=torch.long)
        mask = torch.zeros((len(b), L), dtype=torch.long)
        for r, e in enumerate(b):
            ids[r, : len(e)] = torch.tensor(e)
            mask[r, : len(e)] = 1
        yield {"input_ids": ids.to(device) if device is not None else ids,
               "attention_mask": mask.to(device) if device is not None else mask}


@torch.no_grad()
def capture_inputs(model, linears: Sequence, tokenizer, texts: Mapping[str, Sequence[str]], *,
                   max_length: int = 512, batch_size: int = 8, device=None) -> CalibrationSamples:
    """Run each language's calibration segments (from BOS, cut at ``max_length`` tokens) and keep
    every Linear input at every real (non-padding) position.

    Parameters
    ----------
    model : causal LM
    linears : sequence of QuantLinear
    tokenizer
    texts : mapping language -> segments
    max_length, batch_size
        Tokens per segment (BOS included) and segments per forward pass.
    device : optional
        Where inputs go; None, ``"auto"`` or ``"offload"``: the model's execution device
        (:func:`empirical.devices.execution_device`, also under accelerate hooks).

    Returns
    -------
    CalibrationSamples
        Sites are found by tensor identity during the first pass: Linears whose hook receives the
        very same input tensor share a site.
    """
    if not texts:
        raise ValueError("no calibration texts given")
    for lang, segs in texts.items():
        if not segs or not any(s.strip() for s in segs):
            raise ValueError(f"calibration text of {lang!r} is empty")
    device = resolve_device(model, device)
    site_of: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    chunks: dict[str, dict[str, list[np.ndarray]]] = {}
    state = {"lang": None, "mask": None, "last": None}
    handles = []

    def make_hook(name):
        def hook(mod, args):
            x = args[0]
            last = state["last"]
            same = last is not None and last[0] is x and last[1] == x._version
            site = site_of.get(name)
            if site is None:
                site = last[2] if same else name
                site_of[name] = site
                members.setdefault(site, []).append(name)
            if same:  # another reader of the tensor just recorded
                return None
            state["last"] = (x, x._version, site)
            rows = x[state["mask"].to(x.device)] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
            chunks.setdefault(site, {}).setdefault(state["lang"], []).append(
                rows.detach().to(torch.float32).cpu().numpy())
            return None
        return hook

    for q in linears:
        handles.append(q.module.register_forward_pre_hook(make_hook(q.name)))
    tokens: dict[str, int] = {}
    try:
        for lang, segs in texts.items():
            state["lang"] = lang
            tokens[lang] = 0
            for batch in calibration_batches(tokenizer, segs, max_length=max_length, batch_size=batch_size,
                                             device=device):
                mask = batch["attention_mask"].bool()
                tokens[lang] += int(mask.sum())
                state["mask"] = mask
                state["last"] = None
                model(**batch)
    finally:
        for h in handles:
            h.remove()
        state["last"] = None
    values = {site: {l: np.concatenate(parts) for l, parts in per.items()} for site, per in chunks.items()}
    for site, per in values.items():
        for l, v in per.items():
            if not np.all(np.isfinite(v)):
                raise ValueError(f"calibration input of {site} on {l} contains NaN or inf")
    return CalibrationSamples(sites={s: tuple(m) for s, m in members.items()}, values=values, tokens=tokens,
                              texts={l: list(s) for l, s in texts.items()})


# ---- export ----------------------------------------------------------------------------------

def save_thresholds(path: str | Path, thresholds: Mapping[str, object], metadata: Mapping[str, object] | None = None) -> Path:
    """Write ``Linear name -> threshold`` with safetensors (float64 tensors; a scalar threshold is
    stored with shape ``()``), atomically. ``metadata`` (e.g. the calibrator, the calibration
    languages, bits, grid, granularity) is stored as JSON strings in the file's header."""
    from safetensors.numpy import save

    from validate._common import atomic_write_bytes  # the project's one atomic writer

    if not thresholds:
        raise ValueError("no thresholds to save")
    arrays = {}
    for name, a in thresholds.items():
        arr = np.array(a, dtype=np.float64, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"threshold of {name} contains NaN or inf")
        arrays[str(name)] = arr
    meta = {str(k): json.dumps(v) for k, v in (metadata or {}).items()}
    if SCALARS in meta:
        raise ValueError(f"metadata key {SCALARS!r} is reserved")
    # safetensors keeps no 0-d shape: scalars are stored as (1,) and named here
    meta[SCALARS] = json.dumps(sorted(k for k, v in arrays.items() if v.ndim == 0))
    arrays = {k: v.reshape(1) if v.ndim == 0 else v for k, v in arrays.items()}
    return atomic_write_bytes(path, save(arrays, metadata=meta))


def load_thresholds(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Read a file of :func:`save_thresholds`: ``(thresholds, metadata)``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no thresholds file at {path}")
    out = {}
    with safe_open(str(path), framework="numpy") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        scalars = set(meta.pop(SCALARS, []))
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = t.reshape(()) if k in scalars else t
    return out, meta
