"""Published protocols: how the paper a task follows ran it, declared as data beside the task.

A real task names the experiment it reproduces in ``tasks/protocols/<task>.yml``: the source (paper,
and the file of its released code that sets each value), the settings as that source states them
(data, architecture, optimiser per parameter group, batch, length, evaluation), the task options
and budget that put those settings into this suite, the estimator options the source tunes, and --
as important -- where the suite departs from the source and why.  ``estbench list`` prints every
protocol, every report prints those of its tasks, and ``estbench run --budget paper`` runs one.

Why data and not code: a protocol is a statement about someone else's experiment, to be read,
checked against their code and corrected without touching the code that computes a cell (a
cell's cache key hashes that code; the protocol reaches a cell only through the task options and
the budget it sets, both of which are part of the cell's identity).

Schema (every key is checked on load against the task's declared options, the Budget's fields and
the registered estimators' options, so a typo is one clear line, never a silent default):

    task:      the registered task name (the file's stem)
    name:      a short name of the experiment ("DisARM, binary VAE on MNIST")
    source:    {paper: citation, code: "owner/repo: path", also: [other files], notes: ...}
    settings:  {data, architecture, optimiser, batch, length, evaluation, ...}: the source's words
    task_options: {option: value}           what ``--budget paper`` sets on the task
    budget:    {Budget field: value}        the paper budget
    estimator_options: {estimator: {option: value}}   the source's tuned settings, applied to an
               estimator named without options; with ``per_method`` the rest of the source's table
    differences: [lines]                    where the suite departs from the source, and why
    cost:      one line: what a paper-budget cell costs and on which machine that was measured
    as_published: (optional) the source's experiment as it ran it, ``--budget published``:
        what:         one line
        task_options: {option: value}       on top of the task's (the source's data and length)
        budget:       {Budget field: value}
        per_method:   {estimator: {source_name: the source's name of the method,
                                   task: {option: value}, estimator: {option: value}}}
                      each method's own settings (learning rate, optimiser, temperature): the
                      estimators the source ran, and only those, run in this mode
        differences:  [lines]               where even this mode departs from the source
        published:    (optional) the source's figures, as data:
            source:   {repository, commit, files, computed}: where they are and how they were read
            figures:  {figure: {label, metric, sign, at, steps}}: what each is, and the metric of
                      ours it is held against (``sign`` -1: the source reports its negative;
                      ``at``: end, the metric's last record; ``steps``: read from cells of that
                      many steps, for a figure the source reports part-way)
            values:   {estimator: {figure: [mean, standard error, seeds]}} (one run of the
                      source: [value, 0, 1])

The two modes answer different questions.  ``paper`` is the suite's fair comparison: the
published length and data, one setting (learning rate, optimiser) for every estimator.
``published`` answers "does the suite reproduce the paper?": every method at the settings its
source tuned for it, which breaks the equal-settings rule on purpose, so its cells are never
ranked against each other as a fair comparison (their task options differ, so they are not even
one task), and every folder and report names the mode (:data:`MODES`).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from estbench.core.budget import Budget
from estbench.core.errors import SpecError


def protocol_dir() -> Path:
    """Where the protocol files live: beside the tasks they describe (``tasks/protocols``)."""
    import tasks

    return Path(tasks.__file__).resolve().parent / "protocols"

#: the named budget that runs a task's protocol (``estbench run --budget paper``)
PAPER = "paper"
#: the named budget that runs a protocol as its source ran it (``estbench run --budget published``)
PUBLISHED = "published"
#: what each named budget's cells are, in words (meta.json's ``mode``, every report)
MODES = {
    "quick": "equal settings, the task's quick budget",
    "standard": "equal settings, the task's standard budget",
    PAPER: "equal settings at the published length: every estimator with the same model, "
           "optimiser, learning rate and data (the fair comparison)",
    PUBLISHED: "as published: each method at its source's own settings (learning rate, optimiser, "
               "temperature), to reproduce the source's figures; not a fair comparison",
}
_KEYS = {"task", "name", "source", "settings", "task_options", "budget", "estimator_options",
         "differences", "cost", "as_published"}
_REQUIRED = ("task", "name", "source", "settings", "budget")
_AS_PUBLISHED_KEYS = {"what", "task_options", "budget", "per_method", "differences", "published"}
_METHOD_KEYS = {"source_name", "task", "estimator"}
_PUBLISHED_KEYS = {"source", "figures", "values"}
_FIGURE_KEYS = {"label", "metric", "sign", "at", "steps"}


def figure_format(like: float) -> str:
    """How a published figure and those beside it are printed: nats to the hundredth, fractions
    (accuracies, selection rates) to four places; ``like`` is the figure whose precision its error,
    our mean and the difference take."""
    return ".2f" if abs(like) >= 10 else ".4f"


def _num(x: float, like: Optional[float] = None) -> str:
    return format(x, figure_format(x if like is None else like))


def mode(budget) -> str:
    """The mode of a named budget in words ('custom budget' for anything else)."""
    return MODES.get(budget, "custom budget") if isinstance(budget, str) else "custom budget"


@dataclass(frozen=True)
class PublishedFigure:
    """One figure a source reports, and the metric of ours it is held against."""

    name: str
    label: str
    metric: str
    #: +1: the source reports our metric; -1: its negative (a loss where we record an ELBO)
    sign: int = 1
    #: where in a cell our metric is read: ``end`` (its last record)
    at: str = "end"
    #: the training steps of the cells it is read from (None: the mode's budget's); a figure the
    #: source reports part-way (epoch 9 of 20) is read at the end of a run of that many steps,
    #: whose training is the full run's up to there
    steps: Optional[int] = None


@dataclass(frozen=True)
class Published:
    """A source's figures as data: per estimator and figure, (mean, standard error, seeds)."""

    source: dict
    figures: dict  # name -> PublishedFigure
    values: dict  # estimator -> {figure: (mean, se, n)}

    def citation(self) -> str:
        s = self.source
        return (f"{s.get('repository', '')} at {s.get('commit', '')}: {s.get('files', '')}; "
                f"{s.get('computed', '')}").strip("; ")


