"""Executors for grids of independent passes: in this process (the default) or on Ray actors.

docs/design.md, "Executors". An experiment's grid (the single-unit passes of a phase transition,
the cells of a disparity map, ...) is a list of :class:`Task` objects. Each task is named (for
reports), is keyed by the configuration of the cache entry it produces (``validate._common.
ResultCache``) and carries a small JSON-able ``payload`` (a configuration, never a tensor). A
:class:`Worker` turns a payload into cache entries; a :class:`WorkerSpec` says how to build one
(``module:function`` and picklable arguments, typically the experiment's ``Config``), so that a
remote process can build the same worker the experiment builds in process.

:meth:`Executor.map` makes sure every task's entry is in the cache: tasks already cached are
skipped (a rerun after an interruption computes only the missing ones), the rest are computed,
and the experiment's own sequential code then reads every result from the cache. Hence results
are the same whichever executor computed them, and a grid resumes after any worker is lost.

* :class:`InProcessExecutor` (``--executor inprocess``, the default) computes nothing ahead: the
  experiment computes each pass when it first needs it, exactly as without an executor.
* :class:`RayExecutor` (``--executor ray [--address ADDR] [--workers N]``) keeps a pool of Ray
  actors, each of which builds its worker (loads the model) once, on first use, and keeps it for
  the whole run. Results come back to the driver, which writes them into its cache, so workers need
  no shared filesystem. A task whose worker dies is retried on another worker (a replacement actor
  is started); a task that raises, or whose worker dies on every try, is reported by name in a
  :class:`GridError` after the rest of the grid has completed and been cached.

The executor in use is a context (:func:`using`, :func:`current`), as joblib's
``parallel_backend`` is: ``validate._protocol`` sets it from the command line around ``run``, and
experiment code asks for it where it has a grid to map.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import importlib
import json
import os
import time
from collections import deque
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

__all__ = [
    "Task", "WorkerSpec", "Worker", "GridReport", "GridError", "ExecutorError", "Executor", "InProcessExecutor", "RayExecutor",
    "RecordingCache", "make_executor", "current", "using", "EXECUTORS", "probe_worker", "ProbeWorker",
]

#: Names accepted by ``--executor``.
EXECUTORS = ("inprocess", "ray")

#: Environment variables a Ray worker inherits from the driver (offline hub settings, this project's).
_ENV_PREFIXES = ("HF_", "TRANSFORMERS_", "LANGQUANT_", "MPLBACKEND")


@dataclasses.dataclass(frozen=True)
class Task:
    """One independent unit of a grid.

    Attributes
    ----------
    name : str
        What a report calls it (e.g. ``"quantized block3"``).
    key : mapping
        The configuration of the cache entry the task writes; the task is done when the cache
        holds an entry for it.
    payload : mapping
        What the worker needs to compute it (JSON-able).
    """

    name: str
    key: Mapping
    payload: Mapping


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """How to build a worker in another process: ``factory`` is ``"module:function"``, called as
    ``function(*args)``; ``device`` is where its passes run (``cuda`` asks Ray for one GPU)."""

    factory: str
    args: tuple = ()
    device: str = "cpu"

    def __post_init__(self):
        if ":" not in self.factory:
            raise ValueError(f"WorkerSpec.factory {self.factory!r}: expected 'module:function'")
        module, _, name = self.factory.partition(":")
        if module == "__main__":
            # ``python -m validate.x`` runs the module as __main__, a name no worker can import:
            # name it by what it was run as
            import sys

            spec = getattr(sys.modules.get("__main__"), "__spec__", None)
            if spec is None or not spec.name or spec.name == "__main__":
                raise ValueError(f"WorkerSpec.factory {self.factory!r}: a script's functions cannot be imported "
                                 "by a worker; put the factory in an importable module")
            object.__setattr__(self, "factory", f"{spec.name}:{name}")

    def build(self) -> "Worker":
        module, _, name = self.factory.partition(":")
        return getattr(importlib.import_module(module), name)(*self.args)

    @property
    def ident(self) -> str:
        """A stable name of the spec: a worker built once per ident serves all its tasks."""
        return hashlib.sha256(repr((self.factory, self.args, self.device)).encode()).hexdigest()[:16]


class Worker(Protocol):
    def compute(self, payload: Mapping) -> list[tuple[dict, Any]]:
        """Compute one task; return the cache entries ``(config, result)`` it produced that are
        not already in the driver's cache (an in-process worker writes them itself and returns
        ``[]``)."""


class RecordingCache:
    """The cache of a remote worker: records what is put so that the worker can hand it to the
    driver (``drain``), which writes it. Reads go to ``read_from`` (the driver's cache folder) when
    that folder exists on the worker's machine (one machine, or a shared filesystem), so that a
    worker reuses what the driver computed (calibration samples, say); otherwise it reads nothing.
    Duck-types ``ResultCache``'s ``get``/``put``/``folder``."""

    def __init__(self, read_from=None):
        from pathlib import Path

        from validate._common import ResultCache

        self.entries: list[tuple[dict, Any]] = []
        folder = Path(read_from) if read_from is not None else None
        self._reader = ResultCache(folder) if folder is not None and folder.is_dir() else None
        #: where entries are read from (None: nothing is read)
        self.folder = self._reader.folder if self._reader is not None else None

    def get(self, config, check=None):
        return self._reader.get(config, check=check) if self._reader is not None else None

    def put(self, config, result) -> None:
        self.entries.append((json.loads(json.dumps(config, default=str)), result))

    def drain(self) -> list[tuple[dict, Any]]:
        out, self.entries = self.entries, []
        return out


@dataclasses.dataclass
class GridReport:
    """What one :meth:`Executor.map` did: tasks computed, found cached and failed (name -> why),
    seconds each computed task took inside its worker (model loading on first use included),
    wall seconds of the whole map, and how many workers died."""

    computed: int = 0
    cached: int = 0
    failed: dict = dataclasses.field(default_factory=dict)
    task_seconds: list = dataclasses.field(default_factory=list)
    wall_seconds: float = 0.0
    workers_lost: int = 0
    retries: int = 0


class ExecutorError(RuntimeError):
    """The executor cannot run where it was asked to (Ray missing, a worker no node can hold)."""


class GridError(RuntimeError):
    """Some tasks of a grid failed; every other task completed and is cached (a rerun retries
    only the failed ones). ``failures`` maps each failed task's name to why."""

    def __init__(self, failures: Mapping[str, str], completed: int, total: int):
        self.failures = dict(failures)
        lines = "\n".join(f"  {name}: {why}" for name, why in self.failures.items())
        super().__init__(f"{len(self.failures)} of {total} tasks failed ({completed} completed and cached; "
                         f"a rerun computes only the missing ones):\n{lines}")


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _pending(tasks: Sequence[Task], cache) -> tuple[list[Task], int]:
    """The tasks whose entry ``cache`` lacks (repeated keys once), and how many were cached."""
    todo, seen, cached = [], set(), 0
    for t in tasks:
        k = json.dumps(t.key, sort_keys=True, default=str)
        if k in seen:
            continue
        seen.add(k)
        if cache is not None and cache.get(t.key) is not None:
            cached += 1
        else:
            todo.append(t)
    return todo, cached


def _put_entries(cache, entries) -> None:
    for config, result in entries:
        if cache.get(config) is None:
            cache.put(config, result)


class Executor:
    """Computes the pending tasks of a grid (see the module docstring)."""

    name = "?"

    @property
    def width(self) -> int:
        """Tasks worth submitting at once (1: compute lazily, in order)."""
        return 1

    @property
    def prefetches(self) -> bool:
        """Whether experiments should hand their grids to :meth:`map` ahead of reading them."""
        return False

    def describe(self) -> dict:
        return {"executor": self.name, "workers": self.width}

    def map(self, spec: WorkerSpec | None, tasks: Sequence[Task], *, local: "Worker | Callable[[], Worker] | None" = None,
            cache=None, bar=None, desc: str | None = None) -> GridReport:
        """Compute the tasks of ``tasks`` whose entry ``cache`` lacks (see the module docstring).
        Progress goes to ``bar`` (the experiment's, as a postfix) or to a bar of the grid's own
        (Ray always shows one; in process only with ``desc``). Raises :class:`GridError` naming
        the failed tasks after the rest have completed."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class InProcessExecutor(Executor):
    """Computes in this process, one task after another. Experiments do not prefetch through it
    (each pass is computed when first read); :meth:`map` is there for grids handed to it directly
    (the benchmark), with the same skipping of cached tasks and reporting of failures as Ray's."""

    name = "inprocess"

    def map(self, spec, tasks, *, local=None, cache=None, bar=None, desc=None) -> GridReport:
        t0 = time.perf_counter()
        todo, cached = _pending(tasks, cache)
        report = GridReport(cached=cached)
        worker = None
        own = bar is None and desc is not None
        if own:
            from validate._protocol import progress

            bar = progress(total=len(todo) + cached, desc=desc, unit="task")
            bar.update(cached)
        try:
            for t in todo:
                if worker is None:
                    worker = (local() if callable(local) and not hasattr(local, "compute") else local) \
                        if local is not None else spec.build()
                t1 = time.perf_counter()
                try:
                    entries = worker.compute(t.payload)
                except Exception as exc:  # a failing configuration: report it, finish the rest
                    report.failed[t.name] = _first_line(exc)
                else:
                    if cache is not None:
                        _put_entries(cache, entries)
                    report.computed += 1
                    report.task_seconds.append(time.perf_counter() - t1)
                if bar is not None:
                    bar.update() if own else bar.set_postfix_str(f"{report.computed + len(report.failed)}/{len(todo)}")
        finally:
            if own:
                bar.close()
        report.wall_seconds = time.perf_counter() - t0
        if report.failed:
            raise GridError(report.failed, report.computed + cached, len(todo) + cached)
        return report


class _ActorImpl:
    """What each Ray actor runs: builds each worker spec once and keeps it."""

    def __init__(self, env: Mapping[str, str]):
        os.environ.update(env)
        self.workers: dict[str, Any] = {}

    def pid(self) -> int:
        return os.getpid()

    def compute(self, spec: WorkerSpec, payload: Mapping) -> dict:
        t0 = time.perf_counter()
        worker = self.workers.get(spec.ident)
        if worker is None:
            worker = self.workers[spec.ident] = spec.build()
        entries = worker.compute(payload)
        return {"entries": entries, "seconds": time.perf_counter() - t0, "pid": os.getpid()}


class RayExecutor(Executor):
    """A pool of Ray actors (see the module docstring).

    Parameters
    ----------
    address : str, optional
        A running Ray cluster (``ray://host:10001``, ``host:6379`` or ``auto``); None starts a
        local Ray with ``workers x cpus_per_worker`` CPUs (and stops it on :meth:`close`).
    workers : int, optional
        Actors in the pool (default: as many as the cluster's CPUs, or GPUs for a CUDA spec, allow).
    cpus_per_worker : float
        CPUs each actor reserves (Ray sets its threads to match).
    gpus_per_worker : float, optional
        GPUs each actor reserves; None: 1 for a spec whose device is ``cuda``, ``auto`` or
        ``offload`` when the cluster has GPUs, else 0. More than one lets ``--device auto`` spread a
        model too large for one GPU over several.
    max_retries : int
        Times a task is resubmitted after its worker died before it is reported as failed.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, cpus_per_worker: float = 1.0,
                 max_retries: int = 2, gpus_per_worker: float | None = None):
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"--workers must be a positive integer, got {workers!r}")
        if not cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be positive, got {cpus_per_worker!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        if gpus_per_worker is not None and not gpus_per_worker >= 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {gpus_per_worker!r}")
        self.address, self.cpus_per_worker, self.max_retries = address, float(cpus_per_worker), int(max_retries)
        self.gpus_per_worker = gpus_per_worker
        self._workers = workers
        self._ray = None
        self._started = False
        self._actors: list = []
        self._actor_cls = None
        self._gpu = 0.0  # GPUs per actor of the current pool
        self.lost = 0

    # -- Ray, imported and started lazily ---------------------------------------------------------

    def _init(self):
        if self._ray is not None:
            return self._ray
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray: pip install -e \".[distributed]\"") from None
        if not ray.is_initialized():
            import logging

            kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                  "log_to_driver": os.environ.get("LANGQUANT_RAY_LOGS", "0") == "1"}
            if self.address:
                ray.init(address=self.address, **kw)
            else:
                cpus = int(max(1, round((self._workers or os.cpu_count() or 1) * self.cpus_per_worker)))
                ray.init(address="local", num_cpus=cpus, object_store_memory=200 * 1024 * 1024, **kw)
            self._started = True
        self._ray = ray
        return ray

    @property
    def width(self) -> int:
        if self._workers is not None:
            return self._workers
        ray = self._init()
        res = ray.cluster_resources()
        by_cpu = max(1, int(res.get("CPU", 1) // self.cpus_per_worker))
        if self._gpu:
            return max(1, min(by_cpu, int(res.get("GPU", 0) // self._gpu)))
        return by_cpu

    @property
    def prefetches(self) -> bool:
        return True

    def describe(self) -> dict:
        out = {"executor": self.name, "address": self.address or "local", "cpus_per_worker": self.cpus_per_worker,
               "gpus_per_worker": self._gpu if self._actors else self.gpus_per_worker, "max_retries": self.max_retries}
        if self._ray is not None:
            out["workers"] = self.width
        elif self._workers is not None:
            out["workers"] = self._workers
        return out

    def _new_actor(self):
        ray = self._ray
        if self._actor_cls is None:
            self._actor_cls = ray.remote(max_restarts=0, max_task_retries=0)(_ActorImpl)
        env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
        env.setdefault("LANGQUANT_PROGRESS", "0")
        opts: dict[str, Any] = {"num_cpus": self.cpus_per_worker}
        if self._gpu:
            opts["num_gpus"] = self._gpu
        return self._actor_cls.options(**opts).remote(env)

    def _gpus_for(self, device: str) -> float:
        """GPUs an actor of a spec on ``device`` reserves."""
        if self.gpus_per_worker is not None:
            return float(self.gpus_per_worker)
        if device.startswith("cuda"):
            return 1.0
        if device in ("auto", "offload"):
            return 1.0 if self._init().cluster_resources().get("GPU", 0) >= 1 else 0.0
        return 0.0

    def _pool(self, gpu: float) -> list:
        ray = self._init()
        have = ray.cluster_resources()
        if gpu > have.get("GPU", 0) or self.cpus_per_worker > have.get("CPU", 0):
            # an actor no node can hold would wait for ever
            raise ExecutorError(f"a Ray worker needs {self.cpus_per_worker:g} CPU and {gpu:g} GPU, but the cluster has "
                               f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU"
                               + ("; run with --device cpu, or join a cluster with GPUs (--address)" if gpu else ""))
        if gpu != self._gpu and self._actors:
            self._kill_all()
        self._gpu = gpu
        while len(self._actors) < self.width:
            self._actors.append(self._new_actor())
        return self._actors

    def actor_pids(self) -> list[int]:
        """Process ids of the live actors (tests kill one)."""
        ray = self._init()
        return ray.get([a.pid.remote() for a in self._pool(self._gpu)])

    def map(self, spec, tasks, *, local=None, cache=None, bar=None, desc=None) -> GridReport:
        if spec is None:
            raise ValueError("this grid has no worker spec, so it cannot run on Ray workers")
        if cache is None or getattr(cache, "folder", None) is None:
            raise ValueError("--executor ray needs a results cache (results come back through it); "
                             "run through the experiment's command line or pass a ResultCache")
        t0 = time.perf_counter()
        todo, cached = _pending(tasks, cache)
        report = GridReport(cached=cached)
        own = bar is None and bool(todo)  # without the experiment's bar, the grid shows its own
        if own:
            from validate._protocol import progress

            bar = progress(total=len(todo) + cached, desc=desc or f"Ray, {self.width} workers", unit="task")
            bar.update(cached)
        if not todo:
            if own:
                bar.close()
            report.wall_seconds = time.perf_counter() - t0
            return report
        ray = self._init()
        from ray.exceptions import RayActorError, RayTaskError

        idle = deque(self._pool(self._gpus_for(spec.device)))
        queue = deque((t, 0) for t in todo)
        running: dict = {}
        try:
            while queue or running:
                while queue and idle:
                    task, tries = queue.popleft()
                    actor = idle.popleft()
                    running[actor.compute.remote(spec, dict(task.payload))] = (task, tries, actor)
                done, _ = ray.wait(list(running), num_returns=1)
                ref = done[0]
                task, tries, actor = running.pop(ref)
                try:
                    out = ray.get(ref)
                except RayActorError:
                    # the worker died (killed, out of memory, crashed): replace it, retry elsewhere
                    report.workers_lost += 1
                    self.lost += 1
                    self._replace(actor)
                    idle.append(self._actors[-1])
                    if tries < self.max_retries:
                        report.retries += 1
                        queue.appendleft((task, tries + 1))
                    else:
                        report.failed[task.name] = f"its worker died on each of {tries + 1} tries"
                except RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    report.failed[task.name] = _first_line(cause) if isinstance(cause, BaseException) \
                        else str(exc).strip().splitlines()[-1]
                    idle.append(actor)
                else:
                    _put_entries(cache, out["entries"])
                    report.computed += 1
                    report.task_seconds.append(float(out["seconds"]))
                    idle.append(actor)
                if bar is not None:
                    if own:
                        bar.update()
                    else:
                        bar.set_postfix_str(f"ray {report.computed + len(report.failed)}/{len(todo)}")
        finally:
            if own:
                bar.close()
            for ref in running:  # interrupted: nothing more is wanted from the running tasks
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
        report.wall_seconds = time.perf_counter() - t0
        if report.failed:
            raise GridError(report.failed, report.computed + cached, len(todo) + cached)
        return report

    def _replace(self, dead) -> None:
        with contextlib.suppress(Exception):
            self._ray.kill(dead)
        self._actors = [a for a in self._actors if a is not dead]
        self._actors.append(self._new_actor())

    def _kill_all(self) -> None:
        for a in self._actors:
            with contextlib.suppress(Exception):
                self._ray.kill(a)
        self._actors = []

    def close(self) -> None:
        if self._ray is None:
            return
        self._kill_all()
        if self._started:
            self._ray.shutdown()
        self._ray, self._started = None, False


def make_executor(name: str = "inprocess", address: str | None = None, workers: int | None = None,
                  gpus_per_worker: float | None = None) -> Executor:
    """The executor ``--executor name --address ADDR --workers N --gpus-per-worker G`` asks for."""
    if name == "inprocess":
        if address is not None:
            raise ValueError("--address is for --executor ray")
        return InProcessExecutor()
    if name == "ray":
        return RayExecutor(address=address, workers=workers, gpus_per_worker=gpus_per_worker)
    raise ValueError(f"--executor {name}: expected one of {', '.join(EXECUTORS)}")


_CURRENT: contextvars.ContextVar[Executor | None] = contextvars.ContextVar("langquant_executor", default=None)


def current() -> Executor:
    """The executor set by :func:`using` (default: a fresh in-process one)."""
    return _CURRENT.get() or InProcessExecutor()


@contextlib.contextmanager
def using(executor: Executor) -> Iterator[Executor]:
    """Run the enclosed experiment code with ``executor``."""
    token = _CURRENT.set(executor)
    try:
        yield executor
    finally:
        _CURRENT.reset(token)


# ---- a probe worker: tests and the benchmark's per-task overhead ------------------------------

class ProbeWorker:
    """A worker with no model: ``payload["value"]`` -> entry ``{"square": value**2, "pid": ...}``.

    ``payload["fail"]`` raises (a poisoned configuration); ``payload["die_once"]`` (a path) kills
    the worker's process the first time, leaving the file as a marker, so that the retry succeeds;
    ``payload["die"]`` kills it every time; ``payload["sleep"]`` waits that many seconds first.
    """

    def __init__(self, tag: str = "probe"):
        self.tag = tag
        self.built_pid = os.getpid()

    def compute(self, payload: Mapping) -> list[tuple[dict, Any]]:
        if payload.get("sleep"):
            time.sleep(float(payload["sleep"]))
        if payload.get("fail"):
            raise ValueError(f"configuration {payload['value']} always fails")
        if payload.get("die") or (payload.get("die_once") and not os.path.exists(payload["die_once"])):
            if payload.get("die_once"):
                with open(payload["die_once"], "w") as fh:
                    fh.write(str(os.getpid()))
            os._exit(17)
        v = payload["value"]
        return [(probe_key(self.tag, v), {"square": v * v, "pid": os.getpid(), "built_pid": self.built_pid})]


def probe_key(tag: str, value) -> dict:
    return {"probe": tag, "value": value}


def probe_worker(tag: str = "probe") -> ProbeWorker:
    return ProbeWorker(tag)
