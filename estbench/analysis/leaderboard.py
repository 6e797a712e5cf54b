"""The leaderboard: per task, estimators ranked with ties where the difference is not significant;
across tasks, the Friedman test with Nemenyi's critical differences and performance profiles.

Per task: every pair of the task's estimators is compared by a paired t-test across the seeds
both ran, and the p-values are Holm-adjusted (Holm 1979, the step-down
p_(i) -> max_{j <= i} min(1, (m - j + 1) p_(j)) over the m = k(k-1)/2 pairs of one task x
criterion).  An estimator's rank is 1 + the number of estimators significantly better than it, and
its worst rank k - the number significantly worse (``rank_with_ties``): each pair's evidence
counts alike for both of its estimators, so noise widens an estimator's interval of places
instead of buying it a better one.  The family is every pair, so the familywise error stays at
alpha for whichever comparisons are read.  With fewer than two shared seeds the comparison falls
back to the plain values (a tie only on exact equality; p 0 or 1 in the family).  Oracles
(``Estimator.oracle``: ``exact``) are reference lines, never ranked (``_criterion_values``).

Overall: tasks have fields of different sizes (far more estimators fit a Bernoulli task than the
Gaussian toy), so a raw rank 3 of 7 and a rank 3 of 21 mean different things, and an estimator that runs on
few tasks (``exact``) would top a plain mean rank.  Each per-task rank is therefore also expressed as
a relative rank ``(rank - 1) / (field - 1)`` -- 0 for the best, 1 for the last -- and the overall
order is by the mean relative rank over the tasks an estimator ran on; the mean raw rank and the
number of tasks are reported beside it.

Across tasks, tested (``friedman_tests``; Demšar 2006, sec. 3.2.2): the Friedman test over tasks
as blocks -- per task the estimators' means are ranked, 1 = best, and the test asks whether the
mean ranks over the N tasks differ more than chance would make them -- followed by the Nemenyi
test, which tells two estimators apart when their mean ranks differ by more than the critical
difference CD = q_alpha sqrt(k(k+1)/(6N)).  The test needs a complete design, every estimator on
every task, and the fields differ by latent family, so it runs on the estimators common to a set
of tasks: all tasks of the run, and each latent family with several tasks (within a family nearly
every estimator that fits it runs on all its tasks, while few estimators fit every family).  A
design in which even complete agreement of the tasks could not reach p < alpha is reported as
untestable.  Performance profiles (``performance_profile``, Dolan & Moré 2002) need no complete
design: an estimator that did not run on a task fails it.

Criteria: :data:`CRITERIA`, each with what it measures and when to trust it (its ``meaning``:
the one text of it, which reports print and docs/methodology.md copies).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from estbench.analysis.table import biased_set
from estbench.core import metrics

ALPHA = 0.05


@dataclass(frozen=True)
class Criterion:
    name: str       # key in leaderboard.csv
    column: str     # column of the per-cell frame: a metric or figure declared in estbench.core.metrics
    title: str
    #: rank only the estimators the bias test does not reject (variance means nothing for a
    #: biased estimator: spigot's is zero)
    unbiased_only: bool = False
    #: what the ranking measures and when to trust it, for the report's reader
    meaning: str = ""

    @property
    def higher(self) -> bool:
        """Which way is better: the column's declared direction (estbench.core.metrics)."""
        return metrics.get(self.column).higher


