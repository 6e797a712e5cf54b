"""Unbiased estimators with a control variate built from the continuous relaxation: REBAR and RELAX.

Both are REINFORCE on the discrete sample b = H(z) with a control variate c(z~) whose expectation is
added back analytically through the reparameterisation trick:

    g = [f(b) - c(z~)] d log q(b)  +  d c(z)  -  d c(z~),          z ~ q(z),  b = H(z),  z~ ~ q(z | b)

(Tucker et al. 2017, Eq. 6-8; Grathwohl et al. 2018, Sec. 3.3 / Algorithm 2).  z is the logistic
(Bernoulli) or Gumbel (categorical) variable whose hard threshold/argmax is b; z~ is a second draw of
that variable *conditioned on b*.  The three terms are unbiased for any differentiable c: the last
two are the reparameterised and the conditional-reparameterised gradients of the same expectation
E[c(z)], so the control variate only changes the variance.  Because z~ is tied to b, c(z~) is highly
correlated with f(b) and the REINFORCE residual f(b) - c(z~) is small (a constant offset of f
cancels exactly when eta = 1).

Budget: f is evaluated at b, at sigma_lambda(z) and at sigma_lambda(z~) -- three evaluations per
sample, made in one call on the three batches concatenated along the sample dimension.  So
``sample_unit = 3`` and a budget of n f-evaluations buys n/3 samples.  RELAX's network r_rho is not
an evaluation of f.

Learning the control variate (eta, temperature, and r_rho for RELAX): the variance of g is
E[g^2] - (E g)^2 and E g does not depend on the control variate, so its parameters phi descend the
single-sample proxy sum g^2 (Tucker et al. 2017, Sec. 3.3; Grathwohl et al. 2018, Sec. 3).  g is
obtained with ``autograd.grad(..., create_graph=True)`` w.r.t. the distribution's logits, and
d(sum g^2)/d phi is accumulated into ``phi.grad``; :meth:`Estimator.update` steps it.  The surrogate
returned is ``sum(g.detach() * logits) + mean f(b)``, so the harness's backward pass gives the
distribution exactly g, parameters inside f the plain pathwise gradient at the discrete samples, and
the control variate's own parameters nothing (their gradient is only the variance one).
"""
from __future__ import annotations

import math

import torch
from torch.distributions import constraints
import torch.nn.functional as F
from torch import nn

from .base import Estimate, Estimator, Option, _is_uninitialized, check_f_output
from . import families as fam

DISCRETE = frozenset({"bernoulli", "categorical"})


# ---- sampling: z, b = H(z), z~ | b (pure functions of the logits and the uniform noise) ----------

def _uniform(shape, like):
    """U(0,1) noise kept strictly inside (0, 1) so that logit/log-log transforms stay finite."""
    u = torch.rand(shape, dtype=like.dtype, device=like.device)
    eps = torch.finfo(like.dtype).eps
    return u.clamp(eps, 1.0 - eps)


def bernoulli_z(logits, u):
    """z = theta + logit(u): a logistic variable with H(z) = 1[z > 0] ~ Bernoulli(sigmoid(theta))."""
    return logits + torch.log(u) - torch.log1p(-u)


def bernoulli_z_given_b(logits, b, v):
    """z~ ~ q(z | b), reparameterised by v ~ U(0,1) (Tucker et al. 2017, appendix).

    b = 1: z~ = log(1 + v / ((1-v)(1-p)))  = softplus(logit v + softplus(theta))   (> 0)
    b = 0: z~ = -log(1 + v / ((1-v) p))    = -softplus(logit v + softplus(-theta)) (< 0)
    i.e. the logistic variable's uniform restricted to (1-p, 1) or (0, 1-p), in a stable form.
    """
    lv = torch.log(v) - torch.log1p(-v)
    pos = F.softplus(lv + F.softplus(logits))
    neg = -F.softplus(lv + F.softplus(-logits))
    return torch.where(b > 0.5, pos, neg)


def categorical_z(log_probs, u):
    """z = log p + Gumbel(u); argmax z ~ Categorical(p) (Gumbel-max)."""
    return log_probs - torch.log(-torch.log(u))


def categorical_z_given_b(log_probs, b, v):
    """Conditional Gumbel z~ ~ q(z | argmax z = b) (Tucker et al. 2017, appendix).

    With E = -log v ~ Exp(1) and normalised log-probabilities (sum p = 1):
        z~_b = -log E_b,        z~_i = -log(E_i / p_i + E_b)  for i != b,
    the latter computed as -logaddexp(log E_i - log p_i, log E_b).
    """
    log_e = torch.log(-torch.log(v))
    log_e_b = (log_e * b).sum(-1, keepdim=True)
    others = -torch.logaddexp(log_e - log_probs, log_e_b)
    return torch.where(b > 0.5, -log_e_b.expand_as(log_e), others)


def relax_sigma(z, temperature, family):
    """The concrete relaxation sigma_lambda(z) of H(z): sigmoid(z/lambda) or softmax(z/lambda)."""
    if family == "bernoulli":
        return torch.sigmoid(z / temperature)
    return torch.softmax(z / temperature, -1)


