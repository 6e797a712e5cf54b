"""Run a sweep into a results folder: the one orchestration behind ``estbench run``, ``estbench
rank`` and ``estbench.run``.

    selection (spec strings) -> plan (cells, and notes on what will not run)
      -> run folder: meta.json, one file per cell (sweep.run + an executor), results.parquet
      -> the plan's records and status rows, read back from the folder

The callers add only what is theirs: the command line parses arguments, prints notes and the table
and turns errors into exit statuses; the Python API returns frames.  So both leave identical
folders.  Finished cells are always kept: an interrupted or failing sweep rewrites results.parquet
from the cells stored before the error leaves this module.
"""
from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

import estimators
from estbench.core.errors import ResultsWriteError, UsageError
from estbench.core.spec import MAX_CELLS, Spec, parse_list
from estbench.engine import protocols, store, sweep
from estbench.engine.executors import Executor, SerialExecutor

#: errnos of a folder that does not take writes, and of one that stopped taking them
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_WRITE_ERRORS = _READ_ONLY | {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}


def select(task_specs=None, estimator_specs=None, budget="quick",
           names: tuple[str, str] = ("tasks", "estimators")) -> tuple[list[Spec], list[Spec]]:
    """The tasks and estimators of a sweep as specs: comma-separated text or lists of names with
    options; None: the default tasks (every task with a published protocol for the ``paper``
    budget, with an as-published mode for ``published``) and every registered estimator (for
    ``published``, the methods the sources ran).  An empty selection is an error, not 'everything',
    naming the argument as the caller calls it (``names``: ``--tasks`` on the command line)."""
    def specs(value, default, what):
        if value is None:
            return parse_list(",".join(default()))
        text = value if isinstance(value, str) else ",".join(map(str, value))
        if not text.strip():
            raise UsageError(f"{what} is empty: name at least one (leave {what} out for the default)")
        return parse_list(text)

    default_tasks = {protocols.PAPER: protocols.available,
                     protocols.PUBLISHED: _with_published_mode}.get(budget, sweep.default_tasks)
    chosen_tasks = specs(task_specs, default_tasks, names[0])

    def default_estimators():
        if budget != protocols.PUBLISHED:  # as published: the methods the sources ran
            return estimators.available()
        return list(dict.fromkeys(e for t in chosen_tasks
                                  for e in protocols.as_published(t.name).per_method))

    return chosen_tasks, specs(estimator_specs, default_estimators, names[1])


def _with_published_mode() -> list[str]:
    """The tasks whose protocol has an as-published mode."""
    return [n for n, p in protocols.available().items() if p.as_published is not None]


@dataclass
class Planned:
    plan: sweep.Plan
    #: lines for the person running it: pairs skipped, devices missing, points a budget cannot hold
    notes: list[str] = field(default_factory=list)


def plan(task_specs: list[Spec], est_specs: list[Spec], seeds: list[int], devices: list[str],
         budget="quick", overrides: Optional[dict] = None, timeout: Optional[float] = None,
         list_skipped: bool = True) -> Planned:
    """The cells of a selection (:func:`sweep.expand`), refused in one line (UsageError) when it is
    too large, asks for CUDA alone where there is none, or leaves nothing to run.  A time budget
    (``train_seconds``) trains until the time is spent: no step cap unless ``steps`` is given."""
    overrides = dict(overrides or {})
    if overrides.get("train_seconds"):
        overrides.setdefault("steps", 0)
    n = len(task_specs) * len(est_specs) * len(seeds) * len(devices)
    if n > MAX_CELLS:  # before the plan is built: it instantiates every cell
        raise UsageError(f"the plan would have up to {n} cells ({len(task_specs)} tasks x "
                         f"{len(est_specs)} estimators x {len(seeds)} seeds x {len(devices)} devices), "
                         f"more than the limit of {MAX_CELLS}; split the sweep")
    try:
        p = sweep.expand(task_specs, est_specs, seeds, devices, budget, overrides, timeout=timeout)
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None
    notes = []
    if p.missing_devices:
        if list(devices) == ["cuda"]:
            raise UsageError("--device cuda: CUDA is not available on this machine")
        notes.append("note: CUDA not available, running on cpu only")
    if not p.cells:
        why = "; ".join(f"{e} {r}" for _, e, r in p.skipped[:3])
        raise UsageError(f"nothing to run: no selected estimator supports the selected tasks' latent "
                         f"family ({why})")
    if list_skipped:
        notes += [f"note: skipping {t} x {e}: {why}" for t, e, why in p.skipped]
    return Planned(p, notes + fewer_points(p, overrides))


#: budget counts of evenly spaced points of a step budget: (flag, what one point is called)
_POINTS = {"checkpoints": ("--checkpoints", "checkpoints"),
           "eval_points": ("--eval-points", "evaluation points")}


def fewer_points(p: sweep.Plan, overrides: dict) -> list[str]:
    """One note for each ``checkpoints`` / ``eval_points`` override that a step budget cannot
    hold: k evenly spaced points of steps 0..N are at most N + 1 distinct steps (the budget rounds
    them to steps), so more than N + 1 silently became every step and the start."""
    notes = []
    for key, (flag, name) in _POINTS.items():
        asked = overrides.get(key)
        if not asked:
            continue
        short: dict = {}  # steps -> tasks
        for c in p.cells:
            if not c.budget.timed and asked > c.budget.steps + 1:  # a time budget's are times
                short.setdefault(c.budget.steps, set()).add(c.task)
        for steps, on in sorted(short.items()):
            every = len(short) == 1 and on == {c.task for c in p.cells}
            where = "" if every else f" ({', '.join(sorted(on))})"
            notes.append(f"note: {flag} {asked} is more than {steps} steps allow{where}: "
                         + (f"{steps + 1} {name} (every step and the start)" if steps
                            else f"1 {name[:-1]} (the start only)"))
    return notes


