"""Sigmoid-belief-net VAE on dynamically binarised MNIST: the standard binary-latent benchmark.

The model of NVIL / MuProp / REBAR / RELAX / ARM / DisARM (Mnih & Gregor 2014; Tucker et al. 2017,
Sec. 6.2; Grathwohl et al. 2018, Sec. 6.2; Yin & Zhou 2019, Sec. 4.2; Dong, Mnih & Tucker 2020,
Sec. 5.2): 200 Bernoulli latents with learned prior logits, a Bernoulli decoder over the 784 pixels,
and a "linear" (784 -> 200 logits -> 784) or "nonlinear" (two hidden layers of 200 LeakyReLU(0.3)
units in both encoder and decoder, as in DisARM's code) architecture.
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

#: seed of the one fixed binarisation of the validation and test images (drawn once, on the CPU)
EVAL_BINARISATION_SEED = 20_140_621
#: seed of the latent samples used by ``evaluate`` / ``final_metrics`` (common random numbers)
EVAL_SAMPLE_SEED = 7_310_011
N_TRAIN, N_VAL = 50_000, 10_000
PIXELS = 784
#: rows (samples x images) pushed through the decoder at once in evaluation / reference code
CHUNK_ROWS = 16_384


def _log_bernoulli(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log prod_d Bern(z_d; sigmoid(logits_d)) = z . logits - sum softplus(logits); sums the last dim."""
    return (z * logits).sum(-1) - F.softplus(logits).sum(-1)


