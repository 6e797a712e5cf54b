"""estbench: a benchmark harness for gradient estimators of latent-variable models.

The harness knows estimators and tasks only through their registries (``estimators``, ``tasks``).

From Python (a notebook, a script)::

    import estbench
    records, cells = estbench.load("results/reference")   # tidy records, one status row per cell
    estbench.summary(records, cells)                       # one row per task x estimator (finished cells)
    records, cells = estbench.run(tasks="toy_binary", estimators="rloo,disarm", seeds=[0, 1],
                                  out="results/mine", steps=200)

The heavy modules are imported on first use, so ``import estbench`` stays light.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "load", "summary", "run"]


def load(run_dir, finished_only: bool = False):
    """A results folder as ``(records, cells)``: the tidy long records (columns ``task, estimator,
    seed, device, n_samples, steps, step, metric, value``) and one status row per cell (status,
    error, seconds, environment, ...).  ``finished_only`` keeps the records of finished cells only,
    as every table and ranking does."""
    from estbench.engine import store
    from estbench.analysis import table

    records, cells = store.load(run_dir)
    return (table.finished(records, cells) if finished_only else records), cells


def summary(records, cells=None):
    """One row per task x estimator x device: means over seeds of the final ELBO, bias, variance,
    cosine, step time and f-evaluations, from finished cells only when ``cells`` is given."""
    from estbench.analysis import table

    return table.summary(table.finished(records, cells) if cells is not None else records)


def run(tasks=None, estimators=None, seeds=(0, 1, 2), out="results/runs/python", budget="quick",
        device="cpu", jobs=None, force=False, progress=False, **overrides):
    """Run a sweep as ``estbench run`` does and return its ``(records, cells)`` (finished cells'
    records only).  ``tasks`` / ``estimators``: comma-separated names with options, or lists of
    them (default: the toys, every estimator); ``overrides``: any ``Budget`` field (``steps``,
    ``n_samples``, ``checkpoints``, ``measure_samples``, ``eval_points``; ``train_seconds`` for a
    time budget, with ``steps=0`` for no step cap).  ``seeds``: an int, a list of ints, or a
    string as ``--seeds`` takes it (``"0,1,2"``, ``"0-4"``); bad seeds raise OptionError."""
    import sys
    from pathlib import Path

    import estimators as est_registry
    from estbench.engine import executors, store, sweep
    from estbench.analysis import table
    from estbench.cli.commands import Progress, default_tasks
    from estbench.core.spec import parse_list

    def specs(value, default):
        if value is None:
            value = default
        if not isinstance(value, str):
            value = ",".join(value)
        return parse_list(value)

    plan = sweep.expand(specs(tasks, default_tasks()), specs(estimators, est_registry.available()),
                        _seeds(seeds), [device], budget, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    executor = executors.make_executor(jobs)
    shown = Progress(sys.stderr, not progress, plan.cells, executor.n_jobs, where=out)
    try:
        sweep.run(plan, out, force=force, executor=executor, progress=shown)
    finally:
        shown.close()
    store.write_merged(out)
    records, cells = store.load(out)
    keys = {c.key() for c in plan.cells}
    cells = cells[cells.key.isin(keys)].reset_index(drop=True) if not cells.empty else cells
    return table.finished(records, cells), cells


def _seeds(seeds) -> list:
    """``run``'s seeds as the command line's ``--seeds`` parses them (estbench.cli.commands.parse_seeds: the
    same ranges, bounds and duplicate check): a string as it is, an int or a list of ints as their
    comma-separated text.  Anything else, or a seed out of range, raises OptionError."""
    import operator

    from estbench.cli.commands import parse_seeds
    from estbench.core.errors import OptionError, UsageError

    def whole(v):
        if isinstance(v, bool):
            raise TypeError
        return operator.index(v)  # ints (numpy's too); never 1.5 or "1"

    try:
        if isinstance(seeds, str):
            text = seeds
        elif isinstance(seeds, bytes):
            raise TypeError
        else:
            try:
                values = [whole(seeds)]
            except TypeError:
                values = [whole(v) for v in seeds]
            if not values:
                raise OptionError("seeds is empty: give at least one")
            text = ",".join(map(str, values))
    except TypeError:
        raise OptionError(f"seeds must be an int, a list of ints or a string such as '0,1,2' or "
                          f"'0-4', got {seeds!r}") from None
    try:
        return parse_seeds(text, "seeds")
    except UsageError as e:
        raise OptionError(str(e)) from None
