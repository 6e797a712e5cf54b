"""How much a shorter quick budget changes the held-out figures, from a committed result set.

    python results/quick_budget_check.py [RUN] [--tasks a,b] [--at 0.5]

For each task of ``RUN`` (default ``results/quick_budget_evidence``: the committed reference's
curves before issue #23 cut the budgets, see its README): the estimators' mean held-out ELBO (the
curve's ``elbo``, means over seeds) at the curve point nearest ``--at`` of the run's steps and at
its last step, and Kendall's tau-b between the two orders.  Issue #23 read it to cut quick budgets:
a high tau says the estimators' order is already there at the shorter length, a mean that no
longer moves says the curve has plateaued.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from scipy.stats import kendalltau

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", default=str(ROOT / "results" / "quick_budget_evidence"))
    ap.add_argument("--tasks", default="")
    ap.add_argument("--at", type=float, default=0.5, help="the shorter length, as a share of the run's")
    args = ap.parse_args(argv)
    df = pd.read_parquet(Path(args.run) / "results.parquet", columns=["task", "estimator", "step",
                                                                       "metric", "value"])
    df = df[df.metric == "elbo"]
    wanted = [t for t in args.tasks.split(",") if t] or sorted(df.task.unique())
    print(f"{'task':28s} {'short':>6s} {'end':>6s} {'mean ELBO short':>16s} {'mean ELBO end':>14s} "
          f"{'spread end':>10s} {'tau':>5s}")
    for task in wanted:
        e = df[df.task == task]
        if e.empty:
            print(f"{task:28s} no held-out ELBO curve in {args.run}")
            continue
        steps = sorted(e.step.unique())
        end = steps[-1]
        short = min(steps, key=lambda s: abs(s - args.at * end))
        a = e[e.step == short].groupby("estimator").value.mean()
        b = e[e.step == end].groupby("estimator").value.mean()
        both = pd.concat([a, b], axis=1).dropna()
        tau = kendalltau(both.iloc[:, 0], both.iloc[:, 1])[0]
        print(f"{task:28s} {short:6d} {end:6d} {a.mean():16.3f} {b.mean():14.3f} {b.std():10.3f} "
              f"{tau:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
