"""Snapshot sets: a model's parameters saved at K points of one training trajectory, so that every
estimator can be measured at the *same* parameters (``estbench probe``, :mod:`estbench.engine.probe`).

A set is a folder::

    SET/manifest.json       what the set is: the task configuration, the driver (the estimator that
                            trained the trajectory) and why it was chosen, the seed, the training
                            budget, the steps saved, the storage dtype, the probe's budget (f-evals
                            per estimate, estimates per measurement), the code version and git commit
                            that made it, the measurement batch's digest, and per snapshot its file's
                            sha256 and its parameters' digest
    SET/step_<N>.pt         {"step": N, "parameters": [one tensor per ``task.parameters()``, in order]}

The trajectory is one training cell of the driver: the set-up, data order and random stream of
:mod:`estbench.engine.train` (its own building blocks, so ``estbench run`` gives the driver the very
same trajectory), without the measurements and evaluations, which run on their own streams and
leave the trajectory as it is.  The snapshot at step s holds the parameters after s updates: those
the driver's cell measures at its checkpoint s.

Parameters are stored in the manifest's dtype: float32 keeps them exactly; float16 halves the
size of the large models (text_vae's 2.8M parameters), and the snapshot *is* then the rounded
parameters, which every estimator sees alike.  The reference gradient is not stored: it is a
function of the parameters and the measurement batch, computed after loading (exact, or Monte Carlo
with its standard errors), by the probe.

Cost: building trains the driver for the set's last step (the steps of one cell, no measurements);
loading a snapshot is one file read and one copy into the model's parameters.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from estbench.core.budget import Budget
from estbench.core.errors import UsageError
from estbench.core.spec import parse
from estbench.engine import store
from estbench.engine.cell import Cell

#: the file that names a folder a snapshot set
MANIFEST = "manifest.json"
#: the storage dtypes a set may declare
DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: the manifest's fields (checked on load: a set is read by other machines and later versions)
_FIELDS = {"task", "driver", "driver_why", "seed", "device", "budget", "steps", "dtype", "probe",
           "code_version", "git_commit", "estbench", "torch", "created", "command",
           "measure_batch", "parameters", "snapshots"}
#: fields a manifest may leave out (older sets), with their default
_OPTIONAL = {"figures": {}}
_PROBE_FIELDS = {"n_samples", "measure_samples"}


class SnapshotError(UsageError):
    """A snapshot set that cannot be read or does not fit the code that reads it: one line."""


def digest(obj: Any) -> str:
    """A sha256 of tensors by content (dtype, shape and values, on any device), through lists,
    tuples and dicts: the measurement batch's and the parameters' fingerprint, which every probe of
    a set checks (the same parameters and batch for every estimator)."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"dict:")
            for k in sorted(x, key=str):
                h.update(f"{k!s}:".encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"seq{len(x)}:".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"{type(x).__name__}:{x!r}:".encode())

    walk(obj)
    return h.hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot_name(step: int) -> str:
    return f"step_{int(step):07d}.pt"


@dataclass(frozen=True)
class SnapshotSet:
    """A snapshot set read from its folder (:func:`load`): the manifest's fields as attributes."""

    path: Path
    manifest: dict

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def driver(self) -> str:
        return self.manifest["driver"]

    @property
    def seed(self) -> int:
        return int(self.manifest["seed"])

    @property
    def steps(self) -> list[int]:
        return [int(s) for s in self.manifest["steps"]]

    @property
    def budget(self) -> Budget:
        """The driver's training budget."""
        return Budget(**self.manifest["budget"])

    @property
    def n_samples(self) -> int:
        return int(self.manifest["probe"]["n_samples"])

    @property
    def measure_samples(self) -> int:
        return int(self.manifest["probe"]["measure_samples"])

    @property
    def figures(self) -> dict:
        """The figures a probe records beside the measurement at each snapshot, as their sources
        define them: {name: estimates} (:data:`estbench.engine.probe.FIGURES`)."""
        return dict(self.manifest.get("figures", {}))

    @property
    def hash(self) -> str:
        """A digest of the manifest (which holds every file's sha256): what a probe cell's key
        names, so a rebuilt set with other contents makes its probes new."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"{self.task} (driver {self.driver}, seed {self.seed}, steps " \
               f"{', '.join(map(str, self.steps))})"

    def make_task(self, device: torch.device):
        """The set's task, built and set up on ``device`` as the driver's cell built it (its
        parameters are then overwritten by :meth:`apply`)."""
        import tasks

        spec = parse(self.task)
        task = tasks.get(spec.name, **spec.options)
        task.evaluation = self.budget.evaluation
        task.setup(device, torch.Generator().manual_seed(self.seed))
        return task

    def parameters_at(self, step: int) -> list[torch.Tensor]:
        """The stored parameters of the snapshot at ``step`` (CPU, the stored dtype), the file's
        sha256 checked against the manifest's."""
        entry = self.manifest["snapshots"].get(str(int(step)))
        if entry is None:
            raise SnapshotError(f"snapshot set {self.path}: no snapshot at step {step} "
                                f"(it has {self.steps})")
        if entry["file"] is None:  # the start, not stored: the task's initialisation from the seed
            task = self.make_task(torch.device("cpu"))
            return [p.detach().to(DTYPES[self.manifest["dtype"]]).clone()
                    for p in task.parameters()]
        path = self.path / entry["file"]
        if not path.is_file():
            raise SnapshotError(f"snapshot set {self.path}: {entry['file']} is missing")
        if _file_sha(path) != entry["sha256"]:
            raise SnapshotError(f"snapshot set {self.path}: {entry['file']} does not match its "
                                "sha256 in the manifest (changed or damaged; rebuild the set)")
        data = torch.load(path, map_location="cpu", weights_only=True)
        return list(data["parameters"])

    def apply(self, task, step: int) -> str:
        """Copy the snapshot at ``step`` into ``task``'s parameters (on its device, in their dtype);
        returns the parameters' digest, checked against the manifest's."""
        stored = self.parameters_at(step)
        params = task.parameters()
        shapes = [list(p.shape) for p in params]
        if len(stored) != len(params) or [list(t.shape) for t in stored] != shapes:
            raise SnapshotError(f"snapshot set {self.path}: its parameters do not fit the task "
                                f"{self.task} as this code builds it (made by code "
                                f"{self.manifest['code_version']}); rebuild the set")
        with torch.no_grad():
            for p, t in zip(params, stored):
                p.copy_(t.to(device=p.device, dtype=p.dtype))
        d = digest(stored)
        if d != self.manifest["snapshots"][str(int(step))]["parameters"]:
            raise SnapshotError(f"snapshot set {self.path}: the parameters at step {step} do not "
                                "match their digest in the manifest")
        return d