CRITERIA = [
    Criterion("final_elbo", "final_elbo", "final ELBO (higher is better)",
              meaning=("How far an estimator took the model in the budget's steps of the task's "
                       'optimiser. At a quick budget that is early training, not gradient quality: a '
                       'biased relaxation can beat the exact gradient. Read it at the standard budget '
                       'for verdicts about models.')),
    Criterion("elbo_at_time", "elbo_at_time",
              "validation ELBO at equal training time, each curve read at the task's common time "
              "(higher is better)",
              meaning=('The validation curve (the test split is kept for the final figure) read at a '
                       'common training time T (the shortest training '
                       'of any cell on the task, so every curve reaches it), by linear interpolation '
                       'between evaluation points: an estimator three times as slow is judged after a '
                       'third of its steps. About early training when T is a small fraction of the '
                       "median cell's training (stated under each task's table); under a time budget "
                       '(--seconds) it is the final ELBO.')),
    Criterion("grad_error", "log10_grad_error",
              "gradient error E‖g − ∇‖², squared bias plus variance (lower is better)",
              meaning=("The mean squared error of one gradient estimate against the task's reference, "
                       "squared bias plus variance with the measurement's own noise removed: which "
                       'estimator gives the best single gradient, biased or not, on one scale.')),
    Criterion("variance", "log10_variance",
              "gradient variance, among estimators the bias test does not find biased (lower is better)",
              unbiased_only=True,
              meaning=('Among estimators the bias test does not find biased on the task only (a '
                       'deterministic biased estimator has zero variance and is not best). With few '
                       'estimates a small bias goes unseen.')),
    Criterion("error_x_time", "log10_error_x_ms",
              "work-normalised error, gradient error x ms a step (Glynn & Whitt 1992), among "
              "estimators the bias test does not find biased (lower is better)", unbiased_only=True,
              meaning=('Gradient error times ms a step (Glynn & Whitt 1992): the error at equal compute '
                       "time, since averaging k estimates divides an unbiased estimator's error by k. "
                       'Timings compare within one run.')),
    Criterion("error_x_evals", "log10_error_x_evals",
              "gradient error x f-evaluations a step, among estimators the bias test does not find "
              "biased (lower is better)", unbiased_only=True,
              meaning=('Gradient error times f-evaluations a step: the error at equal evaluations of f, '
                       'the machine-independent cost.')),
    Criterion("step_time", "step_ms", "step time (lower is better)",
              meaning=('Training seconds a step on the recorded machine (CUDA-synchronised), comparable '
                       'only between cells timed alike.')),
]

def criteria_markdown() -> str:
    """What each ranking measures and when to trust it, as a markdown list: the one text of it,
    printed by every report and kept verbatim in docs/methodology.md (a test checks the copy)."""
    return "\n".join(f"- **By {c.title}** (`{c.name}`): {c.meaning}" for c in CRITERIA if c.meaning)


#: an exactly zero variance is clipped to this log10 value so that paired tests stay finite
_LOG10_FLOOR = -300.0


def holm(pvalues) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values, in the input order.

    With p_(1) <= ... <= p_(m) sorted, the adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j));
    rejecting where it is < alpha controls the familywise error at alpha.  Written from the
    definition rather than calling statsmodels' ``multipletests(method="holm")``, which it matches
    (tests/test_ranking_stats.py checks it against statsmodels): statsmodels runs a full
    ``gc.collect()`` on every Holm call, slow in a process holding torch's many objects, and a
    report makes one call per task x criterion.
    """
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(stepped) if m else stepped
    return adjusted


def paired_p(a: np.ndarray, b: np.ndarray, higher: bool) -> tuple[float, int]:
    """``(p, sign)`` of one comparison of ``a`` and ``b``, paired per seed (same length, finite):
    the two-sided p of a paired t-test (scipy.stats.ttest_rel) with >= 2 pairs, and the sign of
    the mean difference, +1 where ``a`` is the better.  Where the test does not apply the p is
    certain: a constant non-zero difference, or a single pair that differs, gives 0; no
    difference gives 1; no pair gives (1, 0)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = a - b if higher else b - a
    if len(d) == 0:
        return 1.0, 0
    sign = int(np.sign(d.mean()))
    if sign == 0:
        return 1.0, 0
    if len(d) < 2 or np.all(d == d[0]):  # one pair, or zero spread: the difference is certain
        return 0.0, sign
    return float(stats.ttest_rel(a, b).pvalue), sign


def better(a: np.ndarray, b: np.ndarray, higher: bool, alpha: float = ALPHA) -> int:
    """+1 if ``a`` is significantly better than ``b``, -1 if significantly worse, 0 for a tie:
    one uncorrected comparison (``paired_p`` at ``alpha``).  The leaderboard corrects for the
    task's other comparisons (``rank_with_ties``)."""
    p, sign = paired_p(a, b, higher)
    return sign if p < alpha else 0


