"""Kept for test modules that import ``problems``: the table lives in estbench.problems."""
from estbench.problems import *  # noqa: F401,F403
from estbench.problems import budget_for, estimates, problem, z_scores  # noqa: F401
