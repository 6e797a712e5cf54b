"""Tests of the without-replacement estimators (estimators/without_replacement.py).

The generic suite (tests/test_estimators.py) already checks the contract and, for unordered_set,
the mean against the exact gradient.  Here: the sampler against exact Gumbel-top-k probabilities,
the set-probability quadrature against brute force over orderings, a harder unbiasedness case, the
variance against rloo, exactness on a covered support, and numerical stability on 200 latents.
Statistical checks use fixed seeds and 4.5 standard errors, like the generic suite.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import distributions as D

import estimators
from estbench.engine.problems import Z_TOL, estimates, problem, z_scores
from estimators.rao_blackwell import cell_logits
from estimators.without_replacement import (
    complement_log_mass, reinforce_wor_weights, set_log_integrals, shifted_gumbel,
    stochastic_beam_search, unordered_set_weights,
)

F64 = torch.float64
NAMES = ["unordered_set", "reinforce_wor"]


# ---- brute force ------------------------------------------------------------------------------
def joint_table(lp):
    """Every configuration of independent cells ``lp`` (D, K): (indices (C, D), log-probs (C,))."""
    Dn, K = lp.shape
    cfgs = torch.tensor(list(itertools.product(range(K), repeat=Dn)))
    return cfgs, lp.gather(-1, cfgs.T).sum(0)


def ordered_prob(p, order, total):
    """Plackett-Luce probability of drawing ``order`` first, from masses ``p`` of total ``total``."""
    out, left = 1.0, total
    for i in order:
        out *= p[i] / left
        left -= p[i]
    return out


def set_prob(p_set, rest):
    """p(S) by brute force: the sum over the |S|! orderings, with denominators rest + (what is left
    of S), a sum of positive terms (no cancellation even when rest is 1e-12)."""
    return sum(ordered_prob(p_set, perm, rest + sum(p_set))
               for perm in itertools.permutations(range(len(p_set))))


def codes(idx, K):
    """Mixed-radix code of each configuration (..., D) -> (...)."""
    powers = K ** torch.arange(idx.shape[-1] - 1, -1, -1)
    return (idx * powers).sum(-1)


def bern(logits):
    return D.Independent(D.Bernoulli(logits=logits), 1)


# ---- the sampler ------------------------------------------------------------------------------
def test_shifted_gumbel_takes_the_parent_maximum():
    torch.manual_seed(0)
    G = torch.randn(1000, 5, dtype=F64) * 3
    T = torch.randn(1000, dtype=F64) * 3
    g = shifted_gumbel(G, T)
    torch.testing.assert_close(g.max(-1).values, T, rtol=0, atol=1e-12)
    assert torch.equal(g.argmax(-1), G.argmax(-1))  # the shift is monotone
    G[:, 0] = float("-inf")  # impossible children stay impossible
    assert torch.isneginf(shifted_gumbel(G, T)[:, 0]).all()


@pytest.mark.parametrize("K,Dn,k", [(2, 3, 3), (2, 4, 3), (3, 2, 4), (2, 3, 8)])
@pytest.mark.slow
def test_beam_search_is_exact_gumbel_top_k(K, Dn, k):
    """Distinct configurations, consistent log-probabilities, sorted perturbed values, a Gumbel(0)
    maximum, and set and inclusion frequencies equal to the exact probabilities of sampling without
    replacement (sums over orderings of Plackett-Luce probabilities) -- every set with an expected
    count of at least 10 on its own, the rarer ones as one cell.
    (3, 2, 4) never prunes (3 nodes after the first cell) and (2, 3, 8) is the whole support; the
    others prune at every level below the first, where the conditioning of the children matters."""
    g_ = torch.Generator().manual_seed(K * 10 + Dn)
    lp = torch.log_softmax(torch.randn(Dn, K, generator=g_, dtype=F64) * 1.5, -1)
    M = 20000
    torch.manual_seed(7)
    idx, phi, g = stochastic_beam_search(lp.expand(M, Dn, K), k)
    assert idx.shape == (M, k, Dn)
    cfg_code = codes(idx, K)  # (M, k)
    srt = cfg_code.sort(-1).values
    assert (srt[:, 1:] != srt[:, :-1]).all(), "a beam returned a configuration twice"
    torch.testing.assert_close(phi, lp.expand(M, Dn, K).gather(-1, idx.transpose(-1, -2)).sum(-2))
    assert (g[:, 1:] <= g[:, :-1]).all()
    euler = 0.5772156649015329
    se = math.pi / math.sqrt(6 * M)
    assert abs(g[:, 0].mean().item() - euler) < Z_TOL * se
    # frequencies of the unordered sets and of each configuration against the exact ones
    cfgs, jlp = joint_table(lp)
    p = jlp.exp().tolist()
    C = len(p)
    set_code = (srt * (C ** torch.arange(k - 1, -1, -1))).sum(-1)
    counts = torch.bincount(set_code, minlength=C**k)
    inclusion = torch.bincount(cfg_code.flatten(), minlength=C) / M
    exact_inclusion = [0.0] * C
    zs, rare_p, rare_n = [], 0.0, 0
    for S in itertools.combinations(range(C), k):
        ps = set_prob([p[i] for i in S], max(0.0, 1.0 - sum(p[i] for i in S)))
        for i in S:
            exact_inclusion[i] += ps
        n = counts[sum(s * C ** (k - 1 - j) for j, s in enumerate(S))].item()
        if ps > 1 - 1e-9:  # the whole support: certain
            assert n == M
        elif M * ps >= 10:  # a normal approximation of the count holds
            zs.append((n / M - ps) / math.sqrt(ps * (1 - ps) / M))
        else:  # sets too rare to test one by one are tested as one cell
            rare_p, rare_n = rare_p + ps, rare_n + n
    if rare_p > 0:
        zs.append((rare_n / M - rare_p) / math.sqrt(rare_p * (1 - rare_p) / M))
    for c in range(C):
        pi = exact_inclusion[c]
        if pi > 1 - 1e-9:
            assert inclusion[c].item() == 1.0
        else:
            zs.append((inclusion[c].item() - pi) / math.sqrt(pi * (1 - pi) / M))
    worst = max(map(abs, zs), default=0.0)
    assert worst < Z_TOL, f"set or inclusion frequencies deviate by {worst:.1f} standard errors"


def test_kappa_makes_the_importance_weights_unbiased():
    """With width k+1, kappa = the (k+1)-th perturbed value and q(s, kappa) = P(G_s > kappa):
    E[sum_{s in top k} p(s)/q(s, kappa) f(s)] = E_p[f] (Kool et al. 2019) -- a check that the beam's
    perturbed values are on the right absolute scale, not just in the right order."""
    g_ = torch.Generator().manual_seed(3)
    K, Dn, k, M = 2, 4, 3, 40000  # width 4 prunes at cells 3 and 4
    lp = torch.log_softmax(torch.randn(Dn, K, generator=g_, dtype=F64), -1)
    cfgs, jlp = joint_table(lp)
    fvals = torch.randn(len(cfgs), generator=g_, dtype=F64) + 2.0
    torch.manual_seed(11)
    idx, phi, g = stochastic_beam_search(lp.expand(M, Dn, K), k + 1)
    kappa = g[:, k]
    log_q = torch.log(-torch.expm1(-torch.exp(phi[:, :k] - kappa[:, None])))
    est = (torch.exp(phi[:, :k] - log_q) * fvals[codes(idx[:, :k], K)]).sum(-1)
    exact = (jlp.exp() * fvals).sum()
    se = est.std() / math.sqrt(M)
    assert abs(est.mean() - exact) < Z_TOL * se


def test_complement_mass_against_enumeration():
    """log q(D\\S) summed over the trie equals the enumerated mass outside S, including a set that
    holds all but ~1e-30 of the mass (where 1 - sum_s q(s) is 0 in float64)."""
    g_ = torch.Generator().manual_seed(5)
    for K, Dn, k, scale in [(2, 4, 5, 1.0), (3, 3, 7, 1.0), (2, 3, 7, 1.0), (2, 5, 1, 40.0)]:
        logits = torch.randn(Dn, K, generator=g_, dtype=F64)
        if scale > 1:  # every cell 80 nats peaked: q(D\S) ~ 5e-35 for the top configuration
            logits = scale * torch.tensor([[1.0, -1.0], [-1.0, 1.0]] * 3, dtype=F64)[:Dn]
        lp = torch.log_softmax(logits, -1)
        cfgs, jlp = joint_table(lp)
        if scale > 1:  # S = the single (overwhelmingly) most probable configuration
            pick = jlp.topk(k).indices
        else:
            pick = torch.randperm(len(cfgs), generator=g_)[:k]
        S = cfgs[pick]
        rest = torch.ones(len(cfgs), dtype=torch.bool)
        rest[pick] = False
        exact = torch.logsumexp(jlp[rest], 0)
        got = complement_log_mass(lp, S)
        torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12)
        if scale > 1:
            assert exact < -60 and (1 - jlp[pick].exp().sum()) == 0  # float64 cannot see it
    lp = torch.log_softmax(torch.randn(3, 2, dtype=F64), -1)
    assert complement_log_mass(lp, joint_table(lp)[0]).item() == float("-inf")


# ---- the set integrals ------------------------------------------------------------------------
REGIMES = [1e-12, 1e-4, 0.1, 1.0, 10.0, 1e4, 1e12]  # p(D\S) / p(S)-ish: near 0 ... near 1


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_set_probabilities_against_orderings(k):
    """log p(S), the leave-one-out and leave-two-out set probabilities, and the weights
    p(s) R(S, s) and p(s') R^{D\\s}(S, s') against brute force over orderings, from p(D\\S) ~ 1e-12
    p(S) to p(D\\S) ~ 1 - 1e-12, to 1e-10 (the quadrature converges to ~1e-14 at 256 nodes)."""
    g_ = torch.Generator().manual_seed(k)
    for r in REGIMES:
        raw = torch.exp(torch.randn(k, generator=g_, dtype=F64) * 2)
        tot = raw.sum().item() * (1 + r)
        p = (raw / tot).tolist()  # normalised: p(S) + rest = 1
        rest = r * sum(p)
        log_p = torch.tensor(p, dtype=F64).log()
        log_rest = torch.tensor(rest, dtype=F64).log()
        l0, l1, l2 = set_log_integrals(log_p, log_rest)
        P = set_prob(p, rest)
        P1 = [set_prob([p[j] for j in range(k) if j != s], rest) for s in range(k)]
        assert abs(l0.item() - math.log(P)) < 1e-10
        for s in range(k):
            assert abs(l1[s].item() - math.log(P1[s])) < 1e-10
            for t in range(k):
                if t != s:
                    P2 = set_prob([p[j] for j in range(k) if j not in (s, t)], rest)
                    assert abs(l2[s, t].item() - math.log(P2)) < 1e-10
        w, V = unordered_set_weights(log_p, log_rest)
        for s in range(k):
            assert w[s].item() == pytest.approx(p[s] * P1[s] / P, rel=1e-10)
            for t in range(k):
                want = p[s] if t == s else p[t] * set_prob(
                    [p[j] for j in range(k) if j not in (s, t)], rest) / P1[s]
                assert V[s, t].item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("k", [8, 16, 32])
def test_weights_are_normalised_for_large_k(k):
    """p(S) = sum_s p(s) p^{D\\s}(S\\s) (condition on the first draw), so the weights p(s) R(S, s)
    sum to one, and so does every row of the baseline weights: a brute-force-free check of the
    quadrature where the orderings (k!) cannot be enumerated."""
    g_ = torch.Generator().manual_seed(k)
    for r in REGIMES:
        raw = torch.exp(torch.randn(6, k, generator=g_, dtype=F64) * 2)
        log_p = (raw / (raw.sum(-1, keepdim=True) * (1 + r))).log()
        log_rest = torch.full((6,), math.log(r / (1 + r)), dtype=F64)
        w, V = unordered_set_weights(log_p, log_rest)
        torch.testing.assert_close(w.sum(-1), torch.ones(6, dtype=F64), rtol=0, atol=1e-10)
        torch.testing.assert_close(V.sum(-1), torch.ones(6, k, dtype=F64), rtol=0, atol=1e-10)


def test_reinforce_wor_weights():
    log_p = torch.log(torch.tensor([[0.5, 0.3, 0.1]], dtype=F64))
    u, u2 = reinforce_wor_weights(log_p, torch.tensor([float("-inf")], dtype=F64))
    torch.testing.assert_close(u, torch.tensor([[0.5, 0.3, 0.1]], dtype=F64) / 0.9)  # q = 1
    kappa = torch.tensor([math.log(0.05) + 0.3], dtype=F64)
    q = 1 - torch.exp(-torch.exp(log_p - kappa))
    iw = log_p.exp() / q
    u, _ = reinforce_wor_weights(log_p, kappa)
    torch.testing.assert_close(u, iw / iw.sum())
    w, _ = reinforce_wor_weights(log_p, kappa, "leave_one_out")
    torch.testing.assert_close(w, iw / (iw.sum() - iw + log_p.exp()))


# ---- the estimators ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_exact_when_the_sample_covers_the_support(name):
    """n >= K^D: all C configurations, one call of f, C evaluations, and the exact gradient (the
    weights become q(s)); the decoder's gradient is the exact E[grad f]."""
    prob = problem("bernoulli", dim=3)
    theta = torch.tensor(0.7, dtype=F64, requires_grad=True)
    calls = []

    def f(z):
        calls.append(z.shape[0])
        return prob.f(z) + theta * z.sum(-1)

    for n in (8, 11):
        calls.clear()
        p = prob.params["logits"].detach().clone().requires_grad_()
        e = estimators.get(name).estimate(bern(p), f, n)
        assert calls == [8] and e.n_evals == 8
        g, gt = torch.autograd.grad(e.surrogate, [p, theta])
        q = torch.sigmoid(prob.params["logits"])
        exact = prob.exact["logits"] + theta.detach() * q * (1 - q)  # + d/dl E[theta sum z]
        torch.testing.assert_close(g, exact, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gt, q.sum(), rtol=1e-9, atol=1e-9)  # sum_b E[sum z]
    # a bare Bernoulli: every event is one cell, C = 2 < n
    p = torch.tensor([0.3, -1.2], dtype=F64, requires_grad=True)
    e = estimators.get(name).estimate(D.Bernoulli(logits=p), lambda z: (z - 0.2) ** 2 * 3, 4)
    (g,) = torch.autograd.grad(e.surrogate, p)
    s = torch.sigmoid(p.detach())
    torch.testing.assert_close(g, s * (1 - s) * (0.64 - 0.04) * 3)
    assert e.n_evals == 2


