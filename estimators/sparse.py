"""Sparse and structured surrogates of E_q[f]: sparsemax/entmax marginalisation, SparseMAP, SPIGOT.

None of these estimates the gradient of the original objective E_{softmax(logits)}[f]: sparsemax and
SparseMAP replace the distribution by a sparse one and marginalise f *exactly* over its (small)
support; SPIGOT keeps the argmax and invents a pseudo-gradient.  They are deterministic (zero
variance) and biased; the harness measures that bias against the exact gradient of E_q[f].
"""
from __future__ import annotations

import math
import warnings

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
        "max_configs": Option(2**12, "largest padded number of support configurations per event",
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
def chain_viterbi(u: torch.Tensor, transition: float):
    """MAP of score(z) = sum_d u_d z_d + transition * sum_d z_d z_{d+1} over z in {0,1}^D.

    ``u``: ``(N, D)``.  Returns ``(z, value)``: ``(N, D)`` in u's dtype and ``(N,)``.  Vectorised
    over N; the loop runs over the chain length only.  Ties go to 0.
    """
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


def _chain_scores(Z, theta, transition):
    """Full score c_s = theta . z_s + transition * sum_d z_sd z_s,d+1 of structures ``(N, S, D)``."""
    c = torch.einsum("nsd,nd->ns", Z, theta)
    if Z.shape[-1] > 1:
        c = c + transition * (Z[..., :-1] * Z[..., 1:]).sum(-1)
    return c


def _kkt(Z, active, ridge):
    """KKT matrix [[Q_A, 1], [1^T, 0]] of the equality-constrained QP on each active set.

    Q_ij = m_i . m_j with the one-hot unary vectors m = (1 - z, z) per position, i.e. D - Hamming.
    Inactive slots get an identity row (so their weight solves to 0).  ``ridge`` regularises a
    (degenerate) affinely dependent active set: the solution then steps along the null direction.
    """
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


def sparsemap_chain_solve(theta: torch.Tensor, transition: float, max_iter: int = 50,
                          tol: float = 1e-9, ridge: float = 1e-10):
    """SparseMAP (Niculae et al. 2018, Eq. 4-6) on binary chains by the active-set method (Sec. 3.2).

    Solves max_{xi in simplex} sum_s xi_s c_s - 1/2 ||sum_s xi_s m_s||^2 over structures s in
    {0,1}^D, c_s their chain score, m_s the one-hot unary indicator; only the unary part is
    regularised (as in the paper's structured case).  Vectorised over the N chains, each with its
    own padded active set; the Python loop runs over active-set iterations only.  Computed in
    float64 without gradient.  Returns ``(xi, Z, active, converged)``: weights ``(N, S)``,
    structures ``(N, S, D)``, slot mask ``(N, S)``, and a ``(N,)`` flag.
    """
    theta = theta.detach().double()
    N, D = theta.shape
    # an affinely independent active set has at most D + 1 structures (m_s spans a D-dim affine
    # space); one addition beyond that is degenerate and followed by a removal: D + 2 slots suffice
    S = min(max_iter + 1, D + 2, 2 ** min(D, 30))
    Z = theta.new_zeros(N, S, D)
    active = torch.zeros(N, S, dtype=torch.bool, device=theta.device)
    xi = theta.new_zeros(N, S)
    Z[:, 0], _ = chain_viterbi(theta, transition)
    active[:, 0] = True
    xi[:, 0] = 1.0
    done = torch.zeros(N, dtype=torch.bool, device=theta.device)
    stuck = torch.zeros_like(done)
    rows = torch.arange(N, device=theta.device)
    for _ in range(max_iter + 2 * S):  # each addition may be followed by removals
        c = _chain_scores(Z, theta, transition)
        K = _kkt(Z, active, ridge)
        rhs = torch.cat([c * active, theta.new_ones(N, 1)], -1)
        sol = torch.linalg.solve(K, rhs)
        xih, tau = sol[:, :S] * active, sol[:, S]
        step = xih - xi
        stationary = step.abs().amax(-1) < tol
        # (a) stationary on the current set: add the most violating structure, or stop
        mu = (xi[:, :, None] * Z).sum(1)  # (N, D) marginal P(z_d = 1)
        z_star, v = chain_viterbi(theta + 1 - 2 * mu, transition)
        gain = v - (1 - mu).sum(-1) - tau  # c_s* - m_s*.mu - tau
        already = ((Z == z_star[:, None]).all(-1) & active).any(-1)
        free = ~active
        want = ~done & stationary & (gain > tol) & ~already
        add = want & free.any(-1)
        stuck = stuck | (want & ~add)
        newly_done = ~done & stationary & ~add
        slot = free.to(torch.int8).argmax(-1)
        Z[rows[add], slot[add]] = z_star[add]
        active[rows[add], slot[add]] = True
        # (b) not stationary: move towards the EQP solution until a weight hits zero
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
    # polish: re-solve the EQP on the final (affinely independent) active set without the ridge
    rhs = torch.cat([_chain_scores(Z, theta, transition) * active, theta.new_ones(N, 1)], -1)
    exact, info = torch.linalg.solve_ex(_kkt(Z, active, 0.0), rhs)
    exact = exact[:, :S] * active
    ok = (info == 0) & torch.isfinite(exact).all(-1) & ((exact - xi).abs().amax(-1) < 1e-6)
    xi = torch.where(ok[:, None], exact, xi)
    xi = xi.clamp_min(0) * active
    xi = xi / xi.sum(-1, keepdim=True)
    return xi, Z, active, done & ~stuck


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
        K = _kkt(Z, active, 0.0)
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
        "transition": Option(0.0, "chain score bonus for consecutive z_d = z_{d+1} = 1"),
        "max_iter": Option(50, "maximum active-set additions (raise for long chains)",
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
