"""Categorical VAE on MNIST: the benchmark of the 2020-2025 categorical-estimator papers.

The model of the Gumbel-Softmax paper's categorical VAE as the GST and ReinMax code runs it (Jang,
Gu & Poole 2017, Sec. 4.2; Fan et al. 2022, Sec. 6; Liu et al. 2023, Sec. 6.2; code:
LiyuanLucasLiu/ReinMax mnist_vae/model/vae.py, itself modified from chijames/GST): L categorical
latents of C classes, a uniform prior, an MLP encoder 784-512-256-(L*C) and decoder
(L*C)-256-512-784 with ReLU, Bernoulli pixels.  The papers name a configuration "C x L"
(``categorical_8_latent_4``: 8 classes, 4 latents); ``size`` takes those presets.  The data, the
training order, the reference-gradient scaffolding and the evaluation are the MNIST VAE's
(tasks/mnist_vae.py); this module holds the one-hot latents, the uniform prior and the networks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import distributions as D, nn
from torch.distributions import constraints

from estbench.core.plugins import Option

from .mnist_vae import (CHUNK_ROWS, N_TEST, N_TRAIN, N_VAL, PIXELS, SUBSET_TEST_IMAGES, MNISTVAE,
                        evaluation_options, reference_options)

__all__ = ["CategoricalVAE", "SIZES", "CHUNK_ROWS", "N_TEST", "N_TRAIN", "N_VAL", "PIXELS",
           "SUBSET_TEST_IMAGES"]

#: the C x L configurations of the ReinMax and GST experiments (C classes, L latents)
SIZES = ("8x4", "4x24", "8x16", "16x12", "64x8", "10x30")
#: seeds of the one fixed binarisation of the validation and test images, and of the latent
#: samples of the evaluations (common random numbers across checkpoints and estimators)
EVAL_BINARISATION_SEED = 20_230_412
EVAL_SAMPLE_SEED = 4_410_237
#: configurations C^L up to which the reference gradient is exact (8x4: 4096)
MAX_EXACT_CONFIGS = 65_536


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


class CategoricalVAE(MNISTVAE):
    """Categorical-latent VAE on MNIST; f(z) = log p(x|z), the KL to the uniform prior is exact.

    Data.  The first 50k MNIST training images train, the last 10k validate, the 10k test images
    test (``training_images=60000``: all 60k train, as the ReinMax code, and the test images are
    also the held-out images of the curve and the measurement batch).  ``binarize``: ``dynamic`` (default; each training pixel ~ Bernoulli(intensity), fresh each
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
    images for both and the first ``SUBSET_VAL_IMAGES`` validation images for the curve (the same
    for every estimator).

    Optimiser: Adam (or RAdam, ``optimizer``) at ``lr`` over every parameter, PyTorch's defaults
    otherwise (ReinMax's code: Adam at 1e-3 by default, both tuned per method and size in its
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
        "lr": Option(1e-3, "learning rate (the ReinMax code's default)",
                     constraint=constraints.positive),
        "optimizer": Option("adam", "adam | radam (the ReinMax code tunes it per method and "
                            "size)", choices=("adam", "radam")),
        **evaluation_options(),
        **reference_options("C^L <= 65536"),
    }
    lr = 1e-3
    budgets = {
        # 6 f-evaluations as on binary_vae: whole antithetic pairs and REBAR/RELAX triples
        # quick: 100 steps (10,000 images), three measurements, five points of the curve: in the
        # committed reference the estimators' order of held-out ELBO at step 100 was much that at
        # step 200 (Kendall tau 0.79), and the sweep of every task must fit in 10 minutes
        # five points of the curve, every other one a checkpoint's (evaluated there anyway)
        "quick": {"steps": 100, "n_samples": 6, "checkpoints": 3, "measure_samples": 64,
                  "evaluation": "subset", "eval_points": 5},
        # the ReinMax code's length: 160 epochs of 500 batches of 100 (its 60k training images;
        # here 50k, the last 10k validate)
        "standard": {"steps": 80_000, "n_samples": 6, "checkpoints": 21, "measure_samples": 256},
    }
    eval_binarisation_seed = EVAL_BINARISATION_SEED
    eval_sample_seed = EVAL_SAMPLE_SEED

    def __init__(self, **options):
        super().__init__(**options)
        c = self.config
        self.optimizer = c["optimizer"]
        self.classes, self.latents = map(int, c["size"].split("x"))
        if c["reference"] == "exact" and self.classes ** self.latents > MAX_EXACT_CONFIGS:
            raise ValueError(f"task 'categorical_vae': reference=exact enumerates C^L = "
                             f"{self.classes}^{self.latents} configurations, more than "
                             f"{MAX_EXACT_CONFIGS}")

    # ---- setup ---------------------------------------------------------------------------------
    def binarize(self):
        return self.config["binarize"]

    def build(self, generator):
        k = self.latents * self.classes
        self.encoder = _mlp([PIXELS, 512, 256, k], generator).to(self.device)
        self.decoder = _mlp([k, 256, 512, PIXELS], generator).to(self.device)

    # ---- the one-hot latents and the uniform prior ----------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(z|x), shape (*x.shape[:-1], L, C)."""
        return self.encoder(x).unflatten(-1, (self.latents, self.classes))

    def decoder_input(self, z, x):
        """The flattened one-hot (..., L*C), in the images' dtype."""
        return z.flatten(-2).to(x.dtype)

    def posterior(self, a):
        return D.Independent(D.OneHotCategorical(logits=a, validate_args=False), 1)

    def kl(self, a: torch.Tensor) -> torch.Tensor:
        """KL(q || uniform) per image: sum_l sum_c q log q + L log C, (B,)."""
        logq = torch.log_softmax(a, -1)
        return (logq.exp() * logq).sum((-2, -1)) + self.latents * math.log(self.classes)

    def log_prior(self, z):
        return -self.latents * math.log(self.classes)

    def log_q(self, z, a):
        return (z * torch.log_softmax(a, -1)).sum((-2, -1))

    def posterior_mean(self, a):
        return torch.softmax(a, -1)

    def sampler(self, q):
        return D.OneHotCategorical(probs=q, validate_args=False).sample

    def sample_from_uniforms(self, a, u):
        """Gumbel-max: the one-hot argmax of a + Gumbel noise made from ``u``."""
        gumbel = -(-u.clamp_min(torch.finfo(a.dtype).tiny).log()).log()
        return F.one_hot((a + gumbel).argmax(-1), self.classes).to(a.dtype)

    # ---- enumeration (the exact reference) ------------------------------------------------------
    def exact_by_default(self):
        return self.classes ** self.latents <= MAX_EXACT_CONFIGS

    def n_configurations(self):
        return self.classes ** self.latents

    def configurations(self, start: int, stop: int) -> torch.Tensor:
        """One-hot configurations ``start..stop-1`` in base C, (n, L, C)."""
        idx = torch.arange(start, stop, device=self.device)
        powers = self.classes ** torch.arange(self.latents - 1, -1, -1, device=self.device)
        digits = (idx[:, None] // powers) % self.classes
        return F.one_hot(digits, self.classes).float()

    def configuration_log_q(self, a, n):
        """sum_l log q_l(z_l) for every configuration, chunk by chunk, (B, C^L)."""
        logp = torch.log_softmax(a.double(), -1)  # (B, L, C)
        return torch.cat([torch.einsum("blc,nlc->bn", logp,
                                       self.configurations(s, min(n, s + CHUNK_ROWS)).double())
                          for s in range(0, n, CHUNK_ROWS)], 1)
