"""ReinMax's polynomial-programming toy: a categorical problem with an exact gradient.

Liu et al. (2023), NeurIPS, Sec. 6.1, as its code defines it (LiyuanLucasLiu/ReinMax
poly/poly_programming.py): L two-class categorical latents with logits theta (L, 2), initialised
uniformly in [-0.01, 0.01]; z_l the indicator of a latent's first class; the loss is the mean over
the latents of |z_l - t|^p with t = 0.45.  A polynomial in z, so a relaxation differentiates it at
relaxed points, while its expectation is linear in the probabilities -- the gap the paper uses to
show where straight-through's first-order approximation goes wrong (p > 2 bends it more).
"""
from __future__ import annotations

import torch
from torch import distributions as D
from torch.distributions import constraints

from estbench.core.plugins import Option

from .base import ClosedFormToy


class PolyToy(ClosedFormToy):
    """f(z) = -(1/L) sum_l |z_l - t|^p with z_l the first class's indicator of latent l (the
    loss of the ReinMax code, negated: higher is better); E_q[f] = -(1/L) sum_l [q_l |1 - t|^p +
    (1 - q_l) |t|^p] with q_l the first class's probability.  The ReinMax code trains it with
    Adam at 1e-3 for 40 x 200 steps of 64 samples; the quick budget here is the toys' (100 steps,
    Adam at ``lr``) with four measurements instead of eleven (at 128 latents a measurement costs
    far more than the 100 steps, the biased estimators' most: the bias test's second stage)."""

    name = "poly_toy"
    tolerances = {"final_elbo": 0.005}  # compare's: E[f] spans a few hundredths between estimators
    family = "categorical"
    #: not in ``estbench run``'s default toys: with 128 latents gumbel_rao's cells are slow (its
    #: conditional draws per latent) and would dominate the default run
    in_default_run = False
    budgets = {**ClosedFormToy.budgets,
               "quick": {**ClosedFormToy.budgets["quick"], "checkpoints": 4}}
    description = "ReinMax's polynomial programming: L two-class latents, f = -mean |z - t|^p"
    options = {
        "latents": Option(128, "number of two-class latents L (the ReinMax code's default)",
                          constraint=constraints.positive_integer),
        # bounded so that |z - t|^p stays finite in float32 (11^30 ~ 1.7e31 < 3.4e38)
        "t": Option(0.45, "target t (|t| <= 10: f stays finite in float32)",
                    constraint=constraints.interval(-10.0, 10.0)),
        "p": Option(2.0, "the power p of |z - t|^p (the paper: 1.5, 2, 3; at most 30, so that "
                         "f stays finite in float32)",
                    constraint=constraints.interval(1e-3, 30.0)),
    }

    def init_params(self, generator):
        L = self.config["latents"]
        return {"logits": (torch.rand(L, 2, generator=generator) * 2 - 1) * 0.01}

    def dist(self):
        return D.Independent(D.OneHotCategorical(logits=self.params["logits"], validate_args=False), 1)

    def f(self, z):
        t, p = self.config["t"], self.config["p"]
        return -(z[..., 0] - t).abs().pow(p).mean(-1)

    def expected(self):
        t, p = self.config["t"], self.config["p"]
        q = torch.softmax(self.params["logits"], -1)[:, 0]
        return -(q * abs(1 - t) ** p + (1 - q) * abs(t) ** p).mean()
