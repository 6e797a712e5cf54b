"""Expand a selection into cells and run them, skipping cells already in the store."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional

import estimators
import tasks
from estbench.engine import protocols, store
from estbench.core.budget import Budget
from estbench.core.errors import OptionError, SpecError
from estbench.core.spec import Spec
from estbench.engine.cell import Plan, usable_devices
from estbench.engine.train import Cell, CellResult


def default_tasks() -> list[str]:
    """The tasks a run without ``--tasks`` trains: those that declare ``in_default_run``."""
    return [n for n in tasks.available() if getattr(tasks.get_class(n), "in_default_run", False)]


def check_spec(kind: str, spec: Spec):
    """Instantiate once to validate the name and options (raises ValueError with a clear message)."""
    if kind == "task":
        return _check_folders(tasks.get(spec.name, **spec.options))
    return estimators.get(spec.name, **spec.options)


def _check_folders(task):
    """A task option named ``*_dir`` (``data_dir``: '' for the shipped copy) names a folder: one
    that does not exist is refused when the selection is parsed, in one line, instead of failing
    every cell of the task when it loads its data.  Checked here, where every selection passes
    (command line, sweep file, Python API), not in the task modules or the option machinery, which
    are part of every cell's cache key."""
    for key, value in task.config.items():
        if key.endswith("_dir") and isinstance(value, str) and value and not Path(value).is_dir():
            why = "it is a file" if Path(value).exists() else "no such folder"
            raise OptionError(f"task {task.name!r}: option {key}={value!r} must name an existing "
                              f"folder ({why}; leave it out for the shipped copy)")
    return task


def _canonical(kind: str, specs: Iterable[Spec]) -> dict:
    """Instantiate each spec once and key it by its canonical display name: ``toy_binary``,
    ``toy_binary[]`` and ``toy_binary[t=0.45]`` (the default) are one configuration, one cell."""
    out, given = {}, {}
    for spec in specs:
        obj = check_spec(kind, spec)
        name = obj.display_name
        if name in out:
            raise SpecError(f"{kind} {str(spec)!r} is the same configuration as {given[name]!r} "
                            f"({name!r}); list it once")
        out[name], given[name] = obj, str(spec)
    return out


def task_budget(task, name: str = "quick", overrides: Optional[dict] = None) -> Budget:
    """The budget of a task: Budget defaults < the task's named budget (``paper``: its published
    protocol's) < explicit overrides."""
    if name == protocols.PAPER:
        return protocols.get(task.name).make_budget(overrides)
    if name == protocols.PUBLISHED:
        return protocols.as_published(task.name).make_budget(overrides)
    if name not in task.budgets:
        raise ValueError(f"task {task.name!r} has no budget {name!r}; it has {sorted(task.budgets)}")
    return Budget(**{**task.budgets[name], **(overrides or {})})


#: default time limit of one cell per named budget, in seconds (``--cell-timeout`` overrides it):
#: well above what the slowest quick cell takes on a CPU; a standard one takes hours there
DEFAULT_CELL_TIMEOUT = {"quick": 3600.0, "standard": 48 * 3600.0, protocols.PAPER: 0.0,
                        protocols.PUBLISHED: 0.0}


def expand(task_specs: Iterable[Spec], est_specs: Iterable[Spec], seeds: Iterable[int],
           devices: Iterable[str], budget: "Budget | str" = "quick",
           overrides: Optional[dict] = None, timeout: Optional[float] = None) -> Plan:
    """All cells of a selection.  ``budget`` is a Budget used for every task, or the name of each
    task's own budget ("quick", "standard"; "paper": the task's published protocol, its task
    options and budget, see :mod:`estbench.engine.protocols`) with ``overrides`` (e.g. steps from the command line).
    ``timeout``: seconds a cell may run (0: no limit); default ``DEFAULT_CELL_TIMEOUT`` of the named
    budget (no limit for an explicit Budget)."""
    if timeout is None:
        timeout = 0.0 if isinstance(budget, Budget) else DEFAULT_CELL_TIMEOUT.get(budget, 0.0)
    if budget == protocols.PUBLISHED:
        return _expand_published(list(task_specs), list(est_specs), seeds, devices, overrides,
                                 float(timeout))
    paper = budget == protocols.PAPER
    task_specs, est_specs = list(task_specs), list(est_specs)
    if paper:  # each task under its published protocol: its options first, the given ones win
        task_specs = [Spec(s.name, protocols.task_options(s.name, s.options), s.text)
                      for s in task_specs]
    task_objs = _canonical("task", task_specs)
    est_objs = _canonical("estimator", est_specs)
    plan = Plan([])
    usable = usable_devices(devices, plan)
    for t, task in task_objs.items():
        b = budget if isinstance(budget, Budget) else task_budget(task, budget, overrides)
        per_task = est_objs
        if paper:  # the estimator settings the source tuned, for estimators named without options
            per_task = _canonical("estimator", [
                Spec(s.name, protocols.estimator_options(task.name, s.name, s.options), s.text)
                for s in est_specs])
        for e, est in per_task.items():
            if task.family not in est.families:
                plan.skipped.append((t, e, f"supports {sorted(est.families)}, task is {task.family}"))
                continue
            for dev in usable:
                for seed in seeds:
                    plan.cells.append(Cell(t, e, int(seed), dev, b, timeout=float(timeout)))
    return plan


