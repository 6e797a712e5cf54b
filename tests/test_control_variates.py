"""REBAR and RELAX specifics beyond the generic suite: the conditional samples, the learned control
variate (its variance gradient, training, and isolation from measurement), and the budget unit.

Variances are compared with common random numbers: the same seed before and after training gives
paired per-replica squared errors, whose mean difference has a small, honest standard error.
"""
from __future__ import annotations

import copy

import pytest
import torch

import estimators
from estimators import control_variates as cv

from problems import Z_TOL, bernoulli_problem, categorical_problem, estimates

M_VAR = 3000


def squared_errors(est, prob, seed=7, M=M_VAR):
    """Per-replica ||g - exact||^2 of M estimates (budget 6 = 2 samples), on a deepcopy of est."""
    torch.manual_seed(seed)
    G, _ = estimates(copy.deepcopy(est), prob, M, 6)
    return ((G["logits"] - prob.exact["logits"]) ** 2).reshape(M, -1).sum(1)


def train(est, prob, steps, reps=32, seed=0):
    """The harness's loop on a fixed problem: estimate, ascend the surrogate, est.update().

    Each step sees ``reps`` copies of the problem as one batch (a minibatch of data points)."""
    torch.manual_seed(seed)
    for _ in range(steps):
        _, dist = prob.replicate(reps)
        e = est.estimate(dist, prob.f, 6)
        (-e.surrogate).backward()
        est.update()


def paired_decrease(before, after):
    """Mean decrease of the variance (E||g - exact||^2) and its standard error, paired by seed."""
    d = before - after
    return d.mean().item(), (d.std() / len(d) ** 0.5).item()


# ---- the conditional reparameterisation (what unbiasedness rests on) -------------------------

def test_bernoulli_conditional_sample_is_consistent_and_has_the_right_marginal():
    torch.manual_seed(0)
    theta = torch.tensor([-2.0, -0.3, 0.0, 1.5], dtype=torch.float64)
    N = 200_000
    z = cv.bernoulli_z(theta, cv._uniform((N, 4), theta))
    b = cv.hard(z, "bernoulli")
    zt = cv.bernoulli_z_given_b(theta, b, cv._uniform((N, 4), theta))
    assert torch.equal(cv.hard(zt, "bernoulli"), b)  # z~ lies on b's side of the threshold
    # marginally z~ must be logistic(theta) like z: compare CDFs at a few points, binomial s.e.
    for x in [-3.0, -1.0, 0.0, 0.5, 2.0]:
        emp = (zt <= x).to(theta.dtype).mean(0)
        exact = torch.sigmoid(x - theta)
        se = (exact * (1 - exact) / N).sqrt()
        assert ((emp - exact).abs() < Z_TOL * se).all(), (x, emp, exact)


def test_categorical_conditional_gumbel_is_consistent_and_has_the_right_marginal():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.tensor([0.5, -1.0, 0.0, 1.2], dtype=torch.float64), -1)
    N = 200_000
    z = cv.categorical_z(logp, cv._uniform((N, 4), logp))
    b = cv.hard(z, "categorical")
    zt = cv.categorical_z_given_b(logp, b, cv._uniform((N, 4), logp))
    assert torch.equal(cv.hard(zt, "categorical"), b)  # argmax z~ = b
    for x in [-1.0, 0.0, 1.0, 2.5]:
        emp = (zt <= x).to(logp.dtype).mean(0)
        exact = torch.exp(-torch.exp(-(x - logp)))  # Gumbel(log p_i) CDF
        se = (exact * (1 - exact) / N).sqrt()
        assert ((emp - exact).abs() < Z_TOL * se).all(), (x, emp, exact)


def test_rebar_beats_reinforce_at_equal_budget_on_bernoulli():
    """The conditional z~ is what makes the control variate work: with it REBAR (untrained, 2
    samples) beats REINFORCE with 6 samples; an unconditional z~ would stay unbiased but be ~4x worse."""
    prob = bernoulli_problem()
    rebar = squared_errors(estimators.get("rebar", learn=False), prob).mean().item()
    reinforce = squared_errors(estimators.get("reinforce"), prob).mean().item()
    assert rebar < 0.9 * reinforce, (rebar, reinforce)


# ---- the learned control variate ----------------------------------------------------------------

def test_variance_gradient_points_towards_the_optimal_eta():
    """With a large offset the variance is ~ a (eta - 1)^2: d/d eta < 0 below 1, > 0 above."""
    prob = bernoulli_problem(offset=10.0)
    signs = []
    for eta in (0.0, 2.0):
        est = estimators.get("rebar", eta=eta)
        torch.manual_seed(1)
        _, dist = prob.replicate(500)
        est.estimate(dist, prob.f, 6)
        signs.append(torch.sign(est.eta.grad).item())
        assert est.log_temperature.grad is not None
    assert signs == [-1.0, 1.0]


@pytest.mark.slow
def test_relax_variance_falls_as_its_control_variate_trains():
    prob = bernoulli_problem(offset=10.0)
    est = estimators.get("relax")
    before = squared_errors(est, prob)
    train(est, prob, 150)
    after = squared_errors(est, prob)
    dec, se = paired_decrease(before, after)
    assert dec > 4 * se, f"variance {before.mean():.4f} -> {after.mean():.4f} (decrease {dec:.4f} +- {se:.4f})"
    assert dec > 0.03 * before.mean().item()  # a real reduction, not a rounding effect


