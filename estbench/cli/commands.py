"""The ``estbench`` command line.

    estbench run  [--tasks ...] [--estimators ...] [--seeds 0,1,2] [--device cpu|cuda|all]
                  [--steps N] [--n-samples N] [--out DIR]
    estbench list
    estbench snapshots TASK --driver EST --out SET     estbench probe [SET ...]

Lists are comma-separated; options go in the name, ``gumbel_softmax[temperature=0.5]``.
Bad input gets one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import estimators
import tasks
from estbench.engine import executors, protocols, runs, store, sweep
from estbench.analysis import table
from estbench.core.budget import Budget
from estbench.cli.common import cell_timeout, execute, positive, seconds_arg
from estbench.cli.probe import add_parsers as add_probe_parsers, rank_probe
from estbench.cli.report import add_parsers
from estbench.core.errors import ConfigError, RankError, SpecError, UsageError
from estbench.core.spec import parse_list, parse_seeds

DEFAULTS = Budget()
DEFAULT_SEEDS = "0,1,2"

def _common(args):
    """Seeds, devices, executor and budget overrides shared by ``run`` and ``rank``."""
    threads = positive(args.threads, "--threads") if args.threads is not None else None
    seeds = parse_seeds(args.seeds)
    devices = runs.DEVICES[args.device]
    try:
        executor = executors.from_args(args, threads)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    overrides = {}
    for key, flag, minimum in [("steps", "--steps", 0), ("n_samples", "--n-samples", 1),
                               ("checkpoints", "--checkpoints", 0),
                               ("measure_samples", "--measure-samples", 2),
                               ("eval_points", "--eval-points", 0)]:
        value = getattr(args, key)
        if value is not None:
            overrides[key] = positive(value, flag, minimum)
    if args.seconds is not None:
        overrides["train_seconds"] = seconds_arg(args.seconds, "--seconds")
    return seeds, devices, executor, overrides


def _selection(text: str, flag: str):
    """A comma-separated list of names given on the command line; an empty one is an error (not
    'everything': leave the flag out for that)."""
    if not text.strip():
        raise UsageError(f"{flag} is empty: name at least one (leave {flag} out for the default)")
    return parse_list(text)


def _plan(args, task_specs, est_specs, seeds, devices, overrides, show_skipped: bool):
    """The plan of a selection (``runs.plan``), its notes on stderr."""
    planned = runs.plan(task_specs, est_specs, seeds, devices, args.budget, overrides,
                        timeout=cell_timeout(args.cell_timeout),
                        list_skipped=show_skipped and not args.quiet)
    for line in planned.notes:
        print(line, file=sys.stderr)
    return planned.plan


def cmd_run(args) -> int:
    started = time.time()  # a stored cell that finished before this was reused, not computed now
    try:
        task_specs, est_specs = runs.select(args.tasks, args.estimators, args.budget,
                                            names=("--tasks", "--estimators"))
    except SpecError as e:  # ProtocolError too: a protocol file that does not load
        raise UsageError(str(e)) from None
    seeds, devices, executor, overrides = _common(args)
    out = runs.check_out(args.out if args.out else runs.default_out())
    plan = _plan(args, task_specs, est_specs, seeds, devices, overrides,
                 show_skipped=bool(args.estimators and args.tasks))
    if not args.quiet:
        print(f"running {len(plan.cells)} cells ({len(task_specs)} tasks x {len(est_specs)} estimators"
              f" x {len(seeds)} seeds, budget {args.budget!r}"
              + "".join(f", {k}={v}" for k, v in overrides.items()) + f") -> {out}", file=sys.stderr)
    # the command line names the sweep file only: what it held is kept beside it
    config = ({"config": {"path": args.config, "options": args.config_options}}
              if getattr(args, "config", None) else {})
    meta = runs.sweep_meta(plan, args.budget, task_specs, est_specs, seeds, devices,
                           command=store.typed_command(["estbench", *args.argv]), extra=config)
    status, keep, cells = execute(args, plan, out, executor, meta)
    if status is not None:
        return status
    summ = table.summary(keep)
    if args.json:
        print(summ.to_json(orient="records"))
    else:
        print(table.render(summ, cells, _final_elbo_ranks(keep)))
        print(f"results: {out / 'results.parquet'} (tidy records), {out / 'cells'} (one file per cell)")
    return _run_status(cells, out, started)


def _final_elbo_ranks(records):
    """The leaderboard's per-task ranks by final ELBO (ties and intervals) for the CLI table, or
    None without the report extra (scipy)."""
    try:
        from estbench.analysis import leaderboard as lb
        from estbench.analysis import figures
    except ImportError:
        return None
    if records.empty:
        return None
    board = lb.leaderboard(figures.per_cell(records))
    return board[(board.criterion == "final_elbo") & (board.task != "overall")]


def _run_status(cells, out: Path, started: float) -> int:
    """``estbench run``'s exit status: 1 when a cell failed or when no cell finished (every one
    failed, diverged or could not run), else 0.  Cells that failed in an earlier run and were
    reused as stored are said to be so (they are listed with their reasons under the table)."""
    err = sys.stderr
    if cells.empty:
        print("estbench: error: no cell of the plan is stored", file=err)
        return 1
    failed = cells[cells.status == "failed"]
    reused = failed[failed.finished < started] if "finished" in failed else failed.iloc[0:0]
    if len(reused):
        print(f"note: {len(reused)} failed cell{'s' if len(reused) != 1 else ''} in {out} "
              "failed in an earlier run and were reused as stored, not retried (listed above with "
              "their reasons); --force recomputes every cell", file=err)
    if not (cells.status == "ok").any():
        counts = ", ".join(f"{n} {s if s != 'infeasible' else 'not run'}"
                           for s, n in cells.status.value_counts().sort_index().items())
        print(f"estbench: error: no cell finished ({counts}); the reasons are listed above",
              file=err)
        return 1
    return 0 if failed.empty else 1


def _rank_target(args):
    """The estimator to rank, loaded and checked against the contract before any cell runs, and
    the reference set; the seeds and budget default to the reference's."""
    from estbench.analysis import rank

    try:  # before any cell runs: ranking without the statistics would waste them
        import estbench.report.render  # noqa: F401
    except ImportError as e:
        raise UsageError(f"rank needs the report extra ({e.name} is missing): "
                         "pip install 'estbench[report]'") from None
    try:
        reference = rank.resolve_reference(args.reference)
        cls = rank.load_target(args.target)
        if not args.quiet:
            print(f"checking {cls.name!r} against the estimator contract ...", file=sys.stderr)
        rank.check_target(cls)
    except RankError as e:
        raise UsageError(str(e)) from None
    previous = store.read_meta(reference) if reference is not None else {}
    if args.seeds is None:
        args.seeds = ",".join(str(s) for s in previous.get("seeds", [])) or DEFAULT_SEEDS
    if args.budget is None:
        named = ("quick", "standard", protocols.PAPER)
        args.budget = previous.get("budget") if previous.get("budget") in named else "quick"
    return cls, reference


