"""End-to-end tests of every CLI command on tiny budgets."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest

from estbench.core.budget import Budget
from estbench.cli.commands import main

TINY = ["--steps", "6", "--checkpoints", "2", "--measure-samples", "16", "--seeds", "0,1"]


def run_cli(*args, cwd=None):
    """The installed console script, as a user runs it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "estbench", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.mark.slow
def test_run_end_to_end_table_and_parquet_schema(tmp_path):
    out = tmp_path / "run"
    p = run_cli("run", "--tasks", "toy_binary[t=0.49],toy_gaussian",
                "--estimators", "gumbel_softmax[temperature=0.5],rloo,reparam", *TINY, "--out", str(out))
    assert p.returncode == 0, p.stderr
    # progress on stderr, the table on stdout
    assert "[1/" in p.stderr and "ETA" in p.stderr
    assert "== toy_binary[t=0.49] [cpu] ==" in p.stdout
    assert "== toy_gaussian [cpu] ==" in p.stdout
    for col in ["final ELBO", "bias", "variance", "step ms", "f-evals"]:
        assert col in p.stdout
    lines = p.stdout.splitlines()
    assert any(l.startswith("gumbel_softmax[temperature=0.5]") for l in lines)
    assert any(l.startswith("reparam") for l in lines)
    # the tidy long-format records
    df = pd.read_parquet(out / "results.parquet")
    assert list(df.columns) == ["task", "estimator", "seed", "device", "n_samples", "steps", "step",
                                "metric", "value"]
    assert str(df.value.dtype) == "float64" and str(df.step.dtype) == "int64"
    # 2 (toy_binary x {gs, rloo}) + 2 (toy_gaussian x {rloo, reparam}) pairs, 2 seeds
    cells = df[["task", "estimator", "seed"]].drop_duplicates()
    assert len(cells) == 8
    assert set(df.estimator) == {"gumbel_softmax[temperature=0.5]", "rloo", "reparam"}
    assert len(list((out / "cells").glob("*.parquet"))) == 8
    meta = json.loads((out / "meta.json").read_text())
    for k in ["torch", "git_commit", "python", "budgets", "platform"]:
        assert k in meta
    # the cell's status row rides along in the Parquet metadata
    md = pq.read_schema(next((out / "cells").glob("*.parquet"))).metadata
    assert json.loads(md[b"estbench.cell"])["status"] == "ok"


