"""Toy problems with exact gradients: the place where bias and variance are measured without noise
in the reference.
"""
from __future__ import annotations

import torch
from torch import distributions as D

from torch.distributions import constraints

from estbench.core.plugins import Option, integer_at_least

from .base import ClosedFormToy


class ToyBinary(ClosedFormToy):
    """z in {0,1}^D, one logit per dimension initialised at 0, f(z) = -sum_d (z_d - t)^2.

    The "RELAX Fig. 1" / ARM toy (Tucker et al. 2017, Sec. 6.1; Grathwohl et al. 2018, Sec. 6.1;
    Yin & Zhou 2019, Sec. 4.1).  With t close to 1/2 the two values of z differ by 1 - 2t in f, so
    the true gradient -(1-2t) q(1-q) is tiny next to the noise of f itself: estimators that cannot
    remove f's offset drown.  E_q[f] = -sum_d [q_d (1-t)^2 + (1-q_d) t^2].
    """

    name = "toy_binary"
    tolerances = {"final_elbo": 0.01}  # compare's: E[f] spans a few hundredths between estimators
    family = "bernoulli"
    description = "D Bernoulli latents, f(z) = -sum (z - t)^2 (RELAX/ARM toy)"
    options = {
        "t": Option(0.45, "target; 0.45, 0.49 and 0.499 are the standard settings (|t| <= 1e3: "
                          "f stays finite in float32)", constraint=constraints.interval(-1e3, 1e3)),
        "dim": Option(4, "number of binary latents D", constraint=constraints.positive_integer),
    }

    def init_params(self, generator):
        return {"logits": torch.zeros(self.config["dim"])}

    def dist(self):
        return D.Independent(D.Bernoulli(logits=self.params["logits"], validate_args=False), 1)

    def f(self, z):
        return -((z - self.config["t"]) ** 2).sum(-1)

    def expected(self):
        q, t = torch.sigmoid(self.params["logits"]), self.config["t"]
        return -(q * (1 - t) ** 2 + (1 - q) * t**2).sum()


class LiuToy(ClosedFormToy):
    """Three Bernoulli variables sharing one logit theta = 0, f(z) = sum_i (z_i - p_i)^2 with
    p = (0.6, 0.51, 0.48) (Liu et al. 2019, "Rao-Blackwellized stochastic gradients for discrete
    distributions", Sec. 5.1).  The exact gradient at theta = 0 is sigma'(0) sum_i (1 - 2 p_i) = -0.0450.
    """

    name = "liu_toy"
    tolerances = {"final_elbo": 0.005}  # compare's: E[f] spans a few hundredths between estimators
    family = "bernoulli"
    description = "3 Bernoullis sharing one logit, f(z) = sum (z_i - p_i)^2, p = (0.6, 0.51, 0.48)"
    options = {"theta": Option(0.0, "initial shared logit (|theta| <= 1e3: sigmoid(theta) is 0 or 1 "
                                    "in float32 long before)", constraint=constraints.interval(-1e3, 1e3))}
    P = (0.6, 0.51, 0.48)

    def init_params(self, generator):
        return {"theta": torch.tensor(float(self.config["theta"]))}

    def _p(self, like):
        return torch.tensor(self.P, dtype=like.dtype, device=like.device)

    def dist(self):
        logits = self.params["theta"].expand(len(self.P))
        return D.Independent(D.Bernoulli(logits=logits, validate_args=False), 1)

    def f(self, z):
        return ((z - self._p(z)) ** 2).sum(-1)

    def expected(self):
        q, p = torch.sigmoid(self.params["theta"]), self._p(self.params["theta"])
        return (q * (1 - p) ** 2 + (1 - q) * p**2).sum()