def hard(z, family):
    if family == "bernoulli":
        return (z > 0).to(z.dtype)
    return F.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype)


# ---- the estimators --------------------------------------------------------------------------

class _RelaxedControlVariate(Estimator):
    """Shared body of REBAR and RELAX; subclasses define :meth:`control` (the c of the docstring)."""

    families = DISCRETE
    unbiased = True
    sample_unit = 3
    min_samples = 3

    def __init__(self, **options):
        super().__init__(**options)
        t, eta = self.config["temperature"], self.config["eta"]
        learn = self.learns
        self.eta = nn.Parameter(torch.tensor(float(eta)), requires_grad=learn)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(t)), requires_grad=learn)

    @property
    def learns(self) -> bool:
        return True

    @property
    def temperature(self) -> float:
        return float(self.log_temperature.detach().exp())

    def control(self, f_relaxed, z, eta, context, dist):
        """c(z) given f(sigma_lambda(z)) (shape (n, *batch)) and the logistic/Gumbel z."""
        raise NotImplementedError

    def _estimate(self, dist, f, n_samples, context, family):
        base, _ = fam.unwrap(dist)
        logits = base.logits  # for categorical: normalised log-probabilities
        n = n_samples // self.sample_unit
        batch_shape = dist.batch_shape
        shape = (n, *logits.shape)
        u, v = _uniform(shape, logits), _uniform(shape, logits)

        if family == "bernoulli":
            z = bernoulli_z(logits, u)
            b = hard(z, family).detach()
            z_tilde = bernoulli_z_given_b(logits, b, v)
        else:
            z = categorical_z(logits, u)
            b = hard(z, family).detach()
            z_tilde = categorical_z_given_b(logits, b, v)

        eta = self.eta.to(logits.dtype)
        temperature = self.log_temperature.to(logits.dtype).exp()
        points = torch.cat([b, relax_sigma(z, temperature, family), relax_sigma(z_tilde, temperature, family)])
        fz = check_f_output(f(points), 3 * n, batch_shape, self.name)
        f_b, f_z, f_zt = fz[:n], fz[n: 2 * n], fz[2 * n:]
        c_z = self.control(f_z, z, eta, context, dist)
        c_zt = self.control(f_zt, z_tilde, eta, context, dist)

        pathwise_f = f_b.mean(0).sum()  # parameters inside f: their plain gradient at the samples
        if not logits.requires_grad or not torch.is_grad_enabled():
            return Estimate(pathwise_f, f_b.detach().mean(0), 3 * n)

        phi = [p for p in self.parameters() if p.requires_grad and not _is_uninitialized(p)]
        # in eval mode (the harness measures on an .eval() copy) the variance step is skipped
        learn = bool(phi) and self.training
        # g = mean_n [ (f(b) - c(z~)) d log q(b) + d c(z) - d c(z~) ], built explicitly so that the
        # residual keeps its dependence on phi (needed by the variance gradient) while only its
        # value multiplies the score.  d log q(b)/d logits: b - sigmoid(theta) (Bernoulli); b for
        # the categorical's normalised log-probabilities (the normalisation's Jacobian is applied
        # when the surrogate is differentiated back to the raw logits).
        score = b - torch.sigmoid(logits.detach()) if family == "bernoulli" else b
        residual = f_b.detach() - c_zt
        if not learn:
            residual = residual.detach()
        residual = residual.reshape(*residual.shape, *([1] * (logits.dim() - len(batch_shape))))
        (g_path,) = torch.autograd.grad((c_z - c_zt).mean(0).sum(), logits,
                                        create_graph=learn, retain_graph=True)
        g = (residual * score).mean(0) + g_path
        if learn:
            g_eff = g
            if family == "categorical":  # the part of g that reaches the raw logits
                g_eff = g - base.probs.detach() * g.sum(-1, keepdim=True)
            variance_proxy = (g_eff ** 2).sum()  # single-sample estimate of E[g^2] = Var + (E g)^2
            grads = torch.autograd.grad(variance_proxy, phi, allow_unused=True, retain_graph=True)
            for p, gp in zip(phi, grads):
                if gp is None:
                    continue
                p.grad = gp.detach().to(p.dtype) if p.grad is None else p.grad + gp.detach().to(p.dtype)
        surrogate = (g.detach() * logits).sum() + pathwise_f
        return Estimate(surrogate, f_b.detach().mean(0), 3 * n)


