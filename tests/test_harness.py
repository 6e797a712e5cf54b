"""The harness: measurement, training cells, the store, tasks' contract."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import estimators
import tasks
from pathlib import Path
from estbench.engine import store
from estbench.core.budget import Budget
from estbench.core.errors import Diverged
from estbench.engine.measure import gradient_estimates, measure, summarise
from estbench.core.spec import SpecError, parse, parse_list
from estbench.engine.train import Cell, run_cell
from tasks import Reference

from estbench.engine.problems import Z_TOL, budget_for

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available")])
DEVICES = ["cpu", CUDA]
TOYS = [n for n in tasks.available() if getattr(tasks.get_class(n), "in_default_run", False)]


def setup_task(name, device="cpu", seed=0, **opts):
    t = tasks.get(name, **opts)
    t.setup(torch.device(device), torch.Generator().manual_seed(seed))
    return t


# ---- tasks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOYS)
def test_toy_reference_matches_brute_force(name):
    """The closed-form reference of each toy equals enumeration (discrete) or exact reparam (Gaussian)."""
    t = setup_task(name)
    ref = t.reference_gradient(t.measure_batch())
    assert ref.exact
    prob = t.problem(None)
    if t.family == "gaussian":
        # an unbiased reparameterisation estimate with many samples, within 4.5 standard errors
        torch.manual_seed(0)
        G, *_ = gradient_estimates(t, estimators.get("reparam"), None, 64, 4000)
        mean, se = G.mean(0), G.std(0) / math.sqrt(G.shape[0])
        assert ((mean - ref.grad).abs() <= Z_TOL * se).all()
    else:
        e = estimators.get("exact").estimate(prob.dist, prob.f, 1)
        g = tasks.flat_grad(e.surrogate, t.estimated_parameters())
        torch.testing.assert_close(g, ref.grad, rtol=1e-4, atol=1e-6)
        assert t.evaluate() == pytest.approx(float(e.value), rel=1e-5)


@pytest.mark.slow
def test_liu_toy_exact_gradient_and_unbiased_estimators():
    """Liu et al. (2019): theta = 0, p = (0.6, 0.51, 0.48): the exact gradient is -0.0450, and every
    unbiased estimator's mean matches it within 4.5 standard errors."""
    t = setup_task("liu_toy")
    ref = t.reference_gradient(None)
    assert float(ref.grad) == pytest.approx(-0.0450, abs=1e-6)
    torch.manual_seed(7)
    for name in estimators.available("bernoulli"):
        est = estimators.get(name)
        if not est.unbiased:
            continue
        G, *_ = gradient_estimates(t, est, None, budget_for(est, dist=t.problem(None).dist), 4000)
        mean, se = float(G.mean()), float(G.std() / math.sqrt(G.shape[0]))
        assert abs(mean - (-0.045)) <= max(Z_TOL * se, 1e-6), f"{name}: {mean} +- {se}"


def test_task_registry_errors():
    with pytest.raises(ValueError, match="unknown task 'toy_binry'; did you mean toy_binary"):
        tasks.get("toy_binry")
    with pytest.raises(ValueError, match="task 'toy_binary' has no option T; its options are: dim, t"):
        tasks.get("toy_binary", T=0.4)
    assert tasks.get("toy_binary", t="0.499").config["t"] == 0.499
    assert set(TOYS) >= {"toy_binary", "toy_categorical", "toy_gaussian"}
    assert tasks.skipped() == {}


