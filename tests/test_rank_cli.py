"""``estbench rank`` and ``estbench run`` as a user meets them (issue 19): a biased plug-in gets a
rank, a reference that is not there is an error, ties are said, timings from two environments are
not mixed, a plug-in that cannot run costs no rival's cell, and a run where nothing finished says
why.  Every test drives ``estbench.cli.commands`` end to end, and each failed on the code before
(fb811d1): a traceback, a silent exit 0, or a rank without its ties.
"""
from __future__ import annotations

import warnings

import pytest

pytest.importorskip("scipy")

import estimators  # noqa: E402
from estbench.analysis import rank  # noqa: E402
from estbench.engine import store
from estbench.cli.commands import main  # noqa: E402

TINY = ["--steps", "20", "--checkpoints", "2", "--measure-samples", "16", "--quiet"]

PLUGINS = '''
import torch
from estimators import Estimate, Estimator
from estimators import families as fam


class HalfRLOO(Estimator):
    """RLOO with half its score term: biased towards zero (a test plug-in; Kool et al. 2019)."""
    name = "half_rloo_t"
    families = frozenset({"bernoulli"})
    unbiased = False
    paper = "Kool, van Hoof & Welling (2019), Eq. 8, halved"
    min_samples = 2

    def _estimate(self, dist, f, n, context, family):
        z = dist.sample((n,))
        fz = f(z)
        fd = fz.detach()
        base = (fd.sum(0, keepdim=True) - fd) / (n - 1)
        return Estimate((0.5 * (fd - base) * fam.log_prob(dist, z) + fz).mean(0).sum(),
                        fd.mean(0), n)


class Needy(Estimator):
    """REINFORCE that needs 1000 evaluations: infeasible at every budget here (a test plug-in;
    Williams 1992, Eq. 7)."""
    name = "needy_t"
    families = frozenset({"bernoulli"})
    unbiased = True
    paper = "Williams (1992), Eq. 7"
    min_samples = 1000

    def _estimate(self, dist, f, n, context, family):
        z = dist.sample((n,))
        fz = f(z)
        return Estimate((fz.detach() * fam.log_prob(dist, z) + fz).mean(0).sum(),
                        fz.detach().mean(0), n)


class Diverges(Needy):
    """REINFORCE whose estimate turns NaN after the contract's checks: every cell diverges (a
    test plug-in; Williams 1992, Eq. 7)."""
    name = "diverges_t"
    min_samples = 1
    calls = 0

    def _estimate(self, dist, f, n, context, family):
        type(self).calls += 1
        est = super()._estimate(dist, f, n, context, family)
        scale = 1.0 if type(self).calls <= 2 else float("nan")
        return Estimate(est.surrogate * scale, est.value, n)
'''


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugins") / "plugins.py"
    path.write_text(PLUGINS)
    yield path
    for name in ("half_rloo_t", "needy_t", "diverges_t"):
        try:
            estimators.unregister(name)
        except Exception:
            pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """toy_binary with three rivals, two seeds, timed with two parallel jobs."""
    ref = tmp_path_factory.mktemp("ref") / "reference"
    assert main(["run", "--tasks", "toy_binary", "--estimators", "rloo,disarm,reinforce",
                 "--seeds", "0,1", "-j", "2", *TINY, "--out", str(ref)]) == 0
    return ref


def _rank(plugins, cls, reference, out, *extra):
    return main(["rank", f"{plugins}:{cls}", "--tasks", "toy_binary", "--reference", str(reference),
                 "--out", str(out), "--no-report", *TINY, *extra])


