"""Layer 3, the engine: one cell (train, measure), the store, sweeps, executors, protocols, the estimator contract check."""
