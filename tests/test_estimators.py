"""The generic estimator suite: every registered estimator, every family it supports.

Nothing here names an estimator: a new plug-in is covered the moment it registers.  Statistical
checks use fixed seeds and a tolerance of Z_TOL (4.5) standard errors of the Monte Carlo mean on
every coordinate (per-coordinate two-sided false-alarm rate ~7e-6; estbench/engine/problems.py says
why).  The fast tier (`-m "not slow"`) runs them for the estimators of FAST_SAMPLE only.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

import estimators
from estimators import FamilyError

from estbench.engine import contract
from estbench.engine.problems import Z_TOL, budget_for, estimates, problem, z_scores

M_STAT = 4000

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available")])
DEVICES = ["cpu", CUDA]

PAIRS = [(name, fam) for name in estimators.available()
         for fam in sorted(estimators.get_class(name).families)]
UNBIASED = [(n, f) for n, f in PAIRS if estimators.get(n).unbiased]
BIASED = [(n, f) for n, f in PAIRS if not estimators.get(n).unbiased]
ids = lambda pairs: [f"{n}-{f}" for n, f in pairs]
#: the statistical checks (M = 4000 estimates each) of these run in the fast tier (`-m "not slow"`),
#: the rest only in the full suite
FAST_SAMPLE = {"reinforce", "rloo", "gumbel_softmax"}


def sampled(pairs):
    """``pairs`` as parameters, those of estimators outside FAST_SAMPLE marked slow."""
    return [pytest.param(n, f, id=f"{n}-{f}", marks=() if n in FAST_SAMPLE else pytest.mark.slow)
            for n, f in pairs]


def test_registry_lists_the_core_estimators():
    names = estimators.available()
    assert names == sorted(names)
    for core in ["exact", "reinforce", "reinforce_ema", "rloo", "nvil", "straight_through",
                 "gumbel_softmax", "st_gumbel", "reparam"]:
        assert core in names
    assert estimators.skipped() == {}
    assert set(estimators.available("gaussian")) >= {"reparam", "reinforce"}
    assert "reparam" not in estimators.available("bernoulli")


@pytest.mark.parametrize("name", estimators.available())
def test_declarations(name):
    """What the registry does not already enforce (it keys classes by a lower_snake_case ``name``,
    refuses unknown families and only holds Estimator subclasses, so asserting those here could
    never fail): the declarations `estbench rank` checks, a citation with a year (but for an
    oracle), budget units, and defaults that are valid values of their own options and display as
    the bare name."""
    cls = estimators.get_class(name)
    assert contract.check_declarations(cls) == []
    if not cls.oracle:  # a reference (exact enumeration) has no paper to date
        assert re.search(r"\b(19|20)\d\d\b", cls.paper), f"{name}: `paper` should give the year: {cls.paper!r}"
    assert cls.__doc__ and len(cls.__doc__) > 40, f"{name} needs a docstring citing paper and equation"
    for attr in ("sample_unit", "min_samples"):
        v = getattr(cls, attr)
        assert isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name}.{attr} = {v!r}"
    assert isinstance(cls.oracle, bool) and isinstance(cls.exceeds_budget, str)
    # every default is a valid value of its option, also as the command line gives it (a string),
    # and a default configuration is displayed (and stored) as the bare name
    defaults = {k: o.default for k, o in cls.options.items()}
    for given in (defaults, {k: str(v) for k, v in defaults.items()}):
        est = estimators.get(name, **given)
        assert est.config == defaults, (name, given, est.config)
        assert est.display_name == name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,family", PAIRS, ids=ids(PAIRS))
def test_contract(name, family, device):
    """Scalar surrogate with a finite gradient, value of batch_shape and detached, everything on the
    distribution's device, n_evals equal to the f-evaluations actually made (estbench.engine.contract)."""
    est = estimators.get(name).to(device)
    assert contract.check_estimate(est, family, device=device) == []


def test_contract_checker_catches_violations():
    """The checker behind test_contract and `estbench rank` reports each kind of violation."""
    class Dishonest(estimators.get_class("reinforce")):
        """Reports fewer evaluations than it makes (test only)."""
        def _estimate(self, dist, f, n, context, family):
            e = super()._estimate(dist, f, n, context, family)
            return estimators.Estimate(e.surrogate, e.value, n - 1)

    class Undetached(estimators.get_class("reinforce")):
        """Returns an attached value (test only)."""
        def _estimate(self, dist, f, n, context, family):
            e = super()._estimate(dist, f, n, context, family)
            return estimators.Estimate(e.surrogate, e.value + 0 * e.surrogate, n)

    class Biased(estimators.get_class("reinforce")):
        """Claims unbiasedness but doubles its estimate (test only)."""
        def _estimate(self, dist, f, n, context, family):
            e = super()._estimate(dist, f, n, context, family)
            return estimators.Estimate(2 * e.surrogate, e.value, n)

    assert "f was evaluated 4 times" in contract.check_estimate(Dishonest(), "bernoulli")[0]
    assert contract.check_estimate(Undetached(), "bernoulli") == ["value must be detached"]
    assert "standard errors from the exact gradient" in contract.check_unbiased(Biased(), "bernoulli")[0]
    assert "not a subclass" in contract.check(int)[0]


