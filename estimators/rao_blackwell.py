"""Rao-Blackwellised estimators for discrete latents: sum-and-sample, IndeCateR and Gumbel-Rao.

Rao-Blackwellisation replaces a random quantity by its conditional expectation given part of the
randomness; by the law of total variance this never increases variance and keeps the mean.

* :class:`SumAndSample` sums exactly over the k most probable joint configurations and samples only
  the remainder (Liu et al. 2019).
* :class:`IndeCateR` sums, for every sample and every independent categorical cell, over that
  cell's K classes with the other cells held fixed (De Smet et al. 2023).
* :class:`GumbelRao` averages the straight-through Gumbel-Softmax backward pass over the Gumbel
  noise *conditional on the hard sample* (Paulus et al. 2021).

The helpers work on *cells*: an event of ``Independent(Bernoulli | OneHotCategorical, r)`` is a grid
of independent discrete cells; a Bernoulli cell is a 2-class cell (class 1 = "z = 1").
"""
from __future__ import annotations

import math

import torch
from torch.distributions import constraints
import torch.nn.functional as F
from torch import distributions as D

from .base import Estimate, Estimator, Option, check_f_output
from . import families as fam
from .relaxed import straight_through

DISCRETE = frozenset({"bernoulli", "categorical"})


# ---- cells ------------------------------------------------------------------------------------
def cell_layout(dist):
    """``(batch_shape, cell_shape, K)``: the event of ``dist`` is ``cell_shape`` independent cells of
    K classes each (K = 2 for Bernoulli)."""
    base, _ = fam.unwrap(dist)
    B = tuple(dist.batch_shape)
    cells = tuple(base.batch_shape[len(B):])
    K = 2 if fam.family_of(dist) == "bernoulli" else int(base.event_shape[-1])
    return B, cells, K


def cell_logits(dist, family):
    """Normalised log-probabilities of every cell, shape ``(*batch_shape, D, K)`` (differentiable)."""
    base, _ = fam.unwrap(dist)
    B, cells, K = cell_layout(dist)
    Dn = math.prod(cells)
    if family == "bernoulli":
        l = base.logits.expand(base.batch_shape)
        lp = torch.stack([F.logsigmoid(-l), F.logsigmoid(l)], -1)
    else:
        lp = torch.log_softmax(base.logits.expand(*base.batch_shape, K), -1)
    return lp.reshape(*B, Dn, K)


def indices_to_events(idx, family, cells, K, dtype):
    """Class indices ``(..., D)`` -> events ``(..., *cells)`` (Bernoulli) / ``(..., *cells, K)``."""
    lead = idx.shape[:-1]
    if family == "bernoulli":
        return idx.to(dtype).reshape(*lead, *cells)
    return F.one_hot(idx, K).to(dtype).reshape(*lead, *cells, K)


# ---- top-k joint configurations ----------------------------------------------------------------
def top_k_configurations(lp, k):
    """The k most probable joint configurations of independent cells, without enumerating K^D.

    ``lp``: cell log-probabilities ``(*B, D, K)``; returns ``(scores (*B, k), idx (*B, k, D))``
    sorted by decreasing joint log-probability.  Joint scores are sums over cells, so the top-k of
    the union of two cell groups lies in (top-k of group 1) x (top-k of group 2); merging adjacent
    groups pairwise gives the exact top-k in ceil(log2 D) vectorised rounds of k^2 candidates.
    ``k`` must not exceed K^D.
    """
    *B, Dn, K = lp.shape
    P = 1 << max(Dn - 1, 0).bit_length()  # cells padded to a power of two with 1-class dummies
    if P > Dn:
        pad = lp.new_full((*B, P - Dn, K), float("-inf"))
        pad[..., 0] = 0.0
        lp = torch.cat([lp, pad], -2)
    scores, idx = lp.topk(min(k, K), dim=-1)  # (*B, G, L)
    cfg = idx.unsqueeze(-1)  # (*B, G, L, cells per group)
    while scores.shape[-2] > 1:
        a, b = scores[..., 0::2, :], scores[..., 1::2, :]
        L = a.shape[-1]
        scores, flat = (a.unsqueeze(-1) + b.unsqueeze(-2)).flatten(-2).topk(min(k, L * L), dim=-1)
        i, j = flat // L, flat % L
        ca, cb = cfg[..., 0::2, :, :], cfg[..., 1::2, :, :]
        c = ca.shape[-1]
        cfg = torch.cat([ca.gather(-2, i.unsqueeze(-1).expand(*i.shape, c)),
                         cb.gather(-2, j.unsqueeze(-1).expand(*j.shape, c))], -1)
    return scores[..., 0, :k], cfg[..., 0, :k, :Dn]


