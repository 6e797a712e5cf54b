"""The binary_vae task: MNIST loader, data splits, model contract, reference gradients, training."""
import gzip
import re
import shutil
import struct

import pytest
import torch
from torch import distributions as D

import estimators
import tasks
from estbench.core.budget import Budget
from estbench.engine.problems import Z_TOL
from estbench.engine.train import Cell, run_cell
from tasks.data import mnist

TINY = dict(latents=10, val_size=200, eval_samples=2, iwae_images=200, iwae_samples=10, measure_size=8)



def _task(seed=0, **kw):
    t = tasks.get("binary_vae", **{**TINY, **kw})
    t.setup("cpu", torch.Generator().manual_seed(seed))
    return t


def test_loader_counts_and_labels():
    x, y = mnist.load("train")
    xt, yt = mnist.load("test")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8 and y.shape == (60000,)
    assert xt.shape == (10000, 28, 28) and yt.shape == (10000,)
    # label counts from shared/data/SOURCES.md
    assert y.bincount().tolist()[:4] == [5923, 6742, 5958, 6131]
    assert yt.bincount().tolist()[:4] == [980, 1135, 1032, 1010]
    assert int(x.max()) == 255 and int(x.min()) == 0
    assert abs(float(x.float().mean()) / 255 - 0.1307) < 5e-4
    assert mnist.load("train")[0] is x  # cached


def test_splits_and_binarisation_are_fixed():
    t1, t2 = _task(), _task(seed=1)
    assert t1._train_u8.shape == (50000, 784) and t1._val.shape == (10000, 784)
    assert t1._test.shape == (10000, 784)
    # the validation set is the last 10k training images
    full = mnist.load("train")[0].reshape(-1, 784)
    assert torch.equal(t1._train_u8, full[:50000])
    # fixed binarisation, independent of the model seed; pixels at 0 stay 0, at 255 stay 1
    assert torch.equal(t1._val, t2._val) and torch.equal(t1._test, t2._test)
    assert set(t1._val.unique().tolist()) == {0.0, 1.0}
    p = full[50000:].float() / 255
    assert bool((t1._val[p == 0] == 0).all()) and bool((t1._val[p == 1] == 1).all())
    assert abs(float(t1._val.mean()) - float(p.mean())) < 2e-3
    # dynamic binarisation: same data generator -> same batches; another -> different
    b1 = [next(it) for it in [t1.train_batches(torch.Generator().manual_seed(5))] for _ in range(3)]
    b2 = [next(it) for it in [t2.train_batches(torch.Generator().manual_seed(5))] for _ in range(3)]
    b3 = next(t1.train_batches(torch.Generator().manual_seed(6)))
    assert all(torch.equal(a, b) for a, b in zip(b1, b2))
    assert b1[0].shape == (50, 784) and not torch.equal(b1[0], b3)
    assert torch.equal(t1.measure_batch(), t1._val[:8])


def test_problem_contract():
    t = _task()
    x = t.measure_batch()
    prob = t.problem(x)
    assert prob.dist.batch_shape == (8,) and prob.dist.event_shape == (10,)
    assert torch.equal(prob.context, x)
    # analytic = -sum_b KL(q || p), against torch's Bernoulli KL
    a = t.encode(x)
    kl = D.kl_divergence(D.Bernoulli(logits=a), D.Bernoulli(logits=t.prior_logits.expand_as(a)))
    torch.testing.assert_close(prob.analytic, -kl.sum(), rtol=1e-5, atol=1e-4)
    # f broadcasts over extra leading dims, and equals the Bernoulli log-likelihood
    z = prob.dist.sample((3, 2))
    fz = prob.f(z)
    assert fz.shape == (3, 2, 8)
    ref = D.Independent(D.Bernoulli(logits=t.decoder(z)), 1).log_prob(x.expand(3, 2, 8, 784))
    torch.testing.assert_close(fz, ref, rtol=1e-5, atol=1e-3)
    # gradients of the dist reach the encoder only; f reaches the decoder
    g = torch.autograd.grad(prob.dist.base_dist.logits.sum(), t.estimated_parameters())
    assert all(gi is not None for gi in g)
    # IWAE bound above the ELBO, both finite
    gen = torch.Generator().manual_seed(0)
    elbo = t.elbo(t._val[:200], 10, gen).mean()
    iw = t.iwae(t._val[:200], 10, gen).mean()
    assert torch.isfinite(elbo) and iw > elbo
    # nonlinear architecture builds and evaluates
    tn = _task(arch="nonlinear")
    assert len(tn.estimated_parameters()) == 6 and tn.problem(x).f(z).shape == (3, 2, 8)


def test_exact_reference_matches_enumeration_estimator_and_sampled_reference():
    t = _task()
    x = t.measure_batch()
    exact = t.reference_gradient(x)
    assert exact.exact and exact.stderr is None
    # independent check: the registry's exact-enumeration estimator, carried to the encoder
    prob = t.problem(x)
    e = estimators.get("exact").estimate(prob.dist, prob.f, 1)
    g = tasks.flat_grad(e.surrogate, t.estimated_parameters())
    torch.testing.assert_close(exact.grad, g, rtol=1e-3, atol=1e-3 * float(g.abs().max()))

    ts = _task(reference="sampled", ref_chunks=64, ref_chunk_samples=64)
    torch.manual_seed(0)
    sampled = ts.reference_gradient(x)
    assert not sampled.exact and sampled.n_samples == 64 * 64
    se = sampled.stderr
    live = se > 0
    # coordinates with zero stderr are exactly-zero gradients (input pixels at 0 after centring)
    assert torch.equal(sampled.grad[~live], torch.zeros_like(sampled.grad[~live]))
    assert exact.grad[~live].abs().max() < 1e-6
    z = (sampled.grad - exact.grad)[live] / se[live]
    assert float(z.abs().max()) < 5.5  # ~7800 coordinates: a max of that many normals
    # the 10 output-layer bias coordinates: plain z-test at 4.5 SE
    P = exact.grad.numel()
    zb = (sampled.grad - exact.grad)[P - 10:] / se[P - 10:]
    assert float(zb.abs().max()) < Z_TOL
    # the standard errors are small next to the gradient, so the z-tests above have teeth
    assert float(se.norm() / exact.grad.norm()) < 0.1
    cos = torch.nn.functional.cosine_similarity(sampled.grad, exact.grad, dim=0)
    assert cos > 0.99