def sweep_meta(p: sweep.Plan, budget, task_specs, est_specs, seeds, devices, command: str,
               extra: Optional[dict] = None) -> dict:
    """What meta.json says of a sweep: the machine and code (``store.run_metadata``), the command,
    the selection and every task's budget."""
    return {**store.run_metadata(), "command": command,
            "budget": budget if isinstance(budget, str) else "custom",
            "mode": protocols.mode(budget),
            "tasks": [str(t) for t in task_specs], "estimators": [str(e) for e in est_specs],
            "seeds": list(seeds), "devices": list(devices), **(extra or {}),
            "budgets": {c.task: c.budget.as_dict() for c in p.cells}}


@dataclass
class Outcome:
    #: the records of the plan's finished cells (``store.finished``: what tables and rankings read)
    records: pd.DataFrame
    #: one status row per cell of the plan found in the folder
    cells: pd.DataFrame
    #: results of the cells computed now (not those reused as stored)
    computed: list
    #: lines for the person running it (a folder that took the cells but not meta.json, ...)
    notes: list[str] = field(default_factory=list)


def check_out(out) -> Path:
    """A run folder, existing or to be made; a file there is bad input (UsageError)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a results folder")
    return out


def _reason(e: OSError) -> str:
    if e.errno:
        return os.strerror(e.errno)
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def run_into(p: sweep.Plan, out, meta: dict, executor: Optional[Executor] = None,
             force: bool = False, progress: Optional[Callable] = None) -> Outcome:
    """Run the plan into the folder ``out``; its finished records and status rows.

    Finished cells are always kept.  A folder that cannot be written gets one line, never a
    traceback: UsageError before anything runs when cells need computing; ResultsWriteError when a
    write fails mid-sweep; and when every cell is already stored, the outcome says in a note that
    meta.json and results.parquet were not updated.  An interrupt (KeyboardInterrupt), a worker's
    death (WorkerError) or a backend that cannot start (ConfigError) propagate once
    results.parquet holds every cell stored so far.
    """
    out = check_out(out)
    executor = executor if executor is not None else SerialExecutor()
    if not out.is_dir():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create results folder {out}: {_reason(e)}") from None

    def not_updated(e: Optional[OSError]) -> str:
        if e is None or e.errno in _READ_ONLY:
            return f"note: {out} is read-only: meta.json and results.parquet not updated"
        return f"note: cannot write to {out} ({_reason(e)}): meta.json and results.parquet not updated"

    @functools.lru_cache(maxsize=None)
    def todo() -> int:
        """Cells to compute, counted only where a refused write needs it before the sweep (the
        count reads every stored cell's footer, which the sweep does anyway)."""
        return len(p.cells) if force else sum(not store.has_cell(out, c.key()) for c in p.cells)

    note = None
    if not store.writable(out):
        if todo():
            raise UsageError(f"--out {out} is read-only and {todo()} of {len(p.cells)} cells need "
                             "computing; choose a writable --out")
        note = not_updated(None)
    else:
        try:
            store.write_meta(out, {**meta, "jobs": executor.n_jobs, "executor": executor.name})
        except OSError as e:
            if todo():
                raise UsageError(f"cannot write results to {out}: {_reason(e)}; nothing was run") from None
            note = not_updated(e)

    def merge() -> Optional[OSError]:
        """Rewrite results.parquet (unless the folder is known not to take it); the error if any."""
        if note is not None:
            return None
        try:
            store.write_merged(out)
        except OSError as e:
            return e
        return None

    try:
        computed = sweep.run(p, out, force=force, progress=progress, executor=executor)
    except OSError as e:  # a cell's record could not be written: disk full, folder turned read-only
        if e.errno not in _WRITE_ERRORS:
            raise
        merge()
        raise ResultsWriteError(f"cannot write results to {out}: {_reason(e)} (the finished "
                                "cells are kept; rerun the same command once there is room)") from None
    except BaseException:  # interrupted, a worker died, the backend did not start: keep what is done
        merge()
        raise
    failed = merge()
    notes = []
    if failed is not None:
        if computed:  # this run computed cells: a results.parquet that lags them is an error
            raise ResultsWriteError(f"cannot write results to {out}: {_reason(failed)} "
                                    f"(the cells are stored; {out / 'results.parquet'} is not updated)")
        note = not_updated(failed)
    if note is not None:
        notes.append(note)
    records, cells = store.load(out)
    if not cells.empty:
        cells = cells[cells.key.isin({c.key() for c in p.cells})].reset_index(drop=True)
    return Outcome(store.finished(records, cells), cells, computed, notes)


def default_out(prefix: str = "") -> Path:
    """Where a sweep goes when no folder is named: ``results/runs/<prefix><timestamp>``."""
    from datetime import datetime

    return Path("results") / "runs" / f"{prefix}{datetime.now().strftime('%Y%m%d-%H%M%S')}"


#: the device choices of a sweep (``--device``), each the devices it runs on
DEVICES = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu", "cuda"]}
