"""Measuring an estimator: M independent gradient estimates at fixed parameters vs a reference.

The M estimates are computed in **one** pass.  The batch's distribution parameters are stacked M
times on a new leading batch axis (``replicas``), so the estimator sees one problem with M x more
batch elements; because estimators never mix batch elements, replica m's surrogate depends only on
replica m's parameter slice.  One backward pass to the stacked parameters therefore yields M
separate gradients w.r.t. the distribution parameters, and one vmapped vector-Jacobian product
(``is_grads_batched``) carries them back to the estimated parameters (an encoder, say).
``batched=False`` is the plain loop of M estimate/backward calls, kept for benchmarks and checks.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from functools import lru_cache
from typing import Optional

import torch

from estbench.core.budget import EvaluationCounter
from estimators import families as fam
from tasks import Reference, flat_grad


def replicate(problem, M: int):
    """The problem with M replicas stacked on a new leading batch axis.

    Returns ``(params, stacked, dist, context)``: the original distribution parameters, their stacked
    views (differentiate w.r.t. these for per-replica gradients), the replicated distribution and the
    replicated context.
    """
    params = fam.params(problem.dist)
    stacked = {k: v.unsqueeze(0).expand(M, *v.shape) for k, v in params.items()}
    dist = fam.rebuild(problem.dist, stacked)
    ctx = problem.context
    if isinstance(ctx, torch.Tensor):
        ctx = ctx.unsqueeze(0).expand(M, *ctx.shape)
    return params, stacked, dist, ctx


def _zeros_if_none(grads, like):
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, like)]


def gradient_estimates(task, estimator, batch, n_samples: int, M: int, batched: bool = True,
                       counter: Optional[EvaluationCounter] = None):
    """M gradient estimates of d/d(estimated params) sum_b E[f], as a ``(M, P)`` tensor.

    The estimator is deep-copied (in eval mode) first: measuring never changes the training estimator.
    Returns ``(G, n_evals, reported)``: the f-evaluations per data point of one estimate as the
    harness counted them (the most over the loop's calls), and as the estimator reported them.
    """
    counter = counter if counter is not None else EvaluationCounter()
    # a copy in eval mode: measuring never changes the training estimator's state, and estimators
    # with learned parts skip their own training step (e.g. RELAX's variance gradient)
    est = copy.deepcopy(estimator).eval()
    targets = task.estimated_parameters()
    if not batched:
        rows, n_evals = [], 0
        for _ in range(M):
            prob = task.problem(batch)
            counter.reset()
            e = est.estimate(prob.dist, counter.wrap(prob.f, prob.dist), n_samples, prob.context)
            rows.append(flat_grad(e.surrogate, targets))
            n_evals = max(n_evals, counter.count)
        return torch.stack(rows), n_evals, e.n_evals

    prob = task.problem(batch)
    params, stacked, dist, ctx = replicate(prob, M)
    counter.reset()  # per element of the replicated batch: the cost of one estimate
    e = est.estimate(dist, counter.wrap(prob.f, dist), n_samples, ctx)
    n_evals = counter.count
    keys = list(stacked)
    g_stacked = torch.autograd.grad(
        e.surrogate, [stacked[k] for k in keys], allow_unused=True, retain_graph=True
    )
    g_stacked = _zeros_if_none(g_stacked, [stacked[k] for k in keys])
    outs = [params[k] for k in keys]
    try:
        per = torch.autograd.grad(
            outs, targets, grad_outputs=g_stacked, is_grads_batched=True, allow_unused=True,
            retain_graph=True,
        )
        per = [p if p is not None else torch.zeros(M, *t.shape, device=t.device, dtype=t.dtype)
               for p, t in zip(per, targets)]
        G = torch.cat([p.reshape(M, -1) for p in per], dim=1)
    except RuntimeError:
        # an op without a batching rule (some RNN kernels): fall back to one VJP per replica,
        # which still shares the single forward pass and the single estimator call above
        rows = []
        for m in range(M):
            gm = torch.autograd.grad(outs, targets, grad_outputs=[g[m] for g in g_stacked],
                                     allow_unused=True, retain_graph=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1)
                                   for g, t in zip(gm, targets)]))
        G = torch.stack(rows)
    return G.detach(), n_evals, e.n_evals


#: the bias test's directions: K fixed random unit vectors (one seed for every cell, so every
#: estimator is tested along the same directions)
BIAS_TEST_DIRECTIONS, BIAS_TEST_SEED = 16, 20261201
#: floating-point tolerance of the bias test, relative to the root-mean-square reference coordinate:
#: estimates that agree with the reference to float32 rounding (exact enumeration, IndeCateR) have
#: a vanishing standard error, and without a floor their rounding would read as a significant bias
BIAS_TEST_FLOAT_TOL = 1e-5


#: the bias test's second stage (:func:`measure`): a checkpoint whose test rejects at
#: BIAS_RECHECK_ALPHA with a bias below BIAS_RECHECK_NOISE_RATIO times its noise floor is tested
#: again on BIAS_RECHECK_FACTOR times as many estimates.  Why: where q is nearly deterministic
#: (late in training) an unbiased estimator's distribution can put a little probability on large
#: values; M estimates that miss them underestimate both the mean's error and the variance, and
#: the test can reject with a tiny p at a bias of a few times its noise floor (IndeCateR and MuProp
#: on toy_categorical), where BIAS_RECHECK_FACTOR times as many estimates at the same checkpoints
#: find no bias.  A bias many times its noise floor (a relaxation's on the toys) is not that: it
#: needs no second stage.
BIAS_RECHECK_ALPHA, BIAS_RECHECK_FACTOR, BIAS_RECHECK_NOISE_RATIO = 0.01, 16, 10.0


@lru_cache(maxsize=2)
def _directions(P: int, device: str, K: int = BIAS_TEST_DIRECTIONS) -> torch.Tensor:
    """K fixed random unit vectors in R^P (float64; slow to draw for text_vae's 750k
    coordinates, so kept per process for the next checkpoint)."""
    g = torch.Generator().manual_seed(BIAS_TEST_SEED + P)
    W = torch.randn(K, P, generator=g, dtype=torch.float64)
    return (W / torch.linalg.vector_norm(W, dim=1, keepdim=True)).to(device)


def bias_test(G: torch.Tensor, ref: Reference) -> tuple[float, float]:
    """``(z, p)``: a test of H0 "E[g] = the true gradient" from M estimates ``G`` (M x P).

    Along each of K fixed random unit directions w_k (:data:`BIAS_TEST_DIRECTIONS`): the mean
    projection of the estimates minus the reference's, t_k = (mean_m <w_k, G_m> - <w_k, ref>) /
    se_k, with se_k^2 = var_m <w_k, G_m> / M + sum_p w_kp^2 se_ref,p^2 + (tol * rms(ref))^2 (the
    estimates' standard error, the reference's own Monte Carlo error, and a float32 tolerance
    :data:`BIAS_TEST_FLOAT_TOL`).  p_k is two-sided from Student's t with M - 1 degrees of freedom;
    the test's p-value is Bonferroni's min(1, K min_k p_k), valid however the directions' statistics
    are correlated; ``z`` is the largest |t_k|.  Projections are sums over all P coordinates, so
    they are close to normal even for skewed estimates; a bias is detected when its size along
    random directions stands out of the noise -- the statistic behind the ``bias`` / ``bias_noise``
    reading, made a test.  (DisARM's code tests per coordinate against a high-sample reference;
    with 10^5 coordinates and heavy-tailed score-function estimates that needs a Bonferroni
    threshold far out in tails the CLT does not reach.)
    """
    return _bias_test_projected(projections(G), ref)


def projections(G: torch.Tensor) -> torch.Tensor:
    """The estimates ``G`` (M x P) along the bias test's K directions, (M, K) float64."""
    return G.double() @ _directions(G.shape[1], str(G.device)).T


def _bias_test_projected(proj: torch.Tensor, ref: Reference) -> tuple[float, float]:
    """:func:`bias_test` from the estimates' projections (M, K): the second stage projects its
    chunks of estimates one at a time instead of holding 16 M estimates at once."""
    M = proj.shape[0]
    r = ref.grad.detach().double().to(proj.device).reshape(-1)
    P = r.numel()
    W = _directions(P, str(proj.device))
    diff = proj.mean(0) - W @ r
    var = proj.var(0, unbiased=True) / M
    if ref.stderr is not None:
        var = var + (W**2) @ ref.stderr.detach().double().to(proj.device).reshape(-1) ** 2
    tol = BIAS_TEST_FLOAT_TOL * torch.linalg.vector_norm(r) / math.sqrt(P)
    se = (var + tol**2).sqrt()
    t = (diff / se).abs()
    if not bool(torch.isfinite(t).all()):
        return math.nan, math.nan
    if float(se.max()) == 0.0:  # an all-zero reference and zero-variance estimates equal to it
        return 0.0, 1.0
    from scipy import stats

    p = 2 * stats.t.sf(t.cpu().numpy(), df=max(M - 1, 1))
    return float(t.max()), float(min(1.0, len(p) * p.min()))


def summarise(G: torch.Tensor, ref: Reference) -> dict[str, float]:
    """Bias, variance and friends of the estimates ``G`` (M x P) against the reference.

    bias        ||mean_m G_m - ref||_2
    bias_noise  the bias expected from Monte Carlo noise alone, sqrt(tr Cov / M + sum ref_se^2):
                a bias well above it is real
    variance    trace of the covariance of one estimate (sum of per-coordinate variances, ddof=1)
    grad_error  the mean squared error of one estimate, E||g - grad||^2 = ||E g - grad||^2 +
                tr Cov, estimated without the Monte Carlo noise of the measurement: the squared
                bias's estimate bias^2 - bias_noise^2 (clipped at 0) plus variance
    bias_z, bias_p  the bias test (:func:`bias_test`): largest |t| over its directions and the
                p-value of "unbiased"
    cosine      mean over estimates of cos(G_m, ref): how well one step points the right way
    snr         ||mean G|| / sqrt(variance)
    ref_norm    ||ref||_2, the scale the others are read against
    """
    M = G.shape[0]
    G = G.double()
    r = ref.grad.detach().double().to(G.device).reshape(-1)
    mean = G.mean(0)
    # contiguous reductions only: a strided var(0) and cosine_similarity are several times slower
    # on a wide G (binary_vae's (64, 157k)); these give the same figures to rounding
    var = torch.linalg.vector_norm(G - mean) ** 2 / (M - 1)
    noise = var / M
    if ref.stderr is not None:
        noise = noise + torch.linalg.vector_norm(ref.stderr.double().to(G.device)) ** 2
    rn = torch.linalg.vector_norm(r)
    # cos(G_m, r) = <G_m, r> / max(||G_m|| ||r||, eps), as torch's cosine_similarity defines it
    cos = (G @ r) / (torch.linalg.vector_norm(G, dim=1) * rn).clamp_min(1e-30)
    if rn == 0:
        cos = torch.full_like(cos, float("nan"))
    bias = torch.linalg.vector_norm(mean - r)
    z, p = bias_test(G, ref)
    out = {
        "bias": bias,
        "bias_noise": noise.sqrt(),
        "variance": var,
        "grad_error": (bias**2 - noise).clamp_min(0.0) + var,
        "bias_z": z,
        "bias_p": p,
        "cosine": cos.mean(),
        "snr": mean.norm() / var.sqrt() if var > 0 else torch.tensor(math.inf),
        "ref_norm": rn,
    }
    return {k: float(v) for k, v in out.items()}


@contextmanager
def isolated_rng(seed: int, device: torch.device):
    """Run a block on its own RNG stream and restore the caller's afterwards.

    torch.distributions samples from the default generator, so a checkpoint measurement is run
    inside ``fork_rng``: the training stream continues exactly as if no measurement had happened.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(seed)
        yield


def measure(task, estimator, n_samples: int, M: int, seed: int, batch=None,
            reference: Optional[Reference] = None, batched: bool = True,
            counter: Optional[EvaluationCounter] = None) -> dict[str, float]:
    """All measurement metrics for one checkpoint, on the task's measurement batch, with the
    f-evaluations of one estimate as counted (``n_evals``) and as reported (``n_evals_reported``).

    Every figure comes from the M estimates, except the bias test's where its second stage ran
    (see :data:`BIAS_RECHECK_FACTOR`): then ``bias_z`` / ``bias_p`` are from the 16 M estimates,
    and ``bias_test_samples`` says how many the test used."""
    if batch is None:
        batch = task.measure_batch()
    device = task.device
    with isolated_rng(seed, device):
        if reference is None:
            reference = task.reference_gradient(batch)
        G, n_evals, reported = gradient_estimates(task, estimator, batch, n_samples, M,
                                                  batched=batched, counter=counter)
    out = summarise(G, reference)
    out["bias_test_samples"] = float(M)
    if out["bias_p"] < BIAS_RECHECK_ALPHA and out["bias"] < BIAS_RECHECK_NOISE_RATIO * out["bias_noise"]:
        # the second stage, on a fresh stream: the first M estimates and (factor - 1) x M more,
        # in batched passes of M, each kept only as its K projections (16 M estimates of
        # text_vae's 750k coordinates would be 1.5 GB)
        with isolated_rng(seed + 1_000_033, device):
            chunks = [projections(G)]
            for _ in range(BIAS_RECHECK_FACTOR - 1):
                Gk, nk, _ = gradient_estimates(task, estimator, batch, n_samples, M,
                                               batched=batched, counter=counter)
                chunks.append(projections(Gk))
                n_evals = max(n_evals, nk)
        out["bias_z"], out["bias_p"] = _bias_test_projected(torch.cat(chunks), reference)
        out["bias_test_samples"] = float(M * BIAS_RECHECK_FACTOR)
    out["n_evals"] = float(n_evals)
    out["n_evals_reported"] = reported
    return out