def _pair_tests(wide: pd.DataFrame, order: list, higher: bool):
    """``paired_p`` of every pair ``(order[i], order[j])``, i < j, on the seeds both ran; without a
    shared seed, on their means (certain, as with one seed).  Returns the pairs, p-values, signs.

    Pairs that share the same seeds are tested in one vectorised ``ttest_rel``: a call per pair
    would dominate the report's time with 20 estimators, 190 pairs a task.  The cases
    ``paired_p`` decides without a test are decided here the same way."""
    x = wide[order].to_numpy(float)
    seen = ~np.isnan(x)
    pairs = list(itertools.combinations(range(len(order)), 2))
    p = np.ones(len(pairs))
    sign = np.zeros(len(pairs), dtype=int)
    by_seeds: dict = {}
    for n, (i, j) in enumerate(pairs):
        both = seen[:, i] & seen[:, j]
        if both.any():
            by_seeds.setdefault(both.tobytes(), (both, []))[1].append(n)
        else:  # no shared seed: the means, as values of one seed
            p[n], sign[n] = paired_p(np.array([np.nanmean(x[:, i])]),
                                     np.array([np.nanmean(x[:, j])]), higher)
    for both, idx in by_seeds.values():
        idx = np.asarray(idx)
        a = x[np.ix_(both, [pairs[n][0] for n in idx])]
        b = x[np.ix_(both, [pairs[n][1] for n in idx])]
        d = a - b if higher else b - a
        s = np.sign(d.mean(axis=0)).astype(int)
        certain = (d == d[:1]).all(axis=0) | (len(d) < 2)  # zero spread or one pair
        tested = (s != 0) & ~certain
        pv = np.ones(len(idx))
        pv[(s != 0) & certain] = 0.0
        if tested.any():
            with np.errstate(all="ignore"):
                pv[tested] = stats.ttest_rel(a[:, tested], b[:, tested], axis=0).pvalue
        p[idx], sign[idx] = pv, s
    return pairs, p, [int(v) for v in sign]


def rank_with_ties(values: pd.DataFrame, higher: bool, alpha: float = ALPHA) -> pd.DataFrame:
    """Ranks of the estimators in ``values`` (columns estimator, seed, value) for one task.

    Every pair of estimators is compared by a paired t-test over the seeds both ran and the
    k(k-1)/2 p-values are Holm-adjusted (``holm``; the module docstring says why every pair).  An
    estimator's rank is 1 + the number of estimators significantly better than it (adjusted
    p < alpha), and its worst rank k - the number significantly worse than it: the interval
    [rank, rank_worst] is where the evidence places it (the "rank (upper bound)" of the LMSYS
    Chatbot Arena leaderboard, with its lower bound).  Each pair's evidence counts the same
    way for both of its estimators, so a wide interval cannot tie with the leader while a tight
    one is sent to the bottom (the asymmetry of a walk down the order of the means, which
    compared each estimator with one leader only); a noisy estimator gets a wide interval, not
    a good place.  Estimators of equal rank are tied; ``tied`` counts the estimators that are not
    significantly different from it and ``tied_with`` names them.

    Returns one row per estimator with a finite value, in the order of the means (best first):
    estimator, rank, rank_worst, tied, tied_with, mean, seeds and ``p_holm``, the smallest
    adjusted p against an estimator with a better mean (NaN for the first).
    """
    v = values.dropna(subset=["value"])
    wide = v.pivot_table(index="seed", columns="estimator", values="value", aggfunc="mean")
    means = wide.mean()
    order = sorted(wide.columns, key=lambda e: ((-means[e] if higher else means[e]), e))
    k = len(order)
    pairs, p, signs = _pair_tests(wide, order, higher)
    adjusted = holm(p)
    # beats[i, j]: order[i] is significantly better than order[j]
    beats = np.zeros((k, k), dtype=bool)
    p_adj = np.full((k, k), np.nan)
    for (i, j), pa, sign in zip(pairs, adjusted, signs):
        p_adj[i, j] = p_adj[j, i] = pa
        if pa < alpha and sign != 0:
            winner, loser = (i, j) if sign > 0 else (j, i)
            beats[winner, loser] = True
    better_than = beats.sum(axis=0)   # how many beat it
    worse_than = beats.sum(axis=1)    # how many it beats
    tied = [[order[j] for j in range(k) if j != i and not beats[i, j] and not beats[j, i]]
            for i in range(k)]
    return pd.DataFrame({"estimator": order,
                         "rank": [int(1 + b) for b in better_than],
                         "rank_worst": [int(k - w) for w in worse_than],
                         "tied": [len(t) for t in tied],
                         "tied_with": ["; ".join(t) for t in tied],
                         "mean": [float(means[e]) for e in order],
                         "seeds": [int(wide[e].notna().sum()) for e in order],
                         "p_holm": [math.nan if i == 0 else float(np.nanmin(p_adj[:i, i]))
                                    for i in range(k)]})


