"""Training curves read at a common training time: the held-out ELBO at equal wall-clock.

A step budget gives every estimator the same number of steps, not the same time: an estimator
whose step costs three times as much got three times the compute.  Each cell records its held-out
ELBO and its training time so far (``elbo``, ``wall_time``: the timed steps only, not measurements
nor evaluations) at its evaluation points, so its curve can be read at any time it reached.  Per
task the common time ``T`` is the shortest training time of any finished cell there -- the longest
time every curve reaches, so no estimator is credited with training it did not do -- and each curve
is read at ``T`` by linear interpolation between its evaluation points (``Budget.eval_points``:
the finer they are, the closer the reading).

Under a time budget (``estbench run --seconds S``) every cell trained for ``S`` seconds, ``T`` is
``S`` (up to the length of a step) and the reading is the final ELBO at equal time; under a step
budget, ``T`` is often a fraction of the slowest estimators' training: the report says which.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from estbench.core.records import CELL_KEYS

#: the columns that identify a cell in the report's frames


def curves(records: pd.DataFrame) -> pd.DataFrame:
    """Each cell's held-out ELBO against its training time: columns ``task, estimator, device,
    seed, step, wall_time, elbo``, sorted by time within a cell."""
    cols = [*CELL_KEYS, "step", "wall_time", "elbo"]
    r = records[records.metric.isin(["elbo", "wall_time"])]
    if r.empty:
        return pd.DataFrame(columns=cols)
    wide = r.pivot_table(index=[*CELL_KEYS, "step"], columns="metric", values="value", aggfunc="mean")
    wide = wide.reindex(columns=["wall_time", "elbo"]).dropna().reset_index()
    return wide.sort_values([*CELL_KEYS, "wall_time"], ignore_index=True)[cols]


def common_times(curve: pd.DataFrame) -> pd.DataFrame:
    """Per (task, device): ``common_time`` (the shortest training time of any cell there, the
    longest every curve reaches) and ``median_time`` (the median cell's training time), seconds."""
    total = curve.groupby(CELL_KEYS)["wall_time"].max().reset_index()
    g = total.groupby(["task", "device"])["wall_time"]
    return pd.DataFrame({"common_time": g.min(), "median_time": g.median()}).reset_index()


def elbo_at_common_time(records: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: ``elbo_at_time``, its curve read at its task's common time (linear
    interpolation between evaluation points), with ``common_time`` and ``median_time``."""
    cols = [*CELL_KEYS, "elbo_at_time", "common_time", "median_time"]
    curve = curves(records)
    if curve.empty:
        return pd.DataFrame(columns=cols)
    times = common_times(curve)
    curve = curve.merge(times, on=["task", "device"])
    rows = []
    for key, c in curve.groupby(CELL_KEYS, sort=True):
        t = float(c.common_time.iloc[0])
        rows.append((*key, float(np.interp(t, c.wall_time.to_numpy(float), c.elbo.to_numpy(float))),
                     t, float(c.median_time.iloc[0])))
    return pd.DataFrame(rows, columns=cols)
