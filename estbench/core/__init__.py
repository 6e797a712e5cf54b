"""Layer 1, the core: plug-in machinery, errors, the spec grammar, the budget, metric declarations. Imports nothing of ours."""
