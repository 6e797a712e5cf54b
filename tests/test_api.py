"""``estbench.run`` is ``estbench run`` without the command line: one orchestration
(``engine.runs``) behind both, so both leave the same run folder.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

import estbench
from estbench.cli.commands import main
from estbench.core import metrics
from estbench.core.errors import OptionError, UsageError
from estbench.engine import store

TIMING = {m.name for m in metrics.METRICS if getattr(m, "timing", False)}
SWEEP = dict(tasks="toy_binary,toy_categorical", estimators="rloo,gumbel_softmax", seeds="0,1",
             steps=4, checkpoints=2, measure_samples=8)
ARGV = ["run", "--tasks", SWEEP["tasks"], "--estimators", SWEEP["estimators"], "--seeds", "0,1",
        "--steps", "4", "--checkpoints", "2", "--measure-samples", "8", "--quiet"]
#: what differs between two runs of one sweep by construction: when, and the words that ran it
VARYING_META = {"created", "command"}


def _folder(run):
    records, cells = store.load(run)
    keep = ~records.metric.isin(TIMING)
    records = records[keep].sort_values(["task", "estimator", "seed", "step", "metric"])
    cells = cells.set_index("key").sort_index()
    return records.reset_index(drop=True), cells, json.loads((run / "meta.json").read_text())


@pytest.mark.slow
def test_the_api_and_the_command_line_leave_identical_run_folders(tmp_path, capsys):
    assert main([*ARGV, "--out", str(tmp_path / "cli"), "--threads", "2"]) == 0
    estbench.run(out=tmp_path / "api", threads=2, **SWEEP)
    cli_records, cli_cells, cli_meta = _folder(tmp_path / "cli")
    api_records, api_cells, api_meta = _folder(tmp_path / "api")
    names = lambda run: sorted(p.name for p in (run / "cells").iterdir())  # noqa: E731
    assert names(tmp_path / "cli") == names(tmp_path / "api") and len(cli_cells) == 8
    pd.testing.assert_frame_equal(cli_records, api_records)
    same = ["task", "estimator", "seed", "device", "status", "error", "code_version", "env"]
    pd.testing.assert_frame_equal(cli_cells[same], api_cells[same])
    assert (cli_cells.env.map(lambda e: e["threads"]) == 2).all()
    assert set(cli_meta) == set(api_meta)
    assert {k: v for k, v in cli_meta.items() if k not in VARYING_META} == \
        {k: v for k, v in api_meta.items() if k not in VARYING_META}
    assert cli_meta["command"].startswith("estbench run --tasks toy_binary,toy_categorical")
    assert api_meta["command"].startswith("estbench.run(")


@pytest.mark.slow
def test_run_hands_its_jobs_to_every_worker_and_writes_meta(tmp_path):
    """``estbench.run(jobs=2)`` once recorded ``jobs: 1`` in every cell and wrote no meta.json: the
    jobs travelled through an environment variable only the command line set."""
    records, cells = estbench.run(tasks="toy_binary", estimators="rloo", seeds=[0, 1], jobs=2,
                                  out=tmp_path, steps=4, checkpoints=2, measure_samples=8)
    assert len(cells) == 2 and (cells.status == "ok").all()
    assert [e["jobs"] for e in cells.env] == [2, 2]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["jobs"] == 2 and meta["seeds"] == [0, 1] and meta["tasks"] == ["toy_binary"]


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(seeds=[]), OptionError, "seeds is empty"),
    (dict(seeds=1.5), OptionError, "seeds must be an int"),
    (dict(device="tpu"), OptionError, "device must be one of"),
    (dict(tasks=""), UsageError, "tasks is empty"),
    (dict(jobs=0), UsageError, "-j/--jobs must be a positive integer"),
    (dict(cell_memory="lots"), UsageError, "cell_memory must be a number of bytes"),
    (dict(tasks="toy_binary", estimators="reparam"), UsageError, "nothing to run"),
])
def test_bad_input_to_run_is_one_clear_error_before_anything_runs(tmp_path, kwargs, error, words):
    args = dict(tasks="toy_binary", estimators="rloo", seeds=[0], out=tmp_path / "run", steps=2)
    with pytest.raises(error, match=words):
        estbench.run(**{**args, **kwargs})
    assert not (tmp_path / "run").exists()
