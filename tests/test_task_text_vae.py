"""The text_vae task (sentence VAE on PTB) and its PTB loader, on tiny model sizes."""
from __future__ import annotations

import gzip
import math

import pytest
import torch
from torch import distributions as D

import tasks
from estbench.core.budget import Budget
from estbench.engine.problems import Z_TOL
from estbench.engine.train import Cell, run_cell
from tasks.data import ptb
from tasks.text_vae import SentenceBatch

TINY = dict(emb=8, hidden=16, latent_dim=4, batch_size=8, max_len=12, val_size=16,
            test_sentences=16, is_samples=2, measure_size=2, ref_chunks=4, ref_chunk_samples=4)


def make(seed=0, **over):
    task = tasks.get("text_vae", **{**TINY, **over})
    task.setup("cpu", torch.Generator().manual_seed(seed))
    return task


# ---- loader -----------------------------------------------------------------------------------
def test_line_counts_and_first_line():
    n = {s: len(ptb.load_split(s)) for s in ptb.SPLITS}
    assert n == {"train": 42068, "valid": 3370, "test": 3761}
    assert ptb.load_split("train")[0][:3] == ("aer", "banknote", "berlitz")


def test_vocabulary_is_mikolovs_10k():
    vocab = ptb.build_vocabulary()
    tokens = {w for s in ptb.SPLITS for sent in ptb.load_split(s) for w in sent}
    assert len(tokens) == 9999 and "<unk>" in tokens  # 9,999 distinct tokens incl. <unk>
    assert len(vocab) == 9999 + 3  # + </s> (= 10k), + <s>, <pad>
    assert all(w in vocab.stoi for w in tokens)  # valid/test have no word outside train
    assert (vocab.pad, vocab.bos, vocab.eos, vocab.unk) == (0, 1, 2, 3)
    assert vocab.decode(vocab.encode(["the", "zzz-not-a-word"])) == ["the", "<unk>"]


