"""The shared-parameter view: a probe's records (every estimator measured at the same snapshots of
a trained model, ``estbench probe``) as one table per task.

Per (task, device, estimator), over the set's snapshots: the gradient error, variance and
signal-to-noise ratio as geometric means (they spread over decades; a mean of log10s), the cosine
as a plain mean, the bias test's verdict (the leaderboard's rule, each snapshot a block: *biased*
when more than half of the snapshots reject at ``BIAS_TEST_ALPHA``), the median time per estimate
and the f-evaluations of one estimate as the harness counted them.  Rows are sorted by gradient error, best first; an oracle (``exact``)
is a reference line, not a competitor.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from estbench.analysis import figures
from estbench.analysis import leaderboard as lb
from estbench.analysis.table import BIAS_TEST_ALPHA, _oracle, estimator_bias
from estbench.core.records import SETTING_KEYS

#: the table's columns after the estimator: (name, header, width, format)
COLUMNS = (("grad_error", "grad error", 11, ".3g"), ("variance", "variance", 10, ".3g"),
           ("cosine", "cosine", 7, ".3f"), ("cosine_of_mean", "cos(mean)", 9, ".3f"),
           ("snr", "SNR", 8, ".3g"), ("bias", "bias test", 10, ""),
           ("estimate_ms", "ms/est", 8, ".3g"), ("n_evals", "f-evals", 7, ".0f"),
           ("options", "options", 9, ""))


def per_snapshot(records: pd.DataFrame) -> pd.DataFrame:
    """The per-cell figures of :func:`estbench.analysis.figures.per_cell`, one row per (task,
    estimator, device, snapshot): each snapshot a block of the leaderboard's paired design, in the
    ``seed`` column (its training step), as the seeds are for training cells.  So the ranks, ties,
    the bias verdict (more than half of the blocks reject) and the stability bootstrap are the
    leaderboard's own rules, over snapshots.  The estimate's f-evaluations (recorded once per
    probe cell) stand at every snapshot."""
    if records.empty:
        return figures.per_cell(records)
    evals = records[records.metric == "n_evals"]
    rest = records[records.metric != "n_evals"]
    steps = rest[["task", "estimator", "device", "step"]].drop_duplicates()
    spread = evals.drop(columns="step").merge(steps, on=["task", "estimator", "device"])
    blocks = pd.concat([rest, spread[records.columns]], ignore_index=True)
    return figures.per_cell(blocks.assign(seed=blocks.step))


def board(records: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard at shared parameters: per task, estimators ranked with ties by the
    gradient-quality criteria (gradient error; variance and error x f-evaluations among estimators
    the bias test does not find biased), snapshots as the paired blocks."""
    return lb.leaderboard(per_snapshot(records))


def stability(records: pd.DataFrame) -> pd.DataFrame:
    """How each task's order at shared parameters survives resampling the snapshots."""
    return lb.stability(per_snapshot(records))


def table(records: pd.DataFrame, cells: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (task, device, estimator) of a probe's records: the figures above, ``snapshots``
    (how many) and ``options`` (where the estimator's options came from: default, protocol,
    given)."""
    cols = [*SETTING_KEYS, "snapshots", *(c[0] for c in COLUMNS)]
    if records.empty:
        return pd.DataFrame(columns=cols)
    pss = per_snapshot(records)
    verdict = estimator_bias(pss)
    rows = []
    for key, df in pss.groupby(SETTING_KEYS, sort=True):
        at = records
        for c, v in zip(SETTING_KEYS, key):
            at = at[at[c] == v]
        seconds = at[at.metric == "estimate_time"]["value"]
        task, est = key[SETTING_KEYS.index("task")], key[SETTING_KEYS.index("estimator")]
        biased = verdict["biased"].get((task, est)) if not verdict.empty else None
        rows.append({**dict(zip(SETTING_KEYS, key)), "snapshots": int(df.grad_error.notna().sum()),
                     "grad_error": _geomean(df.grad_error), "variance": _geomean(df.variance),
                     "cosine": float(df.cosine.mean()),
                     "cosine_of_mean": float(at[at.metric == "cosine_of_mean"]["value"].mean()),
                     "snr": _geomean(at[at.metric == "snr"]["value"]),
                     "bias": {True: "biased", False: "ok"}.get(
                         bool(biased) if biased is not None else None, "-"),
                     "estimate_ms": float(seconds.median()) * 1e3 if len(seconds) else math.nan,
                     "n_evals": float(df.n_evals.max()),
                     "options": _options(cells, key)})
    return pd.DataFrame(rows, columns=cols)


def _geomean(v: pd.Series) -> float:
    v = v.to_numpy(float)
    if np.any(v == 0):
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(10 ** np.nanmean(np.log10(v)))


def _options(cells: pd.DataFrame | None, key) -> str:
    if cells is None or cells.empty or "artifacts" not in cells:
        return "-"
    match = cells
    for c, v in zip(SETTING_KEYS, key):
        match = match[match[c] == v]
    for a in match["artifacts"]:
        if isinstance(a, dict) and a.get("options"):
            return str(a["options"])
    return "-"


def render(t: pd.DataFrame, cells: pd.DataFrame | None = None) -> str:
    """Fixed-width text, one block per (task, device), best gradient error first; the cells that
    did not finish listed under it with their reasons."""
    lines = []
    if t.empty:
        lines.append("(no finished probe cell: nothing to tabulate)")
    header = f"{'estimator':<34} " + "".join(f"{h:>{w}} " for _, h, w, _ in COLUMNS)
    for (task, device), df in t.groupby(["task", "device"], sort=True):
        n = int(df.snapshots.max()) if len(df) else 0
        lines.append(f"== {task} [{device}] at {n} shared snapshots ==")
        lines.append(header)
        df = df.assign(_oracle=[_oracle(e) for e in df.estimator])
        for _, r in df.sort_values(["_oracle", "grad_error"], na_position="last").iterrows():
            text = []
            for name, _, w, spec in COLUMNS:
                v = r[name]
                if isinstance(v, float) and math.isnan(v):
                    s = "-"
                else:
                    s = format(v, spec) if spec else str(v)
                text.append(f"{s:>{w}} ")
            label = r.estimator + (" (oracle)" if r._oracle else "")
            lines.append(f"{label:<34} " + "".join(text))
        lines.append("")
    if not t.empty:
        lines.append("at every snapshot each estimator sees the same parameters, measurement batch "
                     "and reference gradient; grad error, variance and SNR: geometric means over "
                     "the snapshots, cosine: mean; cos(mean): the cosine of the mean of many "
                     "estimates to the exact gradient w.r.t. the logits, where the set asks for it "
                     "(the ReinMax reproduction's figure); bias test: biased when more than half of the "
                     f"snapshots reject at {BIAS_TEST_ALPHA:g}; ms/est: median seconds per estimate (batched); "
                     "options: the estimator's defaults, its protocol's tuned ones, or given")
        lines.append("")
    if cells is not None and not cells.empty:
        bad = cells[cells.status != "ok"]
        if len(bad):
            lines.append("did not finish:")
            for _, r in bad.drop_duplicates(["task", "estimator", "error"]).iterrows():
                what = "not run" if r.status == "infeasible" else r.status
                lines.append(f"  {r.task} x {r.estimator}: {what}: {r.error}")
    return "\n".join(lines).rstrip() + "\n"
