"""Train one cell -- (task, estimator, seed, device, budget) -- and return its tidy records.

Every estimator on a task gets the same model initialisation, optimiser, learning rate, data order
and seed; only the gradient estimate differs.  At checkpoints the harness measures bias and variance
from M estimates on their own RNG stream (so the training curve is identical with measurement on or
off), and at the end the task's held-out figure.  Divergence (a non-finite surrogate or parameters)
ends the cell and is recorded, never raised.

What the harness enforces rather than trusts:

* the budget -- it counts the evaluations of f itself (``budget.EvaluationCounter``) on every
  training step and in every measurement; the counted figure is what is recorded as ``n_evals``, and
  an estimator that spends more than the budget fails the cell with both numbers in the reason
  (unless it declares ``exceeds_budget``: the exact oracle and the sparse marginalisers, whose cost
  is set by the problem);
* the time -- a cell past its limit (``Cell.timeout`` seconds) is stopped and recorded as failed
  ("timed out after N s"), the sweep goes on.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

import estimators
import tasks
from estbench.core.budget import Budget, EvaluationCounter, over_budget_message
from estbench.core.errors import BudgetError, CellTimeout, Diverged, InfeasibleError, OverBudgetError
from estbench.engine.cell import Cell, CellResult
from estbench.engine.measure import isolated_rng, measure, reference_at
from estbench.core.spec import parse
from estbench.core.records import RECORD_IDENTITY


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: training steps between two reads of the device-side divergence flag (and at every checkpoint
#: and the end): the step itself never waits for the device
DIVERGENCE_CHECK_EVERY = 50


class DivergenceWatch:
    """Notes, on the device and without a host sync, the first training step whose objective is
    not finite; :meth:`check` reads it (one sync) and also tests the parameters, and raises
    :class:`Diverged`.

    Gradients are not tested per step: a full pass over every gradient (SST's 1M-entry embedding
    table) would be a visible share of a small step, in the step time users compare
    (benchmarks/harness_step.py measures what the harness adds to a step).  A non-finite gradient
    is found at the next check all the same, because the optimiser's update makes its parameter
    non-finite (Adam's moments and SGD's step carry the inf or nan); the message then names the
    steps between which it happened.  One fused test per check: the sum of each parameter is
    finite iff every entry is (an inf or nan entry makes it inf or nan; a finite sum cannot
    overflow float32 at any realistic size)."""

    def __init__(self, device: torch.device, params):
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.params = list(params)
        self.checked = 0  # the last step the parameters were seen finite

    def note(self, step: int, objective: torch.Tensor) -> None:
        bad = ~torch.isfinite(objective.detach().reshape(()))
        self.first = torch.where(bad & (self.first < 0), torch.full_like(self.first, step), self.first)

    def check(self, step: int | None = None) -> None:
        first = int(self.first)
        if first >= 0:
            raise Diverged(f"non-finite surrogate at step {first}")
        with torch.no_grad():
            sums = [p.sum() for p in self.params]
            finite = bool(torch.isfinite(torch.stack(sums).float()).all()) if sums else True
        if not finite:
            raise Diverged(f"non-finite parameters after the update of a step from {self.checked} "
                           f"to {step if step is not None else 'the last'} (a non-finite gradient)")
        if step is not None:
            self.checked = step


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`CellTimeout` in this thread once ``seconds`` have passed (0: no limit).

    In the main thread a SIGALRM timer, which also interrupts a blocking sleep or system call; in
    any other thread (dask runs cells in worker threads) a watchdog thread raises the exception
    asynchronously, which takes effect at the next Python bytecode.  A hang inside one native call
    (a single enormous torch op) is caught only when that call returns.
    """
    if not seconds or seconds <= 0:
        yield
        return
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def on_alarm(signum, frame):
            raise CellTimeout(seconds)

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        return
    lock, state = threading.Lock(), {"done": False}
    target = threading.get_ident()

    def fire():
        with lock:
            if not state["done"]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target),
                                                           ctypes.py_object(CellTimeout))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["done"] = True
        timer.cancel()


def build(cell: Cell):
    """Instantiate the task and estimator of a cell (ValueError with a clear message if impossible)."""
    tspec, espec = parse(cell.task), parse(cell.estimator)
    task = tasks.get(tspec.name, **tspec.options)
    est = estimators.get(espec.name, **espec.options)
    if task.family not in est.families:
        raise estimators.FamilyError(
            f"estimator {espec.name!r} supports {sorted(est.families)}; task {tspec.name!r} has "
            f"{task.family!r} latents"
        )
    return task, est


def resolve_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available on this machine")
    return dev


#: intra-op threads of a CPU cell unless told otherwise: cells are parallelised across processes
#: (``-j``), the toy and quick-budget models are too small to gain from intra-op threads, and on a
#: loaded machine extra threads make small ops an order of magnitude slower.  Not part of the key.
DEFAULT_THREADS = 1


