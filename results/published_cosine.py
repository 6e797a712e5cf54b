"""The ReinMax reproduction's gradient cosine at 8x4, ours beside the published (README table).

    python results/published_cosine.py            print the table (markdown)

Ours: ``results/paper/reinmax_cosine_8x4/probe`` (made by results/make_reinmax_cosine.sh), the
``cosine_of_mean`` figure of each method at the snapshots after epochs 1, 5 and 10 of one ReinMax
trajectory (seed 0).  Published: ``tasks/data/published/reinmax_cosine_8x4.csv``, the same figure
at the same epochs of the source's 10 seeds (source and computation: tasks/data/SOURCES.md).  The
source's method names are those the categorical_vae protocol maps to ours (its as-published
``per_method``).

Ours is one trajectory, so it is held against the spread of the source's seeds, not against the
standard error of their mean: z = (ours - published mean) / (s.d. of the seeds * sqrt(1 + 1/n)),
the standardised distance of one new draw from n earlier ones; |z| < 2 reads "within the seeds'
spread".  The README holds this output between its markers; tests/test_readme.py checks it.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
from published_table import between  # results/, beside this script (on the path as a script runs)

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path("results/paper/reinmax_cosine_8x4/probe")
PUBLISHED = Path("tasks/data/published/reinmax_cosine_8x4.csv")
#: updates an epoch in the source (60,000 images in batches of 100)
STEPS_PER_EPOCH = 600
#: the README's lines around the table
BEGIN, END = "<!-- published-cosine: begin -->", "<!-- published-cosine: end -->"


def source_names() -> dict[str, str]:
    """Our estimator name -> the source's method name (the protocol's as-published mapping)."""
    from estbench.engine import protocols

    return {est: m.source_name for est, m in protocols.as_published("categorical_vae").per_method.items()}


def comparison(root: Path = ROOT) -> pd.DataFrame:
    """One row per (method, epoch) that both sides have: ours, the published mean, its s.e., the
    seeds' s.d. and count, the difference and z."""
    from estbench.core.spec import parse

    ours = pd.read_parquet(root / PROBE / "results.parquet")
    ours = ours[ours.metric == "cosine_of_mean"].copy()
    names = source_names()
    ours["method"] = ours.estimator.map(lambda e: names.get(parse(e).name))
    ours["epoch"] = ours.step // STEPS_PER_EPOCH
    pub = pd.read_csv(root / PUBLISHED)
    stats = pub.groupby(["method", "epoch"]).cosine.agg(["mean", "std", "count"]).reset_index()
    t = ours[["method", "estimator", "epoch", "step", "value"]].merge(stats, on=["method", "epoch"])
    t = t.rename(columns={"value": "ours", "mean": "published", "std": "sd", "count": "n"})
    t["se"] = t.sd / t.n.pow(0.5)
    t["difference"] = t.ours - t.published
    t["z"] = t.difference / (t.sd * (1 + 1 / t.n).pow(0.5))
    return t.sort_values(["epoch", "published"], ascending=[True, False]).reset_index(drop=True)


def _f(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.3f}"


def table(root: Path = ROOT) -> str:
    t = comparison(root)
    rows = ["| epoch (updates) | method (source's name) | ours | published (± s.e., seeds) | "
            "seeds' s.d. | ours − published | z | verdict |",
            "|---:|:---|---:|---:|---:|---:|---:|:---|"]
    for _, r in t.iterrows():
        verdict = "within the seeds' spread" if abs(r.z) < 2 else (
            "above the seeds' spread" if r.z > 0 else "below the seeds' spread")
        rows.append(f"| {r.epoch} ({r.step:,}) | `{r.estimator}` ({r.method}) | {_f(r.ours)} | "
                    f"{_f(r.published)} ± {_f(r.se)} ({r.n}) | {_f(r.sd)} | "
                    f"{r.difference:+.3f} | {r.z:+.1f} | {verdict} |")
    return "\n".join(rows)


def readme_block(readme: str) -> str:
    """The table as the README holds it (between the markers)."""
    return between(readme, BEGIN, END)


if __name__ == "__main__":
    if not (ROOT / PROBE / "results.parquet").is_file():
        print(f"no probe at {PROBE}: run bash results/make_reinmax_cosine.sh", file=sys.stderr)
        sys.exit(2)
    print(table())
    sys.exit(0)
