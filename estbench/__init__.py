"""estbench: a benchmark harness for gradient estimators of latent-variable models.

The harness knows estimators and tasks only through their registries (``estimators``, ``tasks``).
"""
__version__ = "0.1.0"
