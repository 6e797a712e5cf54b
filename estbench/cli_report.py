"""``estbench report`` and ``estbench compare``: the subcommands reading finished result sets.

    estbench report  RUN_DIR [--out DIR]
    estbench compare RUN_A RUN_B [--threshold 0.1] [--json]

``compare``'s exit status is a bit mask for CI: 1 when a quality metric (final ELBO, bias,
variance, status: a cell that finished in A failed or diverged in B) got worse beyond the threshold
and outside the seed-to-seed noise, 4 when the step time did (a speed regression only), 5 for both
(1 | 4), 0 for none.  Step times are judged only between cells timed in the same environment (CPU,
CUDA device, threads, jobs); otherwise they are "not comparable", never a regression.  Bad input
(a missing folder, no results) is one line and exit 2.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from estbench.errors import UsageError


def _need_run_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{what}: no results folder at {p}")
    if not (p / "cells").is_dir():
        raise UsageError(f"{what}: {p} is not an estbench results folder (no cells/ inside; "
                             f"make one with 'estbench run --out {p}')")
    return p


def _import_report_extra(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise UsageError(f"this command needs the report extra ({e.name} is missing): "
                             "pip install 'estbench[report]'") from None


def cmd_report(args) -> int:
    run_dir = _need_run_dir(args.run_dir, "report")
    render = _import_report_extra("estbench.report.render")
    lb = _import_report_extra("estbench.report.leaderboard")
    out = Path(args.out) if args.out else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN means of absent metrics
            path = render.build_report(run_dir, out)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    import pandas as pd
    board = pd.read_csv(path.parent / "leaderboard.csv")
    print(lb.overall_text(board), end="")
    print(f"report: {path}")
    print(f"        {path.with_suffix('.html')} (self-contained)")
    return 0


def _threshold(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UsageError(f"--threshold must be a number (a relative change, 0.1 = 10%), "
                             f"got {text!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise UsageError(f"--threshold must be >= 0, got {text!r}")
    return v


def cmd_compare(args) -> int:
    threshold = _threshold(args.threshold)
    a = _need_run_dir(args.run_a, "compare")
    b = _need_run_dir(args.run_b, "compare")
    comp = _import_report_extra("estbench.compare")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            df, quality, speed = comp.compare(a, b, threshold)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    code = comp.exit_code(quality, speed)
    if args.json:
        rows = json.loads(df.to_json(orient="records"))
        print(json.dumps({"run_a": str(a), "run_b": str(b), "threshold": threshold,
                          "regressed": quality or speed, "regressed_quality": quality,
                          "regressed_speed": speed, "exit_code": code, "rows": rows}, indent=1))
    else:
        print(f"A = {a}\nB = {b}\n")
        print(comp.render(df, threshold), end="")
    return code


def add_parsers(subparsers) -> None:
    """Add the ``report`` and ``compare`` subcommands to estbench's argparse subparsers."""
    r = subparsers.add_parser("report", help="write report.md/.html, tables, plots and the "
                                             "leaderboard of a results folder")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a results folder made by 'estbench run'")
    r.add_argument("--out", help="where to write the report (default RUN_DIR/report)")
    r.set_defaults(func=cmd_report)

    c = subparsers.add_parser("compare", help="what changed between two results folders; exit 1 "
                                              "on a quality regression (final ELBO, bias, "
                                              "variance, status) beyond --threshold, 4 on a "
                                              "step-time regression only, 5 on both, 2 on bad "
                                              "input; step times timed in different environments "
                                              "are not compared")
    c.add_argument("run_a", metavar="RUN_A", help="the baseline results folder")
    c.add_argument("run_b", metavar="RUN_B", help="the results folder to check against it")
    c.add_argument("--threshold", default="0.1",
                   help="relative worsening counted as a regression (default 0.1 = 10%%)")
    c.add_argument("--json", action="store_true", help="print the comparison as JSON")
    c.set_defaults(func=cmd_compare)
