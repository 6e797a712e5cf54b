"""What the harness adds to a training step: a cell's recorded ``step_time`` against the bare step.

    python benchmarks/harness_step.py [--device cpu] [--tasks binary_vae,text_vae] \
        [--estimators rloo,disarm,reparam] [--steps 40] [--rounds 5]

The *bare* step is the estimator step written against the task and estimator APIs and nothing else
(problem, estimate, backward, optimiser step, estimator update), timed per step with the same
``perf_counter`` and ``torch.cuda.synchronize`` brackets as the harness.  The *harness* step is what
``estbench run`` records as ``step_time`` for a cell of the same task, estimator, seed and budget:
the same work plus the harness's own (the f-evaluation counter, the on-device divergence flag and
the training-objective accumulator).  The two are run in alternating blocks of ``--steps`` steps,
``--rounds`` times, in one process, so that a change of machine load hits both; the table gives the
median per-step time of each and ratio = harness / bare (goal: <= 1.05).  On CUDA the harness step
has no host sync of its own (the flag is read every ``DIVERGENCE_CHECK_EVERY`` steps).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import estimators  # noqa: E402
import tasks  # noqa: E402
from estbench.core.budget import Budget  # noqa: E402
from estbench.core.errors import InfeasibleError  # noqa: E402
from estbench.core.spec import parse  # noqa: E402
from estbench.engine.train import Cell, run_cell  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_timing_args(ap: argparse.ArgumentParser, steps: int, rounds: int = 5,
                    steps_help: str = "steps per timed block") -> None:
    """The options every timing script here shares: device, block length, rounds, threads."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--rounds", type=int, default=rounds, help="alternating blocks of each")
    ap.add_argument("--threads", type=int, default=1)


def timing_set_up(args) -> tuple[torch.device, str]:
    """The device of :func:`add_timing_args`' options, with the intra-op threads set, and the
    first line of the script's output: device (the GPU's name on CUDA), torch, threads, blocks."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    return device, (f"device {device}"
                    + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
                    + f", torch {torch.__version__}, {args.threads} thread(s), {args.steps} steps x "
                    f"{args.rounds} rounds")


def bare_step(task, est, opt, batch, n: int) -> None:
    """One estimator step against the task and estimator APIs and nothing else: problem,
    estimate, backward of minus (surrogate + analytic), optimiser step, estimator update.  The
    baseline of this benchmark and of benchmarks/test_step_bench.py."""
    prob = task.problem(batch)
    e = est.estimate(prob.dist, prob.f, n, prob.context)
    obj = e.surrogate if prob.analytic is None else e.surrogate + prob.analytic
    opt.zero_grad(set_to_none=True)
    (-obj).backward()
    opt.step()
    est.update()


def set_up(task_name: str, task_options: dict, est_name: str, est_options: dict,
           device: torch.device, seed: int):
    """(task, estimator, optimiser, training batches) of a freshly set-up model, seeded as a cell
    seeds them: the bare step's set-up here and in benchmarks/step_flops.py."""
    torch.manual_seed(seed + 2_000_029)
    task, est = tasks.get(task_name, **task_options), estimators.get(est_name, **est_options)
    task.setup(device, torch.Generator().manual_seed(seed))
    est.to(device)
    return (task, est, task.make_optimizer(),
            task.train_batches(torch.Generator().manual_seed(seed + 1_000_003)))


def bare_steps(task_name: str, est_name: str, device: torch.device, n: int, steps: int, seed: int):
    """Per-step seconds of the bare estimator step on a freshly set-up model."""
    ts, es = parse(task_name), parse(est_name)
    task, est, opt, batches = set_up(ts.name, ts.options, es.name, es.options, device, seed)
    torch.manual_seed(seed)
    times = []
    for _ in range(steps):
        batch = next(batches)
        _sync(device)
        t0 = time.perf_counter()
        bare_step(task, est, opt, batch, n)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def harness_step(task_name: str, est_name: str, device: str, n: int, steps: int, seed: int) -> float:
    res = run_cell(Cell(task_name, est_name, seed, device, Budget(steps=steps, n_samples=n,
                                                                  checkpoints=0)))
    if res.status != "ok":
        raise RuntimeError(f"{task_name} x {est_name}: {res.status}: {res.error}")
    return next(r["value"] for r in res.records if r["metric"] == "step_time")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_args(ap, steps=40)
    ap.add_argument("--tasks", default="binary_vae,text_vae")
    ap.add_argument("--estimators", default="rloo,disarm,gumbel_softmax,reparam")
    args = ap.parse_args(argv)
    device, header = timing_set_up(args)
    print(header)
    print(f"{'task':<14} {'estimator':<16} {'bare ms':>9} {'harness ms':>11} {'ratio':>7}")
    for task_name in args.tasks.split(","):
        family = tasks.get_class(parse(task_name).name).family
        n = tasks.get(parse(task_name).name).budgets["quick"]["n_samples"]
        for est_name in args.estimators.split(","):
            if family not in estimators.get_class(parse(est_name).name).families:
                continue
            bare, harness = [], []
            try:
                for r in range(args.rounds):
                    order = [0, 1] if r % 2 == 0 else [1, 0]
                    for which in order:
                        if which == 0:
                            t = bare_steps(task_name, est_name, device, n, args.steps, seed=r)
                            bare.append(statistics.fmean(t))  # the statistic the harness records
                        else:
                            harness.append(harness_step(task_name, est_name, args.device, n,
                                                        args.steps, r))
            except (InfeasibleError, RuntimeError) as exc:  # cannot spend the budget, or failed
                print(f"{task_name:<14} {est_name:<16} not run: {' '.join(str(exc).split())[:90]}",
                      flush=True)
                continue
            b, h = statistics.median(bare), statistics.median(harness)
            print(f"{task_name:<14} {est_name:<16} {b * 1e3:>9.2f} {h * 1e3:>11.2f} {h / b:>7.3f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
