"""Multi-sample score-function estimators: VIMCO and MuProp.

VIMCO optimises the multi-sample bound log mean_k exp f(z_k) with per-sample leave-one-out
baselines; MuProp keeps E[f] and uses a first-order Taylor expansion of f around the mean-field
point as a control variate whose expectation is known in closed form.
"""
from __future__ import annotations

import math

import torch

from .base import Estimate, Estimator, check_f_output
from .score_function import score_function_surrogate
from . import families as fam

ALL = frozenset({"bernoulli", "categorical", "gaussian"})


def vimco_signals(fz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, signal): the bound L = log mean_k exp f_k per batch element and the learning signals
    L - L(-j), where L(-j) replaces f_j by the mean of the other K-1 f-values (the geometric mean
    of their exp), Mnih & Rezende 2016, Eq. 9-10.  ``fz`` is detached, shape (K, *batch).

    Computed stably with logsumexp over a (K, K, *batch) table whose row j is f with its j-th
    entry replaced (no Python loop over samples)."""
    K = fz.shape[0]
    logK = math.log(K)
    L = torch.logsumexp(fz, 0) - logK
    loo_mean = (fz.sum(0, keepdim=True) - fz) / (K - 1)  # (K, *batch): mean of the others
    eye = torch.eye(K, dtype=torch.bool, device=fz.device).reshape(K, K, *([1] * (fz.dim() - 1)))
    table = torch.where(eye, loo_mean.unsqueeze(1), fz.unsqueeze(0))  # [j, i]
    L_minus = torch.logsumexp(table, 1) - logK
    return L, L - L_minus


class VIMCO(Estimator):
    """VIMCO (Mnih & Rezende 2016, "Variational inference for Monte Carlo objectives", ICML,
    Eq. 9-10).

    Objective: the K-sample bound L = log (1/K) sum_k exp f(z_k), z_k i.i.d. from q -- NOT E[f].
    Gradient: sum_j (L - L(-j)) grad log q(z_j) + sum_j w_j grad f(z_j), w = softmax(f), where the
    baseline L(-j) is L with f(z_j) replaced by the mean of the other f-values.  Why it works: L(-j)
    does not depend on z_j, so it leaves the gradient of E[L] unbiased, and it tracks L closely, so
    the per-sample signal is the *marginal contribution* of sample j rather than the whole noisy L
    that every sample would otherwise share.

    Biased for E[f]: ``unbiased = False``.  The harness measures its gradient against the reference
    gradient of E[f], so its 'bias' column includes the change of objective (E[L] != E[f]); it is
    unbiased for grad E[L] (checked by enumeration in tests/test_antithetic.py).  ``value`` is the
    multi-sample bound estimate L, not a mean of f.  Needs K = n_samples >= 2; K evaluations.
    """

    name = "vimco"
    families = ALL
    unbiased = False
    paper = ("Mnih & Rezende (2016), Variational inference for Monte Carlo objectives, ICML, "
             "Eq. 9-10")
    min_samples = 2

    def _estimate(self, dist, f, n, context, family):
        z = dist.sample((n,))
        fz = check_f_output(f(z), n, dist.batch_shape, self.name)
        L, signal = vimco_signals(fz.detach())
        logq = fam.log_prob(dist, z.detach())
        # sum (not mean) over samples: L depends on all K of them; the logsumexp term gives f's
        # parameters their pathwise gradient sum_j w_j grad f(z_j)
        surrogate = (signal * logq).sum(0).sum() + (torch.logsumexp(fz, 0) - math.log(n)).sum()
        return Estimate(surrogate, L, n)


def mean_field(dist, family) -> torch.Tensor:
    """mu = E[z], attached to the distribution's parameters: sigmoid / softmax of the logits, or loc."""
    p = fam.params(dist)
    if family == "bernoulli":
        return torch.sigmoid(p["logits"])
    if family == "categorical":
        return torch.softmax(p["logits"], -1)
    return p["loc"]


class MuProp(Estimator):
    """MuProp (Gu, Levine, Sutskever & Mnih 2016, "MuProp: Unbiased backpropagation for
    stochastic neural networks", ICLR, Eq. 5-7).

    A first-order Taylor expansion of f around the mean-field point mu = E[z] is the control variate:

        grad E[f] = E[(f(z) - f(mu) - f'(mu).(z - mu)) grad log q(z)] + f'(mu) . d mu/d params,

    the second term being the exact gradient of the control variate's expectation
    (E[f(mu) + f'(mu).(z - mu)] with mu held fixed in f, f' is linear in z).  Unbiased for any f;
    why it helps: the residual f(z) - taylor(z) is small where f is close to linear, so the
    score-function term carries only f's curvature, while the linear part is backpropagated.
    Requires f to be defined (and differentiable) at the continuous point mu; if f has no gradient
    there, f'(mu) = 0 and MuProp reduces to REINFORCE with baseline f(mu).

    Budget: one of the n evaluations is f(mu) (made in the same call of f as the samples), the
    other n-1 are samples; hence ``min_samples = 2``.  For the Gaussian family mu = loc (the same
    construction).
    """

    name = "muprop"
    families = ALL
    unbiased = True
    paper = ("Gu, Levine, Sutskever & Mnih (2016), MuProp: Unbiased backpropagation for stochastic "
             "neural networks, ICLR, Eq. 5-7")
    min_samples = 2

    def _estimate(self, dist, f, n, context, family):
        m = n - 1
        mu = mean_field(dist, family)
        mu_leaf = mu.detach().requires_grad_(True)
        z = dist.sample((m,)).detach()
        with torch.enable_grad():
            out = check_f_output(f(torch.cat([mu_leaf.unsqueeze(0), z], 0)), n,
                                 dist.batch_shape, self.name)
            f_mu, fz = out[0], out[1:]
            if f_mu.requires_grad:
                (df,) = torch.autograd.grad(f_mu.sum(), mu_leaf, retain_graph=True, allow_unused=True)
            else:
                df = None
        df = torch.zeros_like(mu_leaf) if df is None else df.detach()
        ev = tuple(range(-len(dist.event_shape), 0))
        lin = (df * (z - mu_leaf.detach()))
        lin = lin.sum(ev) if ev else lin
        signal = fz.detach() - f_mu.detach() - lin
        surrogate = score_function_surrogate(dist, z, fz, signal) + (df * mu).sum()
        return Estimate(surrogate, fz.detach().mean(0), n)
