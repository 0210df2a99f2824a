"""An established quantization library, run for real, as a baseline for language-aware calibration.

The library is `optimum-quanto <https://github.com/huggingface/optimum-quanto>`_ (pinned 0.2.7,
the ``baselines`` extra), imported lazily: the rest of the project imports and tests without it.
Nothing here re-implements the library; :class:`LibraryQuantizer` calls its own ``quantize``,
``Calibration`` and ``freeze`` and swaps the resulting ``QLinear`` modules into the model.

What quanto 0.2.7 does (read from its source, checked by ``tests/test_baselines.py``)
-----------------------------------------------------------------------------------
* **Weights** (``freeze``): per output channel; int8 symmetric absmax,
  ``s_r = max_j |w_rj| / 127``, ``q = round(w / s_r)``; int4 affine min-max over groups of
  ``g`` consecutive input weights of a row (``g = 128``, lowered by 32 down to 32 until it divides
  ``in_features``; the whole row when ``in_features <= 128`` or none divides), ``s = (max - min) / 15``,
  16 levels per group.
* **Activations** (``activations=qint8``): every quantized Linear's *input* is quantized per
  tensor, symmetric, with a static scale ``s``: ``x_q = s * clamp(round(x / s), -128, 127)``,
  i.e. clipping threshold ``alpha = 127 s``.
* **Calibration** (``Calibration()`` context): before each calibration forward pass of a Linear,
  ``m_t = max |x_t| / 127`` over the whole input tensor of batch ``t`` (every position, padding
  included), and the scale is the momentum average

  .. math:: s_1 = m_1, \\qquad s_t = 0.9\\, s_{t-1} + 0.1\\, m_t ,

  so later batches count less than the first and the result depends on the batch order (quanto
  0.2.7 applies momentum 0.9 to input scales whatever ``Calibration(momentum=...)`` says; that
  argument only reaches the output scales). During calibration the activations are already
  quantized with the running scales, so a layer calibrates on the inputs that the quantized
  layers before it produce. Quanto also calibrates an *output* scale per Linear and quantizes the
  output where the next operation accepts quantized tensors ("streamline"); where it does not
  (``view``, ``silu``, ``add``, norms: every Linear of Llama and Gemma) the output stays in float.
  :meth:`LibraryQuantizer.provenance` counts the outputs left quantized.

Design: the model is scored by one :class:`empirical.bpb.BpbEngine` whose baseline was recorded
on the original model, so the quantized model must be the same object. :meth:`~LibraryQuantizer.calibrate`
runs quanto on a ``copy.deepcopy`` of the model and keeps only the quantized Linear modules;
:meth:`~LibraryQuantizer.quantized` swaps them into the model with ``setattr`` on their parents
and puts back the very original module objects on exit, also after an exception. No tensor of
the model is written. The output head (``lm_head``, tied to the embeddings in Gemma) is never
quantized.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import importlib
import importlib.metadata
import math
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from empirical.models import model_view

__all__ = ["LIBRARIES", "available", "library_version", "LibraryQuantizer"]

LIBRARIES = ("quanto",)

# library name -> (distribution on the package index, the version this wrapper is tested with, module)
_DISTRIBUTIONS = {"quanto": ("optimum-quanto", "0.2.7", "optimum.quanto")}
_BATCH_KEYS = ("input_ids", "attention_mask", "position_ids")


def _check_library(name) -> None:
    if name not in LIBRARIES:
        raise ValueError(f"unknown quantization library {name!r}; known: {', '.join(LIBRARIES)}")


def library_version(name: str) -> str | None:
    """The installed version of library ``name`` (None when it is not installed)."""
    _check_library(name)
    try:
        return importlib.metadata.version(_DISTRIBUTIONS[name][0])
    except importlib.metadata.PackageNotFoundError:
        return None


def available(name: str) -> str | None:
    """Whether library ``name`` can be used here.

    Parameters
    ----------
    name : str
        One of :data:`LIBRARIES`.

    Returns
    -------
    str or None
        None when the pinned version is installed and imports; else the reason (not installed,
        another version, or the import error).

    Raises
    ------
    ValueError
        ``name`` is not one of :data:`LIBRARIES`.
    """
    _check_library(name)
    dist, pinned, module = _DISTRIBUTIONS[name]
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} is not installed (pip install -e '.[baselines]' installs {dist}=={pinned})"
    if version != pinned:
        return (f"{dist} {version} is installed, but this wrapper relies on the internals of {pinned} "
                f"(calibration statistic, scale buffers); pip install {dist}=={pinned}")
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 -- any import failure makes the library unusable
        return f"import {module} failed: {type(exc).__name__}: {exc}"
    return None


def _split(name: str) -> tuple[str, str]:
    parent, _, attr = name.rpartition(".")
    return parent, attr


class LibraryQuantizer:
    """A library's quantized Linear modules, calibrated on a copy and swapped into ``model``.

    Parameters
    ----------
    model : transformers causal LM
        The model to quantize; it is never modified outside :meth:`quantized`, and only by
        swapping module objects there.
    library : str
        One of :data:`LIBRARIES` (``"quanto"``).
    weight_bits : {4, 8, None}
        Weight format (quanto ``qint4``: affine min-max per group of up to 128 input weights of a
        row; ``qint8``: symmetric absmax per output channel). None (weights in float) is refused
        while ``act_bits`` is set: quanto 0.2.7 fails on activation-only Linears.
    act_bits : {8, None}
        Static per-tensor quantization of every Linear's input (quanto ``qint8``, symmetric);
        None leaves activations in float (then the quantization is calibration-free).
    exclude : sequence of str
        ``fnmatch`` patterns of Linear names left in float. The output head is excluded whatever
        is given (``model_view`` does not list it).

    Attributes
    ----------
    names : list of str
        The quantized Linears, in model order.
    n_calibration_batches, n_calibration_tokens : int
        What the last :meth:`calibrate` saw (0 before).

    Examples
    --------
    >>> lq = LibraryQuantizer(model, "quanto", weight_bits=4, act_bits=8)      # doctest: +SKIP
    >>> lq.calibrate([tok_batch_en_1, tok_batch_en_2])                         # doctest: +SKIP
    >>> with lq.quantized():                                                   # doctest: +SKIP
    ...     nll_en = engine.nll()
    """

    def __init__(self, model: nn.Module, library: str = "quanto", weight_bits: int | None = 4,
                 act_bits: int | None = 8, exclude: Sequence[str] = ("lm_head",)):
        _check_library(library)
        reason = available(library)
        if reason is not None:
            raise ImportError(f"quantization library {library!r} cannot be used: {reason}")
        if weight_bits not in (None, 4, 8):
            raise ValueError(f"weight_bits must be None, 4 or 8 for {library}, got {weight_bits!r}")
        if act_bits not in (None, 8):
            raise ValueError(f"act_bits must be None or 8 for {library} (static int8 activations), "
                             f"got {act_bits!r}")
        if weight_bits is None and act_bits is None:
            raise ValueError("weight_bits and act_bits are both None: nothing to quantize")
        if weight_bits is None:
            # quanto 0.2.7: QLinear.forward multiplies by self.qweight, which is None without weight
            # quantization, so F.linear raises TypeError on the first pass.
            raise ValueError(f"{library} 0.2.7 cannot quantize activations alone (QLinear.forward passes "
                             "weight=None to F.linear); use weight_bits=8 for the closest setting (W8A8)")
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.model = model
        self.library = library
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.exclude = tuple(exclude)

        view = model_view(model)
        head = view.head
        self.names: list[str] = []
        self._originals: dict[str, nn.Module] = {}
        for q in view.linears:
            if any(fnmatch.fnmatchcase(q.name, p) for p in self.exclude):
                continue
            if q.module is head:
                continue  # the output head stays in float (tied to the embeddings in Gemma)
            if not isinstance(q.module, nn.Linear):
                raise ValueError(f"{library} quantizes torch.nn.Linear only; {q.name} is "
                                 f"{type(q.module).__name__} (exclude it to quantize the rest)")
            self.names.append(q.name)
            self._originals[q.name] = q.module
        if not self.names:
            raise ValueError(f"no Linear left to quantize after excluding {list(self.exclude)}")
        self._qmodules: dict[str, nn.Module] | None = None
        self._active = False
        self.n_calibration_batches = 0
        self.n_calibration_tokens = 0

    # ------------------------------------------------------------------------------------
    def _qtypes(self):
        q = importlib.import_module("optimum.quanto")
        w = {None: None, 4: q.qint4, 8: q.qint8}[self.weight_bits]
        a = {None: None, 8: q.qint8}[self.act_bits]
        return q, w, a

    def _quantized_copy(self) -> tuple[nn.Module, object]:
        q, w, a = self._qtypes()
        model_copy = copy.deepcopy(self.model)
        model_copy.eval()
        q.quantize(model_copy, weights=w, activations=a, include=list(self.names))
        missing = [n for n in self.names if not isinstance(model_copy.get_submodule(n), q.QModuleMixin)]
        if missing:
            raise RuntimeError(f"{self.library} did not quantize {missing[:3]} ({len(missing)} Linear(s))")
        return model_copy, q

    def _keep(self, model_copy: nn.Module, q) -> None:
        q.freeze(model_copy)
        self._qmodules = {n: model_copy.get_submodule(n) for n in self.names}

    def calibrate(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Run the library's own calibration over ``batches`` on a fresh quantized copy.

        Every call starts again from the float model (a new ``deepcopy``), so calibrating on
        English and then on the mix gives two independent calibrations. The scales follow the
        momentum absmax of the module notes: ``s_1 = m_1``, ``s_t = 0.9 s_{t-1} + 0.1 m_t`` with
        ``m_t = max |x_t| / 127`` over every position of batch ``t`` (padding included: give
        unpadded or packed rows for a calibration on text only). Then ``freeze`` quantizes the
        weights and the Linear modules are kept for :meth:`quantized`.

        Parameters
        ----------
        batches : iterable of mappings
            Keyword arguments of the model's forward: ``input_ids`` (2-D integer tensor) and
            optionally ``attention_mask`` and ``position_ids``.

        Raises
        ------
        ValueError
            Weight-only quantization (nothing to calibrate), no batch, a batch without
            ``input_ids`` or with other keys, an empty or non-2-D ``input_ids``, or a calibration
            that gives a non-finite or non-positive scale (NaN/inf activations).
        RuntimeError
            A quantized Linear was never reached by the calibration passes, or called inside
            :meth:`quantized`.
        """
        if self.act_bits is None:
            raise ValueError(f"{self.library} weight-only quantization is calibration-free: there is "
                             "nothing to calibrate (use quantized() directly)")
        if self._active:
            raise RuntimeError("calibrate() inside quantized(): leave the context first")
        model_copy, q = self._quantized_copy()
        device = next(self.model.parameters()).device
        calls = {n: 0 for n in self.names}
        hooks = []
        for n in self.names:
            def count(_mod, _args, n=n):
                calls[n] += 1
            hooks.append(model_copy.get_submodule(n).register_forward_pre_hook(count))
        n_batches = n_tokens = 0
        try:
            with torch.no_grad(), q.Calibration():
                for i, batch in enumerate(batches):
                    kwargs = self._batch_kwargs(batch, i, device)
                    model_copy(**kwargs, use_cache=False)
                    n_batches += 1
                    n_tokens += int(kwargs["input_ids"].numel())
        finally:
            for h in hooks:
                h.remove()
        if n_batches == 0:
            raise ValueError("calibrate() got no batch")
        never = [n for n, c in calls.items() if c == 0]
        if never:
            raise RuntimeError(f"{len(never)} quantized Linear(s) never ran during calibration, e.g. {never[0]}")
        for n in self.names:
            s = float(model_copy.get_submodule(n).input_scale)
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"calibration gave input scale {s} for {n}: the calibration activations "
                                 "hold NaN/inf or are all zero")
        self._keep(model_copy, q)
        self.n_calibration_batches, self.n_calibration_tokens = n_batches, n_tokens

    @staticmethod
    def _batch_kwargs(batch, i: int, device) -> dict:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(f"calibration batch {i} must be a mapping with 'input_ids', got {type(batch).__name__}")
        extra = set(batch) - set(_BATCH_KEYS)
        if extra:
            raise ValueError(f"calibration batch {i} has unexpected keys {sorted(extra)}; allowed: {_BATCH_KEYS}")
        ids = batch["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.numel() == 0 or ids.is_floating_point():
            raise ValueError(f"calibration batch {i}: input_ids must be a non-empty 2-D integer tensor, got "
                             f"{getattr(ids, 'shape', type(ids).__name__)}")
        return {k: v.to(device) for k, v in batch.items()}

    @property
    def calibrated(self) -> bool:
        """Whether the quantized modules exist (after :meth:`calibrate`, or weight-only after the
        first :meth:`quantized`)."""
        return self._qmodules is not None

    # ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def quantized(self) -> Iterator["LibraryQuantizer"]:
        """Swap the library's quantized Linears into ``model``; put the originals back on exit.

        Weight-only quantization is built at the first call (calibration-free); with activation
        quantization :meth:`calibrate` must have run. On exit, also after an exception, every
        swapped position holds again the very module object it held before (``is``), so every
        parameter and buffer of the model is bit-identical to before.

        Raises
        ------
        RuntimeError
            Not calibrated, re-entered, or a module of the model was replaced since construction.
        """
        if self._active:
            raise RuntimeError("LibraryQuantizer.quantized is not re-entrant")
        if self._qmodules is None:
            if self.act_bits is not None:
                raise RuntimeError("static activation quantization needs calibrate() before quantized()")
            self._keep(*self._quantized_copy())
        for n in self.names:
            if self.model.get_submodule(n) is not self._originals[n]:
                raise RuntimeError(f"{n} of the model is no longer the module this quantizer was built on")
        swapped: list[tuple[nn.Module, str, nn.Module]] = []
        self._active = True
        try:
            for n in self.names:
                parent_name, attr = _split(n)
                parent = self.model.get_submodule(parent_name)
                swapped.append((parent, attr, self._originals[n]))
                setattr(parent, attr, self._qmodules[n])
            yield self
        finally:
            for parent, attr, original in reversed(swapped):
                setattr(parent, attr, original)
            self._active = False

    # ------------------------------------------------------------------------------------
    def _module(self, name: str) -> nn.Module:
        if self._qmodules is None:
            raise RuntimeError("nothing quantized yet: call calibrate() (or quantized() for weight-only)")
        if name not in self._qmodules:
            raise KeyError(f"{name!r} is not among the quantized Linears")
        return self._qmodules[name]

    def activation_scales(self) -> dict[str, float]:
        """Each quantized Linear's static input scale ``s`` (clipping threshold ``alpha = 127 s``).

        Raises
        ------
        ValueError
            Weight-only quantization has no activation scale.
        """
        if self.act_bits is None:
            raise ValueError("weight-only quantization has no activation scales")
        return {n: float(self._module(n).input_scale) for n in self.names}

    def effective_weight(self, name: str) -> torch.Tensor:
        """The dequantized weight that the quantized Linear ``name`` multiplies by (float)."""
        w = self._module(name).weight
        return (w.dequantize() if hasattr(w, "dequantize") else w).detach().clone()

    def quantized_module(self, name: str) -> nn.Module:
        """The library's quantized module standing in for Linear ``name``."""
        return self._module(name)

    def provenance(self) -> dict:
        """Library, version and the exact settings, for the JSON of an experiment."""
        dist, pinned, _ = _DISTRIBUTIONS[self.library]
        out = {
            "library": self.library,
            "distribution": dist,
            "version": importlib.metadata.version(dist),
            "call": (f"quantize(copy, weights={self._qname(self.weight_bits)}, "
                     f"activations={self._qname(self.act_bits)}, include=<{len(self.names)} Linears>); "
                     + ("Calibration() over the calibration batches; " if self.act_bits else "")
                     + "freeze(copy)"),
            "weights": None if self.weight_bits is None else {
                "bits": self.weight_bits,
                "scheme": ("int8 symmetric absmax per output channel" if self.weight_bits == 8 else
                           "int4 affine min-max per group of input weights of a row (MaxOptimizer)"),
            },
            "activations": None if self.act_bits is None else {
                "bits": self.act_bits,
                "scheme": "static per-tensor symmetric int8 on every quantized Linear's input",
                "calibration": "momentum absmax: s_1 = m_1, s_t = 0.9 s_{t-1} + 0.1 m_t, m_t = max|x_t|/127",
                "streamline": True,
            },
            "excluded_patterns": list(self.exclude),
            "n_linears": len(self.names),
            "output_head": "float (never quantized)",
            "n_calibration_batches": self.n_calibration_batches,
            "n_calibration_tokens": self.n_calibration_tokens,
        }
        if self._qmodules is not None:
            if self.weight_bits == 4:
                sizes = sorted({m.weight_group_size for m in self._qmodules.values()}, key=lambda g: (g is None, g))
                out["weights"]["group_sizes"] = ["row" if g is None else g for g in sizes]
            if self.act_bits is not None:
                out["activations"]["n_outputs_quantized"] = sum(
                    "output" in m._quantize_hooks and m._quantize_hooks["output"].id in m._forward_hooks
                    for m in self._qmodules.values())
        return out

    @staticmethod
    def _qname(bits) -> str:
        return "None" if bits is None else f"qint{bits}"
