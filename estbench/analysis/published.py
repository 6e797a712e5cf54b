"""Our figures beside the published ones: for every protocol whose as-published mode carries its
source's figures (``tasks/protocols/TASK.yml``: ``as_published.published``), the cells of a run
that ran a method as its source ran it, held against the source's figure for that method.

Which cells.  A cell is compared when its estimator is exactly the configuration the
as-published mode gives a method and its task takes every option the mode sets for that method
(``protocols.published_options``), whatever folder it lies in.  A cell at those settings but cut short (fewer steps than the mode's budget,
``estbench run --budget published --steps N``) is shown and marked *not comparable*: its figure is
not the source's.

What is computed, per method and figure:

* ours: the metric the figure names (``train_objective`` or ``final_elbo``, times its ``sign``)
  at each cell's last record, its mean and 95% Student-t interval over seeds;
* the source's: mean +- standard error over its seeds (data in the protocol file);
* the difference ours - published in the figure's unit, with its Welch standard error, and a
  Welch two-sample t-test from the two summaries (``scipy.stats.ttest_ind_from_stats``; with one
  seed of ours there is no spread of ours to test: the p-value is NaN); where the source
  published one run (no standard error), the prediction-interval test of that run as one more
  draw from our seeds' distribution (:func:`_one_run`);
* the verdict: ``reproduced`` (no difference beyond the noise, p >= 0.05), ``ours lower`` /
  ``ours higher`` (a difference beyond the noise, p < 0.05), ``not tested`` (one seed),
  ``not comparable`` (a cut run).

The ordering.  Per figure, the methods ordered by the source's means and by ours (lower first for
a loss, i.e. a figure with ``sign`` -1; higher first otherwise) and whether the orders agree; each
pair whose order flips is named, with whether the source itself separates it beyond its noise
(a flip inside the source's own noise says little).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sst

import estimators
import tasks
from estbench.analysis.stats import mean_ci
from estbench.core.spec import parse
from estbench.engine import protocols

#: the columns of :func:`against_published`'s frame
COLUMNS = ["task", "figure", "label", "estimator", "source_name", "cell_task", "cell_estimator",
           "device", "steps", "published_steps", "ours_mean", "ours_ci", "ours_n", "published_mean",
           "published_se", "published_n", "difference", "difference_se", "p_value", "verdict"]
#: below this two-sample p-value a difference is beyond the noise
ALPHA = 0.05


def _as_published_pairs(base: str, ap: protocols.AsPublished, pairs) -> dict:
    """{(cell task, cell estimator): method} of the ``pairs`` run as the source ran a method: the
    estimator exactly the method's configuration, the task at every option the mode sets for it
    (options it does not set -- how many images the curve evaluates, the IWAE's samples -- may
    differ: they do not touch the figures compared)."""
    wanted = {}
    for est in ap.per_method:
        t_opts, e_opts = protocols.published_options(base, est, {}, {})
        wanted[estimators.get(est, **e_opts).display_name] = (
            est, tasks.get(base, **t_opts).config, set(t_opts))
    out = {}
    for task, est in pairs:
        if est not in wanted:
            continue
        method, config, keys = wanted[est]
        spec = parse(task)
        try:
            got = tasks.get(spec.name, **spec.options).config
        except Exception:  # a task configuration this code no longer takes
            continue
        if all(got[k] == config[k] for k in keys):
            out[(task, est)] = method
    return out


def _welch(m1, s1, n1, m2, s2, n2):
    """(difference standard error, two-sided p) of m1 - m2 from two summaries (s: standard
    deviations); NaN p with fewer than two values on a side."""
    se = math.sqrt(s1 ** 2 / n1 + s2 ** 2 / n2) if n1 and n2 else math.nan
    if n1 < 2 or n2 < 2 or not math.isfinite(se):
        return se, math.nan
    if se == 0:
        return se, 1.0 if m1 == m2 else 0.0
    return se, float(sst.ttest_ind_from_stats(m1, s1, n1, m2, s2, n2, equal_var=False).pvalue)


def _one_run(m, sd, n, value):
    """(standard error, two-sided p) of ours - ``value`` where the source published one run: is
    that run a plausible draw from our seeds' distribution?  The prediction-interval test,
    t = (value - m) / (sd sqrt(1 + 1/n)) with n - 1 degrees of freedom; NaN p with one seed."""
    if n < 2 or not math.isfinite(sd):
        return math.nan, math.nan
    se = sd * math.sqrt(1 + 1 / n)
    if se == 0:
        return se, 1.0 if m == value else 0.0
    return se, float(2 * sst.t.sf(abs(value - m) / se, n - 1))


def against_published(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, figure, method) with cells run as published in ``records`` (finished
    cells' tidy records); empty (with :data:`COLUMNS`) when there are none."""
    rows = []
    if records.empty:
        return pd.DataFrame(columns=COLUMNS)
    bases = {t.split("[")[0] for t in records.task.unique()}
    for base in sorted(bases & set(protocols.available())):
        ap = protocols.get(base).as_published
        if ap is None or ap.published is None:
            continue
        pub = ap.published
        mine = records[records.task.str.split("[").str[0] == base]
        pairs = mine[["task", "estimator"]].drop_duplicates().itertuples(index=False)
        for (tname, ename), est in sorted(_as_published_pairs(base, ap, pairs).items()):
            cell = mine[(mine.task == tname) & (mine.estimator == ename)]
            if est not in pub.values:
                continue
            for fig_name, (p_mean, p_se, p_n) in pub.values[est].items():
                fig = pub.figures[fig_name]
                r = cell[cell.metric == fig.metric]
                if r.empty:
                    continue
                target = int(fig.steps or ap.budget.get("steps", 0))
                # each cell's last record, from the cells of the figure's length; cells cut
                # shorter are shown (not comparable) only where none has that length
                last = r.loc[r.groupby(["steps", "device", "seed"]).step.idxmax()]
                last = (last[last.steps == target] if (last.steps == target).any()
                        else last[last.steps < target])
                for (steps, device), by_steps in last.groupby(["steps", "device"]):
                    vals = fig.sign * by_steps.value.to_numpy(dtype=float)
                    m, ci, n = mean_ci(vals)
                    sd = float(np.std(vals, ddof=1)) if n > 1 else math.nan
                    diff = m - p_mean
                    if p_n > 1:
                        diff_se, p = _welch(m, sd, n, p_mean, p_se * math.sqrt(p_n), p_n)
                    else:
                        diff_se, p = _one_run(m, sd, n, p_mean)
                    if int(steps) < target:
                        verdict = "not comparable"
                    elif not math.isfinite(p):
                        verdict = "not tested"
                    elif p >= ALPHA:
                        verdict = "reproduced"
                    else:
                        verdict = "ours lower" if diff < 0 else "ours higher"
                    rows.append({"task": base, "figure": fig_name, "label": fig.label,
                                 "estimator": est, "source_name": ap.per_method[est].source_name,
                                 "cell_task": tname, "cell_estimator": ename, "device": device,
                                 "steps": int(steps),
                                 "published_steps": target,
                                 "ours_mean": m, "ours_ci": ci, "ours_n": n,
                                 "published_mean": p_mean, "published_se": p_se,
                                 "published_n": p_n, "difference": diff,
                                 "difference_se": diff_se, "p_value": p, "verdict": verdict})
    return pd.DataFrame(rows, columns=COLUMNS)


