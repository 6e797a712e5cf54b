"""The distribution vocabulary shared by every estimator.

Estimators receive a ``torch.distributions`` object -- ``Bernoulli``, ``OneHotCategorical`` or
``Normal``, bare or wrapped in ``Independent`` -- and need three things from it: which family it is,
the bare distribution with its parameters, and how to wrap a distribution built on those parameters
back into the same event structure.  This module is the one place that knows those three facts, so
no estimator pattern-matches on distribution classes itself.
"""
from __future__ import annotations

import functools

import torch
from torch import distributions as D

from estbench.core.errors import FamilyError  # re-exported as estimators.FamilyError

FAMILIES = ("bernoulli", "categorical", "gaussian")

_BASE_FAMILY = {
    D.Bernoulli: "bernoulli",
    D.OneHotCategorical: "categorical",
    D.OneHotCategoricalStraightThrough: "categorical",
    D.Normal: "gaussian",
}




def unwrap(dist: D.Distribution) -> tuple[D.Distribution, int]:
    """Return ``(base, k)``: the bare distribution and the number of batch dims reinterpreted as event.

    Nested ``Independent`` wrappers are flattened, so ``k`` counts every reinterpreted dimension.
    """
    k = 0
    while isinstance(dist, D.Independent):
        k += dist.reinterpreted_batch_ndims
        dist = dist.base_dist
    return dist, k


def rewrap(base: D.Distribution, k: int) -> D.Distribution:
    """Inverse of :func:`unwrap`: reinterpret the last ``k`` batch dims of ``base`` as event dims."""
    return D.Independent(base, k) if k else base


def family_of(dist: D.Distribution) -> str:
    """The family name of ``dist`` ("bernoulli", "categorical" or "gaussian"); FamilyError otherwise."""
    base, _ = unwrap(dist)
    for cls, fam in _BASE_FAMILY.items():
        if type(base) is cls:
            return fam
    raise FamilyError(
        f"unsupported distribution {type(base).__name__}: estbench estimators take Bernoulli, "
        f"OneHotCategorical or Normal, optionally wrapped in Independent"
    )


def params(dist: D.Distribution) -> dict[str, torch.Tensor]:
    """The natural parameter tensors of ``dist``: logits for discrete families, loc/scale for Gaussian."""
    base, _ = unwrap(dist)
    fam = family_of(dist)
    if fam == "gaussian":
        return {"loc": base.loc, "scale": base.scale}
    return {"logits": base.logits}


def rebuild(dist: D.Distribution, new_params: dict[str, torch.Tensor]) -> D.Distribution:
    """A distribution of the same family and event structure as ``dist`` with other parameters.

    The parameters may carry extra leading batch dimensions (replicas), which become batch dims.
    """
    base, k = unwrap(dist)
    fam = family_of(dist)
    if fam == "gaussian":
        new = D.Normal(new_params["loc"], new_params["scale"], validate_args=False)
    elif fam == "bernoulli":
        new = D.Bernoulli(logits=new_params["logits"], validate_args=False)
    else:
        new = D.OneHotCategorical(logits=new_params["logits"], validate_args=False)
    return rewrap(new, k)


def log_prob(dist: D.Distribution, z: torch.Tensor) -> torch.Tensor:
    """``dist.log_prob(z)`` through a direct formula for the discrete families.

    torch's Bernoulli/OneHotCategorical ``log_prob`` broadcast the parameters to the sample shape
    and go through a generic cross-entropy; on small problems that is a visible share of a step.
    log Bern(z; logits) = z * logits - softplus(logits); log Cat(z; logits) = z . log_softmax(logits).
    """
    base, k = unwrap(dist)
    if type(base) is D.Bernoulli:
        logits = base.logits
        lp = z * logits - torch.nn.functional.softplus(logits)
    elif type(base) is D.OneHotCategorical:
        lp = (z * torch.log_softmax(base.logits, -1)).sum(-1)
    else:
        return dist.log_prob(z)
    return lp.sum(tuple(range(-k, 0))) if k else lp


@functools.lru_cache(maxsize=64)
def _configuration_table(n_cells: int, radix: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Digits of every joint configuration, (radix**n_cells, n_cells), cached: exact enumeration
    calls this every step with the same sizes."""
    C = radix**n_cells
    idx = torch.arange(C, device=device)
    powers = radix ** torch.arange(n_cells - 1, -1, -1, device=device)
    return (idx[:, None] // powers[None, :]) % radix


def support_size(dist: D.Distribution) -> int:
    """Number of joint configurations of one event of a discrete ``dist`` (for exact enumeration)."""
    base, k = unwrap(dist)
    fam = family_of(dist)
    if fam == "gaussian":
        raise FamilyError("a Gaussian has no finite support to enumerate")
    shape = base.batch_shape[len(base.batch_shape) - k:]
    cells = 1
    for s in shape:
        cells *= int(s)
    per_cell = 2 if fam == "bernoulli" else int(base.event_shape[-1])
    return per_cell ** cells


def enumerate_events(dist: D.Distribution) -> torch.Tensor:
    """Every joint configuration of one event, shape ``(C, *batch_shape, *event_shape)``.

    Built without Python loops over configurations: the mixed-radix digits of ``arange(C)`` give
    the value of every discrete cell in every configuration.
    """
    base, k = unwrap(dist)
    fam = family_of(dist)
    C = support_size(dist)
    ev_shape = base.batch_shape[len(base.batch_shape) - k:]
    n_cells = 1
    for s in ev_shape:
        n_cells *= int(s)
    radix = 2 if fam == "bernoulli" else int(base.event_shape[-1])
    logits = params(dist)["logits"]
    digits = _configuration_table(n_cells, radix, logits.dtype, str(logits.device))  # (C, n_cells)
    dtype = logits.dtype
    if fam == "bernoulli":
        cfg = digits.to(dtype).reshape(C, *ev_shape)
    else:
        cfg = torch.nn.functional.one_hot(digits, radix).to(dtype).reshape(C, *ev_shape, radix)
    batch_shape = dist.batch_shape
    return cfg.reshape(C, *([1] * len(batch_shape)), *cfg.shape[1:]).expand(
        C, *batch_shape, *cfg.shape[1:]
    )
