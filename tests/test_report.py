"""The report, the leaderboard and ``compare``: end to end on a tiny run, and on hand-made records
whose answers are known."""
from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest

pytest.importorskip("scipy")
pytest.importorskip("seaborn")

from estbench.engine import store  # noqa: E402
from estbench.core.budget import Budget  # noqa: E402
from estbench.cli.commands import main  # noqa: E402
from estbench.analysis.compare import compare, render  # noqa: E402
from estbench.report import build_report  # noqa: E402
from estbench.analysis.leaderboard import leaderboard, rank_with_ties  # noqa: E402
from estbench.analysis.stats import mean_ci  # noqa: E402
from estbench.analysis.figures import per_cell  # noqa: E402
from estbench.analysis.tables import task_tables  # noqa: E402
from estbench.engine.train import Cell, CellResult  # noqa: E402

TINY = ["--steps", "4", "--checkpoints", "2", "--measure-samples", "8", "--seeds", "0,1"]


# ---- a tiny real run, reported through the CLI ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    run = root / "run"
    rc = main(["run", "--tasks", "toy_binary,toy_gaussian", "--estimators",
               "rloo,reinforce,gumbel_softmax", *TINY, "--out", str(run), "--quiet"])
    assert rc == 0
    return run


@pytest.mark.slow
def test_report_end_to_end(tiny_run, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(tiny_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed
    assert "leaderboard by final ELBO" in printed and "rloo" in printed

    md = (out / "report.md").read_text()
    for f in ["report.html", "leaderboard.csv", "leaderboard.md", "tables/all_tasks.csv",
              "tables/toy_binary.csv", "tables/toy_binary.tex", "tables/toy_gaussian.tex",
              "figures/rank_heatmap.png", "figures/rank_heatmap.svg", "figures/bias_variance.png",
              "figures/step_time.svg", "figures/curves_toy_binary.png",
              "figures/curves_toy_gaussian.svg"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    # the markdown links the images it shows, and they exist
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images and all((out / p).is_file() for p in images)
    assert "### toy_binary" in md and "`gumbel_softmax`" in md and "**" in md  # best marked
    # what each ranking measures: a section, one entry per criterion, linked from the contents
    from estbench.analysis import leaderboard as lb

    section = md.split("## What each ranking measures, and when to trust it", 1)[1].split("\n## ", 1)[0]
    assert "(#what-each-ranking-measures-and-when-to-trust-it)" in md
    for crit in lb.CRITERIA:
        assert crit.meaning and f"**By {crit.title}**: {crit.meaning}" in section, crit.name
    # the HTML is self-contained: every image is a data URI
    html = (out / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == len(images) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<table>" in html and "<strong>" in html
    # CSV and LaTeX carry the same numbers: the per-task table of the tidy records
    csv = pd.read_csv(out / "tables" / "toy_binary.csv")
    assert set(csv.estimator) == {"rloo", "reinforce", "gumbel_softmax"}
    assert {"final_elbo_mean", "final_elbo_ci", "final_elbo_best", "log10_variance_mean"} <= set(csv)
    records, _ = store.load(tiny_run)
    fe = records[(records.task == "toy_binary") & (records.estimator == "rloo")
                 & (records.metric == "final_elbo")].value
    assert csv.set_index("estimator").loc["rloo", "final_elbo_mean"] == pytest.approx(fe.mean())
    tex = (out / "tables" / "toy_binary.tex").read_text()
    assert r"\toprule" in tex and r"\pm" in tex and r"gumbel\_softmax" in tex
    board = pd.read_csv(out / "leaderboard.csv")
    assert set(board.criterion) == {"final_elbo", "elbo_at_time", "grad_error", "variance",
                                    "error_x_time", "error_x_evals", "step_time"}
    sizes = board[board.task == "overall"].groupby("criterion").size()
    unbiased_only = ["variance", "error_x_time", "error_x_evals"]
    assert (sizes.drop(unbiased_only) == 3).all() and (sizes[unbiased_only] <= 3).all()
    assert "## At a glance" in md and "## Bias test" in md and "Rank stability" in md
    # a table of contents whose links work in the markdown and the HTML alike; wide tables scroll
    assert "- [At a glance](#at-a-glance)" in md and "- [Bias test](#bias-test)" in md
    assert 'id="at-a-glance"' in html and 'href="#bias-test"' in html and '<div class="scroll">' in html
    st = pd.read_csv(out / "stability.csv")
    assert set(st.criterion) >= {"final_elbo", "grad_error"} and set(st.task) == {"toy_binary", "toy_gaussian"}
    assert "log10_grad_error_mean" in csv and "bias_p" in csv
    # across tasks: two tasks cannot make a Friedman test reach p < 0.05, and the report says so;
    # the performance profiles need no complete design
    assert "## Across tasks: Friedman test and critical differences" in md and "untestable" in md
    fr = pd.read_csv(out / "friedman.csv")
    assert set(fr.status.str.split(":").str[0]) == {"untestable"} and set(fr.tasks) <= {2}
    assert "## Performance profiles" in md and (out / "figures/performance_profiles.png").is_file()
    prof = pd.read_csv(out / "performance_profiles.csv")
    assert set(prof.criterion) >= {"grad_error", "step_time"} and prof.rho.between(0, 1).all()


# ---- statistics on known numbers -------------------------------------------------------------------
def test_mean_ci_student_t():
    m, hw, n = mean_ci([1, 2, 3, 4, 5])
    # sd = sqrt(2.5), t_{0.975, 4} = 2.776445
    assert (m, n) == (3.0, 5)
    assert hw == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-5)
    m, hw, n = mean_ci([2.0, float("nan")])
    assert (m, n) == (2.0, 1) and math.isnan(hw)
    assert math.isnan(mean_ci([])[0])


def _pc(values: dict, task="T", column="final_elbo") -> pd.DataFrame:
    rows = [{"task": task, "estimator": e, "seed": s, column: v}
            for e, vs in values.items() for s, v in enumerate(vs)]
    return pd.DataFrame(rows)


def _ranks(values: dict, higher=True) -> dict:
    df = _pc(values).rename(columns={"final_elbo": "value"})
    r = rank_with_ties(df, higher)
    return dict(zip(r.estimator, r["rank"]))


def test_leaderboard_clear_winner_and_ties():
    a = [10.0, 10.2, 9.9, 10.1, 10.0]
    b = [5.0, 5.3, 4.8, 5.1, 5.2]
    c = [x + d for x, d in zip(b, [0.1, -0.2, 0.15, -0.05, 0.0])]  # indistinguishable from b
    assert _ranks({"A": a, "B": b, "C": c}) == {"A": 1, "B": 2, "C": 2}
    # a tie at the top: competition ranking 1, 1, 3
    a2 = [x + d for x, d in zip(a, [0.1, -0.1, 0.05, -0.1, 0.0])]
    assert _ranks({"A": a, "A2": a2, "B": b}) == {"A": 1, "A2": 1, "B": 3}
    # lower is better (variance, time) flips the order
    assert _ranks({"A": a, "B": b, "C": c}, higher=False) == {"B": 1, "C": 1, "A": 3}
    # one seed: ties only on exact equality
    assert _ranks({"A": [1.0], "B": [1.0], "C": [0.5]}) == {"A": 1, "B": 1, "C": 3}
    assert _ranks({"A": [1.0], "B": [0.9999]}) == {"A": 1, "B": 2}
    # a constant paired difference is certain, however small
    assert _ranks({"A": [1.0, 2.0, 3.0], "B": [0.99, 1.99, 2.99]}) == {"A": 1, "B": 2}


def test_leaderboard_overall_mean_rank_over_tasks():
    pc = pd.concat([_pc({"A": [3.0, 3.1, 2.9], "B": [1.0, 1.2, 0.9]}, task="T1"),
                    _pc({"A": [1.0, 1.1, 0.9], "B": [3.0, 3.2, 2.9], "C": [0.0, 0.1, -0.1]},
                        task="T2")])
    pc["log10_variance"] = 0.0
    pc["step_ms"] = 1.0
    board = leaderboard(pc)
    overall = board[(board.criterion == "final_elbo") & (board.task == "overall")]
    mean = dict(zip(overall.estimator, overall["mean"]))
    assert mean == {"A": 1.5, "B": 1.5, "C": 3.0}
    assert dict(zip(overall.estimator, overall.tasks)) == {"A": 2, "B": 2, "C": 1}
    # equal mean ranks, but A's second place is in a field of 3 (relative 0.5) and B's in a field
    # of 2 (relative 1): the overall order is by mean relative rank
    rel = dict(zip(overall.estimator, overall["relative"]))
    assert rel == {"A": 0.25, "B": 0.5, "C": 1.0}
    assert dict(zip(overall.estimator, overall["rank"])) == {"A": 1, "B": 2, "C": 3}
    # equal variances everywhere: all tie
    var = board[(board.criterion == "variance") & (board.task != "overall")]
    assert set(var["rank"]) == {1}


def test_variance_ranking_leaves_out_what_the_bias_test_rejects():
    """A deterministic biased estimator (zero variance, bias test p ~ 0) is not ranked by variance,
    and is not marked best in the variance column; it is ranked by gradient error with the rest."""
    pc = _pc({"A": [1.0, 1.1, 0.9], "B": [0.5, 0.4, 0.6], "C": [2.0, 2.1, 1.9]})
    pc["log10_variance"] = pc.estimator.map({"A": 0.0, "B": -math.inf, "C": 1.0})
    pc["log10_grad_error"] = pc.estimator.map({"A": 0.1, "B": 2.0, "C": 1.1})
    pc["bias_p"] = pc.estimator.map({"A": 0.5, "B": 1e-9, "C": 0.4})
    pc["step_ms"] = 1.0
    board = leaderboard(pc)
    var = board[(board.criterion == "variance") & (board.task == "T")]
    assert set(var.estimator) == {"A", "C"} and dict(zip(var.estimator, var["rank"]))["A"] == 1
    err = board[(board.criterion == "grad_error") & (board.task == "T")]
    assert dict(zip(err.estimator, err["rank"])) == {"A": 1, "C": 2, "B": 3}
    for col in ("final_elbo", "bias", "n_evals", "step_time", "diverged", "grad_error", "variance"):
        pc[col] = pc.get(col, 0.0)
    pc["log10_variance"] = pc["log10_variance"].astype(float)
    pc["device"] = "cpu"
    t = task_tables(pc)["T"].set_index("estimator")
    assert not t.loc["B", "log10_variance_best"] and t.loc["A", "log10_variance_best"]


def test_work_normalised_error_is_error_times_cost():
    """Glynn & Whitt: an estimator twice as accurate at four times the cost is worse at equal
    compute."""
    records = []
    for est, err, ms, evals in [("cheap", 4.0, 1.0, 2), ("dear", 2.0, 4.0, 8)]:
        for seed in (0, 1):
            base = {"task": "T", "estimator": est, "seed": seed, "device": "cpu", "n_samples": 8,
                    "steps": 10}
            records += [{**base, "step": 0, "metric": "grad_error", "value": err},
                        {**base, "step": 0, "metric": "variance", "value": err},
                        {**base, "step": 10, "metric": "step_time", "value": ms / 1e3},
                        {**base, "step": 10, "metric": "n_evals", "value": evals},
                        {**base, "step": 10, "metric": "final_elbo", "value": -1.0}]
    pc = per_cell(pd.DataFrame(records)).set_index("estimator")
    assert pc.loc["cheap", "log10_error_x_ms"].iloc[0] == pytest.approx(math.log10(4.0))
    assert pc.loc["dear", "log10_error_x_ms"].iloc[0] == pytest.approx(math.log10(8.0))
    assert pc.loc["dear", "log10_error_x_evals"].iloc[0] == pytest.approx(math.log10(16.0))
    board = leaderboard(pc.reset_index())
    r = board[(board.criterion == "error_x_time") & (board.task == "T")]
    assert dict(zip(r.estimator, r["rank"])) == {"cheap": 1, "dear": 2}


@pytest.mark.slow
def test_rank_stability_marks_a_clear_order_stable_and_noise_inconclusive():
    from estbench.analysis.leaderboard import stability

    clear = _pc({"A": [10.0, 10.1, 9.9, 10.0, 10.2], "B": [5.0, 5.1, 4.9, 5.2, 5.0],
                 "C": [1.0, 1.1, 0.9, 1.0, 1.2]})
    g = __import__("numpy").random.default_rng(0)
    noisy = _pc({e: list(g.normal(0, 1, 5)) for e in "ABCD"}, task="N")
    pc = pd.concat([clear, noisy], ignore_index=True)
    st = stability(pc).set_index(["criterion", "task"])
    assert st.loc[("final_elbo", "T"), "stable"] and st.loc[("final_elbo", "T"), "median_tau"] == 1.0
    assert st.loc[("final_elbo", "T"), "leader"] == "A"
    assert st.loc[("final_elbo", "T"), "leader_kept"] == 1.0
    assert not st.loc[("final_elbo", "N"), "stable"]
    one_seed = _pc({"A": [1.0], "B": [2.0]}, task="S")
    assert not stability(one_seed).set_index("task").loc["S", "stable"]


# ---- hand-made run folders: compare, rationales, failed cells -----------------------------------
def _write_cell(run, task, est, seed, elbo, var, bias=0.1, step_time=0.002, status="ok",
                error="", artifacts=None, steps=10, bias_noise=None):
    cell = Cell(task, est, seed, "cpu", Budget(steps=steps, n_samples=4, checkpoints=2,
                                               measure_samples=8))
    recs = []

    def rec(step, metric, value):
        recs.append({"task": task, "estimator": est, "seed": seed, "device": "cpu", "n_samples": 4,
                     "steps": steps, "step": step, "metric": metric, "value": float(value)})
    if status in ("ok", "diverged"):
        for step in (0, steps):
            rec(step, "bias", bias)
            if bias_noise is not None:
                rec(step, "bias_noise", bias_noise)
            rec(step, "variance", var)
            rec(step, "elbo", elbo - 1.0 + step / steps)
            rec(step, "wall_time", step * step_time)
    if status == "ok":
        if task == "sst_rationales":  # a task's own final figure
            rec(steps, "dev_accuracy", 0.25 + 0.1 * seed)
        rec(steps, "final_elbo", elbo)
        rec(steps, "n_evals", 4)
        rec(steps, "step_time", step_time)
    rec(steps, "diverged", 1.0 if status == "diverged" else 0.0)
    res = CellResult(cell, status, recs, error=error, artifacts=artifacts or {})
    store.write_cell(run, cell.key(f"seed{seed}"), res)


NOISE = [0.3, -0.25, 0.05, -0.1]


def _synthetic_run(run, elbo_e1=-10.0, elbo_e2=-20.0, var_e1=1.0, extra=None):
    for s, n in enumerate(NOISE):
        _write_cell(run, "toy", "e1", s, elbo_e1 + 0.01 * n, var_e1 * (1 + 0.01 * n))
        # e2 is noisy from seed to seed
        _write_cell(run, "toy", "e2", s, elbo_e2 + 10 * n, 2.0 * (1 + 0.5 * n))
    if extra:
        extra(run)
    return run


@pytest.mark.slow
def test_compare_flags_a_regression_not_noise(tmp_path, capsys):
    a = _synthetic_run(tmp_path / "a")
    # e1's ELBO 30% worse, clearly outside its tiny noise; e2's shifts 15% inside large noise
    b = _synthetic_run(tmp_path / "b", elbo_e1=-13.0, elbo_e2=-23.0)
    df, regressed, _ = compare(a, b)
    assert regressed
    row = df.set_index(["estimator", "metric"])
    assert row.loc[("e1", "final_elbo"), "regressed"]
    assert row.loc[("e1", "final_elbo"), "rel_change"] == pytest.approx(-0.3, abs=1e-3)
    assert not row.loc[("e2", "final_elbo"), "outside_noise"]
    assert not row.loc[("e2", "final_elbo"), "regressed"]
    assert not row.loc[("e1", "variance"), "regressed"]
    assert "REGRESSED" in render(df)
    # within the tolerance (3 nats worse, 5 allowed): outside the noise but not a regression
    _, regressed, _ = compare(a, b, {"final_elbo": 5.0})
    assert not regressed
    # an improvement is never a regression
    _, regressed, _ = compare(b, a)
    assert not regressed
    # a run against itself: nothing outside the noise
    df, regressed, _ = compare(a, a)
    assert not regressed and not df.outside_noise.any()

    # the CLI: exit 1 on a regression, 0 otherwise, JSON on request
    assert main(["compare", str(a), str(b)]) == 1
    assert "REGRESSED" in capsys.readouterr().out
    assert main(["compare", str(a), str(b), "--tolerance", "final_elbo=5"]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(a), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["regressed"] is False and len(payload["rows"]) == 2 * 5  # estimators x metrics
    assert main(["compare", str(a), str(b), "--threshold", "ten"]) == 2
    assert "--threshold" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_one_seed_uses_the_threshold_and_variance_regressions(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_cell(a, "toy", "e", 0, -10.0, 1.0)
    _write_cell(b, "toy", "e", 0, -10.5, 1.5)  # ELBO 0.5 worse (< 1), variance 50% higher (> 25%)
    df, regressed, _ = compare(a, b)
    row = df.set_index("metric")
    assert regressed and row.loc["variance", "regressed"] and not row.loc["final_elbo", "regressed"]
    assert math.isnan(row.loc["variance", "p_value"])


@pytest.mark.slow
def test_compare_cell_that_starts_failing_is_a_regression(tmp_path):
    a = _synthetic_run(tmp_path / "a")
    b = _synthetic_run(tmp_path / "b", extra=lambda r: _write_cell(
        r, "toy", "e1", 9, 0, 0, status="diverged", error="non-finite surrogate at step 3"))
    df, regressed, _ = compare(a, b)
    assert regressed and (df.metric == "status").sum() == 1


def test_missing_folder_one_clear_message(tmp_path, capsys):
    missing = tmp_path / "nope"
    ok = _synthetic_run(tmp_path / "ok")
    for argv in (["report", str(missing)], ["compare", str(missing), str(ok)],
                 ["compare", str(ok), str(missing)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(missing) in err[0] and "Traceback" not in err[0]
    # a folder that is not a results folder
    assert main(["report", str(tmp_path)]) == 2
    assert "not an estbench results folder" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nope"):
        build_report(missing)


@pytest.mark.slow
def test_report_rationales_and_problem_cells(tmp_path):
    rationales = [{"tokens": ["a", "*great*", "film", "<b>"], "selected": [False, True, False, True],
                   "label": 4, "prediction": 3, "q": [0.1, 0.9, 0.3, 0.6]}]

    def extra(run):
        _write_cell(run, "sst_rationales", "e1", 0, -5.0, 1.0, artifacts={"rationales": rationales})
        _write_cell(run, "sst_rationales", "e2", 0, -6.0, 2.0, artifacts={"rationales": rationales})
        _write_cell(run, "toy", "bad", 0, 0, 0, status="failed", error="RuntimeError: boom")
        _write_cell(run, "toy", "e3", 0, 0, 0, status="diverged", error="non-finite at step 3")

    run = _synthetic_run(tmp_path / "run", extra=extra)
    path = build_report(run)
    assert path == run / "report" / "report.md"
    md = path.read_text()
    html = (run / "report" / "report.html").read_text()
    assert "Example rationales" in md and r"**\*great\***" in md and "a **\\*great\\*** film" in md
    assert "<mark>*great*</mark>" in html and "<mark>&lt;b&gt;</mark>" in html
    assert "label 4, prediction 3, 2/4 tokens selected" in md
    # the task's own final figures get their own table (only for the task that records them)
    assert "| estimator | dev_accuracy |" in md and "| `e1` | 0.2500 |" in md
    assert (run / "report" / "tables" / "sst_rationales_figures.csv").is_file()
    assert not (run / "report" / "tables" / "toy_figures.csv").exists()
    # the per-token probabilities are summarised: an all-below-1/2 q would otherwise show nothing
    assert "q from 0.10 to 0.90, highest: '\\*great\\*' 0.90, '\\<b>' 0.60, 'film' 0.30" in md
    assert "RuntimeError: boom" in md and "diverged" in md and "non-finite at step 3" in md
    # the per-task table marks the best ELBO and leaves out the estimator with no data at all
    records, _ = store.load(run)
    t = task_tables(per_cell(records))["toy"]
    assert "bad" not in set(t.estimator)
    best = t[t.final_elbo_best].estimator.tolist()
    assert best == ["e1"]


@pytest.mark.slow
def test_report_shows_the_friedman_test_and_critical_differences_across_tasks(tmp_path):
    """Four tasks on which e1 > e2 > e3 every time: the Friedman statistic takes its largest value,
    N(k - 1) = 8 on 2 df (p = 0.018), and the report's section shows the test and its diagram
    (the section alone: the whole report is built by test_report_end_to_end)."""
    from estbench.analysis import leaderboard as lb
    from estbench.report import plots, render

    rows = [{"task": task, "estimator": est, "seed": s, "final_elbo": elbo + n,
             "log10_grad_error": -elbo / 10 + n, "step_ms": 1.0}  # every step time ties
            for task in ["ta", "tb", "tc", "td"] for s, n in enumerate(NOISE[:2])
            for est, elbo in [("e1", -10.0), ("e2", -20.0), ("e3", -30.0)]]
    pc = pd.DataFrame(rows)
    friedman = lb.friedman_tests(pc)
    fr = friedman[0]
    elbo = fr[(fr.criterion == "final_elbo") & (fr.comparison == "all tasks")]
    assert elbo.estimator.tolist() == ["e1", "e2", "e3"] and elbo.conclusive.all()
    assert elbo.chi2.iloc[0] == pytest.approx(8.0)
    assert elbo.p.iloc[0] == pytest.approx(0.0183, abs=1e-4)
    step = fr[fr.criterion == "step_time"]
    assert step.status.tolist() == ["untestable: the estimators tie on every task"]
    doc = render.Document("t")
    doc.add(*render._across_tasks_blocks(friedman, lb.performance_profiles(pc),
                                         plots.Style(pc.estimator), tmp_path / "figures"))
    md, html = doc.markdown(tmp_path), doc.html(tmp_path)
    section = md[md.index("## Across tasks"):md.index("## Performance profiles")]
    assert "| final elbo | all tasks | 4 x 3 | 8.0 | 0.018 | **conclusive** |" in section
    assert "| step time | all tasks | 4 x 3 | - |" in section
    assert "](figures/critical_difference_final_elbo.png)" in section
    assert (tmp_path / "figures/critical_difference_final_elbo.svg").is_file()
    assert "](figures/performance_profiles.png)" in md
    assert html.count('src="data:image/png;base64,') == len(re.findall(r"!\[[^\]]*\]\(", md)) == 3


@pytest.mark.slow
def test_compare_ignores_float_noise_on_zero_bias_and_variance(tmp_path):
    """An exact estimator's bias moving from 6e-9 to 6e-8 is float noise, not a 900% regression
    (the bias is compared net of its noise floor, here 0)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for s in range(3):
        _write_cell(a, "toy", "exact", s, -1.0, 0.0, bias=6e-9 * (1 + 0.01 * s), bias_noise=0.0)
        _write_cell(b, "toy", "exact", s, -1.0, 0.0, bias=6e-8 * (1 + 0.01 * s), bias_noise=0.0)
    df, regressed, _ = compare(a, b)
    row = df.set_index("metric")
    assert not regressed and not row.loc["net_bias", "outside_noise"]
    # the same relative change at a real scale is a regression
    _, regressed, _ = compare(a, b, atol=1e-12)
    assert regressed


def test_an_estimator_is_found_biased_only_when_most_of_its_cells_reject():
    """One rejecting cell of five is not a verdict (a rare-event false alarm looks like that); a
    bias that repeats in three of five is."""
    from estbench.analysis.tables import estimator_bias

    pc = _pc({"lone": [1.0] * 5, "real": [1.0] * 5, "none": [1.0] * 5})
    pc["bias_p"] = [1e-9, 0.5, 0.8, 0.3, 0.9] + [1e-9, 1e-4, 0.2, 1e-6, 0.7] + [0.5] * 5
    v = estimator_bias(pc).loc["T"]
    assert dict(v["rejecting"]) == {"lone": 1, "none": 0, "real": 3}
    assert dict(v["biased"]) == {"lone": False, "none": False, "real": True}
    assert v.loc["lone", "p"] == pytest.approx(5e-9)


def test_every_estimator_has_its_own_look_and_neighbours_differ():
    """20+ estimators are told apart by colour, marker and line style; names next to each other
    in sorted order (arm / arms, gumbel_rao / gumbel_softmax) differ in all three.  (That no two
    colours are shades of one hue is test_report_views' colour test; an oracle is a black
    reference line.)"""
    import estimators
    import numpy as np
    from estbench.report.plots import Style, to_lab

    names = estimators.available()
    st = Style(names)
    looks = {(st.colour[e], st.marker[e], str(st.linestyle[e])) for e in names}
    assert len(looks) == len(names)
    rivals = [e for e in names if not st.is_oracle(e)]
    for a, b in zip(rivals, rivals[1:]):  # e.g. arm / arms, reinforce / reinforce_ema
        assert float(((to_lab(st.colour[a]) - to_lab(st.colour[b])) ** 2).sum() ** 0.5) > 20, (a, b)
        assert st.marker[a] != st.marker[b] and st.linestyle[a] != st.linestyle[b]
    # line_kw draws each estimator in its own look; the oracles are the reference lines: black /
    # grey, dashed, no marker, and no rival is drawn in a colour that could pass for one
    for e in names:
        kw = st.line_kw(e)
        assert (kw["color"], kw["marker"] or "", kw["linestyle"]) == (st.colour[e], st.marker[e], st.linestyle[e])
    oracles = [e for e in names if st.is_oracle(e)]
    assert oracles == ["exact"]
    assert st.line_kw("exact")["color"] == (0.0, 0.0, 0.0) and st.line_kw("exact")["marker"] is None
    assert st.line_kw("exact")["linestyle"] == "--" and st.label("exact") == "exact (oracle reference)"
    for e in rivals:
        assert st.marker[e] and st.label(e) == e
        # far from black and the oracles' greys (CIELAB chroma): never mistaken for a reference line
        assert float(np.hypot(*to_lab(st.colour[e])[1:])) >= 20, (e, st.colour[e])
