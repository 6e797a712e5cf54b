"""Compare two result sets: what changed per (task, estimator), and is it a regression?

For every (task, estimator, device) in both runs and each metric -- final ELBO, variance, bias, step
time in ms (per-cell figures as in estbench.table: bias and variance averaged over checkpoints) -- the
means over seeds in A and B, the change and the relative change.  A change is *outside the noise*
when a Welch t-test across the seeds gives p < 0.05 (variance and bias tested on log10, where their
seed-to-seed spread is roughly symmetric), or, with fewer than two seeds on either side, when the
relative change exceeds the threshold.  A *regression* is a change for the worse (ELBO lower;
variance, bias, time higher) by more than the threshold (relative) AND outside the noise.  A cell
that finished in A but failed or diverged in B is a regression too.  Only finished cells (status
``ok``) are compared: a failed or diverged cell's partial checkpoint records are no measurement
(``estbench.table.finished``); such cells count in the ``status`` row.

Step times depend on the machine as much as on the code: they are compared only when every
finished cell of the (task, estimator, device) in A and in B was timed in the same environment
(the ``env`` of its status row: CPU model, CUDA device, intra-op threads, parallel jobs).
Otherwise the step-time row is marked "not comparable: <what differs>" -- neither outside the
noise nor a regression; cells of older runs, which did not record it, are "not comparable:
timing environment not recorded".

Quality (final ELBO, bias, variance, status) and speed (step time) regressions are told apart:
``compare`` returns both flags, and ``estbench compare`` exits with a bit mask of them -- 0 none,
1 a quality regression, 4 a speed regression only, 5 both (1 | 4); 2 stays for usage errors.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from estbench import metrics, store, table

ALPHA = 0.05
#: metric -> (per-cell column, higher is better, test on log10): ``metrics.COMPARED``, as declared
METRICS = {q.name: (q.name, q.higher, q.scale == metrics.LOG10)
           for q in map(metrics.get, metrics.COMPARED)}
#: what one compared row is about: a setting (table.SETTING_KEYS) and one of its metrics
KEYS = list(table.SETTING_KEYS)
COLUMNS = [*KEYS, "metric", "a", "b", "change", "rel_change", "p_value",
           "seeds_a", "seeds_b", "outside_noise", "worse", "regressed", "note"]
#: metrics whose regression is one of speed (exit bit 4): the measured times, which depend on the
#: machine; every other one is of quality (bit 1)
SPEED_METRICS = frozenset(name for name in METRICS if metrics.get(name).timing)
#: the fields of a cell's timing environment (``env`` in its status row), as named in notes
ENV_FIELDS = {"cpu": "CPU", "cuda_device": "CUDA device", "threads": "threads", "jobs": "jobs"}
NOT_RECORDED = "timing environment not recorded"


def exit_code(quality_regressed: bool, speed_regressed: bool) -> int:
    """``estbench compare``'s exit status: 1 quality regression | 4 speed regression (5: both)."""
    return (1 if quality_regressed else 0) | (4 if speed_regressed else 0)


