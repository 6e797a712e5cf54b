"""Probing: every estimator measured at the same parameters -- the snapshots of a trained model
(:mod:`estbench.engine.snapshots`) -- with no training.

A *probe cell* is a :class:`~estbench.engine.cell.Cell` whose ``snapshots`` names a snapshot set:
(task, estimator, seed, device, budget) as for training, where the seed is the set's (the driver's)
and the budget holds the set's probe budget (f-evaluations per estimate ``n_samples``, estimates
per measurement ``measure_samples``) and the driver's steps.  It runs through the same executors,
store and time and memory limits as a training cell, and its records have the same schema: at each
snapshot, under the snapshot's training step, the measurement's figures (:func:`measure.measure`:
bias, noise floor, variance, gradient error, the bias test, cosine, SNR, reference norm) and the
time per estimate; at the end, the f-evaluations of one estimate as the harness counted them.

Every estimator of a set sees the same parameters, the same measurement batch and the same
reference gradient; the cell keeps their digests per snapshot (``artifacts["snapshots"]``), which a
test compares across the estimators of a probe.  The measurement's random stream is the one the
driver's own training cell uses at that step (``seed * 7919 + step``), so on a task whose reference
is exact (it draws nothing) the driver's probe repeats its in-training measurement figure for
figure; where the reference is a Monte Carlo estimate (computed once per snapshot and device and
kept in ``OUT/references/``), the estimates draw from the stream's start instead of after the
reference: the same distribution, other draws.

Estimators with a state of their own (a moving-average baseline, RELAX's network: parameters or
buffers) would otherwise be measured in their initial state, which training never leaves them in:
they are first warmed up at the snapshot -- ``WARMUP_STEPS`` estimates on training batches, each
updating the estimator's own state and nothing of the model -- under the same counted budget.
"""
from __future__ import annotations

import copy
import dataclasses
import fcntl
import math
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

import estimators
from estbench.core.budget import Budget, EvaluationCounter
from estbench.core.errors import BudgetError, CellTimeout, InfeasibleError, OverBudgetError
from estbench.core.spec import Spec, parse
from estbench.engine import protocols, snapshots
from estbench.engine.cell import Cell, CellResult, Plan, code_version, usable_devices
from estbench.engine.measure import (REFERENCE_STREAM, isolated_rng, measure, reference_at,
                                      replicate)
from estbench.engine.train import _check_spent, _record, resolve_device, time_limit

#: the module a probe cell runs: its code (and what it imports) is in every probe cell's key
ENTRY = "estbench.engine.probe"
#: training batches a stateful estimator is warmed up on at each snapshot before it is measured:
#: the moving averages of REINFORCE's and NVIL's baselines (decays 0.9 and 0.8) forget their start
#: within it (0.9^50 < 0.01); a learned baseline network (NVIL's, RELAX's) is only partly trained in
#: any short warm-up, as it is early in training
WARMUP_STEPS = 50
#: what a probe folder's meta.json says of how it was made
MODE = ("probe: every estimator measured at the same parameters, the snapshots of one trained "
        "model (no training)")
#: where a probe folder keeps the reference gradients it computed (one per set, snapshot, device)
REFERENCES = "references"


def _at_detached_parameters(task, batch):
    """``(problem, leaves, dist)``: the task's problem on ``batch`` with its distribution rebuilt
    on detached leaf copies of its parameters, so gradients stop at the logits (the figures of
    :func:`exact_logits_gradient` and :func:`cosine_of_mean` are w.r.t. them)."""
    from estimators import families as fam

    prob = task.problem(batch)
    leaves = {k: v.detach().requires_grad_() for k, v in fam.params(prob.dist).items()}
    return prob, leaves, fam.rebuild(prob.dist, leaves)


def exact_logits_gradient(task, batch) -> torch.Tensor:
    """The exact gradient of the estimated part of the objective (sum_b E_q[f]; an analytic KL is
    left out) with respect to the distribution's parameters (an encoder's output logits),
    flattened: the reference of :func:`cosine_of_mean`, one per snapshot (a probe keeps it beside
    the measurement's reference).  It enumerates the support (the ``exact`` estimator's rule, up to
    ``EXACT_FIGURE_CONFIGS`` configurations per event); empty where that is not possible."""
    from estimators import families as fam

    prob, leaves, dist = _at_detached_parameters(task, batch)
    if fam.family_of(dist) not in estimators.get_class("exact").families \
            or fam.support_size(dist) > EXACT_FIGURE_CONFIGS:
        return torch.empty(0, dtype=torch.float64, device=task.device)
    exact = estimators.get("exact", max_configs=EXACT_FIGURE_CONFIGS)
    e = exact.estimate(dist, prob.f, exact.budget_unit(dist), prob.context)
    grads = torch.autograd.grad(e.surrogate, [leaves[k] for k in leaves])
    return torch.cat([g.reshape(-1) for g in grads]).double()