@pytest.mark.parametrize("name,family", PAIRS, ids=ids(PAIRS))
def test_bare_distribution_without_independent(name, family):
    """The contract holds for a bare distribution: batch_shape covers every latent cell."""
    prob = problem(family, dtype=torch.float64)
    est = estimators.get(name)
    p = {k: v.detach().clone().requires_grad_() for k, v in prob.params.items()}
    base = prob.make_dist(p).base_dist
    n = budget_for(est, dist=base)
    if family == "categorical":
        f = lambda z: (z * torch.arange(z.shape[-1], dtype=z.dtype)).sum(-1) ** 2
    else:
        f = lambda z: (z - 0.3) ** 2
    e = est.estimate(base, f, n)
    assert tuple(e.value.shape) == tuple(base.batch_shape)
    torch.autograd.grad(e.surrogate, list(p.values()), allow_unused=True)


@pytest.mark.parametrize("offset", [0.0, 50.0], ids=["f", "f+50"])
@pytest.mark.parametrize("name,family", sampled(UNBIASED))
def test_unbiased_matches_exact_gradient(name, family, offset):
    torch.manual_seed(1234)
    prob = problem(family, offset=offset)
    est = estimators.get(name)
    G, e = estimates(est, prob, M_STAT)
    z, diff = z_scores(G, prob.exact)
    worst = z.abs().max().item()
    assert worst < Z_TOL, (
        f"{name} on {family} (offset {offset}): mean estimate deviates from the exact gradient by "
        f"{worst:.2f} standard errors (max |bias| {diff.abs().max().item():.3g})"
    )


@pytest.mark.parametrize("name,family", sampled([p for p in BIASED if p[0] != "nvil"]))
def test_biased_estimators_show_their_bias(name, family):
    """Theory: relaxations and straight-through are biased for an f non-linear in z."""
    torch.manual_seed(99)
    prob = problem(family)
    est = estimators.get(name)
    G, _ = estimates(est, prob, M_STAT)
    z, _ = z_scores(G, prob.exact)
    # twice the unbiased estimators' tolerance: far beyond chance (ReinMax's second-order
    # correction leaves a smaller bias than straight-through's, 12 standard errors here)
    assert z.abs().max().item() > 2 * Z_TOL, f"{name} is declared biased but matches the exact gradient"


def test_nvil_normalisation_rescales_and_is_flagged():
    """NVIL's variance normalisation divides the signal by max(1, sigma): direction kept, length not."""
    assert not estimators.get("nvil").unbiased
    assert estimators.get("nvil", normalise=False).unbiased
    prob = problem("bernoulli", offset=5.0)
    est = estimators.get("nvil")
    with torch.no_grad():
        est.var.fill_(16.0)
    est.seen = True
    plain = copy.deepcopy(est)
    plain.config["normalise"] = False
    torch.manual_seed(0)
    G1, _ = estimates(est, prob, 8, 4)
    torch.manual_seed(0)
    G2, _ = estimates(plain, prob, 8, 4)
    torch.testing.assert_close(G1["logits"] * 4.0, G2["logits"])


@pytest.mark.parametrize("name", estimators.available())
def test_wrong_family_is_a_clear_error(name):
    """Every estimator (those of one family and those of all three alike) names itself and its
    families when given a family it does not declare, recognises each family it declares, and
    refuses a distribution outside the three families (an index-valued Categorical instead of a
    OneHotCategorical, a Poisson) before spending any of the budget."""
    declared = estimators.get_class(name).families
    est = estimators.get(name)
    for fam in sorted(estimators.FAMILIES):
        prob = problem(fam, dtype=torch.float32)
        _, dist = prob.replicate(1)
        if fam in declared:
            assert est.check_family(dist) == fam
            continue
        with pytest.raises(FamilyError, match=re.escape(f"'{name}' supports {sorted(declared)}, not '{fam}'")):
            est.estimate(dist, prob.f, 12)
    calls = []
    for dist in (torch.distributions.Categorical(logits=torch.zeros(3, 4)),
                 torch.distributions.Poisson(torch.ones(3))):
        with pytest.raises(FamilyError, match=f"unsupported distribution {type(dist).__name__}"):
            est.estimate(dist, lambda z: calls.append(z) or z.sum(-1), 12)
    assert calls == []  # refused before f was evaluated


