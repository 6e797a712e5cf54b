"""benchmarks/step_flops.py runs, and its chain replays every matrix product of the step: the
shape-by-shape count of the recorded products equals torch's FLOP count of the step (no timing is
asserted: speed figures come from running the script alone)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import step_flops  # noqa: E402


def test_the_chain_holds_every_matrix_product_of_the_step(capsys):
    r = step_flops.measure("binary_vae", torch.device("cpu"), steps=1, rounds=1)
    assert r["products"] > 0 and r["flops"] > 0
    assert r["product_flops"] == r["flops"]
    assert r["step_s"] > 0 and r["chain_s"] > 0
    assert step_flops.main(["--tasks", "binary_vae", "--steps", "1", "--rounds", "1"]) == 0
    assert "binary_vae" in capsys.readouterr().out
