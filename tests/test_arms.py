"""Theory checks for the copula-coupled estimators ARMS and CARMS (estimators/arms.py).

* The copulas have uniform marginals; the Gaussian one's normals have correlation -1/(n-1), the
  Dirichlet one's Dirichlet components likewise (the flat Dirichlet's); each copula's rank
  correlation 12 E[u_i u_j] - 3 matches its bivariate CDF integrated in closed form.
* The pairwise joint probabilities the estimators divide by (ARMS: P(b_i = 1, b_j = 1); CARMS:
  P(z_i = a, z_j = b)) match simulation of the samplers the estimators use.
* ARMS with 2 samples is DisARM (same uniforms, exactly); CARMS with 2 categories is ARMS where
  q(class 0) <= 1/2 (exactly), and otherwise, with the Dirichlet copula, has more variance.
* CARMS lays out the categories as the authors' code does: samples, joint pmf and gradients agree
  draw by draw with a transcription of alekdimi/carms (and the previous layout is told apart).
* ARMS has lower variance than LOO REINFORCE at the same budget (the paper's claim).
* Both are exactly unbiased at n = 3, 4, 6 for both copulas (the generic suite checks n = 4).

Every statistical tolerance is 4.5 standard errors of a Monte Carlo mean; seeds are fixed.
"""
from __future__ import annotations

import dataclasses
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
    orders = A.carms_orderings(K)
    z = A.carms_categories(u, probs.expand(N, K), orders[torch.randint(len(orders), (N,))])
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


def _two_class_setup(copula, n, phi, seed=1):
    """Copula uniforms for the (B, D) Bernoulli logits ``phi``, a joint f over the D coordinates,
    and the 2-class categorical with logits (0, phi) -- the same Bernoulli(sigma(phi)) law."""
    torch.manual_seed(seed)
    cop = A.COPULAS[copula]
    u = cop.sample(n, phi.shape, F64, "cpu")
    w = torch.randn(phi.shape[-1], dtype=F64)
    f = lambda x: torch.sin((x * w).sum(-1) + 0.3) * 3 + (x.sum(-1)) ** 2  # joint over D
    probs = torch.softmax(torch.stack([torch.zeros_like(phi), phi], -1), -1)
    return cop, u, f, probs


def _carms_two_class(u, f, probs, cop):
    """CARMS's samples (as 0/1) and gradient for class 1 on the uniforms u, with its one ordering."""
    order = A.carms_orderings(2).expand(*probs.shape)
    z = A.carms_categories(u, probs, order)
    g = A.carms_weight(f(z.to(F64)).unsqueeze(-1), z, probs, cop)
    torch.testing.assert_close(g[..., 0], -g[..., 1], atol=1e-12, rtol=0)  # logits (0, phi)
    return z.to(F64), g[..., 1]


