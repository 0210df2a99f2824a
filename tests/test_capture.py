import numpy as np
import pytest
import scipy.stats as ss
import torch

from empirical.capture import StreamingStats, capture_activations, capture_corpus
from empirical.corpora import Corpus, LanguageInfo
from empirical.models import model_view

TEXTS = {"eng": ["The cat sat on the mat.", "Hello there, world!"],
         "heb": ["שלום עולם", "כל בני אדם נולדו בני חורין"]}


def _ids(tok, text):
    return torch.tensor([tok.encode(text)])


def test_hooks_see_every_block_and_linear_and_are_removed(tiny_model):
    name, model, tok = tiny_model
    view = model_view(model)
    before = sum(len(m._forward_hooks) for m in model.modules())
    with capture_activations(model, view, languages=["eng", "heb"], reservoir_size=64, bins=64) as cap:
        assert cap.n_hooks == len(view.linears) + len(view.blocks)
        for lang, segs in TEXTS.items():
            with cap.for_language(lang):
                for s in segs:
                    model(input_ids=_ids(tok, s))
        model(input_ids=_ids(tok, "unrecorded"))  # no language set: nothing recorded
    assert sum(len(m._forward_hooks) for m in model.modules()) == before
    keys = {k for k, _ in cap.stats}
    assert keys == {s.key for s in cap.sites}
    assert len(cap.sites) == 2 * len(view.linears) + len(view.blocks)
    n_tok = {l: sum(len(s.encode()) + 1 for s in segs) for l, segs in TEXTS.items()}
    for s in cap.sites:
        for lang in TEXTS:
            st = cap.get(s, lang)
            width = st.n // n_tok[lang]
            assert st.n == n_tok[lang] * width  # every token, no padding, nothing extra
    rows = cap.rows()
    assert len(rows) == len(cap.sites) * 2 and {"excess_kurtosis", "q999"} <= set(rows[0])


def test_hooks_removed_on_exception(tiny_gpt2):
    model, tok = tiny_gpt2
    before = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with capture_activations(model) as cap:
            cap.language = "eng"
            model(input_ids=_ids(tok, "abc"))
            raise RuntimeError("boom")
    assert sum(len(m._forward_hooks) for m in model.modules()) == before
    with pytest.raises(ValueError, match="not among"):
        with capture_activations(model, languages=["eng"]) as cap:
            cap.language = "fra"


