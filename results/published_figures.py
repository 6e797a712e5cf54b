"""The published figures of a protocol's as-published mode, computed from the source's raw logs.

    python results/published_figures.py [LOGS]            print the ``values`` block
    python results/published_figures.py [LOGS] --check    compare with tasks/protocols/categorical_vae.yml

LOGS (default ``../shared/data/published/reinmax_vae_8x4``) holds the per-seed logs of the public
reproduction of the ReinMax MNIST-VAE table (danielwang0452/DiscreteNumericalMethodsASC at
62697d1, ``results/results_seed{s}_{method}_cat8_lat4_*.txt``): one comma-separated row per epoch,
whose first six columns its ``run.py`` writes as train_loss, train_bce, train_kld, test_loss,
test_bce, test_kld.  A method's figure is the mean over seeds of the last row's train_loss
(column 0: the training -ELBO, the mean over the last epoch's minibatches) or test_loss (column
3: the single-sample test -ELBO), with its standard error (the sample standard deviation, ddof 1,
over sqrt(seeds)).  Only the figures are committed, never the logs.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

#: the source's method names -> ours
METHODS = {"st": "straight_through", "gumbel": "st_gumbel", "rao_gumbel": "gumbel_rao",
           "gst-1.0": "gst", "reinmax": "reinmax"}
#: figure -> column of the source's log
COLUMNS = {"train_neg_elbo": 0, "test_neg_elbo": 3}
EPOCHS = 160
_NAME = re.compile(r"results_seed(\d+)_(.+)_cat(\d+)_lat(\d+)_opt(\w+)_lr([\d.e-]+)_temp([\d.]+)\.txt")


def read(logs: Path) -> dict:
    """{our estimator: {figure: [mean, se, seeds]}} from the last row of every seed's log."""
    last: dict = {}
    for path in sorted(logs.glob("results_seed*.txt")):
        m = _NAME.fullmatch(path.name)
        if not m or m.group(2) not in METHODS:
            continue
        rows = np.loadtxt(path, delimiter=",", ndmin=2)
        if rows.shape[0] != EPOCHS:
            raise SystemExit(f"{path}: {rows.shape[0]} epochs, expected {EPOCHS}")
        last.setdefault(METHODS[m.group(2)], []).append(rows[-1])
    if not last:
        raise SystemExit(f"{logs}: no logs named results_seed*_<method>_cat*_lat*_*.txt")
    out = {}
    for est, rows in last.items():
        a = np.array(rows)
        out[est] = {fig: [round(float(a[:, col].mean()), 4),
                          round(float(a[:, col].std(ddof=1) / np.sqrt(len(a))), 4), len(a)]
                    for fig, col in COLUMNS.items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="?", default="../shared/data/published/reinmax_vae_8x4")
    ap.add_argument("--check", action="store_true",
                    help="compare with the values of tasks/protocols/categorical_vae.yml")
    args = ap.parse_args(argv)
    logs = Path(args.logs)
    if not logs.is_dir():
        print(f"no such folder: {logs}", file=sys.stderr)
        return 2
    values = read(logs)
    if not args.check:
        print("    values:")
        for est in METHODS.values():
            if est in values:
                print(f"      {est}: {{" + ", ".join(f"{k}: {v}" for k, v in values[est].items()) + "}")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from estbench.engine import protocols

    pub = protocols.as_published("categorical_vae").published
    stored = {e: {f: list(v) for f, v in figs.items()} for e, figs in pub.values.items()}
    if stored != values:
        print(f"the protocol's figures differ from {logs}:\n  stored {stored}\n  logs   {values}",
              file=sys.stderr)
        return 1
    print(f"the protocol's figures match {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