def _rank_field(args, cls):
    """The tasks the estimator is ranked on (every task of a family it supports, with a published
    protocol for the paper budget) and its rivals (every other estimator that fits them)."""
    from estbench.analysis import rank

    try:
        if args.tasks is not None:
            task_specs = _selection(args.tasks, "--tasks")
        else:
            compatible = rank.compatible_tasks(cls)
            if args.budget == protocols.PAPER:  # the tasks that follow a published protocol
                compatible = [t for t in compatible if t in protocols.available()]
            task_specs = parse_list(",".join(compatible))
        rivals = (_selection(args.estimators, "--estimators") if args.estimators is not None
                  else None)
    except SpecError as e:
        raise UsageError(str(e)) from None
    if not task_specs:
        raise UsageError(f"no registered task has a latent family {cls.name!r} supports "
                         f"({', '.join(sorted(cls.families))})"
                         + (" and a published protocol" if args.budget == protocols.PAPER else ""))
    families = {tasks.get_class(t.name).family for t in task_specs}
    if rivals is None:
        rivals = parse_list(",".join(n for n in estimators.available() if n != cls.name
                                     and families & estimators.get_class(n).families))
    elif any(r.name == cls.name for r in rivals):
        raise UsageError(f"--estimators names {cls.name!r}, the estimator being ranked: list its "
                         "rivals only")
    return task_specs, rivals


