"""Antithetic (coupled-pair) estimators for binary latents: ARM and DisARM (DisARM also for
categorical latents via stick-breaking).

Both draw one uniform vector u per pair and evaluate f at the two *antithetic* binary vectors

    b  = 1[u < sigma(phi)],      b~ = 1[1 - u < sigma(phi)]   (= 1[u > sigma(-phi)]),

each an exact sample of Bernoulli(sigma(phi)), but negatively correlated.  The learning signal is
the difference f(b) - f(b~), so any offset of f cancels without a baseline.  They spend two
f-evaluations per pair (``sample_unit = 2``); a budget of n averages n/2 independent pairs, and
both f-evaluations of all pairs go into one call of f.

The core is :func:`antithetic_pairs` (the coupled draw) and one pure weight function per
estimator; :func:`logit_surrogate` turns a detached estimate g of d/dlogits into the surrogate

    sum(stopgrad(g) * logits) + sum_batch mean_samples f(z),

whose gradient is g for the logits (and anything upstream of them, e.g. an encoder) and the
pathwise gradient mean_n grad f(z_n) for parameters inside f (a decoder); the f term gives the
logits nothing because the binary samples carry no gradient.
"""
from __future__ import annotations

import torch

from .base import Estimate, Estimator, check_f_output
from . import families as fam


def antithetic_pairs(logits: torch.Tensor, m: int):
    """m coupled pairs: (u, b, b~), each of shape ``(m, *logits.shape)``, without gradient."""
    lg = logits.detach()
    u = torch.rand((m, *lg.shape), dtype=lg.dtype, device=lg.device)
    p = torch.sigmoid(lg)
    b = (u < p).to(lg.dtype)
    bt = (1.0 - u < p).to(lg.dtype)
    return u, b, bt


def arm_weight(diff, u, b, bt, logits):
    """ARM (Yin & Zhou 2019, Theorem 1): g = (f(b~) - f(b)) (u - 1/2), per coordinate.

    ``diff`` = f(b) - f(b~), already broadcast over the event dims."""
    return -diff * (u - 0.5)


def disarm_weight(diff, u, b, bt, logits):
    """DisARM (Dong, Mnih & Tucker 2020, Eq. 5 and its multivariate form, Sec. 3.1):
    g_i = 1/2 (f(b) - f(b~)) (-1)^{b~_i} 1[b_i != b~_i] sigma(|phi_i|).

    f is the *joint* function of the whole vectors b and b~; only the weight is per coordinate."""
    sign = 1.0 - 2.0 * bt
    differ = (b != bt).to(diff.dtype)
    return 0.5 * diff * sign * differ * torch.sigmoid(logits.detach().abs())


