"""Compare two result sets as a CI gate: what changed per (task, estimator), and is it a regression?

For every *setting* (task, estimator, device) in both runs and each compared metric
(``metrics.COMPARED``: final ELBO, variance, gradient error, bias net of its Monte Carlo noise,
step time in ms; per-cell figures as in estbench.analysis.table, checkpoint ones averaged over checkpoints)
the means over seeds in A and B and the change.  Each metric is judged against its own
*tolerance*, declared with it in estbench/core/metrics.py (``Quantity.tolerance``) and overridable with
``estbench compare --tolerance METRIC=VALUE``: a difference in the metric's own unit (final ELBO:
1 nat per data point on the models, a few hundredths on the toys, whose figure lives on that
scale) or a factor for quantities spread over decades (variance, gradient error, net bias, step
time: 1.25, i.e. 25% worse).

A change is *outside the noise* when a Welch t-test across the seeds gives p < 0.05 (LOG10-scale
metrics tested on log10, where their seed-to-seed spread is roughly symmetric), or, with fewer
than two seeds on either side, when it exceeds the tolerance.  A *regression* is a change for the
worse beyond the tolerance AND outside the noise.  A cell that finished in A but failed or
diverged in B is a regression too.  Only finished cells (status ``ok``) are measured: a failed or
diverged cell's partial checkpoint records are no measurement (``estbench.engine.store.finished``).

Bias.  The measured bias of an unbiased estimator is its noise floor, which grows with its
variance: a noisier but still unbiased estimator would look "more biased".  So the bias is
compared net of its noise (``net_bias``) and read with the bias test (``table.estimator_bias``):
the row ``bias_test`` regresses when B's test finds the estimator biased where A's did not; the
``net_bias`` row is judged only when both runs find it biased (or either lacks the test), never
when B finds no bias.

Marks: ``REGRESSED`` (worse beyond the tolerance and outside the noise: fails the gate),
``worse`` (outside the noise, within the tolerance), ``better`` (outside the noise, for the
better), ``not comparable`` (not judged; the note says why).

Step times depend on the machine as much as on the code: they are compared only when every
finished cell of the setting in A and in B was timed in the same environment (the ``env`` of its
status row: CPU model, CUDA device, intra-op threads, parallel jobs); otherwise the row is "not
comparable: <what differs>" -- neither outside the noise nor a regression; cells of older runs,
which did not record it, are "not comparable: timing environment not recorded".

A gate must not pass by accident.  These make it *incomplete* (a problem, printed one line each):

- nothing was compared (no setting finished in both runs);
- a setting of A is missing from B ("only in A": an estimator or task vanished), or one of its
  seeds is;
- a cell file of A or B is damaged (unreadable: truncated, garbled, not an estbench record);
- a setting ran another budget in B than in A (steps, samples, checkpoints, ...): its figures are
  not comparable -- and when *every* shared setting differs, ``compare`` refuses the whole
  comparison (``NotComparable``; ``estbench compare`` exits 2: "A and B ran different budgets");
- a metric measured in A has no value in B while B's cells finished.

A setting only in B (a new estimator) is shown, and is no failure.

``estbench compare`` exits with a bit mask (``exit_code``): 0 the gate passed; 1 a quality
regression (final ELBO, variance, gradient error, bias, status); 4 a speed regression (step time);
8 the gate is incomplete; they combine (5 = 1 | 4, 9 = 1 | 8, 13 = 1 | 4 | 8).  2 stays for usage
errors: a missing folder, a folder without results, a bad --tolerance, budgets that differ
everywhere.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from estbench.core import metrics
from estbench.engine import store
from estbench.analysis import table
from estbench.core.budget import Budget
from estbench.analysis import quantities
from estbench.core.records import SETTING_KEYS

ALPHA = 0.05
#: the exit bits of ``estbench compare`` (2, a usage error, is never combined with them)
QUALITY, USAGE, SPEED, INCOMPLETE = 1, 2, 4, 8
#: metric -> (per-cell column, higher is better, test on log10): ``metrics.COMPARED``, as declared
METRICS = {q.name: (q.name, q.higher, q.scale == metrics.LOG10)
           for q in map(metrics.get, metrics.COMPARED)}
#: the row of the bias test's verdict (beside the metrics; not a per-cell column)
BIAS_TEST = "bias_test"
#: what one compared row is about: a setting (SETTING_KEYS) and one of its metrics
COLUMNS = [*SETTING_KEYS, "metric", "a", "b", "change", "rel_change", "p_value", "seeds_a", "seeds_b",
           "tolerance", "tolerance_kind", "outside_noise", "worse", "regressed", "mark", "note"]
#: metrics whose regression is one of speed (exit bit 4): the measured times, which depend on the
#: machine; every other one is of quality (bit 1)
SPEED_METRICS = frozenset(name for name in METRICS if metrics.get(name).timing)
#: the fields of a cell's timing environment (``env`` in its status row), as named in notes
ENV_FIELDS = {"cpu": "CPU", "cuda_device": "CUDA device", "threads": "threads", "jobs": "jobs",
              "huge_pages": "huge pages"}
NOT_RECORDED = "timing environment not recorded"
#: an ENV_FIELDS entry a cell's ``env`` lacks (recorded by a later version than the cell's)
FIELD_NOT_RECORDED = "not recorded"
#: the budget fields a cell's status row records (``Budget``): settings compare only alike
BUDGET_FIELDS = [f.name for f in dataclasses.fields(Budget)]
#: the statuses of cells that ran (an infeasible cell never did)
RAN = ("ok", "failed", "diverged")
MARKS = {"REGRESSED": "worse by more than the tolerance and outside the seed-to-seed noise (fails "
                      "the gate)",
         "worse": "worse, outside the noise but within the tolerance",
         "better": "better, outside the noise",
         "not comparable": "not judged (the note says why)"}
#: ``store.load``'s warning for a cell file it cannot read
_DAMAGED = "skipping unreadable results file "


class NotComparable(ValueError):
    """A and B cannot be compared at all (every shared setting ran another budget)."""


@dataclass(frozen=True)
class Problem:
    """One line about the comparison itself: ``incomplete`` ones fail the gate (exit bit 8),
    the others are notices."""

    text: str
    incomplete: bool = True

    def line(self) -> str:
        return ("INCOMPLETE: " if self.incomplete else "note: ") + self.text


@dataclass
class Comparison:
    """What ``compare`` finds.  Unpacks as ``(table, quality, speed)``."""

    table: pd.DataFrame
    quality: bool
    speed: bool
    problems: list = field(default_factory=list)
    #: metric -> the tolerances applied: {"kind": DIFFERENCE or FACTOR, "default": value,
    #: "tasks": {task: its own value, where it differs}}
    tolerances: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.table, self.quality, self.speed))

    @property
    def incomplete(self) -> bool:
        return any(p.incomplete for p in self.problems)

    @property
    def exit_code(self) -> int:
        return exit_code(self.quality, self.speed, self.incomplete)


def exit_code(quality_regressed: bool, speed_regressed: bool, incomplete: bool = False) -> int:
    """``estbench compare``'s exit status: 1 quality regression | 4 speed regression | 8 incomplete
    gate (0: the gate passed)."""
    return ((QUALITY if quality_regressed else 0) | (SPEED if speed_regressed else 0)
            | (INCOMPLETE if incomplete else 0))


def describe_exit(code: int) -> str:
    """``9`` -> ``'1 quality regression | 8 incomplete gate'``; ``0`` -> ``'passed'``."""
    parts = [f"{bit} {text}" for bit, text in ((QUALITY, "quality regression"),
                                               (SPEED, "speed regression"),
                                               (INCOMPLETE, "incomplete gate")) if code & bit]
    return " | ".join(parts) or "passed"


def parse_tolerances(items) -> dict:
    """``["final_elbo=0.5", "variance=1.5"]`` -> ``{"final_elbo": 0.5, "variance": 1.5}``;
    ValueError (one line) on a malformed item, an unknown metric or a value out of range."""
    out = {}
    for item in items or []:
        name, sep, value = str(item).partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--tolerance takes METRIC=VALUE (e.g. final_elbo=0.5), got {item!r}")
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"--tolerance {name}: {value.strip()!r} is not a number") from None
        out[name] = v
    check_tolerances(out)
    return out


def check_tolerances(tolerances: dict) -> None:
    """ValueError naming the first tolerance that is not a compared metric or is out of range."""
    for name, v in (tolerances or {}).items():
        if name not in METRICS:
            raise ValueError(f"--tolerance: {name!r} is not a compared metric; they are "
                             f"{', '.join(METRICS)}")
        q = metrics.get(name)
        low = 1.0 if q.tolerance_kind == metrics.FACTOR else 0.0
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v < math.inf:
            what = ("a factor >= 1 (1.25: 25% worse)" if q.tolerance_kind == metrics.FACTOR
                    else "a difference >= 0 in its own unit")
            raise ValueError(f"--tolerance {name}={v!r}: {name}'s tolerance is {what}")


def tolerance_text(value: float, kind: str) -> str:
    return f"x{value:g}" if kind == metrics.FACTOR else f"{value:g}"


# ---- loading ------------------------------------------------------------------------------------
def _one_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def _load(run_dir, side: str) -> dict:
    """A run's per-cell figures, status rows and problems: its damaged cell files (``store.load``
    warns about them; caught here, so that they are problems of the gate, never Python warnings)."""
    from estbench.analysis.figures import per_cell  # lazy: keeps this module light to import
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no results folder at {run_dir}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records, cells = store.load(run_dir)
    paths = sorted((run_dir / "cells").glob("*.parquet"))
    damaged, notices = [], []
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            continue
        msg = str(w.message)
        # store.load names each cell file it cannot read ("skipping unreadable results file
        # PATH: why"): a damaged cell, whatever the wording
        path = next((p for p in paths if str(p) in msg), None)
        if path is not None or msg.startswith(_DAMAGED):
            why = (msg.split(str(path), 1)[1] if path is not None else msg[len(_DAMAGED):])
            why = _one_line(why.lstrip(": ")).replace(f" '{path}'", "")
            damaged.append((path, why))
        else:
            notices.append(Problem(f"{side}: {_one_line(msg)}", incomplete=False))
    if records.empty:
        extra = f" ({len(damaged)} damaged cell file(s))" if damaged else ""
        raise ValueError(f"no results in {run_dir} (no cell records under {run_dir / 'cells'})"
                         + extra)
    fin = store.finished(records, cells)  # failed / diverged cells count in 'status' only
    return {"pc": per_cell(fin), "cells": cells, "damaged": damaged, "notices": notices}


def _ran(cells: pd.DataFrame) -> pd.DataFrame:
    if cells is None or cells.empty or "status" not in cells:
        return pd.DataFrame(columns=[*SETTING_KEYS, "seed", "status"])
    return cells[cells.status.isin(RAN)]


def _settings(cells: pd.DataFrame) -> dict:
    """(task, estimator, device) -> {"seeds": set, "budgets": {field: set of values}} of its cells
    that ran."""
    ran = _ran(cells)
    fields = [f for f in BUDGET_FIELDS if f in ran.columns]
    out = {}
    for key, d in ran.groupby(SETTING_KEYS, sort=True):
        budgets = {f: {v for v in d[f] if not (isinstance(v, float) and math.isnan(v))}
                   for f in fields}
        out[key] = {"seeds": set(d["seed"]), "budgets": budgets}
    return out


def _budget_difference(ba: dict, bb: dict) -> str:
    """'' when the budgets agree on every field both runs recorded, else what differs."""
    diffs = []
    for f in BUDGET_FIELDS:
        va, vb = ba.get(f, set()), bb.get(f, set())
        if va and vb and va != vb:
            diffs.append(f"{f} {'/'.join(map(_num, sorted(va, key=str)))} in A vs "
                         f"{'/'.join(map(_num, sorted(vb, key=str)))} in B")
    return ", ".join(diffs)


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def timing_envs(cells: pd.DataFrame) -> dict:
    """(task, estimator, device) -> the timing environments of its finished cells: a list of
    dicts, None for a cell that recorded none (an older run)."""
    if cells is None or cells.empty or "status" not in cells:
        return {}
    ok = cells[cells.status == "ok"]
    env = ok["env"] if "env" in ok else pd.Series([None] * len(ok), index=ok.index)
    out: dict = {}
    for key, e in zip(ok[SETTING_KEYS].itertuples(index=False, name=None), env):
        out.setdefault(key, []).append(e if isinstance(e, dict) else None)
    return out


def env_values(envs, field: str) -> list:
    """The distinct values (as text, sorted) of one ENV_FIELDS entry over recorded environments;
    FIELD_NOT_RECORDED for an environment recorded before that entry existed."""
    return sorted({str(e[field]) if field in e else FIELD_NOT_RECORDED for e in envs})


def env_difference(envs_a, envs_b) -> str:
    """'' when every cell of A and B was timed in one same environment, else what differs."""
    if not envs_a or not envs_b or any(e is None for e in [*envs_a, *envs_b]):
        return NOT_RECORDED
    diffs = []
    for f, name in ENV_FIELDS.items():
        va = env_values(envs_a, f)
        vb = env_values(envs_b, f)
        if va != vb or len(va) > 1:
            diffs.append(f"{name} {'/'.join(va)} in A vs {'/'.join(vb)} in B")
    return "; ".join(diffs)


def _bad_cells(cells: pd.DataFrame) -> dict:
    """(task, estimator, device) -> number of failed or diverged cells."""
    if cells is None or cells.empty or "status" not in cells:
        return {}
    bad = cells[cells.status.isin(["failed", "diverged"])]
    return bad.groupby(SETTING_KEYS).size().to_dict()


def _verdicts(pc: pd.DataFrame) -> dict:
    """(task, estimator, device) -> the bias test's verdict over its cells (a row of
    ``table.estimator_bias``), for settings whose cells ran the test."""
    out = {}
    if pc.empty or "bias_p" not in pc:
        return out
    for key, d in pc.groupby(SETTING_KEYS, sort=True):
        v = table.estimator_bias(d)
        if not v.empty:
            out[key] = v.iloc[0]
    return out


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


def _label(key) -> str:
    task, est, device = (dict(zip(SETTING_KEYS, key))[k] for k in ("task", "estimator", "device"))
    return f"{task} x {est} [{device}]"


def _seeds(seeds) -> str:
    return ",".join(str(s) for s in sorted(seeds))


# ---- judging ------------------------------------------------------------------------------------
def _worse_by(a: float, b: float, higher: bool, kind: str) -> float:
    """How much worse B is than A: a difference (> 0 worse) or a factor (> 1 worse)."""
    if kind == metrics.FACTOR:
        num, den = (a, b) if higher else (b, a)
        if num == den:
            return 1.0
        if den <= 0 or num < 0:
            return math.inf if num > den else 0.0
        return num / den
    return (a - b) if higher else (b - a)


def _judge(va, vb, higher, log, tol, kind, alpha, atol) -> dict:
    a, b = float(va.mean()), float(vb.mean())
    change = b - a
    rel = change / abs(a) if a != 0 else (0.0 if change == 0 else math.copysign(math.inf, change))
    worse_by = _worse_by(a, b, higher, kind)
    better_by = _worse_by(b, a, higher, kind)
    neutral = 1.0 if kind == metrics.FACTOR else 0.0
    p = noise_test(va, vb, log)
    beyond_worse, beyond_better = worse_by > tol, better_by > tol
    outside = (p < alpha) if not math.isnan(p) else (beyond_worse or beyond_better)
    if log and abs(change) <= atol:
        # both numerically zero (an exact estimator's bias or variance): float noise, no change
        outside = False
    worse = worse_by > neutral
    regressed = bool(worse and beyond_worse and outside)
    mark = ("REGRESSED" if regressed else "worse" if worse and outside
            else "better" if outside and better_by > neutral else "")
    return {"a": a, "b": b, "change": change, "rel_change": rel, "p_value": p,
            "outside_noise": bool(outside), "worse": bool(worse), "regressed": regressed,
            "mark": mark}


def _verdict_text(v) -> str:
    word = "biased" if bool(v["biased"]) else "no bias found"
    return f"{word} ({int(v['rejecting'])}/{int(v['cells'])} cells reject)"


def compare(run_a, run_b, tolerances: dict | None = None, alpha: float = ALPHA,
            atol: float = 1e-6) -> Comparison:
    """Compare the results folder ``run_b`` with the baseline ``run_a``: a ``Comparison``, which
    unpacks as (the long table, columns ``COLUMNS``; whether the quality regressed; whether the
    speed regressed), and carries the gate's problems.  ``tolerances``: metric -> tolerance,
    overriding the declared ones on every task.  Raises FileNotFoundError / ValueError on bad
    input and ``NotComparable`` when every shared setting ran another budget."""
    check_tolerances(tolerances)
    tolerances = dict(tolerances or {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _compare(run_a, run_b, tolerances, alpha, atol)
    seen = {p.text for p in result.problems}
    for w in caught:  # anything else said on the way: one line each, never a Python warning
        if issubclass(w.category, (RuntimeWarning, DeprecationWarning, FutureWarning)):
            continue
        text = _one_line(str(w.message))
        if text and text not in seen:
            seen.add(text)
            result.problems.append(Problem(text, incomplete=False))
    return result


def _compare(run_a, run_b, tolerances, alpha, atol) -> Comparison:
    A, B = _load(run_a, "A"), _load(run_b, "B")
    pa, pb = A["pc"], B["pc"]
    problems: list[Problem] = [*A["notices"], *B["notices"]]
    keys_a, keys_b = _settings(A["cells"]), _settings(B["cells"])
    keys_of_a = {}
    if not A["cells"].empty and "key" in A["cells"]:
        keys_of_a = {k: r for k, r in zip(A["cells"]["key"], A["cells"].to_dict("records"))}
    for side, run in (("A", A), ("B", B)):
        for path, why in run["damaged"]:
            cell = keys_of_a.get(path.stem) if path is not None else None
            which = (f" (A's cell {cell['task']} x {cell['estimator']} seed={cell['seed']} "
                     f"[{cell['device']}])") if cell is not None and side == "B" else ""
            problems.append(Problem(f"damaged cell file in {side}: {path}{which}: {why} -- "
                                    f"'estbench run' into that folder recomputes it"))
    shared = sorted(set(keys_a) & set(keys_b))
    budget_diff = {k: _budget_difference(keys_a[k]["budgets"], keys_b[k]["budgets"])
                   for k in shared}
    budget_diff = {k: d for k, d in budget_diff.items() if d}
    if shared and len(budget_diff) == len(shared):
        by_text: dict = {}
        for k, d in budget_diff.items():
            by_text.setdefault(d, set()).add(dict(zip(SETTING_KEYS, k))["task"])
        raise NotComparable("A and B ran different budgets: " + "; ".join(
            f"{d} ({', '.join(sorted(tasks))})" for d, tasks in sorted(by_text.items()))
            + "; nothing is comparable: rerun B with A's budget")
    bad_a, bad_b = _bad_cells(A["cells"]), _bad_cells(B["cells"])
    env_a, env_b = timing_envs(A["cells"]), timing_envs(B["cells"])
    ver_a, ver_b = _verdicts(pa), _verdicts(pb)
    ga = dict(list(pa.groupby(SETTING_KEYS, sort=True)))
    gb = dict(list(pb.groupby(SETTING_KEYS, sort=True)))
    empty = pa.iloc[0:0]
    rows = []
    applied: dict = {m: {"kind": metrics.get(m).tolerance_kind,
                         "default": tolerances.get(m, metrics.get(m).tolerance), "tasks": {}}
                     for m in METRICS}
    for key in sorted(set(keys_a) | set(keys_b)):
        base = dict(zip(SETTING_KEYS, key))
        label = _label(key)
        blank = {"outside_noise": False, "worse": False, "regressed": False, "mark": ""}
        if key not in keys_b or key not in keys_a:
            side = "only in A" if key in keys_a else "only in B"
            rows.append({**base, "metric": "", "note": side, **blank})
            problems.append(
                Problem(f"{label}: only in A: missing from B (an estimator or task vanished)")
                if key in keys_a else
                Problem(f"{label}: only in B: new, nothing to compare it with", incomplete=False))
            continue
        if key in budget_diff:
            note = f"not comparable: budgets differ: {budget_diff[key]}"
            rows.append({**base, "metric": "", "note": note, **blank, "mark": "not comparable"})
            problems.append(Problem(f"{label}: {note}"))
            continue
        lost = keys_a[key]["seeds"] - keys_b[key]["seeds"]
        if lost:
            problems.append(Problem(f"{label}: seed(s) {_seeds(lost)} only in A: missing from B"))
        new = keys_b[key]["seeds"] - keys_a[key]["seeds"]
        if new:
            problems.append(Problem(f"{label}: seed(s) {_seeds(new)} only in B", incomplete=False))
        da, db = ga.get(key, empty), gb.get(key, empty)
        nba, nbb = bad_a.get(key, 0), bad_b.get(key, 0)
        status_regressed = nbb > nba
        if status_regressed:
            rows.append({**base, "metric": "status", "a": float(nba), "b": float(nbb),
                         "change": float(nbb - nba), "outside_noise": True, "worse": True,
                         "regressed": True, "mark": "REGRESSED",
                         "note": f"{nbb} failed/diverged cells in B, {nba} in A"})
        va_, vb_ = ver_a.get(key), ver_b.get(key)
        verdicts = va_ is not None and vb_ is not None
        if verdicts:
            became = bool(vb_["biased"]) and not bool(va_["biased"])
            cleared = bool(va_["biased"]) and not bool(vb_["biased"])
            fa = int(va_["rejecting"]) / max(1, int(va_["cells"]))
            fb = int(vb_["rejecting"]) / max(1, int(vb_["cells"]))
            rows.append({**base, "metric": BIAS_TEST, "a": fa, "b": fb, "change": fb - fa,
                         "p_value": float(vb_["p"]), "seeds_a": int(va_["cells"]),
                         "seeds_b": int(vb_["cells"]), "outside_noise": became or cleared,
                         "worse": became, "regressed": became,
                         "mark": "REGRESSED" if became else "better" if cleared else "",
                         "note": f"A: {_verdict_text(va_)}; B: {_verdict_text(vb_)}"})
        for metric, (col, higher, log) in METRICS.items():
            q = metrics.get(metric)
            tol = tolerances.get(metric, quantities.tolerance(metric, base["task"]))
            if tol != applied[metric]["default"]:
                applied[metric]["tasks"][base["task"]] = tol
            va = da[col].astype(float).dropna().to_numpy() if col in da else np.array([])
            vb = db[col].astype(float).dropna().to_numpy() if col in db else np.array([])
            row = {**base, "metric": metric, "seeds_a": len(va), "seeds_b": len(vb),
                   "tolerance": tol, "tolerance_kind": q.tolerance_kind, "note": ""}
            if len(va) == 0 or len(vb) == 0:
                missing = "A" if len(va) == 0 else "B"
                rows.append({**row, **blank, "note": f"no values in {missing}"})
                if missing == "B" and not status_regressed:
                    problems.append(Problem(f"{label}: {metric} measured in A, no value in B"))
                elif missing == "A" and len(vb):
                    problems.append(Problem(f"{label}: {metric} has no value in A (an older run?): "
                                            f"not judged", incomplete=False))
                continue
            judged = _judge(va, vb, higher, log, tol, q.tolerance_kind, alpha, atol)
            if metric in SPEED_METRICS:
                differs = env_difference(env_a.get(key), env_b.get(key))
                if differs:  # timed on different machines or loads: no verdict
                    rows.append({**row, **judged, "p_value": math.nan, "outside_noise": False,
                                 "worse": False, "regressed": False, "mark": "not comparable",
                                 "note": f"not comparable: {differs}"})
                    continue
            if metric == "net_bias" and verdicts and not (bool(va_["biased"])
                                                          and bool(vb_["biased"])):
                # an estimator B finds unbiased has no bias to regress (its net bias is noise);
                # one B newly finds biased regresses on the bias_test row
                why = ("no bias found in B: its net bias is noise" if not bool(vb_["biased"])
                       else f"judged by the {BIAS_TEST} row")
                rows.append({**row, **judged, "regressed": False, "mark": "", "note": why})
                continue
            rows.append({**row, **judged})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df = df.astype({"outside_noise": bool, "worse": bool, "regressed": bool})
    compared = df[df.metric.isin(list(METRICS)) & df.a.notna() & df.b.notna()]
    if compared.empty:
        problems.append(Problem("nothing was compared: no (task, estimator, device) finished in "
                                "both A and B"))
    thin = sorted({_label(k) for k, d in compared.groupby(SETTING_KEYS)
                   if min(d.seeds_a.min(), d.seeds_b.min()) < 2})
    if thin:
        problems.append(Problem(
            f"{len(thin)} setting(s) with fewer than 2 seeds on a side ({thin[0]}"
            + (", ..." if len(thin) > 1 else "") + "): no noise test there, a change beyond the "
            "tolerance counts as outside the noise; run >= 2 seeds a side", incomplete=False))
    speed = df.metric.isin(SPEED_METRICS)
    return Comparison(df, bool(df.regressed[~speed].any()), bool(df.regressed[speed].any()),
                      problems, applied)


# ---- the text report ----------------------------------------------------------------------------
def _g(v, spec=".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _change_text(r) -> str:
    if pd.isna(r.a) or pd.isna(r.b):
        return "-"
    if r.metric == BIAS_TEST:
        return ""
    if r.metric == "status":
        return f"{r.b - r.a:+g}"
    if r.tolerance_kind == metrics.FACTOR:
        if r.a == r.b:
            return "x1"
        return f"x{r.b / r.a:.3g}" if r.a > 0 else "-"
    return f"{r.b - r.a:+.4g}"


def render(result) -> str:
    """A fixed-width text table grouped by task, the gate's problems one line each, a legend of
    the marks and the verdict.  ``result``: a ``Comparison`` (or its table alone)."""
    if isinstance(result, pd.DataFrame):
        speed = result.metric.isin(SPEED_METRICS)
        result = Comparison(result, bool(result.regressed[~speed].any()),
                            bool(result.regressed[speed].any()))
    df, problems = result.table, list(result.problems)
    lines = []
    head = (f"  {'estimator':<28} {'metric':<11} {'A':>10} {'B':>10} {'change':>9} {'p':>7} "
            f"{'tol':>6}  mark")
    for (task, device), d in df.groupby(["task", "device"], sort=True):
        d = d[d.metric != ""]
        if d.empty:
            continue
        lines.append(f"== {task} [{device}] ==")
        lines.append(head)
        for est, de in d.groupby("estimator", sort=True):
            for _, r in de.iterrows():
                tol = "-" if pd.isna(r.tolerance) else tolerance_text(r.tolerance, r.tolerance_kind)
                flag = (str(r.mark or "") + " " + str(r.note or "")).strip()
                if r.metric == BIAS_TEST:
                    a, b = f"{r.a:.0%}", f"{r.b:.0%}"
                else:
                    a, b = _g(r.a), _g(r.b)
                lines.append(f"  {est:<28} {r.metric:<11} {a:>10} {b:>10} {_change_text(r):>9} "
                             f"{_g(r.p_value, '.3f'):>7} {tol:>6}  {flag}")
        lines.append("")
    if df.empty or not (df.metric != "").any():
        lines.append("(nothing to compare)")
        lines.append("")
    if problems:
        lines.append("problems of the gate (INCOMPLETE ones fail it, exit bit 8):")
        lines.extend("  " + p.line() for p in problems)
        lines.append("")
    width = max(map(len, MARKS))
    for i, (m, t) in enumerate(MARKS.items()):
        lines.append(f"{'marks:' if i == 0 else '':<7}{m:<{width}}  {t}")
    lines.append(f"tol: the tolerance, xF a factor (B / A), else a difference in the metric's own "
                 f"unit; {BIAS_TEST}: the share of cells whose bias test rejects (p < "
                 f"{table.BIAS_TEST_ALPHA}), biased when more than half do")
    n_reg = int(df.regressed.sum())
    n_speed = int(df.regressed[df.metric.isin(SPEED_METRICS)].sum())
    n_worse = int((df["mark"] == "worse").sum())
    n_better = int((df["mark"] == "better").sum())
    n_nc = int((df["mark"] == "not comparable").sum())
    n_inc = sum(p.incomplete for p in problems)
    lines.append(f"{n_reg} regression(s) (REGRESSED): {n_reg - n_speed} of quality, {n_speed} of "
                 f"step time; {n_worse} worse within the tolerance; {n_better} better; "
                 f"{n_nc} not comparable; {n_inc} problem(s) making the gate incomplete.")
    code = result.exit_code
    lines.append(f"gate: {'FAILED' if code else 'passed'} (exit {code}"
                 + (f": {describe_exit(code)}" if code else "") + ")")
    return "\n".join(lines) + "\n"
