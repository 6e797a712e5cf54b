"""Faults a user or a machine throws at a sweep: damaged cell files, a disk that fills up, a read-only
results folder, an --out that is a file, absurd seeds, malformed parallel configs, MIG GPU names.

Each ends in one clear line on stderr (no traceback) and a non-zero exit -- or, for a damaged cell
file, in recomputing that cell -- and keeps every finished cell.  All fast: one or two tiny cells.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from estbench.engine import executors, store, sweep
from estbench.cli import commands as cli
from estbench.cli.commands import main
from estbench.core import spec
from estbench.core.errors import ConfigError

TINY = ["run", "--tasks", "toy_binary", "--estimators", "rloo", "--steps", "3", "--checkpoints", "0"]


def run(out, seeds="0,1", *extra):
    return main([*TINY, "--seeds", seeds, "--out", str(out), *extra])


def cell_files(out):
    return sorted((Path(out) / "cells").glob("*.parquet"))


def one_error_line(err: str) -> str:
    """stderr of a --quiet run that failed: exactly one line, no traceback."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- 1. damaged cell files

def _garbage(path):
    path.write_bytes(b"\x00garbage, not parquet\xff" * 8)


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _foreign(path):  # a valid Parquet file, but no estbench cell record
    pq.write_table(pa.table({"x": [1.0, 2.0]}), path)


def _wrong_schema(path):  # estbench metadata, but the record columns are gone
    table = pq.read_table(path)
    pq.write_table(table.select(["task", "metric"]).replace_schema_metadata(table.schema.metadata), path)