def cosine_of_mean(task, est, batch, n_samples: int, M: int, counter: EvaluationCounter,
                   held: bool, budget: Budget, exact: torch.Tensor) -> float:
    """The cosine between the mean of ``M`` estimates and the exact gradient ``exact``
    (:func:`exact_logits_gradient`), both with respect to the distribution's parameters (an
    encoder's output logits), of the estimated part of the objective only: the gradient-quality
    figure of the ReinMax reproduction (``VAE.analyze_gradient``: the mean of 512 estimates against
    the exact gradient on 100 images; tasks/data/SOURCES.md).  It reads the direction of an
    estimator's bias, not the quality of one estimate (the ``cosine`` metric).  NaN where the exact
    gradient could not be enumerated.  The M estimates are one batched pass (replicas on a leading
    batch axis, as in the measurement) and are held to the budget."""
    if exact.numel() == 0:
        return math.nan
    prob, leaves, dist = _at_detached_parameters(task, batch)
    keys = list(leaves)
    # the measurement's own replication, of the distribution at the detached logits
    _, stacked, rep, ctx = replicate(dataclasses.replace(prob, dist=dist), M)
    counter.reset()
    measured = copy.deepcopy(est).eval()  # as the measurement: the probed state is left as it is
    e = measured.estimate(rep, counter.wrap(prob.f, rep), n_samples, ctx)
    _check_spent(held, counter.count, budget, "in the cosine of the mean estimate", e.n_evals)
    grads = torch.autograd.grad(e.surrogate, [stacked[k] for k in keys], allow_unused=True)
    mean = torch.cat([(g if g is not None else torch.zeros_like(stacked[k])).mean(0).reshape(-1)
                      for g, k in zip(grads, keys)]).double()
    ref = exact.to(mean.device).double()
    denom = float(torch.linalg.vector_norm(mean) * torch.linalg.vector_norm(ref))
    return float(mean @ ref) / denom if denom > 0 else math.nan


@dataclasses.dataclass(frozen=True)
class Figure:
    """A gradient-quality figure as a paper defines it: ``reference(task, batch)`` is computed once
    per snapshot (and kept beside the measurement's reference), ``value(task, est, batch,
    n_samples, estimates, counter, held, budget, reference)`` once per estimator."""
    reference: object
    value: object


#: the most configurations per event the exact gradient of :func:`cosine_of_mean` enumerates (the
#: ReinMax code's bound is 16,384; 8x4 has 4,096)
EXACT_FIGURE_CONFIGS = 2**14

#: the figures a snapshot set may ask a probe for beside the measurement (its manifest's
#: ``figures``: name -> estimates), each as its source defines it
FIGURES = {"cosine_of_mean": Figure(exact_logits_gradient, cosine_of_mean)}


def stateful(est) -> bool:
    """Whether an estimator carries a state of its own that training adapts (parameters or buffers:
    a learned or moving-average baseline, a learned control variate)."""
    return any(True for _ in est.state_dict())


def options_from(task: str, estimator: Spec) -> tuple[dict, str]:
    """An estimator's options in a probe and where they come from: ``given`` (named with options),
    ``protocol`` (those the task's published protocol tunes, as ``--budget paper`` applies them),
    or ``default``."""
    if estimator.options:
        return dict(estimator.options), "given"
    if task in protocols.available():
        tuned = protocols.estimator_options(task, estimator.name, {})
        if tuned:
            return tuned, "protocol"
    return {}, "default"


