"""Every error the harness raises on purpose, in one place.

The command line turns :class:`UsageError` (and its subclasses) into one line on stderr and exit
status 2; everything else a cell raises is recorded with the cell, never raised out of a sweep.
"""
from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: one line on stderr, exit status 2."""


class SpecError(UsageError, ValueError):
    """A malformed ``name[key=value,...]`` string."""


class OptionError(UsageError, ValueError):
    """An option value of the wrong type or outside its declared constraint."""


class RegistryError(UsageError, ValueError):
    """An unknown plug-in name, or a name registered twice by different classes."""


class ConfigError(UsageError, ValueError):
    """A malformed or unknown parallel configuration (the message names the file)."""


class RankError(UsageError, ValueError):
    """A ``rank`` target that cannot be loaded or does not honour the contract."""


class WorkerError(RuntimeError):
    """Some cells did not finish because their worker or job died; the others are stored."""


class InfeasibleError(ValueError):
    """The estimator cannot run on this problem as configured -- a property of the pairing, not a
    bug (e.g. exact enumeration of 2^200 configurations).  The harness records such a cell as
    ``infeasible`` (*not run*), not as a failure."""


class BudgetError(InfeasibleError):
    """The budget of f-evaluations cannot be spent in this estimator's whole units (too small, or
    not a multiple)."""


class FamilyError(ValueError):
    """A distribution outside the families an estimator (or estbench) supports."""


class Diverged(Exception):
    """A non-finite surrogate, gradient or final figure: the cell is recorded as diverged."""


class OverBudgetError(RuntimeError):
    """An estimator spent more f-evaluations than the budget (counted by the harness): the cell is
    recorded as failed, with both numbers."""


class DeclarationError(RuntimeError):
    """What a plug-in declares is contradicted by what the harness observes (an estimator declared
    ``deterministic`` whose two estimates at the same parameters differ): the cell is recorded as
    failed, with the reason."""


class CellTimeout(BaseException):
    """A cell ran past its time limit.  A BaseException, so that a plug-in's ``except Exception``
    cannot swallow it."""


class ResultsWriteError(RuntimeError):
    """A run folder stopped taking writes mid-sweep (disk full, turned read-only): the finished
    cells are stored, the message says what was not written."""
