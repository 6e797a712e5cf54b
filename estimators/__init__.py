"""The estimator registry.

    import estimators
    estimators.available()               # sorted registered names
    estimators.available("bernoulli")    # those supporting a family
    est = estimators.get("rloo", **options)
    e = est.estimate(dist, f, n_samples, context=None)

Every module of this package is imported once on first use, and so are the classes advertised in
the ``estbench.estimators`` entry-point group; each concrete :class:`Estimator` subclass registers
itself by defining ``name``.  A module that fails to import is skipped and its reason kept in
:func:`skipped`.
"""
from __future__ import annotations

from .base import BudgetError, Estimate, Estimator, InfeasibleError, _REGISTRY
from .families import FAMILIES, FamilyError, family_of
from .plugins import Option, Registry

__all__ = [
    "BudgetError", "InfeasibleError", "Estimate", "Estimator", "Option", "FamilyError", "available", "get", "get_class",
    "skipped", "family_of", "register", "FAMILIES",
]

ENTRY_POINT_GROUP = "estbench.estimators"

_registry = Registry("estimator", __name__, __path__, Estimator, ENTRY_POINT_GROUP,
                     infra={"base", "families", "plugins", "baselines"})
_registry.classes = _REGISTRY  # subclasses add themselves here on definition


def register(cls: type[Estimator]) -> type[Estimator]:
    """Register an Estimator subclass defined outside this package (e.g. a user's file)."""
    return _registry.register(cls)


def available(family: str | None = None) -> list[str]:
    """Sorted names of registered estimators, optionally only those supporting ``family``."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families are {list(FAMILIES)}")
    return _registry.available(None if family is None else (lambda c: family in c.families))


def get_class(name: str) -> type[Estimator]:
    return _registry.get_class(name)


def get(name: str, **options) -> Estimator:
    """A fresh instance of the estimator registered as ``name``; ValueError naming close matches."""
    return get_class(name)(**options)


def skipped() -> dict[str, str]:
    """Modules or entry points that could not be loaded, with the reason."""
    return _registry.skipped()
