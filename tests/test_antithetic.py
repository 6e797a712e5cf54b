"""Theory checks for the antithetic (ARM, DisARM) and multi-sample (VIMCO, MuProp) estimators.

* DisARM = E[ARM | b, b~] (Dong, Mnih & Tucker 2020, Sec. 3), so Var(DisARM) <= Var(ARM) exactly.
* A leave-one-out baseline removes f's offset: Var(RLOO) << Var(REINFORCE) when f = g + 50.
* VIMCO is unbiased for the gradient of the multi-sample bound E[log mean_k exp f(z_k)] (not of
  E[f]); that gradient and the bound itself are computed here by brute force over K-tuples.
* The pathwise part of every surrogate (parameters inside f) is unbiased.

Every statistical tolerance is 4.5 standard errors of a Monte Carlo mean; seeds are fixed.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import distributions as D

import estimators
from problems import Z_TOL, bernoulli_problem, categorical_problem, estimates, z_scores
M = 4000


def _variance_sum(g: torch.Tensor):
    """Sum over coordinates of the per-coordinate variance of M replicas ``g`` (M, ...), and the
    standard error of that sum (the per-replica squared deviations are i.i.d. up to O(1/M))."""
    dev2 = ((g - g.mean(0)) ** 2).reshape(g.shape[0], -1).sum(1)  # (M,)
    return dev2.mean().item(), (dev2.std() / dev2.numel() ** 0.5).item()


def _var(name, prob, n, seed):
    torch.manual_seed(seed)
    G, _ = estimates(estimators.get(name), prob, M, n)
    return _variance_sum(G["logits"])


@pytest.mark.parametrize("n", [2, 6])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_disarm_variance_at_most_arm(seed, n):
    """Var(DisARM) <= Var(ARM) at the same budget (Rao-Blackwellisation of ARM over u given b, b~)."""
    prob = bernoulli_problem(seed=seed, batch=3, dim=4)
    v_arm, se_arm = _var("arm", prob, n, 100 + seed)
    v_dis, se_dis = _var("disarm", prob, n, 200 + seed)
    se = math.hypot(se_arm, se_dis)
    assert v_dis <= v_arm + Z_TOL * se, (
        f"seed {seed}, n {n}: Var(DisARM)={v_dis:.4g} exceeds Var(ARM)={v_arm:.4g} "
        f"by more than {Z_TOL} standard errors ({se:.2g})")
    # on these problems the reduction is large, not a tie: check it is clearly visible
    assert v_dis < v_arm - Z_TOL * se, f"seed {seed}: no visible reduction ({v_dis:.4g} vs {v_arm:.4g})"


def test_rloo_variance_below_reinforce_with_offset():
    """A constant offset c multiplies REINFORCE's variance by ~c^2; RLOO's baseline cancels it."""
    prob = bernoulli_problem(seed=5, batch=3, dim=4, offset=50.0)
    v_rf, se_rf = _var("reinforce", prob, 4, 11)
    v_rloo, se_rloo = _var("rloo", prob, 4, 12)
    assert v_rloo < v_rf - Z_TOL * math.hypot(se_rf, se_rloo)
    assert v_rloo < 0.01 * v_rf, f"RLOO {v_rloo:.4g} vs REINFORCE {v_rf:.4g}"


# ---- brute-force multi-sample objectives ------------------------------------------------------

def _configs(family, prob):
    """Every configuration of one event, (C, *event_shape), independent of the estimators package."""
    logits = prob.params["logits"]
    dt = logits.dtype
    if family == "bernoulli":
        dim = logits.shape[-1]
        return torch.tensor(list(itertools.product([0.0, 1.0], repeat=dim)), dtype=dt)
    dim, classes = logits.shape[-2:]
    eye = torch.eye(classes, dtype=dt)
    return torch.stack([eye[list(ks)] for ks in itertools.product(range(classes), repeat=dim)])


def exact_multisample(family, prob, logits, f, K):
    """sum_b E_{z_1..K iid q}[log (1/K) sum_k exp f(z_k)] by enumerating all C^K tuples.

    Differentiable in ``logits`` (batch, ...) and in any parameter inside ``f``; K=1 gives E[f]."""
    cfg = _configs(family, prob)  # (C, *event)
    C, B = cfg.shape[0], logits.shape[0]
    z = cfg.unsqueeze(1).expand(C, B, *cfg.shape[1:])
    if family == "bernoulli":
        logq = (z * F_logsig(logits) + (1 - z) * F_logsig(-logits)).sum(-1)  # (C, B)
    else:
        logq = (z * torch.log_softmax(logits, -1)).sum((-1, -2))
    fC = f(z)  # (C, B)
    idx = torch.tensor(list(itertools.product(range(C), repeat=K)))  # (C^K, K)
    L = torch.logsumexp(fC[idx], 1) - math.log(K)  # (C^K, B)
    w = logq[idx].sum(1).exp()
    return (w * L).sum()


def F_logsig(x):
    return torch.nn.functional.logsigmoid(x)


def _make_dist(family, logits):
    base = D.Bernoulli(logits=logits) if family == "bernoulli" else D.OneHotCategorical(logits=logits)
    return D.Independent(base, 1)


def _problem(family, seed):
    if family == "bernoulli":
        return bernoulli_problem(seed=seed, batch=2, dim=3)
    return categorical_problem(seed=seed, batch=2, dim=2, classes=3)


def _replicated_estimates(name, family, prob, n, seed):
    """M replicas: per-replica logits (M, batch, ...) and a per-replica scale theta (M, 1) inside f,
    f_theta(z) = theta * f(z) at theta = 1.  Returns the gradients and the Estimate."""
    torch.manual_seed(seed)
    logits = prob.params["logits"].detach().unsqueeze(0).expand(M, *prob.params["logits"].shape)
    logits = logits.clone().requires_grad_()
    theta = torch.ones(M, 1, dtype=logits.dtype, requires_grad=True)
    e = estimators.get(name).estimate(_make_dist(family, logits), lambda z: theta * prob.f(z), n)
    g_l, g_t = torch.autograd.grad(e.surrogate, [logits, theta])
    return {"logits": g_l, "theta": g_t}, e


def _exact_grads(family, prob, K):
    logits = prob.params["logits"].detach().clone().requires_grad_()
    theta = torch.ones((), dtype=logits.dtype, requires_grad=True)
    total = exact_multisample(family, prob, logits, lambda z: theta * prob.f(z), K)
    g_l, g_t = torch.autograd.grad(total, [logits, theta])
    return total.detach(), {"logits": g_l, "theta": g_t.reshape(1)}


@pytest.mark.slow
def test_brute_force_agrees_with_problem_gradient():
    """Sanity check of the enumeration helper: K=1 reproduces the problem's exact grad E[f]."""
    for family in ("bernoulli", "categorical"):
        prob = _problem(family, 0)
        _, g = _exact_grads(family, prob, 1)
        torch.testing.assert_close(g["logits"], prob.exact["logits"])


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("family", ["bernoulli", "categorical"])
def test_vimco_is_unbiased_for_the_multisample_bound(family, K):
    prob = _problem(family, seed=7)
    bound, exact = _exact_grads(family, prob, K)
    G, e = _replicated_estimates("vimco", family, prob, K, seed=21)
    z, diff = z_scores(G, exact)
    assert z.abs().max().item() < Z_TOL, f"VIMCO vs exact grad of E[L_K]: z {z.abs().max():.2f}"
    # value = the bound: its mean over replicas matches the enumerated E[L_K]
    v = e.value.sum(-1)  # (M,) sum over the batch, like the enumerated total
    assert abs(v.mean().item() - bound.item()) < Z_TOL * v.std().item() / M**0.5
    # and it is a different objective: the gradient of E[f] is far off
    _, g_f = _exact_grads(family, prob, 1)
    z_f, _ = z_scores({"logits": G["logits"]}, {"logits": g_f["logits"]})
    assert z_f.abs().max().item() > Z_TOL


