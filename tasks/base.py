"""The task contract.

A task owns its data, its model and its latent family, and tells the harness -- and nothing more:

* ``setup(device, generator)``       build parameters (deterministically from ``generator``)
* ``parameters()``                    every parameter the optimiser trains
* ``estimated_parameters()``          those whose gradient the estimator *estimates*: the
                                      distribution's parameters for toys, the encoder for models
* ``train_batches(generator)``        the training data order (identical for every estimator)
* ``measure_batch()``                 the fixed batch on which gradient estimates are measured
* ``problem(batch)``                  a :class:`Problem`: ``dist``, ``f``, ``context`` and an
                                      ``analytic`` part of the training objective (e.g. -KL)
* ``reference_gradient(batch)``       d/d(estimated params) of sum_b E_q[f] as a :class:`Reference`
* ``evaluate(final)``                 the held-out figure, higher is better (exact E[f] for toys)

``f`` must broadcast over extra leading dimensions in front of ``dist.batch_shape`` (the harness
stacks replicas of a batch there to compute many estimates in one pass).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
from torch import distributions as D

from estbench.core.plugins import Option, Registry, configure, display_name


@dataclass
class Problem:
    """One batch's estimation problem: maximise sum_b E_{z~dist}[f(z)] + analytic."""

    dist: D.Distribution
    f: Callable[[torch.Tensor], torch.Tensor]
    context: Optional[torch.Tensor] = None
    #: differentiable scalar computed exactly (not estimated), e.g. minus an analytic KL; None if none
    analytic: Optional[torch.Tensor] = None


@dataclass
class Reference:
    """A reference gradient, flattened over ``estimated_parameters()`` in order."""

    grad: torch.Tensor
    exact: bool
    #: per-coordinate standard error when the reference is itself a Monte Carlo estimate
    stderr: Optional[torch.Tensor] = None
    #: how many samples a Monte Carlo reference used
    n_samples: Optional[int] = None

    @classmethod
    def from_chunks(cls, rows: torch.Tensor, n_samples: int) -> "Reference":
        """The Monte Carlo reference from R independent chunk estimates ``rows`` (R, P): their
        mean, with per-coordinate standard error std / sqrt(R) (ddof 1), accumulated in float64
        and returned in the rows' dtype.  Contiguous reductions only (a strided ``std(0)`` over a
        wide (R, P) tensor is several times slower)."""
        rows = rows.detach()
        R = rows.shape[0]
        if R < 2:
            raise ValueError(f"a Monte Carlo reference needs at least 2 chunks, got {R}")
        r64 = rows.double()
        mean = r64.mean(0)
        stderr = ((r64 - mean).square_().sum(0) / ((R - 1) * R)).sqrt_()
        return cls(mean.to(rows.dtype), exact=False, stderr=stderr.to(rows.dtype),
                   n_samples=n_samples)


def flat_grad(outputs: torch.Tensor, params: list[torch.Tensor], **kw) -> torch.Tensor:
    """d outputs / d params flattened into one vector (zeros for parameters that do not matter)."""
    grads = torch.autograd.grad(outputs, params, allow_unused=True, **kw)
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)
    ])