def test_training_with_rloo_improves_validation_elbo():
    spec = "binary_vae[latents=10,val_size=200,eval_samples=4,iwae_images=100,iwae_samples=10,lr=0.003]"
    res = run_cell(Cell(spec, "rloo", 0, "cpu",
                        Budget(steps=30, n_samples=4, checkpoints=2, measure_samples=16)))
    assert res.status == "ok", res.error
    rec = {(r["step"], r["metric"]): r["value"] for r in res.records}
    assert rec[(30, "elbo")] > rec[(0, "elbo")] + 1.0
    for k in ("final_elbo", "test_iwae10", "bias", "variance", "cosine"):
        step = 30
        assert torch.isfinite(torch.tensor(rec[(step, k)])), k
    assert rec[(30, "test_iwae10")] > rec[(30, "final_elbo")] - 5.0
    assert rec[(30, "n_evals")] == 4


def _write_gz(path, data: bytes):
    with gzip.open(path, "wb") as fh:
        fh.write(data)


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train-images-idx3-ubyte.gz"))):
        mnist.load("train", tmp_path)
    t = tasks.get("binary_vae", data_dir=str(tmp_path), latents=4)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        t.setup("cpu", torch.Generator().manual_seed(0))
    img = tmp_path / "t10k-images-idx3-ubyte.gz"
    lab = tmp_path / "t10k-labels-idx1-ubyte.gz"
    # not a gzip file
    img.write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match=f"{re.escape(str(img))}.*corrupt"):
        mnist.load("test", tmp_path)
    # truncated gzip stream
    img.write_bytes((mnist.DEFAULT_DIR / img.name).read_bytes()[:5000])
    with pytest.raises(ValueError, match=re.escape(str(img))):
        mnist.load("test", tmp_path)
    # wrong magic number
    _write_gz(img, struct.pack(">IIII", 2049, 10000, 28, 28) + bytes(10))
    with pytest.raises(ValueError, match=f"{re.escape(str(img))}.*magic"):
        mnist.load("test", tmp_path)
    # valid header, truncated data
    _write_gz(img, struct.pack(">IIII", 2051, 10000, 28, 28) + bytes(784 * 5))
    with pytest.raises(ValueError, match=f"{re.escape(str(img))}.*data bytes"):
        mnist.load("test", tmp_path)
    # good images, labels missing / wrong count
    shutil.copy(mnist.DEFAULT_DIR / img.name, img)
    with pytest.raises(FileNotFoundError, match=re.escape(str(lab))):
        mnist.load("test", tmp_path)
    _write_gz(lab, struct.pack(">II", 2049, 9999) + bytes(9999))
    with pytest.raises(ValueError, match=f"{re.escape(str(lab))}.*9999"):
        mnist.load("test", tmp_path)


def test_options_are_validated():
    with pytest.raises(ValueError, match="arch"):
        tasks.get("binary_vae", arch="deep")
    with pytest.raises(ValueError, match="latents"):
        tasks.get("binary_vae", reference="exact", latents=200)
    with pytest.raises(ValueError, match="ref_chunk"):
        tasks.get("binary_vae", ref_chunk_samples=1)


def test_subset_evaluation_takes_the_first_1000_test_images(monkeypatch):
    """The quick budget evaluates the test ELBO and the IWAE bound on a fixed subset (the same for
    every estimator); a full evaluation uses all of the test set and iwae_images."""
    from tasks import binary_vae

    assert tasks.get("binary_vae").budgets["quick"]["evaluation"] == "subset"
    assert Budget(**tasks.get("binary_vae").budgets["standard"]).evaluation == "full"
    seen = []
    for evaluation, expected in [("subset", binary_vae.SUBSET_TEST_IMAGES), ("full", 10000)]:
        t = tasks.get("binary_vae", latents=10, iwae_images=10000, iwae_samples=2)
        t.evaluation = evaluation
        t.setup("cpu", torch.Generator().manual_seed(0))
        monkeypatch.setattr(t, "iwae", lambda x, K, gen: seen.append(x.shape[0]) or torch.zeros(1))
        monkeypatch.setattr(t, "elbo", lambda x, K, gen: seen.append(x.shape[0]) or torch.zeros(1))
        t.final_metrics()
        assert seen[-1] == expected
        t.evaluate(final=True)
        assert seen[-1] == expected
    # the harness hands the cell's budget's evaluation to the task
    original = binary_vae.BinaryVAE.iwae
    monkeypatch.setattr(binary_vae.BinaryVAE, "iwae",
                        lambda self, x, K, gen: seen.append(x.shape[0]) or original(self, x, K, gen))
    res = run_cell(Cell("binary_vae[latents=10,iwae_samples=2]", "rloo", 0, "cpu",
                        Budget(steps=1, n_samples=2, checkpoints=0, evaluation="subset")))
    assert res.status == "ok", res.error
    assert seen[-1] == binary_vae.SUBSET_TEST_IMAGES
