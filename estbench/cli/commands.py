"""The ``estbench`` command line.

    estbench run  [--tasks ...] [--estimators ...] [--seeds 0,1,2] [--device cpu|cuda|all]
                  [--steps N] [--n-samples N] [--out DIR]
    estbench list

Lists are comma-separated; options go in the name, ``gumbel_softmax[temperature=0.5]``.
Bad input gets one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
import time
import warnings
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Optional

import estimators
import tasks
from estbench.engine import executors, protocols, store, sweep
from estbench.analysis import table
from estbench.core.budget import Budget
from estbench.cli.report import add_parsers
from estbench.core.errors import ConfigError, RankError, SpecError, UsageError, WorkerError
from estbench.core.spec import parse_list, split_list

DEFAULTS = Budget()
DEFAULT_SEEDS = "0,1,2"
#: the most cells one command plans (seeds x tasks x estimators x devices): a typo such as
#: ``--seeds 0-100000000`` is refused at once instead of building the plan for minutes
MAX_CELLS = 100_000
#: the largest seed: every stream a cell derives from it still fits torch's 64-bit seeds
MAX_SEED = 2 ** 32 - 1


def _ints(text: str, what: str, limit: int = MAX_CELLS) -> list[int]:
    """Comma-separated integers and ranges ``a-b``, each a 64-bit integer; at most ``limit`` values,
    counted from the range bounds before any range is expanded."""
    try:
        parts = []
        for part in split_list(text):
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                parts.append((int(lo), int(hi)))
            else:
                parts.append((int(part), int(part)))
    except (ValueError, SpecError):
        raise UsageError(f"{what} must be comma-separated integers (or ranges a-b), got {text!r}") from None
    for lo, hi in parts:
        for v in (lo, hi):
            if not -2 ** 63 <= v < 2 ** 63:
                raise UsageError(f"{what}: {v} does not fit in a 64-bit integer")
    for lo, hi in parts:
        if hi < lo:
            raise UsageError(f"{what}: the range {lo}-{hi} is empty (a range a-b needs a <= b)")
    n = sum(max(0, hi - lo + 1) for lo, hi in parts)
    if n > limit:
        raise UsageError(f"{what} {text!r} has {n} values, more than the limit of {limit}; "
                         "split the sweep")
    out = [v for lo, hi in parts for v in range(lo, hi + 1)]
    if not out:
        raise UsageError(f"{what} is empty")
    if len(set(out)) != len(out):
        raise UsageError(f"{what} lists a value twice: {text!r}")
    return out


def parse_seeds(text: str, what: str = "--seeds") -> list[int]:
    """Seeds as ``--seeds`` takes them (``0,1,2``, ``0-4``, ``7``), each from 0 to MAX_SEED;
    UsageError naming ``what`` otherwise.  ``estbench.run(seeds="0-4")`` parses its strings here."""
    seeds = _ints(text, what)
    if any(s < 0 or s > MAX_SEED for s in seeds):
        # a cell derives its random streams from its seed (cell.seed * 7919 + step for the
        # measurements), which torch takes as a 64-bit integer
        raise UsageError(f"{what} must be integers from 0 to {MAX_SEED}")
    return seeds


def _positive(text: str, what: str, minimum: int = 1) -> int:
    try:
        v = int(text)
    except ValueError:
        raise UsageError(f"{what} must be an integer, got {text!r}") from None
    if v < minimum:
        raise UsageError(f"{what} must be >= {minimum}, got {v}")
    return v


def default_tasks() -> list[str]:
    return [n for n in tasks.available() if getattr(tasks.get_class(n), "in_default_run", False)]


class Eta:
    """Remaining time of a sweep from the cells computed so far.

    Cells of different tasks differ in cost by orders of magnitude (a toy cell takes a second, a
    text_vae cell minutes), and cached cells cost nothing, so "elapsed / done * left" misleads.
    Instead: the mean time of the computed cells of each task times that task's cells left
    (a task with none computed yet borrows the slowest task mean seen, an upper-ish guess),
    divided by the number of cells running at once.  None until one cell has been computed.
    """

    def __init__(self, cells, workers: int = 1):
        self.left = Counter(c.task for c in cells)
        self.times: dict = {}
        self.workers = max(1, int(workers))

    def done(self, cell, seconds: Optional[float]) -> Optional[float]:
        self.left[cell.task] -= 1
        if seconds is not None:
            self.times.setdefault(cell.task, []).append(float(seconds))
        if not self.times:
            return None
        means = {t: sum(v) / len(v) for t, v in self.times.items()}
        fallback = max(means.values())
        total = sum(n * means.get(t, fallback) for t, n in self.left.items() if n > 0)
        return total / self.workers


def _fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """What a person watching a sweep sees: one line for the cells already stored, then the cells
    as they are computed -- a tqdm bar on a terminal (failures printed above it), one line per cell
    elsewhere (logs, CI) -- with an ETA from :class:`Eta`, which ignores the stored cells; and,
    read from the cells' heartbeats in the results folder (store.Heartbeat), what the running
    cells are doing: on the bar, the longest-running cell's step and phase, refreshed every
    second; in a log, a line every minute for each cell running longer than a minute.

    ``sweep.run`` reports every stored cell before any computed one, so the stored cells are
    summed up in one line as soon as the first computed cell (or the end) arrives.
    """

    #: seconds between looks at the heartbeats (terminal, log) and a log line's minimum cell age
    POLL_BAR, POLL_LOG, LONG_CELL = 1.0, 60.0, 60.0

    def __init__(self, stream, quiet: bool, cells=(), workers: int = 1, where=None,
                 bar: Optional[bool] = None):
        self.stream, self.quiet, self.where = stream, quiet, where
        cells = list(cells)
        self.n = len(cells)
        self.eta = Eta(cells, workers)
        self.cached = 0
        self.flushed = False
        self.bar = None
        if bar is None:
            bar = bool(getattr(stream, "isatty", lambda: False)())
        self.use_bar = bar
        self._lock = threading.RLock()
        self._eta_text = "ETA ?"
        self._since = time.time()  # heartbeats of cells started before this sweep are stale
        self._stop = threading.Event()
        if not quiet and where is not None:
            threading.Thread(target=self._watch, name="estbench-progress", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def _flush_cached(self, n: int) -> None:
        if self.flushed:
            return
        self.flushed = True
        if self.cached and not self.quiet:
            where = f" in {self.where}" if self.where else ""
            print(f"{self.cached} of {n} cells already stored{where}: reused (--force recomputes them)",
                  file=self.stream, flush=True)

    def _ensure_bar(self, n: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=n - self.cached, file=self.stream, unit="cell",
                            dynamic_ncols=True, leave=True)

    @staticmethod
    def describe(beat: dict, now: float) -> str:
        """One running cell as a person reads it: label, time so far, step and phase."""
        return (f"{beat.get('label', beat.get('key', '?'))} {_fmt_duration(now - beat['started'])}: "
                f"step {beat.get('step', '?')}"
                + (f" of {beat['steps']}" if beat.get("steps") else "")
                + f", {beat.get('phase', '?')}")

    def _running(self) -> list[dict]:
        return [b for b in store.running(self.where) if b.get("started", 0) >= self._since - 1]

    def _watch(self) -> None:
        period = self.POLL_BAR if self.use_bar else self.POLL_LOG
        while not self._stop.wait(period):
            try:
                beats, now = self._running(), time.time()
                with self._lock:
                    if self._stop.is_set():
                        return
                    if self.use_bar:
                        if not beats:
                            continue
                        self._flush_cached(self.n)
                        self._ensure_bar(self.n)
                        more = f" (+{len(beats) - 1} running)" if len(beats) > 1 else ""
                        self.bar.set_postfix_str(f"{self.describe(beats[0], now)}{more}, "
                                                 f"{self._eta_text}", refresh=True)
                    else:
                        for beat in beats:
                            if now - beat["started"] >= self.LONG_CELL:
                                print(f"  running {self.describe(beat, now)}", file=self.stream,
                                      flush=True)
            except Exception:  # never let the display take a sweep down
                pass

    def __call__(self, i, n, cell, res, cached):
        with self._lock:
            self._record(i, n, cell, res, cached)
            if i == n:
                self.close()

    def _record(self, i, n, cell, res, cached):
        left = self.eta.done(cell, None if cached or res is None else res.seconds)
        if cached:
            self.cached += 1
            if i == n:
                self._flush_cached(n)
            return
        self._flush_cached(n)
        if self.quiet:
            return
        status = (res.status if res is not None else "stored by another worker") + \
            (f": {res.error}" if res is not None and res.error else "") + \
            (f" ({res.seconds:.1f}s)" if res is not None else "")
        eta = self._eta_text = f"ETA {_fmt_duration(left if i < n else 0)}"
        if self.use_bar:
            self._ensure_bar(n)
            if res is not None and res.status != "ok":
                self.bar.write(f"{cell.label()} ... {status}", file=self.stream)
            self.bar.set_postfix_str(f"{cell.task} x {cell.estimator}: {res.status if res else '-'}"
                                     f", {eta}", refresh=False)
            self.bar.update(1)
            if i == n:
                self.bar.close()
        else:
            print(f"[{i}/{n}] {cell.label()} ... {status}  {eta}", file=self.stream, flush=True)


def _common(args):
    """Seeds, devices, executor and budget overrides shared by ``run`` and ``rank``."""
    if args.threads is not None:
        os.environ["ESTBENCH_THREADS"] = str(_positive(args.threads, "--threads"))
    seeds = parse_seeds(args.seeds)
    devices = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu", "cuda"]}[args.device]
    try:
        executor = executors.from_args(args)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    os.environ["ESTBENCH_JOBS"] = str(executor.n_jobs)
    overrides = {}
    for key, flag, minimum in [("steps", "--steps", 0), ("n_samples", "--n-samples", 1),
                               ("checkpoints", "--checkpoints", 0),
                               ("measure_samples", "--measure-samples", 2),
                               ("eval_points", "--eval-points", 0)]:
        value = getattr(args, key)
        if value is not None:
            overrides[key] = _positive(value, flag, minimum)
    if args.seconds is not None:
        overrides["train_seconds"] = _seconds(args.seconds, "--seconds")
        # a time budget trains until the time is spent: no step cap unless one is given
        overrides.setdefault("steps", 0)
    return seeds, devices, executor, overrides


def _seconds(text: str, what: str, zero: str = "") -> float:
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


def _selection(text: str, flag: str):
    """A comma-separated list of names given on the command line; an empty one is an error (not
    'everything': leave the flag out for that)."""
    if not text.strip():
        raise UsageError(f"{flag} is empty: name at least one (leave {flag} out for the default)")
    return parse_list(text)


def _cell_timeout(text: Optional[str]) -> Optional[float]:
    """``--cell-timeout SECONDS`` (0: no limit); None: the budget's default."""
    return None if text is None else _seconds(text, "--cell-timeout", zero="no limit")


