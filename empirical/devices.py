"""Models spread over several devices or offloaded by accelerate: where they run, their real weights.

A model dispatched by accelerate (``dispatch_model``, ``cpu_offload``, or ``from_pretrained``
with a ``device_map``) carries an ``AlignDevicesHook`` on its modules (``module._hf_hook``,
possibly inside a ``SequentialHook``). Before a module's forward the hook moves the inputs to the
module's *execution device*; when the module is **offloaded** its parameters sit on the ``meta``
device between calls and the hook loads them from its ``weights_map`` (a mapping of parameter
names, prefixed by the module's name, to CPU tensors or to files on disk) for the call, then puts
``meta`` back. So for such a model

* ``next(model.parameters()).device`` may be ``meta``: where inputs go is the execution device of
  the input embedding (:func:`execution_device`);
* ``module.weight`` may be a ``meta`` tensor: the weight the next forward uses is
  ``hook.weights_map["weight"]`` (:func:`param_tensor`, :func:`named_tensors`);
* assigning ``module.weight.data`` changes nothing the forward sees: the entry of the weights map
  must be replaced instead (:func:`swap_param`, which restores the very tensor that was there).

For a model without hooks every function here returns what the plain attribute gives, so code
written with them behaves as before on ordinary models. accelerate is imported only by
:func:`require_accelerate` (the loader's dispatching paths); reading hooks needs no import.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, MutableMapping
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["require_accelerate", "hooks", "is_dispatched", "is_offloaded", "module_device",
           "execution_device", "resolve_device", "param_tensor", "named_tensors", "swap_param",
           "offload_description"]

_INSTALL = 'pip install accelerate (or the models extra: pip install -e ".[models]")'


def require_accelerate(purpose: str = "placing a model on several devices or offloading it"):
    """The ``accelerate`` module, imported now.

    Raises
    ------
    ImportError
        accelerate is not installed; the message says what needed it and how to install it.
    """
    try:
        return importlib.import_module("accelerate")
    except ImportError as exc:
        raise ImportError(f"{purpose} needs the package accelerate, which is not installed; "
                          f"install it with: {_INSTALL}") from exc


def hooks(module: nn.Module) -> list:
    """The accelerate hooks on ``module`` itself (a ``SequentialHook`` flattened), in order."""
    h = getattr(module, "_hf_hook", None)
    if h is None:
        return []
    out, todo = [], [h]
    while todo:
        x = todo.pop(0)
        sub = getattr(x, "hooks", None)
        if isinstance(sub, (tuple, list)):
            todo[:0] = list(sub)
        else:
            out.append(x)
    return out


def is_dispatched(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries an accelerate hook."""
    return any(getattr(m, "_hf_hook", None) is not None for m in model.modules())


def is_offloaded(model: nn.Module) -> bool:
    """Whether some parameter of ``model`` lives outside the module (``meta`` between calls)."""
    return any(p.device.type == "meta" for p in model.parameters())


def _as_device(d) -> torch.device:
    if isinstance(d, torch.device):
        return d
    if isinstance(d, int):  # accelerate writes accelerator devices as their index
        return torch.device("cuda", d)
    return torch.device(d)


