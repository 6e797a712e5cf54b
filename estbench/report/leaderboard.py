"""The leaderboard: per task, estimators ranked with ties where the difference is not significant.

Estimators are sorted by their mean over seeds and cut into tie groups: walking down the order, an
estimator shares the rank of the group above when it is not significantly worse than that group's
leader -- a paired t-test across the seeds both ran, p >= alpha -- and otherwise starts a new group
ranked by its position (competition ranking: 1, 1, 3).  Ranks therefore never contradict the order
of the means, and a noisy estimator cannot outrank better ones merely because nothing is
significant against it.  With fewer than two shared seeds the comparison falls back to the plain
values (a tie only on exact equality).

Overall: tasks have fields of different sizes (21 estimators fit a Bernoulli task, 7 the Gaussian
toy), so a raw rank 3 of 7 and a rank 3 of 21 mean different things, and an estimator that runs on
few tasks (``exact``) would top a plain mean rank.  Each per-task rank is therefore also expressed as
a relative rank ``(rank - 1) / (field - 1)`` -- 0 for the best, 1 for the last -- and the overall
order is by the mean relative rank over the tasks an estimator ran on; the mean raw rank and the
number of tasks are reported beside it.

Criteria: final ELBO (higher is better); log10 gradient error E||g - grad||^2 (lower; every
estimator); log10 gradient variance (lower; an exactly zero variance ranks first) among the
estimators the bias test does not find biased on that task (tables.estimator_bias: more than
half of its cells reject at tables.BIAS_TEST_ALPHA); the work-normalised error, gradient error x
ms a step and x f-evaluations (Glynn & Whitt 1992: the error at equal compute, as averaging k
estimates divides an unbiased estimator's error by k), among the same; step time (lower).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05


@dataclass(frozen=True)
class Criterion:
    name: str       # key in leaderboard.csv
    column: str     # column of the per-cell frame
    title: str
    higher: bool
    #: rank only the estimators the bias test does not reject (variance means nothing for a
    #: biased estimator: spigot's is zero)
    unbiased_only: bool = False


CRITERIA = [
    Criterion("final_elbo", "final_elbo", "final ELBO (higher is better)", True),
    Criterion("grad_error", "log10_grad_error",
              "gradient error E‖g − ∇‖², squared bias plus variance (lower is better)", False),
    Criterion("variance", "log10_variance",
              "gradient variance, among estimators the bias test does not find biased (lower is better)",
              False, unbiased_only=True),
    Criterion("error_x_time", "log10_error_x_ms",
              "work-normalised error, gradient error x ms a step (Glynn & Whitt 1992), among "
              "estimators the bias test does not find biased (lower is better)", False,
              unbiased_only=True),
    Criterion("error_x_evals", "log10_error_x_evals",
              "gradient error x f-evaluations a step, among estimators the bias test does not find "
              "biased (lower is better)", False, unbiased_only=True),
    Criterion("step_time", "step_ms", "step time (lower is better)", False),
]

#: an exactly zero variance is clipped to this log10 value so that paired tests stay finite
_LOG10_FLOOR = -300.0


def better(a: np.ndarray, b: np.ndarray, higher: bool, alpha: float = ALPHA) -> int:
    """+1 if ``a`` is significantly better than ``b``, -1 if significantly worse, 0 for a tie.

    ``a`` and ``b`` are paired per seed (same length, finite).  Paired t-test with >= 2 pairs
    (a constant non-zero difference is significant), else exact comparison of the values.
    """
    d = np.asarray(a, float) - np.asarray(b, float)
    if not higher:
        d = -d
    if len(d) == 0:
        return 0
    if len(d) < 2:
        return int(np.sign(d.mean()))
    mean = d.mean()
    if mean == 0:
        return 0
    if np.all(d == d[0]):  # zero spread: the difference is certain
        return int(np.sign(mean))
    p = stats.ttest_rel(a, b).pvalue
    return int(np.sign(mean)) if p < alpha else 0


def _compare(wide: pd.DataFrame, a: str, b: str, higher: bool, alpha: float) -> int:
    """``better`` on the seeds ``a`` and ``b`` share; without a shared seed, on their means."""
    both = wide[[a, b]].dropna()
    if both.empty:
        d = wide[a].mean() - wide[b].mean()
        return int(np.sign(d if higher else -d))
    return better(both[a].to_numpy(), both[b].to_numpy(), higher, alpha)


def rank_with_ties(values: pd.DataFrame, higher: bool, alpha: float = ALPHA) -> pd.DataFrame:
    """Ranks of the estimators in ``values`` (columns estimator, seed, value) for one task.

    Estimators are ordered by mean (best first) and grouped: an estimator joins the group of the
    one before it when it is not significantly worse than that group's leader (the group's best),
    else it starts a new group.  A group's rank is its leader's position (competition ranking,
    1, 1, 3), so ranks never contradict the order of the means.  Returns one row per estimator
    with a finite value: estimator, rank, mean, seeds.
    """
    v = values.dropna(subset=["value"])
    wide = v.pivot_table(index="seed", columns="estimator", values="value", aggfunc="mean")
    means = wide.mean()
    order = sorted(wide.columns, key=lambda e: ((-means[e] if higher else means[e]), e))
    ranks: dict = {}
    leader = None
    for pos, est in enumerate(order, start=1):
        if leader is not None and _compare(wide, leader, est, higher, alpha) <= 0:
            ranks[est] = ranks[leader]
        else:
            leader, ranks[est] = est, pos
    return pd.DataFrame({"estimator": order,
                         "rank": [ranks[e] for e in order],
                         "mean": [float(means[e]) for e in order],
                         "seeds": [int(wide[e].notna().sum()) for e in order]})


def _criterion_values(pc: pd.DataFrame):
    """``(criterion, task, values)`` for every criterion the frame has and every task, criterion
    by criterion: values in long form (estimator, seed, value), restricted to the estimators the
    bias test does not find biased where the criterion asks for it, log10 columns clipped at
    _LOG10_FLOOR (an exactly zero variance stays comparable).  What the leaderboard ranks and the
    stability check resamples."""
    from estbench.report.tables import biased_set

    biased_pairs = biased_set(pc)
    for crit in CRITERIA:
        if crit.column not in pc:
            continue
        for task, df in pc.groupby("task", sort=True):
            vals = df[["estimator", "seed", crit.column]].rename(columns={crit.column: "value"})
            vals = vals.astype({"value": float})
            if crit.unbiased_only:
                vals = vals[[(task, e) not in biased_pairs for e in vals.estimator]]
            if crit.column.startswith("log10_"):
                vals["value"] = vals["value"].clip(lower=_LOG10_FLOOR)
            yield crit, task, vals


def leaderboard(pc: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """Long frame: criterion, task, estimator, rank, mean (of the criterion over seeds), seeds for
    every task and criterion, plus rows with task ``"overall"``: ``mean`` the mean rank over the
    ``tasks`` an estimator ran on and ``rank`` the position by mean rank (ties shared)."""
    rows = []
    for crit, group in itertools.groupby(_criterion_values(pc), key=lambda cv: cv[0]):
        per_task = []
        for _, task, vals in group:
            if vals.empty:
                continue
            r = rank_with_ties(vals, crit.higher, alpha)
            if crit.column.startswith("log10_"):
                r["mean"] = r["mean"].where(r["mean"] > _LOG10_FLOOR + 1, -math.inf)
            r.insert(0, "task", task)
            per_task.append(r)
        if not per_task:
            continue
        ranks = pd.concat(per_task, ignore_index=True)
        ranks.insert(0, "criterion", crit.name)
        ranks["relative"] = relative_rank(ranks)
        rows.append(ranks)
        overall = (ranks.groupby("estimator")
                   .agg(mean=("rank", "mean"), relative=("relative", "mean"), tasks=("rank", "size"))
                   .reset_index())
        overall["relative"] = overall["relative"].round(12)  # equal means compare equal
        overall["rank"] = overall["relative"].rank(method="min").astype(int)
        overall = overall.sort_values(["rank", "mean", "estimator"], ignore_index=True)
        overall.insert(0, "task", "overall")
        overall.insert(0, "criterion", crit.name)
        rows.append(overall[["criterion", "task", "estimator", "rank", "mean", "relative", "tasks"]])
    cols = ["criterion", "task", "estimator", "rank", "mean", "relative", "seeds", "tasks"]
    if not rows:
        return pd.DataFrame(columns=cols)
    return pd.concat(rows, ignore_index=True).reindex(columns=cols)


#: a task's order "survives" resampling its seeds when the median Kendall tau between the
#: resampled and the full order is at least STABLE_TAU and its leader stays first in at least
#: STABLE_LEADER of the resamples
STABLE_TAU, STABLE_LEADER, BOOTSTRAP = 0.8, 0.9, 500


def stability(pc: pd.DataFrame, n_boot: int = BOOTSTRAP, seed: int = 0) -> pd.DataFrame:
    """How well each task's order survives other seeds, per criterion.

    Bootstrap over seeds: draw the seeds with replacement (the same draw for every estimator, so
    the comparison stays paired), order the estimators by their mean in the draw, and compare with
    the order of the full data -- Kendall's tau, and whether the leader stays first.  Estimators
    that lack one of the seeds are left out (a resample must be one set of seeds for all).
    Columns: criterion, task, estimators, seeds, leader, median_tau, leader_kept, stable.
    With fewer than 2 seeds or 2 estimators: NaN figures and stable False.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for crit, task, vals in _criterion_values(pc):
        # one row per (criterion, task), even where no estimator is left
        wide = (vals.pivot_table(index="seed", columns="estimator", values="value", aggfunc="mean")
                .astype(float).dropna(axis=1))
        sign = -1.0 if crit.higher else 1.0  # lower is better after the sign
        n_s, n_e = wide.shape
        row = {"criterion": crit.name, "task": task, "estimators": n_e, "seeds": n_s,
               "leader": None, "median_tau": math.nan, "leader_kept": math.nan,
               "stable": False}
        if n_s >= 2 and n_e >= 2:
            x = sign * wide.to_numpy()
            full = x.mean(0)
            leader = int(np.argmin(full))
            taus, kept = [], 0
            for _ in range(n_boot):
                m = x[rng.integers(0, n_s, n_s)].mean(0)
                tau = stats.kendalltau(full, m).statistic
                taus.append(1.0 if np.isnan(tau) else tau)  # all equal: no disagreement
                kept += int(np.argmin(m) == leader)
            row.update(leader=wide.columns[leader], median_tau=float(np.median(taus)),
                       leader_kept=kept / n_boot)
            row["stable"] = bool(row["median_tau"] >= STABLE_TAU
                                 and row["leader_kept"] >= STABLE_LEADER)
        rows.append(row)
    return pd.DataFrame(rows, columns=["criterion", "task", "estimators", "seeds", "leader",
                                       "median_tau", "leader_kept", "stable"])


