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

* ``max_iter=50`` (the old default): 30 of the 50 chains run out of active-set slots (both
  implementations stop them at the same place and warn) -- same output, the pure speed-up;
* ``max_iter=100``: every chain converges in both -- same output;
* ``default``: the old default (max_iter=50, unconverged) against the new default (converged); the
  outputs differ by the convergence (reported, not checked);
* ``transition=0.5, max_iter=50``: the coupled chain (Viterbi by scans instead of a loop).
"""
from __future__ import annotations

import argparse
import math
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


# ---- the old implementation (verbatim, renamed) --------------------------------------------------
def old_chain_viterbi(u: torch.Tensor, transition: float):
    N, D = u.shape
    d0 = torch.zeros(N, dtype=u.dtype, device=u.device)
    d1 = u[:, 0].clone()
    bps = []
    for d in range(1, D):
        bp0 = d1 > d0  # best predecessor of state 0
        bp1 = d1 + transition > d0  # best predecessor of state 1
        d0, d1 = torch.maximum(d0, d1), u[:, d] + torch.maximum(d0, d1 + transition)
        bps.append(torch.stack([bp0, bp1], -1))
    last = d1 > d0
    value = torch.maximum(d0, d1)
    z = torch.empty(N, D, dtype=torch.long, device=u.device)
    z[:, D - 1] = last.long()
    for d in range(D - 1, 0, -1):
        z[:, d - 1] = bps[d - 1].gather(-1, z[:, d: d + 1]).squeeze(-1).long()
    return z.to(u.dtype), value


def old_chain_scores(Z, theta, transition):
    c = torch.einsum("nsd,nd->ns", Z, theta)
    if Z.shape[-1] > 1:
        c = c + transition * (Z[..., :-1] * Z[..., 1:]).sum(-1)
    return c


def old_kkt(Z, active, ridge):
    N, S, D = Z.shape
    am = active.to(Z.dtype)
    n1 = Z.sum(-1)
    Q = 2 * (Z @ Z.transpose(1, 2)) - n1[:, :, None] - n1[:, None, :] + D  # D - Hamming
    eye = torch.eye(S, dtype=Z.dtype, device=Z.device)
    K = Z.new_zeros(N, S + 1, S + 1)
    K[:, :S, :S] = Q * am[:, :, None] * am[:, None, :] + eye * (1 - am)[:, None, :] \
        + ridge * eye * am[:, None, :]
    K[:, :S, S] = am
    K[:, S, :S] = am
    return K


def old_sparsemap_chain_solve(theta, transition, max_iter=50, tol=1e-9, ridge=1e-10):
    theta = theta.detach().double()
    N, D = theta.shape
    S = min(max_iter + 1, D + 2, 2 ** min(D, 30))
    Z = theta.new_zeros(N, S, D)
    active = torch.zeros(N, S, dtype=torch.bool, device=theta.device)
    xi = theta.new_zeros(N, S)
    Z[:, 0], _ = old_chain_viterbi(theta, transition)
    active[:, 0] = True
    xi[:, 0] = 1.0
    done = torch.zeros(N, dtype=torch.bool, device=theta.device)
    stuck = torch.zeros_like(done)
    rows = torch.arange(N, device=theta.device)
    for _ in range(max_iter + 2 * S):
        c = old_chain_scores(Z, theta, transition)
        K = old_kkt(Z, active, ridge)
        rhs = torch.cat([c * active, theta.new_ones(N, 1)], -1)
        sol = torch.linalg.solve(K, rhs)
        xih, tau = sol[:, :S] * active, sol[:, S]
        step = xih - xi
        stationary = step.abs().amax(-1) < tol
        mu = (xi[:, :, None] * Z).sum(1)
        z_star, v = old_chain_viterbi(theta + 1 - 2 * mu, transition)
        gain = v - (1 - mu).sum(-1) - tau
        already = ((Z == z_star[:, None]).all(-1) & active).any(-1)
        free = ~active
        want = ~done & stationary & (gain > tol) & ~already
        add = want & free.any(-1)
        stuck = stuck | (want & ~add)
        newly_done = ~done & stationary & ~add
        slot = free.to(torch.int8).argmax(-1)
        Z[rows[add], slot[add]] = z_star[add]
        active[rows[add], slot[add]] = True
        move = ~done & ~stationary
        neg = active & (step < 0)
        ratio = torch.where(neg, -xi / torch.where(neg, step, -torch.ones_like(step)),
                            torch.full_like(step, math.inf))
        a_block, j = ratio.min(-1)
        alpha = a_block.clamp(max=1.0)
        xi = torch.where(move[:, None], xi + alpha[:, None] * step, xi)
        xi = torch.where((stationary & ~done)[:, None], xih, xi)
        drop = move & (a_block < 1)
        xi[rows[drop], j[drop]] = 0.0
        active[rows[drop], j[drop]] = False
        done = done | newly_done
        if bool(done.all()):
            break
    rhs = torch.cat([old_chain_scores(Z, theta, transition) * active, theta.new_ones(N, 1)], -1)
    exact, info = torch.linalg.solve_ex(old_kkt(Z, active, 0.0), rhs)
    exact = exact[:, :S] * active
    ok = (info == 0) & torch.isfinite(exact).all(-1) & ((exact - xi).abs().amax(-1) < 1e-6)
    xi = torch.where(ok[:, None], exact, xi)
    xi = xi.clamp_min(0) * active
    xi = xi / xi.sum(-1, keepdim=True)
    return xi, Z, active, done & ~stuck


class OldSparseMAPChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, transition, max_iter):
        xi, Z, active, done = old_sparsemap_chain_solve(theta, transition, max_iter)
        if not bool(done.all()):
            warnings.warn(f"sparsemap: active set did not converge in max_iter={max_iter} for "
                          f"{int((~done).sum())} chain(s); using the last iterate")
        ctx.save_for_backward(Z, active)
        Zo = Z.to(theta.dtype)
        ctx.mark_non_differentiable(Zo, active)
        return xi.to(theta.dtype), Zo, active

    @staticmethod
    def backward(ctx, g_xi, g_z, g_active):
        Z, active = ctx.saved_tensors
        N, S, _ = Z.shape
        K = old_kkt(Z, active, 0.0)
        rhs = torch.cat([g_xi.double() * active, Z.new_zeros(N, 1)], -1)
        g_c = torch.linalg.solve(K, rhs)[:, :S] * active
        g_theta = torch.einsum("ns,nsd->nd", g_c, Z)
        return g_theta.to(g_xi.dtype), None, None


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