@pytest.mark.parametrize("damage", [_garbage, _truncated, _foreign, _wrong_schema])
@pytest.mark.slow
def test_damaged_cell_file_is_recomputed_not_cached(tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert run(out) == 0
    files = cell_files(out)
    assert len(files) == 2
    victim = files[0]
    damage(victim)
    capsys.readouterr()

    assert run(out) == 0  # the same command again
    err = capsys.readouterr().err
    assert err.count(f"estbench: damaged cell file {victim}") == 1  # warned once, naming the file
    assert "recomputing it" in err and "Traceback" not in err
    assert "1 of 2 cells already stored" in err and err.count(" ... ok") == 1  # only the damaged one ran
    assert pq.read_table(victim).num_rows > 0  # rewritten, valid again
    assert json.loads(pq.read_schema(victim).metadata[b"estbench.cell"])["key"] == victim.stem
    assert set(pd.read_parquet(out / "results.parquet").seed) == {0, 1}  # no seed vanished
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file skipped as unreadable would warn
        records, cells = store.load(out)
    assert len(cells) == 2 and set(records.seed) == {0, 1}


def test_has_cell_checks_the_key_and_missing_files(tmp_path, capsys):
    assert run(tmp_path) == 0
    a, b = cell_files(tmp_path)
    assert store.has_cell(tmp_path, a.stem) and not store.has_cell(tmp_path, "0" * 20)
    b.write_bytes(a.read_bytes())  # a file under another cell's name
    capsys.readouterr()
    assert not store.has_cell(tmp_path, b.stem)
    assert "holds cell" in capsys.readouterr().err
    assert not store.has_cell(tmp_path, b.stem, report=False)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- 2. atomic writes

def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@pytest.mark.slow
def test_stored_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o027)  # a group-shared results folder
    try:
        assert run(tmp_path / "run", "0", "--quiet") == 0
    finally:
        os.umask(old)
    for path in [*cell_files(tmp_path / "run"), tmp_path / "run" / "meta.json",
                 tmp_path / "run" / "results.parquet"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~0o027, path  # 0o640, not mkstemp's 0o600
    assert run(tmp_path / "run2", "0", "--quiet") == 0  # and under the test's own umask
    assert cell_files(tmp_path / "run2")[0].stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_atomic_write_fsyncs_before_the_rename(tmp_path, monkeypatch):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the file behind a descriptor")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.realpath(a)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "x.json"
    store.atomic_write(target, lambda tmp: Path(tmp).write_text("{}"))
    assert target.read_text() == "{}"
    assert [k for k, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1] == events[1][1] != os.path.realpath(target)  # the temp file, before the rename
    assert events[2][1] == os.path.realpath(tmp_path)  # then the folder holding the new name


# ----------------------------------------------------------------------------- 3. --out is a file

def test_out_naming_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "results.txt"
    path.write_text("not a folder\n")
    assert run(path) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"estbench: error: --out {path} is a file, not a results folder"
    assert path.read_text() == "not a folder\n"


# ----------------------------------------------------------------------------- 4. seeds

def test_seed_past_int64_is_refused(tmp_path, capsys):
    assert run(tmp_path, "99999999999999999999") == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("estbench: error: --seeds") and "64-bit" in line
    assert not (tmp_path / "cells").exists()


@pytest.mark.parametrize("seeds, message", [
    ("4294967296", "from 0 to 4294967295"),  # would overflow the measurement streams' seeds
    ("5-3", "the range 5-3 is empty"),
])
def test_seeds_outside_what_a_cell_can_derive_streams_from(tmp_path, capsys, seeds, message):
    assert run(tmp_path, seeds) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line


@contextlib.contextmanager
def memory_headroom(extra: int = 1 << 30):
    """At most ``extra`` more bytes of address space (so a regression expanding 10^8 seeds fails
    with MemoryError in a second instead of eating the machine)."""
    try:
        import resource

        vm = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    except (ImportError, OSError, AttributeError):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm * 1024 + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_huge_seed_range_is_refused_before_it_is_expanded(tmp_path, capsys):
    start = time.monotonic()
    with memory_headroom():
        code = run(tmp_path, "0-100000000")
    assert time.monotonic() - start < 2
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "100000001" in line and "limit of 100000" in line and "split the sweep" in line


def test_plan_over_the_limit_is_refused_before_it_is_built(tmp_path, capsys, monkeypatch):
    def no(*a, **k):
        raise AssertionError("the plan was built")

    monkeypatch.setattr(sweep, "expand", no)
    monkeypatch.setattr(sweep, "run", no)
    start = time.monotonic()
    code = main(["run", "--tasks", "toy_binary", "--estimators", "rloo,reinforce",
                 "--seeds", "0-50000", "--out", str(tmp_path)])
    assert time.monotonic() - start < 2
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert spec.MAX_CELLS == 100_000
    assert "100002 cells" in line and "limit of 100000" in line


# ----------------------------------------------------------------------------- 5, 6. parallel configs

def test_parallel_config_not_utf8_names_the_file(tmp_path, capsys):
    bad = tmp_path / "par.yml"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        executors.load_config(bad)
    assert run(tmp_path / "r", "0", "--quiet", "--parallel-config", str(bad)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "UTF-8" in line


@pytest.mark.parametrize("text, key", [
    ("dask_n_workers: two", "dask_n_workers"),
    ("dask_n_workers: 0", "dask_n_workers"),
    ("dask_threads_per_worker: 1.5", "dask_threads_per_worker"),
    ("dask_processes: maybe", "dask_processes"),
    ("dask_address: 8786", "dask_address"),
    ("dask_dashboard_address: 8787", "dask_dashboard_address"),
    ("dask_memory_limit: [4GB]", "dask_memory_limit"),
    ("poll_interval: fast", "poll_interval"),
    ("poll_interval: -1", "poll_interval"),
    ("poll_interval: 0", "poll_interval"),
])
def test_dask_and_poll_keys_of_the_wrong_type_name_file_and_key(tmp_path, capsys, text, key):
    path = tmp_path / "par.yml"
    path.write_text(f"backend: dask\n{text}\n")
    with pytest.raises(ConfigError, match=key) as info:
        executors.load_config(path)
    assert str(path) in str(info.value)
    assert run(tmp_path / "r", "0", "--quiet", "--parallel-config", str(path)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(path) in line and key in line


def test_poll_interval_of_submitit_is_checked_too(tmp_path):
    path = tmp_path / "par.yml"
    path.write_text("backend: submitit\ncluster: local\npoll_interval: soon\n")
    with pytest.raises(ConfigError, match="poll_interval must be a positive number"):
        executors.load_config(path)


def test_dask_keys_of_the_right_type_pass(tmp_path):
    path = tmp_path / "par.yml"
    path.write_text("backend: dask\ndask_n_workers: 2\ndask_threads_per_worker: 1\n"
                    "dask_processes: false\ndask_dashboard_address: null\ndask_memory_limit: 2GB\n"
                    "dask_silence_logs: 40\npoll_interval: 0.5\n")
    ex = executors.make_executor(config=executors.load_config(path))
    kw = ex.client_kwargs(False)
    assert kw["n_workers"] == 2 and kw["processes"] is False and kw["silence_logs"] == 40


def test_client_rejecting_its_options_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    distributed = pytest.importorskip("dask.distributed")

    def client(**kw):
        raise TypeError("__init__() got an unexpected keyword argument 'bogus'")

    monkeypatch.setattr(distributed, "Client", client)
    path = tmp_path / "par.yml"
    path.write_text("backend: dask\ndask_bogus: 1\n")
    out = tmp_path / "r"
    assert run(out, "0", "--quiet", "--parallel-config", str(path)) == 2  # raised mid-sweep
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("estbench: error: parallel config") and "bogus" in line
    assert cell_files(out) == []


# ----------------------------------------------------------------------------- 7. disk full

def test_disk_full_mid_sweep_is_one_line_and_keeps_finished_cells(tmp_path, capsys, monkeypatch):
    real = pq.write_table
    calls = []

    def write_table(table, where, *a, **k):
        calls.append(where)
        if len(calls) > 1:  # the first cell is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, *a, **k)

    monkeypatch.setattr(pq, "write_table", write_table)
    out = tmp_path / "run"
    code = run(out, "0,1", "--quiet")
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"estbench: error: cannot write results to {out}: No space left on device")
    files = cell_files(out)
    assert len(files) == 1 and store.cell_damage(files[0], files[0].stem) is None  # kept, valid
    assert pq.read_table(files[0]).num_rows > 0
    assert [p.name for p in out.rglob("*.tmp")] == []  # no temp file left behind
    monkeypatch.setattr(pq, "write_table", real)  # room again: the rerun finishes the sweep
    assert run(out, "0,1") == 0
    err = capsys.readouterr().err
    assert "1 of 2 cells already stored" in err and err.count(" ... ok") == 1


# ----------------------------------------------------------------------------- 8. read-only --out

@pytest.fixture
def finished(tmp_path):
    """A results folder whose two cells are stored, and its files' bytes."""
    out = tmp_path / "run"
    assert run(out, "0,1", "--quiet") == 0
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    return out, snapshot


def _read_only_probe(monkeypatch):
    monkeypatch.setattr(store, "writable", lambda run_dir: False)


def _read_only_writes(monkeypatch):
    def refuse(path, write):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store, "atomic_write", refuse)


@pytest.mark.parametrize("make_read_only", [_read_only_probe, _read_only_writes])
@pytest.mark.slow
def test_read_only_out_with_every_cell_stored_shows_the_table(finished, capsys, monkeypatch,
                                                              make_read_only):
    out, snapshot = finished
    capsys.readouterr()
    make_read_only(monkeypatch)
    assert run(out, "0,1") == 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "rloo" in cap.out and "== toy_binary [cpu] ==" in cap.out
    assert "2 of 2 cells already stored" in cap.err
    notes = [l for l in cap.err.splitlines() if l.startswith("note:")]
    assert notes == [f"note: {out} is read-only: meta.json and results.parquet not updated"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot  # nothing written


@pytest.mark.parametrize("make_read_only", [_read_only_probe, _read_only_writes])
@pytest.mark.slow
def test_read_only_out_with_cells_to_compute_is_refused_up_front(finished, capsys, monkeypatch,
                                                                 make_read_only):
    out, snapshot = finished
    capsys.readouterr()
    make_read_only(monkeypatch)
    ran = []
    monkeypatch.setattr(executors, "run_cell", lambda cell, report=None: ran.append(cell))
    assert run(out, "0,1,2", "--quiet") == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("estbench: error: ") and str(out) in line
    assert "read-only" in line.lower()
    assert ran == []  # nothing was run
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_writable_probe(tmp_path, monkeypatch):
    assert store.writable(tmp_path)
    assert not store.writable(tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store.tempfile, "mkstemp", refuse)
    assert not store.writable(tmp_path)


# ----------------------------------------------------------------------------- 9. GPU slot names

MIG = "MIG-GPU-5c9a2f1e-1234-5678-9abc-def012345678/1/0"
MIG_NEW = "MIG-5c9a2f1e-1234-5678-9abc-def012345678"


def test_gpu_index_takes_names_and_odd_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{MIG}, {MIG_NEW}")
    assert executors._gpu_index("cuda") == MIG
    assert executors._gpu_index("cuda:1") == MIG_NEW
    assert executors._gpu_index("cuda:5") == "5"  # past the visible list: the index itself
    assert executors._gpu_index("cuda:-1") == "-1"  # not the last visible GPU
    assert executors._gpu_index(f"cuda:{MIG_NEW}") == MIG_NEW  # a name, as given
    assert executors._gpu_index("cuda:abc") == "abc"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert executors._gpu_index("cuda:1") == "1" and executors._gpu_index("cuda:0") == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert executors._gpu_index("cuda:2") == "2"


@pytest.mark.parametrize("visible, device", [(MIG, "cuda:0"), (MIG_NEW, "cuda"),
                                             ("", f"cuda:{MIG}"), ("0", "cuda:not an index/..")])
def test_gpu_slot_lock_files_have_safe_names(tmp_path, monkeypatch, visible, device):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with executors.gpu_slot(device, 2, lock_dir=str(tmp_path)) as held:
        assert held is not None and held.parent == tmp_path and held.exists()
        assert re.fullmatch(r"estbench-gpu[A-Za-z0-9_.-]+-slot0\.lock", held.name), held.name
        with executors.gpu_slot(device, 2, lock_dir=str(tmp_path)) as second:
            assert second.name.endswith("-slot1.lock")  # the same GPU: the other slot
    assert sorted(p.name for p in tmp_path.rglob("*")) == [held.name, second.name]  # nothing nested
