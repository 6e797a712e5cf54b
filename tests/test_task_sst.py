"""SST loader and the three SST rationale tasks (tiny models and data slices: fast)."""
from __future__ import annotations

import gzip
import hashlib
import math

import pytest
import torch
from torch import distributions as D

import tasks
from estbench.core.budget import Budget
from estbench.engine.problems import Z_TOL
from estbench.engine.train import Cell, run_cell
from estimators import families as fam
from tasks.data import sst
from tasks.sst_rationales import PAD_LOGIT

TINY = dict(emb=8, hidden=8, max_train=256, val_size=64, final_samples=4, eval_samples=4,
            measure_size=4, ref_chunks=4, ref_chunk_samples=8)
SHA256 = {
    "train": "e2f3f41b0b1e6d4dddc0effe3bfc2d27ed8928079aa9a03d652311614fc5feb7",
    "dev": "0e9336aed6e4730e19f58d00a77b3f0297efdb755f7b5e598c98a05e3f97ea40",
    "test": "6e54806dee95cf80cd918e7dfb3f6770f6df24bf826f289a4d1f709e1c8f6761",
}


def make(name, seed=0, **opts):
    t = tasks.get(name, **{**TINY, **opts})
    t.setup("cpu", torch.Generator().manual_seed(seed))
    return t


