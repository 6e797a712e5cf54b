"""``estbench snapshots`` and ``estbench probe``: gradient quality at shared parameters.

    estbench snapshots TASK --driver EST --out SET [--budget B] [--snapshots K | --at S,S,...]
                       [--seed N] [--dtype float32|float16] [--why TEXT]
    estbench snapshots --check SET          rebuild SET from its manifest; exit 1 if it differs
    estbench probe [SET ...] [--estimators ...] [-j N] [--out DIR]

A snapshot set holds a model's parameters at K points of one training trajectory (the driver's);
a probe measures every estimator at each of them (estbench.engine.snapshots, estbench.engine.probe).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from estbench.core.errors import (BudgetError, ConfigError, Diverged, OverBudgetError,
                                  SpecError, UsageError)
from estbench.core.spec import Spec, parse, parse_list

#: where ``estbench probe`` looks for snapshot sets when none is named
DEFAULT_SETS = Path("results") / "snapshots"


def _driver(task_text: str, driver_text: str, budget_name: str, overrides: dict):
    """The driver's task and estimator (display names) and its budget under ``budget_name``: the
    task's named budget, its published protocol's (``paper``: the protocol's task options and the
    estimator's tuned ones) or the source's own settings (``published``)."""
    from estbench.engine import protocols, sweep

    try:
        ts, es = parse(task_text), parse(driver_text)
        t_opts, e_opts = dict(ts.options), dict(es.options)
        if budget_name == protocols.PAPER:
            t_opts = protocols.task_options(ts.name, ts.options)
            e_opts = protocols.estimator_options(ts.name, es.name, es.options)
        elif budget_name == protocols.PUBLISHED:
            opts = protocols.published_options(ts.name, es.name, ts.options, es.options)
            if opts is None:
                raise UsageError(f"--budget published: the source of {ts.name}'s protocol did not "
                                 f"run {es.name!r}")
            t_opts, e_opts = opts
        task = sweep.check_spec("task", Spec(ts.name, t_opts, ts.text))
        est = sweep.check_spec("estimator", Spec(es.name, e_opts, es.text))
        if task.family not in est.families:
            raise UsageError(f"--driver {es.name!r} supports {sorted(est.families)}; task "
                             f"{ts.name!r} has {task.family!r} latents")
        budget = sweep.task_budget(task, budget_name, overrides)
    except UsageError:
        raise
    except ValueError as e:  # unknown names, bad options, a budget the task does not have
        raise UsageError(str(e)) from None
    return task.display_name, est.display_name, budget


def _count(text, flag: str, minimum: int) -> int:
    from estbench.cli.common import positive

    return positive(text, flag, minimum)


def cmd_snapshots(args) -> int:
    from estbench.engine import snapshots, store

    if args.check:
        if args.task or args.driver:
            raise UsageError("--check SET rebuilds a set from its own manifest: name no TASK or "
                             "--driver with it")
        s = snapshots.load(args.check)
        with tempfile.TemporaryDirectory(prefix="estbench-rebuild-") as tmp:
            if not args.quiet:
                print(f"rebuilding {s.label()} ...", file=sys.stderr)
            again = snapshots.rebuild(s, args.out or tmp)
            differ = snapshots.same_parameters(s, again)
        if differ:
            print(f"{args.check}: the rebuilt parameters differ at steps {differ} (made by code "
                  f"{s.manifest['code_version']}, rebuilt by {again.manifest['code_version']})")
            return 1
        print(f"{args.check}: rebuilt from its manifest, the same parameters at all "
              f"{len(s.steps)} snapshots")
        return 0
    if not args.task or not args.driver or not args.out:
        raise UsageError("snapshots: name the TASK, its --driver and the set's --out folder (or "
                         "--check SET)")
    overrides = {}
    if args.steps is not None:
        overrides["steps"] = _count(args.steps, "--steps", 0)
    task, driver, budget = _driver(args.task, args.driver, args.budget, overrides)
    if budget.timed:
        raise UsageError("a snapshot set's driver trains under a step budget, not a time budget")
    if args.at:
        try:
            steps = sorted({int(x) for x in args.at.split(",") if x.strip()})
        except ValueError:
            raise UsageError(f"--at must list steps, e.g. 0,500,1000; got {args.at!r}") from None
        if not steps or steps[0] < 0:
            raise UsageError(f"--at must list steps >= 0, got {args.at!r}")
    else:
        steps = snapshots.evenly(budget.steps, _count(args.snapshots, "--snapshots", 1))
    probe = {"n_samples": budget.n_samples, "measure_samples": budget.measure_samples}
    if args.n_samples is not None:
        probe["n_samples"] = _count(args.n_samples, "--n-samples", 1)
    if args.measure_samples is not None:
        probe["measure_samples"] = _count(args.measure_samples, "--measure-samples", 2)
    from estbench.engine.probe import FIGURES

    figures = {}
    for text in args.figure:
        name, _, count = text.partition("=")
        if name not in FIGURES:
            raise UsageError(f"--figure {text!r}: unknown figure {name!r} (known: {sorted(FIGURES)})")
        figures[name] = _count(count or "", "--figure " + name + "=ESTIMATES", 2)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if not args.quiet:
        print(f"training {driver} on {task} to step {steps[-1]}, saving the parameters at "
              f"{len(steps)} steps -> {out}", file=sys.stderr)
    started = time.perf_counter()
    try:
        s = snapshots.build(task, driver, args.seed, budget, steps, out, dtype=args.dtype,
                            device=args.device, probe=probe, why=args.why or "",
                            command=store.typed_command(["estbench", *args.argv]),
                            figures=figures, store_start=not args.rebuild_start)
    except BudgetError as e:  # checked before any training step
        raise UsageError(f"--driver {driver} cannot train {task} here: {e}") from None
    except (Diverged, OverBudgetError) as e:
        print(f"estbench: error: the driver's training stopped, no set written: {e}",
              file=sys.stderr)
        return 1
    mb = snapshots.size_bytes(s) / 2**20
    print(f"snapshot set {out}: {len(s.steps)} snapshots at steps {s.steps}, {mb:.2f} MiB "
          f"({args.dtype}), {time.perf_counter() - started:.0f} s")
    return 0


def cmd_probe(args) -> int:
    import estimators
    from estbench.analysis import probe as view
    from estbench.cli.common import cell_timeout, execute
    from estbench.engine import executors, probe, runs, snapshots, store

    sets = snapshots.find(args.sets or [DEFAULT_SETS]) if args.sets or DEFAULT_SETS.is_dir() \
        else None
    if not sets:
        raise UsageError(f"no snapshot set named and none at {DEFAULT_SETS}; build one with "
                         "'estbench snapshots TASK --driver EST --out DIR'")
    try:
        est_specs = (parse_list(args.estimators) if args.estimators is not None
                     else parse_list(",".join(estimators.available())))
    except SpecError as e:
        raise UsageError(str(e)) from None
    if not est_specs:
        raise UsageError("--estimators is empty: name at least one (leave it out for all)")
    devices = runs.DEVICES[args.device]
    try:
        executor = executors.from_args(args, None)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    try:
        plan = probe.plan(sets, est_specs, devices, timeout=cell_timeout(args.cell_timeout) or 0.0)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if plan.missing_devices and list(devices) == ["cuda"]:
        raise UsageError("--device cuda: CUDA is not available on this machine")
    if not plan.cells:
        raise UsageError("nothing to probe: no named estimator fits the sets' tasks")
    out = runs.check_out(args.out if args.out else runs.default_out("probe-"))
    if not args.quiet:
        print(f"probing {len(plan.cells)} cells ({len(sets)} snapshot sets, "
              f"{len({c.estimator for c in plan.cells})} estimator configurations) -> {out}",
              file=sys.stderr)
    meta = {**store.run_metadata(), "command": store.typed_command(["estbench", *args.argv]),
            "budget": "probe", "mode": probe.MODE,
            "snapshot_sets": [{"path": str(s.path), "hash": s.hash, "task": s.task,
                               "driver": s.driver, "seed": s.seed, "steps": s.steps}
                              for s in sets],
            "tasks": [s.task for s in sets], "estimators": [str(e) for e in est_specs],
            "seeds": sorted({s.seed for s in sets}), "devices": devices,
            "budgets": {c.task: c.budget.as_dict() for c in plan.cells}}
    args.force = getattr(args, "force", False)
    status, records, cells = execute(args, plan, out, executor, meta)
    if status is not None:
        return status
    t = view.table(records, cells)
    if args.json:
        print(t.to_json(orient="records"))
    else:
        print(view.render(t, cells), end="")
        print(f"results: {out / 'results.parquet'} (tidy records), {out / 'cells'} (one file per cell)")
    if cells.empty or not (cells.status == "ok").any():
        print("estbench: error: no probe cell finished; the reasons are listed above", file=sys.stderr)
        return 1
    return 1 if (cells.status == "failed").any() else 0


def add_parsers(subparsers) -> None:
    """Add the ``snapshots`` and ``probe`` subcommands."""
    from estbench.engine import executors, protocols

    s = subparsers.add_parser(
        "snapshots", help="train a driver once and save the parameters at K points: a snapshot "
                          "set, at which 'estbench probe' measures every estimator")
    s.add_argument("task", nargs="?", metavar="TASK", help="the task, with options")
    s.add_argument("--driver", help="the estimator that trains the trajectory, with options")
    s.add_argument("--out", help="the set's folder (with --check: where to rebuild; default a "
                                 "temporary one)")
    s.add_argument("--budget", default="quick",
                   choices=["quick", "standard", protocols.PAPER, protocols.PUBLISHED],
                   help="the driver's training budget: the task's named budget (default quick), "
                        "its published protocol (paper), or its source's own settings (published)")
    s.add_argument("--steps", help="train this many steps instead of the budget's")
    s.add_argument("--snapshots", default="5",
                   help="how many snapshots, evenly spaced from the start to the last step "
                        "(default 5)")
    s.add_argument("--at", help="the steps to save instead, comma-separated (0 is the start)")
    s.add_argument("--seed", type=int, default=0, help="the trajectory's seed (default 0)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="how the parameters are stored (float16 halves a large model's set)")
    s.add_argument("--n-samples", dest="n_samples",
                   help="f-evaluations per data point per estimate when probing (default the budget's)")
    s.add_argument("--measure-samples", dest="measure_samples",
                   help="estimates per measurement when probing (default the budget's)")
    s.add_argument("--figure", action="append", default=[], metavar="NAME=ESTIMATES",
                   help="a figure the probe records at each snapshot beside the measurement, as "
                        "its source defines it, from ESTIMATES estimates (repeatable; known: "
                        "cosine_of_mean, the ReinMax reproduction's cosine of the mean estimate)")
    s.add_argument("--rebuild-start", dest="rebuild_start", action="store_true",
                   help="do not store the start (step 0): rebuild it on loading from the task's "
                        "initialisation and the seed (its digest is checked): one snapshot less "
                        "on disk for a large model")
    s.add_argument("--device", default="cpu", help="where the driver trains (default cpu)")
    s.add_argument("--why", help="why this driver does not favour an estimator under test "
                                 "(kept in the manifest)")
    s.add_argument("--check", metavar="SET",
                   help="rebuild SET from its manifest and compare the parameters (exit 1 if they "
                        "differ)")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_snapshots)

    p = subparsers.add_parser(
        "probe", help="measure every estimator at the same parameters: the snapshots of a trained "
                      "model (no training); print gradient error, variance, cosine, SNR per task")
    p.add_argument("sets", nargs="*", metavar="SET",
                   help=f"snapshot sets, or folders of them (default {DEFAULT_SETS})")
    p.add_argument("--estimators", help="comma-separated estimators with options (default: all; "
                                        "named without options, those a task's protocol tunes)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    p.add_argument("--out", help="results folder (default results/runs/probe-<timestamp>)")
    p.add_argument("--cell-timeout", dest="cell_timeout", metavar="SECONDS",
                   help="stop a probe cell after this long and record it as failed (0 or default: "
                        "no limit)")
    p.add_argument("--force", action="store_true", help="recompute cells already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    executors.add_cli_arguments(p)
    p.set_defaults(func=cmd_probe)


def rank_probe(args, cls, task_specs, rivals, devices, executor, out: Path) -> int | None:
    """``estbench rank``'s first answer: the estimator and its rivals probed at the snapshot sets
    of the rank's tasks (``--snapshots``, default the shipped ``results/snapshots``), the rivals'
    cells reused from the shipped probe (``results/probe``) where their keys match, into
    ``OUT/probe``; then where it ranks at shared parameters.  Returns an exit status to stop
    with, or None to go on (to training); with no set for the tasks, a note (or, with
    ``--probe-only``, an error)."""
    from estbench.analysis import probe as view
    from estbench.analysis import rank
    from estbench.analysis.table import biased_set
    from estbench.engine import probe, snapshots, store

    chosen = args.snapshots
    if chosen is not None and chosen.strip().lower() == "none":
        if args.probe_only:
            raise UsageError("--probe-only with --snapshots none leaves nothing to do")
        return None
    where = Path(chosen) if chosen else rank.shipped_snapshots()
    if chosen and not where.is_dir():
        raise UsageError(f"--snapshots {where}: no such folder")
    names = {t.name for t in task_specs}
    sets = [s for s in (snapshots.find([where]) if where.is_dir() else [])
            if parse(s.task).name in names]
    if not sets:
        msg = (f"no snapshot set in {where} for {', '.join(sorted(names))}: no rank at shared "
               "parameters")
        if args.probe_only:
            raise UsageError(msg)
        if not args.quiet:
            print(f"note: {msg}", file=sys.stderr)
        return None
    from estbench.cli.common import cell_timeout, execute

    pout = out / "probe"
    timeout = cell_timeout(args.cell_timeout) or 0.0
    mine = probe.plan(sets, parse_list(cls.name), devices, timeout)
    theirs = probe.plan(sets, rivals, devices, timeout)
    if not mine.cells:
        return None
    reference = rank.shipped_probe()
    reused = rank.reuse_cells(theirs, reference, pout) if reference.is_dir() else 0
    if not args.quiet:
        print(f"probing {cls.name} at {len(sets)} snapshot sets ({', '.join(s.task for s in sets)})"
              f" against {len({c.estimator for c in theirs.cells})} rivals, {reused} of their "
              f"{len(theirs.cells)} cells reused from {reference} -> {pout}", file=sys.stderr)
    meta = {**store.run_metadata(), "command": store.typed_command(["estbench", *args.argv]),
            "budget": "probe", "mode": probe.MODE, "ranked": cls.name,
            "snapshot_sets": [{"path": str(s.path), "hash": s.hash, "task": s.task,
                               "driver": s.driver, "seed": s.seed, "steps": s.steps} for s in sets],
            "tasks": [s.task for s in sets], "devices": list(devices)}
    status, _, mine_cells = execute(args, mine, pout, executor, meta)
    if status is not None:
        return status
    if mine_cells.empty or not (mine_cells.status == "ok").any():
        print(f"{cls.name} finished no probe cell, so it has no rank at shared parameters:")
        for _, r in mine_cells[mine_cells.status != "ok"].iterrows():
            print(f"  {r.task}: {'not run' if r.status == 'infeasible' else r.status}: {r.error}")
        return 1
    status, _, _ = execute(args, theirs, pout, executor, meta)
    if status is not None:
        return status
    records, cells = store.load(pout)
    keys = {c.key() for c in [*mine.cells, *theirs.cells]}
    cells = cells[cells.key.isin(keys)]
    records = store.finished(records, cells)
    biased = frozenset(t for t, e in biased_set(view.per_snapshot(records)) if e == cls.name)
    print("at shared parameters (every estimator measured at the same snapshots of trained "
          "models, no training):")
    print(rank.render_placement(cls.name, view.board(records), None, biased,
                                placed=rank.PROBE_PLACED, blocks="snapshots"), end="")
    return 0 if args.probe_only else None
