"""Verdicts are drawn from what they can support: only finished cells are ranked or tabulated,
names with a ``$`` plot as plain text, and step times are compared only when timed alike."""
from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

pytest.importorskip("scipy")
pytest.importorskip("seaborn")

from estbench.engine import executors, store  # noqa: E402
from estbench.analysis import table
from estbench.core.budget import Budget  # noqa: E402
from estbench.cli.commands import main  # noqa: E402
from estbench.analysis.compare import compare, render  # noqa: E402
from estbench.report import build_report  # noqa: E402
from estbench.engine.train import Cell, CellResult, run_cell  # noqa: E402

TINY = Budget(steps=4, n_samples=4, checkpoints=2, measure_samples=8)
TINY_ARGS = ["--steps", "4", "--n-samples", "4", "--checkpoints", "2", "--measure-samples", "8"]
END_METRICS = {"final_elbo", "step_time", "n_evals"}


def _cell(est: str, seed: int = 0, task: str = "toy_binary") -> Cell:
    return Cell(task, est, seed, "cpu", TINY)


def _stopped(res: CellResult, status: str, error: str) -> CellResult:
    """``res`` as a cell that stopped early: its checkpoint records kept (with a variance small
    enough to rank first, were they counted), its end-of-cell figures gone."""
    recs = [dict(r, value=r["value"] * 1e-6 if r["metric"] == "variance" else r["value"])
            for r in res.records if r["metric"] not in END_METRICS]
    recs = [dict(r, value=1.0) if r["metric"] == "diverged" else r for r in recs]
    return dataclasses.replace(res, status=status, records=recs, error=error)


def _mixed_run(run):
    """rloo finished; reinforce diverged and gumbel_softmax failed, both after checkpoints."""
    for seed in (0, 1):
        for est, status in (("rloo", "ok"), ("reinforce", "diverged"),
                            ("gumbel_softmax", "failed")):
            cell = _cell(est, seed)
            res = run_cell(cell)
            assert res.status == "ok"
            if status != "ok":
                res = _stopped(res, status, f"{status}: non-finite at step 3")
            store.write_cell(run, cell.key(), res)
    return run


# ---- 1. failed and diverged cells are listed apart, never ranked --------------------------------
@pytest.mark.slow
def test_finished_keeps_only_ok_cells(tmp_path):
    records, cells = store.load(_mixed_run(tmp_path / "run"))
    assert {"reinforce", "gumbel_softmax"} <= set(records.estimator)  # their partial records
    fin = store.finished(records, cells)
    assert set(fin.estimator) == {"rloo"} and list(fin.columns) == list(records.columns)
    assert len(fin) == len(records[records.estimator == "rloo"])
    summ = table.summary(fin)
    assert set(summ.estimator) == {"rloo"}
    text = table.render(summ, cells)
    assert "diverged cells" in text and "reinforce: diverged: non-finite" in text
    assert "failed cells:" in text and "gumbel_softmax: failed" in text


@pytest.mark.slow
def test_report_ranks_and_tabulates_finished_cells_only(tmp_path):
    run = _mixed_run(tmp_path / "run")
    md = build_report(run).read_text()
    board = pd.read_csv(run / "report" / "leaderboard.csv")
    for crit, b in board.groupby("criterion"):
        assert set(b.estimator) == {"rloo"}, crit
    t = pd.read_csv(run / "report" / "tables" / "toy_binary.csv")
    assert set(t.estimator) == {"rloo"}
    for fig in ("curves_toy_binary.svg", "step_time.svg", "rank_heatmap.svg"):
        svg = (run / "report" / "figures" / fig).read_text()
        assert "reinforce" not in svg and "gumbel" not in svg, fig
    problems = md.split("## Failed, diverged and infeasible cells", 1)[1]
    assert "| `reinforce` | toy_binary | diverged | 0,1 |" in problems
    assert "| `gumbel_softmax` | toy_binary | failed | 0,1 |" in problems


