"""Pathwise (reparameterisation) gradients for continuous latents."""
from __future__ import annotations

from .base import Estimate, Estimator, check_f_output


class Reparam(Estimator):
    """Gaussian reparameterisation: z = mu + sigma * eps, eps ~ N(0, I), so
    grad E[f(z)] = E[grad_z f(z) * dz/dparams] (Kingma & Welling 2014, Eq. 4-5; Rezende et al. 2014).
    Unbiased for differentiable f; variance is governed by f's smoothness, not its offset.
    Spends n evaluations (and their gradients) per data point."""

    name = "reparam"
    families = frozenset({"gaussian"})
    unbiased = True
    paper = "Kingma & Welling (2014), Auto-encoding variational Bayes, ICLR, Sec. 2.4"

    def _estimate(self, dist, f, n, context, family):
        z = dist.rsample((n,))
        fz = check_f_output(f(z), n, dist.batch_shape, self.name)
        return Estimate(fz.mean(0).sum(), fz.detach().mean(0), n)
