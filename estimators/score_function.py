"""Score-function (REINFORCE) estimators: the plain one and its baselines.

The core is one pure function, :func:`score_function_surrogate`; each estimator below is that
function composed with a baseline from :mod:`estimators.baselines` (NVIL = score function + a learned
input-dependent baseline + signal normalisation), as in pyro and deepmind/mc_gradients.
"""
from __future__ import annotations

import torch
from torch.distributions import constraints

from .base import Estimate, Estimator, Option, check_f_output
from . import families as fam
from .baselines import LearnedBaseline, LeaveOneOut, MovingAverage

ALL = frozenset({"bernoulli", "categorical", "gaussian"})


def score_function_surrogate(dist, z, fz, signal):
    """sum_b mean_n [ stopgrad(L_n) * log q(z_n) + f(z_n) ].

    Its gradient w.r.t. q's parameters is the score-function estimate mean_n L_n grad log q(z_n)
    (Williams 1992, Eq. 7; Glynn 1990) since ``z`` is detached; the ``f(z_n)`` term gives any
    parameters inside f (a decoder) their pathwise gradient and contributes nothing to q's.
    """
    logp = fam.log_prob(dist, z.detach())
    return (signal.detach() * logp + fz).mean(0).sum()


class _ScoreFunction(Estimator):
    """Shared body: sample without gradient, evaluate f, form the learning signal, build surrogate."""

    families = ALL
    unbiased = True

    def baseline(self, fz, context):
        return None

    def _estimate(self, dist, f, n, context, family):
        z = dist.sample((n,))
        fz = check_f_output(f(z), n, dist.batch_shape, self.name)
        signal, extra = self.learning_signal(fz.detach(), context)
        surrogate = score_function_surrogate(dist, z, fz, signal)
        if extra is not None:  # e.g. the least-squares term that trains a learned baseline
            surrogate = surrogate + extra
        return Estimate(surrogate, fz.detach().mean(0), n)

    def learning_signal(self, fz, context):
        """(learning signal, extra surrogate term or None) from detached f-values."""
        return fz, None


class Reinforce(_ScoreFunction):
    """REINFORCE without a baseline (Williams 1992, "Simple statistical gradient-following
    algorithms", Eq. 7): grad E[f] ~ mean_n f(z_n) grad log q(z_n).  Unbiased, high variance; its
    variance grows with the square of any constant offset of f.  Spends n evaluations."""

    name = "reinforce"
    paper = "Williams (1992), Machine Learning 8:229-256, Eq. 7"


class ReinforceEMA(_ScoreFunction):
    """REINFORCE with an exponential-moving-average baseline of past f-values (Williams 1992 Sec. 4;
    the constant baseline of Mnih & Gregor 2014).  Unbiased because the baseline only depends on
    earlier steps; removes the offset of f, not its input-dependent part."""

    name = "reinforce_ema"
    paper = "Williams (1992), Sec. 4 (reinforcement baseline); Mnih & Gregor (2014), Sec. 3.2"
    options = {"decay": Option(0.9, "decay of the moving average",
                               constraint=constraints.half_open_interval(0.0, 1.0))}

    def __init__(self, **options):
        super().__init__(**options)
        self.base = MovingAverage(self.config["decay"])

    def learning_signal(self, fz, context):
        signal = fz - self.base(fz, context)
        self.base.observe(fz, signal)
        return signal, None


class RLOO(_ScoreFunction):
    """REINFORCE leave-one-out (Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE samples, get a
    baseline for free!", Eq. 8): sample i's baseline is the mean of the other n-1 f-values of the
    same data point, i.e. signal_i = n/(n-1) (f_i - mean_j f_j).  Unbiased; needs n >= 2."""

    name = "rloo"
    paper = "Kool, van Hoof & Welling (2019), ICLR DeepRLStructPred workshop, Eq. 8"
    min_samples = 2

    def __init__(self, **options):
        super().__init__(**options)
        self.base = LeaveOneOut()

    def learning_signal(self, fz, context):
        return fz - self.base(fz, context), None


class NVIL(_ScoreFunction):
    """Neural variational inference and learning (Mnih & Gregor 2014, Sec. 3.2-3.3).

    Learning signal l = f(z) - b_psi(x) - c, where b_psi is a learned input-dependent baseline fed
    with ``context`` (a constant without context) and c a running mean of f - b_psi (Eq. 9-10).
    With ``normalise=True`` (the paper's variance normalisation) l is divided by max(1, sigma), sigma a
    running estimate of its standard deviation: this keeps the gradient's *direction* unbiased but
    rescales it, so the estimator is flagged ``unbiased=False`` in that (default) setting.  The
    baseline is fitted by least squares through an extra surrogate term that touches only psi.
    """

    name = "nvil"
    paper = "Mnih & Gregor (2014), Neural variational inference and learning in belief networks, ICML, Sec. 3"
    options = {
        "hidden": Option(100, "hidden units of the baseline MLP on the context",
                         constraint=constraints.positive_integer),
        "decay": Option(0.8, "decay of the running mean/variance of the learning signal",
                        constraint=constraints.half_open_interval(0.0, 1.0)),
        "normalise": Option(True, "divide the signal by max(1, running std) (biases the magnitude)"),
    }
    inner_lr = 1e-3

    def __init__(self, **options):
        super().__init__(**options)
        self.unbiased = not self.config["normalise"]
        self.base = LearnedBaseline(self.config["hidden"])
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))
        self.seen = False  # a Python flag: reading a device tensor would sync the GPU every step

    def learning_signal(self, fz, context):
        b = self.base(fz, context)
        centred = fz - self.mean.to(fz.dtype)
        signal = (centred - b).detach()
        if self.config["normalise"]:
            signal = signal / torch.clamp(self.var.to(fz.dtype).sqrt(), min=1.0)
        with torch.no_grad():
            # the statistics are updated after use, so the current step's signal only uses the past
            a = self.config["decay"]
            raw = (fz - b).detach()
            m, v = raw.mean(), raw.var(unbiased=False) if raw.numel() > 1 else raw.new_zeros(())
            if not self.seen:
                self.mean.copy_(m)
                self.var.copy_(torch.clamp(v, min=1.0))
                self.seen = True
            else:
                self.mean.lerp_(m.to(self.mean.dtype), 1 - a)
                self.var.lerp_(v.to(self.var.dtype), 1 - a)
        return signal, self.base.aux_loss(centred, b)
