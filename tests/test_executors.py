"""Parallel sweeps (issue 6): loky, submitit and dask give the records of the serial loop.

Every backend runs the same worker (run a cell, write it to the store); the parent filters out the
stored cells before submitting and reports progress as cells complete.  Timing metrics (step_time,
wall_time) legitimately differ between runs and are left out of the comparisons.
"""
from __future__ import annotations

import os
import threading
import time

import pandas as pd
import pytest

from estbench.engine import executors, store, sweep
from estbench.core.budget import Budget
from estbench.cli.commands import main
from estbench.core.spec import parse_list
from estbench.engine.train import Cell, CellResult

TINY = Budget(steps=6, n_samples=12, checkpoints=2, measure_samples=16)  # the CLI flags below
TIMING = ["step_time", "wall_time"]
KEYS = ["task", "estimator", "seed", "device", "n_samples", "steps", "step", "metric"]


def plan4():
    return sweep.expand(parse_list("toy_binary"), parse_list("rloo,reinforce"), [0, 1], ["cpu"], TINY)


def records(run_dir) -> pd.DataFrame:
    df, _ = store.load(run_dir)
    df = df[~df.metric.isin(TIMING)]
    return df.sort_values(KEYS).reset_index(drop=True)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    sweep.run(plan4(), out)
    df = records(out)
    assert len(df) and set(df.estimator) == {"rloo", "reinforce"} and set(df.seed) == {0, 1}
    return df


def same(a: pd.DataFrame, b: pd.DataFrame):
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- configuration

def test_make_executor_defaults():
    assert executors.make_executor().serial
    assert executors.make_executor(1).serial
    ex = executors.make_executor(2)
    assert isinstance(ex, executors.LokyExecutor) and ex.n_jobs == 2 and ex.cells_per_gpu == 1
    ex = executors.make_executor(3, {"backend": "dask", "dask_n_workers": 2, "n_jobs": 5})
    assert isinstance(ex, executors.DaskExecutor) and ex.n_jobs == 3  # -j wins over the file
    assert ex.client_kwargs(gpu_cells=True)["n_workers"] == 2  # dask_* keys go to Client as they are
    assert ex.client_kwargs(gpu_cells=True)["resources"] == {"GPU": 1}
    assert "address" not in ex.client_kwargs(False)
    remote = executors.make_executor(config={"backend": "dask", "dask_address": "tcp://h:8786"})
    assert remote.client_kwargs(True) == {"address": "tcp://h:8786"}
    with pytest.raises(executors.ConfigError, match="-j/--jobs"):
        executors.make_executor(0)


@pytest.mark.parametrize("text, match", [
    ("backend: spark\n", "backend must be one of loky, submitit, dask"),
    ("backend: dask\nn_workers: 2\n", "unknown key.*n_workers.*dask_"),
    ("backend: submitit\nslurm_partion: gpu\n", "unknown key.*slurm_partion"),
    ("backend: submitit\ncluster: kubernetes\n", "cluster must be one of"),
    ("backend: loky\nn_jobs: two\n", "n_jobs must be a positive integer"),
    ("backend: [loky\n", "not valid YAML"),
    ("- loky\n", "expected a mapping"),
])
def test_load_config_errors_name_the_file(tmp_path, text, match):
    path = tmp_path / "par.yml"
    path.write_text(text)
    with pytest.raises(executors.ConfigError, match=match) as info:
        executors.load_config(path)
    assert str(path) in str(info.value)


def test_load_config_missing_file_and_examples(tmp_path):
    with pytest.raises(executors.ConfigError, match=str(tmp_path / "nope.yml")):
        executors.load_config(tmp_path / "nope.yml")
    from pathlib import Path

    examples = sorted((Path(__file__).parent.parent / "examples" / "parallel").glob("*.yml"))
    assert len(examples) >= 3
    for path in examples:  # every shipped example is a valid config
        executors.make_executor(config=executors.load_config(path))
    cfg = executors.load_config(Path(__file__).parent.parent / "examples/parallel/slurm.yml")
    assert cfg["backend"] == "submitit" and cfg["slurm_partition"]


