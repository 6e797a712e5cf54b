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

from estbench.core.errors import BudgetError, InfeasibleError
from estbench.core.plugins import Option

from .base import REGISTRY as _registry
from .base import Estimate, Estimator
from .families import FAMILIES, FamilyError, family_of

__all__ = [
    "BudgetError", "InfeasibleError", "Estimate", "Estimator", "Option", "FamilyError", "available", "get", "get_class",
    "skipped", "family_of", "register", "unregister", "FAMILIES", "is_oracle",
]

ENTRY_POINT_GROUP = _registry.group


def register(cls: type[Estimator]) -> type[Estimator]:
    """Register an Estimator subclass defined outside this package (e.g. a user's file);
    RegistryError naming both classes if its name is taken."""
    return _registry.register(cls)


def unregister(name: str) -> None:
    """Forget a registered name (a user's temporary class, tests)."""
    _registry.unregister(name)


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


def is_oracle(label: str) -> bool:
    """Whether the estimator of a result label (``exact``, ``exact[max_configs=4096]``) declares
    itself an oracle (``Estimator.oracle``): a reference line in every view, never ranked.  False
    for a name not registered here (a plug-in of another process)."""
    name = str(label).split("[", 1)[0]
    try:
        return bool(get_class(name).oracle)
    except (ValueError, KeyError):
        return False


def skipped() -> dict[str, str]:
    """Modules or entry points that could not be loaded, with the reason."""
    return _registry.skipped()