def test_bad_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ptb.load_split("valid", missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tasks.get("text_vae", data_dir=str(missing)).setup("cpu", torch.Generator().manual_seed(0))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ptb.valid.txt.gz").write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="ptb.valid.txt.gz"):
        ptb.load_split("valid", bad)
    with gzip.open(bad / "ptb.test.txt.gz", "wt") as fh:
        fh.write(" a b \n\n c \n")
    with pytest.raises(ValueError, match="empty line"):
        ptb.load_split("test", bad)


# ---- the task ---------------------------------------------------------------------------------
def _train_batch(task):
    return next(task.train_batches(torch.Generator().manual_seed(3)))


def test_word_dropout_replaces_decoder_inputs():
    task = make(word_dropout=1.0)
    b = _train_batch(task)
    v = task.vocab
    clean, targets, mask = task.decoder_io(b, train=False)
    assert (clean[:, 0] == v.bos).all() and (clean[:, 1:][mask[:, 1:]] != v.unk).any()
    dropped, targets2, mask2 = task.decoder_io(b, train=True)
    assert torch.equal(targets, targets2) and torch.equal(mask, mask2)
    assert (dropped[:, 0] == v.bos).all()
    assert (dropped[:, 1:][mask[:, 1:]] == v.unk).all()  # every real input but <s> is <unk>
    assert torch.equal(dropped[~mask], clean[~mask])  # padding untouched
    # the problem really uses the dropped inputs on training batches only
    torch.manual_seed(0)
    z = torch.randn(2, len(b.lengths), 4)
    f_train = task.problem(b).f(z)
    f_held = task.problem(SentenceBatch(b.words, b.lengths)).f(z)
    assert not torch.allclose(f_train, f_held)
    # p = 0: nothing is dropped; p = 0.5: about half of the words are
    assert torch.equal(make(word_dropout=0.0).decoder_io(b, train=True)[0], clean)
    torch.manual_seed(1)
    half = make(word_dropout=0.5).decoder_io(b, train=True)[0]
    real = mask.clone()
    real[:, 0] = False
    real &= clean != v.unk
    frac = (half[real] == v.unk).double().mean().item()
    assert abs(frac - 0.5) < Z_TOL * math.sqrt(0.25 / int(real.sum())), frac


def test_analytic_is_minus_kl_with_annealing_and_free_bits():
    task = make()
    held = task.measure_batch()
    prob = task.problem(held)
    prior = D.Independent(D.Normal(torch.zeros(4), torch.ones(4)), 1)
    kl = D.kl_divergence(prob.dist, prior)
    assert kl.shape == (2,)
    torch.testing.assert_close(prob.analytic, -kl.sum())
    # annealing: weight t / steps on training batches; free bits: max(KL, lambda) per sentence
    lam = float(kl.detach().max()) + 1.0
    t = make(kl_anneal_steps=10, free_bits=lam)
    b = SentenceBatch(held.words, held.lengths, step=4)
    p = t.problem(b)
    torch.testing.assert_close(p.analytic, torch.tensor(-0.4 * lam * 2))
    t2 = make(kl_anneal_steps=10, free_bits=lam, free_bits_mode="dim")
    kd = t2.kl_per_dim(p.dist.base_dist.loc, p.dist.base_dist.scale)
    expect = -0.4 * torch.clamp(kd, min=lam / 4).sum()
    torch.testing.assert_close(t2.problem(b).analytic, expect)
    assert make(kl_anneal_steps=10).kl_weight(25) == 1.0
    # evaluation (held-out batches) always uses the true KL
    torch.testing.assert_close(t.problem(held).analytic, -kl.sum())


def test_f_broadcasts_over_leading_dims():
    task = make()
    prob = task.problem(task.measure_batch())
    torch.manual_seed(0)
    z = torch.randn(3, 2, 4)
    f3 = prob.f(z)
    assert f3.shape == (3, 2)
    torch.testing.assert_close(prob.f(z.unsqueeze(1)), f3.unsqueeze(1))
    zz = prob.dist.rsample((3, 5))  # (n, M, B, D): each replica as if alone
    f4 = prob.f(zz)
    assert f4.shape == (3, 5, 2)
    torch.testing.assert_close(f4[:, 2], prob.f(zz[:, 2]))
    # token chunking with recomputation gives the same values and gradients
    loc = prob.dist.base_dist.loc
    g_full = torch.autograd.grad(prob.f(zz).sum(), loc, retain_graph=True)[0]
    task.chunk_elements = 40 * 10002  # 40 rows per chunk
    torch.testing.assert_close(prob.f(zz), f4)
    torch.testing.assert_close(torch.autograd.grad(prob.f(zz).sum(), loc)[0], g_full)


@pytest.mark.slow
def test_reference_gradient_agrees_with_independent_estimate():
    task = make(ref_chunks=48, ref_chunk_samples=4)
    batch = task.measure_batch()
    torch.manual_seed(11)
    ref = task.reference_gradient(batch)
    assert not ref.exact and ref.n_samples == 192 and ref.grad.shape == ref.stderr.shape
    # independent: antithetic reparameterisation pairs, written here from the encoder up
    params = task.estimated_parameters()
    loc, scale, _ = task.encode(batch.words, batch.lengths)
    inputs, targets, mask = task.decoder_io(batch)
    torch.manual_seed(12)
    rows = []
    for _ in range(48):
        eps = torch.randn(4, *loc.shape)
        z = torch.cat([loc + scale * eps, loc - scale * eps])
        obj = task.log_likelihood(z, inputs, targets, mask).mean(0).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(obj, params, retain_graph=True)]))
    G = torch.stack(rows)
    mean, se = G.mean(0), G.std(0) / math.sqrt(len(rows))
    se2 = (se**2 + ref.stderr**2).sqrt()
    live = se2 > 1e-7
    assert live.sum() > 100
    zs = (mean - ref.grad)[live] / se2[live]
    # every coordinate of the loc/scale heads within 4.5 SE; and overall, ||diff||^2 against its
    # expectation sum se^2 (coordinates are strongly correlated -- all are J^T of the 2*B*D
    # gradients w.r.t. loc and scale -- so this is a loose, chi^2 with ~16 dof, check)
    n_head = sum(p.numel() for p in list(task.encoder["loc"].parameters())
                 + list(task.encoder["scale"].parameters()))
    n_live_head = int(live[-n_head:].sum())
    assert n_live_head > 50
    assert zs[-n_live_head:].abs().max() < Z_TOL, zs[-n_live_head:].abs().max()
    ratio = ((mean - ref.grad) ** 2).sum() / (se2**2).sum()
    assert ratio < 4.0, ratio
    # and it can fail: the same estimate with the scale path cut off is rejected
    n_scale = sum(p.numel() for p in task.encoder["scale"].parameters())
    cut = (0 * mean[-n_scale:] - ref.grad[-n_scale:]) / se2[-n_scale:]
    assert cut.abs().max() > Z_TOL


