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
        # per-channel sums and the exact top magnitudes, from the same pass
        x2 = x.reshape(-1, st.channel_sum.size)
        # float64 sums of the same float32 values: equal up to float64 rounding of |x| sums
        assert np.all(np.abs(st.channel_sum - x2.sum(axis=0)) <= 1e-9 * np.abs(x2).sum(axis=0))
        np.testing.assert_array_equal(st.channel_count, np.full(x2.shape[1], x2.shape[0]))
        k = min(st.top_k, x.size)
        np.testing.assert_array_equal(np.sort(np.abs(st.top_values())), np.sort(np.abs(x))[x.size - k:])
        assert all(v in x2[:, c] for v, c in zip(st.top_values(), st.top_channels()))  # its own channel
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


# -- per-channel sums, reservoir channels, top-K store (issue #14) --------------------------------

def _stream(pieces, path, **kw):
    """A StreamingStats fed ``pieces``, its moments from the numba kernel or the torch path."""
    st = StreamingStats(bins=64, **kw)
    for p in pieces:
        t = torch.as_tensor(p)
        st.update(t, StreamingStats.batch_moments_torch(t) if path == "torch" else None)
    return st


@pytest.mark.parametrize("path", ["numba", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_sum_and_count_over_updates(path, dtype):
    """channel_sum is the float64 sum of each channel (last axis) over every update, whichever
    path computed the batch sums; channel_count is the rows seen; with channel_sumsq they give
    each channel's mean and variance."""
    rng = np.random.default_rng(3)
    # channels with different offsets and scales, one far from the first values' mean
    x = rng.standard_t(4, size=(4001, 37)) * rng.uniform(0.1, 5, 37) + rng.normal(0, 10, 37)
    x[:, 5] += 300.0
    ref = torch.tensor(x, dtype=dtype).double().numpy()
    pieces = [torch.tensor(p, dtype=dtype) for p in np.array_split(x, [3, 1000, 1001, 3500])]
    st = _stream(pieces, path, reservoir_size=32)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(st.channel_sum, ref.sum(axis=0), rtol=tol)
    np.testing.assert_array_equal(st.channel_count, np.full(37, 4001.0))
    mean = st.channel_sum / st.channel_count
    var = st.channel_sumsq / st.channel_count - mean ** 2
    np.testing.assert_allclose(mean, ref.mean(axis=0), rtol=tol)
    np.testing.assert_allclose(var, ref.var(axis=0), rtol=1e-4 if dtype == torch.float32 else 1e-9)
    # the batch tuples themselves (10th entry) against numpy
    for got in (StreamingStats.batch_moments(pieces[2]), StreamingStats.batch_moments_torch(pieces[2])):
        np.testing.assert_allclose(got[9], pieces[2].double().numpy().sum(axis=0), rtol=tol)
    # a 1-D stream is one channel
    st1 = _stream([torch.tensor(x[:, 0], dtype=dtype)], path, reservoir_size=8)
    np.testing.assert_allclose(st1.channel_sum, [ref[:, 0].sum()], rtol=tol)
    assert st1.channel_count.tolist() == [4001.0]
    assert StreamingStats().channel_count is None


@pytest.mark.parametrize("reservoir_size", [64, 5000])
def test_reservoir_and_top_channels_follow_their_values(reservoir_size):
    """Values that encode their channel (channel + 0.001 noise): through the filling phase and
    Algorithm L's replacements each reservoir value keeps its channel, and so does each top
    value."""
    rng = np.random.default_rng(0)
    nchan = 96
    x = np.arange(nchan) + 1e-3 * rng.standard_normal((3000, nchan))
    st = StreamingStats(bins=64, reservoir_size=reservoir_size, top_k=300, seed=7)
    for piece in np.array_split(x, [1, 50, 51, 1700]):
        st.update(torch.from_numpy(piece))
    s, c = st.sample(), st.sample_channels()
    assert s.size == reservoir_size and c.dtype == np.int64
    np.testing.assert_array_equal(np.round(s).astype(np.int64), c)
    assert np.isin(s, x).all()
    if reservoir_size == 64:  # many replacements: the sample spreads over the channels
        assert len(np.unique(c)) > 30
    tv, tc = st.top_values(), st.top_channels()
    np.testing.assert_array_equal(np.round(tv).astype(np.int64), tc)
    assert set(tc.tolist()) == {95, 94, 93, 92} or tc.min() >= 90  # the largest channels
    # the stratified sample carries the same channels
    strat = st.stratified()
    np.testing.assert_array_equal(np.round(strat.rest).astype(np.int64), strat.rest_channels)
    np.testing.assert_array_equal(np.round(strat.top).astype(np.int64), strat.top_channels)


def _numpy_top(x, k):
    """numpy's k values of largest magnitude (as a sorted multiset of signed values)."""
    flat = np.asarray(x, dtype=np.float64).ravel()
    return np.sort(flat[np.argsort(-np.abs(flat), kind="stable")[:k]])


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_top_k_equals_numpy_over_the_stream(backend, monkeypatch):
    """The store holds exactly the K largest |x| of the whole stream: updates smaller than K,
    a first update larger than K, late updates bringing more than 4K new large values (a
    threshold from a subsample, or torch.topk when ties defeat it), with signs and channels."""
    if backend == "torch":
        monkeypatch.setattr(StreamingStats, "batch_top", staticmethod(StreamingStats.batch_top_torch))
    rng = np.random.default_rng(1)
    K, nchan = 256, 16
    parts = [rng.standard_t(3, size=(r, nchan)) for r in (5, 2000, 3, 700)]
    tied = np.full((800, nchan), 30.0)  # ties: the subsample's threshold passes too few, torch.topk decides
    tied[:3] = 100.0
    parts.append(tied)
    parts.append(40.0 * rng.standard_t(3, size=(600, nchan)))  # 9600 values, most above the store's K-th
    parts.append(rng.standard_t(3, size=(900, nchan)))
    st = StreamingStats(bins=64, reservoir_size=32, top_k=K)
    seen = []
    for p in parts:
        st.update(torch.tensor(p, dtype=torch.float32))
        seen.append(torch.tensor(p, dtype=torch.float32).double().numpy())
        allx = np.concatenate(seen)
        np.testing.assert_array_equal(np.sort(st.top_values()), _numpy_top(allx, K))
    tv, tc = st.top_values(), st.top_channels()
    assert np.all(np.diff(np.abs(tv)) <= 0)  # by decreasing magnitude
    assert all(v in allx[:, c] for v, c in zip(tv, tc))  # each in its own channel
    # fewer values than K: all of them; K = 0: none
    few = StreamingStats(bins=4, reservoir_size=4, top_k=K)
    few.update(torch.tensor(parts[0]))
    np.testing.assert_array_equal(np.sort(few.top_values()), np.sort(parts[0].ravel()))
    none = StreamingStats(bins=4, reservoir_size=4, top_k=0)
    none.update(torch.tensor(parts[1]))
    assert none.top_values().size == 0 and none.top_channels().size == 0


def test_batch_top_candidates_cover_the_batch_top():
    """Both candidate paths return every value of the batch's top k above tau, with its flat
    position (the numba path may return more; the torch path exactly those)."""
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.standard_normal((500, 40)))
    flat = x.numpy().ravel()
    k, tau = 100, 2.5
    want = set(np.argsort(-np.abs(flat))[:k][np.abs(flat[np.argsort(-np.abs(flat))[:k]]) > tau].tolist())
    for f in (StreamingStats.batch_top, StreamingStats.batch_top_torch):
        vals, pos = f(x, k, tau)
        np.testing.assert_array_equal(vals, flat[pos])
        assert want <= set(pos.tolist()) and np.all(np.abs(vals) > tau)
    assert set(StreamingStats.batch_top_torch(x, k, tau)[1].tolist()) == want
    # with the batch's channel absmax: one outlier channel is read alone, and a batch with no
    # channel above tau gives nothing (both paths)
    x2 = x.clone()
    x2[:, 7] *= 10.0
    flat2 = x2.numpy().ravel()
    am = x2.abs().amax(dim=0).numpy()
    tau2 = float(np.abs(x.numpy()).max()) + 0.01  # above every other channel
    order = np.argsort(-np.abs(flat2))[:k]
    want2 = set(order[np.abs(flat2[order]) > tau2].tolist())
    assert len(want2) > 10 and {p % 40 for p in want2} == {7}
    for f in (StreamingStats.batch_top, StreamingStats.batch_top_torch):
        vals, pos = f(x2, k, tau2, am)
        np.testing.assert_array_equal(vals, flat2[pos])
        assert want2 <= set(pos.tolist()) and np.all(np.abs(vals) > tau2)
        vals, pos = f(x2, k, float(am.max()), am)
        assert vals.size == pos.size == 0


def test_top_k_and_stratified_refusals(tiny_gpt2):
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            StreamingStats(top_k=bad)
    model, _ = tiny_gpt2
    with pytest.raises(ValueError, match="top_k"):
        with capture_activations(model, top_k=-3):
            pass
    with pytest.raises(ValueError, match="no values"):
        StreamingStats().stratified()
    st = StreamingStats(bins=8, reservoir_size=16, top_k=4)
    st.update(torch.tensor([1.0, float("nan"), 2.0, 3.0] * 10))
    with pytest.raises(ValueError, match="NaN"):
        st.stratified()
    # a reservoir far smaller than the store: almost surely no reservoir value at or below the
    # K-th magnitude (only one stream value is)
    st = StreamingStats(bins=8, reservoir_size=4, top_k=1999, seed=0)
    st.update(torch.arange(1, 2001, dtype=torch.float64))
    with pytest.raises(ValueError, match="reservoir"):
        st.stratified()


def test_capture_passes_top_k(tiny_llama):
    model, tok = tiny_llama
    with capture_activations(model, reservoir_size=16, bins=16, top_k=7, linear_inputs=False,
                             linear_outputs=False) as cap:
        with cap.for_language("eng"):
            model(input_ids=_ids(tok, "top k"))
    st = next(iter(cap.stats.values()))
    assert st.top_k == 7 and st.top_values().size == 7
    assert abs(st.top_values()[0]) == pytest.approx(st.absmax)
