"""The harness enforces what it promises: the counted budget, unique names, a time limit per cell,
rank never writing into the reference set, declared option constraints, one configuration per cell.

Each test drives the command line (``estbench.cli.commands``) or the harness the way a user or a hostile
plug-in author would, and fails on the code before these guarantees were built.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pandas as pd
import pytest

import estimators
from estbench.engine import store
from estbench.core.budget import Budget
from estbench.cli.commands import main
from estbench.core.errors import RegistryError
from estbench.engine.train import Cell, run_cell

TINY = ["--steps", "4", "--checkpoints", "2", "--measure-samples", "8", "--seeds", "0", "--quiet"]
ROOT = Path(__file__).resolve().parent.parent

HEADER = '''
import time
from estimators import Estimate, Estimator

class Plugin(Estimator):
    """A test plug-in (Williams 1992, Eq. 7)."""
    name = "NAME"
    families = frozenset({"bernoulli"})
    unbiased = False
    paper = "Williams (1992), Eq. 7"
    calls = 0

    def _estimate(self, dist, f, n, context, family):
        type(self).calls += 1
        BODY
        z = dist.sample((n,))
        fz = f(z)
        return Estimate((fz.detach() * dist.log_prob(z) + fz).mean(0).sum(), fz.detach().mean(0), n)
'''


def plugin(tmp_path, name, body="pass", file="plugin.py"):
    path = tmp_path / file
    path.write_text(HEADER.replace("NAME", name).replace("BODY", body))
    return path


@pytest.fixture
def forget():
    names = []
    yield names
    for n in names:
        estimators.unregister(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A small reference set: toy_binary with two estimators."""
    ref = tmp_path_factory.mktemp("ref") / "reference"
    assert main(["run", "--tasks", "toy_binary", "--estimators", "rloo,disarm", *TINY,
                 "--out", str(ref)]) == 0
    return ref


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


# ---- the budget is counted, not trusted --------------------------------------------------------
LIAR = "if type(self).calls > 1:\n            [f(dist.sample((n,))) for _ in range(7)]"


@pytest.mark.slow
def test_an_estimator_spending_8x_its_budget_after_an_honest_first_call_fails_the_cell(
        tmp_path, reference, forget, capsys):
    path = plugin(tmp_path, "liar_test_only", LIAR)
    forget.append("liar_test_only")
    out = tmp_path / "out"
    status = main(["rank", str(path), "--tasks", "toy_binary", "--reference", str(reference),
                   "--out", str(out), *TINY])
    text = capsys.readouterr().out
    assert status == 1  # no finished cell: no rank, but the report is still written
    assert "liar_test_only finished no cell" in text
    report = (out / "report" / "report.md").read_text()
    assert "over budget" in report  # listed among the problem cells, not ranked
    board = pd.read_csv(out / "report" / "leaderboard.csv")
    assert "liar_test_only" not in set(board.estimator)
    assert "over budget: spent 96 f-evaluations per data point" in text and "budget 12" in text
    assert "it reported 12" in text
    _, cells = store.load(out)
    mine = cells[cells.estimator == "liar_test_only"]
    assert list(mine.status) == ["failed"]
    assert "spent 96" in mine.error.iat[0] and "budget 12" in mine.error.iat[0]


def test_n_evals_is_the_harness_count_not_the_estimators_word(forget):
    class Underreports(estimators.get_class("reinforce")):
        """REINFORCE that reports 1 f-evaluation whatever it spends (Williams 1992, Eq. 7)."""
        name = "underreports_test_only"
        exceeds_budget = "test: allowed to spend more, so that the count is recorded"

        def _estimate(self, dist, f, n, context, family):
            e = super()._estimate(dist, f, n, context, family)
            e.n_evals = 1
            return e

    forget.append("underreports_test_only")
    res = run_cell(Cell("toy_binary", "underreports_test_only", 0, "cpu",
                        Budget(steps=3, n_samples=12, checkpoints=2, measure_samples=8)))
    assert res.status == "ok", res.error
    n_evals = [r["value"] for r in res.records if r["metric"] == "n_evals"]
    assert n_evals == [12.0]


