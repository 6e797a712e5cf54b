"""Sigmoid-belief-net VAE on dynamically binarised MNIST: the standard binary-latent benchmark.

The model of NVIL / MuProp / REBAR / RELAX / ARM / DisARM (Mnih & Gregor 2014; Tucker et al. 2017,
Sec. 6.2; Grathwohl et al. 2018, Sec. 6.2; Yin & Zhou 2019, Sec. 4.2; Dong, Mnih & Tucker 2020,
Sec. 5.2): 200 Bernoulli latents with learned prior logits, a Bernoulli decoder over the 784 pixels,
and a "linear" (784 -> 200 logits -> 784) or "nonlinear" (two hidden layers of 200 LeakyReLU(0.3)
units in both encoder and decoder, as in DisARM's code) architecture.  The data, the training
order, the reference-gradient scaffolding and the evaluation are the MNIST VAE's
(tasks/mnist_vae.py); this module holds the Bernoulli latent, the learned prior and the networks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import distributions as D, nn

from torch.distributions import constraints

from estbench.core.plugins import Option

from .data import mnist
from .mnist_vae import (CHUNK_ROWS, N_TRAIN, N_VAL, PIXELS, SUBSET_TEST_IMAGES, MNISTVAE,
                        evaluation_options, fixed_data, reference_options)

__all__ = ["BinaryVAE", "CHUNK_ROWS", "N_TRAIN", "N_VAL", "PIXELS", "SUBSET_TEST_IMAGES"]

#: seed of the one fixed binarisation of the validation and test images (drawn once, on the CPU)
EVAL_BINARISATION_SEED = 20_140_621
#: seed of the latent samples used by ``evaluate`` / ``final_metrics`` (common random numbers)
EVAL_SAMPLE_SEED = 7_310_011


def _log_bernoulli(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log prod_d Bern(z_d; sigmoid(logits_d)) = z . logits - sum softplus(logits); sums the last dim."""
    return (z * logits).sum(-1) - F.softplus(logits).sum(-1)