# ---- measurement ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("task_name", ["toy_binary", "toy_categorical", "toy_gaussian"])
@pytest.mark.slow
def test_batched_measurement_equals_loop_in_distribution(task_name, device):
    """The one-pass M replicas give the same mean/variance as M separate estimate+backward calls."""
    t = setup_task(task_name, device)
    est = estimators.get("reinforce")
    torch.manual_seed(0)
    Gb, *_ = gradient_estimates(t, est, None, 4, 3000, batched=True)
    torch.manual_seed(1)
    Gl, *_ = gradient_estimates(t, est, None, 4, 3000, batched=False)
    assert Gb.shape == Gl.shape and Gb.device.type == device
    se = torch.sqrt(Gb.var(0) / 3000 + Gl.var(0) / 3000)
    assert ((Gb.mean(0) - Gl.mean(0)).abs() <= Z_TOL * se).all()
    # the variances (trace of the covariance) agree within the sampling error of a sample variance:
    # tr Cov = E||g - mean||^2, estimated by the mean of d_i = ||g_i - mean||^2 (the unbiased
    # M/(M-1) form); Var(d) is the 4th-moment term (mu_4 - sigma^4 for one coordinate), so the
    # estimate's standard error is std(d)/sqrt(M) -- no normality assumed (REINFORCE's g is skewed)
    def trace_var(G):
        d = (G - G.mean(0)).square().sum(1)
        M = G.shape[0]
        return d.mean() * M / (M - 1), d.std() / math.sqrt(M)
    (vb, sb), (vl, sl) = trace_var(Gb), trace_var(Gl)
    z = float((vb - vl) / torch.hypot(sb, sl))
    assert abs(z) < Z_TOL, f"variances {float(vb):.4g} (batched) vs {float(vl):.4g} (loop): z = {z:.2f}"


def test_summarise_known_values():
    G = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    ref = Reference(torch.tensor([1.0, 0.0]), exact=True)
    m = summarise(G, ref)
    assert m["bias"] == pytest.approx(1.0)  # mean (2, 0) vs (1, 0)
    assert m["variance"] == pytest.approx(2.0)  # var of (1, 3) with ddof=1
    assert m["cosine"] == pytest.approx(1.0)
    assert m["snr"] == pytest.approx(2 / math.sqrt(2))
    assert m["bias_noise"] == pytest.approx(1.0)  # sqrt(2 / 2)


def test_harness_measures_bias_of_biased_estimators():
    """On toy_categorical (non-linear f) relaxations show a bias far above the noise floor; unbiased
    estimators' bias stays within a few noise floors."""
    t = setup_task("toy_categorical")
    for name in ["gumbel_softmax", "st_gumbel"]:
        m = measure(t, estimators.get(name), 4, 2000, seed=0)
        assert m["bias"] > 5 * m["bias_noise"], (name, m)
    for name in ["reinforce", "rloo"]:
        m = measure(t, estimators.get(name), 4, 2000, seed=0)
        assert m["bias"] < 3 * m["bias_noise"], (name, m)
    m = measure(t, estimators.get("exact"), 4, 8, seed=0)
    assert m["bias"] < 1e-5 and m["variance"] < 1e-10


def test_measurement_does_not_touch_training_state():
    t = setup_task("toy_binary")
    est = estimators.get("reinforce_ema")
    before = est.base.avg.clone()
    state = torch.random.get_rng_state()
    measure(t, est, 4, 64, seed=3)
    assert torch.equal(est.base.avg, before)
    assert torch.equal(torch.random.get_rng_state(), state)


# ---- cells ------------------------------------------------------------------------------------
def _cell(task="toy_binary", est="rloo", seed=0, steps=20, checkpoints=3, n=4, device="cpu"):
    return Cell(task, est, seed, device, Budget(steps=steps, n_samples=n, checkpoints=checkpoints,
                                               measure_samples=32))


def _frame(res):
    return pd.DataFrame(res.records)


@pytest.mark.parametrize("device", DEVICES)
def test_training_curve_identical_with_measurement_on_or_off(device):
    on = run_cell(_cell(checkpoints=5, device=device))
    off = run_cell(_cell(checkpoints=0, device=device))
    assert on.status == off.status == "ok", (on.error, off.error)
    fin = lambda r: _frame(r).set_index("metric").loc["final_elbo", "value"]
    assert fin(on) == fin(off)