def test_vimco_value_is_logmeanexp_of_the_samples_f():
    prob = _problem("bernoulli", seed=3)
    seen = []

    def f(z):
        out = prob.f(z)
        seen.append(out.detach())
        return out

    logits = prob.params["logits"].detach().clone().requires_grad_()
    e = estimators.get("vimco").estimate(_make_dist("bernoulli", logits), f, 5)
    assert len(seen) == 1
    torch.testing.assert_close(e.value, torch.logsumexp(seen[0], 0) - math.log(5))


def test_vimco_signal_is_leave_one_out_with_geometric_mean():
    """Eq. 9-10 on a hand-checkable case: f = (0, 1, 2) -> baseline of sample j replaces f_j by
    the mean of the other two."""
    from estimators.multisample import vimco_signals
    fz = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    L, s = vimco_signals(fz)
    lme = lambda xs: math.log(sum(math.exp(x) for x in xs) / 3)
    assert L.item() == pytest.approx(lme([0, 1, 2]))
    expected = [lme([0, 1, 2]) - lme([1.5, 1, 2]), lme([0, 1, 2]) - lme([0, 1, 2]),
                lme([0, 1, 2]) - lme([0, 1, 0.5])]
    torch.testing.assert_close(s[:, 0], torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("name,family", [("arm", "bernoulli"), ("disarm", "bernoulli"),
                                         ("disarm", "categorical"),
                                         ("muprop", "bernoulli"), ("muprop", "categorical")])
def test_parameters_inside_f_get_an_unbiased_gradient(name, family):
    """d/dtheta sum_b E[theta f(z)] = sum_b E[f]; also re-checks the logits gradient at theta=1."""
    prob = _problem(family, seed=4)
    _, exact = _exact_grads(family, prob, 1)
    G, _ = _replicated_estimates(name, family, prob, 4, seed=31)
    z, _ = z_scores(G, exact)
    assert z.abs().max().item() < Z_TOL, f"{name}: z {z.abs().max():.2f}"


def test_disarm_weight_vanishes_where_the_pair_agrees():
    """DisARM puts zero weight on coordinates with b_i == b~_i; ARM does not."""
    from estimators.antithetic import antithetic_pairs, arm_weight, disarm_weight
    torch.manual_seed(0)
    logits = torch.randn(5, 6, dtype=torch.float64)
    u, b, bt = antithetic_pairs(logits, 50)
    diff = torch.randn(50, 5, 1, dtype=torch.float64)
    w_dis = disarm_weight(diff, u, b, bt, logits)
    w_arm = arm_weight(diff, u, b, bt, logits)
    agree = b == bt
    assert agree.any() and (~agree).any()
    assert (w_dis[agree] == 0).all()
    assert (w_arm[agree] != 0).all()


def test_muprop_is_exact_for_linear_f():
    """For f linear in z the Taylor control variate is exact: zero variance, exact gradient."""
    prob = _problem("categorical", seed=2)
    R = torch.randn(prob.params["logits"].shape, dtype=torch.float64)
    f = lambda z: (z * R).sum((-1, -2)) + 3.0
    logits = prob.params["logits"].detach().clone().requires_grad_()
    e = estimators.get("muprop").estimate(_make_dist("categorical", logits), f, 3)
    (g,) = torch.autograd.grad(e.surrogate, logits)
    lp = logits.detach().clone().requires_grad_()
    (g_exact,) = torch.autograd.grad((torch.softmax(lp, -1) * R).sum(), lp)
    torch.testing.assert_close(g, g_exact)


def test_stick_breaking_reproduces_the_categorical():
    """Enumerating all 2^(K-1) decision vectors: P(category k) = softmax(logits)_k exactly."""
    from estimators.antithetic import stick_breaking_logits, stick_breaking_one_hot
    torch.manual_seed(0)
    K = 5
    logits = torch.randn(3, K, dtype=torch.float64) * 2
    eta = stick_breaking_logits(logits)  # (3, K-1)
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=K - 1)), dtype=torch.float64)
    b = bits.unsqueeze(1).expand(-1, 3, K - 1)  # (2^(K-1), 3, K-1)
    logp = (b * F_logsig(eta) + (1 - b) * F_logsig(-eta)).sum(-1)  # (2^(K-1), 3)
    z = stick_breaking_one_hot(b)
    assert torch.equal(z.sum(-1), torch.ones_like(logp))
    probs = (logp.exp().unsqueeze(-1) * z).sum(0)
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


@pytest.mark.parametrize("seed", [0, 1])
def test_categorical_disarm_unbiased_many_classes(seed):
    """Stick-breaking DisARM (Dong et al. 2021) on 2 categoricals with 5 classes, incl. theta in f."""
    prob = categorical_problem(seed=seed, batch=2, dim=2, classes=5)
    _, exact = _exact_grads("categorical", prob, 1)
    G, _ = _replicated_estimates("disarm", "categorical", prob, 4, seed=41 + seed)
    z, _ = z_scores(G, exact)
    assert z.abs().max().item() < Z_TOL, f"z {z.abs().max():.2f}"