def _kl_bernoulli(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """KL(Bern(sigmoid a) || Bern(sigmoid c)) summed over the last dim, exact and stable in logits."""
    q = torch.sigmoid(a)
    return (q * (F.logsigmoid(a) - F.logsigmoid(c))
            + (1 - q) * (F.logsigmoid(-a) - F.logsigmoid(-c))).sum(-1)


_MEAN_CACHE: dict[tuple, torch.Tensor] = {}


def _train_mean(data_dir: str, n_train: int) -> torch.Tensor:
    """Mean intensity (784,) in [0, 1] of the first ``n_train`` training images (the ones that
    train), on the CPU; cached per folder and count."""
    key = (str(mnist.DEFAULT_DIR if not data_dir else data_dir), n_train)
    if key not in _MEAN_CACHE:
        train = fixed_data(data_dir, "dynamic", EVAL_BINARISATION_SEED)[0][:n_train]
        _MEAN_CACHE[key] = train.double().mean(0).div(255).float()
    return _MEAN_CACHE[key]


def _mlp(sizes: list[int], generator: torch.Generator, out_bias=None) -> nn.Sequential:
    """Linear layers with LeakyReLU(0.3) between them; Glorot-uniform weights drawn from
    ``generator`` and zero biases (Keras defaults, as in the DisARM code)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(n_in, n_out)
        limit = math.sqrt(6.0 / (n_in + n_out))
        with torch.no_grad():
            lin.weight.copy_((torch.rand(n_out, n_in, generator=generator) * 2 - 1) * limit)
            lin.bias.zero_()
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.3))
    if out_bias is not None:
        with torch.no_grad():
            layers[-1].bias.copy_(out_bias)
    return nn.Sequential(*layers)


class _Optimisers:
    """Several optimisers stepped as one: what the harness needs of an optimiser is ``zero_grad``
    and ``step``."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


class BinaryVAE(MNISTVAE):
    """Bernoulli-latent VAE on dynamically binarised MNIST; f(z) = log p(x|z), the KL is exact.

    Data.  The 60k MNIST training images are split into the first 50k (training) and the last 10k
    (validation); the 10k test images are the test set.  Training batches are binarised *dynamically*
    (each pixel ~ Bernoulli(intensity/255), fresh every time an image is used) with a CPU generator
    derived from the harness's data generator, so the order and the binary images are the same for
    every estimator (and every device).  Validation and test images are binarised once, with a fixed
    seed (``EVAL_BINARISATION_SEED``), and stay fixed.

    Model.  q(z|x) = Independent(Bernoulli(logits=enc(x)), 1) with ``latents`` Bernoulli latents
    (batch_shape (B,), event (latents,)); p(z) = Bernoulli(sigmoid(c)) with learned prior logits c
    (init 0); p(x|z) = Bernoulli(sigmoid(dec(z))).  "linear": enc and dec are single affine maps;
    "nonlinear": 784-200-200-latents and latents-200-200-784 with LeakyReLU(0.3).  With ``centre``
    the encoder sees x minus the training mean and the decoder's output bias starts at the logit of
    the (clipped) training mean (REBAR/RELAX/DisARM code options).

    Objective split.  ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)).  The KL between factorised
    Bernoullis is computed **exactly** (``Problem.analytic = -sum_b KL_b``), so only the
    reconstruction term is estimated: ``f(z) = log p(x|z)`` (closing over the decoder).  This is
    the same for every estimator; note ARM/DisARM put the whole log p(x,z) - log q(z|x) in the
    learning signal instead, so absolute variances are not comparable with their tables.
    ``context`` is the binarised input x (for input-dependent baselines such as NVIL's).
    ``estimated_parameters()`` are the encoder's parameters.

    Reference gradient (of sum_b E_q[log p(x_b|z)] w.r.t. the encoder, on the first
    ``measure_size`` validation images): exact enumeration of the 2^latents configurations when
    ``latents <= 16`` (``reference=auto`` or ``exact``); otherwise an unbiased score-function
    estimate with a leave-one-out baseline at the logits level -- R = ``ref_chunks`` independent
    chunks of S = ``ref_chunk_samples`` samples per image, one (batched) VJP per chunk through the
    encoder; the reference is the chunk mean, its stderr the chunk std / sqrt(R), n_samples = R*S.

    Evaluation.  ``evaluate(False)``: ELBO per image (nats) on the first ``val_size`` validation
    images, exact KL + ``eval_samples`` reconstruction samples.  ``evaluate(True)``: the same on all
    10k test images.  ``final_metrics()``: ``test_iwae{K}``, the K = ``iwae_samples`` importance-
    weighted bound (Burda et al. 2016) on the first ``iwae_images`` test images (default all 10k).
    The quick budget's *subset* evaluation computes both on the first ``SUBSET_TEST_IMAGES`` =
    500 test images and the curve on the first ``SUBSET_VAL_IMAGES`` = 500 validation images, the
    same for every estimator (paired across estimators, so differences stay well resolved): on
    the full test set the bound would take most of a quick cell's time.
    Evaluation samples come from a fixed generator, so they are common random numbers across
    checkpoints and estimators and never touch the training RNG.

    Optimiser: Adam at ``lr`` on all parameters; with ``prior_lr > 0`` Adam at ``lr`` on encoder and
    decoder and plain SGD at ``prior_lr`` on the prior logits, as the DisARM code runs it (Adam 1e-4,
    SGD 1e-2, batch 50, 1e6 steps: ``estbench run --budget paper``, tasks/protocols/binary_vae.yml).  Budgets: "quick" (200 steps, 6 evaluations per image,
    3 checkpoints of 64 estimates, 5 points of the curve; default model: linear, 200 latents, batch 50; the *subset*
    evaluation above; sparsemap is the slowest, its active set evaluating f at many structures);
    "standard" is the DisARM setting (1e6 steps; 6 evaluations per image, so that
    pairs and REBAR triples both fit, where DisARM used one pair) -- meant for a GPU; use
    ``binary_vae[lr=0.0001]`` for the paper's learning rate.
    """

    name = "binary_vae"
    family = "bernoulli"
    description = "Bernoulli VAE (sigmoid belief net) on dynamically binarised MNIST; f = log p(x|z), exact KL"
    options = {
        "latents": Option(200, "number of Bernoulli latents", constraint=constraints.positive_integer),
        "arch": Option("linear", "linear | nonlinear (2 x 200 LeakyReLU hidden layers)",
                       choices=("linear", "nonlinear")),
        "batch_size": Option(50, "training images per step (50 in ARM/DisARM)", constraint=constraints.integer_interval(1, N_TRAIN)),
        "lr": Option(1e-3, "Adam learning rate (DisARM: 1e-4)", constraint=constraints.positive),
        "prior_lr": Option(0.0, "plain SGD on the prior logits at this rate, as the DisARM code "
                           "trains them (1e-2); 0: the prior is trained with the rest by Adam at lr",
                           constraint=constraints.greater_than_eq(0.0)),
        "centre": Option(True, "demean encoder input; init decoder output bias at the data logit"),
        **evaluation_options(),
        "iwae_images": Option(10000, "test images for the IWAE bound (first n; 10000 = all)", constraint=constraints.integer_interval(1, 10000)),
        **reference_options("latents <= 16"),
    }
    lr = 1e-3
    budgets = {
        # 6 f-evaluations: whole units for every estimator (3 antithetic pairs, 2 REBAR/RELAX triples)
        # a measurement (64 estimates of 157k coordinates) costs far more than an ELBO point;
        # five points of the curve, every other one a checkpoint's (evaluated there anyway)
        "quick": {"steps": 200, "n_samples": 6, "checkpoints": 3, "measure_samples": 64,
                  "evaluation": "subset", "eval_points": 5},
        "standard": {"steps": 1_000_000, "n_samples": 6, "checkpoints": 21, "measure_samples": 256},
    }
    MAX_EXACT_LATENTS = 20
    eval_binarisation_seed = EVAL_BINARISATION_SEED
    eval_sample_seed = EVAL_SAMPLE_SEED

    def __init__(self, **options):
        super().__init__(**options)
        c = self.config
        if c["reference"] == "exact" and c["latents"] > self.MAX_EXACT_LATENTS:
            raise ValueError(
                f"task 'binary_vae': reference=exact enumerates 2^latents configurations; "
                f"latents={c['latents']} > {self.MAX_EXACT_LATENTS}"
            )

    # ---- setup ---------------------------------------------------------------------------------
    def build(self, generator):
        c = self.config
        mean = _train_mean(c["data_dir"], c["training_images"])
        L, h = c["latents"], 200
        if c["arch"] == "linear":
            enc_sizes, dec_sizes = [PIXELS, L], [L, PIXELS]
        else:
            enc_sizes, dec_sizes = [PIXELS, h, h, L], [L, h, h, PIXELS]
        out_bias = torch.logit(mean.clamp(1e-3, 1 - 1e-3)) if c["centre"] else None
        self.encoder = _mlp(enc_sizes, generator).to(self.device)
        self.decoder = _mlp(dec_sizes, generator, out_bias).to(self.device)
        self.prior_logits = nn.Parameter(torch.zeros(L, device=self.device))
        self._mean = (mean if c["centre"] else torch.zeros_like(mean)).to(self.device)

    def parameters(self):
        return [*super().parameters(), self.prior_logits]

    def make_optimizer(self):
        """Adam on every parameter; with ``prior_lr`` the DisARM code's split: Adam at ``lr`` on the
        networks, plain SGD at ``prior_lr`` on the prior logits (its ``prior_optimizer``)."""
        if not self.config["prior_lr"]:
            return super().make_optimizer()
        networks = [*self.encoder.parameters(), *self.decoder.parameters()]
        return _Optimisers(torch.optim.Adam(networks, lr=self.lr, fused=True),
                           torch.optim.SGD([self.prior_logits], lr=self.config["prior_lr"]))

    # ---- the Bernoulli latent and its learned prior ---------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(z|x), shape (*x.shape[:-1], latents)."""
        return self.encoder(x - self._mean)

    def decoder_input(self, z, x):
        """z itself (..., latents), in the parameters' dtype."""
        return z.to(self.prior_logits.dtype)

    def posterior(self, a):
        return D.Independent(D.Bernoulli(logits=a, validate_args=False), 1)

    def kl(self, a: torch.Tensor) -> torch.Tensor:
        return _kl_bernoulli(a, self.prior_logits)

    def log_prior(self, z):
        return _log_bernoulli(z, self.prior_logits)

    def log_q(self, z, a):
        return _log_bernoulli(z, a)

    def posterior_mean(self, a):
        return torch.sigmoid(a)

    def sampler(self, q):
        return lambda shape: (torch.rand(*shape, *q.shape, device=q.device, dtype=q.dtype) < q).to(q.dtype)

    def sample_from_uniforms(self, a, u):
        return (u < torch.sigmoid(a)).to(a.dtype)

    # ---- enumeration (the exact reference) ------------------------------------------------------
    def exact_by_default(self):
        return self.config["latents"] <= 16

    def n_configurations(self):
        L = self.config["latents"]
        if L > self.MAX_EXACT_LATENTS:
            raise ValueError(f"exact reference needs latents <= {self.MAX_EXACT_LATENTS}, got {L}")
        return 2**L

    def configurations(self, start, stop):
        """The binary expansions of ``start..stop-1``, most significant latent first, (n, L)."""
        L = self.config["latents"]
        powers = 2 ** torch.arange(L - 1, -1, -1, device=self.device)
        idx = torch.arange(start, stop, device=self.device)
        return ((idx[:, None] // powers) % 2).to(self.prior_logits.dtype)

    def configuration_log_q(self, a, n):
        """z . a - sum softplus(a) for every configuration at once, (B, 2^L)."""
        a = a.double()
        return a @ self.configurations(0, n).double().T - F.softplus(a).sum(-1, keepdim=True)
