"""Edges a user meets outside the command's happy path (issue 19, "Faults and edges"):

* the Python API parses seed strings as ``--seeds`` does (``seeds="12"`` ran seeds 1 and 2;
  ``seeds="0,1"`` raised a ValueError about ``','``), and bad seeds raise one clear OptionError;
* an unreadable ``meta.json`` is said, on stderr and in the report, instead of the report silently
  losing the run's commit, machine and command;
* ``--checkpoints`` / ``--eval-points`` beyond what the steps allow are said in one note (21
  checkpoints over 5 steps silently became 6), and the budget flags' help gives no default number
  (it said "default 3" while the toys use 11 and binary_vae 5): the defaults are each task's named
  budget, which ``estbench list`` shows.
"""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

import estbench
import tasks
from estbench.engine import store
from estbench.core.budget import Budget
from estbench.cli.commands import build_parser, main
from estbench.core.errors import OptionError

TINY = dict(steps=4, checkpoints=2, measure_samples=8)
TINY_ARGS = ["--steps", "4", "--checkpoints", "2", "--measure-samples", "8", "--seeds", "0",
             "--quiet"]


# ---- the Python API's seeds ----------------------------------------------------------------------

@pytest.mark.parametrize("seeds, expected", [
    ("12", [12]), ("0,1", [0, 1]), ("3-4", [3, 4]), (7, [7]), ([2, 0], [0, 2]),
])
@pytest.mark.slow
def test_api_seeds_are_parsed_as_the_command_line_parses_them(tmp_path, seeds, expected):
    records, cells = estbench.run(tasks="toy_binary", estimators="rloo", seeds=seeds,
                                  out=tmp_path / "run", **TINY)
    assert sorted(cells.seed) == expected
    assert sorted(records.seed.unique()) == expected


@pytest.mark.parametrize("seeds, says", [
    ("0,x", "seeds must be comma-separated integers"),
    ("-1", "seeds must be integers from 0 to 4294967295"),
    ([2 ** 32], "seeds must be integers from 0 to 4294967295"),
    ("0,0", "seeds lists a value twice"),
    ("4-2", "the range 4-2 is empty"),
    ([0.5], "seeds must be an int, a list of ints or a string"),
    ([True], "seeds must be an int, a list of ints or a string"),
    (None, "seeds must be an int, a list of ints or a string"),
    ([], "seeds is empty"),
])
def test_api_bad_seeds_raise_one_clear_error_before_anything_runs(tmp_path, seeds, says):
    out = tmp_path / "run"
    with pytest.raises(OptionError, match="seeds") as info:
        estbench.run(tasks="toy_binary", estimators="rloo", seeds=seeds, out=out, **TINY)
    assert says in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)  # as every other bad argument of estbench.run
    assert not (out / "cells").exists()


