"""Snapshot sets and the probe: every estimator measured at the same parameters (issue #22).

What is checked: a snapshot holds exactly the parameters of the driver's training cell at that
step, and the driver's probe repeats its in-training measurement figure for figure; every
estimator of a probe sees the same parameters, measurement batch and reference (by digest);
a set rebuilt from its manifest has the same parameters, and a damaged one is refused; the
probe holds estimators to the counted budget and records failures with their reasons; a
stateful estimator's warm-up leaves the model as it is; the commands end to end.
"""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

import estimators
from estbench.cli.commands import main
from estbench.core.budget import Budget
from estbench.core.records import RECORD_COLUMNS
from estbench.core.spec import parse_list
from estbench.engine import probe, snapshots, store, sweep
from estbench.engine.cell import Cell
from estbench.engine.train import run_cell
from estimators import Estimate, Estimator

BUDGET = Budget(steps=40, n_samples=12, checkpoints=3, measure_samples=32)
STEPS = [0, 20, 40]  # BUDGET's checkpoints


@pytest.fixture(scope="module")
def toy_set(tmp_path_factory):
    """toy_categorical trained by rloo, snapshots at the budget's checkpoints."""
    return snapshots.build("toy_categorical", "rloo", 0, BUDGET, STEPS,
                           tmp_path_factory.mktemp("sets") / "toy_categorical")


def _probe(s, names, tmp_path):
    plan = probe.plan([s], parse_list(names), ["cpu"])
    return plan, sweep.run(plan, tmp_path / "probe")


def test_the_drivers_probe_repeats_its_in_training_measurement(toy_set):
    """Same parameters, batch and random stream (the toy's reference is exact: it draws nothing)."""
    trained = pd.DataFrame(run_cell(Cell("toy_categorical", "rloo", 0, "cpu", BUDGET)).records)
    [cell] = probe.plan([toy_set], parse_list("rloo"), ["cpu"]).cells
    res = probe.run_probe(cell)
    assert res.status == "ok", res.error
    probed = pd.DataFrame(res.records)
    measured = ["bias", "bias_noise", "variance", "grad_error", "cosine", "snr", "bias_p"]
    a = trained[trained.metric.isin(measured)].set_index(["step", "metric"]).value.sort_index()
    b = probed[probed.metric.isin(measured)].set_index(["step", "metric"]).value.sort_index()
    assert sorted(set(a.index.get_level_values(0))) == STEPS
    pd.testing.assert_series_equal(a, b, rtol=1e-6)


def test_every_estimator_sees_the_same_parameters_batch_and_reference(toy_set, tmp_path):
    plan, results = _probe(toy_set, "rloo,reinmax,gumbel_softmax,exact,reinforce_ema", tmp_path)
    assert [r.status for r in results] == ["ok"] * 5
    seen = [r.artifacts["snapshots"] for r in results]
    assert all(s == seen[0] for s in seen) and sorted(map(int, seen[0])) == STEPS
    for step, d in seen[0].items():
        assert d["parameters"] == toy_set.manifest["snapshots"][step]["parameters"]
        assert d["measure_batch"] == toy_set.manifest["measure_batch"]
    records, cells = store.load(tmp_path / "probe")
    assert list(records.columns[:len(RECORD_COLUMNS)]) == RECORD_COLUMNS
    gq = records[records.metric == "grad_error"]
    assert sorted(gq.step.unique()) == STEPS and gq.estimator.nunique() == 5
    # the oracle's error is float rounding; an unbiased score-function estimator's is not
    err = gq.groupby("estimator").value.max()
    assert err["exact"] < 1e-10 < err["rloo"]
    warmed = {r.cell.estimator: r.artifacts["warmed_up"] for r in results}
    assert warmed == {"rloo": False, "reinmax": False, "gumbel_softmax": False, "exact": False,
                      "reinforce_ema": True}


def test_a_probe_cells_key_names_its_set_and_a_training_cells_key_is_unchanged(toy_set):
    [c] = probe.plan([toy_set], parse_list("rloo"), ["cpu"]).cells
    plain = Cell(c.task, c.estimator, c.seed, c.device, c.budget, code=c.code)
    assert c.key() != plain.key() and toy_set.hash in c.code
    # a training cell's key is computed as it always was (the probe field only enters when set)
    import hashlib

    blob = json.dumps({"task": plain.task, "estimator": plain.estimator, "seed": plain.seed,
                       "device": plain.device, "budget": plain.budget.as_dict(),
                       "code": plain.code}, sort_keys=True)
    assert plain.key() == hashlib.sha256(blob.encode()).hexdigest()[:20]