def sample_complement(lp, S, m):
    """m exact samples of q conditioned on z not in the set S, and the mass R = q(not S).

    ``lp``: cell log-probs ``(*B, D, K)`` (detached); ``S``: distinct configurations ``(*B, k, D)``.
    Rejection-free: the complement of S is the disjoint union, over the nodes p (prefixes of length
    d) of the trie of S, of the cylinders {z : z_<d = p, z_d not a child of p, z_>d free}, whose
    masses are q(p) * q_d(not children).  Choose a cylinder by mass, then sample cell d from q_d
    restricted to the non-children and the later cells from q.  Returns ``(idx (m, *B, D), R (*B))``.
    """
    *B, Dn, K = lp.shape
    k = S.shape[-2]
    eq = S.unsqueeze(-2) == S.unsqueeze(-3)  # (*B, k, k, D): S_i[j] == S_i'[j]
    ones = torch.ones_like(eq[..., :1])
    pe = torch.cat([ones, eq[..., :-1].long().cumprod(-1).bool()], -1)  # same prefix of length d
    onehot = F.one_hot(S, K).bool()  # (*B, k, D, K)
    excl = (pe.unsqueeze(-1) & onehot.unsqueeze(-4)).any(-3)  # children of node (i, d): (*B, k, D, K)
    earlier = torch.ones(k, k, dtype=torch.bool, device=S.device).tril(-1).unsqueeze(-1)
    first = ~(pe & earlier).any(-2)  # node (i, d) counted once: no earlier i' shares the prefix
    q = lp.exp()
    keep = (q.unsqueeze(-3) * (~excl)).sum(-1)  # q_d(not children), exactly 0 if all excluded
    lpS = lp.unsqueeze(-3).expand(*B, k, Dn, K).gather(-1, S.unsqueeze(-1)).squeeze(-1)
    prefix_lp = lpS.cumsum(-1) - lpS
    mass = (prefix_lp.exp() * keep * first).flatten(-2)  # (*B, k*D)
    R = mass.sum(-1)
    safe = torch.where((R > 0).unsqueeze(-1), mass, torch.ones_like(mass))  # R = 0: weight 0 anyway
    piece = D.Categorical(probs=safe).sample((m,))  # (m, *B)
    i, d = piece // Dn, piece % Dn
    prefix = S.expand(m, *S.shape).gather(-2, i[..., None, None].expand(*i.shape, 1, Dn)).squeeze(-2)
    cell_lp = lp.expand(m, *lp.shape).gather(-2, d[..., None, None].expand(*d.shape, 1, K)).squeeze(-2)
    ex = excl.flatten(-3, -2).expand(m, *B, k * Dn, K)
    ex = ex.gather(-2, piece[..., None, None].expand(*piece.shape, 1, K)).squeeze(-2)
    ex = ex & ~ex.all(-1, keepdim=True)
    r = D.Categorical(logits=cell_lp.masked_fill(ex, float("-inf"))).sample()  # (m, *B)
    free = D.Categorical(logits=lp).sample((m,))  # (m, *B, D)
    pos = torch.arange(Dn, device=S.device)
    d_ = d.unsqueeze(-1)
    idx = torch.where(pos < d_, prefix, torch.where(pos == d_, r.unsqueeze(-1), free))
    return idx, R


