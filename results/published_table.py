"""The README's table of ours beside the published figures, derived from the committed result sets.

    python results/published_table.py            print the table (markdown)

It reads every ``results/*/*/report/against_published.csv`` (written by ``estbench report`` for a
set run as published, ``estbench run --budget published``) and prints one row per method and
figure: ours (mean, 95% CI, seeds), the source's (mean +- s.e., seeds, or its one run), the
verdict.  The README holds this output between its markers; tests/test_readme.py checks that it
is still what the committed sets say.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
#: the README's lines around the table
BEGIN, END = "<!-- published-table: begin -->", "<!-- published-table: end -->"


def _num(x: float, like: float) -> str:
    from estbench.engine.protocols import figure_format

    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    return format(x, figure_format(like))


def table(root: Path = ROOT) -> str:
    rows = ["| set | method (source's name) | figure | ours (95% CI, seeds) | published | verdict |",
            "|:---|:---|:---|---:|---:|:---|"]
    for csv in sorted(root.glob("results/*/*/report/against_published.csv")):
        t = pd.read_csv(csv)
        t = t[t.verdict != "not comparable"]
        set_name = csv.parent.parent.relative_to(root / "results").as_posix()
        for _, r in t.sort_values(["figure", "published_mean"]).iterrows():
            like = r.published_mean
            pub = (f"{_num(r.published_mean, like)} ± {_num(r.published_se, like)} ({r.published_n})"
                   if r.published_n > 1 else f"{_num(r.published_mean, like)} (one run)")
            rows.append(f"| `{set_name}` | `{r.estimator}` ({r.source_name}) | {r.label} | "
                        f"{_num(r.ours_mean, like)} ± {_num(r.ours_ci, like)} ({r.ours_n}) | "
                        f"{pub} | {r.verdict} |")
    return "\n".join(rows)


def between(text: str, begin: str, end: str) -> str:
    """What ``text`` holds between two marker lines: a derived block of the README, which a test
    compares with what its script prints (this one's and the other results/ scripts')."""
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def readme_block(readme: str) -> str:
    """The table as the README holds it (between the markers)."""
    return between(readme, BEGIN, END)


if __name__ == "__main__":
    print(table())
    sys.exit(0)