def _criterion_values(pc: pd.DataFrame, clip: bool = True):
    """``(criterion, task, values)`` for every criterion the frame has and every task, criterion
    by criterion: values in long form (estimator, seed, value), restricted to the estimators the
    bias test does not find biased where the criterion asks for it, log10 columns clipped at
    _LOG10_FLOOR (an exactly zero variance stays comparable) unless ``clip`` is False.  What the
    leaderboard ranks, the stability check resamples and the across-task tests compare."""
    import estimators

    biased_pairs = biased_set(pc)
    # an oracle (``exact``) is a reference line, outside the budget and outside every ranking
    pc = pc[[not estimators.is_oracle(e) for e in pc.estimator]] if len(pc) else pc
    for crit in CRITERIA:
        if crit.column not in pc:
            continue
        for task, df in pc.groupby("task", sort=True):
            vals = df[["estimator", "seed", crit.column]].rename(columns={crit.column: "value"})
            vals = vals.astype({"value": float})
            if crit.unbiased_only:
                vals = vals[[(task, e) not in biased_pairs for e in vals.estimator]]
            if clip and crit.column.startswith("log10_"):
                vals["value"] = vals["value"].clip(lower=_LOG10_FLOOR)
            yield crit, task, vals


def leaderboard(pc: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """Long frame: criterion, task, estimator, rank, mean (of the criterion over seeds), seeds for
    every task and criterion (``p_holm``: the Holm-adjusted p that placed it, see
    ``rank_with_ties``), plus rows with task ``"overall"``: ``mean`` the mean rank over the
    ``tasks`` an estimator ran on, ``relative`` the mean relative rank and ``rank`` the position by
    mean relative rank (ties shared)."""
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
    cols = ["criterion", "task", "estimator", "rank", "rank_worst", "tied", "tied_with", "mean",
            "relative", "seeds", "p_holm", "tasks"]
    if not rows:
        return pd.DataFrame(columns=cols)
    return pd.concat(rows, ignore_index=True).reindex(columns=cols)


#: a task's order "survives" resampling its seeds when the median Kendall tau between the
#: resampled and the full order is at least STABLE_TAU and its leader stays first in at least
#: STABLE_LEADER of the resamples
STABLE_TAU, STABLE_LEADER, BOOTSTRAP = 0.8, 0.9, 500
#: the fewest seeds a ranking must have before it may be called stable.  A bootstrap over n seeds
#: has only C(2n-1, n) distinct resamples -- 3 at two seeds, 10 at three, 35 at four, 126 at five
#: -- and most of them repeat a seed, so below five seeds two or three seeds that happen to agree
#: pass the test: it measures the agreement of those seeds, not how the order would survive others
MIN_STABLE_SEEDS = 5


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
               "stable": False,
               "verdict": f"too few seeds ({n_s} < {MIN_STABLE_SEEDS})"}
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
            survives = bool(row["median_tau"] >= STABLE_TAU and row["leader_kept"] >= STABLE_LEADER)
            if n_s >= MIN_STABLE_SEEDS:
                row.update(stable=survives, verdict="stable" if survives else "unstable")
        rows.append(row)
    return pd.DataFrame(rows, columns=["criterion", "task", "estimators", "seeds", "leader",
                                       "median_tau", "leader_kept", "stable", "verdict"])


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


# ---- across tasks: Friedman and Nemenyi (Demšar 2006) -------------------------------------------
def task_family(task: str) -> str | None:
    """The latent family of a task label (``toy_binary[p=0.3] [steps=30, n=4]`` -> ``bernoulli``),
    from the task registry; None for a task not registered here (a plug-in, another version)."""
    import re

    import tasks

    name = re.match(r"[A-Za-z_][A-Za-z0-9_.\-]*", str(task))
    if name is None:
        return None
    try:
        return tasks.get_class(name.group(0)).family or None
    except Exception:  # not a registered task: no family to group it by
        return None


def comparison_sets(task_names) -> list[tuple[str, list[str]]]:
    """The sets of tasks a Friedman test runs over: ``all tasks``, then each latent family with at
    least two tasks (a family holding every task is the first set again and is left out)."""
    names = sorted(set(task_names))
    sets = [("all tasks", names)]
    families: dict = {}
    for t in names:
        families.setdefault(task_family(t), []).append(t)
    for fam in sorted(f for f in families if f is not None):
        if 2 <= len(families[fam]) < len(names):
            sets.append((f"{fam} tasks", families[fam]))
    return sets