# ---- rank -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_biased_plugin_is_ranked_not_a_traceback(plugins, reference, tmp_path, capsys):
    # fb811d1: ValueError "'task' is both an index level and a column label" in rank.placement
    assert _rank(plugins, "HalfRLOO", reference, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "where half_rloo_t ranks" in out and "by final ELBO:" in out
    assert "by variance: not ranked: the bias test finds it biased on toy_binary" in out


RIVALS = ["--estimators", "rloo,disarm,reinforce"]


@pytest.mark.slow
def test_ties_are_said_and_too_few_seeds_warned(plugins, reference, tmp_path, capsys):
    assert _rank(plugins, "HalfRLOO", reference, tmp_path / "out", *RIVALS) == 0
    out = capsys.readouterr().out
    elbo = out.split("by final ELBO:")[1].split("by ")[0]
    line = next(x for x in elbo.splitlines() if x.strip().startswith("toy_binary"))
    # with 2 seeds and Holm over the field's pairs nothing separates: a place interval and the
    # estimators it is tied with, not "1 of 4"
    assert " of 4 " in line and "tied with 3: " in line
    assert {"rloo", "disarm", "reinforce"} <= set(line.split("tied with 3: ")[1].rstrip(")").split(", "))
    assert "warning: toy_binary: 2 seeds cannot separate a field of 4" in out


@pytest.mark.slow
def test_timings_from_another_environment_are_not_ranked(plugins, reference, tmp_path, capsys):
    # the reference's rivals were timed under -j 2, the plug-in serially: no by-time verdict
    assert _rank(plugins, "HalfRLOO", reference, tmp_path / "out", *RIVALS) == 0
    out = capsys.readouterr().out
    for title in ("by time a step:", "by ELBO at equal time:"):
        block = out.split(title)[1].split("\n  by ")[0]
        assert "not comparable: timed in different environments (jobs 1 in A vs 2 in B)" in block, block
    # and the run's report says it, where its by-time rankings mix the two
    assert main(["report", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "Timed in different environments:" in md and "toy_binary (jobs 1/2)" in md


@pytest.mark.parametrize("make, says", [
    (lambda tmp: tmp / "nowhere", "does not exist"),
    (lambda tmp: (tmp / "file.txt").write_text("x") and tmp / "file.txt", "is a file, not a results folder"),
    (lambda tmp: (tmp / "empty" / "cells").mkdir(parents=True) or tmp / "empty", "holds no finished cell"),
])
def test_a_reference_that_is_not_there_is_an_error(plugins, tmp_path, capsys, make, says):
    # fb811d1 accepted all three silently ("0 reused") and recomputed every rival
    assert _rank(plugins, "HalfRLOO", make(tmp_path), tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("estbench: error: --reference") and says in err[0]
    assert not (tmp_path / "out" / "cells").exists()


@pytest.mark.slow
def test_the_shipped_reference_is_found_from_any_folder(plugins, reference, tmp_path, capsys,
                                                        monkeypatch):
    # fb811d1 read the relative results/reference: from elsewhere "0 reused", everything recomputed
    monkeypatch.setattr(rank, "shipped_reference", lambda: reference)
    monkeypatch.chdir(tmp_path)
    assert main(["rank", f"{plugins}:HalfRLOO", "--tasks", "toy_binary", "--out", "out",
                 "--no-report", *RIVALS, *TINY[:-1]]) == 0
    assert "6 reused from" in capsys.readouterr().err


@pytest.mark.parametrize("cls, status", [("Needy", "not run"), ("Diverges", "diverged")])
@pytest.mark.slow
def test_a_plugin_that_finishes_nothing_costs_no_rivals_cell(plugins, reference, tmp_path, capsys,
                                                             cls, status):
    # fb811d1 computed every rival's cell, then printed "has no finished cell, so it has no rank:"
    out = tmp_path / "out"
    assert main(["rank", f"{plugins}:{cls}", "--tasks", "toy_binary", "--reference", "none",
                 "--out", str(out), "--no-report", "--seeds", "0,1", *TINY]) == 1
    text = capsys.readouterr().out
    assert "finished no cell, so it has no rank and its rivals were not run:" in text
    assert f"toy_binary: {status}: " in text
    _, cells = store.load(out)
    assert set(cells.estimator) == {cls.lower() + "_t"}


@pytest.mark.slow
def test_rank_takes_estimators_and_the_paper_budget(plugins, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["rank", f"{plugins}:HalfRLOO", "--tasks", "toy_binary", "--estimators", "rloo",
                 "--reference", str(reference), "--out", str(out), "--no-report", *TINY]) == 0
    _, cells = store.load(out)
    assert set(cells.estimator) == {"half_rloo_t", "rloo"}
    # --budget paper is a choice of rank now; toy_binary has no published protocol: one line
    assert main(["rank", f"{plugins}:HalfRLOO", "--tasks", "toy_binary", "--budget", "paper",
                 "--reference", "none", "--out", str(tmp_path / "p"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "toy_binary" in err[0] and "protocol" in err[0]


# ---- run: the table and the runs where nothing finishes ------------------------------------------
@pytest.mark.slow
def test_the_run_table_shows_ties_the_bias_verdict_and_the_oracle(tmp_path, capsys):
    assert main(["run", "--tasks", "toy_binary", "--estimators", "rloo,reinforce,exact",
                 "--seeds", "0,1", *TINY, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()
            if line.split() and line.split()[0] in ("rloo", "reinforce", "exact")}
    assert rows["exact"].split()[1] == "oracle"
    assert rows["rloo"].split()[1].startswith("=1")  # tied with the best, not a bare order
    assert " ok " in rows["rloo"] and " ok " in rows["reinforce"]  # the bias test's verdict
    assert "bias: beyond its Monte Carlo noise floor" in out


def test_a_run_where_no_cell_finishes_says_why_and_fails(tmp_path, capsys):
    # every cell infeasible: fb811d1 printed "(no results)" and exited 0
    args = ["run", "--tasks", "toy_binary", "--estimators", "rloo", "--seeds", "0",
            "--n-samples", "1", *TINY, "--out", str(tmp_path / "r")]
    assert main(args) == 1
    cap = capsys.readouterr()
    assert "rloo: estimator 'rloo' cannot spend a budget of 1" in cap.out
    assert "estbench: error: no cell finished (1 not run)" in cap.err


def test_a_rerun_says_it_reused_failed_cells(tmp_path, capsys):
    run = tmp_path / "r"
    args = ["run", "--tasks", "toy_binary", "--estimators", "rloo", "--seeds", "0", *TINY,
            "--cell-timeout", "0.001", "--out", str(run)]
    assert main(args) == 1
    assert "failed in an earlier run" not in capsys.readouterr().err
    assert main(args) == 1  # stored as failed: reused, and said so
    err = capsys.readouterr().err
    assert "1 failed cell in" in err and "failed in an earlier run and were reused" in err


@pytest.mark.slow
def test_warnings_are_one_line_without_source_paths(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["run", "--tasks", "toy_binary", "--estimators", "rloo,disarm", "--seeds", "0",
                 *TINY, "--out", str(run)]) == 0
    victim = sorted((run / "cells").glob("*.parquet"))[0]
    victim.write_text("not a parquet file")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "warning" in x.lower()]
    assert lines and all(x.startswith("estbench: warning: ") for x in lines), err
    assert ".py:" not in err and "UserWarning" not in err
