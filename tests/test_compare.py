"""``estbench compare`` as a CI gate that cannot pass by accident (issue 19): end to end through the
CLI on tiny real runs (toy_binary, fixed seeds) and on hand-made cells whose answers are known.

- a setting or seed of A missing from B, nothing compared, a damaged cell file: the gate is
  incomplete (exit bit 8), each problem one line, no Python warning;
- a budget mismatch is "not comparable", never a regression (everywhere: exit 2);
- each metric has a tolerance in its own units (nats for an ELBO), overridable with --tolerance;
- the bias is judged net of its noise and by the bias test: an unbiased RLOO with half its
  baseline is noisier, not biased;
- improvements and regressions have distinct marks.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("scipy")
pytest.importorskip("seaborn")

import estimators  # noqa: E402
from estbench.engine import store  # noqa: E402
from estbench.cli.commands import main  # noqa: E402
from test_report import _write_cell  # noqa: E402  (hand-made cells, as the report's tests make them)

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "rloo_scaled_test_only"
#: the tiny budget of the real runs: 3 seeds (a Welch test needs >= 2 a side), M = 32 estimates a
#: measurement (the bias test's power)
STEPS = "20"
TINY = ["--checkpoints", "2", "--measure-samples", "32", "--seeds", "0,1,2", "--quiet"]
SPEED = 4  # step times on a shared machine: the tests below never rely on bit 4 either way


def quality_and_gate(rc: int) -> int:
    """The exit status without the speed bit (timings on a loaded test machine are not asserted)."""
    return rc & ~SPEED


def _run(out, estimators_="rloo,disarm", tasks="toy_binary", steps=STEPS):
    assert main(["run", "--tasks", tasks, "--estimators", estimators_, "--steps", steps, *TINY,
                 "--out", str(out)]) == 0
    return out


# ---- the real runs, shared by the module ---------------------------------------------------------
@pytest.fixture(scope="module")
def scaled_rloo():
    """A plug-in RLOO whose leave-one-out baseline is multiplied by ``scale`` and whose learning
    signal by ``gain``: scale 0.5 stays unbiased (the baseline does not depend on z_i) but is
    noisier; gain 2 doubles the gradient, a bias of |grad|.  Registered for this module only."""
    from estimators.score_function import RLOO

    class ScaledRLOO(RLOO):
        """RLOO (Kool et al. 2019, Eq. 8) with a scaled baseline and signal: a test plug-in."""

        name = PLUGIN
        paper = "Kool, van Hoof & Welling (2019), Eq. 8 (scaled: a test plug-in)"
        scale = 1.0
        gain = 1.0

        def learning_signal(self, fz, context):
            return self.gain * (fz - self.scale * self.base(fz, context)), None

    yield ScaledRLOO
    estimators.unregister(PLUGIN)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, scaled_rloo):
    root = tmp_path_factory.mktemp("compare")
    both = f"{PLUGIN},disarm"
    out = {}

    def make(tag, scale=1.0, gain=1.0, **kw):
        scaled_rloo.scale, scaled_rloo.gain = scale, gain
        try:
            out[tag] = _run(root / tag, **kw)
        finally:
            scaled_rloo.scale, scaled_rloo.gain = 1.0, 1.0

    make("a", estimators_=both)
    make("half", scale=0.5, estimators_=both)       # unbiased, noisier
    make("biased", gain=2.0, estimators_=both)      # biased: twice the gradient
    make("plugin_only", estimators_=PLUGIN)         # disarm vanished
    make("disarm_only", estimators_="disarm")       # nothing shared with plugin_only
    make("steps25", estimators_=both, steps="25")   # another budget everywhere
    make("mixed", estimators_=PLUGIN)               # the plug-in on A's budget ...
    _run(root / "mixed", estimators_="disarm", steps="25")  # ... disarm on another
    return out


def _compare(capsys, *argv):
    rc = main(["compare", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _json(capsys, a, b, *extra):
    rc = main(["compare", str(a), str(b), "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


# ---- an incomplete gate fails: settings, seeds, damaged cells, nothing compared -----------------
@pytest.mark.slow
def test_a_vanished_estimator_fails_the_gate_and_a_new_one_is_shown(runs, capsys):
    rc, out, _ = _compare(capsys, runs["a"], runs["plugin_only"])
    assert quality_and_gate(rc) == 8, out
    lines = [line.strip() for line in out.splitlines()]
    assert "INCOMPLETE: toy_binary x disarm [cpu]: only in A: missing from B (an estimator or " \
           "task vanished)" in lines
    assert "gate: FAILED" in out
    # the other way round: a new estimator in B is shown, and is no failure
    rc, out, _ = _compare(capsys, runs["plugin_only"], runs["a"])
    assert quality_and_gate(rc) == 0, out
    assert any(line.strip() == "note: toy_binary x disarm [cpu]: only in B: new, nothing to "
               "compare it with" for line in out.splitlines())
    rc, payload = _json(capsys, runs["a"], runs["plugin_only"])
    assert payload["incomplete"] is True and quality_and_gate(payload["exit_code"]) == 8
    assert [p["text"] for p in payload["problems"] if p["incomplete"]] == [
        "toy_binary x disarm [cpu]: only in A: missing from B (an estimator or task vanished)"]


@pytest.mark.slow
def test_a_vanished_task_fails_the_gate(tmp_path, capsys):
    a = _run(tmp_path / "a", estimators_="rloo", tasks="toy_binary,toy_categorical")
    b = _run(tmp_path / "b", estimators_="rloo", tasks="toy_binary")
    rc, out, _ = _compare(capsys, a, b)
    assert quality_and_gate(rc) == 8
    assert "INCOMPLETE: toy_categorical x rloo [cpu]: only in A" in out


def test_nothing_compared_fails_the_gate(runs, capsys):
    rc, out, _ = _compare(capsys, runs["plugin_only"], runs["disarm_only"])
    assert quality_and_gate(rc) == 8
    lines = [line.strip() for line in out.splitlines()]
    assert "INCOMPLETE: nothing was compared: no (task, estimator, device) finished in both A " \
           "and B" in lines
    assert f"INCOMPLETE: toy_binary x {PLUGIN} [cpu]: only in A: missing from B (an estimator " \
           "or task vanished)" in lines


@pytest.mark.slow
def test_a_damaged_cell_of_b_fails_the_gate_in_one_line_without_python_warnings(runs, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(runs["a"], b)
    _, cells = store.load(b)
    victim = cells[(cells.estimator == PLUGIN) & (cells.seed == 1)].key.iat[0]
    path = b / "cells" / f"{victim}.parquet"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    env = dict(os.environ, PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-m", "estbench", "compare", str(runs["a"]), str(b)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert quality_and_gate(proc.returncode) == 8, proc.stdout + proc.stderr
    # no Python warning (with its source path and line), on either stream
    for stream in (proc.stdout, proc.stderr):
        assert "Warning" not in stream and "store.py" not in stream and "compare.py" not in stream
    damaged = [line for line in proc.stdout.splitlines() if "damaged cell file in B" in line]
    assert len(damaged) == 1 and str(path) in damaged[0]
    assert f"A's cell toy_binary x {PLUGIN} seed=1 [cpu]" in damaged[0]
    assert f"INCOMPLETE: toy_binary x {PLUGIN} [cpu]: seed(s) 1 only in A: missing from B" \
        in proc.stdout
    # the JSON says so too, and in-process no warning escapes either
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["compare", str(runs["a"]), str(b), "--json"])
    assert quality_and_gate(rc) == 8
    assert not [w for w in caught if issubclass(w.category, UserWarning)]


# ---- budgets: not comparable, never a regression -----------------------------------------------
def test_different_budgets_everywhere_are_refused(runs, capsys):
    rc, out, err = _compare(capsys, runs["a"], runs["steps25"])
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("estbench: error: A and B ran different budgets: steps 20 in A vs "
                               "25 in B (toy_binary)")


@pytest.mark.slow
def test_a_setting_on_another_budget_is_not_comparable_and_fails_the_gate(runs, capsys):
    rc, payload = _json(capsys, runs["a"], runs["mixed"])
    assert quality_and_gate(rc) == 8  # no quality regression counted: disarm is not judged
    disarm = [r for r in payload["rows"] if r["estimator"] == "disarm"]
    assert len(disarm) == 1 and not disarm[0]["regressed"]
    assert disarm[0]["note"] == "not comparable: budgets differ: steps 20 in A vs 25 in B"
    rc, out, _ = _compare(capsys, runs["a"], runs["mixed"])
    assert "INCOMPLETE: toy_binary x disarm [cpu]: not comparable: budgets differ: steps 20 in A " \
           "vs 25 in B" in out


# ---- tolerances in each metric's own units -------------------------------------------------------
NOISE = [0.01, -0.008, 0.003, -0.005]


def _elbo_run(run, task, elbo):
    for s, n in enumerate(NOISE):
        _write_cell(run, task, "e", s, elbo + n, 1.0, bias_noise=0.1)
    return run


def _row(payload, metric):
    (row,) = [r for r in payload["rows"] if r["metric"] == metric]
    return row


@pytest.mark.slow
def test_a_4_nat_loss_on_binary_vae_regresses_a_half_nat_one_does_not(tmp_path, capsys):
    a = _elbo_run(tmp_path / "a", "binary_vae", -200.0)
    worse4 = _elbo_run(tmp_path / "b4", "binary_vae", -204.0)      # 2% of the ELBO: passed before
    worse_half = _elbo_run(tmp_path / "b05", "binary_vae", -200.5)
    rc, payload = _json(capsys, a, worse4)
    assert rc == 1
    row = _row(payload, "final_elbo")
    assert row["regressed"] and row["tolerance"] == 1.0 and row["mark"] == "REGRESSED"
    # outside the noise but within the 1-nat tolerance: marked worse, the gate passes
    rc, out, _ = _compare(capsys, a, worse_half)
    assert rc == 0
    line = next(x for x in out.splitlines() if " final_elbo " in x)
    assert line.rstrip().endswith("worse") and "REGRESSED" not in line
    # --tolerance overrides the declared one, on every task
    assert main(["compare", str(a), str(worse4), "--tolerance", "final_elbo=5"]) == 0
    assert main(["compare", str(a), str(worse_half), "--tolerance", "final_elbo=0.25"]) == 1
    capsys.readouterr()


@pytest.mark.slow
def test_a_toy_has_its_own_tolerance(tmp_path, capsys):
    """toy_binary's E[f] spans a few hundredths between estimators: 0.02 worse is a regression
    (2.4%, under the old 10% threshold), 0.005 is not."""
    a = _elbo_run(tmp_path / "a", "toy_binary", -0.85)
    rc, payload = _json(capsys, a, _elbo_run(tmp_path / "b", "toy_binary", -0.87))
    assert rc == 1 and _row(payload, "final_elbo")["tolerance"] == 0.01
    rc, _ = _json(capsys, a, _elbo_run(tmp_path / "c", "toy_binary", -0.855))
    assert rc == 0


@pytest.mark.parametrize("argv, says", [
    (["--tolerance", "final_elbo"], "METRIC=VALUE"),
    (["--tolerance", "elbo=1"], "'elbo' is not a compared metric"),
    (["--tolerance", "final_elbo=abc"], "'abc' is not a number"),
    (["--tolerance", "final_elbo=-1"], "a difference >= 0"),
    (["--tolerance", "variance=0.5"], "a factor >= 1"),
    (["--tolerance", "step_ms=inf"], "a factor >= 1"),
    (["--threshold", "0.1"], "--threshold was removed"),
])
def test_bad_tolerances_are_one_line_and_exit_2(tmp_path, capsys, argv, says):
    a = _elbo_run(tmp_path / "a", "binary_vae", -200.0)
    rc, out, err = _compare(capsys, a, a, *argv)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in err


# ---- the bias: net of its noise, and by the bias test -------------------------------------------
def test_a_noisier_unbiased_rloo_is_no_bias_regression(runs, capsys):
    """Half the leave-one-out baseline: still unbiased, much noisier.  Its raw bias (the noise
    floor) grows 5x, which compare used to flag as a bias regression; its variance regression is
    real."""
    rc, payload = _json(capsys, runs["a"], runs["half"])
    rows = [r for r in payload["rows"] if r["estimator"] == PLUGIN]
    by = {r["metric"]: r for r in rows}
    assert by["variance"]["regressed"]  # the real regression
    assert not [r["metric"] for r in rows if "bias" in r["metric"] and r["regressed"]]
    assert by["bias_test"]["note"] == ("A: no bias found (0/3 cells reject); "
                                       "B: no bias found (0/3 cells reject)")
    assert by["net_bias"]["note"] == "no bias found in B: its net bias is noise"
    rc, out, _ = _compare(capsys, runs["a"], runs["half"])
    bias_lines = [x for x in out.splitlines()
                  if x.split()[:1] == [PLUGIN] and "bias" in x.split()[1]]
    assert len(bias_lines) == 2 and not [x for x in bias_lines if "REGRESSED" in x]


@pytest.mark.slow
def test_an_estimator_that_becomes_biased_regresses(runs, capsys):
    """Twice the gradient: the bias test rejects in every cell of B, in none of A."""
    rc, payload = _json(capsys, runs["a"], runs["biased"])
    assert quality_and_gate(rc) == 1
    row = next(r for r in payload["rows"] if r["estimator"] == PLUGIN and r["metric"] == "bias_test")
    assert row["regressed"] and row["mark"] == "REGRESSED"
    assert row["note"] == "A: no bias found (0/3 cells reject); B: biased (3/3 cells reject)"
    rc, out, _ = _compare(capsys, runs["a"], runs["biased"])
    line = next(x for x in out.splitlines() if PLUGIN in x and " bias_test " in x)
    assert "REGRESSED" in line


# ---- marks: better and worse apart, with a legend ------------------------------------------------
@pytest.mark.slow
def test_improvements_and_regressions_have_distinct_marks(runs, capsys):
    rc, out, _ = _compare(capsys, runs["half"], runs["a"])  # B improves on A
    assert quality_and_gate(rc) == 0
    lines = out.splitlines()
    variance = next(x for x in lines if PLUGIN in x and " variance " in x)
    assert variance.rstrip().endswith("better") and "!" not in variance
    assert any(x.startswith("marks: REGRESSED") for x in lines)
    assert any(x.split()[:1] == ["better"] for x in lines)  # the legend names each mark
    rc, out, _ = _compare(capsys, runs["a"], runs["half"])
    variance = next(x for x in out.splitlines() if PLUGIN in x and " variance " in x)
    assert variance.rstrip().endswith("REGRESSED") and "better" not in variance
    assert not any(x.rstrip().endswith(" !") for x in out.splitlines())


# ---- the exit codes are documented where users look ---------------------------------------------
def test_exit_codes_documented_in_help_module_and_docs(capsys):
    from estbench.analysis import compare

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    for phrase in ("8 an incomplete gate", "1 a quality regression", "--tolerance METRIC=VALUE"):
        assert phrase in helptext
    assert "8 the gate is incomplete" in " ".join(compare.__doc__.split())
    assert compare.exit_code(True, False, True) == 9 and compare.exit_code(False, True) == 4
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    section = docs.split("## estbench compare as a CI gate", 1)[1].split("\n## ", 1)[0]
    for phrase in ("exit", "| 8 |", "--seeds", "compare.yml"):
        assert phrase in section, phrase
    import yaml

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "compare.yml").read_text())
    steps = [s.get("run", "") for job in workflow["jobs"].values() for s in job["steps"]]
    assert any("estbench compare" in s for s in steps)
    assert sum("estbench run" in s for s in steps) >= 1


def test_tolerances_are_declared_with_the_metrics():
    from estbench.analysis import compare
    from estbench.core import metrics

    for name in metrics.COMPARED:
        q = metrics.get(name)
        assert q.tolerance is not None and q.tolerance_kind in (metrics.DIFFERENCE, metrics.FACTOR)
    assert "net_bias" in metrics.COMPARED and "bias" not in metrics.COMPARED
    elbo = metrics.get("final_elbo")
    assert (elbo.tolerance, elbo.tolerance_kind) == (1.0, metrics.DIFFERENCE)
    assert (metrics.get("variance").tolerance, metrics.get("variance").tolerance_kind) == \
        (1.25, metrics.FACTOR)
    with pytest.raises(ValueError, match="factor tolerance must be a finite number >= 1"):
        metrics.Metric(name="x", recorded=metrics.END, direction=metrics.LOWER,
                       scale=metrics.LOG10, label="x", tolerance=0.5,
                       tolerance_kind=metrics.FACTOR)
    with pytest.raises(ValueError, match="must be a finite number >= 0, got -1.0"):
        metrics.Metric(name="x", recorded=metrics.END, direction=metrics.HIGHER,
                       scale=metrics.LINEAR, label="x", tolerance=-1.0)
    assert compare.parse_tolerances(["final_elbo=0.5", "step_ms=1.5"]) == \
        {"final_elbo": 0.5, "step_ms": 1.5}
