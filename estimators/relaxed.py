"""Straight-through and continuous-relaxation estimators for discrete latents.

All of them differentiate f itself (so f must accept relaxed inputs) and are biased for the
original discrete objective; the harness measures that bias against the exact gradient.
"""
from __future__ import annotations

import torch
from torch.distributions import constraints
from torch import distributions as D

from .base import Estimate, Estimator, Option, check_f_output
from . import families as fam

DISCRETE = frozenset({"bernoulli", "categorical"})


def relaxed_sample(dist, n, temperature):
    """n reparameterised Concrete samples with the batch/event layout of ``dist``.

    Bernoulli: y = sigmoid((logits + log u - log(1 - u)) / t), the binary Concrete; categorical:
    y = softmax((logits + g) / t) with Gumbel noise g = -log(-log u) (Maddison et al. 2017, Eq. 4 and
    Sec. 3.3; Jang et al. 2017, Eq. 1).  The same construction as torch's RelaxedBernoulli /
    RelaxedOneHotCategorical, written out because their samplers recompute and clamp the
    probabilities on the whole sample tensor: several times the cost of the formula on small
    problems, and a zero gradient for |logit| > ~16 in float32.
    """
    base, _ = fam.unwrap(dist)
    logits = base.logits
    eps = torch.finfo(logits.dtype).eps
    u = torch.rand((n, *logits.shape), dtype=logits.dtype, device=logits.device).clamp_(eps, 1 - eps)
    if isinstance(base, D.Bernoulli):
        return torch.sigmoid((logits + u.log() - (-u).log1p()) / temperature)
    return torch.softmax((logits - (-u.log()).log()) / temperature, -1)


def harden(y, family):
    """The discrete sample a relaxed sample rounds to: threshold at 1/2, or one-hot of the argmax.

    For the Gumbel-max construction this rounding is an exact sample of the discrete distribution.
    """
    if family == "bernoulli":
        return (y > 0.5).to(y.dtype)
    return torch.nn.functional.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype)


def straight_through(hard, soft):
    """Forward value ``hard``, backward gradient of ``soft`` (Bengio, Leonard & Courville 2013)."""
    return hard + (soft - soft.detach())


class _Pathwise(Estimator):
    families = DISCRETE
    unbiased = False

    def sample(self, dist, n, family):
        raise NotImplementedError

    def _estimate(self, dist, f, n, context, family):
        z = self.sample(dist, n, family)
        fz = check_f_output(f(z), n, dist.batch_shape, self.name)
        return Estimate(fz.mean(0).sum(), fz.detach().mean(0), n)


class StraightThrough(_Pathwise):
    """Straight-through estimator (Bengio, Leonard & Courville 2013, Sec. 4): forward an exact
    discrete sample, backward as if z were its mean (probabilities), i.e. grad ~ f'(z) dq/dlogits.
    Biased unless f is linear in z; f is evaluated once per sample.  With ``temperature`` tau the
    backward goes through softmax(logits / tau) instead, as the ReinMax code's ``st`` does
    (LiyuanLucasLiu/ReinMax, mnist_vae/model/basic.py)."""

    name = "straight_through"
    paper = "Bengio, Leonard & Courville (2013), arXiv:1308.3432, Sec. 4"
    options = {"temperature": Option(1.0, "tau of the backward's softmax(logits / tau) (sigmoid "
                                     "for Bernoulli); 1: the probabilities themselves. The "
                                     "ReinMax code's st tunes it (1.3 at 8x4)",
                                     constraint=constraints.positive)}

    def sample(self, dist, n, family):
        base, _ = fam.unwrap(dist)
        hard = dist.sample((n,))
        tau = self.config["temperature"]
        if tau == 1.0:
            soft = base.probs
        elif family == "bernoulli":
            soft = torch.sigmoid(base.logits / tau)
        else:
            soft = torch.softmax(base.logits / tau, -1)
        return straight_through(hard, soft.expand_as(hard))


class GumbelSoftmax(_Pathwise):
    """Gumbel-Softmax / Concrete relaxation (Jang, Gu & Poole 2017, Eq. 1; Maddison, Mnih & Teh 2017,
    Eq. 4): f is evaluated at the relaxed sample and differentiated through the reparameterisation.
    Biased for the discrete objective (it optimises the relaxed one); the bias shrinks and the
    variance grows as the temperature goes to 0."""

    name = "gumbel_softmax"
    paper = "Jang, Gu & Poole (2017), ICLR, Eq. 1; Maddison, Mnih & Teh (2017), ICLR, Eq. 4"
    options = {"temperature": Option(1.0, "relaxation temperature", constraint=constraints.positive)}

    def sample(self, dist, n, family):
        return relaxed_sample(dist, n, self.config["temperature"])


class STGumbel(GumbelSoftmax):
    """Straight-through Gumbel-Softmax (Jang, Gu & Poole 2017, Sec. 2.2): forward the exact discrete
    sample hard(y), backward through the relaxed y.  f is only ever evaluated on discrete points."""

    name = "st_gumbel"
    paper = "Jang, Gu & Poole (2017), Categorical reparameterization with Gumbel-softmax, ICLR, Sec. 2.2"

    def sample(self, dist, n, family):
        y = relaxed_sample(dist, n, self.config["temperature"])
        return straight_through(harden(y, family), y)