@pytest.mark.slow
def test_run_again_reuses_finished_cells(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--tasks", "toy_binary", "--estimators", "rloo", *TINY, "--out", str(out)]
    assert main(args) == 0
    first = pd.read_parquet(out / "results.parquet")
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "2 of 2 cells already stored" in err and " ... ok" not in err  # one line, not one a cell
    pd.testing.assert_frame_equal(first, pd.read_parquet(out / "results.parquet"))
    assert main(args + ["--force"]) == 0
    assert "already stored" not in capsys.readouterr().err


def test_run_json_and_quiet(tmp_path, capsys):
    assert main(["run", "--tasks", "toy_categorical", "--estimators", "exact,straight_through",
                 *TINY, "--out", str(tmp_path), "--quiet", "--json"]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""
    rows = json.loads(cap.out)
    assert {r["estimator"] for r in rows} == {"exact", "straight_through"}
    exact = next(r for r in rows if r["estimator"] == "exact")
    assert exact["variance"] == 0 and exact["n_evals"] == 64


@pytest.mark.parametrize("args,message", [
    (["--estimators", "rlo"], "unknown estimator 'rlo'; did you mean rloo"),
    (["--tasks", "toy_binry"], "unknown task 'toy_binry'; did you mean toy_binary"),
    (["--estimators", "gumbel_softmax[temp=1]"], "has no option temp"),
    (["--estimators", "gumbel_softmax[temperature=hot]"], "must be of type float"),
    (["--estimators", "rloo["], "unbalanced '['"),
    (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
    (["--steps", "-3"], "--steps must be >= 0"),
    (["--n-samples", "zero"], "--n-samples must be an integer"),
    (["--tasks", "toy_gaussian", "--estimators", "exact"], "nothing to run"),
])
def test_bad_values_get_one_clear_message(args, message, tmp_path, capsys):
    code = main(["run", *args, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("estbench: error: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_bad_device_choice_is_rejected_by_argparse():
    p = run_cli("run", "--device", "tpu")
    assert p.returncode == 2 and "invalid choice: 'tpu'" in p.stderr and "Traceback" not in p.stderr


def test_cuda_request_without_cuda_is_clear(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert main(["run", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_failed_cells_are_reported_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    import estimators

    class Broken(estimators.get_class("reinforce")):
        """Raises inside estimate (test only)."""
        def _estimate(self, dist, f, n, context, family):
            raise RuntimeError("boom in a plug-in")

    Broken.name = "broken_test_only"
    monkeypatch.setitem(estimators.base.REGISTRY.classes, "broken_test_only", Broken)
    code = main(["run", "--tasks", "toy_binary", "--estimators", "broken_test_only,reinforce",
                 *TINY, "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    assert "failed cells:" in out and "broken_test_only: RuntimeError: boom in a plug-in" in out
    assert "\nreinforce " in out  # the other estimator still ran


@pytest.mark.slow
def test_infeasible_budget_is_reported_not_failed(tmp_path, capsys):
    code = main(["run", "--tasks", "toy_binary", "--estimators", "rloo,reinforce", "--n-samples", "1",
                 *TINY, "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    code = main(["run", "--tasks", "toy_binary[dim=30]", "--estimators", "exact,reinforce", *TINY,
                 "--out", str(tmp_path / "big"), "--quiet"])
    out_big = capsys.readouterr().out
    assert code == 0 and "exact: estimator 'exact': 1073741824 configurations" in out_big
    assert "not run (infeasible" in out
    assert "rloo: estimator 'rloo' cannot spend a budget of 1" in out


@pytest.mark.slow
def test_list_shows_everything_with_options():
    p = run_cli("list")
    assert p.returncode == 0, p.stderr
    for word in ["tasks:", "estimators:", "toy_binary", "t = 0.45", "gumbel_softmax",
                 "temperature = 1.0", "rloo", "unbiased", "biased"]:
        assert word in p.stdout
    p = run_cli("list", "--json")
    data = json.loads(p.stdout)
    assert data["estimators"]["gumbel_softmax"]["options"] == {"temperature": 1.0}
    assert data["tasks"]["toy_binary"]["family"] == "bernoulli"


@pytest.mark.slow
def test_default_run_covers_toys_and_all_compatible_estimators(tmp_path):
    """`estbench run` with no selection: every toy x every compatible estimator (tiny budget here)."""
    import estimators
    import tasks
    out = tmp_path / "d"
    p = run_cli("run", "--steps", "2", "--checkpoints", "1", "--measure-samples", "4", "--seeds", "0",
                "--out", str(out), "--quiet")
    assert p.returncode == 0, p.stdout + p.stderr
    df = pd.read_parquet(out / "results.parquet")
    toys = [n for n in tasks.available() if getattr(tasks.get_class(n), "in_default_run", False)]
    expected = {(t, e) for t in toys for e in estimators.available(tasks.get_class(t).family)}
    assert set(map(tuple, df[["task", "estimator"]].drop_duplicates().values)) == expected


def test_eta_weights_cells_by_task_cost():
    """The ETA uses each task's own mean cell time, skips cached cells and divides by workers."""
    from estbench.engine.progress import Eta, _fmt_duration

    class C:
        def __init__(self, task):
            self.task = task

    cells = [C("slow")] * 3 + [C("fast")] * 3
    eta = Eta(cells, workers=2)
    assert eta.done(C("fast"), None) is None          # cached: nothing measured yet
    assert eta.done(C("fast"), 1.0) == (1 * 1.0 + 3 * 1.0) / 2   # slow task borrows the only mean
    assert eta.done(C("slow"), 100.0) == (1 * 1.0 + 2 * 100.0) / 2
    assert _fmt_duration(3725) == "1h02m" and _fmt_duration(65) == "1m05s" and _fmt_duration(None) == "?"


def test_progress_on_a_terminal_is_a_bar_with_failures_above_it(tmp_path):
    """On a terminal: one line for the stored cells, a tqdm bar over the computed ones, failed
    cells printed above the bar; elsewhere one line per computed cell."""
    import io

    from estbench.engine.progress import Progress
    from estbench.engine.train import Cell, CellResult

    cells = [Cell("toy_binary", e, 0, "cpu", Budget(steps=1)) for e in ("a", "b", "c", "d")]
    for bar in (True, False):
        stream = io.StringIO()
        p = Progress(stream, quiet=False, cells=cells, where=tmp_path, bar=bar)
        p(1, 4, cells[0], None, True)
        p(2, 4, cells[1], None, True)
        p(3, 4, cells[2], CellResult(cells[2], "ok", seconds=0.5), False)
        p(4, 4, cells[3], CellResult(cells[3], "failed", error="boom", seconds=0.1), False)
        text = stream.getvalue()
        assert text.count("already stored") == 1 and "2 of 4 cells already stored" in text
        assert "toy_binary x d seed=0 cpu ... failed: boom" in text
        if bar:
            assert "2/2" in text and "[3/4]" not in text
        else:
            assert "[3/4] toy_binary x c seed=0 cpu ... ok (0.5s)" in text
    quiet = io.StringIO()
    p = Progress(quiet, quiet=True, cells=cells, bar=True)
    p(1, 4, cells[0], None, True)
    p(2, 4, cells[1], CellResult(cells[1], "ok"), False)
    assert quiet.getvalue() == ""


def test_a_running_cell_reports_its_step_and_phase_and_leaves_no_heartbeat(tmp_path):
    """The harness tells the reporter every phase of a cell (set-up, each measurement, training
    steps in order, the final evaluation); run_and_store keeps it in RUN/running/<key>.json while
    the cell runs and removes it afterwards."""
    from estbench.engine import executors, store
    from estbench.engine.train import Cell, run_cell

    cell = Cell("toy_binary", "rloo", 0, "cpu", Budget(steps=6, checkpoints=3, measure_samples=4))
    seen = []
    res = run_cell(cell, report=lambda step, steps, phase: seen.append((step, steps, phase)))
    assert res.status == "ok", res.error
    phases = [p for _, _, p in seen]
    assert phases[0] == "setting up" and phases[-1] == "final evaluation"
    assert [p for p in phases if p.startswith("measuring")] == [
        f"measuring (checkpoint {i} of 3)" for i in (1, 2, 3)]
    assert [s for s, _, p in seen if p == "training"] == [1, 2, 3, 4, 5, 6]
    assert {steps for _, steps, _ in seen} == {6}

    states = []
    original = store.Heartbeat.__call__

    def spy(self, step, steps, phase):
        original(self, step, steps, phase)
        states.extend(store.running(tmp_path))

    store.Heartbeat.__call__ = spy
    try:
        executors.run_and_store(cell.with_code(), str(tmp_path))
    finally:
        store.Heartbeat.__call__ = original
    assert states and states[0]["label"] == cell.label() and states[0]["key"] == cell.with_code().key()
    assert states[-1]["phase"] == "final evaluation" and states[-1]["step"] == 6
    assert store.running(tmp_path) == []  # removed when the cell ended
    assert store.has_cell(tmp_path, cell.with_code().key())


def test_heartbeat_writes_on_a_new_phase_and_at_most_every_few_seconds(tmp_path):
    from estbench.engine import store

    beat = store.Heartbeat(tmp_path, "k1", "a x b", every=3600)
    beat(1, 10, "training")
    beat(2, 10, "training")  # throttled: same phase within `every`
    assert [b["step"] for b in store.running(tmp_path)] == [1]
    beat(2, 10, "measuring (checkpoint 2 of 3)")  # a new phase is written at once
    (state,) = store.running(tmp_path)
    assert (state["step"], state["phase"]) == (2, "measuring (checkpoint 2 of 3)")
    assert store.running(tmp_path, keys={"other"}) == []
    beat.close()
    beat.close()  # twice is harmless
    assert store.running(tmp_path) == []
    store.Heartbeat(tmp_path, "k2", "x")(0, 1, "setting up")
    store.clear_running(tmp_path, ["k2"])
    assert not (tmp_path / store.RUNNING).exists()


def test_progress_shows_what_long_running_cells_are_doing(tmp_path, monkeypatch):
    """In a log: a line per cell running longer than LONG_CELL, every POLL_LOG seconds, from its
    heartbeat; heartbeats of cells started before the sweep (a dead earlier run) are not shown.
    On a terminal: the longest-running cell on the bar."""
    import io
    import time

    from estbench.engine import store
    from estbench.engine.progress import Progress
    from estbench.engine.train import Cell

    monkeypatch.setattr(Progress, "POLL_LOG", 0.05)
    monkeypatch.setattr(Progress, "POLL_BAR", 0.05)
    monkeypatch.setattr(Progress, "LONG_CELL", 0.0)
    cells = [Cell("text_vae", "rloo", 0, "cpu", Budget(steps=30))] * 2
    stale = store.Heartbeat(tmp_path, "old", "stale x cell")
    stale.started = time.time() - 3600
    stale(5, 9, "training")
    for bar in (False, True):
        stream = io.StringIO()
        p = Progress(stream, quiet=False, cells=cells, where=tmp_path, bar=bar)
        beat = store.Heartbeat(tmp_path, f"k{bar}", "text_vae x rloo seed=0 cpu")
        beat(12, 30, "training")
        deadline = time.time() + 10
        while "step 12 of 30, training" not in stream.getvalue() and time.time() < deadline:
            time.sleep(0.05)
        p.close()
        beat.close()
        text = stream.getvalue()
        assert "text_vae x rloo seed=0 cpu" in text and "step 12 of 30, training" in text, text
        assert "stale" not in text
        if not bar:
            assert text.startswith("  running text_vae x rloo seed=0 cpu ")
    quiet = io.StringIO()
    Progress(quiet, quiet=True, cells=cells, where=tmp_path).close()
    assert quiet.getvalue() == ""


def test_python_api_and_version(tmp_path, capsys):
    import estbench

    records, cells = estbench.run(tasks="toy_binary", estimators=["rloo", "disarm"], seeds=[0],
                                  out=tmp_path / "api", steps=3, checkpoints=2, measure_samples=8)
    assert set(cells.estimator) == {"rloo", "disarm"} and (cells.status == "ok").all()
    again, cells_again = estbench.load(tmp_path / "api", finished_only=True)
    assert len(again) == len(records)
    table = estbench.summary(again, cells_again)
    assert set(table.estimator) == {"rloo", "disarm"} and "final_elbo" in table
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"estbench {estbench.__version__}"


# ---- estbench run --config sweep.yml --------------------------------------------------------------
EXAMPLE_SWEEP = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "sweep.yml")


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_run_config_runs_the_sweep_in_the_file(tmp_path, capsys):
    out = tmp_path / "run"
    config = _write(tmp_path / "sweep.yml", f"""
tasks: [toy_binary, toy_gaussian]
estimators: rloo,reparam        # a list option as one string
seeds: [0, 1]
steps: 4
checkpoints: 2
measure-samples: 8              # '-' or '_'
n_samples: 4
out: {out}
quiet: true
json: true
""")
    assert main(["run", "--config", config]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""  # quiet: true
    rows = json.loads(cap.out)  # json: true
    assert {(r["task"], r["estimator"]) for r in rows} == \
        {("toy_binary", "rloo"), ("toy_gaussian", "rloo"), ("toy_gaussian", "reparam")}
    records = pd.read_parquet(out / "results.parquet")
    assert set(records.seed) == {0, 1} and set(records.steps) == {4} and set(records.n_samples) == {4}
    assert sorted(records[records.metric == "bias"].step.unique()) == [0, 4]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["path"] == config and meta["config"]["options"]["seeds"] == [0, 1]


@pytest.mark.slow
def test_flags_on_the_command_line_override_the_file(tmp_path):
    """The shipped example, through the console script, with the budget and seeds cut down on the
    command line: the flags win, the file's other keys (tasks, estimators) stay."""
    out = tmp_path / "run"
    p = run_cli("run", "--config", EXAMPLE_SWEEP, "--seeds", "1", "--steps", "2", "--checkpoints",
                "2", "--measure-samples", "4", "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    records = pd.read_parquet(out / "results.parquet")
    assert set(records.seed) == {1} and set(records.steps) == {2}
    assert set(records.n_samples) == {12}  # from the file
    assert set(records.task) == {"toy_binary", "toy_binary[t=0.499]", "toy_gaussian"}
    assert set(records.estimator) == {"rloo", "disarm", "gumbel_softmax[temperature=0.5]", "reparam"}
    assert not (tmp_path / "results").exists()  # the file's out was overridden


def test_every_long_option_of_run_is_a_key_of_the_file():
    """Keys come from the parser: a flag added to ``run`` is accepted in a file at once."""
    import argparse

    from estbench.cli import config as cli_config
    from estbench.cli.commands import build_parser

    parser = build_parser()
    run = cli_config._subcommand_parser(parser, "run")
    longs = {s[2:].replace("-", "_") for a in run._actions for s in a.option_strings
             if s.startswith("--")} - {"help", "config"}
    assert set(cli_config.config_keys(run)) == longs
    assert set(cli_config.LIST_OPTIONS) <= longs
    run.add_argument("--made-up-flag")
    assert cli_config.config_arguments({"made_up_flag": 3, "force": True, "seeds": [0, 2]}, run,
                                       "x.yml") == ["--made-up-flag=3", "--force", "--seeds=0,2"]
    assert isinstance(run, argparse.ArgumentParser)


@pytest.mark.parametrize("text,message", [
    ("estimator: rloo\n", "unknown key 'estimator' (did you mean estimators?)"),
    ("tasks: toy_binary\nconfig: other.yml\n", "unknown key 'config'"),
    ("seeds: {first: 0}\n", "seeds must be a string or a number, got a mapping"),
    ("steps: [10, 20]\n", "steps takes one value, got a list"),
    ("estimators: []\n", "estimators is an empty list"),
    ("estimators: [rloo, [disarm]]\n", "each item of estimators must be a string or a number"),
    ("steps:\n", "steps must be a string or a number, got an empty value (leave the key out"),
    ("force: yes please\n", "force is a switch: true or false"),
    ("device: yes\n", "device must be a string or a number, got true (YAML reads yes/no"),
    ("[tasks]: toy_binary\n", "not valid YAML"),
    ("device: tpu\n", "device must be one of cpu, cuda, all, got 'tpu'"),
    ("jobs: two\n", "jobs must be an integer, got 'two'"),
    ("jobs: 1.5\n", "jobs must be an integer, got 1.5"),
    ("steps: 10\nsteps: 20\n", "steps is given twice (lines 1 and 2)"),  # PyYAML keeps the last
    ("n_samples: 4\nn-samples: 8\n", "n_samples is given twice"),
    ("tasks: [toy_binary\n", "not valid YAML: expected ',' or ']'"),
    ("", "is empty"),
    ("- tasks: toy_binary\n", "must be a mapping of run options"),
    ("steps: abc\n", "--steps must be an integer, got 'abc'"),  # checked where the flag is
])
def test_a_bad_sweep_file_gets_one_clear_line(text, message, tmp_path, capsys):
    config = _write(tmp_path / "sweep.yml", text)
    code = main(["run", "--config", config, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("estbench: error: ") and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("where,message", [
    ("missing.yml", "cannot read sweep config"),
    (".", "cannot read sweep config"),  # a folder
])
def test_an_unreadable_sweep_file_gets_one_clear_line(where, message, tmp_path, capsys):
    code = main(["run", "--config", str(tmp_path / where), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("estbench: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_sweep_file_without_pyyaml_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    config = _write(tmp_path / "sweep.yml", "steps: 2\n")
    assert main(["run", "--config", config, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("estbench: error: --config needs PyYAML") and "pip install" in err, err
    assert len(err.strip().splitlines()) == 1
