"""Sparse and structured surrogates of E_q[f]: sparsemax/entmax marginalisation, SparseMAP, SPIGOT.

None of these estimates the gradient of the original objective E_{softmax(logits)}[f]: sparsemax and
SparseMAP replace the distribution by a sparse one and marginalise f *exactly* over its (small)
support; SPIGOT keeps the argmax and invents a pseudo-gradient.  They are deterministic (zero
variance) and biased; the harness measures that bias against the exact gradient of E_q[f].
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.distributions import constraints
from entmax import entmax15, sparsemax

from .base import Estimate, Estimator, InfeasibleError, Option, check_f_output
from . import families as fam

DISCRETE = frozenset({"bernoulli", "categorical"})


class _Deterministic(Estimator):
    """Evaluates f on the support of a sparse distribution, whatever the sampling budget; the
    harness counts what it really spends."""

    exceeds_budget = "deterministic: evaluates f on every configuration of its sparse support"
    deterministic = True


def _cell_scores(dist, family):
    """Per-cell class scores ``(*batch, *event_cells, K)`` and the event-cell shape.

    A Bernoulli cell becomes the 2-class score vector [0, logit] (class 1 <=> z = 1), so that
    softmax([0, logit]) = [1 - sigmoid, sigmoid] is the original cell distribution.
    """
    base, k = fam.unwrap(dist)
    logits = base.logits
    if family == "bernoulli":
        scores = torch.stack([torch.zeros_like(logits), logits], -1)
        cells = logits.shape[logits.dim() - k:]
    else:
        scores = logits
        cells = logits.shape[logits.dim() - 1 - k: logits.dim() - 1]
    return scores, tuple(cells)


# ------------------------------------------------------------------------------------------------
# sparsemax / entmax marginalisation
# ------------------------------------------------------------------------------------------------
def sparse_product_support(p: torch.Tensor, max_configs: int, who: str):
    """Enumerate the product of per-cell supports of independent sparse cell distributions.

    ``p``: ``(Nb, nc, K)`` per-cell probabilities with exact zeros.  Returns ``(classes, w)``:
    ``classes`` ``(C, Nb, nc)`` long, the class of every cell in every configuration, and ``w``
    ``(C, Nb)`` the joint probability (differentiable through ``p``; 0 on padding).  Element b has
    C_b = prod_c |supp p_bc| configurations; they are listed by mixed-radix digits of arange(C) with
    element-wise radices (no loop over configurations), and padded to C = max_b C_b.
    """
    Nb, nc, K = p.shape
    ps, order = p.sort(-1, descending=True)
    sizes = (ps > 0).sum(-1).clamp_min(1)  # (Nb, nc)
    log_c = sizes.double().log().sum(-1)  # no int overflow for long events
    log_max = float(log_c.max()) if Nb else 0.0
    if log_max > math.log(max_configs) + 1e-9:
        raise InfeasibleError(
            f"estimator {who!r}: the sparse support has up to {math.exp(log_max):.4g} joint "
            f"configurations per event, more than max_configs={max_configs} (raise max_configs if "
            f"memory allows, or use fewer/better separated cells)"
        )
    # strides of the mixed radix: stride_c = prod_{c' > c} size_c'
    rev = sizes.flip(-1).cumprod(-1).flip(-1)  # (Nb, nc): prod_{c' >= c}
    C_b = rev[:, 0]
    strides = torch.cat([rev[:, 1:], torch.ones_like(rev[:, :1])], -1)
    C = int(C_b.max()) if Nb else 1
    j = torch.arange(C, device=p.device)[:, None, None]  # (C, 1, 1)
    digits = (j // strides[None]) % sizes[None]  # (C, Nb, nc), rank within the support
    valid = j[:, :, 0] < C_b[None]  # (C, Nb)
    classes = order[None].expand(C, Nb, nc, K).gather(-1, digits[..., None]).squeeze(-1)
    cell_p = ps[None].expand(C, Nb, nc, K).gather(-1, digits[..., None]).squeeze(-1)
    w = cell_p.prod(-1) * valid.to(p.dtype)
    return classes, w


class SparsemaxMarginal(_Deterministic):
    """Sparsemax marginalisation (Martins & Astudillo 2016, "From softmax to sparsemax", Eq. 2;
    Correia, Niculae, Aziz & Martins 2020, "Efficient marginalization of discrete and structured
    latent variables via sparsity", NeurIPS, Eq. 3-5).

    Objective optimised: E_{z ~ p}[f(z)] with p = sparsemax(logits) per cell (or entmax15 with
    ``mapping=entmax15``; a Bernoulli cell uses the 2-class scores [0, logit]); the joint p over an
    event is the product of the cells' sparse distributions.  It is computed EXACTLY as
    sum_{z in supp(p)} p(z) f(z) and differentiated through sparsemax's Jacobian: zero variance,
    because the sparse mapping puts exactly zero mass on low-scoring classes, so only the product
    of the per-cell supports is enumerated (one batched f call).  Biased for the softmax objective
    E_{softmax(logits)}[f] (a different distribution); cells whose support is a single class get
    zero gradient.  ``n_evals`` is the padded number of support configurations actually evaluated
    (1 when every cell is confident); ``n_samples`` is ignored.
    """

    name = "sparsemax"
    families = DISCRETE
    unbiased = False
    paper = ("Martins & Astudillo (2016), ICML, Eq. 2; Correia, Niculae, Aziz & Martins (2020), "
             "Efficient marginalization of discrete and structured latent variables via sparsity, "
             "NeurIPS, Eq. 3-5")
    options = {
        "mapping": Option("sparsemax", "sparse mapping of the cell scores", ("sparsemax", "entmax15")),
        # exact's bound, for exact's reason: at 4096 (categorical_vae's 8x4 at the start of
        # training, where sparsemax keeps every class) a step pushes 409,600 rows through the
        # decoder, 14 s a step on a CPU core; raise it on a GPU
        "max_configs": Option(2**11, "largest padded number of support configurations per event",
                              constraint=constraints.positive_integer),
    }

    def _estimate(self, dist, f, n, context, family):
        scores, cells = _cell_scores(dist, family)
        mapping = sparsemax if self.config["mapping"] == "sparsemax" else entmax15
        p = mapping(scores, dim=-1)
        batch = tuple(dist.batch_shape)
        K = p.shape[-1]
        nb, nc = math.prod(batch), math.prod(cells)
        classes, w = sparse_product_support(p.reshape(nb, nc, K), self.config["max_configs"],
                                            self.name)
        C = classes.shape[0]
        if family == "bernoulli":
            z = classes.to(p.dtype).reshape(C, *batch, *cells)
        else:
            z = torch.nn.functional.one_hot(classes, K).to(p.dtype).reshape(C, *batch, *cells, K)
        fz = check_f_output(f(z), C, dist.batch_shape, self.name)
        expectation = (w.reshape(C, *batch) * fz).sum(0)
        return Estimate(expectation.sum(), expectation.detach(), C)


# ------------------------------------------------------------------------------------------------
# SparseMAP on a binary chain
# ------------------------------------------------------------------------------------------------
def _maxplus(X, Y):
    """Max-plus product of 2x2 matrices stored entry-major ``(2, 2, *batch)``:
    (X (x) Y)[i, j] = max_k X[i, k] + Y[k, j]."""
    return torch.maximum(X[:, 0, None] + Y[None, 0], X[:, 1, None] + Y[None, 1])


def chain_viterbi(u: torch.Tensor, transition: float):
    """MAP of score(z) = sum_d u_d z_d + transition * sum_d z_d z_{d+1} over z in {0,1}^D.

    ``u``: ``(N, D)``.  Returns ``(z, value)``: ``(N, D)`` in u's dtype and ``(N,)``.  Ties go to 0.
    No Python loop over the chain: with ``transition == 0`` (or D = 1) the chain decouples and
    z = (u > 0); otherwise the forward max-sum recursion alpha_d = A_d (x) alpha_{d-1} (2x2 max-plus
    matrices A_d[s, s'] = u_d s + transition s s') is a Hillis-Steele prefix scan, the back-pointers
    follow from alpha in one batched comparison, and the back-tracking z_{d-1} = bp_d(z_d) is a
    suffix scan of compositions of the maps bp_d: {0,1} -> {0,1}; ceil(log2 D) steps each.
    """
    N, D = u.shape
    if transition == 0 or D == 1:
        return (u > 0).to(u.dtype), u.clamp_min(0).sum(-1)
    s = torch.tensor([0.0, 1.0], dtype=u.dtype, device=u.device)
    # A[i, j, n, d] = u_nd i + transition i j: from state j at d-1 to state i at d
    A = s[:, None, None, None] * u + transition * (s[:, None] * s[None, :])[:, :, None, None]
    A[:, :, :, 0] = s[:, None, None] * u[:, 0]  # alpha_0 = (0, u_0) in both columns
    off = 1
    while off < D:  # inclusive prefix scan: A[d] <- A[d] (x) ... (x) A[0]
        A = torch.cat([A[..., :off], _maxplus(A[..., off:], A[..., :-off])], -1)
        off *= 2
    a0, a1 = A[0, 0], A[1, 0]  # (N, D): best score of z_0..z_d ending in state z_d = 0 / 1
    bp = torch.stack([a1[:, :-1] > a0[:, :-1], a1[:, :-1] + transition > a0[:, :-1]], -1).long()
    # bp[:, d - 1, s]: the best state at d - 1 given state s at d, for d = 1..D-1
    off = 1
    while off < D - 1:  # suffix scan: bp[j] <- bp[j] o bp[j+1] o ... o bp[D-2]
        bp = torch.cat([bp[:, :-off].gather(-1, bp[:, off:]), bp[:, -off:]], 1)
        off *= 2
    last = (a1[:, -1] > a0[:, -1]).long()  # z_{D-1}
    z = torch.cat([bp.gather(-1, last[:, None, None].expand(N, D - 1, 1)).squeeze(-1),
                   last[:, None]], 1)
    return z.to(u.dtype), torch.maximum(a0[:, -1], a1[:, -1])


def _chain_scores(Z, theta, transition):
    """Full score c_s = theta . z_s + transition * sum_d z_sd z_s,d+1 of structures ``(N, S, D)``."""
    c = torch.einsum("nsd,nd->ns", Z, theta)
    if Z.shape[-1] > 1:
        c = c + transition * (Z[..., :-1] * Z[..., 1:]).sum(-1)
    return c


def _gram(Z):
    """Q_ij = m_i . m_j of the structures ``Z`` (N, S, D), with the one-hot unary vectors
    m = (1 - z, z) per position: D - Hamming(z_i, z_j)."""
    n1 = Z.sum(-1)
    return 2 * (Z @ Z.transpose(1, 2)) - n1[:, :, None] - n1[:, None, :] + Z.shape[-1]


def _kkt(Q, active, ridge):
    """KKT matrix [[Q_A, 1], [1^T, 0]] of the equality-constrained QP on each active set, from the
    Gram matrix ``Q`` of the slots (:func:`_gram`).  Inactive slots get an identity row (so their
    weight solves to 0).  ``ridge`` regularises a (degenerate) affinely dependent active set: the
    solution then steps along the null direction.
    """
    N, S = active.shape
    am = active.to(Q.dtype)
    K = Q.new_zeros(N, S + 1, S + 1)
    K[:, :S, :S] = Q * (am[:, :, None] * am[:, None, :])
    K[:, :S, :S].diagonal(dim1=-2, dim2=-1).add_(
        torch.where(active, torch.tensor(ridge, dtype=Q.dtype, device=Q.device), 1.0))
    K[:, :S, S] = am
    K[:, S, :S] = am
    return K


def _pad_slots(x, cap, dims):
    """Zero-pad the slot dimensions ``dims`` of ``x`` to ``cap`` (new slots are inactive/empty)."""
    pad = [0] * (2 * x.dim())
    for d in dims:
        pad[2 * (x.dim() - 1 - d) + 1] = cap - x.shape[d]
    return torch.nn.functional.pad(x, pad)


@dataclass
class _ActiveSets:
    """The active-set state of the chains still being solved, one row per chain (Niculae et al.
    2018, Sec. 3.2): each chain's active set A of structures in a padded slot dimension, their
    weights xi and what the equality-constrained QP (EQP) on A needs.

    Every field is indexed by row first, so retiring finished chains selects rows of all of them
    (:meth:`keep`); the slot fields grow together when the largest set needs more slots
    (:meth:`pad_slots`).
    """

    live: torch.Tensor  # (n,) original index of each row
    theta: torch.Tensor  # (n, D) the row's unary scores
    Z: torch.Tensor  # (n, cap, D) the structure in each slot
    c: torch.Tensor  # (n, cap) its chain score c_s
    n1: torch.Tensor  # (n, cap) its number of ones (updates the Gram matrix by one row)
    Q: torch.Tensor  # (n, cap, cap) Gram matrix M_A^T M_A = D - Hamming of the slots
    active: torch.Tensor  # (n, cap) the slot holds a structure of A
    xi: torch.Tensor  # (n, cap) the current weights: feasible, zero off A
    sol_x: torch.Tensor  # (n, cap) the EQP solution on the current A ...
    sol_tau: torch.Tensor  # (n,) ... and its multiplier tau of sum(xi) = 1
    fresh: torch.Tensor  # (n,) A changed since the last EQP solve: re-solve
    done: torch.Tensor  # (n,) stopped (optimal, or stuck)
    stuck: torch.Tensor  # (n,) wanted to add a structure to a full set (not converged)
    slots: torch.Tensor  # (cap,) arange of the slot dimension

    ROWS: ClassVar[tuple] = ("live", "theta", "Z", "c", "n1", "Q", "active", "xi", "sol_x",
                             "sol_tau", "fresh", "done", "stuck")

    @property
    def cap(self) -> int:
        return self.Z.shape[1]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the chains ``rows`` (a boolean mask)."""
        for name in self.ROWS:
            setattr(self, name, getattr(self, name)[rows])

    def pad_slots(self, cap: int) -> None:
        """Grow the slot dimension to ``cap`` (the new slots are empty and inactive)."""
        for name in ("Z", "c", "n1", "active", "xi", "sol_x"):
            setattr(self, name, _pad_slots(getattr(self, name), cap, (1,)))
        self.Q = _pad_slots(self.Q, cap, (1, 2))
        self.slots = torch.arange(cap, device=self.Z.device)


def _initial_active_sets(theta: torch.Tensor, transition: float, cap: int) -> _ActiveSets:
    """The starting point of the active-set method (Niculae et al. 2018, Sec. 3.2): every chain's
    active set is its MAP structure alone (the Viterbi argmax of the chain score), with weight 1
    -- a feasible point, the SparseMAP solution itself when one structure dominates."""
    N, D = theta.shape
    dev = theta.device
    z0, _ = chain_viterbi(theta, transition)
    Z = theta.new_zeros(N, cap, D)
    Z[:, 0] = z0
    c = theta.new_zeros(N, cap)
    c[:, 0] = _chain_scores(z0[:, None], theta, transition)[:, 0]
    n1 = theta.new_zeros(N, cap)
    n1[:, 0] = z0.sum(-1)
    Q = theta.new_zeros(N, cap, cap)
    Q[:, 0, 0] = D
    active = torch.zeros(N, cap, dtype=torch.bool, device=dev)
    active[:, 0] = True
    xi = torch.zeros_like(c)
    xi[:, 0] = 1.0
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    return _ActiveSets(live=torch.arange(N, device=dev), theta=theta, Z=Z, c=c, n1=n1, Q=Q,
                       active=active, xi=xi, sol_x=torch.zeros_like(c), sol_tau=theta.new_zeros(N),
                       fresh=torch.ones(N, dtype=torch.bool, device=dev), done=done,
                       stuck=torch.zeros_like(done), slots=torch.arange(cap, device=dev))


def _retire_and_grow(state: _ActiveSets, finished: list, cap_for) -> bool:
    """Bookkeeping between iterations, not a step of the algorithm (one host read): move the
    chains that stopped to ``finished`` as ``(rows, xi, Z, active, converged)``, and grow the slot
    dimension to what the largest active set may need next (``cap_for``).  False when no chain is
    left."""
    n_done, n_max = (int(x) for x in torch.stack(
        [state.done.sum(), state.active.sum(-1).max()]).tolist())
    if n_done:
        done = state.done
        finished.append((state.live[done], state.xi[done], state.Z[done], state.active[done],
                         ~state.stuck[done]))
        if n_done == state.live.numel():
            state.live = state.live[:0]
            return False
        state.keep(~done)
    new_cap = cap_for(n_max)
    if new_cap > state.cap:
        state.pad_slots(new_cap)
    return True


def _solve_eqp(state: _ActiveSets, ridge: float, every: int):
    """Step 1 of an active-set iteration (Niculae et al. 2018, Sec. 3.2; Nocedal & Wright 1999,
    Sec. 16.4): the equality-constrained QP on each chain's active set A, max_{xi_A, sum xi_A = 1}
    c_A . xi_A - 1/2 ||M_A xi_A||^2, through its KKT system [[Q_A, 1], [1^T, 0]] [xi; tau] =
    [c_A; 1] (:func:`_kkt`; ``ridge`` for an affinely dependent A).  Solved only for the chains
    whose A changed since their last solve (``fresh``; every chain on a device, keeping the old
    solution where A did not change).  Returns ``(xi_hat, tau)``, the EQP's weights and multiplier."""
    cap = state.cap
    n = state.live.numel()
    if every == 1:
        idx = state.fresh.nonzero().squeeze(1)
        if 0 < idx.numel() < n:
            active = state.active[idx]
            K = _kkt(state.Q[idx], active, ridge)
            rhs = torch.cat([state.c[idx] * active, state.theta.new_ones(idx.numel(), 1)], -1)
            sol = torch.linalg.solve(K, rhs)
            state.sol_x[idx], state.sol_tau[idx] = sol[:, :cap] * active, sol[:, cap]
        elif idx.numel():
            rhs = torch.cat([state.c * state.active, state.theta.new_ones(n, 1)], -1)
            sol = torch.linalg.solve(_kkt(state.Q, state.active, ridge), rhs)
            state.sol_x, state.sol_tau = sol[:, :cap] * state.active, sol[:, cap]
    else:
        rhs = torch.cat([state.c * state.active, state.theta.new_ones(n, 1)], -1)
        sol = torch.linalg.solve(_kkt(state.Q, state.active, ridge), rhs)
        state.sol_x = torch.where(state.fresh[:, None], sol[:, :cap] * state.active, state.sol_x)
        state.sol_tau = torch.where(state.fresh, sol[:, cap], state.sol_tau)
    return state.sol_x, state.sol_tau


def _add_most_violating(state: _ActiveSets, stationary: torch.Tensor, xi_hat: torch.Tensor,
                        tau: torch.Tensor, transition: float, tol: float, every: int) -> None:
    """Step 2a, for the chains ``stationary`` on their active set (the EQP solution is the current
    point; Niculae et al. 2018, Sec. 3.2): the most violated optimality condition comes from the
    MAP oracle at the gradient, s* = argmax_s c_s - m_s . mu with mu = E_xi[m_s] (a Viterbi pass
    with unary scores theta + 1 - 2 mu); its gain c_s* - m_s* . mu - tau > ``tol`` adds s* to A
    (its slot, score and Gram row), otherwise the chain is optimal and stops.  A chain whose set is
    full (or whose s* is already in A) cannot add and stops unconverged (``stuck``)."""
    D = state.theta.shape[1]
    n = state.live.numel()
    rows = torch.arange(n, device=state.theta.device)
    Z, active = state.Z, state.active
    mu = torch.bmm(state.xi[:, None], Z)[:, 0]  # (N, D) marginal P(z_d = 1)
    u = state.theta + 1 - 2 * mu
    if every == 1 and transition != 0 and D > 1:  # the scan only where it is needed
        sel = stationary.nonzero().squeeze(1)
        z_star, v = u.new_zeros(n, D), u.new_zeros(n)
        z_star[sel], v[sel] = chain_viterbi(u[sel], transition)
    else:
        z_star, v = chain_viterbi(u, transition)
    gain = v - (1 - mu).sum(-1) - tau  # c_s* - m_s*.mu - tau
    n1_star = z_star.sum(-1)
    zz = torch.bmm(z_star[:, None], Z.transpose(1, 2))[:, 0]  # (a row-vector bmm: fast)
    q = 2 * zz - state.n1 - n1_star[:, None] + D  # D - Hamming(z*, slot)
    already = (active & (q == D)).any(-1)
    free = ~active
    want = stationary & (gain > tol) & ~already
    add = want & free.any(-1)
    state.stuck = state.stuck | (want & ~add)
    state.done = state.done | (stationary & ~add)
    slot = free.to(torch.int8).argmax(-1)
    at = add[:, None] & (state.slots == slot[:, None])  # (N, cap): the new structure's slot
    Z[rows, slot] = torch.where(add[:, None], z_star, Z[rows, slot])
    q = torch.where(at, float(D), q)
    Q = state.Q
    Q[rows, slot] = torch.where(add[:, None], q, Q[rows, slot])
    Q[rows, :, slot] = torch.where(add[:, None], q, Q[rows, :, slot])
    c_star = _chain_scores(z_star[:, None], state.theta, transition)[:, 0]
    state.c = torch.where(at, c_star[:, None], state.c)
    state.n1 = torch.where(at, n1_star[:, None], state.n1)
    state.active = active | at
    state.fresh = state.fresh | add
    state.xi = torch.where(stationary[:, None], xi_hat, state.xi)


def _step_to_blocking(state: _ActiveSets, move: torch.Tensor, step: torch.Tensor) -> None:
    """Step 2b, for the chains ``move`` not stationary on their active set (Niculae et al. 2018,
    Sec. 3.2; Nocedal & Wright 1999, Sec. 16.4): move xi towards the EQP solution, xi + alpha
    step with the largest alpha <= 1 that keeps every weight >= 0; a weight that reaches zero
    first (alpha < 1) is the blocking constraint, and its structure leaves A.  Returns the chains
    that took the full step (alpha = 1): they now sit at the EQP solution of an unchanged A."""
    xi, active = state.xi, state.active
    neg = active & (step < 0)
    ratio = torch.where(neg, -xi / torch.where(neg, step, -torch.ones_like(step)),
                        torch.full_like(step, math.inf))
    a_block, j = ratio.min(-1)
    alpha = a_block.clamp(max=1.0)
    xi = torch.where(move[:, None], xi + alpha[:, None] * step, xi)
    drop = move & (a_block < 1)
    out = drop[:, None] & (state.slots == j[:, None])
    state.xi = torch.where(out, 0.0, xi)
    state.active = active & ~out
    state.fresh = state.fresh | drop
    return move & ~drop


def _assemble(finished: list):
    """The chains' final ``(xi, Z, active, converged)`` in their original order, padded to the
    widest slot dimension used (bookkeeping: chains left the working set at different times)."""
    cap = max(f[1].shape[1] for f in finished)
    order = torch.cat([f[0] for f in finished]).argsort()
    xi, Z, active = (torch.cat([_pad_slots(f[k], cap, (1,)) for f in finished])[order]
                     for k in (1, 2, 3))
    converged = torch.cat([f[4] for f in finished])[order]
    return xi, Z, active, converged


def _polish(xi, Z, active, theta, transition):
    """The final weights: the EQP re-solved on the final (affinely independent) active set
    without the ridge (Niculae et al. 2018, Sec. 3.2, Step 1 exactly), kept where it solves and
    agrees with the iterate to 1e-6, then clipped to >= 0 on A and renormalised onto the simplex."""
    N = theta.shape[0]
    cap = Z.shape[1]
    rhs = torch.cat([_chain_scores(Z, theta, transition) * active, theta.new_ones(N, 1)], -1)
    exact, info = torch.linalg.solve_ex(_kkt(_gram(Z), active, 0.0), rhs)
    exact = exact[:, :cap] * active
    ok = (info == 0) & torch.isfinite(exact).all(-1) & ((exact - xi).abs().amax(-1) < 1e-6)
    xi = torch.where(ok[:, None], exact, xi)
    xi = xi.clamp_min(0) * active
    return xi / xi.sum(-1, keepdim=True)


def sparsemap_chain_solve(theta: torch.Tensor, transition: float, max_iter: int = 50,
                          tol: float = 1e-9, ridge: float = 1e-10, sync_every: int = 0):
    """SparseMAP (Niculae et al. 2018, Eq. 4-6) on binary chains by the active-set method (Sec. 3.2).

    Solves max_{xi in simplex} sum_s xi_s c_s - 1/2 ||sum_s xi_s m_s||^2 over structures s in
    {0,1}^D, c_s their chain score, m_s the one-hot unary indicator; only the unary part is
    regularised (as in the paper's structured case).  Vectorised over the N chains, each with its
    own padded active set of at most S = min(max_iter + 1, D + 2) slots (an affinely independent
    active set has at most D + 1 structures; one addition beyond that is degenerate and followed by
    a removal); a chain that wants to add a structure to a full set stops unconverged.  The Python
    loop runs over active-set iterations only (at most max_iter + 2 S).  Computed in float64
    without gradient.  Returns ``(xi, Z, active, converged)``: weights ``(N, S')``, structures
    ``(N, S', D)``, slot mask ``(N, S')`` and a ``(N,)`` flag; S' <= S is the number of slots used
    (structures sit in the first free slot, so slots past S' would all be empty).

    The steps, each a function: start from each chain's MAP structure
    (:func:`_initial_active_sets`); then per iteration solve the EQP on the active sets
    (:func:`_solve_eqp`), and where the solution is the current point add the most violating
    structure or stop (:func:`_add_most_violating`), elsewhere step towards it until a weight
    blocks (:func:`_step_to_blocking`); finally re-solve the EQP exactly (:func:`_polish`).  The
    state of the chains still running is one :class:`_ActiveSets`.

    Cost.  The Gram matrix Q = D - Hamming of the slots is updated by one row per addition rather
    than recomputed, and the KKT matrix built from it alone; the KKT system of a chain is re-solved
    only when its active set changed, and a chain that takes the full step looks for its next
    structure in the same iteration (it sits at the EQP solution of its unchanged set); the slot
    dimension grows with the largest active set instead of being padded to S; finished chains leave
    the batch.  That bookkeeping (:func:`_retire_and_grow`) reads the state on the host every
    ``sync_every`` iterations (0: every iteration on the CPU, where it is free and also lets an
    iteration skip the half of the update no chain needs; every 8 on other devices, where chains
    that finished in between stay frozen and rows are masked rather than selected).  The result
    does not depend on it.
    """
    theta = theta.detach().double()
    N, D = theta.shape
    dev = theta.device
    S = min(max_iter + 1, D + 2, 2 ** min(D, 30))
    if N == 0:
        return (theta.new_zeros(0, 1), theta.new_zeros(0, 1, D),
                torch.zeros(0, 1, dtype=torch.bool, device=dev),
                torch.ones(0, dtype=torch.bool, device=dev))
    every = sync_every or (1 if dev.type == "cpu" else 8)  # iterations between host reads
    step_cap = 8  # the slot dimension grows in chunks of 8

    def cap_for(n_max):  # slots needed for the next ``every`` iterations (<= 1 addition each)
        return min(S, -(-(n_max + every) // step_cap) * step_cap)

    state = _initial_active_sets(theta, transition, cap_for(1))
    finished = []  # (rows, xi, Z, active, converged) of chains that left the working set
    for it in range(max_iter + 2 * S):  # each addition may be followed by removals
        if it % every == 0 and not _retire_and_grow(state, finished, cap_for):
            break
        xi_hat, tau = _solve_eqp(state, ridge, every)
        step = xi_hat - state.xi
        stationary = step.abs().amax(-1) < tol
        st, move = ~state.done & stationary, ~state.done & ~stationary
        state.fresh = torch.zeros_like(state.done)
        if every > 1 or bool(move.any()):  # (on the CPU, skip what no chain needs: it is free to ask)
            # a chain that takes the full step is stationary on its unchanged A (the next solve
            # would return the same xi_hat and tau): it looks for a structure to add at once,
            # which halves the iterations (an addition used to take a step, then an addition)
            st = st | _step_to_blocking(state, move, step)
        if every > 1 or bool(st.any()):
            _add_most_violating(state, st, xi_hat, tau, transition, tol, every)
    if state.live.numel():  # the iteration budget ran out: these chains did not converge
        finished.append((state.live, state.xi, state.Z, state.active, state.done & ~state.stuck))
    xi, Z, active, converged = _assemble(finished)
    return _polish(xi, Z, active, theta, transition), Z, active, converged


class SparseMAPChain(torch.autograd.Function):
    """theta ``(N, D)`` -> SparseMAP weights over the active structures of each binary chain.

    Outputs ``(xi, Z, active)``; only xi is differentiable.  Backward is the SparseMAP Jacobian on
    the active set (Niculae et al. 2018, Sec. 3.3): with K = [[M_A^T M_A, 1], [1^T, 0]], the
    vector-Jacobian product w.r.t. the structure scores c_A is the first block of K^{-1} [g_A; 0]
    (= (Z - Z 1 1^T Z / 1^T Z 1) g_A, Z = (M_A^T M_A)^{-1}), and dc_s/dtheta = z_s.
    """

    @staticmethod
    def forward(ctx, theta, transition, max_iter):
        xi, Z, active, done = sparsemap_chain_solve(theta, transition, max_iter)
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
        K = _kkt(_gram(Z), active, 0.0)
        rhs = torch.cat([g_xi.double() * active, Z.new_zeros(N, 1)], -1)
        g_c = torch.linalg.solve(K, rhs)[:, :S] * active
        g_theta = torch.einsum("ns,nsd->nd", g_c, Z)
        return g_theta.to(g_xi.dtype), None, None


class SparseMAP(_Deterministic):
    """SparseMAP marginalisation over a binary chain (Niculae, Martins, Blondel & Cardie 2018,
    "SparseMAP: Differentiable sparse structured inference", ICML, Eq. 4-6; active-set solver of
    Sec. 3.2; marginalisation as in Correia et al. 2020, Sec. 3.2).

    The D Bernoulli cells of one event (all event dims flattened, row-major) form a chain with
    score(z) = sum_d logit_d z_d + transition * sum_d z_d z_{d+1} (``transition`` > 0 favours
    contiguous rationales; a bare Bernoulli is a chain of length 1 per cell).  Objective optimised:
    E_{s ~ xi}[f(s)] = sum_s xi_s f(s), where xi is the SparseMAP distribution over structures,
    the sparse solution of max_xi sum_s xi_s score(s) - 1/2 ||E_xi[m_s]||^2 (m_s the one-hot unary
    indicators).  The active set has at most D+1 structures, so f is marginalised exactly over a
    handful of structures: zero variance, and the structured argmax is recovered when one
    structure dominates.  With transition 0 and D = 1 this is sparsemax over [0, logit].  Biased for
    E_{Bernoulli(sigmoid(logits))}[f].  Backward: the SparseMAP Jacobian (Sec. 3.3) through
    :class:`SparseMAPChain`.  ``n_evals`` = padded active-set size actually evaluated.
    """

    name = "sparsemap"
    families = frozenset({"bernoulli"})
    unbiased = False
    paper = ("Niculae, Martins, Blondel & Cardie (2018), SparseMAP: Differentiable sparse "
             "structured inference, ICML, Eq. 4-6, Sec. 3.2")
    options = {
        "transition": Option(0.0, "chain score bonus for consecutive z_d = z_{d+1} = 1 (|transition| "
                                  "<= 1000: a score on the logits' scale, where 1000 already "
                                  "outweighs any logit a float32 sigmoid resolves; 1e300 overflows "
                                  "the active-set solve)",
                             constraint=constraints.interval(-1e3, 1e3)),
        "max_iter": Option(1000, "active-set budget: at most min(max_iter + 1, D + 2) structures "
                           "at once and max_iter + 2 x that iterations (a chain pays only for what "
                           "it uses; 50, the old default, leaves long chains unconverged)",
                           constraint=constraints.positive_integer),
    }

    def _estimate(self, dist, f, n, context, family):
        base, k = fam.unwrap(dist)
        logits = base.logits
        batch = tuple(dist.batch_shape)
        cells = tuple(logits.shape[logits.dim() - k:])
        D = math.prod(cells)
        theta = logits.reshape(-1, D)  # (N, D): one chain per batch element (per cell if bare)
        xi, Z, active = SparseMAPChain.apply(theta, float(self.config["transition"]),
                                             int(self.config["max_iter"]))
        # bring active slots first and drop the slots no chain uses
        order = (~active).to(torch.int8).argsort(dim=-1, stable=True)
        S = int(active.sum(-1).max())
        idx = order[:, :S]
        xi = xi.gather(1, idx)
        Z = Z.gather(1, idx[:, :, None].expand(-1, -1, D))
        z = Z.permute(1, 0, 2).reshape(S, *logits.shape)
        fz = check_f_output(f(z), S, dist.batch_shape, self.name)
        w = xi.t().reshape(S, *batch)
        expectation = (w * fz).sum(0)
        return Estimate(expectation.sum(), expectation.detach(), S)


# ------------------------------------------------------------------------------------------------
# SPIGOT
# ------------------------------------------------------------------------------------------------
def argmax_onehot(logits: torch.Tensor, family: str) -> torch.Tensor:
    """The structured argmax: logits > 0 for Bernoulli cells, one-hot of the argmax for categorical."""
    if family == "bernoulli":
        return (logits > 0).to(logits.dtype)
    return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)


def spigot_pseudo_gradient(z_hat, grad_z, eta, family):
    """Ascent-direction SPIGOT pseudo-gradient of the scores (Peng, Thomson & Smith 2018, Eq. 5-7).

    With L = -f the loss SPIGOT descends, p = Proj(z_hat - eta * dL/dz) = Proj(z_hat + eta * df/dz)
    and dL/dscores := z_hat - p, so the ascent direction for f is p - z_hat.  The projection is
    onto the simplex per cell (sparsemax(v) is exactly Proj_simplex(v)); a Bernoulli cell's
    2-class simplex in the z coordinate is the interval [0, 1].
    """
    target = z_hat + eta * grad_z
    p = target.clamp(0.0, 1.0) if family == "bernoulli" else sparsemax(target, dim=-1)
    return p - z_hat


class _SpigotConnector(torch.autograd.Function):
    """Zero-valued scalar whose backward sends ``G * pseudo_gradient`` to the scores.

    SPIGOT's backward is a *nonlinear* map of the downstream gradient, so it is evaluated once in
    the forward pass with the ascent convention of the surrogate; the connector then makes the
    estimate linear in the incoming gradient G, so differentiating +surrogate (measurement) and
    -surrogate (training) gives exactly opposite gradients.
    """

    @staticmethod
    def forward(ctx, scores, pseudo):
        ctx.save_for_backward(pseudo)
        return scores.new_zeros(())

    @staticmethod
    def backward(ctx, G):
        (pseudo,) = ctx.saved_tensors
        return G * pseudo, None


class Spigot(_Deterministic):
    """SPIGOT, straight-through with a projection (Peng, Thomson & Smith 2018, "Backpropagating
    through structured argmax using a SPIGOT", ACL, Eq. 5-7).

    Forward: f is evaluated once at the argmax z_hat (logits > 0 per Bernoulli cell, one-hot argmax
    per categorical cell).  Backward: with g = df/dz at z_hat, the target p = Proj_simplex(z_hat +
    eta * g) (a gradient step on the loss -f, projected back onto the feasible polytope) and the
    pseudo-gradient of the scores is p - z_hat (SPIGOT's z_hat - p for the loss).  The projection
    keeps the update inside the simplex, which is what distinguishes it from straight-through
    (whose pseudo-gradient is g itself).  Objective: none exactly -- it is the heuristic ascent
    direction for f(argmax(logits)); deterministic, zero variance, biased for E_q[f].  f must be
    differentiable in z.  ``n_evals`` = 1; ``n_samples`` is ignored.
    """

    exceeds_budget = ""  # one evaluation of f, at the argmax
    name = "spigot"
    families = DISCRETE
    unbiased = False
    paper = ("Peng, Thomson & Smith (2018), Backpropagating through structured argmax using a "
             "SPIGOT, ACL, Eq. 5-7")
    options = {"eta": Option(1.0, "step size of the projected pseudo-update",
                             constraint=constraints.positive)}

    def _estimate(self, dist, f, n, context, family):
        base, _ = fam.unwrap(dist)
        logits = base.logits
        z_hat = argmax_onehot(logits.detach(), family)
        z = z_hat.unsqueeze(0).requires_grad_()
        fz = check_f_output(f(z), 1, dist.batch_shape, self.name)
        (g,) = torch.autograd.grad(fz.sum(), z, retain_graph=True, allow_unused=True)
        g = torch.zeros_like(z_hat) if g is None else g[0]
        pseudo = spigot_pseudo_gradient(z_hat, g, self.config["eta"], family)
        surrogate = fz.sum() + _SpigotConnector.apply(logits, pseudo.detach())
        return Estimate(surrogate, fz.detach()[0], 1)
