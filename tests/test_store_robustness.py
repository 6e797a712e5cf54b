"""The results store under abuse (issue 5): SIGKILL mid-sweep, and two sweeps writing one folder.

A cell file appears only complete (temp file + os.replace), so a killed sweep restarted with the
same command loses no finished cell and recomputes none, and concurrent writers never leave a
corrupt or half-written file behind.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pyarrow.parquet as pq
import pytest

from estbench.engine import store
from estbench.cli.commands import main

# 8 cells of about 0.3-1 s each: long enough to kill the sweep in the middle
SWEEP = ["run", "--tasks", "toy_binary", "--estimators", "rloo,reinforce", "--seeds", "0-3",
         "--steps", "150", "--checkpoints", "2", "--measure-samples", "16"]
N_CELLS = 8


def cli(out, *extra, sweep=SWEEP):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "estbench", *sweep, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def cell_files(out):
    return sorted((out / "cells").glob("*.parquet")) if (out / "cells").is_dir() else []


def check_store(out, n):
    """Every cell file is a complete, readable record, and store.load warns about nothing."""
    files = cell_files(out)
    assert len(files) == n
    for path in files:
        row = json.loads(pq.read_schema(path).metadata[b"estbench.cell"])
        assert row["key"] == path.stem and row["status"] == "ok"
        assert pq.read_table(path).num_rows > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped (corrupt) file would warn
        records, cells = store.load(out)
    assert len(cells) == n and cells.key.is_unique
    assert len(records[["estimator", "seed"]].drop_duplicates()) == n


@pytest.mark.slow
def test_sigkill_mid_sweep_then_restart_loses_and_recomputes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    proc = cli(out)
    deadline = time.monotonic() + 120
    try:
        while not cell_files(out):
            assert proc.poll() is None, f"sweep ended before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "no cell finished in 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cell_files(out)}
    assert 1 <= len(before) < N_CELLS, "the kill must land in the middle of the sweep"
    # whatever the kill interrupted, no file under cells/ is half-written: each one reads back whole
    check_store(out, len(before))

    assert main([*SWEEP, "--out", str(out)]) == 0  # the same command again
    err = capsys.readouterr().err
    assert f"{len(before)} of {N_CELLS} cells already stored" in err  # every finished cell reused ...
    assert err.count(" ... ok") == N_CELLS - len(before)  # ... and only the missing ones computed
    check_store(out, N_CELLS)
    for p in cell_files(out):
        if p.name in before:  # not rewritten: same bytes, same modification time
            assert (p.stat().st_mtime_ns, p.read_bytes()) == before[p.name]


@pytest.mark.slow
def test_two_concurrent_sweeps_on_one_folder_never_corrupt_it(tmp_path, capsys):
    out = tmp_path / "run"
    short = [a if a != "150" else "20" for a in SWEEP]  # short cells: the two race on the same ones
    procs = [cli(out, "--quiet", sweep=short), cli(out, "--quiet", sweep=short)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e
    check_store(out, N_CELLS)  # each cell once, all readable
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert pq.read_table(out / "results.parquet").num_rows == len(store.load(out)[0])
    # and a third run finds everything finished
    assert main([*short, "--out", str(out)]) == 0
    assert f"{N_CELLS} of {N_CELLS} cells already stored" in capsys.readouterr().err


# ---- provenance ----------------------------------------------------------------------------------

def test_results_do_not_make_the_source_dirty_but_code_does(tmp_path):
    """Remaking the reference deletes its committed cells first: that is not a change to the code,
    so the recorded commit stays clean; an edited source file makes it '-dirty'."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    (repo / "results" / "reference").mkdir(parents=True)
    (repo / "estbench").mkdir()
    (repo / "estbench" / "train.py").write_text("x = 1\n")
    (repo / "results" / "reference" / "cell.parquet").write_text("old\n")

    def git(*args):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                       env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                            "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(tmp_path), "PATH": os.environ["PATH"]})

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "init")
    sha = store.git_commit(repo)
    assert len(sha) == 40 and store.source_changes(repo) == ""
    (repo / "results" / "reference" / "cell.parquet").unlink()
    assert store.git_commit(repo) == sha  # deleting results is not dirt
    (repo / "estbench" / "train.py").write_text("x = 2\n")
    assert store.git_commit(repo) == sha + "-dirty"
    assert "estbench/train.py" in store.source_changes(repo)


@pytest.mark.parametrize("argv,typed", [
    (["/root/.pyenv/versions/3.11.7/bin/estbench", "run", "--seeds", "0,1"], "estbench run --seeds 0,1"),
    (["/site-packages/estbench/__main__.py", "list"], "estbench list"),
    (["estbench", "run", "--tasks", "toy_binary[t=0.49]", "--out", "a b"],
     "estbench run --tasks 'toy_binary[t=0.49]' --out 'a b'"),
])
def test_the_command_is_recorded_as_typed(argv, typed):
    assert store.typed_command(argv) == typed
