"""A table of small random estimation problems with exact gradients, one per family.

Used by the generic test suite and by ``estbench rank``'s contract check of a user's estimator.

Like torch's distribution tests loop over one table of examples, the generic estimator tests loop
over these.  Each problem has a batch of independent elements (different parameters and different
f per element), an f that is smooth (so relaxations can evaluate it) and non-linear in z (so
straight-through and relaxations are biased), and an exact gradient computed *independently* of
the estimators: by brute-force enumeration with itertools for discrete families, by a closed form
for the Gaussian one.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import distributions as D

#: The z-score tolerance of every statistical check (the tests, and ``estbench rank``'s contract
#: check in estbench.engine.contract): a Monte Carlo mean may differ from its exact value by less
#: than Z_TOL standard errors.  Why 4.5: a correct estimator fails one two-sided z-score with
#: probability 2 * Phi(-4.5) ~ 6.8e-6 (normal approximation; M = 1000s of estimates per mean), and
#: a check fails if *any* of its z-scores does, so the false-alarm rate is about (number of z-scores)
#: x 6.8e-6.  The generic estimator suite alone tests several hundred (unbiased estimator-family pairs
#: x 2 offsets x 12 coordinates), the whole test suite a few thousand: under 1% and a few % at most
#: when the seeds or an estimator change (the seeds are fixed, so a passing check stays passing).
#: At 4.0 (6.3e-5 each) both would be about nine times higher; beyond 5 the checks would miss
#: biases they catch now.
#: Define it here only; tests and contract.py import it.
Z_TOL = 4.5


@dataclass
class ExactProblem:
    family: str
    params: dict  # leaf tensors, shapes (*batch, ...)
    make_dist: Callable  # params dict -> dist (params may carry extra leading replica dims)
    f: Callable
    exact: dict  # param name -> exact gradient of sum_b E[f]
    batch_shape: tuple

    def replicate(self, M: int):
        """Per-replica leaf parameters (M, ...) and the distribution over them."""
        leaves = {k: v.detach().unsqueeze(0).expand(M, *v.shape).clone().requires_grad_()
                  for k, v in self.params.items()}
        return leaves, self.make_dist(leaves)


def _bernoulli_f(W, A, u, offset):
    # f(z) = z.w + z^T A z + sin(z.u) + offset, per batch element (W, A, u carry the batch dims)
    def f(z):
        lin = (z * W).sum(-1)
        quad = torch.einsum("...i,...ij,...j->...", z, A.expand(*z.shape[:-1], *A.shape[-2:]), z)
        return lin + quad + torch.sin((z * u).sum(-1)) + offset
    return f


def bernoulli_problem(seed: int = 0, batch: int = 3, dim: int = 4, offset: float = 0.0,
                      dtype=torch.float64, device="cpu") -> ExactProblem:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, dim, generator=g, dtype=dtype)
    W = torch.randn(batch, dim, generator=g, dtype=dtype)
    A = torch.randn(batch, dim, dim, generator=g, dtype=dtype) * 0.5
    u = torch.randn(batch, dim, generator=g, dtype=dtype)
    logits, W, A, u = (t.to(device) for t in (logits, W, A, u))
    f = _bernoulli_f(W, A, u, offset)
    make = lambda p: D.Independent(D.Bernoulli(logits=p["logits"]), 1)
    # brute force: E[f] = sum over {0,1}^dim of q(z) f(z)
    lp = logits.detach().clone().requires_grad_()
    q = torch.sigmoid(lp)
    total = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=dim):
        z = torch.tensor(bits, dtype=dtype, device=device).expand(batch, dim)
        prob = (q * z + (1 - q) * (1 - z)).prod(-1)
        total = total + (prob * f(z)).sum()
    (g_exact,) = torch.autograd.grad(total, lp)
    return ExactProblem("bernoulli", {"logits": logits}, make, f, {"logits": g_exact}, (batch,))


def categorical_problem(seed: int = 0, batch: int = 2, dim: int = 2, classes: int = 3,
                        offset: float = 0.0, dtype=torch.float64, device="cpu") -> ExactProblem:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, dim, classes, generator=g, dtype=dtype)
    R = torch.randn(batch, dim, classes, generator=g, dtype=dtype)
    Wp = torch.randn(batch, classes, classes, generator=g, dtype=dtype)
    logits, R, Wp = (t.to(device) for t in (logits, R, Wp))

    def f(z):  # unary + pairwise between consecutive latents + a smooth non-linearity
        unary = (z * R).sum((-1, -2))
        pair = torch.einsum("...k,...kl,...l->...", z[..., 0, :],
                            Wp.expand(*z.shape[:-2], classes, classes), z[..., 1, :])
        return unary + pair + torch.cos(unary) + offset

    make = lambda p: D.Independent(D.OneHotCategorical(logits=p["logits"]), 1)
    lp = logits.detach().clone().requires_grad_()
    q = torch.softmax(lp, -1)
    eye = torch.eye(classes, dtype=dtype, device=device)
    total = 0.0
    for ks in itertools.product(range(classes), repeat=dim):
        z = eye[list(ks)].expand(batch, dim, classes)
        prob = (q * z).sum(-1).prod(-1)
        total = total + (prob * f(z)).sum()
    (g_exact,) = torch.autograd.grad(total, lp)
    return ExactProblem("categorical", {"logits": logits}, make, f, {"logits": g_exact}, (batch,))


def gaussian_problem(seed: int = 0, batch: int = 2, dim: int = 3, offset: float = 0.0,
                     dtype=torch.float64, device="cpu") -> ExactProblem:
    """f(z) = -||z - a||^2 + c cos(w.z) per element; E[cos(w.z)] = cos(w.mu) exp(-sum w^2 s^2 / 2)."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, dim, generator=g, dtype=dtype) * 0.5
    log_scale = torch.randn(batch, dim, generator=g, dtype=dtype) * 0.3 - 0.3
    a = torch.randn(batch, dim, generator=g, dtype=dtype)
    w = torch.randn(batch, dim, generator=g, dtype=dtype)
    loc, log_scale, a, w = (t.to(device) for t in (loc, log_scale, a, w))

    def f(z):
        return -((z - a) ** 2).sum(-1) + 2.0 * torch.cos((z * w).sum(-1)) + offset

    make = lambda p: D.Independent(D.Normal(p["loc"], p["log_scale"].exp()), 1)
    mu = loc.detach().clone().requires_grad_()
    ls = log_scale.detach().clone().requires_grad_()
    s2 = (2 * ls).exp()
    total = (-((mu - a) ** 2 + s2).sum(-1)
             + 2.0 * torch.cos((mu * w).sum(-1)) * torch.exp(-(w**2 * s2).sum(-1) / 2) + offset).sum()
    g_mu, g_ls = torch.autograd.grad(total, [mu, ls])
    return ExactProblem("gaussian", {"loc": loc, "log_scale": log_scale}, make, f,
                        {"loc": g_mu, "log_scale": g_ls}, (batch,))