def test_reparam_on_bernoulli_names_both():
    prob = problem("bernoulli", dtype=torch.float32)
    _, dist = prob.replicate(1)
    with pytest.raises(FamilyError, match=r"'reparam' supports \['gaussian'\], not 'bernoulli'"):
        estimators.get("reparam").estimate(dist, prob.f, 4)


def test_unsupported_distribution_is_a_clear_error():
    dist = torch.distributions.Poisson(torch.ones(3))
    with pytest.raises(FamilyError, match="unsupported distribution Poisson"):
        estimators.get("reinforce").estimate(dist, lambda z: z, 4)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown estimator 'rlo'; did you mean rloo"):
        estimators.get("rlo")
    with pytest.raises(ValueError, match="has no option temp; its options are: temperature"):
        estimators.get("gumbel_softmax", temp=1)
    with pytest.raises(ValueError, match="temperature='hot' must be of type float"):
        estimators.get("gumbel_softmax", temperature="hot")
    with pytest.raises(ValueError, match="temperature=0.0 must be > 0"):
        estimators.get("gumbel_softmax", temperature=0)
    with pytest.raises(ValueError, match="unknown family"):
        estimators.available("poisson")
    assert estimators.get("gumbel_softmax", temperature="0.5").config["temperature"] == 0.5
    assert estimators.get("gumbel_softmax", temperature=0.5).display_name == "gumbel_softmax[temperature=0.5]"


def test_impossible_budget():
    prob = problem("bernoulli", dtype=torch.float32)
    _, dist = prob.replicate(1)
    with pytest.raises(ValueError, match="'rloo' cannot spend a budget of 1 .* at least 2"):
        estimators.get("rloo").estimate(dist, prob.f, 1)
    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        estimators.get("reinforce").estimate(dist, prob.f, 0)


def test_exact_refuses_huge_enumeration():
    logits = torch.zeros(1, 30)
    dist = torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits), 1)
    with pytest.raises(ValueError, match=r"1073741824 configurations per event exceed max_configs=2048"):
        estimators.get("exact").estimate(dist, lambda z: z.sum(-1), 1)
    small = estimators.get("exact", max_configs=2**4)
    with pytest.raises(ValueError, match="exceed max_configs=16"):
        small.estimate(torch.distributions.Independent(
            torch.distributions.Bernoulli(logits=torch.zeros(5)), 1), lambda z: z.sum(-1), 1)


def test_broken_plugin_is_skipped_not_fatal(tmp_path, monkeypatch):
    """A plug-in module that fails to import is reported in skipped(), and the rest still load."""
    from estbench.core.plugins import Registry
    pkg = tmp_path / "fakeplugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(
        "from estimators.score_function import Reinforce\n"
        "class Mine(Reinforce):\n    name = 'mine_test_only'\n")
    (pkg / "bad.py").write_text("import a_module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    mod = importlib.import_module("fakeplugins")
    reg = Registry("estimator", "fakeplugins", estimators.Estimator, "no.such.group")
    with pytest.warns(UserWarning, match="fakeplugins.bad skipped"):
        reg.load()
    assert "fakeplugins.bad" in reg.skipped()
    assert "No module named 'a_module_that_does_not_exist'" in reg.skipped()["fakeplugins.bad"]
    assert "mine_test_only" in estimators.base.REGISTRY.classes
    estimators.unregister("mine_test_only")


def test_batch_elements_are_independent():
    """Doubling a batch element must not change the other's estimate (no cross-batch mixing)."""
    prob = problem("bernoulli", batch=2)
    for name in estimators.available("bernoulli"):
        est = estimators.get(name)
        p = prob.params["logits"].detach().clone().requires_grad_()
        n = budget_for(est, dist=prob.make_dist({"logits": p}))
        torch.manual_seed(3)
        e1 = est.estimate(torch.distributions.Independent(torch.distributions.Bernoulli(logits=p), 1),
                          prob.f, n)
        (g1,) = torch.autograd.grad(e1.surrogate, p)
        # scale element 1's f by 1000: element 0's gradient must be unaffected
        scale = torch.tensor([1.0, 1000.0], dtype=p.dtype)
        est2 = estimators.get(name)
        torch.manual_seed(3)
        e2 = est2.estimate(torch.distributions.Independent(torch.distributions.Bernoulli(logits=p), 1),
                           lambda z: prob.f(z) * scale, n)
        (g2,) = torch.autograd.grad(e2.surrogate, p)
        if name in ("reinforce_ema", "nvil"):
            continue  # they share a scalar state learned from *past* steps only; first call is clean
        torch.testing.assert_close(g1[0], g2[0], msg=f"{name} mixes batch elements")
