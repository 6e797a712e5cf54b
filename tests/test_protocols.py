"""Published protocols (estbench/engine/protocols.py, tasks/protocols/*.yml) and the ``paper`` budget."""
from __future__ import annotations

import json

import pytest
import torch

import tasks
from estbench.engine import protocols, sweep
from estbench.cli.commands import main
from estbench.core.spec import parse


def test_every_real_task_declares_a_protocol_that_loads():
    found = protocols.available()
    assert {"binary_vae", "categorical_vae", "sst_rationales", "text_vae"} <= set(found)
    for name, p in found.items():
        assert p.source["paper"] and p.settings and p.budget, name
        assert p.differences, f"{name}: a protocol says where the suite departs from its source"
        p.make_budget()  # a valid Budget
        tasks.get(name, **p.task_options)  # valid task options


def test_disarm_protocol_is_the_launchers_settings():
    """The values read in google-research disarm/binary/experiment_launcher_singlelayer.py."""
    p = protocols.get("binary_vae")
    assert p.task_options["lr"] == 1e-4 and p.task_options["prior_lr"] == 1e-2
    assert p.task_options["batch_size"] == 50 and p.task_options["latents"] == 200
    assert p.budget["steps"] == 10**6 and p.budget["n_samples"] == 2  # one antithetic pair
    assert p.task_options["iwae_samples"] == 100


def test_paper_budget_applies_the_protocol_and_the_user_wins():
    plan = sweep.expand([parse("binary_vae"), parse("categorical_vae[lr=0.001]")],
                        [parse("reinmax"), parse("gst[temperature=2]"), parse("disarm")],
                        [0], ["cpu"], protocols.PAPER, {"steps": 7})
    by = {(c.task, c.estimator): c for c in plan.cells}
    bv = protocols.get("binary_vae")
    cells = [c for c in plan.cells if c.task.startswith("binary_vae")]
    assert len(cells) == 3
    task = tasks.get("binary_vae", **bv.task_options)
    assert {c.task for c in cells} == {task.display_name}
    assert all(c.budget.steps == 7 and c.budget.n_samples == 2 for c in cells)  # override, protocol
    assert all(c.timeout == 0 for c in cells)  # a paper cell has no default time limit
    cat = [c for c in plan.cells if c.task.startswith("categorical_vae")]
    # the user's lr=0.001 replaces the protocol's 5e-4 (0.001 is the default: not in the name)
    assert {c.task for c in cat} == {"categorical_vae[binarize=none]"}
    # the source's tuned temperature for an estimator named bare, the user's where given
    assert ("categorical_vae[binarize=none]", "reinmax[temperature=1.3]") in by
    assert ("categorical_vae[binarize=none]", "gst[temperature=2.0]") in by
    assert ("binary_vae" + task.display_name[len("binary_vae"):], "reinmax") in by


def test_paper_budget_of_a_task_without_protocol_is_one_clear_line(capsys, tmp_path):
    code = main(["run", "--tasks", "toy_binary", "--estimators", "rloo", "--budget", "paper",
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "toy_binary" in err[0] and "follows no published protocol" in err[0]
    assert "binary_vae" in err[0]


@pytest.mark.parametrize("edit,message", [
    (lambda s: s + "\nfoo: 1\n", "unknown keys ['foo']"),
    (lambda s: s.replace("prior_lr: 0.01", "prior_lr: -1"), "prior_lr"),
    (lambda s: s.replace("  steps: 1000000", "  stepz: 1000000"), "budget has no fields ['stepz']"),
    (lambda s: s.replace("task: binary_vae", "task: text_vae"), "named after the task"),
    (lambda s: s.replace("lr: 0.0001", "lr: [1"), "not valid YAML"),
])
def test_a_broken_protocol_file_is_named_in_one_line(protocol_dir, capsys, edit, message):
    path = protocol_dir / "binary_vae.yml"
    path.write_text(edit(path.read_text()))
    with pytest.raises(protocols.ProtocolError, match="binary_vae.yml"):
        protocols.available()
    assert main(["list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_unknown_tuned_estimator_option_is_refused(protocol_dir):
    path = protocol_dir / "categorical_vae.yml"
    path.write_text(path.read_text().replace("reinmax: {temperature: 1.3}", "reinmax: {tau: 1.3}"))
    with pytest.raises(protocols.ProtocolError, match="no option tau"):
        protocols.available()


def test_list_shows_every_protocol(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "published protocols" in out
    for name, p in protocols.available().items():
        assert f"{name}: {p.name}" in out
        assert p.source["code"] in out
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["protocols"]
    assert listed["binary_vae"]["task_options"]["prior_lr"] == 0.01


def test_binary_vae_prior_lr_trains_the_prior_by_plain_sgd():
    """prior_lr > 0: the DisARM code's SGD on the prior logits, Adam on the networks."""
    t = tasks.get("binary_vae", latents=4, prior_lr=0.5, lr=1e-3)
    t.setup("cpu", torch.Generator().manual_seed(0))
    opt = t.make_optimizer()
    before = t.prior_logits.detach().clone()
    w_before = next(t.encoder.parameters()).detach().clone()
    grad = torch.tensor([1.0, -2.0, 0.5, 0.0])
    for p in t.parameters():
        p.grad = torch.ones_like(p)
    t.prior_logits.grad = grad.clone()
    opt.step()
    torch.testing.assert_close(t.prior_logits.detach(), before - 0.5 * grad)  # SGD: no Adam scaling
    # Adam's first step moves every coordinate by lr whatever the gradient's size
    torch.testing.assert_close(next(t.encoder.parameters()).detach(), w_before - 1e-3)
    opt.zero_grad(set_to_none=True)
    assert t.prior_logits.grad is None
    plain = tasks.get("binary_vae", latents=4)
    plain.setup("cpu", torch.Generator().manual_seed(0))
    assert isinstance(plain.make_optimizer(), torch.optim.Adam)


@pytest.mark.slow
def test_run_paper_budget_end_to_end(tmp_path, capsys):
    """`estbench run --budget paper` runs the protocol's settings, cut short here."""
    out = tmp_path / "paper"
    code = main(["run", "--tasks", "sst_rationales", "--estimators", "reinforce", "--budget", "paper",
                 "--steps", "4", "--checkpoints", "2", "--measure-samples", "4", "--eval-points", "2",
                 "--seeds", "0", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["budget"] == "paper"
    (budget,) = meta["budgets"].values()
    assert budget["steps"] == 4 and budget["n_samples"] == 1  # override, protocol
    assert "sst_rationales[batch_size=25,lr=0.0002]" in meta["budgets"]  # the notebook's rate
    assert main(["report", str(out)]) == 0
    report = (out / "report" / "report.md").read_text()
    assert "## Published protocols" in report and "ran each task's protocol" in report