def test_streaming_stats_equal_full_activations(tiny_llama):
    model, tok = tiny_llama
    view = model_view(model)
    target = view.linears[3]  # o_proj
    stored_in, stored_out, stored_res = [], [], []

    def keep_linear(m, a, o):  # a hook returning non-None would replace the output
        stored_in.append(a[0].detach().reshape(-1).double())
        stored_out.append(o.detach().reshape(-1).double())

    def keep_block(m, a, o):
        stored_res.append((o[0] if isinstance(o, tuple) else o).detach().reshape(-1).double())

    h1 = target.module.register_forward_hook(keep_linear)
    h2 = view.blocks[1].register_forward_hook(keep_block)
    try:
        with capture_activations(model, view, reservoir_size=50, bins=128, seed=1) as cap:
            with cap.for_language("eng"):
                for s in TEXTS["eng"] * 3:
                    model(input_ids=_ids(tok, s))
    finally:
        h1.remove(); h2.remove()
    for stored, key in [(stored_in, f"{target.name}:linear_input"),
                        (stored_out, f"{target.name}:linear_output"),
                        (stored_res, f"{view.block_names[1]}:residual")]:
        x = torch.cat(stored).numpy()
        st = cap.get(key, "eng")
        assert st.n == x.size
        # batch sums are float32 (the activations' own precision), merges float64
        np.testing.assert_allclose(st.mean, x.mean(), rtol=1e-5, atol=1e-7 * x.std())
        np.testing.assert_allclose(st.variance, x.var(), rtol=1e-5)
        np.testing.assert_allclose(st.skewness, ss.skew(x), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(st.excess_kurtosis, ss.kurtosis(x), rtol=1e-4, atol=1e-5)
        assert st.absmax == pytest.approx(np.abs(x).max())
        assert st.hist.sum() == x.size
        assert np.isin(st.sample(), x).all() and len(st.sample()) == 50
        qs = st.quantile([0.05, 0.5, 0.95])
        assert np.all(np.abs(qs - np.quantile(x, [0.05, 0.5, 0.95])) <= 2 * 2 * st.range / st.bins + 1e-9)


def test_memory_independent_of_tokens(tiny_gpt2):
    model, tok = tiny_gpt2
    sizes = []
    for reps in (1, 10):
        with capture_activations(model, reservoir_size=32, bins=64) as cap:
            with cap.for_language("eng"):
                for _ in range(reps):
                    model(input_ids=_ids(tok, "Some text to push through the model. " * 3))
        sizes.append((cap.nbytes(), len(cap.stats)))
    assert sizes[0] == sizes[1]


def test_histogram_range_doubling_exact():
    st = StreamingStats(bins=8, reservoir_size=4)
    st.update(torch.tensor([0.1, -0.2, 0.3]))
    assert st.range == 0.5
    st.update(torch.tensor([1.9, -3.5]))
    assert st.range == 4.0 and st.hist.sum() == 5
    edges = np.linspace(-4, 4, 9)
    np.testing.assert_array_equal(st.hist, np.histogram([0.1, -0.2, 0.3, 1.9, -3.5], edges)[0])


def test_reservoir_uniform_and_seeded():
    def run(seed):
        st = StreamingStats(bins=4, reservoir_size=200, seed=seed)
        for chunk in torch.arange(20000, dtype=torch.float64).split(777):
            st.update(chunk)
        return st.sample()

    a, b = run(3), run(3)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 200
    # uniform over 0..19999: mean ~ 10000 (sd of the mean ~ 408)
    assert abs(a.mean() - 9999.5) < 2000
    assert ss.kstest(a / 20000, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("include_bos", [False, True])
def test_capture_corpus_masks_padding(tiny_llama, include_bos):
    model, tok = tiny_llama
    c = Corpus("t", {k: v for k, v in TEXTS.items()}, {k: LanguageInfo(k, k) for k in TEXTS})
    with capture_activations(model, residual=True, linear_inputs=False, linear_outputs=False) as cap:
        capture_corpus(cap, tok, c, batch_size=2, include_bos=include_bos)
    # byte tokenizer: one token per byte, plus BOS when it is recorded
    n_tok = sum(len(s.encode()) + include_bos for s in TEXTS["heb"])
    st = cap.get(f"{model_view(model).block_names[0]}:residual", "heb")
    assert st.n == n_tok * model.config.hidden_size


def test_capture_corpus_bos_left_out_exactly(tiny_llama):
    """Without BOS the statistics are those of the non-BOS positions of a plain forward pass."""
    model, tok = tiny_llama
    texts = {"eng": ["hello there", "a longer second segment"]}
    c = Corpus("t", texts, {"eng": LanguageInfo("eng", "eng")})
    name = model_view(model).block_names[1]
    with capture_activations(model, residual=True, linear_inputs=False, linear_outputs=False) as cap:
        capture_corpus(cap, tok, c, batch_size=1)
    kept = []
    block = model_view(model).blocks[1]
    h = block.register_forward_hook(lambda _m, _i, out: kept.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            for t in texts["eng"]:
                ids = [tok.bos_token_id] + tok([t], add_special_tokens=False)["input_ids"][0]
                model(input_ids=torch.tensor([ids]))
    finally:
        h.remove()
    ref = torch.cat([k[0, 1:] for k in kept]).double().flatten().numpy()
    st = cap.get(f"{name}:residual", "eng")
    assert st.n == ref.size
    np.testing.assert_allclose([st.mean, st.variance, st.absmax],
                               [ref.mean(), ref.var(), np.abs(ref).max()], rtol=1e-6)


def test_bfloat16_model(tiny_model):
    import copy

    name, model, tok = tiny_model
    m = copy.deepcopy(model).to(torch.bfloat16)  # the session fixture must stay float32
    with capture_activations(m, reservoir_size=16, bins=16) as cap:
        with cap.for_language("eng"):
            m(input_ids=_ids(tok, "bf16 works"))
    assert cap.stats and all(np.isfinite(s.mean) and s.n > 0 for s in cap.stats.values())


def test_float64_stream_and_histogram_subsample():
    rng = np.random.default_rng(0)
    parts = [rng.laplace(3.0, 0.5, size=n) for n in (10, 100_000, 7, 50_000)]
    st = StreamingStats(bins=256, reservoir_size=100, hist_sample=4096)
    for p in parts:
        st.update(torch.from_numpy(p))
    x = np.concatenate(parts)
    np.testing.assert_allclose([st.mean, st.variance, st.skewness, st.excess_kurtosis],
                               [x.mean(), x.var(), ss.skew(x), ss.kurtosis(x)], rtol=1e-9, atol=1e-9)
    assert st.n == x.size and st.hist.sum() <= 3 * 4096 + 20
    # quantiles from the subsampled histogram stay close
    np.testing.assert_allclose(st.quantile([0.1, 0.5, 0.9]), np.quantile(x, [0.1, 0.5, 0.9]), atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_power_sums_match_torch_and_float64_reference(dtype):
    """The one-pass CPU kernel, the torch path and a float64 numpy reference agree, also with a
    massive outlier first and a large common offset (what a residual stream looks like)."""
    from empirical.capture import StreamingStats

    rng = np.random.default_rng(0)
    x = rng.standard_t(3, 300_001) * 0.5 + 40.0
    x[0] = 5e3
    t = torch.tensor(x, dtype=dtype)
    ref = t.double().numpy()
    mu = ref.mean()
    d = ref - mu
    want = (ref.size, mu, (d ** 2).sum(), (d ** 3).sum(), (d ** 4).sum(), ref.min(), ref.max())
    fast = StreamingStats.batch_moments(t)
    slow = StreamingStats.batch_moments_torch(t)
    f32 = dtype == torch.float32
    for got, rtol, rtol_sq in ((fast, 1e-9, 1e-12), (slow, 1e-3 if f32 else 1e-9, 1e-7 if f32 else 1e-12)):
        assert got[0] == want[0]
        np.testing.assert_allclose(got[1:7], want[1:], rtol=rtol)
        # a 1-D tensor is one channel: its sum of squares and absmax are the whole tensor's
        # (the torch path squares float32 values in float32 before its float64 sum)
        np.testing.assert_allclose(got[7], [(ref ** 2).sum()], rtol=rtol_sq)
        np.testing.assert_allclose(got[8], [np.abs(ref).max()], rtol=1e-12)


def _planted(shape, outlier, seed=0):
    """Laplace noise whose channel ``outlier`` (last axis) carries an offset and 20x the scale."""
    rng = np.random.default_rng(seed)
    x = rng.laplace(0.0, 1.0, size=shape)
    x[..., outlier] = 20.0 * x[..., outlier] + 15.0
    return x


def _energy_reference(x2):
    """Per-channel sum of squares, absmax, top channel, its share and the channels holding half
    of the energy, in plain numpy."""
    sq = (x2.astype(np.float64) ** 2).sum(axis=0)
    shares = np.sort(sq)[::-1] / sq.sum()
    half = next(k + 1 for k in range(sq.size) if shares[: k + 1].sum() >= 0.5)
    return sq, np.abs(x2).max(axis=0), int(np.argmax(sq)), float(sq.max() / sq.sum()), half


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_sums_with_planted_outlier(dtype):
    """Per-channel sum of squares and absmax from the numba pass, the torch path and streaming
    merges equal a plain numpy computation; the planted channel is found."""
    x = _planted((3, 2000, 96), outlier=41)  # (batch, tokens, channels): 41 channels' chunks split rows
    t = torch.tensor(x, dtype=dtype)
    ref = t.double().numpy().reshape(-1, 96)
    sq, am, top, share, half = _energy_reference(ref)
    assert top == 41 and share > 0.5 and half == 1
    for got in (StreamingStats.batch_moments(t), StreamingStats.batch_moments_torch(t)):
        np.testing.assert_allclose(got[7], sq, rtol=1e-6 if dtype == torch.float32 else 1e-12)
        np.testing.assert_allclose(got[8], am, rtol=1e-7)
    # streamed in uneven (tokens x channels) pieces: the merged sums are the whole tensor's
    st = StreamingStats(bins=64, reservoir_size=16)
    for piece in np.array_split(ref, [1, 700, 5999]):
        st.update(torch.tensor(piece, dtype=dtype))
    np.testing.assert_allclose(st.channel_sumsq, sq, rtol=1e-6 if dtype == torch.float32 else 1e-12)
    np.testing.assert_array_equal(st.channel_absmax, am)
    e = st.channel_energy()
    assert (e["channels"], e["top_channel"], e["channels_for_half"]) == (96, 41, 1)
    assert e["top_share"] == pytest.approx(share, rel=1e-6)
    assert e["top_absmax"] == am[41]
    # without the outlier the energy is spread: about half of the channels hold half of it
    flat = _energy_reference(np.random.default_rng(1).laplace(size=(5000, 96)))
    st2 = StreamingStats(bins=64, reservoir_size=16)
    st2.update(torch.tensor(np.random.default_rng(1).laplace(size=(5000, 96))))
    e2 = st2.channel_energy()
    assert (e2["top_channel"], e2["channels_for_half"]) == (flat[2], flat[4]) and 40 <= flat[4] <= 50
    with pytest.raises(ValueError, match="channel"):
        st.update(torch.zeros(4, 95))


@pytest.mark.parametrize("include_bos", [False, True])
def test_channel_energy_leaves_the_bos_position_out(tiny_llama, include_bos):
    """A massive activation planted at the BOS position (channel 7) and a moderate outlier
    channel everywhere (channel 2): with BOS left out the per-channel sums are those of the
    non-BOS positions (channel 2 on top); with BOS in, channel 7 dominates."""
    model, tok = tiny_llama
    texts = {"eng": ["hello there", "a longer second segment", "x"]}
    c = Corpus("t", texts, {"eng": LanguageInfo("eng", "eng")})
    view = model_view(model)
    block = view.blocks[1]

    def plant(_m, _i, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[..., 2] += 3.0
        h[:, 0, 7] += 1e3  # every segment starts with BOS at position 0
        return (h, *out[1:]) if isinstance(out, tuple) else h

    kept = []
    handles = [block.register_forward_hook(plant),
               block.register_forward_hook(lambda _m, _i, o: kept.append(o[0] if isinstance(o, tuple) else o))]
    try:
        with capture_activations(model, view, residual=True, linear_inputs=False, linear_outputs=False) as cap:
            capture_corpus(cap, tok, c, batch_size=1, include_bos=include_bos)
    finally:
        for h in handles:
            h.remove()
    ref = torch.cat([k[0, (0 if include_bos else 1):] for k in kept]).double().numpy()
    sq, am, top, share, half = _energy_reference(ref)
    st = cap.get(f"{view.block_names[1]}:residual", "eng")
    np.testing.assert_allclose(st.channel_sumsq, sq, rtol=1e-6)
    np.testing.assert_allclose(st.channel_absmax, am, rtol=1e-6)
    e = st.channel_energy()
    assert e["top_channel"] == top == (7 if include_bos else 2)
    assert e["top_share"] == pytest.approx(share, rel=1e-6) and e["channels_for_half"] == half
    assert (am[7] > 900) == include_bos


def test_language_sample_independent_of_the_other_languages(tiny_llama):
    """Each (site, language) has its own seed stream: capturing a language alone or beside
    others gives the same reservoir sample (the sample is far smaller than the stream)."""
    model, tok = tiny_llama
    c = Corpus("t", dict(TEXTS), {k: LanguageInfo(k, k) for k in TEXTS})
    key = f"{model_view(model).block_names[0]}:residual"

    def sample(langs):
        with capture_activations(model, residual=True, linear_inputs=False, linear_outputs=False,
                                 reservoir_size=8, seed=5) as cap:
            capture_corpus(cap, tok, c, languages=langs)
        return {l: cap.get(key, l).sample() for l in langs}

    both, alone = sample(["eng", "heb"]), sample(["heb"])
    np.testing.assert_array_equal(both["heb"], alone["heb"])
    assert len(both["eng"]) == len(both["heb"]) == 8
