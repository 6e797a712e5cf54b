"""Per-cell figures: records -> one row per cell, computed from the declarations in core.metrics.

The first step of the one results pipeline (records -> per-cell figures -> statistics -> views):
every table, ranking, plot and comparison reads the frame :func:`per_cell` returns, and nothing
computes a figure beside it.  A recorded metric enters as its mean over the cell's checkpoints (a
checkpoint metric) or its value (an end-of-cell one); a declared figure (``metrics.FIGURES``) is
its ``derive`` applied to the metrics it is ``of`` -- per cell, or at each checkpoint and then
averaged -- except the figures of whole curves, computed here by name (:data:`CURVE_FIGURES`).
So adding a metric or a figure is its computation and its declaration, nothing else.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from estbench.analysis import curves
from estbench.core import metrics
from estbench.core.records import CELL_KEYS

#: figures of whole curves (``derive`` None in their declaration): name -> records -> a frame of
#: ``CELL_KEYS``, the figure and the columns that say how it was read
CURVE_FIGURES = {
    "elbo_at_time": (curves.elbo_at_common_time, ["common_time", "median_time"]),
}


def _cell_metrics() -> list[str]:
    """The recorded metrics a per-cell row carries: the summary's, and those figures derive from."""
    derived = [m for f in metrics.FIGURES if f.derive is not None for m in f.of]
    return list(dict.fromkeys([*metrics.SUMMARY, "bias_noise", *derived]))


def columns() -> list[str]:
    """The columns of :func:`per_cell`, in order."""
    curve_extra = [c for _, extra in CURVE_FIGURES.values() for c in extra]
    return [*CELL_KEYS, *_cell_metrics(), *(f.name for f in metrics.FIGURES), "bias_p", *curve_extra]


def _empty_series() -> pd.Series:
    return pd.Series(dtype=float, index=pd.MultiIndex.from_tuples([], names=CELL_KEYS))


def _at_checkpoints(records: pd.DataFrame, figure: metrics.Figure) -> pd.Series:
    """Per cell, ``figure.derive`` at each checkpoint, averaged over the cell's checkpoints (NaN
    where the records lack its metrics)."""
    sub = records[records.metric.isin(figure.of)]
    if sub.empty:
        return _empty_series()
    at = sub.pivot_table(index=CELL_KEYS + ["step"], columns="metric", values="value",
                         aggfunc="mean").reindex(columns=list(figure.of))
    value = pd.Series(figure.derive(*(at[m].to_numpy(float) for m in figure.of)), index=at.index)
    return value.groupby(level=CELL_KEYS).mean()


def cell_bias_p(records: pd.DataFrame) -> pd.Series:
    """Per cell (index ``CELL_KEYS``), the bias test over its checkpoints: Bonferroni's
    min(1, k min_j p_j) over the k checkpoints' p-values (empty for records made before the test
    existed)."""
    p = records[records.metric == "bias_p"]
    if p.empty:
        return _empty_series()
    return p.groupby(CELL_KEYS)["value"].agg(lambda v: min(1.0, float(v.min()) * len(v)))


def per_cell(records: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (task, estimator, seed, device; columns :func:`columns`): the recorded
    metrics (checkpoint ones averaged over the cell's checkpoints), every declared figure, and
    ``bias_p``, the cell's bias test (:func:`cell_bias_p`).  Sorted by cell."""
    cols = columns()
    if records.empty:
        return pd.DataFrame(columns=cols)
    wide = (records[records.metric.isin(_cell_metrics())]
            .groupby(CELL_KEYS + ["metric"])["value"].mean().unstack("metric")
            .reindex(columns=_cell_metrics()))
    for figure in metrics.FIGURES:
        if figure.derive is None:
            continue
        if figure.at == metrics.CHECKPOINT:
            wide[figure.name] = _at_checkpoints(records, figure).reindex(wide.index)
        else:
            wide[figure.name] = figure.derive(*(wide[m].to_numpy(float) for m in figure.of))
    wide["bias_p"] = cell_bias_p(records).reindex(wide.index)
    out = wide.reset_index()
    for name, (compute, extra) in CURVE_FIGURES.items():
        read = compute(records)
        out = out.drop(columns=[name, *extra], errors="ignore")
        if read is not None and not read.empty:
            out = out.merge(read[[*CELL_KEYS, name, *extra]], on=CELL_KEYS, how="left")
        else:
            out[name] = np.nan
            for c in extra:
                out[c] = np.nan
    return out.reindex(columns=cols).sort_values(CELL_KEYS, ignore_index=True)
