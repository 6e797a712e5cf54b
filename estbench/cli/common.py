"""What the commands that run cells share: numbers from the command line, and running a plan into
a results folder with progress and one-line errors."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from estbench.core.errors import ConfigError, ResultsWriteError, UsageError, WorkerError
from estbench.engine import runs
from estbench.engine.progress import Progress


def positive(text: str, what: str, minimum: int = 1) -> int:
    try:
        v = int(text)
    except ValueError:
        raise UsageError(f"{what} must be an integer, got {text!r}") from None
    if v < minimum:
        raise UsageError(f"{what} must be >= {minimum}, got {v}")
    return v


def seconds_arg(text: str, what: str, zero: str = "") -> float:
    """A number of seconds given as ``what``: positive and finite, or also 0 where ``zero`` says
    what 0 means (``--cell-timeout``: no limit)."""
    try:
        v = float(text)
    except ValueError:
        raise UsageError(f"{what} must be a number of seconds, got {text!r}") from None
    if zero:
        if not (v >= 0 and v != float("inf")):
            raise UsageError(f"{what} must be >= 0 seconds (0: {zero}), got {text!r}")
    elif not (0 < v < float("inf")):
        raise UsageError(f"{what} must be a positive, finite number of seconds, got {text!r}")
    return v


def cell_timeout(text: Optional[str]) -> Optional[float]:
    """``--cell-timeout SECONDS`` (0: no limit); None: the budget's default."""
    return None if text is None else seconds_arg(text, "--cell-timeout", zero="no limit")


def execute(args, plan, out: Path, executor, meta: dict):
    """Run the plan into ``out`` (``runs.run_into``); returns (exit status or None, the plan's
    finished records, its status rows).  What stops a sweep is one line: a worker that died or a
    folder that stopped taking writes (exit 1), an interrupt (130); finished cells are kept."""
    err = sys.stderr
    progress = Progress(err, args.quiet, plan.cells, executor.n_jobs, where=out)
    try:
        outcome = runs.run_into(plan, out, meta, executor, force=args.force, progress=progress)
    except (WorkerError, ResultsWriteError) as e:
        print(f"estbench: error: {e}", file=err)
        return 1, None, None
    except KeyboardInterrupt:
        print(f"interrupted: finished cells are kept in {out}; rerun the same command to finish", file=err)
        return 130, None, None
    except ConfigError as e:  # raised once the backend starts (e.g. dask.distributed.Client)
        raise UsageError(str(e)) from None
    finally:
        progress.close()
    for line in outcome.notes:
        print(line, file=err)
    return None, outcome.records, outcome.cells
