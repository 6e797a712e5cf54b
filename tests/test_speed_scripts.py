"""benchmarks/stacked_seeds.py, measure_paths.py and huge_pages.py run, and what they compare is the
same computation (no timing is asserted: speed figures come from running the scripts alone)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import huge_pages  # noqa: E402
import measure_paths  # noqa: E402
import stacked_seeds  # noqa: E402


def test_stacked_seeds_step_is_each_seeds_step():
    """One stacked step of k models gives each model the gradient its own step would (RLOO at a
    fixed noise draw is not comparable across the two, so the deterministic ``exact`` gradient on
    the toy-sized binary_vae stands in: no sampling, so the gradients must agree)."""
    models = stacked_seeds._models("binary_vae[latents=4]", "exact", 2, torch.device("cpu"))
    stacked = stacked_seeds.Stacked(stacked_seeds._models("binary_vae[latents=4]", "exact", 2,
                                                          torch.device("cpu")), 1)
    x = torch.stack([next(b) for b in stacked.batches])
    g = stacked.grads({k: v.detach() for k, v in stacked.params.items()}, x)
    for i, (task, est, opt, _) in enumerate(models):
        prob = task.problem(x[i])
        e = est.estimate(prob.dist, prob.f, 1, prob.context)
        obj = -(e.surrogate + prob.analytic)
        obj.backward()
        own = {n: p.grad for n, p in stacked_seeds._Objective(task, est, 1).named_parameters()}
        for name, grad_i in own.items():
            # float32 sums over the batch in another order: rounding of the block's largest entry
            # (1.5e-5 at 1.7 on the encoder of one 2-core Xeon), not an absolute 1e-5
            scale = float(grad_i.abs().max())
            torch.testing.assert_close(g[name][i], grad_i, rtol=1e-4, atol=2e-5 * max(scale, 1.0))


def test_the_speed_scripts_run(capsys):
    assert stacked_seeds.main(["--tasks", "binary_vae", "--seeds", "2", "--steps", "1",
                               "--rounds", "1"]) == 0
    assert measure_paths.main(["--cases", "toy_binary:gumbel_softmax,toy_binary:spigot",
                               "--rounds", "1"]) == 0
    assert huge_pages.main(["--cells", "toy_binary=rloo", "--seeds", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "binary_vae" in out and "spigot" in out and "toy_binary=rloo" in out
