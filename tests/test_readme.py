"""The README's example estimator works verbatim: it registers, and passes the unbiasedness check."""
from __future__ import annotations

import re
from pathlib import Path

import torch

import estimators

from estbench.problems import estimates, problem, z_scores

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_estimator_works_verbatim():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if "class " in b and "Estimator" in b)
    namespace: dict = {}
    try:
        exec(compile(example, "README.md", "exec"), namespace)
        name = "half_mean_baseline"
        assert name in estimators.available()
        est = estimators.get(name, weight="0.5")
        torch.manual_seed(0)
        for fam in ["bernoulli", "categorical", "gaussian"]:
            G, e = estimates(est, problem(fam, offset=10.0), 4000, 4)
            z, _ = z_scores(G, problem(fam, offset=10.0).exact)
            assert z.abs().max() < 4.5
    finally:
        estimators.unregister("half_mean_baseline")


def test_readme_names_exactly_two_setup_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    setup = text.split("## Set up and run", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [l.split("#")[0].strip() for l in setup.strip().splitlines()]
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci
