"""Every numeric option of every task and estimator declares the values it takes (issue 19).

``toy_categorical[dim=0]`` and ``toy_gaussian[dim=-2]`` were accepted and the cell then failed
inside torch; ``toy_gaussian[w=1e300]`` overflowed in the cell.  Each is now refused when the name
is parsed: one line, exit 2, nothing run.  The bounds chosen keep f finite in float32; values at
the bounds run to the end.  A task's ``data_dir`` naming no folder is refused the same way.
"""
from __future__ import annotations

import pytest

import estimators
import tasks
from estbench.engine import store
from estbench.cli.commands import main

TINY = ["--steps", "4", "--checkpoints", "2", "--measure-samples", "8", "--seeds", "0", "--quiet"]


def _unconstrained(registry) -> list[str]:
    out = []
    for name in registry.available():
        for key, opt in registry.get_class(name).options.items():
            numeric = isinstance(opt.default, (int, float)) and not isinstance(opt.default, bool)
            if numeric and opt.constraint is None and opt.choices is None:
                out.append(f"{name}.{key}")
    return out


def test_every_numeric_option_declares_a_constraint_or_choices():
    missing = _unconstrained(tasks) + _unconstrained(estimators)
    assert missing == [], ("numeric options without a constraint (torch.distributions.constraints) "
                           f"or choices: {missing}")


def _refused(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("estbench: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("task, says", [
    ("toy_categorical[dim=0]", "dim=0 must be an integer >= 1"),
    ("toy_gaussian[dim=-2]", "dim=-2 must be an integer >= 1"),
    ("toy_gaussian[w=1e300]", "must be in [-1000, 1000]"),
    ("toy_gaussian[c=-1e300]", "must be in [-1e+06, 1e+06]"),
    ("toy_binary[t=1e300]", "must be in [-1000, 1000]"),
])
def test_out_of_range_task_option_is_one_line_and_exit_2(tmp_path, capsys, task, says):
    out = tmp_path / "run"
    line = _refused(capsys, ["run", "--tasks", task, "--estimators", "reinforce", *TINY,
                             "--out", str(out)])
    assert says in line
    assert not (out / "cells").exists()  # nothing ran


@pytest.mark.parametrize("estimator, says", [
    ("double_cv[alpha=1e300]", "must be in [-100, 100]"),
    ("rebar[eta=1e30]", "must be in [-100, 100]"),
    ("relax[eta=-1e30]", "must be in [-100, 100]"),
    ("sparsemap[transition=1e300]", "must be in [-1000, 1000]"),
])
def test_out_of_range_estimator_option_is_one_line_and_exit_2(tmp_path, capsys, estimator, says):
    out = tmp_path / "run"
    line = _refused(capsys, ["run", "--tasks", "toy_binary", "--estimators", estimator, *TINY,
                             "--out", str(out)])
    assert says in line
    assert not (out / "cells").exists()


@pytest.mark.slow
def test_values_at_the_bounds_run_to_the_end(tmp_path, capsys):
    """The bounds are not too tight to be safe: f, the gradients and the measurements stay
    finite at every one of them (each cell finishes, none diverges)."""
    out = tmp_path / "run"
    code = main(["run", "--tasks", "toy_gaussian[dim=1,c=1e6,w=1e3],toy_gaussian[c=-1e6,w=-1e3],"
                 "toy_binary[t=-1000],toy_categorical[dim=1],liu_toy[theta=1000]",
                 "--estimators", "reinforce,rloo,double_cv[alpha=100],double_cv[alpha=-100],"
                 "rebar[eta=100],relax[eta=-100],sparsemap[transition=1000],"
                 "sparsemap[transition=-1000]", "--n-samples", "12", *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    _, cells = store.load(out)
    # toy_gaussian: reinforce, rloo; toy_categorical: those and rebar, relax; the Bernoulli toys: all
    assert len(cells) == 2 * 2 + 4 + 2 * 8
    assert set(cells.status) == {"ok"}, cells[cells.status != "ok"][["task", "estimator", "error"]]


@pytest.mark.parametrize("task", ["binary_vae", "categorical_vae", "sst_rationales", "text_vae"])
def test_a_data_dir_that_is_no_folder_is_refused_when_parsed(tmp_path, capsys, task):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    for value, why in [(tmp_path / "missing", "no such folder"), (a_file, "it is a file")]:
        out = tmp_path / "run"
        line = _refused(capsys, ["run", "--tasks", f"{task}[data_dir={value}]",
                                 "--estimators", "reinforce", *TINY, "--out", str(out)])
        assert f"option data_dir='{value}' must name an existing folder ({why}" in line
        assert not (out / "cells").exists()
