"""The shared-parameter view: a probe's records (every estimator measured at the same snapshots of
a trained model, ``estbench probe``) as one table per task.

Per (task, device, estimator), over the set's snapshots: the gradient error, variance and
signal-to-noise ratio as geometric means (they spread over decades; a mean of log10s), the cosine
as a plain mean, the bias test's verdict (Bonferroni over the snapshots: *biased* when
min(1, K min p) < ``BIAS_TEST_ALPHA``), the time per estimate and the f-evaluations of one estimate
as the harness counted them.  Rows are sorted by gradient error, best first; an oracle (``exact``)
is a reference line, not a competitor.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from estbench.analysis.table import BIAS_TEST_ALPHA, _oracle
from estbench.core.records import SETTING_KEYS

#: the table's columns after the estimator: (name, header, width, format)
COLUMNS = (("grad_error", "grad error", 11, ".3g"), ("variance", "variance", 10, ".3g"),
           ("cosine", "cosine", 7, ".3f"), ("snr", "SNR", 8, ".3g"), ("bias", "bias test", 10, ""),
           ("estimate_ms", "ms/est", 8, ".3g"), ("n_evals", "f-evals", 7, ".0f"),
           ("options", "options", 9, ""))


def _geomean(v: pd.Series) -> float:
    v = v.to_numpy(float)
    if np.any(v == 0):
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(10 ** np.nanmean(np.log10(v)))


def table(records: pd.DataFrame, cells: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (task, device, estimator) of a probe's records: the figures above, ``snapshots``
    (how many) and ``options`` (where the estimator's options came from: default, protocol,
    given)."""
    cols = [*SETTING_KEYS, "snapshots", *(c[0] for c in COLUMNS)]
    if records.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for key, df in records.groupby(SETTING_KEYS, sort=True):
        at = df.pivot_table(index="step", columns="metric", values="value", aggfunc="mean")

        def col(name):
            return at[name] if name in at else pd.Series(dtype=float)

        p = col("bias_p").dropna()
        biased = (min(1.0, float(p.min()) * len(p)) < BIAS_TEST_ALPHA) if len(p) else None
        ends = df[df.metric == "n_evals"]["value"]
        rows.append({**dict(zip(SETTING_KEYS, key)), "snapshots": int(col("grad_error").notna().sum()),
                     "grad_error": _geomean(col("grad_error")), "variance": _geomean(col("variance")),
                     "cosine": float(col("cosine").mean()), "snr": _geomean(col("snr")),
                     "bias": {True: "biased", False: "ok", None: "-"}[biased],
                     "estimate_ms": float(col("estimate_time").median()) * 1e3,
                     "n_evals": float(ends.max()) if len(ends) else math.nan,
                     "options": _options(cells, key)})
    return pd.DataFrame(rows, columns=cols)


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
                     "the snapshots, cosine: mean; bias test: Bonferroni over the snapshots at "
                     f"{BIAS_TEST_ALPHA:g}; ms/est: median seconds per estimate (batched); "
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
