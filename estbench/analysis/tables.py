"""Per-cell figures, confidence intervals and the per-task tables of a report.

Everything starts from the tidy records of a run.  The per-cell aggregation (bias and variance
averaged over a cell's checkpoints, final figures as recorded) is estbench.analysis.table's, reused as is;
this module adds seed-to-seed statistics: mean and a Student-t 95% confidence interval over seeds.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

import estimators
from estbench.core import metrics
from estbench.analysis import table
from estbench.analysis.stats import ci_frame
from estbench.core.records import CELL_KEYS, RECORD_BUDGET



@dataclass(frozen=True)
class Column:
    name: str        # column of the per-cell frame
    title: str       # header in tables
    higher: bool     # True: higher is better


#: the columns of the per-task tables, in order: ``metrics.REPORT_TABLE``, as declared there
COLUMNS = [Column(q.name, q.title, q.higher) for q in map(metrics.get, metrics.REPORT_TABLE)]


# ---- settings: one label per (task, budget, device) ---------------------------------------------
def label_settings(records: pd.DataFrame, cells: pd.DataFrame | None = None):
    """Relabel ``task`` so that one label means one (task, budget, device) setting.

    A run folder may hold one task under several budgets (``--steps`` changed between runs) or on
    several devices; averaging those together would be wrong, so the budget and/or device are
    appended to the task name, only where they differ: ``toy_binary [steps=30, n=4] [cuda]``.
    Returns relabelled copies of ``records`` and ``cells``.
    """
    if records.empty:
        return records.copy(), (cells.copy() if cells is not None else None)
    budgets = records[["task", *RECORD_BUDGET]].drop_duplicates()
    multi_budget = set(budgets.task[budgets.task.duplicated()])
    multi_device = records.device.nunique() > 1

    def label(task, device, n, steps):
        out = task
        if task in multi_budget:
            out += f" [steps={int(steps)}, n={int(n)}]"
        if multi_device:
            out += f" [{device}]"
        return out

    rec = records.copy()
    if multi_budget or multi_device:
        rec["task"] = [label(*t) for t in zip(rec.task, rec.device, rec.n_samples, rec.steps)]
    cel = None
    if cells is not None:
        cel = cells.copy()
        if (multi_budget or multi_device) and not cel.empty:
            cel["task"] = [label(*t) for t in zip(cel.task, cel.device, cel.n_samples, cel.steps)]
    return rec, cel


#: means this close (relative) to the best of a column are marked best too (floating-point noise)
BEST_RTOL = 1e-6


# ---- the per-task tables ------------------------------------------------------------------------
#: level of the bias test wherever a verdict is drawn from it (tables, leaderboard, report)
#: the bias test's verdicts live with the per-cell figures (estbench.analysis.table); re-exported here
BIAS_TEST_ALPHA, estimator_bias, biased_set = table.BIAS_TEST_ALPHA, table.estimator_bias, table.biased_set


def task_tables(pc: pd.DataFrame, level: float = 0.95) -> dict[str, pd.DataFrame]:
    """{task: table} with one row per estimator: for each column its mean, CI half-width and a
    ``best`` flag, plus ``seeds`` (cells with a final ELBO) and ``diverged``; sorted by final ELBO.

    ``best`` marks the best mean of a column and any within a relative ``BEST_RTOL`` of it
    (rounding noise); a column where every estimator is best (f-evals, typically) marks none.
    """
    names = [c.name for c in COLUMNS]
    pc = pc.assign(**{n: np.nan for n in names if n not in pc})  # a frame made without one
    out = {}
    for task, df in pc.groupby("task", sort=True):
        t = ci_frame(df, names, ["estimator"], level)
        t["seeds"] = t["final_elbo_n"].astype(int)
        t["cells"] = df.groupby("estimator").size().reindex(t.estimator).to_numpy()
        t["diverged"] = df.groupby("estimator")["diverged"].sum().reindex(t.estimator).fillna(0) \
            .astype(int).to_numpy()
        has_data = np.zeros(len(t), dtype=bool)
        for c in COLUMNS:
            has_data |= t[f"{c.name}_mean"].notna().to_numpy()
        t = t[has_data].reset_index(drop=True)
        verdict = estimator_bias(df)
        t["bias_p"] = [verdict["p"].get((task, e), np.nan) for e in t.estimator]
        t["bias_rejecting"] = [f"{int(verdict['rejecting'][(task, e)])}/{int(verdict['cells'][(task, e)])}"
                               if (task, e) in verdict.index else "" for e in t.estimator]
        # the lowest variance is only "best" among estimators the bias test does not find biased:
        # a deterministic biased estimator (spigot) has zero variance
        biased = np.array([(task, e) in verdict.index and bool(verdict["biased"][(task, e)])
                           for e in t.estimator], dtype=bool)
        t["bias_verdict"] = [("biased" if b else "not found biased") if (task, e) in verdict.index
                             else "" for e, b in zip(t.estimator, biased)]
        # an oracle (exact enumeration, outside the budget) is a reference row: never best
        t["oracle"] = np.array([estimators.is_oracle(e) for e in t.estimator], dtype=bool)
        for c in COLUMNS:
            means = t[f"{c.name}_mean"].where(~t["oracle"])
            if c.name == "log10_variance":
                means = means.where(~biased)
            if c.name in NEVER_BEST:
                t[f"{c.name}_best"] = False
                continue
            finite = means.dropna()
            best = finite.max() if c.higher else finite.min()
            is_best = ((means == best) | np.isclose(means, best, rtol=BEST_RTOL, atol=0)) \
                & means.notna()
            t[f"{c.name}_best"] = False if is_best[means.notna()].all() else is_best
        t = t.sort_values(["oracle", "final_elbo_mean", "estimator"], ascending=[True, False, True],
                          na_position="last", ignore_index=True)
        keep = ["estimator", "oracle", "seeds", "cells", "diverged"]
        for c in COLUMNS:
            keep += [f"{c.name}_mean", f"{c.name}_ci", f"{c.name}_best"]
        keep += ["bias_verdict", "bias_p", "bias_rejecting"]
        out[task] = t[keep]
    return out


#: columns never marked best.  The bias beyond noise: an estimator the bias test does not find
#: biased has a bias at its noise level, 0 up to noise, and the smallest of such values is the
#: luckiest draw, not the least biased estimator; the verdict beside it is what the column says
NEVER_BEST = frozenset({"net_bias"})


def closed_form(task: str) -> bool | None:
    """Whether a task label (``toy_binary``, ``toy_categorical[dim=3] [cuda]``) names a task whose
    objective has a closed form (``ClosedFormToy``: its curve and its final figure are both the
    exact E_q[f]); None for a task not registered here (a plug-in of another process)."""
    import tasks as task_registry
    from tasks.base import ClosedFormToy

    try:
        cls = task_registry.get_class(str(task).split("[", 1)[0].split(" ", 1)[0])
    except (ValueError, KeyError):
        return None
    return issubclass(cls, ClosedFormToy)


def elbo_labels(task: str) -> tuple[str, str]:
    """What a task's curve (``elbo``, ``evaluate(final=False)``) and its final figure
    (``final_elbo``, ``evaluate(final=True)``) are, as axes and table headers name them: the
    validation ELBO during training and the test ELBO at the end for a model, the exact objective
    for both on a closed-form toy (estbench.core.metrics declares both)."""
    kind = closed_form(task)
    if kind:
        return "exact objective E_q[f] (during training)", "final E_q[f] (exact)"
    if kind is None:
        return "ELBO during training (evaluate(final=False))", "final ELBO (evaluate(final=True))"
    return metrics.get("elbo").label, metrics.get("final_elbo").title


#: metrics the harness records for every task (declared in estbench.core.metrics); any other metric is
#: a task's own final figure, declared or not (a plug-in task's)
HARNESS_METRICS = frozenset(metrics.names(source=metrics.HARNESS))


def task_figures(records: pd.DataFrame, level: float = 0.95) -> dict[str, pd.DataFrame]:
    """{task: table} of each task's own final figures (``Task.final_metrics``: test_iwae100,
    dev_accuracy, selection_rate, test_ppl_is, ...): one row per estimator with ``{metric}_mean``
    and ``{metric}_ci`` over seeds.  Tasks that record none are left out."""
    extra = records[~records.metric.isin(HARNESS_METRICS)]
    if extra.empty:
        return {}
    wide = (extra.sort_values("step").groupby(CELL_KEYS + ["metric"])["value"].last()
            .unstack("metric").reset_index())
    out = {}
    for task, df in wide.groupby("task", sort=True):
        metrics = sorted(m for m in wide.columns if m not in CELL_KEYS and df[m].notna().any())
        if metrics:
            out[task] = ci_frame(df, metrics, ["estimator"], level)
    return out


def figure_rows(t: pd.DataFrame, order: list[str]) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and rows of a ``task_figures`` table, estimators in ``order`` (the task table's)."""
    metrics = [c[: -len("_mean")] for c in t.columns if c.endswith("_mean")]
    t = t.set_index("estimator")
    est = [e for e in order if e in t.index] + sorted(set(t.index) - set(order))
    rows = [[(str(e), False)] + [(cell_text(t.at[e, f"{m}_mean"], t.at[e, f"{m}_ci"]), False)
                                 for m in metrics] for e in est]
    return ["estimator"] + metrics, rows


