"""The leaderboard's statistics on hand-made numbers whose answers are known: Holm-corrected ties
(Holm 1979), the Friedman test with Nemenyi's critical difference (Demšar 2006) and performance
profiles (Dolan & Moré 2002)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("scipy")
pytest.importorskip("scikit_posthocs")

from estbench.analysis import leaderboard as lb  # noqa: E402


def _values(per_estimator: dict) -> pd.DataFrame:
    """Long values (estimator, seed, value) for rank_with_ties."""
    return pd.DataFrame([{"estimator": e, "seed": s, "value": v}
                         for e, vs in per_estimator.items() for s, v in enumerate(vs)])


def _ranks(per_estimator: dict, higher: bool = True) -> dict:
    r = lb.rank_with_ties(_values(per_estimator), higher)
    return dict(zip(r.estimator, r["rank"]))


# ---- Holm ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_holm_step_down_by_hand_and_against_statsmodels():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04): in input order
    assert lb.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert lb.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert lb.holm([]).size == 0
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(0)
    for _ in range(5):  # statsmodels runs gc.collect() on every call: a few cases, not many
        p = rng.uniform(size=int(rng.integers(1, 30))) ** 3
        p[rng.uniform(size=p.size) < 0.2] = 0.0  # certain comparisons enter the family as 0
        assert lb.holm(p) == pytest.approx(multitest.multipletests(p, method="holm")[1])


BASE = [5.0, 5.3, 4.8, 5.1, 5.2]
#: B's neighbours: small differences of changing sign (B, C, D do not differ)
C = [b + d for b, d in zip(BASE, [0.01, -0.02, 0.015, -0.01, 0.005])]
D = [b + d for b, d in zip(BASE, [-0.015, 0.01, -0.005, 0.02, -0.01])]


def test_holm_ties_what_a_lone_uncorrected_test_would_split():
    # A - B = 1.0, 0.6, 1.4, 0.2, 1.8: t = 3.54 on 4 df, p = 0.024 alone; A - C and A - D alike.
    # Among the 6 pairs of 4 estimators Holm multiplies the smallest p by 6: no longer < 0.05
    a = [b + d for b, d in zip(BASE, [1.0, 0.6, 1.4, 0.2, 1.8])]
    p_alone, sign = lb.paired_p(np.array(a), np.array(BASE), higher=True)
    assert 0.05 / 6 < p_alone < 0.05 and sign == 1
    assert lb.better(np.array(a), np.array(BASE), higher=True) == 1  # uncorrected: a split
    assert _ranks({"A": a, "B": BASE, "C": C, "D": D}) == {"A": 1, "B": 1, "C": 1, "D": 1}
    r = lb.rank_with_ties(_values({"A": a, "B": BASE, "C": C, "D": D}), True).set_index("estimator")
    assert math.isnan(r.loc["A", "p_holm"]) and r.loc["B", "p_holm"] >= 0.05


def test_holm_still_splits_a_clear_difference():
    # A - B = 1 +- 0.1 on every seed: p ~ 1e-5, far below 0.05 / 6
    a = [b + d for b, d in zip(BASE, [1.0, 1.1, 0.9, 1.05, 0.95])]
    assert _ranks({"A": a, "B": BASE, "C": C, "D": D}) == {"A": 1, "B": 2, "C": 2, "D": 2}
    # lower is better: the same numbers, the other way round
    assert _ranks({"A": a, "B": BASE, "C": C, "D": D}, higher=False) == {"B": 1, "C": 1, "D": 1,
                                                                          "A": 4}


#: the case of issue 19 (toy_categorical, 3 seeds): a tight leader, a noisy second, a tight third
#: that the leader beats clearly and the noisy one does not (paired p 0.0002 and 0.53)
DISARM = [3.81, 3.89, 3.67]
TIE_CASE = {"reinmax": [d + 0.64 + e for d, e in zip(DISARM, [0.01, -0.02, 0.01])],
            "reinforce": [4.47, 3.87, 3.57], "disarm": DISARM}


def test_a_tie_is_symmetric_in_the_evidence():
    # the old walk down the means tied reinforce with the leader (noisy: p 0.19 against it) and
    # sent disarm, which only the leader beats, to the bottom (rank 3) although it ties reinforce
    r = lb.rank_with_ties(_values(TIE_CASE), True).set_index("estimator")
    assert r["rank"].to_dict() == {"reinmax": 1, "reinforce": 1, "disarm": 2}
    assert r["rank_worst"].to_dict() == {"reinmax": 2, "reinforce": 3, "disarm": 3}
    # ties are mutual, and the noisy estimator's interval of places is the widest
    assert r.loc["disarm", "tied_with"] == "reinforce"
    assert set(r.loc["reinforce", "tied_with"].split("; ")) == {"reinmax", "disarm"}
    assert (r.rank_worst - r["rank"]).idxmax() == "reinforce"


def test_rank_is_one_plus_the_estimators_significantly_better():
    # on random fields: the rank reads every pair's verdict, never a walk's chosen comparisons
    rng = np.random.default_rng(3)
    for _ in range(20):
        k, n = int(rng.integers(3, 8)), int(rng.integers(2, 6))
        field = {f"e{i}": list(rng.normal(rng.normal(0, 2), rng.uniform(0.05, 2), n))
                 for i in range(k)}
        r = lb.rank_with_ties(_values(field), True).set_index("estimator")
        for e in field:
            # every estimator not tied with e differs from it significantly, on its side of the means
            tied = set(filter(None, r.loc[e, "tied_with"].split("; ")))
            above = [o for o in field if o != e and o not in tied and r.loc[o, "mean"] > r.loc[e, "mean"]]
            below = [o for o in field if o != e and o not in tied and r.loc[o, "mean"] < r.loc[e, "mean"]]
            assert r.loc[e, "rank"] == 1 + len(above)
            assert r.loc[e, "rank_worst"] == k - len(below)
            assert r.loc[e, "tied"] == len(tied) == k - 1 - len(above) - len(below)


# ---- Friedman and Nemenyi ------------------------------------------------------------------------
def _pc(table: dict, column: str = "final_elbo") -> pd.DataFrame:
    """Per-cell rows from {task: {estimator: value}}, one seed (Friedman reads the means)."""
    return pd.DataFrame([{"task": t, "estimator": e, "seed": 0, column: v}
                         for t, row in table.items() for e, v in row.items()])


#: W best on every task; X, Y, Z take ranks 2, 3, 4 in turn, so each has mean rank 3
CLEAR_WINNER = {f"T{i}": {"W": 10.0, **dict(zip(["XYZ"[(i + j) % 3] for j in range(3)],
                                                [5.0, 4.0, 3.0]))} for i in range(6)}


def test_friedman_finds_a_clear_winner_and_puts_it_first():
    ranks, pairs = lb.friedman_tests(_pc(CLEAR_WINNER))
    r = ranks[ranks.comparison == "all tasks"]
    assert (r.status == "tested").all() and set(r.tasks) == {6} and set(r.estimators) == {4}
    # Friedman's statistic (Demšar 2006, sec. 3.2.2): chi2 = 12N / (k(k+1)) sum_j R_j^2 - 3N(k+1)
    # = 3.6 x 28 - 90 = 10.8 on 3 df
    assert r.chi2.iloc[0] == pytest.approx(10.8)
    assert r.p.iloc[0] == pytest.approx(0.012858, rel=1e-4) and r.conclusive.iloc[0]
    assert r.estimator.iloc[0] == "W" and r.mean_rank.tolist() == [1.0, 3.0, 3.0, 3.0]
    # CD = q_0.05 sqrt(k(k+1)/(6N)), q_0.05 = 2.569 for k = 4 (Demšar 2006's table of the
    # two-tailed Nemenyi test)
    assert r.cd.iloc[0] == pytest.approx(2.569 * math.sqrt(4 * 5 / 36), rel=1e-3)
    # a mean-rank gap of 2 exceeds that CD of 1.91: W alone, the others together
    assert r.group.tolist() == ["a", "b", "b", "b"]
    p_w = pairs[(pairs.estimator_a == "W") | (pairs.estimator_b == "W")].p_nemenyi
    assert len(pairs) == 6 and (p_w < 0.05).all() and (pairs.drop(p_w.index).p_nemenyi == 1).all()


def test_friedman_without_a_winner_is_inconclusive_and_a_clearer_one_splits():
    # every estimator takes every rank equally often: the mean ranks are equal, chi2 = 0
    rotating = {f"T{i}": dict(zip(["WXYZ"[(i + j) % 4] for j in range(4)], [4.0, 3.0, 2.0, 1.0]))
                for i in range(8)}
    r, _ = lb.friedman_tests(_pc(rotating))
    assert r.chi2.iloc[0] == pytest.approx(0.0) and not r.conclusive.iloc[0]
    assert set(r.group) == {"a"}
    # one fixed order on 12 tasks: the first and the last differ by 3 > CD = 1.35
    fixed = {f"T{i}": {"W": 4.0, "X": 3.0, "Y": 2.0, "Z": 1.0} for i in range(12)}
    r, pairs = lb.friedman_tests(_pc(fixed))
    assert r.conclusive.iloc[0] and r.estimator.tolist() == ["W", "X", "Y", "Z"]
    assert "a" in r.group.iloc[0] and "a" not in r.group.iloc[-1]
    wz = pairs[(pairs.estimator_a == "W") & (pairs.estimator_b == "Z")].p_nemenyi.iloc[0]
    assert wz < 0.05


def test_friedman_lower_is_better_and_untestable_designs():
    # gradient error: lower is better, so W (the smallest) ranks first
    pc = _pc({t: {e: -v for e, v in row.items()} for t, row in CLEAR_WINNER.items()},
             column="log10_grad_error")
    r, _ = lb.friedman_tests(pc)
    assert r.estimator.iloc[0] == "W" and r.conclusive.iloc[0]
    # the largest chi2, N(k - 1), must be able to reach p < 0.05
    assert lb.friedman_unreachable(2, 7) and not lb.friedman_unreachable(3, 3)
    two_tasks = {t: CLEAR_WINNER[t] for t in ["T0", "T1"]}
    r, pairs = lb.friedman_tests(_pc(two_tasks))
    assert len(r) == 1 and r.status.iloc[0].startswith("untestable") and pairs.empty


def test_comparison_sets_are_all_tasks_and_each_family_with_several_tasks():
    sets = dict(lb.comparison_sets(["toy_binary", "liu_toy", "toy_gaussian",
                                    "toy_binary [steps=30, n=4]", "plugin_task"]))
    assert sets["all tasks"] == sorted(["toy_binary", "liu_toy", "toy_gaussian",
                                        "toy_binary [steps=30, n=4]", "plugin_task"])
    assert sets["bernoulli tasks"] == ["liu_toy", "toy_binary", "toy_binary [steps=30, n=4]"]
    assert "gaussian tasks" not in sets  # one task is no comparison
    assert list(dict(lb.comparison_sets(["toy_binary", "liu_toy"]))) == ["all tasks"]


# ---- performance profiles ---------------------------------------------------------------------
def test_performance_profile_by_hand():
    means = pd.DataFrame({"A": [1.0, 6.0, 2.0, 0.0], "B": [2.0, 3.0, 2.0, 1.0],
                          "C": [4.0, np.nan, 1.0, 2.0]}, index=["P1", "P2", "P3", "P4"])
    # P4's best is 0: no ratios, left out.  Ratios: A 1, 2, 2; B 2, 1, 2; C 4, inf (did not
    # run), 1.  rho(tau) = share of the 3 tasks with ratio <= tau
    prof = lb.performance_profile(means)
    got = {e: list(zip(d.tau, d.rho)) for e, d in prof.groupby("estimator")}
    assert got == {"A": [(1.0, pytest.approx(1 / 3)), (2.0, 1.0)],
                   "B": [(1.0, pytest.approx(1 / 3)), (2.0, 1.0)],
                   "C": [(1.0, pytest.approx(1 / 3)), (4.0, pytest.approx(2 / 3))]}
    assert set(prof.tasks) == {3}
    assert prof.log2_tau.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 2.0]


def test_performance_profiles_read_raw_values_and_fail_what_did_not_run():
    # log10 gradient errors of 1 and 3 are errors of 10 and 1000: a factor of 100, not of 3
    pc = _pc({"T1": {"A": 1.0, "B": 3.0}, "T2": {"A": 2.0}}, column="log10_grad_error")
    prof = lb.performance_profiles(pc, ["grad_error"])
    b = prof[prof.estimator == "B"]
    assert b.tau.tolist() == [1.0, pytest.approx(100.0)] and b.rho.tolist() == [0.0, 0.5]
    a = prof[prof.estimator == "A"]
    assert a.tau.tolist() == [1.0] and a.rho.tolist() == [1.0]


@pytest.mark.slow
def test_two_seeds_never_make_a_ranking_stable():
    # two seeds that agree: every bootstrap draw keeps the order, so the resamples alone would say
    # "stable" (the old verdict); the word needs MIN_STABLE_SEEDS seeds
    two = pd.DataFrame([{"task": "T", "estimator": e, "seed": s, "final_elbo": v}
                        for e, vs in {"A": [3.0, 3.1], "B": [2.0, 2.1], "C": [1.0, 1.1]}.items()
                        for s, v in enumerate(vs)])
    st = lb.stability(two).set_index("criterion").loc["final_elbo"]
    assert st.median_tau == 1.0 and st.leader_kept == 1.0  # the draws agree ...
    assert not st.stable and st.verdict == f"too few seeds (2 < {lb.MIN_STABLE_SEEDS})"
    five = pd.concat([two.assign(seed=two.seed + 2 * k) for k in range(3)])  # 6 seeds, same order
    st = lb.stability(five).set_index("criterion").loc["final_elbo"]
    assert st.stable and st.verdict == "stable"


def test_an_oracle_is_never_ranked():
    # exact enumerates every configuration outside the budget: its zero error would win every
    # gradient ranking and squash the performance profiles (every other estimator at log2 tau ~40)
    rows = [{"task": t, "estimator": e, "seed": s, "final_elbo": v + s * 0.01,
             "log10_grad_error": g, "log10_variance": g, "step_ms": 1.0}
            for t in ("T1", "T2", "T3") for s in range(3)
            for e, v, g in (("exact[max_configs=64]", 1.0, -14.0), ("rloo", 0.9, 1.0),
                            ("disarm", 0.8, 0.5), ("reinforce", 0.7, 2.0))]
    pc = pd.DataFrame(rows)
    board = lb.leaderboard(pc)
    assert not board.empty and not board.estimator.str.startswith("exact").any()
    prof = lb.performance_profiles(pc)
    assert set(prof.estimator) == {"rloo", "disarm", "reinforce"}
    assert prof.log2_tau.max() < 6  # at most 10^1.5 (reinforce against disarm), not 10^16 against exact
    ranks, _ = lb.friedman_tests(pc)
    assert not ranks.estimator.fillna("").str.startswith("exact").any()
