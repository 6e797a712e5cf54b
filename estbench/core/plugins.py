"""Plug-in machinery shared by the estimator and task registries: declared options and discovery.

Both ``estimators`` and ``tasks`` import it from here, the harness's neutral home for it.

* :class:`Option` -- one declared option: default, doc, choices, and a *constraint* from
  ``torch.distributions.constraints`` (``positive``, ``unit_interval``, ``positive_integer``, ...),
  declared the way a distribution declares ``arg_constraints`` and checked in one place,
  :func:`configure`, when a name like ``toy_binary[t=0.49]`` is parsed.  Float options are finite
  whatever their constraint (``nan``, ``inf``, ``1e400`` are refused).
* :class:`Registry` -- name -> class for one kind of plug-in.  It imports every module of its
  package once (and the objects in an entry-point group); classes register themselves by defining
  a ``name``.  A module that fails to import is skipped with its reason recorded, never fatal, so one
  broken plug-in cannot take the suite down (benchopt's rule).  A name is registered once: a second
  class under a taken name is refused with both classes and files named, so a plug-in can never
  silently replace a built-in (or be replaced by it).
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
import pkgutil
import re
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Optional

import torch
from torch.distributions import constraints

from estbench.core.errors import OptionError, RegistryError

#: the names plug-ins may declare: lower_snake_case, a subset of the spec grammar (estbench.core.spec)
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


def describe_constraint(c) -> str:
    """A constraint in words, for error messages and ``estbench list``."""
    C = constraints
    if isinstance(c, C._IntegerInterval):
        return f"an integer in [{c.lower_bound}, {c.upper_bound}]"
    if isinstance(c, C._IntegerGreaterThan):
        return f"an integer >= {c.lower_bound}"
    if isinstance(c, C._IntegerLessThan):
        return f"an integer <= {c.upper_bound}"
    if isinstance(c, C._HalfOpenInterval):
        return f"in [{c.lower_bound:g}, {c.upper_bound:g})"
    if isinstance(c, C._Interval):
        return f"in [{c.lower_bound:g}, {c.upper_bound:g}]"
    if isinstance(c, C._GreaterThanEq):
        return f">= {c.lower_bound:g}"
    if isinstance(c, C._GreaterThan):
        return f"> {c.lower_bound:g}"
    if isinstance(c, C._LessThan):
        return f"< {c.upper_bound:g}"
    if isinstance(c, C._Real):
        return "finite"
    if isinstance(c, OpenInterval):
        return f"in ({c.lower_bound:g}, {c.upper_bound:g})"
    return str(c)


class OpenInterval(constraints.Constraint):
    """``lower < x < upper`` (torch.distributions has closed and half-open intervals only)."""

    def __init__(self, lower_bound: float, upper_bound: float):
        self.lower_bound, self.upper_bound = lower_bound, upper_bound
        super().__init__()

    def check(self, value):
        return (self.lower_bound < value) & (value < self.upper_bound)


open_interval = OpenInterval


def integer_at_least(k: int):
    """Integers >= k (torch.distributions' own class behind ``positive_integer``)."""
    return constraints._IntegerGreaterThan(k)


@dataclass(frozen=True)
class Option:
    """A declared option of an estimator or task: its default, a one-line description, and what
    values it takes (``choices``, or a ``constraint`` from torch.distributions.constraints).

    Values given as strings (from the command line) are coerced to the default's type.
    """

    default: Any
    doc: str = ""
    choices: Optional[tuple] = None
    constraint: Any = None

    def describe(self) -> str:
        """What values the option takes, in words ('' when any value of its type does)."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        return describe_constraint(self.constraint) if self.constraint is not None else ""

    def coerce(self, owner: str, key: str, value: Any) -> Any:
        default, given = self.default, value
        try:
            if isinstance(default, bool):
                if isinstance(value, str):
                    low = value.lower()
                    if low not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = low in ("true", "1", "yes")
                value = bool(value)
            elif isinstance(default, int):
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif isinstance(default, float):
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            elif isinstance(default, str):
                value = str(value)
        except (TypeError, ValueError, OverflowError):
            raise OptionError(
                f"{owner}: option {key}={value!r} must be of type {type(default).__name__}"
            ) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(f"{owner}: option {key}={given!r} must be finite")
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"{owner}: option {key}={value!r} must be one of {list(self.choices)}")
        if self.constraint is not None and not isinstance(value, (bool, str)):
            ok = self.constraint.check(torch.tensor(value, dtype=torch.float64))
            if not bool(ok):
                raise OptionError(f"{owner}: option {key}={value!r} must be "
                                  f"{describe_constraint(self.constraint)}")
        return value


def configure(kind: str, name: str, declared: dict[str, Option], given: dict[str, Any]) -> dict[str, Any]:
    """Validate ``given`` against ``declared`` options (types and constraints), fill in defaults."""
    unknown = set(given) - set(declared)
    if unknown:
        valid = ", ".join(sorted(declared)) or "none"
        raise OptionError(
            f"{kind} {name!r} has no option {', '.join(sorted(unknown))}; its options are: {valid}"
        )
    return {
        k: (spec.coerce(f"{kind} {name!r}", k, given[k]) if k in given else spec.default)
        for k, spec in declared.items()
    }


def display_name(name: str, declared: dict[str, Option], config: dict[str, Any]) -> str:
    """``name[k=v,...]`` listing only options that differ from their defaults, in declaration
    order: the one canonical text of a configuration (``toy_binary``, ``toy_binary[]`` and
    ``toy_binary[t=0.45]`` are all ``toy_binary``)."""
    changed = {k: v for k, v in config.items() if v != declared[k].default}
    if not changed:
        return name
    return f"{name}[{','.join(f'{k}={v}' for k, v in changed.items())}]"


def _where(cls) -> str:
    try:
        path = inspect.getsourcefile(cls) or "?"
    except (TypeError, OSError):
        path = "?"
    return f"{cls.__module__}.{cls.__qualname__} ({path})"


class Registry:
    """Name -> class for one kind of plug-in (``estimator`` or ``task``).

    Classes arrive through :meth:`define` (called by the base class's ``__init_subclass__`` for
    every class that declares a ``name``) or :meth:`register` (a user's class, an entry point).
    Every module of ``package`` is imported on first use.  A name is held by one class:

    * a class defined outside the package, or registered explicitly, under a name that is taken
      raises :class:`RegistryError` naming both classes and their files (the package's own modules
      are imported first, so a user's ``rloo`` clashes with the built-in at once);
    * two modules inside the package declaring one name make that name unusable until one is
      renamed: a warning at load time, and ``get`` of that name raises naming both.
    The same class (or a reloaded module's class of the same qualified name) may register again.
    """

    def __init__(self, kind: str, package: str, base: type, entry_point_group: str):
        self.kind, self.package, self.base, self.group = kind, package, base, entry_point_group
        self.classes: dict[str, type] = {}
        self._clashes: dict[str, list[type]] = {}
        self._skipped: dict[str, str] = {}
        self._loaded = False

    # ---- discovery ----------------------------------------------------------------------------
    def load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name.startswith("_"):
                continue
            try:
                importlib.import_module(f"{self.package}.{mod.name}")
            except Exception as exc:
                self._skip(f"{self.package}.{mod.name}", exc)
        for name, classes in self._clashes.items():
            warnings.warn(self._clash_message(name, classes), stacklevel=3)
        try:
            eps = list(metadata.entry_points(group=self.group))
        except Exception:  # pragma: no cover - broken installation metadata
            eps = []
        for ep in eps:
            try:
                self.register(ep.load())
            except Exception as exc:
                self._skip(f"entry point {ep.name}", exc)

    def _skip(self, where: str, exc: Exception) -> None:
        self._skipped[where] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"{self.kind} plug-in {where} skipped: {exc}", stacklevel=3)

    # ---- registration -------------------------------------------------------------------------
    def _check_name(self, cls) -> str:
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise RegistryError(f"{self.kind} {_where(cls)} declares name={name!r}: a name must be "
                                "lower_snake_case (letters, digits, underscores; a letter first)")
        return name

    @staticmethod
    def _same(a, b) -> bool:
        return a is b or (a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__)

    def _clash_message(self, name: str, classes: list) -> str:
        return (f"{self.kind} name {name!r} is declared by {' and by '.join(_where(c) for c in classes)}"
                f": neither is registered until one is renamed")

    def _in_package(self, cls) -> bool:
        mod = getattr(cls, "__module__", "") or ""
        return mod == self.package or mod.startswith(self.package + ".")

    def define(self, cls: type) -> None:
        """A class declaring ``name`` was defined (from the base class's ``__init_subclass__``)."""
        name = self._check_name(cls)
        if self._in_package(cls):
            held = self.classes.get(name)
            clash = self._clashes.get(name)
            if clash is not None:
                if not any(self._same(c, cls) for c in clash):
                    clash.append(cls)
            elif held is not None and not self._same(held, cls):
                self._clashes[name] = [held, cls]
                del self.classes[name]
                if self._loaded:
                    warnings.warn(self._clash_message(name, self._clashes[name]), stacklevel=3)
            else:
                self.classes[name] = cls
            return
        self.load()  # the package's own names first: a clash is caught now, not later
        self._add_strict(cls, name)

    def _add_strict(self, cls, name: str) -> None:
        held = self.classes.get(name)
        if name in self._clashes:
            raise RegistryError(self._clash_message(name, self._clashes[name]))
        if held is not None and not self._same(held, cls):
            raise RegistryError(f"{self.kind} name {name!r} is taken by {_where(held)}; "
                                f"{_where(cls)} cannot register under it: rename it")
        self.classes[name] = cls

    def register(self, cls: type) -> type:
        """Register a class defined elsewhere (a user's file, an entry point); RegistryError if its
        name is held by another class."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not a subclass of {self.base.__module__}.{self.base.__name__}")
        if not getattr(cls, "name", ""):
            raise RegistryError(f"{cls.__name__} declares no `name`")
        name = self._check_name(cls)
        self.load()
        self._add_strict(cls, name)
        return cls

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests and a user's temporary classes)."""
        self.classes.pop(name, None)

    # ---- lookup -------------------------------------------------------------------------------
    def available(self, predicate=None) -> list[str]:
        self.load()
        return sorted(n for n, c in self.classes.items() if predicate is None or predicate(c))

    def get_class(self, name: str) -> type:
        self.load()
        if name in self._clashes:
            raise RegistryError(self._clash_message(name, self._clashes[name]))
        try:
            return self.classes[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self.classes), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self.classes))})"
            ) from None

    def skipped(self) -> dict[str, str]:
        self.load()
        out = dict(self._skipped)
        for name, classes in self._clashes.items():
            out[f"name {name!r}"] = self._clash_message(name, classes)
        return out
