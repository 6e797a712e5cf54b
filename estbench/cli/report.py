"""``estbench report`` and ``estbench compare``: the subcommands reading finished result sets.

    estbench report  RUN_DIR [--out DIR]
    estbench compare RUN_A RUN_B [--tolerance METRIC=VALUE ...] [--json]

``compare`` is a CI gate (estbench.analysis.compare; docs/benchmarks.md, "estbench compare as a CI gate").
Its exit status is a bit mask: 1 when a quality metric (final ELBO, variance, gradient error, bias
net of its noise or by the bias test, status: a cell that finished in A failed or diverged in B)
got worse beyond its tolerance and outside the seed-to-seed noise; 4 when the step time did; 8
when the gate is incomplete -- nothing was compared, a setting or seed of A is missing from B, a
cell file is damaged, a setting ran another budget, a metric of A has no value in B; they combine
(5 = 1 | 4, 9 = 1 | 8, ...); 0: the gate passed.  Each metric's tolerance is declared with it in
estbench/core/metrics.py (a difference in its unit, or a factor); ``--tolerance METRIC=VALUE``
overrides it.  Step times are judged only between cells timed in the same environment (CPU, CUDA
device, threads, jobs); otherwise they are "not comparable", never a regression.  Bad input (a
missing folder, no results, a bad --tolerance, the removed --threshold) and budgets that differ
for every shared setting are one line and exit 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from pathlib import Path

from estbench.core.errors import UsageError


def _need_run_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{what}: no results folder at {p}")
    if not (p / "cells").is_dir():
        raise UsageError(f"{what}: {p} is not an estbench results folder (no cells/ inside; "
                             f"make one with 'estbench run --out {p}')")
    return p


@contextlib.contextmanager
def _report_extra():
    """Imports that need the report extra (scipy, matplotlib, ...): one line if it is missing."""
    try:
        yield
    except ImportError as e:
        raise UsageError(f"this command needs the report extra ({e.name} is missing): "
                         "pip install 'estbench[report]'") from None


def cmd_report(args) -> int:
    run_dir = _need_run_dir(args.run_dir, "report")
    with _report_extra():
        from estbench.analysis import leaderboard as lb
        from estbench.report import render
    out = Path(args.out) if args.out else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN means of absent metrics
            analysis = render.write_report(run_dir, out)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    path = analysis.out / "report.md"
    print(lb.overall_text(analysis.board), end="")
    print(f"report: {path}")
    print(f"        {path.with_suffix('.html')} (self-contained)")
    return 0


THRESHOLD_REMOVED = ("--threshold was removed: it was a relative change (10% of an ELBO of -200 "
                     "is 20 nats); each metric now has a tolerance in its own units, declared in "
                     "estbench/core/metrics.py; override one with --tolerance METRIC=VALUE (e.g. "
                     "--tolerance final_elbo=0.5)")


def _threshold(text) -> None:
    """``--threshold`` is gone (it was relative); one line pointing at ``--tolerance``."""
    if text is not None:
        raise UsageError(THRESHOLD_REMOVED)


def cmd_compare(args) -> int:
    _threshold(args.threshold)
    a = _need_run_dir(args.run_a, "compare")
    b = _need_run_dir(args.run_b, "compare")
    with _report_extra():
        from estbench.analysis import compare as comp
    try:
        tolerances = comp.parse_tolerances(args.tolerance)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = comp.compare(a, b, tolerances)
    except (FileNotFoundError, ValueError) as e:  # comp.NotComparable is a ValueError
        raise UsageError(str(e)) from None
    code = result.exit_code
    if args.json:
        df = result.table
        rows = json.loads(df.to_json(orient="records"))
        print(json.dumps({"run_a": str(a), "run_b": str(b), "tolerances": result.tolerances,
                          "regressed": result.quality or result.speed,
                          "regressed_quality": result.quality, "regressed_speed": result.speed,
                          "incomplete": result.incomplete,
                          "problems": [{"text": p.text, "incomplete": p.incomplete}
                                       for p in result.problems],
                          "exit_code": code, "rows": rows}, indent=1))
    else:
        print(f"A = {a}\nB = {b}\n")
        print(comp.render(result), end="")
    return code


def add_parsers(subparsers) -> None:
    """Add the ``report`` and ``compare`` subcommands to estbench's argparse subparsers."""
    r = subparsers.add_parser("report", help="write report.md/.html, tables, plots and the "
                                             "leaderboard of a results folder")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a results folder made by 'estbench run'")
    r.add_argument("--out", help="where to write the report (default RUN_DIR/report)")
    r.set_defaults(func=cmd_report)

    c = subparsers.add_parser(
        "compare", help="a CI gate: what changed between two results folders.  Exit status, a bit "
                        "mask: 1 a quality regression (final ELBO, variance, gradient error, "
                        "bias, status) beyond its tolerance and outside the seed noise, 4 a "
                        "step-time regression, 8 an incomplete gate (nothing compared, a setting "
                        "or seed of A missing from B, a damaged cell file, a setting run on "
                        "another budget); combined: 5 = 1|4, 9 = 1|8, ...; 0 passed; 2 bad input "
                        "or budgets that differ everywhere",
        description="Compare RUN_B with the baseline RUN_A per (task, estimator, device), each "
                    "metric against its tolerance (estbench/core/metrics.py) and the seed-to-seed "
                    "noise.  Exit status, a bit mask: 1 a quality regression, 4 a speed "
                    "(step-time) regression, 8 an incomplete gate (nothing compared, a setting "
                    "or seed of RUN_A missing from RUN_B, a damaged cell file, a setting run on "
                    "another budget); they combine (9 = 1|8); 0 passed; 2 bad input or budgets "
                    "that differ for every setting.  See docs/benchmarks.md, 'estbench compare "
                    "as a CI gate'.")
    c.add_argument("run_a", metavar="RUN_A", help="the baseline results folder")
    c.add_argument("run_b", metavar="RUN_B", help="the results folder to check against it")
    c.add_argument("--tolerance", action="append", metavar="METRIC=VALUE", default=[],
                   help="override a metric's regression tolerance, declared in "
                        "estbench/core/metrics.py (repeatable): a difference in the metric's own unit "
                        "for final_elbo (default 1 nat; toys 0.005-0.05), a factor >= 1 for "
                        "variance, grad_error, net_bias, step_ms (default 1.25)")
    c.add_argument("--threshold", default=None, help=argparse.SUPPRESS)  # removed: one-line error
    c.add_argument("--json", action="store_true", help="print the comparison as JSON")
    c.set_defaults(func=cmd_compare)