def test_an_f_kept_from_an_earlier_call_still_counts(forget):
    class Hoarder(estimators.get_class("reinforce")):
        """Keeps the f of its first call and spends it later (Williams 1992, Eq. 7)."""
        name = "hoarder_test_only"
        kept = None

        def _estimate(self, dist, f, n, context, family):
            if type(self).kept is None:
                type(self).kept = f
            else:
                type(self).kept(dist.sample((n,)))  # 12 more evaluations, through an old f
            return super()._estimate(dist, f, n, context, family)

    forget.append("hoarder_test_only")
    res = run_cell(Cell("toy_binary", "hoarder_test_only", 0, "cpu",
                        Budget(steps=3, n_samples=12, checkpoints=0)))
    assert res.status == "failed" and "spent 24" in res.error and "budget 12" in res.error


def test_over_budget_in_the_measurement_pass_fails_too(forget):
    class MeasuredLiar(estimators.get_class("reinforce")):
        """Spends twice its budget in eval mode only (Williams 1992, Eq. 7)."""
        name = "measured_liar_test_only"

        def _estimate(self, dist, f, n, context, family):
            if not self.training:
                f(dist.sample((n,)))
            return super()._estimate(dist, f, n, context, family)

    forget.append("measured_liar_test_only")
    res = run_cell(Cell("toy_binary", "measured_liar_test_only", 0, "cpu",
                        Budget(steps=2, n_samples=12, checkpoints=2, measure_samples=8)))
    assert res.status == "failed"
    assert "spent 24 f-evaluations per data point in the measurement at step 0" in res.error


def test_exact_may_exceed_the_budget_and_its_count_is_recorded():
    res = run_cell(Cell("toy_binary", "exact", 0, "cpu", Budget(steps=2, n_samples=4, checkpoints=0)))
    assert res.status == "ok"
    assert [r["value"] for r in res.records if r["metric"] == "n_evals"] == [16.0]  # 2^4


# ---- a faulty plug-in never changes another estimator's record ---------------------------------
@pytest.mark.parametrize("body, status, reason", [
    (LIAR, "failed", "over budget"),
    ("if type(self).calls > 1:\n            raise RuntimeError('boom\\nsecond line')", "failed",
     "RuntimeError: boom second line"),
    ("if type(self).calls > 1:\n            return Estimate(float('nan') * dist.base_dist.logits.sum(), "
     "dist.base_dist.logits.detach().sum(-1) * 0, n)", "diverged", "non-finite"),
])
def test_faulty_plugins_are_reported_in_one_line_and_leave_the_others_alone(
        tmp_path, reference, forget, capsys, body, status, reason):
    path = plugin(tmp_path, "faulty_test_only", body)
    forget.append("faulty_test_only")
    out = tmp_path / "out"
    main(["rank", str(path), "--tasks", "toy_binary", "--reference", str(reference),
          "--out", str(out), "--no-report", *TINY])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "toy_binary:" in ln]
    assert len(lines) == 1 and status in lines[0] and reason in lines[0]
    recs, cells = store.load(out)
    assert cells[cells.estimator == "faulty_test_only"].status.tolist() == [status]
    ref, _ = store.load(reference)
    cols = ["task", "estimator", "seed", "step", "metric", "value"]
    for est in ("rloo", "disarm"):
        a = ref[ref.estimator == est][cols].sort_values(cols[:5]).reset_index(drop=True)
        b = recs[recs.estimator == est][cols].sort_values(cols[:5]).reset_index(drop=True)
        a, b = a[a.metric != "wall_time"], b[b.metric != "wall_time"]
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


# ---- names are unique --------------------------------------------------------------------------
def test_a_plugin_named_like_a_builtin_is_refused_naming_both(tmp_path, reference, capsys):
    path = plugin(tmp_path, "rloo")
    status = main(["rank", str(path), "--tasks", "toy_binary", "--reference", str(reference),
                   "--out", str(tmp_path / "out"), *TINY])
    err = capsys.readouterr().err
    assert status == 2
    assert "estimator name 'rloo' is taken by estimators.score_function.RLOO" in err
    assert "score_function.py" in err and str(path) in err
    assert estimators.get_class("rloo").__module__ == "estimators.score_function"
    assert not (tmp_path / "out").exists()


def test_registering_a_taken_name_fails_and_the_same_class_may_register_again():
    rloo = estimators.get_class("rloo")
    assert estimators.register(rloo) is rloo

    class Impostor(estimators.Estimator):
        """Not registered: its name is taken (test only)."""
        families = frozenset({"bernoulli"})

    Impostor.name = "rloo"
    with pytest.raises(RegistryError, match=r"'rloo' is taken by estimators.score_function.RLOO .*"
                                            r"Impostor .* cannot register under it"):
        estimators.register(Impostor)
    assert estimators.get_class("rloo") is rloo


