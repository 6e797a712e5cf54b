#!/usr/bin/env bash
# The paper-like ("standard") budget of the SST rationale tasks, which is cheap enough for a CPU
# (5340 steps = 20 epochs; 1-3 min per cell here): a few representative estimators x 3 seeds.
# Resumable like every run (finished cells are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
estbench run --tasks sst_rationales --estimators rloo,nvil,disarm,straight_through \
    --seeds 0,1,2 --budget standard --out results/standard "$@"
estbench run --tasks sst_rationales_categorical --estimators exact,rloo \
    --seeds 0,1,2 --budget standard --out results/standard "$@"
estbench report results/standard
