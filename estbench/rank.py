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
import sys
from pathlib import Path

import pandas as pd

import estimators
import tasks
from estbench import contract
from estbench.errors import RankError


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


def reuse_cells(plan, reference: Path, out: Path) -> int:
    """Copy into ``out`` the cells of ``plan`` that the reference set already holds (a hard link
    where the file system allows, else a copy): the reference folder is only read.  Returns how
    many were reused; a damaged reference file is not copied (the cell is recomputed)."""
    import os
    import shutil

    from estbench import store

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


def placement(board: pd.DataFrame, name: str, criterion: str = "final_elbo") -> pd.DataFrame:
    """The estimator's rows of a leaderboard: per task rank, field size and mean, plus overall."""
    b = board[board.criterion == criterion]
    sizes = b.groupby("task")["estimator"].count().rename("of")
    mine = b[b.estimator == name].merge(sizes, left_on="task", right_index=True)
    mine = mine.assign(_overall=mine.task == "overall").sort_values(["_overall", "task"])
    return mine.drop(columns="_overall")[["task", "rank", "of", "mean", "relative"]].reset_index(
        drop=True)


def render_placement(name: str, board: pd.DataFrame) -> str:
    lines = [f"where {name} ranks (1 = best; ties where the difference is not significant):"]
    for crit, title in [("final_elbo", "final ELBO"), ("variance", "variance"), ("step_time", "time")]:
        p = placement(board, name, crit)
        if p.empty:
            continue
        lines.append(f"  by {title}:")
        for _, r in p.iterrows():
            if r.task == "overall":
                lines.append(f"    {r.task:<40} {int(r['rank']):>3} of {int(r.of):<3} (mean relative "
                             f"rank {r['relative']:.2f}, 0 = best; mean rank {r['mean']:.3g})")
            else:
                lines.append(f"    {r.task:<40} {int(r['rank']):>3} of {int(r.of):<3} (mean {r['mean']:.4g})")
    return "\n".join(lines) + "\n"
