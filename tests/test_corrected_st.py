"""ReinMax and GST (estimators/corrected_st.py) against their definitions and, for ReinMax, against
the authors' own package (``pip install reinmax``; skipped cleanly without it)."""
from __future__ import annotations

import pytest
import torch
from torch import distributions as D

import estimators
from estimators.corrected_st import adaptive_gap, gapped_logits, gst, reinmax


def _softmax_vjp(p, w):
    """J(p)^T w for the softmax Jacobian J(p) = diag(p) - p p^T."""
    return p * w - p * (p * w).sum(-1, keepdim=True)


@pytest.mark.parametrize("tau", [1.0, 1.3, 2.0])
def test_reinmax_matches_the_authors_package_sample_by_sample(tau):
    package = pytest.importorskip("reinmax")
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, 8, dtype=torch.float64)
    for _ in range(5):
        y, _ = package.reinmax(logits, tau)  # its own sample, its own backward
        (g_theirs,) = torch.autograd.grad((y * w).sum(), logits)
        z = reinmax(logits, y.detach()[None], tau)[0]
        (g_ours,) = torch.autograd.grad((z * w).sum(), logits)
        assert torch.equal(z.detach(), y.detach())
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


def test_reinmax_gradient_is_heuns_combination_of_softmax_jacobians():
    """2 J(pi_1)^T w - J(pi_0)^T w / 2 with pi_1 = (D + softmax(theta / tau)) / 2 (Algorithm 2)."""
    torch.manual_seed(1)
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    sample = D.OneHotCategorical(logits=logits.detach()).sample((3,))
    w = torch.randn(3, 4, 6, dtype=torch.float64)
    (g,) = torch.autograd.grad((reinmax(logits, sample, 1.5) * w).sum(), logits)
    pi0 = torch.softmax(logits.detach(), -1)
    pi1 = (sample + torch.softmax(logits.detach() / 1.5, -1)) / 2
    expected = (2 * _softmax_vjp(pi1, w) - _softmax_vjp(pi0, w) / 2).sum(0)
    torch.testing.assert_close(g, expected)


def test_gapped_logits_agree_with_the_sample_and_keep_the_gap():
    torch.manual_seed(2)
    logits = torch.randn(200, 7, dtype=torch.float64) * 3
    sample = D.OneHotCategorical(logits=logits).sample()
    moved = gapped_logits(logits, sample, 1.0)
    top = moved.max(-1).values
    assert torch.equal(moved.argmax(-1), sample.argmax(-1))
    assert torch.allclose(top, logits.max(-1).values)  # the sample is moved up to the old top
    others = moved.masked_fill(sample.bool(), float("-inf")).max(-1).values
    assert (top - others >= 1.0 - 1e-12).all()
    # a class already more than the gap below the top is left where it was
    far = (logits <= logits.max(-1, keepdim=True).values - 1.0) & ~sample.bool()
    assert torch.equal(moved[far], logits[far])


def test_gst_gradient_is_the_softmax_jacobian_at_the_gapped_logits():
    torch.manual_seed(3)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    sample = D.OneHotCategorical(logits=logits.detach()).sample((2,))
    w = torch.randn(2, 5, 4, dtype=torch.float64)
    tau = 0.7
    z = gst(logits, sample, tau, 1.0)
    assert torch.equal(z.detach(), sample)
    (g,) = torch.autograd.grad((z * w).sum(), logits)
    s = torch.softmax(gapped_logits(logits.detach(), sample, 1.0) / tau, -1)
    torch.testing.assert_close(g, (_softmax_vjp(s, w) / tau).sum(0))


def test_gst_p_gap_is_minus_log_one_minus_p_over_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    sample = torch.tensor([[[0.0, 1.0, 0.0]]], dtype=torch.float64)
    gap = adaptive_gap(logits, sample)
    assert gap.shape == (1, 1, 1)
    assert gap.item() == pytest.approx(-torch.log1p(torch.tensor(-0.3)).item() / 0.3)


@pytest.mark.parametrize("name,options", [("reinmax", {"temperature": 1.3}),
                                          ("gst", {}), ("gst", {"adaptive": True})])
def test_bernoulli_is_the_two_class_categorical(name, options):
    """On a Bernoulli the estimators give the gradient they give on the categorical with logits
    (0, l) and the same draws: one function serves both families."""
    est = estimators.get(name, **options)
    torch.manual_seed(4)
    l = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    bern = D.Independent(D.Bernoulli(logits=l), 1)
    a = torch.randn(5, dtype=torch.float64)

    def f_bern(z):
        return (torch.sin(z * 2.0) * a).sum(-1)

    def f_cat(y):
        return f_bern(y[..., 1])

    torch.manual_seed(5)
    (g_bern,) = torch.autograd.grad(est.estimate(bern, f_bern, 4).surrogate, l)
    l2 = torch.stack([torch.zeros_like(l), l], -1)
    cat = D.Independent(D.OneHotCategorical(logits=l2), 1)
    torch.manual_seed(5)
    z = bern.sample((4,))  # the same draws, as one-hot
    sample = torch.stack([1 - z, z], -1)
    if name == "reinmax":
        y = reinmax(cat.base_dist.logits, sample, 1.3)
    else:
        gap = adaptive_gap(cat.base_dist.logits, sample) if options else 1.0
        y = gst(cat.base_dist.logits, sample, 1.0, gap)
    (g_cat,) = torch.autograd.grad(f_cat(y).mean(0).sum(), l)
    torch.testing.assert_close(g_bern, g_cat)