def test_a_rebuilt_set_has_the_same_parameters_and_a_damaged_one_is_refused(toy_set, tmp_path):
    again = snapshots.rebuild(toy_set, tmp_path / "again")
    assert snapshots.same_parameters(toy_set, again) == []
    # another seed is another trajectory: the check can fail
    other = snapshots.build("toy_categorical", "rloo", 1, BUDGET, STEPS, tmp_path / "seed1")
    assert snapshots.same_parameters(toy_set, other) == [20, 40]  # the start is the task's init
    f = again.path / snapshots.snapshot_name(20)
    data = torch.load(f, weights_only=True)
    data["parameters"][0] = data["parameters"][0] + 1.0
    torch.save(data, f)
    task = again.make_task(torch.device("cpu"))
    with pytest.raises(snapshots.SnapshotError, match="does not match its sha256"):
        again.apply(task, 20)


def test_float16_sets_hold_the_rounded_parameters(tmp_path):
    s = snapshots.build("toy_categorical", "rloo", 0, BUDGET, [40], tmp_path / "half",
                        dtype="float16")
    stored = s.parameters_at(40)
    assert all(t.dtype == torch.float16 for t in stored)
    task = s.make_task(torch.device("cpu"))
    s.apply(task, 40)
    assert all(torch.equal(p.detach(), t.float()) for p, t in zip(task.parameters(), stored))


def test_the_probe_counts_the_budget_and_records_a_failure_with_its_reason(toy_set, tmp_path):
    # defined here, not at import: a named Estimator subclass registers itself, and every other
    # test module would then see it among the built-in estimators
    try:
        class Overspender(Estimator):
            """Spends 8 times its budget (a test plug-in; Williams 1992, Eq. 7)."""

            name = "overspender_probe_test"
            families = frozenset({"categorical"})
            unbiased = True
            paper = "Williams (1992), Eq. 7"

            def _estimate(self, dist, f, n, context, family):
                z = dist.sample((8 * n,))
                fz = f(z)
                return Estimate((fz.detach() * dist.log_prob(z)).mean(0).sum(),
                                fz.detach().mean(0), n)

        [cell] = probe.plan([toy_set], parse_list(Overspender.name), ["cpu"]).cells
        res = probe.run_probe(cell)
    finally:
        if "overspender_probe_test" in estimators.available():
            estimators.unregister("overspender_probe_test")
    assert res.status == "failed"
    assert "over budget: spent 96 f-evaluations per data point in the measurement at the " \
           "snapshot of step 0" in res.error


def test_warming_up_a_stateful_estimator_leaves_the_model_as_it_is(toy_set):
    task = toy_set.make_task(torch.device("cpu"))
    toy_set.apply(task, 40)
    before = snapshots.digest([p.detach().clone() for p in task.parameters()])
    est = estimators.get("reinforce_ema")
    probe._warm_up(task, est, toy_set, probe.EvaluationCounter(), True, BUDGET, 40)
    assert snapshots.digest([p.detach() for p in task.parameters()]) == before
    assert float(est.state_dict()["base.avg"]) != 0.0  # it has learned something


def test_an_estimator_with_a_lazily_built_state_is_probed(toy_set):
    """NVIL's baseline network is built at its first estimate: the probe starts every snapshot's
    warm-up from the estimator as built, which it cannot clone value by value (it failed so)."""
    [cell] = probe.plan([toy_set], parse_list("nvil"), ["cpu"]).cells
    res = probe.run_probe(cell)
    assert res.status == "ok", res.error
    assert res.artifacts["warmed_up"]
    grad_error = [r["value"] for r in res.records if r["metric"] == "grad_error"]
    assert len(grad_error) == len(STEPS) and all(math.isfinite(v) for v in grad_error)