class Task:
    """Base class of every task; a subclass with a ``name`` registers itself."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    #: the declarations (``core.metrics.Metric``, ``source=TASK``, recorded at the END) of what
    #: ``final_metrics`` records: how each is read, labelled and judged
    final_figures: ClassVar[tuple] = ()
    #: ``estbench compare``'s regression tolerances where this task's scale is not the declared
    #: default's, {metric or figure: tolerance} (a toy's E[f] spans hundredths, a model's ELBO nats)
    tolerances: ClassVar[dict] = {}
    #: the optimiser every estimator gets on this task (same for all: the budget is fair)
    optimizer: ClassVar[str] = "adam"
    lr: ClassVar[float] = 1e-2
    #: how much held-out data the final figures use, "full" or "subset": set by the harness from
    #: the cell's budget (``Budget.evaluation``) before ``setup``; a task without a subset ignores it
    evaluation: str = "full"
    #: named budgets: {"quick": {...Budget fields...}, "standard": {...}}; ``estbench run --budget``
    budgets: ClassVar[dict[str, dict]] = {
        "quick": {"steps": 100, "n_samples": 4},
        "standard": {"steps": 2000, "n_samples": 4},
    }

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            REGISTRY.define(cls)

    def __init__(self, **options):
        self.config = configure("task", self.name, self.options, options)
        self.device = torch.device("cpu")

    @property
    def display_name(self) -> str:
        return display_name(self.name, self.options, self.config)

    # ---- to implement -------------------------------------------------------------------------
    def setup(self, device: torch.device, generator: torch.Generator) -> None:
        raise NotImplementedError

    def parameters(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def estimated_parameters(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def train_batches(self, generator: torch.Generator) -> Iterator[Any]:
        raise NotImplementedError

    def measure_batch(self) -> Any:
        raise NotImplementedError

    def problem(self, batch: Any) -> Problem:
        raise NotImplementedError

    def reference_gradient(self, batch: Any) -> Reference:
        raise NotImplementedError

    def evaluate(self, final: bool = False) -> float:
        raise NotImplementedError

    def final_metrics(self) -> dict[str, float]:
        """Extra held-out figures recorded at the end of a cell (e.g. an IWAE bound, accuracy),
        each declared in ``final_figures``."""
        return {}

    def artifacts(self) -> dict:
        """JSON-serialisable non-numeric results kept with the cell (e.g. example rationales)."""
        return {}

    @classmethod
    def report_section(cls, cells: list) -> Optional[tuple[str, str, list]]:
        """The task's own part of a report, from what its finished cells kept (``artifacts``):
        ``cells`` is [(estimator, seed, artifacts)], the estimators best first by final ELBO, one
        cell each (its lowest seed).  Returns None, or ``(title, introduction, blocks)``: tasks that
        give one title share one section, each under its own heading.  Blocks are plain data the
        report renders: ``("text", items)`` (items: strings, ``("code", s)``, ``("b", s)``) and
        ``("highlight", tokens, marked, caption)`` (a sentence with some tokens marked)."""
        return None

    # ---- shared -------------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        """The task's optimiser over :meth:`parameters`, the same for every estimator.

        Adam runs its fused kernel (one pass over each parameter instead of a dozen elementwise
        ops): on the SST tasks the unfused update of the embedding table is a large share of the step
        (benchmarks/adam_fused.py measures the variants side by side, and how far they drift apart),
        the same arithmetic up to rounding.  Parameters of other dtypes or devices fall back
        to the per-tensor loop."""
        params = self.parameters()
        if self.optimizer == "adam":
            fused = all(p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
                        and p.device.type in ("cpu", "cuda") for p in params)
            return torch.optim.Adam(params, lr=self.lr, fused=fused or None)
        if self.optimizer == "radam":  # RAdam (Liu et al. 2020), what the ReinMax code runs at larger sizes
            return torch.optim.RAdam(params, lr=self.lr)
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        raise ValueError(f"task {self.name!r}: unknown optimizer {self.optimizer!r}")


#: every registered task class by name; built-in modules are found by importing the package
REGISTRY = Registry("task", "tasks", Task, "estbench.tasks")


class ClosedFormToy(Task):
    """A toy whose objective E_q[f] has a closed form: reference gradients and evaluation are exact.

    Subclasses define ``init_params``, ``dist``, ``f`` and ``expected`` (the closed-form E_q[f], a
    differentiable function of the parameters); everything else follows.  There is no data: every
    batch is ``None`` and ``batch_shape`` is ``()``.
    """

    lr = 5e-2
    #: toys are what ``estbench run`` runs when no task is named
    in_default_run = True
    #: 12 f-evaluations per step: whole units for pairs (6), triples (4) and, at the toys' default
    #: sizes, the per-dimension Rao-Blackwellisers (D*K <= 12).  A measurement is cheap (exact
    #: reference), so the quick budget measures every 10 steps: curves, not two segments.
    budgets = {
        "quick": {"steps": 100, "n_samples": 12, "checkpoints": 11},
        "standard": {"steps": 2000, "n_samples": 12, "checkpoints": 11, "measure_samples": 1000},
    }

    def setup(self, device, generator):
        self.device = torch.device(device)
        self.params = {
            k: torch.nn.Parameter(v.to(self.device)) for k, v in self.init_params(generator).items()
        }

    def init_params(self, generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dist(self) -> D.Distribution:
        raise NotImplementedError

    def f(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def expected(self) -> torch.Tensor:
        raise NotImplementedError

    def parameters(self):
        return list(self.params.values())

    def estimated_parameters(self):
        return self.parameters()

    def train_batches(self, generator):
        while True:
            yield None

    def measure_batch(self):
        return None

    def problem(self, batch):
        return Problem(self.dist(), self.f)

    def reference_gradient(self, batch):
        return Reference(flat_grad(self.expected(), self.estimated_parameters()), exact=True)

    @torch.no_grad()
    def evaluate(self, final=False):
        return float(self.expected())
