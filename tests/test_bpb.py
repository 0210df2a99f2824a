import math
import warnings

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


# ---- BpbEngine: head path, residual replay ----------------------------------------------------

def test_engine_uses_hidden_state_head_on_every_arch(tiny_model):
    """The chunked output layer agrees with the model's logits, so no arch falls back."""
    from empirical.bpb import BpbEngine

    name, model, tok = tiny_model
    eng = BpbEngine(model, tok, {"a": TEXTS[:3], "b": TEXTS[3:]}, head_chunk=7, head_rows=5)
    nll = eng.nll()
    assert eng.head_exact is True, name
    direct = np.array([_direct_nll(model, tok, t) for t in TEXTS])
    np.testing.assert_allclose(np.concatenate([nll["a"], nll["b"]]), direct, rtol=1e-4)
    assert eng.result("b", nll).n_bytes == sum(len(t.encode()) for t in TEXTS[3:])


def _block_calls(blocks):
    """Count calls of every block (a test-only probe: replay itself needs no hooks)."""
    calls = [0] * len(blocks)
    handles = [blk.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, blk in enumerate(blocks)]
    return calls, handles


# Architectures whose blocks replay calls directly; BLOOM's ALiBi is not rebuilt, so it runs in full.
REPLAYS = {"tiny-gpt2": True, "tiny-llama": True, "tiny-gemma": True, "tiny-opt": True, "tiny-bloom": False}


def test_engine_replay_equals_full_pass_for_every_start_block(tiny_model):
    """Replaying the recorded residual stream through explicitly called blocks is exact when the
    later blocks are quantized, and runs only blocks start_block.. (counted)."""
    from empirical.bpb import BpbEngine
    from empirical.fakequant import FakeQuantizer, QuantConfig
    from empirical.models import model_view

    name, model, tok = tiny_model
    view = model_view(model)
    fq = FakeQuantizer(view.linears, QuantConfig(bits=2, grid="int"))
    eng = BpbEngine(model, tok, {"x": TEXTS}, max_batch_tokens=40, pack_length=30)
    assert len(eng.batches) > 1
    if REPLAYS[name]:
        base = eng.record()
        assert eng.recorded and eng.replay_unavailable is None
    else:
        with pytest.warns(RuntimeWarning, match="ALiBi"):
            base = eng.record()
        assert not eng.recorded and "ALiBi" in eng.replay_unavailable
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a retried record() does not warn again
            np.testing.assert_allclose(eng.record()["x"], base["x"], rtol=0, atol=0)
    np.testing.assert_allclose(base["x"], eng.nll()["x"], rtol=0, atol=0)
    n_batches = len(eng.batches)
    for b in range(view.n_layers + 1):
        protect = {q.name for q in view.linears if q.block < b}
        with fq.quantized(protect=protect):
            full = eng.nll()["x"]
            calls, handles = _block_calls(view.blocks)
            try:
                replayed = eng.nll(start_block=b)["x"]
            finally:
                for h in handles:
                    h.remove()
        np.testing.assert_allclose(replayed, full, rtol=1e-5, err_msg=f"{name} start_block={b}")
        if b < view.n_layers:
            assert not np.allclose(full, base["x"])
        first = min(b, view.n_layers - 1) if REPLAYS[name] else 0  # start_block=n runs the last block again
        assert calls == [0] * first + [n_batches] * (view.n_layers - first), (name, b, calls)
    # nothing was left patched: a plain pass after replay is the baseline again
    np.testing.assert_allclose(eng.nll()["x"], base["x"], rtol=1e-6)


LONG = ["The quick brown fox jumps over the lazy dog. " * 2, "Une phrase en français, avec des accents.",
        "שלום עולם, " * 6, "a"]


def _tiny_gemma_mixed_layers(sliding_window=8):
    """A Gemma 3 with local (sliding) and global layers interleaved and a window shorter than
    the texts, so that replay must give each layer type its own mask and rotary base."""
    import transformers as tf

    from empirical.models import ByteTokenizer

    cfg = tf.Gemma3TextConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=512, sliding_window=sliding_window,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              bos_token_id=ByteTokenizer.bos_token_id, eos_token_id=ByteTokenizer.eos_token_id,
                              pad_token_id=ByteTokenizer.pad_token_id)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval(), ByteTokenizer()


@pytest.mark.parametrize("pack", [True, False])
def test_replay_is_exact_with_sliding_and_full_gemma_layers(pack):
    from empirical.bpb import BpbEngine
    from empirical.fakequant import FakeQuantizer, QuantConfig
    from empirical.models import model_view

    model, tok = _tiny_gemma_mixed_layers()
    view = model_view(model)
    eng = BpbEngine(model, tok, {"x": LONG}, pack=pack, pack_length=160, max_batch_tokens=200)
    base = eng.record()
    assert eng.recorded and eng.packed == pack
    np.testing.assert_allclose(base["x"], [_direct_nll(model, tok, t) for t in LONG], rtol=1e-5)
    fq = FakeQuantizer(view.linears, QuantConfig(bits=3, grid="int"))
    for b in (1, 2):
        with fq.quantized(protect={q.name for q in view.linears if q.block < b}):
            full = eng.nll()["x"]
            np.testing.assert_allclose(eng.nll(start_block=b)["x"], full, rtol=1e-5, err_msg=f"start_block={b}")