@pytest.mark.slow
def test_cli_summary_leaves_out_diverged_cells(tmp_path, capsys, monkeypatch):
    run = _mixed_run(tmp_path / "run")  # every cell of the selection is cached
    argv = ["run", "--tasks", "toy_binary", "--estimators", "rloo,reinforce", "--seeds", "0,1",
            *TINY_ARGS, "--out", str(run), "--quiet"]
    assert main([*argv, "--json"]) == 0
    summ = json.loads(capsys.readouterr().out)
    assert [r["estimator"] for r in summ] == ["rloo"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "diverged cells" in out and "reinforce: diverged" in out
    assert not any(line.startswith("reinforce ") for line in out.splitlines())


def test_compare_ignores_partial_records_of_stopped_cells(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for seed in (0, 1):
        for est in ("rloo", "reinforce"):
            cell = _cell(est, seed)
            res = run_cell(cell)
            store.write_cell(a, cell.key(), res)
            if est == "reinforce":
                res = _stopped(res, "diverged", "non-finite at step 3")
            store.write_cell(b, cell.key(), res)
    df, quality, _ = compare(a, b)
    rows = df[df.estimator == "reinforce"].set_index("metric")
    assert quality and rows.loc["status", "regressed"]
    # the diverged cells' checkpoint variance is not measured against A's finished cells
    assert rows.loc["variance", "seeds_b"] == 0 and not rows.loc["variance", "regressed"]
    assert "no values in B" in rows.loc["variance", "note"]


# ---- 2. a '$' in a name is plain text in the figures --------------------------------------------
def _hand_cell(run, task, est, seed, elbo, var, step_time=0.002, status="ok", env=None):
    cell = Cell(task, est, seed, "cpu", TINY)
    recs = []

    def rec(step, metric, value):
        recs.append({"task": task, "estimator": est, "seed": seed, "device": "cpu",
                     "n_samples": TINY.n_samples, "steps": TINY.steps, "step": step,
                     "metric": metric, "value": float(value)})
    for step in (0, TINY.steps):
        rec(step, "bias", 0.1 * var)
        rec(step, "variance", var)
        rec(step, "elbo", elbo - 1.0 + step / TINY.steps)
        rec(step, "wall_time", step * step_time)
    rec(TINY.steps, "final_elbo", elbo)
    rec(TINY.steps, "n_evals", 4)
    rec(TINY.steps, "step_time", step_time)
    rec(TINY.steps, "diverged", 0.0)
    store.write_cell(run, cell.key(f"seed{seed}"), CellResult(cell, status, recs), env=env)


@pytest.mark.slow
def test_report_with_dollar_signs_in_names(tmp_path):
    run = tmp_path / "run"
    task, est = "toy_binary[data_dir=/tmp/a$_$b]", "rloo[tag=$^$]"
    for seed in (0, 1):
        _hand_cell(run, task, est, seed, -10.0 + 0.1 * seed, 1.0 + 0.1 * seed)
        _hand_cell(run, task, "reinforce", seed, -11.0 + 0.1 * seed, 1e-12)  # variance ~0: noted
    md = build_report(run).read_text()
    assert "rloo[tag=$^$]" in md
    figures = run / "report" / "figures"
    # the names appear verbatim as text (svg.fonttype none), not as mathtext glyphs
    assert est in (figures / "step_time.svg").read_text()
    assert task in (figures / "step_time.svg").read_text()
    assert est in (figures / "rank_heatmap.svg").read_text()
    curves = [p for p in figures.glob("curves_*.svg")]
    assert len(curves) == 1 and est in curves[0].read_text()


# ---- 3. step times are compared only when timed alike; quality and speed exit apart -------------
NOISE = [0.01, -0.008, 0.003]


def _timed_run(run, monkeypatch, elbo=-10.0, step_time=0.002, jobs="1"):
    for seed, n in enumerate(NOISE):
        _hand_cell(run, "toy", "e", seed, elbo * (1 + n), 1.0 + n, step_time=step_time * (1 + n),
                   env={"jobs": int(jobs)})
    return run


def test_a_worker_records_the_settings_it_was_handed(tmp_path):
    """Threads and jobs reach the worker as arguments (executors.WorkerSettings), not through the
    environment, and the cell's record keeps them: its time was measured under them."""
    cell = _cell("rloo").with_code()
    settings = executors.make_executor(3, threads=2).settings
    assert (settings.jobs, settings.threads) == (3, 2)
    executors.run_and_store(cell, str(tmp_path), settings=settings)
    _, cells = store.load(tmp_path)
    env = cells.env.iat[0]
    from estbench.core import process

    assert env == {"cpu": store._cpu_model(), "cuda_device": None, "threads": 2, "jobs": 3,
                   "huge_pages": process.huge_pages()}


@pytest.mark.slow
def test_step_time_not_comparable_across_environments(tmp_path, monkeypatch, capsys):
    a = _timed_run(tmp_path / "a", monkeypatch, jobs="1")
    b = _timed_run(tmp_path / "b", monkeypatch, step_time=0.010, jobs="8")  # 5x: a busier machine
    df, quality, speed = compare(a, b)
    row = df.set_index("metric").loc["step_ms"]
    assert not (quality or speed) and not row.regressed and not row.outside_noise
    assert row.note == "not comparable: jobs 1 in A vs 8 in B"
    assert "not comparable: jobs 1 in A vs 8 in B" in render(df)
    assert main(["compare", str(a), str(b)]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("pages_a, note", [
    (False, "not comparable: huge pages False in A vs True in B"),
    (None, "not comparable: huge pages not recorded in A vs True in B"),  # a set from before
])
def test_step_time_not_comparable_across_huge_page_settings(tmp_path, monkeypatch, pages_a, note):
    """A run with torch's huge pages off (or from before the switch was recorded) is not timed
    like one with them on (estbench.core.process): its step times get no verdict."""
    a, b = tmp_path / "a", tmp_path / "b"
    for seed, n in enumerate(NOISE):
        env_a = {"jobs": 1} if pages_a is None else {"jobs": 1, "huge_pages": pages_a}
        _hand_cell(a, "toy", "e", seed, -10 * (1 + n), 1 + n, step_time=0.002 * (1 + n), env=env_a)
        _hand_cell(b, "toy", "e", seed, -10 * (1 + n), 1 + n, step_time=0.002 * (1 + n),
                   env={"jobs": 1, "huge_pages": True})
    df, quality, speed = compare(a, b)
    row = df.set_index("metric").loc["step_ms"]
    assert not (quality or speed) and row.mark == "not comparable"
    assert row.note == note


def test_step_time_of_runs_without_environment_not_comparable(tmp_path, monkeypatch):
    a = _timed_run(tmp_path / "a", monkeypatch)
    b = _timed_run(tmp_path / "b", monkeypatch, step_time=0.010)
    for path in (a / "cells").glob("*.parquet"):  # an older run: no env in its status rows
        t = pq.read_table(path)
        row = json.loads(t.schema.metadata[b"estbench.cell"])
        del row["env"]
        pq.write_table(t.replace_schema_metadata({b"estbench.cell": json.dumps(row).encode()}),
                       path)
    df, quality, speed = compare(a, b)
    assert not speed and not quality
    assert df.set_index("metric").loc["step_ms", "note"] == \
        "not comparable: timing environment not recorded"


@pytest.mark.parametrize("elbo_b, step_b, code, q, s", [
    (-10.0, 0.010, 4, False, True),   # slower in the same environment: speed only
    (-13.0, 0.002, 1, True, False),   # worse ELBO: quality only
    (-13.0, 0.010, 5, True, True),    # both: 1 | 4
    (-10.0, 0.002, 0, False, False),
])
@pytest.mark.slow
def test_compare_exit_codes_split_quality_and_speed(tmp_path, monkeypatch, capsys, elbo_b, step_b,
                                                    code, q, s):
    a = _timed_run(tmp_path / "a", monkeypatch)
    b = _timed_run(tmp_path / "b", monkeypatch, elbo=elbo_b, step_time=step_b)
    _, quality, speed = compare(a, b)
    assert (quality, speed) == (q, s)
    assert main(["compare", str(a), str(b)]) == code
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--json"]) == code
    payload = json.loads(capsys.readouterr().out)
    assert (payload["regressed_quality"], payload["regressed_speed"]) == (q, s)
    assert payload["regressed"] == (q or s)
