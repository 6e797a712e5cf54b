"""The results store: one Parquet file per finished cell, written atomically, merged on read.

Layout of a run folder::

    RUN/meta.json               run metadata (versions, device names, git commit, command)
    RUN/cells/<key>.parquet     tidy records of one cell; its status row rides in the file metadata
    RUN/results.parquet         all records merged (rewritten after every sweep; derived, disposable)
    RUN/running/<key>.json      what a cell in progress is doing (:class:`Heartbeat`; removed when
                                the cell ends; never read as a result)

A cell file appears only complete (temp file + ``os.replace``), so an interrupted sweep never leaves
a half-written record, and a cell whose file exists is not recomputed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from estbench.core import __version__
from estbench.core.budget import Budget
from estbench.engine.cell import cell_code_version, code_version
from estbench.core.records import RECORD_COLUMNS, RECORD_IDENTITY

_CELL_KEY = b"estbench.cell"


#: paths whose changes do not make the source "dirty": results are what a run writes (remaking
#: the reference deletes its committed cells first, which is not a change to the code)
_NOT_SOURCE = ("results",)


def source_changes(root=None) -> str:
    """``git status`` of the tracked files outside ``results/`` of the estbench source tree (or of
    the checkout at ``root``): '' when clean or when it is not a git checkout."""
    here = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    try:
        return subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             *(f":(exclude){p}" for p in _NOT_SOURCE)],
            cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit(root=None) -> str:
    """The git commit of the estbench source tree or of ``root`` (with ``-dirty`` if its code, not
    its results, has uncommitted changes), or ''."""
    here = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        if not sha:
            return ""
        return sha + ("-dirty" if source_changes(here) else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def typed_command(argv: list[str]) -> str:
    """The command as a person types it: ``estbench run ...`` rather than the entry point's
    absolute path (``/usr/.../bin/estbench``) or ``python -m estbench``'s ``.../__main__.py``;
    arguments quoted where the shell needs it."""
    import shlex

    if not argv:
        return ""
    head = Path(argv[0]).name
    if head in ("__main__.py", "estbench", "estbench.exe") or head.startswith("estbench"):
        head = "estbench"
    return " ".join([head, *(shlex.quote(a) for a in argv[1:])])


def run_metadata(argv: list[str] | None = None) -> dict:
    cuda = torch.cuda.is_available()
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "estbench": __version__,
        "git_commit": git_commit(),
        "code_version": code_version(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": __import__("numpy").__version__,
        "pandas": pd.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "command": typed_command(argv) if argv is not None else None,
    }


def _umask() -> int:
    """The process's umask (read from /proc where possible: ``os.umask`` can only read it by
    setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split(":", 1)[1].strip(), 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0)
    os.umask(old)
    return old


def _fsync(path, directory: bool = False) -> None:
    """Flush ``path`` to the disk; best effort for a directory (not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write ``path`` whole or not at all: ``write(tmp)`` fills a temp file beside it, which is
    flushed to the disk and renamed over ``path``.  The file gets the permissions of an ordinary
    new file (0o666 less the umask), not mkstemp's 0o600, so a shared results folder stays
    readable to the colleagues the umask allows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)  # the data is on the disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync(path.parent, directory=True)  # ... and so is the rename


def writable(run_dir) -> bool:
    """Whether new files can be created in the results folder ``run_dir`` (and its ``cells/``).

    Tried, not asked: ``os.access`` answers yes to root on a read-only mount.  False for a folder
    that does not exist."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "cells"):
        if folder is not run_dir and not folder.is_dir():
            continue
        try:
            fd, tmp = tempfile.mkstemp(prefix=".estbench-probe.", suffix=".tmp", dir=folder)
        except OSError:
            return False
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return True


def records_frame(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records, columns=RECORD_COLUMNS)
    return df.astype({"seed": "int64", "n_samples": "int64", "steps": "int64", "step": "int64",
                      "value": "float64"})


def cell_path(run_dir: Path, key: str) -> Path:
    return Path(run_dir) / "cells" / f"{key}.parquet"


def cell_damage(path: Path, key: str | None = None) -> str | None:
    """Why the cell file ``path`` is not a usable record (None when it is one).

    Cheap: reads only the Parquet footer (schema and metadata), never the records, so a truncated,
    garbled or foreign file is caught, not a bit flipped inside the data pages."""
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # ArrowInvalid (not Parquet, truncated), OSError (unreadable), ...
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else 'unreadable'}"
    meta = schema.metadata or {}
    if _CELL_KEY not in meta:
        return "a Parquet file without estbench cell metadata"
    missing = [c for c in RECORD_COLUMNS if c not in schema.names]
    if missing:
        return f"missing record column(s) {', '.join(missing)}"
    try:
        row = json.loads(meta[_CELL_KEY])
    except ValueError:
        return "malformed estbench cell metadata"
    if not isinstance(row, dict) or "status" not in row:
        return "malformed estbench cell metadata"
    if key is not None and row.get("key", key) != key:
        return f"it holds cell {row.get('key')!r}"
    return None


