"""A checkpoint's measurement with its fast paths against without them, side by side in one process.

    python benchmarks/measure_paths.py [--cases categorical_vae:reinmax,...] [--rounds 3]

Per (task, estimator) at the task's quick budget (its n_samples and measure_samples, seed 0, the
model at its start): :func:`estbench.engine.measure.measure` as a cell calls it, timed

* *fast*: as shipped -- the estimates summarised per parameter block a cache-sized float64 chunk
  at a time, the bias test's second stage projected through the directions' tangents, a
  declared-deterministic estimator measured from two estimates;
* *plain*: the same code with those paths off -- each block taken to float64 whole, the second
  stage forming every estimate w.r.t. the network and projecting it, M copies of a deterministic
  estimate.

Both give the same figures (``tests/test_measure_fast_paths.py``); the table also says whether
the second stage ran (``16 M``) and the largest relative difference of the figures.  Medians over
``--rounds``, alternated so machine load hits both.  Run it alone: the figures are timings.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import estimators  # noqa: E402
import tasks  # noqa: E402
from estbench.engine import measure as ms  # noqa: E402
from estbench.engine.sweep import task_budget  # noqa: E402

CASES = ("categorical_vae:reinmax,categorical_vae:rloo,binary_vae:sparsemap,binary_vae:disarm,"
         "poly_toy:gumbel_rao,sst_rationales:gumbel_softmax,text_vae:reparam")


@contextlib.contextmanager
def plain(est):
    """The measurement without its fast paths."""
    cols, tangents, deterministic = ms.FLOAT64_COLUMNS, ms.direction_tangents, type(est).deterministic

    def no_tangents(*args, **kwargs):
        raise RuntimeError("fast path off")

    ms.FLOAT64_COLUMNS, ms.direction_tangents = 1 << 40, no_tangents
    type(est).deterministic = False
    try:
        yield
    finally:
        ms.FLOAT64_COLUMNS, ms.direction_tangents = cols, tangents
        type(est).deterministic = deterministic


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=CASES, help="task:estimator pairs")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, one checkpoint at the model's start, medians over "
          f"{args.rounds} rounds")
    print(f"{'task':16s} {'estimator':14s} {'M':>4s} {'stage 2':>7s} {'plain s':>8s} {'fast s':>7s} "
          f"{'speed-up':>8s} {'max rel diff':>12s}")
    for case in args.cases.split(","):
        task_name, est_name = case.split(":")
        task = tasks.get(task_name)
        task.setup("cpu", torch.Generator().manual_seed(0))
        est = estimators.get(est_name)
        b = task_budget(task, "quick")
        batch = task.measure_batch()
        ref = task.reference_gradient(batch)

        def once():
            t0 = time.perf_counter()
            out = ms.measure(task, est, b.n_samples, b.measure_samples, seed=0, batch=batch,
                             reference=ref)
            return time.perf_counter() - t0, out

        once()  # warm-up
        fast, slow = [], []
        for _ in range(args.rounds):
            t, a = once()
            fast.append(t)
            with plain(est):
                t, p = once()
            slow.append(t)
        diff = max((abs(a[k] - p[k]) / max(abs(p[k]), 1e-300) for k in a
                    if math.isfinite(p[k]) and k not in ("bias_p",) and p[k] != 0), default=0.0)
        stage2 = "16 M" if a["bias_test_samples"] > b.measure_samples else "-"
        f, s = statistics.median(fast), statistics.median(slow)
        print(f"{task_name:16s} {est_name:14s} {b.measure_samples:4d} {stage2:>7s} {s:8.2f} {f:7.2f} "
              f"{s / f:7.1f}x {diff:12.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
