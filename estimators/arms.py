"""Copula-coupled multi-sample estimators: ARMS (binary) and CARMS (categorical).

Both draw the n samples of every latent cell through an n-dimensional *copula* -- n uniforms with
exactly uniform marginals but negative pairwise dependence -- so that each sample is an exact draw
of q while the n of them are mutually antithetic (spread over the support, fewer duplicates).  The
leave-one-out REINFORCE estimator built on such samples is biased, because the leave-one-out
baseline of sample i is no longer independent of sample i; the bias involves only the *pairwise*
joint law of two coupled samples, which the copula gives in closed form, so it can be corrected
exactly:

* ARMS multiplies the per-coordinate LOO estimate by the constant p(1-p) / P(b_i = 1, b_j = 0);
* CARMS importance-weights every pair of samples by q(a) q(b) / P(z_i = a, z_j = b).

Copulas (one per latent cell, over the n samples; cells are independent):

* Dirichlet: D ~ Dirichlet(1, ..., 1) of dimension n, u_i = F(D_i) with F(x) = 1 - (1 - x)^(n-1) the
  CDF of its Beta(1, n-1) marginal.  Two u's cannot both exceed F(1/2), since two D's cannot both
  exceed 1/2: the top of the unit interval is hit by at most one sample.
* Gaussian: equicorrelated normals with correlation -1/(n-1) (the most negative an exchangeable
  n-vector allows), u_i = Phi(x_i).

With n = 2 both copulas are the antithetic pair (u, 1 - u).

Every estimator here spends exactly n evaluations of f, in one call, and returns the surrogate of
:func:`estimators.antithetic.logit_surrogate`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import families as fam
from .antithetic import logit_surrogate
from .base import Estimate, Estimator, Option, check_f_output

# Gauss-Legendre rule on [-1, 1] for the bivariate-normal integral below: for n >= 3, |rho| <= 1/2
# keeps the integrand smooth, far from its singularity at |r| = 1, and 12 nodes already agree with
# scipy's CDF to 4e-16 (tests/test_arms.py); 20 leave a margin
_GL_X, _GL_W = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(20))


# ---- copulas ----------------------------------------------------------------------------------
def _integer_power(x, k: int):
    """x^k for an integer k >= 1 by repeated squaring (torch's pow takes a generic path for most
    exponents: several times the cost of the few products)."""
    out = None
    while k:
        if k & 1:
            out = x if out is None else out * x
        k >>= 1
        if k:
            x = x * x
    return out


class DirichletCopula:
    """The Dirichlet copula (Dimitriev & Zhou 2021, ARMS, Sec. 3): u_i = F(D_i), D ~ Dir(1_n),
    F(x) = 1 - (1-x)^(n-1) the Beta(1, n-1) CDF."""

    @staticmethod
    def sample(n, shape, dtype, device):
        e = torch.empty((n, *shape), dtype=dtype, device=device).exponential_()
        d = e / e.sum(0, keepdim=True)  # flat Dirichlet over the sample axis
        return -torch.expm1((n - 1) * torch.log1p(-d))  # 1 - (1-d)^(n-1) without cancellation

    @staticmethod
    def cdf(p, q, n):
        """C(p, q) = P(u_i <= p, u_j <= q).  From P(D_i > s, D_j > t) = (1 - s - t)_+^(n-1) for a
        flat Dirichlet and inclusion-exclusion: p + q - 1 + ((1-p)^a + (1-q)^a - 1)_+^(n-1),
        a = 1/(n-1)."""
        a = 1.0 / (n - 1)
        return p + q - 1 + ((1 - p) ** a + (1 - q) ** a - 1).clamp_min(0) ** (n - 1)

    @staticmethod
    def rectangle(La, Ra, Lb, Rb, n):
        """P(u_i in [La, Ra), u_j in [Lb, Rb)) = C(Ra, Rb) - C(La, Rb) - C(Ra, Lb) + C(La, Lb): the
        linear parts of :meth:`cdf` cancel, leaving h(P_Ra + P_Rb - 1) - h(P_La + P_Rb - 1)
        - h(P_Ra + P_Lb - 1) + h(P_La + P_Lb - 1) with P_x = (1-x)^a and h(t) = t_+^(n-1): four
        fractional powers instead of eight, and h by multiplication (what a CARMS step spends
        most of its time on, at a sentence's K(K-1)/2 orderings)."""
        a = 1.0 / (n - 1)
        PLa, PRa, PLb, PRb = ((1 - x.clamp(0, 1)) ** a for x in (La, Ra, Lb, Rb))
        h = lambda t: _integer_power((t - 1).clamp_min(0), n - 1)
        return h(PRa + PRb) - h(PLa + PRb) - h(PRa + PLb) + h(PLa + PLb)

    @staticmethod
    def upper_tail(q, n):
        """P(u_i > 1-q, u_j > 1-q) = (2 q^(1/(n-1)) - 1)_+^(n-1), computed directly (no
        cancellation for small q): zero for q <= 2^-(n-1)."""
        return (2 * q ** (1.0 / (n - 1)) - 1).clamp_min(0) ** (n - 1)


def _bvn_cdf(h, k, rho):
    """Phi_2(h, k; rho), standard bivariate normal CDF, for |rho| <= 1/2, from
    Phi_2 = Phi(h) Phi(k) + 1/(2 pi) int_0^rho exp(-(h^2 - 2 r h k + k^2) / (2 (1 - r^2))) / sqrt(1 - r^2) dr
    (Plackett's identity d Phi_2 / d rho = phi_2, integrated; Drezner & Wesolowsky 1990) by
    Gauss-Legendre quadrature.  h, k are clipped to +-40, where Phi is 0 or 1 in float64."""
    h, k = h.clamp(-40, 40).unsqueeze(-1), k.clamp(-40, 40).unsqueeze(-1)
    x, w = _GL_X.to(h), _GL_W.to(h)
    r = rho * (x + 1) / 2
    one = 1 - r * r
    integrand = torch.exp(-(h * h - 2 * r * h * k + k * k) / (2 * one)) / one.sqrt()
    integral = (rho / 2) * (integrand * w).sum(-1)
    nd = torch.special.ndtr
    return nd(h.squeeze(-1)) * nd(k.squeeze(-1)) + integral / (2 * math.pi)


class GaussianCopula:
    """The Gaussian copula with equicorrelation -1/(n-1) (Dimitriev & Zhou 2021, ARMS, Sec. 3):
    x_i = sqrt(n/(n-1)) (e_i - mean(e)), e iid N(0, 1), has unit variances and correlations
    -1/(n-1); u_i = Phi(x_i)."""

    @staticmethod
    def sample(n, shape, dtype, device):
        e = torch.randn((n, *shape), dtype=dtype, device=device)
        x = (e - e.mean(0, keepdim=True)) * math.sqrt(n / (n - 1))
        return torch.special.ndtr(x)

    @staticmethod
    def cdf(p, q, n):
        """C(p, q) = Phi_2(Phi^-1(p), Phi^-1(q); -1/(n-1)); for n = 2 the countermonotone
        max(p + q - 1, 0).  (The authors call scipy's multivariate-normal CDF on a jittered
        covariance; the quadrature of :func:`_bvn_cdf` is exact to float64 rounding.)"""
        if n == 2:
            return (p + q - 1).clamp_min(0)
        ndtri = torch.special.ndtri
        return _bvn_cdf(ndtri(p), ndtri(q), -1.0 / (n - 1)).clamp(min=0)

    @classmethod
    def upper_tail(cls, q, n):
        """P(u_i > 1-q, u_j > 1-q) = C(q, q): the Gaussian copula is radially symmetric."""
        return cls.cdf(q, q, n)

    @classmethod
    def rectangle(cls, La, Ra, Lb, Rb, n):
        """P(u_i in [La, Ra), u_j in [Lb, Rb)) = C(Ra, Rb) - C(La, Rb) - C(Ra, Lb) + C(La, Lb)."""
        C = lambda x, y: cls.cdf(x.clamp(0, 1), y.clamp(0, 1), n)
        return C(Ra, Rb) - C(La, Rb) - C(Ra, Lb) + C(La, Lb)


COPULAS = {"dirichlet": DirichletCopula, "gaussian": GaussianCopula}


# ---- ARMS -------------------------------------------------------------------------------------
def arms_samples(u, logits):
    """The binary samples of ARMS from copula uniforms ``u`` (n, *logits.shape):
    b = 1[u > 1 - p] where p < 1/2, b = 1[u < p] otherwise.  Each is Bernoulli(p) whatever the
    copula; the orientation puts the *rarer* outcome in the copula's top tail, where the Dirichlet
    copula's samples exclude each other (the choice the authors' code makes at p = 1/2)."""
    p = torch.sigmoid(logits.detach())
    return torch.where(p < 0.5, u > 1 - p, u < p).to(logits.dtype)


def arms_pair_prob(p, n, copula):
    """P(b_i = 1, b_j = 1) for two of the n coupled ARMS samples of a Bernoulli(p),
    = p - P(b_i = 1, b_j = 0) with P(b_i = 1, b_j = 0) = m - T(m), m = min(p, 1-p), T the copula's
    upper tail (:func:`arms_discordance`)."""
    return p - arms_discordance(p, n, copula)


def arms_discordance(p, n, copula):
    """P(b_i = 1, b_j = 0) = P(b_i = 0, b_j = 1) for two coupled ARMS samples: with m = min(p, 1-p)
    the rarer outcome's probability, it is m - P(both rare) = m - T(m), T(m) = P(u_i > 1-m,
    u_j > 1-m) (both orientations of :func:`arms_samples` put the rare outcome in the top tail)."""
    m = torch.minimum(p, 1 - p)
    return m - copula.upper_tail(m, n)


def arms_weight(fz, b, logits, copula):
    """ARMS (Dimitriev & Zhou 2021, ICML, the ARMS theorem of Sec. 3): per coordinate d,

        g_d = 1/(n-1) sum_i (f(b_i) - mean_j f(b_j)) (b_id - p_d) * p_d (1 - p_d) / (p_d - P(b_id = 1, b_jd = 1)).

    The first factor is the LOO REINFORCE estimate (Kool et al. 2019) for d/dphi_d.  Why the
    factor: for i != j, E[f(b_j)(b_id - p_d)] = (P11 - p^2) Delta_d rather than 0 (the coupled b_jd
    informs b_id), while E[f(b_i)(b_id - p_d)] = p(1-p) Delta_d, Delta_d = E[f | b_d = 1] -
    E[f | b_d = 0], because the other coordinates are coupled independently of coordinate d; so the
    LOO estimate has mean (p - P11) Delta_d and the true gradient is p(1-p) Delta_d.  Exactly
    unbiased for any copula; it is LOO REINFORCE for an independent one (P11 = p^2).

    ``fz`` (n, *batch, 1...) detached and broadcast over the event dims; ``b`` (n, *logits.shape).
    The debias factor is computed in float64."""
    n = b.shape[0]
    lg = logits.detach()
    p = torch.sigmoid(lg)
    l64 = lg.double()  # from the logits: sigmoid(30) is 1 in float32 and the factor would be 0/0
    disc = arms_discordance(torch.sigmoid(l64), n, copula)
    pq = torch.sigmoid(l64) * torch.sigmoid(-l64)
    # where even float64 rounds the rare outcome's probability m to 0, the factor's limit
    # p(1-p)/m -> sigma(|phi|) (the copula's tail T(m) vanishes faster than m)
    debias = torch.where(disc > 0, pq / disc.clamp_min(1e-300), torch.sigmoid(l64.abs())).to(lg.dtype)
    loo = ((fz - fz.mean(0, keepdim=True)) * (b - p)).sum(0) / (n - 1)
    return loo * debias


class _Coupled(Estimator):
    """What ARMS and CARMS share: n samples coupled through a copula (``copula`` option), one call
    of f on all of them, exactly unbiased, at least two samples."""

    unbiased = True
    options = {"copula": Option("dirichlet", "the copula coupling the n samples",
                                choices=tuple(COPULAS))}
    min_samples = 2

    @property
    def copula(self):
        return COPULAS[self.config["copula"]]


class ARMS(_Coupled):
    """ARMS, Antithetic-REINFORCE-Multi-Sample (Dimitriev & Zhou 2021, "ARMS: Antithetic-REINFORCE-
    Multi-Sample gradient for binary variables", ICML, arXiv:2105.14141, the ARMS theorem of
    Sec. 3 with the Dirichlet and Gaussian copulas defined there):

        g_d = 1/(n-1) sum_i (f(b_i) - mean_j f(b_j)) (b_id - sigma(phi_d))
              * sigma(phi_d) sigma(-phi_d) / (sigma(phi_d) - P(b_id = 1, b_jd = 1)),

    where b_1..b_n are Bernoulli(sigma(phi)) samples coupled through an n-dimensional copula,
    independently per coordinate, and P(b_id = 1, b_jd = 1) is the copula's bivariate CDF at
    (p, p) (closed form for the Dirichlet copula, a bivariate normal CDF for the Gaussian one).

    Why it helps: the coupled samples are mutually antithetic -- for p < 2^-(n-1) the Dirichlet
    copula never draws two 1s in a coordinate -- so the n evaluations cover the support better
    than independent ones; the debias factor (see :func:`arms_weight`) keeps it exactly unbiased.
    It reduces to LOO REINFORCE with independent samples and to DisARM with n = 2 (the copula is
    then the antithetic pair (u, 1-u) and the factor is sigma(|phi|)).  f is the joint function of
    the whole latent vector; the weights are per coordinate.  n evaluations in one call of f;
    needs n >= 2."""

    name = "arms"
    families = frozenset({"bernoulli"})
    paper = ("Dimitriev & Zhou (2021), ARMS: Antithetic-REINFORCE-Multi-Sample gradient for binary "
             "variables, ICML, arXiv:2105.14141, Sec. 3 (ARMS theorem; Dirichlet and Gaussian copulas)")

    def _estimate(self, dist, f, n, context, family):
        logits = fam.params(dist)["logits"]
        lg = logits.detach()
        copula = self.copula
        u = copula.sample(n, lg.shape, lg.dtype, lg.device)
        b = arms_samples(u, lg)
        fz = check_f_output(f(b), n, dist.batch_shape, self.name)
        fd = fz.detach().reshape(n, *dist.batch_shape, *([1] * len(dist.event_shape)))
        g = arms_weight(fd, b, lg, copula)
        return Estimate(logit_surrogate(logits, g, fz), fz.detach().mean(0), n)


# ---- CARMS ------------------------------------------------------------------------------------
#: Where the layout below was read: the authors' code, commit and files.
AUTHORS_CODE = ("alekdimi/carms", "19ebc2e9db4172fd64118ade16c003b5e24caf24",
                "antithetic.py (InverseCategorical), copulas.py (Dirichlet), vae.py")


def carms_orderings(K, device=None):
    """The layout of CARMS's categories on [0, 1]: K(K-1)/2 orderings, one per pair of categories
    s < t, as a long tensor (K(K-1)/2, K) whose rows list the categories bottom to top; each cell
    draws one uniformly.  In the ordering of (s, t) the pair sits at the two ends:

        t, then the others in descending cyclic order from t (t-1, ..., s+1, s-1, ..., 0, K-1,
        ..., t+1), and s on top,

    so s, the lower-indexed of the pair, gets the top of [0, 1], the Dirichlet copula's exclusive
    tail (two samples never both land above F(1/2)); with K = 2 that is always class 0.

    This is the authors' layout (:data:`AUTHORS_CODE`: ``InverseCategorical._get_permutations`` and
    ``sample``) read on this module's uniforms.  Their Dirichlet copula (``inverted=False``, what
    vae.py builds) draws v = (1 - D)^(n-1) = 1 - u, whose exclusive tail is the *bottom*, and lays
    out s at the bottom, then the others in cyclic order after t (t+1, ..., K-1, 0, ..., s-1, s+1,
    ..., t-1), and t on top, a category c taking v in (L_c, R_c]; on u = 1 - v that is the
    ordering above, c taking u in [1 - R_c, 1 - L_c), so the same Dirichlet draw gives the same
    samples (tests/test_arms.py checks it draw by draw against a transcription of their code).
    The layout changes only the variance: every ordering gives exact Categorical samples, and
    :func:`carms_joint` follows whichever is used.  Why each pair must sit at the two ends of one
    ordering: see :func:`carms_joint`."""
    s, t = torch.triu_indices(K, K, 1, device=device)
    down = (t.unsqueeze(1) - torch.arange(K, device=device)) % K  # t, t-1, ... cyclically: all K
    others = down[down != s.unsqueeze(1)].view(-1, K - 1)  # s taken out, the rest kept in order
    return torch.cat([others, s.unsqueeze(1)], 1)


def interval_ends(probs, order):
    """R (..., K): the right ends, bottom to top, of the K intervals of the categories laid out on
    [0, 1] in ``order`` (..., K: the category at each position; broadcast against ``probs``
    (..., K)): R_r = sum of q over the positions <= r, position r holding [R_{r-1}, R_r) with
    R_{-1} = 0.  The top end is exactly 1 so that the intervals tile [0, 1] however q's sum rounds
    (the sampler and :func:`carms_joint` must see the same intervals)."""
    shape = torch.broadcast_shapes(probs.shape, order.shape)
    R = torch.cumsum(torch.gather(probs.expand(shape), -1, order.expand(shape)), -1)
    return torch.cat([R[..., :-1], torch.ones_like(R[..., -1:])], -1)


def carms_categories(u, probs, order):
    """Categorical samples (n, *cells) by the inverse CDF of the copula uniforms ``u`` (n, *cells),
    the categories of each cell laid out bottom to top in that cell's ``order`` (*cells, K): sample
    i is the category whose interval holds u_i.  Exactly Categorical(probs) whatever the ordering
    and the copula (each u_i is uniform)."""
    K = probs.shape[-1]
    R = interval_ends(probs, order)
    pos = (R[..., :-1] <= u.unsqueeze(-1)).sum(-1)  # intervals wholly below u (u = 1: the top one)
    return torch.gather(order.expand(*u.shape, K), -1, pos.unsqueeze(-1)).squeeze(-1)


def carms_joint(a, b, probs, n, copula, orders=None):
    """Q(a, b) = P(z_i = a, z_j = b) for two of the n coupled CARMS samples of one cell, at the
    observed categories a, b (long, (m, *cells)); ``probs`` (*cells, K); ``orders`` the layout
    (default :func:`carms_orderings`).

    The cell's ordering is uniform over ``orders``, so Q is the mean over orderings of the copula's
    mass on the rectangle [L_a, R_a) x [L_b, R_b):
    C(R_a, R_b) - C(L_a, R_b) - C(R_a, L_b) + C(L_a, L_b).  Positive for every a != b: in the
    ordering with a and b at the two ends the rectangle is [0, q_a) x [1 - q_b, 1) (or its mirror
    image), which both copulas charge for every n >= 2 -- without it no importance weight could
    undo the coupling."""
    K = probs.shape[-1]
    orders = carms_orderings(K, probs.device) if orders is None else orders
    O = orders.reshape(-1, *([1] * (probs.dim() - 1)), K)  # orderings on a leading axis
    R = interval_ends(probs, O)  # (P, *cells, K), by position
    L = torch.cat([torch.zeros_like(R[..., :1]), R[..., :-1]], -1)
    where = O.argsort(-1).expand_as(R)  # the position of each category
    L, R = L.gather(-1, where), R.gather(-1, where)  # by category
    # at the observed categories: (P, 1, *cells, K) against (1, m, *cells, 1) -> (P, m, *cells)
    at = lambda x, c: torch.take_along_dim(x.unsqueeze(1), c.unsqueeze(0).unsqueeze(-1), -1).squeeze(-1)
    La, Ra, Lb, Rb = at(L, a), at(R, a), at(L, b), at(R, b)
    return copula.rectangle(La, Ra, Lb, Rb, n).clamp_min(0).mean(0)


def carms_weight(fz, z, probs, copula, orders=None):
    """CARMS (Dimitriev & Zhou 2021, NeurIPS, the CARMS estimator of Sec. 3): per cell d,

        g_d = 1/(n(n-1)) sum_{i != j} (f(z_i) - f(z_j)) (e_{z_id} - q_d) q_d(z_id) q_d(z_jd) / Q_d(z_id, z_jd)
            = 1/(n(n-1)) sum_{i < j} (f(z_i) - f(z_j)) (e_{z_id} - e_{z_jd}) r_d(z_id, z_jd),

    r = q(a) q(b) / Q(a, b), Q the coupled pair's joint pmf (:func:`carms_joint`, for the layout
    ``orders``).  Why it is unbiased: the pair term of LOO REINFORCE (f(z_i) - f(z_j)) (e_{z_i} - q)
    has the true gradient as its mean when z_id, z_jd are independent; r reweights the coupled pair
    of cell d to that independent law (importance sampling; the other cells are coupled
    independently of cell d, so only its pair needs reweighting).  Pairs with z_id = z_jd cancel
    between (i, j) and (j, i), so Q is needed only off the diagonal, where it is positive.  With
    independent samples (r = 1) it is LOO REINFORCE.  The authors' training code (vae.py,
    ``matrix_grad``) uses (q(a) q(b) + 1e-3) / (Q(a, b) + 1e-3) clipped to [0.01, 10] instead of r,
    which is biased; r here is exact.

    ``fz`` (n, *batch, 1...) detached, broadcast over the cells; ``z`` (n, *cells) long;
    ``probs`` (*cells, K).  The weights are computed in float64."""
    n, K = z.shape[0], probs.shape[-1]
    i, j = torch.triu_indices(n, n, 1, device=z.device)
    a, b = z[i], z[j]
    p64 = probs.double()
    pick = lambda c: torch.gather(p64.expand(*c.shape, K), -1, c.unsqueeze(-1)).squeeze(-1)
    Q = carms_joint(a, b, p64, n, copula, orders)
    differ = a != b
    r = torch.where(differ, pick(a) * pick(b) / torch.where(differ, Q, 1.0).clamp_min(1e-300), 0.0)
    signal = ((fz[i] - fz[j]) * r.to(fz.dtype)).unsqueeze(-1)
    onehot = lambda c: torch.nn.functional.one_hot(c, K).to(fz.dtype)
    return (signal * (onehot(a) - onehot(b))).sum(0) / (n * (n - 1))


class CARMS(_Coupled):
    """CARMS, Categorical-Antithetic-REINFORCE-Multi-Sample (Dimitriev & Zhou 2021, "CARMS:
    Categorical-Antithetic-REINFORCE Multi-Sample gradient estimator", NeurIPS, arXiv:2110.14002,
    the CARMS estimator of Sec. 3 with the inverse-CDF copula sampling of its categorical samples):

        g = 1/(n(n-1)) sum_{i != j} (f(z_i) - f(z_j)) (e_{z_i} - q) q(z_i) q(z_j) / P(z_i, z_j),

    per categorical cell.  The n samples of a cell are the inverse CDFs of n copula uniforms
    (Dirichlet by default, or Gaussian), with the K categories laid out on [0, 1] in an ordering
    drawn uniformly, per cell, from K(K-1)/2 orderings that put one pair of categories at the two
    ends, the lower-indexed one in the Dirichlet copula's exclusive top tail: the authors' layout,
    sample for sample (:func:`carms_orderings`; their code, :data:`AUTHORS_CODE`).  P(z_i, z_j) is
    the mean over the orderings of the copula's mass on the product of the two categories'
    intervals, in closed form (:func:`carms_joint`).  The layout matters for the variance only:
    the one carms used before issue #21 (the pair's higher-indexed category on top, the others in
    natural order) is as unbiased, with 0.95-1.17x this one's variance on the categorical test
    problems (K = 3-6, n = 3, 4, 6, Dirichlet copula; 100000 estimates each, SE <= 0.004).

    Why it helps: the Dirichlet copula's samples exclude each other at the top of [0, 1], so
    duplicate samples of the category laid out there are rarer than with independent draws; the
    importance weight q(a) q(b) / P(a, b) keeps it exactly unbiased.  With independent samples it
    is LOO REINFORCE.

    Two categories: the one ordering puts class 0 on top and class 1 at the bottom, the
    orientation ARMS takes when class 0 is the rarer outcome, so for q(class 0) <= 1/2 two-class
    CARMS with logits (0, phi) *is* ARMS with logit phi, sample by sample.  For q(class 0) > 1/2
    ARMS puts class 1 on top instead and the two differ: with the Dirichlet copula two-class CARMS
    then has more variance than ARMS (1.09-1.14x on the test problems, tests/test_arms.py),
    because its top tail excludes the *likelier* outcome; with the Gaussian copula, radially
    symmetric, they are equal in distribution for every q.  The authors' code does the same (its
    layout ignores q).

    The weights cost O(K^2 n^2) per cell (the orderings times the sample pairs).  n evaluations in
    one call of f; needs n >= 2."""

    name = "carms"
    families = frozenset({"categorical"})
    paper = ("Dimitriev & Zhou (2021), CARMS: Categorical-Antithetic-REINFORCE Multi-Sample gradient "
             "estimator, NeurIPS, arXiv:2110.14002, Sec. 3 (CARMS estimator, copula sampling)")

    def _estimate(self, dist, f, n, context, family):
        logits = fam.params(dist)["logits"]
        lg = logits.detach()
        # sampling and weights in float64: the intervals must tile [0, 1] and Q(a, b) must be the
        # law the samples follow, to well below the float32 rounding of a softmax
        probs = torch.softmax(lg.double(), -1)
        K, cells = lg.shape[-1], lg.shape[:-1]
        copula = self.copula
        u = copula.sample(n, cells, probs.dtype, lg.device)
        orders = carms_orderings(K, lg.device)
        order = orders[torch.randint(len(orders), cells, device=lg.device)]  # one per cell
        z = carms_categories(u, probs, order)
        zh = torch.nn.functional.one_hot(z, K).to(lg.dtype)
        fz = check_f_output(f(zh), n, dist.batch_shape, self.name)
        fd = fz.detach().reshape(n, *dist.batch_shape, *([1] * (len(dist.event_shape) - 1)))
        g = carms_weight(fd, z, probs, copula, orders).to(lg.dtype)
        return Estimate(logit_surrogate(logits, g, fz), fz.detach().mean(0), n)
