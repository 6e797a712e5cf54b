"""Stacked seeds: k seeds of one model trained in one process, stacked on a leading axis with
``torch.func``, against the same k seeds' steps one after the other.

    python benchmarks/stacked_seeds.py [--device cpu] [--tasks binary_vae,categorical_vae] \
        [--estimators binary_vae=rloo,categorical_vae=gumbel_softmax] [--seeds 1,2,4,8] \
        [--steps 10] [--rounds 3]

Per task (its quick model and batch, the quick budget's f-evaluations): k freshly set-up models
(seeds 0..k-1, as :func:`harness_step.set_up` seeds a cell).  *Separate*: each model's bare
estimator step (:func:`harness_step.bare_step`: problem, estimate, backward, Adam), k of them one
after the other.  *Stacked*: the k models' parameters stacked (``torch.func.stack_module_state``),
one ``vmap(grad(...), randomness="different")`` of the same step's objective over the k models and
their k batches, and one fused Adam step on the stacked parameters (elementwise, so it is k Adams).
The table gives ms per seed-step for both and their ratio (> 1: stacking is faster), medians over
``--rounds`` blocks of ``--steps`` steps, alternated in one process so machine load hits both.

Why stacking is measured here and not built into the harness: a cell's records are a function of
its own random stream -- torch.distributions draws every sample from the global generator in the
order of that cell's calls -- and vmap's ``randomness="different"`` draws the k seeds' samples as
one batch from one stream, so a stacked seed's records could not equal those of its separate
cell.  Equal records would need every estimator to draw from an explicit per-seed generator, a
change of the plug-in contract.  Only what the issue measured (1.27x at 8 seeds on one CPU core)
is in question: run this on a GPU (``benchmarks/gpu_check.sh``), where these models are
launch-bound and stacking fills the device.  Run it alone: the figures are timings.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from estbench.core.spec import parse  # noqa: E402
from estbench.engine.sweep import task_budget  # noqa: E402
from harness_step import _sync, add_timing_args, bare_step, set_up, timing_set_up  # noqa: E402


class _Objective(nn.Module):
    """A task's networks as one module whose forward is the negated training objective of one
    estimator step on a batch: what ``functional_call`` swaps stacked parameters into (the task's
    own methods then run on them, since they use these very modules)."""

    def __init__(self, task, est, n: int):
        super().__init__()
        self.parts = nn.ModuleDict({k: v for k, v in vars(task).items() if isinstance(v, nn.Module)})
        self.task, self.est, self.n = task, est, n

    def forward(self, batch):
        prob = self.task.problem(batch)
        e = self.est.estimate(prob.dist, prob.f, self.n, prob.context)
        obj = e.surrogate if prob.analytic is None else e.surrogate + prob.analytic
        return -obj


def _models(task: str, est: str, k: int, device: torch.device):
    """k set-up (task, estimator, optimiser, batches), seeds 0..k-1 (names with options)."""
    ts, es = parse(task), parse(est)
    return [set_up(ts.name, ts.options, es.name, es.options, device, seed) for seed in range(k)]


def separate_ms(models, n: int, steps: int, device) -> float:
    """ms per seed-step of the k models' bare steps one after the other."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        for task, est, opt, batches in models:
            bare_step(task, est, opt, next(batches), n)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / (steps * len(models))


class Stacked:
    """The k models' parameters stacked, one vmapped gradient and one Adam step per step."""

    def __init__(self, models, n: int):
        objectives = [_Objective(task, est, n) for task, est, _, _ in models]
        self.base = objectives[0]
        params, _ = stack_module_state(objectives)
        self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
        self.batches = [b for _, _, _, b in models]
        lr = models[0][0].lr
        fused = next(iter(self.params.values())).device.type in ("cpu", "cuda")
        self.opt = torch.optim.Adam(self.params.values(), lr=lr, fused=fused)

        def loss(p, x):
            return functional_call(self.base, p, (x,))

        self.grads = vmap(grad(loss), in_dims=(0, 0), randomness="different")

    def step(self) -> None:
        x = torch.stack([next(b) for b in self.batches])
        g = self.grads({k: v.detach() for k, v in self.params.items()}, x)
        for k, v in self.params.items():
            v.grad = g[k]
        self.opt.step()


def stacked_ms(stacked: Stacked, steps: int, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        stacked.step()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / (steps * len(stacked.batches))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_args(ap, steps=10, rounds=3)
    ap.add_argument("--tasks", default="binary_vae,categorical_vae")
    ap.add_argument("--estimators", default="binary_vae=rloo,categorical_vae=gumbel_softmax",
                    help="task=estimator per task (an estimator whose sampling vmap cannot batch "
                         "is reported as such: torch's OneHotCategorical.sample is one)")
    ap.add_argument("--seeds", default="1,2,4,8", help="numbers of seeds k to stack")
    args = ap.parse_args(argv)
    device, header = timing_set_up(args)
    import tasks

    chosen = dict(pair.split("=") for pair in args.estimators.split(","))
    print(header + ", medians")
    print(f"{'task':16s} {'estimator':16s} {'seeds':>5s} {'separate ms/seed-step':>22s} "
          f"{'stacked ms/seed-step':>21s} {'speed-up':>8s}")
    for task in args.tasks.split(","):
        spec = parse(task)
        n = task_budget(tasks.get(spec.name, **spec.options), "quick").n_samples
        est = chosen.get(task, "rloo")
        for k in (int(s) for s in args.seeds.split(",")):
            models = _models(task, est, k, device)
            stacked = Stacked(_models(task, est, k, device), n)
            separate_ms(models, n, 2, device)  # warm-up: allocator, first-call costs
            try:
                stacked_ms(stacked, 2, device)
            except RuntimeError as exc:
                print(f"{task:16s} {est:16s} {k:5d}  not stacked: {str(exc).splitlines()[0][:80]}")
                break
            sep, stk = [], []
            for _ in range(args.rounds):
                sep.append(separate_ms(models, n, args.steps, device))
                stk.append(stacked_ms(stacked, args.steps, device))
            s, t = statistics.median(sep), statistics.median(stk)
            print(f"{task:16s} {est:16s} {k:5d} {s:22.2f} {t:21.2f} {s / t:7.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
