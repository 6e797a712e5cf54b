"""The measurement's fast paths give the figures of the plain computation: the float64 summary in
column chunks over per-parameter blocks, the bias test's second stage projected through the
directions' tangents, and a declared-deterministic estimator measured from two estimates (the
declaration checked, not taken)."""
from __future__ import annotations

import math

import pytest
import torch

import estimators
import tasks
from estbench.core.errors import DeclarationError
from estbench.engine import measure as ms
from tasks import Reference


def _plain_summary(G: torch.Tensor, r: torch.Tensor) -> dict[str, float]:
    """The summary's figures from their definitions, on the whole matrix in float64."""
    G, r = G.double(), r.double()
    M = G.shape[0]
    mean = G.mean(0)
    var = ((G - mean) ** 2).sum() / (M - 1)
    return {"bias": float((mean - r).norm()), "variance": float(var),
            "bias_noise": float((var / M).sqrt()),
            "cosine": float(torch.nn.functional.cosine_similarity(G, r.expand_as(G), dim=1).mean()),
            "snr": float(mean.norm() / var.sqrt())}


def test_summary_in_column_chunks_over_blocks_is_the_whole_matrix_figures(monkeypatch):
    """Blocks of uneven widths, chunks narrower than a block and straddling none: every figure
    equals the whole-matrix float64 computation to rounding, and the projections are those of
    the concatenated matrix."""
    monkeypatch.setattr(ms, "FLOAT64_COLUMNS", 64)
    g = torch.Generator().manual_seed(0)
    widths, M = [5, 200, 64, 131], 9
    blocks = [torch.randn(M, w, generator=g) + 0.3 for w in widths]
    G = torch.cat(blocks, dim=1)
    ref = Reference(torch.randn(G.shape[1], generator=g), exact=True)
    chunked, proj = ms._summary(blocks, ref)
    plain = _plain_summary(G, ref.grad)
    for k, v in plain.items():
        assert chunked[k] == pytest.approx(v, rel=1e-12), k
    whole = G.double() @ ms._directions(G.shape[1], "cpu").T
    torch.testing.assert_close(proj, whole, rtol=1e-12, atol=1e-12)
    assert ms.summarise(G, ref) == pytest.approx(chunked, rel=1e-12)


@pytest.mark.parametrize("task_name,est_name,M", [("sst_rationales", "gumbel_softmax", 32),
                                                   ("categorical_vae", "reinmax", 16),
                                                   ("toy_categorical", "rloo", 64)])
def test_second_stage_projections_through_tangents_are_the_estimates_projections(task_name, est_name, M):
    """<J w_k, g_m> (the tangents' path: no estimate w.r.t. the network is formed) equals
    <w_k, J^T g_m> (projecting the M full estimates) on the same draws, to float32 rounding, on
    a nonlinear encoder, an MLP encoder and a toy whose parameters are the logits."""
    task = tasks.get(task_name)
    task.setup("cpu", torch.Generator().manual_seed(0))
    est = estimators.get(est_name)
    batch = task.measure_batch()
    with ms.isolated_rng(7, task.device):
        G, n_full, _ = ms.gradient_estimates(task, est, batch, 6, M)
    tangents = ms._TangentsAt(ms._directions(G.shape[1], "cpu"))
    with ms.isolated_rng(7, task.device):
        proj, n_tan = ms._projected_estimates(task, est, batch, 6, M, tangents,
                                              ms.EvaluationCounter())
    assert not tangents.unavailable  # the fast path was taken
    whole = ms.projections(G)
    assert float((proj - whole).abs().max()) <= 1e-5 * float(whole.abs().max())
    assert n_tan == n_full


def test_second_stage_without_double_backward_projects_whole_estimates(monkeypatch):
    """Where the graph has no double backward the second stage falls back to projecting the
    estimates themselves, with the same figures."""
    task = tasks.get("toy_binary", t=0.45)
    task.setup("cpu", torch.Generator().manual_seed(0))
    est = estimators.get("gumbel_softmax")
    # declared unbiased here, so that its rejection (a bias 3x its noise floor) is re-tested
    monkeypatch.setattr(type(est), "unbiased", True)
    fast = ms.measure(task, est, 12, 64, seed=3)

    def no_double_backward(*args, **kwargs):
        raise RuntimeError("derivative for some op is not implemented")

    monkeypatch.setattr(ms, "direction_tangents", no_double_backward)
    slow = ms.measure(task, est, 12, 64, seed=3)
    assert fast["bias_test_samples"] == slow["bias_test_samples"] == 64 * ms.BIAS_RECHECK_FACTOR
    assert slow["bias_z"] == pytest.approx(fast["bias_z"], rel=1e-6)
    assert slow["bias_p"] == pytest.approx(fast["bias_p"], rel=1e-4, abs=1e-300)


@pytest.mark.parametrize("task_name,est_name", [("sst_rationales_structured", "sparsemap"),
                                                ("toy_categorical", "exact"),
                                                ("liu_toy", "exact"),  # its two rows differ by 9e-8
                                                ("toy_binary", "spigot")])
def test_a_deterministic_estimator_is_measured_from_two_estimates(monkeypatch, task_name, est_name):
    """Two estimates standing for M give the figures of M computed ones, to the float32 rounding
    of a batch of 2 against one of M (the exact enumeration's bias *is* that rounding)."""
    task = tasks.get(task_name)
    task.setup("cpu", torch.Generator().manual_seed(0))
    est = estimators.get(est_name)
    assert est.deterministic
    fast = ms.measure(task, est, 12, 64, seed=1)
    monkeypatch.setattr(type(est), "deterministic", False)
    full = ms.measure(task, est, 12, 64, seed=1)
    assert fast.keys() == full.keys()
    scale = full["ref_norm"] * 1e-6  # float32 rounding of the reference's size
    absolute = {"bias": scale, "bias_noise": scale, "grad_error": scale**2, "variance": scale**2,
                "bias_z": 0.1, "bias_p": 1e-3}
    for k, v in full.items():
        if math.isfinite(v):
            assert fast[k] == pytest.approx(v, rel=1e-6, abs=absolute.get(k, 0.0)), k


def test_a_random_estimator_declared_deterministic_fails_its_measurement():
    """The harness checks the declaration: RLOO declared deterministic is caught."""
    class Liar(estimators.get_class("rloo")):
        deterministic = True

    task = tasks.get("toy_binary")
    task.setup("cpu", torch.Generator().manual_seed(0))
    with pytest.raises(DeclarationError, match="declared deterministic"):
        ms.measure(task, Liar(), 12, 64, seed=0)


def test_a_deterministic_estimators_second_stage_reuses_its_estimate(monkeypatch):
    """SparseMAP on binary_vae at its start: zero variance, but the sampled reference's own noise
    leaves the first stage inconclusive, so the test runs on 16 M estimates -- the same one 16 M
    times, as computing them gives (to float64 rounding across batch sizes)."""
    task = tasks.get("binary_vae")
    task.setup("cpu", torch.Generator().manual_seed(0))
    est = estimators.get("sparsemap")
    monkeypatch.setattr(type(est), "unbiased", True)  # so that the second stage runs at all
    fast = ms.measure(task, est, 6, 8, seed=2)
    monkeypatch.setattr(type(est), "deterministic", False)
    full = ms.measure(task, est, 6, 8, seed=2)
    assert fast["bias_test_samples"] == full["bias_test_samples"] == 8 * ms.BIAS_RECHECK_FACTOR
    for k in ("bias_z", "bias_p", "bias", "cosine"):
        assert fast[k] == pytest.approx(full[k], rel=1e-5), k