def task_means(pc: pd.DataFrame, clip: bool = True) -> dict:
    """{criterion name: tasks x estimators frame of the criterion's mean over seeds} -- the values
    the leaderboard ranks (bias-test restriction included; NaN where an estimator has none)."""
    out: dict = {}
    for crit, task, vals in _criterion_values(pc, clip=clip):
        m = vals.dropna(subset=["value"]).groupby("estimator")["value"].mean()
        out.setdefault(crit.name, {})[task] = m
    return {name: pd.DataFrame(per_task).T.sort_index() for name, per_task in out.items()}


FRIEDMAN_COLUMNS = ["criterion", "comparison", "tasks", "estimators", "chi2", "p", "cd",
                    "conclusive", "status", "estimator", "mean_rank", "group", "task_names"]


def friedman(means: pd.DataFrame, higher: bool, alpha: float = ALPHA):
    """Friedman test with the Nemenyi post-hoc test on a complete design (Demšar 2006, sec. 3.2.2).

    ``means``: tasks (blocks) x estimators (treatments), no NaN, k >= 3 estimators.  Returns
    ``(summary, ranks, nemenyi)``: summary a dict of chi2 and p (scipy.stats.friedmanchisquare,
    the chi-squared approximation, which Demšar notes is conservative for few tasks), cd (the
    Nemenyi critical difference CD = q_alpha sqrt(k(k+1)/(6N)), q_alpha the studentized range
    quantile / sqrt 2)
    and conclusive (p < alpha); ranks the mean rank per estimator (1 = best, ties averaged), best
    first; nemenyi the estimators x estimators p-values of scikit-posthocs'
    ``posthoc_nemenyi_friedman``.
    """
    import scikit_posthocs as sp

    lower_is_better = -means if higher else means  # rank 1 = the best
    n, k = lower_is_better.shape
    chi2, p = stats.friedmanchisquare(*lower_is_better.T.to_numpy())
    ranks = lower_is_better.rank(axis=1, method="average").mean().sort_values(kind="stable")
    nemenyi = sp.posthoc_nemenyi_friedman(lower_is_better.reset_index(drop=True))
    q_alpha = stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    cd = q_alpha * math.sqrt(k * (k + 1) / (6 * n))
    summary = {"chi2": float(chi2), "p": float(p), "cd": float(cd), "conclusive": bool(p < alpha)}
    return summary, ranks, nemenyi.loc[ranks.index, ranks.index]


def friedman_unreachable(n_tasks: int, n_estimators: int, alpha: float = ALPHA) -> bool:
    """True where no data could make the Friedman test reject: its largest statistic, every task
    ranking the estimators alike, is N(k - 1), and its chi-squared p must still reach alpha (two
    tasks never suffice for 7 estimators: 12 < 12.6, the 95% quantile)."""
    return stats.chi2.sf(n_tasks * (n_estimators - 1), n_estimators - 1) >= alpha


def friedman_tests(pc: pd.DataFrame, alpha: float = ALPHA):
    """The Friedman/Nemenyi test of every criterion on every comparison set (``comparison_sets``)
    over the estimators with a value on each of its tasks, as two tidy frames:

    ``ranks``: FRIEDMAN_COLUMNS, one row per (criterion, comparison, estimator) -- the test's
    figures repeated, the estimator's mean rank and ``group``, letters shared by estimators the
    Nemenyi test does not tell apart (scikit-posthocs' compact letter display, Piepho 2004), read
    only when the Friedman test rejects (otherwise every estimator gets ``a``, Demšar's rule of no
    post-hoc test without an omnibus rejection).  A design that cannot be tested (fewer than 3
    estimators, ``friedman_unreachable``, or every task tying all estimators) is one row with the
    reason in ``status`` and no estimator.  ``pairs``: criterion, comparison, estimator_a,
    estimator_b, p_nemenyi.
    """
    import scikit_posthocs as sp

    rows, pair_rows = [], []
    by_name = {c.name: c for c in CRITERIA}
    for name, means in task_means(pc).items():
        crit = by_name[name]
        for comparison, task_set in comparison_sets(means.index):
            design = means.loc[[t for t in task_set if t in means.index]].dropna(axis=1)
            n, k = design.shape
            base = {"criterion": name, "comparison": comparison, "tasks": n, "estimators": k,
                    "task_names": "; ".join(design.index)}
            if k < 3:
                common = f"{k} estimator{'' if k == 1 else 's'} common to the tasks"
                rows.append({**base, "status": f"untestable: only {common}"})
                continue
            if friedman_unreachable(n, k, alpha):
                rows.append({**base, "status": f"untestable: {n} tasks cannot reach p < {alpha} "
                                               f"with {k} estimators"})
                continue
            if (design.nunique(axis=1) == 1).all():  # no order anywhere: the statistic is 0/0
                rows.append({**base, "status": "untestable: the estimators tie on every task"})
                continue
            summary, ranks, nemenyi = friedman(design, crit.higher, alpha)
            if summary["conclusive"]:
                letters = sp.compact_letter_display(nemenyi, alpha=alpha).str.replace(" ", "")
            else:
                letters = pd.Series("a", index=ranks.index)
            for est, r in ranks.items():
                rows.append({**base, **summary, "status": "tested", "estimator": est,
                             "mean_rank": float(r), "group": letters[est]})
            for a, b in itertools.combinations(ranks.index, 2):
                pair_rows.append({"criterion": name, "comparison": comparison, "estimator_a": a,
                                  "estimator_b": b, "p_nemenyi": float(nemenyi.loc[a, b])})
    ranks = pd.DataFrame(rows).reindex(columns=FRIEDMAN_COLUMNS)
    pairs = pd.DataFrame(pair_rows, columns=["criterion", "comparison", "estimator_a",
                                             "estimator_b", "p_nemenyi"])
    return ranks, pairs


