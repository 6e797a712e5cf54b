"""Latent rationales for sentiment classification on the Stanford Sentiment Treebank (SST-5).

After the dgm4nlp SST notebook (probabll/dgm4nlp, ``notebooks/sst``): a latent mask z over the tokens
of a sentence x selects a *rationale*, and the label y is predicted from the selected tokens only.

* q(z|x): a token encoder (option ``encoder``) gives one logit per token.  ``bow``: a per-token MLP on
  [e_t ; mean_t e_t]; ``lstm``: a bidirectional LSTM over the embeddings.  Its parameters (not the
  embedding table, see below) are :meth:`estimated_parameters`.
* p(y|x,z): the z-weighted mean of the token embeddings, sum_t z_t e_t / max(1, sum_t z_t), then an
  MLP -> 5 logits.  It is written for any z in [0,1]^L, so relaxed (Concrete / straight-through)
  masks are fine; an empty rationale gives the zero vector.
* ELBO(x, y) = E_q[log p(y|x,z)] - KL(q(z|x) || p(z)).

Three latent variants, three registered tasks sharing this module:

``sst_rationales`` (family bernoulli)
    q = Independent(Bernoulli(logits), 1) over the padded positions (batch (B,), event (L,)); prior
    Bernoulli(``prior_p``) per real token; ``analytic`` = -sum of the exact per-token KLs.
``sst_rationales_categorical`` (family categorical)
    z selects ONE token: q = OneHotCategorical over the L positions (batch (B,), event (L,)); with
    ``draws=k`` (1 or 2) k independent draws (Independent over k, event (k, L)) and the rationale is
    their union.  Prior: uniform over the real tokens.  Exact KL, and an exact reference gradient
    and exact held-out E_q[f] by enumerating the L^k positions.
``sst_rationales_structured`` (family bernoulli)
    The same factorised Bernoulli q, but a first-order Markov-chain prior over the mask that favours
    contiguous rationales: p(z_1 = 1) = ``prior_p`` and P(z_t = 1 | z_{t-1} = 1) = ``stay_on``, with
    P(z_t = 1 | z_{t-1} = 0) = prior_p (1 - stay_on) / (1 - prior_p) so that ``prior_p`` is the
    stationary selection rate (mean run length 1 / (1 - stay_on)).  KL(q || p_chain) does not
    factorise, so its cross-entropy part moves into f: f(z) = log p(y|x,z) + log p_chain(z) (written
    multilinearly in z, hence also defined for relaxed z), and ``analytic`` = the exact entropy of q.
    Then sum_b E_q[f] + analytic is again the ELBO.

Padding.  Batches are padded to the longest sentence in the batch.  Pad positions get the constant
logit ``PAD_LOGIT`` = -30 (``torch.where`` with a constant, so no gradient reaches the encoder
through them; finite so that every estimator's arithmetic -- log-probabilities, conditional
Gumbels -- stays finite in float32; their probability is ~1e-13), f ignores them (mask multiply),
and KLs / entropies are summed over real tokens only.  For the categorical prior the same constant
is used on pad positions, so KL(q || p) is exact and finite.

Parameters.  The embedding table (trainable, from scratch; no GloVe) is shared by the encoder and
the classifier.  It is trained by every gradient path but is *not* among ``estimated_parameters``:
the measured gradient is the encoder's (its layers), where f does not depend on the parameters, and
the vector stays small (vocabulary x dim would be ~1M coordinates).

Reference gradients (of sum_b E_q[f] w.r.t. the encoder layers, on ``measure_batch()``, the first
``measure_size`` dev sentences): exact for the categorical variant (enumeration); for the Bernoulli
variants an unbiased estimate: R = ``ref_chunks`` independent chunks of S = ``ref_chunk_samples`` samples,
in each the score-function estimate at the logits with a leave-one-out baseline
(1/S sum_s (f_s - mean_{s' != s} f_s') (z_s - sigmoid(logits))), carried to the parameters by a
vector-Jacobian product; reported as the mean over chunks with standard error std / sqrt(R).

Reference figure: the notebook's older run (frozen GloVe, 300-d) reached dev accuracy ~0.41 with ~37%
of tokens selected.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Optional

import torch
from torch import distributions as D
from torch import nn
from torch.nn import functional as F

from torch.distributions import constraints

from estbench.core.metrics import END, HIGHER, LINEAR, NONE, TASK, Metric
from estbench.core.plugins import Option, integer_at_least, open_interval

from .base import Problem, Reference, Task, flat_grad
from .data import sst

#: logit of pad positions (constant, no gradient); probability ~ e^-30 ~ 1e-13
PAD_LOGIT = -30.0

#: sentences of a *subset* evaluation (the quick budget), the same for every estimator: the final
#: figures on the first 500 test sentences (of 2,210) and the dev accuracies on the first 500 dev
#: sentences (of 1,101; the per-checkpoint curve's ``val_size`` dev sentences by default) -- the
#: final evaluation on everything cost a quick cell as much as a third of its training
SUBSET_SENTENCES = 500


@dataclass
class Batch:
    ids: torch.Tensor      # (B, L) token ids, 0 = <pad>
    mask: torch.Tensor     # (B, L) bool, True on real tokens
    y: torch.Tensor        # (B,) labels 0..4
    index: torch.Tensor    # (B,) positions in the split

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class _Split:
    """One split as padded tensors on the task's device."""

    def __init__(self, sentences, vocab, device):
        self.sentences = sentences
        n, lmax = len(sentences), max(len(s.tokens) for s in sentences)
        ids = torch.zeros(n, lmax, dtype=torch.long)
        for i, s in enumerate(sentences):
            ids[i, : len(s.tokens)] = torch.tensor(vocab.encode(s.tokens))
        self.ids = ids.to(device)
        self.lengths = torch.tensor([len(s.tokens) for s in sentences], device=device)
        self.y = torch.tensor([s.label for s in sentences], device=device)

    def to(self, device) -> "_Split":
        """The same split on ``device`` (itself when already there; its tensors are only read)."""
        if self.ids.device == torch.device(device):
            return self
        out = object.__new__(_Split)
        out.sentences = self.sentences
        out.ids, out.lengths, out.y = (t.to(device) for t in (self.ids, self.lengths, self.y))
        return out

    def __len__(self) -> int:
        return len(self.sentences)

    def head(self, n: int) -> "_Split":
        """The first ``n`` sentences (itself when it has no more)."""
        if n >= len(self):
            return self
        out = object.__new__(_Split)
        out.sentences = self.sentences[:n]
        out.ids, out.lengths, out.y = self.ids[:n], self.lengths[:n], self.y[:n]
        return out

    def batch(self, idx: torch.Tensor) -> Batch:
        idx = idx.to(self.ids.device)
        lengths = self.lengths[idx]
        L = int(lengths.max())
        mask = torch.arange(L, device=idx.device)[None, :] < lengths[:, None]
        return Batch(self.ids[idx, :L], mask, self.y[idx], idx)

    def batches(self, size: int, limit: Optional[int] = None):
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(0, n, size):
            yield self.batch(torch.arange(i, min(i + size, n)))