def _expand_published(task_specs: list[Spec], est_specs: list[Spec], seeds, devices,
                      overrides: Optional[dict], timeout: float) -> Plan:
    """The cells of the as-published mode: each method at its source's own settings (its task
    options -- learning rate, optimiser -- and its estimator options), so each method's cells
    have a task configuration of their own.  An estimator the source did not run is skipped with
    that reason; options given on the command line win over the source's."""
    plan = Plan([])
    usable = usable_devices(devices, plan)
    seen: dict = {}
    for ts in task_specs:
        for es in est_specs:
            opts = protocols.published_options(ts.name, es.name, ts.options, es.options)
            if opts is None:
                plan.skipped.append((ts.name, es.name, "the source did not run it (its "
                                     "protocol's as_published.per_method has no settings for it)"))
                continue
            task = check_spec("task", Spec(ts.name, opts[0], ts.text))
            est = check_spec("estimator", Spec(es.name, opts[1], es.text))
            pair = (task.display_name, est.display_name)
            if pair in seen:
                raise SpecError(f"{ts} x {es} is the same configuration as {seen[pair]}; list it once")
            seen[pair] = f"{ts} x {es}"
            b = task_budget(task, protocols.PUBLISHED, overrides)
            for dev in usable:
                for seed in seeds:
                    plan.cells.append(Cell(pair[0], pair[1], int(seed), dev, b, timeout=timeout))
    return plan


def run(plan: Plan, run_dir: Path, force: bool = False,
        progress: Optional[Callable[[int, int, Cell, Optional[CellResult], bool], None]] = None,
        log: Optional[Callable[[str], None]] = None, executor=None) -> list[CellResult]:
    """Run every cell of the plan not already stored in ``run_dir`` (all of them with ``force``).

    The sweep only plans: cells already stored are filtered out here, the rest go to ``executor``
    (from :func:`estbench.engine.executors.make_executor`; default the serial one, which runs them one
    after the other in this process; loky, submitit and dask run them in parallel).  Every backend
    runs the same worker function, which writes each finished cell to the store at once, so an
    interrupted sweep loses at most the cells in progress.  ``progress(i, n, cell, result, cached)``
    is called as cells complete (``i`` counts completions); ``log`` gets one line per failed cell.
    A cell whose worker died is reported as failed and left unstored (a rerun retries it), then
    WorkerError is raised once every other cell is done.
    """
    from estbench.engine.executors import SerialExecutor, WorkerError

    executor = executor if executor is not None else SerialExecutor()
    run_dir = Path(run_dir)
    plan.cells = [c.with_code() for c in plan.cells]
    n = len(plan.cells)
    done, todo, results, lost = 0, [], [], []
    for cell in plan.cells:
        if not force and store.has_cell(run_dir, cell.key()):
            done += 1
            if progress:
                progress(done, n, cell, None, True)
        else:
            todo.append(cell)
    if todo:
        run_dir.mkdir(parents=True, exist_ok=True)
        # closed on the way out: an interrupt (Ctrl-C) anywhere in this loop stops the executor
        # at once (it cancels the cells not started and stops its workers), not at exit
        cells = iter(executor.run_cells(todo, run_dir, force))
        try:
            for cell, res in cells:
                done += 1
                if res is not None and res.error.startswith("worker died"):
                    lost.append(res)
                elif res is not None:
                    results.append(res)
                    if log and res.status == "failed":
                        log(f"{cell.label()}: {res.error}")
                if progress:
                    progress(done, n, cell, res, res is None)
        finally:
            if hasattr(cells, "close"):
                cells.close()
            # heartbeats a dead (or, after an interrupt, killed) worker left behind
            store.clear_running(run_dir, [c.key() for c in todo])
    order = {cell: i for i, cell in enumerate(plan.cells)}
    results.sort(key=lambda r: order.get(r.cell, n))
    if lost:
        raise WorkerError(f"{len(lost)} cell(s) did not finish because their worker died (the other "
                          f"cells are stored; rerun to retry them): "
                          + "; ".join(f"{r.cell.label()}: {r.error}" for r in lost[:3]))
    return results
