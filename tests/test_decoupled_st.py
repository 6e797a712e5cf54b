"""decoupled_st (estimators/decoupled_st.py) against its definition (Shah et al. 2024) and against
st_gumbel, the estimator it generalises."""
from __future__ import annotations

import pytest
import torch
from torch import distributions as D

import estimators
from estbench.core.budget import EvaluationCounter
from estbench.engine.problems import Z_TOL, estimates, problem, z_scores
from estimators.decoupled_st import decoupled_st, gumbel_noise

FAMILIES = ["bernoulli", "categorical"]


def _dist(family, logits):
    base = D.Bernoulli(logits=logits) if family == "bernoulli" else D.OneHotCategorical(logits=logits)
    return D.Independent(base, 1)


def _logits(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (4, 6) if family == "bernoulli" else (4, 3, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _run(est, family, logits, n, seed, w):
    """(what f saw, gradient of the surrogate) for the probe f(z) = sum w.z + sum (w.z)^2."""
    p = logits.clone().requires_grad_()
    seen = []

    def f(z):
        seen.append(z.detach().clone())
        lin = (z * w).flatten(-2).sum(-1) if family == "categorical" else (z * w).sum(-1)
        return lin + lin ** 2

    torch.manual_seed(seed)
    e = est.estimate(_dist(family, p), f, n)
    (g,) = torch.autograd.grad(e.surrogate, p)
    return seen[0], g, e


@pytest.mark.parametrize("family", FAMILIES)
def test_equal_temperatures_of_one_are_st_gumbel_sample_by_sample(family):
    """tau_f = tau_b = 1: the same noise gives st_gumbel's forward values exactly and its gradient."""
    logits = _logits(family)
    w = torch.randn(logits.shape, dtype=torch.float64)
    ours = estimators.get("decoupled_st", forward_temperature=1.0, backward_temperature=1.0)
    theirs = estimators.get("st_gumbel", temperature=1.0)
    z1, g1, e1 = _run(ours, family, logits, 16, 3, w)
    z2, g2, e2 = _run(theirs, family, logits, 16, 3, w)
    assert torch.equal(z1, z2)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e1.value, e2.value, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_equal_temperatures_away_from_one_are_not_st_gumbel(family):
    """The paper's Gumbel-softmax puts tau on the logits only, softmax(l/tau + g); st_gumbel's is
    softmax((l + g)/tau).  They agree at tau = 1 only: at tau = 2 the forward samples differ."""
    logits = _logits(family) * 2
    w = torch.randn(logits.shape, dtype=torch.float64)
    z1, _, _ = _run(estimators.get("decoupled_st", forward_temperature=2.0, backward_temperature=2.0),
                    family, logits, 64, 4, w)
    z2, _, _ = _run(estimators.get("st_gumbel", temperature=2.0), family, logits, 64, 4, w)
    assert not torch.equal(z1, z2)


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_temperature_changes_only_the_gradient(family):
    logits = _logits(family, 1)
    w = torch.randn(logits.shape, dtype=torch.float64)
    runs = [_run(estimators.get("decoupled_st", forward_temperature=0.7, backward_temperature=tb),
                 family, logits, 8, 5, w) for tb in (0.5, 1.0, 2.0)]
    for z, g, e in runs[1:]:
        assert torch.equal(z, runs[0][0])
        torch.testing.assert_close(e.value, runs[0][2].value, rtol=0, atol=0)
        assert not torch.allclose(g, runs[0][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_temperature_changes_only_the_sample(family):
    """With a linear probe the gradient depends on the backward relaxation only, which tau_f does not
    touch; the forward values do change."""
    logits = _logits(family, 2) * 2
    w = torch.randn(logits.shape, dtype=torch.float64)
    p = logits.clone().requires_grad_()
    out = []
    for tf in (0.5, 1.0, 3.0):
        torch.manual_seed(6)
        noise = gumbel_noise(logits, 64, family)
        z = decoupled_st(p, noise, tf, 1.3, family)
        (g,) = torch.autograd.grad((z * w).sum(), p)
        out.append((z.detach(), g))
    for z, g in out[1:]:
        assert not torch.equal(z, out[0][0])
        torch.testing.assert_close(g, out[0][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_is_that_of_the_tempered_relaxation(family):
    """d z / d l = J(s) / tau_b at s = softmax(l/tau_b + g) (sigmoid'(.) / tau_b for a Bernoulli)."""
    logits = _logits(family, 3)
    p = logits.clone().requires_grad_()
    w = torch.randn((5, *logits.shape), dtype=torch.float64)
    torch.manual_seed(7)
    noise = gumbel_noise(logits, 5, family)
    tb = 0.6
    z = decoupled_st(p, noise, 1.6, tb, family)
    (g,) = torch.autograd.grad((z * w).sum(), p)
    if family == "bernoulli":
        s = torch.sigmoid(logits / tb + noise)
        expected = (w * s * (1 - s) / tb).sum(0)
    else:
        s = torch.softmax(logits / tb + noise, -1)
        expected = ((s * w - s * (s * w).sum(-1, keepdim=True)) / tb).sum(0)
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tf", [0.5, 2.0])
def test_forward_sample_follows_the_tempered_distribution(family, tf):
    """H(l/tau_f + g) is an exact sample of softmax(l/tau_f) (sigmoid(l/tau_f) for a Bernoulli), not
    of q: the forward temperature acts on the hard sample."""
    logits = _logits(family, 4)
    m = 20000
    torch.manual_seed(8)
    z = decoupled_st(logits, gumbel_noise(logits, m, family), tf, 1.0, family)
    freq = z.mean(0)
    if family == "bernoulli":
        target, q = torch.sigmoid(logits / tf), torch.sigmoid(logits)
    else:
        target, q = torch.softmax(logits / tf, -1), torch.softmax(logits, -1)
    se = (target * (1 - target) / m).sqrt().clamp_min(1e-12)
    assert ((freq - target).abs() / se).max() < Z_TOL
    assert ((freq - q).abs() / se).max() > 10


@pytest.mark.parametrize("family", FAMILIES)
def test_one_evaluation_per_sample_at_discrete_points(family):
    prob = problem(family)
    leaves, dist = prob.replicate(3)
    counter, calls = EvaluationCounter(), []

    def f(z):
        calls.append(z.detach())
        return prob.f(z)

    e = estimators.get("decoupled_st").estimate(dist, counter.wrap(f, dist), 6)
    assert counter.count == e.n_evals == 6 and len(calls) == 1
    assert bool(((calls[0] == 0) | (calls[0] == 1)).all())
    if family == "categorical":
        assert bool((calls[0].sum(-1) == 1).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_are_biased_and_temperatures_must_be_positive(family):
    est = estimators.get("decoupled_st")
    assert est.config == {"forward_temperature": 1.6, "backward_temperature": 1.3}
    assert not est.unbiased
    torch.manual_seed(99)
    prob = problem(family)
    G, _ = estimates(est, prob, 2000)
    z, _ = z_scores(G, prob.exact)
    assert z.abs().max().item() > 9
    for opt in ("forward_temperature", "backward_temperature"):
        with pytest.raises(ValueError, match="must be > 0"):
            estimators.get("decoupled_st", **{opt: 0.0})
