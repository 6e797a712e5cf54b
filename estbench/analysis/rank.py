"""``estbench rank``: where does a new estimator rank?

Loads a user's estimator (``path/to/file.py:ClassName``, ``path/to/file.py`` with one estimator
class in it, or a registered / entry-point name), checks it against the contract before spending any
benchmark time on it, then runs it -- and every other compatible estimator, reusing the cells that the
result set already holds -- on every compatible task under the same budget and seeds, and reports
its rank per task and overall.
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import sys
from pathlib import Path

import pandas as pd

import estimators
import tasks
from estbench.engine import contract
from estbench.core.errors import RankError


def load_target(target: str) -> type:
    """The Estimator class named by ``target``; registers it if it came from a file."""
    path_part, _, cls_name = target.partition(":")
    if not path_part.endswith(".py") and (Path(path_part).is_file() or ":" in target):
        hint = f" (did you mean {path_part}.py{':' + cls_name if cls_name else ''}?)" \
            if Path(path_part + ".py").is_file() else ""
        raise RankError(f"rank target {target!r}: a file is named with its .py ending "
                        f"(file.py or file.py:ClassName), an estimator by its registered name{hint}")
    if path_part.endswith(".py") or "/" in path_part:
        path = Path(path_part)
        if not path.is_file():
            raise RankError(f"no estimator file at {path}")
        mod_name = f"estbench_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise RankError(f"{path} failed to import: {type(exc).__name__}: {exc}") from None
        found = {n: c for n, c in vars(module).items()
                 if inspect.isclass(c) and issubclass(c, estimators.Estimator)
                 and c.__module__ == mod_name and c.__dict__.get("name")}
        if cls_name:
            if cls_name not in vars(module):
                raise RankError(f"{path} defines no {cls_name!r} (estimators found: "
                                f"{', '.join(sorted(found)) or 'none'})")
            cls = vars(module)[cls_name]
            if not (inspect.isclass(cls) and issubclass(cls, estimators.Estimator)):
                raise RankError(f"{path}:{cls_name} is not a subclass of estimators.Estimator")
        else:
            if len(found) != 1:
                raise RankError(f"{path} defines {len(found)} estimator classes with a name "
                                f"({', '.join(sorted(found)) or 'none'}): name one as {path}:ClassName")
            cls = next(iter(found.values()))
        if not cls.name:
            raise RankError(f"{cls.__name__} declares no `name`")
        return estimators.register(cls)
    try:
        return estimators.get_class(target)
    except ValueError as exc:
        raise RankError(str(exc)) from None


#: ``--reference none``: rank against rivals computed here, reusing no result set
NO_REFERENCE = "none"


def shipped_reference() -> Path:
    """The reference set of this installation: ``results/reference`` beside the installed
    packages (a checkout or an editable install has it; a wheel does not), wherever the command
    is run from."""
    return Path(estimators.__file__).resolve().parent.parent / "results" / "reference"


def shipped_snapshots() -> Path:
    """The snapshot sets of this installation (``results/snapshots``), found like
    :func:`shipped_reference`."""
    return shipped_reference().parent / "snapshots"


def shipped_probe() -> Path:
    """The committed probe of every estimator at the shipped snapshot sets (``results/probe``),
    whose cells ``rank`` reuses like the reference set's."""
    return shipped_reference().parent / "probe"


def resolve_reference(text: str | None) -> Path | None:
    """The result set ``rank`` reuses cells from: ``--reference`` as given (``none``: no reuse),
    by default the shipped one.  A missing folder, a file, or a folder holding no cell is an error
    naming it: ranking against it would silently recompute every rival (hours on real tasks)."""
    if text is not None and text.strip().lower() == NO_REFERENCE:
        return None
    ref = Path(text) if text is not None else shipped_reference()
    what = f"--reference {ref}" if text is not None else f"the shipped reference set {ref}"
    hint = ("pass --reference DIR (a folder made by 'estbench run'), or --reference none to "
            "compute every rival here")
    if not ref.exists():
        raise RankError(f"{what} does not exist; {hint}")
    if not ref.is_dir():
        raise RankError(f"{what} is a file, not a results folder; {hint}")
    cells = ref / "cells"
    if not cells.is_dir() or not any(cells.glob("*.parquet")):
        raise RankError(f"{what} holds no finished cell (no {cells.name}/*.parquet: not a results "
                        f"folder, or nothing has run there); {hint}")
    return ref


