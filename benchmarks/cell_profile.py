"""Where a quick cell's time goes, task by task: training, measurement, evaluation, the rest.

    python benchmarks/cell_profile.py [--tasks binary_vae,categorical_vae,...] \
        [--estimators reinmax,rloo] [--budget quick] [--top 6]

Runs one cell per (task, estimator) in this process, one thread, seed 0, under ``cProfile``, and
splits its wall time by the harness's own phases (cumulative time in ``train._train_step``, the
measurements ``train._measure_at``, the held-out evaluations ``train._evaluate_at``; the rest is
set-up and bookkeeping), then lists the functions with the most time of their own.  Profiling
slows Python-heavy code more than kernels: read the shares, and time without the profiler
(``estbench run``'s records, benchmarks/harness_step.py) for absolute figures.  Run it alone.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import estimators  # noqa: E402
import tasks  # noqa: E402
from estbench.core.spec import parse  # noqa: E402
from estbench.engine import sweep  # noqa: E402
from estbench.engine.train import run_cell  # noqa: E402

#: the harness's phases of a cell, by the function that runs each
PHASES = {"training": "_train_step", "measurement": "_measure_at", "evaluation": "_evaluate_at"}


def _cumulative(stats: pstats.Stats, name: str) -> float:
    return sum(v[3] for (path, _, fn), v in stats.stats.items()
               if fn == name and path.endswith(str(Path("engine", "train.py"))))


def profile(task: str, estimator: str, budget: str):
    """(status, wall seconds, {phase: seconds}, pstats.Stats) of one cell."""
    plan = sweep.expand([parse(task)], [parse(estimator)], [0], ["cpu"], budget, {})
    [cell] = plan.cells
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    res = run_cell(cell)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    phases = {k: _cumulative(stats, fn) for k, fn in PHASES.items()}
    return res, wall, phases, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(tasks.available()))
    ap.add_argument("--estimators", default="reinmax,rloo,reparam")
    ap.add_argument("--budget", default="quick")
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run_cell(sweep.expand([parse("toy_binary")], [parse("rloo")], [0], ["cpu"], "quick",
                          {"steps": 2}).cells[0])  # imports and first-use costs, not profiled
    print(f"torch {torch.__version__}, 1 thread, seed 0, --budget {args.budget}, under cProfile")
    print(f"{'task':<28} {'estimator':<26} {'wall s':>7} " + " ".join(f"{k:>12}" for k in PHASES)
          + f" {'rest':>7}")
    tops = []
    for task in args.tasks.split(","):
        family = tasks.get_class(parse(task).name).family
        for est in args.estimators.split(","):
            if family not in estimators.get_class(parse(est).name).families:
                continue
            res, wall, phases, stats = profile(task, est, args.budget)
            if res.status != "ok":
                print(f"{task:<28} {est:<26} {res.status}: {' '.join(str(res.error).split())[:80]}")
                continue
            rest = wall - sum(phases.values())
            print(f"{task:<28} {est:<26} {wall:>7.1f} "
                  + " ".join(f"{v:>6.1f} ({v / wall:>3.0%})" for v in phases.values())
                  + f" {rest:>7.1f}", flush=True)
            own = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:args.top]
            tops.append((task, est, [(f"{Path(p).name}:{fn}", v[2], v[0]) for (p, _, fn), v in own]))
    for task, est, own in tops:
        print(f"\n{task} x {est}: most time of their own (seconds, calls)")
        for name, sec, calls in own:
            print(f"  {sec:>7.2f}  {calls:>7}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