def relative_rank(ranks: pd.DataFrame) -> pd.Series:
    """``(rank - 1) / (field - 1)`` per row of a per-task rank frame (0 = best, 1 = last; 0 when
    an estimator is alone in its task)."""
    field = ranks.groupby("task")["estimator"].transform("size")
    return ((ranks["rank"] - 1) / (field - 1).where(field > 1)).fillna(0.0)


def rank_matrix(board: pd.DataFrame, criterion: str = "final_elbo",
                values: str = "rank") -> pd.DataFrame:
    """Estimators x tasks of ``values`` (``rank`` or ``relative``; NaN where an estimator did not
    run), plus ``mean rank``, ``relative rank`` and ``tasks`` columns (with ``values="relative"``,
    one ``overall`` column instead); rows in overall order."""
    b = board[board.criterion == criterion]
    per_task = b[b.task != "overall"]
    if per_task.empty:
        return pd.DataFrame()
    m = per_task.pivot(index="estimator", columns="task", values=values)
    overall = b[b.task == "overall"].set_index("estimator")
    if values == "relative":
        m["overall"] = overall["relative"].reindex(m.index)
    else:
        m["mean rank"] = overall["mean"].reindex(m.index)
        m["relative rank"] = overall["relative"].reindex(m.index)
        m["tasks"] = overall["tasks"].reindex(m.index)
    order = overall.sort_values(["rank", "mean"]).index
    return m.reindex([e for e in order if e in m.index])


def overall_text(board: pd.DataFrame, top: int | None = None) -> str:
    """A short plain-text leaderboard: overall mean rank per criterion."""
    lines = []
    for crit in CRITERIA:
        o = board[(board.criterion == crit.name) & (board.task == "overall")]
        if o.empty:
            continue
        lines.append(f"leaderboard by {crit.title}: mean relative rank over tasks "
                     "(0 = best in every task, 1 = last), mean rank")
        for _, r in (o.head(top) if top else o).iterrows():
            lines.append(f"  {int(r['rank']):>3}. {r.estimator:<36} {r['relative']:5.2f} "
                         f"{r['mean']:6.2f}  ({int(r.tasks)} task{'s' if r.tasks != 1 else ''})")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n" if lines else "(no ranked results)\n"