@pytest.mark.slow
def test_a_module_inside_the_package_cannot_replace_a_builtin(tmp_path):
    """A file dropped into estimators/ declaring a built-in's name: a warning naming both, and the
    name refuses to resolve, instead of silently swapping the estimator."""
    mod = tmp_path / "zz_clash.py"
    mod.write_text("from estimators.score_function import Reinforce\n"
                   "class MyRloo(Reinforce):\n    \"\"\"test\"\"\"\n    name = 'rloo'\n")
    script = textwrap.dedent(f"""
        import importlib.util, sys, warnings
        import estimators
        spec = importlib.util.spec_from_file_location("estimators.zz_clash", {str(mod)!r})
        m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m
        spec.loader.exec_module(m)
        from estbench.cli.commands import main
        sys.exit(main(["run", "--tasks", "toy_binary", "--estimators", "rloo", "--steps", "2",
                       "--seeds", "0", "--out", {str(tmp_path / 'out')!r}]))
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("estbench: error")]
    assert len(line) == 1
    assert "'rloo' is declared by estimators.score_function.RLOO" in line[0]
    assert "estimators.zz_clash.MyRloo" in line[0] and "zz_clash.py" in line[0]


def test_a_name_outside_the_spec_grammar_is_refused_at_definition(tmp_path, reference, capsys):
    path = plugin(tmp_path, "my,est")
    assert main(["rank", str(path), "--reference", str(reference), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "name='my,est'" in err[0] and "lower_snake_case" in err[0]


# ---- rank reads the reference, writes elsewhere ------------------------------------------------
@pytest.mark.slow
def test_rank_never_writes_into_the_reference_set(tmp_path, reference, forget, capsys):
    before = _tree_digest(reference)
    path = plugin(tmp_path, "fine_test_only")
    forget.append("fine_test_only")
    out = tmp_path / "mine"
    assert main(["rank", str(path), "--tasks", "toy_binary", "--reference", str(reference),
                 "--out", str(out), *TINY]) == 0
    captured = capsys.readouterr()
    assert "fine_test_only" in captured.out and "report:" in captured.out
    assert _tree_digest(reference) == before
    _, cells = store.load(out)
    assert {"rloo", "disarm", "fine_test_only"} <= set(cells.estimator)
    assert (out / "report" / "report.md").is_file()
    # the reference's cells were reused, not recomputed
    _, ref_cells = store.load(reference)
    reused = cells[cells.key.isin(set(ref_cells.key))]
    assert set(reused.estimator) == {"rloo", "disarm"}
    assert (reused.finished.values == ref_cells.set_index("key").loc[reused.key].finished.values).all()
    # extending the reference in place needs asking
    assert main(["rank", str(path), "--tasks", "toy_binary", "--reference", str(reference),
                 "--out", str(reference), *TINY]) == 2
    assert "--in-place" in capsys.readouterr().err
    assert _tree_digest(reference) == before


def test_rank_target_without_py_is_one_line(tmp_path, capsys):
    plugin(tmp_path, "x_test_only", file="mine.py")
    assert main(["rank", f"{tmp_path / 'mine'}:Plugin"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean" in err[0] and "mine.py:Plugin" in err[0]


# ---- a time limit per cell ---------------------------------------------------------------------
@pytest.mark.slow
def test_a_hung_estimator_times_out_and_the_sweep_goes_on(tmp_path, reference, forget, capsys):
    path = plugin(tmp_path, "hangs_test_only", "if type(self).calls > 1:\n            time.sleep(600)")
    forget.append("hangs_test_only")
    out = tmp_path / "out"
    status = main(["rank", str(path), "--tasks", "toy_binary", "--reference", str(reference),
                   "--out", str(out), "--no-report", "--cell-timeout", "1", *TINY])
    text = capsys.readouterr().out
    assert status == 1
    assert "hangs_test_only finished no cell" in text and "timed out after 1 s" in text
    _, cells = store.load(out)
    assert cells[cells.estimator == "hangs_test_only"].status.tolist() == ["failed"]
    assert (cells[cells.estimator != "hangs_test_only"].status == "ok").all()


@pytest.mark.slow
def test_the_time_limit_holds_in_a_worker_thread_too(forget):
    """dask runs cells in worker threads, where no signal can be delivered."""
    class Spins(estimators.get_class("reinforce")):
        """Loops forever in Python on its second call (Williams 1992, Eq. 7)."""
        name = "spins_test_only"
        calls = 0

        def _estimate(self, dist, f, n, context, family):
            type(self).calls += 1
            while type(self).calls > 1:
                pass
            return super()._estimate(dist, f, n, context, family)

    forget.append("spins_test_only")
    got = {}
    cell = Cell("toy_binary", "spins_test_only", 0, "cpu", Budget(steps=3, n_samples=12, checkpoints=0),
                timeout=0.5)
    t = threading.Thread(target=lambda: got.update(res=run_cell(cell)))
    t.start()
    t.join(20)
    assert not t.is_alive()
    assert got["res"].status == "failed" and "timed out after 0.5 s" in got["res"].error


# ---- option constraints and one configuration per cell -----------------------------------------
@pytest.mark.parametrize("spec, message", [
    ("toy_binary[t=nan]", "t='nan' must be finite"),
    ("toy_binary[t=inf]", "t='inf' must be finite"),
    ("toy_binary[t=1e400]", "t='1e400' must be finite"),
    ("toy_binary[dim=0]", "dim=0 must be an integer >= 1"),
    ("toy_binary[dim=-3]", "dim=-3 must be an integer >= 1"),
    ("sst_rationales[prior_p=1]", "prior_p=1.0 must be in (0, 1)"),
])
def test_odd_option_values_are_refused_at_parse_time_with_the_constraint(tmp_path, capsys, spec, message):
    assert main(["run", "--tasks", spec, "--estimators", "rloo", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()


def test_estimator_option_constraints():
    for name, opts, message in [("gumbel_softmax", {"temperature": "-1"}, "must be > 0"),
                                ("reinforce_ema", {"decay": "1"}, r"must be in \[0, 1\)"),
                                ("hardkuma", {"lower": "0.1"}, "must be < 0"),
                                ("relax", {"hidden": "0"}, "must be an integer >= 1")]:
        with pytest.raises(ValueError, match=message):
            estimators.get(name, **opts)


def test_an_empty_estimator_list_is_an_error_not_everything(capsys):
    assert main(["run", "--estimators", ""]) == 2
    assert "--estimators is empty" in capsys.readouterr().err
    assert main(["run", "--tasks", " "]) == 2


@pytest.mark.slow
def test_default_options_name_one_configuration(tmp_path, capsys):
    out = tmp_path / "o"
    base = ["--estimators", "rloo", *TINY, "--out", str(out)]
    assert main(["run", "--tasks", "toy_binary[t=0.45]", *base]) == 0
    assert main(["run", "--tasks", "toy_binary[]", *base]) == 0
    assert main(["run", "--tasks", "toy_binary", *base]) == 0
    records, cells = store.load(out)
    assert len(cells) == 1 and cells.task.tolist() == ["toy_binary"]
    assert set(records.task) == {"toy_binary"}
    capsys.readouterr()
    assert main(["run", "--tasks", "toy_binary,toy_binary[t=0.45]", *base]) == 2
    assert "same configuration" in capsys.readouterr().err


# ---- the house: a neutral home for plug-in machinery, no import circle, no file lists ----------
def test_tasks_do_not_import_from_the_estimator_package():
    for path in (ROOT / "tasks").rglob("*.py"):
        text = path.read_text()
        assert "from estimators" not in text and "import estimators" not in text, path


def test_cli_report_does_not_import_the_cli():
    code = ("import sys, estbench.cli.report; "
            "sys.exit(1 if 'estbench.cli.commands' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.slow
def test_rank_of_an_estimator_that_cannot_spend_the_budget_says_not_run(tmp_path, reference,
                                                                        forget, capsys):
    path = tmp_path / "greedy.py"
    path.write_text(HEADER.replace("NAME", "greedy_test_only").replace("BODY", "pass")
                    .replace("    calls = 0\n", "    calls = 0\n    min_samples = 100\n"))
    forget.append("greedy_test_only")
    out = tmp_path / "out"
    assert main(["rank", str(path), "--tasks", "toy_binary", "--reference", str(reference),
                 "--out", str(out), *TINY]) == 1
    text = capsys.readouterr().out
    assert "greedy_test_only finished no cell" in text
    assert "toy_binary: not run: estimator 'greedy_test_only' cannot spend a budget of 12" in text
    assert (out / "report" / "report.md").is_file()