def _load(run_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    from estbench.report.tables import per_cell  # lazy: keeps this module light to import
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no results folder at {run_dir}")
    records, cells = store.load(run_dir)
    if records.empty:
        raise ValueError(f"no results in {run_dir} (no cell records under {run_dir / 'cells'})")
    records = table.finished(records, cells)  # failed / diverged cells count in 'status' only
    budgets = {key: sorted(set(zip(d.steps, d.n_samples)))
               for key, d in records.groupby(KEYS)}
    return per_cell(records), cells, budgets


def _envs(cells: pd.DataFrame) -> dict:
    """(task, estimator, device) -> the timing environments of its finished cells: a list of
    dicts, None for a cell that recorded none (an older run)."""
    if cells is None or cells.empty or "status" not in cells:
        return {}
    ok = cells[cells.status == "ok"]
    env = ok["env"] if "env" in ok else pd.Series([None] * len(ok), index=ok.index)
    out: dict = {}
    for key, e in zip(ok[KEYS].itertuples(index=False, name=None), env):
        out.setdefault(key, []).append(e if isinstance(e, dict) else None)
    return out


def _env_difference(envs_a, envs_b) -> str:
    """'' when every cell of A and B was timed in one same environment, else what differs."""
    if not envs_a or not envs_b or any(e is None for e in [*envs_a, *envs_b]):
        return NOT_RECORDED
    diffs = []
    for f, name in ENV_FIELDS.items():
        va = sorted({str(e.get(f)) for e in envs_a})
        vb = sorted({str(e.get(f)) for e in envs_b})
        if va != vb or len(va) > 1:
            diffs.append(f"{name} {'/'.join(va)} in A vs {'/'.join(vb)} in B")
    return "; ".join(diffs)


def _bad_cells(cells: pd.DataFrame) -> dict:
    """(task, estimator, device) -> number of failed or diverged cells."""
    if cells is None or cells.empty or "status" not in cells:
        return {}
    bad = cells[cells.status.isin(["failed", "diverged"])]
    return bad.groupby(KEYS).size().to_dict()


def noise_test(a, b, log: bool = False) -> float:
    """Welch t-test p-value of ``a`` vs ``b`` (NaN with < 2 finite values on a side).  Identical
    constant samples give 1, different constant samples 0."""
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            a, b = np.log10(a), np.log10(b)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if a.std() == 0 and b.std() == 0:
        return 1.0 if a.mean() == b.mean() else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _budget_text(budgets) -> str:
    return "/".join(f"steps={s} n={n}" for s, n in budgets or [])


def compare(run_a, run_b, threshold: float = 0.1, alpha: float = ALPHA, atol: float = 1e-6
            ) -> tuple[pd.DataFrame, bool, bool]:
    """The long comparison table (columns ``COLUMNS``), whether the quality regressed (final
    ELBO, bias, variance, status) and whether the speed regressed (step time); see the module
    docstring and ``exit_code``."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be a non-negative relative change, got {threshold}")
    pa, cells_a, budgets_a = _load(run_a)
    pb, cells_b, budgets_b = _load(run_b)
    bad_a, bad_b = _bad_cells(cells_a), _bad_cells(cells_b)
    env_a, env_b = _envs(cells_a), _envs(cells_b)
    ga = dict(list(pa.groupby(KEYS, sort=True)))
    gb = dict(list(pb.groupby(KEYS, sort=True)))
    # in a run: some cell finished, failed or diverged there (infeasible ones never ran)
    in_a, in_b = set(ga) | set(bad_a), set(gb) | set(bad_b)
    rows = []
    for key in sorted(in_a | in_b):
        base = dict(zip(KEYS, key))
        if key not in in_a or key not in in_b:
            rows.append({**base, "metric": "", "note": "only in A" if key in in_a else "only in B",
                         "outside_noise": False, "worse": False, "regressed": False})
            continue
        da, db = ga.get(key, pa.iloc[0:0]), gb.get(key, pb.iloc[0:0])
        nba, nbb = bad_a.get(key, 0), bad_b.get(key, 0)
        ba, bb = budgets_a.get(key), budgets_b.get(key)
        budget_note = "" if ba == bb else (
            "budgets differ: A " + _budget_text(ba) + ", B " + _budget_text(bb))
        if nbb > nba:
            rows.append({**base, "metric": "status", "a": float(nba), "b": float(nbb),
                         "change": float(nbb - nba), "outside_noise": True, "worse": True,
                         "regressed": True, "note": f"{nbb} failed/diverged cells in B, {nba} in A"})
        for metric, (col, higher, log) in METRICS.items():
            va = da[col].astype(float).dropna().to_numpy()
            vb = db[col].astype(float).dropna().to_numpy()
            row = {**base, "metric": metric, "seeds_a": len(va), "seeds_b": len(vb),
                   "note": budget_note}
            if len(va) == 0 or len(vb) == 0:
                rows.append({**row, "outside_noise": False, "worse": False, "regressed": False,
                             "note": ("no values in " + ("A" if len(va) == 0 else "B") + "; "
                                      + budget_note).strip("; ")})
                continue
            a, b = float(va.mean()), float(vb.mean())
            change = b - a
            rel = change / abs(a) if a != 0 else (0.0 if change == 0 else math.copysign(math.inf, change))
            p = noise_test(va, vb, log)
            outside = (p < alpha) if not math.isnan(p) else abs(rel) > threshold
            if metric in ("bias", "variance") and abs(change) <= atol:
                # both numerically zero (exact estimators): float noise, not a change
                outside = False
            worse_by = -rel if higher else rel  # > 0: worse
            worse = worse_by > 0
            regressed = bool(worse_by > threshold and outside)
            if metric in SPEED_METRICS:
                differs = _env_difference(env_a.get(key), env_b.get(key))
                if differs:  # timed on different machines or loads: no verdict
                    rows.append({**row, "a": a, "b": b, "change": change, "rel_change": rel,
                                 "p_value": math.nan, "outside_noise": False, "worse": False,
                                 "regressed": False, "note": f"not comparable: {differs}"})
                    continue
            rows.append({**row, "a": a, "b": b, "change": change, "rel_change": rel, "p_value": p,
                         "outside_noise": bool(outside), "worse": bool(worse),
                         "regressed": regressed})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df = df.astype({"outside_noise": bool, "worse": bool, "regressed": bool})
    speed = df.metric.isin(SPEED_METRICS)
    return df, bool(df.regressed[~speed].any()), bool(df.regressed[speed].any())


def _g(v, spec=".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def render(df: pd.DataFrame, threshold: float | None = None) -> str:
    """A fixed-width text table grouped by task; '!' marks a change outside the noise and
    'REGRESSED' a regression beyond the threshold."""
    import textwrap
    if df.empty:
        return "(nothing to compare)\n"
    lines = []
    head = f"  {'estimator':<30} {'metric':<11} {'A':>11} {'B':>11} {'change':>9} {'p':>7}  flag"
    for (task, device), d in df.groupby(["task", "device"], sort=True):
        lines.append(f"== {task} [{device}] ==")
        for side in ("only in A", "only in B"):
            only = d[(d.metric == "") & (d.note == side)].estimator.tolist()
            if only:
                lines.extend(textwrap.wrap(f"{side}: {', '.join(only)}", 100,
                                           initial_indent="  ", subsequent_indent="    "))
        d = d[d.metric != ""]
        if not d.empty:
            lines.append(head)
        for est, de in d.groupby("estimator", sort=True):
            notes = {n for n in de.note if isinstance(n, str) and n.startswith("budgets differ")}
            for n in sorted(notes):
                lines.append(f"  {est:<30} ({n})")
            for _, r in de.iterrows():
                note = "" if r.note in notes else r.note
                if r.metric == "status":
                    lines.append(f"  {est:<30} {'status':<11} {note}  REGRESSED")
                    continue
                rel = "-" if pd.isna(r.rel_change) else f"{r.rel_change:+.1%}"
                flag = "REGRESSED" if r.regressed else ("!" if r.outside_noise else "")
                flag = (flag + " " + (note or "")).strip()
                lines.append(f"  {est:<30} {r.metric:<11} {_g(r.a):>11} {_g(r.b):>11} "
                             f"{rel:>9} {_g(r.p_value, '.3f'):>7}  {flag}")
        lines.append("")
    n_reg = int(df.regressed.sum())
    n_speed = int(df.regressed[df.metric.isin(SPEED_METRICS)].sum())
    n_out = int(df.outside_noise.sum())
    n_nc = int(df.note.fillna("").astype(str).str.startswith("not comparable").sum())
    thr = f" beyond {threshold:.0%}" if threshold is not None else ""
    lines.append(f"{n_out} change(s) outside the seed-to-seed noise (!); {n_reg} regression(s)"
                 f"{thr} (REGRESSED): {n_reg - n_speed} of quality, {n_speed} of step time."
                 + (f" {n_nc} step time(s) not comparable (timed in different environments)."
                    if n_nc else ""))
    return "\n".join(lines) + "\n"