def test_replay_check_catches_a_wrong_block_input(monkeypatch):
    """The check at record() is not a formality: blocks given a causal mask without the sliding
    window disagree with the model's pass, replay is refused, and passes run in full."""
    from empirical._replay import Gemma3
    from empirical.bpb import BpbEngine

    def without_window(self, h, batch):
        kw = {"attention_mask": self.mask(h, batch), "position_ids": batch.pos,
              "position_embeddings": self.rotary(h, batch.pos, "sliding_attention")}
        return [kw] * self.n_blocks

    monkeypatch.setattr(Gemma3, "for_batch", without_window)
    model, tok = _tiny_gemma_mixed_layers()
    eng = BpbEngine(model, tok, {"x": LONG})
    with pytest.warns(RuntimeWarning, match="differs from the model's pass"):
        base = eng.record()
    assert not eng.recorded and "differs" in eng.replay_unavailable
    np.testing.assert_allclose(eng.nll(start_block=2)["x"], base["x"], rtol=0, atol=0)


# Architectures whose position ids keep packed segments apart (block-diagonal mask from the
# restarts); OPT and BLOOM take positions from the attention mask and must fall back.
PACKS = {"tiny-gpt2": True, "tiny-llama": True, "tiny-gemma": True, "tiny-opt": False, "tiny-bloom": False}


def test_engine_packs_where_positions_keep_segments_apart(tiny_model):
    """Packed rows give each segment the NLL it has alone; where an architecture would let
    packed segments see each other the check catches it and padded batches give the same."""
    from empirical.bpb import BpbEngine

    name, model, tok = tiny_model
    texts = TEXTS * 3
    eng = BpbEngine(model, tok, {"x": texts}, pack_length=64)
    assert max(int(b.win[b.rows.cpu() == 0].unique().numel()) for b in eng.batches) > 1  # really packed
    packed_padding = eng.padding_fraction
    if PACKS[name]:
        nll = eng.nll()["x"]
        assert eng.packed and eng.packing_exact is True
    else:
        with pytest.warns(RuntimeWarning, match="padded batches"):
            nll = eng.nll()["x"]
        assert not eng.packed and eng.packing_exact is False
    direct = np.array([_direct_nll(model, tok, t) for t in texts])
    np.testing.assert_allclose(nll, direct, rtol=1e-5)
    plain = BpbEngine(model, tok, {"x": texts}, pack=False)
    assert not plain.packed and packed_padding < plain.padding_fraction and plain.packing_exact is None
    np.testing.assert_allclose(plain.nll()["x"], direct, rtol=1e-5)


def test_pack_check_catches_segments_that_see_each_other(tiny_llama):
    """The check is not a formality: packed rows without restarted positions (one long
    sequence, plain causal mask) let segments attend to each other, and are refused."""
    from empirical.bpb import BpbEngine

    model, tok = tiny_llama
    eng = BpbEngine(model, tok, {"x": TEXTS * 3}, pack_length=64)
    assert eng.packed  # before the first scoring: the packed layout, not yet checked
    for b in eng.batches:
        b.pos = torch.arange(b.ids.shape[1]).expand_as(b.ids).clone()
    with pytest.warns(RuntimeWarning, match="padded batches"):
        nll = eng.nll()["x"]
    assert not eng.packed
    np.testing.assert_allclose(nll, [_direct_nll(model, tok, t) for t in TEXTS * 3], rtol=1e-5)


def test_pack_check_with_windows_of_very_different_lengths(tiny_llama):
    """A packed row of one long and several short windows: scored one per row, those windows
    fall into separate batches, and the check still compares all of them."""
    from empirical.bpb import BpbEngine

    model, tok = tiny_llama
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "a", "b", "c"]
    eng = BpbEngine(model, tok, {"x": texts}, pack_length=200)
    assert len(eng.batches) == 1 and eng.batches[0].ids.shape[0] == 1  # all in one row
    nll = eng.nll()["x"]
    assert eng.packed
    np.testing.assert_allclose(nll, [_direct_nll(model, tok, t) for t in texts], rtol=1e-5)


def test_pack_rows_first_fit_decreasing():
    from empirical._packing import pack_rows

    lengths = [5, 9, 3, 7, 2, 12, 4]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows if len(r) > 1)
    assert [12] in [[lengths[i] for i in r] for r in rows]  # too long: a row of its own
    # first-fit decreasing: 12 | 9 | 7+3 | 5+4 | 2 (fits nowhere: 1 free in rows 2 and 4)
    assert len(rows) == 5


