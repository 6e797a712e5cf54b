"""Measuring an estimator: M independent gradient estimates at fixed parameters vs a reference.

The M estimates are computed in **one** pass.  The batch's distribution parameters are stacked M
times on a new leading batch axis (``replicas``), so the estimator sees one problem with M x more
batch elements; because estimators never mix batch elements, replica m's surrogate depends only on
replica m's parameter slice.  One backward pass to the stacked parameters therefore yields M
separate gradients w.r.t. the distribution parameters, and one vmapped vector-Jacobian product
(``is_grads_batched``) carries them back to the estimated parameters (an encoder, say).
``batched=False`` is the plain loop of M estimate/backward calls, kept for benchmarks and checks.

What a measurement never does, because each cost as much as the estimates themselves: copy the
(M, P) estimates whole (they stay one block per parameter, summarised in float64 a cache-sized
chunk of columns at a time); form the bias test's second-stage estimates w.r.t. the network at
all (their projections come from the gradients w.r.t. the distribution parameters and the test
directions pushed forward, :func:`direction_tangents`); compute M copies of a deterministic
estimate (two, checked equal: :func:`_measured_estimates`).
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from functools import lru_cache
from typing import Optional

import torch

from estbench.core.budget import EvaluationCounter
from estbench.core.errors import DeclarationError
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
    blocks, n_evals, reported = _estimate_blocks(task, estimator, batch, n_samples, M, batched, counter)
    return torch.cat(blocks, dim=1), n_evals, reported


def _estimate_blocks(task, estimator, batch, n_samples: int, M: int, batched: bool = True,
                     counter: Optional[EvaluationCounter] = None):
    """:func:`gradient_estimates` with the estimates as one ``(M, P_i)`` block per estimated
    parameter, never concatenated (a copy of the whole matrix costs as much as projecting it)."""
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
        return [torch.stack(rows)], n_evals, e.n_evals

    outs, g_stacked, n_evals, e = _distribution_gradients(task, est, batch, n_samples, M, counter)
    return _parameter_blocks(outs, g_stacked, targets, M), n_evals, e.n_evals


def _parameter_blocks(outs, g_stacked, targets, M: int) -> list[torch.Tensor]:
    """The M gradients w.r.t. the distribution parameters carried back to the estimated
    parameters by one vmapped vector-Jacobian product: one ``(M, P_i)`` block per parameter."""
    try:
        per = torch.autograd.grad(
            outs, targets, grad_outputs=g_stacked, is_grads_batched=True, allow_unused=True,
            retain_graph=True,
        )
        return [(p if p is not None else torch.zeros(M, *t.shape, device=t.device, dtype=t.dtype))
                .detach().reshape(M, -1) for p, t in zip(per, targets)]
    except RuntimeError:
        # an op without a batching rule (some RNN kernels): fall back to one VJP per replica,
        # which still shares the single forward pass and the single estimator call above
        rows = []
        for m in range(M):
            gm = torch.autograd.grad(outs, targets, grad_outputs=[g[m] for g in g_stacked],
                                     allow_unused=True, retain_graph=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1)
                                   for g, t in zip(gm, targets)]))
        return [torch.stack(rows).detach()]


#: how far apart (relative to their largest coordinate) two estimates of a declared-deterministic
#: estimator may be: float32 rounding, nothing more
DETERMINISTIC_RTOL = 1e-5


def _measured_estimates(task, estimator, batch, n_samples: int, M: int, batched: bool = True,
                        counter: Optional[EvaluationCounter] = None):
    """:func:`_estimate_blocks` for a measurement.  An estimator declared ``deterministic`` (it
    draws nothing: an enumeration, a sparse support) is estimated twice, checked to give the same
    estimate both times, and that estimate stands for all M (a view, no copies): M copies of a
    deterministic computation would cost M times as much and say nothing more (SparseMAP's
    active-set solver at binary_vae's 200 latents: half a minute a checkpoint).  The figures are
    those of M identical estimates; the harness checks the declaration, it does not take it."""
    if not _two_for_all(estimator, batched, M):
        return _estimate_blocks(task, estimator, batch, n_samples, M, batched, counter)
    blocks, n_evals, reported = _estimate_blocks(task, estimator, batch, n_samples, 2, batched, counter)
    # equal to float32 rounding: the replicas are rows of one batched computation, and a row's
    # reductions may take another vector path than its neighbour's (liu_toy's exact gradient:
    # -0.0450 in both, 9e-8 apart); a random estimate differs at its own scale
    scale = max(float(b.abs().max()) for b in blocks)
    diff = max(float((b[0] - b[1]).abs().max()) for b in blocks)
    # (non-finite estimates pass through: their figures say so, as any estimator's would)
    if math.isfinite(diff) and math.isfinite(scale) and diff > DETERMINISTIC_RTOL * scale:
        raise DeclarationError(f"estimator {estimator.name!r} is declared deterministic, but two of "
                               f"its estimates at the same parameters differ (by {diff:.3g}, "
                               f"{diff / scale if scale else math.inf:.3g} of their largest coordinate)")
    return [b[:1].expand(M, b.shape[1]) for b in blocks], n_evals, reported


def _two_for_all(estimator, batched: bool, M: int) -> bool:
    """Whether :func:`_measured_estimates` measures the estimator from two estimates."""
    return estimator.deterministic and batched and M > 2


def _distribution_gradients(task, est, batch, n_samples: int, M: int, counter: EvaluationCounter):
    """One batched estimator call on the problem replicated M times (:func:`replicate`) and its
    M gradients w.r.t. the distribution parameters: ``(outs, g_stacked, n_evals, estimate)``, with
    ``outs`` the distribution parameters (their graph to the estimated parameters kept) and
    ``g_stacked[i]`` of shape ``(M, *outs[i].shape)``."""
    prob = task.problem(batch)
    params, stacked, dist, ctx = replicate(prob, M)
    counter.reset()  # per element of the replicated batch: the cost of one estimate
    e = est.estimate(dist, counter.wrap(prob.f, dist), n_samples, ctx)
    keys = list(stacked)
    g_stacked = torch.autograd.grad(
        e.surrogate, [stacked[k] for k in keys], allow_unused=True, retain_graph=True
    )
    g_stacked = _zeros_if_none(g_stacked, [stacked[k] for k in keys])
    return [params[k] for k in keys], g_stacked, counter.count, e


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
#: needs no second stage.  Only an estimator declared ``unbiased`` is re-tested: the second stage
#: guards a declaration of unbiasedness against a false alarm, and a declared-biased estimator's
#: rejection agrees with its declaration (in the quick sweep of every task the second stage
#: confirmed 457 of 461 rejections of declared-biased estimators and cleared all 8 of declared-
#: unbiased ones, at up to half of a categorical_vae cell's time).
BIAS_RECHECK_ALPHA, BIAS_RECHECK_FACTOR, BIAS_RECHECK_NOISE_RATIO = 0.01, 16, 10.0


def _recheck_due(estimator, first: dict) -> bool:
    """Whether the bias test's first stage calls for the second (:data:`BIAS_RECHECK_FACTOR`)."""
    return (estimator.unbiased and first["bias_p"] < BIAS_RECHECK_ALPHA
            and first["bias"] < BIAS_RECHECK_NOISE_RATIO * first["bias_noise"])


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


#: columns of the estimates taken to float64 at a time (:func:`projections`, :func:`summarise`):
#: every figure is accumulated in float64 without a float64 copy of the whole (M, P) matrix, in
#: chunks that stay in cache (making the whole copy costs more than the arithmetic on it)
FLOAT64_COLUMNS = 1 << 12


def _float64_columns(G):
    """``(offset, float64 columns)`` over the estimates ``G``, an (M, P) tensor or its column blocks
    in order (:func:`_estimate_blocks`)."""
    offset = 0
    for block in ([G] if isinstance(G, torch.Tensor) else G):
        block = block.reshape(block.shape[0], -1)
        for i in range(0, block.shape[1], FLOAT64_COLUMNS):
            yield offset + i, block[:, i:i + FLOAT64_COLUMNS].double()
        offset += block.shape[1]


def _shape(G) -> tuple[int, int, torch.device]:
    blocks = [G] if isinstance(G, torch.Tensor) else G
    return blocks[0].shape[0], sum(b[0].numel() for b in blocks), blocks[0].device


def projections(G) -> torch.Tensor:
    """The estimates ``G`` (M x P, or its column blocks) along the bias test's K directions,
    (M, K) float64."""
    M, P, device = _shape(G)
    W = _directions(P, str(device))
    proj = torch.zeros(M, W.shape[0], dtype=torch.float64, device=device)
    for off, cols in _float64_columns(G):
        proj += cols @ W[:, off:off + cols.shape[1]].T
    return proj


def direction_tangents(outs, targets, W: torch.Tensor):
    """The bias test's directions pushed forward to the distribution parameters: ``J w_k`` for
    each row w_k of ``W`` (K x P, over the estimated parameters ``targets`` in order), with J the
    Jacobian of the distribution parameters ``outs`` w.r.t. the targets; one ``(K, *out.shape)``
    tensor per out.

    Why: an estimate's projection <w_k, J^T g_m> equals <J w_k, g_m>, so the bias test's second
    stage needs only each estimate's gradient w.r.t. the distribution parameters (a few thousand
    numbers) instead of its (P,) gradient w.r.t. the network.  Forward mode from reverse mode
    (the "double-vjp" identity): u(v) = J^T v is linear in v, so d<u(v), w>/dv = J w, one batched
    backward pass through the VJP's graph for all K directions.  Raises RuntimeError where an op
    of the graph has no double backward (the caller falls back to projecting whole estimates)."""
    v = [torch.zeros_like(o, requires_grad=True) for o in outs]
    u = torch.autograd.grad(outs, targets, grad_outputs=v, create_graph=True, allow_unused=True)
    K, offset, pairs = W.shape[0], 0, []
    for ui, t in zip(u, targets):
        if ui is not None:
            pairs.append((ui, W[:, offset:offset + t.numel()].reshape(K, *t.shape).to(t.dtype)))
        offset += t.numel()
    if not pairs:
        return [torch.zeros(K, *o.shape, dtype=o.dtype, device=o.device) for o in outs]
    us, ws = [p[0] for p in pairs], [p[1] for p in pairs]
    try:
        jw = torch.autograd.grad(us, v, grad_outputs=ws, is_grads_batched=True, allow_unused=True,
                                 retain_graph=True)
    except RuntimeError:  # no batching rule for an op of the VJP's graph: one direction at a time
        rows = [torch.autograd.grad(us, v, grad_outputs=[w[k] for w in ws], allow_unused=True,
                                    retain_graph=True) for k in range(K)]
        jw = [None if rows[0][i] is None else torch.stack([r[i] for r in rows])
              for i in range(len(v))]
    return [(j if j is not None else torch.zeros(K, *o.shape, dtype=o.dtype, device=o.device)).detach()
            for j, o in zip(jw, outs)]


class _TangentsAt:
    """:func:`direction_tangents` kept for the next batch of estimates at the same distribution
    parameters (the bias test's second stage asks 15 times at one checkpoint); recomputed whenever
    the task's problem hands out different parameters, so a task whose problem is random stays
    right.  ``None`` where the graph has no double backward."""

    def __init__(self, W: torch.Tensor):
        self.W, self._at, self._tangents, self.unavailable = W, None, None, False

    def __call__(self, outs, targets):
        if self.unavailable:
            return None
        if self._at is None or len(self._at) != len(outs) or not all(
                a.shape == o.shape and torch.equal(a, o) for a, o in zip(self._at, outs)):
            try:
                self._tangents = direction_tangents(outs, targets, self.W)
            except RuntimeError:
                self.unavailable = True
                return None
            self._at = [o.detach().clone() for o in outs]
        return self._tangents


def _projected_estimates(task, estimator, batch, n_samples: int, M: int, tangents: _TangentsAt,
                         counter: EvaluationCounter):
    """M more estimates as their (M, K) projections only (:func:`projections`), and their
    counted f-evaluations: from the gradients w.r.t. the distribution parameters and the
    directions' tangents, without forming any estimate w.r.t. the network's parameters where the
    graph allows it."""
    est = copy.deepcopy(estimator).eval()
    targets = task.estimated_parameters()
    outs, g_stacked, n_evals, _ = _distribution_gradients(task, est, batch, n_samples, M, counter)
    jw = tangents(outs, targets)
    if jw is None:
        return projections(_parameter_blocks(outs, g_stacked, targets, M)), n_evals
    return sum(g.reshape(M, -1).double() @ j.reshape(j.shape[0], -1).double().T
               for g, j in zip(g_stacked, jw)), n_evals


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


def summarise(G, ref: Reference) -> dict[str, float]:
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
    return _summary(G, ref)[0]


def _summary(G, ref: Reference) -> tuple[dict[str, float], torch.Tensor]:
    """:func:`summarise`'s figures and the estimates' (M, K) projections (:func:`projections`),
    in one pass over the estimates' columns in float64 (:data:`FLOAT64_COLUMNS` at a time)."""
    M, P, device = _shape(G)
    r = ref.grad.detach().double().to(device).reshape(-1)
    W = _directions(P, str(device))
    zero = torch.zeros((), dtype=torch.float64, device=device)
    sq_dev, sq_bias, sq_mean = zero, zero, zero
    dots = torch.zeros(M, dtype=torch.float64, device=device)
    sq_norms = torch.zeros(M, dtype=torch.float64, device=device)
    proj = torch.zeros(M, W.shape[0], dtype=torch.float64, device=device)
    for off, cols in _float64_columns(G):
        width = cols.shape[1]
        r_cols = r[off:off + width]
        mean = cols.mean(0)
        # contiguous reductions only: a strided var(0) and cosine_similarity are several times
        # slower on a wide G; these give the same figures to rounding
        sq_dev = sq_dev + torch.linalg.vector_norm(cols - mean) ** 2
        sq_bias = sq_bias + torch.linalg.vector_norm(mean - r_cols) ** 2
        sq_mean = sq_mean + torch.linalg.vector_norm(mean) ** 2
        dots += cols @ r_cols
        sq_norms += cols.square().sum(1)
        proj += cols @ W[:, off:off + width].T
    var = sq_dev / (M - 1)
    noise = var / M
    if ref.stderr is not None:
        noise = noise + torch.linalg.vector_norm(ref.stderr.double().to(device)) ** 2
    rn = torch.linalg.vector_norm(r)
    # cos(G_m, r) = <G_m, r> / max(||G_m|| ||r||, eps), as torch's cosine_similarity defines it
    cos = dots / (sq_norms.sqrt() * rn).clamp_min(1e-30)
    if rn == 0:
        cos = torch.full_like(cos, float("nan"))
    bias = sq_bias.sqrt()
    z, p = _bias_test_projected(proj, ref)
    out = {
        "bias": bias,
        "bias_noise": noise.sqrt(),
        "variance": var,
        "grad_error": (bias**2 - noise).clamp_min(0.0) + var,
        "bias_z": z,
        "bias_p": p,
        "cosine": cos.mean(),
        "snr": sq_mean.sqrt() / var.sqrt() if var > 0 else torch.tensor(math.inf),
        "ref_norm": rn,
    }
    return {k: float(v) for k, v in out.items()}, proj


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


#: offset of the reference gradient's random stream from its measurement's: the reference is
#: drawn apart from the estimates, so that one computed elsewhere at the same parameters (a probe's
#: cache, the start of training shared by a (task, seed)'s cells) stands in without moving them
REFERENCE_STREAM = 4_000_037


def reference_at(task, batch, seed: int) -> Reference:
    """The task's reference gradient on ``batch`` at the measurement with stream ``seed``: on its
    own stream (:data:`REFERENCE_STREAM`), a function of the parameters, the batch and ``seed``."""
    with isolated_rng(seed + REFERENCE_STREAM, task.device):
        return task.reference_gradient(batch)


def measure(task, estimator, n_samples: int, M: int, seed: int, batch=None,
            reference: Optional[Reference] = None, batched: bool = True,
            counter: Optional[EvaluationCounter] = None) -> dict[str, float]:
    """All measurement metrics for one checkpoint, on the task's measurement batch, with the
    f-evaluations of one estimate as counted (``n_evals``) and as reported (``n_evals_reported``).

    Every figure comes from the M estimates, except the bias test's where its second stage ran
    (see :data:`BIAS_RECHECK_FACTOR`; estimators declared unbiased only): then ``bias_z`` /
    ``bias_p`` are from the 16 M estimates, and ``bias_test_samples`` says how many the test used.
    ``reference``: the reference gradient when the caller has it (:func:`reference_at` with the
    same ``seed`` and batch); computed here otherwise."""
    if batch is None:
        batch = task.measure_batch()
    device = task.device
    if reference is None:
        reference = reference_at(task, batch, seed)
    with isolated_rng(seed, device):
        G, n_evals, reported = _measured_estimates(task, estimator, batch, n_samples, M,
                                                   batched=batched, counter=counter)
    out, proj = _summary(G, reference)
    del G
    out["bias_test_samples"] = float(M)
    if _recheck_due(estimator, out):
        # the second stage, on a fresh stream: the first M estimates and (factor - 1) x M more,
        # in batched passes of M, each kept only as its K projections -- from the gradients
        # w.r.t. the distribution parameters where the graph allows (direction_tangents), so no
        # (M, P) matrix is formed at all (16 M estimates of text_vae's 750k coordinates would be
        # 1.5 GB)
        counter = counter if counter is not None else EvaluationCounter()
        tangents = _TangentsAt(_directions(reference.grad.numel(), str(device)))
        with isolated_rng(seed + 1_000_033, device):
            chunks = [proj]
            if _two_for_all(estimator, batched, M):
                # checked deterministic: more estimates are the same estimate again (the test
                # still runs on 16 M of them: a sampled reference's own noise can call for it)
                chunks *= BIAS_RECHECK_FACTOR
            for _ in range(BIAS_RECHECK_FACTOR - len(chunks)):
                if batched:
                    pk, nk = _projected_estimates(task, estimator, batch, n_samples, M, tangents,
                                                  counter)
                else:
                    Gk, nk, _ = _estimate_blocks(task, estimator, batch, n_samples, M,
                                                 batched=False, counter=counter)
                    pk = projections(Gk)
                chunks.append(pk)
                n_evals = max(n_evals, nk)
        out["bias_z"], out["bias_p"] = _bias_test_projected(torch.cat(chunks), reference)
        out["bias_test_samples"] = float(M * BIAS_RECHECK_FACTOR)
    out["n_evals"] = float(n_evals)
    out["n_evals_reported"] = reported
    return out