@pytest.mark.slow
def test_training_steps_with_reparam_improve_the_elbo():
    opts = ",".join(f"{k}={v}" for k, v in {**TINY, "max_len": 8, "batch_size": 16, "lr": 0.01}.items())
    cell = Cell(f"text_vae[{opts}]", "reparam", 0, "cpu",
                Budget(steps=40, n_samples=1, checkpoints=2, measure_samples=2))
    res = run_cell(cell)
    assert res.status == "ok", res.error
    elbo = {r["step"]: r["value"] for r in res.records if r["metric"] == "elbo"}
    assert elbo[40] > elbo[0] + 10, elbo  # from ~ -9.2 nats/token of a uniform softmax
    fin = {r["metric"]: r["value"] for r in res.records if r["step"] == 40}
    assert math.isfinite(fin["final_elbo"]) and fin["final_elbo"] < 0
    assert fin["test_kl"] >= 0 and fin["test_nll"] > 0
    assert fin["test_ppl_is"] <= fin["test_ppl_elbo"] * 1.05
    # perplexity = exp(NLL per token), the tokens being the words + </s> of the 16 test sentences
    # (counted here from the data): ELBO = -(NLL + KL) per sentence and ppl_elbo = exp(-ELBO/token)
    n_test = n_valid = 16  # TINY's test and validation sentences
    n_tok = sum(len(s) + 1 for s in ptb.load_split("test")[:n_test])
    assert fin["test_nll"] + fin["test_kl"] == pytest.approx(-fin["final_elbo"], rel=1e-9)
    assert fin["test_ppl_elbo"] == pytest.approx(math.exp(-fin["final_elbo"] * n_test / n_tok), rel=1e-9)
    # untrained, the decoder's softmax is near uniform over the |V| = 10,002 entries: the step-0
    # validation ELBO read as a perplexity is |V| within 20% (measured 10,636);  trained, the test
    # perplexity is more than a nat per token below it (|V|/e = 3,680; measured 2,157) yet above
    # the unigram model of the whole training set on these sentences (759), which 40 steps on 640
    # sentences of <= 8 words cannot beat
    V = 10002
    ppl_0 = math.exp(-elbo[0] * n_valid / sum(len(s) + 1 for s in ptb.load_split("valid")[:n_valid]))
    assert abs(math.log(ppl_0 / V)) < 0.2, ppl_0
    assert 759 < fin["test_ppl_is"] < V / math.e, fin["test_ppl_is"]


# ---- the protocol: dgm4nlp's SentVAE_Solutions.ipynb at 21ad40a --------------------------------
#: the notebook's settings as its code cells run them (cells counted from 0 in its JSON, In [n] the
#: execution count): cell 22 (In [12]) sets the sizes, dropout, batch, Adam's rate, 20 epochs and 50
#: importance samples; cell 12 (In [7]) is a bidirectional LSTM on the decoder's embeddings,
#: detached; cell 14 (In [8]) starts the decoder LSTM at h = c = bridge(z) and clamps the total KL
#: of each sentence at free_nats = 5; cell 8 (In [5]) computes word-dropped inputs and never uses
#: them (so the notebook ran without word dropout, whatever cell 22 sets); cells 16, 18 and 26
#: (In [9], [10], [14]) evaluate every validation / test sentence
NOTEBOOK = {"latent_dim": 32, "emb": 256, "hidden": 256, "cell": "lstm", "bidirectional": True,
            "encoder_emb": "decoder", "dec_init": "shared", "scale": "softplus", "dropout": 0.4,
            "word_dropout": 0.0, "free_bits": 5.0, "free_bits_mode": "total", "kl_anneal_steps": 0,
            "batch_size": 64, "lr": 1e-3, "max_len": 0, "val_size": 3370, "test_sentences": 0,
            "is_samples": 50}


def _protocol():
    from estbench.engine import protocols

    return protocols.get("text_vae")