#: where a cell keeps the record-identity columns that are not its own attributes
_BUDGET_IDENTITY = ("n_samples", "steps")


def _identity(cell: Cell) -> dict:
    """The identifying columns of every record of a cell, in core.records.RECORD_IDENTITY's order."""
    return {k: getattr(cell.budget if k in _BUDGET_IDENTITY else cell, k) for k in RECORD_IDENTITY}


def _record(res: "CellResult", step: int, metric: str, value: float) -> None:
    res.records.append({**_identity(res.cell), "step": int(step), "metric": metric,
                        "value": float(value)})


def _end_step(res: "CellResult") -> int:
    """The step a cell's end-of-cell records carry: the step budget's last step, or where a time
    budget's training stopped (the last step recorded)."""
    if not res.cell.budget.timed:
        return res.cell.budget.steps
    return max((r["step"] for r in res.records), default=0)


def _check_spent(held: bool, spent: int, budget: Budget, where: str, reported) -> None:
    """The counted budget: an estimator held to it that spent more fails the cell."""
    if held and spent > budget.n_samples:
        raise OverBudgetError(over_budget_message(spent, budget.n_samples, where, reported))


def _no_report(step: int, steps: int, phase: str) -> None:
    pass


class Schedule:
    """When a cell measures, evaluates and stops: at evenly spaced steps for a step budget, at
    evenly spaced training times for a time budget (``Budget.train_seconds``; ``steps`` then caps the
    steps, 0: no cap).  A point is due at the first step at or past it (a slow step may pass
    several time points at once: they are one measurement), and the last point is taken when the
    cell stops, wherever that is."""

    def __init__(self, budget: Budget):
        self.budget = budget
        if budget.timed:
            self._measure, self._eval = budget.checkpoint_times(), budget.eval_times()
        else:
            self._measure, self._eval = budget.checkpoint_steps(), budget.eval_steps()
        self.measured = self._evaluated = 0  # points taken so far

    def done(self, step: int, train_time: float) -> bool:
        b = self.budget
        if b.timed:
            return train_time >= b.train_seconds or (b.steps > 0 and step >= b.steps)
        return step >= b.steps

    def _due(self, points: list, taken: int, position: float, done: bool) -> int:
        """How many of ``points`` are taken once this position is (``taken`` if none is due)."""
        if taken >= len(points) or not (done or position >= points[taken]):
            return taken
        if done:
            return len(points)
        while taken < len(points) and position >= points[taken]:
            taken += 1
        return taken

    def measure_due(self, step: int, train_time: float, done: bool) -> bool:
        pos = train_time if self.budget.timed else step
        before, self.measured = self.measured, self._due(self._measure, self.measured, pos, done)
        return self.measured > before

    def eval_due(self, step: int, train_time: float, done: bool) -> bool:
        pos = train_time if self.budget.timed else step
        before, self._evaluated = self._evaluated, self._due(self._eval, self._evaluated, pos, done)
        return self._evaluated > before

    def phase(self, train_time: float) -> str:
        if self.budget.timed:
            return f"training ({train_time:.0f} of {self.budget.train_seconds:g} s)"
        return "training"


