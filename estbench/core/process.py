"""How a process that runs cells is set up before torch allocates: large CPU buffers on
transparent huge pages.

Invariant: every process that runs cells -- the ``estbench`` command's own, and the workers it
starts on any backend -- has torch's ``THP_MEM_ALLOC_ENABLE`` set (to ``1`` unless the user set it
first) before torch's first CPU allocation.  torch then places every CPU buffer of 2 MB or more on
2 MB-aligned memory advised for transparent huge pages (``c10/core/alloc_cpu.cpp``), so that a
fresh buffer costs one page fault per 2 MB instead of one per 4 kB.

Why: the cells' large temporaries (a sampled reference's (2048 x 8, 784) likelihood table, the
final bound's samples, a measurement's estimate matrices) are freed and allocated again at every
use, and glibc returns such blocks to the operating system at once: each use faults its pages in
again and the kernel zeroes them, which on the virtual machines this suite runs on costs as much as
the arithmetic.  ``benchmarks/huge_pages.py`` measures the effect, cell for cell, with and without.

Cost: none in results (the same arithmetic on the same values); memory rounded up to 2 MB per
large buffer.  torch reads the variable once, at its first CPU allocation, and only from the
environment: hence this module, which imports nothing of torch, and the executors, which hand the
variable to the worker processes they start (``worker_environment``).  A process that allocated
before ``prepare()`` ran keeps the allocator it had (a notebook that used torch first); its cells
record whether the variable was set (``huge_pages`` in a cell's ``env``).
"""
from __future__ import annotations

import os

#: torch's switch for transparent huge pages in its CPU allocator
HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def worker_environment() -> dict:
    """The variables a worker process gets at its start: the user's value, else ``1``."""
    return {HUGE_PAGES: os.environ.get(HUGE_PAGES, "1")}


def prepare() -> None:
    """Set this process's variables (and so its children's), keeping any the user set."""
    for name, value in worker_environment().items():
        os.environ.setdefault(name, value)


def huge_pages() -> bool:
    """Whether this process asked torch for huge pages (what a cell's record keeps)."""
    return os.environ.get(HUGE_PAGES, "0") not in ("", "0")