@pytest.mark.parametrize("copula", COPULAS)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_carms_with_two_categories_is_arms(copula, n):
    """A 2-class categorical with logits (0, phi) is Bernoulli(sigma(phi)).  CARMS's one ordering
    puts class 0 on top of [0, 1] (the authors' layout, A.carms_orderings) and ARMS the rarer
    outcome, so where q(class 0) = sigma(-phi) <= 1/2 (phi = 0 included) the layouts agree and, on
    the same uniforms, so do the samples and the gradients (CARMS's for class 1 is ARMS's, class
    0's its negative).  Before issue #21 CARMS put class 1 on top, and this test took phi < 0."""
    B, D = 200, 3
    phi = torch.rand(B, D, dtype=F64) * 3
    phi[::7] = 0.0  # p = 1/2 exactly: ARMS's tie puts outcome 0 on top too
    cop, u, f, probs = _two_class_setup(copula, n, phi)
    b = A.arms_samples(u, phi)
    g_arms = A.arms_weight(f(b).unsqueeze(-1), b, phi, cop)
    z, g_carms = _carms_two_class(u, f, probs, cop)
    assert torch.equal(z, b)
    torch.testing.assert_close(g_carms, g_arms, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_two_class_carms_is_arms_on_mirrored_uniforms(n):
    """Where q(class 0) > 1/2 the layouts differ: ARMS puts outcome 1 on top, CARMS class 0.  CARMS
    on u is then ARMS on 1 - u, sample by sample and weight by weight, for the Gaussian copula,
    whose law is invariant under u -> 1 - u (x -> -x for its normals; its upper tail is its lower
    one): so with it two-class CARMS equals ARMS in distribution for every q.  Not so for the
    Dirichlet copula (not radially symmetric; the weights differ, asserted)."""
    B, D = 200, 3
    phi = -torch.rand(B, D, dtype=F64) * 3 - 0.01  # q(class 0) > 1/2
    for copula in COPULAS:
        cop, u, f, probs = _two_class_setup(copula, n, phi)
        b = A.arms_samples(1 - u, phi)
        g_arms = A.arms_weight(f(b).unsqueeze(-1), b, phi, cop)
        z, g_carms = _carms_two_class(u, f, probs, cop)
        assert torch.equal(z, b)  # the samples agree whatever the copula
        if copula == "gaussian" or n == 2:  # at n = 2 both copulas are the antithetic pair
            torch.testing.assert_close(g_carms, g_arms, atol=1e-10, rtol=1e-8)
        else:
            assert not torch.allclose(g_carms, g_arms, atol=1e-6, rtol=1e-4)


# ---- the authors' layout, transcribed -----------------------------------------------------------
# A transcription of the authors' CARMS (alekdimi/carms, A.AUTHORS_CODE: antithetic.py
# InverseCategorical, copulas.py Dirichlet with inverted=False as vae.py builds it, vae.py
# matrix_grad), written from their equations as plain loops on Python floats, on their own uniforms
# v = (1 - D)^(n-1): independent of estimators/arms.py, which works on u = 1 - v.

def _authors_orderings(K):
    """InverseCategorical._get_permutations, bottom to top on v: for i < K and j < K-1, position 0
    holds category -i mod K and positions 1..K-1 the others in cyclic order after it, rotated right
    by j (np.roll); of these K(K-1) orderings, those whose first category is below their last."""
    out = []
    for i in range(K):
        first = -i % K
        rest = [(first + k) % K for k in range(1, K)]
        for j in range(K - 1):
            rolled = rest[len(rest) - j:] + rest[:len(rest) - j]
            if first < rolled[-1]:
                out.append([first] + rolled)
    return out


def _authors_bounds(q, ordering):
    """_get_boundaries: {category: (left, right)}, the exclusive and inclusive cumulative sums of q
    along the ordering."""
    bounds, left = {}, 0.0
    for c in ordering:
        bounds[c] = (left, left + q[c])
        left += q[c]
    return bounds


def _authors_sample(v, q, ordering):
    """InverseCategorical.sample, one cell, one uniform: the category with left < v <= right."""
    return next(c for c, (lo, hi) in _authors_bounds(q, ordering).items() if lo < v <= hi)


def _authors_joint(q, n, a, b):
    """InverseCategorical.bivariate_pmf at (a, b): the mean over the orderings of
    C(La, Lb) + C(Ra, Rb) - C(La, Rb) - C(Ra, Lb), C(x, y) = (x^(1/(n-1)) + y^(1/(n-1)) - 1)_+^(n-1)
    (copulas.py, Dirichlet.bivariate_cdf with inverted=False)."""
    C = lambda x, y: max(x ** (1 / (n - 1)) + y ** (1 / (n - 1)) - 1, 0.0) ** (n - 1)
    orderings = _authors_orderings(len(q))
    total = 0.0
    for o in orderings:
        bd = _authors_bounds(q, o)
        (la, ra), (lb, rb) = bd[a], bd[b]
        total += C(la, lb) + C(ra, rb) - C(la, rb) - C(ra, lb)
    return total / len(orderings)


def _authors_grad(fz, z, q, n):
    """vae.py matrix_grad for one cell with the exact ratio q(a) q(b) / Q(a, b) (their training
    code smooths and clips it): 1/(n(n-1)) sum_{i != j} (e_{z_i} - q) (f_i - f_j) ratio(z_i, z_j);
    pairs with z_i = z_j cancel between (i, j) and (j, i) and are left out."""
    K = len(q)
    g = [0.0] * K
    for i in range(n):
        for j in range(n):
            if z[i] == z[j]:
                continue
            w = (fz[i] - fz[j]) * q[z[i]] * q[z[j]] / _authors_joint(q, n, z[i], z[j])
            for k in range(K):
                g[k] += ((z[i] == k) - q[k]) * w
    return [x / (n * (n - 1)) for x in g]


def _old_orderings(K):
    """The layout carms used before issue #21, on u: s at the bottom, the others in natural
    order, t on top (the pair's higher-indexed category in the exclusive tail)."""
    return [[s] + [c for c in range(K) if c not in (s, t)] + [t]
            for s in range(K) for t in range(s + 1, K)]


def _dirichlet_draws(n, N, seed):
    """The same Dirichlet draw D ~ Dir(1_n) per cell, as this module's u and the authors' v."""
    torch.manual_seed(seed)
    u = A.DirichletCopula.sample(n, (N,), F64, "cpu")
    torch.manual_seed(seed)
    e = torch.empty((n, N), dtype=F64).exponential_()  # what DirichletCopula.sample draws
    v = (1 - e / e.sum(0)) ** (n - 1)
    torch.testing.assert_close(u, 1 - v, atol=1e-14, rtol=0)
    return u, v


@pytest.mark.parametrize("K", [2, 3, 4, 5, 6])
def test_carms_orderings_are_the_authors_read_on_u(K):
    """The authors' orderings on v, each reversed (v = 1 - u), are this module's, as a set; the
    old layout is not (for K = 3 it has the same middle but the pair's other end on top)."""
    ours = sorted(A.carms_orderings(K).tolist())
    assert len(ours) == K * (K - 1) // 2
    assert ours == sorted(o[::-1] for o in _authors_orderings(K))
    assert ours != sorted(_old_orderings(K))


@pytest.mark.parametrize("K,n", [(2, 3), (3, 4), (4, 2), (4, 3), (5, 5)])
def test_carms_samples_and_weights_match_the_authors_transcription(K, n):
    """Draw by draw: the same Dirichlet draws and, per cell, the same ordering (the authors' list
    on v, reversed on u) give the same samples; the joint pmf at every pair of categories, and
    the gradient of every cell with the same f values, agree with the transcription to rounding.
    With the old layout in place of the authors' (same draws, each cell's ordering for the same
    pair) samples, joints and gradients all differ: this test tells the layouts apart.  (Not
    K = 3 with n = 2: the old layout is then the authors' mirrored, and the antithetic pair is
    symmetric, so only the samples would differ, not the joint.)"""
    N = 150
    g = torch.Generator().manual_seed(K * 10 + n)
    probs = torch.distributions.Dirichlet(torch.ones(K, dtype=F64)).sample((N,))
    probs = probs.clamp_min(1e-3) / probs.clamp_min(1e-3).sum(-1, keepdim=True)
    u, v = _dirichlet_draws(n, N, seed=K + n)
    auth = _authors_orderings(K)
    pick = torch.randint(len(auth), (N,), generator=g)
    order = torch.tensor([auth[k][::-1] for k in pick.tolist()])  # (N, K), bottom to top on u
    z = A.carms_categories(u, probs, order)
    qs, vs = probs.tolist(), v.T.tolist()
    z_ref = [[_authors_sample(vi, qs[c], auth[pick[c]]) for vi in vs[c]] for c in range(N)]
    assert z.T.tolist() == z_ref

    # the joint at every (a, b) of the first 20 cells: cells (20, K*K), one "pair" per cell
    a, b = (x.reshape(1, 1, -1).expand(1, 20, K * K)
            for x in torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij"))
    p20 = probs[:20].unsqueeze(1).expand(20, K * K, K)
    Q = A.carms_joint(a, b, p20, n, A.DirichletCopula)[0]
    Q_ref = torch.tensor([[_authors_joint(qs[c], n, x, y) for x, y in zip(a[0, 0].tolist(), b[0, 0].tolist())]
                          for c in range(20)], dtype=F64)
    torch.testing.assert_close(Q, Q_ref, atol=1e-13, rtol=1e-11)

    fz = torch.randn(n, N, generator=g, dtype=F64)
    grad = A.carms_weight(fz, z, probs, A.DirichletCopula)
    fs, zs = fz.T.tolist(), z.T.tolist()
    g_ref = torch.tensor([_authors_grad(fs[c], zs[c], qs[c], n) for c in range(N)], dtype=F64)
    torch.testing.assert_close(grad, g_ref, atol=1e-11, rtol=1e-9)

    # the old layout, fed the same draws and pairs, is told apart
    old = {(o[0], o[-1]): o for o in _old_orderings(K)}
    o_old = torch.tensor([old[min(auth[k][0], auth[k][-1]), max(auth[k][0], auth[k][-1])]
                          for k in pick.tolist()])
    z_old = A.carms_categories(u, probs, o_old)
    assert (z_old != z).any(0).float().mean() > 0.3
    Q_old = A.carms_joint(a, b, p20, n, A.DirichletCopula, torch.tensor(_old_orderings(K)))[0]
    assert (Q_old - Q_ref).abs().max() > 1e-3
    g_old = A.carms_weight(fz, z_old, probs, A.DirichletCopula, torch.tensor(_old_orderings(K)))
    assert not torch.allclose(g_old, g_ref, atol=1e-6, rtol=1e-4)


def test_registered_carms_samples_follow_the_authors_joint():
    """End to end: the pairs (z_0, z_1) the registered estimator hands f, over N cells with
    q = (0.1, 0.2, 0.3, 0.4) and n = 3 (Dirichlet copula, the default), have the authors' joint
    pmf within 4.5 SE in every entry, and not the old layout's (max 14 SE away at this N)."""
    from torch import distributions as D
    K, n, N = 4, 3, 50_000
    q = [0.1, 0.2, 0.3, 0.4]
    lg = torch.tensor(q, dtype=F64).log().expand(N, 1, K).clone()
    seen = []

    def f(zh):  # (n, N, 1, K) one-hot
        seen.append(zh.argmax(-1)[..., 0])
        return (zh * torch.arange(K, dtype=F64)).sum((-1, -2))

    torch.manual_seed(7)
    estimators.get("carms").estimate(D.Independent(D.OneHotCategorical(logits=lg), 1), f, n)
    (z,) = seen
    emp = torch.zeros(K * K, dtype=F64).index_add_(0, z[0] * K + z[1], torch.ones(N, dtype=F64))
    emp = emp.div(N).reshape(K, K)
    Q_ref = torch.tensor([[_authors_joint(q, n, x, y) for y in range(K)] for x in range(K)], dtype=F64)
    se = (Q_ref * (1 - Q_ref) / N).sqrt()
    assert ((emp - Q_ref).abs() <= Z_TOL * se + 1 / N).all(), f"\n{emp}\n{Q_ref}"
    a, b = (x.reshape(1, -1) for x in torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij"))
    Q_old = A.carms_joint(a, b, torch.tensor(q, dtype=F64).expand(1, K), n, A.DirichletCopula,
                          torch.tensor(_old_orderings(K))).reshape(K, K)
    assert ((emp - Q_old).abs() > Z_TOL * se + 1 / N).any()


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



def _as_two_class(prob, phi):
    """``prob`` (a Bernoulli problem) at logits phi, and the same problem as a 2-class categorical
    with logits (0, phi), f reading class 1's indicator (no exact gradients: variances only)."""
    bern = dataclasses.replace(prob, params={"logits": phi}, exact={})
    lg = torch.stack([torch.zeros_like(phi), phi], -1)
    make = lambda p: torch.distributions.Independent(torch.distributions.OneHotCategorical(logits=p["logits"]), 1)
    cat = dataclasses.replace(prob, family="categorical", params={"logits": lg}, make_dist=make,
                              f=lambda z: prob.f(z[..., 1]), exact={})
    return bern, cat


@pytest.mark.parametrize("n", [3, 4])
def test_two_class_carms_has_more_variance_than_arms_where_class_0_is_likelier(n):
    """Dirichlet copula, q(class 0) > 1/2 in every coordinate: CARMS's layout puts the likelier
    class 0 in the exclusive top tail, ARMS the rarer outcome 1, and CARMS has the larger variance
    (measured 1.09-1.14x at n = 3, 4, 6 on two problems, SE 0.006); asserted with a 4.5-SE margin.
    The other side, q(class 0) <= 1/2, is equality (test_carms_with_two_categories_is_arms)."""
    prob = bernoulli_problem(seed=0, batch=3, dim=4)
    bern, cat = _as_two_class(prob, -(prob.params["logits"].abs() + 0.1))
    N = 10_000
    torch.manual_seed(100 + n)
    G, _ = estimates(estimators.get("arms"), bern, N, n)
    v_a, se_a = _variance_sum(G["logits"])
    torch.manual_seed(110 + n)
    G, _ = estimates(estimators.get("carms"), cat, N, n)
    v_c, se_c = _variance_sum(G["logits"][..., 1])  # class 0's is its negative
    assert v_c > v_a + Z_TOL * math.hypot(se_a, se_c), f"CARMS {v_c:.4g} vs ARMS {v_a:.4g}"

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


@pytest.mark.parametrize("copula", ["dirichlet", "gaussian"])
@pytest.mark.parametrize("n", [2, 3, 6])
def test_copula_rectangle_is_the_cdfs_inclusion_exclusion(copula, n):
    """``rectangle`` (the Dirichlet copula's in four powers, not eight) is
    C(Ra, Rb) - C(La, Rb) - C(Ra, Lb) + C(La, Lb) to float64 rounding, and is the copula's mass
    of the rectangle: it sums to 1 over a tiling of the square."""
    g = torch.Generator().manual_seed(n)
    cut = torch.sort(torch.rand(5, generator=g, dtype=F64)).values
    ends = torch.cat([torch.zeros(1, dtype=F64), cut, torch.ones(1, dtype=F64)])
    L, R = ends[:-1], ends[1:]
    La, Lb = torch.meshgrid(L, L, indexing="ij")
    Ra, Rb = torch.meshgrid(R, R, indexing="ij")
    C = lambda x, y: A.COPULAS[copula].cdf(x, y, n)
    by_cdf = C(Ra, Rb) - C(La, Rb) - C(Ra, Lb) + C(La, Lb)
    rect = A.COPULAS[copula].rectangle(La, Ra, Lb, Rb, n)
    torch.testing.assert_close(rect, by_cdf, rtol=0, atol=1e-13)
    assert float(rect.sum()) == pytest.approx(1.0, abs=1e-12)
    assert A._integer_power(torch.tensor([1.5], dtype=F64), 5).item() == pytest.approx(1.5**5, rel=1e-15)