MAKERS = {"bernoulli": bernoulli_problem, "categorical": categorical_problem,
          "gaussian": gaussian_problem}


def problem(family: str, **kw) -> ExactProblem:
    return MAKERS[family](**kw)


def budget_for(est, wanted: int = 4, dist=None) -> int:
    """The smallest budget >= wanted (and >= the estimator's minimum) in the estimator's units on
    ``dist`` (units may depend on the distribution, e.g. D*K per sample)."""
    unit = est.budget_unit(dist) if dist is not None else est.sample_unit
    n = max(wanted, est.min_samples, unit)
    return ((n + unit - 1) // unit) * unit


def estimates(est, prob: ExactProblem, M: int, n: int | None = None):
    """M independent estimates in one call (replicas on a leading batch axis).

    Returns ``{param: (M, *shape)}`` per-replica gradients and the Estimate.
    """
    leaves, dist = prob.replicate(M)
    e = est.estimate(dist, prob.f, n if n is not None else budget_for(est, dist=dist))
    names = list(leaves)
    grads = torch.autograd.grad(e.surrogate, [leaves[k] for k in names], allow_unused=True)
    out = {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(names, grads)}
    return out, e


def z_scores(G: dict, exact: dict):
    """Per-coordinate z = (mean - exact) / standard error, concatenated; and the max |bias|."""
    zs, diffs = [], []
    for k, g in G.items():
        M = g.shape[0]
        mean, se = g.mean(0), g.std(0) / M**0.5
        diff = mean - exact[k]
        diffs.append(diff.reshape(-1))
        zs.append((diff / se.clamp_min(1e-300)).reshape(-1) if (se > 0).all() else
                  torch.where(se > 0, diff / se.clamp_min(1e-300),
                              torch.where(diff.abs() < 1e-9, 0.0, float("inf"))).reshape(-1))
    return torch.cat(zs), torch.cat(diffs)