# ---- loader -----------------------------------------------------------------------------------
def test_shipped_copy_is_the_original():
    for split, digest in SHA256.items():
        with gzip.open(sst.DEFAULT_DIR / f"{split}.txt.gz", "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == digest, split


def test_counts_labels_first_sentence():
    want = {"train": (8544, [1092, 2218, 1624, 2322, 1288]), "dev": (1101, [139, 289, 229, 279, 165]),
            "test": (2210, [279, 633, 389, 510, 399])}
    for split, (n, counts) in want.items():
        data = sst.load_split(split)
        assert len(data) == n
        assert [sum(s.label == k for s in data) for k in range(5)] == counts
    first = sst.load_split("train")[0]
    assert first.tokens[:3] == ("the", "rock", "is") and first.label == 3
    assert first.tokens[-1] == "."
    assert all(t == t.lower() for s in sst.load_split("dev") for t in s.tokens)


def test_vocabulary():
    train = sst.load_split("train")
    v1, v2 = sst.Vocab(train), sst.Vocab(train, min_count=2)
    assert v1.itos[:2] == ["<pad>", "<unk>"] and v1.pad_id == 0 and v1.unk_id == 1
    assert len(set(v1.itos)) == len(v1) > 15000 and 5000 < len(v2) < len(v1)
    assert v1.itos[2:4] == [".", "the"]  # most frequent first
    assert v1.encode(["the", "zzz-not-a-word"]) == [3, 1]
    assert v1.decode(v1.encode(train[0].tokens)) == list(train[0].tokens)
    with pytest.raises(ValueError, match="min_count"):
        sst.Vocab(train, min_count=0)


def test_parse_tree():
    s = sst.parse_tree("(3 (2 (2 The) (2 Rock)) (4 rocks))")
    assert s.tokens == ("the", "rock", "rocks") and s.label == 3
    assert sst.parse_tree("(1 Bad)").tokens == ("bad",)
    assert sst.parse_tree("(2 (2 8\xa01\\/2) (2 .))").tokens == ("8\xa01\\/2", ".")  # train line 4342
    for bad in ["(2 (2 a) (3 b)", "(2 a))", "(7 a)", "(x a)", "(2 (2 a) b)", "(2 a) (2 b)", "()"]:
        with pytest.raises(sst.TreeError):
            sst.parse_tree(bad)


def test_bad_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sst.load_split("train", missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make("sst_rationales", data_dir=str(missing))
    (tmp_path / "train.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="train.txt.gz"):
        sst.load_split("train", tmp_path)


def test_malformed_line_names_file_and_line(tmp_path):
    (tmp_path / "dev.txt").write_text("(3 (2 good) (3 line))\n(2 (2 broken) (3 line)\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dev\.txt:2: malformed SST tree"):
        sst.load_split("dev", tmp_path)


# ---- tasks ------------------------------------------------------------------------------------
def test_registered_with_their_families():
    assert "sst_rationales" in tasks.available("bernoulli")
    assert "sst_rationales_structured" in tasks.available("bernoulli")
    assert "sst_rationales_categorical" in tasks.available("categorical")
    assert tasks.get("sst_rationales_categorical").family == "categorical"


@pytest.mark.parametrize("name", ["sst_rationales", "sst_rationales_structured", "sst_rationales_categorical"])
def test_problem_contract(name):
    t = make(name)
    batch = next(t.train_batches(torch.Generator().manual_seed(0)))
    B, L = batch.ids.shape
    assert B == 32 and bool(batch.mask[:, 0].all()) and L == int(batch.mask.sum(1).max())
    prob = t.problem(batch)
    assert tuple(prob.dist.batch_shape) == (B,) and tuple(prob.dist.event_shape) == (L,)
    assert tuple(prob.context.shape) == (B, 8)
    # pad logits: the constant, and no gradient into the encoder through them
    _, raw, _ = t._encode(batch)
    pads = ~batch.mask
    assert bool(pads.any()) and torch.all(raw[pads] == PAD_LOGIT)
    if not name.endswith("categorical"):
        assert torch.equal(fam.params(prob.dist)["logits"], raw)
    g = torch.autograd.grad((raw * pads).sum(), t.estimated_parameters(), allow_unused=True,
                            retain_graph=True)
    assert all(x is None or float(x.abs().max()) == 0.0 for x in g)
    # f broadcasts over extra leading dims, and accepts relaxed masks
    z = prob.dist.sample((3, 2))  # (3, 2, B, L)
    fz = prob.f(z)
    assert fz.shape == (3, 2, B)
    torch.testing.assert_close(fz[:, 1], prob.f(z[:, 1]))
    soft = torch.rand(2, B, L, requires_grad=True)
    fs = prob.f(soft)
    assert fs.shape == (2, B) and torch.isfinite(fs).all()
    (gs,) = torch.autograd.grad(fs.sum(), soft)
    assert float(gs[:, batch.mask].abs().sum()) > 0
    assert float(gs[:, pads].abs().sum()) == 0  # pads ignored by f
    assert prob.analytic.shape == () and prob.analytic.requires_grad


def test_categorical_kl_is_exact():
    t = make("sst_rationales_categorical")
    batch = t.measure_batch()
    prob = t.problem(batch)
    q = prob.dist.probs
    n = batch.mask.sum(1, keepdim=True).double()
    kl = torch.where(batch.mask, torch.xlogy(q.double(), q.double() * n), torch.zeros_like(q.double())).sum()
    torch.testing.assert_close(-prob.analytic.double(), kl, rtol=1e-5, atol=1e-5)


def test_structured_prior_is_a_normalised_chain():
    t = make("sst_rationales_structured", prior_p=0.3, stay_on=0.8)
    L = 5
    mask = torch.tensor([[True] * 4 + [False]])  # 4 real tokens, one pad
    z = fam.enumerate_events(D.Independent(D.Bernoulli(logits=torch.zeros(1, L)), 1)).double()
    lp = t.log_prior(z, mask)  # (32, 1)
    # pad position ignored: summing over 2^5 configurations counts each real one twice
    torch.testing.assert_close(lp.exp().sum(), torch.tensor(2.0, dtype=torch.float64))
    # stationary rate prior_p at every position
    p_on = (lp.exp()[:, 0, None] * z[:, 0, :4]).sum(0) / 2
    torch.testing.assert_close(p_on, torch.full((4,), 0.3, dtype=torch.float64))
    with pytest.raises(ValueError, match="stay_on"):
        make("sst_rationales_structured", stay_on=1.5)


def _short_batch(t, max_len, n):
    idx = [i for i, s in enumerate(t.dev.sentences) if len(s.tokens) <= max_len][:n]
    return t.dev.batch(torch.tensor(idx))


def test_categorical_reference_equals_brute_force():
    t = make("sst_rationales_categorical")
    batch = t.dev.batch(torch.tensor([0]))
    ref = t.reference_gradient(batch)
    assert ref.exact
    # brute force: one f call per token position, sum_i q_i f(e_i)
    prob = t.problem(batch)
    L = batch.ids.shape[1]
    q = torch.softmax(fam.params(prob.dist)["logits"], -1)[0]
    total = 0.0
    for i in range(L):
        z = torch.zeros(1, L)
        z[0, i] = 1.0
        total = total + q[i] * prob.f(z)[0]
    brute = tasks.flat_grad(total, t.estimated_parameters())
    torch.testing.assert_close(ref.grad, brute, rtol=1e-5, atol=1e-6)
    assert float(brute.norm()) > 0


def test_categorical_two_draws_reference_exact():
    t = make("sst_rationales_categorical", draws=2)
    batch = _short_batch(t, 6, 2)
    prob = t.problem(batch)
    L = batch.ids.shape[1]
    assert tuple(prob.dist.event_shape) == (2, L)
    z = fam.enumerate_events(prob.dist)  # independent enumeration: (L^2, B, 2, L)
    brute = tasks.flat_grad((prob.dist.log_prob(z).exp() * prob.f(z)).sum(), t.estimated_parameters())
    torch.testing.assert_close(t.reference_gradient(batch).grad, brute, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,encoder", [("sst_rationales", "bow"), ("sst_rationales_structured", "lstm")])
@pytest.mark.slow
def test_bernoulli_reference_agrees_with_exact_enumeration(name, encoder):
    """The Monte Carlo reference is unbiased and its standard error is right, against exact
    enumeration, from K independent references of R chunks each."""
    torch.manual_seed(0)
    K, R, S = 64, 16, 32
    t = make(name, encoder=encoder, emb=4, hidden=3, ref_chunks=R, ref_chunk_samples=S)
    batch = _short_batch(t, 6, 3)
    prob = t.problem(batch)
    z = fam.enumerate_events(prob.dist)  # (2^L, B, L): exact E_q[f]
    exact = tasks.flat_grad((prob.dist.log_prob(z).exp() * prob.f(z)).sum(), t.estimated_parameters())
    refs = [t.reference_gradient(batch) for _ in range(K)]
    assert all(not r.exact and r.n_samples == R * S for r in refs)
    diff = torch.stack([r.grad - exact for r in refs]).double()  # (K, P)
    se2 = torch.stack([r.stderr for r in refs]).double() ** 2
    s2 = se2.mean(0)  # the pooled squared standard error of one reference, per coordinate
    live = s2 > 0
    assert torch.allclose(diff[:, ~live], torch.zeros(()).double(), atol=1e-6)
    # one reference, and the mean of the K (K times the samples), within Z_TOL standard errors
    assert float((diff[0, live] / se2[0, live].sqrt()).abs().max()) < Z_TOL
    assert float((diff.mean(0)[live] / (s2[live] / K).sqrt()).abs().max()) < Z_TOL
    # the standard error is right: per coordinate, E[(ref - exact)^2] = sigma^2 / R = E[stderr^2]
    # (the ddof-1 variance of the chunks is unbiased), so the pooled ratio of squared errors to
    # squared standard errors (each coordinate scaled by its pooled s2) is 1 in expectation.  Its
    # log's standard error comes from the K independent references (delta method; the coordinates
    # are strongly correlated -- all are VJPs of one (B, L) cotangent -- so each reference counts
    # as ~5 degrees of freedom, not P): ~0.08 here.  A standard error off by a factor c moves the
    # log ratio by -2 log c: 1.39 for c = 2, ~17 of its standard errors.
    a = (diff[:, live] ** 2 / s2[live]).sum(1)
    b = (se2[:, live] / s2[live]).sum(1)
    ma, mb = a.mean(), b.mean()
    cov = torch.cov(torch.stack([a / ma, b / mb]))
    se_log = math.sqrt(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]) / K)
    z_calib = math.log(float(ma / mb)) / se_log
    assert abs(z_calib) < Z_TOL, (f"squared errors / squared stderrs = {float(ma / mb):.3f}: "
                                  f"{z_calib:.1f} standard errors from 1")
    # and the reference resolves the gradient: far above its noise
    assert float(exact.norm()) > 10 * float(s2.sum().sqrt()) / math.sqrt(live.sum().item())


def test_training_improves_the_objective():
    cell = Cell("sst_rationales[emb=16,hidden=16,max_train=512,val_size=100,measure_size=4,"
                "ref_chunks=4,ref_chunk_samples=8,final_samples=4]", "rloo", 0, "cpu",
                Budget(steps=60, n_samples=4, checkpoints=3, measure_samples=4))
    res = run_cell(cell)
    assert res.status == "ok", res.error
    rec = {(r["metric"], r["step"]): r["value"] for r in res.records}
    assert rec[("train_objective", 60)] > rec[("train_objective", 30)]
    assert rec[("elbo", 60)] > rec[("elbo", 0)]
    for k in ("dev_accuracy", "test_accuracy", "dev_accuracy_map", "test_accuracy_map", "selection_rate",
              "expected_selection_rate"):
        assert 0.0 <= rec[(k, 60)] <= 1.0


def test_evaluation_and_examples():
    t = make("sst_rationales_categorical")
    e1, e2 = t.evaluate(False), t.evaluate(False)
    assert e1 == e2 and math.isfinite(e1) and e1 < 0
    ex = t.example_rationales(3)
    assert len(ex) == 3 and ex[0]["tokens"] == list(t.dev.sentences[0].tokens)
    assert sum(ex[0]["selected"]) == 1 and len(ex[0]["selected"]) == len(ex[0]["tokens"])
    assert set(ex[0]) == {"tokens", "selected", "q", "label", "prediction", "prediction_map"}
    torch.testing.assert_close(sum(ex[0]["q"]), 1.0, atol=2e-3, rtol=0)  # one pick: q over the tokens
    m = t.final_metrics()
    one_per_sentence = len(t.dev) / sum(len(s.tokens) for s in t.dev.sentences)
    assert m["expected_selection_rate"] == pytest.approx(one_per_sentence, rel=1e-4)
    assert m["selection_rate"] == pytest.approx(one_per_sentence)
    assert 0.1 < m["dev_accuracy"] < 0.5 and 0.1 < m["test_accuracy_map"] < 0.5