@lru_cache(maxsize=4)
def _vocab_and_train(data_dir: str, max_train: int, min_count: int):
    """The training vocabulary and the encoded training split, kept per process: building them
    is a noticeable share of a quick cell, and the same for every cell of a sweep."""
    train = sst.load_split("train", data_dir or None)
    if max_train > 0:
        train = train[:max_train]
    vocab = sst.Vocab(train, min_count)
    return vocab, _Split(train, vocab, "cpu")


@lru_cache(maxsize=8)
def _encoded(split: str, data_dir: str, max_train: int, min_count: int) -> _Split:
    """A held-out split encoded with the training vocabulary of those options (per process)."""
    vocab, _ = _vocab_and_train(data_dir, max_train, min_count)
    return _Split(sst.load_split(split, data_dir or None), vocab, "cpu")


class TokenEncoder(nn.Module):
    """Per-token logits of q(z|x) and per-token features (B, L, F)."""

    def __init__(self, kind: str, emb: int, hidden: int):
        super().__init__()
        self.kind = kind
        if kind == "bow":
            self.net = nn.Sequential(nn.Linear(2 * emb, hidden), nn.ReLU())
            feat = hidden
        elif kind == "lstm":
            self.net = nn.LSTM(emb, hidden, batch_first=True, bidirectional=True)
            feat = 2 * hidden
        else:
            raise ValueError(f"sst_rationales: encoder must be 'bow' or 'lstm', got {kind!r}")
        self.out = nn.Linear(feat, 1)

    def forward(self, e: torch.Tensor, mask: torch.Tensor):
        m = mask.to(e.dtype)
        if self.kind == "bow":
            mean = (e * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
            h = self.net(torch.cat([e, mean[:, None, :].expand_as(e)], -1))
        else:
            lengths = mask.sum(1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(e, lengths, batch_first=True, enforce_sorted=False)
            h, _ = self.net(packed)
            h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=e.shape[1])
        h = h * m[..., None]
        return self.out(h).squeeze(-1), h


def _rationale_mask(tokens: list, selected: list) -> list[bool]:
    """``selected`` as a per-token mask (bools / 0-1 / gate values > 1/2) or a list of indices."""
    if len(selected) == len(tokens) and all(isinstance(s, (bool, int, float)) and 0 <= s <= 1
                                            for s in selected):
        return [bool(s > 0.5) if isinstance(s, float) else bool(s) for s in selected]
    idx = {int(i) for i in selected}
    return [i in idx for i in range(len(tokens))]


def _q_summary(tokens: list, q) -> str:
    """The spread of the per-token selection probabilities and the most likely tokens: without it
    an empty most-probable rationale (every q < 1/2) would hide what the encoder prefers."""
    try:
        q = [float(v) for v in q]
    except (TypeError, ValueError):
        return ""
    if len(q) != len(tokens) or not q:
        return ""
    top = sorted(range(len(q)), key=lambda i: -q[i])[:3]
    return (f"; q from {min(q):.2f} to {max(q):.2f}, highest: "
            + ", ".join(f"'{tokens[i]}' {q[i]:.2f}" for i in top))


class _SSTRationales(Task):
    """Shared machinery of the three SST rationale tasks (see the module docstring)."""

    family: ClassVar[str] = "bernoulli"
    latent: ClassVar[str] = ""
    final_figures = tuple(
        Metric(name=name, recorded=END, direction=direction, scale=LINEAR, source=TASK,
               label=label, doc=doc)
        for name, direction, label, doc in (
            ("dev_accuracy", HIGHER, "dev accuracy", "argmax_y E_q[p(y|x,z)] on the dev set"),
            ("test_accuracy", HIGHER, "test accuracy", "the same on the test set"),
            ("dev_accuracy_map", HIGHER, "dev accuracy (MAP rationale)",
             "the prediction from the most probable rationale, dev set"),
            ("test_accuracy_map", HIGHER, "test accuracy (MAP rationale)",
             "the prediction from the most probable rationale, test set"),
            ("selection_rate", NONE, "selection rate",
             "fraction of real dev tokens the most probable rationale selects"),
            ("expected_selection_rate", NONE, "expected selection rate",
             "fraction of real dev tokens a sample of q selects")))
    #: compare's tolerance of the final ELBO: the figure lives on a scale of hundredths (a few
    #: times its seeds' 95% intervals)
    tolerances = {"final_elbo": 0.02}
    lr = 1e-3
    options = {
        "data_dir": Option("", "folder with {train,dev,test}.txt[.gz] (default: the shipped copy)"),
        "encoder": Option("bow", "token encoder of q(z|x): per-token MLP or biLSTM", ("bow", "lstm")),
        "emb": Option(64, "embedding size (trainable, shared by encoder and classifier)", constraint=constraints.positive_integer),
        "hidden": Option(64, "hidden size of the encoder and of the classifier MLP", constraint=constraints.positive_integer),
        "min_count": Option(1, "keep training tokens seen at least this often; others -> <unk>", constraint=constraints.positive_integer),
        "batch_size": Option(32, "training sentences per batch", constraint=constraints.positive_integer),
        "max_train": Option(0, "use only the first N training sentences (0: all 8544)", constraint=constraints.nonnegative_integer),
        "val_size": Option(500, "dev sentences (the first N) of the per-checkpoint ELBO, evaluate(final=False)", constraint=constraints.positive_integer),
        "eval_samples": Option(8, "z samples per sentence in the per-checkpoint dev ELBO (MC variants)", constraint=constraints.positive_integer),
        "final_samples": Option(64, "z samples per sentence in the final test ELBO (MC variants)", constraint=constraints.positive_integer),
        "measure_size": Option(8, "sentences (the first N of dev) in the measurement batch", constraint=constraints.positive_integer),
        "ref_chunks": Option(32, "reference gradient: independent chunks R (MC variants)", constraint=integer_at_least(2)),
        "ref_chunk_samples": Option(64, "reference gradient: samples per chunk S (MC variants)", constraint=integer_at_least(2)),
        "prior_p": Option(0.3, "prior selection probability per token", constraint=open_interval(0.0, 1.0)),
        "lr": Option(1e-3, "Adam learning rate, the same for every estimator (the dgm4nlp notebook: "
                     "2e-4)", constraint=constraints.positive),
    }
    budgets = {
        # quick: 200 steps of 32 sentences (0.75 epoch).  The dev ELBO has plateaued by then: in
        # the committed reference of 400 steps it moved by 0.01 nats on average from step 200 to
        # 400 (the estimators' spread at the end: 0.08).
        # 6 f-evaluations: whole antithetic pairs and REBAR/RELAX triples.  A measurement is
        # cheap beside the training: one every 50 steps.
        # The final figures on the first SUBSET_SENTENCES test (and dev) sentences; the curve at
        # the checkpoints (plateaued: more points showed nothing more)
        "quick": {"steps": 200, "n_samples": 6, "checkpoints": 5, "measure_samples": 64,
                  "evaluation": "subset", "eval_points": 5},
        # standard: the notebook-like setting, 20 epochs of 267 batches of 32 sentences (the
        # notebook used 300-d GloVe: options emb=300,hidden=200 come closer to it)
        "standard": {"steps": 5340, "n_samples": 6, "checkpoints": 11, "measure_samples": 256},
    }

    def __init__(self, **options):
        super().__init__(**options)
        self.lr = self.config["lr"]

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self, device, generator):
        c = self.config
        self.device = torch.device(device)
        data = (c["data_dir"], c["max_train"], c["min_count"])
        self.vocab, train = _vocab_and_train(*data)
        self.train = train.to(self.device)
        self.dev = _encoded("dev", *data).to(self.device)
        self._test_sentences = None  # loaded on first use (final evaluation)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embedding = nn.Embedding(len(self.vocab), c["emb"], padding_idx=self.vocab.pad_id)
            self.encoder = TokenEncoder(c["encoder"], c["emb"], c["hidden"])
            self.classifier = nn.Sequential(
                nn.Linear(c["emb"], c["hidden"]), nn.ReLU(), nn.Linear(c["hidden"], sst.N_CLASSES)
            )
        for m in (self.embedding, self.encoder, self.classifier):
            m.to(self.device)
        self._measure = self.dev.batch(torch.arange(min(c["measure_size"], len(self.dev))))

    @property
    def test(self) -> _Split:
        if self._test_sentences is None:
            c = self.config
            self._test_sentences = _encoded("test", c["data_dir"], c["max_train"], c["min_count"]).to(
                self.device
            )
        return self._test_sentences

    def _final(self, split: _Split) -> _Split:
        """The sentences of a split that the final figures use: all of them, or the first
        ``SUBSET_SENTENCES`` in a *subset* evaluation (the quick budget)."""
        return split.head(SUBSET_SENTENCES) if self.evaluation == "subset" else split

    def parameters(self):
        return [*self.embedding.parameters(), *self.encoder.parameters(), *self.classifier.parameters()]

    def estimated_parameters(self):
        return list(self.encoder.parameters())

    def train_batches(self, generator):
        n, bs = len(self.train), self.config["batch_size"]
        while True:
            perm = torch.randperm(n, generator=generator)
            for i in range(0, n, bs):
                yield self.train.batch(perm[i : i + bs])

    def measure_batch(self):
        return self._measure

    # ---- model ---------------------------------------------------------------------------------
    def _encode(self, batch: Batch):
        e = self.embedding(batch.ids)
        logits, h = self.encoder(e, batch.mask)
        logits = torch.where(batch.mask, logits, torch.full_like(logits.detach(), PAD_LOGIT))
        m = batch.mask.to(h.dtype)
        context = ((h * m[..., None]).sum(1) / m.sum(1, keepdim=True)).detach()
        return e, logits, context

    def _weights(self, z: torch.Tensor) -> torch.Tensor:
        """Token weights (..., B, L) in [0,1] from a sample z of the latent's event shape."""
        return z

    def _class_logits(self, w: torch.Tensor, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = w * mask.to(w.dtype)
        s = torch.einsum("...bl,ble->...be", w, e.to(w.dtype))
        s = s / w.sum(-1, keepdim=True).clamp(min=1.0)
        return self.classifier(s.to(e.dtype))

    def _loglik(self, z, e, batch: Batch):
        logp = torch.log_softmax(self._class_logits(self._weights(z), e, batch.mask), -1)
        return (logp * F.one_hot(batch.y, sst.N_CLASSES).to(logp.dtype)).sum(-1).to(z.dtype)

    def _f(self, z, e, batch):
        return self._loglik(z, e, batch)

    def _dist(self, logits, batch) -> D.Distribution:
        raise NotImplementedError

    def _analytic(self, dist, logits, batch) -> torch.Tensor:
        """Per-sentence exact part of the ELBO, shape (B,)."""
        raise NotImplementedError

    def problem(self, batch):
        e, logits, context = self._encode(batch)
        dist = self._dist(logits, batch)
        return Problem(dist, lambda z: self._f(z, e, batch), context,
                       self._analytic(dist, logits, batch).sum())

    def _map_weights(self, logits, batch) -> torch.Tensor:
        """The most probable mask (thresholded q > 1/2, or the argmax position), (B, L)."""
        return ((logits > 0) & batch.mask).to(logits.dtype)

    # ---- held-out figures ----------------------------------------------------------------------
    def _draws(self, dist, n_samples: int, gen: torch.Generator):
        """Points and weights for E_q[.] per sentence: ``(z, w)`` with z of shape (C, B, *event) and
        w (C, B) summing to 1 over C.  Monte Carlo here (n_samples draws from ``gen``, weights 1/n);
        the categorical variant enumerates instead (exact)."""
        probs = torch.sigmoid(dist.base_dist.logits)
        u = torch.rand((n_samples, *probs.shape), generator=gen, device=probs.device, dtype=probs.dtype)
        z = (u < probs).to(probs.dtype)
        return z, torch.full(z.shape[:2], 1.0 / n_samples, device=z.device, dtype=z.dtype)

    @torch.no_grad()
    def _elbo(self, split: _Split, n_samples: int, limit: Optional[int], seed: int) -> float:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        total, count = 0.0, 0
        for batch in split.batches(self._eval_batch_size(), limit):
            e, logits, _ = self._encode(batch)
            dist = self._dist(logits, batch)
            z, w = self._draws(dist, n_samples, gen)
            ef = (w * self._f(z, e, batch)).sum(0)
            total += float((ef + self._analytic(dist, logits, batch)).sum())
            count += len(batch)
        return total / count

    def _eval_batch_size(self) -> int:
        return 256

    def evaluate(self, final=False):
        """Held-out ELBO per sentence: a fixed dev subset (``val_size``, ``eval_samples`` samples) at
        checkpoints, the test set with ``final_samples`` samples at the end (its first
        ``SUBSET_SENTENCES`` in a *subset* evaluation).  The z samples come from
        a fixed generator, so the figure is a deterministic function of the parameters."""
        c = self.config
        if final:
            return self._elbo(self._final(self.test), c["final_samples"], None, seed=1)
        return self._elbo(self.dev, c["eval_samples"], c["val_size"] or None, seed=0)

    @torch.no_grad()
    def _predict(self, batch: Batch, gen: Optional[torch.Generator] = None):
        """Predictions (argmax of p(y|x) = E_q[p(y|x,z)], ``final_samples`` samples or exact), MAP
        predictions (from the most probable mask), the MAP mask (B, L) and E_q[token selected] (B, L)."""
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(2)
        e, logits, _ = self._encode(batch)
        dist = self._dist(logits, batch)
        z, w = self._draws(dist, self.config["final_samples"], gen)
        py = (w[..., None] * torch.softmax(self._class_logits(self._weights(z), e, batch.mask), -1)).sum(0)
        m = self._map_weights(logits, batch)
        pred_map = self._class_logits(m, e, batch.mask).argmax(-1)
        return py.argmax(-1), pred_map, m, self._expected_weights(logits)

    def _expected_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """P(token selected) under q, (B, L)."""
        return torch.sigmoid(logits)

    @torch.no_grad()
    def _accuracy(self, split: _Split):
        gen = torch.Generator(device=self.device).manual_seed(2)
        correct, correct_map, selected, expected, real = 0, 0, 0.0, 0.0, 0
        for batch in split.batches(self._eval_batch_size()):
            pred, pred_map, w, q = self._predict(batch, gen)
            m = batch.mask.to(w.dtype)
            correct += int((pred == batch.y).sum())
            correct_map += int((pred_map == batch.y).sum())
            selected += float((w * m).sum())
            expected += float((q * m).sum())
            real += int(batch.mask.sum())
        n = len(split)
        return {"accuracy": correct / n, "accuracy_map": correct_map / n,
                "selection_rate": selected / real, "expected_selection_rate": expected / real}

    def final_metrics(self):
        """``dev_accuracy`` / ``test_accuracy``: argmax_y E_q[p(y|x,z)] (``final_samples`` samples;
        exact for the categorical variant); ``*_accuracy_map``: the prediction from the most probable
        mask (q > 1/2, or the argmax position); ``selection_rate``: the fraction of real dev tokens
        that mask selects; ``expected_selection_rate``: the fraction a sample of q selects (with a
        Bernoulli(0.3) prior an encoder that stays at the prior selects nothing at the q > 1/2
        threshold but ~30% in expectation, and its MAP accuracy is the majority-class rate).  A
        *subset* evaluation uses the first ``SUBSET_SENTENCES`` of each split."""
        dev, test = self._accuracy(self._final(self.dev)), self._accuracy(self._final(self.test))
        return {"dev_accuracy": dev["accuracy"], "test_accuracy": test["accuracy"],
                "dev_accuracy_map": dev["accuracy_map"], "test_accuracy_map": test["accuracy_map"],
                "selection_rate": dev["selection_rate"],
                "expected_selection_rate": dev["expected_selection_rate"]}

    def example_rationales(self, n: int = 5) -> list[dict]:
        """The first ``n`` dev sentences with their most probable rationale (``selected``), the
        per-token selection probabilities ``q``, the label, the prediction of p(y|x) and the
        prediction from the selected tokens alone (``prediction_map``), for reports."""
        batch = self.dev.batch(torch.arange(min(n, len(self.dev))))
        pred, pred_map, w, q = self._predict(batch)
        out = []
        for i in range(len(batch)):
            s = self.dev.sentences[i]
            L = len(s.tokens)
            out.append({
                "tokens": list(s.tokens),
                "selected": [bool(v) for v in (w[i, :L] > 0.5).tolist()],
                "q": [round(float(v), 3) for v in q[i, :L]],
                "label": s.label,
                "prediction": int(pred[i]),
                "prediction_map": int(pred_map[i]),
            })
        return out

    def artifacts(self) -> dict:
        """Example rationales kept with the cell for the report."""
        return {"rationales": self.example_rationales(5)}

    #: how much of the kept rationales a report shows: the best estimators, a few sentences each
    REPORT_ESTIMATORS: ClassVar[int] = 3
    REPORT_EXAMPLES: ClassVar[int] = 3

    @classmethod
    def report_section(cls, cells):
        """Held-out sentences with the most probable rationale's tokens marked, for the best
        estimators by final ELBO."""
        blocks = []
        kept = [(est, seed, a["rationales"]) for est, seed, a in cells if (a or {}).get("rationales")]
        for est, seed, examples in kept[: cls.REPORT_ESTIMATORS]:
            blocks.append(("text", [("code", est), f" (seed {int(seed)})"]))
            for ex in examples[: cls.REPORT_EXAMPLES]:
                tokens = [str(t) for t in ex.get("tokens", [])]
                mask = _rationale_mask(tokens, list(ex.get("selected", [])))
                caption = (f"label {ex.get('label', '?')}, prediction {ex.get('prediction', '?')}, "
                           f"{sum(mask)}/{len(tokens)} tokens selected"
                           + _q_summary(tokens, ex.get("q")))
                blocks.append(("highlight", tokens, mask, caption))
        if not blocks:
            return None
        intro = ("Held-out sentences with the tokens of the most probable rationale highlighted (q, "
                 "the encoder's per-token selection probability, summarised below each), for the "
                 f"best {cls.REPORT_ESTIMATORS} estimators by final ELBO (lowest seed); 'label' is "
                 "the gold class, 'prediction' the classifier's.")
        return "Example rationales", intro, blocks

    # ---- reference gradient --------------------------------------------------------------------
    def reference_gradient(self, batch):
        """Unbiased score-function reference with a leave-one-out baseline at the logits (see the
        module docstring): R chunks x S samples, per-coordinate stderr from the chunks."""
        R, S = self.config["ref_chunks"], self.config["ref_chunk_samples"]
        targets = self.estimated_parameters()
        prob = self.problem(batch)
        logits = prob.dist.base_dist.logits  # (B, L)
        with torch.no_grad():
            p = torch.sigmoid(logits)
            z = (torch.rand((R * S, *p.shape), device=p.device, dtype=p.dtype) < p).to(p.dtype)
            fz = prob.f(z).reshape(R, S, *p.shape[:-1])
            loo = (fz.sum(1, keepdim=True) - fz) / (S - 1)
            g = ((fz - loo)[..., None] * (z.reshape(R, S, *p.shape) - p)).mean(1)  # (R, B, L)
            g = g * batch.mask.to(g.dtype)
        return Reference.from_chunks(_batched_vjp(logits, targets, g), n_samples=R * S)


def _batched_vjp(out: torch.Tensor, targets, grads: torch.Tensor) -> torch.Tensor:
    """(R, P): the VJP of ``out`` with each of the R cotangents in ``grads`` (R, *out.shape)."""
    R = grads.shape[0]
    try:
        per = torch.autograd.grad(out, targets, grad_outputs=grads, is_grads_batched=True,
                                  allow_unused=True, retain_graph=True)
        per = [q if q is not None else torch.zeros(R, *t.shape, device=t.device, dtype=t.dtype)
               for q, t in zip(per, targets)]
        return torch.cat([q.reshape(R, -1) for q in per], 1).detach()
    except RuntimeError:  # an op without a batching rule (packed LSTM): one VJP per cotangent
        return torch.stack([flat_grad(out, targets, grad_outputs=grads[r], retain_graph=True)
                            for r in range(R)]).detach()


class SSTRationales(_SSTRationales):
    """SST-5 rationales, factorised Bernoulli mask, Bernoulli(prior_p) prior (module docstring)."""

    name = "sst_rationales"
    family = "bernoulli"
    latent = "bernoulli"
    description = "SST-5 sentiment with a latent Bernoulli token mask (rationale), dgm4nlp-style"

    def _dist(self, logits, batch):
        return D.Independent(D.Bernoulli(logits=logits, validate_args=False), 1)

    def _analytic(self, dist, logits, batch):
        prior = D.Bernoulli(probs=torch.full_like(logits, self.config["prior_p"]), validate_args=False)
        kl = D.kl_divergence(dist.base_dist, prior)
        return -(kl * batch.mask.to(kl.dtype)).sum(-1)


class SSTRationalesStructured(SSTRationales):
    """SST-5 rationales, factorised Bernoulli q, Markov-chain prior favouring contiguous spans;
    f = log p(y|x,z) + log p_chain(z), analytic = entropy of q (module docstring)."""

    name = "sst_rationales_structured"
    tolerances = {"final_elbo": 0.05}
    description = "SST-5 rationales, Bernoulli q with a contiguity-favouring Markov-chain prior"
    options = {
        **_SSTRationales.options,
        "stay_on": Option(0.8, "chain prior: P(z_t = 1 | z_{t-1} = 1); prior_p is the stationary rate", constraint=open_interval(0.0, 1.0)),
    }

    def setup(self, device, generator):
        p, b = self.config["prior_p"], self.config["stay_on"]
        a = p * (1 - b) / (1 - p)  # P(1 | 0), making p stationary
        if not 0.0 < a < 1.0:
            raise ValueError(f"{self.name}: prior_p={p} and stay_on={b} give P(1|0)={a:.3f} outside (0, 1)")
        # log T[i, j] = log P(z_t = j | z_{t-1} = i), and the initial log-probabilities
        self.log_T = torch.log(torch.tensor([[1 - a, a], [1 - b, b]], dtype=torch.float64))
        self.log_init = torch.log(torch.tensor([1 - p, p], dtype=torch.float64))
        super().setup(device, generator)

    def log_prior(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log p_chain(z) over the real tokens (left-aligned), multilinear in z (so defined on [0,1])."""
        lT = self.log_T.to(device=z.device, dtype=z.dtype)
        li = self.log_init.to(device=z.device, dtype=z.dtype)
        m = mask.to(z.dtype)
        z1 = z[..., 0]
        first = z1 * li[1] + (1 - z1) * li[0]
        a, b = z[..., :-1], z[..., 1:]
        trans = (a * b * lT[1, 1] + a * (1 - b) * lT[1, 0] + (1 - a) * b * lT[0, 1]
                 + (1 - a) * (1 - b) * lT[0, 0])
        return first + (trans * m[:, 1:]).sum(-1)

    def _f(self, z, e, batch):
        return self._loglik(z, e, batch) + self.log_prior(z, batch.mask)

    def _analytic(self, dist, logits, batch):
        ent = dist.base_dist.entropy()
        return (ent * batch.mask.to(ent.dtype)).sum(-1)


class SSTRationalesCategorical(_SSTRationales):
    """SST-5 rationales where z selects one token (or the union of ``draws`` independent picks);
    exact KL to the uniform prior, exact reference gradient and exact held-out E_q[f]."""

    name = "sst_rationales_categorical"
    family = "categorical"
    latent = "categorical"
    description = "SST-5 sentiment from ONE latent token (categorical over positions), exact reference"
    options = {
        **_SSTRationales.options,
        "draws": Option(1, "independent categorical picks k; the rationale is their union", (1, 2)),
    }

    def _eval_batch_size(self):
        return 256 if self.config["draws"] == 1 else 16

    def _dist(self, logits, batch):
        k = self.config["draws"]
        if k == 1:
            return D.OneHotCategorical(logits=logits, validate_args=False)
        return D.Independent(
            D.OneHotCategorical(logits=logits[:, None, :].expand(-1, k, -1), validate_args=False), 1
        )

    def _weights(self, z):
        if self.config["draws"] == 1:
            return z
        return 1 - torch.prod(1 - z, dim=-2)  # union of the picks, multilinear (fine on [0,1])

    def _analytic(self, dist, logits, batch):
        prior_logits = torch.where(batch.mask, torch.zeros_like(logits.detach()),
                                   torch.full_like(logits.detach(), PAD_LOGIT))
        q = D.OneHotCategorical(logits=logits, validate_args=False)
        p = D.OneHotCategorical(logits=prior_logits, validate_args=False)
        return -self.config["draws"] * D.kl_divergence(q, p)

    def _map_weights(self, logits, batch):
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)

    def _expected_weights(self, logits):
        q = torch.softmax(logits, -1)
        k = self.config["draws"]
        return q if k == 1 else 1 - (1 - q) ** k  # P(token in the union of k picks)

    def _configs(self, dist, B: int, L: int) -> torch.Tensor:
        """Every event: (L^k, B, L) one-hots for k = 1, (L^k, B, k, L) for k picks."""
        k = self.config["draws"]
        logits = dist.base_dist.logits if k > 1 else dist.logits
        eye = torch.eye(L, device=logits.device, dtype=logits.dtype)
        if k == 1:
            return eye[:, None, :].expand(L, B, L)
        idx = torch.cartesian_prod(*[torch.arange(L, device=logits.device)] * k).reshape(-1, k)
        return eye[idx][:, None].expand(-1, B, k, L)

    def _draws(self, dist, n_samples, gen):
        """Exact: every event with its probability (L^k of them)."""
        cfg = self._configs(dist, dist.batch_shape[0], dist.event_shape[-1])
        return cfg, dist.log_prob(cfg).exp()

    def reference_gradient(self, batch):
        """Exact: d/d(encoder) sum_b sum_c q_b(c) f_b(c) over all L^k events c."""
        prob = self.problem(batch)
        B, L = batch.ids.shape
        cfg = self._configs(prob.dist, B, L)
        expected = (prob.dist.log_prob(cfg).exp() * prob.f(cfg)).sum()
        return Reference(flat_grad(expected, self.estimated_parameters()), exact=True)
