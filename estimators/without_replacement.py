"""Estimators from k samples *without replacement* of the joint latent: the unordered set estimator
and REINFORCE without replacement (Kool, van Hoof & Welling 2020, "Estimating gradients for
discrete random variables by sampling without replacement", ICLR; arXiv 2002.06043).

Why without replacement: k i.i.d. samples of a peaked distribution are often duplicates, so they
pay k evaluations of f for fewer than k distinct points.  k *distinct* configurations carry more
information; the price is that they are dependent, and the weights of an unbiased estimator then
need the probability of the unordered set.

* **Sampling.**  The Gumbel-top-k trick: perturb every joint log-probability phi(z) = log q(z)
  with an i.i.d. Gumbel, G_z = phi(z) + Gumbel(0); the k largest G_z are k samples without
  replacement (an ordered Plackett-Luce sample).  The joint has K^D configurations, so the top k are
  found by *stochastic beam search* (Kool, van Hoof & Welling 2019, "Stochastic beams and where to
  find them", ICML, Sec. 3 / Alg. 1): the cells are fixed one at a time; a partial configuration
  (a node of the trie of configurations) carries the maximum of its leaves' perturbed values, and
  its children's perturbed values are Gumbels conditioned on that maximum (:func:`shifted_gumbel`).
  A node whose maximum is not among the k largest of its level has no leaf in the top k, so keeping
  k nodes per level is exact: the result is *exactly* the Gumbel-top-k of the joint, in D vectorised
  steps of k*K candidates (:func:`stochastic_beam_search`).

* **The probability of an unordered set** (Kool et al. 2020, Sec. 2; the integral form is the one
  the authors' code integrates numerically, ``compute_log_R`` in their bernoulli/gumbel.py):
  S is the top-k set iff all of its perturbed values exceed the maximum over the rest D\\S, which
  is a Gumbel with location log p(D\\S).  Writing u for that maximum's CDF value,

      p(S) = int_0^1 prod_{s in S} (1 - u^{a_s}) du,        a_s = p(s) / p(D\\S).

  The leave-one-out probability p^{D\\{s}}(S\\{s}) of drawing the other k-1 from the domain without s
  is the same integral without the factor of s: renormalising the domain leaves p(s')/p(D\\S)
  unchanged, because the complement of S\\{s} in D\\{s} is still D\\S.  Likewise for leaving out
  two.  So every ratio the estimators need is a ratio of integrals of one family
  (:func:`set_log_integrals`).

* **Quadrature.**  With u = exp(-e^x) the integral becomes

      p(S) = int_R exp(x - e^x) prod_s (1 - exp(-a_s e^x)) dx,

  an *entire* function of x that decays like e^x on the left and like exp(-e^x) on the right.  For
  such integrands the trapezoidal rule on a uniform grid converges geometrically in the number of
  points (Trefethen & Weideman 2014, "The exponentially convergent trapezoidal rule", SIAM Review,
  Sec. 5), whatever the a_s -- tiny (p(D\\S) -> 1: the integrand is prod a_s e^{(k+1)x - e^x}, a
  bump at x = log(k+1)) or huge (p(D\\S) -> 0: it is e^{x - e^x} with a dent where a_s e^x ~ 1).
  The grid is fixed, x in [-36, log(k+1) + 3] with ``points`` nodes (default 256, spacing ~0.16
  for k <= 8): for x < 0 every factor is at most its value at 0, so the left tail beyond -36 is
  below e^{-36}/0.3 ~ 1e-15 of the integral; right of log(k+1) + 3 the factor exp(-e^x) is below
  exp(-20(k+1)).  Everything is in log space and in float64, and the factors are scaled by
  min(a_s, 1) before summing, so p(S) ~ k! prod a_s ~ e^{-1000} (200 Bernoulli latents) causes no
  underflow and the ratios suffer no cancellation; all k leave-one-out and k^2 leave-two-out
  integrals are one batched Gram matrix E^T diag(w) E over the grid.  The mass p(D\\S) itself is
  summed over the trie of S (:func:`complement_log_mass`), never as 1 - sum p(s), which cancels
  catastrophically when S holds almost all the mass.

Both estimators evaluate f at the k distinct configurations in one call and return

    surrogate = sum_b sum_{s in S} [ stopgrad(w_s (f(s) - b_s)) log q(s) + stopgrad(w_s) f(s) ]:

its gradient for the logits is the estimator, and for parameters inside f (a decoder) it is
sum_s w_s grad f(s) -- the same weighted combination that estimates E[f], so the decoder gets the
without-replacement estimate of E[grad f].  Both sets of weights sum to one: for the unordered set
estimator because p(S) = sum_s p(s) p^{D\\s}(S\\s) (condition on the first draw), so
sum_s p(s) R(S, s) = 1 exactly and the estimate of E[grad f] is an unbiased convex combination;
for REINFORCE without replacement by construction (self-normalised, hence biased).

When the joint support has C < n configurations (one Bernoulli cell: C = 2) both take all C of
them: the "sample" is then the whole support, the weights become exactly q(s) and the estimate is
the exact gradient, at C evaluations of f (fewer than the budget).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import constraints

from .base import Estimate, Estimator, Option, check_f_output
from . import families as fam
from .rao_blackwell import DISCRETE, cell_layout, cell_logits, indices_to_events

NEG_INF = float("-inf")
#: left end of the quadrature grid in x = log(-log u); see the module docstring
X_LO = -36.0


# ---- Gumbel helpers ---------------------------------------------------------------------------
def log_gumbel_tail(d: torch.Tensor) -> torch.Tensor:
    """log P(G > kappa) = log(1 - exp(-e^d)) for G ~ Gumbel(phi), d = phi - kappa (any real, +-inf).

    Also the log of one factor 1 - u^a of the set integral, with d = log a + x.  Written as
    d + :func:`log_gumbel_tail_excess` for small e^d (exact where 1 - exp(-e^d) underflows: d = -800
    is a rare configuration of 1000 binary cells) and directly otherwise."""
    return torch.where(d < -4.0, d + log_gumbel_tail_excess(d), torch.log(-torch.expm1(-torch.exp(d))))


def log_gumbel_tail_excess(d: torch.Tensor) -> torch.Tensor:
    """log((1 - exp(-y)) / y) with y = e^d, d <= 50 (clamp larger d first: the result is then -d).

    For y < e^-4 the series -y/2 + y^2/24 - y^4/2880 (next term y^6/181440 < 1e-17); otherwise
    log(-expm1(-y)) - d, whose log is accurate to ~1e-16 absolutely, all a sum of logs needs."""
    y = torch.exp(d)
    series = y * (y * (1.0 / 24 - y * y / 2880) - 0.5)
    return torch.where(d < -4.0, series, torch.log(-torch.expm1(-y)) - d)


def shifted_gumbel(G: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Gumbels ``G`` (..., K) re-drawn conditional on their maximum being ``T`` (...).

    If G_c ~ Gumbel(phi_c) independently with maximum Z, then g_c = -log(e^{-T} - e^{-Z} + e^{-G_c})
    are distributed as Gumbel(phi_c) conditioned on max_c g_c = T (Kool et al. 2019, Stochastic
    beams, Sec. 3; the argmax keeps its place and takes the value T exactly).  Written stably as
    g_c = T - softplus(T - G_c + log(1 - exp(G_c - Z))); log(-expm1(.)) is accurate to ~1e-16
    *absolutely* (all this sum needs) on the whole range.  -inf entries stay -inf."""
    Z = G.max(-1, keepdim=True).values
    T = T.unsqueeze(-1)
    return T - F.softplus(T - G + torch.log(-torch.expm1(G - Z)))