class SumAndSample(Estimator):
    """Sum-and-sample (Liu, Regier, Tripuraneni, Jordan & McAuliffe 2019, "Rao-Blackwellized
    stochastic gradients for discrete distributions", ICML, Eq. 4-6).

    With C_k the k most probable joint configurations (found exactly by a pairwise top-k merge over
    independent cells, never enumerating K^D) and Q = q(C_k),

        grad E[f] = sum_{u in C_k} grad[q(u)] f(u)  +  (1 - Q) E_{z ~ q | not C_k}[f(z) grad log q(z)].

    The first part is exact; REINFORCE is only applied to the remainder, drawn exactly and without
    rejection from q restricted to the complement.  It is the conditional expectation of plain
    REINFORCE given "which of the k summed configurations, or the remainder", so its variance is no
    larger, and it vanishes as the remainder mass 1 - Q -> 0 (k = full support is exact).
    With ``baseline`` the q-weighted mean f of the summed configurations, b, is subtracted from the
    sampled f-values and the induced shift b * grad(1 - Q) is added back analytically, keeping the
    estimate unbiased while removing any offset of f.  Budget: k summed + (n - k) sampled
    evaluations (n > k); when k covers the whole support only those K^D evaluations are spent.
    """

    name = "sum_and_sample"
    families = DISCRETE
    unbiased = True
    paper = ("Liu, Regier, Tripuraneni, Jordan & McAuliffe (2019), Rao-Blackwellized stochastic "
             "gradients for discrete distributions, ICML, Eq. 4-6")
    options = {
        "k": Option(1, "number of most probable joint configurations summed exactly",
                    constraint=constraints.positive_integer),
        "baseline": Option(True, "use the summed configurations' mean f as an (exactly corrected) "
                                 "baseline for the sampled remainder"),
    }
    min_samples = 2

    def skip(self, dist, n_samples):
        k = self.config["k"]
        if n_samples <= k:
            return (f"estimator 'sum_and_sample' sums k={k} configurations and samples the rest: "
                    f"n_samples={n_samples} must exceed k (at least {k + 1})")
        return None

    def _estimate(self, dist, f, n, context, family):
        B, cells, K = cell_layout(dist)
        lp = cell_logits(dist, family).detach()
        Dn = lp.shape[-2]
        C = K ** Dn
        k = min(self.config["k"], C)
        _, S = top_k_configurations(lp, k)  # (*B, k, D)
        dtype = lp.dtype
        z_top = indices_to_events(S.movedim(-2, 0), family, cells, K, dtype)  # (k, *B, ...)
        if k < C:
            m = n - k
            idx, R = sample_complement(lp, S, m)
            z_rem = indices_to_events(idx, family, cells, K, dtype)
            z = torch.cat([z_top, z_rem], 0)
        else:  # the whole support is summed: exact, remainder mass 0
            m, R, z = 0, lp.new_zeros(B), z_top
        fz = check_f_output(f(z), k + m, dist.batch_shape, self.name)
        f_top, f_rem = fz[:k], fz[k:]
        logq_top = dist.log_prob(z_top)  # (k, *B), differentiable
        q_top = logq_top.exp()
        summed = (q_top * f_top).sum(0)
        value = summed.detach()
        surrogate = summed.sum()
        if m:
            Q = q_top.sum(0)
            # the q-weighted mean of the summed f-values, computed from log-probabilities: with
            # many latents the top configurations' mass Q underflows and value / Q would be 0 / 0
            w = torch.softmax(logq_top.detach(), 0)
            b = (w * f_top.detach()).sum(0) if self.config["baseline"] else torch.zeros_like(value)
            logq = dist.log_prob(z_rem.detach())
            sampled = ((f_rem.detach() - b) * logq + f_rem).mean(0)
            surrogate = surrogate + (R * sampled - b * Q).sum()
            value = value + R * f_rem.detach().mean(0)
        return Estimate(surrogate, value, k + m)


