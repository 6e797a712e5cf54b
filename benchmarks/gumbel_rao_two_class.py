"""Gumbel-Rao's relaxation of two-class categoricals: the Gumbel pair against the binary Concrete.

    python benchmarks/gumbel_rao_two_class.py [--latents 128] [--replicas 256] [--samples 12] \
        [--k 10] [--rounds 7]

poly_toy's measurement relaxes M replicas x n samples x L two-class latents with k conditional
draws each (``estimators/rao_blackwell.py``).  Side by side in one process, alternating, one thread:
the generic path (``conditional_gumbel``: two exponentials, a logaddexp and a 2-wide softmax per
draw) and the two-class path (``two_class_soft``: one truncated logistic per draw in the
log-odds), each forward and backward to the logits.  Medians; ratio = generic / two-class.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from estimators.rao_blackwell import conditional_gumbel, two_class_soft  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latents", type=int, default=128)
    ap.add_argument("--replicas", type=int, default=256)
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    logits = torch.randn(args.replicas, args.latents, 2).requires_grad_()
    shape = (args.samples, args.replicas, args.latents)

    def generic():
        lp = torch.log_softmax(logits, -1)
        hard = torch.nn.functional.one_hot(torch.randint(0, 2, shape), 2).float()
        G = conditional_gumbel(lp.detach(), hard, args.k)
        torch.softmax(lp + G, -1).mean(0).sum().backward()

    def two_class():
        lp = torch.log_softmax(logits, -1)
        hard = torch.nn.functional.one_hot(torch.randint(0, 2, shape), 2).float()
        two_class_soft(lp, hard, args.k, 1.0).sum().backward()

    times = {"generic": [], "two_class": []}
    for r in range(args.rounds):
        for name in (["generic", "two_class"] if r % 2 == 0 else ["two_class", "generic"]):
            fn = generic if name == "generic" else two_class
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    g, t = statistics.median(times["generic"]), statistics.median(times["two_class"])
    print(f"{args.replicas} replicas x {args.samples} samples x {args.latents} latents x k={args.k}, "
          f"one thread, {args.rounds} rounds: generic {g * 1e3:.0f} ms, two-class {t * 1e3:.0f} ms, "
          f"ratio {g / t:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
