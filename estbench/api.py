"""The Python API: ``estbench.run``, ``estbench.load``, ``estbench.summary``.

``run`` is ``estbench run`` without the command line: the same selection, plan, orchestration
(``engine.runs``) and run folder, returned as frames instead of printed.
"""
from __future__ import annotations

import operator
import sys

from estbench.core import process
from estbench.analysis import table
from estbench.core.errors import OptionError, UsageError
from estbench.core.spec import parse_seeds
from estbench.engine import executors, runs, store
from estbench.engine.progress import Progress


def load(run_dir, finished_only: bool = False):
    """A results folder as ``(records, cells)``: the tidy long records (columns ``task, estimator,
    seed, device, n_samples, steps, step, metric, value``) and one status row per cell (status,
    error, seconds, environment, ...).  ``finished_only`` keeps the records of finished cells only,
    as every table and ranking does."""
    records, cells = store.load(run_dir)
    return (store.finished(records, cells) if finished_only else records), cells


def summary(records, cells=None):
    """One row per task x estimator x device: means over seeds of the final ELBO, bias, variance,
    cosine, step time and f-evaluations, from finished cells only when ``cells`` is given."""
    return table.summary(store.finished(records, cells) if cells is not None else records)


def run(tasks=None, estimators=None, seeds=(0, 1, 2), out=None, budget="quick", device="cpu",
        jobs=None, force=False, progress=False, threads=None, cell_memory=None, cell_timeout=None,
        **overrides):
    """Run a sweep as ``estbench run`` does -- the same cells, keys and run folder -- and return its
    ``(records, cells)`` (finished cells' records only).

    ``tasks`` / ``estimators``: comma-separated names with options, or lists of them (default: the
    toys, every estimator).  ``seeds``: an int, a list of ints, or a string as ``--seeds`` takes it
    (``"0,1,2"``, ``"0-4"``).  ``out``: the run folder (default ``results/runs/<timestamp>``).
    ``device``: ``cpu``, ``cuda`` or ``all``.  ``jobs``, ``threads``, ``cell_memory`` (``"4G"``),
    ``cell_timeout`` (seconds): as ``-j``, ``--threads``, ``--cell-memory``, ``--cell-timeout``.
    ``overrides``: any ``Budget`` field (``steps``, ``n_samples``, ``checkpoints``,
    ``measure_samples``, ``eval_points``; ``train_seconds`` for a time budget, without a step cap
    unless ``steps`` is given).  Bad input raises a UsageError subclass (OptionError, SpecError,
    ConfigError) with one clear line; notes (a device missing, points a budget cannot hold) go to
    stderr.
    """
    process.prepare()  # the workers' environment: estbench.core.process
    if device not in runs.DEVICES:
        raise OptionError(f"device must be one of {', '.join(runs.DEVICES)}, got {device!r}")
    task_specs, est_specs = runs.select(tasks, estimators, budget)
    seed_list, devices = _seeds(seeds), runs.DEVICES[device]
    executor = executors.make_executor(jobs, threads=threads, cell_memory=cell_memory)
    planned = runs.plan(task_specs, est_specs, seed_list, devices, budget, overrides,
                        timeout=cell_timeout, list_skipped=False)
    for line in planned.notes:
        print(line, file=sys.stderr)
    out = runs.check_out(runs.default_out() if out is None else out)
    shown = Progress(sys.stderr, not progress, planned.plan.cells, executor.n_jobs, where=out)
    args = ", ".join(f"{k}={v!r}" for k, v in [("tasks", tasks), ("estimators", estimators),
                                                  ("seeds", seeds), ("budget", budget),
                                                  ("device", device), *overrides.items()])
    meta = runs.sweep_meta(planned.plan, budget, task_specs, est_specs, seed_list, devices,
                           command=f"estbench.run({args})")
    try:
        outcome = runs.run_into(planned.plan, out, meta, executor, force=force, progress=shown)
    finally:
        shown.close()
    for line in outcome.notes:
        print(line, file=sys.stderr)
    return outcome.records, outcome.cells


def _seeds(seeds) -> list:
    """``run``'s seeds as the command line's ``--seeds`` parses them (``core.spec.parse_seeds``:
    the same ranges, bounds and duplicate check): a string as it is, an int or a list of ints as
    their comma-separated text.  Anything else, or a seed out of range, raises OptionError."""
    def whole(v):
        if isinstance(v, bool):
            raise TypeError
        return operator.index(v)  # ints (numpy's too); never 1.5 or "1"

    try:
        if isinstance(seeds, str):
            text = seeds
        elif isinstance(seeds, bytes):
            raise TypeError
        else:
            try:
                values = [whole(seeds)]
            except TypeError:
                values = [whole(v) for v in seeds]
            if not values:
                raise OptionError("seeds is empty: give at least one")
            text = ",".join(map(str, values))
    except TypeError:
        raise OptionError(f"seeds must be an int, a list of ints or a string such as '0,1,2' or "
                          f"'0-4', got {seeds!r}") from None
    try:
        return parse_seeds(text, "seeds")
    except UsageError as e:
        raise OptionError(str(e)) from None