def test_the_commands_end_to_end(tmp_path, capsys):
    sets = tmp_path / "sets"
    assert main(["snapshots", "toy_binary", "--driver", "rloo", "--out", str(sets / "b"),
                 "--steps", "20", "--snapshots", "3", "--measure-samples", "16", "--quiet",
                 "--why", "unbiased: follows the true gradient in expectation"]) == 0
    m = json.loads((sets / "b" / snapshots.MANIFEST).read_text())
    assert m["steps"] == [0, 10, 20] and m["probe"]["measure_samples"] == 16
    assert m["driver_why"].startswith("unbiased")
    assert main(["snapshots", "--check", str(sets / "b"), "--quiet"]) == 0
    assert "the same parameters at all 3 snapshots" in capsys.readouterr().out
    out = tmp_path / "probe"
    assert main(["probe", str(sets), "--estimators", "rloo,disarm,exact", "--out", str(out),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "== toy_binary [cpu] at 3 shared snapshots ==" in text
    assert "exact (oracle)" in text and "disarm" in text
    assert json.loads((out / "meta.json").read_text())["budget"] == "probe"
    # its report: the shared-parameter section, a figure per task, the leaderboard over snapshots
    assert main(["report", str(out)]) == 0
    report = (out / "report" / "report.md").read_text()
    assert "## At shared parameters" in report and "### Leaderboard at shared parameters" in report
    assert (out / "report" / "figures" / "shared_toy_binary.png").is_file()
    board = pd.read_csv(out / "report" / "leaderboard.csv")
    assert set(board.criterion) >= {"grad_error"} and "exact" not in set(board.estimator)
    capsys.readouterr()
    # run again: every cell is stored, nothing recomputed, the same table
    assert main(["probe", str(sets), "--estimators", "rloo,disarm,exact", "--out", str(out),
                 "--quiet"]) == 0
    assert capsys.readouterr().out == text


@pytest.mark.parametrize("argv, says", [
    (["probe", "NOWHERE"], "NOWHERE: no such folder"),
    (["snapshots", "toy_binary", "--out", "X"], "name the TASK, its --driver"),
    (["snapshots", "toy_binary", "--driver", "reparam", "--out", "X"], "--driver 'reparam' supports"),
    (["snapshots", "toy_binary", "--driver", "rloo", "--out", "X", "--at", "a,b"], "--at must list steps"),
    (["snapshots", "--check", "NOWHERE"], "is not a snapshot set"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_a_probe_records_only_declared_metrics_and_every_measurement_metric(toy_set):
    from estbench.core import metrics

    [cell] = probe.plan([toy_set], parse_list("reinmax"), ["cpu"]).cells
    names = set(pd.DataFrame(probe.run_probe(cell).records).metric)
    assert metrics.undeclared(names) == []
    measured = {m.name for m in metrics.METRICS
                if m.recorded == metrics.CHECKPOINT and m.name not in ("elbo", "wall_time",
                                                                        "train_objective")
                and m.name not in probe.FIGURES}  # those only where a set asks for them
    assert measured <= names and "n_evals" in names


def test_a_driver_that_cannot_run_is_one_line_before_any_training(tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["snapshots", "poly_toy", "--driver", "exact", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--driver exact cannot train poly_toy here" in err[0]
    assert not out.exists()


def test_rank_probes_first_and_can_stop_there(tmp_path, capsys):
    sets = tmp_path / "sets"
    assert main(["snapshots", "toy_binary", "--driver", "rloo", "--out", str(sets / "toy_binary"),
                 "--steps", "20", "--snapshots", "3", "--measure-samples", "16", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "rank"
    assert main(["rank", "disarm", "--tasks", "toy_binary", "--estimators", "rloo,reinforce",
                 "--snapshots", str(sets), "--probe-only", "--reference", "none",
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("at shared parameters")
    assert "paired tests over snapshots" in text and "toy_binary" in text
    _, cells = store.load(out / "probe")
    assert sorted(cells.estimator) == ["disarm", "reinforce", "rloo"]
    assert not (out / "cells").exists()  # --probe-only: nothing trained
    # no set for the task: with --probe-only an error in one line, else a note and training
    assert main(["rank", "disarm", "--tasks", "liu_toy", "--snapshots", str(sets),
                 "--probe-only", "--reference", "none", "--out", str(out), "--quiet"]) == 2
    assert "no snapshot set in" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_set_made_on_cpu_is_probed_on_cuda_at_the_same_parameters(toy_set, tmp_path):
    [cpu] = probe.plan([toy_set], parse_list("exact"), ["cpu"]).cells
    [gpu] = probe.plan([toy_set], parse_list("exact"), ["cuda"]).cells
    a, b = probe.run_probe(cpu), probe.run_probe(gpu)
    assert a.status == b.status == "ok", b.error
    for step, d in a.artifacts["snapshots"].items():  # the reference may differ in rounding
        other = b.artifacts["snapshots"][step]
        assert (d["parameters"], d["measure_batch"]) == (other["parameters"], other["measure_batch"])
    ref = {(r["step"]): r["value"] for r in a.records if r["metric"] == "ref_norm"}
    ref_gpu = {(r["step"]): r["value"] for r in b.records if r["metric"] == "ref_norm"}
    assert ref.keys() == ref_gpu.keys()
    assert all(abs(ref[s] - ref_gpu[s]) <= 1e-5 * max(1.0, ref[s]) for s in ref)


def test_the_committed_snapshot_sets_load_and_stay_within_the_size_budget():
    """README: all committed snapshot sets together at most 50 MB: every real task's and toy's,
    and the published-cosine comparison's."""
    from estbench.analysis import rank

    results = rank.shipped_reference().parent  # the real one, not the fixture's
    if not (results / "snapshots").is_dir():
        pytest.skip("no committed snapshot sets in this installation")
    sets = snapshots.find([results / "snapshots"])
    assert sets and all(s.manifest["driver_why"] for s in sets)
    import tasks
    from estbench.core.spec import parse

    assert {parse(s.task).name for s in sets} == set(tasks.available())  # every task has one
    every = sets + [snapshots.load(m.parent) for m in (results / "paper").glob("*/snapshots/" + snapshots.MANIFEST)]
    assert sum(snapshots.size_bytes(s) for s in every) <= 50 * 10**6


def test_the_published_cosine_set_lies_on_the_committed_categorical_vae_trajectory():
    """results/make_reinmax_cosine.sh's set differs from results/snapshots/categorical_vae only in
    its 100-image measurement batch: the same driver, seed and data order, so the same parameters
    where both keep a snapshot (the measurement batch draws nothing from the training stream)."""
    import json

    from estbench.analysis import rank

    root = rank.shipped_reference().parent
    paths = [root / "snapshots" / "categorical_vae", root / "paper" / "reinmax_cosine_8x4" / "snapshots"]
    if not all((p / snapshots.MANIFEST).is_file() for p in paths):
        pytest.skip("the committed categorical_vae sets are not in this installation")
    a, b = (json.loads((p / snapshots.MANIFEST).read_text()) for p in paths)
    assert a["driver"] == b["driver"] and a["seed"] == b["seed"] and a["dtype"] == b["dtype"]
    common = sorted(set(a["snapshots"]) & set(b["snapshots"]), key=int)
    assert common == ["600", "6000"]
    assert [a["snapshots"][k]["parameters"] for k in common] == \
        [b["snapshots"][k]["parameters"] for k in common]


def test_the_cosine_of_the_mean_estimate_reads_the_direction_of_the_bias(tmp_path):
    """The ReinMax reproduction's figure: 1 for the exact gradient, near 1 for an unbiased
    estimator averaged over many estimates, further from 1 for a biased relaxation."""
    s = snapshots.build("toy_categorical", "rloo", 0, BUDGET, [0, 40], tmp_path / "set",
                        figures={"cosine_of_mean": 4000})
    plan, results = _probe(s, "exact,rloo,gumbel_softmax[temperature=2.0]", tmp_path)
    got = {r.cell.estimator: [x["value"] for x in r.records if x["metric"] == "cosine_of_mean"]
           for r in results}
    assert all(len(v) == 2 for v in got.values()), got
    assert min(got["exact"]) > 1 - 1e-9
    assert min(got["rloo"]) > 0.99
    # at the start (near-uniform logits) the relaxation's bias points along the gradient; after
    # training, not: the rloo mean stays on the gradient, the relaxation's does not
    assert got["gumbel_softmax[temperature=2.0]"][1] < 0.99 < got["rloo"][1]
    # the figure's exact gradient is computed once per snapshot and kept for every estimator
    kept = sorted(p.name for p in (tmp_path / "probe" / probe.REFERENCES).glob("*-cosine_of_mean-cpu.pt"))
    assert kept == [f"{s.hash}-{step}-cosine_of_mean-cpu.pt" for step in (0, 40)]


def test_a_start_rebuilt_from_the_seed_is_the_stored_one(toy_set, tmp_path):
    s = snapshots.build("toy_categorical", "rloo", 0, BUDGET, STEPS, tmp_path / "lean",
                        store_start=False)
    assert not (s.path / snapshots.snapshot_name(0)).exists()
    assert snapshots.same_parameters(s, toy_set) == []
    task = s.make_task(torch.device("cpu"))
    assert s.apply(task, 0) == toy_set.manifest["snapshots"]["0"]["parameters"]
    assert snapshots.same_parameters(snapshots.rebuild(s, tmp_path / "again"), s) == []
