"""Expand a selection into cells and run them, skipping cells already in the store."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

import estimators
import tasks
from estbench import store
from estbench.budget import Budget
from estbench.spec import Spec
from estbench.train import Cell, CellResult, run_cell


@dataclass
class Plan:
    cells: list[Cell]
    #: (task, estimator, reason) pairs that will not run (incompatible families, etc.)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    #: devices asked for that are not available here
    missing_devices: list[str] = field(default_factory=list)


def check_spec(kind: str, spec: Spec):
    """Instantiate once to validate the name and options (raises ValueError with a clear message)."""
    if kind == "task":
        return tasks.get(spec.name, **spec.options)
    return estimators.get(spec.name, **spec.options)


def task_budget(task, name: str = "quick", overrides: Optional[dict] = None) -> Budget:
    """The budget of a task: Budget defaults < the task's named budget < explicit overrides."""
    if name not in task.budgets:
        raise ValueError(f"task {task.name!r} has no budget {name!r}; it has {sorted(task.budgets)}")
    return Budget(**{**task.budgets[name], **(overrides or {})})


def expand(task_specs: Iterable[Spec], est_specs: Iterable[Spec], seeds: Iterable[int],
           devices: Iterable[str], budget: "Budget | str" = "quick",
           overrides: Optional[dict] = None) -> Plan:
    """All cells of a selection.  ``budget`` is a Budget used for every task, or the name of each
    task's own budget ("quick", "standard") with ``overrides`` (e.g. steps from the command line)."""
    task_specs, est_specs = list(task_specs), list(est_specs)
    task_objs = {str(t): check_spec("task", t) for t in task_specs}
    est_objs = {str(e): check_spec("estimator", e) for e in est_specs}
    plan = Plan([])
    usable = []
    for d in devices:
        if d == "cuda" and not torch.cuda.is_available():
            plan.missing_devices.append(d)
        else:
            usable.append(d)
    for t, task in task_objs.items():
        b = budget if isinstance(budget, Budget) else task_budget(task, budget, overrides)
        for e, est in est_objs.items():
            if task.family not in est.families:
                plan.skipped.append((t, e, f"supports {sorted(est.families)}, task is {task.family}"))
                continue
            for dev in usable:
                for seed in seeds:
                    plan.cells.append(Cell(t, e, int(seed), dev, b))
    return plan


def run(plan: Plan, run_dir: Path, force: bool = False,
        progress: Optional[Callable[[int, int, Cell, Optional[CellResult], bool], None]] = None,
        log: Optional[Callable[[str], None]] = None) -> list[CellResult]:
    """Run every cell of the plan not already stored in ``run_dir`` (all of them with ``force``).

    Each finished cell is written to the store before the next starts, so an interrupted sweep
    loses at most the cell in progress.  ``progress(i, n, cell, result, cached)`` is called after
    each cell.
    """
    run_dir = Path(run_dir)
    version = store.code_version()
    results = []
    n = len(plan.cells)
    for i, cell in enumerate(plan.cells, 1):
        key = cell.key(version)
        if not force and store.cell_path(run_dir, key).exists():
            if progress:
                progress(i, n, cell, None, True)
            continue
        res = run_cell(cell, log=log)
        store.write_cell(run_dir, key, res)
        results.append(res)
        if progress:
            progress(i, n, cell, res, False)
    return results