def reuse_cells(plan, reference: Path, out: Path) -> int:
    """Copy into ``out`` the cells of ``plan`` that the reference set already holds (a hard link
    where the file system allows, else a copy): the reference folder is only read.  Returns how
    many were reused; a damaged reference file is not copied (the cell is recomputed)."""
    import os
    import shutil

    from estbench.engine import store

    reference, out = Path(reference), Path(out)
    if not (reference / "cells").is_dir():
        return 0
    n = 0
    for cell in plan.cells:
        key = cell.with_code().key()
        src, dst = store.cell_path(reference, key), store.cell_path(out, key)
        if dst.exists() or not store.has_cell(reference, key):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.reuse")
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        n += 1
    return n


def check_target(cls) -> None:
    problems = contract.check(cls)
    if problems:
        raise RankError(f"estimator {getattr(cls, 'name', cls)!r} does not honour the contract: "
                        + "; ".join(problems))


def compatible_tasks(cls) -> list[str]:
    return [t for t in tasks.available() if tasks.get_class(t).family in cls.families]


#: the criteria ``estbench rank`` prints, in order, and those read from measured times (compared
#: only between cells timed in one environment: ``timing_difference``)
PLACED = [("final_elbo", "final ELBO"), ("grad_error", "gradient error"), ("variance", "variance"),
          ("elbo_at_time", "ELBO at equal time"), ("step_time", "time a step")]
TIMED = frozenset({"elbo_at_time", "step_time", "error_x_time"})
#: warn that the seeds are too few when two estimators need a paired difference of more than this
#: many standard deviations to be told apart (``separable_effect``)
FEW_SEEDS_EFFECT = 3.0


def placement(board: pd.DataFrame, name: str, criterion: str = "final_elbo") -> pd.DataFrame:
    """The estimator's rows of a leaderboard for one criterion: per task its rank, worst rank,
    field size (``of``), the estimators tied with it, its mean and seeds; then the overall row
    (rank by mean relative rank, ``of`` the estimators ranked overall, ``tied`` those sharing
    its overall place).  Empty where the criterion did not rank it (a biased estimator is not
    ranked by variance)."""
    b = board[board.criterion == criterion]
    cols = ["task", "rank", "rank_worst", "of", "tied", "tied_with", "mean", "relative", "seeds"]
    mine = b[b.estimator == name]
    if mine.empty:
        return pd.DataFrame(columns=cols)
    sizes = b.groupby("task")["estimator"].size()
    rows = []
    for r in mine.itertuples(index=False):
        row = r._asdict()
        row["of"] = int(sizes[r.task])
        if r.task == "overall":
            overall = b[b.task == "overall"]
            peers = overall[(overall["rank"] == r.rank) & (overall.estimator != name)].estimator
            row.update(tied=len(peers), tied_with="; ".join(peers), rank_worst=r.rank)
        rows.append(row)
    out = pd.DataFrame(rows)
    out["_overall"] = out.task == "overall"
    return out.sort_values(["_overall", "task"]).reindex(columns=cols).reset_index(drop=True)


def separable_effect(seeds: int, field: int, alpha: float = 0.05) -> float:
    """The smallest paired difference, in standard deviations of the seed-to-seed differences,
    that the leaderboard can declare significant with ``seeds`` seeds in a field of ``field``
    estimators: the first step of Holm's correction over the field's k(k-1)/2 pairs needs a
    paired t above t_{n-1}(1 - alpha / (2m)), and t = d sqrt(n) for a difference of d standard
    deviations.  Infinite below two seeds (no paired test)."""
    from scipy import stats

    if seeds < 2 or field < 2:
        return math.inf
    m = field * (field - 1) / 2
    return float(stats.t.ppf(1 - alpha / (2 * m), seeds - 1) / math.sqrt(seeds))


def seeds_for_effect(field: int, effect: float = FEW_SEEDS_EFFECT, alpha: float = 0.05) -> int:
    """The fewest seeds with ``separable_effect`` at most ``effect``."""
    n = 2
    while separable_effect(n, field, alpha) > effect and n < 1000:
        n += 1
    return n


