#!/usr/bin/env bash
# Reproduce (or resume: finished cells are kept) the committed reference run and its report.
# Quick budget, every task x every compatible estimator x 3 seeds, CPU, two worker processes.
set -euo pipefail
cd "$(dirname "$0")/.."
estbench run --tasks toy_binary,liu_toy,toy_categorical,toy_gaussian,binary_vae,sst_rationales_categorical,sst_rationales,text_vae,sst_rationales_structured \
    --seeds 0,1,2 -j 2 --out results/reference --quiet
estbench report results/reference
