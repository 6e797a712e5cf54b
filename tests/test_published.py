"""The as-published mode (``estbench run --budget published``), the published figures as data and
the report's "Against the published figures" (estbench/analysis/published.py)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import estimators
import tasks
from estbench.analysis import published
from estbench.cli.commands import main
from estbench.core.spec import parse
from estbench.engine import protocols, sweep

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT.parent / "shared" / "data" / "published" / "reinmax_vae_8x4"


def test_the_8x4_mode_is_the_sources_run():
    """The ReinMax code's 8x4 run: 60k grey-level images, 160 epochs of 100, Table 8 per method."""
    ap = protocols.as_published("categorical_vae")
    assert ap.task_options["training_images"] == 60_000 and ap.task_options["binarize"] == "none"
    assert ap.budget["steps"] == 160 * 60_000 // ap.task_options["batch_size"]
    assert ap.budget["n_samples"] == 1 and ap.task_options["eval_samples"] == 1
    # an evaluation at the end of every epoch: train_objective's last point is the last epoch
    assert (ap.budget["eval_points"] - 1) * 600 == ap.budget["steps"]
    table = {e: (m.task_options["lr"], m.estimator_options["temperature"], m.source_name)
             for e, m in ap.per_method.items()}
    assert table == {"straight_through": (0.001, 1.3, "st"), "st_gumbel": (0.0003, 0.5, "gumbel"),
                     "gumbel_rao": (0.0005, 0.5, "rao_gumbel"), "gst": (0.0005, 1.0, "gst-1.0"),
                     "reinmax": (0.0005, 1.3, "reinmax")}
    assert ap.per_method["gumbel_rao"].estimator_options["k"] == 100  # the code's default draws
    assert set(ap.published.values) == set(ap.per_method)


def test_published_mode_gives_each_method_its_own_settings_and_skips_the_rest():
    plan = sweep.expand([parse("categorical_vae")],
                        [parse("reinmax"), parse("straight_through"), parse("rloo"),
                         parse("gst[temperature=2]")], [0, 1], ["cpu"], protocols.PUBLISHED,
                        {"steps": 3})
    cells = {(c.estimator, c.seed): c for c in plan.cells}
    assert len(plan.cells) == 6
    rm = cells[("reinmax[temperature=1.3]", 0)]
    assert rm.task == "categorical_vae[binarize=none,lr=0.0005,eval_samples=1,training_images=60000]"
    assert rm.budget.steps == 3 and rm.budget.n_samples == 1 and rm.timeout == 0
    st = cells[("straight_through[temperature=1.3]", 1)]
    assert tasks.get("categorical_vae", **parse(st.task).options).config["lr"] == 0.001
    assert ("gst[temperature=2.0]", 0) in cells  # the user's option wins
    assert [(t, e) for t, e, _ in plan.skipped] == [("categorical_vae", "rloo")]