def module_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` runs: the execution device of its own accelerate hook, else the device of
    its first parameter or buffer that is not on ``meta``; None when neither exists."""
    for h in hooks(module):
        d = getattr(h, "execution_device", None)
        if d is not None:
            return _as_device(d)
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return None


def execution_device(model: nn.Module) -> torch.device:
    """The device that a model's inputs go to.

    The input embedding's execution device (:func:`module_device`); failing that, the first
    hook's execution device in module order, the first parameter not on ``meta``, or the CPU.
    For a model without hooks this is the embedding's parameter device.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        d = module_device(emb)
        if d is not None:
            return d
    for m in model.modules():
        for h in hooks(m):
            if getattr(h, "execution_device", None) is not None:
                return _as_device(h.execution_device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def resolve_device(model: nn.Module, device=None) -> torch.device:
    """``device`` as a ``torch.device``. None, ``"auto"`` and ``"offload"`` (the placements of
    :func:`empirical.models.load_model`, so one ``--device`` string serves the loader and the
    engines) mean :func:`execution_device`."""
    if device is None or (isinstance(device, str) and device in ("auto", "offload")):
        return execution_device(model)
    return _as_device(device)


def _holds(wm: Mapping, key: str) -> bool:
    """Whether the weights map ``wm`` has ``key``, without reading it (a disk entry is not loaded)."""
    while hasattr(wm, "dataset") and hasattr(wm, "prefix"):  # accelerate's PrefixedDataset
        key, wm = wm.prefix + key, wm.dataset
    if hasattr(wm, "state_dict") and hasattr(wm, "index"):  # accelerate's OffloadedWeightsLoader
        return key in wm.state_dict or key in wm.index
    return key in wm


def _in_memory(wm: Mapping, key: str) -> bool:
    """Whether ``wm[key]`` is a tensor held in memory (the same object at every read), not read
    from disk afresh."""
    while hasattr(wm, "dataset") and hasattr(wm, "prefix"):
        key, wm = wm.prefix + key, wm.dataset
    if hasattr(wm, "state_dict") and hasattr(wm, "index"):
        return key in wm.state_dict
    return True


def _offloading_hook(module: nn.Module, name: str):
    """The hook of ``module`` whose weights map holds the direct tensor ``name``, or None."""
    for h in hooks(module):
        wm = getattr(h, "weights_map", None)
        if getattr(h, "offload", False) and wm is not None and _holds(wm, name):
            return h
    return None


def param_tensor(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The real tensor of ``module``'s direct parameter (or buffer) ``name``: what the next
    forward uses.

    For an offloaded module (an accelerate hook with ``offload=True`` holding ``name`` in its
    weights map) it is the weights map's entry (CPU memory, or read from disk: then a fresh copy
    each call); otherwise the parameter itself.

    Raises
    ------
    ValueError
        The tensor is on ``meta`` and no hook of ``module`` itself holds it (e.g. accelerate's
        ``preload_module_classes``, where an enclosing module's hook loads its submodules): the
        message names the tensor.
    """
    h = _offloading_hook(module, name)
    if h is not None:
        return h.weights_map[name]
    t = getattr(module, name)
    if t is not None and t.device.type == "meta":
        raise ValueError(f"{type(module).__name__}.{name} is on the meta device and no accelerate hook of this "
                         "module holds its value (offloading by an enclosing module's hook, accelerate's "
                         "preload_module_classes, is not supported)")
    return t


def named_tensors(module: nn.Module, prefix: str = "", buffers: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(qualified name, real tensor)`` of every parameter of ``module`` and its submodules,
    and with ``buffers`` every buffer; real as in :func:`param_tensor`, also when an enclosing
    module's hook with ``place_submodules`` holds a submodule's tensors.

    A shared (tied) parameter comes once, under its first name, as in ``named_parameters``; an
    offloading hook gives each tied module a ``meta`` parameter of its own, so sharing is also
    recognised by the real tensors: the same memory (device, address, shape, strides, dtype).
    (Disk-offloaded tensors are read afresh, so tied weights on disk come once per name.)"""
    seen: set[int] = set()
    seen_mem: set[tuple] = set()

    def walk(m: nn.Module, pre: str, holders: list[tuple[Any, str]]):
        own = [(h, "") for h in hooks(m)
               if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None]
        # an ancestor's hook that places its submodules holds this module's tensors under "<path>."
        inherited = [(h, p) for h, p in holders if getattr(h, "place_submodules", False)]
        items = list(m._parameters.items()) + (list(m._buffers.items()) if buffers else [])
        for n, t in items:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            holder = next(((h.weights_map, p + n) for h, p in own + inherited if _holds(h.weights_map, p + n)), None)
            if holder is None:
                if t.device.type == "meta":
                    raise ValueError(f"{pre + n} is on the meta device and no accelerate hook holds its value")
                real, kept = t, True
            else:
                real, kept = holder[0][holder[1]], _in_memory(*holder)
            # memory identity only among tensors that stay alive (a freshly read disk tensor's
            # address may be reused by the next one)
            if kept and real.device.type != "meta" and real.numel():
                mem = (real.device, real.data_ptr(), tuple(real.shape), real.stride(), real.dtype)
                if mem in seen_mem:
                    continue
                seen_mem.add(mem)
            yield pre + n, real
        nxt = [(h, p) for h, p in inherited] + own
        for cn, c in m._modules.items():
            if c is not None:
                yield from walk(c, f"{pre}{cn}.", [(h, f"{p}{cn}.") for h, p in nxt])

    yield from walk(module, prefix, [])


def _entry(wm: Mapping, key: str) -> tuple[MutableMapping, str]:
    """The mutable mapping and key that hold ``wm[key]``: through accelerate's ``PrefixedDataset``
    (``dataset``, ``prefix``) and ``OffloadedWeightsLoader`` (its ``state_dict`` comes first when
    reading, so an entry put there overrides one on disk)."""
    while hasattr(wm, "dataset") and hasattr(wm, "prefix"):
        key, wm = wm.prefix + key, wm.dataset
    if hasattr(wm, "state_dict") and hasattr(wm, "index") and isinstance(wm.state_dict, MutableMapping):
        return wm.state_dict, key
    if isinstance(wm, MutableMapping):
        return wm, key
    raise TypeError(f"cannot replace an entry of a weights map of type {type(wm).__name__}")


_MISSING = object()


def swap_param(module: nn.Module, name: str, value: torch.Tensor) -> Callable[[], None]:
    """Make the forward of ``module`` use ``value`` for its direct parameter ``name``; returns a
    function that puts back exactly what was there (the same tensor object, so restoration is
    bit for bit, not a copy).

    Without an offloading hook the parameter's ``.data`` is replaced. Under offload the entry of
    the hook's weights map is replaced (the parameter stays on ``meta``); for weights on disk the
    value is put in the loader's in-memory ``state_dict``, which takes precedence, and removed
    again on restore.
    """
    h = _offloading_hook(module, name)
    if h is None:
        p = getattr(module, name)
        if p.device.type == "meta":
            param_tensor(module, name)  # raises with the reason
        old = p.data
        p.data = value

        def restore():
            p.data = old
        return restore
    store, key = _entry(h.weights_map, name)
    old = store.get(key, _MISSING)
    store[key] = value

    def restore():
        if old is _MISSING:
            del store[key]
        else:
            store[key] = old
    return restore


def offload_description(model: nn.Module) -> dict:
    """What :func:`empirical.models.load_model` records of a dispatched model: its device map
    (``hf_device_map``, values as strings), the execution device of its inputs, and whether
    some weights live outside their modules (offloaded)."""
    dm = getattr(model, "hf_device_map", None)
    return {"device_map": {k: str(v) for k, v in dm.items()} if dm is not None else None,
            "execution_device": str(execution_device(model)),
            "offloaded": is_offloaded(model)}