def _results_folder(out: Path) -> Path:
    """``--out``: a folder, existing or to be made; a file there is bad input."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a results folder")
    return out


def _plan(args, task_specs, est_specs, seeds, devices, overrides, show_skipped: bool):
    n = len(task_specs) * len(est_specs) * len(seeds) * len(devices)
    if n > MAX_CELLS:  # before the plan is built: it instantiates every cell
        raise UsageError(f"the plan would have up to {n} cells ({len(task_specs)} tasks x "
                         f"{len(est_specs)} estimators x {len(seeds)} seeds x {len(devices)} devices), "
                         f"more than the limit of {MAX_CELLS}; split the sweep")
    try:
        plan = sweep.expand(task_specs, est_specs, seeds, devices, args.budget, overrides,
                            timeout=_cell_timeout(args.cell_timeout))
    except ValueError as e:
        raise UsageError(str(e)) from None
    err = sys.stderr
    if plan.missing_devices:
        if args.device == "cuda":
            raise UsageError("--device cuda: CUDA is not available on this machine")
        print("note: CUDA not available, running on cpu only", file=err)
    if not plan.cells:
        why = "; ".join(f"{e} {r}" for _, e, r in plan.skipped[:3])
        raise UsageError(f"nothing to run: no selected estimator supports the selected tasks' latent "
                         f"family ({why})")
    if show_skipped and not args.quiet:
        for t, e, why in plan.skipped:
            print(f"note: skipping {t} x {e}: {why}", file=err)
    for line in _fewer_points(plan, overrides):
        print(line, file=err)
    return plan


#: budget counts of evenly spaced points of a step budget: (flag, what one point is called)
_POINTS = {"checkpoints": ("--checkpoints", "checkpoints"),
           "eval_points": ("--eval-points", "evaluation points")}


def _fewer_points(plan, overrides: dict) -> list[str]:
    """One note for each ``--checkpoints`` / ``--eval-points`` given that a step budget cannot
    hold: k evenly spaced points of steps 0..N are at most N + 1 distinct steps (the budget rounds
    them to steps), so more than N + 1 silently became every step and the start."""
    notes = []
    for key, (flag, name) in _POINTS.items():
        asked = overrides.get(key)
        if not asked:
            continue
        short: dict = {}  # steps -> tasks
        for c in plan.cells:
            if not c.budget.timed and asked > c.budget.steps + 1:  # a time budget's are times
                short.setdefault(c.budget.steps, set()).add(c.task)
        for steps, on in sorted(short.items()):
            every = len(short) == 1 and on == {c.task for c in plan.cells}
            where = "" if every else f" ({', '.join(sorted(on))})"
            notes.append(f"note: {flag} {asked} is more than {steps} steps allow{where}: "
                         + (f"{steps + 1} {name} (every step and the start)" if steps
                            else f"1 {name[:-1]} (the start only)"))
    return notes


def _execute(args, plan, out: Path, executor, meta: dict):
    """Run the plan into ``out``; returns (exit status or None, the plan's records, its cells).

    Finished cells are always kept.  A folder that cannot be written (read-only, disk full) gets
    one line, never a traceback: refused before anything runs when cells need computing (exit 2),
    an error when a write fails mid-sweep (exit 1), and when every cell is already stored the table
    is shown from the stored cells with a note that meta.json and results.parquet were not updated.
    """
    import errno

    err = sys.stderr
    read_only = {errno.EROFS, errno.EACCES, errno.EPERM}
    write_errors = read_only | {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}

    def reason(e: OSError) -> str:
        if e.errno:
            return os.strerror(e.errno)
        return (str(e).strip().splitlines() or [type(e).__name__])[0]

    def not_updated(e: Optional[OSError]) -> str:
        if e is None or e.errno in read_only:
            return f"note: {out} is read-only: meta.json and results.parquet not updated"
        return f"note: cannot write to {out} ({reason(e)}): meta.json and results.parquet not updated"

    if not out.is_dir():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create results folder {out}: {reason(e)}") from None
    @functools.lru_cache(maxsize=None)
    def todo() -> int:
        """Cells to compute, counted only where a refused write needs it before the sweep (the
        count reads every stored cell's footer, which the sweep does anyway)."""
        return len(plan.cells) if args.force else sum(not store.has_cell(out, c.key())
                                                      for c in plan.cells)

    note = None
    if not store.writable(out):
        if todo():
            raise UsageError(f"--out {out} is read-only and {todo()} of {len(plan.cells)} cells need "
                             "computing; choose a writable --out")
        note = not_updated(None)
    else:
        try:
            store.write_meta(out, {**store.run_metadata(sys.argv), **meta,
                                   "budgets": {c.task: c.budget.as_dict() for c in plan.cells}})
        except OSError as e:
            if todo():
                raise UsageError(f"cannot write results to {out}: {reason(e)}; nothing was run") from None
            note = not_updated(e)

    def merge() -> Optional[OSError]:
        """Rewrite results.parquet (unless the folder is known not to take it); the error if any."""
        if note is not None:
            return None
        try:
            store.write_merged(out)
        except OSError as e:
            return e
        return None

    progress = Progress(err, args.quiet, plan.cells, executor.n_jobs, where=out)
    try:
        computed = sweep.run(plan, out, force=args.force, progress=progress, executor=executor)
    except WorkerError as e:
        merge()
        print(f"estbench: error: {e}", file=err)
        return 1, None, None
    except KeyboardInterrupt:
        merge()
        print(f"interrupted: finished cells are kept in {out}; rerun the same command to finish", file=err)
        return 130, None, None
    except ConfigError as e:  # raised once the backend starts (e.g. dask.distributed.Client)
        merge()
        raise UsageError(str(e)) from None
    except OSError as e:  # a cell's record could not be written: disk full, folder turned read-only
        if e.errno not in write_errors:
            raise
        merge()
        print(f"estbench: error: cannot write results to {out}: {reason(e)} (the finished cells are "
              "kept; rerun the same command once there is room)", file=err)
        return 1, None, None
    finally:
        progress.close()
    failed = merge()
    if failed is not None:
        if computed:  # this run computed cells: a results.parquet that lags them is an error
            print(f"estbench: error: cannot write results to {out}: {reason(failed)} (the cells are "
                  f"stored; {out / 'results.parquet'} is not updated)", file=err)
            return 1, None, None
        note = not_updated(failed)
    if note is not None:
        print(note, file=err)
    records, cells = store.load(out)
    if not cells.empty:
        cells = cells[cells.key.isin({c.key() for c in plan.cells})]
    keep = table.finished(records, cells)  # finished cells only: failures are listed apart
    return None, keep, cells


def cmd_run(args) -> int:
    started = time.time()  # a stored cell that finished before this was reused, not computed now
    try:
        if args.tasks is not None:
            task_specs = _selection(args.tasks, "--tasks")
        elif args.budget == protocols.PAPER:  # every task that follows a published protocol
            task_specs = parse_list(",".join(protocols.available()))
        else:
            task_specs = parse_list(",".join(default_tasks()))
        est_specs = _selection(args.estimators, "--estimators") if args.estimators is not None else parse_list(
            ",".join(estimators.available()))
    except SpecError as e:  # ProtocolError too: a protocol file that does not load
        raise UsageError(str(e)) from None
    seeds, devices, executor, overrides = _common(args)
    out = _results_folder(Path(args.out) if args.out else
                          Path("results") / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    plan = _plan(args, task_specs, est_specs, seeds, devices, overrides,
                 show_skipped=bool(args.estimators and args.tasks))
    if not args.quiet:
        print(f"running {len(plan.cells)} cells ({len(task_specs)} tasks x {len(est_specs)} estimators"
              f" x {len(seeds)} seeds, budget {args.budget!r}"
              + "".join(f", {k}={v}" for k, v in overrides.items()) + f") -> {out}", file=sys.stderr)
    status, keep, cells = _execute(args, plan, out, executor, {
        "budget": args.budget, "tasks": [str(t) for t in task_specs],
        "estimators": [str(e) for e in est_specs], "seeds": seeds, "devices": devices,
        # the command line names the sweep file only: what it held is kept beside it
        **({"config": {"path": args.config, "options": args.config_options}}
           if getattr(args, "config", None) else {})})
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
        from estbench.analysis import tables as rt
    except ImportError:
        return None
    if records.empty:
        return None
    board = lb.leaderboard(rt.per_cell(records))
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


def cmd_rank(args) -> int:
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
    out = Path(args.out) if args.out else (
        Path("results") / "runs" / f"rank-{cls.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    same = reference is not None and out.resolve() == reference.resolve()
    if same and not args.in_place:
        raise UsageError(f"--out {out} is the reference set itself: pass --in-place to extend it "
                         "there, or leave --out out to write a new run folder")
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
    seeds, devices, executor, overrides = _common(args)
    from_file = ".py" in args.target.split(":")[0]
    if from_file and not getattr(executor, "serial", True):
        raise UsageError("an estimator loaded from a file exists only in this process: rank it without "
                         "-j/--parallel-config, or install it as an 'estbench.estimators' entry point")
    mine_plan = _plan(args, task_specs, parse_list(cls.name), seeds, devices, overrides,
                      show_skipped=False)
    plan = _plan(args, task_specs, rivals, seeds, devices, overrides, show_skipped=False)
    _results_folder(out)
    reused = 0 if same or reference is None else rank.reuse_cells(plan, reference, out)
    if reference is not None and not same and not reused and not args.quiet:
        print(f"note: none of the {len(plan.cells)} rivals' cells is in {reference}: it was made for "
              "other options or by other code (a cell's key covers the code that computes it); all "
              "are computed", file=sys.stderr)
    meta = {"budget": args.budget, "tasks": [str(t) for t in task_specs], "seeds": seeds,
            "devices": devices, "ranked": cls.name,
            "reference": str(reference) if reference is not None else None}
    if not args.quiet:
        print(f"ranking {cls.name} on {len(task_specs)} tasks against {len(rivals)} estimators, "
              f"seeds {seeds}, budget {args.budget!r}: its {len(mine_plan.cells)} cells first, then "
              f"{len(plan.cells)} rivals' cells, "
              + (f"extending {out} in place" if same else
                 (f"{reused} reused from {reference} (read only), " if reference is not None
                  else "no reference set, ") + f"results in {out}"), file=sys.stderr)
    # the estimator's own cells first: where none of them finishes there is nothing to rank, and
    # its rivals' cells (hours on the real tasks) are not computed
    status, _, mine_cells = _execute(args, mine_plan, out, executor, meta)
    if status is not None:
        return status
    mine_ok = not mine_cells.empty and bool((mine_cells.status == "ok").any())
    if not mine_ok:
        print(f"{cls.name} finished no cell, so it has no rank and its rivals were not run:")
        for _, r in mine_cells.drop_duplicates(["task", "status", "error"]).iterrows():
            print(f"  {r.task}: {'not run' if r.status == 'infeasible' else r.status}: {r.error}")
        if not args.no_report:  # the problem cells, with their reasons, in the run's report
            print(f"report: {_rank_report(out)}")
        return 1
    status, _, _ = _execute(args, plan, out, executor, meta)
    if status is not None:
        return status
    from estbench.analysis import leaderboard as lb
    from estbench.analysis import tables as rt
    records, cells = store.load(out)
    keys = {c.key() for c in [*mine_plan.cells, *plan.cells]}
    cells = cells[cells.key.isin(keys)] if not cells.empty else cells
    pc = rt.per_cell(table.finished(records, cells))
    board = lb.leaderboard(pc)
    biased = frozenset(t for t, e in table.biased_set(pc) if e == cls.name)
    print(rank.render_placement(cls.name, board, rank.timing_difference(cells, cls.name), biased),
          end="")
    mine = cells[(cells.estimator == cls.name) & (cells.status != "ok")]
    for _, r in mine.drop_duplicates(["task", "status", "error"]).iterrows():
        print(f"  {r.task}: {'not run' if r.status == 'infeasible' else r.status}: {r.error}")
    if not args.no_report:
        print(f"report: {_rank_report(out)}")
    return 0


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
        out.append("published protocols (estbench run --tasks TASK --budget paper):")
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
    from estbench import __version__

    p.add_argument("--version", action="version", version=f"estbench {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train and measure estimators on tasks; print a summary table")
    r.add_argument("--config", metavar="SWEEP.yml",
                   help="a whole sweep in a YAML file: its keys are the long options of this "
                        "command (tasks, estimators, seeds, steps, out, ...; see examples/sweep.yml); "
                        "flags given on the command line override it")
    r.add_argument("--tasks", help="comma-separated tasks with options (default: the toy tasks; with --budget paper every task with a published protocol)")
    r.add_argument("--estimators", help="comma-separated estimators with options (default: all)")
    r.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"comma-separated seeds (default {DEFAULT_SEEDS})")
    r.add_argument("--budget", default="quick", choices=["quick", "standard", protocols.PAPER],
                   help="each task's named budget (default quick); paper: the task's published "
                        "protocol, its options and budget (estbench list shows them); the flags "
                        "below override it")
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
    rk.add_argument("--no-report", action="store_true", help="do not write the report of --out")
    rk.set_defaults(func=cmd_rank)

    ls = sub.add_parser("list", help="show every task and estimator with its options and defaults")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    add_parsers(sub)
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
            return args.func(args)
        except UsageError as e:
            print(f"estbench: error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
