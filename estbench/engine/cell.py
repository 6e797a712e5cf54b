"""A cell -- one training run (task, estimator, seed, device, budget) -- its result, and its key.

A cell's key is a content hash of everything that changes its result and nothing else: its
specification, and the version of the code that computes it (:func:`code_version`).

The code version hashes the modules that compute the cell -- the training loop
(``estbench.engine.train``) and everything of ours it imports, the modules of the cell's task and
estimator classes (their whole inheritance chain) and everything of ours those import, function-
local imports included -- each *normalised*: parsed, with its docstrings, bare string statements,
comments, formatting and function-signature annotations dropped.  So a refactoring that changes
what computes a cell makes its key new, and one that only rewords, reformats or re-documents
keeps every stored cell valid.  Moving code between modules does change the key: the hash does not
follow functions, only the modules they live in.  Cost: parsing those files once per (task,
estimator) pair in a process (cached), small beside a cell.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from estbench.core import __version__
from estbench.core.budget import Budget

#: the repository root (the folder holding the estbench, estimators and tasks packages)
ROOT = Path(__file__).resolve().parents[2]
#: our packages: the imports a cell's code is followed through
PACKAGES = ("estbench", "estimators", "tasks")
#: the module every cell runs, whatever its task and estimator
ENTRY = "estbench.engine.train"
#: modules that describe results or identify cells without computing them, kept out of every
#: cell's code even where cell code imports them: relabelling a metric or changing its declared
#: direction (core.metrics) changes how results are read, never a record; this module makes keys
NOT_CELL_CODE = frozenset({"estbench.core.metrics", "estbench.engine.cell"})


@dataclass(frozen=True)
class Cell:
    task: str
    estimator: str
    seed: int
    device: str
    budget: Budget
    #: version of the code computing the cell (:func:`cell_code_version`), fixed by the process
    #: that plans a sweep so that workers elsewhere file the cell under the same key
    code: str = ""
    #: time limit of the whole cell in seconds (0: none); not part of the key (it does not change
    #: a finished cell's result)
    timeout: float = 0.0
    #: a *probe* cell: the folder of the snapshot set the estimator is measured at (no training;
    #: :mod:`estbench.engine.probe`), '' for a training cell.  Its ``code`` then names the set's
    #: manifest hash, so the key changes when the snapshots do.
    snapshots: str = ""

    def with_code(self) -> "Cell":
        if self.code:
            return self
        return dataclasses.replace(self, code=cell_code_version(self))

    @property
    def probe(self) -> bool:
        """Whether this cell measures at a snapshot set instead of training."""
        return bool(self.snapshots)

    def key(self, code_version: str | None = None) -> str:
        """Content hash of everything that changes the result (and nothing else): the cell's
        specification and the version of the code that computes it (:func:`cell_code_version`)."""
        if code_version is None:
            code_version = self.with_code().code
        spec = {"task": self.task, "estimator": self.estimator, "seed": self.seed,
                "device": self.device, "budget": self.budget.as_dict(), "code": code_version}
        if self.probe:  # a training cell's key stays what it always was
            spec["probe"] = True
        blob = json.dumps(spec, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def label(self) -> str:
        at = " at snapshots" if self.probe else ""
        return f"{self.task} x {self.estimator} seed={self.seed} {self.device}{at}"


@dataclass
class CellResult:
    cell: Cell
    status: str  # "ok" | "diverged" | "infeasible" (budget units or size do not fit) | "failed"
    records: list[dict] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    #: the task's non-numeric results (``Task.artifacts()``), stored with the cell
    artifacts: dict = field(default_factory=dict)

    def summary_row(self) -> dict:
        return {"task": self.cell.task, "estimator": self.cell.estimator, "seed": self.cell.seed,
                "device": self.cell.device, **self.cell.budget.as_dict(),
                "status": self.status, "error": self.error, "seconds": self.seconds}


@dataclass
class Plan:
    """The cells of a sweep or a probe, and what will not run."""

    cells: list[Cell]
    #: (task, estimator, reason) pairs that will not run (incompatible families, etc.)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    #: devices asked for that are not available here
    missing_devices: list[str] = field(default_factory=list)


def usable_devices(devices: Iterable[str], plan: Plan) -> list[str]:
    """The devices of ``devices`` this machine has; the others are noted in ``plan.missing_devices``."""
    usable = []
    for d in devices:
        if d == "cuda" and not torch.cuda.is_available():
            plan.missing_devices.append(d)
        else:
            usable.append(d)
    return usable


# ----------------------------------------------------------------------------- the code version

class _Normalise(ast.NodeTransformer):
    """What of a module computes: no docstrings or other bare string statements (no-ops), no
    annotations of function signatures (strings under ``from __future__ import annotations``,
    never evaluated by cell code).  Comments and formatting never reach the AST."""

    def generic_visit(self, node):
        super().generic_visit(node)
        for name in ("body", "orelse", "finalbody"):
            body = getattr(node, name, None)
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                kept = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                and isinstance(s.value.value, str))]
                setattr(node, name, kept or ([ast.Pass()] if name == "body" else []))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
        if isinstance(node, ast.arg):
            node.annotation = None
        return node


@functools.lru_cache(maxsize=None)
def normalised(path: Path, mtime_ns: int) -> tuple[str, tuple[str, ...]]:
    """A module's normalised AST (as text) and the modules of ours it names in imports (absolute
    and relative, top-level and function-local).  ``mtime_ns`` keys the cache to the file's state."""
    tree = ast.parse(path.read_text(errors="replace"), str(path))
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    ours = tuple(sorted({n for n in names if n.split(".")[0] in PACKAGES}))
    return ast.dump(_Normalise().visit(tree), include_attributes=False), ours


