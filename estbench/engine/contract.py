"""Checking an estimator against the contract, with messages that say what is wrong.

Used by the generic test suite (for every registered estimator) and by ``estbench rank`` (for a
user's estimator before any benchmark time is spent on it).
"""
from __future__ import annotations

import torch

import estimators
from estbench.core.budget import EvaluationCounter
from estbench.core.plugins import NAME_PATTERN
from estbench.engine.problems import Z_TOL, budget_for, estimates, problem, z_scores


def check_declarations(cls) -> list[str]:
    """Problems with the class attributes every plug-in declares."""
    out = []
    if not (isinstance(cls, type) and issubclass(cls, estimators.Estimator)):
        return [f"{cls!r} is not a subclass of estimators.Estimator"]
    if not isinstance(cls.name, str) or not NAME_PATTERN.match(cls.name):
        out.append(f"`name` must be lower_snake_case (letters, digits, underscores, a letter first: "
                   f"what `estbench run --estimators` can parse), got {cls.name!r}")
    fams = set(cls.families)
    if not fams or not fams <= set(estimators.FAMILIES):
        out.append(f"`families` must be a non-empty subset of {list(estimators.FAMILIES)}, got {sorted(fams)}")
    if not isinstance(cls.unbiased, bool):
        out.append("`unbiased` must be a bool")
    if not cls.paper:
        out.append("`paper` must cite the estimator's paper (authors, year, equation)")
    if not (cls.__doc__ or "").strip():
        out.append("the class needs a docstring citing paper and equation")
    return out


def check_estimate(est, family: str, device="cpu", dtype=torch.float32) -> list[str]:
    """Problems with one call of ``est.estimate`` on a small random problem of ``family``."""
    prob = problem(family, dtype=dtype, device=device)
    leaves, dist = prob.replicate(1)
    n = budget_for(est, dist=dist)
    counter = EvaluationCounter()
    try:
        e = est.estimate(dist, counter.wrap(prob.f, dist), n)
    except Exception as exc:
        return [f"estimate() raised on a {family} problem with n_samples={n}: {type(exc).__name__}: {exc}"]
    out = []
    if not isinstance(e, estimators.Estimate):
        return [f"estimate() must return estimators.Estimate, got {type(e).__name__}"]
    s = e.surrogate
    if not isinstance(s, torch.Tensor) or s.dim() != 0:
        out.append(f"surrogate must be a scalar tensor, got shape {tuple(getattr(s, 'shape', ()))}")
    elif not s.requires_grad:
        out.append("surrogate does not require grad: it carries no gradient")
    elif s.device.type != torch.device(device).type:
        out.append(f"surrogate is on {s.device}, the distribution on {device}")
    v = e.value
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(dist.batch_shape):
        out.append(f"value must have shape batch_shape={tuple(dist.batch_shape)}, "
                   f"got {tuple(getattr(v, 'shape', ()))}")
    elif v.requires_grad:
        out.append("value must be detached")
    elif v.device.type != torch.device(device).type:
        out.append(f"value is on {v.device}, the distribution on {device}")
    if not isinstance(e.n_evals, int) or e.n_evals < 1:
        out.append(f"n_evals must be a positive int, got {e.n_evals!r}")
    elif counter.count != e.n_evals:
        out.append(f"n_evals reports {e.n_evals} f-evaluations per batch element but f was evaluated "
                   f"{counter.count} times")
    if not out:
        grads = torch.autograd.grad(s, list(leaves.values()), allow_unused=True)
        if all(g is None for g in grads):
            out.append("the surrogate gives no gradient to the distribution's parameters")
        elif any(g is not None and not bool(torch.isfinite(g).all()) for g in grads):
            out.append("the gradient has non-finite values on a well-conditioned problem")
        elif any(g is not None and g.device.type != torch.device(device).type for g in grads):
            out.append("the gradient is not on the distribution's device")
    return out


def check_unbiased(est, family: str, M: int = 4000, offset: float = 0.0) -> list[str]:
    """For an estimator claiming ``unbiased``: the mean of M estimates matches the exact gradient."""
    prob = problem(family, offset=offset)
    G, _ = estimates(est, prob, M)
    z, diff = z_scores(G, prob.exact)
    worst = z.abs().max().item()
    if worst >= Z_TOL:
        return [f"claims unbiased=True but on a {family} problem (offset {offset}) its mean estimate is "
                f"{worst:.1f} standard errors from the exact gradient (max |bias| "
                f"{diff.abs().max().item():.3g})"]
    return []


def check(cls, statistical: bool = True) -> list[str]:
    """Every problem found with an estimator class; empty when it honours the contract."""
    out = check_declarations(cls)
    if out:
        return out
    try:
        est = cls()
    except Exception as exc:
        return [f"cannot be instantiated with its default options: {type(exc).__name__}: {exc}"]
    for fam in sorted(cls.families):
        out += check_estimate(est, fam)
    if statistical and not out and est.unbiased:
        torch.manual_seed(0)
        for fam in sorted(cls.families):
            out += check_unbiased(cls(), fam)
    return out