def timing_difference(cells: pd.DataFrame, name: str) -> dict:
    """Per task, what differs between the timing environment of the estimator's finished cells
    and that of its rivals' (CPU, CUDA device, threads, jobs; ``compare``'s rule): a rank read
    from measured times mixes machines where it is not ''.  Rivals' cells reused from a reference
    set made elsewhere are the usual cause."""
    from estbench.analysis import compare

    out = {}
    if cells is None or cells.empty:
        return out
    for task, d in cells.groupby("task"):
        mine = d[d.estimator == name]
        rivals = d[d.estimator != name]
        envs_m = [e for envs in compare.timing_envs(mine).values() for e in envs]
        envs_r = [e for envs in compare.timing_envs(rivals).values() for e in envs]
        if envs_m and envs_r:
            out[task] = compare.env_difference(envs_m, envs_r)
    return out


def _listing(names: str, most: int = 6) -> str:
    names = [n for n in str(names).split("; ") if n]
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


#: the criteria of the shared-parameter rank (``estbench rank`` probes first): gradient quality,
#: at the same parameters for every estimator
PROBE_PLACED = [("grad_error", "gradient error"), ("variance", "variance"),
                ("error_x_evals", "gradient error x f-evaluations")]


def render_placement(name: str, board: pd.DataFrame, timing: dict | None = None,
                     biased: frozenset = frozenset(), placed=PLACED, blocks: str = "seeds") -> str:
    """Where ``name`` ranks, per criterion and task: its place and the interval of places the
    evidence allows, the estimators it is tied with, and a warning where the seeds are too few
    to separate the field or the timings come from different environments.  ``biased``: the tasks
    where the bias test finds it biased (the criteria among unbiased estimators leave it out).
    ``placed``: the criteria shown; ``blocks``: what the paired tests pair (seeds of training
    cells, or the snapshots of a probe)."""
    from estbench.analysis.leaderboard import CRITERIA

    unbiased_only = {c.name for c in CRITERIA if c.unbiased_only}
    timing = {t: why for t, why in (timing or {}).items() if why}
    lines = [f"where {name} ranks (1 = best; rank = 1 + the estimators significantly better, "
             f"Holm-corrected paired tests over {blocks}; 'tied with' = not significantly "
             "different):"]
    few = []
    for crit, title in placed:
        p = placement(board, name, crit)
        if p.empty:
            if crit in unbiased_only and biased:
                lines.append(f"  by {title}: not ranked: the bias test finds it biased on "
                             f"{', '.join(sorted(biased))} (this ranking admits unbiased estimators)")
            continue
        lines.append(f"  by {title}:")
        for r in p.itertuples(index=False):
            if crit in TIMED and r.task in timing:
                lines.append(f"    {r.task:<40} not comparable: timed in different environments "
                             f"({timing[r.task]})")
                continue
            if r.task == "overall":
                if crit in TIMED and timing:
                    lines.append(f"    {'overall':<40} not comparable (see the tasks above)")
                    continue
                tie = f", tied with {int(r.tied)}" if r.tied else ""
                lines.append(f"    {'overall':<40} {int(r.rank):>3} of {int(r.of):<3} (mean relative "
                             f"rank {r.relative:.2f}, 0 = best{tie})")
                continue
            place = (f"{int(r.rank)}" if r.rank == r.rank_worst
                     else f"{int(r.rank)}-{int(r.rank_worst)}")
            tie = f"; tied with {int(r.tied)}: {_listing(r.tied_with)}" if r.tied else ""
            lines.append(f"    {r.task:<40} {place:>5} of {int(r.of):<3} (mean {r.mean:.4g}{tie})")
            effect = separable_effect(int(r.seeds), int(r.of))
            if r.tied and effect > FEW_SEEDS_EFFECT:
                few.append((r.task, int(r.seeds), int(r.of), effect))
    one = blocks[:-1]
    for task, seeds, field, effect in sorted(set(few)):
        need = seeds_for_effect(field)
        lines.append(f"warning: {task}: {seeds} {one if seeds == 1 else blocks} cannot separate a "
                     f"field of {field}: a difference must exceed "
                     + (f"every {one}-to-{one} spread (no paired test below 2 {blocks})"
                        if effect == math.inf else f"{effect:.3g} times its {one}-to-{one} spread")
                     + f" to be significant; {need} {blocks} bring that to {FEW_SEEDS_EFFECT:g}"
                     + (" (--seeds)" if blocks == "seeds" else ""))
    return "\n".join(lines) + "\n"
