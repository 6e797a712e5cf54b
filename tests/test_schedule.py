"""When a cell measures, evaluates and stops: step budgets, evaluation points, and the time budget
(``Budget.train_seconds``, ``estbench run --seconds``)."""
from __future__ import annotations

import pandas as pd
import pytest

from estbench.core.budget import Budget
from estbench.cli.commands import main
from estbench.engine.train import Cell, Schedule, run_cell


def _steps_with(res, metric):
    df = pd.DataFrame(res.records)
    return sorted(df[df.metric == metric].step.tolist())


def test_step_budget_measures_at_checkpoints_and_evaluates_at_eval_points():
    b = Budget(steps=20, n_samples=4, checkpoints=3, measure_samples=16, eval_points=6)
    assert b.checkpoint_steps() == [0, 10, 20]
    assert b.eval_steps() == [0, 4, 8, 10, 12, 16, 20]  # the evaluation points and the checkpoints
    res = run_cell(Cell("toy_binary", "rloo", 0, "cpu", b))
    assert res.status == "ok", res.error
    assert _steps_with(res, "variance") == [0, 10, 20]
    assert _steps_with(res, "elbo") == b.eval_steps()
    assert _steps_with(res, "wall_time") == b.eval_steps()
    # the training objective averages the steps since the previous evaluation: none before step 0
    assert _steps_with(res, "train_objective") == b.eval_steps()[1:]
    assert _steps_with(res, "train_steps") == [20]


def test_no_eval_points_leaves_the_checkpoints():
    b = Budget(steps=10, n_samples=4, checkpoints=2, measure_samples=16, eval_points=0)
    res = run_cell(Cell("toy_binary", "rloo", 0, "cpu", b))
    assert _steps_with(res, "elbo") == [0, 10]


def _walk(budget, step_time):
    """The points a schedule takes over a run whose every step lasts ``step_time`` seconds."""
    s, step, t, taken = Schedule(budget), 0, 0.0, []
    while True:
        done = s.done(step, t)
        m, e = s.measure_due(step, t, done), s.eval_due(step, t, done)
        if m or e:
            taken.append((step, "M" if m else "E"))
        if done:
            return taken, step, t
        step, t = step + 1, t + step_time


def test_time_budget_spaces_points_in_training_time_and_stops_when_spent():
    taken, last, t = _walk(Budget(steps=0, train_seconds=1.0, checkpoints=3, eval_points=5), 0.01)
    assert t >= 1.0 and last == 100
    # measurements at 0, 0.5 and 1 s; evaluations at 0.25 and 0.75 s as well
    assert taken == [(0, "M"), (25, "E"), (50, "M"), (75, "E"), (100, "M")]


def test_time_budget_a_slow_step_passing_several_points_takes_one():
    taken, last, _ = _walk(Budget(steps=0, train_seconds=1.0, checkpoints=5, eval_points=0), 0.6)
    # points at 0, .25, .5, .75, 1 s; the steps end at 0.6 and 1.2 s
    assert taken == [(0, "M"), (1, "M"), (2, "M")] and last == 2


def test_time_budget_steps_cap_the_training():
    taken, last, t = _walk(Budget(steps=7, train_seconds=100.0, checkpoints=3, eval_points=0), 0.01)
    assert last == 7 and t < 1
    assert taken[-1] == (7, "M") and len(taken) == 2  # the start, and the end (the 50 s point never came)


def test_time_budget_cell_trains_for_its_seconds():
    b = Budget(steps=0, n_samples=4, checkpoints=2, measure_samples=16, eval_points=4,
               train_seconds=0.3)
    res = run_cell(Cell("toy_binary", "rloo", 0, "cpu", b))
    assert res.status == "ok", res.error
    df = pd.DataFrame(res.records)
    last = int(df[df.metric == "train_steps"].value.iloc[0])
    wall = df[df.metric == "wall_time"].sort_values("step")
    assert last > 10 and wall.value.iloc[-1] >= 0.3 and wall.step.iloc[-1] == last
    assert (wall.value.diff().dropna() > 0).all()
    # the end-of-cell figures sit at the step where training stopped
    for metric in ("final_elbo", "step_time", "n_evals", "diverged"):
        assert _steps_with(res, metric) == [last], metric
    assert _steps_with(res, "variance") == [0, last]


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan"), True, "3"])
def test_time_budget_rejects_bad_seconds(bad):
    with pytest.raises(ValueError, match="train_seconds"):
        Budget(train_seconds=bad)


@pytest.mark.parametrize("value,message", [("0", "positive"), ("-2", "positive"), ("abc", "number"),
                                           ("inf", "finite")])
def test_cli_seconds_bad_input_is_one_line(value, message, tmp_path, capsys):
    assert main(["run", "--tasks", "toy_binary", "--estimators", "rloo", "--seconds", value,
                 "--out", str(tmp_path / "r"), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--seconds" in err and message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_cli_seconds_runs_a_time_budget(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "--tasks", "toy_binary", "--estimators", "rloo,reinforce", "--seeds", "0",
                 "--seconds", "0.2", "--checkpoints", "2", "--measure-samples", "16",
                 "--out", str(out), "--quiet"]) == 0
    import estbench

    records, cells = estbench.load(out)
    assert set(cells.status) == {"ok"} and set(cells.train_seconds) == {0.2}
    assert set(cells.steps) == {0}  # no step cap unless --steps is given
    steps = records[records.metric == "train_steps"].value
    assert len(steps) == 2 and (steps > 10).all()