@dataclass(frozen=True)
class MethodSettings:
    """One method as its source ran it: its name there, its task options (learning rate,
    optimiser) and its estimator options (temperature, draws)."""

    source_name: str
    task_options: dict
    estimator_options: dict


@dataclass(frozen=True)
class AsPublished:
    """A protocol's ``as_published`` mode: the source's experiment with its per-method settings."""

    what: str
    task_options: dict
    budget: dict
    per_method: dict  # estimator name -> MethodSettings
    differences: tuple = ()
    published: Optional[Published] = None

    def make_budget(self, overrides: Optional[dict] = None) -> Budget:
        return Budget(**{**self.budget, **(overrides or {})})


class ProtocolError(SpecError):
    """A protocol file that does not describe a runnable protocol (one line, with the file)."""


@dataclass(frozen=True)
class Protocol:
    task: str
    name: str
    source: dict
    settings: dict
    budget: dict
    task_options: dict = field(default_factory=dict)
    estimator_options: dict = field(default_factory=dict)
    differences: tuple = ()
    cost: str = ""
    as_published: Optional[AsPublished] = None
    path: str = ""

    def make_budget(self, overrides: Optional[dict] = None) -> Budget:
        return Budget(**{**self.budget, **(overrides or {})})

    def citation(self) -> str:
        code = self.source.get("code", "")
        return self.source.get("paper", "") + (f"; code: {code}" if code else "")

    def lines(self, indent: str = "  ") -> list[str]:
        """The protocol in words (``estbench list``, the report)."""
        out = [f"{indent}{self.task}: {self.name}", f"{indent}  source: {self.citation()}"]
        for k, v in self.settings.items():
            out.append(f"{indent}  {k}: {v}")
        if self.task_options:
            out.append(f"{indent}  --budget paper sets: "
                       + ", ".join(f"{k}={v}" for k, v in self.task_options.items())
                       + "; " + ", ".join(f"{k}={v}" for k, v in self.budget.items()))
        for est, opts in self.estimator_options.items():
            out.append(f"{indent}  {est}: " + ", ".join(f"{k}={v}" for k, v in opts.items()))
        for d in self.differences:
            out.append(f"{indent}  differs: {d}")
        if self.cost:
            out.append(f"{indent}  cost: {self.cost}")
        ap = self.as_published
        if ap is not None:
            out.append(f"{indent}  --budget published ({ap.what}) sets: "
                       + ", ".join(f"{k}={v}" for k, v in ap.task_options.items()) + "; "
                       + ", ".join(f"{k}={v}" for k, v in ap.budget.items()))
            for est, m in ap.per_method.items():
                opts = [f"{k}={v}" for k, v in {**m.task_options, **m.estimator_options}.items()]
                out.append(f"{indent}    {est} (the source's {m.source_name}): " + ", ".join(opts))
            for d in ap.differences:
                out.append(f"{indent}    differs: {d}")
            pub = ap.published
            if pub is not None:
                out.append(f"{indent}  published figures ({pub.citation()}):")
                for est, figs in pub.values.items():
                    out.append(f"{indent}    {est}: " + "; ".join(
                    f"{pub.figures[f].label} {_num(m)} +- {_num(se, m)} ({n} seeds)" if n > 1 else
                    f"{pub.figures[f].label} {_num(m)} (one run)"
                    for f, (m, se, n) in figs.items()))
        return out

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["differences"] = list(self.differences)
        if d["as_published"] is not None:
            d["as_published"]["differences"] = list(self.as_published.differences)
        d.pop("path")
        return d


