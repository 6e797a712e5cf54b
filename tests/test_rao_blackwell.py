"""Theory checks for the Rao-Blackwellised estimators and the measure-valued Gaussian estimator.

Statistical comparisons use fixed seeds and tolerances of 4.5 standard errors (as the generic suite).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import estimators
from estimators.rao_blackwell import sample_complement, top_k_configurations

from problems import Z_TOL, estimates, problem
M = 4000


def _flat(G):
    return torch.cat([g.reshape(g.shape[0], -1) for g in G.values()], 1)


def total_variance(G):
    """Sum over coordinates of the per-coordinate variance, and its standard error."""
    g = _flat(G)
    t = ((g - g.mean(0)) ** 2).sum(1) * g.shape[0] / (g.shape[0] - 1)
    return t.mean().item(), (t.std() / t.shape[0] ** 0.5).item()


@pytest.mark.parametrize("family,seed", [("bernoulli", 0), ("bernoulli", 1),
                                         ("categorical", 0), ("categorical", 1)])
def test_gumbel_rao_same_mean_as_st_gumbel_lower_variance(family, seed):
    """Paulus et al. (2021): Gumbel-Rao = E[ST-Gumbel | hard sample], so equal mean, no more variance."""
    prob = problem(family, seed=seed)
    torch.manual_seed(10 + seed)
    G_st, _ = estimates(estimators.get("st_gumbel"), prob, M, 1)
    G_gr, e = estimates(estimators.get("gumbel_rao"), prob, M, 1)
    assert e.n_evals == 1
    st, gr = _flat(G_st), _flat(G_gr)
    se = (st.var(0) / M + gr.var(0) / M).sqrt()
    z = ((st.mean(0) - gr.mean(0)) / se).abs().max().item()
    assert z < Z_TOL, f"Gumbel-Rao and ST-Gumbel means differ by {z:.2f} standard errors"
    v_st, se_st = total_variance(G_st)
    v_gr, se_gr = total_variance(G_gr)
    margin = Z_TOL * (se_st**2 + se_gr**2) ** 0.5
    assert v_gr < v_st - margin, f"Gumbel-Rao variance {v_gr:.4g} not below ST-Gumbel's {v_st:.4g} (+-{margin:.2g})"


def test_gumbel_rao_with_k1_matches_st_gumbel_variance_order():
    """More conditional draws can only help: k=1 is ST-Gumbel in law, k=10 has less variance."""
    prob = problem("categorical", seed=2)
    torch.manual_seed(0)
    v1, s1 = total_variance(estimates(estimators.get("gumbel_rao", k=1), prob, M, 1)[0])
    v10, s10 = total_variance(estimates(estimators.get("gumbel_rao", k=10), prob, M, 1)[0])
    vst, sst = total_variance(estimates(estimators.get("st_gumbel"), prob, M, 1)[0])
    assert abs(v1 - vst) < Z_TOL * (s1**2 + sst**2) ** 0.5
    assert v10 < v1 - Z_TOL * (s1**2 + s10**2) ** 0.5


@pytest.mark.parametrize("family", ["bernoulli", "categorical"])
def test_sum_and_sample_full_support_is_exact(family):
    prob = problem(family)
    C = 2**4 if family == "bernoulli" else 3**2
    est = estimators.get("sum_and_sample", k=C)
    grads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        G, e = estimates(est, prob, 3, C + 1)
        assert e.n_evals == C  # the whole support is summed; nothing is left to sample
        grads.append(G["logits"])
    g = torch.cat(grads)
    assert g.var(0).max().item() < 1e-20, "k = full support must have zero variance"
    torch.testing.assert_close(g[0], prob.exact["logits"])


def test_sum_and_sample_budget_and_variance():
    prob = problem("bernoulli", offset=50.0)
    _, dist = prob.replicate(1)
    with pytest.raises(ValueError, match="k=3 .* n_samples=3 must exceed k"):
        estimators.get("sum_and_sample", k=3).estimate(dist, prob.f, 3)
    # summing the most probable configurations (and its built-in baseline) beats plain REINFORCE
    torch.manual_seed(0)
    v_ss, s_ss = total_variance(estimates(estimators.get("sum_and_sample", k=2), prob, M, 4)[0])
    v_rf, s_rf = total_variance(estimates(estimators.get("reinforce"), prob, M, 4)[0])
    assert v_ss < v_rf - Z_TOL * (s_ss**2 + s_rf**2) ** 0.5


def _brute(lp):
    D, K = lp.shape[-2:]
    allc = torch.tensor(list(itertools.product(range(K), repeat=D)))
    return allc, lp[..., torch.arange(D), allc].sum(-1)  # (C, D), (*B, C)


@pytest.mark.parametrize("D,K,k", [(1, 3, 2), (3, 2, 5), (5, 3, 7), (3, 3, 27)])
def test_top_k_configurations_matches_enumeration(D, K, k):
    torch.manual_seed(D * K + k)
    lp = torch.log_softmax(torch.randn(2, D, K, dtype=torch.float64), -1)
    scores, S = top_k_configurations(lp, k)
    allc, tot = _brute(lp)
    torch.testing.assert_close(scores, tot.topk(k, -1).values)
    for b in range(2):
        assert len({tuple(c) for c in S[b].tolist()}) == k
        torch.testing.assert_close(lp[b][torch.arange(D), S[b]].sum(-1), scores[b])


@pytest.mark.parametrize("D,K,k", [(3, 2, 3), (2, 3, 4)])
def test_sample_complement_is_q_restricted(D, K, k):
    """Samples avoid the top-k set and follow q / q(not S) there (chi-square style z-check)."""
    torch.manual_seed(7)
    lp = torch.log_softmax(torch.randn(1, D, K, dtype=torch.float64), -1)
    _, S = top_k_configurations(lp, k)
    m = 40000
    idx, R = sample_complement(lp, S, m)
    allc, tot = _brute(lp)
    q = tot[0].exp()
    top = {tuple(c) for c in S[0].tolist()}
    rest = torch.tensor([tuple(c) not in top for c in allc.tolist()])
    torch.testing.assert_close(R[0], q[rest].sum())
    codes = (idx[:, 0] * K ** torch.arange(D - 1, -1, -1)).sum(-1)
    counts = torch.bincount(codes, minlength=K**D).double()
    assert counts[~rest].sum() == 0
    p = q[rest] / q[rest].sum()
    z = (counts[rest] / m - p) / (p * (1 - p) / m).sqrt()
    assert z.abs().max() < Z_TOL


def test_indecater_budget_message_and_floor():
    prob = problem("bernoulli")  # D = 4 cells, K = 2 classes
    _, dist = prob.replicate(1)
    est = estimators.get("indecater")
    with pytest.raises(ValueError, match=r"D=4 cells, K=2 classes, D\*K=8\): n_samples=4"):
        est.estimate(dist, prob.f, 4)
    assert est.budget_unit(dist) == 8
    calls = []
    assert est.estimate(dist, lambda z: calls.append(z.shape[0]) or prob.f(z), 20).n_evals == 16
    assert calls == [16]  # two whole samples of D*K evaluations, in one call
    cat = problem("categorical")  # D = 2, K = 3
    _, cdist = cat.replicate(1)
    with pytest.raises(ValueError, match=r"D=2 cells, K=3 classes, D\*K=6"):
        est.estimate(cdist, cat.f, 5)
    assert est.estimate(cdist, cat.f, 12).n_evals == 12


def test_indecater_beats_reinforce_at_equal_budget():
    prob = problem("bernoulli", offset=50.0)
    torch.manual_seed(0)
    v_ic, s_ic = total_variance(estimates(estimators.get("indecater"), prob, M, 8)[0])
    v_rl, s_rl = total_variance(estimates(estimators.get("rloo"), prob, M, 8)[0])
    assert v_ic < v_rl - Z_TOL * (s_ic**2 + s_rl**2) ** 0.5


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_measure_valued_lower_variance_than_reinforce(offset):
    prob = problem("gaussian", offset=offset)  # D = 3: one sample costs 4*D = 12 evaluations
    torch.manual_seed(0)
    G_mv, e = estimates(estimators.get("measure_valued"), prob, M, 12)
    assert e.n_evals == 12
    G_rf, _ = estimates(estimators.get("reinforce"), prob, M, 12)
    v_mv, s_mv = total_variance(G_mv)
    v_rf, s_rf = total_variance(G_rf)
    assert v_mv < v_rf - Z_TOL * (s_mv**2 + s_rf**2) ** 0.5


def test_measure_valued_coupling_reduces_variance_and_budget_message():
    prob = problem("gaussian")
    torch.manual_seed(0)
    v_c, s_c = total_variance(estimates(estimators.get("measure_valued"), prob, M, 12)[0])
    v_u, s_u = total_variance(estimates(estimators.get("measure_valued", coupling=False), prob, M, 12)[0])
    assert v_c < v_u - Z_TOL * (s_c**2 + s_u**2) ** 0.5
    _, dist = prob.replicate(1)
    with pytest.raises(ValueError, match=r"D=3, 4\*D=12\): n_samples=8 must be at least 12"):
        estimators.get("measure_valued").estimate(dist, prob.f, 8)


def test_measure_valued_chains_through_log_scale():
    """The scale estimate enters as (g * scale): with scale = exp(s), d/ds = g * scale."""
    loc = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    log_scale = torch.full((1, 2), 0.5, dtype=torch.float64, requires_grad=True)
    dist = torch.distributions.Independent(torch.distributions.Normal(loc, log_scale.exp()), 1)
    torch.manual_seed(0)
    e = estimators.get("measure_valued").estimate(dist, lambda z: (z**2).sum(-1), 8 * 4000)
    g_loc, g_ls = torch.autograd.grad(e.surrogate, [loc, log_scale])
    # E[z^2] = mu^2 + s^2 per coordinate: d/dmu = 0, d/dlog_scale = 2 s^2 = 2e
    torch.testing.assert_close(g_loc, torch.zeros_like(g_loc), atol=0.05, rtol=0)
    torch.testing.assert_close(g_ls, torch.full_like(g_ls, 2 * torch.e), atol=0.15, rtol=0)


def test_sum_and_sample_finite_when_the_top_mass_underflows():
    """200 near-uniform Bernoulli latents: the top configuration's probability (~2^-200) underflows
    in float32; the baseline must come from log-probabilities, not value / Q."""
    g = torch.Generator().manual_seed(0)
    logits = (0.1 * torch.randn(4, 200, generator=g)).requires_grad_()
    dist = torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits), 1)
    e = estimators.get("sum_and_sample").estimate(dist, lambda z: -(z - 0.3).pow(2).sum(-1), 6)
    (grad,) = torch.autograd.grad(e.surrogate, logits)
    assert torch.isfinite(e.surrogate) and torch.isfinite(grad).all()


@pytest.mark.parametrize("logit", [-12.0, -1.5, 0.0, 0.7, 9.0])
@pytest.mark.slow
def test_binary_conditional_logistic_is_the_two_class_conditional_gumbel_in_law(logit):
    """Gumbel-Rao's Bernoulli path draws L = G_1 - G_0 given the hard bit directly (a truncated
    logistic); it must equal in law the difference of the two-class conditional Gumbels, for both
    bits, including logits where the observed bit is very unlikely.  Compared by the empirical CDF
    at fixed points, tolerance 4.5 binomial standard errors."""
    from estimators.rao_blackwell import conditional_gumbel, conditional_logistic

    torch.manual_seed(0)
    N = 100_000
    l = torch.tensor([logit], dtype=torch.float64)
    lp = torch.stack([torch.nn.functional.logsigmoid(-l), torch.nn.functional.logsigmoid(l)], -1)
    for bit in (0.0, 1.0):
        hard = torch.tensor([bit], dtype=torch.float64)
        L = conditional_logistic(l, hard, N)[:, 0]
        G = conditional_gumbel(lp, torch.nn.functional.one_hot(hard.long(), 2).double(), N)[:, 0]
        ref = G[:, 1] - G[:, 0]
        assert torch.isfinite(L).all()
        assert ((l + L > 0) == bool(bit)).all()  # consistent with the hard sample
        for q in (0.1, 0.3, 0.5, 0.7, 0.9):
            x = ref.quantile(q)
            emp = (L <= x).double().mean()
            se = (q * (1 - q) / N * 2) ** 0.5  # both samples are noisy
            assert abs(emp - q) < Z_TOL * se, (logit, bit, q, float(emp))


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_two_class_soft_is_the_gumbel_pairs_relaxation_in_law(tau):
    """Gumbel-Rao's two-class categorical path (poly_toy) relaxes with one truncated logistic per
    draw in the log-odds; per cell and hard sample, its relaxed class-1 entry must have the first
    two moments of softmax((lp + G) / tau) under the conditional Gumbel pair, and its gradient
    with respect to the log-probabilities the same mean.  Moments compared within Z_TOL standard
    errors of the difference, from independent draws of each."""
    from estimators.rao_blackwell import conditional_gumbel, two_class_soft

    torch.manual_seed(1)
    N = 40_000
    logits = torch.tensor([[-3.0, 1.0], [0.4, 0.1], [2.0, -2.5]], dtype=torch.float64)
    for bit in (0, 1):
        hard = torch.nn.functional.one_hot(torch.full((3,), bit), 2).double()
        lp = torch.log_softmax(logits, -1).requires_grad_()
        new = two_class_soft(lp, hard.expand(N, 3, 2), 1, tau)[..., 1]  # N draws, k = 1 each
        G = conditional_gumbel(lp.detach(), hard.expand(N, 3, 2), 1)[0]
        old = torch.softmax((lp + G) / tau, -1)[..., 1]
        for power in (1, 2):  # the first two moments
            a, b = new.detach() ** power, old ** power
            se = (a.var(0) / N + b.var(0) / N).sqrt()
            assert ((a.mean(0) - b.mean(0)).abs() < Z_TOL * se + 1e-12).all(), (bit, tau, power)
        ga, = torch.autograd.grad(new.mean(0).sum(), lp, retain_graph=True)
        gb, = torch.autograd.grad(old.mean(0).sum(), lp)
        # each draw's derivative is s (1 - s) / tau <= 1 / (4 tau) <= 1/2 in size, so the difference
        # of two N-draw means has a standard error below 2^-1/2 / sqrt(N)
        assert torch.allclose(ga, gb, atol=Z_TOL * 2 / N**0.5), (bit, tau, ga, gb)
