"""A grid of independent quantized passes in process against a local Ray of 1 and 2 workers.

The grid is the phase-transition experiment's first group of passes (the baseline, every decoder
block quantized alone, and all blocks quantized; ``validate.phase_transition.build``), computed by

* the in-process executor (``validate._executor.InProcessExecutor`` with the experiment's own
  passes as worker: no model loading, this process's threads);
* a local Ray with 1 and with 2 actors of one CPU each (``RayExecutor``), each actor loading the
  model once; the grid runs twice on the same actors: *cold* (actor start and model load included)
  and *warm* (the models already loaded, what every later grid of a run pays).

Every executor's cache entries are compared with the in-process ones: the per-sentence NLL, KL and
top-1 agreement must be identical (exact float equality). Then a grid of empty probe tasks
(``validate._executor.ProbeWorker``) gives the executor's own overhead per task. Prints wall times,
ratios against in process, and the overhead, measured in one run.

    python -m benchmarks.bench_executor [--model gemma-3-270m] [--segments 4] [--max-length 128] [--probes 200]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from validate._common import ResultCache, read_json


def entries(folder: Path) -> dict[str, dict]:
    """Cache entries by their configuration (JSON), payloads only."""
    out = {}
    for p in folder.glob("*.json"):
        doc = read_json(p)
        out[json.dumps(doc["config"], sort_keys=True)] = doc["result"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--languages", nargs="+", default=["en", "he", "ja"])
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--probes", type=int, default=200, help="empty tasks for the per-task overhead")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)

    import logging

    import ray
    import torch

    from validate import phase_transition as pt
    from validate._executor import InProcessExecutor, RayExecutor, Task, WorkerSpec, probe_key
    from validate._passes import PassesWorker

    os.environ.setdefault("LANGQUANT_PROGRESS", "0")
    cfg = pt.Config(model=args.model, languages=tuple(args.languages), segments=args.segments,
                    max_length=args.max_length)
    tmp = Path(tempfile.mkdtemp(prefix="bench_executor_"))
    t0 = time.perf_counter()
    built = pt.build(cfg, ResultCache(tmp / "inprocess"))
    load_s = time.perf_counter() - t0
    n = len(built.names)
    sets = [[], *[[i] for i in range(n)], list(range(n))]
    tasks = [built.passes.task(s) for s in sets]
    tokens = built.engine.n_tokens
    print(f"grid: {len(tasks)} passes of {args.model} ({n} blocks; {', '.join(cfg.languages)}, "
          f"{args.segments} segments, max length {args.max_length}: {tokens} tokens per pass); "
          f"model load in process {load_s:.1f} s; torch threads in process {torch.get_num_threads()}")

    t0 = time.perf_counter()
    InProcessExecutor().map(built.passes.spec, tasks, local=PassesWorker(built.passes), cache=built.passes.scored.cache)
    serial_s = time.perf_counter() - t0
    reference = entries(tmp / "inprocess")
    rows = [("in process", serial_s, None, True)]

    ray.init(address="local", num_cpus=max(args.workers), include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, object_store_memory=200 * 1024 * 1024)
    try:
        overhead = {}
        for w in args.workers:
            with RayExecutor(workers=w) as ex:
                for phase in ("cold", "warm"):
                    folder = tmp / f"ray{w}_{phase}"
                    t0 = time.perf_counter()
                    rep = ex.map(built.passes.spec, tasks, cache=ResultCache(folder))
                    wall = time.perf_counter() - t0
                    got = entries(folder)
                    same = got == reference
                    rows.append((f"Ray, {w} worker{'s' if w > 1 else ''}, {phase}", wall, rep, same))
                probe = [Task(f"probe {i}", probe_key("bench", i), {"value": i}) for i in range(args.probes)]
                spec = WorkerSpec("validate._executor:probe_worker", ("bench",))
                ex.map(spec, probe[:w], cache=ResultCache(tmp / f"probe_warm{w}"))  # actors build the probe worker
                t0 = time.perf_counter()
                ex.map(spec, probe, cache=ResultCache(tmp / f"probe{w}"))
                overhead[w] = (time.perf_counter() - t0) / args.probes
        t0 = time.perf_counter()
        InProcessExecutor().map(WorkerSpec("validate._executor:probe_worker", ("bench",)),
                                [Task(f"probe {i}", probe_key("bench", i), {"value": i}) for i in range(args.probes)],
                                cache=ResultCache(tmp / "probe_inprocess"))
        overhead[0] = (time.perf_counter() - t0) / args.probes
    finally:
        ray.shutdown()

    print(f"{'executor':<26}{'wall s':>9}{'per pass s':>12}{'vs in process':>15}  identical to in process")
    for name, wall, rep, same in rows:
        ratio = serial_s / wall
        print(f"{name:<26}{wall:9.2f}{wall / len(tasks):12.3f}{ratio:14.2f}x  {'yes' if same else 'NO'}")
    print("per-task overhead of the executor itself (empty probe tasks, cache write included):")
    print(f"  in process: {overhead[0] * 1e3:.2f} ms per task")
    for w in args.workers:
        print(f"  Ray, {w} worker{'s' if w > 1 else ''}: {overhead[w] * 1e3:.2f} ms per task "
              f"({(overhead[w] - overhead[0]) * 1e3:+.2f} ms against in process)")
    ok = all(same for *_, same in rows)
    print("numbers: " + ("every executor's passes are identical to in process" if ok else
                         "SOME EXECUTOR'S PASSES DIFFER from in process"))
    print(f"(cache folders in {tmp})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
