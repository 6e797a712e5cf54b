"""Corrected straight-through estimators: ReinMax and the gapped straight-through (GST).

Both forward an exact discrete sample D ~ q and change only what the backward pass sees, so f is
only ever evaluated at discrete points, once per sample; both are biased for the discrete objective
(the harness measures how much against the exact gradient).  The core of each is a pure function
of (logits, sample) returning the tensor to feed f, whose value is the sample and whose gradient is
the estimator's, written as the paper writes it.

Bernoulli latents are the two-class case: a Bernoulli with logit l is the categorical with logits
(0, l) and z the indicator of the second class, so one function serves both families (the gradient
reaching l is the same, because the one-hot's two coordinates move in opposite directions).
"""
from __future__ import annotations

import torch
from torch.distributions import constraints

from . import families as fam
from .base import Option
from .relaxed import DISCRETE, _Pathwise


def reinmax(logits: torch.Tensor, sample: torch.Tensor, temperature: float) -> torch.Tensor:
    """ReinMax (Liu, Dong, Liu, Yu & Gao 2023, NeurIPS, Algorithm 2): a second-order
    (Heun's method) approximation of the gradient of E_q[f(D)] in place of ST's first-order one.

        pi_0 = softmax(theta)
        pi_1 = (D + softmax(theta / tau)) / 2,  carried as softmax(sg(log pi_1 - theta) + theta)
        pi_2 = 2 pi_1 - pi_0 / 2
        return D + pi_2 - sg(pi_2)

    The forward value is the one-hot sample D; the backward is J(pi_1)^T 2 df/dD - J(pi_0)^T
    df/dD / 2, with J(p) = diag(p) - p p^T the softmax Jacobian at p.  ``logits`` (..., C) and
    ``sample`` (n, ..., C) one-hot."""
    pi0 = torch.softmax(logits, -1)
    pi1 = (sample + torch.softmax(logits / temperature, -1)) / 2
    pi1 = torch.softmax((pi1.log() - logits).detach() + logits, -1)
    pi2 = 2 * pi1 - pi0 / 2
    return sample + (pi2 - pi2.detach())


def gapped_logits(logits: torch.Tensor, sample: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """The GST perturbation (Fan, Chi, Rudnicky & Ramadge 2022, ICML): logits moved, by a
    deterministic amount that carries no gradient, so that the sampled class has the largest logit
    and every other class lies at least ``gap`` below it -- the perturbed logits are consistent
    with the sample (their argmax is D), which Gumbel noise achieves only at random.

        m_D = max_j theta_j - theta_D                      (the sample's logit to the top)
        m_i = -max(0, theta_i - max_j theta_j + gap),  i != D   (the others under the gap)
        return theta + sg(m)
    """
    top = logits.max(-1, keepdim=True).values
    up = (top - logits) * sample
    down = (logits - top + gap).clamp(min=0) * (1 - sample)
    return logits + (up - down).detach()


def adaptive_gap(logits: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """GST-p's gap (Fan et al. 2022): -log(1 - p_D) / p_D for the sampled class's
    probability p_D, (n, ..., 1); p_D is kept below 1 so that a certain class gets a finite gap."""
    p = (torch.softmax(logits, -1) * sample).sum(-1, keepdim=True).detach()
    p = p.clamp(max=1 - 1e-5)
    return -torch.log1p(-p) / p


def gst(logits: torch.Tensor, sample: torch.Tensor, temperature: float, gap) -> torch.Tensor:
    """Gapped straight-through (Fan et al. 2022): forward D, backward through
    softmax(gapped logits / tau).  ``gap``: a number (GST-1.0) or a tensor broadcasting against
    the logits (GST-p)."""
    soft = torch.softmax(gapped_logits(logits, sample, gap) / temperature, -1)
    return sample + (soft - soft.detach())


def _one_hot_view(dist, n: int, family: str):
    """``(logits, sample, to_family)``: categorical logits (..., C) and n one-hot samples of q, with
    the map from a one-hot (n, ..., C) back to the family's own sample (Bernoulli: the second
    class's indicator)."""
    base, _ = fam.unwrap(dist)
    if family == "bernoulli":
        l = base.logits
        logits = torch.stack([torch.zeros_like(l), l], -1)
        z = dist.sample((n,))
        sample = torch.stack([1 - z, z], -1)
        return logits, sample, (lambda y: y[..., 1])
    return base.logits, dist.sample((n,)), (lambda y: y)


class ReinMax(_Pathwise):
    """ReinMax (Liu et al. 2023, NeurIPS, "Bridging discrete and backpropagation: straight-through
    and beyond", Algorithm 2): straight-through with a second-order correction; one f-evaluation
    per sample, biased.  The paper tunes tau >= 1 per problem (1.3 on its 8x4 categorical VAE)."""

    name = "reinmax"
    families = DISCRETE
    paper = "Liu, Dong, Liu, Yu & Gao (2023), NeurIPS, arXiv:2304.08612, Algorithm 2"
    options = {"temperature": Option(1.0, "tau of softmax(theta / tau) in pi_1",
                                     constraint=constraints.positive)}

    def sample(self, dist, n, family):
        logits, sample, back = _one_hot_view(dist, n, family)
        return back(reinmax(logits, sample, self.config["temperature"]))


class GappedStraightThrough(_Pathwise):
    """Gapped straight-through, GST-1.0 and GST-p (Fan, Chi, Rudnicky & Ramadge 2022, ICML, "Training
    discrete deep generative models via gapped straight-through estimator"): straight-through
    through softmax of logits perturbed consistently with the sample, with a fixed gap (GST-1.0,
    the default) or the sample-dependent gap of GST-p (``adaptive=true``); one f-evaluation per
    sample, biased."""

    name = "gst"
    families = DISCRETE
    paper = "Fan, Chi, Rudnicky & Ramadge (2022), ICML, arXiv:2206.07235"
    options = {
        "temperature": Option(1.0, "tau of the softmax", constraint=constraints.positive),
        "gap": Option(1.0, "the logit gap of GST-1.0", constraint=constraints.positive),
        "adaptive": Option(False, "GST-p: the gap -log(1 - p_D) / p_D of the sampled class"),
    }

    def sample(self, dist, n, family):
        logits, sample, back = _one_hot_view(dist, n, family)
        gap = adaptive_gap(logits, sample) if self.config["adaptive"] else self.config["gap"]
        return back(gst(logits, sample, self.config["temperature"], gap))