def _kl_bernoulli(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """KL(Bern(sigmoid a) || Bern(sigmoid c)) summed over the last dim, exact and stable in logits."""
    q = torch.sigmoid(a)
    return (q * (F.logsigmoid(a) - F.logsigmoid(c))
            + (1 - q) * (F.logsigmoid(-a) - F.logsigmoid(-c))).sum(-1)


_DATA_CACHE: dict[str, tuple] = {}


def _fixed_data(data_dir: str):
    """(train uint8 (50000, 784), train mean intensity (784,), val and test binarised once with
    ``EVAL_BINARISATION_SEED``), all on the CPU; cached per data folder (deterministic)."""
    key = str(mnist.DEFAULT_DIR if not data_dir else data_dir)
    if key not in _DATA_CACHE:
        images, _ = mnist.load("train", data_dir or None)
        test_images, _ = mnist.load("test", data_dir or None)
        flat = images.reshape(-1, PIXELS)
        train = flat[:N_TRAIN]
        mean = train.double().mean(0).div(255).float()
        g = torch.Generator().manual_seed(EVAL_BINARISATION_SEED)
        val = (torch.rand(N_VAL, PIXELS, generator=g) < flat[N_TRAIN:].float() / 255).float()
        test = (torch.rand(10000, PIXELS, generator=g)
                < test_images.reshape(-1, PIXELS).float() / 255).float()
        _DATA_CACHE[key] = (train, mean, val, test)
    return _DATA_CACHE[key]


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


#: test images of the final figures (test ELBO, IWAE bound) in a *subset* evaluation (the quick
#: budget): the first 1000, the same for every estimator
SUBSET_TEST_IMAGES = 1000

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


class BinaryVAE(Task):
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
    1000 test images, the same for every estimator (paired across estimators, so differences
    stay well resolved): the full bound was 21 of a quick cell's 24-32 s, the full test ELBO
    another second of ~6.
    Evaluation samples come from a fixed generator, so they are common random numbers across
    checkpoints and estimators and never touch the training RNG.

    Optimiser: Adam at ``lr`` on all parameters; with ``prior_lr > 0`` Adam at ``lr`` on encoder and
    decoder and plain SGD at ``prior_lr`` on the prior logits, as the DisARM code runs it (Adam 1e-4,
    SGD 1e-2, batch 50, 1e6 steps: ``estbench run --budget paper``, tasks/protocols/binary_vae.yml).  Budgets: "quick" (200 steps, 6 evaluations per image,
    3 checkpoints of 64 estimates; default model: linear, 200 latents, batch 50; the *subset*
    evaluation above) 4-9 s per cell on the 2-core development CPU with one intra-op thread
    (1 s of training, 3 measurements ~2 s, the final figures ~1.2 s; sparsemap ~60 s, its active
    set evaluating f at ~50 structures); "standard" is the DisARM setting (1e6 steps; 6 evaluations per image, so that
    pairs and REBAR triples both fit, where DisARM used one pair) -- meant for a GPU, not run here; use
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
        "data_dir": Option("", "folder with the 4 MNIST gzip IDX files (default: shipped copy)"),
        "val_size": Option(1000, "validation images used by evaluate(final=False)", constraint=constraints.integer_interval(1, N_VAL)),
        "eval_samples": Option(10, "reconstruction samples per image in evaluate()", constraint=constraints.positive_integer),
        "iwae_samples": Option(100, "importance samples of the final test IWAE bound", constraint=constraints.positive_integer),
        "iwae_images": Option(10000, "test images for the IWAE bound (first n; 10000 = all)", constraint=constraints.integer_interval(1, 10000)),
        "measure_size": Option(8, "validation images in the measurement batch", constraint=constraints.integer_interval(1, N_VAL)),
        "reference": Option("auto", "auto (exact iff latents <= 16) | exact | sampled",
                            choices=("auto", "exact", "sampled")),
        "ref_chunks": Option(32, "sampled reference: independent chunks R", constraint=integer_at_least(2)),
        "ref_chunk_samples": Option(64, "sampled reference: samples per chunk S (>= 2)", constraint=integer_at_least(2)),
    }
    lr = 1e-3
    budgets = {
        # 6 f-evaluations: whole units for every estimator (3 antithetic pairs, 2 REBAR/RELAX triples)
        # a measurement costs ~0.6 s (64 estimates of 157k coordinates), an ELBO point 0.1 s
        "quick": {"steps": 200, "n_samples": 6, "checkpoints": 5, "measure_samples": 64,
                  "evaluation": "subset"},
        "standard": {"steps": 1_000_000, "n_samples": 6, "checkpoints": 21, "measure_samples": 256},
    }
    MAX_EXACT_LATENTS = 20

    def __init__(self, **options):
        super().__init__(**options)
        c = self.config
        self.lr = c["lr"]
        if c["reference"] == "exact" and c["latents"] > self.MAX_EXACT_LATENTS:
            raise ValueError(
                f"task 'binary_vae': reference=exact enumerates 2^latents configurations; "
                f"latents={c['latents']} > {self.MAX_EXACT_LATENTS}"
            )

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self, device, generator):
        self.device = torch.device(device)
        c = self.config
        self._train_u8, mean, val, test = _fixed_data(c["data_dir"])
        self._val, self._test = val.to(self.device), test.to(self.device)

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
        return [*self.encoder.parameters(), *self.decoder.parameters(), self.prior_logits]

    def estimated_parameters(self):
        return list(self.encoder.parameters())

    def make_optimizer(self):
        """Adam on every parameter; with ``prior_lr`` the DisARM code's split: Adam at ``lr`` on the
        networks, plain SGD at ``prior_lr`` on the prior logits (its ``prior_optimizer``)."""
        if not self.config["prior_lr"]:
            return super().make_optimizer()
        networks = [*self.encoder.parameters(), *self.decoder.parameters()]
        return _Optimisers(torch.optim.Adam(networks, lr=self.lr, fused=True),
                           torch.optim.SGD([self.prior_logits], lr=self.config["prior_lr"]))

    # ---- data ----------------------------------------------------------------------------------
    def train_batches(self, generator) -> Iterator[torch.Tensor]:
        """Epochs of a random permutation of the 50k training images (incomplete last batch
        dropped), each batch binarised with a CPU generator seeded from ``generator``."""
        B = self.config["batch_size"]
        bin_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        while True:
            perm = torch.randperm(N_TRAIN, generator=generator)
            for i in range(0, N_TRAIN - B + 1, B):
                p = self._train_u8[perm[i:i + B]].float() / 255
                yield (torch.rand(p.shape, generator=bin_gen) < p).float().to(self.device)

    def measure_batch(self):
        return self._val[: self.config["measure_size"]]

    # ---- model ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(z|x), shape (*x.shape[:-1], latents)."""
        return self.encoder(x - self._mean)

    def log_lik(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) for z of shape (..., B, latents) against x of shape (B, 784): (..., B)."""
        logits = self.decoder(z.to(self.prior_logits.dtype))
        return ((x * logits).sum(-1) - F.softplus(logits).sum(-1)).to(z.dtype)

    def kl(self, a: torch.Tensor) -> torch.Tensor:
        return _kl_bernoulli(a, self.prior_logits)

    def problem(self, batch):
        x = batch
        a = self.encode(x)
        dist = D.Independent(D.Bernoulli(logits=a, validate_args=False), 1)

        def f(z):
            return self.log_lik(x, z)

        return Problem(dist, f, context=x, analytic=-self.kl(a).sum())

    # ---- reference gradient ---------------------------------------------------------------------
    def reference_gradient(self, batch):
        mode = self.config["reference"]
        if mode == "auto":
            mode = "exact" if self.config["latents"] <= 16 else "sampled"
        if mode == "exact":
            return self._exact_reference(batch)
        return self._sampled_reference(batch)

    def _exact_reference(self, x):
        """Enumerate all 2^L latent configurations: grad of sum_b sum_z q(z|x_b) log p(x_b|z)."""
        L = self.config["latents"]
        if L > self.MAX_EXACT_LATENTS:
            raise ValueError(f"exact reference needs latents <= {self.MAX_EXACT_LATENTS}, got {L}")
        params = self.estimated_parameters()
        a = self.encode(x).double()  # (B, L)
        C = 2**L
        powers = 2 ** torch.arange(L - 1, -1, -1, device=self.device)
        fz = []
        with torch.no_grad():
            for start in range(0, C, CHUNK_ROWS):
                idx = torch.arange(start, min(C, start + CHUNK_ROWS), device=self.device)
                Z = ((idx[:, None] // powers) % 2).to(self.prior_logits.dtype)  # (c, L)
                logits = self.decoder(Z)  # (c, 784)
                fz.append((x @ logits.T - F.softplus(logits).sum(-1)).double())  # (B, c)
            Fz = torch.cat(fz, 1)  # (B, C)
            Zall = ((torch.arange(C, device=self.device)[:, None] // powers) % 2).double()
        logq = a @ Zall.T - F.softplus(a).sum(-1, keepdim=True)  # (B, C)
        objective = (logq.exp() * Fz).sum()
        grad = flat_grad(objective, params).float()
        return Reference(grad, exact=True, n_samples=None)

    def _sampled_reference(self, x):
        """Unbiased score-function estimate with a leave-one-out baseline, R chunks of S samples.

        For chunk r and image b: g_rb = 1/S sum_s (f_s - mean_{s' != s} f_s') (z_s - sigmoid(a_b)),
        an unbiased estimate of d/da_b E_q[f] (the baseline uses only the other samples); the R
        chunk estimates are carried back to the encoder in one batched VJP.
        """
        R, S = self.config["ref_chunks"], self.config["ref_chunk_samples"]
        params = self.estimated_parameters()
        a = self.encode(x)  # (B, L)
        B, L = a.shape
        per_group = max(1, CHUNK_ROWS // (S * B))
        gs = []
        with torch.no_grad():
            q = torch.sigmoid(a)
            for start in range(0, R, per_group):
                r = min(per_group, R - start)
                z = (torch.rand(r, S, B, L, device=a.device, dtype=a.dtype) < q).to(a.dtype)
                fz = self.log_lik(x, z)  # (r, S, B)
                loo = (fz.sum(1, keepdim=True) - fz) / (S - 1)
                gs.append(((fz - loo).unsqueeze(-1) * (z - q)).mean(1))  # (r, B, L)
        G = torch.cat(gs)  # (R, B, L)
        try:
            per = torch.autograd.grad(a, params, grad_outputs=G, is_grads_batched=True)
            rows = torch.cat([p.reshape(R, -1) for p in per], 1)
        except RuntimeError:  # no batching rule: one VJP per chunk
            rows = torch.stack([flat_grad(a, params, grad_outputs=G[i], retain_graph=True)
                                for i in range(R)])
        return Reference.from_chunks(rows, n_samples=R * S)

    # ---- evaluation -----------------------------------------------------------------------------
    def _chunks(self, x: torch.Tensor, K: int):
        n = max(1, CHUNK_ROWS // K)
        for i in range(0, x.shape[0], n):
            yield x[i:i + n]

    def _posterior_samples(self, x: torch.Tensor, K: int, generator: torch.Generator):
        """Per chunk of images: (images, encoder logits, K samples z ~ q(z|x) from ``generator``)."""
        for xc in self._chunks(x, K):
            a = self.encode(xc)
            u = torch.rand(K, *a.shape, generator=generator, device=a.device, dtype=a.dtype)
            yield xc, a, (u < torch.sigmoid(a)).to(a.dtype)

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
            logw = (self.log_lik(xc, z) + _log_bernoulli(z, self.prior_logits)
                    - _log_bernoulli(z, a))
            out.append(torch.logsumexp(logw, 0) - math.log(K))
        return torch.cat(out)

    def _eval_gen(self, offset: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(EVAL_SAMPLE_SEED + offset)

    def _final_images(self, n: int) -> torch.Tensor:
        if self.evaluation == "subset":
            n = min(n, SUBSET_TEST_IMAGES)
        return self._test[:n]

    def evaluate(self, final=False):
        x = self._final_images(len(self._test)) if final else self._val[: self.config["val_size"]]
        return float(self.elbo(x, self.config["eval_samples"], self._eval_gen(int(final))).mean())

    def final_metrics(self):
        K = self.config["iwae_samples"]
        x = self._final_images(self.config["iwae_images"])
        return {f"test_iwae{K}": float(self.iwae(x, K, self._eval_gen(2)).mean())}