# ---- across tasks: performance profiles (Dolan & Moré 2002) -------------------------------------
#: the criteria on a ratio scale where lower is better: a profile compares factors, t / t_best
PROFILE_CRITERIA = ["grad_error", "error_x_time", "error_x_evals", "step_time"]


def performance_profile(means: pd.DataFrame) -> pd.DataFrame:
    """Dolan & Moré's (2002) performance profile of a tasks x estimators frame of a positive
    measure where lower is better (NaN: the estimator did not run there).

    The performance ratio r_{p,s} = t_{p,s} / min_s t_{p,s} on task p, infinite where s did not
    run (a failure), and rho_s(tau) = |{p : r_{p,s} <= tau}| / n_p, the fraction of the n_p tasks
    on which s is within a factor tau of the best.  Tasks whose best value is not positive have no
    ratios and are left out.  Returns the step functions' corners, one row per estimator and
    distinct ratio (always one at tau = 1): estimator, tau, log2_tau, rho, tasks (n_p); rho holds
    from its tau up to the next row's.
    """
    best = means.min(axis=1)
    usable = means[best > 0]
    ratios = usable.div(usable.min(axis=1), axis=0)
    n_p = len(ratios)
    rows = []
    for est in sorted(ratios.columns):
        r = ratios[est].dropna().to_numpy()  # a task it did not run on never counts
        taus = np.unique(np.concatenate([[1.0], r[r >= 1.0]]))
        for tau in taus:
            rows.append({"estimator": est, "tau": float(tau), "log2_tau": float(np.log2(tau)),
                         "rho": float((r <= tau).sum() / n_p) if n_p else 0.0, "tasks": n_p})
    return pd.DataFrame(rows, columns=["estimator", "tau", "log2_tau", "rho", "tasks"])


def performance_profiles(pc: pd.DataFrame, criteria=PROFILE_CRITERIA) -> pd.DataFrame:
    """``performance_profile`` of each of ``criteria`` over the run's tasks, on the per-task mean
    of the raw value (not of its log10: a factor of the mean, as Dolan & Moré's times), among the
    estimators the criterion admits on each task (an estimator the bias test finds biased on a
    task fails it, as one that did not run).  Columns: criterion, then performance_profile's."""
    by_name = {c.name: c for c in CRITERIA}
    frames = []
    raw_pc = pc.copy()
    for name in criteria:
        crit = by_name[name]
        if crit.column not in pc:
            continue
        if crit.column.startswith("log10_"):  # back to the raw value, cell by cell (-inf -> 0)
            raw_pc[crit.column] = np.power(10.0, pc[crit.column].astype(float))
    means = task_means(raw_pc, clip=False)
    for name in criteria:
        if name not in means or means[name].empty:
            continue
        prof = performance_profile(means[name])
        prof.insert(0, "criterion", name)
        frames.append(prof)
    if not frames:
        return pd.DataFrame(columns=["criterion", "estimator", "tau", "log2_tau", "rho", "tasks"])
    return pd.concat(frames, ignore_index=True)
