"""Every declared quantity, the harness's and the tasks': ``core.metrics`` declares the harness's
metrics and the per-cell figures; each task declares its own final figures (``Task.final_figures``)
and, where its scale is not the default's, its own regression tolerances (``Task.tolerances``).
The analysis layer, which knows both the core and the task registry, reads them together here.
"""
from __future__ import annotations

import functools
from typing import Optional

import tasks
from estbench.core import metrics


def task_class(label: str):
    """The registered class of a result label's task (``toy_binary[dim=5]`` -> ToyBinary), or None
    for a task not registered here (a plug-in of another process, a relabelled setting)."""
    try:
        return tasks.get_class(str(label).split("[", 1)[0].split(" ", 1)[0])
    except (ValueError, KeyError):
        return None


@functools.lru_cache(maxsize=1)
def task_declarations() -> tuple:
    """Every registered task's own final-figure declarations, one per name."""
    out: dict = {}
    for name in tasks.available():
        for m in tasks.get_class(name).final_figures:
            out.setdefault(m.name, m)
    return tuple(out.values())


def lookup(name: str):
    """The declaration of a recorded metric (the harness's or a task's) or a per-cell figure, or
    None."""
    return metrics.lookup(name, task_declarations())


def get(name: str):
    return metrics.get(name, task_declarations())


def undeclared(recorded_names) -> list[str]:
    """Recorded names no declaration covers, sorted."""
    return metrics.undeclared(recorded_names, task_declarations())


def tolerance(name: str, task: str = "") -> Optional[float]:
    """``estbench compare``'s regression tolerance of ``name`` on ``task`` (a result label, options
    and all: ``toy_binary[dim=5]`` reads ``toy_binary``'s): the task's own (``Task.tolerances``),
    else the declared default."""
    cls = task_class(task) if task else None
    own = getattr(cls, "tolerances", {}) if cls is not None else {}
    return own.get(name, get(name).tolerance)