def load(path) -> SnapshotSet:
    """The snapshot set in folder ``path``, its manifest checked (SnapshotError: one line)."""
    path = Path(path)
    f = path / MANIFEST
    if not f.is_file():
        raise SnapshotError(f"{path} is not a snapshot set (no {MANIFEST}); build one with "
                            "estbench snapshots")
    try:
        manifest = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{f}: cannot read it ({e})") from None
    if not isinstance(manifest, dict):
        raise SnapshotError(f"{f}: expected a JSON object")
    missing, unknown = _FIELDS - set(manifest), set(manifest) - _FIELDS - set(_OPTIONAL)
    if missing or unknown:
        raise SnapshotError(f"{f}: " + "; ".join(
            ([f"missing {sorted(missing)}"] if missing else [])
            + ([f"unknown {sorted(unknown)}"] if unknown else [])))
    if manifest["dtype"] not in DTYPES:
        raise SnapshotError(f"{f}: dtype must be one of {sorted(DTYPES)}, got {manifest['dtype']!r}")
    probe = manifest["probe"]
    if not isinstance(probe, dict) or set(probe) != _PROBE_FIELDS:
        raise SnapshotError(f"{f}: probe must hold exactly {sorted(_PROBE_FIELDS)}")
    steps = manifest["steps"]
    if not steps or sorted(set(steps)) != steps or set(map(str, steps)) != set(manifest["snapshots"]):
        raise SnapshotError(f"{f}: steps must be increasing and each have a snapshot entry")
    if any(e.get("file") is None for k, e in manifest["snapshots"].items() if k != "0"):
        raise SnapshotError(f"{f}: only the start (step 0) may be rebuilt instead of stored")
    figs = manifest.get("figures", {})
    if not isinstance(figs, dict) or not all(isinstance(v, int) and v >= 2 for v in figs.values()):
        raise SnapshotError(f"{f}: figures must map a figure's name to its number of estimates (>= 2)")
    try:
        Budget(**manifest["budget"])
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"{f}: budget: {e}") from None
    return SnapshotSet(path, manifest)


def find(paths) -> list[SnapshotSet]:
    """The snapshot sets named by ``paths``: each a set's folder, or a folder of sets (its
    subfolders that hold a manifest, sorted)."""
    out = []
    for p in map(Path, paths):
        if (p / MANIFEST).is_file():
            out.append(load(p))
        elif p.is_dir():
            found = sorted(d for d in p.iterdir() if (d / MANIFEST).is_file())
            if not found:
                raise SnapshotError(f"{p} holds no snapshot set (no {MANIFEST} in it or its subfolders)")
            out += [load(d) for d in found]
        else:
            raise SnapshotError(f"{p}: no such folder")
    return out


def evenly(last: int, k: int) -> list[int]:
    """``k`` snapshot steps from 0 to ``last``, evenly spaced (the start included)."""
    if k < 1:
        raise UsageError(f"a snapshot set needs at least one snapshot, got {k}")
    if k == 1:
        return [0]
    return sorted({round(i * last / (k - 1)) for i in range(k)})


