import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# The test problems are tiny: a second intra-op thread only adds synchronisation overhead, and on a
# loaded 2-core runner it makes small ops an order of magnitude slower.
torch.set_num_threads(1)


@pytest.fixture
def protocol_dir(tmp_path, monkeypatch):
    """A copy of the shipped protocol files (tasks/protocols) that a test may break; the protocols
    are read from it while the test runs."""
    from estbench.engine import protocols

    d = tmp_path / "protocols"
    shutil.copytree(protocols.protocol_dir(), d)
    monkeypatch.setattr(protocols, "protocol_dir", lambda: d)
    protocols.available.cache_clear()
    yield d
    protocols.available.cache_clear()


@pytest.fixture(autouse=True)
def no_shipped_snapshots(tmp_path_factory, monkeypatch):
    """estbench rank probes first at the shipped snapshot sets (results/snapshots): a test sees
    none unless it names its own (--snapshots DIR), so a rank test's cost and output do not
    depend on the committed sets and probe."""
    from estbench.analysis import rank

    missing = tmp_path_factory.getbasetemp() / "no-shipped-snapshots"
    monkeypatch.setattr(rank, "shipped_snapshots", lambda: missing)
    monkeypatch.setattr(rank, "shipped_probe", lambda: missing)
