"""Statistics over seeds: means with their confidence intervals.

The only statistics module the per-cell figures (``analysis.table``) and the tables, plots and
leaderboards above them share; scipy is imported here, on first use of the analysis layer.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats


def mean_ci(values, level: float = 0.95) -> tuple[float, float, int]:
    """Mean, half-width of the Student-t confidence interval, and the number of finite values.

    NaNs are dropped; the half-width is NaN with fewer than two values (or a non-finite mean).
    """
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    with np.errstate(invalid="ignore"):
        m = float(v.mean())
    if n < 2 or not math.isfinite(m):
        return m, math.nan, n
    sd = float(v.std(ddof=1))
    return m, float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)), n


def ci_frame(pc: pd.DataFrame, metrics: list[str], by: list[str], level: float = 0.95) -> pd.DataFrame:
    """``{metric}_mean``, ``{metric}_ci`` (half-width) and ``{metric}_n`` per group of ``by``."""
    rows = []
    for key, df in pc.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_ci"], row[f"{m}_n"] = mean_ci(df[m], level)
        rows.append(row)
    return pd.DataFrame(rows, columns=by + [f"{m}_{s}" for m in metrics for s in ("mean", "ci", "n")])
