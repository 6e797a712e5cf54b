#!/usr/bin/env bash
# The committed snapshot sets (results/snapshots/<task>): each task's parameters at K points of one
# training trajectory, trained once by a declared driver, at which 'estbench probe' measures every
# estimator (results/make_probe.sh).  A set already present is kept (delete its folder to remake
# it); 'estbench snapshots --check SET' rebuilds one from its manifest and compares.
#
# Drivers: on the toys the exact gradient ('exact', whose trajectory is plain gradient ascent on the
# true objective, shaped by no estimator's bias or noise) where it can enumerate; else an unbiased
# estimator: 'rloo' (poly_toy) and, for Gaussian latents, 'reparam' (its noise tiny beside the
# score-function estimators').
set -euo pipefail
cd "$(dirname "$0")/.."
source results/require_clean_source.sh
require_clean_source make_snapshots.sh
OUT=results/snapshots

build() {  # build NAME TASK DRIVER WHY [estbench snapshots options...]
    local name=$1 task=$2 driver=$3 why=$4
    shift 4
    if [ -f "$OUT/$name/manifest.json" ]; then
        echo "$OUT/$name: kept (delete the folder to remake it)"
        return
    fi
    estbench snapshots "$task" --driver "$driver" --why "$why" --out "$OUT/$name" --quiet "$@"
}

EXACT="the exact gradient: plain gradient ascent on the true objective, shaped by no estimator's bias or noise"
for toy in toy_binary toy_categorical liu_toy; do
    build "$toy" "$toy" exact "$EXACT" --budget standard --snapshots 6
done
build poly_toy poly_toy rloo \
    "unbiased (its 2^128 configurations rule the exact gradient out): in expectation it follows the true gradient, shaped by no estimator's bias" \
    --budget standard --snapshots 6
build toy_gaussian toy_gaussian reparam \
    "unbiased, and its noise tiny beside the score-function estimators' (no exact gradient for Gaussian latents)" \
    --budget standard --snapshots 6
