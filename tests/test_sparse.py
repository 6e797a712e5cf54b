"""Sparse / structured / argmax-surrogate estimators: sparsemax, sparsemap, spigot, hardkuma.

Each is checked against an independent computation: brute-force enumeration with itertools,
the sparsemax closed form, SparseMAP's KKT optimality conditions, finite differences, and a
hand-computed SPIGOT projection.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from entmax import entmax15, sparsemax
from torch import distributions as D

import estimators
from estimators.hardkuma import hardkuma_ab
from estimators.sparse import SparseMAPChain, chain_viterbi, sparsemap_chain_solve


class Counting:
    def __init__(self, f):
        self.f, self.shapes = f, []

    def __call__(self, z):
        self.shapes.append(tuple(z.shape))
        return self.f(z)


def _brute_sparse(cell_p, f, family):
    """sum over the FULL product space of prod_c p_c(k_c) f(z) for one batch of cells.

    cell_p: (B, nc, K).  Configurations outside the sparse support get weight exactly 0.
    """
    B, nc, K = cell_p.shape
    total = 0.0
    for ks in itertools.product(range(K), repeat=nc):
        idx = torch.tensor(ks)
        w = cell_p[:, torch.arange(nc), idx].prod(-1)  # (B,)
        if family == "bernoulli":
            z = idx.to(cell_p.dtype).expand(B, nc)
        else:
            z = torch.nn.functional.one_hot(idx, K).to(cell_p.dtype).expand(B, nc, K)
        total = total + w * f(z[None])[0]
    return total


def _bern_f(z):
    w = torch.tensor([0.7, -1.3, 0.4], dtype=z.dtype)
    return torch.sin((z * w).sum(-1)) + z.prod(-1) * 2.0


def _cat_f(z):
    r = torch.tensor([[0.5, -1.0, 0.2, 1.5], [1.0, 0.3, -0.7, 0.1]], dtype=z.dtype)
    u = (z * r).sum((-1, -2))
    return u ** 2 + (z[..., 0, :] * z[..., 1, :]).sum(-1)


@pytest.mark.parametrize("mapping", ["sparsemax", "entmax15"])
@pytest.mark.parametrize("family", ["bernoulli", "categorical"])
def test_sparse_marginalisation_equals_brute_force(family, mapping):
    g = torch.Generator().manual_seed(0)
    if family == "bernoulli":
        logits = (torch.randn(5, 3, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
        dist = D.Independent(D.Bernoulli(logits=logits), 1)
        scores = torch.stack([torch.zeros_like(logits), logits], -1)
        f = _bern_f
    else:
        logits = (torch.randn(5, 2, 4, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
        dist = D.Independent(D.OneHotCategorical(logits=logits), 1)
        scores = logits
        f = _cat_f
    est = estimators.get("sparsemax", mapping=mapping)
    counted = Counting(f)
    e = est.estimate(dist, counted, 7)  # the budget is ignored
    (g_est,) = torch.autograd.grad(e.surrogate, logits)

    p = (sparsemax if mapping == "sparsemax" else entmax15)(scores, dim=-1)
    assert (p == 0).any(), "test needs some exact zeros to exercise the sparse support"
    brute = _brute_sparse(p, f, family)
    (g_brute,) = torch.autograd.grad(brute.sum(), logits)
    torch.testing.assert_close(e.value, brute.detach())
    torch.testing.assert_close(g_est, g_brute)
    # n_evals = padded support size = max over the batch of prod of per-cell support sizes
    sizes = (p > 0).sum(-1).prod(-1)
    assert e.n_evals == int(sizes.max())
    assert sizes.min() < sizes.max()  # elements with smaller supports are padded (weight 0)
    assert [s[0] for s in counted.shapes] == [e.n_evals]


@pytest.mark.parametrize("family", ["bernoulli", "categorical"])
def test_sparsemax_confident_logits_give_the_argmax_point_mass(family):
    if family == "bernoulli":
        logits = torch.tensor([[3.0, -2.5, 1.5], [-4.0, 2.0, -1.2]], requires_grad=True)
        dist = D.Independent(D.Bernoulli(logits=logits), 1)
        z_star = (logits > 0).float()
        f = lambda z: (z * torch.tensor([1.0, 2.0, -3.0])).sum(-1) ** 2
    else:
        logits = torch.tensor([[[4.0, 0.0, -1.0], [0.0, 2.5, 1.0]]], requires_grad=True)
        dist = D.Independent(D.OneHotCategorical(logits=logits), 1)
        z_star = torch.nn.functional.one_hot(logits.argmax(-1), 3).float()
        f = lambda z: (z * torch.arange(3.0)).sum((-1, -2)) ** 2
    e = estimators.get("sparsemax").estimate(dist, f, 4)
    assert e.n_evals == 1
    torch.testing.assert_close(e.value, f(z_star[None])[0])
    (g,) = torch.autograd.grad(e.surrogate, logits)
    assert torch.equal(g, torch.zeros_like(g))  # a flat region of sparsemax: no gradient


def test_sparsemax_options_and_limits():
    est = estimators.get("sparsemax", mapping="entmax15")
    assert est.display_name == "sparsemax[mapping=entmax15]"
    with pytest.raises(ValueError, match="mapping='softmax' must be one of"):
        estimators.get("sparsemax", mapping="softmax")
    # the default bound is exact's, 2^11: categorical_vae's 8x4 at the start of training (every
    # class kept, 4096 configurations) is out of it, as it is out of exact's
    assert estimators.get("sparsemax").config["max_configs"] == estimators.get("exact").config["max_configs"]
    dist = D.Independent(D.Bernoulli(logits=torch.zeros(2, 12)), 1)  # every cell has support 2
    with pytest.raises(ValueError, match=r"4096 joint configurations .* max_configs=2048"):
        estimators.get("sparsemax").estimate(dist, lambda z: z.sum(-1), 1)
    e = estimators.get("sparsemax", max_configs=2**12).estimate(dist, lambda z: z.sum(-1), 1)
    torch.testing.assert_close(e.value, torch.full((2,), 6.0))


# ---- SparseMAP -----------------------------------------------------------------------------------
def test_sparsemap_single_cell_is_sparsemax_over_zero_and_logit():
    logits = torch.tensor([-1.7, -0.4, 0.0, 0.3, 0.95, 2.2], dtype=torch.float64)
    f = lambda z: torch.cos(3 * z) + 2 * z  # non-linear: the weights, not just the mean, matter
    grads = []
    for name in ["sparsemap", "sparsemax"]:
        p = logits.clone().requires_grad_()
        e = estimators.get(name).estimate(D.Bernoulli(logits=p), f, 1)
        grads.append((e.value, torch.autograd.grad(e.surrogate, p)[0], e.n_evals))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert grads[0][2] == grads[1][2] == 2
    # closed form: sparsemax([0, t])_1 = clamp((t + 1) / 2, 0, 1)
    q = ((logits + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(grads[0][0], q * f(torch.ones(())) + (1 - q) * f(torch.zeros(())))


def test_sparsemap_without_transition_has_sparsemax_marginals():
    theta = torch.randn(50, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xi, Z, active, done = sparsemap_chain_solve(theta, 0.0)
    assert done.all()
    mu = (xi[..., None] * Z).sum(1)
    torch.testing.assert_close(mu, ((theta + 1) / 2).clamp(0, 1))


def test_viterbi_matches_enumeration():
    theta = torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    allz = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)), dtype=torch.float64)
    for t in (-0.8, 0.0, 1.3):
        scores = allz @ theta.T + t * (allz[:, :-1] * allz[:, 1:]).sum(-1, keepdim=True)  # (16, 40)
        z, v = chain_viterbi(theta, t)
        torch.testing.assert_close(v, scores.max(0).values)
        torch.testing.assert_close(z, allz[scores.argmax(0)])


@pytest.mark.parametrize("transition", [0.0, 0.8, -0.6])
def test_sparsemap_solution_is_a_valid_optimal_sparse_distribution(transition):
    Dn = 4
    theta = torch.randn(64, Dn, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 1.2
    xi, Z, active, done = sparsemap_chain_solve(theta, transition)
    assert done.all()
    torch.testing.assert_close(xi.sum(-1), torch.ones(64, dtype=torch.float64))
    assert (xi >= 0).all() and (xi[~active] == 0).all() and (xi[active] > 0).all()
    assert ((Z == 0) | (Z == 1)).all()
    for n in range(64):  # active structures are distinct (a tiny loop in a test only)
        act = Z[n][active[n]]
        assert len({tuple(r.tolist()) for r in act}) == act.shape[0] <= Dn + 1
    # KKT / optimality certificate over all 2^D structures: the gradient of the SparseMAP objective
    # c_s - m_s . mu is maximal (= tau) on every active structure
    allz = torch.tensor(list(itertools.product([0.0, 1.0], repeat=Dn)), dtype=torch.float64)
    mu = (xi[..., None] * Z).sum(1)

    def gain(z):  # z (..., S, D) with (N, ...) leading
        c = (z * theta[:, None]).sum(-1) + transition * (z[..., :-1] * z[..., 1:]).sum(-1)
        return c - (z * mu[:, None]).sum(-1) - ((1 - z) * (1 - mu[:, None])).sum(-1)

    best = gain(allz[None].expand(64, -1, -1)).max(-1).values
    g_act = gain(Z)
    assert (g_act[active] - best[active.nonzero()[:, 0]]).abs().max() < 1e-9
    assert active.sum(-1).max() >= 2  # the test exercises non-trivial active sets


@pytest.mark.parametrize("transition", [0.0, 0.7])
def test_sparsemap_jacobian_matches_finite_differences(transition):
    theta = (torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
             * 0.6).requires_grad_()
    assert SparseMAPChain.apply(theta, transition, 20)[2].sum(-1).max() >= 3
    assert torch.autograd.gradcheck(lambda t: SparseMAPChain.apply(t, transition, 20)[0], (theta,),
                                    eps=1e-6, atol=1e-6)


def test_sparsemap_estimator_gradient_matches_finite_differences():
    logits = torch.tensor([[0.3, -0.2, 0.5, 0.1], [1.2, -0.4, 0.2, -0.9]], dtype=torch.float64)
    f = lambda z: torch.sin(z @ torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=z.dtype)) + z.prod(-1)
    est = estimators.get("sparsemap", transition=0.6)

    def objective(t):
        return est.estimate(D.Independent(D.Bernoulli(logits=t), 1), f, 1).surrogate

    p = logits.clone().requires_grad_()
    e = est.estimate(D.Independent(D.Bernoulli(logits=p), 1), f, 1)
    (g,) = torch.autograd.grad(e.surrogate, p)
    fd = torch.zeros_like(logits)
    h = 1e-6
    for i in range(2):
        for j in range(4):
            d = torch.zeros_like(logits)
            d[i, j] = h
            fd[i, j] = (objective(logits + d) - objective(logits - d)) / (2 * h)
    torch.testing.assert_close(g, fd, atol=1e-6, rtol=1e-5)
    assert 2 <= e.n_evals <= 5


# ---- SparseMAP: the vectorised solver against the original loops -------------------------------
from benchmarks.sparsemap_reference import old_chain_viterbi as _viterbi_loop  # noqa: E402
from benchmarks.sparsemap_reference import old_sparsemap_chain_solve as _solve_reference  # noqa: E402


def _assert_same_solution(fast, ref):
    """Same structures in the same slots, same weights and flags; the fast solver returns only the
    slots it used (every slot past them is empty in the reference)."""
    xi, Z, active, conv = fast
    xr, Zr, ar, cr = ref
    S = xi.shape[1]
    assert not ar[:, S:].any()
    assert torch.equal(active, ar[:, :S]) and torch.equal(conv, cr)
    assert torch.equal(Z * active[..., None], Zr[:, :S] * ar[:, :S, None])
    torch.testing.assert_close(xi, xr[:, :S], rtol=0, atol=1e-10)


@pytest.mark.parametrize("transition", [0.0, 0.7, -0.6, 2.5])
@pytest.mark.parametrize("Dn", [1, 2, 3, 17, 64])
def test_viterbi_matches_the_loop_reference(Dn, transition):
    g = torch.Generator().manual_seed(Dn)
    u = torch.randn(97, Dn, dtype=torch.float64, generator=g) * 1.5
    z, v = chain_viterbi(u, transition)
    zr, vr = _viterbi_loop(u, transition)
    assert torch.equal(z, zr)
    torch.testing.assert_close(v, vr)
    # exact ties (integer scores): both break them the same way (towards 0)
    u = torch.randint(-1, 2, (97, Dn), generator=g).double()
    for t in (0.0, 1.0, -1.0):
        z, v = chain_viterbi(u, t)
        zr, vr = _viterbi_loop(u, t)
        assert torch.equal(z, zr) and torch.equal(v, vr)


@pytest.mark.parametrize("sync_every", [0, 8])
@pytest.mark.parametrize("transition,Dn,max_iter", [
    (0.0, 120, 100),  # long decoupled chains: every chain converges, ~30-40 structures each
    (0.0, 120, 20),  # too few slots: both stop the same chains at the same place, unconverged
    (0.7, 30, 200),  # coupled chains (with removals from the active set)
    (-0.6, 30, 200),
    (0.8, 4, 50),
    (-1.5, 1, 50),  # bare cells
])
@pytest.mark.slow
def test_sparsemap_solver_matches_the_reference(transition, Dn, max_iter, sync_every):
    g = torch.Generator().manual_seed(Dn)
    theta = torch.randn(6, Dn, dtype=torch.float64, generator=g) * 0.8
    fast = sparsemap_chain_solve(theta, transition, max_iter, sync_every=sync_every)
    ref = _solve_reference(theta, transition, max_iter)
    _assert_same_solution(fast, ref)
    if max_iter == 20:
        assert not fast[3].all()  # the case exercises unconverged chains
    else:
        assert fast[3].all()


def test_sparsemap_without_transition_has_the_closed_form_on_long_chains():
    """With transition 0 the score is linear in the marginals mu = E_xi[z] and the regulariser is
    1/2 ||M xi||^2 = 1/2 sum_d (1 - mu_d)^2 + mu_d^2, so the QP separates over the coordinates:
    max_{mu_d in [0, 1]} theta_d mu_d - 1/2 ((1 - mu_d)^2 + mu_d^2), whose solution is
    mu_d = clip((theta_d + 1) / 2, 0, 1) (the 2-class sparsemax of [0, theta_d]).  Binary-VAE-like
    logits (almost every |theta_d| < 1, so almost every coordinate fractional) need ~50-56
    structures at D = 200: the old default max_iter=50 (51 slots) ran out of slots on most
    chains."""
    g = torch.Generator().manual_seed(7)
    theta = torch.randn(12, 200, dtype=torch.float64, generator=g) * 0.4
    closed = ((theta + 1) / 2).clamp(0, 1)
    xi, Z, active, conv = sparsemap_chain_solve(theta, 0.0, 1000)
    assert conv.all()
    mu = (xi[..., None] * Z).sum(1)
    # the active set stops when no structure gains more than tol = 1e-9: mu is within ~1e-8
    torch.testing.assert_close(mu, closed, rtol=0, atol=1e-7)
    assert (xi >= 0).all() and (xi[~active] == 0).all()
    torch.testing.assert_close(xi.sum(-1), torch.ones(12, dtype=torch.float64))
    sizes = active.sum(-1)
    assert (sizes > 51).any() and (sizes <= 201).all()
    xi50, Z50, a50, conv50 = sparsemap_chain_solve(theta, 0.0, 50)
    assert not conv50[sizes > 51].any()  # too few slots: not converged (the estimator warns)
    assert conv50[sizes <= 51].all()
    keep = conv50  # where both converge, the answers are the same
    S = xi50.shape[1]
    torch.testing.assert_close(xi50[keep], xi[keep, :S], rtol=0, atol=1e-10)
    assert not xi[keep, S:].any()


from benchmarks.sparsemap_reference import OldSparseMAPChain as _ReferenceChain  # noqa: E402


@pytest.mark.parametrize("transition", [0.0, 0.6])
def test_sparsemap_estimate_matches_the_reference_implementation(transition, monkeypatch):
    from estimators import sparse

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(5, 40, generator=g) * 0.7
    w = torch.randn(40, generator=g)
    f = lambda z: torch.sin(z @ w) + (z[..., :-1] * z[..., 1:]).sum(-1) * 0.1
    est = estimators.get("sparsemap", transition=transition)
    out = []
    for chain in (sparse.SparseMAPChain, _ReferenceChain):
        monkeypatch.setattr(sparse, "SparseMAPChain", chain)
        p = logits.clone().requires_grad_()
        e = est.estimate(D.Independent(D.Bernoulli(logits=p), 1), f, 1)
        out.append((e.value, torch.autograd.grad(e.surrogate, p)[0], e.n_evals))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])
    assert out[0][2] == out[1][2] >= 3


# ---- SPIGOT --------------------------------------------------------------------------------------
def test_spigot_categorical_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 0.0]], requires_grad=True)
    r = torch.tensor([0.3, -0.2, 0.1])
    f = Counting(lambda z: (z * r).sum(-1))
    e = estimators.get("spigot").estimate(D.OneHotCategorical(logits=logits), f, 10)
    assert e.n_evals == 1 and f.shapes == [(1, 1, 3)]
    torch.testing.assert_close(e.value, torch.tensor([-0.2]))  # f at the argmax one-hot [0, 1, 0]
    (g,) = torch.autograd.grad(e.surrogate, logits)
    # z_hat + eta * df/dz = [0.3, 0.8, 0.1]; its simplex projection subtracts tau = (1.2 - 1) / 3
    p = torch.tensor([0.3, 0.8, 0.1]) - 0.2 / 3
    torch.testing.assert_close(g[0], p - torch.tensor([0.0, 1.0, 0.0]))
    # the estimate is linear in the outer gradient: -surrogate gives exactly -g (training uses it)
    e2 = estimators.get("spigot").estimate(D.OneHotCategorical(logits=logits), f, 1)
    (g2,) = torch.autograd.grad(-e2.surrogate, logits)
    torch.testing.assert_close(g2, -g)


def test_spigot_bernoulli_hand_computed_and_eta():
    logits = torch.tensor([1.0, -1.0, 0.5, -0.3], requires_grad=True)
    w = torch.tensor([-0.4, 2.0, 0.3, -0.5])
    f = lambda z: z * w  # bare Bernoulli: one cell per batch element
    e = estimators.get("spigot").estimate(D.Bernoulli(logits=logits), f, 1)
    torch.testing.assert_close(e.value, torch.tensor([-0.4, 0.0, 0.3, 0.0]))
    (g,) = torch.autograd.grad(e.surrogate, logits)
    # clamp(z_hat + w, 0, 1) - z_hat with z_hat = [1, 0, 1, 0]
    torch.testing.assert_close(g, torch.tensor([-0.4, 1.0, 0.0, 0.0]))
    e = estimators.get("spigot", eta=0.5).estimate(D.Bernoulli(logits=logits), f, 1)
    (g,) = torch.autograd.grad(e.surrogate, logits)
    torch.testing.assert_close(g, torch.tensor([-0.2, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="eta=0.0 must be > 0"):
        estimators.get("spigot", eta=0.0)


# ---- HardKuma ------------------------------------------------------------------------------------
def test_hardkuma_shapes_map_and_endpoint_mass():
    a, b = hardkuma_ab(torch.tensor([0.0]))
    torch.testing.assert_close((a, b), (torch.ones(1), torch.ones(1)))
    torch.manual_seed(0)
    n = 20000
    logits = torch.tensor([-2.0, 0.0, 2.0], requires_grad=True)
    zs = []
    e = estimators.get("hardkuma").estimate(D.Bernoulli(logits=logits), Counting(lambda z: zs.append(z)
                                            or (z - 0.3) ** 2), n)
    z = zs[0].detach()
    assert e.n_evals == n and z.shape == (n, 3)
    assert ((z >= 0) & (z <= 1)).all()
    # endpoint masses from the Kumaraswamy CDF F(x) = 1 - (1 - x^a)^b at the stretched 0 and 1:
    # P(z = 0) = F(1/12), P(z = 1) = 1 - F(11/12); at logit 0 (a = b = 1) both are exactly 1/12
    a, b = hardkuma_ab(logits.detach().double())
    p0 = 1 - (1 - (1 / 12) ** a) ** b
    p1 = (1 - (11 / 12) ** a) ** b
    assert (p0 > 0).all() and (p1 > 0).all()
    torch.testing.assert_close((p0[1], p1[1]), (torch.tensor(1 / 12).double(),) * 2)
    for frac, p in [((z == 0).double().mean(0), p0), ((z == 1).double().mean(0), p1)]:
        assert ((frac - p).abs() < 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (frac, p)
    above = (z > 0.5).double().mean(0)
    assert above[0] < above[1] < above[2]  # P(z > 1/2) increases with the logit
    (g,) = torch.autograd.grad(e.surrogate, logits)
    assert torch.isfinite(g).all() and (g != 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hardkuma_gradient_is_finite_for_extreme_logits(dtype):
    torch.manual_seed(1)
    logits = torch.tensor([-40.0, -8.0, 0.0, 8.0, 40.0], dtype=dtype, requires_grad=True)
    e = estimators.get("hardkuma").estimate(D.Bernoulli(logits=logits), lambda z: (z - 0.3) ** 2, 512)
    (g,) = torch.autograd.grad(e.surrogate, logits)
    assert torch.isfinite(g).all() and torch.isfinite(e.value).all()
    assert e.value[0] == pytest.approx(0.09, abs=1e-3) and e.value[-1] == pytest.approx(0.49, abs=1e-3)