def module_name(path: Path) -> str:
    """``estbench.engine.train`` for ROOT/estbench/engine/train.py; a file outside the project (a
    user's plug-in) is named by its path."""
    try:
        parts = list(path.resolve().relative_to(ROOT).with_suffix("").parts)
    except ValueError:
        return str(path)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(name: str) -> Path | None:
    """The source file of our module ``name``, or None (a name imported from a module, not one)."""
    base = ROOT.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _class_files(kind: str, spec_text: str) -> list[Path]:
    """The source files of a plug-in class and of every class it inherits from: found from the
    class, never from a list of names."""
    import estimators
    import tasks
    from estbench.core.spec import parse

    registry = estimators if kind == "estimator" else tasks
    try:
        cls = registry.get_class(parse(spec_text).name)
    except ValueError:
        return []
    files = []
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in ("builtins", "torch", "typing"):
            continue
        try:
            files.append(Path(inspect.getsourcefile(klass)))
        except (TypeError, OSError):
            continue
    return files


def code_files(task: str = "", estimator: str = "", entry: str = ENTRY) -> list[Path]:
    """The source files :func:`code_version` hashes, sorted: the ``entry`` module's (the training
    loop, or a probe's :mod:`estbench.engine.probe`), the task's and the estimator's modules and
    every module of ours they import, transitively (without a task and an estimator: every
    estimator and task module's)."""
    starts = [module_file(entry)]
    if task or estimator:
        for kind, text in (("task", task), ("estimator", estimator)):
            starts += _class_files(kind, text) if text else []
    else:
        starts += [p for pkg in ("estimators", "tasks") for p in (ROOT / pkg).glob("**/*.py")]
    seen: dict[str, Path] = {}
    todo = [p for p in starts if p is not None]
    while todo:
        path = todo.pop()
        name = module_name(path)
        if name in seen:
            continue
        seen[name] = path
        for imported in normalised(path, path.stat().st_mtime_ns)[1]:
            p = module_file(imported)
            if p is not None and module_name(p) not in seen:
                todo.append(p)
    return sorted(p for n, p in seen.items() if n not in NOT_CELL_CODE)


@functools.lru_cache(maxsize=None)
def code_version(task: str = "", estimator: str = "", entry: str = ENTRY) -> str:
    """What goes into a cell's cache key for 'the code': the estbench and torch versions and a hash
    of the normalised modules that compute the cell (:func:`code_files`).  Without a task and an
    estimator it covers every estimator and task module (the version of the code as a whole)."""
    h = hashlib.sha256()
    for text in sorted(normalised(p, p.stat().st_mtime_ns)[0]
                       for p in code_files(task, estimator, entry)):
        h.update(text.encode())
        h.update(b"\0")
    return f"{__version__}+torch{torch.__version__}+{h.hexdigest()[:16]}"


def cell_code_version(cell: Cell) -> str:
    """The code version a cell is filed under: the one its planner fixed (a probe cell's names its
    snapshot set too), else that of the code that trains it."""
    return cell.code or code_version(cell.task, cell.estimator)
