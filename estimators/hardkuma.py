"""HardKuma: stretched-and-rectified Kumaraswamy gates in place of Bernoulli latents."""
from __future__ import annotations

import math

import torch
from torch.distributions import constraints
import torch.nn.functional as F

from .base import Estimate, Estimator, Option, check_f_output
from . import families as fam


def hardkuma_ab(logits: torch.Tensor, min_ab: float = 1e-3):
    """Kumaraswamy shapes from a Bernoulli logit: a = softplus(logit)/ln 2, b = softplus(-logit)/ln 2.

    At logit 0, a = b = 1 (k uniform, P(z > 1/2) = 1/2 as for Bernoulli(1/2)); a grows and b shrinks
    with the logit, and P(k > x) = (1 - x^a)^b increases in a and decreases in b, so every
    P(z > t) increases monotonically with the logit: the gate tends to a point mass at 1 for
    logit -> +inf and at 0 for logit -> -inf.  Shapes are floored at ``min_ab`` for stability.
    """
    a = (F.softplus(logits) / math.log(2.0)).clamp_min(min_ab)
    b = (F.softplus(-logits) / math.log(2.0)).clamp_min(min_ab)
    return a, b


def hardkuma_rsample(a, b, u, lower: float = -0.1, upper: float = 1.1):
    """Reparameterised HardKuma gate z = clamp(l + (r - l) k, 0, 1), k = (1 - (1 - u)^{1/b})^{1/a}
    (Bastings, Aziz & Titov 2019, Eq. 6-9); computed in log space for stability.

    z is a Lipschitz function of (a, b) for every u, so its pathwise gradient is unbiased for the
    HardKuma objective; rectified samples (z exactly 0 or 1) carry zero pathwise gradient.
    """
    tiny = torch.finfo(u.dtype).tiny
    eps = torch.finfo(u.dtype).eps
    u = u.clamp(tiny, 1 - eps)
    inner = -torch.expm1(torch.log1p(-u) / b)  # 1 - (1 - u)^{1/b} in (0, 1]
    k = torch.exp(torch.log(inner.clamp_min(tiny)) / a)
    return (lower + (upper - lower) * k).clamp(0.0, 1.0)


class HardKuma(Estimator):
    """HardKuma gates (Bastings, Aziz & Titov 2019, "Interpretable neural predictions with
    differentiable binary variables", ACL, Sec. 3, Eq. 6-9).

    Each Bernoulli cell is replaced by a stretched-and-rectified Kumaraswamy variable:
    k ~ Kuma(a, b) by the inverse CDF k = (1 - (1 - u)^{1/b})^{1/a}, stretched to s = l + (r - l) k
    with (l, r) = (-0.1, 1.1) and rectified z = clamp(s, 0, 1), so z = 0 and z = 1 have positive
    mass while z stays reparameterisable.  (a, b) come from the logit by :func:`hardkuma_ab`
    (a = softplus(logit)/ln 2, b = softplus(-logit)/ln 2: a = b = 1 at logit 0, P(z > 1/2)
    increasing in the logit).  Objective optimised: E_{z ~ HardKuma(a, b)}[f(z)], with f evaluated
    on gates in [0, 1] -- NOT E_{Bernoulli}[f]; so it is biased for the original objective.  Its
    reparameterised gradient has the low variance of a pathwise estimator.  Spends n evaluations.
    """

    name = "hardkuma"
    families = frozenset({"bernoulli"})
    unbiased = False
    paper = ("Bastings, Aziz & Titov (2019), Interpretable neural predictions with differentiable "
             "binary variables, ACL, Sec. 3, Eq. 6-9")
    options = {
        # both endpoints get probability mass only if the stretched support overhangs [0, 1]
        "lower": Option(-0.1, "stretch lower end l", constraint=constraints.less_than(0.0)),
        "upper": Option(1.1, "stretch upper end r", constraint=constraints.greater_than(1.0)),
    }

    def _estimate(self, dist, f, n, context, family):
        base, _ = fam.unwrap(dist)
        logits = base.logits
        a, b = hardkuma_ab(logits)
        u = torch.rand((n, *logits.shape), dtype=logits.dtype, device=logits.device)
        z = hardkuma_rsample(a, b, u, self.config["lower"], self.config["upper"])
        fz = check_f_output(f(z), n, dist.batch_shape, self.name)
        return Estimate(fz.mean(0).sum(), fz.detach().mean(0), n)