# ---- IndeCateR ----------------------------------------------------------------------------------
class IndeCateR(Estimator):
    """IndeCateR (De Smet, Sansone & Zuidberg Dos Martires 2023, "Differentiable sampling of
    categorical distributions using the CatLog-Derivative trick", NeurIPS, Eq. 10-12).

    For independent categorical cells q(z) = prod_d q_d(z_d), the CatLog-derivative trick gives

        grad E[f] = sum_d E_{z ~ q}[ sum_{k=1..K} grad q_d(k) f(z with z_d = k) ],

    i.e. REINFORCE Rao-Blackwellised over each cell given the others: the sum over the K classes of
    cell d replaces the sampled z_d, so the variance due to z_d disappears from cell d's gradient,
    and since sum_k grad q_d(k) = 0 the estimate is invariant to an offset of f.  Each sample costs
    D*K evaluations (D cells, K classes; K = 2 for Bernoulli), all made in one call of f.  The budget
    is spent in whole samples: floor(n / (D*K)) of them; n < D*K is an error.
    """

    name = "indecater"
    families = DISCRETE
    unbiased = True
    paper = ("De Smet, Sansone & Zuidberg Dos Martires (2023), Differentiable sampling of categorical "
             "distributions using the CatLog-Derivative trick, NeurIPS, Eq. 10-12")
    def budget_unit(self, dist) -> int:
        _, cells, K = cell_layout(dist)
        return math.prod(cells) * K

    def skip(self, dist, n):
        _, cells, K = cell_layout(dist)
        Dn = math.prod(cells)
        unit = Dn * K
        if n < unit:
            return (f"estimator 'indecater' evaluates f at D*K points per sample (D={Dn} cells, K={K} "
                    f"classes, D*K={unit}): n_samples={n} must be at least D*K={unit}; the budget is "
                    f"spent in whole multiples of {unit}")
        return None

    def _estimate(self, dist, f, n, context, family):
        B, cells, K = cell_layout(dist)
        Dn = math.prod(cells)
        unit = Dn * K
        ns = n // unit
        lp = cell_logits(dist, family)  # (*B, D, K), differentiable
        probs = lp.exp()
        z = D.Categorical(logits=lp.detach()).sample((ns,))  # (ns, *B, D)
        nb = len(B)
        eye = torch.eye(Dn, dtype=torch.bool, device=z.device).reshape(Dn, 1, *([1] * nb), Dn)
        classes = torch.arange(K, device=z.device).reshape(1, K, *([1] * nb), 1)
        pts = torch.where(eye, classes, z[:, None, None])  # (ns, D, K, *B, D)
        ev = indices_to_events(pts.reshape(ns * unit, *B, Dn), family, cells, K, lp.dtype)
        fz = check_f_output(f(ev), ns * unit, dist.batch_shape, self.name)
        fz = fz.reshape(ns, Dn, K, *B).movedim(1, -1).movedim(1, -1)  # (ns, *B, D, K)
        grad_part = (probs * fz.detach()).sum((-1, -2)).mean(0)
        rb_value = (probs.detach() * fz).sum(-1).mean(-1).mean(0)  # per-cell RB estimates of E[f]
        return Estimate(grad_part.sum() + rb_value.sum(), rb_value.detach(), ns * unit)


# ---- Gumbel-Rao ---------------------------------------------------------------------------------
@torch.no_grad()
def conditional_gumbel(log_probs, hard, k):
    """k draws of Gumbel noise G with argmax(log_probs + G) = the one-hot ``hard`` (Paulus et al.
    2021, App. / Maddison, Tarlow & Minka 2014): with E ~ Exp(1) iid and normalised log-probs,
    the maximum is -log E_i and the others are -log(E_j / p_j + E_i).  Returns G, shape (k, *hard.shape).
    """
    E = torch.empty((k, *hard.shape), dtype=log_probs.dtype, device=log_probs.device).exponential_()
    logE = E.log()
    logEi = (hard * logE).sum(-1, keepdim=True)
    x = torch.where(hard.bool(), -logEi, -torch.logaddexp(logE - log_probs, logEi))
    return x - log_probs


@torch.no_grad()
def conditional_logistic(logits, hard, k):
    """k draws of the logistic noise L = G_1 - G_0 of a binary cell given its hard sample, the
    two-class case of :func:`conditional_gumbel` in one variable: D = 1 iff logits + L > 0, so
    L | D is a logistic truncated to (-logits, inf) (D = 1) or (-inf, -logits) (D = 0), drawn by
    its inverse CDF, L = logit(v), v = sigmoid(-logits) + u (1 - sigmoid(-logits)) resp.
    v = u sigmoid(-logits), u ~ U(0, 1) -- written in log space, stable for any logits.  One
    uniform per draw instead of two exponentials and a 2-wide softmax (a large share of a
    binary_vae step's time).  Returns L, shape (k, *hard.shape)."""
    u = torch.rand((k, *hard.shape), dtype=logits.dtype, device=logits.device)
    log_u, log_1mu = u.log(), torch.log1p(-u)
    log_p0, log_p1 = F.logsigmoid(-logits), F.logsigmoid(logits)
    on = hard.bool()
    log_v = torch.where(on, torch.logaddexp(log_p0, log_u + log_p1), log_u + log_p0)
    log_1mv = torch.where(on, log_1mu + log_p1, torch.logaddexp(log_1mu, log_u + log_p1))
    return log_v - log_1mv