# ---- formatting ---------------------------------------------------------------------------------
def fmt_num(x: float, ci: float = math.nan) -> str:
    """A mean to the precision its confidence interval supports (two significant digits of the
    CI), or four significant digits without one; scientific notation for tiny/huge magnitudes."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "-inf" if x < 0 else "inf"
    ax = abs(x)
    if not math.isnan(ci) and ci > 1e-4 * ax:  # (a CI far below the last digit is ignored)
        if ci < 1e-5 or ax >= 1e6:
            return f"{x:.3g}"
        return f"{x:.{min(6, max(0, 1 - math.floor(math.log10(ci))))}f}"
    if ax != 0 and (ax < 1e-3 or ax >= 1e6):
        return f"{x:.3g}"
    return f"{x:.{max(0, min(6, 3 - (math.floor(math.log10(ax)) if ax > 0 else 0)))}f}"


def fmt_ci(ci: float, mean: float = math.nan) -> str:
    """A CI half-width to two significant digits, matching ``fmt_num``'s decimals."""
    if ci is None or math.isnan(ci):
        return ""
    if ci == 0:
        return "0"
    if ci < 1e-5 or ci >= 1e6 or (not math.isnan(mean) and abs(mean) >= 1e6):
        return f"{ci:.2g}"
    return f"{ci:.{min(6, max(0, 1 - math.floor(math.log10(ci))))}f}"


