"""Every metric the harness records and every per-cell figure, declared once: what it is and how it
is read.

A *metric* is a value of the records' ``metric`` column (``core.records.RECORD_COLUMNS``): recorded
along training at the measurement checkpoints, or once at the end of the cell; by the harness for
every cell (declared here), or by one task (``Task.final_metrics``, declared by the task itself in
``Task.final_figures`` with the same ``Metric`` class, so this module names no task).  A *figure*
is a per-cell column derived from metrics by its declaration (``Figure.derive``; computed by
``analysis.figures.per_cell``), which tables, rankings and comparisons read beside the per-cell
metrics themselves.

Each declaration says how the values are read -- which way is better, on which scale differences
mean something, the label and unit a table shows, the tolerance ``estbench compare`` judges a
regression by, in the quantity's own units (a task may declare its own, ``Task.tolerances``) -- and
the views below say which of them each table shows, in its order.  The summary table, the report's
per-task tables and ``estbench compare`` read those lists; so adding a metric is its computation and
its declaration here (with the views that show it), nothing else.

This module is a description, not part of the computation: no cell's records depend on it, and
``engine.cell.code_version`` leaves it out of every cell's cache key (a relabelled metric must not
recompute a sweep).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

#: when a metric is recorded
CHECKPOINT = "checkpoint"  # along training: at each measurement checkpoint (the held-out curve's
#                            metrics at its evaluation points too); a per-cell figure averages them
END = "end"                # once, at the end of the cell
#: which way is better
HIGHER, LOWER, NONE = "higher", "lower", "none"
#: the scale on which differences are read (tests, axes): log10 for figures spread over decades
LINEAR, LOG10 = "linear", "log10"
#: how ``estbench compare``'s regression tolerance is read (``Quantity.tolerance``)
DIFFERENCE = "difference"  # a difference in the quantity's own unit (nats for a model's ELBO)
FACTOR = "factor"          # a ratio >= 1 (B / A when lower is better, A / B when higher is)
#: who records a metric
HARNESS = "harness"  # the harness, for every cell
TASK = "task"        # a task's own final figures (``Task.final_metrics``)

#: a placeholder in a declared name for an integer set by the task's options (``test_iwae{K}``)
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def check_tolerance(quantity: "Quantity", tol, where: str = "") -> float:
    """``tol`` if it is a valid regression tolerance of ``quantity`` (a finite number >= 0 for a
    DIFFERENCE, >= 1 for a FACTOR), else ValueError naming the quantity (and ``where``)."""
    low = 1.0 if quantity.tolerance_kind == FACTOR else 0.0
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not low <= tol < math.inf:
        raise ValueError(f"{quantity.name}: a {quantity.tolerance_kind} tolerance must be a finite "
                         f"number >= {low:g}, got {tol!r}" + (f" {where}" if where else ""))
    return tol


@dataclass(frozen=True, kw_only=True)
class Quantity:
    """What metrics and figures share: how their values are read."""

    name: str
    direction: str           # HIGHER, LOWER or NONE (a diagnostic, a count, a time axis)
    scale: str               # LINEAR or LOG10
    label: str               # what a table header or an axis calls it
    unit: str = ""           # "" where the unit is the task's own (an ELBO's nats per data point)
    #: a measured time: it depends on the machine and its load as much as on the code, so it is
    #: compared only between cells timed alike (``compare``)
    timing: bool = False
    doc: str = ""
    #: ``estbench compare``'s regression tolerance: the least worsening (beyond the seed-to-seed
    #: noise too) that fails the gate.  With ``tolerance_kind`` DIFFERENCE it is in the quantity's
    #: own unit -- nats per data point for a model's ELBO, where the unit is the task's own -- and
    #: with FACTOR a ratio >= 1, the natural reading of a quantity spread over decades (1.25: 25%
    #: worse, 0.097 in log10).  None: not compared.
    tolerance: Optional[float] = None
    tolerance_kind: str = DIFFERENCE

    def __post_init__(self):
        for what, value, allowed in (("direction", self.direction, (HIGHER, LOWER, NONE)),
                                     ("scale", self.scale, (LINEAR, LOG10)),
                                     ("tolerance_kind", self.tolerance_kind, (DIFFERENCE, FACTOR))):
            if value not in allowed:
                raise ValueError(f"{self.name}: {what} must be one of {allowed}, got {value!r}")
        if self.tolerance is not None:
            check_tolerance(self, self.tolerance)

    @property
    def higher(self) -> Optional[bool]:
        """True when higher is better, False when lower is, None when neither."""
        return {HIGHER: True, LOWER: False, NONE: None}[self.direction]

    @property
    def title(self) -> str:
        """The label with its unit, as a table header shows it: ``step time (ms)``."""
        return f"{self.label} ({self.unit})" if self.unit else self.label



@dataclass(frozen=True, kw_only=True)
class Metric(Quantity):
    """A recorded metric."""

    recorded: str            # CHECKPOINT or END
    #: HARNESS (declared here) or TASK (a task's own final figure, declared by the task in its
    #: ``final_figures``)
    source: str = HARNESS
    #: recorded by a probe only (``estbench probe``, measuring at shared snapshots), never by a
    #: training cell
    probe_only: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.recorded not in (CHECKPOINT, END):
            raise ValueError(f"{self.name}: recorded must be {CHECKPOINT!r} or {END!r}")
        if self.source not in (HARNESS, TASK):
            raise ValueError(f"{self.name}: source must be {HARNESS!r} or {TASK!r}")

    @property
    def pattern(self) -> re.Pattern:
        """The recorded names this declaration covers: its name, a placeholder standing for an
        integer."""
        parts = _PLACEHOLDER.split(self.name)
        regex = "".join(re.escape(p) if i % 2 == 0 else rf"(?P<{p}>\d+)"
                        for i, p in enumerate(parts))
        return re.compile(regex)


#: where a figure is computed: on each cell's values (its checkpoint metrics averaged first), or at
#: each checkpoint and then averaged over the cell's checkpoints
CELL = "cell"


def log10(v):
    """log10 of non-negative values: -inf for an exact 0 (a deterministic estimator's variance),
    NaN for a negative or missing value."""
    v = np.asarray(v, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.where(v == 0, -np.inf, np.nan))


@dataclass(frozen=True, kw_only=True)
class Figure(Quantity):
    """A per-cell figure derived from metrics (a column of ``analysis.figures.per_cell``),
    computed from this declaration: ``derive`` applied to the values of the metrics ``of`` (numpy
    arrays, in that order), at ``CELL`` level or at each ``CHECKPOINT`` and then averaged over the
    cell's checkpoints.  ``derive`` None: a figure of whole curves, computed by the analysis
    layer under its name (``analysis.figures.CURVE_FIGURES``)."""

    of: tuple  # the metrics it is computed from
    derive: Optional[Callable] = None
    at: str = CELL

    def __post_init__(self):
        super().__post_init__()
        if self.at not in (CELL, CHECKPOINT):
            raise ValueError(f"{self.name}: at must be {CELL!r} or {CHECKPOINT!r}")


METRICS: tuple[Metric, ...] = (
    # ---- at the end of a cell -------------------------------------------------------------------
    Metric(name="final_elbo", recorded=END, direction=HIGHER, scale=LINEAR,
           # compare's tolerance, in the task's own unit: 1 nat per data point for a model; a task
           # whose figure lives on another scale declares its own (Task.tolerances)
           tolerance=1.0,
           label="final ELBO (test)",
           doc="the task's figure at the end of training, evaluate(final=True): the test ELBO for "
               "a model (its test split), the exact objective E_q[f] for a closed-form toy (no "
               "data, no split).  Another split than elbo's curve, so the curve's last point "
               "differs from it on the models"),
    # ---- at the checkpoints: the gradient measurement (measure.summarise) ------------------------
    Metric(name="bias", recorded=CHECKPOINT, direction=LOWER, scale=LOG10, label="bias",
           doc="||mean of M estimates - reference gradient||_2"),
    Metric(name="bias_noise", recorded=CHECKPOINT, direction=NONE, scale=LOG10,
           label="bias noise floor",
           doc="the bias Monte Carlo noise alone produces, sqrt(tr Cov / M + sum ref_se^2): a bias "
               "well above it is real"),
    Metric(name="variance", recorded=CHECKPOINT, direction=LOWER, scale=LOG10, label="variance",
           tolerance=1.25, tolerance_kind=FACTOR,
           doc="trace of the covariance of one estimate (sum of per-coordinate variances)"),
    Metric(name="grad_error", recorded=CHECKPOINT, direction=LOWER, scale=LOG10,
           label="gradient error", tolerance=1.25, tolerance_kind=FACTOR,
           doc="mean squared error of one estimate, E||g - grad||^2 = squared bias + variance, "
               "the measurement's own Monte Carlo noise subtracted"),
    Metric(name="bias_z", recorded=CHECKPOINT, direction=NONE, scale=LINEAR,
           label="bias test statistic",
           doc="the bias test's largest |t| over its directions"),
    Metric(name="bias_p", recorded=CHECKPOINT, direction=NONE, scale=LOG10, label="bias test p",
           doc="p-value of 'unbiased' at a checkpoint; per cell, Bonferroni's min(1, k min p) over "
               "its k checkpoints (analysis.figures.per_cell)"),
    Metric(name="bias_test_samples", recorded=CHECKPOINT, direction=NONE, scale=LINEAR,
           label="bias test estimates",
           doc="estimates the bias test used: M, or 16 M where its second stage re-tested a "
               "rejection of an estimator declared unbiased whose bias was within 10x its noise "
               "floor (measure.BIAS_RECHECK_FACTOR)"),
    Metric(name="cosine", recorded=CHECKPOINT, direction=HIGHER, scale=LINEAR, label="cosine",
           doc="mean cosine between one estimate and the reference gradient"),
    Metric(name="snr", recorded=CHECKPOINT, direction=HIGHER, scale=LOG10,
           label="signal-to-noise ratio", doc="||mean estimate|| / sqrt(variance)"),
    Metric(name="ref_norm", recorded=CHECKPOINT, direction=NONE, scale=LOG10,
           label="reference gradient norm", doc="||reference gradient||_2, the scale of the others"),
    Metric(name="estimate_time", recorded=CHECKPOINT, direction=LOWER, scale=LOG10, unit="s",
           label="time per estimate", timing=True, probe_only=True,
           doc="seconds per gradient estimate at a snapshot (estbench probe): the measurement's "
               "batched pass over its estimates, with its summary statistics, divided by the "
               "estimates it made"),
    Metric(name="cosine_of_mean", recorded=CHECKPOINT, direction=HIGHER, scale=LINEAR,
           label="cosine of the mean estimate", probe_only=True,
           doc="at a snapshot whose set asks for it: the cosine between the mean of many "
               "estimates and the exact gradient, w.r.t. the distribution's parameters (an "
               "encoder's logits), the estimated term only: the ReinMax reproduction's figure, "
               "the direction of the bias (estbench.engine.probe.cosine_of_mean)"),
    # ---- at the checkpoints: the held-out curve ---------------------------------------------------
    Metric(name="elbo", recorded=CHECKPOINT, direction=HIGHER, scale=LINEAR,
           label="validation ELBO (during training)",
           doc="the task's figure at the evaluation points along training, evaluate(final=False): "
               "the validation ELBO for a model (the first val_size items of its validation split), "
               "the exact objective E_q[f] for a closed-form toy.  Never the test split: "
               "final_elbo is"),
    Metric(name="wall_time", recorded=CHECKPOINT, direction=NONE, scale=LINEAR, unit="s",
           label="training time", timing=True,
           doc="training time so far: the timed steps only, not measurements nor evaluations"),
    Metric(name="train_objective", recorded=CHECKPOINT, direction=HIGHER, scale=LINEAR,
           label="training objective",
           doc="mean training objective per data point (an element of the batch) over the "
               "steps since the previous point, recorded while training: the estimator's value "
               "of E_q[f] plus the exact terms"),
    # ---- at the end of a cell (cost and status) --------------------------------------------------
    Metric(name="step_time", recorded=END, direction=LOWER, scale=LINEAR, unit="s",
           label="step time", timing=True,
           doc="seconds per training step (estimate + backward + optimiser step)"),
    Metric(name="n_evals", recorded=END, direction=LOWER, scale=LINEAR, label="f-evals",
           doc="evaluations of f per data point per step the estimator made (counted by the "
               "harness)"),
    Metric(name="train_steps", recorded=END, direction=NONE, scale=LINEAR,
           label="training steps", doc="optimiser steps taken (a time budget's count)"),
    Metric(name="diverged", recorded=END, direction=LOWER, scale=LINEAR, label="diverged",
           doc="1 for a cell that diverged, else 0 (recorded for every cell, finished or not)"),
)

FIGURES: tuple[Figure, ...] = (
    Figure(name="elbo_at_time", of=("elbo", "wall_time"), direction=HIGHER, scale=LINEAR,
           label="ELBO at equal time",
           doc="the held-out ELBO curve read at the task's common training time, the shortest of "
               "any cell there (analysis.curves): equal wall-clock instead of equal steps"),
    Figure(name="net_bias", of=("bias", "bias_noise"), direction=LOWER, scale=LOG10,
           label="bias beyond noise", tolerance=1.25, tolerance_kind=FACTOR, at=CHECKPOINT,
           derive=lambda bias, noise: np.clip(bias ** 2 - noise ** 2, 0.0, None) ** 0.5,
           doc="sqrt(max(0, bias^2 - bias_noise^2)) at each checkpoint, averaged: the measured "
               "bias less what Monte Carlo noise alone produces, 0 for an unbiased estimator up "
               "to noise"),
    Figure(name="log10_variance", of=("variance",), direction=LOWER, scale=LINEAR,
           label="log10 variance", derive=log10, doc="-inf for an exactly zero variance"),
    Figure(name="log10_grad_error", of=("grad_error",), direction=LOWER, scale=LINEAR,
           label="log10 gradient error", derive=log10, doc="-inf for an exactly zero error"),
    Figure(name="step_ms", of=("step_time",), direction=LOWER, scale=LINEAR, unit="ms",
           label="step time", timing=True, tolerance=1.25, tolerance_kind=FACTOR,
           derive=lambda seconds: seconds * 1e3, doc="milliseconds per training step"),
    # work-normalised error (Glynn & Whitt 1992): the error of one estimate times its cost, i.e.
    # the error of an average of estimates at equal compute -- for unbiased estimators exactly
    # (averaging k estimates divides the variance by k), for biased ones only its variance part
    Figure(name="log10_error_x_ms", of=("grad_error", "step_time"), direction=LOWER, scale=LINEAR,
           label="log10 gradient error x ms a step", timing=True,
           derive=lambda error, seconds: log10(error * (seconds * 1e3)),
           doc="work-normalised error (Glynn & Whitt 1992): the error at equal compute time"),
    Figure(name="log10_error_x_evals", of=("grad_error", "n_evals"), direction=LOWER,
           scale=LINEAR, label="log10 gradient error x f-evals",
           derive=lambda error, evals: log10(error * evals),
           doc="work-normalised error: the error at equal f-evaluations"),
)

# ---- the views: which metrics and figures each table shows, in its order -----------------------
#: the summary table (``table.summary``, ``estbench run``): per cell, a checkpoint metric's mean
#: over the checkpoints and an end metric's value
SUMMARY = ("final_elbo", "bias", "variance", "grad_error", "cosine", "step_time", "n_evals",
           "diverged")
#: the CLI table (``estbench run``) after its rank and final ELBO (mean ± CI) columns: per column
#: the quantity (a metric of SUMMARY or a figure; its mean over seeds), its header, width and
#: number format
CLI_TABLE = (("net_bias", "bias", 14, ".3g"), ("variance", "variance", 10, ".3g"),
             ("grad_error", "grad err", 10, ".3g"), ("cosine", "cosine", 7, ".3f"),
             ("step_ms", "step ms", 8, ".2f"), ("n_evals", "f-evals", 7, ".0f"))
#: the columns of the report's per-task tables
REPORT_TABLE = ("final_elbo", "elbo_at_time", "net_bias", "log10_grad_error", "log10_variance", "step_ms", "n_evals")
#: what ``estbench compare`` compares between two runs (a LOG10 one is tested on log10), each
#: against its declared ``tolerance``; the bias net of its Monte Carlo noise, not the raw bias
#: (the noise floor of an unbiased estimator, which grows with its variance)
COMPARED = ("final_elbo", "variance", "grad_error", "net_bias", "step_ms")


def get(name: str, extra: tuple = ()) -> Union[Metric, Figure]:
    """The declaration of a recorded metric or a per-cell figure, among these and ``extra`` (tasks'
    own, ``Task.final_figures``: ``test_iwae100`` is ``test_iwae{K}``'s); KeyError naming it if
    there is none."""
    found = lookup(name, extra)
    if found is None:
        raise KeyError(f"metric {name!r} is not declared in estbench/core/metrics.py nor by a task")
    return found


def lookup(name: str, extra: tuple = ()) -> Optional[Union[Metric, Figure]]:
    """``get``, or None for an undeclared name."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    for m in (*METRICS, *extra):
        if m.pattern.fullmatch(name):
            return m
    return None


def undeclared(recorded_names, extra: tuple = ()) -> list[str]:
    """The names among ``recorded_names`` (a records frame's ``metric`` values) that no metric
    declaration covers (here or in ``extra``), sorted."""
    return sorted({n for n in recorded_names if not isinstance(lookup(n, extra), Metric)})


def names(source: Optional[str] = None, recorded: Optional[str] = None) -> list[str]:
    """The declared metric names (placeholders as declared), in declaration order, of one
    ``source`` and/or ``recorded`` if given."""
    return [m.name for m in METRICS
            if (source is None or m.source == source) and (recorded is None or m.recorded == recorded)]


def _index() -> dict:
    by_name: dict = {}
    for q in (*METRICS, *FIGURES):
        if q.name in by_name:
            raise ValueError(f"metric {q.name!r} is declared twice")
        by_name[q.name] = q
    for f in FIGURES:
        missing = [m for m in f.of if m not in by_name or not isinstance(by_name[m], Metric)]
        if not f.of or missing:
            raise ValueError(f"figure {f.name!r} is derived from undeclared metrics {missing}")
    for view, members in (("SUMMARY", SUMMARY), ("REPORT_TABLE", REPORT_TABLE),
                          ("COMPARED", COMPARED), ("CLI_TABLE", [c[0] for c in CLI_TABLE])):
        missing = [n for n in members if n not in by_name]
        if missing:
            raise ValueError(f"{view} names undeclared metrics {missing}")
    if any(not isinstance(by_name[n], Metric) for n in SUMMARY):
        raise ValueError("SUMMARY holds recorded metrics only (the per-cell figures derive from it)")
    untolerated = [n for n in COMPARED if by_name[n].tolerance is None]
    if untolerated:
        raise ValueError(f"COMPARED names {untolerated} without a regression tolerance")
    judged = [n for n in (*REPORT_TABLE, *COMPARED) if by_name[n].higher is None]
    if judged:
        raise ValueError(f"{judged}: a table that marks the best, or a comparison that finds a "
                         "regression, needs a direction")
    return by_name


_BY_NAME = _index()
