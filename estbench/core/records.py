"""The shape of a result record, defined once: every layer that writes, reads or groups records
names its columns from here.

A record is one measured value of one cell: ``RECORD_IDENTITY`` (which cell) plus ``step``,
``metric`` and ``value``.  A *cell* is one training run, (task, estimator, seed, device, budget);
its records carry the budget's ``n_samples`` and ``steps`` so that one folder can hold a task under
several budgets.
"""
from __future__ import annotations

import dataclasses

from estbench.core.budget import Budget

#: the columns of a record that identify its cell (those a cell's status row shares with it)
RECORD_IDENTITY = ["task", "estimator", "seed", "device", "n_samples", "steps"]
#: every column of a record, in the order they are stored
RECORD_COLUMNS = [*RECORD_IDENTITY, "step", "metric", "value"]
#: one cell of a setting: a record's identity less its budget (where a folder holds a task under
#: several budgets, the task's label names the budget: analysis.tables.label_settings)
CELL_KEYS = [c for c in RECORD_IDENTITY if c not in {f.name for f in dataclasses.fields(Budget)}]
#: what the seeds of a setting are averaged over: a cell's keys less its seed
SETTING_KEYS = [c for c in CELL_KEYS if c != "seed"]
#: the budget columns of a record's identity
RECORD_BUDGET = [c for c in RECORD_IDENTITY if c not in CELL_KEYS]
