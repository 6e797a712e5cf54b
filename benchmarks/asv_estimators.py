"""asv benchmarks: speed and statistical quality of each (task, estimator) pair on small budgets.

    asv run --quick -E existing:same --set-commit-hash $(git rev-parse HEAD)
    asv compare --factor 1.25 BASE HEAD          # then: python benchmarks/ci_compare.py BASE HEAD

asv treats larger as worse, so every quantity tracked here is one where lower is better: the
training step's time and peak memory, the gradient variance and bias at the end of training, and
the negative final ELBO.  Seeds are fixed, so the track_* values are deterministic on CPU (a change
means the code changed the estimator's statistics, not noise).  Pairs whose latent family the
estimator does not support, budgets it cannot spend, and CUDA on a machine without it are skipped
(``setup`` raises NotImplementedError, which asv records as "n/a").

The grid is small on purpose, so that a quick run stays short.  Widen it with
environment variables: ESTBENCH_ASV_TASKS=toy_binary,binary_vae, ESTBENCH_ASV_ESTIMATORS=all,
ESTBENCH_ASV_DEVICES=cpu,cuda.
"""
from __future__ import annotations

import os

import torch

import estimators
import tasks
from estbench.core.budget import Budget
from estbench.core.spec import parse
from estbench.engine.train import Cell, run_cell

SEED = 0


def _env_list(name: str, default: list[str], every) -> list[str]:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    return list(every()) if text == "all" else [s.strip() for s in text.split(",") if s.strip()]


TASKS = _env_list("ESTBENCH_ASV_TASKS", ["toy_binary", "toy_categorical", "toy_gaussian"],
                  tasks.available)
ESTIMATORS = _env_list("ESTBENCH_ASV_ESTIMATORS",
                       ["reinforce", "rloo", "disarm", "gumbel_softmax", "reparam"],
                       estimators.available)
DEVICES = _env_list("ESTBENCH_ASV_DEVICES", ["cpu"], lambda: ["cpu", "cuda"])
PARAMS = [TASKS, ESTIMATORS, DEVICES]
PARAM_NAMES = ["task", "estimator", "device"]
#: the quality cells: short training, enough measurement samples for stable bias/variance figures
QUALITY_BUDGET = dict(steps=40, checkpoints=2, measure_samples=128)


def _check_pair(task_name: str, est_name: str, device: str):
    """(task, estimator) instances, or NotImplementedError for pairs that do not apply here."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NotImplementedError("CUDA not available")
    ts, es = parse(task_name), parse(est_name)
    if ts.name not in tasks.available() or es.name not in estimators.available():
        raise NotImplementedError(f"{task_name} or {est_name} is not registered here")
    task = tasks.get(ts.name, **ts.options)
    est = estimators.get(es.name, **es.options)
    if task.family not in est.families:
        raise NotImplementedError(f"{est_name} does not support {task.family} latents")
    n = task.budgets["quick"].get("n_samples", Budget().n_samples)
    return task, est, n


class EstimatorStep:
    """One training step (problem, estimate, backward, optimiser step, estimator update) on the
    task's quick-budget sample count, after a warm-up step."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 60

    def setup(self, task_name, est_name, device):
        self.task, self.est, self.n = _check_pair(task_name, est_name, device)
        self.device = torch.device(device)
        torch.manual_seed(SEED)
        self.task.setup(self.device, torch.Generator().manual_seed(SEED))
        self.est.to(self.device)
        self.opt = self.task.make_optimizer()
        self.batches = self.task.train_batches(torch.Generator().manual_seed(SEED + 1))
        reason = self.est.skip(self.task.problem(next(self.batches)).dist, self.n)
        if reason:  # the estimator's feasibility rule: this budget does not fit it
            raise NotImplementedError(reason)
        self.step()  # warm-up: lazy initialisation, first-call allocations

    def step(self):
        prob = self.task.problem(next(self.batches))
        e = self.est.estimate(prob.dist, prob.f, self.n, prob.context)
        obj = e.surrogate if prob.analytic is None else e.surrogate + prob.analytic
        self.opt.zero_grad(set_to_none=True)
        (-obj).backward()
        self.opt.step()
        self.est.update()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_step(self, *params):
        self.step()

    def peakmem_step(self, *params):
        for _ in range(5):
            self.step()


class EstimatorQuality:
    """Gradient variance and bias at the end of a short, seeded training run, and -final ELBO.

    One cell per pair is trained once (``setup_cache``) with the harness of ``estbench run``; the
    track_* methods read its records.
    """

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300

    def setup_cache(self):
        out = {}
        for t in TASKS:
            for e in ESTIMATORS:
                for d in DEVICES:
                    try:
                        task, _, n = _check_pair(t, e, d)
                    except NotImplementedError:
                        continue
                    budget = Budget(**{**task.budgets["quick"], **QUALITY_BUDGET, "n_samples": n})
                    res = run_cell(Cell(t, e, SEED, d, budget))
                    if res.status != "ok":
                        out[(t, e, d)] = res.status
                        continue
                    last = {r["metric"]: r["value"] for r in res.records if r["step"] == budget.steps}
                    out[(t, e, d)] = {"variance": last["variance"], "bias": last["bias"],
                                      "neg_final_elbo": -last["final_elbo"]}
        return out

    setup_cache.timeout = 600

    def setup(self, cache, task_name, est_name, device):
        _check_pair(task_name, est_name, device)
        got = cache.get((task_name, est_name, device))
        if not isinstance(got, dict):
            raise NotImplementedError(f"cell status {got!r}")
        self.values = got

    def track_variance(self, cache, *params):
        return self.values["variance"]

    track_variance.unit = "gradient variance (trace of covariance)"

    def track_bias(self, cache, *params):
        return self.values["bias"]

    track_bias.unit = "gradient bias (L2 norm)"

    def track_neg_final_elbo(self, cache, *params):
        return self.values["neg_final_elbo"]

    track_neg_final_elbo.unit = "nats (-ELBO per data point)"