# ---- an unreadable meta.json ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("meta") / "run"
    assert main(["run", "--tasks", "toy_binary", "--estimators", "rloo,reinforce", *TINY_ARGS,
                 "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("garbage, why", [
    (b'{"git_commit": "abc", ', "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b"\xff\xfe\x00junk", "invalid start byte"),
])
@pytest.mark.slow
def test_report_says_when_meta_json_is_unreadable(small_run, capsys, garbage, why):
    meta = small_run / "meta.json"
    good = meta.read_bytes()
    meta.write_bytes(garbage)
    try:
        assert main(["report", str(small_run)]) == 0
        err = capsys.readouterr().err
        said = [line for line in err.splitlines() if "meta.json" in line]
        assert len(said) == 1, err  # one line, naming the file and why
        assert str(meta) in said[0] and "is unreadable" in said[0] and why in said[0]
        assert "Traceback" not in err and ".py:" not in err  # no Python warning's source path
        report = (small_run / "report" / "report.md").read_text()
        assert "meta.json unreadable" in report and why in report
        assert "meta.json unreadable" in (small_run / "report" / "report.html").read_text()
    finally:
        meta.write_bytes(good)
    # and a readable one is reported as before, without the note
    capsys.readouterr()
    assert main(["report", str(small_run)]) == 0
    assert "meta.json" not in capsys.readouterr().err
    report = (small_run / "report" / "report.md").read_text()
    assert "meta.json unreadable" not in report and json.loads(good)["command"] in report


def test_read_meta_names_the_file_and_the_reason(tmp_path):
    assert store.read_meta(tmp_path) == {}  # no meta.json: nothing to say
    (tmp_path / "meta.json").write_text("not json")
    with pytest.warns(UserWarning, match=r"meta\.json is unreadable: not valid JSON"):
        assert store.read_meta(tmp_path) == {}
    assert store.meta_status(tmp_path)[1].startswith("not valid JSON")


# ---- measurement points a step budget cannot hold; the budget flags' help ----------------------------

def _checkpoint_steps(run_dir) -> list:
    records = pq.read_table(run_dir / "results.parquet").to_pandas()
    return sorted(records[records.metric == "variance"].step.unique())


@pytest.mark.slow
def test_more_checkpoints_than_steps_allow_is_said_in_one_note(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--tasks", "toy_binary", "--estimators", "rloo", "--steps", "5",
            "--measure-samples", "8", "--seeds", "0", "--quiet", "--out", str(out)]
    assert main([*args, "--checkpoints", "21", "--eval-points", "40"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: --checkpoints 21 is more than 5 steps allow: 6 checkpoints (every step and the start)",
        "note: --eval-points 40 is more than 5 steps allow: 6 evaluation points (every step and "
        "the start)"]
    assert _checkpoint_steps(out) == [0, 1, 2, 3, 4, 5]  # what the note says happened
    # as many as the steps allow: no note
    assert main([*args, "--checkpoints", "6", "--eval-points", "6"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_no_steps_leave_one_checkpoint_and_say_so(tmp_path, capsys):
    assert main(["run", "--tasks", "toy_binary", "--estimators", "rloo", "--steps", "0",
                 "--checkpoints", "3", "--measure-samples", "8", "--seeds", "0", "--quiet",
                 "--out", str(tmp_path / "run")]) == 0
    assert ("note: --checkpoints 3 is more than 0 steps allow: 1 checkpoint (the start only)"
            in capsys.readouterr().err)


BUDGET_FLAGS = ["--steps", "--n-samples", "--checkpoints", "--measure-samples", "--eval-points"]


@pytest.mark.parametrize("command", ["run", "rank"])
def test_budget_flags_help_names_no_default_number(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    helps = {opt: a.help for a in sub._actions for opt in a.option_strings if opt in BUDGET_FLAGS}
    assert set(helps) == set(BUDGET_FLAGS)
    for flag, text in helps.items():
        # the only number allowed is the "steps + 1" limit of evenly spaced points
        assert not any(ch.isdigit() for ch in text.replace("steps + 1", "")), (flag, text)
        assert "named budget" in text and "estbench list" in text, (flag, text)


def test_list_shows_each_tasks_named_budgets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("toy_binary", "binary_vae", "text_vae"):
        quick = {**Budget().as_dict(), **tasks.get_class(name).budgets["quick"]}
        lines = out.splitlines()
        start = next(i for i, x in enumerate(lines) if x.startswith(f"  {name} "))
        block = lines[start + 1:]
        block = block[:next(i for i, x in enumerate(block) if not x.startswith("      "))]
        line = next(x for x in block if "budget quick:" in x)
        for key in ("steps", "n_samples", "checkpoints", "measure_samples"):
            assert f"{key}={quick[key]}," in line, (name, line)
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tasks"]["toy_binary"]["budgets"]["quick"]["checkpoints"] == 11
    assert data["tasks"]["binary_vae"]["budgets"]["quick"]["checkpoints"] == 3