@pytest.mark.slow
def test_relax_learns_away_a_bad_initial_scale():
    """Started at eta = 0 (c = r_rho = 0: plain REINFORCE, offset 10 uncancelled) the variance collapses."""
    prob = bernoulli_problem(offset=10.0)
    est = estimators.get("relax", eta=0.0)
    before = squared_errors(est, prob, M=1000)
    train(est, prob, 100, reps=8)
    after = squared_errors(est, prob, M=1000)
    assert after.mean() < 0.1 * before.mean(), (before.mean().item(), after.mean().item())
    assert est.eta.item() > 0.1


@pytest.mark.slow
def test_rebar_learning_does_not_increase_variance():
    prob = categorical_problem(offset=5.0)
    est = estimators.get("rebar", learn=True)
    before = squared_errors(est, prob)
    train(est, prob, 100)
    after = squared_errors(est, prob)
    dec, se = paired_decrease(before, after)
    assert dec > -2 * se, f"variance rose: {before.mean():.4f} -> {after.mean():.4f}"


def test_update_changes_parameters_and_measurement_on_a_copy_does_not():
    prob = bernoulli_problem(dtype=torch.float32)
    est = estimators.get("relax")
    _, dist = prob.replicate(4)
    est.estimate(dist, prob.f, 6)  # materialises r_rho
    est.zero_grad_inner()
    snapshot = {k: v.detach().clone() for k, v in est.state_dict().items()}

    measured = copy.deepcopy(est)
    leaves, dist = prob.replicate(64)
    e = measured.estimate(dist, prob.f, 6)
    torch.autograd.grad(e.surrogate, leaves["logits"])
    for k, v in est.state_dict().items():
        assert torch.equal(v, snapshot[k]), f"measuring changed {k}"
    assert all(p.grad is None for p in est.parameters())

    _, dist = prob.replicate(4)
    e = est.estimate(dist, prob.f, 6)
    grads = {n: p.grad.clone() for n, p in est.named_parameters()}
    assert set(grads) == {"eta", "log_temperature", "r_z.weight", "r_z.bias", "r_out.weight", "r_out.bias"}
    (-e.surrogate).backward()  # the harness's backward must not add to the variance gradient
    for n, p in est.named_parameters():
        assert torch.equal(p.grad, grads[n]), f"surrogate.backward() changed {n}.grad"
    est.update()
    after = est.state_dict()
    for k in ["eta", "log_temperature", "r_out.weight", "r_out.bias"]:
        assert not torch.equal(after[k], snapshot[k]), f"update() left {k} unchanged"
    assert all(p.grad is None for p in est.parameters())


def test_rebar_without_learning_has_fixed_parameters():
    prob = bernoulli_problem(dtype=torch.float32)
    est = estimators.get("rebar", learn=False, temperature=0.3, eta=0.7)
    _, dist = prob.replicate(4)
    est.estimate(dist, prob.f, 6)
    est.update()
    assert est.eta.item() == pytest.approx(0.7) and est.temperature == pytest.approx(0.3)
    assert est.eta.grad is None


# ---- budget and options -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_budget_is_three_evaluations_per_sample(name):
    prob = bernoulli_problem(dtype=torch.float32)
    _, dist = prob.replicate(1)
    est = estimators.get(name)
    with pytest.raises(ValueError, match=f"'{name}' cannot spend a budget of 4 .*multiple of 3"):
        est.estimate(dist, prob.f, 4)
    with pytest.raises(ValueError, match=f"'{name}' cannot spend a budget of 1 .*at least 3"):
        est.estimate(dist, prob.f, 1)
    calls = []
    e = est.estimate(dist, lambda z: calls.append(z.shape[0]) or prob.f(z), 9)
    assert e.n_evals == 9 and calls == [9]  # one f call: b, sigma(z), sigma(z~) for 3 samples


def test_relax_uses_context_and_checks_its_shape():
    prob = bernoulli_problem(dtype=torch.float32)
    leaves, dist = prob.replicate(2)  # batch (2, 3)
    est = estimators.get("relax")
    e = est.estimate(dist, prob.f, 6, context=torch.randn(2, 3, 5))
    assert est.r_z.in_features == 1 and est.r_x.in_features == 5  # per coordinate + context
    torch.autograd.grad(e.surrogate, leaves["logits"])
    # the network is applied per coordinate, so the event size may change between calls (padding)
    wider = bernoulli_problem(dim=6, dtype=torch.float32)
    _, dist6 = wider.replicate(2)
    e6 = est.estimate(dist6, wider.f, 6, context=torch.randn(2, 3, 5))
    assert torch.isfinite(e6.surrogate)
    with pytest.raises(ValueError, match="does not start with the batch shape"):
        estimators.get("relax").estimate(dist, prob.f, 6, context=torch.randn(3, 2, 5))


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="temperature=0.0 must be > 0"):
        estimators.get("rebar", temperature=0.0)
    with pytest.raises(ValueError, match="hidden=0 must be an integer >= 1"):
        estimators.get("relax", hidden=0)
