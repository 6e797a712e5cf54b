"""Baselines for score-function estimators, as separate composable pieces.

A baseline ``b`` is subtracted from ``f(z)`` in the learning signal of REINFORCE.  It leaves the
estimator unbiased as long as ``b`` does not depend on the sample it is paired with, because
E_q[b * grad log q(z)] = b * grad sum_z q(z) = 0; it reduces variance when ``b`` tracks E[f].

Each baseline maps ``(fz, context)`` -- ``fz`` of shape ``(n, *batch_shape)`` -- to a tensor that
broadcasts against ``fz``, computed only from information that is independent of each sample's own
``z``.  :meth:`Baseline.observe` updates the baseline's state *after* it has been used, so the
baseline of a step only ever depends on earlier steps.  ``aux_loss`` returns a term whose gradient
trains a learned baseline (and nothing else: its inputs are detached).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class Baseline(nn.Module):
    def forward(self, fz: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, fz: torch.Tensor, signal: torch.Tensor) -> None:
        """Update state from this step's detached f-values and learning signal (after use)."""

    def aux_loss(self, fz: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return fz.new_zeros(())


class MovingAverage(Baseline):
    """b = exponential moving average of the mean f over *previous* calls (0 before the first).

    Being a function of the past only, it is independent of the current samples, so unbiased.
    """

    def __init__(self, decay: float):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"moving-average decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("avg", torch.zeros(()))
        # a Python flag, not a buffer: reading a device tensor's value would sync the GPU each step
        self.seen = False

    def forward(self, fz, context):
        # a copy: observe() updates the buffer in place after use
        return self.avg.to(fz.dtype).clone()

    @torch.no_grad()
    def observe(self, fz, signal):
        m = fz.detach().mean().to(self.avg.dtype)
        if not self.seen:
            self.avg.copy_(m)
            self.seen = True
        else:
            self.avg.lerp_(m, 1 - self.decay)


class LeaveOneOut(Baseline):
    """b_i = mean of the other n-1 samples' f-values of the same batch element (Kool et al. 2019).

    Independent of z_i because the samples are i.i.d.; only samples of one batch element are mixed.
    """

    def forward(self, fz, context):
        n = fz.shape[0]
        if n < 2:
            raise ValueError("a leave-one-out baseline needs at least 2 samples")
        fz = fz.detach()
        return (fz.sum(0, keepdim=True) - fz) / (n - 1)


class LearnedBaseline(Baseline):
    """An input-dependent baseline b_psi(x) (Mnih & Gregor 2014, Sec. 3.2).

    With a context (e.g. encoder features, detached so that the baseline never feeds gradient into
    the encoder) it is a one-hidden-layer MLP; without context it is one learned constant.  It is
    fitted by least squares to the (centred) f-values: ``aux_loss`` = -sum_b mean_n (f - c - b)^2,
    added to the surrogate, so that ascending the surrogate descends the squared error.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.const = nn.Parameter(torch.zeros(()))

    def forward(self, fz, context):
        batch_shape = fz.shape[1:]
        if context is None:
            return self.const.expand(batch_shape)
        ctx = context.detach()
        if tuple(ctx.shape[: len(batch_shape)]) != tuple(batch_shape):
            raise ValueError(
                f"context of shape {tuple(ctx.shape)} does not start with the batch shape {tuple(batch_shape)}"
            )
        ctx = ctx.reshape(*batch_shape, -1).to(fz.dtype)
        return self.net(ctx).squeeze(-1) + self.const

    def aux_loss(self, target, b):
        return -((target.detach() - b) ** 2).mean(0).sum()