def _print_placement(args, cls, out: Path, planned_cells: list) -> int:
    """Where the estimator ranks among its rivals, from the folder's records of the planned cells,
    its own problem cells listed; the report unless --no-report."""
    from estbench.analysis import figures, rank
    from estbench.analysis import leaderboard as lb

    records, cells = store.load(out)
    keys = {c.key() for c in planned_cells}
    cells = cells[cells.key.isin(keys)] if not cells.empty else cells
    pc = figures.per_cell(store.finished(records, cells))
    board = lb.leaderboard(pc)
    biased = frozenset(t for t, e in table.biased_set(pc) if e == cls.name)
    print(rank.render_placement(cls.name, board, rank.timing_difference(cells, cls.name), biased),
          end="")
    _print_problems(cells[cells.estimator == cls.name])
    if not args.no_report:
        print(f"report: {_rank_report(out)}")
    return 0


def _print_problems(cells) -> None:
    bad = cells[cells.status != "ok"]
    for _, r in bad.drop_duplicates(["task", "status", "error"]).iterrows():
        print(f"  {r.task}: {'not run' if r.status == 'infeasible' else r.status}: {r.error}")


def cmd_rank(args) -> int:
    """``estbench rank``: first its rank at shared parameters (probed at the snapshot sets of its
    tasks, :func:`estbench.cli.probe.rank_probe`; ``--probe-only`` stops there), then its own
    training cells, then its rivals' (reused from the reference set where their keys match),
    then its placement."""
    from estbench.analysis import rank

    cls, reference = _rank_target(args)
    out = Path(args.out) if args.out else runs.default_out(f"rank-{cls.name}-")
    same = reference is not None and out.resolve() == reference.resolve()
    if same and not args.in_place:
        raise UsageError(f"--out {out} is the reference set itself: pass --in-place to extend it "
                         "there, or leave --out out to write a new run folder")
    task_specs, rivals = _rank_field(args, cls)
    seeds, devices, executor, overrides = _common(args)
    from_file = ".py" in args.target.split(":")[0]
    if from_file and not getattr(executor, "serial", True):
        raise UsageError("an estimator loaded from a file exists only in this process: rank it without "
                         "-j/--parallel-config, or install it as an 'estbench.estimators' entry point")
    # gradient quality at shared parameters first: minutes, before any training
    probed = rank_probe(args, cls, task_specs, rivals, devices, executor, out)
    if probed is not None:
        return probed
    mine_plan = _plan(args, task_specs, parse_list(cls.name), seeds, devices, overrides,
                      show_skipped=False)
    plan = _plan(args, task_specs, rivals, seeds, devices, overrides, show_skipped=False)
    runs.check_out(out)
    reused = 0 if same or reference is None else rank.reuse_cells(plan, reference, out)
    if reference is not None and not same and not reused and not args.quiet:
        print(f"note: none of the {len(plan.cells)} rivals' cells is in {reference}: it was made for "
              "other options or by other code (a cell's key covers the code that computes it); all "
              "are computed", file=sys.stderr)
    meta = runs.sweep_meta(plan, args.budget, task_specs, [*parse_list(cls.name), *rivals], seeds,
                           devices, command=store.typed_command(["estbench", *args.argv]),
                           extra={"ranked": cls.name,
                                  "reference": str(reference) if reference is not None else None})
    if not args.quiet:
        print(f"ranking {cls.name} on {len(task_specs)} tasks against {len(rivals)} estimators, "
              f"seeds {seeds}, budget {args.budget!r}: its {len(mine_plan.cells)} cells first, then "
              f"{len(plan.cells)} rivals' cells, "
              + (f"extending {out} in place" if same else
                 (f"{reused} reused from {reference} (read only), " if reference is not None
                  else "no reference set, ") + f"results in {out}"), file=sys.stderr)
    # the estimator's own cells first: where none of them finishes there is nothing to rank, and
    # its rivals' cells (hours on the real tasks) are not computed
    status, _, mine_cells = execute(args, mine_plan, out, executor, meta)
    if status is not None:
        return status
    if mine_cells.empty or not (mine_cells.status == "ok").any():
        print(f"{cls.name} finished no cell, so it has no rank and its rivals were not run:")
        _print_problems(mine_cells)
        if not args.no_report:  # the problem cells, with their reasons, in the run's report
            print(f"report: {_rank_report(out)}")
        return 1
    status, _, _ = execute(args, plan, out, executor, meta)
    if status is not None:
        return status
    return _print_placement(args, cls, out, [*mine_plan.cells, *plan.cells])


def _rank_report(out: Path) -> Path:
    from estbench.report.render import build_report

    return build_report(out)


