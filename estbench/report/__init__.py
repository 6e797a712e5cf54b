"""Reports of a run folder: per-task tables with confidence intervals, the leaderboard, figures,
example rationales, report.md and a self-contained report.html (``estbench report RUN_DIR``).

Needs the ``report`` extra (matplotlib, seaborn, scipy, scikit-posthocs); imported lazily so that ``estbench run``
works without it.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["build_report"]


def build_report(run_dir, out_dir=None) -> Path:
    """Write the report of ``run_dir`` into ``out_dir`` (default ``run_dir/"report"``); returns
    the path of ``report.md``.  See estbench.report.render.build_report."""
    from estbench.report.render import build_report as _build
    return _build(run_dir, out_dir)
