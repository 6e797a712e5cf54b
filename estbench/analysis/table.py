"""The summary table of a run: one row per task x estimator, means over seeds.

Derived from the tidy records only.  bias, variance and gradient error (the mean squared error of
one estimate, squared bias plus variance) are averaged over the checkpoints of a cell (along its
training trajectory), then over seeds; step time is seconds per training step; final
ELBO is the task's test figure at the end (higher is better).
"""
from __future__ import annotations

import math

import pandas as pd

from estbench.analysis import figures
from estbench.core import metrics
from estbench.core.records import CELL_KEYS, SETTING_KEYS

#: the per-cell columns of the summary, declared in estbench.core.metrics (``metrics.SUMMARY``)
SUMMARY_METRICS = list(metrics.SUMMARY)
#: what the summary averages over seeds: those, and whatever else the CLI table shows
SUMMARY_COLUMNS = list(dict.fromkeys([*SUMMARY_METRICS, "net_bias", *(c[0] for c in metrics.CLI_TABLE)]))



#: a cell's bias test rejects "unbiased" below this p (after Bonferroni over its checkpoints)
BIAS_TEST_ALPHA = 0.01


def estimator_bias(pc: pd.DataFrame) -> pd.DataFrame:
    """Per (task, estimator), the bias test over its cells: ``p`` (Bonferroni's min(1, n min p)
    over the n cells' p-values, each already Bonferroni over its checkpoints), ``rejecting`` (cells
    whose own p is below BIAS_TEST_ALPHA), ``cells`` and the verdict ``biased``: more than half of
    the cells reject.  A real bias repeats from seed to seed; a lone rejection can come from the
    test's normal approximation failing where a few rare, large estimates decide the mean (late in
    training, q nearly deterministic) and M estimates miss them, so one cell cannot make the
    verdict.  ``pc``: per-cell rows with task, estimator and bias_p columns.
    Empty without a test in the records."""
    cols = ["p", "rejecting", "cells", "biased"]
    if pc.empty or "bias_p" not in pc or pc["bias_p"].isna().all():
        return pd.DataFrame(columns=cols, index=pd.MultiIndex.from_tuples([], names=["task", "estimator"]))
    g = pc.dropna(subset=["bias_p"]).groupby(["task", "estimator"])["bias_p"]
    out = pd.DataFrame({"p": g.agg(lambda v: min(1.0, float(v.min()) * len(v))),
                        "rejecting": g.agg(lambda v: int((v < BIAS_TEST_ALPHA).sum())),
                        "cells": g.size()})
    out["biased"] = out["rejecting"] > out["cells"] / 2
    return out


def biased_set(pc: pd.DataFrame) -> set:
    """The (task, estimator) pairs whose bias test verdict is *biased*."""
    b = estimator_bias(pc)
    return set(b.index[b["biased"].astype(bool)]) if not b.empty else set()


