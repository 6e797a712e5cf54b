"""The summary table of a run: one row per task x estimator, means over seeds.

Derived from the tidy records only.  bias, variance and gradient error (the mean squared error of
one estimate, squared bias plus variance) are averaged over the checkpoints of a cell (along its
training trajectory), then over seeds; step time is seconds per training step; final
ELBO is the task's held-out figure at the end (higher is better).
"""
from __future__ import annotations

import dataclasses
import math

import pandas as pd

from estbench import metrics
from estbench.budget import Budget
from estbench.store import RECORD_IDENTITY

#: the per-cell columns of the summary, declared in estbench.metrics (``metrics.SUMMARY``)
SUMMARY_METRICS = list(metrics.SUMMARY)

#: one cell of a setting: a record's identity less its budget (where a folder holds a task under
#: several budgets, the task's label names the budget: report.tables.label_settings)
CELL_KEYS = [c for c in RECORD_IDENTITY if c not in {f.name for f in dataclasses.fields(Budget)}]
#: what the seeds of a setting are averaged over: a cell's keys less its seed
SETTING_KEYS = [c for c in CELL_KEYS if c != "seed"]
#: the budget columns of a record's identity
RECORD_BUDGET = [c for c in RECORD_IDENTITY if c not in CELL_KEYS]


def finished(records: pd.DataFrame, cells: pd.DataFrame | None) -> pd.DataFrame:
    """The records of the cells that finished (status ``ok``) only.

    A failed or diverged cell keeps the checkpoint records it made before it stopped; they are no
    measurement of the estimator, so rankings, tables, plots and comparisons must not see them.
    Joined with the status rows of ``store.load`` on ``store.RECORD_IDENTITY``.  Without status
    rows (``cells`` None) the records are returned as they are; with an empty frame, none.
    """
    if cells is None:
        return records
    if records.empty or cells.empty or "status" not in cells:
        return records.iloc[0:0]
    ok = cells.loc[cells.status == "ok", RECORD_IDENTITY].drop_duplicates()
    ok = ok.astype({c: records[c].dtype for c in RECORD_IDENTITY})
    return records.merge(ok, on=RECORD_IDENTITY, how="inner")[list(records.columns)]


def per_cell(records: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (index task, estimator, seed, device), a column per summary metric: the
    mean over the cell's checkpoints for checkpoint metrics, the value for end-of-cell ones."""
    wide = (records[records.metric.isin(SUMMARY_METRICS)]
            .groupby(CELL_KEYS + ["metric"])["value"].mean().unstack("metric"))
    return wide.reindex(columns=SUMMARY_METRICS)


def summary(records: pd.DataFrame) -> pd.DataFrame:
    if records.empty:
        return pd.DataFrame(columns=["task", "estimator", "seeds", *SUMMARY_METRICS])
    grouped = per_cell(records).groupby(SETTING_KEYS)
    out = grouped.mean()
    # one uncertainty convention everywhere (CLI table, report, leaderboard): the half-width of
    # the Student-t 95% confidence interval of the mean over seeds
    out["final_elbo_ci"] = grouped["final_elbo"].agg(lambda v: _ci95(v.to_numpy(float)))
    out["seeds"] = grouped.size()
    out["diverged"] = grouped["diverged"].sum()
    return out.reset_index()


def _ci95(v) -> float:
    """Half-width of the Student-t 95% confidence interval of the mean (NaN below two values)."""
    from estbench.report.tables import mean_ci  # lazy: scipy

    return mean_ci(v)[1]


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def render(summary_df: pd.DataFrame, cells: pd.DataFrame | None = None) -> str:
    """A fixed-width text table, grouped by task, sorted by final ELBO (best first)."""
    if summary_df.empty:
        return "(no results)"
    header = f"{'estimator':<32} {'final ELBO':>18} {'bias':>10} {'variance':>10} {'grad err':>10} " \
             f"{'cosine':>7} {'step ms':>8} {'f-evals':>7} {'seeds':>5}"
    lines = []
    for (task, device), df in summary_df.groupby(["task", "device"], sort=True):
        lines.append(f"== {task} [{device}] ==")
        lines.append(header)
        df = df.sort_values("final_elbo", ascending=False, na_position="last")
        for _, r in df.iterrows():
            elbo = _fmt(r.final_elbo, ".4f")
            if not (isinstance(r.final_elbo_ci, float) and math.isnan(r.final_elbo_ci)):
                elbo += f" ±{r.final_elbo_ci:.4f}"
            note = f"  ({int(r.diverged)} diverged)" if r.diverged else ""
            lines.append(
                f"{r.estimator:<32} {elbo:>18} {_fmt(r.bias, '.3g'):>10} {_fmt(r.variance, '.3g'):>10} "
                f"{_fmt(r.grad_error, '.3g'):>10} "
                f"{_fmt(r.cosine, '.3f'):>7} {_fmt(r.step_time * 1e3 if r.step_time == r.step_time else float('nan'), '.2f'):>8} "
                f"{_fmt(r.n_evals, '.0f'):>7} {int(r.seeds):>5}{note}"
            )
        lines.append("")
    if cells is not None and not cells.empty:
        for status, title in [("infeasible", "not run (infeasible: the budget does not fit the estimator's units, or the "
                               "problem is too large for it):"),
                              ("diverged", "diverged cells (left out of the table):"),
                              ("failed", "failed cells:")]:
            bad = cells[cells.status == status]
            if len(bad):
                lines.append(title)
                for _, r in bad.drop_duplicates(["task", "estimator", "error"]).iterrows():
                    lines.append(f"  {r.task} x {r.estimator}: {r.error}")
    return "\n".join(lines).rstrip() + "\n"