def test_engine_refuses_to_replay_changed_blocks(tiny_llama):
    from empirical.bpb import BpbEngine
    from empirical.fakequant import FakeQuantizer, QuantConfig
    from empirical.models import model_view

    model, tok = tiny_llama
    view = model_view(model)
    eng = BpbEngine(model, tok, {"x": TEXTS})
    eng.record()
    fq = FakeQuantizer(view.linears, QuantConfig(bits=2, grid="int"))
    with fq.quantized(), pytest.raises(RuntimeError, match="block 0 changed"):
        eng.nll(start_block=1)
    with pytest.raises(ValueError, match="start_block"):
        eng.nll(start_block=view.n_layers + 1)


def test_engine_applies_softcapping_and_falls_back_on_unknown_heads(tiny_model):
    """Gemma's final logit soft-capping is reproduced; an architecture that ignores the config
    field makes the check fail and scoring falls back to the model's logits, still exact."""
    from empirical.bpb import BpbEngine

    name, model, tok = tiny_model
    old = getattr(model.config, "final_logit_softcapping", None)
    model.config.final_logit_softcapping = 0.5
    try:
        direct = np.array([_direct_nll(model, tok, t) for t in TEXTS])
        eng = BpbEngine(model, tok, {"x": TEXTS})
        if "gemma" in name:
            nll = eng.nll()["x"]
            assert eng.head_exact is True
        else:
            with pytest.warns(RuntimeWarning, match="falls back"):
                nll = eng.nll()["x"]
            assert eng.head_exact is False
        np.testing.assert_allclose(nll, direct, rtol=1e-4)
    finally:
        model.config.final_logit_softcapping = old


def _direct_kl(model_p_logits, model, tok, text):
    """Per-segment KL(p || q) and top-1 agreements from full logits: ``p`` given as the
    baseline's logits of the segment, ``q`` from ``model`` now."""
    ids = torch.tensor([[tok.bos_token_id] + tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        lq = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    lp = model_p_logits.log_softmax(-1)
    kl = float((lp.exp() * (lp - lq)).sum())
    return kl, int((lp.argmax(-1) == lq.argmax(-1)).sum())


def _logits(model, tok, text):
    ids = torch.tensor([[tok.bos_token_id] + tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, :-1].double()


@pytest.mark.parametrize("cap", [None, 3.0])
def test_kl_bits_per_byte_equals_direct_computation_from_full_logits(tiny_llama, cap):
    """The engine's per-segment KL from the recorded baseline (no logits kept) and its top-1
    agreement equal those computed from both passes' full logits, for a pass replayed from a
    later block and for a full pass, with and without soft-capping (tiny Llama's head ignores
    the cap, so the capped case is run on Gemma)."""
    from empirical.bpb import BpbEngine
    from empirical.fakequant import FakeQuantizer, QuantConfig
    from empirical.models import load_model, model_view

    model, tok = tiny_llama if cap is None else load_model("tiny-gemma", seed=0)
    if cap is not None:
        model.config.final_logit_softcapping = cap
    view = model_view(model)
    texts = {"a": TEXTS[:3], "b": TEXTS[3:]}
    eng = BpbEngine(model, tok, texts, head_chunk=5, head_rows=7)
    eng.record()
    base = {k: [_logits(model, tok, t) for t in v] for k, v in texts.items()}
    zero = eng.score()
    for k in texts:  # the baseline against itself: KL 0, every token agrees
        np.testing.assert_allclose(zero.kl[k], 0.0, atol=1e-5)
        np.testing.assert_array_equal(zero.agree[k], eng.tokens[k])
    for start in (0, view.n_layers - 1):
        lins = [q for q in view.linears if (q.block or 0) >= start]
        fq = FakeQuantizer(lins, QuantConfig(bits=2, grid="int"))
        with fq.quantized():
            s = eng.score(start_block=start)
            for k, segs in texts.items():
                direct = [_direct_kl(lp, model, tok, t) for lp, t in zip(base[k], segs)]
                kl = np.array([d[0] for d in direct])
                assert kl.sum() > 1e-3  # the quantizer did change the distribution
                np.testing.assert_allclose(s.kl[k], kl, rtol=1e-4, atol=1e-6)
                np.testing.assert_array_equal(s.agree[k], [d[1] for d in direct])
                np.testing.assert_allclose(s.nll[k], [_direct_nll(model, tok, t) for t in segs], rtol=1e-4)


def test_kl_refused_when_the_output_layer_changed(tiny_llama):
    """KL needs the baseline's output layer; a changed one gives no KL and says why."""
    from empirical.bpb import BpbEngine

    model, tok = tiny_llama
    eng = BpbEngine(model, tok, {"x": TEXTS})
    assert eng.score().kl is None and "record" in eng.kl_unavailable
    eng.record()
    w = model.get_output_embeddings().weight
    old = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(1.01)
        s = eng.score()
        assert s.kl is None and "output layer changed" in eng.kl_unavailable
    finally:
        with torch.no_grad():
            w.copy_(old)
