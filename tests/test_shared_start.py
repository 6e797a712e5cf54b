"""The start of training shared by the cells of a (task, seed) in one worker process
(``train._shared_at_start``): a cell that finds the step-0 reference gradient and held-out figure
computed by an earlier cell records exactly what it records alone."""
from __future__ import annotations

import pandas as pd
import pytest

from estbench.core.budget import Budget
from estbench.engine import train
from estbench.engine.train import Cell, run_cell

#: the timings differ from run to run; every other record must not
TIMED = {"wall_time", "step_time"}


def _records(res) -> pd.DataFrame:
    assert res.status == "ok", res.error
    df = pd.DataFrame(res.records)
    return df[~df.metric.isin(TIMED)].reset_index(drop=True)


@pytest.mark.parametrize("task", ["toy_binary", "binary_vae[latents=6]", "sst_rationales",
                                  "text_vae[hidden=16,emb=8,val_size=4,test_sentences=4]"])
def test_a_cell_after_another_of_its_task_and_seed_records_what_it_records_alone(monkeypatch, task):
    budget = Budget(steps=2, n_samples=4, checkpoints=2, measure_samples=4, eval_points=2,
                    evaluation="subset")
    calls = []
    real = train.reference_at
    monkeypatch.setattr(train, "reference_at", lambda *a: calls.append(1) or real(*a))
    train._shared_starts.clear()
    alone = _records(run_cell(Cell(task, "reinforce", 0, "cpu", budget)))
    assert len(calls) == 2  # step 0 and step 2
    train._shared_starts.clear()
    run_cell(Cell(task, "rloo", 0, "cpu", budget))
    run_cell(Cell(task, "rloo", 1, "cpu", budget))  # another seed: another start
    calls.clear()
    after = _records(run_cell(Cell(task, "reinforce", 0, "cpu", budget)))
    assert len(calls) == 1  # step 0's came from the first cell of seed 0
    pd.testing.assert_frame_equal(after, alone)


def test_the_key_holds_the_parameters_values():
    """The same task and seed give the same digest; a parameter one float32 step away does not."""
    import tasks
    import torch

    digests = []
    for _ in range(2):
        t = tasks.get("binary_vae", latents=6)
        t.setup("cpu", torch.Generator().manual_seed(0))
        digests.append(train._parameters_digest(t))
    assert digests[0] == digests[1]
    with torch.no_grad():
        p = t.parameters()[0]
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf")))
    assert train._parameters_digest(t) != digests[0]