def summary(records: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (task, estimator, device): the per-cell figures' means over seeds, the
    final ELBO's 95% confidence half-width, the seeds, the diverged cells and ``biased``, the bias
    test's verdict over the setting's cells (``estimator_bias``; NaN without a test)."""
    if records.empty:
        return pd.DataFrame(columns=["task", "estimator", "seeds", *SUMMARY_COLUMNS, "biased"])
    pc = figures.per_cell(records).set_index(CELL_KEYS)[[*SUMMARY_COLUMNS, "bias_p"]]
    grouped = pc.drop(columns="bias_p").groupby(SETTING_KEYS)
    out = grouped.mean()
    # one uncertainty convention everywhere (CLI table, report, leaderboard): the half-width of
    # the Student-t 95% confidence interval of the mean over seeds
    out["final_elbo_ci"] = grouped["final_elbo"].agg(lambda v: _ci95(v.to_numpy(float)))
    out["seeds"] = grouped.size()
    out["diverged"] = grouped["diverged"].sum()
    out = out.reset_index()
    verdict = estimator_bias(pc.reset_index())
    out["biased"] = [verdict["biased"].get((t, e), math.nan) if not verdict.empty else math.nan
                     for t, e in zip(out.task, out.estimator)]
    return out


def _ci95(v) -> float:
    """Half-width of the Student-t 95% confidence interval of the mean (NaN below two values)."""
    from estbench.analysis.stats import mean_ci  # lazy: scipy

    return mean_ci(v)[1]


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _column_text(r, name: str, spec: str) -> str:
    """A CLI table cell: the mean over seeds; the bias (beyond its noise floor) with the bias
    test's verdict beside it."""
    text = _fmt(getattr(r, name), spec)
    if name == "net_bias":
        text += {True: " biased", False: " ok"}.get(r.biased if isinstance(r.biased, bool) else None, "")
    return text


#: the CLI table's legend, printed under it; ``{rank}`` names the rank column, which needs the
#: report extra's statistics (scipy)
LEGEND = ("final ELBO: mean ±95% CI over seeds; {rank}: 1 + the estimators significantly better "
          "(Holm-corrected paired tests over seeds), a-b where the evidence allows places a to "
          "b, '=' where others share the rank; bias: beyond its Monte Carlo noise floor, "
          "then the bias test's verdict (ok: not rejected; biased: rejected in most seeds); "
          "oracles (exact) are references, not ranked")


def render(summary_df: pd.DataFrame, cells: pd.DataFrame | None = None,
           ranks: pd.DataFrame | None = None) -> str:
    """A fixed-width text table, grouped by task, sorted by final ELBO (best first), with the
    failed, diverged and not-run cells listed under it.  ``ranks``: the leaderboard's final-ELBO
    rows (task, estimator, rank, rank_worst) when it could be computed (it needs scipy)."""
    lines = []
    if summary_df.empty:
        lines.append("(no finished cell: nothing to tabulate)")
    header = f"{'estimator':<32} {'rank':>6} {'final ELBO':>18} " \
             + "".join(f"{title:>{width}} " for _, title, width, _ in metrics.CLI_TABLE) \
             + f"{'seeds':>5}"
    placed = {}
    if ranks is not None and not ranks.empty:
        shared = ranks.groupby(["task", "rank"])["estimator"].transform("size") > 1
        for r, tie in zip(ranks.itertuples(index=False), shared):
            text = f"{int(r.rank)}" if r.rank == r.rank_worst else f"{int(r.rank)}-{int(r.rank_worst)}"
            placed[(r.task, r.estimator)] = ("=" if tie else "") + text
    groups = summary_df.groupby(["task", "device"], sort=True) if not summary_df.empty else []
    for (task, device), df in groups:
        lines.append(f"== {task} [{device}] ==")
        lines.append(header)
        df = df.sort_values("final_elbo", ascending=False, na_position="last")
        for _, r in df.iterrows():
            elbo = _fmt(r.final_elbo, ".4f")
            if not (isinstance(r.final_elbo_ci, float) and math.isnan(r.final_elbo_ci)):
                elbo += f" ±{r.final_elbo_ci:.4f}"
            note = f"  ({int(r.diverged)} diverged)" if r.diverged else ""
            place = placed.get((task, r.estimator), "oracle" if _oracle(r.estimator) else "-")
            cols = "".join(f"{_column_text(r, name, spec):>{width}} "
                           for name, _, width, spec in metrics.CLI_TABLE)
            lines.append(f"{r.estimator:<32} {place:>6} {elbo:>18} {cols}{int(r.seeds):>5}{note}")
        lines.append("")
    if not summary_df.empty:
        lines.append(LEGEND.format(rank="rank" if placed else "rank (needs scipy)"))
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


def _oracle(label: str) -> bool:
    import estimators  # the plug-in layer below: only to read a declaration

    return estimators.is_oracle(label)
