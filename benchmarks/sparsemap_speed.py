"""One sparsemap training step on binary_vae's problem size, the old implementation against the new.

    python benchmarks/sparsemap_speed.py [--repeat 7] [--threads 1]

The problem is binary_vae's default (batch 50 chains of D = 200 binary latents, linear model at its
initialisation, the first training batch).  A step is: encode the batch, ``sparsemap.estimate``
(the active set, then f on the active structures), and the gradient of the surrogate w.r.t. the
model's parameters.  "old" is a verbatim copy of the implementation before the vectorised solver
(loop over the chain in ``chain_viterbi``, full Gram matrix and full KKT solve at every active-set
iteration, a fixed slot count), swapped into the same estimator, so everything else in the step is
shared.  The runs alternate old/new in one process; medians and the ratio old/new are printed, and
each row checks that both compute the same thing (value and gradient) when they run the same
options.  Rows:

* ``max_iter=50`` (the old default): many of the 50 chains run out of active-set slots (both
  implementations stop them at the same place and warn) -- same output, the pure speed-up;
* ``max_iter=100``: every chain converges in both -- same output;
* ``default``: the old default (max_iter=50, unconverged) against the new default (converged); the
  outputs differ by the convergence (reported, not checked);
* ``transition=0.5, max_iter=50``: the coupled chain (Viterbi by scans instead of a loop).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import estimators  # noqa: E402
import tasks  # noqa: E402
from estimators import sparse  # noqa: E402


from benchmarks.sparsemap_reference import OldSparseMAPChain  # noqa: E402  (the old code)


# ---- the step ------------------------------------------------------------------------------------
def make_step(task, batch, est, impl):
    params = task.parameters()

    def step():
        saved = sparse.SparseMAPChain
        sparse.SparseMAPChain = OldSparseMAPChain if impl == "old" else saved
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                prob = task.problem(batch)
                e = est.estimate(prob.dist, prob.f, 6, prob.context)
                grads = torch.autograd.grad(e.surrogate, params, allow_unused=True)
        finally:
            sparse.SparseMAPChain = saved
        g = torch.cat([x.flatten() for x in grads if x is not None])
        return e, g, len(caught)

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = tasks.get("binary_vae")
    task.setup(torch.device("cpu"), torch.Generator().manual_seed(0))
    batch = next(task.train_batches(torch.Generator().manual_seed(1)))
    default_iter = sparse.SparseMAP.options["max_iter"].default
    rows = [  # (label, old options, new options, same output expected)
        ("max_iter=50", {"max_iter": 50}, {"max_iter": 50}, True),
        ("max_iter=100", {"max_iter": 100}, {"max_iter": 100}, True),
        (f"default (old 50, new {default_iter})", {"max_iter": 50}, {}, False),
        ("transition=0.5,max_iter=50", {"transition": 0.5, "max_iter": 50},
         {"transition": 0.5, "max_iter": 50}, True),
    ]
    print(f"binary_vae sparsemap step (batch {batch.shape[0]}, D = {task.config['latents']}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeat} alternating runs")
    print(f"{'options':38s} {'old s':>8s} {'new s':>8s} {'old/new':>8s} {'n_evals':>9s} "
          f"{'warnings':>9s}  agreement")
    for label, o_opts, n_opts, same in rows:
        s_old = make_step(task, batch, estimators.get("sparsemap", **o_opts), "old")
        s_new = make_step(task, batch, estimators.get("sparsemap", **n_opts), "new")
        t_old, t_new = [], []
        for _ in range(args.repeat):
            for fn, out in ((s_old, t_old), (s_new, t_new)):
                t0 = time.perf_counter()
                res = fn()
                out.append(time.perf_counter() - t0)
                if fn is s_old:
                    e_old, g_old, w_old = res
                else:
                    e_new, g_new, w_new = res
        dv = (e_old.value - e_new.value).abs().max().item()
        dg = ((g_old - g_new).abs().max() / g_old.abs().max()).item()
        agree = f"max|dvalue| {dv:.1e}, max|dgrad|/max|grad| {dg:.1e}"
        if same:
            ok = torch.allclose(e_old.value, e_new.value, rtol=1e-5, atol=1e-4) and dg < 1e-4
            agree += " ok" if ok else " MISMATCH"
        mo, mn = statistics.median(t_old), statistics.median(t_new)
        print(f"{label:38s} {mo:8.3f} {mn:8.3f} {mo / mn:7.1f}x "
              f"{e_old.n_evals:4d}/{e_new.n_evals:<4d} {w_old:4d}/{w_new:<4d}  {agree}")


if __name__ == "__main__":
    main()
