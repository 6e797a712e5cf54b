"""estbench: a benchmark harness for gradient estimators of latent-variable models.

The harness knows estimators and tasks only through their registries (``estimators``, ``tasks``).

From Python (a notebook, a script)::

    import estbench
    records, cells = estbench.load("results/reference")   # tidy records, one status row per cell
    estbench.summary(records, cells)                       # one row per task x estimator (finished cells)
    records, cells = estbench.run(tasks="toy_binary", estimators="rloo,disarm", seeds=[0, 1],
                                  out="results/mine", steps=200)

The API lives in ``estbench.api`` and is imported on first use, so ``import estbench`` stays light
and a plug-in importing ``estbench.core`` never loads the engine above it.
"""
from estbench.core import __version__

__all__ = ["__version__", "load", "summary", "run"]


def __getattr__(name):
    if name in ("load", "summary", "run"):
        from estbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'estbench' has no attribute {name!r}")
