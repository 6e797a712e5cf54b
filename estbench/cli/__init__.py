"""Layer 6, the command line: ``estbench`` (``estbench.cli.commands.main``), the sweep-file reader
(``config``) and the report, compare and rank commands (``report``)."""

from estbench.core import process as _process

_process.prepare()  # before torch's first allocation: estbench.core.process