def run_cell(cell: Cell, report=None, threads: int = DEFAULT_THREADS) -> CellResult:
    """Run one cell; never raises for estimator/task failures (they become a 'failed' status),
    nor for a cell past its time limit.  ``report(step, steps, phase)``, if given, is told where
    the cell is (each training step, each measurement, the final evaluation); it must be cheap
    (store.Heartbeat throttles itself) and is called outside the timed step.  ``threads``: torch's
    intra-op threads while the cell runs (restored afterwards)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    t_start = time.perf_counter()
    try:
        with time_limit(cell.timeout):
            return _run_cell(cell, t_start, report or _no_report)
    except CellTimeout:
        res = CellResult(cell, "failed", error=f"timed out after {cell.timeout:g} s (--cell-timeout)")
        _record(res, _end_step(res), "diverged", 0.0)
        res.seconds = time.perf_counter() - t_start
        return res
    finally:
        torch.set_num_threads(previous_threads)


def _run_cell(cell: Cell, t_start: float, report) -> CellResult:
    res = CellResult(cell, "ok")

    def rec(step: int, metric: str, value: float) -> None:
        _record(res, step, metric, value)

    state: dict = {}
    try:
        try:
            _train(cell, rec, res.artifacts, state, report)
        except Exception:
            # an error some steps after the parameters went non-finite (the flag is read every few
            # steps) is that divergence, not a failure of its own
            if "watch" in state:
                state["watch"].check()
            raise
    except Diverged as d:
        res.status = "diverged"
        res.error = str(d)
    except InfeasibleError as exc:  # budget units or problem size do not fit
        res.status = "infeasible"
        res.error = str(exc)
    except OverBudgetError as exc:
        res.status = "failed"
        res.error = str(exc)
    except Exception as exc:  # recorded, not raised: one bad cell never stops a sweep
        res.status = "failed"
        res.error = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
    rec(_end_step(res), "diverged", 1.0 if res.status == "diverged" else 0.0)
    res.seconds = time.perf_counter() - t_start
    return res


@dataclass
class _Training:
    """One cell's training in progress: what the set-up, the measurements, the evaluations, the
    steps and the end of the loop share.  The order of the random draws is the loop's, unchanged:
    model init, data order and sampling each on their own stream seeded from the cell."""

    cell: Cell
    device: torch.device
    task: object
    est: object
    optimizer: object
    params: list
    batches: Iterator
    rec: Callable
    report: Callable
    #: the harness's own count of f-evaluations, never the plug-in's
    counter: EvaluationCounter = field(default_factory=EvaluationCounter)
    #: whether the budget of f-evaluations binds (not for oracles and marginalisers)
    held: bool = True
    step: int = 0
    train_time: float = 0.0
    n_evals: int = 0
    #: training steps and summed objective since the last evaluation (read at evaluations)
    since_eval_steps: int = 0
    since_eval_obj: Optional[torch.Tensor] = None
    #: what identifies the model before its first step (:func:`_shared_at_start`), once computed
    start_key: Optional[tuple] = None


def _set_up(cell: Cell, rec, report) -> _Training:
    """Build the task and the estimator, initialise the model and the data order."""
    device = resolve_device(cell.device)
    with torch.random.fork_rng(devices=[], device_type="cpu"):
        # plug-ins that initialise parameters in __init__ (RELAX's network) draw from the cell's
        # seed, not from whatever state earlier cells in this process left behind
        torch.manual_seed(cell.seed + 2_000_029)
        task, est = build(cell)
    # three independent, explicitly seeded streams: model init, data order, and sampling
    init_gen = torch.Generator().manual_seed(cell.seed)
    data_gen = torch.Generator().manual_seed(cell.seed + 1_000_003)
    task.evaluation = cell.budget.evaluation
    task.setup(device, init_gen)
    est.to(device)
    optimizer = task.make_optimizer()
    params = task.parameters()
    batches = task.train_batches(data_gen)
    return _Training(cell, device, task, est, optimizer, params, batches, rec, report,
                     held=not est.exceeds_budget)


def _check_feasible(run: _Training) -> None:
    """The estimator's feasibility rule (``skip``), before the step-0 measurement, whose reference
    gradient is the costliest part of a measurement (a text_vae cell would otherwise spend it only
    to find the estimator cannot run); on the measurement batch, on its own RNG stream."""
    with isolated_rng(run.cell.seed, run.device):
        reason = run.est.skip(run.task.problem(run.task.measure_batch()).dist, run.cell.budget.n_samples)
    if reason:
        raise BudgetError(reason)


#: how many (task, seed) starts a worker process keeps (:func:`_shared_at_start`): the seeds of a
#: sweep's task, whose cells run one estimator after another
SHARED_STARTS = 8
_shared_starts: "OrderedDict[tuple, object]" = OrderedDict()


def _parameters_digest(task) -> str:
    """A digest of the values of the task's parameters (bytes, whatever the dtype or device)."""
    h = hashlib.blake2b(digest_size=16)
    for p in task.parameters():
        h.update(p.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _shared_at_start(run: _Training, what: str, compute: Callable):
    """``compute()`` at step 0 once per worker process for all the cells of a (task, seed): before
    the first step every estimator's model is the same, and so are the step-0 measurement's
    reference gradient and the step-0 held-out figure (deterministic functions of the parameters,
    the task and the seed; the reference on its own stream, ``measure.reference_at``, so that
    skipping it moves no other draw).  Keyed by the task's spec, the seed, the device, the
    evaluation and a digest of the parameters' values, so a hit is the same computation on the same
    values; the records are those of a cell run alone (tests/test_shared_start.py).  Later steps
    compute as usual."""
    if run.step != 0:
        return compute()
    if run.start_key is None:
        c = run.cell
        run.start_key = (c.task, c.seed, str(run.device), c.budget.evaluation,
                         _parameters_digest(run.task))
    key = (*run.start_key, what)
    if key in _shared_starts:
        _shared_starts.move_to_end(key)
        return _shared_starts[key]
    value = _shared_starts[key] = compute()
    while len(_shared_starts) > 2 * SHARED_STARTS:  # two entries per start
        _shared_starts.popitem(last=False)
    return value


def _measure_at(run: _Training, checkpoint: int) -> None:
    """Bias, variance and the rest at a checkpoint (``measure``, on its own RNG stream), the
    evaluations of f counted and held to the budget."""
    budget, step = run.cell.budget, run.step
    run.report(step, budget.steps, f"measuring (checkpoint {checkpoint} of {budget.checkpoints})")
    seed = run.cell.seed * 7919 + step
    batch = run.task.measure_batch()
    reference = _shared_at_start(run, "reference", lambda: reference_at(run.task, batch, seed))
    m = measure(run.task, run.est, budget.n_samples, budget.measure_samples, seed=seed,
                batch=batch, reference=reference, counter=run.counter)
    spent, reported = int(m.pop("n_evals")), m.pop("n_evals_reported")
    _check_spent(run.held, spent, budget, f"in the measurement at step {step}", reported)
    for k, v in m.items():
        run.rec(step, k, v)


def _evaluate_at(run: _Training) -> None:
    """The held-out figure along training, the training time so far, and the mean training
    objective since the last evaluation."""
    run.rec(run.step, "elbo", _shared_at_start(run, "elbo", lambda: run.task.evaluate(final=False)))
    run.rec(run.step, "wall_time", run.train_time)
    if run.since_eval_steps:
        run.rec(run.step, "train_objective", float(run.since_eval_obj) / run.since_eval_steps)
    run.since_eval_steps = 0
    run.since_eval_obj = torch.zeros_like(run.since_eval_obj)


def _train_step(run: _Training, watch: DivergenceWatch) -> None:
    """One optimiser step on the estimator's gradient: the only timed part of a cell."""
    budget = run.cell.budget
    batch = next(run.batches)
    _sync(run.device)
    t0 = time.perf_counter()
    prob = run.task.problem(batch)
    run.counter.reset()
    e = run.est.estimate(prob.dist, run.counter.wrap(prob.f, prob.dist), budget.n_samples,
                         prob.context)
    objective = e.surrogate
    if prob.analytic is not None:
        objective = objective + prob.analytic
    run.optimizer.zero_grad(set_to_none=True)
    (-objective).backward()
    watch.note(run.step, objective)  # no host sync: read every few steps
    run.optimizer.step()
    run.est.update()
    _sync(run.device)
    dt = time.perf_counter() - t0
    spent = run.counter.count
    _check_spent(run.held, spent, budget, f"at training step {run.step}", e.n_evals)
    run.n_evals = max(run.n_evals, spent)
    run.train_time += dt
    run.step += 1
    run.since_eval_steps += 1
    # per data point (an element of the batch), so that it reads like the held-out figure
    value = e.value.sum() + (prob.analytic.detach() if prob.analytic is not None else 0.0)
    run.since_eval_obj = run.since_eval_obj + value.double() / max(e.value.numel(), 1)


def _finish(run: _Training, artifacts: dict) -> None:
    """The task's final (test) figures and artifacts, and the cell's counts and step time."""
    step = run.step
    run.report(step, run.cell.budget.steps, "final evaluation")
    final = run.task.evaluate(final=True)
    if not math.isfinite(final):
        raise Diverged("non-finite final evaluation")
    run.rec(step, "final_elbo", final)
    for k, v in run.task.final_metrics().items():
        run.rec(step, k, v)
    artifacts.update(run.task.artifacts())
    run.rec(step, "n_evals", run.n_evals if step else float("nan"))
    run.rec(step, "step_time", run.train_time / max(step, 1))
    run.rec(step, "train_steps", step)


def _train(cell: Cell, rec, artifacts: dict, state: dict, report) -> None:
    """Train and measure one cell, recording through ``rec`` and telling ``report`` where it is;
    ``state`` exposes the divergence watch to the caller."""
    budget = cell.budget
    run = _set_up(cell, rec, report)
    schedule = Schedule(budget)
    report(0, budget.steps, "setting up")
    if budget.checkpoints:
        _check_feasible(run)
    device = run.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                               device_type="cuda" if device.type == "cuda" else "cpu"):
        torch.manual_seed(cell.seed)
        run.since_eval_obj = torch.zeros((), dtype=torch.float64, device=device)
        watch = state["watch"] = DivergenceWatch(device, run.params)
        while True:
            done = schedule.done(run.step, run.train_time)
            measuring = schedule.measure_due(run.step, run.train_time, done)
            evaluating = schedule.eval_due(run.step, run.train_time, done) or measuring
            if evaluating or done or run.step % DIVERGENCE_CHECK_EVERY == 0:
                watch.check(run.step)
            if measuring:
                _measure_at(run, schedule.measured)
            if evaluating:
                _evaluate_at(run)
            if done:
                break
            _train_step(run, watch)
            report(run.step, budget.steps, schedule.phase(run.train_time))
        _finish(run, artifacts)
