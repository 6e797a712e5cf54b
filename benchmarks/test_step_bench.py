"""pytest-benchmark micro-benchmarks: one training step of every registered estimator on the toys.

    python -m pytest benchmarks/test_step_bench.py --benchmark-only --benchmark-autosave
        # stores a baseline under .benchmarks/
    python -m pytest benchmarks/test_step_bench.py --benchmark-only \
        --benchmark-compare --benchmark-compare-fail=min:25%   # fail if any min got 25% slower

(``--benchmark-only`` overrides the project's default ``--benchmark-skip``.)  The gate compares the
*minimum* step time: on shared CI runners the mean is dominated by noise from other jobs, the
minimum is what the code costs.  Incompatible (task, estimator) pairs and budgets an estimator
cannot spend are skipped.
"""
from __future__ import annotations

import pytest
import torch

import estimators
import tasks
from benchmarks.harness_step import bare_step
from estbench.core.budget import Budget

TOYS = ["toy_binary", "toy_categorical", "toy_gaussian"]


def _step_fn(task_name: str, est_name: str):
    task = tasks.get(task_name)
    est = estimators.get(est_name)
    if task.family not in est.families:
        pytest.skip(f"{est_name} does not support {task.family} latents")
    n = task.budgets["quick"].get("n_samples", Budget().n_samples)
    torch.manual_seed(0)
    task.setup(torch.device("cpu"), torch.Generator().manual_seed(0))
    opt = task.make_optimizer()
    batches = task.train_batches(torch.Generator().manual_seed(1))
    reason = est.skip(task.problem(next(batches)).dist, n)
    if reason:  # the estimator's feasibility rule: this budget does not fit it
        pytest.skip(reason)

    def step():
        bare_step(task, est, opt, next(batches), n)

    step()  # warm-up
    return step


@pytest.mark.parametrize("task_name", TOYS)
@pytest.mark.parametrize("est_name", estimators.available())
def test_step(benchmark, task_name, est_name):
    step = _step_fn(task_name, est_name)
    benchmark.group = task_name
    benchmark.pedantic(step, rounds=30, iterations=5, warmup_rounds=2)
