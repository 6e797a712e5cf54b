"""Published protocols: how the paper a task follows ran it, declared as data beside the task.

A real task names the experiment it reproduces in ``tasks/protocols/<task>.yml``: the source (paper,
and the file of its released code that sets each value), the settings as that source states them
(data, architecture, optimiser per parameter group, batch, length, evaluation), the task options
and budget that put those settings into this suite, the estimator options the source tunes, and --
as important -- where the suite departs from the source and why.  ``estbench list`` prints every
protocol, every report prints those of its tasks, and ``estbench run --budget paper`` runs one.

Why data and not code: a protocol is a statement about someone else's experiment, to be read,
checked against their code and corrected without touching the code that computes a cell (a
cell's cache key hashes that code; the protocol reaches a cell only through the task options and
the budget it sets, both of which are part of the cell's identity).

Schema (every key is checked on load against the task's declared options, the Budget's fields and
the registered estimators' options, so a typo is one clear line, never a silent default):

    task:      the registered task name (the file's stem)
    name:      a short name of the experiment ("DisARM, binary VAE on MNIST")
    source:    {paper: citation, code: "owner/repo: path", also: [other files], notes: ...}
    settings:  {data, architecture, optimiser, batch, length, evaluation, ...}: the source's words
    task_options: {option: value}           what ``--budget paper`` sets on the task
    budget:    {Budget field: value}        the paper budget
    estimator_options: {estimator: {option: value}}   the source's tuned settings, applied to an
               estimator named without options; with ``per_method`` the rest of the source's table
    per_method: {estimator: {setting: value}}  settings the suite does not apply (documented only)
    differences: [lines]                    where the suite departs from the source, and why
    cost:      one line: what a paper-budget cell costs and on which machine that was measured
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from estbench.core.budget import Budget
from estbench.core.errors import SpecError


def protocol_dir() -> Path:
    """Where the protocol files live: beside the tasks they describe (``tasks/protocols``)."""
    import tasks

    return Path(tasks.__file__).resolve().parent / "protocols"

#: the named budget that runs a task's protocol (``estbench run --budget paper``)
PAPER = "paper"
_KEYS = {"task", "name", "source", "settings", "task_options", "budget", "estimator_options",
         "per_method", "differences", "cost"}
_REQUIRED = ("task", "name", "source", "settings", "budget")


class ProtocolError(SpecError):
    """A protocol file that does not describe a runnable protocol (one line, with the file)."""


@dataclass(frozen=True)
class Protocol:
    task: str
    name: str
    source: dict
    settings: dict
    budget: dict
    task_options: dict = field(default_factory=dict)
    estimator_options: dict = field(default_factory=dict)
    per_method: dict = field(default_factory=dict)
    differences: tuple = ()
    cost: str = ""
    path: str = ""

    def make_budget(self, overrides: Optional[dict] = None) -> Budget:
        return Budget(**{**self.budget, **(overrides or {})})

    def citation(self) -> str:
        code = self.source.get("code", "")
        return self.source.get("paper", "") + (f"; code: {code}" if code else "")

    def lines(self, indent: str = "  ") -> list[str]:
        """The protocol in words (``estbench list``, the report)."""
        out = [f"{indent}{self.task}: {self.name}", f"{indent}  source: {self.citation()}"]
        for k, v in self.settings.items():
            out.append(f"{indent}  {k}: {v}")
        if self.task_options:
            out.append(f"{indent}  --budget paper sets: "
                       + ", ".join(f"{k}={v}" for k, v in self.task_options.items())
                       + "; " + ", ".join(f"{k}={v}" for k, v in self.budget.items()))
        for est, opts in self.estimator_options.items():
            out.append(f"{indent}  {est}: " + ", ".join(f"{k}={v}" for k, v in opts.items()))
        for d in self.differences:
            out.append(f"{indent}  differs: {d}")
        if self.cost:
            out.append(f"{indent}  cost: {self.cost}")
        return out

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["differences"] = list(self.differences)
        d.pop("path")
        return d


def _load_yaml(path: Path):
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is a core dependency
        raise ProtocolError("reading protocols needs PyYAML: pip install PyYAML") from None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProtocolError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def _check(raw, path: Path) -> Protocol:
    import estimators
    import tasks

    where = path.name
    if not isinstance(raw, dict):
        raise ProtocolError(f"protocol {where}: expected a mapping of {sorted(_KEYS)}")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ProtocolError(f"protocol {where}: unknown keys {sorted(unknown)}; "
                            f"a protocol has {sorted(_KEYS)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ProtocolError(f"protocol {where}: missing {missing}")
    if raw["task"] != path.stem:
        raise ProtocolError(f"protocol {where}: declares task {raw['task']!r}; the file of a task's "
                            f"protocol is named after the task")
    try:
        task_cls = tasks.get_class(raw["task"])
    except Exception as exc:
        raise ProtocolError(f"protocol {where}: {exc}") from None
    for key in ("source", "settings", "budget", "task_options", "estimator_options", "per_method"):
        if not isinstance(raw.get(key, {}), dict):
            raise ProtocolError(f"protocol {where}: {key} must be a mapping")
    if "paper" not in raw["source"]:
        raise ProtocolError(f"protocol {where}: source needs the paper it follows")
    task_options = raw.get("task_options") or {}
    try:  # the options exist and take these values (the task's own checks, in one place)
        tasks.get(raw["task"], **task_options)
    except Exception as exc:
        raise ProtocolError(f"protocol {where}: task_options: {exc}") from None
    fields = {f.name for f in dataclasses.fields(Budget)}
    bad = set(raw["budget"]) - fields
    if bad:
        raise ProtocolError(f"protocol {where}: budget has no fields {sorted(bad)}; "
                            f"a budget has {sorted(fields)}")
    try:
        Budget(**raw["budget"])
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"protocol {where}: budget: {exc}") from None
    est_options = raw.get("estimator_options") or {}
    for name, opts in est_options.items():
        try:
            cls = estimators.get_class(name)
            estimators.get(name, **(opts or {}))
        except Exception as exc:
            raise ProtocolError(f"protocol {where}: estimator_options: {exc}") from None
        if task_cls.family not in cls.families:
            raise ProtocolError(f"protocol {where}: estimator {name!r} does not run on "
                                f"{task_cls.family} latents")
    differences = raw.get("differences") or []
    if not isinstance(differences, list) or not all(isinstance(d, str) for d in differences):
        raise ProtocolError(f"protocol {where}: differences must be a list of lines")
    return Protocol(task=raw["task"], name=str(raw["name"]), source=dict(raw["source"]),
                    settings=dict(raw["settings"]), budget=dict(raw["budget"]),
                    task_options=dict(task_options),
                    estimator_options={k: dict(v or {}) for k, v in est_options.items()},
                    per_method=dict(raw.get("per_method") or {}), differences=tuple(differences),
                    cost=str(raw.get("cost", "")), path=str(path))


@functools.lru_cache(maxsize=None)
def available() -> dict[str, Protocol]:
    """Every task's protocol by task name, loaded and checked once."""
    return {p.stem: _check(_load_yaml(p), p) for p in sorted(protocol_dir().glob("*.yml"))}


def get(task: str) -> Protocol:
    """The protocol of ``task``; a clear error for a task that follows none."""
    found = available()
    if task not in found:
        raise ProtocolError(f"task {task!r} follows no published protocol, so it has no "
                            f"{PAPER!r} budget; tasks with one: {', '.join(sorted(found))}")
    return found[task]


def task_options(task: str, given: dict) -> dict:
    """The options of a task run under its protocol: the protocol's, then the ones given."""
    return {**get(task).task_options, **given}


def estimator_options(task: str, estimator: str, given: dict) -> dict:
    """The options of an estimator under a task's protocol: the ones the source tuned unless
    options were given (an estimator named with options is the user's configuration)."""
    if given:
        return given
    return dict(get(task).estimator_options.get(estimator, {}))