def test_budget_refusal_below_two():
    prob = problem("bernoulli", dtype=torch.float32)
    _, dist = prob.replicate(1)
    for name in NAMES:
        with pytest.raises(estimators.BudgetError, match="at least 2"):
            estimators.get(name).estimate(dist, prob.f, 1)


@pytest.mark.slow
def test_unordered_set_unbiased_close_to_the_full_support():
    """k = 7 of 9 joint configurations: the ratios are far from the large-space limit 1/k, and
    every one of R, R^{D\\s} matters (the generic suite's case is k = 4)."""
    torch.manual_seed(21)
    prob = problem("categorical")
    G, _ = estimates(estimators.get("unordered_set"), prob, 2500, 7)
    z, _ = z_scores(G, prob.exact)
    assert z.abs().max().item() < Z_TOL


@pytest.mark.parametrize("family,ceiling", [("bernoulli", 0.85), ("categorical", 0.6)])
@pytest.mark.slow
def test_unordered_set_variance_below_rloo(family, ceiling):
    """At equal k = 4 the unordered set estimator's total variance is well below rloo's (measured
    0.69 and 0.42 of it with these seeds; the standard error of each ratio is ~4%)."""
    prob = problem(family)
    var = {}
    for name in ("unordered_set", "rloo"):
        torch.manual_seed(5)
        G, _ = estimates(estimators.get(name), prob, 2000, 4)
        var[name] = G["logits"].var(0).sum().item()
    assert var["unordered_set"] < ceiling * var["rloo"], var


