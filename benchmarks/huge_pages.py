"""Quick cells with and without transparent huge pages in torch's CPU allocator
(``THP_MEM_ALLOC_ENABLE``, which estbench sets for every process that runs cells:
estbench/core/process.py).

    python benchmarks/huge_pages.py [--cells binary_vae=disarm,categorical_vae=reinmax,...] \
        [--seeds 2] [--rounds 3]

torch reads the variable once per process, so the two settings cannot share one: each round starts
one child process per setting, in alternating order (machine load hits both alike), and each child
runs every listed cell for ``--seeds`` seeds after one unmeasured warm-up cell, one thread, and
prints its cells' wall times.  Printed: per cell, the median over rounds and seeds of each setting
and their ratio (off / on: above 1, huge pages are faster).  It stops if a cell's records (all but
the timings) differ between the settings: the same arithmetic on the same values.  Run it alone: the figures are timings.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from estbench.core.process import HUGE_PAGES  # noqa: E402
DEFAULT_CELLS = ("binary_vae=disarm,binary_vae=rloo,categorical_vae=reinmax,"
                 "categorical_vae=rloo,sst_rationales_categorical=gumbel_softmax,"
                 "sst_rationales_categorical=carms,text_vae=reparam")

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from estbench.core.spec import parse
from estbench.engine import sweep
from estbench.engine.train import run_cell
from estbench.core import metrics
import tasks
cells, seeds = {cells!r}, {seeds!r}
def cell(t, e, s):
    return sweep.expand([parse(t)], [parse(e)], [s], ["cpu"], "quick", {{}}).cells[0]
run_cell(cell(*cells[0], 99))  # warm-up: imports, data, first allocations
out, values = {{}}, {{}}
for t, e in cells:
    for s in range(seeds):
        t0 = time.perf_counter()
        res = run_cell(cell(t, e, s))
        out.setdefault(f"{{t}}={{e}}", []).append(time.perf_counter() - t0)
        assert res.status in ("ok", "infeasible"), res.error
        own = tasks.get_class(parse(t).name).final_figures
        values[f"{{t}}={{e}} seed {{s}}"] = [(r["step"], r["metric"], r["value"]) for r in res.records
                                         if not metrics.get(r["metric"], own).timing]
print(json.dumps({{"seconds": out, "values": values}}))
"""


def child(cells, seeds: int, on: bool) -> tuple[dict, dict]:
    """(seconds per cell, its records' values but the timings) from a child process with the
    switch ``on`` or off."""
    env = {**os.environ, HUGE_PAGES: "1" if on else "0"}
    code = CHILD.format(root=str(ROOT), cells=cells, seeds=seeds)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"huge_pages.py: a child failed:\n{done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["seconds"], out["values"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default=DEFAULT_CELLS, help="task=estimator,...")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    cells = [tuple(x.split("=", 1)) for x in args.cells.split(",") if x]
    if not cells or any(len(c) != 2 for c in cells) or args.seeds < 1 or args.rounds < 1:
        ap.error("--cells task=estimator,...; --seeds and --rounds at least 1")
    times, values = {True: {}, False: {}}, {}
    for r in range(args.rounds):
        for on in ((True, False) if r % 2 else (False, True)):
            seconds, vals = child(cells, args.seeds, on)
            for k, v in seconds.items():
                times[on].setdefault(k, []).extend(v)
            for k, v in vals.items():  # compared as JSON text: a NaN equals itself there
                if values.setdefault(k, json.dumps(v)) != json.dumps(v):
                    raise SystemExit(f"huge_pages.py: {k}: the records differ between settings")
    print(f"{args.rounds} rounds x {args.seeds} seeds, quick budget, 1 thread; medians (s)")
    print(f"{'cell':45s} {'off':>7s} {'on':>7s} {'off/on':>7s}")
    total = {True: 0.0, False: 0.0}
    for k in times[True]:
        off, on = statistics.median(times[False][k]), statistics.median(times[True][k])
        total[False] += off
        total[True] += on
        print(f"{k:45s} {off:7.2f} {on:7.2f} {off / on:7.2f}")
    print(f"{'sum of medians':45s} {total[False]:7.2f} {total[True]:7.2f} "
          f"{total[False] / total[True]:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
