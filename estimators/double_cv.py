"""Double control variates for REINFORCE leave-one-out (Titsias & Shi 2022).

RLOO already carries one control variate: sample k's baseline, the mean of the other n-1 f-values,
is a *global* estimate of E[f] that does not depend on z_k.  It removes f's offset but none of its
variation with z_k.  Titsias & Shi add a second, *local* control variate on top of it: the
first-order term of a Taylor expansion of f, whose product with the score has a closed-form
expectation, so it can be subtracted from the learning signal and its expectation added back
analytically -- the estimator stays exactly unbiased and the score-function term is left with f's
curvature only.

The expansion needs grad f.  It is taken at the *other samples* z_j (j != k), where f is evaluated
anyway -- not at the mean-field point mu as in MuProp, which would cost an extra evaluation of f --
and centred at mu = E[z] so that its expectation is zero:

    c_k(z_k) = gbar_{-k}^T (z_k - mu),       gbar_{-k} = 1/(n-1) sum_{j != k} grad f(z_j).

gbar_{-k} is independent of z_k, hence (Bernoulli, mu = sigmoid(theta), d log q / d theta = z - mu)

    E[ c_k(z_k) (z_k - mu) ] = mu (1 - mu) * E[gbar_{-k}]       (elementwise: Cov(z_k) is diagonal),

which is what the correction term below adds back.  The estimator is RLOO applied to the
controlled values f~_k = f(z_k) - alpha c_k(z_k), plus that correction:

    g = 1/n sum_k [ f~_k - 1/(n-1) sum_{j != k} f~_j ] (z_k - mu)  +  alpha mu (1 - mu) * gbar,
    gbar = 1/n sum_k grad f(z_k).

The c_j inside sample k's baseline contain grad f(z_k) (through gbar_{-j}), but each multiplies
(z_j - mu), which has mean zero independently of z_k, so they add no bias; they are the "double" part:
they make the baseline track f~ rather than f.  This is the form of the authors' code (thjashin/double-cv,
src/networks.py, and its successor thjashin/rodeo, networks.py, ``grad_type == "double_cv"``), whose
``alpha`` is minus ours (they add alpha c_k to f; we subtract it, so alpha = 1 is the exact
first-order term and makes g exact, with zero variance, for an f linear in z).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributions import constraints

from .base import Estimate, Estimator, Option, check_f_output
from .baselines import LeaveOneOut
from .multisample import mean_field
from .score_function import score_function_surrogate

_LOO = LeaveOneOut()


def leave_one_out_mean(x: torch.Tensor) -> torch.Tensor:
    """x_{-k} = 1/(n-1) sum_{j != k} x_j along the sample dim 0 (any trailing shape)."""
    return (x.sum(0, keepdim=True) - x) / (x.shape[0] - 1)


def taylor_control_variate(grads: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, n_event: int):
    """c_k = gbar_{-k}^T (z_k - mu): the first-order Taylor term of f at the other samples, centred
    at mu = E[z] (Titsias & Shi 2022, Sec. 3).  ``grads`` and ``z`` (n, *batch, *event), ``mu``
    (*batch, *event); returns (n, *batch)."""
    c = leave_one_out_mean(grads) * (z - mu)
    return c.sum(tuple(range(-n_event, 0))) if n_event else c


def double_cv_signal(fz: torch.Tensor, cv: torch.Tensor, alpha) -> torch.Tensor:
    """The RLOO learning signal of the controlled values f~ = f - alpha c (Kool et al. 2019, Eq. 8,
    applied to f~): f~_k - mean_{j != k} f~_j.  ``fz``, ``cv`` detached, (n, *batch)."""
    controlled = fz - alpha * cv
    return controlled - _LOO(controlled, None)


def correction(grads: torch.Tensor, alpha) -> torch.Tensor:
    """alpha * gbar, gbar = mean_k grad f(z_k): paired with mu in the surrogate, (alpha gbar * mu).sum(),
    whose logit gradient alpha mu (1 - mu) gbar is the control variate's expectation added back."""
    return alpha * grads.mean(0)


