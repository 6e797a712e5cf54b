"""Layer 1, the core: plug-in machinery, errors, the spec grammar, the budget, the record schema and
the metric declarations.  Imports nothing of ours."""

__version__ = "0.1.0"
