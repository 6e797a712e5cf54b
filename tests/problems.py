"""Kept for test modules that import ``problems``: the table lives in estbench.engine.problems."""
from estbench.engine.problems import *  # noqa: F401,F403
from estbench.engine.problems import Z_TOL, budget_for, estimates, problem, z_scores  # noqa: F401