def _option_lines(cls) -> list[str]:
    """One line per declared option: default, description and the values it takes."""
    out = []
    for k, o in cls.options.items():
        takes = o.describe()
        out.append(f"      {k} = {o.default!r}  {o.doc}" + (f" [{takes}]" if takes else ""))
    return out


def _task_budgets(cls) -> dict:
    """A task's named budgets in full (the Budget defaults filled in): what --steps, --checkpoints,
    ... default to under ``--budget NAME``."""
    return {name: sweep.task_budget(cls, name).as_dict() for name in cls.budgets}


def _budget_lines(cls) -> list[str]:
    """One line per named budget of a task, in the flags' terms."""
    out = []
    for name, b in _task_budgets(cls).items():
        shown = {k: v for k, v in b.items() if not (k == "train_seconds" and not v)}
        out.append(f"      budget {name}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return out


def cmd_list(args) -> int:
    out = []
    out.append("tasks:")
    for n in tasks.available():
        c = tasks.get_class(n)
        out.append(f"  {n:<18} [{c.family}] {c.description}")
        out.extend(_option_lines(c))
        out.extend(_budget_lines(c))
    out.append("")
    out.append("estimators:")
    for n in estimators.available():
        c = estimators.get_class(n)
        fams = ",".join(sorted(c.families))
        flag = "unbiased" if estimators.get(n).unbiased else "biased"  # may depend on options
        out.append(f"  {n:<18} [{fams}] {flag}; {c.paper}")
        if c.exceeds_budget:
            out.append(f"      (not held to the budget: {c.exceeds_budget})")
        out.extend(_option_lines(c))
    try:
        published = protocols.available()
    except protocols.ProtocolError as e:
        raise UsageError(str(e)) from None
    if published:
        out.append("")
        out.append("published protocols (estbench run --tasks TASK --budget paper; "
                   "--budget published where one has an as-published mode):")
        for p in published.values():
            out.extend(p.lines("  "))
    skipped = {**tasks.skipped(), **estimators.skipped()}
    if skipped:
        out.append("")
        out.append("skipped plug-ins:")
        for k, v in skipped.items():
            out.append(f"  {k}: {v}")
    if args.json:
        print(json.dumps({
            "tasks": {n: {"family": tasks.get_class(n).family,
                          "options": {k: o.default for k, o in tasks.get_class(n).options.items()},
                          "budgets": _task_budgets(tasks.get_class(n))}
                      for n in tasks.available()},
            "estimators": {n: {"families": sorted(estimators.get_class(n).families),
                               "unbiased": estimators.get(n).unbiased,
                               "exceeds_budget": estimators.get_class(n).exceeds_budget,
                               "options": {k: o.default for k, o in estimators.get_class(n).options.items()}}
                           for n in estimators.available()},
            "protocols": {n: p.as_dict() for n, p in published.items()},
            "skipped": skipped,
        }, indent=2))
    else:
        print("\n".join(out))
    return 0


def _budget_arguments(r) -> None:
    """Options shared by ``run`` and ``rank``: device, budget overrides, execution."""
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    # the defaults differ by task (toys 11 checkpoints, binary_vae 5, ...): never one number here
    named = "default: each task's named budget, which 'estbench list' shows"
    r.add_argument("--steps", help=f"training steps ({named})")
    r.add_argument("--n-samples", dest="n_samples",
                   help=f"f-evaluations per data point per step ({named})")
    r.add_argument("--checkpoints",
                   help=f"gradient measurements, evenly spaced, incl. start and end; at most "
                        f"steps + 1 ({named})")
    r.add_argument("--measure-samples", dest="measure_samples",
                   help=f"gradient estimates per measurement ({named})")
    r.add_argument("--eval-points", dest="eval_points",
                   help=f"points of the held-out ELBO curve incl. start and end; every checkpoint is "
                        f"one too; at most steps + 1 ({named})")
    r.add_argument("--seconds", metavar="S",
                   help="a time budget: train each cell for S seconds of training time (measurements "
                        "and evaluations not counted) instead of a number of steps; --steps then caps "
                        "the steps (default: no cap); checkpoints are spaced in training time")
    r.add_argument("--threads", help="intra-op CPU threads per cell (default 1; parallelise with -j)")
    r.add_argument("--cell-timeout", dest="cell_timeout", metavar="SECONDS",
                   help="stop a cell after this long and record it as failed (0: no limit; default "
                        + ", ".join(f"{int(v)} s for the {k} budget" if v else f"none for the {k} budget"
                                    for k, v in sweep.DEFAULT_CELL_TIMEOUT.items()) + ")")
    r.add_argument("--force", action="store_true", help="recompute cells already in --out")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    executors.add_cli_arguments(r)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="estbench", description=__doc__.split("\n\n")[0])
    from estbench.core import __version__

    p.add_argument("--version", action="version", version=f"estbench {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train and measure estimators on tasks; print a summary table")
    r.add_argument("--config", metavar="SWEEP.yml",
                   help="a whole sweep in a YAML file: its keys are the long options of this "
                        "command (tasks, estimators, seeds, steps, out, ...; see examples/sweep.yml); "
                        "flags given on the command line override it")
    r.add_argument("--tasks", help="comma-separated tasks with options (default: the toy tasks; with --budget paper every task with a published protocol; with --budget published every task whose protocol has an as-published mode)")
    r.add_argument("--estimators", help="comma-separated estimators with options (default: all; with --budget published the methods the source ran)")
    r.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"comma-separated seeds (default {DEFAULT_SEEDS})")
    r.add_argument("--budget", default="quick",
                   choices=["quick", "standard", protocols.PAPER, protocols.PUBLISHED],
                   help="each task's named budget (default quick); paper: the task's published "
                        "protocol at equal settings, its options and budget (estbench list shows "
                        "them); published: the protocol as its source ran it, each method at its "
                        "own settings, to reproduce the published figures (not a fair "
                        "comparison); the flags below override it")
    _budget_arguments(r)
    r.add_argument("--out", help="results folder (default results/runs/<timestamp>)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    r.set_defaults(func=cmd_run)

    rk = sub.add_parser("rank", help="check a new estimator, run it where it applies, show its rank")
    rk.add_argument("target", help="file.py:ClassName, file.py (one estimator class), or a registered name")
    rk.add_argument("--reference",
                    help="the result set ranked against; its cells are reused, and it is only read "
                         "(default: the results/reference shipped with estbench, wherever you run "
                         "from; 'none': compute every rival here); a folder that does not exist or "
                         "holds no cell is an error")
    rk.add_argument("--out", help="where to write the run (default results/runs/rank-NAME-<timestamp>); "
                                  "cells of --reference are copied in")
    rk.add_argument("--in-place", dest="in_place", action="store_true",
                    help="allow --out to be the --reference folder itself, extending it there")
    rk.add_argument("--tasks", help="comma-separated tasks (default: every compatible task; with "
                                    "--budget paper, those with a published protocol)")
    rk.add_argument("--estimators", help="comma-separated rivals to rank against, with options "
                                         "(default: every estimator of a compatible family)")
    rk.add_argument("--seeds", help="seeds (default: those of --reference, else 0,1,2)")
    rk.add_argument("--budget", choices=["quick", "standard", protocols.PAPER],
                    help="named budget (default: that of --reference, else quick); paper: each "
                         "task's published protocol, as 'estbench run --budget paper'")
    _budget_arguments(rk)
    rk.add_argument("--snapshots", metavar="DIR",
                    help="probe first at the snapshot sets in DIR for the rank's tasks (default: "
                         "the shipped results/snapshots; the rivals' probe cells are reused from "
                         "the shipped results/probe); 'none': no probe")
    rk.add_argument("--probe-only", dest="probe_only", action="store_true",
                    help="stop after the rank at shared parameters: no training")
    rk.add_argument("--no-report", action="store_true", help="do not write the report of --out")
    rk.set_defaults(func=cmd_rank)

    ls = sub.add_parser("list", help="show every task and estimator with its options and defaults")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    add_parsers(sub)
    add_probe_parsers(sub)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as a person reads it: one line, ``estbench: warning: ...``, without the
    source path and line that ``warnings`` prints for developers."""
    text = " ".join(str(message).split())
    print(f"estbench: warning: {text}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # what meta.json records as the command: the words given, not the process's
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        # numpy / scipy / pandas on NaN or constant columns (means of absent metrics, tests on
        # tied seeds): the figures handle NaN themselves, the warning says nothing to a user
        for module in ("numpy", "scipy", "pandas"):
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=module)
        try:
            if getattr(args, "config", None):
                from estbench.cli import config as cli_config

                args = cli_config.apply(parser, argv, args, args.command)
                args.argv = argv
            return args.func(args)
        except UsageError as e:
            print(f"estbench: error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
