"""Adam's update on a task's own parameters: the per-tensor loop, foreach and fused, side by side.

    python benchmarks/adam_fused.py [--task sst_rationales] [--steps 100] [--rounds 3]

Why ``Task.make_optimizer`` takes the fused kernel: on the SST tasks the per-tensor update of the
1M-entry embedding table is a large share of a training step (this script measures how large).  Each variant steps the same parameters
with the same random gradients, in alternating rounds in one process; the table gives the median
milliseconds per ``optimizer.step()`` and the largest difference of the parameters from the
per-tensor loop after the run (the three are the same arithmetic up to rounding).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tasks  # noqa: E402

VARIANTS = {"per-tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sst_rationales")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = tasks.get(args.task)
    task.setup("cpu", torch.Generator().manual_seed(0))
    base = [p.detach().clone() for p in task.parameters()]
    print(f"{args.task}: {len(base)} parameter tensors, {sum(p.numel() for p in base):,} entries; "
          f"{args.steps} steps x {args.rounds} rounds, one thread")
    times = {k: [] for k in VARIANTS}
    final = {}
    for _ in range(args.rounds):
        for name, kw in VARIANTS.items():
            params = [torch.nn.Parameter(p.clone()) for p in base]
            opt = torch.optim.Adam(params, lr=1e-3, **kw)
            gen = torch.Generator().manual_seed(1)
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
            times[name].append((time.perf_counter() - t0) / args.steps)
            final[name] = copy.deepcopy([p.detach() for p in params])
    ref = final["per-tensor"]
    print(f"{'variant':<12} {'ms/step':>8} {'vs per-tensor':>14} {'max |diff|':>11}")
    t_ref = statistics.median(times["per-tensor"])
    for name in VARIANTS:
        t = statistics.median(times[name])
        diff = max(float((a - b).abs().max()) for a, b in zip(final[name], ref))
        print(f"{name:<12} {t * 1e3:>8.3f} {t / t_ref:>14.2f} {diff:>11.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
