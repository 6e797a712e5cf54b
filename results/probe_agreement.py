"""How far the shared-parameter ranking moves, and where it disagrees with the trajectory view.

    python results/probe_agreement.py            print both tables (markdown)

1. Driver neutrality: per toy, the probe's order of the estimators by gradient error at the
   committed set (trained by the exact gradient, ``results/probe``) against the order at a set of
   the same toy trained by a biased driver (``results/driver_neutrality/probe``, made by
   results/make_driver_neutrality.sh): Kendall's tau-b and its p-value (scipy), over the
   estimators both probed.
2. The probe against the trajectory view: per task, the probe's order (``results/probe``) against
   the committed reference's (``results/reference``: each estimator measured along its own
   training trajectory at the quick budget's checkpoints), both by the geometric mean of the
   gradient error, with the estimators that move most.

Both orders are by one statistic, the geometric mean of ``grad_error`` over the points measured
(snapshots; checkpoints and seeds), the oracle left out.  The README quotes these tables.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from published_table import between  # results/, beside this script (on the path as a script runs)

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path("results/probe")
NEUTRALITY = Path("results/driver_neutrality/probe")
REFERENCE = Path("results/reference")
#: the estimators that move most, listed per task
MOVERS = 3
#: the README's lines around the tables
BEGIN, END = "<!-- probe-agreement: begin -->", "<!-- probe-agreement: end -->"


def _order(records: pd.DataFrame) -> pd.DataFrame:
    """Per (task, estimator): the geometric mean of the gradient error (NaN and non-finite values
    dropped; an estimator with none is left out), the oracle excluded."""
    from estbench.analysis.table import _oracle

    g = records[(records.metric == "grad_error") & np.isfinite(records.value) & (records.value > 0)]
    g = g[[not _oracle(e) for e in g.estimator]]
    out = g.assign(log=np.log10(g.value)).groupby(["task", "estimator"]).log.mean()
    return (10 ** out).rename("grad_error").reset_index()


def _task_name(task: str) -> str:
    from estbench.core.spec import parse

    return parse(task).name


def _tau(a: pd.Series, b: pd.Series) -> tuple[float, float, int]:
    from scipy.stats import kendalltau

    both = pd.concat([a, b], axis=1, join="inner").dropna()
    if len(both) < 3:
        return math.nan, math.nan, len(both)
    r = kendalltau(both.iloc[:, 0], both.iloc[:, 1])
    return float(r.statistic), float(r.pvalue), len(both)


def _by_name(t: pd.DataFrame) -> pd.Series:
    """Gradient error by estimator, named by the plug-in's name where one configuration of it ran
    (a probe gives a protocol's tuned options, e.g. ``reinmax[temperature=1.3]`` on categorical_vae,
    where the quick budget's trajectory ran the defaults: the same estimator for this purpose)."""
    from estbench.core.spec import parse

    names = t.estimator.map(lambda e: parse(e).name)
    unique = ~names.duplicated(keep=False)
    return pd.Series(t.grad_error.to_numpy(), index=names.where(unique, t.estimator).to_numpy())


def driver_neutrality(root: Path = ROOT) -> pd.DataFrame:
    base = _order(pd.read_parquet(root / PROBE / "results.parquet"))
    other_records = pd.read_parquet(root / NEUTRALITY / "results.parquet")
    other = _order(other_records)
    drivers = {}
    from estbench.engine import snapshots

    for s in snapshots.find([root / "results/driver_neutrality/snapshots"]):
        drivers[s.task] = s.driver
    rows = []
    for task, o in other.groupby("task"):
        b = base[base.task == task]
        if b.empty:
            continue
        tau, p, n = _tau(b.set_index("estimator").grad_error, o.set_index("estimator").grad_error)
        rows.append({"task": task, "driver": drivers.get(task, "?"), "estimators": n,
                     "tau": tau, "p": p})
    return pd.DataFrame(rows)


def against_trajectory(root: Path = ROOT) -> pd.DataFrame:
    probe = _order(pd.read_parquet(root / PROBE / "results.parquet"))
    traj = _order(pd.read_parquet(root / REFERENCE / "results.parquet"))
    probe["name"] = probe.task.map(_task_name)
    traj["name"] = traj.task.map(_task_name)
    rows = []
    for name, p in probe.groupby("name"):
        t = traj[traj.name == name]
        if t.empty or p.task.nunique() != 1 or t.task.nunique() != 1:
            continue
        a, b = _by_name(p), _by_name(t)
        tau, pv, n = _tau(a, b)
        # ranks among the estimators both have (1: the smallest gradient error)
        both = pd.concat([a, b], axis=1, join="inner", keys=["probe", "traj"]).dropna().rank()
        move = (both.probe - both.traj).sort_values(key=abs, ascending=False)
        movers = ", ".join(f"`{e}` {int(both.traj[e])}→{int(both.probe[e])}"
                           for e, d in move.head(MOVERS).items() if d != 0)
        rows.append({"task": name, "estimators": n, "tau": tau, "p": pv,
                     "moves most (trajectory rank → probe rank)": movers or "-"})
    return pd.DataFrame(rows)


def _md(t: pd.DataFrame) -> str:
    if t.empty:
        return "(nothing to compare)"
    cols = list(t.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(":---" for _ in cols) + "|"]
    for _, r in t.iterrows():
        lines.append("| " + " | ".join(
            (f"{v:+.2f}" if c == "tau" else f"{v:.2g}") if isinstance(v, float) else str(v)
            for c, v in zip(cols, r)) + " |")
    return "\n".join(lines)


def report(root: Path = ROOT) -> str:
    """Both tables as the README holds them."""
    parts = []
    if (root / NEUTRALITY / "results.parquet").is_file():
        parts += ["Driver neutrality: the probe's order by gradient error at the exact-gradient "
                  "driver's snapshots against a biased driver's, per toy (Kendall's tau-b):", "",
                  _md(driver_neutrality(root)), ""]
    parts += ["The probe's order against the trajectory view's (`results/reference`), by gradient "
              "error (Kendall's tau-b):", "", _md(against_trajectory(root))]
    return "\n".join(parts)


def readme_block(readme: str) -> str:
    """The tables as the README holds them (between the markers)."""
    return between(readme, BEGIN, END)


if __name__ == "__main__":
    if not (ROOT / PROBE / "results.parquet").is_file():
        print(f"no probe at {PROBE}: run bash results/make_probe.sh", file=sys.stderr)
        sys.exit(2)
    print(report())
    sys.exit(0)
