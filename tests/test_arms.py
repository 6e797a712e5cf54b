"""Theory checks for the copula-coupled estimators ARMS and CARMS (estimators/arms.py).

* The copulas have uniform marginals; the Gaussian one's normals have correlation -1/(n-1), the
  Dirichlet one's Dirichlet components likewise (the flat Dirichlet's); each copula's rank
  correlation 12 E[u_i u_j] - 3 matches its bivariate CDF integrated in closed form.
* The pairwise joint probabilities the estimators divide by (ARMS: P(b_i = 1, b_j = 1); CARMS:
  P(z_i = a, z_j = b)) match simulation of the samplers the estimators use.
* ARMS with 2 samples is DisARM (same uniforms, exactly); CARMS with 2 categories is ARMS.
* ARMS has lower variance than LOO REINFORCE at the same budget (the paper's claim).
* Both are exactly unbiased at n = 3, 4, 6 for both copulas (the generic suite checks n = 4).

Every statistical tolerance is 4.5 standard errors of a Monte Carlo mean; seeds are fixed.
"""
from __future__ import annotations

import math

import pytest
import torch

import estimators
from estimators import arms as A
from estimators.antithetic import disarm_weight
from problems import Z_TOL, bernoulli_problem, categorical_problem, estimates, z_scores
M = 4000
COPULAS = ["dirichlet", "gaussian"]
F64 = torch.float64


def _draw(copula, n, N, seed):
    torch.manual_seed(seed)
    return A.COPULAS[copula].sample(n, (N,), F64, "cpu")


# ---- copulas ----------------------------------------------------------------------------------
@pytest.mark.parametrize("copula", COPULAS)
@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_copula_marginals_are_uniform(copula, n):
    N = 100_000
    u = _draw(copula, n, N, 10 + n)
    for x in (0.05, 0.25, 0.5, 0.75, 0.95):
        frac = (u <= x).to(F64).mean(1)  # per sample index: P(u_i <= x) = x
        se = math.sqrt(x * (1 - x) / N)
        assert ((frac - x).abs() < Z_TOL * se).all(), f"{copula} n={n}: P(u <= {x}) = {frac.tolist()}"


def _corr(x, y):
    x, y = x - x.mean(), y - y.mean()
    return (x * y).mean() / (x.std() * y.std())


@pytest.mark.parametrize("copula", COPULAS)
@pytest.mark.parametrize("n", [3, 4, 6])
def test_copula_pairwise_correlation(copula, n):
    """Gaussian: Phi^-1(u) has correlation -1/(n-1).  Dirichlet: F^-1(u) = 1 - (1-u)^(1/(n-1)) is
    the flat Dirichlet component, with correlation -1/(n-1).  The sample correlation's standard
    error is (1 - rho^2)/sqrt(N) for normals and bounded by 1.5/sqrt(N) for these bounded ones."""
    N = 100_000
    u = _draw(copula, n, N, 20 + n)
    back = torch.special.ndtri(u) if copula == "gaussian" else 1 - (1 - u) ** (1 / (n - 1))
    r = _corr(back[0], back[1]).item()
    assert abs(r + 1 / (n - 1)) < Z_TOL * 1.5 / math.sqrt(N), f"{copula} n={n}: corr {r:.4f}"


@pytest.mark.parametrize("copula", COPULAS)
@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_copula_cdf_gives_the_rank_correlation(copula, n):
    """Spearman's rho = 12 int int C(p, q) dp dq - 3 from the closed-form bivariate CDF the
    estimators use must equal the sampled 12 E[u_i u_j] - 3; for the Gaussian copula it also has
    the closed form (6/pi) asin(rho/2)."""
    G = 400
    grid = (torch.arange(G, dtype=F64) + 0.5) / G
    P, Q = torch.meshgrid(grid, grid, indexing="ij")
    rho_cdf = 12 * A.COPULAS[copula].cdf(P, Q, n).mean().item() - 3
    N = 100_000
    u = _draw(copula, n, N, 30 + n)
    prod = 12 * u[0] * u[1] - 3
    rho_mc, se = prod.mean().item(), prod.std().item() / math.sqrt(N)
    assert abs(rho_cdf - rho_mc) < Z_TOL * se + 2e-4, f"{copula} n={n}: {rho_cdf:.4f} vs {rho_mc:.4f}"
    if copula == "gaussian":
        assert rho_cdf == pytest.approx(6 / math.pi * math.asin(-0.5 / (n - 1)), abs=2e-4)