def test_published_budget_of_a_task_without_the_mode_is_one_clear_line(capsys, tmp_path):
    code = main(["run", "--tasks", "binary_vae", "--budget", "published",
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "no as-published mode" in err[0] and "categorical_vae" in err[0]


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.replace("  what: ", "  whatever: "), "unknown keys ['whatever']"),
    (lambda s: s.replace("task: {lr: 0.001, optimizer: adam}", "task: {lr: 0.001, optimizer: sgd}"),
     "straight_through"),
    (lambda s: s.replace("estimator: {temperature: 1.3}}", "estimator: {tau: 1.3}}", 1),
     "no option tau"),
    (lambda s: s.replace("metric: final_elbo", "metric: final_elbow"), "final_elbow"),
    (lambda s: s.replace("test_neg_elbo: [137.0072, 0.4763, 10]", "test_neg_elbo: [137.0, -1, 10]"),
     "[mean, standard error, seeds]"),
    (lambda s: s.replace("      commit: 62697d17038664542002056e6c51e7b5c6f3d577\n", ""),
     "needs its commit"),
])
def test_a_broken_as_published_section_is_one_line(protocol_dir, capsys, edit, message):
    path = protocol_dir / "categorical_vae.yml"
    text = path.read_text()
    assert edit(text) != text
    path.write_text(edit(text))
    with pytest.raises(protocols.ProtocolError, match="categorical_vae.yml: as_published"):
        protocols.available()
    assert main(["list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_list_shows_the_published_figures_with_their_source(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "--budget published" in out
    assert "danielwang0452/DiscreteNumericalMethodsASC at 62697d17038664542002056e6c51e7b5c6f3d577" in out
    assert "reinmax: training -ELBO 125.08 +- 0.21 (10 seeds); test -ELBO 127.27 +- 0.17 (10 seeds)" in out
    assert main(["list", "--json"]) == 0
    ap = json.loads(capsys.readouterr().out)["protocols"]["categorical_vae"]["as_published"]
    assert ap["published"]["values"]["gst"]["test_neg_elbo"] == [129.1523, 0.1599, 10]


@pytest.mark.skipif(not LOGS.is_dir(), reason="the published logs are not beside this checkout")
def test_the_protocols_figures_are_the_logs_last_rows():
    """The committed figures are recomputed from the source's raw logs (never typed)."""
    r = subprocess.run([sys.executable, str(ROOT / "results" / "published_figures.py"), str(LOGS),
                        "--check"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_figures_script_reads_the_logs_as_documented(tmp_path):
    """Mean and ddof-1 standard error of the last row's columns 0 and 3, per method."""
    sys.path.insert(0, str(ROOT / "results"))
    try:
        import published_figures as pf
    finally:
        sys.path.pop(0)
    for seed, last in enumerate([(130.0, 132.0), (134.0, 133.0)]):
        rows = [[200.0, 0, 0, 210.0, 0, 0, 1.0, 0.0]] * 159 + [[last[0], 0, 0, last[1], 0, 0, 9, 9]]
        (tmp_path / f"results_seed{seed}_st_cat8_lat4_optAdam_lr0.001_temp1.3.txt").write_text(
            "\n".join(",".join(map(str, r)) for r in rows))
    got = pf.read(tmp_path)
    assert got == {"straight_through": {"train_neg_elbo": [132.0, 2.0, 2],
                                        "test_neg_elbo": [132.5, 0.5, 2]}}


# ---- ours beside the published figures -----------------------------------------------------
def _records(values: dict, steps: int = 96_000) -> pd.DataFrame:
    """Tidy records of as-published cells: {estimator: [(train -ELBO, test -ELBO) per seed]}."""
    rows = []
    for est, per_seed in values.items():
        t_opts, e_opts = protocols.published_options("categorical_vae", est, {}, {})
        tname = tasks.get("categorical_vae", **t_opts).display_name
        ename = estimators.get(est, **e_opts).display_name
        for seed, (train, test) in enumerate(per_seed):
            base = dict(task=tname, estimator=ename, seed=seed, device="cpu", n_samples=1,
                        steps=steps)
            rows += [{**base, "step": steps // 2, "metric": "train_objective", "value": -999.0},
                     {**base, "step": steps, "metric": "train_objective", "value": -train},
                     {**base, "step": steps, "metric": "final_elbo", "value": -test}]
    return pd.DataFrame(rows)


def test_against_published_tests_each_figure_and_reads_the_last_point():
    pub = protocols.as_published("categorical_vae").published.values
    close = pub["reinmax"]["train_neg_elbo"][0]
    recs = _records({"reinmax": [(close - 0.2, 127.0), (close + 0.2, 127.5)],
                     "straight_through": [(140.0, 141.0), (140.2, 141.1)]})
    t = published.against_published(recs).set_index(["estimator", "figure"])
    row = t.loc[("reinmax", "train_neg_elbo")]
    assert row.ours_mean == pytest.approx(close) and row.ours_n == 2  # the last point, not -999
    assert row.verdict == "reproduced" and row.p_value > 0.5
    far = t.loc[("straight_through", "train_neg_elbo")]
    assert far.difference == pytest.approx(140.1 - pub["straight_through"]["train_neg_elbo"][0])
    assert far.verdict == "ours higher" and far.p_value < 0.05
    assert far.difference_se == pytest.approx(math.sqrt(0.1 ** 2 * 2 / 2 + 0.4329 ** 2), rel=1e-3)


def test_orderings_name_the_swapped_pairs():
    recs = _records({"reinmax": [(128.0, 129.0), (128.2, 129.2)],      # worse than st_gumbel here
                     "st_gumbel": [(127.0, 128.0), (127.2, 128.2)],
                     "straight_through": [(136.0, 137.0), (136.4, 137.2)]})
    orders = {o.figure: o for o in published.orderings(published.against_published(recs))}
    o = orders["train_neg_elbo"]
    assert o.published == ("reinmax", "st_gumbel", "straight_through")
    assert o.ours == ("st_gumbel", "reinmax", "straight_through") and not o.agrees
    assert o.flipped == (("reinmax", "st_gumbel", True),)  # the source separates them


def test_a_cut_run_is_shown_but_not_comparable():
    t = published.against_published(_records({"gst": [(300.0, 301.0)]}, steps=50))
    assert set(t.verdict) == {"not comparable"} and set(t.steps) == {50}
    assert published.orderings(t) == []


def test_cells_at_other_settings_are_not_held_against_the_source():
    recs = _records({"reinmax": [(125.0, 127.0), (125.1, 127.1)]})
    recs["task"] = "categorical_vae[binarize=none]"  # the equal-settings paper budget
    assert published.against_published(recs).empty


@pytest.mark.slow
def test_run_published_mode_end_to_end(tmp_path, capsys):
    """`estbench run --budget published`, cut to a few steps: each method's settings, the mode in
    meta.json and the report, and the report's section beside the published figures."""
    out = tmp_path / "pub"
    code = main(["run", "--tasks", "categorical_vae[iwae_samples=2,val_size=20]",
                 "--estimators", "reinmax,straight_through,rloo", "--budget", "published",
                 "--steps", "3", "--checkpoints", "1", "--measure-samples", "4",
                 "--eval-points", "2", "--seeds", "0", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "skipping categorical_vae x rloo: the source did not run it" in captured.err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["budget"] == "published" and meta["mode"].startswith("as published")
    mode = {**protocols.as_published("categorical_vae").task_options, "iwae_samples": 2,
            "val_size": 20}
    assert set(meta["budgets"]) == {tasks.get("categorical_vae", **{**mode, "lr": lr}).display_name
                                    for lr in (0.0005, 0.001)}
    assert main(["report", str(out)]) == 0
    report = (out / "report" / "report.md").read_text()
    assert "mode: `as published" in report
    assert report.count("Not a fair comparison.") == 2  # above the glance and the leaderboard
    section = report.split("## Against the published figures")[1].split("\n## ")[0]
    assert "| `reinmax` | reinmax | test -ELBO |" in section and "3 steps" in section
    assert "not comparable" in section and "62697d17038664542002056e6c51e7b5c6f3d577" in section
    csv = pd.read_csv(out / "report" / "against_published.csv")
    assert set(csv.estimator) == {"reinmax", "straight_through"} and len(csv) == 4


# ---- the settings the mode needs ------------------------------------------------------------
def test_straight_through_temperature_is_the_reinmax_codes_st():
    """Sample by sample: forward the one-hot sample, backward through softmax(logits / tau), as
    ``st`` in LiyuanLucasLiu/ReinMax mnist_vae/model/basic.py (transcribed here)."""
    logits = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    dist = torch.distributions.Independent(torch.distributions.OneHotCategorical(logits=logits), 1)
    torch.manual_seed(3)
    z = estimators.get("straight_through", temperature=1.3).sample(dist, 2, "categorical")
    (g,) = torch.autograd.grad((z * w).sum(), logits)
    hard = z.detach()
    prob = (logits / 1.3).softmax(-1)
    ref = hard - prob.detach() + prob
    (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(z.detach(), hard)
    torch.testing.assert_close(g, g_ref)
    dist = torch.distributions.Independent(torch.distributions.OneHotCategorical(logits=logits), 1)
    plain = estimators.get("straight_through").sample(dist, 2, "categorical")
    (g1,) = torch.autograd.grad((plain * w).sum(), logits)
    assert not torch.allclose(g1, g)  # tau changes the backward


def test_all_training_images_train_and_the_test_images_are_held_out():
    t = tasks.get("categorical_vae", training_images=60_000, batch_size=100, binarize="none")
    t.setup("cpu", torch.Generator().manual_seed(0))
    assert len(t._train_u8) == 60_000 and t._val is t._test
    batches = t.train_batches(torch.Generator().manual_seed(1))
    seen = torch.cat([next(batches) for _ in range(600)])  # one epoch: 600 batches of 100
    assert seen.shape == (60_000, 784)
    # every training image once per epoch, the last 10k included
    tail = t._train_u8[50_000:].float().div(255)
    assert torch.isin(tail.sum(1), seen.sum(1)).all()
    default = tasks.get("categorical_vae")
    default.setup("cpu", torch.Generator().manual_seed(0))
    assert len(default._train_u8) == 50_000 and default._val is not default._test


def test_radam_is_the_optimiser_when_asked():
    t = tasks.get("categorical_vae", optimizer="radam")
    t.setup("cpu", torch.Generator().manual_seed(0))
    assert isinstance(t.make_optimizer(), torch.optim.RAdam)


@pytest.mark.slow
def test_training_objective_is_per_data_point():
    """The mean training objective does not scale with the batch size (it did: a batch's sum)."""
    from estbench.engine.train import run_cell
    from estbench.engine.cell import Cell
    from estbench.core.budget import Budget

    got = {}
    for b in (4, 16):
        cell = Cell(f"categorical_vae[batch_size={b},binarize=none,val_size=10,iwae_samples=2]",
                    "reinmax", 0, "cpu", Budget(steps=2, n_samples=1, checkpoints=0, eval_points=2))
        res = run_cell(cell)
        assert res.status == "ok", res.error
        got[b] = [r["value"] for r in res.records if r["metric"] == "train_objective"][-1]
    assert 0.8 < got[16] / got[4] < 1.25, got


def test_every_report_names_the_mode_even_of_folders_made_before_meta_said_it():
    from estbench.report import render

    items = render._meta_items({"budget": "quick"}, Path("old-run"))
    assert ["mode: ", ("code", protocols.MODES["quick"])] in items
    items = render._meta_items({"budget": "published", "mode": "as published: x"}, Path("r"))
    assert ["mode: ", ("code", "as published: x")] in items


def test_cells_of_two_devices_are_two_comparisons():
    recs = _records({"reinmax": [(125.0, 127.0), (125.2, 127.2)]})
    cuda = recs.assign(device="cuda", value=recs.value - 10.0)
    t = published.against_published(pd.concat([recs, cuda], ignore_index=True))
    train = t[t.figure == "train_neg_elbo"].set_index("device")
    assert train.loc["cpu"].ours_mean == pytest.approx(125.1)
    assert train.loc["cuda"].ours_mean == pytest.approx(135.1) and train.loc["cuda"].ours_n == 2
