"""The task registry: ``tasks.available()``, ``tasks.get(name, **options)``.

Every module of this package is imported once on first use (and the ``estbench.tasks`` entry-point
group); each :class:`Task` subclass with a ``name`` registers itself.  Broken modules are skipped
with their reason kept in :func:`skipped`.
"""
from __future__ import annotations

from .base import REGISTRY as _registry
from .base import ClosedFormToy, Problem, Reference, Task, flat_grad

__all__ = ["Task", "Problem", "Reference", "ClosedFormToy", "available", "get", "get_class",
           "skipped", "flat_grad"]


def available(family: str | None = None) -> list[str]:
    """Sorted names of registered tasks, optionally only those whose latent is of ``family``."""
    return _registry.available(None if family is None else (lambda c: c.family == family))


def get_class(name: str) -> type[Task]:
    return _registry.get_class(name)


def get(name: str, **options) -> Task:
    """A fresh (not yet set-up) instance of the task registered as ``name``."""
    return get_class(name)(**options)


def skipped() -> dict[str, str]:
    return _registry.skipped()
