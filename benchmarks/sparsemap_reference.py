"""The sparsemap implementation before the vectorised solver (a Python loop over the chain in Viterbi, a full
Gram matrix and KKT solve on every active-set iteration, max_iter + 1 fixed slots), kept verbatim as
the reference that the fast solver in estimators/sparse.py must reproduce: used by
tests/test_sparse.py (agreement) and benchmarks/sparsemap_speed.py (speed, side by side)."""
from __future__ import annotations

import math
import warnings

import torch


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
