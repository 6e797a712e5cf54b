"""A cell's key covers what computes it and nothing else (estbench.engine.cell).

The code version hashes the normalised modules of the training loop, the cell's task and estimator
classes and everything of ours they import: rewording, reformatting or re-documenting keeps every
stored cell valid; changing what computes a cell, in its own modules or in one they import, makes
its key new; a module the cell does not import never touches it.
"""
from __future__ import annotations

import pytest

from estbench.core.budget import Budget
from estbench.engine import cell as cell_code
from estbench.engine.cell import ROOT, Cell

TINY = Budget(steps=4, n_samples=4, checkpoints=2, measure_samples=8)


@pytest.fixture
def fresh_versions():
    cell_code.code_version.cache_clear()
    yield
    cell_code.code_version.cache_clear()


def _rel(paths) -> set:
    return {str(p.relative_to(ROOT)) for p in paths}


def test_a_cells_code_follows_its_classes_and_their_imports():
    files = _rel(cell_code.code_files("binary_vae", "rloo"))
    # the estimator's inheritance chain and what its module imports (baselines), the task's module
    # and its data loader (an absolute or relative import alike), and the training loop's modules
    assert {"estimators/score_function.py", "estimators/base.py", "estimators/families.py",
            "estimators/baselines.py", "tasks/binary_vae.py", "tasks/base.py", "tasks/data/mnist.py",
            "estbench/engine/train.py", "estbench/engine/measure.py", "estbench/core/budget.py",
            "estbench/core/plugins.py", "estbench/core/errors.py"} <= files
    assert "estimators/antithetic.py" not in files  # another estimator's module: not its code
    assert "tasks/text_vae.py" not in files
    # what describes or identifies results is no part of it (relabelling a metric recomputes nothing)
    assert not {"estbench/core/metrics.py", "estbench/engine/cell.py",
                "estbench/engine/store.py"} & files
    assert "estbench/core/metrics.py" not in _rel(cell_code.code_files())


def _swap(monkeypatch, tmp_path, estimator: str, module: str, edit) -> None:
    """Make ``estimator``'s class files use an edited copy of ``module`` (a path under ROOT)."""
    original = ROOT / module
    copy = tmp_path / original.name
    copy.write_text(edit(original.read_text()))
    real = cell_code._class_files
    monkeypatch.setattr(cell_code, "_class_files", lambda kind, text: (
        [copy if p.resolve() == original.resolve() else p for p in real(kind, text)]
        if text == estimator else real(kind, text)))


def _keys() -> tuple[str, str]:
    return (Cell("toy_binary", "relax", 0, "cpu", TINY).key(),
            Cell("toy_binary", "rloo", 0, "cpu", TINY).key())


REWORDED = [
    ("a comment", lambda s: s + "\n# a comment\n"),
    ("a docstring", lambda s: s.replace('"""', '"""Reworded. ', 1)),
    ("formatting", lambda s: s.replace("\n\n\n", "\n\n\n\n")),
    ("a bare string statement", lambda s: s + '\n"""A note."""\n'),
    ("a signature annotation", lambda s: s.replace("def _estimate(self, dist, f, n_samples, context, family)",
                                                   "def _estimate(self, dist, f, n_samples: int, context, family) -> object", 1)),
]


@pytest.mark.parametrize("what, edit", REWORDED, ids=[w for w, _ in REWORDED])
def test_rewording_a_module_keeps_its_cells_keys(tmp_path, monkeypatch, fresh_versions, what, edit):
    before = _keys()
    _swap(monkeypatch, tmp_path, "relax", "estimators/control_variates.py", edit)
    cell_code.code_version.cache_clear()
    assert edit((ROOT / "estimators/control_variates.py").read_text()) != \
        (ROOT / "estimators/control_variates.py").read_text()  # the edit did something
    assert _keys() == before


def test_changing_what_computes_a_cell_changes_its_key_only(tmp_path, monkeypatch, fresh_versions):
    before_relax, before_rloo = _keys()
    _swap(monkeypatch, tmp_path, "relax", "estimators/control_variates.py",
          lambda s: s + "\nEXTRA_CONSTANT = 2\n")
    cell_code.code_version.cache_clear()
    after_relax, after_rloo = _keys()
    assert after_relax != before_relax
    assert after_rloo == before_rloo  # fixing one estimator recomputes that estimator's cells only


def test_a_change_in_an_imported_module_reaches_the_key(tmp_path, monkeypatch, fresh_versions):
    """Imports are followed: ``rloo``'s module imports its baselines from another module, which
    computes its cells too."""
    before = cell_code.code_version("toy_binary", "rloo")
    real = cell_code.normalised
    baselines = ROOT / "estimators" / "baselines.py"

    def edited(path, mtime_ns):
        text, imports = real(path, mtime_ns)
        return (text + "changed" if path.resolve() == baselines.resolve() else text), imports

    monkeypatch.setattr(cell_code, "normalised", edited)
    cell_code.code_version.cache_clear()
    assert cell_code.code_version("toy_binary", "rloo") != before


@pytest.mark.slow
def test_the_code_version_does_not_depend_on_where_the_checkout_lives(tmp_path, fresh_versions):
    """No path goes into the hash: the same code in another clone files cells under the same keys."""
    import subprocess
    import sys

    code = ("from estbench.engine.cell import code_version; "
            "print(code_version('toy_binary', 'rloo'))")
    here = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert here == cell_code.code_version("toy_binary", "rloo")


def test_function_local_and_relative_imports_are_followed(tmp_path):
    module = tmp_path / "plugin.py"
    module.write_text("import torch\n\ndef f():\n    from estimators.antithetic import logit_surrogate\n"
                      "    import tasks.toys\n")
    _, imports = cell_code.normalised(module, module.stat().st_mtime_ns)
    assert {"estimators.antithetic", "tasks.toys"} <= set(imports) and "torch" not in imports
    inside = ROOT / "estimators" / "arms.py"  # 'from .antithetic import logit_surrogate'
    _, imports = cell_code.normalised(inside, inside.stat().st_mtime_ns)
    assert "estimators.antithetic" in imports