def _load_yaml(path: Path):
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is a core dependency
        raise ProtocolError("reading protocols needs PyYAML: pip install PyYAML") from None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProtocolError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def _check(raw, path: Path) -> Protocol:
    import estimators
    import tasks

    where = path.name
    if not isinstance(raw, dict):
        raise ProtocolError(f"protocol {where}: expected a mapping of {sorted(_KEYS)}")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ProtocolError(f"protocol {where}: unknown keys {sorted(unknown)}; "
                            f"a protocol has {sorted(_KEYS)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ProtocolError(f"protocol {where}: missing {missing}")
    if raw["task"] != path.stem:
        raise ProtocolError(f"protocol {where}: declares task {raw['task']!r}; the file of a task's "
                            f"protocol is named after the task")
    try:
        task_cls = tasks.get_class(raw["task"])
    except Exception as exc:
        raise ProtocolError(f"protocol {where}: {exc}") from None
    for key in ("source", "settings", "budget", "task_options", "estimator_options"):
        if not isinstance(raw.get(key, {}), dict):
            raise ProtocolError(f"protocol {where}: {key} must be a mapping")
    if "paper" not in raw["source"]:
        raise ProtocolError(f"protocol {where}: source needs the paper it follows")
    task_options = raw.get("task_options") or {}
    try:  # the options exist and take these values (the task's own checks, in one place)
        tasks.get(raw["task"], **task_options)
    except Exception as exc:
        raise ProtocolError(f"protocol {where}: task_options: {exc}") from None
    fields = {f.name for f in dataclasses.fields(Budget)}
    bad = set(raw["budget"]) - fields
    if bad:
        raise ProtocolError(f"protocol {where}: budget has no fields {sorted(bad)}; "
                            f"a budget has {sorted(fields)}")
    try:
        Budget(**raw["budget"])
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"protocol {where}: budget: {exc}") from None
    est_options = raw.get("estimator_options") or {}
    for name, opts in est_options.items():
        try:
            cls = estimators.get_class(name)
            estimators.get(name, **(opts or {}))
        except Exception as exc:
            raise ProtocolError(f"protocol {where}: estimator_options: {exc}") from None
        if task_cls.family not in cls.families:
            raise ProtocolError(f"protocol {where}: estimator {name!r} does not run on "
                                f"{task_cls.family} latents")
    differences = _lines(raw.get("differences"), f"protocol {where}: differences")
    as_published = None
    if raw.get("as_published") is not None:
        as_published = _check_as_published(raw["as_published"], task_cls, task_options, where)
    return Protocol(task=raw["task"], name=str(raw["name"]), source=dict(raw["source"]),
                    settings=dict(raw["settings"]), budget=dict(raw["budget"]),
                    task_options=dict(task_options),
                    estimator_options={k: dict(v or {}) for k, v in est_options.items()},
                    differences=differences, cost=str(raw.get("cost", "")),
                    as_published=as_published, path=str(path))


def _lines(value, what: str) -> tuple:
    value = value or []
    if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
        raise ProtocolError(f"{what} must be a list of lines")
    return tuple(value)


def _mapping(value, what: str, allowed: Optional[set] = None) -> dict:
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a mapping")
    if allowed is not None and set(value) - allowed:
        raise ProtocolError(f"{what}: unknown keys {sorted(set(value) - allowed)}; it has "
                            f"{sorted(allowed)}")
    return dict(value)


def _check_as_published(raw, task_cls, task_options: dict, where: str) -> AsPublished:
    """The ``as_published`` mode: every method's task and estimator options exist and take their
    values, the budget is a Budget, the published figures name known estimators and figures."""
    import estimators
    import tasks

    what = f"protocol {where}: as_published"
    raw = _mapping(raw, what, _AS_PUBLISHED_KEYS)
    for key in ("task_options", "budget", "per_method"):
        if key not in raw:
            raise ProtocolError(f"{what}: missing {key}")
    base = {**task_options, **_mapping(raw["task_options"], f"{what}.task_options")}
    budget = _mapping(raw["budget"], f"{what}.budget")
    try:
        Budget(**budget)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{what}.budget: {exc}") from None
    per_method = {}
    for est, m in _mapping(raw["per_method"], f"{what}.per_method").items():
        m = _mapping(m, f"{what}.per_method.{est}", _METHOD_KEYS)
        t_opts = _mapping(m.get("task"), f"{what}.per_method.{est}.task")
        e_opts = _mapping(m.get("estimator"), f"{what}.per_method.{est}.estimator")
        try:
            tasks.get(task_cls.name, **{**base, **t_opts})
            cls = estimators.get_class(est)
            estimators.get(est, **e_opts)
        except Exception as exc:
            raise ProtocolError(f"{what}.per_method.{est}: {exc}") from None
        if task_cls.family not in cls.families:
            raise ProtocolError(f"{what}.per_method: estimator {est!r} does not run on "
                                f"{task_cls.family} latents")
        per_method[est] = MethodSettings(str(m.get("source_name", est)), t_opts, e_opts)
    if not per_method:
        raise ProtocolError(f"{what}.per_method names no method")
    published = None
    if raw.get("published") is not None:
        published = _check_published(raw["published"], per_method, task_cls,
                                     f"{what}.published")
    return AsPublished(what=str(raw.get("what", "")), task_options=base, budget=budget,
                       per_method=per_method,
                       differences=_lines(raw.get("differences"), f"{what}.differences"),
                       published=published)