def build(task: str, driver: str, seed: int, budget: Budget, steps: list[int], out,
          dtype: str = "float32", device: str = "cpu", probe: Optional[dict] = None,
          why: str = "", command: str = "", threads: int = 1, report=None,
          figures: Optional[dict] = None, store_start: bool = True) -> SnapshotSet:
    """Train ``driver`` on ``task`` (spec strings) from ``seed`` under ``budget`` and save the
    parameters after each of ``steps`` updates into the folder ``out`` (made or replaced
    atomically per file; the manifest written last).  ``probe``: the probe's budget,
    {n_samples, measure_samples} (default: ``budget``'s).  ``why``: why this driver, said in the
    manifest.  ``figures``: {name: estimates} of the figures a probe records beside the
    measurement (``estbench.engine.probe.FIGURES``).  ``store_start`` False: the snapshot at step
    0 is not stored but rebuilt on loading from the task's initialisation and the seed (its digest
    is kept, so a torch whose initialisation draws differently is caught): one snapshot less on
    disk for the large models.  Returns the set as :func:`load` reads it."""
    from estbench.engine import train

    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 0:
        raise UsageError(f"snapshot steps must be >= 0, got {steps}")
    if budget.timed:
        raise UsageError("a snapshot set's driver trains under a step budget, not a time budget")
    budget = dataclasses.replace(budget, steps=max(budget.steps, steps[-1]))
    out = Path(out)
    cell = Cell(task, driver, int(seed), device, budget).with_code()
    report = report or (lambda *a: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        run = train._set_up(cell, lambda *a: None, report)
        train._check_feasible(run)  # BudgetError: the driver cannot spend this budget here
        out.mkdir(parents=True, exist_ok=True)
        batch_digest = digest(run.task.measure_batch())
        entries = {}
        dev = run.device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [],
                                   device_type="cuda" if dev.type == "cuda" else "cpu"):
            # the training loop's random stream (train._train), measurements and evaluations left out
            torch.manual_seed(cell.seed)
            run.since_eval_obj = torch.zeros((), dtype=torch.float64, device=dev)
            watch = train.DivergenceWatch(dev, run.params)
            for target in steps:
                while run.step < target:
                    train._train_step(run, watch)
                    if run.step % train.DIVERGENCE_CHECK_EVERY == 0:
                        watch.check(run.step)
                    report(run.step, steps[-1], "training the driver")
                watch.check(run.step)
                stored = [p.detach().to("cpu", DTYPES[dtype]).clone() for p in run.params]
                if target == 0 and not store_start:
                    entries["0"] = {"file": None, "sha256": None, "parameters": digest(stored)}
                    continue
                name = snapshot_name(target)
                store.atomic_write(out / name, lambda tmp: torch.save(
                    {"step": target, "parameters": stored}, tmp))
                entries[str(target)] = {"file": name, "sha256": _file_sha(out / name),
                                        "parameters": digest(stored)}
    finally:
        torch.set_num_threads(previous)
    meta = store.run_metadata()
    manifest = {
        "task": task, "driver": driver, "driver_why": why, "seed": int(seed), "device": device,
        "budget": budget.as_dict(), "steps": steps, "dtype": dtype,
        "probe": {"n_samples": int((probe or {}).get("n_samples", budget.n_samples)),
                  "measure_samples": int((probe or {}).get("measure_samples",
                                                           budget.measure_samples))},
        "code_version": cell.code, "git_commit": meta["git_commit"], "estbench": meta["estbench"],
        "torch": meta["torch"], "created": meta["created"], "command": command,
        "measure_batch": batch_digest,
        "parameters": {"count": sum(p.numel() for p in run.params),
                       "shapes": [list(p.shape) for p in run.params]},
        "snapshots": entries,
    }
    if figures:
        manifest["figures"] = {str(k): int(v) for k, v in figures.items()}
    # files of an earlier set in this folder that this one does not have
    for old in out.glob("step_*.pt"):
        if old.name not in {e["file"] for e in entries.values() if e["file"]}:
            old.unlink()
    store.atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(
        json.dumps(manifest, indent=1) + "\n"))
    return load(out)


def rebuild(s: SnapshotSet, out, threads: int = 1) -> SnapshotSet:
    """The set ``s`` made again from its manifest into ``out``: the same driver, seed, budget,
    steps and dtype.  With the same code (the manifest's ``code_version``) its parameters' digests
    equal the original's (``same_parameters``)."""
    m = s.manifest
    return build(m["task"], m["driver"], m["seed"], s.budget, m["steps"], out, dtype=m["dtype"],
                 device=m["device"], probe=m["probe"], why=m["driver_why"], command=m["command"],
                 threads=threads, figures=s.figures,
                 store_start=s.manifest["snapshots"].get("0", {}).get("file", "") is not None)


def same_parameters(a: SnapshotSet, b: SnapshotSet) -> list[int]:
    """The steps at which two sets' parameters differ (by digest); [] when they are the same."""
    steps = sorted(set(a.steps) | set(b.steps))
    return [s for s in steps if a.manifest["snapshots"].get(str(s), {}).get("parameters")
            != b.manifest["snapshots"].get(str(s), {}).get("parameters")]


def size_bytes(s: SnapshotSet) -> int:
    """Bytes the set takes on disk (its manifest and snapshot files)."""
    return sum(os.path.getsize(s.path / e["file"]) for e in s.manifest["snapshots"].values()
               if e["file"] is not None) \
        + os.path.getsize(s.path / MANIFEST)
