"""Overhead of estbench's estimator API over a plain handwritten torch version of the same estimator.

    python benchmarks/overhead.py [--device cpu] [--reps 200] [--warmup 20] [--out benchmarks/results/overhead.csv]
                                  [--problems toy,vae,tiny] [--estimators reinforce,rloo,...] [--threads 1]

For every (problem, estimator) pair two training steps are timed on identical models (same init,
same n_samples, same seeds):

* handwritten: sample, f, surrogate, backward, optimiser step, written inline with plain torch and
  vectorised, the way a researcher would write the estimator into their training loop;
* estbench:    dist = Independent(Bernoulli(logits=...), 1);
               e = estimators.get(name).estimate(dist, f, n, context);
               (-(e.surrogate + analytic)).backward(); opt.step(); est.update().

The two steps are timed alternately (one handwritten step, one estbench step, order flipped every
repetition) so that a change of machine load hits both; the table reports the median per-step time of
each and ratio = median(estbench) / median(handwritten) (goal: <= 1.15).  Before timing, each pair is
checked to produce the same gradients on every model parameter over a few steps when both consume
the same random draws (torch.manual_seed before each step), so the timing compares like with like.

Problems (built here with plain torch, independent of tasks/):
  toy   the binary toy: D=200 Bernoulli logits (a Parameter), f(z) = -sum_d (z_d - 0.499)^2, batch_shape ().
  tiny  the same toy with D=10 (float64), only for 'exact' (2^10 configurations).
  vae   a small binary VAE step: 64 random binary 784-dim vectors (fixed seed), linear encoder 784->200
        logits, linear decoder 200->784 Bernoulli logits, f(z) = log p(x|z), analytic -KL to a
        Bernoulli(0.5) prior, Adam.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import distributions as D
from torch import nn

import estimators

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "overhead.csv")

#: estimators with a natural handwritten version, and the problems each is compared on
ESTIMATORS = ["reinforce", "reinforce_ema", "rloo", "straight_through", "gumbel_softmax", "st_gumbel",
              "arm", "disarm", "muprop", "vimco", "rebar", "relax", "exact"]
PROBLEMS = ["toy", "vae", "tiny"]
N_SAMPLES = {"rebar": 6, "relax": 6}  # whole triples; everything else uses the default n (4)
LR = 1e-3


# ==== problems ====================================================================================

class Problem:
    """A model whose forward pass gives (logits, f, analytic, context) for one training step.

    ``kind``: "toy" (D=200), "tiny" (D=10) or "vae".  Two instances built with the same seed are
    identical, so the handwritten and the estbench step each train their own copy.
    """

    def __init__(self, kind: str, device="cpu", dtype=None, seed: int = 0):
        self.kind = kind
        device = torch.device(device)
        # tiny (exact) in float64: its gradient is a sum of 1024 cancelling terms, so float32 rounding
        # of two algebraically equal log-probabilities would blur the like-with-like check
        dtype = dtype or (torch.float64 if kind == "tiny" else torch.float32)
        g = torch.Generator().manual_seed(seed)
        if kind in ("toy", "tiny"):
            D_ = 200 if kind == "toy" else 10
            self.logits = nn.Parameter((0.1 * torch.randn(D_, generator=g, dtype=dtype)).to(device))
            self.params = [self.logits]
            self.x = None
        elif kind == "vae":
            self.x = torch.bernoulli(torch.full((64, 784), 0.3, dtype=dtype), generator=g).to(device)
            self.enc = nn.Linear(784, 200).to(dtype)
            self.dec = nn.Linear(200, 784).to(dtype)
            with torch.no_grad():  # explicit init from the generator, independent of the global RNG
                for lin in (self.enc, self.dec):
                    bound = 1.0 / math.sqrt(lin.in_features)
                    lin.weight.copy_(torch.rand(lin.weight.shape, generator=g, dtype=dtype) * 2 * bound - bound)
                    lin.bias.copy_(torch.rand(lin.bias.shape, generator=g, dtype=dtype) * 2 * bound - bound)
            self.enc.to(device)
            self.dec.to(device)
            self.params = list(self.enc.parameters()) + list(self.dec.parameters())
        else:
            raise ValueError(f"unknown problem {kind!r}; choose from {PROBLEMS}")
        self.opt = torch.optim.Adam(self.params, lr=LR)

    def forward(self):
        """(logits, f, analytic, context); f maps (n, *batch, D) -> (n, *batch), to be maximised."""
        if self.x is None:
            return self.logits, _toy_f, None, None
        x, dec = self.x, self.dec
        logits = self.enc(x)

        def f(z):  # log p(x | z) with Bernoulli(logits = dec(z)) outputs
            o = dec(z)
            return (x * o - F.softplus(o)).sum(-1)

        # -KL(Bernoulli(sigmoid(l)) || Bernoulli(1/2)), summed over the batch and latents
        p = torch.sigmoid(logits)
        neg_kl = -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits) + math.log(2.0)).sum()
        return logits, f, neg_kl, x


def _toy_f(z):
    return -((z - 0.499) ** 2).sum(-1)


# ==== handwritten estimators ======================================================================
# Each takes (logits, f, n, context, state) and returns the surrogate whose gradient is the estimate
# (to be ascended); `state` is a dict the step keeps between calls (baselines, learned parts).

def _log_q(logits, z):
    return -F.binary_cross_entropy_with_logits(logits.expand_as(z), z, reduction="none").sum(-1)


def _sample(logits, n):
    p = torch.sigmoid(logits.detach())
    return torch.bernoulli(p.expand(n, *p.shape))


def hw_reinforce(logits, f, n, ctx, st):
    z = _sample(logits, n)
    fz = f(z)
    return (fz.detach() * _log_q(logits, z) + fz).mean(0).sum()


def hw_reinforce_ema(logits, f, n, ctx, st, decay=0.9):
    z = _sample(logits, n)
    fz = f(z)
    b = st.get("b", 0.0)
    surrogate = ((fz.detach() - b) * _log_q(logits, z) + fz).mean(0).sum()
    m = fz.detach().mean()
    st["b"] = m if "b" not in st else decay * st["b"] + (1 - decay) * m
    return surrogate


def hw_rloo(logits, f, n, ctx, st):
    z = _sample(logits, n)
    fz = f(z)
    fd = fz.detach()
    signal = fd - (fd.sum(0) - fd) / (n - 1)
    return (signal * _log_q(logits, z) + fz).mean(0).sum()


def hw_straight_through(logits, f, n, ctx, st):
    p = torch.sigmoid(logits)
    hard = torch.bernoulli(p.detach().expand(n, *p.shape))
    return f(hard + p - p.detach()).mean(0).sum()


def _concrete(logits, n, t=1.0):
    eps = torch.finfo(logits.dtype).eps
    u = torch.rand(n, *logits.shape, dtype=logits.dtype, device=logits.device).clamp(eps, 1 - eps)
    return torch.sigmoid((logits + u.log() - (-u).log1p()) / t)


def hw_gumbel_softmax(logits, f, n, ctx, st):
    return f(_concrete(logits, n)).mean(0).sum()


def hw_st_gumbel(logits, f, n, ctx, st):
    y = _concrete(logits, n)
    return f((y > 0.5).to(y.dtype) + y - y.detach()).mean(0).sum()


def _pairs(logits, n):
    m = n // 2
    lg = logits.detach()
    u = torch.rand(m, *lg.shape, dtype=lg.dtype, device=lg.device)
    p = torch.sigmoid(lg)
    return m, u, (u < p).to(lg.dtype), (1 - u < p).to(lg.dtype)


def hw_arm(logits, f, n, ctx, st):
    m, u, b, bt = _pairs(logits, n)
    fz = f(torch.cat([b, bt]))
    fd = fz.detach()
    g = ((fd[m:] - fd[:m]).unsqueeze(-1) * (u - 0.5)).mean(0)
    return (g * logits).sum() + fz.mean(0).sum()


def hw_disarm(logits, f, n, ctx, st):
    m, u, b, bt = _pairs(logits, n)
    fz = f(torch.cat([b, bt]))
    fd = fz.detach()
    w = (1 - 2 * bt) * (b != bt) * torch.sigmoid(logits.detach().abs())
    g = (0.5 * (fd[:m] - fd[m:]).unsqueeze(-1) * w).mean(0)
    return (g * logits).sum() + fz.mean(0).sum()


def hw_muprop(logits, f, n, ctx, st):
    mu = torch.sigmoid(logits)
    mu0 = mu.detach().requires_grad_(True)
    z = torch.bernoulli(mu.detach().expand(n - 1, *mu.shape))
    out = f(torch.cat([mu0.unsqueeze(0), z]))
    f_mu, fz = out[0], out[1:]
    (df,) = torch.autograd.grad(f_mu.sum(), mu0, retain_graph=True)
    signal = fz.detach() - f_mu.detach() - (df * (z - mu0.detach())).sum(-1)
    return (signal * _log_q(logits, z) + fz).mean(0).sum() + (df * mu).sum()


def hw_vimco(logits, f, n, ctx, st):
    z = _sample(logits, n)
    fz = f(z)
    fd = fz.detach()
    L = torch.logsumexp(fd, 0) - math.log(n)
    table = fd.unsqueeze(0).repeat(n, *([1] * fd.dim()))  # row j: f with f_j replaced by the others' mean
    idx = torch.arange(n, device=fd.device)
    table[idx, idx] = (fd.sum(0) - fd) / (n - 1)
    L_minus = torch.logsumexp(table, 1) - math.log(n)
    return ((L - L_minus) * _log_q(logits, z)).sum(0).sum() + (torch.logsumexp(fz, 0) - math.log(n)).sum()


def _hw_rebar_relax(logits, f, n, ctx, st, relax: bool):
    """REBAR (Tucker et al. 2017) / RELAX (Grathwohl et al. 2018) for Bernoulli logits, with eta,
    log-temperature (and RELAX's r-network) trained on the single-sample variance proxy sum g^2."""
    if "eta" not in st:
        dev = logits.device
        st["eta"] = torch.tensor(1.0, device=dev, requires_grad=True)
        st["log_t"] = torch.tensor(math.log(0.5), device=dev, requires_grad=True)
    n = n // 3
    eps = torch.finfo(logits.dtype).eps
    u = torch.rand(n, *logits.shape, dtype=logits.dtype, device=logits.device).clamp(eps, 1 - eps)
    v = torch.rand(n, *logits.shape, dtype=logits.dtype, device=logits.device).clamp(eps, 1 - eps)
    z = logits + u.log() - (-u).log1p()
    b = (z > 0).to(z.dtype).detach()
    lv = v.log() - (-v).log1p()
    zt = torch.where(b > 0.5, F.softplus(lv + F.softplus(logits)), -F.softplus(lv + F.softplus(-logits)))
    eta, t = st["eta"], st["log_t"].exp()
    fz = f(torch.cat([b, torch.sigmoid(z / t), torch.sigmoid(zt / t)]))
    f_b, f_z, f_zt = fz[:n], fz[n:2 * n], fz[2 * n:]
    c_z, c_zt = eta * f_z, eta * f_zt
    if relax:
        def r_in(w):
            x = w.reshape(n, *logits.shape[:-1], -1)
            if ctx is not None:
                x = torch.cat([x, ctx.expand(n, *ctx.shape)], -1)
            return x
        x_z = r_in(z)
        if "r" not in st:  # built on first use (the input width is known only then)
            hidden = nn.Linear(x_z.shape[-1], 32)
            out = nn.Linear(32, 1)
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            st["r"] = nn.Sequential(hidden, nn.Tanh(), out).to(logits.device)
        c_z = c_z + st["r"](x_z).squeeze(-1)
        c_zt = c_zt + st["r"](r_in(zt)).squeeze(-1)
    phi = [st["eta"], st["log_t"]] + (list(st["r"].parameters()) if relax else [])
    (g_path,) = torch.autograd.grad((c_z - c_zt).mean(0).sum(), logits, create_graph=True, retain_graph=True)
    g = ((f_b.detach() - c_zt).unsqueeze(-1) * (b - torch.sigmoid(logits.detach()))).mean(0) + g_path
    for p, gp in zip(phi, torch.autograd.grad((g ** 2).sum(), phi, retain_graph=True)):
        p.grad = gp if p.grad is None else p.grad + gp
    if "opt" not in st:
        st["opt"] = torch.optim.Adam(phi, lr=1e-2)
    return (g.detach() * logits).sum() + f_b.mean(0).sum()


def hw_rebar(logits, f, n, ctx, st):
    return _hw_rebar_relax(logits, f, n, ctx, st, relax=False)


def hw_relax(logits, f, n, ctx, st):
    return _hw_rebar_relax(logits, f, n, ctx, st, relax=True)


def hw_exact(logits, f, n, ctx, st):
    if "configs" not in st:  # every configuration of the D bits, enumerated once
        D_ = logits.shape[-1]
        idx = torch.arange(2 ** D_, device=logits.device)
        st["configs"] = ((idx[:, None] >> torch.arange(D_ - 1, -1, -1, device=logits.device)) & 1).to(logits.dtype)
    z = st["configs"]
    return (_log_q(logits, z).exp() * f(z)).sum()


HANDWRITTEN: dict[str, Callable] = {name: globals()[f"hw_{name}"] for name in ESTIMATORS}


# ==== the two training steps ======================================================================

class HandwrittenStep:
    def __init__(self, problem: Problem, name: str, n: int):
        self.problem, self.fn, self.n, self.state = problem, HANDWRITTEN[name], n, {}

    def __call__(self):
        pb = self.problem
        pb.opt.zero_grad(set_to_none=True)
        logits, f, analytic, ctx = pb.forward()
        surrogate = self.fn(logits, f, self.n, ctx, self.state)
        loss = -(surrogate + analytic) if analytic is not None else -surrogate
        loss.backward()
        pb.opt.step()
        if "opt" in self.state:  # learned control-variate parameters
            self.state["opt"].step()
            self.state["opt"].zero_grad(set_to_none=True)


class EstbenchStep:
    """``validate_args=False`` builds the distribution the way estbench's own tasks do (tasks/toys.py,
    tasks/binary_vae.py); ``None`` keeps torch's default argument/sample validation, which the
    handwritten step does not pay for."""

    def __init__(self, problem: Problem, name: str, n: int, validate_args: Optional[bool] = False, **options):
        self.problem, self.n, self.validate_args = problem, n, validate_args
        self.est = estimators.get(name, **options).to(next(iter(problem.params)).device)

    def __call__(self):
        pb = self.problem
        pb.opt.zero_grad(set_to_none=True)
        logits, f, analytic, ctx = pb.forward()
        dist = D.Independent(D.Bernoulli(logits=logits, validate_args=self.validate_args), 1)
        e = self.est.estimate(dist, f, self.n, ctx)
        loss = -(e.surrogate + analytic) if analytic is not None else -e.surrogate
        loss.backward()
        pb.opt.step()
        self.est.update()


def n_samples_for(name: str, n: int = 4, n_triple: int = 6) -> int:
    return n_triple if name in N_SAMPLES else n


def problems_for(name: str) -> list[str]:
    return ["tiny"] if name == "exact" else ["toy", "vae"]


def make_pair(kind: str, name: str, device="cpu", n: Optional[int] = None, seed: int = 0,
              validate_args: Optional[bool] = False):
    n = n_samples_for(name) if n is None else n
    return (HandwrittenStep(Problem(kind, device, seed=seed), name, n),
            EstbenchStep(Problem(kind, device, seed=seed), name, n, validate_args=validate_args))


# ==== like-with-like check ========================================================================

def gradient_check(kind: str, name: str, device="cpu", steps: int = 3, seed: int = 0) -> float:
    """Largest relative difference between the two steps' gradients over ``steps`` training steps,
    with torch.manual_seed(seed + k) before step k of each (both consume the same random draws).
    The optimiser steps run too, so stateful parts (moving averages, learned control variates,
    Adam moments) are compared along the way."""
    hw, eb = make_pair(kind, name, device)
    worst = 0.0
    for k in range(steps):
        grads = []
        for step in (hw, eb):
            torch.manual_seed(seed + k)
            step()
            grads.append(torch.cat([p.grad.reshape(-1) for p in step.problem.params]))
        scale = grads[0].abs().max().clamp_min(1e-12)
        worst = max(worst, float((grads[0] - grads[1]).abs().max() / scale))
    return worst


# ==== timing ======================================================================================

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pair(a: Callable, b: Callable, reps: int = 200, warmup: int = 20, device="cpu"):
    """Per-step times (s) of ``a`` and ``b``, timed alternately (order flipped every repetition)."""
    device = torch.device(device)
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for i in range(reps):
        order = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for fn, out in order:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
    return ta, tb


def run(problems=PROBLEMS, names=ESTIMATORS, device="cpu", reps=200, warmup=20, check=True,
        verbose=True, validate_args: Optional[bool] = False) -> list[dict]:
    available = set(estimators.available("bernoulli"))
    rows = []
    if verbose:
        print(f"{'problem':<6} {'estimator':<17} {'n':>2} {'hand ms':>9} {'estbench ms':>11} {'ratio':>6} "
              f"{'grad rel diff':>13}", flush=True)
    for kind in problems:
        for name in names:
            if kind not in problems_for(name):
                continue
            if name not in available:
                if verbose:
                    print(f"{kind:<6} {name:<17} skipped: not registered ({estimators.skipped()})")
                continue
            diff = gradient_check(kind, name, device) if check else float("nan")
            hw, eb = make_pair(kind, name, device, validate_args=validate_args)
            torch.manual_seed(1234)
            ta, tb = timed_pair(hw, eb, reps, warmup, device)
            mh, me = statistics.median(ta), statistics.median(tb)
            row = dict(problem=kind, estimator=name, n_samples=hw.n, device=str(device), reps=reps,
                       validate_args=bool(validate_args is None or validate_args),
                       handwritten_ms=1e3 * mh, estbench_ms=1e3 * me, ratio=me / mh,
                       handwritten_min_ms=1e3 * min(ta), estbench_min_ms=1e3 * min(tb),
                       grad_max_rel_diff=diff, threads=torch.get_num_threads(), torch=torch.__version__)
            rows.append(row)
            if verbose:
                flag = "  <-- over 1.15" if row["ratio"] > 1.15 else ""
                print(f"{kind:<6} {name:<17} {hw.n:>2} {row['handwritten_ms']:>9.3f} {row['estbench_ms']:>11.3f} "
                      f"{row['ratio']:>6.3f} {diff:>13.2e}{flag}", flush=True)
    return rows


def write_csv(rows: list[dict], path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=200, help="timed steps of each version")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--no-check", action="store_true", help="skip the gradient-equality check")
    ap.add_argument("--validate-args", action="store_true",
                    help="build the estbench distribution with torch's default validation (slower; estbench's "
                         "tasks pass validate_args=False)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="CSV output path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.problems.split(","), args.estimators.split(","), args.device, args.reps, args.warmup,
               check=not args.no_check, validate_args=None if args.validate_args else False)
    if rows:
        write_csv(rows, args.out)
        print(f"wrote {args.out}")
    over = [r for r in rows if r["ratio"] > 1.15]
    if over:
        print("over 1.15x: " + ", ".join(f"{r['problem']}/{r['estimator']} ({r['ratio']:.2f}x)" for r in over))
    return 0


if __name__ == "__main__":
    sys.exit(main())
