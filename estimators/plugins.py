"""Plug-in machinery shared by the estimator and task registries: declared options and discovery.

A registry imports every module of its package once (and the objects in an entry-point group);
classes register themselves by defining a ``name``.  A module that fails to import is skipped with
its reason recorded, never fatal, so one broken plug-in cannot take the suite down (benchopt's rule).
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Optional


@dataclass(frozen=True)
class Option:
    """A declared option of an estimator or task: its default and a one-line description.

    Values given as strings (from the command line) are coerced to the default's type.
    """

    default: Any
    doc: str = ""
    choices: Optional[tuple] = None

    def coerce(self, owner: str, key: str, value: Any) -> Any:
        default = self.default
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
        except (TypeError, ValueError):
            raise ValueError(
                f"{owner}: option {key}={value!r} must be of type {type(default).__name__}"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{owner}: option {key}={value!r} must be one of {list(self.choices)}")
        return value


def configure(kind: str, name: str, declared: dict[str, Option], given: dict[str, Any]) -> dict[str, Any]:
    """Validate ``given`` against ``declared`` options and fill in defaults."""
    unknown = set(given) - set(declared)
    if unknown:
        valid = ", ".join(sorted(declared)) or "none"
        raise ValueError(
            f"{kind} {name!r} has no option {', '.join(sorted(unknown))}; its options are: {valid}"
        )
    return {
        k: (spec.coerce(f"{kind} {name!r}", k, given[k]) if k in given else spec.default)
        for k, spec in declared.items()
    }


def display_name(name: str, declared: dict[str, Option], config: dict[str, Any]) -> str:
    """``name[k=v,...]`` listing only options that differ from their defaults."""
    changed = {k: v for k, v in config.items() if v != declared[k].default}
    if not changed:
        return name
    return f"{name}[{','.join(f'{k}={v}' for k, v in changed.items())}]"


class Registry:
    """Name -> class for one kind of plug-in (``estimator`` or ``task``)."""

    def __init__(self, kind: str, package: str, path, base: type, entry_point_group: str,
                 infra: set[str]):
        self.kind, self.package, self.path, self.base = kind, package, path, base
        self.group, self.infra = entry_point_group, infra
        self.classes: dict[str, type] = {}
        self._skipped: dict[str, str] = {}
        self._loaded = False

    def load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for mod in pkgutil.iter_modules(self.path):
            if mod.name in self.infra or mod.name.startswith("_"):
                continue
            try:
                importlib.import_module(f"{self.package}.{mod.name}")
            except Exception as exc:
                self._skip(f"{self.package}.{mod.name}", exc)
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

    def register(self, cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not a subclass of {self.base.__module__}.{self.base.__name__}")
        if not getattr(cls, "name", ""):
            raise ValueError(f"{cls.__name__} declares no `name`")
        self.classes[cls.name] = cls
        return cls

    def available(self, predicate=None) -> list[str]:
        self.load()
        return sorted(n for n, c in self.classes.items() if predicate is None or predicate(c))

    def get_class(self, name: str) -> type:
        self.load()
        try:
            return self.classes[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self.classes), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self.classes))})"
            ) from None

    def skipped(self) -> dict[str, str]:
        self.load()
        return dict(self._skipped)
