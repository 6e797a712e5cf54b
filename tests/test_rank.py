"""``estbench rank``: a user's estimator from a file, checked, run, ranked, cells reused."""
from __future__ import annotations

import textwrap

import pytest

import estimators
from estbench.cli.commands import main

TINY = ["--steps", "4", "--checkpoints", "2", "--measure-samples", "8", "--seeds", "0,1", "--quiet"]

GOOD = '''
import torch
from estimators import Estimate, Estimator

class MyLOO(Estimator):
    """Leave-one-out REINFORCE written by a user (test only; Kool et al. 2019, Eq. 8)."""
    name = "my_loo_test_only"
    families = frozenset({"bernoulli"})
    unbiased = True
    paper = "Kool et al. (2019), Eq. 8"
    min_samples = 2

    def _estimate(self, dist, f, n, context, family):
        z = dist.sample((n,))
        fz = f(z)
        b = (fz.sum(0) - fz) / (n - 1)
        return Estimate(((fz - b).detach() * dist.log_prob(z) + fz).mean(0).sum(), fz.detach().mean(0), n)
'''

BAD = GOOD.replace('name = "my_loo_test_only"', 'name = "my_bad_test_only"').replace(
    "fz.detach().mean(0), n)", "fz.detach().mean(0), n + 1)")


@pytest.fixture
def cleanup():
    yield
    for n in ["my_loo_test_only", "my_bad_test_only"]:
        estimators.unregister(n)


@pytest.mark.slow
def test_rank_a_file_estimator_and_reuse_cells(tmp_path, capsys, cleanup):
    f = tmp_path / "my_est.py"
    f.write_text(textwrap.dedent(GOOD))
    out = tmp_path / "set"
    code = main(["rank", f"{f}:MyLOO", "--tasks", "toy_binary", "--out", str(out), "--no-report", *TINY])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "where my_loo_test_only ranks" in cap.out
    assert "toy_binary" in cap.out and "overall" in cap.out
    n_bernoulli = len(estimators.available("bernoulli"))
    assert f"of {n_bernoulli}" in cap.out or f"of {n_bernoulli - 1}" in cap.out  # exact may be infeasible
    # a second estimator ranked into the same set reuses every cell of the others
    code = main(["rank", "rloo", "--tasks", "toy_binary", "--out", str(out), "--no-report",
                 "--steps", "4", "--checkpoints", "2", "--measure-samples", "8"])
    cap = capsys.readouterr()
    assert code == 0
    assert "where rloo ranks" in cap.out


@pytest.mark.slow
def test_rank_reports_reuse_on_stderr(tmp_path, capsys, cleanup):
    f = tmp_path / "my_est.py"
    f.write_text(textwrap.dedent(GOOD))
    out = tmp_path / "set"
    args = ["rank", str(f), "--tasks", "liu_toy", "--out", str(out), "--no-report",
            "--steps", "4", "--checkpoints", "2", "--measure-samples", "8", "--seeds", "0"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "already stored" in err and " ok (" not in err  # nothing recomputed


def test_rank_refuses_an_estimator_that_breaks_the_contract(tmp_path, capsys, cleanup):
    f = tmp_path / "bad.py"
    f.write_text(textwrap.dedent(BAD))
    code = main(["rank", f"{f}:MyLOO", "--out", str(tmp_path / "x"), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not honour the contract" in err and "n_evals reports" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("target,message", [
    ("nowhere.py:X", "no estimator file at nowhere.py"),
    ("rlo", "unknown estimator 'rlo'"),
])
def test_rank_bad_targets(target, message, tmp_path, capsys):
    assert main(["rank", target, "--out", str(tmp_path / "x"), *TINY]) == 2
    assert message in capsys.readouterr().err


def test_rank_file_without_the_named_class(tmp_path, capsys, cleanup):
    f = tmp_path / "my_est.py"
    f.write_text(textwrap.dedent(GOOD))
    assert main(["rank", f"{f}:Nope", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "defines no 'Nope' (estimators found: MyLOO)" in capsys.readouterr().err


def test_rank_file_estimator_refuses_worker_processes(tmp_path, capsys, cleanup):
    f = tmp_path / "my_est.py"
    f.write_text(textwrap.dedent(GOOD))
    assert main(["rank", str(f), "-j", "2", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "exists only in this process" in capsys.readouterr().err
