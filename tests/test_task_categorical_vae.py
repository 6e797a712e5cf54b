"""The categorical_vae task and the poly_toy: data, model contract, reference gradients, training."""
from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

import tasks
from estbench.core.budget import Budget
from estbench.engine.problems import Z_TOL
from estbench.engine.train import Cell, run_cell
from tasks.data import mnist

TINY = dict(val_size=100, eval_samples=2, iwae_samples=10, measure_size=4, batch_size=16)


def _task(seed=0, **kw):
    t = tasks.get("categorical_vae", **{**TINY, **kw})
    t.setup("cpu", torch.Generator().manual_seed(seed))
    return t


def test_sizes_are_c_by_l_and_the_architecture_is_the_reinmax_codes():
    t = _task(size="4x24")
    assert (t.classes, t.latents) == (4, 24)
    sizes = [m.weight.shape for m in t.encoder if isinstance(m, torch.nn.Linear)]
    assert sizes == [(512, 784), (256, 512), (96, 256)]
    sizes = [m.weight.shape for m in t.decoder if isinstance(m, torch.nn.Linear)]
    assert sizes == [(256, 96), (512, 256), (784, 512)]
    # PyTorch's default initialisation: |w| <= 1/sqrt(fan_in), drawn from the task's generator
    first = t.encoder[0].weight.detach()
    assert float(first.abs().max()) <= 1 / math.sqrt(784) and float(first.std()) > 0.01
    assert torch.equal(first, _task(size="4x24").encoder[0].weight.detach())
    with pytest.raises(ValueError, match="one of"):
        tasks.get("categorical_vae", size="3x3")


@pytest.mark.parametrize("binarize", ["dynamic", "threshold", "none"])
@pytest.mark.slow
def test_binarisations(binarize):
    t = _task(binarize=binarize)
    full = mnist.load("train")[0].reshape(-1, 784)
    p = full[50000:].float() / 255
    batch = next(t.train_batches(torch.Generator().manual_seed(3)))
    assert batch.shape == (16, 784)
    if binarize == "none":
        torch.testing.assert_close(t._val, p)
    else:
        assert set(t._val.unique().tolist()) <= {0.0, 1.0}
        assert set(batch.unique().tolist()) <= {0.0, 1.0}
    if binarize == "threshold":
        assert torch.equal(t._val, (p > 0.5).float())
    if binarize == "dynamic":
        assert abs(float(t._val.mean()) - float(p.mean())) < 2e-3
        assert not torch.equal(t._val, (p > 0.5).float())


def test_problem_contract_and_exact_kl():
    t = _task()
    x = t.measure_batch()
    prob = t.problem(x)
    assert prob.dist.batch_shape == (4,) and prob.dist.event_shape == (4, 8)
    a = t.encode(x)
    uniform = D.OneHotCategorical(logits=torch.zeros_like(a))
    kl = D.kl_divergence(D.OneHotCategorical(logits=a), uniform).sum(-1)
    torch.testing.assert_close(prob.analytic, -kl.sum(), rtol=1e-5, atol=1e-4)
    z = prob.dist.sample((3, 2))
    fz = prob.f(z)
    assert fz.shape == (3, 2, 4)
    ref = D.Independent(D.Bernoulli(logits=t.decoder(z.flatten(-2))), 1).log_prob(x.expand(3, 2, 4, 784))
    torch.testing.assert_close(fz, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_exact_and_sampled_references_agree_within_their_standard_errors():
    t = _task(ref_chunks=32, ref_chunk_samples=256)
    x = t.measure_batch()
    exact = t.reference_gradient(x)
    assert exact.exact and exact.stderr is None
    t.config["reference"] = "sampled"
    torch.manual_seed(0)
    sampled = t.reference_gradient(x)
    assert not sampled.exact and sampled.n_samples == 32 * 256
    z = (sampled.grad - exact.grad) / sampled.stderr.clamp_min(1e-8)
    # per-coordinate z-scores of a correct sampled reference: about N(0, 1)
    assert float(z.abs().mean()) < 1.0 and float((z.abs() > 5).float().mean()) < 1e-3
    cos = torch.nn.functional.cosine_similarity(sampled.grad, exact.grad, dim=0)
    assert float(cos) > 0.9


@pytest.mark.slow
def test_iwae_bound_is_at_least_the_elbo_and_training_improves_it():
    res = run_cell(Cell("categorical_vae[batch_size=32,val_size=200,iwae_samples=20]", "rloo", 0,
                        "cpu", Budget(steps=60, n_samples=4, checkpoints=2, measure_samples=8,
                                      eval_points=2, evaluation="subset")))
    assert res.status == "ok", res.error
    rec = {(r["metric"], r["step"]): r["value"] for r in res.records}
    assert rec[("elbo", 60)] > rec[("elbo", 0)] + 20  # from ~-540 nats at the uniform init
    assert rec[("test_iwae20", 60)] >= rec[("final_elbo", 60)] - 0.5


def test_poly_toy_expectation_and_gradient_are_exact():
    t = tasks.get("poly_toy", latents=16, p=3.0)
    t.setup("cpu", torch.Generator().manual_seed(0))
    logits = t.params["logits"]
    assert logits.shape == (16, 2) and float(logits.detach().abs().max()) <= 0.01
    torch.manual_seed(0)
    z = t.dist().sample((200_000,))
    fz = t.f(z)
    assert fz.shape == (200_000,)
    se = float(fz.std()) / math.sqrt(len(fz))
    assert abs(float(fz.mean()) - float(t.expected().detach())) < Z_TOL * se
    # the exact gradient: d/dtheta E[f] against a score-function estimate with many samples
    ref = t.reference_gradient(None).grad
    logq = t.dist().log_prob(z)
    (g,) = torch.autograd.grad((logq * (fz - fz.mean()).detach()).mean(), logits)
    assert float(torch.nn.functional.cosine_similarity(g.reshape(-1), ref, dim=0)) > 0.95


def test_poly_toy_closed_form_equals_enumeration():
    import estimators

    t = tasks.get("poly_toy", latents=8, p=1.5)
    t.setup("cpu", torch.Generator().manual_seed(1))
    prob = t.problem(None)
    e = estimators.get("exact").estimate(prob.dist, prob.f, 1)
    g = tasks.flat_grad(e.surrogate, t.estimated_parameters())
    torch.testing.assert_close(g, t.reference_gradient(None).grad, rtol=1e-4, atol=1e-7)
    assert t.evaluate() == pytest.approx(float(e.value), rel=1e-6)
