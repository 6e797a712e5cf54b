"""The estimator contract: :class:`Estimate` and the :class:`Estimator` base class.

An estimator turns ``(dist, f, n_samples, context)`` into a scalar *surrogate* whose gradient with
respect to the distribution's parameters (and to any parameters ``f`` closes over) is its estimate of

    d/d(params) sum_over_batch E_{z ~ dist}[ f(z) ].

Subclasses are registered by name simply by defining a class attribute ``name``; the registry in
``estimators/__init__.py`` finds them by importing every module of the package (and the
``estbench.estimators`` entry-point group), never by a chain of ``if name == ...``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import nn
from torch import distributions as D

from estbench.core.errors import BudgetError, InfeasibleError  # noqa: F401 (plug-ins import it from here)
from estbench.core.plugins import Option, Registry, configure, display_name

from . import families as fam

ObjectiveFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Estimate:
    """What :meth:`Estimator.estimate` returns.

    surrogate: scalar tensor; its gradient is the estimator's gradient estimate (to be *ascended*).
    value:     detached tensor of shape ``dist.batch_shape``: estimate of E[f(z)] per batch element
               (for pure relaxations, of the relaxed objective they evaluate).
    n_evals:   evaluations of f spent per batch element.
    """

    surrogate: torch.Tensor
    value: torch.Tensor
    n_evals: int


class Estimator(nn.Module):
    """Base class of every estimator.

    Class attributes a plug-in declares:
      name      registry name (lower_snake_case); a class without one is abstract
      families  frozenset of supported families ("bernoulli", "categorical", "gaussian")
      unbiased  True if E[grad surrogate] equals the true gradient of the original objective
      paper     citation (authors, year, title, equation)
      options   {option name: Option(default, doc)}
      sample_unit  the budget is spent in whole units of this many f-evaluations (2 for pairs)
      min_samples  the smallest budget that works (2 for leave-one-out)
      exceeds_budget  why the estimator may spend more f-evaluations than the budget (an exact
                   enumeration, a sparse support); '' for every sampling estimator, which the
                   harness holds to the budget by counting its calls of f
      oracle    True for a reference outside the competition (``exact``): views draw it as a
                reference line and no leaderboard, profile or test ranks it
      deterministic  True if the estimate draws no random numbers (an enumeration, a sparse
                support): the harness then measures two estimates, checks they are identical,
                and reads its figures as from M identical ones, instead of computing M copies

    Whether the estimator can run on a problem at a budget is one declarative rule, :meth:`skip`
    (benchopt's ``skip``): the default rule reads ``min_samples``, ``sample_unit`` and
    :meth:`budget_unit`; a plug-in with another rule overrides ``skip`` and nothing else.

    Stateful parts (moving averages, learned baselines or control variates) live on the instance,
    which is an ``nn.Module`` so they follow ``.to(device)``.  Learned parameters get gradients
    during ``estimate`` (through terms that do not touch the estimated parameters' gradient, or by
    writing ``.grad`` directly) and are stepped by :meth:`update`, which the harness calls after each
    training step with the estimator's own optimiser.  Measurement runs on a ``deepcopy`` and never
    calls ``update``; it is put in ``.eval()`` mode, in which learned parts should skip the work
    that only serves their own training.
    """

    name: ClassVar[str] = ""
    families: ClassVar[frozenset] = frozenset()
    unbiased: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    sample_unit: ClassVar[int] = 1
    min_samples: ClassVar[int] = 1
    exceeds_budget: ClassVar[str] = ""
    oracle: ClassVar[bool] = False
    deterministic: ClassVar[bool] = False
    #: learning rate of the estimator's own optimiser (learned baselines / control variates)
    inner_lr: ClassVar[float] = 1e-3

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            cls.families = frozenset(cls.families)
            bad = set(cls.families) - set(fam.FAMILIES)
            if bad:
                raise TypeError(f"estimator {cls.name!r} declares unknown families {sorted(bad)}")
            REGISTRY.define(cls)

    def __init__(self, **options):
        super().__init__()
        self.config = configure("estimator", self.name, self.options, options)
        self._inner_opt: Optional[torch.optim.Optimizer] = None

    # ---- the contract -------------------------------------------------------------------------
    def estimate(
        self,
        dist: D.Distribution,
        f: ObjectiveFn,
        n_samples: int,
        context: Optional[torch.Tensor] = None,
    ) -> Estimate:
        """Check the family and the feasibility rule (:meth:`skip`), then delegate to
        :meth:`_estimate`."""
        family = self.check_family(dist)
        if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
            raise ValueError(f"estimator {self.name!r}: n_samples must be a positive int, got {n_samples!r}")
        reason = self.skip(dist, n_samples)
        if reason:
            raise BudgetError(reason)
        return self._estimate(dist, f, n_samples, context, family)

    def _estimate(self, dist, f, n_samples, context, family) -> Estimate:  # pragma: no cover
        raise NotImplementedError

    # ---- checks -------------------------------------------------------------------------------
    def check_family(self, dist: D.Distribution) -> str:
        family = fam.family_of(dist)
        if family not in self.families:
            raise fam.FamilyError(
                f"estimator {self.name!r} supports {sorted(self.families)}, not {family!r} "
                f"({type(fam.unwrap(dist)[0]).__name__})"
            )
        return family

    def skip(self, dist: D.Distribution, n_samples: int) -> Optional[str]:
        """Why this estimator cannot run on ``dist`` with a budget of ``n_samples`` f-evaluations
        per data point (one line, recorded as the cell's *not run* reason), or None if it can.

        The default rule: at least ``min_samples`` and at least one whole :meth:`budget_unit`, and
        a multiple of ``sample_unit``."""
        need = max(self.min_samples, self.budget_unit(dist))
        if n_samples < need or n_samples % self.sample_unit:
            return (f"estimator {self.name!r} cannot spend a budget of {n_samples} f-evaluations per "
                    f"data point: it needs at least {need}"
                    + (f" and a multiple of {self.sample_unit}" if self.sample_unit > 1 else ""))
        return None

    def budget_unit(self, dist: D.Distribution) -> int:
        """f-evaluations per whole unit of budget on ``dist``: ``sample_unit`` unless the unit depends
        on the distribution (per-dimension estimators spend D*K per sample and override this)."""
        return self.sample_unit

    # ---- learned parts ------------------------------------------------------------------------
    def update(self) -> None:
        """Step the estimator's own optimiser on gradients accumulated by ``estimate`` (if any)."""
        ps = [p for p in self.parameters() if p.requires_grad and not _is_uninitialized(p)]
        if not ps:
            return
        known = {id(p) for g in self._inner_opt.param_groups for p in g["params"]} if self._inner_opt else set()
        if self._inner_opt is None or known != {id(p) for p in ps}:
            # parameters made on first use (a layer sized by the first context) join the optimiser
            state = self._inner_opt.state if self._inner_opt is not None else {}
            self._inner_opt = torch.optim.Adam(ps, lr=self.inner_lr)
            self._inner_opt.state.update({p: s for p, s in state.items() if id(p) in {id(q) for q in ps}})
        if any(p.grad is not None for p in ps):
            self._inner_opt.step()
        self._inner_opt.zero_grad(set_to_none=True)

    def zero_grad_inner(self) -> None:
        for p in self.parameters():
            p.grad = None

    # ---- display ------------------------------------------------------------------------------
    @property
    def display_name(self) -> str:
        return display_name(self.name, self.options, self.config)

    def extra_repr(self) -> str:
        return self.display_name


def _is_uninitialized(p) -> bool:
    return isinstance(p, nn.parameter.UninitializedParameter)


def check_f_output(fz: torch.Tensor, n: int, batch_shape: torch.Size, who: str) -> torch.Tensor:
    expected = (n, *batch_shape)
    if tuple(fz.shape) != expected:
        raise ValueError(
            f"{who}: f returned shape {tuple(fz.shape)}, expected (n_samples, *batch_shape) = {expected}"
        )
    return fz


#: every registered estimator class by name; built-in modules are found by importing the package
REGISTRY = Registry("estimator", "estimators", Estimator, "estbench.estimators")