def test_cell_records_schema_and_metrics():
    res = run_cell(_cell(steps=10))
    assert res.status == "ok", res.error
    df = _frame(res)
    assert list(df.columns) == ["task", "estimator", "seed", "device", "n_samples", "steps",
                                "step", "metric", "value"]
    metrics = set(df.metric)
    assert {"bias", "variance", "cosine", "snr", "elbo", "final_elbo", "step_time", "n_evals",
            "diverged", "wall_time", "bias_noise"} <= metrics
    assert sorted(df[df.metric == "bias"].step) == [0, 5, 10]
    assert not df.duplicated(["step", "metric"]).any()
    assert df.set_index("metric").loc["diverged", "value"] == 0.0


def test_same_seed_same_result_different_seed_different():
    a, b, c = run_cell(_cell(seed=1)), run_cell(_cell(seed=1)), run_cell(_cell(seed=2))
    va = _frame(a).query("metric == 'final_elbo'").value.item()
    assert va == _frame(b).query("metric == 'final_elbo'").value.item()
    assert va != _frame(c).query("metric == 'final_elbo'").value.item()


@pytest.mark.slow
def test_every_estimator_trains_on_a_compatible_toy():
    """Same budget, every estimator, no estimator-specific code: each cell finishes or fails clearly."""
    for name in estimators.available():
        fam = sorted(estimators.get_class(name).families)[0]
        task = {"bernoulli": "toy_binary", "categorical": "toy_categorical",
                "gaussian": "toy_gaussian"}[fam]
        t = setup_task(task)
        n = budget_for(estimators.get(name), dist=t.problem(None).dist)
        res = run_cell(_cell(task, name, steps=5, checkpoints=2, n=n))
        assert res.status == "ok", f"{name} on {task}: {res.error}"


class _Exploding(estimators.Estimator):
    """Test-only estimator whose surrogate becomes NaN after two steps (not registered by name)."""

    families = frozenset({"bernoulli"})
    paper = "none"
    calls = 0

    def _estimate(self, dist, f, n, context, family):
        _Exploding.calls += 1
        logits = estimators.families.params(dist)["logits"]
        s = logits.sum() * (float("nan") if _Exploding.calls > 2 else 1.0)
        return estimators.Estimate(s, torch.zeros(dist.batch_shape), n)


def test_divergence_is_recorded_not_raised(monkeypatch):
    _Exploding.name = "exploding_test_only"
    monkeypatch.setitem(estimators.base.REGISTRY.classes, "exploding_test_only", _Exploding)
    _Exploding.calls = 0
    res = run_cell(_cell(est="exploding_test_only", steps=10, checkpoints=0))
    assert res.status == "diverged"
    assert "non-finite" in res.error
    df = _frame(res)
    assert df.set_index("metric").loc["diverged", "value"] == 1.0
    # the flag is read every few steps, yet the first bad step is the one reported
    assert "at step 2" in res.error


class _NanGradient(estimators.Estimator):
    """A finite surrogate whose gradient is not finite from its third call on (test only): the
    square root of |logits - logits| is 0 with an infinite derivative."""
    families = frozenset({"bernoulli"})
    unbiased = False
    paper = "test only"
    calls = 0

    def _estimate(self, dist, f, n, context, family):
        _NanGradient.calls += 1
        logits = estimators.families.params(dist)["logits"]
        s = logits.sum() * 1e-3
        if _NanGradient.calls > 2:
            s = s + (logits - logits.detach()).abs().sqrt().sum()
        return estimators.Estimate(s, torch.zeros(dist.batch_shape), n)


def test_a_non_finite_gradient_under_a_finite_surrogate_is_a_divergence(monkeypatch):
    """Gradients are not tested per step (a pass over them was 7% of an SST step): the update they
    poison shows at the next step, whose surrogate is not finite (or, for parameters the surrogate
    does not read, at the next check of the parameters)."""
    _NanGradient.name = "nan_gradient_test_only"
    monkeypatch.setitem(estimators.base.REGISTRY.classes, "nan_gradient_test_only", _NanGradient)
    _NanGradient.calls = 0
    res = run_cell(_cell(est="nan_gradient_test_only", steps=120, checkpoints=0))
    assert res.status == "diverged", res.error
    assert "non-finite surrogate at step 3" in res.error, res.error  # the bad gradient: step 2


