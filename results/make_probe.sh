#!/usr/bin/env bash
# The committed probe (results/probe): every estimator measured at every committed snapshot set
# (results/snapshots, made by results/make_snapshots.sh), no training, and its report with the
# section "At shared parameters".  Resumable like every run (finished cells are kept); a cell's key
# covers the code that computes it and the set's manifest.  'estbench rank' reuses its cells.
set -euo pipefail
cd "$(dirname "$0")/.."
source results/require_clean_source.sh
require_clean_source make_probe.sh
estbench probe results/snapshots -j 2 --out results/probe --quiet "$@" || status=$?
# exit status 1: some cells failed; each is recorded with its reason and listed in the report
if [ "${status:-0}" -gt 1 ]; then exit "$status"; fi
estbench report results/probe