@torch.no_grad()
def stochastic_beam_search(lp: torch.Tensor, width: int):
    """The ``width`` largest Gumbel-perturbed joint log-probabilities of independent cells.

    ``lp``: normalised cell log-probabilities ``(*B, D, K)``.  Returns ``(idx, phi, g)``: class
    indices ``(*B, width, D)`` of distinct configurations, their joint log-probabilities and their
    perturbed values ``(*B, width)``, sorted by decreasing perturbed value -- in law exactly the
    Gumbel-top-``width`` of the joint (Kool et al. 2019, Alg. 1).  Requires width <= K^D.

    The root's perturbed value is a Gumbel(0) draw (the maximum over all leaves, since the joint
    log-probabilities log-sum-exp to 0), so the values are on the absolute scale that the
    threshold kappa of :class:`ReinforceWOR` needs.  Beams that do not exist yet (fewer than
    ``width`` partial configurations in the first cells) carry -inf and are never expanded.
    The loop over cells is structural (cell d's candidates depend on cell d-1's survivors); each
    step is a handful of batched ops on (*B, width, K) tensors.
    """
    *B, Dn, K = lp.shape
    W = width
    dev, dt = lp.device, lp.dtype
    # lp_d[c] + Gumbel noise for every cell, beam and class at once: G = phi_parent + this
    lp_noise = (lp.movedim(-2, 0).unsqueeze(-2)
                - torch.empty((Dn, *B, W, K), device=dev, dtype=dt).exponential_().log())
    phi = lp.new_full((*B, W), NEG_INF)
    phi[..., 0] = 0.0
    g = torch.full_like(phi, NEG_INF)
    g[..., 0] = -torch.empty(B, device=dev, dtype=dt).exponential_().log()
    flats = []
    for d in range(Dn):
        child_phi = phi.unsqueeze(-1) + lp.select(-2, d).unsqueeze(-2)  # (*B, W, K)
        child_g = shifted_gumbel(phi.unsqueeze(-1) + lp_noise[d], g)
        if K**d < W:  # some of the W beams do not exist yet: -inf - -inf = nan, mask it
            child_g = torch.where(torch.isfinite(g).unsqueeze(-1), child_g, NEG_INF)
        g, flat = child_g.flatten(-2).topk(W, dim=-1)
        phi = child_phi.flatten(-2).gather(-1, flat)
        flats.append(flat)
    flats = torch.stack(flats)  # (D, *B, W): parent * K + class of each survivor
    parents, actions = flats // K, flats % K
    # backtrack the trie from the leaves: O(W D) gathers, no (W, D) copy per level
    idx = torch.empty((*B, W, Dn), dtype=torch.long, device=dev)
    beam = torch.arange(W, device=dev).expand(*B, W)
    for d in range(Dn - 1, -1, -1):
        idx[..., d] = actions[d].gather(-1, beam)
        beam = parents[d].gather(-1, beam)
    return idx, phi, g


