"""Running the cells of a sweep in parallel, on existing engines: joblib/loky, submitit, dask.

A sweep is embarrassingly parallel over cells.  Every backend runs the same worker function,
:func:`run_and_store`: it trains one cell with :func:`estbench.engine.train.run_cell` and writes its record
to the results store itself (atomically, ``store.write_cell``), so a sweep split across machines or
restarted after a crash completes exactly the missing cells.  The parent filters out the cells
already stored *before* submitting anything and reports progress as cells complete.

Select a backend with ``-j N`` (a local process pool, loky) or ``--parallel-config FILE.yml``::

    backend: loky            # loky | submitit | dask
    n_jobs: 4                # loky processes / submitit local jobs at once (``-j`` overrides it)
    cells_per_gpu: 1         # CUDA cells sharing one GPU at a time (default 1: never two per GPU)
    threads_per_cell: 1      # torch threads per CPU cell (default: --threads, else 1)
    cell_memory: 4G          # memory one CPU cell may allocate (default: 80% of the machine's
                             # memory shared among the cells running at once; 0: no limit)

    backend: submitit        # Slurm (job arrays), or cluster: local | debug for tests
    cluster: slurm           # debug | local | slurm | auto
    folder: logs/submitit    # job pickles and logs (default RUN_DIR/.submitit)
    slurm_partition: gpu     # every slurm_* key goes to executor.update_parameters
    slurm_time: 60           # ... as does every submitit generic: timeout_min, mem_gb, cpus_per_task
    slurm_array_parallelism: 32
    gpus_per_cell: 1         # GPUs requested for each CUDA cell's job (CPU cells request none)

    backend: dask            # as in benchopt: every dask_* key goes to dask.distributed.Client
    dask_n_workers: 2        # -> a LocalCluster with 2 workers (one thread each unless told)
    # dask_address: tcp://scheduler:8786   -> an existing cluster instead

GPU cells: each CUDA cell holds one of ``cells_per_gpu`` slots of its GPU (a file lock in the
machine's temp folder, so it also holds across backends and concurrent sweeps on one machine); on
dask, CUDA cells also request the worker resource ``{"GPU": 1 / cells_per_gpu}`` (start workers with
``--resources GPU=1``, one per GPU).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from estbench.engine import store
from estbench.core import process
from estbench.core.errors import ConfigError, WorkerError  # noqa: F401 (WorkerError re-exported)
from estbench.engine.cell import Cell, CellResult
from estbench.engine.train import DEFAULT_THREADS, run_cell

BACKENDS = ("loky", "submitit", "dask")
COMMON_KEYS = {"backend", "n_jobs", "cells_per_gpu", "threads_per_cell", "cell_memory"}
BACKEND_KEYS = {
    "loky": set(),
    "submitit": {"cluster", "folder", "poll_interval", "gpus_per_cell"},
    "dask": {"poll_interval"},
}
SUBMITIT_CLUSTERS = ("debug", "local", "slurm", "auto")


# ----------------------------------------------------------------------------- the worker side

def _gpu_index(device: str) -> str:
    """The physical GPU behind ``device`` on this machine (honours CUDA_VISIBLE_DEVICES).

    A name, not always a number: CUDA_VISIBLE_DEVICES may list GPU UUIDs or MIG instances
    (``MIG-GPU-<uuid>/1/0``, ``MIG-<uuid>``), and a device not of the form ``cuda:<int>`` is
    taken as the name it gives."""
    local = str(device).split(":", 1)[1].strip() if ":" in str(device) else "0"
    try:
        index = int(local)
    except ValueError:
        return local
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if 0 <= index < len(visible) else str(index)


def _lock_name(gpu: str) -> str:
    """``gpu`` as a safe file-name part: anything outside [A-Za-z0-9_.-] becomes '_'."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", gpu) or "_"
    if len(safe) > 100:  # stay far below NAME_MAX; the hash keeps long names apart
        import hashlib

        safe = safe[:80] + "-" + hashlib.sha1(gpu.encode()).hexdigest()[:12]
    return safe


