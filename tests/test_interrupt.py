"""Ctrl-C under ``-j 2`` (issue 19): the sweep stops within seconds, computes nothing more, keeps
every finished cell and says so, as a serial run does.

Before, the parent left the loky pool running: the interpreter's exit waited for every submitted
cell (25-57 s here, every remaining cell computed after the interrupt), and a Ctrl-C at a terminal
(SIGINT to the whole process group) also printed the workers' KeyboardInterrupt tracebacks.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from estbench.engine import store

# 12 cells of about 1-2 s each (more on a loaded machine): the interrupt lands with most to do
SWEEP = ["run", "--tasks", "toy_binary", "--estimators", "reinforce,rloo", "--seeds", "0-5",
         "--steps", "1500", "--checkpoints", "2", "--measure-samples", "8", "-j", "2"]
N_CELLS = 12
#: seconds from the interrupt to the exit: about 1 s here; the bound leaves room for a loaded machine
EXIT_WITHIN = 20.0


def cell_files(out):
    return sorted((out / "cells").glob("*.parquet")) if (out / "cells").is_dir() else []


@pytest.mark.parametrize("to", ["process", "group"])
@pytest.mark.slow
def test_ctrl_c_under_two_jobs_stops_at_once_and_keeps_the_finished_cells(tmp_path, to):
    """``process``: SIGINT to the estbench process alone; ``group``: to its process group, as a
    terminal sends Ctrl-C (the workers get it too)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "estbench", *SWEEP, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        while not cell_files(out):
            assert proc.poll() is None, f"sweep ended before the interrupt: {proc.communicate()}"
            assert time.monotonic() < deadline, "no cell finished in 180 s"
            time.sleep(0.02)
        at_interrupt = len(cell_files(out))
        sent = time.monotonic()
        if to == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"still running {EXIT_WITHIN:.0f} s after the interrupt")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    at_exit = len(cell_files(out))
    assert proc.returncode == 130, err
    assert took < EXIT_WITHIN
    assert at_interrupt < N_CELLS, "the interrupt must land in the middle of the sweep"
    # the two cells running then may just finish before the workers are stopped; nothing is started
    assert at_exit - at_interrupt <= 2, (
        f"{at_exit - at_interrupt} cells were computed after the interrupt ({took:.1f} s)")
    assert "interrupted: finished cells are kept in" in err
    assert "Traceback" not in err, err  # neither the parent's nor a worker's
    # every finished cell is kept, readable, and no heartbeat of a killed worker is left behind
    records, cells = store.load(out)
    assert len(cells) == at_exit and set(cells.status) == {"ok"}
    assert not (out / store.RUNNING).exists()