def test_an_error_after_the_parameters_went_non_finite_is_a_divergence(monkeypatch):
    """With the divergence flag read every few steps, the step after a NaN may raise (a sampler
    rejecting NaN probabilities): that cell diverged, it did not fail."""
    class Strict(estimators.get_class("reinforce")):
        """REINFORCE that raises on non-finite logits (test only; Williams 1992, Eq. 7)."""
        calls = 0

        def _estimate(self, dist, f, n, context, family):
            Strict.calls += 1
            logits = estimators.families.params(dist)["logits"]
            if not bool(torch.isfinite(logits).all()):
                raise ValueError("logits are not finite")
            e = super()._estimate(dist, f, n, context, family)
            if Strict.calls == 3:
                e.surrogate = e.surrogate * float("nan")
            return e

    Strict.name = "strict_test_only"
    monkeypatch.setitem(estimators.base.REGISTRY.classes, "strict_test_only", Strict)
    res = run_cell(_cell(est="strict_test_only", steps=20, checkpoints=0))
    assert res.status == "diverged", res.error
    assert "at step 2" in res.error


def test_no_host_sync_in_the_training_step(monkeypatch):
    """The step itself never reads a tensor's value on the host (a GPU would wait for it): the
    divergence flag and the training objective stay on the device and are read every
    DIVERGENCE_CHECK_EVERY steps and at checkpoints."""
    from estbench.engine import train

    import sys

    ours = [str(Path(m.__file__).parent) for m in (train, estimators, tasks)]
    reads = {"n": 0}
    for name in ("__bool__", "__float__", "__int__", "item"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, **k):
            # reads made by the harness or the plug-ins (torch.optim's own step counters live on
            # the host even for CUDA parameters: they never sync)
            caller = sys._getframe(1).f_code.co_filename
            if any(caller.startswith(d) for d in ours):
                reads["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    steps = 200
    res = run_cell(Cell("toy_gaussian", "reparam", 0, "cpu", Budget(steps=steps, n_samples=4,
                                                                     checkpoints=0, eval_points=0)))
    assert res.status == "ok", res.error
    # a few reads per DIVERGENCE_CHECK_EVERY steps and at the end, not one or more per step
    assert reads["n"] <= 2 * (steps // train.DIVERGENCE_CHECK_EVERY + 1) + 10, reads["n"]


def test_failures_are_recorded_with_a_clear_message():
    res = run_cell(_cell(est="rloo", n=1))
    assert res.status == "infeasible" and "cannot spend a budget of 1" in res.error
    res = run_cell(_cell(task="toy_gaussian", est="exact"))
    assert res.status == "failed" and "supports" in res.error
    res = run_cell(_cell(task="toy_binary[dim=30]", est="exact", steps=2))
    assert res.status == "infeasible" and "max_configs" in res.error
    if not torch.cuda.is_available():
        res = run_cell(_cell(device="cuda"))
        assert res.status == "failed" and "CUDA is not available" in res.error


# ---- store ------------------------------------------------------------------------------------
def test_store_roundtrip_and_foreign_files(tmp_path):
    res = run_cell(_cell(steps=4))
    store.write_cell(tmp_path, "k1", res)
    (tmp_path / "cells" / "junk.parquet").write_bytes(b"not parquet")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "cells" / "foreign.parquet")
    with pytest.warns(UserWarning) as w:
        records, cells = store.load(tmp_path)
    msgs = " ".join(str(x.message) for x in w)
    assert "junk.parquet" in msgs and "foreign.parquet" in msgs
    assert len(cells) == 1 and cells.iloc[0].status == "ok" and cells.iloc[0].key == "k1"
    pd.testing.assert_frame_equal(records, store.records_frame(res.records))
    assert not list((tmp_path / "cells").glob("*.tmp"))


# ---- specs and budgets ------------------------------------------------------------------------
def test_spec_parsing():
    s = parse("gumbel_softmax[temperature=0.5]")
    assert (s.name, s.options, str(s)) == ("gumbel_softmax", {"temperature": "0.5"}, "gumbel_softmax[temperature=0.5]")
    specs = parse_list("gumbel_softmax[temperature=0.5, x=1],rloo")
    assert [str(x) for x in specs] == ["gumbel_softmax[temperature=0.5,x=1]", "rloo"]
    for bad in ["a[", "a]", "a[b]", "a[=1]", "", "a,,b", "a[x=1,x=2]", "rloo,rloo"]:
        with pytest.raises(SpecError):
            parse_list(bad)


def test_budget_validation_and_checkpoints():
    assert Budget(steps=100, checkpoints=3).checkpoint_steps() == [0, 50, 100]
    assert Budget(steps=10, checkpoints=0).checkpoint_steps() == []
    assert Budget(steps=0, checkpoints=3).checkpoint_steps() == [0]
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        Budget(n_samples=0)
    with pytest.raises(ValueError, match="measure_samples must be >= 2"):
        Budget(measure_samples=1)


def test_store_keeps_the_latest_version_of_a_cell(tmp_path):
    """A folder extended after a code change holds two versions of one cell: load keeps the newer."""
    old, new = run_cell(_cell(steps=4, seed=5)), run_cell(_cell(steps=4, seed=5))
    new.records = [{**r, "value": -1.0} if r["metric"] == "final_elbo" else r for r in new.records]
    store.write_cell(tmp_path, "old", old)
    store.write_cell(tmp_path, "new", new)
    records, cells = store.load(tmp_path)
    assert list(cells.key) == ["new"]
    assert records.query("metric == 'final_elbo'").value.tolist() == [-1.0]
    records_all, cells_all = store.load(tmp_path, latest_only=False)
    assert len(cells_all) == 2


@pytest.mark.slow
def test_a_cell_does_not_depend_on_earlier_cells_in_the_process():
    """RELAX initialises its network in __init__: the draw must come from the cell's seed, so the
    same cell gives the same record whatever ran before it (serial vs parallel sweeps)."""
    relax = Cell("toy_binary", "relax", 2, "cpu", Budget(steps=100, n_samples=12, checkpoints=0))
    first = _frame(run_cell(relax)).query("metric == 'final_elbo'").value.item()
    for name in ["reinforce", "gumbel_softmax", "disarm"]:
        run_cell(Cell("toy_binary", name, 0, "cpu", Budget(steps=100, n_samples=12, checkpoints=0)))
    torch.rand(1000)
    again = _frame(run_cell(relax)).query("metric == 'final_elbo'").value.item()
    assert first == again


def test_the_divergence_watch_checks_the_parameters_at_each_check():
    """A parameter the surrogate does not read (a decoder's, say) poisoned by a non-finite
    gradient: found at the next check, with the steps between which it happened."""
    from estbench.engine.train import DivergenceWatch

    params = [torch.zeros(3), torch.ones(2)]
    watch = DivergenceWatch(torch.device("cpu"), params)
    watch.note(7, torch.tensor(1.0))
    watch.check(50)  # all finite
    params[1][0] = float("inf")
    with pytest.raises(Diverged, match="non-finite parameters after the update of a step from 50 to 100"):
        watch.check(100)
    watch = DivergenceWatch(torch.device("cpu"), [torch.zeros(1)])
    watch.note(3, torch.tensor(float("nan")))
    watch.note(4, torch.tensor(float("nan")))
    with pytest.raises(Diverged, match="non-finite surrogate at step 3"):
        watch.check(50)
