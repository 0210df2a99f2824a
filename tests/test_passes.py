"""validate._passes: scored passes are cached with their KL and agreement; a rerun runs none."""

import numpy as np

from empirical.bpb import BpbEngine
from empirical.fakequant import FakeQuantizer, QuantConfig
from empirical.models import model_view
from validate._common import ResultCache
from validate._passes import ScoredPasses

TEXTS = {"a": ["Hello world.", "Une phrase."], "b": ["שלום עולם", "日本語の文です。"]}


def test_scored_passes_cache_and_rerun_without_forward_passes(tiny_llama, tmp_path):
    model, tok = tiny_llama
    lins = model_view(model).linears
    fq = FakeQuantizer(lins, QuantConfig(bits=2, grid="int"))
    key = {"model": "tiny-llama", "texts": "TEXTS"}

    def run():
        eng = BpbEngine(model, tok, TEXTS)
        passes = ScoredPasses(eng, ResultCache(tmp_path / "cache"), key)
        base = passes.get({})
        q = passes.get({"quantized": "all"}, fq.quantized)
        return eng, passes, base, q

    eng, passes, base, q = run()
    assert passes.run_count == 2 and eng.blocks_run > 0
    for k in TEXTS:
        np.testing.assert_allclose(base.kl[k], 0.0, atol=1e-5)
        np.testing.assert_array_equal(base.agree[k], eng.tokens[k])
        assert (q.kl[k] > 0).all() and (q.nll[k] != base.nll[k]).all()
    eng2, passes2, base2, q2 = run()
    assert passes2.run_count == 0 and eng2.blocks_run == 0
    for k in TEXTS:
        np.testing.assert_array_equal(q2.kl[k], q.kl[k])
        np.testing.assert_array_equal(q2.agree[k], q.agree[k])
        np.testing.assert_array_equal(base2.nll[k], base.nll[k])


def test_first_computed_pass_records_the_baseline_even_when_resumed(tiny_llama, tmp_path):
    """A resumed run whose baseline is cached still records before its first new pass, so the
    new pass has a KL reference (and the quantized pass equals a fresh run's)."""
    model, tok = tiny_llama
    fq = FakeQuantizer(model_view(model).linears, QuantConfig(bits=3, grid="int"))
    cache = ResultCache(tmp_path / "cache")
    ScoredPasses(BpbEngine(model, tok, TEXTS), cache, {"m": 1}).get({})
    eng = BpbEngine(model, tok, TEXTS)
    passes = ScoredPasses(eng, cache, {"m": 1})
    assert passes.get({}).kl is not None and passes.run_count == 0
    q = passes.get({"quantized": "all"}, fq.quantized)
    assert q.kl is not None and passes.run_count == 2  # the recording, then the pass
    fresh = ScoredPasses(BpbEngine(model, tok, TEXTS), None, {"m": 1})
    fresh.get({})
    q_fresh = fresh.get({"quantized": "all"}, fq.quantized)
    for k in TEXTS:
        np.testing.assert_allclose(q.kl[k], q_fresh.kl[k], rtol=1e-6)
