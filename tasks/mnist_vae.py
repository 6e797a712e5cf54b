"""The MNIST VAE shared by ``binary_vae`` and ``categorical_vae``: one base, the latent family in hooks.

Both tasks train a VAE with Bernoulli pixels on MNIST and estimate only the reconstruction term
f(z) = log p(x|z) (the KL is exact).  What they share lives here: the data splits and their fixed
binarisation, the training data order, the objective split, the reference-gradient scaffolding
(exact enumeration or a leave-one-out score-function estimate in chunks) and the held-out figures
(ELBO, IWAE bound).  What differs -- the latent distribution, how a latent enters the decoder, the
prior and its KL, the enumeration of configurations, the networks -- is a hook each task
implements (:class:`MNISTVAE`).  :class:`MNISTVAE` has no ``name``, so it is not a registered task.
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import distributions as D
from torch.distributions import constraints

from estbench.core.metrics import END, HIGHER, LINEAR, TASK, Metric
from estbench.core.plugins import Option, integer_at_least

from .base import Problem, Reference, Task, flat_grad
from .data import mnist

#: the first 50k MNIST training images train, the last 10k validate; 10k test images
N_TRAIN, N_VAL, N_TEST, PIXELS = 50_000, 10_000, 10_000, 784
#: every MNIST training image (``training_images``: the papers that train on all of them)
N_ALL_TRAIN = N_TRAIN + N_VAL
#: rows (samples x images, or configurations) pushed through the decoder at once in evaluation /
#: reference code
CHUNK_ROWS = 16_384
#: images of a *subset* evaluation (the quick budget), the same for every estimator: the first 500
#: test images for the final figures (test ELBO, IWAE bound) and the first 500 validation images
#: for the curve.  Paired across estimators, so their differences stay resolved; the final bound
#: on 1000 images took a quarter of a quick categorical_vae cell
SUBSET_TEST_IMAGES = 500
SUBSET_VAL_IMAGES = 500

_DATA_CACHE: dict[tuple, tuple] = {}


def prepare(images_u8: torch.Tensor, binarize: str, generator: torch.Generator) -> torch.Tensor:
    """Images (N, 784) in [0, 1] as the model sees them: a Bernoulli draw per pixel from
    ``generator`` (``dynamic`` binarisation), thresholded at 1/2 (``threshold``), or the grey levels
    themselves (``none``: the ReinMax / GST code, whose BCE takes the intensities as targets)."""
    p = images_u8.reshape(-1, PIXELS).float() / 255
    if binarize == "dynamic":
        return (torch.rand(p.shape, generator=generator) < p).float()
    if binarize == "threshold":
        return (p > 0.5).float()
    return p


def fixed_data(data_dir: str, binarize: str, seed: int):
    """(every training image uint8 (60000, 784): the first 50k train, the last 10k validate;
    validation and test images prepared once with a CPU generator seeded with ``seed`` --
    validation first, then test), all on the CPU; cached per data folder,
    binarisation and seed (deterministic)."""
    key = (str(data_dir or mnist.DEFAULT_DIR), binarize, seed)
    if key not in _DATA_CACHE:
        images, _ = mnist.load("train", data_dir or None)
        test_images, _ = mnist.load("test", data_dir or None)
        flat = images.reshape(-1, PIXELS)
        g = torch.Generator().manual_seed(seed)
        val = prepare(flat[N_TRAIN:], binarize, g)
        test = prepare(test_images, binarize, g)
        _DATA_CACHE[key] = (flat, val, test)
    return _DATA_CACHE[key]


def evaluation_options() -> dict[str, Option]:
    """The options of the held-out figures and of the data folder, the same in both tasks."""
    return {
        "data_dir": Option("", "folder with the 4 MNIST gzip IDX files (default: shipped copy)"),
        "val_size": Option(1000, "validation images used by evaluate(final=False)",
                           constraint=constraints.integer_interval(1, N_VAL)),
        "eval_samples": Option(10, "reconstruction samples per image in evaluate()",
                               constraint=constraints.positive_integer),
        "iwae_samples": Option(100, "importance samples of the final test IWAE bound",
                               constraint=constraints.positive_integer),
        "training_images": Option(N_TRAIN, f"{N_TRAIN}: the first {N_TRAIN} train, the last "
                                  f"{N_VAL} validate | {N_ALL_TRAIN}: all train, as the ReinMax "
                                  "code (no validation split: the curve's ELBO and the measurement "
                                  "batch use the test images, which that code evaluates every epoch)",
                                  choices=(N_TRAIN, N_ALL_TRAIN)),
    }


def reference_options(auto: str) -> dict[str, Option]:
    """The options of the measurement batch and the reference gradient; ``auto`` says when
    ``reference=auto`` enumerates."""
    return {
        "measure_size": Option(8, "validation images in the measurement batch",
                               constraint=constraints.integer_interval(1, N_VAL)),
        "reference": Option("auto", f"auto (exact iff {auto}) | exact | sampled",
                            choices=("auto", "exact", "sampled")),
        "ref_chunks": Option(32, "sampled reference: independent chunks R",
                             constraint=integer_at_least(2)),
        "ref_chunk_samples": Option(64, "sampled reference: samples per chunk S (>= 2)",
                                    constraint=integer_at_least(2)),
    }


class MNISTVAE(Task):
    """A VAE with Bernoulli pixels on MNIST; f(z) = log p(x|z), the KL is exact.  Not a task itself
    (no ``name``): ``binary_vae`` and ``categorical_vae`` subclass it.

    Data.  The first 50k MNIST training images train, the last 10k validate, the 10k test images
    test.  Training batches are epochs of a random permutation (incomplete last batch dropped),
    prepared as :meth:`binarize` says with a CPU generator seeded from the harness's data
    generator, so every estimator (and device) sees the same images; the validation and test images
    are prepared once with the task's ``eval_binarisation_seed``.

    Objective split.  ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)): ``Problem.analytic`` is
    -sum_b KL_b (:meth:`kl`, exact), ``f(z) = log p(x|z)`` (:meth:`log_lik`), ``context`` the input
    x, ``estimated_parameters()`` the encoder's.

    Reference gradient (of sum_b E_q[f] w.r.t. the encoder on the first ``measure_size`` validation
    images): exact enumeration of every latent configuration, or an unbiased score-function
    estimate with a leave-one-out baseline at the logits: R = ``ref_chunks`` chunks of S =
    ``ref_chunk_samples`` samples per image, g_rb = 1/S sum_s (f_s - mean_{s' != s} f_s') (z_s -
    E_q[z]) (the score of Bernoulli or one-hot categorical logits is z - E_q[z]), carried back to
    the encoder in one batched VJP; the chunk mean with its standard error.

    Evaluation.  ``evaluate(False)``: ELBO per image on the first ``val_size`` validation images
    (exact KL + ``eval_samples`` reconstruction samples); ``evaluate(True)``: the same on the test
    images; ``final_metrics()``: ``test_iwae{K}``, the K = ``iwae_samples`` importance-weighted
    bound (Burda et al. 2016).  A *subset* evaluation (the quick budget) uses the first
    ``SUBSET_TEST_IMAGES`` test images for both and the first ``SUBSET_VAL_IMAGES`` validation
    images for the curve, the same for every estimator.  Evaluation samples
    come from a fixed generator (``eval_sample_seed``): common random numbers across checkpoints
    and estimators, and the training RNG is untouched.

    Hooks, each task's own: :meth:`binarize`, :meth:`build` (the networks and any other
    parameter, from the generator), :meth:`encode`, :meth:`decoder_input`, :meth:`posterior`,
    :meth:`kl`, :meth:`log_prior`, :meth:`log_q`, :meth:`posterior_mean`, :meth:`sampler`,
    :meth:`sample_from_uniforms`, :meth:`exact_by_default`, :meth:`n_configurations`,
    :meth:`configurations` and :meth:`configuration_log_q`.
    """

    #: seed of the one fixed preparation of the validation and test images (drawn once, on the CPU)
    eval_binarisation_seed: ClassVar[int]
    #: seed of the latent samples used by ``evaluate`` / ``final_metrics`` (common random numbers)
    eval_sample_seed: ClassVar[int]
    final_figures = (
        Metric(name="test_iwae{K}", recorded=END, direction=HIGHER, scale=LINEAR, source=TASK,
               label="test IWAE bound", unit="nats per image",
               doc="the K-sample importance-weighted bound (Burda et al. 2016) on the test images"),
    )

    def __init__(self, **options):
        super().__init__(**options)
        self.lr = self.config["lr"]

    # ---- hooks: the latent family and the model ------------------------------------------------
    def binarize(self) -> str:
        """How images are prepared (:func:`prepare`): ``dynamic``, ``threshold`` or ``none``."""
        return "dynamic"

    def build(self, generator: torch.Generator) -> None:
        """Create ``self.encoder``, ``self.decoder`` and any other parameter, on ``self.device``,
        drawing the initialisation from ``generator`` (called once the data are loaded)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(z|x), shape (*x.shape[:-1], *event)."""
        raise NotImplementedError

    def decoder_input(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The decoder's input for latents ``z`` (..., *event) against images ``x``."""
        raise NotImplementedError

    def posterior(self, a: torch.Tensor) -> D.Distribution:
        """q(z|x) from the encoder logits ``a``: batch_shape (B,), the latent event."""
        raise NotImplementedError

    def kl(self, a: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per image from the encoder logits, exact, (B,)."""
        raise NotImplementedError

    def log_prior(self, z: torch.Tensor):
        """log p(z) for samples z (..., B, *event): a tensor (..., B) or a constant."""
        raise NotImplementedError

    def log_q(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """log q(z|x) for samples z (..., B, *event) against the logits ``a`` (B, *event)."""
        raise NotImplementedError

    def posterior_mean(self, a: torch.Tensor) -> torch.Tensor:
        """E_q[z] from the logits (the score w.r.t. the logits is z - E_q[z])."""
        raise NotImplementedError

    def sampler(self, q: torch.Tensor) -> Callable[[tuple], torch.Tensor]:
        """``sample(shape)``: samples of q (mean ``q``) of shape (*shape, *q.shape), from the
        global RNG (the harness isolates it during measurements)."""
        raise NotImplementedError

    def sample_from_uniforms(self, a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Samples of q(z|x) from uniforms ``u`` (K, *a.shape) drawn from the evaluation generator."""
        raise NotImplementedError

    def exact_by_default(self) -> bool:
        """Whether ``reference=auto`` enumerates."""
        raise NotImplementedError

    def n_configurations(self) -> int:
        """How many latent configurations the exact reference enumerates."""
        raise NotImplementedError

    def configurations(self, start: int, stop: int) -> torch.Tensor:
        """Configurations ``start..stop-1`` (n, *event), in the model's dtype."""
        raise NotImplementedError

    def configuration_log_q(self, a: torch.Tensor, n: int) -> torch.Tensor:
        """log q(z|x_b) of every configuration, (B, n) in float64, differentiable in ``a``."""
        raise NotImplementedError

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self, device, generator):
        self.device = torch.device(device)
        train_u8, val, test = fixed_data(self.config["data_dir"], self.binarize(),
                                         self.eval_binarisation_seed)
        n_train = self.config.get("training_images", N_TRAIN)
        self._train_u8 = train_u8[:n_train]
        self._test = test.to(self.device)
        # without a validation split (every training image trains) the held-out images are the
        # test images, as in the code that trains on all of them
        self._val = val.to(self.device) if n_train == N_TRAIN else self._test
        self.build(generator)

    def parameters(self):
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def estimated_parameters(self):
        return list(self.encoder.parameters())

    # ---- data ----------------------------------------------------------------------------------
    def train_batches(self, generator) -> Iterator[torch.Tensor]:
        """Epochs of a random permutation of the training images (``training_images``; incomplete
        last batch dropped), prepared as :meth:`binarize` says with a CPU generator seeded from
        ``generator``."""
        B, n = self.config["batch_size"], len(self._train_u8)
        bin_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        while True:
            perm = torch.randperm(n, generator=generator)
            for i in range(0, n - B + 1, B):
                yield prepare(self._train_u8[perm[i:i + B]], self.binarize(), bin_gen).to(self.device)

    def measure_batch(self):
        return self._val[: self.config["measure_size"]]

    # ---- model ---------------------------------------------------------------------------------
    def log_lik(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) = sum of the Bernoulli log-likelihoods of the pixels, for z of shape
        (..., B, *event) against x of shape (B, 784): (..., B)."""
        logits = self.decoder(self.decoder_input(z, x))
        return ((x * logits).sum(-1) - F.softplus(logits).sum(-1)).to(z.dtype)

    def problem(self, batch):
        x = batch
        a = self.encode(x)
        dist = self.posterior(a)

        def f(z):
            return self.log_lik(x, z)

        return Problem(dist, f, context=x, analytic=-self.kl(a).sum())

    # ---- reference gradient ---------------------------------------------------------------------
    def reference_gradient(self, batch):
        mode = self.config["reference"]
        if mode == "auto":
            mode = "exact" if self.exact_by_default() else "sampled"
        return self._exact_reference(batch) if mode == "exact" else self._sampled_reference(batch)

    def _exact_reference(self, x):
        """grad of sum_b sum_z q(z|x_b) log p(x_b|z) by enumerating every configuration: the
        log-likelihood table (B, n) without gradient, chunk by chunk, then log q differentiably."""
        params = self.estimated_parameters()
        n = self.n_configurations()
        a = self.encode(x)
        fz = []
        with torch.no_grad():
            for start in range(0, n, CHUNK_ROWS):
                Z = self.configurations(start, min(n, start + CHUNK_ROWS))  # (c, *event)
                logits = self.decoder(self.decoder_input(Z, x))  # (c, 784)
                fz.append((x @ logits.T - F.softplus(logits).sum(-1)).double())  # (B, c)
        objective = (self.configuration_log_q(a, n).exp() * torch.cat(fz, 1)).sum()
        return Reference(flat_grad(objective, params).float(), exact=True, n_samples=None)

    def _sampled_reference(self, x):
        """Unbiased score-function estimate with a leave-one-out baseline, R chunks of S samples.

        For chunk r and image b: g_rb = 1/S sum_s (f_s - mean_{s' != s} f_s') (z_s - E_q[z]), an
        unbiased estimate of d/da_b E_q[f] (the baseline uses only the other samples); the R chunk
        estimates are carried back to the encoder in one batched VJP.
        """
        R, S = self.config["ref_chunks"], self.config["ref_chunk_samples"]
        params = self.estimated_parameters()
        a = self.encode(x)  # (B, *event)
        B = a.shape[0]
        per_group = max(1, CHUNK_ROWS // (S * B))
        gs = []
        with torch.no_grad():
            q = self.posterior_mean(a)
            sample = self.sampler(q)
            for start in range(0, R, per_group):
                r = min(per_group, R - start)
                z = sample((r, S))  # (r, S, B, *event)
                fz = self.log_lik(x, z)  # (r, S, B)
                loo = (fz.sum(1, keepdim=True) - fz) / (S - 1)
                w = (fz - loo)[(...,) + (None,) * (z.dim() - fz.dim())]
                gs.append((w * (z - q)).mean(1))  # (r, B, *event)
        G = torch.cat(gs)  # (R, B, *event)
        try:
            per = torch.autograd.grad(a, params, grad_outputs=G, is_grads_batched=True)
            rows = torch.cat([p.reshape(R, -1) for p in per], 1)
        except RuntimeError:  # no batching rule: one VJP per chunk
            rows = torch.stack([flat_grad(a, params, grad_outputs=G[i], retain_graph=True)
                                for i in range(R)])
        return Reference.from_chunks(rows, n_samples=R * S)

    # ---- evaluation -----------------------------------------------------------------------------
    def _posterior_samples(self, x: torch.Tensor, K: int, generator: torch.Generator):
        """Per chunk of images: (images, encoder logits, K samples z ~ q(z|x) from ``generator``)."""
        n = max(1, CHUNK_ROWS // K)
        for i in range(0, x.shape[0], n):
            xc = x[i:i + n]
            a = self.encode(xc)
            u = torch.rand(K, *a.shape, generator=generator, device=a.device, dtype=a.dtype)
            yield xc, a, self.sample_from_uniforms(a, u)

    @torch.no_grad()
    def elbo(self, x: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
        """Per-image ELBO: exact -KL + mean of K reconstruction samples, shape (N,)."""
        return torch.cat([self.log_lik(xc, z).mean(0) - self.kl(a)
                          for xc, a, z in self._posterior_samples(x, K, generator)])

    @torch.no_grad()
    def iwae(self, x: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
        """Per-image K-sample importance-weighted bound log 1/K sum_k p(x, z_k) / q(z_k|x), (N,)."""
        out = []
        for xc, a, z in self._posterior_samples(x, K, generator):
            logw = self.log_lik(xc, z) + self.log_prior(z) - self.log_q(z, a)
            out.append(torch.logsumexp(logw, 0) - math.log(K))
        return torch.cat(out)

    def _eval_gen(self, offset: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.eval_sample_seed + offset)

    def _final_images(self, n: int | None = None) -> torch.Tensor:
        """The first ``n`` test images (all by default), at most ``SUBSET_TEST_IMAGES`` in a
        subset evaluation."""
        n = len(self._test) if n is None else n
        if self.evaluation == "subset":
            n = min(n, SUBSET_TEST_IMAGES)
        return self._test[:n]

    def _val_images(self) -> int:
        """How many validation images the curve uses: ``val_size``, at most ``SUBSET_VAL_IMAGES``
        in a subset evaluation."""
        n = self.config["val_size"]
        return min(n, SUBSET_VAL_IMAGES) if self.evaluation == "subset" else n

    def evaluate(self, final=False):
        x = self._final_images() if final else self._val[: self._val_images()]
        return float(self.elbo(x, self.config["eval_samples"], self._eval_gen(int(final))).mean())

    def final_metrics(self):
        K = self.config["iwae_samples"]
        # binary_vae bounds the IWAE images with its ``iwae_images`` option; categorical_vae has none
        x = self._final_images(self.config.get("iwae_images"))
        return {f"test_iwae{K}": float(self.iwae(x, K, self._eval_gen(2)).mean())}