def test_cli_rejects_bad_parallel_config(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("backend: ray\n")
    code = main(["run", "--tasks", "toy_binary", "--estimators", "rloo", "--out", str(tmp_path / "r"),
                 "--parallel-config", str(bad)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the sweep side

class Recording(executors.Executor):
    """Runs cells in this process, remembering what it was given; loses the cells in ``lose``."""

    name = "recording"

    def __init__(self, lose=()):
        super().__init__()
        self.given, self.lose = [], set(lose)

    def run_cells(self, cells, run_dir, force=False):
        self.given.extend(cells)
        for c in cells:
            if c in self.lose:
                yield c, executors._lost(c, "killed")
            else:
                yield executors.run_and_store(c, str(run_dir), force)


def test_stored_cells_are_filtered_before_submission_and_lost_cells_raise(tmp_path):
    plan = plan4()
    plan.cells = [c.with_code() for c in plan.cells]  # what sweep.run hands to executors
    version = None  # each cell's own code version
    first = plan.cells[1]
    store.write_cell(tmp_path, first.key(version), executors.run_cell(first))
    seen = []
    ex = Recording(lose=[plan.cells[3]])
    with pytest.raises(executors.WorkerError, match="1 cell.*rerun"):
        sweep.run(plan, tmp_path, executor=ex, progress=lambda i, n, c, r, cached: seen.append((i, c, cached)))
    assert first not in ex.given and len(ex.given) == 3  # the stored cell was never submitted
    assert seen[0] == (1, first, True) and [i for i, _, _ in seen] == [1, 2, 3, 4]
    keys = {p.stem for p in (tmp_path / "cells").glob("*.parquet")}
    assert keys == {c.key(version) for c in plan.cells[:3]}  # the lost cell is not stored
    ex = Recording()
    res = sweep.run(plan, tmp_path, executor=ex)  # the rerun computes exactly the missing cell
    assert ex.given == [plan.cells[3]] and [r.cell for r in res] == [plan.cells[3]]


def test_cells_pickle_as_plain_data():
    import pickle

    c = plan4().cells[0]
    assert pickle.loads(pickle.dumps(c)) == c and hash(pickle.loads(pickle.dumps(c))) == hash(c)


def test_gpu_slots_never_overlap_unless_asked(tmp_path):
    def overlap(slots):
        inside, peak, lock = [0], [0], threading.Lock()

        def work():
            with executors.gpu_slot("cuda", slots, lock_dir=str(tmp_path), poll=0.005):
                with lock:
                    inside[0] += 1
                    peak[0] = max(peak[0], inside[0])
                time.sleep(0.05)
                with lock:
                    inside[0] -= 1

        ts = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        return peak[0]

    assert overlap(1) == 1
    assert overlap(2) == 2
    with executors.gpu_slot("cpu", 1, lock_dir=str(tmp_path)) as held:  # CPU cells hold nothing
        assert held is None


def test_interleave_spreads_gpu_cells():
    cells = [Cell("t", "e", s, d, TINY) for d in ("cpu", "cuda") for s in range(4)]
    out = executors._interleave(cells)
    assert sorted(out, key=cells.index) == cells
    assert [c.device for c in out[:4]] == ["cuda", "cpu", "cuda", "cpu"]


# ----------------------------------------------------------------------------- the engines

@pytest.mark.slow
def test_loky_j2_through_the_cli_matches_serial(tmp_path, serial, capsys):
    pytest.importorskip("joblib")
    out = tmp_path / "loky"
    code = main(["run", "--tasks", "toy_binary", "--estimators", "rloo,reinforce", "--seeds", "0,1",
                 "--steps", "6", "--checkpoints", "2", "--measure-samples", "16", "--out", str(out),
                 "-j", "2"])
    assert code == 0
    err = capsys.readouterr().err
    assert "[4/4]" in err
    same(records(out), serial)


def test_submitit_debug_executor_matches_serial_and_skips_stored(tmp_path, serial):
    pytest.importorskip("submitit")
    ex = executors.make_executor(config={"backend": "submitit", "cluster": "debug"})
    res = sweep.run(plan4(), tmp_path, executor=ex)
    assert len(res) == 4 and all(r.status == "ok" for r in res)
    same(records(tmp_path), serial)
    assert sweep.run(plan4(), tmp_path, executor=ex) == []  # everything stored: nothing submitted


@pytest.mark.slow
def test_submitit_local_executor_matches_serial(tmp_path, serial):
    pytest.importorskip("submitit")
    plan = plan4()
    plan.cells = plan.cells[:2]
    ex = executors.make_executor(2, {"backend": "submitit", "cluster": "local", "timeout_min": 5})
    res = sweep.run(plan, tmp_path, executor=ex)
    assert len(res) == 2 and all(r.status == "ok" for r in res)
    assert list((tmp_path / ".submitit").glob("*_result.pkl"))  # really went through submitit jobs
    got = records(tmp_path)
    want = serial[serial.estimator == "rloo"].reset_index(drop=True)
    same(got, want)


@pytest.mark.slow
def test_dask_local_cluster_matches_serial(tmp_path, serial):
    pytest.importorskip("dask.distributed")
    ex = executors.make_executor(config={"backend": "dask", "dask_n_workers": 2})
    res = sweep.run(plan4(), tmp_path, executor=ex)
    assert len(res) == 4 and all(r.status == "ok" for r in res)
    same(records(tmp_path), serial)


def test_warnings_of_a_cell_are_summarised_once_per_kind():
    """Hundreds of near-identical warnings (numbers differ) become one line with a count."""
    import io
    import warnings

    from estbench.engine.executors import _summarise_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(40):
            warnings.warn(f"active set did not converge for {n} chain(s)", UserWarning)
        warnings.warn("something else", RuntimeWarning)
    out = io.StringIO()
    _summarise_warnings(Cell("toy_binary", "rloo", 0, "cpu", Budget()), caught, out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "UserWarning 40 times, first: active set did not converge for 0 chain(s)" in lines[0]
    assert lines[1].endswith("RuntimeWarning something else")


def test_serial_sweep_summarises_warnings_too(tmp_path, monkeypatch, capsys):
    """The serial loop runs cells through the same worker function as the parallel backends."""
    import warnings

    def warn_then_run(cell, report=None, threads=1):
        for n in range(30):
            warnings.warn(f"did not converge for {n} chain(s)", UserWarning)
        return CellResult(cell, "ok")

    monkeypatch.setattr(executors, "run_cell", warn_then_run)
    plan = sweep.expand(parse_list("toy_binary"), parse_list("rloo"), [0], ["cpu"],
                        overrides={"steps": 2})
    res = sweep.run(plan, tmp_path / "run")
    assert [r.status for r in res] == ["ok"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "UserWarning 30 times, first: did not converge for 0 chain(s)" in err[0]
    assert sweep.run(plan, tmp_path / "run") == []  # stored: not run again


# ----------------------------------------------------------------------------- dying workers

class _FakePool:
    """Stands in for loky's pool in this process: each submitted cell runs at once, except the
    cell ``kill``, which breaks the pool as a worker killed by the operating system does (with its
    heartbeat on disk if ``heartbeat``): it and every cell submitted after it fail."""

    def __init__(self, run_dir, kill, heartbeat, pools):
        self.run_dir, self.kill, self.heartbeat, self.broken = run_dir, kill, heartbeat, False
        pools.append(self)

    def submit(self, fn, cell, *args):
        from concurrent.futures import Future

        from joblib.externals.loky.process_executor import TerminatedWorkerError

        fut = Future()
        if cell == self.kill:
            self.broken = True
            if self.heartbeat:
                store.Heartbeat(self.run_dir, cell.key(), cell.label())(0, 1, "training")
        if self.broken:
            fut.set_exception(TerminatedWorkerError("A worker process was terminated (SIGKILL(-9))"))
        else:
            fut.set_result(fn(cell, *args))
        return fut

    def shutdown(self, wait=True, kill_workers=False):
        pass


@pytest.mark.parametrize("heartbeat", [True, False], ids=["running", "before-its-heartbeat"])
def test_a_killed_loky_worker_costs_its_cell_not_the_sweep(tmp_path, monkeypatch, heartbeat):
    """A worker killed by the OS (the OOM killer) broke loky's pool and took the whole sweep down
    with a traceback; now the cell that was running is reported lost, the others finish."""
    import joblib.externals.loky as loky

    plan = plan4()
    plan.cells = [c.with_code() for c in plan.cells]
    culprit = plan.cells[1]
    pools = []
    monkeypatch.setattr(loky, "get_reusable_executor",
                        lambda **kw: _FakePool(tmp_path, culprit, heartbeat, pools))
    ex = executors.LokyExecutor(n_jobs=2)
    out = {}
    with pytest.raises(executors.WorkerError, match=f"{culprit.label()}: worker died"):
        sweep.run(plan, tmp_path, executor=ex,
                  progress=lambda i, n, c, res, cached: out.__setitem__(c, res))
    assert set(out) == set(plan.cells)
    assert out[culprit].status == "failed" and out[culprit].error.startswith("worker died")
    assert ("killed" if heartbeat else "broke") in out[culprit].error
    for c in plan.cells:
        stored = store.has_cell(tmp_path, c.key())
        if heartbeat:  # the culprit is known at the first break: every other cell finishes
            assert stored == (c != culprit)
        else:  # a cell that dies before its first heartbeat takes those queued behind it along
            assert stored != out[c].error.startswith("worker died")
    # with its heartbeat the culprit is known at the first break; without, it is retried twice
    assert len(pools) == (2 if heartbeat else 1 + executors.MAX_POOL_RESTARTS)
    assert not list((tmp_path / store.RUNNING).glob("*.json"))


def test_a_cell_past_its_memory_limit_fails_with_the_reason_and_the_limit_is_restored(
        tmp_path, monkeypatch):
    """A cell that allocates past its memory limit (``--cell-memory``, handed to the worker in its
    settings) is recorded as failed with the allocator's message (the OS would otherwise kill the
    worker and the cells beside it)."""
    resource = pytest.importorskip("resource")
    import estimators
    import torch

    class Greedy(estimators.Estimator):
        """Allocates 16 GiB at its first estimate (a test of the harness's memory limit)."""

        name = "greedy_test_only"
        families = frozenset({"bernoulli"})
        paper = "none: a test fixture"

        def _estimate(self, dist, f, n, context, family):
            torch.empty(2**34, dtype=torch.uint8)
            raise AssertionError("the allocation should have failed")

    try:
        settings = executors.make_executor(1, cell_memory="1G").settings
        assert settings.memory_limit == 2**30 == executors.cell_memory_limit(1, "1G")
        before = resource.getrlimit(resource.RLIMIT_DATA)
        (cell,) = sweep.expand(parse_list("toy_binary"), parse_list("greedy_test_only"), [0], ["cpu"],
                               TINY).cells
        _, res = executors.run_and_store(cell.with_code(), str(tmp_path), settings=settings)
        assert res.status == "failed" and "allocate" in res.error, res.error
        assert resource.getrlimit(resource.RLIMIT_DATA) == before
        _, ok = executors.run_and_store(plan4().cells[0].with_code(), str(tmp_path),
                                        settings=settings)
        assert ok.status == "ok"  # an ordinary cell fits
    finally:
        estimators.unregister("greedy_test_only")
    with pytest.raises(executors.ConfigError, match="cell_memory must be a number of bytes"):
        executors.make_executor(1, cell_memory="lots")
    with pytest.raises(executors.ConfigError, match="parallel config: cell_memory"):
        executors.make_executor(config={"backend": "loky", "cell_memory": "-1G"})


def test_the_memory_share_divides_among_the_jobs_asked_for():
    """Without --cell-memory, each of N cells running at once may take MEMORY_SHARE / N of the
    machine's memory: the jobs reach the worker with its settings (estbench.run(jobs=4) included),
    so a worker never assumes it runs alone."""
    one, four = executors.cell_memory_limit(1), executors.cell_memory_limit(4)
    assert one > 0 and abs(four * 4 - one) <= 4
    settings = executors.make_executor(4).settings
    assert settings.jobs == 4 and settings.memory_limit is None  # the worker's machine decides


@pytest.mark.parametrize("user", [None, "0"], ids=["unset", "user-off"])
def test_loky_workers_start_with_huge_pages_unless_the_user_said_no(tmp_path, monkeypatch, user):
    """torch reads THP_MEM_ALLOC_ENABLE once, from the environment, at its first allocation: the
    pool's workers are started with it (estbench.core.process), whatever the parent process has,
    and a user's own value wins.  Each cell's record says what its worker had."""
    from estbench.core import process

    if user is None:
        monkeypatch.delenv(process.HUGE_PAGES, raising=False)
    else:
        monkeypatch.setenv(process.HUGE_PAGES, user)
    plan = plan4()
    plan.cells = plan.cells[:2]
    sweep.run(plan, tmp_path, executor=executors.LokyExecutor(n_jobs=2))
    _, cells = store.load(tmp_path)
    assert len(cells) == 2
    assert [env["huge_pages"] for env in cells.env] == [user is None] * 2


def test_the_command_line_sets_huge_pages_before_torch():
    """Importing the command line sets the variable (torch not yet imported by it) and keeps a
    user's value."""
    import os
    import subprocess
    import sys

    from estbench.core import process

    code = ("import sys, os, estbench.cli; "
            f"print(os.environ.get({process.HUGE_PAGES!r}), 'torch' in sys.modules)")
    for given, expected in ((None, "1 False"), ("0", "0 False")):
        env = {k: v for k, v in os.environ.items() if k != process.HUGE_PAGES}
        if given is not None:
            env[process.HUGE_PAGES] = given
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.split("\n")[0]
        assert out == expected


_KEPT = []  # what a worker keeps between tasks (a cache, as a task's data set is)


def _grow_and_report(megabytes: int = 0):
    import time

    _KEPT.append(bytearray(megabytes << 20))
    time.sleep(1.2 if megabytes else 0)  # loky checks a worker's memory at most once a second
    return os.getpid()


def test_a_loky_worker_that_keeps_caches_is_not_replaced():
    """loky's leak check replaces a worker grown by 300 MB since its first task; the pool's
    workers tolerate what one cell may allocate instead (executors._init_worker), so a worker
    that loads a task's data set keeps it, and its imports, for the cells after."""
    pool = executors.LokyExecutor(n_jobs=1).pool()
    try:
        first = pool.submit(_grow_and_report).result()
        grown = pool.submit(_grow_and_report, 400).result()
        after = pool.submit(_grow_and_report).result()
    finally:
        pool.shutdown(wait=True, kill_workers=True)
    assert first == grown == after