@contextlib.contextmanager
def gpu_slot(device: str, slots: int = 1, lock_dir: Optional[str] = None, poll: float = 0.05):
    """Hold one of ``slots`` slots of the GPU behind ``device`` (no-op for CPU devices).

    The slots are ``flock``-ed files in the machine's temp folder, so at most ``slots`` cells use a
    GPU at once whichever process, backend or sweep runs them.  The kernel drops the lock when its
    holder dies, even by SIGKILL.
    """
    if not str(device).startswith("cuda") or not slots or slots < 1:
        yield None
        return
    import fcntl

    lock_dir = Path(lock_dir or tempfile.gettempdir())
    gpu = _lock_name(_gpu_index(str(device)))
    paths = [lock_dir / f"estbench-gpu{gpu}-slot{k}.lock" for k in range(int(slots))]
    while True:
        for path in paths:
            fh = open(path, "a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            try:
                yield path
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        time.sleep(poll)


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs besides the cell, handed to it with every cell (never through the
    environment, which a worker on another machine does not share): set by the executor."""

    #: torch intra-op threads of a CPU cell
    threads: int = DEFAULT_THREADS
    #: CUDA cells sharing one GPU at a time
    cells_per_gpu: int = 1
    #: bytes of memory a CPU cell may allocate (0: no limit; None: ``MEMORY_SHARE`` of the memory
    #: of the machine the worker runs on, shared among ``jobs`` cells)
    memory_limit: Optional[int] = None
    #: cells that run at once: recorded with each cell, as the conditions its time was measured in
    jobs: int = 1

    def environment(self) -> dict:
        """What of these a cell's record keeps (``store.write_cell``'s ``env``)."""
        return {"threads": self.threads, "jobs": self.jobs,
                "huge_pages": process.huge_pages()}


def run_and_store(cell: Cell, run_dir: str, force: bool = False,
                  settings: WorkerSettings = WorkerSettings()):
    """Run one cell and write its record to the store; the function every worker runs.

    Returns ``(cell, result)``; ``result`` is None when the cell's record appeared in the meantime
    (another worker, machine or restarted sweep finished it), in which case nothing is recomputed.
    """
    if not force and store.has_cell(Path(run_dir), cell.key(), report=False):  # the sweep reported it
        return cell, None
    heartbeat = store.Heartbeat(run_dir, cell.key(), cell.label())
    try:
        with gpu_slot(cell.device, settings.cells_per_gpu), \
                memory_limit(cell_memory_limit(settings.jobs, settings.memory_limit)
                             if cell.device == "cpu" else 0), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cell.probe:  # measured at a snapshot set, not trained
                from estbench.engine.probe import REFERENCES, run_probe

                res = run_probe(cell, report=heartbeat, threads=settings.threads,
                                references=Path(run_dir) / REFERENCES)
            else:
                res = run_cell(cell, report=heartbeat, threads=settings.threads)
    finally:
        heartbeat.close()
    _summarise_warnings(cell, caught)
    store.write_cell(Path(run_dir), cell.key(), res, env=settings.environment())
    return cell, res


#: share of the machine's memory the cells running at once may take between them
MEMORY_SHARE = 0.8


def parse_memory(value, what: str = "cell_memory") -> int:
    """A memory size as bytes: an int, or text with a K/M/G suffix (``4G``, ``512M``); 0: none."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a number of bytes (or 4G, 512M), got {value!r}")
    text = str(value).strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    try:
        size = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        size = float("nan")
    if not 0 <= size < float("inf"):
        raise ConfigError(f"{what} must be a number of bytes (or 4G, 512M), got {value!r}")
    return int(size)


def cell_memory_limit(jobs: int = 1, cell_memory=None) -> int:
    """Bytes of memory one CPU cell may allocate: ``cell_memory`` when given (:func:`parse_memory`;
    0: no limit), else ``MEMORY_SHARE`` of the machine's memory divided among the ``jobs`` cells
    that run at once."""
    if cell_memory is not None:
        return parse_memory(cell_memory)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
    return int(MEMORY_SHARE * total / max(1, int(jobs)))