def cell_text(mean: float, ci: float, sep: str = " ± ") -> str:
    m = fmt_num(mean, ci)
    c = fmt_ci(ci, mean)
    return m + (sep + c if c else "")


def display_rows(t: pd.DataFrame, task: str | None = None
                 ) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and rows of (text, is_best) pairs of a task table, for md/html/LaTeX rendering.
    The final figure's header says what it is on ``task`` (``elbo_labels``)."""
    with_test = "bias_p" in t and t["bias_p"].notna().any()
    titles = {c.name: c.title for c in COLUMNS}
    if task is not None:
        titles["final_elbo"] = elbo_labels(task)[1]
    header = ["estimator"] + [titles[c.name] for c in COLUMNS] \
        + (["bias test"] if with_test else []) + ["seeds"]
    rows = []
    for _, r in t.iterrows():
        row = [(str(r.estimator), False)]
        for c in COLUMNS:
            mean, ci = r[f"{c.name}_mean"], r[f"{c.name}_ci"]
            if c.name == "n_evals" and mean == mean and float(mean).is_integer() \
                    and (ci != ci or ci == 0):
                text = str(int(mean))  # a budget, not a measurement
            else:
                text = cell_text(mean, ci)
            row.append((text, bool(r[f"{c.name}_best"])))
        if with_test:
            text = bias_test_text(r)
            row.append((text, False))
        seeds = f"{int(r.seeds)}"
        if r.diverged:
            seeds += f" ({int(r.diverged)} diverged)"
        row.append((seeds, False))
        rows.append(row)
    return header, rows


