"""Measure-valued gradients (weak derivatives) for Gaussian latents."""
from __future__ import annotations

import math

import torch
from torch import distributions as D

from .base import Estimate, Estimator, Option, check_f_output
from . import families as fam


def gaussian_weak_derivative_draws(shape, dtype, device, coupling=True):
    """Standardised draws of the Gaussian weak derivatives (Mohamed et al. 2020, Table 1).

    Returns ``(loc_pos, loc_neg, scale_pos, scale_neg)``, each of ``shape``, such that for
    x ~ N(mu, sigma^2):  d/dmu E[f] = 1/(sigma sqrt(2 pi)) E[f(mu + sigma loc_pos) - f(mu + sigma loc_neg)]
    and d/dsigma E[f] = 1/sigma E[f(mu + sigma scale_pos) - f(mu + sigma scale_neg)], with
    loc_pos = W, loc_neg = -W, W ~ Weibull(sqrt 2, 2) (the Rayleigh law), scale_pos ~ double-sided
    Maxwell and scale_neg ~ N(0, 1).  With ``coupling`` the parts share random numbers: the same W,
    and scale_neg = scale_pos * U with U ~ U(0, 1), which is exactly N(0, 1) (the product of a
    double-sided Maxwell and an independent uniform is standard normal).
    """
    t = lambda v: torch.tensor(v, dtype=dtype, device=device)
    weibull = D.Weibull(t(math.sqrt(2.0)), t(2.0))
    W = weibull.sample(shape)
    W2 = W if coupling else weibull.sample(shape)
    sign = torch.randint(0, 2, shape, device=device).to(dtype) * 2 - 1
    maxwell = D.Chi2(t(3.0)).sample(shape).sqrt() * sign
    if coupling:
        gauss = maxwell * torch.rand(shape, dtype=dtype, device=device)
    else:
        gauss = torch.randn(shape, dtype=dtype, device=device)
    return W, -W2, maxwell, gauss


class MeasureValued(Estimator):
    """Measure-valued gradient estimator for Gaussians (Mohamed, Rosca, Figurnov & Mnih 2020,
    "Monte Carlo gradient estimation in machine learning", JMLR 21(132), Sec. 6 and Table 1;
    coupling Sec. 6.5 / 8.2).

    The derivative of a density w.r.t. a parameter is written as a difference of two probability
    measures, grad q = c (q+ - q-), so grad E_q[f] = c (E_{q+}[f] - E_{q-}[f]).  For N(mu, sigma^2):
    mean: c = 1/(sigma sqrt(2 pi)), q+/- = mu +/- sigma Weibull(sqrt 2, 2); scale: c = 1/sigma,
    q+ = double-sided Maxwell(mu, sigma), q- = N(mu, sigma).  Coordinate d of a D-dimensional
    factorised Gaussian is perturbed with the other coordinates drawn from q (shared across d).
    Only f-values are needed (f need not be differentiable) and, because each estimate is a
    *difference* of f-values under common random numbers, its variance ignores any offset of f and
    shrinks with the coupling -- unlike the score function.  Cost: 2 evaluations per coordinate per
    parameter, i.e. 4*D per sample, all in one call of f; the budget is spent in whole samples,
    floor(n / (4 D)), and n < 4 D is an error.
    """

    name = "measure_valued"
    families = frozenset({"gaussian"})
    unbiased = True
    paper = ("Mohamed, Rosca, Figurnov & Mnih (2020), Monte Carlo gradient estimation in machine "
             "learning, JMLR 21(132), Sec. 6, Table 1 (coupling Sec. 6.5, 8.2)")
    options = {"coupling": Option(True, "common random numbers for the positive and negative parts")}
    def budget_unit(self, dist) -> int:
        base, _ = fam.unwrap(dist)
        return 4 * math.prod(base.batch_shape[len(dist.batch_shape):])

    def skip(self, dist, n):
        unit = self.budget_unit(dist)
        if n < unit:
            return (f"estimator 'measure_valued' evaluates f at 4*D points per sample (2 per "
                    f"coordinate for loc and for scale, D={unit // 4}, 4*D={unit}): n_samples={n} must "
                    f"be at least {unit}; the budget is spent in whole multiples of {unit}")
        return None

    def _estimate(self, dist, f, n, context, family):
        base, _ = fam.unwrap(dist)
        B = tuple(dist.batch_shape)
        ev = tuple(base.batch_shape[len(B):])
        Dn = math.prod(ev)
        unit = 4 * Dn
        ns = n // unit
        loc, scale = base.loc, base.scale  # broadcast to base.batch_shape by torch
        mu = loc.detach().reshape(*B, Dn)
        sd = scale.detach().reshape(*B, Dn)
        shape = (ns, *B, Dn)
        x = mu + sd * torch.randn(shape, dtype=mu.dtype, device=mu.device)  # shared other coordinates
        draws = gaussian_weak_derivative_draws(shape, mu.dtype, mu.device, self.config["coupling"])
        vals = mu + sd * torch.stack(draws, 1)  # (ns, 4, *B, D)
        eye = torch.eye(Dn, dtype=torch.bool, device=mu.device).reshape(Dn, *([1] * len(B)), Dn)
        pts = torch.where(eye, vals.unsqueeze(2), x[:, None, None])  # (ns, 4, D, *B, D)
        fz = check_f_output(f(pts.reshape(ns * unit, *B, *ev)), ns * unit, dist.batch_shape, self.name)
        fz = fz.reshape(ns, 4, Dn, *B)
        fd = fz.detach()
        diff = (fd[:, 0::2] - fd[:, 1::2]).mean(0).movedim(1, -1)  # (2, *B, D): pos - neg
        g_loc = diff[0] / (sd * math.sqrt(2 * math.pi))
        g_scale = diff[1] / sd
        # the gradient estimates enter through (g * param): chains correctly through any
        # parameterisation of loc and scale (e.g. scale = exp(log_scale))
        surrogate = (g_loc.reshape(loc.shape) * loc).sum() + (g_scale.reshape(scale.shape) * scale).sum()
        # f at the scale-negative points: each is an exact sample of q -> E[f] and f's own gradient
        on_q = fz[:, 3].mean((0, 1))
        return Estimate(surrogate + on_q.sum(), on_q.detach(), ns * unit)
