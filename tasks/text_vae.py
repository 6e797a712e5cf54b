"""A Bowman-style sentence VAE on Mikolov's Penn Treebank: continuous latents behind a strong
autoregressive decoder, where the KL term tends to collapse (Bowman et al. 2016, "Generating
sentences from a continuous space", CoNLL; the dgm4nlp SentVAE tutorial notebook).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import distributions as D
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.checkpoint import checkpoint

from torch.distributions import constraints

from estbench.core.metrics import END, LINEAR, LOWER, NONE, TASK, Metric
from estbench.core.plugins import Option, integer_at_least

from .base import Problem, Reference, Task, flat_grad
from .data import ptb


@dataclass
class SentenceBatch:
    """A batch of sentences: ``words`` (B, L) token ids padded with ``<pad>``, ``lengths`` (B,) in
    words (no ``<s>``/``</s>``), and ``step``: the index of the training step that uses the batch
    (``None`` for held-out batches, which get no word dropout, no dropout and the true KL)."""

    words: torch.Tensor
    lengths: torch.Tensor
    step: Optional[int] = None


@lru_cache(maxsize=2)
def _corpus(data_dir: str):
    """Vocabulary and the three splits encoded as padded id tensors (CPU), cached per folder."""
    d = data_dir or None
    vocab = ptb.build_vocabulary(d)
    enc = {s: ptb.encode_padded(ptb.load_split(s, d), vocab) for s in ptb.SPLITS}
    return vocab, enc


def _token_logp(h: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """log softmax(W h + b)[target] per row."""
    return -F.cross_entropy(F.linear(h, weight, bias), target, reduction="none")


class TextVAE(Task):
    """Sentence VAE on PTB: q(z|x) = N(loc(x), diag scale(x)^2) from an RNN encoder, p(z) = N(0, I),
    p(x|z) an LSTM language model whose initial state is a linear function of z.

    **Model.**  Encoder: its own word embeddings (``emb``) -> one-layer LSTM or GRU (``cell``,
    ``hidden`` units) read over the sentence's words; its state after the last word, h(x), gives
    loc = W h + b and scale = softplus(W' h + b') (or exp, option ``scale``).  Decoder: separate
    embeddings -> one-layer LSTM whose initial state is (tanh(A z + a), C z + c), teacher-forced on
    ``<s> w_1 .. w_T``, predicting ``w_1 .. w_T </s>`` with a softmax over the 10,002-entry
    vocabulary (Mikolov's 10k incl. ``</s>``, plus ``<s>`` and ``<pad>``; see tasks/data/ptb.py).
    Three options give dgm4nlp SentVAE's model instead (its protocol, tasks/protocols/text_vae.yml,
    sets them): ``bidirectional`` (the encoder RNN reads both ways and h(x) is its two final states
    concatenated, 2 * ``hidden``), ``encoder_emb=decoder`` (the encoder reads the decoder's
    embeddings, detached: it has no table of its own, and no gradient reaches the table through
    it) and ``dec_init=shared`` (the decoder's initial state is h = c = W z + b, one layer, no
    tanh).

    **Estimation problem.**  dist = Independent(Normal(loc, scale), 1): batch (B,), event (D,).
    f(z) = log p(x|z), the sum of the log-probabilities of the T+1 predicted tokens (padding masked).
    f accepts z of shape (*lead, B, D): leading dims are flattened into the LSTM's batch (token inputs
    repeated) and reshaped back.  analytic = -beta_t sum_b KL_fb(q(z|x_b) || N(0, I)), in closed form:
    beta_t = min(1, t / kl_anneal_steps) (1 when kl_anneal_steps = 0), where t is the index of the
    training batch in the stream of ``train_batches`` (the task counts its own steps that way: batch t
    is the one the harness's optimiser step t uses; held-out batches have beta = 1); KL_fb applies
    free bits lambda = ``free_bits`` as in dgm4nlp's SentVAE: max(KL, lambda) per sentence
    (``free_bits_mode=total``) or sum_d max(KL_d, lambda / D) (``dim``; same total floor).
    Annealing and free bits change only the training objective: evaluation always uses the true KL.
    ``word_dropout`` replaces decoder *inputs* (never ``<s>`` or padding) by ``<unk>`` with that
    probability (Bowman et al. 2016, Sec. 3.3), ``dropout`` drops decoder LSTM outputs; both only on
    training batches.  context = h(x) (B, hidden) for input-dependent baselines (NVIL).
    estimated_parameters() = the encoder (its embeddings unless ``encoder_emb=decoder``, RNN, loc
    and scale layers).

    **Reference gradient.**  On ``measure_batch()`` (the first ``measure_size`` = 4 validation
    sentences): an unbiased reparameterisation estimate of d/d(encoder) sum_b E_q[f], from
    ``ref_chunks`` = R independent chunks of ``ref_chunk_samples`` = S samples each; the mean of the
    chunk gradients with stderr std/sqrt(R), n_samples = R*S (exact=False).  Defaults R*S = 8*8:
    the reparameterisation gradient's variance is so small (orders of magnitude below the
    score-function estimators' at the quick budget) that 64 samples leave the reference's noise
    (in ``bias_noise``) far below any estimator's, at a quarter of the cost of 16*16.

    **Evaluation.**  evaluate(final=False): ELBO per sentence (true KL, 1 sample of z from a fixed
    private seed, so checkpoints are comparable and the training RNG is untouched) on the first
    ``val_size`` = 100 validation sentences.  evaluate(final=True): test ELBO per sentence with
    ``is_samples`` samples on the first ``test_sentences`` test sentences (0 = all 3761).
    final_metrics(): test_kl (mean KL per sentence), test_nll (reconstruction NLL per sentence,
    -E_q log p(x|z)), test_ppl_is = exp(-sum_x log p_IS(x) / #tokens), #tokens counting ``</s>``
    (words + 1 per sentence), log p_IS(x) = log mean_s p(x|z_s) p(z_s) / q(z_s|x) with S =
    ``is_samples``; and test_ppl_elbo, the same with the ELBO (an upper bound on perplexity).
    Defaults (quick): 200 test sentences, S = 5, the same for every estimator.  Paper-like:
    test_sentences=0, is_samples=50.

    **Reference result to compare with.**  dgm4nlp's SentVAE notebook (github.com/probabll/dgm4nlp,
    notebooks/sentencevae/SentVAE_Solutions.ipynb, commit 21ad40a) on this data: test perplexity
    119.78 with test KL 4.97 (importance sampling with 50 samples, full test set), D = 32, free
    bits 5 (total), emb 256, hidden 256, *bidirectional* LSTM encoder on the decoder's detached
    embeddings, decoder state h = c = W z + b, dropout 0.4, batch 64, Adam 1e-3, 20 epochs, model
    selected by validation perplexity.  The notebook sets word dropout 0.5, but its
    ``create_batch`` never uses the dropped words: it trained without word dropout.  ``estbench
    run --budget paper`` runs those settings (tasks/protocols/text_vae.yml lists what differs).

    **Budgets.**  quick (default options: emb 64, hidden 128, D = 32, batch 32, all sentence
    lengths; 10 steps, 4 samples, 3 checkpoints with M = 16 estimates on 4 sentences, reference
    R*S = 8*8; final figures on 200 test sentences with 5 importance samples), cheap on a CPU.  It is a *gradient-quality* budget: the variance, cosine and SNR of the encoder
    gradient separate the estimators by orders of magnitude from the first checkpoint on, while
    the ELBO and perplexity of a model this little trained do not (even several times as many steps leave the
    estimators' test ELBOs inside their seed-to-seed spread); compare ELBOs at
    the standard budget.  (Without free bits the KL collapses to nearly zero, which is why
    ``free_bits`` defaults to 5 nats as in the reference.)  standard (meant for a GPU):
    ``text_vae[emb=256,hidden=256,free_bits=5,word_dropout=0.5,dropout=0.4,val_size=200,
    test_sentences=0,is_samples=50,measure_size=8,ref_chunks=32,ref_chunk_samples=64]``
    for 26,280 steps (20 epochs of 1,314
    batches of 32), 4 samples, 11 checkpoints with M = 64.  The encoder here is unidirectional, on
    its own embeddings, and the decoder state is the default's (the ``paper`` budget follows the
    reference's model).  ``max_len`` (words) drops longer
    training sentences to make CPU runs cheaper (evaluation always uses every sentence).
    """

    name = "text_vae"
    final_figures = tuple(
        Metric(name=name, recorded=END, direction=direction, scale=LINEAR, source=TASK,
               label=label, unit=unit, doc=doc)
        for name, direction, label, unit, doc in (
            ("test_kl", NONE, "test KL", "nats per sentence", "mean KL(q(z|x) || p(z))"),
            ("test_nll", LOWER, "test NLL", "nats per sentence",
             "reconstruction NLL, -E_q log p(x|z)"),
            ("test_ppl_is", LOWER, "test perplexity", "",
             "exp(-sum log p_IS(x) / #tokens), p(x) importance-sampled"),
            ("test_ppl_elbo", LOWER, "test perplexity bound", "",
             "the same with the ELBO: an upper bound on the perplexity")))
    family = "gaussian"
    description = "Sentence VAE on PTB (Bowman et al. 2016): RNN encoder, LSTM decoder, Gaussian z"
    options = {
        "cell": Option("lstm", "encoder RNN", choices=("lstm", "gru")),
        "bidirectional": Option(False, "encoder RNN reads both ways; h(x) = both final states (2*hidden)"),
        "encoder_emb": Option("own", "encoder word embeddings: its own table, or the decoder's, detached",
                              choices=("own", "decoder")),
        "dec_init": Option("tanh", "decoder initial state from z: (tanh(A z + a), C z + c), or h = c = W z + b",
                           choices=("tanh", "shared")),
        "latent_dim": Option(32, "latent dimension D", constraint=constraints.positive_integer),
        "emb": Option(64, "word embedding size (encoder and decoder each have their own)", constraint=constraints.positive_integer),
        "hidden": Option(128, "RNN hidden units (encoder and decoder)", constraint=constraints.positive_integer),
        "batch_size": Option(32, "sentences per training batch", constraint=constraints.positive_integer),
        "max_len": Option(0, "train only on sentences of at most this many words (0: all)", constraint=constraints.nonnegative_integer),
        "scale": Option("softplus", "positivity map of the posterior scale", choices=("softplus", "exp")),
        "kl_anneal_steps": Option(0, "KL weight rises linearly 0 -> 1 over this many steps (0: off)", constraint=constraints.nonnegative_integer),
        "free_bits": Option(5.0, "free bits lambda (nats): training KL term max(KL, lambda) (0: off); 5 as in the dgm4nlp reference, against posterior collapse", constraint=constraints.nonnegative),
        "free_bits_mode": Option("total", "lambda per sentence, or lambda/D per dimension",
                                 choices=("total", "dim")),
        "word_dropout": Option(0.0, "probability of replacing a decoder input word by <unk>", constraint=constraints.unit_interval),
        "dropout": Option(0.0, "dropout on the decoder LSTM outputs (training batches only)", constraint=constraints.half_open_interval(0.0, 1.0)),
        "val_size": Option(100, "validation sentences (the first N) of evaluate(final=False)", constraint=constraints.positive_integer),
        "test_sentences": Option(200, "test sentences of the final evaluation (0: all 3761)", constraint=constraints.nonnegative_integer),
        "is_samples": Option(5, "importance samples per test sentence in the final evaluation", constraint=constraints.positive_integer),
        "measure_size": Option(4, "validation sentences (the first N) in the measurement batch", constraint=constraints.positive_integer),
        "ref_chunks": Option(8, "reference gradient: independent chunks R", constraint=integer_at_least(2)),
        "ref_chunk_samples": Option(8, "reference gradient: samples per chunk S", constraint=constraints.positive_integer),
        "lr": Option(1e-3, "Adam learning rate (the same for every estimator)", constraint=constraints.positive),
        "data_dir": Option("", "folder with ptb.{train,valid,test}.txt[.gz] (default: shipped copy)"),
    }
    #: quick: a gradient-quality budget, cheap on a CPU (see the class docstring)
    budgets = {
        # a measurement (750k coordinates, its reference) costs far more than a validation ELBO:
        # three measurements, and the curve at them (ten steps)
        "quick": {"steps": 10, "n_samples": 4, "checkpoints": 3, "measure_samples": 16,
                  "eval_points": 3},
        "standard": {"steps": 26280, "n_samples": 4, "checkpoints": 11, "measure_samples": 64},
    }
    #: logits held at once when computing token log-probabilities (rows are chunked and
    #: recomputed in the backward pass beyond this: bounds memory for many samples of z)
    chunk_elements = 1 << 23
    eval_batch = 64
    eval_seed = 20240601

    def __init__(self, **options):
        super().__init__(**options)
        self.lr = self.config["lr"]

    # ---- setup ------------------------------------------------------------------------------
    def setup(self, device, generator):
        self.device = torch.device(device)
        c = self.config
        self.vocab, enc = _corpus(c["data_dir"])
        V, E, H, Dz = len(self.vocab), c["emb"], c["hidden"], c["latent_dim"]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # PyTorch's default initialisations, from the given generator
            rnn = nn.LSTM if c["cell"] == "lstm" else nn.GRU
            bi = c["bidirectional"]
            Hx = 2 * H if bi else H  # the size of h(x)
            table = {"emb": nn.Embedding(V, E, padding_idx=self.vocab.pad)} if c["encoder_emb"] == "own" else {}
            self.encoder = nn.ModuleDict({
                **table,
                "rnn": rnn(E, H, batch_first=True, bidirectional=bi),
                "loc": nn.Linear(Hx, Dz),
                "scale": nn.Linear(Hx, Dz),
            })
            self.decoder = nn.ModuleDict({
                "emb": nn.Embedding(V, E, padding_idx=self.vocab.pad),
                "bridge": nn.Linear(Dz, 2 * H if c["dec_init"] == "tanh" else H),
                "rnn": nn.LSTM(E, H, batch_first=True),
                "out": nn.Linear(H, V),
            })
        self.encoder.to(self.device)
        self.decoder.to(self.device)

        ids, lens = enc["train"]
        if c["max_len"] > 0:
            keep = lens <= c["max_len"]
            ids, lens = ids[keep], lens[keep]
            ids = ids[:, : int(lens.max())]
        if len(lens) < c["batch_size"]:
            raise ValueError(f"task 'text_vae': only {len(lens)} training sentences of at most "
                             f"{c['max_len']} words, fewer than batch_size={c['batch_size']}")
        self.train_ids, self.train_len = ids.to(self.device), lens.to(self.device)
        self.valid = self._subset(enc["valid"], c["val_size"])
        self.test = self._subset(enc["test"], c["test_sentences"])
        self._measure = self._subset(enc["valid"], c["measure_size"])
        self._final_cache = None

    def _subset(self, split, n):
        ids, lens = split
        if n > 0:
            ids, lens = ids[:n], lens[:n]
        return SentenceBatch(ids[:, : int(lens.max())].to(self.device), lens.to(self.device))

    def parameters(self):
        return list(self.encoder.parameters()) + list(self.decoder.parameters())

    def estimated_parameters(self):
        return list(self.encoder.parameters())

    # ---- data -------------------------------------------------------------------------------
    def train_batches(self, generator):
        N, B = len(self.train_len), self.config["batch_size"]
        step = 0
        while True:
            perm = torch.randperm(N, generator=generator)
            for s in range(0, N - B + 1, B):  # the incomplete last batch of an epoch is dropped
                idx = perm[s: s + B].to(self.device)
                lens = self.train_len[idx]
                yield SentenceBatch(self.train_ids[idx, : int(lens.max())], lens, step)
                step += 1

    def measure_batch(self):
        return self._measure

    # ---- model ------------------------------------------------------------------------------
    def encode(self, words, lengths):
        """``(loc, scale, h)``: posterior parameters (B, D) and the encoder's final state (B, H;
        2H when ``bidirectional``: forward then backward)."""
        enc = self.encoder
        if self.config["encoder_emb"] == "own":
            x = enc["emb"](words)
        else:  # the decoder's table, detached (dgm4nlp SentVAE's InferenceModel)
            x = self.decoder["emb"](words).detach()
        if not self.config["bidirectional"]:
            out, _ = enc["rnn"](x)
            h = out[torch.arange(words.shape[0], device=words.device), lengths - 1]
        else:  # packed, so that the backward direction starts at each sentence's last word
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, final = enc["rnn"](packed)
            hn = final[0] if isinstance(final, tuple) else final  # (2, B, H), in the batch's order
            h = torch.cat([hn[0], hn[1]], -1)
        loc = enc["loc"](h)
        raw = enc["scale"](h)
        scale = F.softplus(raw) if self.config["scale"] == "softplus" else raw.exp()
        return loc, scale + 1e-5, h

    def decoder_io(self, batch: SentenceBatch, train: bool = False):
        """``(inputs, targets, mask)``, each (B, L+1): ``<s> w_1..w_T`` (word-dropped when
        ``train``), ``w_1..w_T </s>``, and the mask of the T+1 real positions."""
        v = self.vocab
        words, lens = batch.words, batch.lengths
        B, L = words.shape
        pos = torch.arange(L + 1, device=words.device)
        mask = pos[None, :] <= lens[:, None]
        bos = torch.full((B, 1), v.bos, dtype=words.dtype, device=words.device)
        inputs = torch.cat([bos, words], 1)
        pad = torch.full((B, 1), v.pad, dtype=words.dtype, device=words.device)
        targets = torch.cat([words, pad], 1)
        targets = torch.where(pos[None, :] == lens[:, None], torch.full_like(targets, v.eos), targets)
        p = self.config["word_dropout"]
        if train and p > 0:
            drop = (torch.rand(inputs.shape, device=inputs.device) < p) & mask
            drop[:, 0] = False  # <s> is never dropped
            inputs = torch.where(drop, torch.full_like(inputs, v.unk), inputs)
        return inputs, targets, mask

    def log_likelihood(self, z, inputs, targets, mask, dropout: float = 0.0):
        """log p(x|z) for z of shape (*lead, B, D) -> (*lead, B); leading dims are flattened into
        the LSTM batch (the token inputs repeated) and restored."""
        dec = self.decoder
        dtype = dec["bridge"].weight.dtype
        lead, (B, Dz) = z.shape[:-2], z.shape[-2:]
        if inputs.shape[0] != B:
            raise ValueError(f"z has batch size {B} but the sentences {inputs.shape[0]}")
        N = math.prod(lead)
        T = inputs.shape[1]
        zf = z.reshape(N * B, Dz).to(dtype)
        if self.config["dec_init"] == "tanh":
            a, c = dec["bridge"](zf).chunk(2, dim=-1)
            state = (torch.tanh(a).unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous())
        else:  # h = c = W z + b (dgm4nlp SentVAE's init_hidden)
            h0 = dec["bridge"](zf).unsqueeze(0).contiguous()
            state = (h0, h0)
        emb = dec["emb"](inputs)
        emb = emb.unsqueeze(0).expand(N, *emb.shape).reshape(N * B, T, -1)
        out, _ = dec["rnn"](emb, state)  # (N*B, T, H)
        if dropout > 0:
            out = F.dropout(out, dropout, training=True)
        m = mask.unsqueeze(0).expand(N, B, T).reshape(-1)
        idx = m.nonzero().squeeze(1)
        hv = out.reshape(N * B * T, -1).index_select(0, idx)
        tgt = targets.unsqueeze(0).expand(N, B, T).reshape(-1).index_select(0, idx)
        lp = self._token_logp(hv, tgt)
        sums = lp.new_zeros(N * B).index_add(0, torch.div(idx, T, rounding_mode="floor"), lp)
        return sums.reshape(*lead, B).to(z.dtype)

    def _token_logp(self, h, tgt):
        W, b = self.decoder["out"].weight, self.decoder["out"].bias
        rows = max(1, self.chunk_elements // W.shape[0])
        if h.shape[0] <= rows:
            return _token_logp(h, tgt, W, b)
        grad = torch.is_grad_enabled() and (h.requires_grad or W.requires_grad)
        pieces = []
        for s in range(0, h.shape[0], rows):
            args = (h[s: s + rows], tgt[s: s + rows], W, b)
            pieces.append(checkpoint(_token_logp, *args, use_reentrant=False) if grad
                          else _token_logp(*args))
        return torch.cat(pieces)

    @staticmethod
    def kl_per_dim(loc, scale):
        """KL(N(loc, scale^2) || N(0, 1)) per dimension, closed form."""
        return 0.5 * (loc**2 + scale**2 - 1.0) - torch.log(scale)

    def kl_weight(self, step: Optional[int]) -> float:
        n = self.config["kl_anneal_steps"]
        if step is None or n <= 0:
            return 1.0
        return min(1.0, step / n)

    def training_kl(self, kl_d: torch.Tensor) -> torch.Tensor:
        """Free-bits KL per sentence (B,) from the per-dimension KL (B, D)."""
        lam = self.config["free_bits"]
        if lam <= 0:
            return kl_d.sum(-1)
        if self.config["free_bits_mode"] == "total":
            return torch.clamp(kl_d.sum(-1), min=lam)
        return torch.clamp(kl_d, min=lam / kl_d.shape[-1]).sum(-1)

    def problem(self, batch: SentenceBatch) -> Problem:
        train = batch.step is not None
        if train:
            self._final_cache = None
        loc, scale, h = self.encode(batch.words, batch.lengths)
        dist = D.Independent(D.Normal(loc, scale, validate_args=False), 1)
        inputs, targets, mask = self.decoder_io(batch, train=train)
        p_drop = self.config["dropout"] if train else 0.0

        def f(z):
            return self.log_likelihood(z, inputs, targets, mask, dropout=p_drop)

        kl_d = self.kl_per_dim(loc, scale)
        if train:
            analytic = -self.kl_weight(batch.step) * self.training_kl(kl_d).sum()
        else:
            analytic = -kl_d.sum()
        return Problem(dist, f, context=h, analytic=analytic)

    # ---- reference --------------------------------------------------------------------------
    def reference_gradient(self, batch):
        R, S = self.config["ref_chunks"], self.config["ref_chunk_samples"]
        held = SentenceBatch(batch.words, batch.lengths, None)
        prob = self.problem(held)
        targets = self.estimated_parameters()
        rows = []
        for _ in range(R):  # chunks bound memory; each is one vectorised pass over S samples
            z = prob.dist.rsample((S,))
            rows.append(flat_grad(prob.f(z).mean(0).sum(), targets, retain_graph=True))
        return Reference.from_chunks(torch.stack(rows), n_samples=R * S)

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def heldout(self, data: SentenceBatch, S: int) -> dict[str, torch.Tensor]:
        """Per-sentence figures with S samples of z each: elbo (mean_s log p(x|z_s) - KL), kl, nll
        (-mean_s log p(x|z_s)), log_is (log mean_s p(x|z_s) p(z_s)/q(z_s|x)) and tokens (T + 1).
        Sentences are processed by length (less padding); z comes from a fixed private seed."""
        g = torch.Generator(device=self.device).manual_seed(self.eval_seed)
        n = len(data.lengths)
        order = torch.argsort(data.lengths, stable=True)
        out = {k: torch.empty(n, dtype=torch.float64, device=self.device)
               for k in ("elbo", "kl", "nll", "log_is")}
        for s in range(0, n, self.eval_batch):
            idx = order[s: s + self.eval_batch]
            lens = data.lengths[idx]
            b = SentenceBatch(data.words[idx, : int(lens.max())], lens)
            loc, scale, _ = self.encode(b.words, b.lengths)
            eps = torch.randn((S, *loc.shape), generator=g, device=self.device, dtype=loc.dtype)
            z = loc + scale * eps
            inputs, targets, mask = self.decoder_io(b)
            ll = self.log_likelihood(z, inputs, targets, mask).double()  # (S, b)
            kl = self.kl_per_dim(loc, scale).sum(-1).double()
            log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1).double()
            log_qz = D.Normal(loc, scale).log_prob(z).sum(-1).double()
            out["elbo"][idx] = ll.mean(0) - kl
            out["kl"][idx] = kl
            out["nll"][idx] = -ll.mean(0)
            out["log_is"][idx] = torch.logsumexp(ll + log_pz - log_qz, 0) - math.log(S)
        out["tokens"] = (data.lengths + 1).double()
        return out

    def evaluate(self, final=False):
        if not final:
            return float(self.heldout(self.valid, 1)["elbo"].mean())
        r = self.heldout(self.test, self.config["is_samples"])
        ntok = r["tokens"].sum()
        self._final_cache = {
            "elbo": float(r["elbo"].mean()),
            "test_kl": float(r["kl"].mean()),
            "test_nll": float(r["nll"].mean()),
            "test_ppl_is": float(torch.exp(-r["log_is"].sum() / ntok)),
            "test_ppl_elbo": float(torch.exp(-r["elbo"].sum() / ntok)),
        }
        return self._final_cache["elbo"]

    def final_metrics(self):
        if self._final_cache is None:
            self.evaluate(final=True)
        return {k: v for k, v in self._final_cache.items() if k != "elbo"}
