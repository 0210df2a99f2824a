"""Cost of the KL statistics in a scoring pass: the same pass with and without them.

A quantized pass of :class:`empirical.bpb.BpbEngine` measures, beside the NLL, the KL divergence
from the recorded baseline and top-1 agreement with it (``score(against_reference=True)``), in
the same vocabulary sweep (:mod:`empirical._head`, eq. (1)): a running argmax per chunk and one
dot product per token. The baseline it replaces is the same pass without them
(``against_reference=False``). The two are timed alternately, ``--repeats`` times each (a full pass
from block 0 and a replayed pass of the last block, where the output layer is most of the
cost), and the ratio of medians is printed; the goal is at most 1.05. The NLL of both is checked
equal.

    python -m benchmarks.bench_kl [--model gemma-3-270m] [--segments N] [--repeats R]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from empirical.bpb import BpbEngine
from empirical.corpora import load_udhr
from empirical.fakequant import FakeQuantizer, QuantConfig
from empirical.models import load_model, model_view

DEFAULT_LANGUAGES = ("en", "he", "ar", "ja", "hi", "ru", "zh", "fr")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--languages", nargs="+", default=list(DEFAULT_LANGUAGES))
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model(a.model)
    corpus = load_udhr(a.languages).head(a.segments)
    eng = BpbEngine(model, tok, {l: corpus[l] for l in corpus.languages}, max_length=512)
    eng.record()
    view = model_view(model)
    last = view.n_layers - 1
    print(f"{a.model}: {eng.n_tokens} scored tokens per pass, {len(eng.batches)} batches")
    for label, start in (("full pass", 0), (f"replay from block {last}", last)):
        times = {False: [], True: []}
        fq = FakeQuantizer([q for q in view.linears if (q.block or 0) >= start], QuantConfig(bits=4, grid="int"))
        with fq.quantized():
            for r in range(a.repeats + 1):  # the first round warms up and is not counted
                for with_kl in ((False, True) if r % 2 else (True, False)):
                    t = time.perf_counter()
                    s = eng.score(start, against_reference=with_kl)
                    if r:
                        times[with_kl].append(time.perf_counter() - t)
                    if with_kl:
                        kl_nll = s.nll
                    else:
                        plain = s.nll
        assert all(np.array_equal(kl_nll[k], plain[k]) for k in plain), "NLL differs with and without KL"
        base, new = np.median(times[False]), np.median(times[True])
        print(f"{label}: without KL {1000 * base / eng.n_tokens:.3f} ms/token, with KL "
              f"{1000 * new / eng.n_tokens:.3f} ms/token; ratio {new / base:.3f} (goal <= 1.05)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