def plan(sets: Iterable[snapshots.SnapshotSet], est_specs: Iterable[Spec], devices: Iterable[str],
         timeout: float = 0.0):
    """The probe cells of every compatible (set, estimator, device); a sweep ``Plan`` whose
    ``skipped`` says why a pair will not run."""
    import tasks

    p = Plan([])
    usable = usable_devices(devices, p)
    est_specs = list(est_specs)
    for s in sets:
        tspec = parse(s.task)
        task = tasks.get(tspec.name, **tspec.options)
        budget = Budget(steps=s.steps[-1], n_samples=s.n_samples, checkpoints=len(s.steps),
                        measure_samples=s.measure_samples, evaluation=s.budget.evaluation,
                        eval_points=0)
        seen = set()
        for es in est_specs:
            opts, _ = options_from(tspec.name, es)
            est = estimators.get(es.name, **opts)
            name = est.display_name
            if name in seen:
                continue
            seen.add(name)
            if task.family not in est.families:
                p.skipped.append((s.task, name, f"supports {sorted(est.families)}, task is "
                                                f"{task.family}"))
                continue
            code = f"{code_version(s.task, name, ENTRY)}+snapshots:{s.hash}"
            for dev in usable:
                p.cells.append(Cell(s.task, name, s.seed, dev, budget, code=code,
                                    timeout=float(timeout), snapshots=str(s.path.resolve())))
    return p


def _cached(cache: Optional[Path], name: str, device: torch.device, compute, pack, unpack):
    """``compute()`` once per ``name`` (a set's hash, a snapshot's step, what is computed) and
    device, kept in the folder ``cache`` (None: not kept); a file lock lets one worker compute it
    while the others wait for it."""
    if cache is None:
        return compute()
    path = cache / f"{name}-{device.type}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return unpack(torch.load(path, map_location=device, weights_only=True))
        value = compute()
        from estbench.engine import store

        store.atomic_write(path, lambda tmp: torch.save(pack(value), tmp))
        return value


def _reference(s: snapshots.SnapshotSet, task, batch, step: int, seed: int, device: torch.device,
               cache: Optional[Path]):
    """The reference gradient at a snapshot (``measure.reference_at``, the driver's own at that
    measurement), computed once per (set, step, device)."""
    from tasks import Reference

    def compute() -> Reference:
        return reference_at(task, batch, seed)

    # the stream's offset in the name: a reference drawn on another stream is not this one
    return _cached(cache, f"{s.hash}-{step}-stream{REFERENCE_STREAM}", device, compute,
                   lambda r: {"grad": r.grad.detach(), "exact": r.exact, "stderr": r.stderr,
                              "n_samples": r.n_samples},
                   lambda d: Reference(d["grad"], bool(d["exact"]), d["stderr"], d["n_samples"]))


def _figure_reference(s: snapshots.SnapshotSet, name: str, task, batch, step: int,
                      device: torch.device, cache: Optional[Path]) -> torch.Tensor:
    """A figure's reference at a snapshot (:class:`Figure`), computed once per (set, step, device)."""
    return _cached(cache, f"{s.hash}-{step}-{name}", device,
                   lambda: FIGURES[name].reference(task, batch).detach(),
                   lambda t: {"reference": t}, lambda d: d["reference"])


def _warm_up(task, est, s: snapshots.SnapshotSet, counter: EvaluationCounter, held: bool,
             budget: Budget, step: int) -> None:
    """``WARMUP_STEPS`` training-mode estimates at the snapshot's parameters, each followed by the
    estimator's own update; the model's parameters are left as they are (the gradient goes to
    the estimator's parameters only)."""
    batches = task.train_batches(torch.Generator().manual_seed(s.seed + 1_000_003))
    est.train()
    with isolated_rng(s.seed * 7919 + step + 3_000_017, task.device):
        for _ in range(WARMUP_STEPS):
            prob = task.problem(next(batches))
            counter.reset()
            e = est.estimate(prob.dist, counter.wrap(prob.f, prob.dist), budget.n_samples,
                             prob.context)
            _check_spent(held, counter.count, budget, "warming up at a snapshot", e.n_evals)
            # after the estimate: a part built on first use (NVIL's baseline) exists only now
            own = [p for p in est.parameters() if p.requires_grad
                   and not isinstance(p, torch.nn.parameter.UninitializedParameter)]
            if own and e.surrogate.requires_grad:
                grads = torch.autograd.grad(-e.surrogate, own, allow_unused=True)
                for p, g in zip(own, grads):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
            est.update()