def stick_breaking_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits eta (..., K-1) of the K-1 stick-breaking decisions of a categorical (..., K):
    class k is chosen at step k with probability p_k / sum_{j>=k} p_j given steps < k declined,
    so eta_k = l_k - logsumexp(l_{k+1:}) (Dong, Mnih & Tucker 2021, stick-breaking coupling).
    Attached to the logits."""
    tail = torch.logcumsumexp(logits.flip(-1), -1).flip(-1)  # tail[k] = logsumexp(l_{k:})
    return logits[..., :-1] - tail[..., 1:]


def stick_breaking_one_hot(b: torch.Tensor) -> torch.Tensor:
    """The one-hot category of K-1 binary stick-breaking decisions b (..., K-1): the first k with
    b_k = 1, or the last class K-1 if none.  With b_k ~ Bernoulli(sigmoid(eta_k)) independent, this
    is an exact sample of the categorical (later decisions are ignored)."""
    declined = torch.cumprod(1.0 - b, -1)  # prod_{j<=k} (1 - b_j)
    before = torch.cat([torch.ones_like(b[..., :1]), declined[..., :-1]], -1)
    return torch.cat([b * before, declined[..., -1:]], -1)


def logit_surrogate(logits, g, fz):
    """Surrogate with gradient ``g`` for the logits and the pathwise gradient of mean f for f's
    parameters (``fz`` of shape (n, *batch_shape), attached to f's graph)."""
    return (g.detach() * logits).sum() + fz.mean(0).sum()


class _Antithetic(Estimator):
    """Shared body: m = n/2 coupled pairs, one call of f on both halves, weight, average."""

    families = frozenset({"bernoulli"})
    unbiased = True
    sample_unit = 2
    min_samples = 2

    @staticmethod
    def weight(diff, u, b, bt, logits):  # pragma: no cover - abstract
        raise NotImplementedError

    def _estimate(self, dist, f, n, context, family):
        logits = fam.params(dist)["logits"]
        if family == "categorical":  # K-1 binary decisions per categorical, f joint over all
            logits = stick_breaking_logits(logits)
        m = n // 2
        u, b, bt = antithetic_pairs(logits, m)
        z = torch.cat([b, bt], 0)
        if family == "categorical":
            z = stick_breaking_one_hot(z)
        fz = check_f_output(f(z), n, dist.batch_shape, self.name)
        fd = fz.detach()
        # f(b) - f(b~) per pair, broadcast over the event dims of the latent (for a categorical the
        # class dim K of the event lines up with the K-1 decisions)
        diff = (fd[:m] - fd[m:]).reshape(m, *dist.batch_shape, *([1] * len(dist.event_shape)))
        g = self.weight(diff, u, b, bt, logits).mean(0)
        return Estimate(logit_surrogate(logits, g, fz), fd.mean(0), n)


class ARM(_Antithetic):
    """ARM, Augment-REINFORCE-Merge (Yin & Zhou 2019, "ARM: Augment-REINFORCE-Merge gradient for
    stochastic binary networks", ICLR, Theorem 1):

        d/dphi E[f(z)] = E_u[ (f(1[u > sigma(-phi)]) - f(1[u < sigma(phi)])) (u - 1/2) ].

    Why it has low variance: the two evaluations are antithetic (u and 1-u), so f's offset cancels
    and f(b) - f(b~) is zero whenever the pair agrees.  Unbiased.  Spends 2 f-evaluations per
    pair; a budget of n averages n/2 independent pairs."""

    name = "arm"
    paper = "Yin & Zhou (2019), ARM: Augment-REINFORCE-Merge gradient, ICLR, Theorem 1"
    weight = staticmethod(arm_weight)


class DisARM(_Antithetic):
    """DisARM (Dong, Mnih & Tucker 2020, "DisARM: An antithetic gradient estimator for binary
    latent variables", NeurIPS, Eq. 5 and Sec. 3.1 for the multivariate case):

        g_i = 1/2 (f(b) - f(b~)) (-1)^{b~_i} 1[b_i != b~_i] sigma(|phi_i|).

    Why it beats ARM: it is ARM with the augmenting uniform u integrated out given the pair,
    DisARM = E[ARM | b, b~] (Rao-Blackwellisation), so Var(DisARM) <= Var(ARM) at the same cost;
    coordinates where the pair agrees get exactly zero weight.  Unbiased.  2 f-evaluations per
    pair; a budget of n averages n/2 pairs.

    Categorical latents use the stick-breaking construction of Dong, Mnih & Tucker (2021),
    "Coupled gradient estimators for discrete latent variables", NeurIPS (stick-breaking coupling):
    a K-way choice is the first success among K-1 independent binary decisions with logits
    eta_k = l_k - logsumexp(l_{k+1:}); DisARM is applied to all decisions of the event jointly and
    the chain rule through eta(l) gives the logits' gradient.  Still exactly unbiased (it is binary
    DisARM on f o stick_breaking); the paper's variance-reducing ordering of the categories by
    probability is not implemented (the natural class order is used)."""

    name = "disarm"
    paper = ("Dong, Mnih & Tucker (2020), DisARM: An antithetic gradient estimator for binary latent "
             "variables, NeurIPS, Eq. 5 / Sec. 3.1; categorical: Dong, Mnih & Tucker (2021), Coupled "
             "gradient estimators for discrete latent variables, NeurIPS (stick-breaking)")
    families = frozenset({"bernoulli", "categorical"})
    weight = staticmethod(disarm_weight)
