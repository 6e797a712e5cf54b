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
    from estbench import store, table

    records, cells = store.load(run_dir)
    return (table.finished(records, cells) if finished_only else records), cells


def summary(records, cells=None):
    """One row per task x estimator x device: means over seeds of the final ELBO, bias, variance,
    cosine, step time and f-evaluations, from finished cells only when ``cells`` is given."""
    from estbench import table

    return table.summary(table.finished(records, cells) if cells is not None else records)


def run(tasks=None, estimators=None, seeds=(0, 1, 2), out="results/runs/python", budget="quick",
        device="cpu", jobs=None, force=False, progress=False, **overrides):
    """Run a sweep as ``estbench run`` does and return its ``(records, cells)`` (finished cells'
    records only).  ``tasks`` / ``estimators``: comma-separated names with options, or lists of
    them (default: the toys, every estimator); ``overrides``: any ``Budget`` field (``steps``,
    ``n_samples``, ``checkpoints``, ``measure_samples``, ``eval_points``; ``train_seconds`` for a
    time budget, with ``steps=0`` for no step cap)."""
    import sys
    from pathlib import Path

    import estimators as est_registry
    from estbench import executors, store, sweep, table
    from estbench.cli import Progress, default_tasks
    from estbench.spec import parse_list

    def specs(value, default):
        if value is None:
            value = default
        if not isinstance(value, str):
            value = ",".join(value)
        return parse_list(value)

    plan = sweep.expand(specs(tasks, default_tasks()), specs(estimators, est_registry.available()),
                        list(seeds), [device], budget, overrides)
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
