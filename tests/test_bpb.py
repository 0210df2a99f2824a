import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from empirical.bpb import bits_per_byte, segment_windows


def _direct_nll(model, tok, text):
    ids = torch.tensor([[tok.bos_token_id] + tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    return float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))


TEXTS = ["Hello world.", "Une phrase en français, avec des accents.", "שלום עולם", "日本語の文です。", "a"]


def test_bpb_equals_direct_computation(tiny_model):
    name, model, tok = tiny_model
    res = bits_per_byte(model, tok, TEXTS, batch_size=3)
    direct = np.array([_direct_nll(model, tok, t) for t in TEXTS])
    np.testing.assert_allclose(res.per_segment_nll, direct, rtol=1e-4)
    nbytes = sum(len(t.encode()) for t in TEXTS)
    assert res.n_bytes == nbytes
    assert res.bpb == pytest.approx(direct.sum() / (math.log(2) * nbytes), rel=1e-4)
    # byte tokenizer: one predicted token per byte
    assert res.n_tokens == nbytes
    assert res.subset_bpb(range(len(TEXTS))) == pytest.approx(res.bpb)


def test_sliding_window_covers_each_token_once():
    ids = list(range(103))
    for L, s in [(10, 5), (10, 9), (10, 1), (200, 100)]:
        scored = []
        for w, ctx in segment_windows(ids, L, s):
            assert len(w) <= L
            scored += w[ctx + 1:]
        assert scored == ids[1:]


def test_long_text_sliding_window_close_to_full_context(tiny_llama):
    model, tok = tiny_llama
    text = "The quick brown fox jumps over the lazy dog. " * 4
    full = bits_per_byte(model, tok, [text], max_length=512)
    win = bits_per_byte(model, tok, [text], max_length=64, stride=32)
    assert win.n_tokens == full.n_tokens
    assert np.isfinite(win.bpb) and abs(win.bpb - full.bpb) / full.bpb < 0.2


def test_bad_inputs(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="no texts"):
        bits_per_byte(model, tok, [])
    with pytest.raises(ValueError, match="empty"):
        bits_per_byte(model, tok, ["ok", ""])
    with pytest.raises(ValueError, match="stride"):
        bits_per_byte(model, tok, ["x" * 50], max_length=10, stride=10)