@pytest.mark.parametrize("name", NAMES)
def test_offset_of_f_cancels(name):
    """Both built-in baselines are weighted averages of the sampled f-values: f + 50 gives the same
    gradient on the same draw."""
    prob = problem("categorical")
    grads = []
    for off in (0.0, 50.0):
        p = prob.params["logits"].detach().clone().requires_grad_()
        torch.manual_seed(2)
        e = estimators.get(name).estimate(D.Independent(D.OneHotCategorical(logits=p), 1),
                                          lambda z: prob.f(z) + off, 4)
        grads.append(torch.autograd.grad(e.surrogate, p)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.slow
def test_stable_on_200_bernoulli_latents(dtype):
    """200 Bernoulli latents, batch 50, k = 2..8: finite gradients and values for both estimators;
    p(D\\S) ~ 1 there, and unordered_set's weights are RLOO's -- w_s = 1/k, baseline = the mean of
    the other k-1 -- to 1e-9.  Peaked logits (p(D\\S) ~ 1e-15 relative) stay finite too."""
    torch.manual_seed(0)
    W = torch.randn(200, dtype=dtype)
    f = lambda z: torch.tanh(z @ W / 10) + 0.1 * z.sum(-1)
    for peaked in (False, True):
        logits = torch.randn(50, 200, dtype=dtype) * (2.0 if not peaked else 25.0)
        for k in range(2, 9):
            for name in NAMES:
                p = logits.clone().requires_grad_()
                e = estimators.get(name).estimate(bern(p), f, k)
                (g,) = torch.autograd.grad(e.surrogate, p)
                assert torch.isfinite(g).all() and torch.isfinite(e.value).all(), (name, k, peaked)
    # the weights themselves, on a draw of the beam: the large-space limit is RLOO
    lp = cell_logits(bern(torch.randn(50, 200, dtype=F64) * 2), "bernoulli")
    for k in range(2, 9):
        idx, phi, _ = stochastic_beam_search(lp, k)
        w, V = unordered_set_weights(phi, complement_log_mass(lp, idx))
        torch.testing.assert_close(w, torch.full_like(w, 1 / k), rtol=0, atol=1e-9)
        off = ~torch.eye(k, dtype=torch.bool)
        torch.testing.assert_close(V[:, off], torch.full_like(V[:, off], 1 / (k - 1)), rtol=0, atol=1e-9)
        assert (V[:, ~off] < 1e-20).all()  # V[s, s] = p(s)
