"""The new user's exercise: every command with bad input, odd input and the three jobs the suite
exists for, each case classified by what a person sees.

    python benchmarks/user_exercise.py            # runs every case, prints a line a case and the counts
    python benchmarks/user_exercise.py --failing  # only the cases whose outcome is not the expected one

Each case is an ``estbench`` command line (run in this process through ``estbench.cli.commands``, with
stdout and stderr captured) or a Python API call, with the outcome a user should get:

- ``refused``: exit status 2 and one line on stderr, ``estbench: error: ...`` (argparse's own usage
  line before it is allowed);
- ``failed``: exit status 1 (or another non-zero gate code) with the reason on stdout or stderr;
- ``ok``: exit status 0 (``note``: exit 0 and a ``note:`` or ``warning:`` line on stderr).

What it got is classified as ``traceback`` (an exception escaped), ``refused``, ``failed``, ``ok``,
``note``, or ``silent`` (exit 0 where the case expects a refusal, a failure or a note, without a
word).  The fixtures (a small reference set, plug-in files, damaged runs) are made in a temporary
folder first; the whole exercise runs every command in turn, so it takes minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = ["--steps", "4", "--checkpoints", "2", "--measure-samples", "8", "--seeds", "0", "--quiet"]

PLUGINS = '''
import torch
from estimators import Estimate, Estimator
from estimators import families as fam


class _Score(Estimator):
    """REINFORCE (a test plug-in; Williams 1992, Eq. 7)."""
    families = frozenset({"bernoulli"})
    unbiased = True
    paper = "Williams (1992), Eq. 7"

    def _estimate(self, dist, f, n, context, family):
        z = dist.sample((n,))
        fz = f(z)
        return Estimate((self.scale * fz.detach() * fam.log_prob(dist, z) + fz).mean(0).sum(),
                        fz.detach().mean(0), n)

    scale = 1.0


class Biased(_Score):
    """Half the score term: biased (a test plug-in; Williams 1992, Eq. 7)."""
    name = "ux_biased"
    unbiased = False
    scale = 0.5


class Needy(_Score):
    """Needs 1000 evaluations (a test plug-in; Williams 1992, Eq. 7)."""
    name = "ux_needy"
    min_samples = 1000


class Gaussian(_Score):
    """Gaussian family only (a test plug-in; Williams 1992, Eq. 7)."""
    name = "ux_gaussian"
    families = frozenset({"gaussian"})


class NoPaper(_Score):
    """No citation."""
    name = "ux_nopaper"
    paper = ""
'''


def make_fixtures(tmp: Path) -> dict:
    """Result sets and files the cases point at."""
    from estbench.cli.commands import main

    quiet = io.StringIO()
    f = {"tmp": tmp}
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        for name, extra in (("a", ["--steps", "20"]), ("b", ["--steps", "20"]),
                            ("other_budget", ["--steps", "30"]),
                            ("fewer", ["--steps", "20"])):
            ests = "rloo,disarm" if name != "fewer" else "rloo"
            main(["run", "--tasks", "toy_binary", "--estimators", ests, "--checkpoints", "2",
                  "--measure-samples", "8", "--seeds", "0,1", "--quiet", *extra,
                  "--out", str(tmp / name)])
    f.update({k: tmp / k for k in ("a", "b", "other_budget", "fewer")})
    damaged = tmp / "damaged"
    shutil.copytree(tmp / "b", damaged)
    sorted((damaged / "cells").glob("*.parquet"))[0].write_text("not parquet")
    f["damaged"] = damaged
    badmeta = tmp / "badmeta"
    shutil.copytree(tmp / "a", badmeta)
    (badmeta / "meta.json").write_text("{not json")
    f["badmeta"] = badmeta
    (tmp / "empty" / "cells").mkdir(parents=True)
    f["empty"] = tmp / "empty"
    (tmp / "file.txt").write_text("x")
    f["file"] = tmp / "file.txt"
    (tmp / "plugins.py").write_text(PLUGINS)
    f["plugins"] = tmp / "plugins.py"
    (tmp / "syntax.py").write_text("def broken(:\n")
    f["syntax"] = tmp / "syntax.py"
    (tmp / "bad.yml").write_text("tasks: [unclosed\n")
    (tmp / "unknown.yml").write_text("tasks: toy_binary\nbogus_key: 1\n")
    (tmp / "wrongtype.yml").write_text("tasks: toy_binary\nsteps: [1, 2]\n")
    return f


def cases(f: dict) -> list[tuple[str, list, str]]:
    """(title, argv, expected)."""
    t, p = f["tmp"], f["plugins"]
    out = lambda name: ["--out", str(t / "runs" / name)]  # noqa: E731
    run = lambda *a, name="r": ["run", *a, *TINY, *out(name)]  # noqa: E731
    c = []
    # ---- run: names and options
    for spec in ("toy_binry", "toy_binary[t=", "toy_binary[q=1]", "toy_binary[t=nan]",
                 "toy_binary[t=1e400]", "toy_binary[dim=0]", "toy_binary[dim=2.5]",
                 "toy_categorical[dim=0]", "toy_categorical[classes=1]", "toy_gaussian[dim=-2]",
                 "toy_gaussian[w=1e300]", "toy_gaussian[c=inf]", "toy_binary,toy_binary[]",
                 "toy_binary,,liu_toy", "", " ", "binary_vae[arch=deep]",
                 "binary_vae[data_dir=/nonexistent]", "categorical_vae[size=3x3]",
                 "text_vae[cell=rnn]"):
        c.append((f"run --tasks {spec!r}", ["run", "--tasks", spec, "--estimators", "rloo", *TINY,
                                            *out("t")], "refused"))
    for spec in ("rlo", "gumbel_softmax[temperature=-1]", "gumbel_softmax[temperature=0]",
                 "rloo[x=1]", "double_cv[alpha=1e300]", "relax[eta=nan]", "rebar[eta=-1e309]",
                 "sparsemap[transition=inf]", "exact[max_configs=0]", "reinforce_ema[decay=1]",
                 "rloo,rloo", ""):
        c.append((f"run --estimators {spec!r}", ["run", "--tasks", "toy_binary", "--estimators",
                                                 spec, *TINY, *out("e")], "refused"))
    # ---- run: budget flags
    for flag, value in (("--seeds", "a"), ("--seeds", "-1"), ("--seeds", "3-1"), ("--seeds", "0,0"),
                        ("--seeds", "0-100000000"), ("--seeds", "99999999999"),
                        ("--steps", "-1"), ("--steps", "x"), ("--n-samples", "0"),
                        ("--checkpoints", "-1"), ("--measure-samples", "1"),
                        ("--eval-points", "x"), ("--seconds", "0"), ("--seconds", "-1"),
                        ("--seconds", "nan"), ("--seconds", "inf"), ("--threads", "0"),
                        ("--cell-timeout", "-1"), ("--cell-timeout", "x"), ("-j", "0"),
                        ("-j", "x"), ("--device", "tpu"), ("--budget", "huge"),
                        ("--parallel-config", str(t / "nope.yml"))):
        argv = ["run", "--tasks", "toy_binary", "--estimators", "rloo", *TINY, *out("b"),
                flag, value]  # last: it wins over TINY's
        c.append((f"run {flag} {value}", argv, "refused"))
    c.append(("run --device cuda (no GPU here)", ["run", "--tasks", "toy_binary", "--estimators",
                                                 "rloo", "--device", "cuda", *TINY, *out("c")],
              "refused"))
    c.append(("run --out a file", ["run", "--tasks", "toy_binary", "--estimators", "rloo", *TINY,
                                   "--out", str(f["file"])], "refused"))
    c.append(("run --out under a file", ["run", "--tasks", "toy_binary", "--estimators", "rloo",
                                         *TINY, "--out", str(f["file"] / "x")], "refused"))
    for name in ("nope.yml", "bad.yml", "unknown.yml", "wrongtype.yml"):
        c.append((f"run --config {name}", ["run", "--config", str(t / name)], "refused"))
    c.append(("run --checkpoints 21 --steps 5", ["run", "--tasks", "toy_binary", "--estimators",
                                                 "rloo", "--steps", "5", "--checkpoints", "21",
                                                 "--measure-samples", "8", "--seeds", "0",
                                                 "--quiet", *out("clamp")], "note"))
    c.append(("run: every cell infeasible", run("--tasks", "toy_binary", "--estimators", "rloo",
                                                "--n-samples", "1", name="inf"), "failed"))
    c.append(("run: every cell times out", run("--tasks", "toy_binary", "--estimators", "rloo",
                                               "--cell-timeout", "0.001", name="to"), "failed"))
    c.append(("run: the same, rerun (failed cells reused)",
              run("--tasks", "toy_binary", "--estimators", "rloo", "--cell-timeout", "0.001",
                  name="to"), "failed"))
    c.append(("run: family mismatch only", run("--tasks", "toy_gaussian", "--estimators", "disarm",
                                               name="fam"), "refused"))
    c.append(("run: a small valid sweep", run("--tasks", "toy_binary,toy_categorical",
                                              "--estimators", "rloo,disarm,exact", name="ok"), "ok"))
    c.append(("run: the same again (all stored)", run("--tasks", "toy_binary,toy_categorical",
                                                      "--estimators", "rloo,disarm,exact",
                                                      name="ok"), "ok"))
    # ---- rank
    ref = ["--reference", str(f["a"])]
    for title, target, extra, expected in (
            ("rank a missing file", str(t / "nope.py"), ref, "refused"),
            ("rank a file without .py", str(t / "plugins"), ref, "refused"),
            ("rank a file that does not import", str(f["syntax"]), ref, "refused"),
            ("rank an unknown class", f"{p}:Nope", ref, "refused"),
            ("rank a class that is no estimator", f"{p}:torch", ref, "refused"),
            ("rank a file of several estimators", str(p), ref, "refused"),
            ("rank an estimator without a paper", f"{p}:NoPaper", ref, "refused"),
            ("rank an unknown registered name", "rlo", ref, "refused"),
            ("rank --reference missing", f"{p}:Biased", ["--reference", str(t / "none_here")], "refused"),
            ("rank --reference a file", f"{p}:Biased", ["--reference", str(f["file"])], "refused"),
            ("rank --reference with no cell", f"{p}:Biased", ["--reference", str(f["empty"])], "refused"),
            ("rank --estimators naming itself", f"{p}:Biased", [*ref, "--estimators", "ux_biased"], "refused"),
            ("rank --budget paper on a toy", f"{p}:Biased", [*ref, "--budget", "paper"], "refused"),
            ("rank --out = the reference", f"{p}:Biased", [*ref, "--out", str(f["a"])], "refused"),
            ("rank a Gaussian plug-in on a Bernoulli task", f"{p}:Gaussian", ref, "refused"),
            ("rank a plug-in that can run nowhere", f"{p}:Needy", ref, "failed"),
            ("rank a biased plug-in", f"{p}:Biased", [*ref, "--estimators", "rloo,disarm",
                                                      "--seeds", "0,1"], "ok"),
            ("rank against no reference", f"{p}:Biased", ["--reference", "none", "--estimators",
                                                           "rloo"], "ok"),
    ):
        argv = ["rank", target, "--tasks", "toy_binary", *extra, "--no-report", "--steps", "20",
                "--checkpoints", "2", "--measure-samples", "8", "--quiet"]
        if "--out" not in extra:
            argv += out("rank_" + title.split()[-1])
        c.append((title, argv, expected))
    # ---- compare
    for title, a, b, extra, expected in (
            ("compare a missing folder", t / "nope", f["a"], [], "refused"),
            ("compare a file", f["file"], f["a"], [], "refused"),
            ("compare a folder with no cell", f["empty"], f["a"], [], "refused"),
            ("compare --threshold (replaced by --tolerance)", f["a"], f["b"], ["--threshold", "0.1"], "refused"),
            ("compare two runs of one budget", f["a"], f["b"], [], "ok"),
            ("compare a run with itself", f["a"], f["a"], [], "ok"),
            ("compare different budgets", f["a"], f["other_budget"], [], "refused"),
            ("compare: an estimator vanished in B", f["a"], f["fewer"], [], "failed"),
            ("compare: a damaged cell in B", f["a"], f["damaged"], [], "failed"),
            ("compare: an estimator only in B", f["fewer"], f["a"], [], "ok"),
            ("compare --tolerance without a value", f["a"], f["b"], ["--tolerance", "final_elbo"], "refused"),
            ("compare --tolerance of an unknown metric", f["a"], f["b"], ["--tolerance", "nope=1"], "refused"),
            ("compare --tolerance factor below 1", f["a"], f["b"], ["--tolerance", "variance=0.5"], "refused"),
            ("compare --tolerance negative", f["a"], f["b"], ["--tolerance", "final_elbo=-1"], "refused"),
            ("compare --tolerance inf", f["a"], f["b"], ["--tolerance", "final_elbo=inf"], "refused"),
            ("compare --tolerance given", f["a"], f["b"], ["--tolerance", "final_elbo=0.5"], "ok"),
    ):
        c.append((title, ["compare", str(a), str(b), *extra], expected))
    # ---- report and list
    c.append(("report a missing folder", ["report", str(t / "nope")], "refused"))
    c.append(("report a file", ["report", str(f["file"])], "refused"))
    c.append(("report a folder with no cell", ["report", str(f["empty"])], "refused"))
    c.append(("report with an invalid meta.json", ["report", str(f["badmeta"])], "note"))
    c.append(("report a damaged run", ["report", str(f["damaged"])], "note"))
    c.append(("report a good run", ["report", str(f["a"])], "ok"))
    c.append(("list", ["list"], "ok"))
    c.append(("list --json", ["list", "--json"], "ok"))
    c.append(("an unknown command", ["frobnicate"], "refused"))
    c.append(("no command", [], "refused"))
    return c


def api_cases(f: dict) -> list[tuple[str, object, str]]:
    """(title, a callable, expected): 'ok' or 'refused' (one clear exception, not a traceback of
    internals: an estbench.core.errors exception or ValueError naming the argument)."""
    import estbench

    t = f["tmp"]

    def api_run(seeds, name):
        def go():
            records, cells = estbench.run(tasks="toy_binary", estimators="rloo", seeds=seeds,
                                          out=str(t / "api" / name), steps=4, checkpoints=2,
                                          measure_samples=8)
            return sorted(set(cells.seed))
        return go

    return [("estbench.run(seeds='12')", api_run("12", "s12"), ("ok", [12])),
            ("estbench.run(seeds='0,1')", api_run("0,1", "s01"), ("ok", [0, 1])),
            ("estbench.run(seeds='0-2')", api_run("0-2", "s02"), ("ok", [0, 1, 2])),
            ("estbench.run(seeds='x')", api_run("x", "sx"), ("refused", None)),
            ("estbench.run(seeds=[-1])", api_run([-1], "sm"), ("refused", None))]


def classify(code, out: str, err: str, exc: str | None, expected: str) -> str:
    if exc:
        return "traceback"
    lines = [x for x in err.strip().splitlines() if x.strip()]
    if code == 2:
        msgs = [x for x in lines if "error:" in x]
        return "refused" if len(msgs) == 1 and lines[-1] in msgs else "refused-noisy"
    if code:
        return "failed"
    said = any(x.startswith(("note:", "estbench: warning:", "warning:")) for x in lines) or \
        "warning:" in out
    if expected in ("refused", "failed") or (expected == "note" and not said):
        return "silent"
    return "note" if said and expected == "note" else "ok"


def run_cli(argv: list) -> tuple:
    from estbench.cli.commands import main

    out, err = io.StringIO(), io.StringIO()
    exc = None
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
        except Exception:  # noqa: BLE001 - a traceback is what this exercise counts
            exc = traceback.format_exc()
    return code, out.getvalue(), err.getvalue(), exc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--failing", action="store_true", help="print only the unexpected outcomes")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="estbench-exercise-"))
    try:
        f = make_fixtures(tmp)
        tally, unexpected = Counter(), 0
        for title, argv, expected in cases(f):
            code, out, err, exc = run_cli(argv)
            got = classify(code, out, err, exc, expected)
            tally[got] += 1
            good = got == expected
            unexpected += not good
            if not good or not args.failing:
                first = (exc or err or out).strip().splitlines()
                say = first[-1][:150] if first else ""
                print(f"{'  ' if good else '!!'} {got:<14} (want {expected:<8}) exit {code}  {title}: {say}")
        for title, call, (expected, value) in api_cases(f):
            try:
                got_value = call()
                got = "ok" if value is None or got_value == value else f"wrong {got_value}"
            except (ValueError, TypeError) as e:
                got, got_value = "refused", str(e).splitlines()[0]
            except Exception:  # noqa: BLE001
                got, got_value = "traceback", traceback.format_exc().strip().splitlines()[-1]
            tally[got.split()[0]] += 1
            good = got == expected
            unexpected += not good
            if not good or not args.failing:
                print(f"{'  ' if good else '!!'} {got:<14} (want {expected:<8})          {title}: {got_value}")
        total = sum(tally.values())
        print(f"\n{total} cases: " + ", ".join(f"{n} {k}" for k, n in sorted(tally.items()))
              + f"; {unexpected} not as expected")
        return 1 if unexpected else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
