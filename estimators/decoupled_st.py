"""Decoupled straight-through Gumbel-softmax (Shah, Yan, Mozer & Liu 2024).

Straight-through Gumbel-softmax ties two things to one temperature: how the forward sample is drawn
and how smooth the relaxation is that the backward pass differentiates.  The decoupled estimator
gives each its own temperature.  Its Gumbel-softmax is written, as in that paper (and unlike Jang et
al.'s softmax((l + g)/tau)), with the temperature on the logits only:

    forward:   D     = H(l / tau_f + g)            (one-hot of the argmax, or 1[. > 0] for a Bernoulli)
    backward:  z^b   = softmax(l / tau_b + g)      (sigmoid for a Bernoulli: logistic noise g)
    fed to f:  D + z^b - stopgrad(z^b)

with one noise draw g shared by both.  Because tau_f divides the logits and not the noise, it is not
a no-op on a hard sample (in the (l + g)/tau form the argmax would ignore it): D is an exact sample of
the *tempered* distribution softmax(l / tau_f) -- tau_f > 1 flattens it (more exploration), tau_f < 1
sharpens it -- and only tau_f = 1 samples q itself.  tau_b only changes the gradient.  At
tau_f = tau_b = 1 the two forms agree and this is exactly ``st_gumbel`` at temperature 1, sample by
sample for the same noise.
"""
from __future__ import annotations

import torch
from torch.distributions import constraints

from . import families as fam
from .base import Option
from .relaxed import DISCRETE, _Pathwise, harden, straight_through


def gumbel_noise(logits: torch.Tensor, n: int, family: str) -> torch.Tensor:
    """n draws of the Gumbel-max noise with the layout of ``logits``: logistic log u - log(1 - u)
    (the difference of two Gumbels: a Bernoulli is the two-class case) or Gumbel -log(-log u).
    Drawn as :func:`estimators.relaxed.relaxed_sample` draws it (one uniform tensor, clamped), so
    the same seed gives the same noise."""
    eps = torch.finfo(logits.dtype).eps
    u = torch.rand((n, *logits.shape), dtype=logits.dtype, device=logits.device).clamp_(eps, 1 - eps)
    if family == "bernoulli":
        return u.log() - (-u).log1p()
    return -(-u.log()).log()


def _relax(x: torch.Tensor, family: str) -> torch.Tensor:
    return torch.sigmoid(x) if family == "bernoulli" else torch.softmax(x, -1)


def decoupled_st(logits, noise, forward_temperature, backward_temperature, family):
    """Decoupled ST-GS (Shah et al. 2024, Sec. 3 / Algorithm 1): forward H(l/tau_f + g), backward
    the gradient of softmax(l/tau_b + g) (sigmoid for a Bernoulli), one shared noise g."""
    hard = harden(_relax(logits / forward_temperature + noise, family), family)
    soft = _relax(logits / backward_temperature + noise, family)
    return straight_through(hard, soft)


class DecoupledST(_Pathwise):
    """Decoupled straight-through Gumbel-softmax (Shah, Yan, Mozer & Liu 2024, "Improving discrete
    optimisation via decoupled straight-through Gumbel-softmax", arXiv:2410.13331, Sec. 3 /
    Algorithm 1): ST-GS with a forward temperature tau_f and a backward temperature tau_b,

        f is evaluated at D = H(l/tau_f + g), an exact sample of softmax(l/tau_f) (not of q unless
        tau_f = 1), and differentiated as if it were softmax(l/tau_b + g).

    Why: tau_f sets the forward pass's stochasticity (exploration), tau_b how the gradient is spread
    over the categories; the paper finds the best pairs off the diagonal tau_f = tau_b.  Biased for
    E_q[f] twice over: straight-through's bias, and for tau_f != 1 a forward sample of another
    distribution (``value`` is then a mean of f under softmax(l/tau_f)).  One f-evaluation per
    sample, at discrete points only.  tau_f = tau_b = 1 is ``st_gumbel`` at temperature 1.
    Defaults: the pair the paper analyses for bias and variance (its 8x4 categorical VAE,
    tau_f = 1.6, tau_b = 1.3); the paper tunes both per task.
    """

    name = "decoupled_st"
    families = DISCRETE
    paper = ("Shah, Yan, Mozer & Liu (2024), Improving discrete optimisation via decoupled "
             "straight-through Gumbel-softmax, arXiv:2410.13331, Sec. 3 / Algorithm 1")
    options = {
        "forward_temperature": Option(1.6, "tau_f: the forward sample is H(logits/tau_f + g)",
                                      constraint=constraints.positive),
        "backward_temperature": Option(1.3, "tau_b: the gradient is that of softmax(logits/tau_b + g)",
                                       constraint=constraints.positive),
    }

    def sample(self, dist, n, family):
        logits = fam.params(dist)["logits"]
        noise = gumbel_noise(logits.detach(), n, family)
        return decoupled_st(logits, noise, self.config["forward_temperature"],
                            self.config["backward_temperature"], family)
