"""pytest-benchmark versions of benchmarks/overhead.py: estbench's training step vs a handwritten one.

    # like-with-like checks only (fast; benchmarks are skipped by the project's default addopts)
    python -m pytest benchmarks/test_overhead.py -p no:cacheprovider
    # the timings (one benchmark group per problem-estimator, handwritten next to estbench)
    python -m pytest benchmarks/test_overhead.py --benchmark-only -p no:cacheprovider --benchmark-autosave
    # gate against a saved run
    python -m pytest benchmarks/test_overhead.py --benchmark-only -p no:cacheprovider \
        --benchmark-compare --benchmark-compare-fail=median:15%
    # gate the estbench/handwritten ratio itself (interleaved timing, skipped unless set)
    ESTBENCH_OVERHEAD_MAX=1.15 python -m pytest benchmarks/test_overhead.py -k ratio -p no:cacheprovider

Environment: ESTBENCH_OVERHEAD_ROUNDS scales the number of timed rounds (default 1.0);
ESTBENCH_OVERHEAD_DEVICE picks the device (default cpu).
"""
from __future__ import annotations

import os
import statistics
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead as oh  # noqa: E402
import estimators  # noqa: E402

torch.set_num_threads(1)  # tiny problems: a second intra-op thread only adds noise on a shared runner

DEVICE = os.environ.get("ESTBENCH_OVERHEAD_DEVICE", "cpu")
SCALE = float(os.environ.get("ESTBENCH_OVERHEAD_ROUNDS", "1.0"))
ROUNDS = {"toy": 150, "tiny": 150, "vae": 12}
WARMUP = {"toy": 20, "tiny": 20, "vae": 3}
CASES = [(kind, name) for name in oh.ESTIMATORS for kind in oh.problems_for(name)]
IDS = [f"{kind}-{name}" for kind, name in CASES]


def _needs(name):
    if name not in estimators.available("bernoulli"):
        pytest.skip(f"estimator {name!r} is not registered here (skipped modules: {estimators.skipped()})")
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("ESTBENCH_OVERHEAD_DEVICE asks for CUDA, which is not available")


@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_same_gradient(kind, name):
    """The two steps compute the same gradient (same draws via torch.manual_seed before each step),
    over two consecutive optimiser steps, so their timings compare like with like."""
    _needs(name)
    diff = oh.gradient_check(kind, name, DEVICE, steps=2)
    assert diff < 1e-4, f"{kind}/{name}: handwritten and estbench gradients differ (max rel diff {diff:.2e})"


@pytest.mark.parametrize("impl", ["handwritten", "estbench"])
@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_step(benchmark, kind, name, impl):
    """One training step (sample, f, surrogate, backward, optimiser step) of each implementation."""
    _needs(name)
    hw, eb = oh.make_pair(kind, name, DEVICE)
    step = hw if impl == "handwritten" else eb
    device = torch.device(DEVICE)

    def timed_step():
        step()
        oh._sync(device)

    benchmark.group = f"{kind}-{name}"
    benchmark.extra_info.update(problem=kind, estimator=name, impl=impl, n_samples=step.n)
    torch.manual_seed(0)
    benchmark.pedantic(timed_step, rounds=max(3, int(ROUNDS[kind] * SCALE)), iterations=1,
                       warmup_rounds=WARMUP[kind])


MAX_RATIO = os.environ.get("ESTBENCH_OVERHEAD_MAX")


@pytest.mark.skipif(MAX_RATIO is None, reason="set ESTBENCH_OVERHEAD_MAX (e.g. 1.15) to gate the ratio")
@pytest.mark.parametrize("kind,name", CASES, ids=IDS)
def test_ratio(kind, name):
    """median(estbench step) / median(handwritten step) <= ESTBENCH_OVERHEAD_MAX, timed alternately."""
    _needs(name)
    hw, eb = oh.make_pair(kind, name, DEVICE)
    rounds = max(3, int(ROUNDS[kind] * SCALE))
    ta, tb = oh.timed_pair(hw, eb, reps=rounds, warmup=WARMUP[kind], device=DEVICE)
    ratio = statistics.median(tb) / statistics.median(ta)
    assert ratio <= float(MAX_RATIO), (
        f"{kind}/{name}: estbench step {1e3 * statistics.median(tb):.3f} ms is {ratio:.2f}x the handwritten "
        f"{1e3 * statistics.median(ta):.3f} ms (limit {MAX_RATIO})")