def test_bivariate_normal_cdf_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    h, k = torch.randn(50, generator=g, dtype=F64) * 2, torch.randn(50, generator=g, dtype=F64) * 2
    for rho in (-0.5, -1 / 3, -0.2):
        ours = A._bvn_cdf(h, k, rho)
        mvn = stats.multivariate_normal(mean=[0, 0], cov=[[1, rho], [rho, 1]])
        ref = torch.tensor(mvn.cdf(torch.stack([h, k], -1).numpy()), dtype=F64)
        torch.testing.assert_close(ours, ref, atol=1e-7, rtol=1e-6)


# ---- pairwise joint probabilities -------------------------------------------------------------
@pytest.mark.parametrize("copula", COPULAS)
@pytest.mark.parametrize("n", [2, 3, 4, 6])
@pytest.mark.slow
def test_arms_pair_probability_matches_simulation(copula, n):
    p = torch.tensor([0.03, 0.2, 0.45, 0.5, 0.7, 0.97], dtype=F64)
    N = 100_000
    torch.manual_seed(40 + n)
    u = A.COPULAS[copula].sample(n, (N, len(p)), F64, "cpu")
    b = A.arms_samples(u, torch.logit(p))
    both = b[0] * b[1]  # (N, len(p))
    exact = A.arms_pair_prob(p, n, A.COPULAS[copula])
    emp, se = both.mean(0), (exact * (1 - exact) / N).sqrt()  # the SE under the claimed value
    assert ((emp - exact).abs() <= Z_TOL * se + 1 / N).all(), f"{copula} n={n}: {emp} vs {exact}"
    torch.testing.assert_close(b.mean((0, 1)), p, atol=Z_TOL * 0.5 / math.sqrt(n * N), rtol=0)