def run_probe(cell: Cell, report=None, threads: int = 1, references: Optional[Path] = None
              ) -> CellResult:
    """Measure the cell's estimator at every snapshot of its set; never raises for an estimator's
    or a task's failure (a 'failed' / 'infeasible' status with its reason), nor for a cell past
    its time limit."""
    report = report or (lambda *a: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    t_start = time.perf_counter()
    res = CellResult(cell, "ok")
    try:
        with time_limit(cell.timeout):
            _probe(cell, res, report, references)
    except CellTimeout:
        res.status, res.error = "failed", f"timed out after {cell.timeout:g} s (--cell-timeout)"
    except (InfeasibleError, estimators.FamilyError) as exc:  # the budget or the family does not fit
        res.status, res.error = "infeasible", str(exc)
    except (snapshots.SnapshotError, OverBudgetError) as exc:
        res.status, res.error = "failed", str(exc)
    except Exception as exc:  # recorded, not raised: one bad cell never stops a probe
        res.status, res.error = "failed", " ".join(f"{type(exc).__name__}: {exc}".split())
    finally:
        torch.set_num_threads(previous)
    _record(res, cell.budget.steps, "diverged", 0.0)
    res.seconds = time.perf_counter() - t_start
    return res


def _probe(cell: Cell, res: CellResult, report, references: Optional[Path]) -> None:
    s = snapshots.load(cell.snapshots)
    device = resolve_device(cell.device)
    budget = cell.budget
    espec = parse(cell.estimator)
    with torch.random.fork_rng(devices=[], device_type="cpu"):
        torch.manual_seed(cell.seed + 2_000_029)  # as a training cell builds its estimator
        est = estimators.get(espec.name, **espec.options)
    task = s.make_task(device)
    est.to(device)
    batch = task.measure_batch()
    batch_digest = snapshots.digest(batch)
    if batch_digest != s.manifest["measure_batch"]:
        raise snapshots.SnapshotError(
            f"snapshot set {s.path}: the task's measurement batch is not the one the set was made "
            "with (the data or the task changed); rebuild the set")
    unknown = sorted(set(s.figures) - set(FIGURES))
    if unknown:
        raise snapshots.SnapshotError(f"snapshot set {s.path}: unknown figures {unknown} (known: "
                                      f"{sorted(FIGURES)})")
    counter, held = EvaluationCounter(), not est.exceeds_budget
    with isolated_rng(cell.seed, device):
        reason = est.skip(task.problem(batch).dist, budget.n_samples)
    if reason:
        raise BudgetError(reason)
    warm = stateful(est)
    seen: dict = {}
    n_evals = 0
    # the estimator as built, before any warm-up: a deep copy, since a lazily built part (NVIL's
    # baseline network) has no values to clone until its first estimate
    pristine = copy.deepcopy(est) if warm else None
    for i, step in enumerate(s.steps):
        report(i, len(s.steps), f"snapshot {i + 1} of {len(s.steps)} (step {step})")
        params_digest = s.apply(task, step)
        seed = cell.seed * 7919 + step  # the driver's measurement stream at this step
        ref = _reference(s, task, batch, step, seed, device, references)
        if warm:
            est = copy.deepcopy(pristine)
            _warm_up(task, est, s, counter, held, budget, step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        m = measure(task, est, budget.n_samples, budget.measure_samples, seed=seed, batch=batch,
                    reference=ref, counter=counter)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        spent, reported = int(m.pop("n_evals")), m.pop("n_evals_reported")
        _check_spent(held, spent, budget, f"in the measurement at the snapshot of step {step}",
                     reported)
        n_evals = max(n_evals, spent)
        for k, v in m.items():
            _record(res, step, k, v)
        _record(res, step, "estimate_time", seconds / max(m["bias_test_samples"], 1.0))
        for name, estimates in s.figures.items():
            exact = _figure_reference(s, name, task, batch, step, device, references)
            with isolated_rng(seed + 5_000_011, device):
                value = FIGURES[name].value(task, est, batch, budget.n_samples, int(estimates),
                                            counter, held, budget, exact)
            _record(res, step, name, value)
        seen[str(step)] = {"parameters": params_digest, "measure_batch": batch_digest,
                           "reference": snapshots.digest([ref.grad, ref.stderr])}
    _record(res, budget.steps, "n_evals", float(n_evals))
    res.artifacts.update({"snapshots": seen, "snapshot_set": s.hash, "warmed_up": warm,
                          "warmup_steps": WARMUP_STEPS if warm else 0,
                          "options": options_source(parse(s.task).name, espec.name, cell.estimator)})


def options_source(task: str, estimator: str, display: str) -> str:
    """Where the options of a probed estimator (its display name ``display``) came from:
    ``default``, ``protocol`` (the task's protocol tunes exactly these) or ``given``."""
    if "[" not in display:
        return "default"
    tuned, source = options_from(task, Spec(estimator, {}, estimator))
    if source == "protocol" and estimators.get(estimator, **tuned).display_name == display:
        return "protocol"
    return "given"
