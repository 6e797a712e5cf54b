"""The budget every estimator gets on a task: identical for all of them, so comparisons are fair."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


EVALUATIONS = ("full", "subset")


@dataclass(frozen=True)
class Budget:
    """steps: optimiser steps; n_samples: f-evaluations per data point per step (the estimator
    spends them as it likes, in whole units); checkpoints: how many evenly spaced measurement points
    (including step 0 and the last step); measure_samples: independent gradient estimates M per
    measurement (bias and variance come from these); evaluation: how much held-out data the final
    figures use -- "full" (all of it) or "subset" (the task's fixed subset, the same for every
    estimator, e.g. binary_vae's IWAE bound on the first 1000 test images: quick budgets)."""

    steps: int = 100
    n_samples: int = 4
    checkpoints: int = 3
    measure_samples: int = 256
    evaluation: str = "full"

    def __post_init__(self):
        for k in ("steps", "n_samples", "checkpoints", "measure_samples"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"budget {k} must be an integer, got {v!r}")
        if self.steps < 0:
            raise ValueError(f"budget steps must be >= 0, got {self.steps}")
        if self.n_samples < 1:
            raise ValueError(f"budget n_samples must be >= 1, got {self.n_samples}")
        if self.checkpoints < 0:
            raise ValueError(f"budget checkpoints must be >= 0, got {self.checkpoints}")
        if self.checkpoints and self.measure_samples < 2:
            raise ValueError(f"budget measure_samples must be >= 2 to estimate a variance, got {self.measure_samples}")
        if self.evaluation not in EVALUATIONS:
            raise ValueError(f"budget evaluation must be one of {EVALUATIONS}, got {self.evaluation!r}")

    def checkpoint_steps(self) -> list[int]:
        """Steps (before the update of that step) at which to measure; includes 0 and ``steps``."""
        if self.checkpoints == 0:
            return []
        if self.checkpoints == 1 or self.steps == 0:
            return [self.steps]
        k = self.checkpoints
        return sorted({round(i * self.steps / (k - 1)) for i in range(k)})

    def as_dict(self) -> dict:
        return asdict(self)


class EvaluationCounter:
    """Counts evaluations of f per batch element: the harness's own tally of what an estimator
    spends, never the estimator's word for it.

    The harness owns ``f`` (the task made it): :meth:`wrap` hands the estimator a version of f that
    adds, on every call, the number of rows it returned per batch element -- an output of shape
    ``(*lead, *batch_shape)`` counts ``prod(lead)`` evaluations.  One counter serves a whole cell
    and every f it wrapped, so an f kept from an earlier call still counts; :meth:`reset` starts a
    new window (a training step, a measurement).  Reading the count costs no device sync (shapes
    only).
    """

    def __init__(self):
        self.count = 0

    def reset(self) -> None:
        self.count = 0

    def wrap(self, f, dist):
        per_element = max(1, math.prod(dist.batch_shape))

        def counted(z):
            out = f(z)
            numel = getattr(out, "numel", None)
            self.count += -(-numel() // per_element) if numel is not None else 1
            return out

        return counted


def over_budget_message(spent: int, budget: int, where: str, reported) -> str:
    return (f"over budget: spent {spent} f-evaluations per data point {where}, budget {budget} "
            f"(it reported {reported}); counted by the harness")
