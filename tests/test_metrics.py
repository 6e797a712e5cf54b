"""The metric schema (estbench/core/metrics.py): every metric a run records is declared, as it is
recorded; the tables read it; it is no part of any cell's code."""
from __future__ import annotations

import pandas as pd
import pytest

import tasks
from estbench.analysis import quantities
from estbench.core import metrics
from estbench.engine import store
from estbench.core.budget import Budget
from estbench.cli.commands import main
from estbench.core.spec import parse
from estbench.engine.train import Cell, run_cell

#: options that make the data tasks' cells take a second or two (the toys are tiny as they are)
TINY_OPTIONS = {
    "binary_vae": "latents=10,val_size=20,eval_samples=1,iwae_images=10,iwae_samples=2",
    "categorical_vae": "batch_size=4,val_size=20,eval_samples=1,iwae_samples=2,measure_size=2",
    "text_vae": "emb=8,hidden=16,latent_dim=4,batch_size=8,max_len=12,val_size=16,"
                "test_sentences=16,is_samples=2,measure_size=2,ref_chunks=2,ref_chunk_samples=2",
    "sst_rationales": "emb=16,hidden=16,max_train=64,val_size=20,measure_size=4,ref_chunks=2,"
                      "ref_chunk_samples=2,final_samples=2",
}
#: three checkpoints over two steps: a checkpoint metric is recorded more than once, an end one once
TINY = ["--steps", "2", "--checkpoints", "3", "--measure-samples", "4", "--n-samples", "2",
        "--seeds", "0"]


def misdeclared(records: pd.DataFrame) -> list[str]:
    """What the records contradict in the schema: undeclared metrics, a metric recorded other than
    declared (at checkpoints vs once at the end; by a task other than its declared ones), a declared
    metric a cell does not record.  [] when the schema tells the truth about the records."""
    problems = [f"{m}: recorded but not declared in estbench/core/metrics.py nor by its task"
                for m in quantities.undeclared(records.metric)]
    for (task, estimator, seed), cell in records.groupby(["task", "estimator", "seed"]):
        base = parse(task).name
        counts = cell.groupby("metric").size()
        for name, n in counts.items():
            m = quantities.lookup(name)
            if not isinstance(m, metrics.Metric):
                continue
            if m.recorded == metrics.END and n != 1:
                problems.append(f"{name}: declared {metrics.END}, recorded {n} times by {task}")
            if m.recorded == metrics.CHECKPOINT and n < 2:
                problems.append(f"{name}: declared {metrics.CHECKPOINT}, recorded once by {task}")
            own = tasks.get_class(base).final_figures
            if m.source == metrics.TASK and m not in own:
                problems.append(f"{name}: a task's figure {task} does not declare")
        expected = [*(m for m in metrics.METRICS if not m.probe_only),
                    *tasks.get_class(base).final_figures]
        for m in expected:
            if not any(m.pattern.fullmatch(name) for name in counts.index):
                problems.append(f"{m.name}: declared, not recorded by {task}")
    return problems


@pytest.fixture(scope="module")
def every_task_run(tmp_path_factory):
    """A tiny sweep of every registered task (rloo fits every latent family) through the CLI; the
    records as the store returns them."""
    specs = [f"{t}[{TINY_OPTIONS[t]}]" if t in TINY_OPTIONS else t for t in tasks.available()]
    out = tmp_path_factory.mktemp("every_task") / "run"
    assert main(["run", "--tasks", ",".join(specs), "--estimators", "rloo", *TINY,
                 "--out", str(out), "--quiet", "--json"]) == 0
    records, cells = store.load(out)
    assert (cells.status == "ok").all(), cells[cells.status != "ok"][["task", "error"]]
    return records


@pytest.mark.slow
def test_every_metric_a_run_records_is_declared_as_it_is_recorded(every_task_run):
    assert set(every_task_run.task.map(lambda t: parse(t).name)) == set(tasks.available())
    assert misdeclared(every_task_run) == []