@torch.no_grad()
def complement_log_mass(lp: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """log q(D\\S): the log-mass of every configuration outside the set S, ``(*B)``.

    ``lp``: cell log-probabilities ``(*B, D, K)``; ``S``: distinct configurations ``(*B, k, D)``.
    The complement is the disjoint union, over the nodes (prefixes z_<d) of the trie of S, of the
    cylinders {z_<d = prefix, z_d not a child of the prefix in S}, of mass q(prefix) q_d(not
    children) (the decomposition :func:`estimators.rao_blackwell.sample_complement` samples from).
    A log-sum-exp of positive terms: accurate to the last digit even when S holds all but 1e-30 of
    the mass, where 1 - sum_s q(s) is rounding noise.  -inf when S is the whole support."""
    *B, Dn, K = lp.shape
    k = S.shape[-2]
    same = S.unsqueeze(-2) == S.unsqueeze(-3)  # (*B, i, j, D): S_i[d] == S_j[d]
    ones = torch.ones_like(same[..., :1])
    prefix = torch.cat([ones, same[..., :-1].long().cumprod(-1).bool()], -1)  # share z_<d
    onehot = F.one_hot(S, K).to(lp.dtype)  # (*B, j, D, K)
    # class c is a child of node (i, d) iff some j shares i's prefix of length d and has z_d = c
    children = torch.einsum("...ijd,...jdc->...idc", prefix.to(lp.dtype), onehot) > 0
    earlier = torch.ones(k, k, dtype=torch.bool, device=S.device).tril(-1).unsqueeze(-1)
    first = ~(prefix & earlier).any(-2)  # count node (i, d) once: no earlier j shares the prefix
    lpS = lp.unsqueeze(-3).expand(*B, k, Dn, K).gather(-1, S.unsqueeze(-1)).squeeze(-1)
    prefix_lp = lpS.cumsum(-1) - lpS
    rest_cell = torch.logsumexp(lp.unsqueeze(-3).masked_fill(children, NEG_INF), -1)  # (*B, k, D)
    terms = (prefix_lp + rest_cell).masked_fill(~first, NEG_INF)
    return torch.logsumexp(terms.flatten(-2), -1)


# ---- the set integrals ------------------------------------------------------------------------
def _integrals(log_p: torch.Tensor, log_rest: torch.Tensor, points: int):
    """Trapezoidal sums over x = log(-log u) of the set integrals (module docstring).

    Returns ``(c, shift, J0, J1, J2)`` with, for the integrand's factors f_s = 1 - u^{a_s},
    c_s = min(log a_s, 0) and scaled factors f_s / e^{c_s}:
      p(S)                = exp(sum c + shift) J0
      p^{D\\s}(S\\s)        = exp(sum c - c_s + shift) J1[s]
      p^{D\\s,s'}(S\\{s,s'}) = exp(sum c - c_s - c_s' + shift) J2[s, s']   (s != s').
    """
    k = log_p.shape[-1]
    points = max(points, 16 * k)  # the strip bound's constant grows like c^k (module docstring)
    x = torch.linspace(X_LO, math.log(k + 1) + 3.0, points, dtype=log_p.dtype, device=log_p.device)
    log_h = math.log((math.log(k + 1) + 3.0 - X_LO) / (points - 1))
    log_a = log_p - log_rest.unsqueeze(-1)  # +inf when S is the whole support
    c = log_a.clamp(max=0.0)
    # d = log a + x, clamped where the factor 1 - exp(-e^d) is 1 to the last bit (and a = inf)
    d = (log_a.unsqueeze(-2) + x.unsqueeze(-1)).clamp(max=50.0)  # (*B, M, k)
    # log f_s - c_s = log((1 - e^-y)/y) + (d - c_s), with d - c_s = x exactly when a_s <= 1: a
    # bounded number, no e^-1000 underflow for p(D\S) -> 1, no cancellation for p(D\S) -> 0
    ell = log_gumbel_tail_excess(d) + torch.where((log_a <= 0).unsqueeze(-2), x.unsqueeze(-1), d)
    base = x - torch.exp(x) + ell.sum(-1) + log_h  # (*B, M)
    shift = base.max(-1).values
    w = torch.exp(base - shift.unsqueeze(-1))
    E = torch.exp(-ell)  # dividing one factor out; <= e^36 on this grid
    J0 = w.sum(-1)
    J1 = torch.einsum("...m,...mk->...k", w, E)
    J2 = torch.einsum("...mk,...m,...ml->...kl", E, w, E)
    return c, shift, J0, J1, J2


def set_log_integrals(log_p: torch.Tensor, log_rest: torch.Tensor, points: int = 256):
    """(log p(S), log p^{D\\s}(S\\s) for each s, log p^{D\\s,s'}(S\\{s,s'}) for each pair) of the
    unordered set with joint log-probabilities ``log_p`` (..., k) and complement log-mass
    ``log_rest`` (...): the set-probability integral of Kool et al. 2020 (Sec. 2) and its
    leave-one-out / leave-two-out forms.
    Shapes (...), (..., k), (..., k, k); the diagonal of the last is the leave-one-out value."""
    c, shift, J0, J1, J2 = _integrals(log_p.double(), log_rest.double(), points)
    sc = c.sum(-1) + shift
    l0 = sc + J0.log()
    l1 = sc.unsqueeze(-1) - c + J1.log()
    l2 = sc[..., None, None] - c.unsqueeze(-1) - c.unsqueeze(-2) + J2.log()
    eye = torch.eye(l1.shape[-1], dtype=torch.bool, device=l1.device)
    return l0, l1, torch.where(eye, l1.unsqueeze(-1), l2)


def unordered_set_weights(log_p: torch.Tensor, log_rest: torch.Tensor, points: int = 256):
    """The weights of the unordered set estimator with its built-in baseline.

    Returns ``(w, V)``: w_s = p(s) R(S, s), R(S, s) = p^{D\\s}(S\\s) / p(S) the leave-one-out ratio
    (Kool et al. 2020, Theorem 1), shape (..., k); and the baseline weights
    V[s, s'] = p(s') R^{D\\s}(S, s'), R^{D\\s}(S, s') = p^{D\\s,s'}(S\\{s,s'}) / p^{D\\s}(S\\s) the
    second-order ratio (Theorem 4 / Eq. 15), with V[s, s] = p(s) (R^{D\\s}(S, s) = 1, the convention
    that makes the baseline sum_s' V[s, s'] f(s') = p(s) f(s) + (1 - p(s)) * [the unordered set
    estimate of E[f | z != s] from the other k-1], an unbiased estimate of E[f] that does not use
    z = s as a random draw).  Computed from the trapezoidal sums directly, so the shared factors
    exp(sum c + shift) cancel exactly; float64.
    """
    log_p, log_rest = log_p.double(), log_rest.double()
    c, _, J0, J1, J2 = _integrals(log_p, log_rest, points)
    # log p(s) - c_s: = log p(D\S) when a_s <= 1 (exactly, not by subtraction), else log p(s)
    lp_c = torch.where(c < 0, log_rest.unsqueeze(-1).expand_as(log_p), log_p)
    w = torch.exp(lp_c + J1.log() - J0.log().unsqueeze(-1))
    V = torch.exp(lp_c.unsqueeze(-2) + J2.log() - J1.log().unsqueeze(-1))
    eye = torch.eye(log_p.shape[-1], dtype=torch.bool, device=log_p.device)
    V = torch.where(eye, log_p.exp().unsqueeze(-1), V)
    return w, V


def unordered_set_signal(fz: torch.Tensor, w: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """w_s (f(s) - sum_s' V[s, s'] f(s')): the factor of grad log q(s) in Kool et al. 2020,
    Theorem 4 / Eq. 15.  ``fz``, ``w``: (..., k); ``V``: (..., k, k)."""
    baseline = (V * fz.unsqueeze(-2)).sum(-1)
    return w * (fz - baseline)


def reinforce_wor_weights(log_p: torch.Tensor, kappa: torch.Tensor, normalise: str = "total"):
    """The weights of REINFORCE without replacement, ``(w, u)`` (..., k): w_s multiplies
    grad log q(s) (f(s) - B) and u_s = iw_s / W gives the baseline B = sum_s u_s f(s).

    iw_s = p(s) / q(s, kappa), where q(s, kappa) = P(G_s > kappa) = 1 - exp(-exp(phi_s - kappa)) is
    the probability that s beats the threshold kappa, the (k+1)-th largest perturbed log-probability
    (Kool, van Hoof & Welling 2019, Stochastic beams, Sec. 4; Buy 4 REINFORCE samples, Eq. 5); the
    unnormalised iw_s estimate any expectation without bias.  ``normalise``: "total" divides by
    W = sum_s iw_s (u = w); "leave_one_out" divides sample s by W - iw_s + p(s) (Buy 4 REINFORCE
    samples, Eq. 11, as implemented in storchastic's ScoreFunctionWOR).  kappa = -inf (the sample is
    the whole support) gives q = 1 and w = u = p(s)."""
    log_iw = log_p - log_gumbel_tail(log_p - kappa.unsqueeze(-1))
    u = torch.softmax(log_iw, -1)
    if normalise == "total":
        return u, u
    # iw_s / (W - iw_s + p_s) = u_s / (1 - u_s + p_s / W), everything relative to W
    p_over_W = torch.exp(log_p - torch.logsumexp(log_iw, -1, keepdim=True))
    return u / (1 - u + p_over_W), u


# ---- estimators -------------------------------------------------------------------------------
class _WithoutReplacement(Estimator):
    """Shared body: k distinct joint configurations by stochastic beam search, one call of f, the
    weights of the subclass, the surrogate of the module docstring."""

    families = DISCRETE
    min_samples = 2
    #: beams beyond the k evaluated ones (1: REINFORCE without replacement needs kappa)
    extra_beams = 0

    def weights(self, phi, g, k, lp, S, fd):  # pragma: no cover - abstract
        """``(w, signal, value)``, float64, (*B, k), (*B, k), (*B): the weight of f(s) (for the value
        and the decoder), the factor of grad log q(s), and the estimate of E[f], from the beam's
        joint log-probabilities ``phi`` and perturbed values ``g`` (*B, width), the cell
        log-probabilities ``lp``, the sample ``S`` (*B, k, D) and its f-values ``fd`` (*B, k)."""
        raise NotImplementedError

    def _estimate(self, dist, f, n, context, family):
        B, cells, K = cell_layout(dist)
        lp = cell_logits(dist, family).detach().double()
        Dn = lp.shape[-2]
        C = K**Dn  # a Python int: exact even for 2^200
        k = min(n, C)
        idx, phi, g = stochastic_beam_search(lp, min(k + self.extra_beams, C))
        S = idx[..., :k, :]
        z = indices_to_events(S.movedim(-2, 0), family, cells, K, fam.params(dist)["logits"].dtype)
        fz = check_f_output(f(z), k, dist.batch_shape, self.name)
        logq = fam.log_prob(dist, z)  # (k, *B), attached to the logits
        fd = fz.detach().movedim(0, -1).double()  # (*B, k)
        w, signal, value = self.weights(phi, g, k, lp, S, fd)
        dtype = logq.dtype
        w, signal = w.movedim(-1, 0).to(dtype), signal.movedim(-1, 0).to(dtype)
        surrogate = (signal * logq + w * fz).sum()
        return Estimate(surrogate, value.to(fz.dtype), k)


class UnorderedSet(_WithoutReplacement):
    """The unordered set estimator with its built-in baseline (Kool, van Hoof & Welling 2020,
    "Estimating gradients for discrete random variables by sampling without replacement", ICLR,
    Sec. 3, Theorem 4 / Eq. 15 of arXiv:2002.06043; the estimator without baseline is Theorem 1):

        grad E[f] ~ sum_{s in S} grad[q(s)] R(S, s) ( f(s) - sum_{s' in S} q(s') R^{D\\s}(S, s') f(s') ),

    where S holds k distinct joint configurations drawn without replacement (Gumbel-top-k over the
    joint, by stochastic beam search over the cells), R(S, s) = p^{D\\s}(S\\s)/p(S) the leave-one-out
    ratio and R^{D\\s}(S, s') = p^{D\\s,s'}(S\\{s,s'})/p^{D\\s}(S\\s) the second-order one (R^{D\\s}(S, s)
    = 1), all from the set-probability integral by an exponentially convergent quadrature (module
    docstring).  Why it works: sum_s q(s) R(S, s) g(s) is the Rao-Blackwellisation of the single-sample
    estimate g(z_1) over the order of the sample (Sec. 3), hence unbiased for E[g] with no more
    variance (and its weights sum to one); the baseline for s is an unbiased estimate of E[f] from the other samples that is
    independent of s being drawn, so it leaves the estimator unbiased (Theorem 4) and removes any
    offset of f.  With p(D\\S) -> 1 (huge joint spaces) q(s) R(S, s) -> 1/k and the baseline -> the mean
    of the others: RLOO's weights; with k = the whole support it is the exact gradient.  Unbiased.
    Spends k = n evaluations (min(n, K^D)), all in one call of f.
    """

    name = "unordered_set"
    unbiased = True
    paper = ("Kool, van Hoof & Welling (2020), Estimating gradients for discrete random variables by "
             "sampling without replacement, ICLR, Theorem 4 / Eq. 15 (built-in baseline), Theorem 1; "
             "sampling: Kool, van Hoof & Welling (2019), Stochastic beams and where to find them, "
             "ICML, Alg. 1")
    options = {
        "points": Option(256, "trapezoidal nodes of the set-probability integral (in x = log(-log u))",
                         constraint=constraints.integer_interval(16, 1 << 16)),
    }

    def weights(self, phi, g, k, lp, S, fd):
        log_rest = complement_log_mass(lp, S)
        w, V = unordered_set_weights(phi[..., :k], log_rest, self.config["points"])
        return w, unordered_set_signal(fd, w, V), (w * fd).sum(-1)


class ReinforceWOR(_WithoutReplacement):
    """REINFORCE without replacement with its built-in baseline (Kool, van Hoof & Welling 2019,
    "Buy 4 REINFORCE samples, get a baseline for free!", ICLR DeepRLStructPred workshop, the
    normalised estimator; compared against in Kool, van Hoof & Welling 2020, ICLR, Sec. 4):

        grad E[f] ~ sum_{s in S} w_s grad log q(s) ( f(s) - B ),   B = sum_{s' in S} u_s' f(s'),
        u_s = iw_s / W,   iw_s = q(s) / q(s, kappa),   W = sum_{s' in S} iw_s',

    with w = u (``normalise="total"``, the default) or w_s = iw_s / (W - iw_s + q(s))
    (``normalise="leave_one_out"``, Eq. 11 of the workshop paper).  S is the top k of the
    Gumbel-perturbed joint log-probabilities and kappa the (k+1)-th largest one (a stochastic beam
    search of width k+1: k+1 perturbed values, k evaluations of f); q(s, kappa) =
    1 - exp(-exp(phi_s - kappa)) is the probability that s clears kappa.  Why it works: the
    *unnormalised* iw_s give an unbiased estimate of any expectation over S (the importance-weighted
    estimator, whose Rao-Blackwellisation is the unordered set estimator, Kool et al. 2020, Sec. 3).
    Normalising by W makes B a weighted average of the sampled f-values, so f's offset cancels
    exactly and the variance drops -- but W is random, and the ratio estimator is biased for finite
    k (consistent as k grows; exact when k covers the support, kappa = -inf).  Hence
    ``unbiased = False``.  ``value`` is the self-normalised B, and the decoder's weights are u.  Spends k = n
    evaluations (min(n, K^D)), all in one call of f.
    """

    name = "reinforce_wor"
    unbiased = False
    paper = ("Kool, van Hoof & Welling (2019), Buy 4 REINFORCE samples, get a baseline for free!, "
             "ICLR DeepRLStructPred workshop (normalised importance weights, Eq. 5-6, 11); "
             "Kool, van Hoof & Welling (2020), ICLR, Sec. 4; sampling: Stochastic beams and where "
             "to find them, ICML 2019, Alg. 1")
    options = {
        "normalise": Option("total", "normaliser of sample s's importance weight: the total W, or "
                                     "W - iw_s + q(s) (leave_one_out, workshop Eq. 11)",
                            choices=("total", "leave_one_out")),
    }
    extra_beams = 1

    def weights(self, phi, g, k, lp, S, fd):
        kappa = g[..., k] if g.shape[-1] > k else torch.full_like(g[..., 0], NEG_INF)
        w, u = reinforce_wor_weights(phi[..., :k], kappa, self.config["normalise"])
        value = (u * fd).sum(-1)
        return u, w * (fd - value.unsqueeze(-1)), value