@dataclass(frozen=True)
class Ordering:
    """The methods of one figure ordered by the source's means and by ours."""

    task: str
    figure: str
    label: str
    published: tuple
    ours: tuple
    #: (a, b, the source separates them beyond its noise): pairs the source orders a before b
    #: and we order b before a
    flipped: tuple

    @property
    def agrees(self) -> bool:
        return self.published == self.ours


def orderings(table: pd.DataFrame) -> list[Ordering]:
    """Per (task, figure) of :func:`against_published`'s comparable rows, the two orders; the
    best first (lowest first for a figure the source reports as a loss, sign -1)."""
    out = []
    comparable = table[table.verdict != "not comparable"]
    for (task, fig_name, _), df in comparable.groupby(["task", "figure", "device"], sort=True):
        if len(df) < 2:
            continue
        fig = protocols.get(task).as_published.published.figures[fig_name]
        ascending = fig.sign < 0
        pub = tuple(df.sort_values("published_mean", ascending=ascending).estimator)
        ours = tuple(df.sort_values("ours_mean", ascending=ascending).estimator)
        by = df.set_index("estimator")
        flipped = []
        for i, a in enumerate(pub):
            for b in pub[i + 1:]:
                if ours.index(a) > ours.index(b):
                    ra, rb = by.loc[a], by.loc[b]
                    _, p = _welch(ra.published_mean, ra.published_se * math.sqrt(ra.published_n),
                                  ra.published_n, rb.published_mean,
                                  rb.published_se * math.sqrt(rb.published_n), rb.published_n)
                    flipped.append((a, b, bool(math.isfinite(p) and p < ALPHA)))
        out.append(Ordering(task, fig_name, fig.label, pub, ours, tuple(flipped)))
    return out