_REPORTED_DAMAGE: set = set()


def has_cell(run_dir: Path, key: str, report: bool = True) -> bool:
    """Whether the cell ``key`` is stored in ``run_dir`` (and so is not recomputed).

    A damaged cell file (truncated, unreadable, not an estbench record) is not a stored cell: it is
    recomputed and rewritten, and ``report`` prints one line naming it (once per file)."""
    path = cell_path(run_dir, key)
    if not path.exists():
        return False
    why = cell_damage(path, key)
    if why is None:
        return True
    if report:
        try:
            st = path.stat()
            ident = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        except OSError:
            ident = (str(path), None, None)
        if ident not in _REPORTED_DAMAGE:
            _REPORTED_DAMAGE.add(ident)
            print(f"estbench: damaged cell file {path} ({why}): recomputing it", file=sys.stderr,
                  flush=True)
    return False


def write_cell(run_dir: Path, key: str, result, env: dict | None = None) -> Path:
    """Write one finished cell's records atomically; returns the path.  ``env``: the conditions the
    worker ran it in (``threads``, ``jobs``: ``executors.WorkerSettings.environment``; default one
    thread, one cell at a time), kept with the machine's CPU and GPU names."""
    table = pa.Table.from_pandas(records_frame(result.records), preserve_index=False)
    cuda = str(result.cell.device).startswith("cuda") and torch.cuda.is_available()
    # where the cell's time was measured: compare only compares step times measured alike
    env = {"cpu": _cpu_model(), "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
           "threads": 1, "jobs": 1, **(env or {})}
    row = {**result.summary_row(), "key": key, "code_version": cell_code_version(result.cell),
           "finished": time.time(), "artifacts": result.artifacts, "env": env}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           _CELL_KEY: json.dumps(row).encode()})
    path = cell_path(run_dir, key)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


#: the folder of the heartbeat files of cells in progress
RUNNING = "running"


class Heartbeat:
    """What a running cell is doing, for whoever watches the sweep: ``RUN/running/<key>.json``
    (label, step, steps, phase, start time), rewritten at each change of phase and otherwise at
    most every ``every`` seconds, removed when the cell ends.  It lives in the results folder, so
    it works wherever the store does (loky, Slurm or dask workers on a shared file system).  It
    never raises: progress is a courtesy, not part of a result."""

    def __init__(self, run_dir, key: str, label: str, every: float = 2.0):
        self.path = Path(run_dir) / RUNNING / f"{key}.json"
        self.label, self.every = label, every
        self.started = time.time()
        self._last, self._phase = -float("inf"), None

    def __call__(self, step: int, steps: int, phase: str) -> None:
        now = time.monotonic()
        if phase == self._phase and now - self._last < self.every:
            return
        self._last, self._phase = now, phase
        state = {"label": self.label, "step": int(step), "steps": int(steps), "phase": phase,
                 "started": self.started, "pid": os.getpid()}
        try:
            self.path.parent.mkdir(exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.path)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass


def running(run_dir, keys=None) -> list[dict]:
    """The heartbeats of the cells in progress in ``run_dir`` (of ``keys`` only, if given), oldest
    first, each with ``key`` and ``updated`` (the file's modification time) added."""
    folder = Path(run_dir) / RUNNING
    out = []
    try:
        paths = list(folder.glob("*.json"))
    except OSError:
        return out
    for path in paths:
        key = path.stem
        if keys is not None and key not in keys:
            continue
        try:
            state = json.loads(path.read_text())
            state.update(key=key, updated=path.stat().st_mtime)
        except (OSError, ValueError):
            continue  # being replaced, or removed since the glob
        out.append(state)
    return sorted(out, key=lambda s: s.get("started", 0))


def clear_running(run_dir, keys) -> None:
    """Remove the heartbeats of ``keys`` (left by workers that died) and the folder if empty."""
    folder = Path(run_dir) / RUNNING
    for key in keys:
        try:
            (folder / f"{key}.json").unlink()
        except OSError:
            pass
    try:
        folder.rmdir()
    except OSError:
        pass


def meta_status(run_dir) -> tuple[dict, str]:
    """The run folder's metadata and ``''``; ``({}, '')`` when it has no meta.json; and when its
    meta.json exists but cannot be read as a JSON object, ``({}, why)``, why in one line."""
    path = Path(run_dir) / "meta.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, ""
    except (OSError, UnicodeDecodeError) as exc:
        return {}, (exc.strerror if isinstance(exc, OSError) and exc.strerror
                    else " ".join(str(exc).split()) or type(exc).__name__)
    try:
        meta = json.loads(text)
    except ValueError as exc:
        return {}, f"not valid JSON ({exc})"
    if not isinstance(meta, dict):
        return {}, f"not a JSON object (a JSON {type(meta).__name__})"
    return meta, ""


