"""Categorical VAE on MNIST: the benchmark of the 2020-2025 categorical-estimator papers.

The model of the Gumbel-Softmax paper's categorical VAE as the GST and ReinMax code runs it (Jang,
Gu & Poole 2017, Sec. 4.2; Fan et al. 2022, Sec. 6; Liu et al. 2023, Sec. 6.2; code:
LiyuanLucasLiu/ReinMax mnist_vae/model/vae.py, itself modified from chijames/GST): L categorical
latents of C classes, a uniform prior, an MLP encoder 784-512-256-(L*C) and decoder
(L*C)-256-512-784 with ReLU, Bernoulli pixels.  The papers name a configuration "C x L"
(``categorical_8_latent_4``: 8 classes, 4 latents); ``size`` takes those presets.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import distributions as D, nn
from torch.distributions import constraints

from estbench.core.plugins import Option, integer_at_least

from .base import Problem, Reference, Task, flat_grad
from .data import mnist

#: the C x L configurations of the ReinMax and GST experiments (C classes, L latents)
SIZES = ("8x4", "4x24", "8x16", "16x12", "64x8", "10x30")
N_TRAIN, N_VAL, N_TEST, PIXELS = 50_000, 10_000, 10_000, 784
#: seeds of the one fixed binarisation of the validation and test images, and of the latent
#: samples of the evaluations (common random numbers across checkpoints and estimators)
EVAL_BINARISATION_SEED = 20_230_412
EVAL_SAMPLE_SEED = 4_410_237
#: configurations C^L up to which the reference gradient is exact (8x4: 4096)
MAX_EXACT_CONFIGS = 65_536
#: rows (samples x images, or configurations) pushed through the decoder at once
CHUNK_ROWS = 16_384
#: test images of the final figures in a *subset* evaluation (the quick budget)
SUBSET_TEST_IMAGES = 1000

_DATA_CACHE: dict[tuple, tuple] = {}


def _prepare(images_u8: torch.Tensor, binarize: str, generator: torch.Generator) -> torch.Tensor:
    """Images (N, 784) in [0, 1] as the model sees them: a Bernoulli draw per pixel (dynamic
    binarisation, here drawn once), thresholded at 1/2, or the grey levels themselves (``none``:
    the ReinMax / GST code, whose BCE takes the intensities as targets)."""
    p = images_u8.reshape(-1, PIXELS).float() / 255
    if binarize == "dynamic":
        return (torch.rand(p.shape, generator=generator) < p).float()
    if binarize == "threshold":
        return (p > 0.5).float()
    return p


def _fixed_data(data_dir: str, binarize: str):
    """(train uint8 (50000, 784), validation and test images as the model sees them), on the CPU,
    cached per data folder and binarisation (deterministic)."""
    key = (str(data_dir or mnist.DEFAULT_DIR), binarize)
    if key not in _DATA_CACHE:
        images, _ = mnist.load("train", data_dir or None)
        test_images, _ = mnist.load("test", data_dir or None)
        flat = images.reshape(-1, PIXELS)
        g = torch.Generator().manual_seed(EVAL_BINARISATION_SEED)
        val = _prepare(flat[N_TRAIN:], binarize, g)
        test = _prepare(test_images, binarize, g)
        _DATA_CACHE[key] = (flat[:N_TRAIN], val, test)
    return _DATA_CACHE[key]


def _torch_default_linear(n_in: int, n_out: int, generator: torch.Generator) -> nn.Linear:
    """nn.Linear with PyTorch's default initialisation (weights and biases ~ U(-1/sqrt(n_in),
    1/sqrt(n_in)), what the ReinMax code gets) drawn from ``generator``."""
    lin = nn.Linear(n_in, n_out)
    bound = 1 / math.sqrt(n_in)
    with torch.no_grad():
        lin.weight.copy_((torch.rand(n_out, n_in, generator=generator) * 2 - 1) * bound)
        lin.bias.copy_((torch.rand(n_out, generator=generator) * 2 - 1) * bound)
    return lin


def _mlp(sizes: list[int], generator: torch.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(_torch_default_linear(n_in, n_out, generator))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class CategoricalVAE(Task):
    """Categorical-latent VAE on MNIST; f(z) = log p(x|z), the KL to the uniform prior is exact.

    Data.  The first 50k MNIST training images train, the last 10k validate, the 10k test images
    test.  ``binarize``: ``dynamic`` (default; each training pixel ~ Bernoulli(intensity), fresh each
    time an image is used, from a CPU generator derived from the harness's data generator, so every
    estimator sees the same images; validation and test binarised once with a fixed seed),
    ``threshold`` (pixel > 1/2, as IndeCateR's code), or ``none`` (the grey levels as Bernoulli
    "targets", as the ReinMax and GST code's binary cross-entropy does: then the figures are not
    log-likelihoods of binary images).

    Model.  q(z|x) = Independent(OneHotCategorical(logits=enc(x).view(L, C)), 1): batch_shape (B,),
    event (L, C); p(z) uniform over the C^L configurations; p(x|z) = Bernoulli(sigmoid(dec(z))),
    dec on the flattened one-hot (L*C).  Encoder 784-512-256-(L*C), decoder (L*C)-256-512-784,
    ReLU between layers, PyTorch's default initialisation (as the ReinMax code).

    Objective split.  ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)); the KL to the uniform prior
    is exact, sum_l sum_c q_lc log q_lc + L log C (``Problem.analytic``), and only the
    reconstruction term is estimated: ``f(z) = log p(x|z)`` (the negative BCE summed over pixels,
    what the ReinMax code differentiates).  ``estimated_parameters()``: the encoder's.

    Reference gradient (of sum_b E_q[log p(x_b|z)] w.r.t. the encoder on the first
    ``measure_size`` validation images): exact enumeration of the C^L configurations when C^L <=
    ``MAX_EXACT_CONFIGS`` (8x4: 4096; the ReinMax paper's own bias figures are against this
    gradient); otherwise an unbiased score-function estimate with a leave-one-out baseline --
    ``ref_chunks`` chunks of ``ref_chunk_samples`` samples per image, the chunk mean with its
    standard error.

    Evaluation.  ``evaluate(False)``: ELBO per image on the first ``val_size`` validation images
    (exact KL + ``eval_samples`` reconstruction samples); ``evaluate(True)``: the same on the test
    images; ``final_metrics()``: ``test_iwae{K}``, the K-sample importance-weighted bound (Burda et
    al. 2016).  The quick budget's *subset* evaluation uses the first ``SUBSET_TEST_IMAGES`` test
    images for both (the same for every estimator).

    Optimiser: Adam at ``lr`` (ReinMax's code: 1e-3 by default, tuned per method and size in its
    hyper-parameter table), batch 100.
    """

    name = "categorical_vae"
    family = "categorical"
    description = ("categorical VAE (C x L one-hot latents, uniform prior) on MNIST, the ReinMax / "
                   "GST benchmark; f = log p(x|z), exact KL")
    options = {
        "size": Option("8x4", "C x L: C classes per latent, L latents (the ReinMax presets)",
                       choices=SIZES),
        "binarize": Option("dynamic", "dynamic | threshold (> 1/2) | none (grey levels, as the "
                           "ReinMax code)", choices=("dynamic", "threshold", "none")),
        "batch_size": Option(100, "training images per step (100 in the ReinMax code)",
                             constraint=constraints.integer_interval(1, N_TRAIN)),
        "lr": Option(1e-3, "Adam learning rate (the ReinMax code's default)",
                     constraint=constraints.positive),
        "data_dir": Option("", "folder with the 4 MNIST gzip IDX files (default: shipped copy)"),
        "val_size": Option(1000, "validation images used by evaluate(final=False)",
                           constraint=constraints.integer_interval(1, N_VAL)),
        "eval_samples": Option(10, "reconstruction samples per image in evaluate()",
                               constraint=constraints.positive_integer),
        "iwae_samples": Option(100, "importance samples of the final test IWAE bound",
                               constraint=constraints.positive_integer),
        "measure_size": Option(8, "validation images in the measurement batch",
                               constraint=constraints.integer_interval(1, N_VAL)),
        "reference": Option("auto", "auto (exact iff C^L <= 65536) | exact | sampled",
                            choices=("auto", "exact", "sampled")),
        "ref_chunks": Option(32, "sampled reference: independent chunks R",
                             constraint=integer_at_least(2)),
        "ref_chunk_samples": Option(64, "sampled reference: samples per chunk S (>= 2)",
                                    constraint=integer_at_least(2)),
    }
    lr = 1e-3
    budgets = {
        # 6 f-evaluations as on binary_vae: whole antithetic pairs and REBAR/RELAX triples
        "quick": {"steps": 200, "n_samples": 6, "checkpoints": 5, "measure_samples": 64,
                  "evaluation": "subset"},
        # the ReinMax code's length: 160 epochs of 500 batches of 100 (its 60k training images;
        # here 50k, the last 10k validate)
        "standard": {"steps": 80_000, "n_samples": 6, "checkpoints": 21, "measure_samples": 256},
    }

    def __init__(self, **options):
        super().__init__(**options)
        c = self.config
        self.classes, self.latents = map(int, c["size"].split("x"))
        self.lr = c["lr"]
        if c["reference"] == "exact" and self.classes ** self.latents > MAX_EXACT_CONFIGS:
            raise ValueError(f"task 'categorical_vae': reference=exact enumerates C^L = "
                             f"{self.classes}^{self.latents} configurations, more than "
                             f"{MAX_EXACT_CONFIGS}")

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self, device, generator):
        self.device = torch.device(device)
        c = self.config
        self._train_u8, val, test = _fixed_data(c["data_dir"], c["binarize"])
        self._val, self._test = val.to(self.device), test.to(self.device)
        k = self.latents * self.classes
        self.encoder = _mlp([PIXELS, 512, 256, k], generator).to(self.device)
        self.decoder = _mlp([k, 256, 512, PIXELS], generator).to(self.device)

    def parameters(self):
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def estimated_parameters(self):
        return list(self.encoder.parameters())

    # ---- data ----------------------------------------------------------------------------------
    def train_batches(self, generator) -> Iterator[torch.Tensor]:
        """Epochs of a random permutation of the 50k training images (incomplete last batch
        dropped), prepared as ``binarize`` says with a CPU generator seeded from ``generator``."""
        B = self.config["batch_size"]
        bin_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        while True:
            perm = torch.randperm(N_TRAIN, generator=generator)
            for i in range(0, N_TRAIN - B + 1, B):
                yield _prepare(self._train_u8[perm[i:i + B]], self.config["binarize"],
                               bin_gen).to(self.device)

    def measure_batch(self):
        return self._val[: self.config["measure_size"]]

    # ---- model ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(z|x), shape (*x.shape[:-1], L, C)."""
        return self.encoder(x).unflatten(-1, (self.latents, self.classes))

    def log_lik(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) for one-hot z of shape (..., B, L, C) against x (B, 784): (..., B)."""
        logits = self.decoder(z.flatten(-2).to(x.dtype))
        return ((x * logits).sum(-1) - F.softplus(logits).sum(-1)).to(z.dtype)

    def kl(self, a: torch.Tensor) -> torch.Tensor:
        """KL(q || uniform) per image: sum_l sum_c q log q + L log C, (B,)."""
        logq = torch.log_softmax(a, -1)
        return (logq.exp() * logq).sum((-2, -1)) + self.latents * math.log(self.classes)

    def problem(self, batch):
        x = batch
        a = self.encode(x)
        dist = D.Independent(D.OneHotCategorical(logits=a, validate_args=False), 1)

        def f(z):
            return self.log_lik(x, z)

        return Problem(dist, f, context=x, analytic=-self.kl(a).sum())

    # ---- reference gradient ---------------------------------------------------------------------
    def reference_gradient(self, batch):
        mode = self.config["reference"]
        if mode == "auto":
            mode = "exact" if self.classes ** self.latents <= MAX_EXACT_CONFIGS else "sampled"
        return self._exact_reference(batch) if mode == "exact" else self._sampled_reference(batch)

    def _configurations(self, start: int, stop: int) -> torch.Tensor:
        """One-hot configurations ``start..stop-1`` in base C, (n, L, C)."""
        idx = torch.arange(start, stop, device=self.device)
        powers = self.classes ** torch.arange(self.latents - 1, -1, -1, device=self.device)
        digits = (idx[:, None] // powers) % self.classes
        return F.one_hot(digits, self.classes).float()

    def _exact_reference(self, x):
        """grad of sum_b sum_z q(z|x_b) log p(x_b|z) by enumerating the C^L configurations."""
        params = self.estimated_parameters()
        n = self.classes ** self.latents
        fz, logq = [], []
        logp = torch.log_softmax(self.encode(x).double(), -1)  # (B, L, C)
        for start in range(0, n, CHUNK_ROWS):
            Z = self._configurations(start, min(n, start + CHUNK_ROWS))  # (c, L, C)
            with torch.no_grad():
                logits = self.decoder(Z.flatten(-2))  # (c, 784)
                fz.append((x @ logits.T - F.softplus(logits).sum(-1)).double())  # (B, c)
            logq.append(torch.einsum("blc,nlc->bn", logp, Z.double()))
        objective = (torch.cat(logq, 1).exp() * torch.cat(fz, 1)).sum()
        return Reference(flat_grad(objective, params).float(), exact=True, n_samples=None)

    def _sampled_reference(self, x):
        """Unbiased score-function estimate with a leave-one-out baseline, R chunks of S samples:
        g_rb = 1/S sum_s (f_s - mean_{s' != s} f_s') (z_s - softmax(a_b)), d/da_b E_q[f] (the score
        of a one-hot categorical w.r.t. its logits is z - softmax(a)), carried to the encoder in one
        batched VJP."""
        R, S = self.config["ref_chunks"], self.config["ref_chunk_samples"]
        params = self.estimated_parameters()
        a = self.encode(x)  # (B, L, C)
        B = a.shape[0]
        per_group = max(1, CHUNK_ROWS // (S * B))
        gs = []
        with torch.no_grad():
            q = torch.softmax(a, -1)
            cat = D.OneHotCategorical(probs=q, validate_args=False)
            for start in range(0, R, per_group):
                r = min(per_group, R - start)
                z = cat.sample((r, S))  # (r, S, B, L, C)
                fz = self.log_lik(x, z)  # (r, S, B)
                loo = (fz.sum(1, keepdim=True) - fz) / (S - 1)
                gs.append(((fz - loo)[..., None, None] * (z - q)).mean(1))  # (r, B, L, C)
        G = torch.cat(gs)
        try:
            per = torch.autograd.grad(a, params, grad_outputs=G, is_grads_batched=True)
            rows = torch.cat([p.reshape(R, -1) for p in per], 1)
        except RuntimeError:  # no batching rule: one VJP per chunk
            rows = torch.stack([flat_grad(a, params, grad_outputs=G[i], retain_graph=True)
                                for i in range(R)])
        return Reference.from_chunks(rows, n_samples=R * S)

    # ---- evaluation -----------------------------------------------------------------------------
    def _posterior_samples(self, x: torch.Tensor, K: int, generator: torch.Generator):
        """Per chunk of images: (images, encoder logits, K one-hot samples of q from ``generator``)."""
        n = max(1, CHUNK_ROWS // K)
        for i in range(0, x.shape[0], n):
            xc = x[i:i + n]
            a = self.encode(xc)
            u = torch.rand(K, *a.shape, generator=generator, device=a.device, dtype=a.dtype)
            gumbel = -(-u.clamp_min(torch.finfo(a.dtype).tiny).log()).log()
            yield xc, a, F.one_hot((a + gumbel).argmax(-1), self.classes).to(a.dtype)

    @torch.no_grad()
    def elbo(self, x: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
        """Per-image ELBO: exact -KL + mean of K reconstruction samples, (N,)."""
        return torch.cat([self.log_lik(xc, z).mean(0) - self.kl(a)
                          for xc, a, z in self._posterior_samples(x, K, generator)])

    @torch.no_grad()
    def iwae(self, x: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
        """Per-image K-sample importance-weighted bound log 1/K sum_k p(x, z_k) / q(z_k|x), (N,)."""
        out = []
        log_prior = -self.latents * math.log(self.classes)
        for xc, a, z in self._posterior_samples(x, K, generator):
            logq = (z * torch.log_softmax(a, -1)).sum((-2, -1))
            logw = self.log_lik(xc, z) + log_prior - logq
            out.append(torch.logsumexp(logw, 0) - math.log(K))
        return torch.cat(out)

    def _eval_gen(self, offset: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(EVAL_SAMPLE_SEED + offset)

    def _final_images(self) -> torch.Tensor:
        return self._test[:SUBSET_TEST_IMAGES] if self.evaluation == "subset" else self._test

    def evaluate(self, final=False):
        x = self._final_images() if final else self._val[: self.config["val_size"]]
        return float(self.elbo(x, self.config["eval_samples"], self._eval_gen(int(final))).mean())

    def final_metrics(self):
        K = self.config["iwae_samples"]
        return {f"test_iwae{K}": float(self.iwae(self._final_images(), K, self._eval_gen(2)).mean())}
