"""The budget every estimator gets on a task: identical for all of them, so comparisons are fair."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


EVALUATIONS = ("full", "subset")


@dataclass(frozen=True)
class Budget:
    """steps: optimiser steps; n_samples: f-evaluations per data point per step (the estimator
    spends them as it likes, in whole units); checkpoints: how many evenly spaced gradient
    measurements (bias, variance, error; including the start and the end); measure_samples:
    independent gradient estimates M per measurement (bias and variance come from these);
    evaluation: how much held-out data the final figures use -- "full" (all of it) or "subset" (the
    task's fixed subset, the same for every estimator, e.g. binary_vae's IWAE bound on the first
    1000 test images: quick budgets); eval_points: how many evenly spaced points of the held-out
    ELBO curve (including the start and the end; every checkpoint is one too) -- cheap beside a
    gradient measurement, so the curves are curves even where measurements are few.

    train_seconds: a training-time budget instead of a step budget (``estbench run --seconds``).
    With ``train_seconds > 0`` a cell trains until its training time (the timed steps only: not
    measurements nor evaluations) reaches ``train_seconds``, ``steps`` becomes a cap on the steps
    (0: none), and the checkpoints and evaluation points are evenly spaced in training time.  Every
    estimator then gets the same time rather than the same steps; the figures depend on the
    machine's speed, which each cell's record of its environment names."""

    steps: int = 100
    n_samples: int = 4
    checkpoints: int = 3
    measure_samples: int = 256
    evaluation: str = "full"
    eval_points: int = 11
    train_seconds: float = 0.0

    def __post_init__(self):
        for k in ("steps", "n_samples", "checkpoints", "measure_samples", "eval_points"):
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
        if self.eval_points < 0:
            raise ValueError(f"budget eval_points must be >= 0, got {self.eval_points}")
        if isinstance(self.train_seconds, bool) or not isinstance(self.train_seconds, (int, float)) \
                or not (0 <= self.train_seconds < math.inf):
            raise ValueError(f"budget train_seconds must be a finite number >= 0 (0: a step budget), "
                             f"got {self.train_seconds!r}")
        if self.evaluation not in EVALUATIONS:
            raise ValueError(f"budget evaluation must be one of {EVALUATIONS}, got {self.evaluation!r}")

    @property
    def timed(self) -> bool:
        """A training-time budget (``train_seconds``) rather than a step budget."""
        return self.train_seconds > 0

    def checkpoint_steps(self) -> list[int]:
        """Steps (before the update of that step) at which to measure; includes 0 and ``steps``
        (a step budget; a time budget's checkpoints are :meth:`checkpoint_times`)."""
        return _evenly(self.steps, self.checkpoints)

    def eval_steps(self) -> list[int]:
        """Steps at which the held-out ELBO is evaluated: the evaluation points and the checkpoints."""
        return sorted(set(_evenly(self.steps, self.eval_points)) | set(self.checkpoint_steps()))

    def checkpoint_times(self) -> list[float]:
        """Training times (seconds) at which a time budget measures; includes 0 and ``train_seconds``."""
        return _evenly(self.train_seconds, self.checkpoints)

    def eval_times(self) -> list[float]:
        return sorted(set(_evenly(self.train_seconds, self.eval_points)) | set(self.checkpoint_times()))

    def as_dict(self) -> dict:
        return asdict(self)


def _evenly(end, k: int) -> list:
    """``k`` evenly spaced points from 0 to ``end`` inclusive (integers for an integer ``end``);
    one point is the end itself."""
    if k == 0:
        return []
    if k == 1 or end == 0:
        return [end]
    points = (i * end / (k - 1) for i in range(k))
    return sorted({round(p) for p in points} if isinstance(end, int) else set(points))


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