def read_meta(run_dir, warn: bool = True) -> dict:
    """The run folder's metadata, or {} when there is none or it is unreadable; an unreadable one
    is said in one warning naming the file and why (unless ``warn`` is false), never silently
    dropped: without it a report loses the run's commit, machine and command."""
    meta, problem = meta_status(run_dir)
    if problem and warn:
        warnings.warn(meta_warning(run_dir, problem), stacklevel=2)
    return meta


def meta_warning(run_dir, problem: str) -> str:
    """The one line that says a run folder's meta.json is unreadable, and what that loses."""
    return (f"{Path(run_dir) / 'meta.json'} is unreadable: {problem}; the run's provenance "
            "(commit, machine, command) is unknown")


def write_meta(run_dir: Path, meta: dict) -> None:
    """Write the metadata of a run into its folder.

    A folder is often extended by several runs (a resumed sweep, ``rank``, a second process): the
    previous runs' command lines are kept under ``history`` and the selections (tasks, estimators,
    seeds, devices, per-task budgets) accumulate, so the metadata describes everything in the folder.
    """
    old = read_meta(run_dir)
    merged = dict(meta)
    if old:
        merged["history"] = old.get("history", []) + [
            {k: old.get(k) for k in ("created", "command", "git_commit", "code_version")}]
        for k in ("tasks", "estimators", "seeds", "devices"):
            if isinstance(old.get(k), list) and isinstance(meta.get(k), list):
                merged[k] = old[k] + [v for v in meta[k] if v not in old[k]]
        if isinstance(old.get("budgets"), dict) and isinstance(meta.get("budgets"), dict):
            merged["budgets"] = {**old["budgets"], **meta["budgets"]}
    path = Path(run_dir) / "meta.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(merged, indent=2) + "\n"))


#: what identifies a cell apart from the code that computed it
CELL_IDENTITY = ["task", "estimator", "seed", "device",
                 *(f.name for f in dataclasses.fields(Budget))]


def load(run_dir, latest_only: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All records of a run folder as one long DataFrame, and one status row per cell.

    A folder extended after the code changed holds the same cell computed by two code versions;
    with ``latest_only`` only the most recently finished one is kept.  Unreadable or foreign files
    under ``cells/`` are skipped with a warning naming them.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no results folder at {run_dir}")
    frames, rows = [], []
    for path in sorted((run_dir / "cells").glob("*.parquet")):
        try:
            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            if _CELL_KEY not in meta or not set(RECORD_COLUMNS) <= set(table.column_names):
                raise ValueError("not an estbench cell record")
            row = json.loads(meta[_CELL_KEY])
            df = table.to_pandas()[RECORD_COLUMNS]
            df["_key"] = row.get("key", path.stem)
            rows.append(row)
            frames.append(df)
        except Exception as exc:
            warnings.warn(f"skipping unreadable results file {path}: {exc}", stacklevel=2)
    cells = pd.DataFrame(rows)
    identity = [c for c in CELL_IDENTITY if c in cells.columns]  # older cells lack newer fields
    if latest_only and len(cells) and {"task", "estimator", "seed"} <= set(identity):
        order = cells["finished"] if "finished" in cells else pd.Series(0.0, index=cells.index)
        cells = (cells.assign(_order=order.fillna(0.0)).sort_values("_order", kind="stable")
                 .drop_duplicates(identity, keep="last").drop(columns="_order")
                 .sort_index())
    keep = set(cells["key"]) if len(cells) else set()
    frames = [f for f in frames if len(f) and f["_key"].iat[0] in keep] if frames else []
    records = (pd.concat(frames, ignore_index=True).drop(columns="_key") if frames
               else records_frame([]))
    return records, cells.reset_index(drop=True)


def write_merged(run_dir: Path) -> Path:
    records, _ = load(run_dir)
    path = Path(run_dir) / "results.parquet"
    atomic_write(path, lambda tmp: records.to_parquet(tmp, index=False))
    return path


def finished(records: pd.DataFrame, cells: pd.DataFrame | None) -> pd.DataFrame:
    """The records of the cells that finished (status ``ok``) only.

    A failed or diverged cell keeps the checkpoint records it made before it stopped; they are no
    measurement of the estimator, so rankings, tables, plots and comparisons must not see them.
    Joined with the status rows of ``store.load`` on ``core.records.RECORD_IDENTITY``.  Without status
    rows (``cells`` None) the records are returned as they are; with an empty frame, none.
    """
    if cells is None:
        return records
    if records.empty or cells.empty or "status" not in cells:
        return records.iloc[0:0]
    ok = cells.loc[cells.status == "ok", RECORD_IDENTITY].drop_duplicates()
    ok = ok.astype({c: records[c].dtype for c in RECORD_IDENTITY})
    return records.merge(ok, on=RECORD_IDENTITY, how="inner")[list(records.columns)]