def test_protocol_follows_the_sentvae_notebook_on_the_shipped_ptb():
    p = _protocol()
    assert "SentVAE_Solutions.ipynb" in p.source["code"] and "diff_hparams" not in p.source["code"]
    assert "21ad40a1e9c6e89924114884855c069eb8fac171" in p.source["code"]
    task = tasks.get("text_vae", **p.task_options)
    assert {k: task.config[k] for k in NOTEBOOK} == NOTEBOOK
    # 20 epochs of the shipped training set in full batches of 64 (the task drops the last one)
    n_train = len(ptb.load_split("train"))
    assert p.budget["steps"] == 20 * (n_train // 64) == 13140 and p.budget["n_samples"] == 1
    assert p.budget["eval_points"] == 21  # once an epoch, from step 0
    # the figures as the notebook printed them (cells 26 and 22)
    figures = p.settings["figures"]
    for printed in ("95.96 (4.97)", "119.78", "136.70", "-98.81 (5.00)"):
        assert printed in figures, printed
    assert any("word dropout" in d for d in p.differences)


def test_protocol_task_is_the_notebooks_model():
    """The protocol's options, set up at full size, compute what the notebook's SentenceVAE does."""
    p = _protocol()
    task = tasks.get("text_vae", **p.task_options)
    task.setup("cpu", torch.Generator().manual_seed(0))
    V, E, H, Z = 10002, 256, 256, 32
    enc, dec = task.encoder, task.decoder
    assert "emb" not in enc  # one table: the decoder's
    rnn = enc["rnn"]
    assert isinstance(rnn, torch.nn.LSTM) and rnn.bidirectional and (rnn.input_size, rnn.hidden_size) == (E, H)
    assert (enc["loc"].in_features, enc["loc"].out_features) == (2 * H, Z)
    assert (dec["bridge"].in_features, dec["bridge"].out_features) == (Z, H)
    assert isinstance(dec["rnn"], torch.nn.LSTM) and not dec["rnn"].bidirectional
    # as many parameters as the notebook's layers: embedder, decoder LSTM, bridge, projection,
    # the encoder's bidirectional LSTM, mu and sigma layers
    layers = [torch.nn.Embedding(V, E), torch.nn.LSTM(E, H), torch.nn.Linear(Z, H), torch.nn.Linear(H, V),
              torch.nn.LSTM(E, H, bidirectional=True), torch.nn.Linear(2 * H, Z), torch.nn.Linear(2 * H, Z)]
    assert sum(q.numel() for q in task.parameters()) == sum(
        q.numel() for m in layers for q in m.parameters())
    assert sum(q.numel() for q in task.estimated_parameters()) == sum(
        q.numel() for m in layers[4:] for q in m.parameters())

    b = _train_batch(task)
    assert len(b.lengths) == 64 and b.lengths.min() < b.lengths.max()  # padding to pack around
    # the encoder: each sentence alone (no padding), the detached decoder embeddings, both final
    # states; no gradient reaches the embeddings through it
    loc, scale, h = task.encode(b.words, b.lengths)
    for i in (int(b.lengths.argmin()), int(b.lengths.argmax()), 7):
        x = dec["emb"](b.words[i: i + 1, : int(b.lengths[i])])
        _, (hn, _) = rnn(x)
        hx = torch.cat([hn[0], hn[1]], -1)
        torch.testing.assert_close(h[i: i + 1], hx)
        torch.testing.assert_close(loc[i: i + 1], enc["loc"](hx))
        torch.testing.assert_close(scale[i: i + 1], torch.nn.functional.softplus(enc["scale"](hx)) + 1e-5)
    assert torch.autograd.grad(loc.sum(), dec["emb"].weight, allow_unused=True)[0] is None
    # the decoder starts at h = c = bridge(z) and reads <s> w_1 .. w_T (no word dropout)
    held = SentenceBatch(b.words[:4], b.lengths[:4])
    inputs, targets, mask = task.decoder_io(held)
    torch.testing.assert_close(task.decoder_io(SentenceBatch(b.words, b.lengths, 0), train=True)[0],
                               task.decoder_io(SentenceBatch(b.words, b.lengths))[0])
    z = torch.randn(4, Z, generator=torch.Generator().manual_seed(1))
    h0 = dec["bridge"](z).unsqueeze(0)
    out, _ = dec["rnn"](dec["emb"](inputs), (h0, h0))
    lp = torch.log_softmax(dec["out"](out), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(task.log_likelihood(z, inputs, targets, mask), (lp * mask).sum(-1))
    # free nats: the total KL of each sentence clamped at 5 (not 5/32 a dimension), no annealing
    with torch.no_grad():
        enc["loc"].bias[0] += 4.0  # one dimension's KL above 5, the others near 0
    train = SentenceBatch(b.words[:8], b.lengths[:8], step=0)
    prob = task.problem(train)
    kl_d = task.kl_per_dim(prob.dist.base_dist.loc, prob.dist.base_dist.scale)
    torch.testing.assert_close(prob.analytic, -torch.clamp(kl_d.sum(-1), min=5.0).sum())
    per_dim = -torch.clamp(kl_d, min=5.0 / Z).sum()
    assert (prob.analytic - per_dim).abs() > 0.1  # the two rules differ on this batch


def test_bidirectional_gru_encoder_and_options_on_tiny_sizes():
    for cell in ("lstm", "gru"):
        task = make(cell=cell, bidirectional=True, encoder_emb="decoder", dec_init="shared")
        b = _train_batch(task)
        prob = task.problem(b)
        assert prob.context.shape == (len(b.lengths), 2 * 16)
        z = prob.dist.rsample((3,))
        assert prob.f(z).shape == (3, len(b.lengths))
        # padding does not reach the encoding: a sentence encodes the same alone
        i = int(b.lengths.argmin())
        alone = task.encode(b.words[i: i + 1, : int(b.lengths[i])], b.lengths[i: i + 1])[0]
        torch.testing.assert_close(task.encode(b.words, b.lengths)[0][i: i + 1], alone)
        names = {n.split(".")[0] for n, _ in task.encoder.named_parameters()}
        assert names == {"rnn", "loc", "scale"}
    # the defaults keep the suite's model: its own table, one direction, (tanh(A z + a), C z + c)
    plain = make()
    assert "emb" in plain.encoder and not plain.encoder["rnn"].bidirectional
    assert plain.decoder["bridge"].out_features == 2 * 16