@contextlib.contextmanager
def memory_limit(limit: int):
    """Hold a CPU cell to ``limit`` bytes (0: none; :func:`cell_memory_limit`): the data-segment
    limit, ``RLIMIT_DATA``,
    which covers every heap and anonymous mapping of the process): an allocation past it fails
    inside the cell, which is then recorded as failed with the allocator's message, instead of the
    operating system killing the worker and the cells running beside it (a cell whose measurement
    asks for more memory than the machine has -- sparsemax on categorical_vae can -- would otherwise
    have the kernel's OOM killer take the whole sweep down).  CUDA cells are not limited (the driver maps device memory into the address
    space).  The previous limit is restored afterwards."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    if limit <= 0:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    except (ValueError, OSError):  # a limit below what the process already uses: leave it
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _summarise_warnings(cell: Cell, caught: list, stream=None) -> None:
    """One stderr line per kind of warning a cell raised, with its count: an estimator that warns
    at every step (sparsemap's active set on long chains) would otherwise bury the progress lines
    under hundreds of near-identical messages (they differ in their numbers, so Python's own
    once-per-message filter does not help)."""
    if not caught:
        return
    kinds: dict = {}
    for w in caught:
        text = str(w.message)
        key = (w.category.__name__, re.sub(r"\d+(\.\d+)?", "N", text))
        n, first = kinds.get(key, (0, text))
        kinds[key] = (n + 1, first)
    stream = stream if stream is not None else sys.stderr
    for (cat, _), (n, first) in kinds.items():
        times = f"{n} times, first: " if n > 1 else ""
        print(f"estbench: {cell.label()}: {cat} {times}{first}", file=stream, flush=True)


def _lost(cell: Cell, why: str) -> CellResult:
    """A cell whose worker died: reported as failed, NOT stored (a rerun retries it)."""
    return CellResult(cell, "failed", error=f"worker died, cell not stored: {why}")


def _interleave(cells: list[Cell]) -> list[Cell]:
    """CUDA cells spread among the CPU cells, so workers rarely queue on one GPU together."""
    gpu = [c for c in cells if c.device.startswith("cuda")]
    cpu = [c for c in cells if not c.device.startswith("cuda")]
    if not gpu or not cpu:
        return cells
    out, step = [], max(1, len(cpu) // len(gpu))
    for i, c in enumerate(gpu):
        out.append(c)
        out.extend(cpu[i * step:(i + 1) * step])
    out.extend(cpu[len(gpu) * step:])
    return out


# ----------------------------------------------------------------------------- the executors

@dataclass
class Executor:
    """Runs cells and yields ``(cell, result_or_None)`` as they complete (see run_and_store)."""

    n_jobs: int = 1
    cells_per_gpu: int = 1
    threads_per_cell: Optional[int] = None
    #: memory one CPU cell may allocate (:func:`parse_memory`); None: a share of the machine's
    cell_memory: Optional[object] = None
    options: dict = field(default_factory=dict)
    name = "serial"

    @property
    def settings(self) -> WorkerSettings:
        """What every worker of this executor is handed with each cell."""
        return WorkerSettings(threads=self.threads_per_cell or DEFAULT_THREADS,
                              cells_per_gpu=self.cells_per_gpu,
                              memory_limit=None if self.cell_memory is None
                              else parse_memory(self.cell_memory),
                              jobs=self.n_jobs)

    @property
    def serial(self) -> bool:
        """Whether cells run one after the other in this process (plug-ins loaded from a file exist
        only here)."""
        return self.name == "serial"

    def run_cells(self, cells: list[Cell], run_dir: Path, force: bool = False
                  ) -> Iterator[tuple[Cell, Optional[CellResult]]]:
        settings = self.settings
        for cell in cells:
            yield run_and_store(cell, str(run_dir), force, settings)


class SerialExecutor(Executor):
    name = "serial"


#: fresh pools a cell that never started is handed to after its pool broke (a cell that kills its
#: worker before its first heartbeat would otherwise break every pool it is given)
MAX_POOL_RESTARTS = 2


def _init_worker(growth_allowed: int = 0) -> None:
    """A loky worker's initializer.

    Ctrl-C (SIGINT, sent to the terminal's whole process group) is the parent's to handle -- it
    cancels the pending cells and kills the workers -- so a worker neither prints a traceback for
    it nor turns it into a failed cell.

    loky replaces a worker whose memory grew by more than 300 MB since its first task (its leak
    check).  A worker here keeps bounded caches on purpose (each task's data set, the step-0
    results its cells share), so moving from the toys to the MNIST or SST tasks grows it past that
    and the pool restarts it, which costs the replacement its imports and every cache again (three
    restarts in one reference remake).  ``growth_allowed`` (> 0: the memory one cell may allocate,
    :func:`cell_memory_limit`) is the growth tolerated instead; a real leak past it is still caught.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if growth_allowed > 0:
        from joblib.externals.loky import process_executor

        if hasattr(process_executor, "_MAX_MEMORY_LEAK_SIZE"):  # loky's own setting (private)
            process_executor._MAX_MEMORY_LEAK_SIZE = max(process_executor._MAX_MEMORY_LEAK_SIZE,
                                                         growth_allowed)


def _stop_pool(pool) -> None:
    """Stop a loky pool at once: drop the cells not started and kill the workers (the cells they
    were running are lost, not stored: a rerun computes them).  Without this, the interpreter's
    exit waits, after a Ctrl-C, until every submitted cell has been computed.
    ``kill_workers=True`` fails the pending futures itself (cancelling them first would crash
    loky's manager thread, which then kills nothing).  The manager thread can still race the
    shutdown (a ``KeyError`` for a work item the shutdown has just dropped): its traceback says
    nothing to a user who pressed Ctrl-C, so it is silenced while the pool stops."""
    import threading

    previous = threading.excepthook

    def quiet(args):
        if args.thread is None or args.thread.name != "ExecutorManagerThread":
            previous(args)

    threading.excepthook = quiet
    try:
        with contextlib.suppress(Exception):
            pool.shutdown(wait=True, kill_workers=True)
    finally:
        threading.excepthook = previous


class LokyExecutor(Executor):
    """A local process pool: ``joblib.Parallel(backend="loky", n_jobs=N)``, results as they finish.

    Each worker is handed the executor's settings with every cell (one intra-op thread per cell by
    default), so N workers use N cores.
    """

    name = "loky"

    def pool(self):
        """A fresh pool of ``n_jobs`` workers, started with huge pages for torch
        (:mod:`estbench.core.process`) and :func:`_init_worker`'s settings."""
        from joblib.externals.loky import get_reusable_executor

        settings = self.settings
        return get_reusable_executor(
            max_workers=self.n_jobs, reuse=False, initializer=_init_worker,
            initargs=(cell_memory_limit(settings.jobs, settings.memory_limit),),
            env=process.worker_environment())

    def run_cells(self, cells, run_dir, force=False):
        """Cells as they finish.  A worker that dies (killed by the operating system) breaks the
        whole pool: the cells that were running then are reported lost (not stored; a rerun
        retries them), and the rest go to a fresh pool, so one bad cell costs the cells beside it
        at most, never the sweep.  An interrupt (Ctrl-C), or the caller closing this generator,
        stops the pool at once: the cells not started are dropped and the workers killed (the
        cells they ran are not stored; every finished one is)."""
        from concurrent.futures import FIRST_COMPLETED, wait

        from joblib.externals.loky.process_executor import BrokenProcessPool

        # loky says so each time its leak check replaces a worker (past what one cell may
        # allocate: _init_worker); the cells are not lost, so the sweep's output stays quiet
        warnings.filterwarnings("ignore", message="A worker stopped while some jobs were given")
        todo = list(_interleave(cells))
        run_dir = Path(run_dir)
        restarts: dict = {}  # cell -> fresh pools it has been handed to after a break
        settings = self.settings
        while todo:
            pool = self.pool()
            try:
                futures = {pool.submit(run_and_store, c, str(run_dir), force, settings): c
                           for c in todo}
                todo, running = [], None  # running: the cells with a heartbeat when it broke
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        c = futures[fut]
                        try:
                            yield fut.result()
                        except BrokenProcessPool as exc:
                            if running is None:  # their heartbeats stay: sweep.run clears them
                                running = {b["key"] for b in store.running(run_dir)}
                            if store.has_cell(run_dir, c.key(), report=False):
                                yield c, None
                            elif c.key() in running:
                                yield c, _lost(c, "its worker process was killed (by the operating "
                                                  "system: out of memory?) while it ran: "
                                                  f"{str(exc).splitlines()[0]}")
                            elif restarts.get(c, 0) >= MAX_POOL_RESTARTS:  # it may be the culprit
                                yield c, _lost(c, f"its pool broke {MAX_POOL_RESTARTS + 1} times "
                                                  f"around it: {str(exc).splitlines()[0]}")
                            else:  # never started: a fresh pool runs it
                                restarts[c] = restarts.get(c, 0) + 1
                                todo.append(c)
            except BaseException:  # interrupted (Ctrl-C) or abandoned: stop now, not at exit
                _stop_pool(pool)
                raise
            if running is not None:  # the pool broke
                pool.shutdown(wait=True, kill_workers=True)


class SubmititExecutor(Executor):
    """One submitit job per cell: a Slurm job array (``map_array``) per device kind, or local jobs.

    CPU cells request no GPU; CUDA cells request ``gpus_per_cell`` GPUs (default 1).  ``cluster:
    local`` keeps at most ``n_jobs`` jobs running; ``debug`` runs them in this process.
    """

    name = "submitit"
    _GPU_KEYS = {"gpus_per_node", "slurm_gpus_per_node", "slurm_gres", "slurm_gpus_per_task",
                 "slurm_num_gpus", "slurm_cpus_per_gpu", "slurm_mem_per_gpu"}

    def _executor(self, run_dir: Path, gpu: bool):
        import submitit

        opts = self.options
        folder = opts.get("folder") or str(Path(run_dir) / ".submitit")
        cluster = opts.get("cluster", "slurm")
        ex = submitit.AutoExecutor(folder=folder, cluster=None if cluster == "auto" else cluster)
        params = {k: v for k, v in opts.items() if k in _submitit_params()}
        params = {k: v for k, v in params.items() if gpu or k not in self._GPU_KEYS}
        if gpu and not any(k in params for k in self._GPU_KEYS):
            params["gpus_per_node"] = int(opts.get("gpus_per_cell", 1))
        params.setdefault("name", "estbench")
        ex.update_parameters(**params)
        return ex

    def run_cells(self, cells, run_dir, force=False):
        cluster = self.options.get("cluster", "slurm")
        poll = float(self.options.get("poll_interval", 0.05 if cluster in ("local", "debug") else 2.0))
        groups = [[c for c in cells if not c.device.startswith("cuda")],
                  [c for c in cells if c.device.startswith("cuda")]]
        window = self.n_jobs if cluster == "local" else None
        queue = [(c, gpu) for gpu, group in enumerate(groups) for c in group]
        execs = {gpu: self._executor(run_dir, bool(gpu)) for gpu, g in enumerate(groups) if g}
        settings = self.settings

        def args(group):
            n = len(group)
            return group, [str(run_dir)] * n, [force] * n, [settings] * n

        running: dict = {}
        try:
            if window is None:  # one job array per device kind; slurm_array_parallelism throttles it
                for gpu, group in enumerate(groups):
                    if group:
                        for c, job in zip(group, execs[gpu].map_array(run_and_store, *args(group))):
                            running[job] = c
                queue = []
            while queue or running:
                while queue and (window is None or len(running) < window):
                    c, gpu = queue.pop(0)
                    job = execs[gpu].map_array(run_and_store, *args([c]))[0]
                    running[job] = c
                finished = [j for j in list(running) if j.done()]
                if not finished:
                    time.sleep(poll)
                    continue
                for job in finished:
                    c = running.pop(job)
                    try:
                        yield job.result()
                    except Exception as exc:  # the job itself died (OOM, node failure, timeout)
                        yield c, _lost(c, f"submitit job {job.job_id}: {str(exc).splitlines()[0]}")
        finally:
            for job in running:  # interrupted: cancel what is still queued or running
                with contextlib.suppress(Exception):
                    job.cancel(check=False)



class DaskExecutor(Executor):
    """``dask.distributed``: every ``dask_*`` option goes to ``Client`` (as in benchopt).

    Without ``dask_address``, ``Client(n_workers=...)`` starts a LocalCluster: worker processes
    (``dask_processes: true``) with one thread each, since torch's global RNG is per process.
    CUDA cells request the worker resource ``{"GPU": 1 / cells_per_gpu}``.
    """

    name = "dask"

    def client_kwargs(self, gpu_cells: bool) -> dict:
        kw = {k[len("dask_"):]: v for k, v in self.options.items() if k.startswith("dask_")}
        if "address" not in kw:
            kw.setdefault("n_workers", self.n_jobs)
            kw.setdefault("threads_per_worker", 1)
            kw.setdefault("processes", True)
            kw.setdefault("dashboard_address", ":0")  # any free port: no clash, no warning
            if gpu_cells:
                kw.setdefault("resources", {"GPU": 1})
        return kw

    def run_cells(self, cells, run_dir, force=False):
        from dask.distributed import Client, as_completed

        gpu_cells = any(c.device.startswith("cuda") for c in cells)
        kw = self.client_kwargs(gpu_cells)
        own = "address" not in kw
        settings = self.settings
        try:
            client = Client(**kw)
        except (TypeError, ValueError) as exc:  # a dask_* key Client does not take, or a bad value
            text = str(exc).strip().splitlines()
            raise ConfigError(f"parallel config: dask.distributed.Client rejected its dask_* options "
                              f"{kw}: {type(exc).__name__}: {text[0] if text else ''}") from None
        except OSError as exc:  # no scheduler at dask_address (a TimeoutError), or no free port
            text = str(exc).strip().splitlines()
            where = f"dask cluster at {kw['address']}" if "address" in kw else "a local dask cluster"
            raise ConfigError(f"parallel config: cannot start or reach {where}: "
                              f"{type(exc).__name__}: {text[0] if text else ''}") from None
        futures = {}
        try:
            if gpu_cells and not own:
                res = [w.get("resources", {}) for w in client.scheduler_info()["workers"].values()]
                if not any("GPU" in r for r in res):
                    raise ConfigError(f"dask cluster at {kw['address']} has no worker with a 'GPU' "
                                      "resource; start one worker per GPU with --resources GPU=1")
            for c in _interleave(cells):
                extra = {"resources": {"GPU": 1.0 / max(1, self.cells_per_gpu)}} \
                    if c.device.startswith("cuda") else {}
                fut = client.submit(run_and_store, c, str(run_dir), force, settings,
                                    pure=False, **extra)
                futures[fut] = c
            for fut in as_completed(list(futures)):
                c = futures[fut]
                try:
                    yield fut.result()
                except Exception as exc:  # a worker died (KilledWorker) or the cluster went away
                    yield c, _lost(c, f"dask: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        finally:
            # interrupted (Ctrl-C) or abandoned: the cells not finished are cancelled, so an
            # existing cluster does not go on computing them (a local one is closed below anyway)
            unfinished = [f for f in futures if not f.done()]
            if unfinished:
                with contextlib.suppress(Exception):
                    client.cancel(unfinished)
            cluster = client.cluster if own else None
            client.close()
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.close()


# ----------------------------------------------------------------------------- configuration

def _submitit_params() -> set[str]:
    """Keys forwarded to submitit's update_parameters: its generic ones and every slurm_* one."""
    import submitit

    generic = set(submitit.AutoExecutor._valid_parameters())
    slurm = {f"slurm_{k}" for k in submitit.SlurmExecutor._valid_parameters() | generic}
    return generic | slurm


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


#: the dask.distributed.Client / LocalCluster options of known type (``dask_`` + the name), as
#: (what the error says, check); the other ``dask_*`` keys are passed through unchecked
DASK_TYPES = {
    "dask_n_workers": ("a positive integer", _positive_int),
    "dask_threads_per_worker": ("a positive integer", _positive_int),
    "dask_processes": ("true or false", lambda v: isinstance(v, bool)),
    "dask_address": ("a string (tcp://host:port)", lambda v: isinstance(v, str) and v.strip() != ""),
    "dask_dashboard_address": ("a string (:8787, or null for none)",
                               lambda v: v is None or isinstance(v, str)),
    "dask_memory_limit": ("a string (4GB, auto), a number of bytes, or null",
                          lambda v: v is None or isinstance(v, str)
                          or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0)),
}


def _check(config: dict, where: str) -> dict:
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a mapping of options (backend: ...), got "
                          f"{type(config).__name__}")
    backend = config.get("backend")
    if backend not in BACKENDS:
        raise ConfigError(f"{where}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    allowed = COMMON_KEYS | BACKEND_KEYS[backend]
    unknown = []
    for k in config:
        if k in allowed:
            continue
        if backend == "dask" and isinstance(k, str) and k.startswith("dask_"):
            continue
        if backend == "submitit" and k in _submitit_params():
            continue
        unknown.append(k)
    if unknown:
        hint = {"loky": "", "dask": "; Client options start with dask_",
                "submitit": "; Slurm options start with slurm_ (submitit's names: slurm_partition, "
                            "slurm_time, slurm_gpus_per_node, slurm_array_parallelism, ...)"}[backend]
        raise ConfigError(f"{where}: unknown key(s) for backend {backend!r}: {', '.join(sorted(map(str, unknown)))}"
                          f" (known: {', '.join(sorted(allowed))}{hint})")
    for k in ("n_jobs", "cells_per_gpu", "threads_per_cell", "gpus_per_cell"):
        v = config.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                              or (v < 1 and not (k == "n_jobs" and v == -1))):
            raise ConfigError(f"{where}: {k} must be a positive integer, got {v!r}")
    if config.get("cell_memory") is not None:
        parse_memory(config["cell_memory"], f"{where}: cell_memory")
    v = config.get("poll_interval")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                          or not 0 < v < float("inf")):
        raise ConfigError(f"{where}: poll_interval must be a positive number of seconds, got {v!r}")
    if backend == "dask":
        for k, v in config.items():
            if k not in DASK_TYPES:
                continue  # other dask_* keys go to Client as they are
            kind, check = DASK_TYPES[k]
            if not check(v):
                raise ConfigError(f"{where}: {k} must be {kind}, got {v!r}")
    if backend == "submitit" and config.get("cluster", "slurm") not in SUBMITIT_CLUSTERS:
        raise ConfigError(f"{where}: cluster must be one of {', '.join(SUBMITIT_CLUSTERS)}, "
                          f"got {config.get('cluster')!r}")
    return dict(config)