def test_an_undeclared_or_misdeclared_metric_fails_the_check(every_task_run, monkeypatch):
    toy = tasks.get_class("toy_binary")
    monkeypatch.setattr(toy, "final_metrics", lambda self: {"made_up_figure": 1.0})
    res = run_cell(Cell("toy_binary", "rloo", 0, "cpu",
                        Budget(steps=2, n_samples=2, checkpoints=3, measure_samples=4)))
    assert res.status == "ok", res.error
    problems = misdeclared(pd.DataFrame(res.records))
    assert problems == ["made_up_figure: recorded but not declared in estbench/core/metrics.py "
                        "nor by its task"]
    # an end metric recorded at a checkpoint too, and a task's metric recorded by another task
    final = every_task_run[every_task_run.metric == "final_elbo"].iloc[[0]]
    twice = pd.concat([every_task_run, final.assign(step=0)])
    assert any("final_elbo: declared end, recorded 2 times" in p for p in misdeclared(twice))
    iwae = every_task_run[every_task_run.metric.str.startswith("test_iwae")].iloc[[0]]
    elsewhere = pd.concat([every_task_run, iwae.assign(task="toy_binary")])
    assert any(p.startswith("test_iwae2: a task's figure toy_binary does not declare")
               for p in misdeclared(elsewhere))
    # a declared metric no cell records any more
    dropped = every_task_run[every_task_run.metric != "snr"]
    assert any(p.startswith("snr: declared, not recorded") for p in misdeclared(dropped))


def test_a_recorded_name_resolves_to_its_declaration():
    assert quantities.get("test_iwae100").name == "test_iwae{K}"
    assert metrics.get("step_ms").of == ("step_time",)
    assert quantities.lookup("test_iwae") is None and quantities.lookup("test_iwae10x") is None
    assert metrics.lookup("test_iwae100") is None  # a task's own: declared by the task
    with pytest.raises(KeyError, match="not declared"):
        metrics.get("no_such_metric")
    assert quantities.undeclared(["bias", "test_iwae5", "step_ms", "no_such_metric"]) == \
        ["no_such_metric", "step_ms"]  # a per-cell figure is never a recorded metric


def test_a_malformed_declaration_is_refused():
    with pytest.raises(ValueError, match="direction"):
        metrics.Metric(name="x", recorded=metrics.END, direction="up", scale=metrics.LINEAR, label="x")
    with pytest.raises(ValueError, match="recorded"):
        metrics.Metric(name="x", recorded="sometimes", direction=metrics.NONE,
                       scale=metrics.LINEAR, label="x")
    with pytest.raises(ValueError, match="source"):
        metrics.Metric(name="x", recorded=metrics.END, direction=metrics.NONE, scale=metrics.LINEAR,
                       label="x", source="someone")


def test_tasks_declare_their_own_figures_and_tolerances_and_the_core_names_no_task():
    """A task's final figures and its tolerances live with the task; core.metrics names none."""
    text = (metrics.__file__ and open(metrics.__file__).read())
    assert not [t for t in tasks.available() if t in text]
    for name in tasks.available():
        cls = tasks.get_class(name)
        for m in cls.final_figures:
            assert isinstance(m, metrics.Metric) and m.source == metrics.TASK and m.recorded == metrics.END
        for q, tol in cls.tolerances.items():
            metrics.check_tolerance(quantities.get(q), tol, f"({name})")
            assert quantities.get(q).tolerance is not None, (name, q)  # compared at all
    assert quantities.tolerance("final_elbo", "binary_vae") == 1.0  # the declared default
    assert quantities.tolerance("final_elbo", "toy_binary[dim=5]") == 0.01  # options keep the scale
    assert quantities.get("test_iwae100").name == "test_iwae{K}"


def test_the_tables_read_the_schema(every_task_run):
    """Each view's columns exist with the declared label and direction; every declared per-cell
    figure is computed; the leaderboard's criteria are declared figures with their direction."""
    pytest.importorskip("scipy")
    from estbench.analysis import compare, table
    from estbench.analysis import figures, leaderboard, tables

    assert table.SUMMARY_METRICS == list(metrics.SUMMARY)
    assert [(c.name, c.title, c.higher) for c in tables.COLUMNS] == \
        [(n, metrics.get(n).title, metrics.get(n).higher) for n in metrics.REPORT_TABLE]
    assert [c.title for c in tables.COLUMNS if c.name == "step_ms"] == ["step time (ms)"]
    assert list(compare.METRICS) == list(metrics.COMPARED)
    assert compare.METRICS["variance"] == ("variance", False, True)  # tested on log10
    assert compare.SPEED_METRICS == {"step_ms"}
    assert set(metrics.names(source=metrics.HARNESS)) == tables.HARNESS_METRICS
    pc = figures.per_cell(every_task_run)
    missing = [q.name for q in (*metrics.FIGURES, *map(metrics.get, metrics.SUMMARY))
               if q.name not in pc.columns]
    assert missing == []
    for c in leaderboard.CRITERIA:
        assert metrics.get(c.column).higher == c.higher, c