def two_class_soft(lp, hard, k, tau):
    """The relaxed samples softmax((lp + G) / tau) of a two-class categorical, G ~ the Gumbel pair
    given the hard sample ``hard`` (one-hot, ..., 2), averaged over k draws -- computed as the binary
    Concrete in the categorical's own log-odds d = lp_1 - lp_0: class 1's entry is
    sigmoid((d + L) / tau) with L = G_1 - G_0 | hard, one truncated logistic per draw
    (:func:`conditional_logistic`), equal in law to the Gumbel pair's and a fraction of its
    elementwise work (the two exponentials, logaddexp and 2-wide softmax of
    :func:`conditional_gumbel` per draw).  Gradients reach ``lp`` through d.  Shape of ``hard``."""
    x = binary_concrete_logits(lp[..., 1] - lp[..., 0], hard[..., 1], k, tau)
    return torch.stack([torch.sigmoid(-x), torch.sigmoid(x)], -1).mean(0)


def binary_concrete_logits(d, hard, k, tau):
    """(d + L) / tau for k draws of L = G_1 - G_0 given the hard sample ``hard`` (0/1, one truncated
    logistic per draw, :func:`conditional_logistic`): the binary Concrete's logits of class 1 in
    the log-odds ``d``, conditioned on the sample; its sigmoid is the relaxed sample.  Gradients
    reach ``d``, not the noise.  Shape (k, *hard.shape)."""
    return (d + conditional_logistic(d.detach(), hard, k)) / tau


class GumbelRao(Estimator):
    """Gumbel-Rao (Paulus, Maddison & Krause 2021, "Rao-Blackwellizing the straight-through
    Gumbel-Softmax gradient estimator", ICLR, Eq. 7-9).

    Forward: an exact hard sample D ~ q, f evaluated once at D.  Backward: instead of the gradient
    of softmax((log p + G)/tau) at the single Gumbel draw G that produced D (ST-Gumbel), the average
    over k Gumbel draws from the conditional G | argmax = D.  That is a Monte Carlo version of
    E[ST-Gumbel gradient | D]: the same mean as st_gumbel (so the same bias for the discrete
    objective) and, by the law of total variance, no larger variance -- with no extra f evaluations.
    Bernoulli cells and two-class categoricals (poly_toy's) are computed as the binary Concrete:
    the conditional noise is one truncated logistic per draw (:func:`conditional_logistic`,
    :func:`two_class_soft`; equal in law).
    """

    name = "gumbel_rao"
    families = DISCRETE
    unbiased = False
    paper = ("Paulus, Maddison & Krause (2021), Rao-Blackwellizing the straight-through Gumbel-Softmax "
             "gradient estimator, ICLR, Eq. 7-9")
    options = {
        "k": Option(10, "conditional Gumbel draws averaged in the backward pass",
                    constraint=constraints.positive_integer),
        "temperature": Option(1.0, "relaxation temperature", constraint=constraints.positive),
    }

    def _estimate(self, dist, f, n, context, family):
        base, _ = fam.unwrap(dist)
        k, tau = self.config["k"], self.config["temperature"]
        if family == "bernoulli":
            # the binary Concrete: softmax over (0, 1) of (log p + G) / tau is
            # sigmoid((logits + G_1 - G_0) / tau), since log p_1 - log p_0 = logits
            l = base.logits
            hard = (torch.rand((n, *l.shape), dtype=l.dtype, device=l.device)
                    < torch.sigmoid(l.detach())).to(l.dtype)
            soft = torch.sigmoid(binary_concrete_logits(l, hard, k, tau)).mean(0)
        else:
            lp = torch.log_softmax(base.logits, -1)
            idx = D.Categorical(logits=lp.detach()).sample((n,))
            hard = F.one_hot(idx, lp.shape[-1]).to(lp.dtype)  # (n, *base batch, K)
            if lp.shape[-1] == 2:  # two classes: the binary Concrete in the log-odds
                soft = two_class_soft(lp, hard, k, tau)
            else:
                G = conditional_gumbel(lp.detach(), hard, k)
                soft = torch.softmax((lp + G) / tau, -1).mean(0)
        z = straight_through(hard, soft)
        fz = check_f_output(f(z), n, dist.batch_shape, self.name)
        return Estimate(fz.mean(0).sum(), fz.detach().mean(0), n)