def load_config(path) -> dict:
    """Read a ``--parallel-config`` YAML file; ConfigError naming the file if missing or malformed."""
    import yaml

    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read parallel config {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"parallel config {path} is not UTF-8 text (byte {exc.start}: "
                          f"{exc.reason}); save it as UTF-8 YAML") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"parallel config {path} is not valid YAML: {exc}") from None
    return _check(config, f"parallel config {path}")


def make_executor(n_jobs: Optional[int] = None, config: Optional[dict] = None,
                  threads: Optional[int] = None, cell_memory=None) -> Executor:
    """The executor for ``-j n_jobs`` and an optional config (from :func:`load_config`).

    ``n_jobs`` (when given) overrides the config's; without a config, n_jobs > 1 means loky and
    1 the plain serial loop.  -1 means one job per core.  ``threads`` (torch threads per CPU cell)
    and ``cell_memory`` (:func:`parse_memory`), when given, override the config's
    ``threads_per_cell`` and ``cell_memory``.
    """
    if config is not None:
        config = _check(config, "parallel config")
    config = dict(config or {})
    if n_jobs is not None and (not isinstance(n_jobs, int) or (n_jobs < 1 and n_jobs != -1)):
        raise ConfigError(f"-j/--jobs must be a positive integer (or -1 for all cores), got {n_jobs!r}")
    n = n_jobs if n_jobs is not None else config.get("n_jobs", 1)
    if n == -1:
        n = os.cpu_count() or 1
    backend = config.get("backend") or ("loky" if n > 1 else "serial")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"--threads must be a positive integer, got {threads!r}")
    memory = cell_memory if cell_memory is not None else config.get("cell_memory")
    if memory is not None:
        parse_memory(memory)  # refused here, before any cell runs
    common = dict(n_jobs=n, cells_per_gpu=config.get("cells_per_gpu", 1),
                  threads_per_cell=threads if threads is not None else config.get("threads_per_cell"),
                  cell_memory=memory,
                  options={k: v for k, v in config.items() if k not in COMMON_KEYS})
    cls = {"serial": SerialExecutor, "loky": LokyExecutor, "submitit": SubmititExecutor,
           "dask": DaskExecutor}[backend]
    return cls(**common)


def add_cli_arguments(parser) -> None:
    """``-j/--jobs N`` and ``--parallel-config FILE.yml`` on an argparse (sub)parser."""
    parser.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                        help="run N cells at once in local processes (joblib/loky); -1: one per core")
    parser.add_argument("--parallel-config", dest="parallel_config", metavar="FILE.yml",
                        help="run the cells with submitit (Slurm) or dask instead; see "
                             "examples/parallel/*.yml")
    parser.add_argument("--cell-memory", dest="cell_memory", metavar="SIZE", default=None,
                        help="memory one CPU cell may allocate, e.g. 4G (0: no limit; default 80%% "
                             "of the machine's memory shared among the cells running at once)")


def from_args(args, threads: Optional[int] = None) -> Executor:
    """The executor of parsed ``-j`` / ``--parallel-config`` / ``--cell-memory`` arguments, with
    ``threads`` per CPU cell (ConfigError if malformed)."""
    path = getattr(args, "parallel_config", None)
    config = load_config(path) if path else None
    return make_executor(getattr(args, "jobs", None), config, threads=threads,
                         cell_memory=getattr(args, "cell_memory", None))