def _check_published(raw, per_method: dict, task_cls, what: str) -> Published:
    from estbench.core import metrics

    raw = _mapping(raw, what, _PUBLISHED_KEYS)
    source = _mapping(raw.get("source"), f"{what}.source")
    for key in ("repository", "commit", "computed"):
        if not source.get(key):
            raise ProtocolError(f"{what}.source needs its {key}")
    figures = {}
    for name, f in _mapping(raw.get("figures"), f"{what}.figures").items():
        f = _mapping(f, f"{what}.figures.{name}", _FIGURE_KEYS)
        if not isinstance(metrics.lookup(str(f.get("metric")), task_cls.final_figures),
                          metrics.Metric):
            raise ProtocolError(f"{what}.figures.{name}: metric {f.get('metric')!r} is not a "
                                f"recorded metric (estbench/core/metrics.py, or the task's own)")
        if f.get("sign", 1) not in (1, -1) or f.get("at", "end") != "end":
            raise ProtocolError(f"{what}.figures.{name}: sign is 1 or -1, at is end")
        steps = f.get("steps")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ProtocolError(f"{what}.figures.{name}: steps is a positive number of steps")
        figures[name] = PublishedFigure(name, str(f.get("label", name)), f["metric"],
                                        int(f.get("sign", 1)), "end", steps)
    values = {}
    for est, figs in _mapping(raw.get("values"), f"{what}.values").items():
        if est not in per_method:
            raise ProtocolError(f"{what}.values: {est!r} is not a method of per_method")
        out = {}
        for name, v in _mapping(figs, f"{what}.values.{est}").items():
            if name not in figures:
                raise ProtocolError(f"{what}.values.{est}: no figure {name!r}")
            ok = (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
                  and float(v[1]) >= 0 and int(v[2]) == v[2] and v[2] >= 1
                  and (v[2] > 1 or v[1] == 0))  # one run has no standard error
            if not ok:
                raise ProtocolError(f"{what}.values.{est}.{name}: expected [mean, standard error, "
                                    f"seeds], got {v!r}")
            out[name] = (float(v[0]), float(v[1]), int(v[2]))
        values[est] = out
    return Published(source=source, figures=figures, values=values)


@functools.lru_cache(maxsize=None)
def available() -> dict[str, Protocol]:
    """Every task's protocol by task name, loaded and checked once."""
    return {p.stem: _check(_load_yaml(p), p) for p in sorted(protocol_dir().glob("*.yml"))}


def get(task: str) -> Protocol:
    """The protocol of ``task``; a clear error for a task that follows none."""
    found = available()
    if task not in found:
        raise ProtocolError(f"task {task!r} follows no published protocol, so it has no "
                            f"{PAPER!r} budget; tasks with one: {', '.join(sorted(found))}")
    return found[task]


def as_published(task: str) -> AsPublished:
    """The as-published mode of ``task``'s protocol; a clear error for one that has none."""
    p = get(task)
    if p.as_published is None:
        with_mode = sorted(n for n, q in available().items() if q.as_published is not None)
        raise ProtocolError(f"task {task!r}: its protocol has no as-published mode, so it has no "
                            f"{PUBLISHED!r} budget; tasks with one: {', '.join(with_mode) or 'none'}")
    return p.as_published


def published_options(task: str, estimator: str, task_given: dict, estimator_given: dict):
    """(task options, estimator options) of a method run as its source ran it, or None for an
    estimator the source did not run: the mode's options, the method's own, then the ones given."""
    ap = as_published(task)
    m = ap.per_method.get(estimator)
    if m is None:
        return None
    return ({**ap.task_options, **m.task_options, **task_given},
            {**m.estimator_options, **estimator_given})


def task_options(task: str, given: dict) -> dict:
    """The options of a task run under its protocol: the protocol's, then the ones given."""
    return {**get(task).task_options, **given}


def estimator_options(task: str, estimator: str, given: dict) -> dict:
    """The options of an estimator under a task's protocol: the ones the source tuned unless
    options were given (an estimator named with options is the user's configuration)."""
    if given:
        return given
    return dict(get(task).estimator_options.get(estimator, {}))
