"""The layers the folders show, enforced on every import, function-local ones included.

Like import-linter's layer contract: each module may import only modules of its own layer or of
the layers below it, and nothing of ours may form an import circle (an import inside a function
counts: it hides a circle from Python, not from the design).  Imports by a constant string
(``importlib.import_module("x")``, ``__import__("x")``) count too.  The plug-in registries load
their own packages by a name they are given (``core.plugins.Registry``): that is discovery, not a
dependency, and has no constant to check.

    6  interface   estbench (the package: run, load, summary), estbench.api, estbench.cli
    5  report      estbench.report
    4  analysis    estbench.analysis
    3  engine      estbench.engine
    2  plug-ins    estimators, tasks            (neither imports the other)
    1  core        estbench.core                (imports nothing of ours)
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("estbench", "estimators", "tasks")

#: module-name prefix -> layer; the longest matching prefix decides
LAYERS = {
    "estbench.core": 1,
    "estimators": 2,
    "tasks": 2,
    "estbench.engine": 3,
    "estbench.analysis": 4,
    "estbench.report": 5,
    "estbench.api": 6,
    "estbench.cli": 6,
    "estbench.__main__": 6,
    "estbench": 6,
}
#: plug-in packages that must not know each other (an estimator never reaches into a task)
INDEPENDENT = [("estimators", "tasks"), ("tasks", "estimators")]


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str, known: set) -> list[tuple[str, int]]:
    """Every module of ours that ``path`` (module ``name``) imports, with the line: top-level and
    function-local imports, relative ones resolved, ``from pkg import sub`` as ``pkg.sub`` when
    ``sub`` is a module, and constant-string ``import_module`` / ``__import__`` calls."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def ours(mod: str) -> str | None:
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        return mod or None

    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                targets.append(sub if sub in known else mod)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
                   or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            targets = [node.args[0].value]
        for t in targets:
            m = ours(t) if t.split(".")[0] in PACKAGES else None
            if m and m != name:
                found.append((m, node.lineno))
    return found


def import_graph(root: Path) -> dict[str, list[tuple[str, int]]]:
    files = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    known = set(files)
    return {name: imports_of(path, name, known) for name, path in files.items()}


def upward_imports(graph) -> list[str]:
    out = []
    for name, targets in graph.items():
        for target, line in targets:
            if layer(target) > layer(name):
                out.append(f"{name}:{line} imports {target} (layer {layer(name)} -> {layer(target)})")
            for a, b in INDEPENDENT:
                if name.split(".")[0] == a and target.split(".")[0] == b:
                    out.append(f"{name}:{line} imports {target} ({a} never import {b})")
    return sorted(out)


def circles(graph) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    edges = {n: sorted({t for t, _ in ts}) for n, ts in graph.items()}

    def visit(v):  # recursion depth is bounded by the module count (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports(import_graph(ROOT)) == []


def test_no_import_circle_function_local_imports_included():
    assert circles(import_graph(ROOT)) == []


def test_every_module_is_in_a_declared_layer():
    """A new folder must be placed in a layer, not fall into its parent's by accident."""
    graph = import_graph(ROOT)
    top = {n for n in graph if n.startswith("estbench.") and n.count(".") == 1}
    folders = {n for n in top if (ROOT / n.replace(".", "/")).is_dir()}
    modules = top - folders - {"estbench.__main__", "estbench.api"}
    assert modules == set(), f"modules outside a layer folder: {sorted(modules)}"
    assert folders <= set(LAYERS), f"folders with no declared layer: {sorted(folders - set(LAYERS))}"


@pytest.mark.parametrize("source, expected", [
    # a core module reaching up from inside a function: found, line and layers named
    ({"estbench/core/x.py": "def f():\n    from estbench.engine import y\n",
      "estbench/engine/y.py": ""}, "estbench.core.x:2 imports estbench.engine.y (layer 1 -> 3)"),
    # a relative import of a sibling package above, and a string import
    ({"estbench/analysis/a.py": "from ..report import r\n", "estbench/report/r.py": ""},
     "estbench.analysis.a:1 imports estbench.report.r (layer 4 -> 5)"),
    ({"tasks/t.py": "import importlib\nimportlib.import_module('estbench.cli.c')\n",
      "estbench/cli/c.py": ""}, "tasks.t:2 imports estbench.cli.c (layer 2 -> 6)"),
    ({"estimators/e.py": "from tasks import t\n", "tasks/t.py": ""},
     "estimators.e:1 imports tasks.t (estimators never import tasks)"),
])
def test_the_checker_finds_an_upward_import(tmp_path, source, expected):
    for rel, text in source.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        for parent in p.relative_to(tmp_path).parents:
            if str(parent) != ".":
                (tmp_path / parent / "__init__.py").touch()
    assert expected in upward_imports(import_graph(tmp_path))


def test_the_checker_finds_a_circle_hidden_in_a_function(tmp_path):
    (tmp_path / "estbench" / "engine").mkdir(parents=True)
    for pkg in ("estbench", "estbench/engine", "estimators", "tasks"):
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    (tmp_path / "estbench/engine/a.py").write_text("from estbench.engine import b\n")
    (tmp_path / "estbench/engine/b.py").write_text("def f():\n    from estbench.engine.a import x\n")
    assert circles(import_graph(tmp_path)) == [["estbench.engine.a", "estbench.engine.b"]]