@pytest.mark.parametrize("copula", COPULAS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_carms_joint_matches_simulation(copula, n):
    """The joint pmf of two coupled CARMS samples (averaged over the random ordering, as sampled)
    against the empirical frequency table, for a 4-class cell with a rare class; and every
    off-diagonal entry is positive."""
    probs = torch.tensor([0.05, 0.4, 0.15, 0.4], dtype=F64)
    K, N = 4, 200_000
    torch.manual_seed(50 + n)
    cop = A.COPULAS[copula]
    u = cop.sample(n, (N,), F64, "cpu")
    s, t = A.end_orderings(K)
    pick = torch.randint(len(s), (N,))
    z = A.carms_categories(u, probs.expand(N, K), s[pick], t[pick])
    assert torch.bincount(z.reshape(-1), minlength=K).to(F64).div(n * N).sub(probs).abs().max() < 0.005
    a, b = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    Q = A.carms_joint(a.reshape(1, -1), b.reshape(1, -1), probs.expand(K * K, K), n, cop).reshape(K, K)
    emp = torch.zeros(K * K, dtype=F64).index_add_(0, z[0] * K + z[1], torch.ones(N, dtype=F64)).div(N)
    emp = emp.reshape(K, K)
    se = (Q * (1 - Q) / N).sqrt()  # the SE under the claimed value
    assert ((emp - Q).abs() <= Z_TOL * se + 1 / N).all(), f"{copula} n={n}:\n{emp}\n{Q}"
    torch.testing.assert_close(Q.sum(1), probs, atol=1e-9, rtol=0)  # marginals of the joint
    off = ~torch.eye(K, dtype=torch.bool)
    assert (Q[off] > 0).all()


# ---- reductions -------------------------------------------------------------------------------
def test_arms_with_two_samples_is_disarm():
    """ARMS at n = 2 is DisARM (Dimitriev & Zhou 2021), coordinate by coordinate, for a joint f.

    Both copulas are then the antithetic pair (u_1, 1 - u_1).  ARMS puts the rarer outcome at the
    top of [0, 1] in each coordinate, so the uniforms that give DisARM's pair (b, b~) from DisARM's
    u are u_1 = 1 - u where p < 1/2 and u elsewhere (u -> 1 - u preserves the law of each
    coordinate, and coordinates are independent, so the two also agree in distribution); with
    them the two estimates are equal sample by sample."""
    torch.manual_seed(0)
    prob = bernoulli_problem(seed=3, batch=3, dim=4)
    logits = prob.params["logits"] * 2  # both sides of p = 1/2, some far from it
    p = torch.sigmoid(logits)
    m = 500
    u = torch.rand((m, *logits.shape), dtype=F64)
    b, bt = (u < p).to(F64), (1 - u < p).to(F64)
    g_dis = disarm_weight((prob.f(b) - prob.f(bt)).unsqueeze(-1), u, b, bt, logits)
    u1 = torch.where(p < 0.5, 1 - u, u)
    u2 = torch.stack([u1, 1 - u1])  # (2, m, B, D): m independent 2-sample ARMS estimates
    b2 = A.arms_samples(u2, logits)
    assert torch.equal(b2[0], b) and torch.equal(b2[1], bt)
    f2 = prob.f(b2).unsqueeze(-1)  # (2, m, B, 1)
    for cop in (A.DirichletCopula, A.GaussianCopula):  # the same factor sigma(|phi|) at n = 2
        torch.testing.assert_close(A.arms_weight(f2, b2, logits, cop), g_dis, atol=1e-12, rtol=1e-10)


def test_registered_arms_at_two_samples_matches_disarm_in_mean_and_variance():
    """The registered estimators at a budget of 2: same mean (the exact gradient) and the same
    variance within sampling error (they are equal in distribution)."""
    prob = bernoulli_problem(seed=1)
    torch.manual_seed(5)
    Ga, _ = estimates(estimators.get("arms"), prob, M, 2)
    torch.manual_seed(6)
    Gd, _ = estimates(estimators.get("disarm"), prob, M, 2)
    va, sa = _variance_sum(Ga["logits"])
    vd, sd = _variance_sum(Gd["logits"])
    assert abs(va - vd) < Z_TOL * math.hypot(sa, sd), f"Var ARMS {va:.4g} vs DisARM {vd:.4g}"
    z, _ = z_scores({"logits": Ga["logits"]}, prob.exact)
    assert z.abs().max().item() < Z_TOL


@pytest.mark.parametrize("copula", COPULAS)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_carms_with_two_categories_is_arms(copula, n):
    """A 2-class categorical with logits (0, phi) is Bernoulli(sigma(phi)); where sigma(phi) < 1/2,
    CARMS's layout (class 1 at the top of [0, 1]) is ARMS's orientation, and with the same
    uniforms the two gradients agree (CARMS's for class 1 is ARMS's, class 0's is its negative)."""
    torch.manual_seed(1)
    B, D = 200, 3
    phi = -torch.rand(B, D, dtype=F64) * 3 - 0.01  # p < 1/2
    cop = A.COPULAS[copula]
    u = cop.sample(n, (B, D), F64, "cpu")
    b = A.arms_samples(u, phi)
    w = torch.randn(D, dtype=F64)
    f = lambda x: torch.sin((x * w).sum(-1) + 0.3) * 3 + (x.sum(-1)) ** 2  # joint over D
    fb = f(b)
    g_arms = A.arms_weight(fb.unsqueeze(-1), b, phi, cop)
    logits2 = torch.stack([torch.zeros_like(phi), phi], -1)
    probs = torch.softmax(logits2, -1)
    s, t = A.end_orderings(2)
    z = A.carms_categories(u, probs, s.expand(B, D), t.expand(B, D))
    assert torch.equal(z.to(F64), b)
    g_carms = A.carms_weight(fb.unsqueeze(-1), z, probs, cop)
    torch.testing.assert_close(g_carms[..., 1], g_arms, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(g_carms[..., 0], -g_arms, atol=1e-10, rtol=1e-8)


# ---- variance ---------------------------------------------------------------------------------
def _variance_sum(g):
    dev2 = ((g - g.mean(0)) ** 2).reshape(g.shape[0], -1).sum(1)
    return dev2.mean().item(), (dev2.std() / dev2.numel() ** 0.5).item()


@pytest.mark.parametrize("n", [4, 6])
@pytest.mark.parametrize("copula", COPULAS)
def test_arms_variance_below_rloo(n, copula):
    """ARMS's antithetic samples beat independent ones with the same LOO baseline (Dimitriev &
    Zhou 2021, Sec. 5): on these problems by ~15-20%; asserted with a 4.5-SE margin."""
    prob = bernoulli_problem(seed=0, batch=3, dim=4)
    torch.manual_seed(60 + n)
    G, _ = estimates(estimators.get("arms", copula=copula), prob, M, n)
    v_arms, se_a = _variance_sum(G["logits"])
    torch.manual_seed(70 + n)
    G, _ = estimates(estimators.get("rloo"), prob, M, n)
    v_rloo, se_r = _variance_sum(G["logits"])
    assert v_arms < v_rloo - Z_TOL * math.hypot(se_a, se_r), f"{v_arms:.4g} vs RLOO {v_rloo:.4g}"


def test_carms_variance_below_rloo():
    prob = categorical_problem(seed=0)
    torch.manual_seed(80)
    G, _ = estimates(estimators.get("carms"), prob, M, 4)
    v_c, se_c = _variance_sum(G["logits"])
    torch.manual_seed(81)
    G, _ = estimates(estimators.get("rloo"), prob, M, 4)
    v_r, se_r = _variance_sum(G["logits"])
    assert v_c < v_r - Z_TOL * math.hypot(se_c, se_r), f"{v_c:.4g} vs RLOO {v_r:.4g}"


# ---- exact unbiasedness beyond the suite's budget ---------------------------------------------
@pytest.mark.parametrize("n", [3, 4, 6])
@pytest.mark.parametrize("copula", COPULAS)
@pytest.mark.parametrize("name,maker", [("arms", bernoulli_problem), ("carms", categorical_problem)])
@pytest.mark.slow
def test_unbiased_at_several_budgets(name, maker, copula, n):
    prob = maker(seed=2, offset=50.0 if n == 3 else 0.0)
    torch.manual_seed(90 + n)
    G, _ = estimates(estimators.get(name, copula=copula), prob, M, n)
    z, diff = z_scores(G, prob.exact)
    assert z.abs().max().item() < Z_TOL, f"{name}[{copula}] n={n}: {z.abs().max():.2f} SE"


@pytest.mark.slow
def test_carms_unbiased_with_five_classes():
    """Five classes: ten orderings per cell, some pairs of categories both in the middle."""
    prob = categorical_problem(seed=4, classes=5)
    torch.manual_seed(99)
    G, _ = estimates(estimators.get("carms"), prob, M, 5)
    z, _ = z_scores(G, prob.exact)
    assert z.abs().max().item() < Z_TOL


@pytest.mark.parametrize("copula", COPULAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_at_saturated_logits(copula, dtype):
    """sigmoid(30) rounds to 1 in float32 and sigmoid(800) in float64: the debias factor and the
    importance weights must stay finite there (and the certain coordinates get no gradient)."""
    from torch import distributions as D
    lb = torch.tensor([[-30.0, 30.0, 0.0, -12.0, 800.0, -800.0]], dtype=dtype, requires_grad=True)
    e = estimators.get("arms", copula=copula).estimate(
        D.Independent(D.Bernoulli(logits=lb), 1), lambda z: z.sum(-1) ** 2, 4)
    (g,) = torch.autograd.grad(e.surrogate, lb)
    assert torch.isfinite(g).all() and (g[0, [4, 5]] == 0).all()
    lc = torch.tensor([[[-30.0, 30.0, 0.0, -12.0], [0.0, 0.1, -0.1, -800.0]]], dtype=dtype,
                      requires_grad=True)
    e = estimators.get("carms", copula=copula).estimate(
        D.Independent(D.OneHotCategorical(logits=lc), 1),
        lambda z: (z * torch.arange(4, dtype=dtype)).sum((-1, -2)) ** 2, 4)
    (g,) = torch.autograd.grad(e.surrogate, lc)
    assert torch.isfinite(g).all()