class DoubleCV(Estimator):
    """Double control variates (Titsias & Shi 2022, "Double control variates for gradient
    estimation in discrete latent variable models", AISTATS, arXiv:2111.05300, Sec. 3): REINFORCE
    leave-one-out whose global baseline is combined with a local control variate, the first-order
    Taylor term c_k(z) = gbar_{-k}^T (z - mu) of f with gradients taken at the other samples:

        g = 1/n sum_k [f~_k - mean_{j != k} f~_j] (z_k - mu) + alpha mu (1 - mu) gbar,
        f~_k = f(z_k) - alpha c_k(z_k).

    Why it helps: RLOO's baseline removes f's offset; the Taylor term removes, sample by sample, the
    part of f(z_k) linear in z_k, whose score-function contribution is instead added back exactly
    (alpha mu (1 - mu) gbar).  Unbiased for every alpha that does not depend on the current samples.
    With ``learn`` alpha descends the single-sample variance proxy sum g^2 (E[g] does not depend on
    alpha), as the authors' code does with Adam; it is stepped by :meth:`update` after use.  alpha
    starts where the authors' code starts it, at 0 (plain RLOO, the control variate learnt in);
    ``alpha=1`` starts at the exact first-order term instead.

    Budget: n f-evaluations, all at the n samples and in one call of f; the gradients grad f(z_k)
    come from one backward pass through that call (no f-evaluation at a continuous point, unlike
    MuProp), so ``n_evals = n`` and ``min_samples = 2`` (leave-one-out).  f must be differentiable
    in z at the discrete points; an f without a gradient in z gives gbar = 0, i.e. plain RLOO.
    Bernoulli only: the paper's construction is for binary latents.
    """

    name = "double_cv"
    families = frozenset({"bernoulli"})
    unbiased = True
    paper = ("Titsias & Shi (2022), Double control variates for gradient estimation in discrete "
             "latent variable models, AISTATS, arXiv:2111.05300, Sec. 3")
    min_samples = 2
    options = {
        "alpha": Option(0.0, "initial coefficient of the Taylor control variate (0: plain RLOO, "
                             "as the authors' code starts; 1: the exact first-order term; |alpha| "
                             "<= 100: it helps near [0, 1], past that the variance it adds grows "
                             "as alpha^2, and a huge alpha overflows float32)",
                        constraint=constraints.interval(-100.0, 100.0)),
        "learn": Option(True, "learn alpha by minimising the estimate's variance"),
    }
    inner_lr = 1e-3  # the authors' hyper_lr

    def __init__(self, **options):
        super().__init__(**options)
        self.alpha = nn.Parameter(torch.tensor(float(self.config["alpha"])),
                                  requires_grad=bool(self.config["learn"]))

    def _estimate(self, dist, f, n, context, family):
        batch_shape = dist.batch_shape
        n_event = len(dist.event_shape)
        mu = mean_field(dist, family)  # sigmoid(logits), attached: carries the correction's gradient
        mu_d = mu.detach()
        z = dist.sample((n,)).detach().requires_grad_(True)
        with torch.enable_grad():  # grad f(z_k) is needed even when the caller runs without grad
            fz = check_f_output(f(z), n, batch_shape, self.name)
            grads = None
            if fz.requires_grad:
                # f acts on each sample and batch element separately, so the gradient of the sum
                # holds every grad f(z_k) at once: one backward pass, no further evaluation of f
                (grads,) = torch.autograd.grad(fz.sum(), z, retain_graph=True, allow_unused=True)
        grads = torch.zeros_like(z) if grads is None else grads.detach()
        z = z.detach()
        fd = fz.detach()
        alpha = self.alpha.detach().to(mu_d.dtype)

        cv = taylor_control_variate(grads, z, mu_d, n_event)
        signal = double_cv_signal(fd, cv, alpha)
        surrogate = score_function_surrogate(dist, z, fz, signal) + (correction(grads, alpha) * mu).sum()

        if self.alpha.requires_grad and self.training:
            self._variance_step(signal, cv, grads, z, mu_d, n_event)
        return Estimate(surrogate, fd.mean(0), n)

    def _variance_step(self, signal, cv, grads, z, mu, n_event):
        """Accumulate d(sum g^2)/d alpha into alpha.grad.  g is linear in alpha:
        dg/dalpha = -mean_k (c_k - mean_{j != k} c_j)(z_k - mu) + mu (1 - mu) gbar."""
        expand = lambda t: t.reshape(*t.shape, *([1] * n_event))
        score = z - mu
        var = mu * (1 - mu)
        alpha = self.alpha.detach().to(mu.dtype)
        g = (expand(signal) * score).mean(0) + alpha * var * grads.mean(0)
        dg = -(expand(cv - _LOO(cv, None)) * score).mean(0) + var * grads.mean(0)
        step = (2 * (g * dg).sum()).to(device=self.alpha.device, dtype=self.alpha.dtype)
        self.alpha.grad = step if self.alpha.grad is None else self.alpha.grad + step