class REBAR(_RelaxedControlVariate):
    """REBAR (Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein 2017, "REBAR: Low-variance, unbiased
    gradient estimates for discrete latent variable models", NeurIPS, Eq. 6-8, Sec. 3).

    REINFORCE on b = H(z) with the concrete relaxation as control variate, c(z) = eta f(sigma_lambda(z)):
        g = [f(b) - eta f(sigma(z~))] d log q(b) + eta d f(sigma(z)) - eta d f(sigma(z~)),
    z~ ~ q(z | b) by conditional reparameterisation (the paper's appendix: logistic or conditional Gumbel).
    Why it has low variance: f(sigma(z~)) is evaluated next to the same discrete b, so it tracks
    f(b) sample by sample (and removes any offset of f), and the relaxed terms' variance is that of a
    reparameterisation gradient.  Unbiased for every eta and lambda; with ``learn`` both are tuned
    online to minimise the estimate's variance (Sec. 3.3).  3 f-evaluations per sample.
    """

    name = "rebar"
    paper = ("Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein (2017), REBAR: Low-variance, unbiased "
             "gradient estimates for discrete latent variable models, NeurIPS, Eq. 6-8")
    options = {
        "temperature": Option(0.5, "initial temperature lambda of the concrete relaxation",
                              constraint=constraints.positive),
        "eta": Option(1.0, "initial scale eta of the control variate (|eta| <= 100: eta f(sigma(z)) "
                           "tracks f near eta = 1, past that the variance it adds grows as eta^2, "
                           "and a huge eta overflows float32)",
                      constraint=constraints.interval(-100.0, 100.0)),
        "learn": Option(True, "learn eta and log-temperature by minimising the estimate's variance"),
    }
    inner_lr = 1e-2

    @property
    def learns(self) -> bool:
        return bool(self.config["learn"])

    def control(self, f_relaxed, z, eta, context, dist):
        return eta * f_relaxed


class RELAX(_RelaxedControlVariate):
    """RELAX (Grathwohl, Choi, Wu, Roeder & Duvenaud 2018, "Backpropagation through the void:
    optimizing control variates for black-box gradient estimation", ICLR, Eq. 8 and the discrete
    estimator of Sec. 3.3 / Algorithm 2).

    The control variate is a free surrogate c_phi(z) = eta f(sigma_lambda(z)) + r_rho(z), with
    r_rho(z) = sum_i m_rho(z_i, x): a small MLP applied to each coordinate of the logistic/Gumbel
    variable z (with the detached context x if given) and summed.  The paper's r takes the whole z;
    the coordinate-wise sum is a restriction that keeps r defined when the event size changes from
    batch to batch (padded sentences) -- any differentiable r keeps the estimator unbiased:
        g = [f(b) - c_phi(z~)] d log q(b) + d c_phi(z) - d c_phi(z~).
    Unbiased for every phi; phi = (rho, eta, lambda) descends the single-sample variance proxy
    sum g^2 (Sec. 3), so the network can learn the part of f(b) - eta f(sigma(z~)) that the
    relaxation misses (REBAR is the special case r = 0, and r's output layer starts at zero).
    Budget: like REBAR, 3 f-evaluations per sample (b, sigma(z), sigma(z~)); r_rho is not f.
    """

    name = "relax"
    paper = ("Grathwohl, Choi, Wu, Roeder & Duvenaud (2018), Backpropagation through the void, ICLR, "
             "Eq. 8, Sec. 3.3, Algorithm 2")
    options = {
        "temperature": Option(0.5, "initial temperature lambda of the concrete relaxation",
                              constraint=constraints.positive),
        "eta": Option(1.0, "initial scale eta of f(sigma(z)) in the control variate (|eta| <= 100, "
                           "as REBAR's)", constraint=constraints.interval(-100.0, 100.0)),
        "hidden": Option(32, "hidden units of the control-variate network r_rho",
                         constraint=constraints.positive_integer),
    }
    inner_lr = 1e-2

    def __init__(self, **options):
        super().__init__(**options)
        h = self.config["hidden"]
        out = nn.Linear(h, 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        # m_rho(z_i, x) = out(tanh(W_z z_i + W_x x + c)): the context's share W_x x is computed once
        # per batch element and broadcast over the coordinates, never copied per coordinate
        self.r_z = nn.Linear(1, h)
        self.r_x = None  # the context's layer, made when a context is first seen (its size unknown)
        self.r_out = out

    def control(self, f_relaxed, z, eta, context, dist):
        n, batch_shape = z.shape[0], dist.batch_shape
        dtype = self.r_z.weight.dtype
        hidden = self.r_z(z.reshape(n, *batch_shape, -1, 1).to(dtype))  # (n, *B, E, h)
        if context is not None:
            ctx = context.detach()
            if tuple(ctx.shape[: len(batch_shape)]) != tuple(batch_shape):
                raise ValueError(f"relax: context of shape {tuple(ctx.shape)} does not start with the "
                                 f"batch shape {tuple(batch_shape)}")
            ctx = ctx.reshape(*batch_shape, -1)
            if self.r_x is None:
                self.r_x = nn.Linear(ctx.shape[-1], self.config["hidden"], bias=False).to(
                    device=ctx.device, dtype=dtype)
            hidden = hidden + self.r_x(ctx.to(dtype)).unsqueeze(-2)  # (*B, 1, h), broadcast
        r = self.r_out(torch.tanh(hidden)).squeeze(-1).sum(-1).to(z.dtype)
        return eta * f_relaxed + r
