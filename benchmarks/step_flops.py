"""A training step's FLOP rate against the hardware's: each model's step beside a bare chain of the
same matrix products.

    python benchmarks/step_flops.py [--device cpu] [--tasks binary_vae,categorical_vae,text_vae] \
        [--steps 20] [--rounds 5] [--threads 1]

Per task (its published protocol's model and batch, ``--budget paper``, with the estimator its
source compares first): one estimator step (``benchmarks/harness_step.bare_step``: problem,
estimate, backward, optimiser step) is counted with ``torch.utils.flop_counter.FlopCounterMode``
(the FLOPs torch attributes to matrix products and convolutions, forward and backward) while a
dispatch mode records the shape of every matrix product it runs.  Then, in alternating blocks in
one process (so machine load hits both alike), the step is timed, and so is the *chain*: the same
matrix products, shape for shape and in order, on preallocated tensors, nothing else.  The chain's
FLOP rate is what this machine gives these shapes; the step's FLOP rate against it says how far the
step is from the hardware's limit for this model, and chain ms / step ms the share of the step that
the products alone would take (the rest: elementwise work, sampling, the optimiser, Python).
Medians over ``--rounds``.  Run it alone: the figures are timings.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from estbench.engine import protocols  # noqa: E402
from harness_step import (_sync, add_timing_args, bare_step, set_up as set_up_model,  # noqa: E402
                          timing_set_up)

#: the estimator each protocol's source compares first
ESTIMATORS = {"binary_vae": "disarm", "categorical_vae": "reinmax", "text_vae": "reparam",
              "sst_rationales": "reinforce"}
aten = torch.ops.aten
#: the matrix products the chain replays (each with the FLOP count of its shapes)
PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


class RecordProducts(TorchDispatchMode):
    """Records (op, shapes of its matrix arguments, dtype) for every matrix product run under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            mats = [a for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((func, [tuple(m.shape) for m in mats], mats[-1].dtype))
        return func(*args, **(kwargs or {}))


def product_flops(func, shapes) -> int:
    """2 x m x k x n per product (bmm: per batch entry); the bias of addmm/baddbmm not counted."""
    a, b = shapes[-2], shapes[-1]
    if func in (aten.bmm.default, aten.baddbmm.default):
        return 2 * a[0] * a[1] * a[2] * b[2]
    return 2 * a[0] * a[1] * b[1]


def chain(calls, device):
    """A function running the recorded products in order on preallocated random tensors."""
    ops = []
    for func, shapes, dtype in calls:
        if func in (aten.mm.default, aten.bmm.default):
            args = [torch.randn(s, device=device, dtype=dtype) for s in shapes[-2:]]
            op = torch.mm if func is aten.mm.default else torch.bmm
        else:  # addmm / baddbmm: the product and the added term
            args = [torch.randn(s, device=device, dtype=dtype) for s in shapes[-2:]]
            op = torch.mm if func is aten.addmm.default else torch.bmm
        ops.append((op, args))

    def run():
        for op, args in ops:
            op(*args)
    return run


def set_up(task_name: str, device: torch.device, seed: int = 0):
    """The task at its protocol's settings with the estimator its source compares first."""
    est_name = ESTIMATORS[task_name]
    task, est, opt, batches = set_up_model(
        task_name, protocols.task_options(task_name, {}), est_name,
        protocols.estimator_options(task_name, est_name, {}), device, seed)
    return task, est, opt, batches, protocols.get(task_name).budget["n_samples"], est.display_name


def measure(task_name: str, device: torch.device, steps: int, rounds: int) -> dict:
    """One task's figures: torch's FLOP count of a step and the recorded products' own count,
    the median step and chain times, and the two FLOP rates."""
    task, est, opt, batches, n, label = set_up(task_name, device)
    torch.manual_seed(0)
    for _ in range(3):  # warm-up: lazy parts built, allocator and kernels warm
        bare_step(task, est, opt, next(batches), n)
    counter, recorder = FlopCounterMode(display=False), RecordProducts()
    with counter, recorder:
        bare_step(task, est, opt, next(batches), n)
    flops = counter.get_total_flops()
    product = sum(product_flops(f, s) for f, s, _ in recorder.calls)
    replay = chain(recorder.calls, device)
    replay()
    step_t, chain_t = [], []
    for r in range(rounds):
        for which in ([0, 1] if r % 2 == 0 else [1, 0]):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                if which == 0:
                    bare_step(task, est, opt, next(batches), n)
                else:
                    replay()
            _sync(device)
            (step_t if which == 0 else chain_t).append((time.perf_counter() - t0) / steps)
    s, c = statistics.median(step_t), statistics.median(chain_t)
    return {"estimator": label, "flops": flops, "product_flops": product,
            "products": len(recorder.calls), "step_s": s, "chain_s": c,
            "step_rate": flops / s, "chain_rate": product / c}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_args(ap, steps=20, steps_help="steps (and chains) per timed block")
    ap.add_argument("--tasks", default="binary_vae,categorical_vae,text_vae")
    args = ap.parse_args(argv)
    device, header = timing_set_up(args)
    print(header + ", medians")
    print(f"{'task':<16} {'estimator':<26} {'GFLOP/step':>10} {'products':>9} {'step ms':>8} "
          f"{'step GFLOP/s':>12} {'chain ms':>9} {'chain GFLOP/s':>13} {'of limit':>9}")
    for task_name in args.tasks.split(","):
        r = measure(task_name, device, args.steps, args.rounds)
        print(f"{task_name:<16} {r['estimator']:<26} {r['flops'] / 1e9:>10.3f} {r['products']:>9} "
              f"{r['step_s'] * 1e3:>8.2f} {r['step_rate'] / 1e9:>12.1f} {r['chain_s'] * 1e3:>9.2f} "
              f"{r['chain_rate'] / 1e9:>13.1f} {r['step_rate'] / r['chain_rate']:>9.2f}", flush=True)
        if r["product_flops"] != r["flops"]:  # a product the recorder missed, or one torch counts otherwise
            print(f"  note: torch counts {r['flops'] / 1e9:.3f} GFLOP, the recorded products "
                  f"{r['product_flops'] / 1e9:.3f}: 'of limit' is then not the products' share")
    print("GFLOP/step: torch's count for one step (forward and backward: its matrix products); "
          "products: how many; of limit: the step's FLOP rate / the chain's (1: at this machine's "
          "limit for these shapes), which is also the share of the step the products alone take "
          "(the rest: elementwise work, sampling, the optimiser, Python)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