class ToyCategorical(ClosedFormToy):
    """D independent categoricals with K classes; f(z) = sum_d R[d, z_d] + sum_d W[z_d, z_{d+1}].

    R (D x K) and W (K x K) are fixed random tables drawn from ``table_seed``.  The pairwise chain
    term makes f non-linear in the one-hot z, so straight-through and relaxations are biased here;
    because the factors are independent the expectation is still closed-form:
    E_q[f] = sum_d q_d . R_d + sum_d q_d^T W q_{d+1}.
    """

    name = "toy_categorical"
    tolerances = {"final_elbo": 0.05}  # compare's: E[f] spans a few hundredths between estimators
    family = "categorical"
    description = "D categoricals, K classes, random unary + chain pairwise reward tables"
    options = {
        "dim": Option(3, "number of categorical latents D", constraint=constraints.positive_integer),
        "classes": Option(4, "classes per latent K", constraint=integer_at_least(2)),
        "table_seed": Option(0, "seed of the random reward tables", constraint=constraints.nonnegative_integer),
    }

    def init_params(self, generator):
        Dn, K = self.config["dim"], self.config["classes"]
        g = torch.Generator().manual_seed(self.config["table_seed"])
        self.R = torch.randn(Dn, K, generator=g).to(self.device)
        self.W = torch.randn(K, K, generator=g).to(self.device)
        return {"logits": torch.zeros(Dn, K)}

    def dist(self):
        return D.Independent(D.OneHotCategorical(logits=self.params["logits"], validate_args=False), 1)

    def f(self, z):
        unary = (z * self.R.to(z.dtype)).sum((-1, -2))
        pair = torch.einsum("...dk,kl,...dl->...", z[..., :-1, :], self.W.to(z.dtype), z[..., 1:, :])
        return unary + pair

    def expected(self):
        q = torch.softmax(self.params["logits"], -1)
        return (q * self.R).sum() + torch.einsum("dk,kl,dl->", q[:-1], self.W, q[1:])


class ToyGaussian(ClosedFormToy):
    """z ~ N(mu, diag sigma^2) in R^D, f(z) = -||z - a||^2 + c sum_d cos(w z_d).

    The quadratic part is the usual pathwise-friendly toy; the cosine adds a smooth non-quadratic
    term whose expectation is still closed-form, E[cos(w z)] = cos(w mu) exp(-w^2 sigma^2 / 2)
    (the Gaussian characteristic function), so
    E_q[f] = -sum_d [(mu_d - a_d)^2 + sigma_d^2] + c sum_d cos(w mu_d) exp(-w^2 sigma_d^2 / 2).
    a is evenly spaced in [-1, 1]; mu starts at 0 and log sigma at 0.
    """

    name = "toy_gaussian"
    tolerances = {"final_elbo": 0.05}  # compare's: E[f] spans a few hundredths between estimators
    family = "gaussian"
    description = "D Gaussians, f(z) = -||z - a||^2 + c sum cos(w z)"
    options = {
        "dim": Option(3, "dimension D", constraint=constraints.positive_integer),
        "c": Option(1.0, "weight of the cosine term (|c| <= 1e6: f and its gradient stay finite "
                         "in float32)", constraint=constraints.interval(-1e6, 1e6)),
        "w": Option(2.0, "frequency of the cosine term (|w| <= 1e3: c w sin(w z), the gradient of "
                         "f, and w^2 in E_q[f] stay finite in float32)",
                    constraint=constraints.interval(-1e3, 1e3)),
    }

    def init_params(self, generator):
        Dn = self.config["dim"]
        self.a = torch.linspace(-1.0, 1.0, Dn).to(self.device)
        return {"loc": torch.zeros(Dn), "log_scale": torch.zeros(Dn)}

    def dist(self):
        scale = self.params["log_scale"].exp()
        return D.Independent(D.Normal(self.params["loc"], scale, validate_args=False), 1)

    def f(self, z):
        c, w = self.config["c"], self.config["w"]
        a = self.a.to(z.dtype)
        return -((z - a) ** 2).sum(-1) + c * torch.cos(w * z).sum(-1)

    def expected(self):
        c, w = self.config["c"], self.config["w"]
        mu, s = self.params["loc"], self.params["log_scale"].exp()
        return (-((mu - self.a) ** 2 + s**2) + c * torch.cos(w * mu) * torch.exp(-(w**2) * s**2 / 2)).sum()