def bias_test_text(r) -> str:
    """The bias test's verdict on one row of a task table: 'biased (2/2 cells reject, p <0.001)',
    'not found biased (p 0.26)', or the p alone for a table made without the verdict."""
    verdict = r.get("bias_verdict") or ""
    if not verdict:
        return p_text(r.get("bias_p"))
    rejecting = r.get("bias_rejecting") or ""
    if verdict == "biased":
        return f"biased ({rejecting} cells reject, p {p_text(r.get('bias_p'))})"
    reject = f"{rejecting} cells reject, " if rejecting and not rejecting.startswith("0/") else ""
    return f"{verdict} ({reject}p {p_text(r.get('bias_p'))})"


#: how a reference row (an oracle) and the ranked estimator are marked beside their names
ORACLE_NOTE = "reference: oracle, outside the budget, not ranked"
RANKED_NOTE = "◀ ranked"


def matches(label: str, name: str | None) -> bool:
    """Whether a result label (``rloo``, ``rloo[k=2]``) is of the estimator ``name``."""
    return bool(name) and (label == name or str(label).split("[", 1)[0] == name)


def row_notes(t: pd.DataFrame, ranked: str | None = None) -> list[str]:
    """Per row of a task table, what is said beside the estimator's name: that it is an oracle's
    reference row, or the estimator being ranked (``estbench rank``'s meta.json ``ranked``)."""
    notes = []
    for _, r in t.iterrows():
        if bool(r.get("oracle", False)):
            notes.append(ORACLE_NOTE)
        elif matches(r.estimator, ranked):
            notes.append(RANKED_NOTE)
        else:
            notes.append("")
    return notes


def p_text(p) -> str:
    """A p-value as read in a table: two significant digits, '<0.001' below, '-' when absent."""
    if p is None or p != p:
        return "-"
    return "<0.001" if p < 1e-3 else f"{p:.2g}"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in s)


def to_latex(t: pd.DataFrame, task: str, ranked: str | None = None) -> str:
    """A booktabs LaTeX table (best per column in bold; an oracle's reference row and the ranked
    estimator marked beside their names), via DataFrame.to_latex."""
    header, rows = display_rows(t, task)
    notes = row_notes(t, ranked)
    body = []
    for row, note in zip(rows, notes):
        cells = [r"\texttt{" + tex_escape(row[0][0]) + "}"
                 + (" (" + tex_escape(note.replace(RANKED_NOTE, "ranked")) + ")" if note else "")]
        for (text, best), head in zip(row[1:-1], header[1:-1]):
            if text == "-":
                cells.append("--")
                continue
            if head == "bias test":  # a verdict in words, not a number
                cells.append(tex_escape(text).replace("<", "$<$"))
                continue
            s = text.replace(" ± ", r" \pm ").replace("inf", r"\infty")
            s = "$" + re.sub(r"e([+-]\d+)", lambda m: rf"\times 10^{{{int(m.group(1))}}}", s) + "$"
            cells.append(r"\textbf{" + s + "}" if best else s)
        cells.append(tex_escape(row[-1][0]))
        body.append(cells)
    df = pd.DataFrame(body, columns=[tex_escape(h) for h in header])
    return df.to_latex(index=False, escape=False, column_format="l" + "r" * (len(header) - 1),
                       caption=f"{tex_escape(task)}: mean and 95\\% CI over seeds; best per column "
                               f"in bold (reference rows and the bias column never).",
                       label=f"tab:{slug(task)}")


def to_csv_frame(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All task tables stacked, ``task`` first; ``*_ci`` are 95% CI half-widths."""
    frames = [t.assign(task=task) for task, t in tables.items()]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df[["task"] + [c for c in df.columns if c != "task"]]


def slug(name: str) -> str:
    """A file-name-safe form of a task or estimator label."""
    s = re.sub(r"[^A-Za-z0-9.=-]+", "_", name).strip("_")
    return s.replace("=", "-") or "x"
