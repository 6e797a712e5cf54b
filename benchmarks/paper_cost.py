"""What a cell of the ``paper`` budget costs on this machine: each task's published protocol
(tasks/protocols/*.yml) run for a few hundred steps with the harness, extrapolated to its length.

    python benchmarks/paper_cost.py [--device cpu] [--steps 300] [--tasks binary_vae,...]

Per task and estimator it runs one cell of ``estbench run --budget paper`` with the step count cut
to ``--steps``, two checkpoints and two evaluation points (so the cell is mostly training), and
prints the median step time the harness recorded and the protocol's steps times it: the training
time of a full paper cell.  Measurements and held-out evaluations come on top (their count is
the protocol's ``checkpoints`` and ``eval_points``; each costs what one costs in the quick
budget).  Run it alone: the figures are timings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from estbench.engine import protocols, sweep  # noqa: E402
from estbench.core.spec import parse  # noqa: E402
from estbench.engine.train import run_cell  # noqa: E402

#: the estimators each protocol's source compares first (one cheap, one the paper's own)
ESTIMATORS = {"binary_vae": ["disarm", "rloo"], "categorical_vae": ["reinmax", "st_gumbel"],
              "text_vae": ["reparam"], "sst_rationales": ["reinforce"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tasks", default=",".join(ESTIMATORS))
    args = ap.parse_args(argv)
    print(f"{'task':<18} {'estimator':<12} {'step ms':>8} {'paper steps':>11} {'training':>10}")
    for task in args.tasks.split(","):
        proto = protocols.get(task)
        plan = sweep.expand([parse(task)], [parse(e) for e in ESTIMATORS.get(task, ["reinforce"])],
                            [0], [args.device], protocols.PAPER,
                            {"steps": args.steps, "checkpoints": 2, "eval_points": 2})
        for cell in plan.cells:
            res = run_cell(cell)
            times = [r["value"] for r in res.records if r["metric"] == "step_time"]
            if res.status != "ok" or not times:
                print(f"{task:<18} {cell.estimator:<12} {res.status}: {res.error}")
                continue
            step = times[-1]
            total = step * proto.budget["steps"]
            print(f"{task:<18} {cell.estimator:<12} {1e3 * step:>8.2f} {proto.budget['steps']:>11,} "
                  f"{total / 60:>8.1f} m", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
