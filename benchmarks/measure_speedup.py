"""Speed-up of the batched measurement (M replicas in one pass) over M separate estimate+backward calls.

    python benchmarks/measure_speedup.py [--M 256] [--repeat 5] [--device cpu]

Prints one row per (task, estimator): median seconds of each way and the ratio.  Both ways compute
the same M gradient estimates at the same parameters (tests/test_harness.py checks they agree in
distribution).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import estimators
import tasks
from estbench.engine.measure import gradient_estimates
from estbench.core.spec import parse

CASES = [
    ("toy_binary", ["reinforce", "rloo", "disarm", "gumbel_softmax"]),
    ("toy_categorical", ["reinforce", "rloo", "st_gumbel"]),
    ("toy_gaussian", ["reparam", "rloo"]),
    ("binary_vae[latents=50,arch=nonlinear]", ["rloo", "disarm", "straight_through"]),
]


def timed(fn, device, repeat):
    out = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"{'task':<40} {'estimator':<16} {'loop s':>8} {'batched s':>10} {'speed-up':>9}")
    for tspec, names in CASES:
        spec = parse(tspec)
        try:
            task = tasks.get(spec.name, **spec.options)
        except ValueError as exc:
            print(f"{tspec:<40} skipped: {exc}")
            continue
        task.setup(device, torch.Generator().manual_seed(0))
        batch = task.measure_batch()
        for name in names:
            if name not in estimators.available(task.family):
                continue
            est = estimators.get(name).to(device)
            n = 4
            loop = timed(lambda: gradient_estimates(task, est, batch, n, args.M, batched=False), device, args.repeat)
            bat = timed(lambda: gradient_estimates(task, est, batch, n, args.M, batched=True), device, args.repeat)
            print(f"{tspec:<40} {name:<16} {loop:>8.3f} {bat:>10.4f} {loop / bat:>8.1f}x", flush=True)


if __name__ == "__main__":
    main()
