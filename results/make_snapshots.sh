#!/usr/bin/env bash
# The committed snapshot sets (results/snapshots/<task>): each task's parameters at K points of one
# training trajectory, trained once by a declared driver, at which 'estbench probe' measures every
# estimator (results/make_probe.sh).  A set already present is kept (delete its folder to remake
# it); 'estbench snapshots --check SET' rebuilds one from its manifest and compares.
#
# Drivers: on the toys the exact gradient ('exact', whose trajectory is plain gradient ascent on the
# true objective, shaped by no estimator's bias or noise) where it can enumerate; else an unbiased
# estimator: 'rloo' (poly_toy) and, for Gaussian latents, 'reparam' (its noise tiny beside the
# score-function estimators').  The real tasks: an unbiased driver where one affords the budget here
# (disarm, rloo, exact over sentence positions, reparam), and on categorical_vae the trajectory of
# the ReinMax reproduction's own gradient study (ReinMax at temperature 1.0 trains, every method is
# scored on its models), so that the published cosines can be put beside ours.  The real tasks'
# paper budgets (10^6 steps on binary_vae, 13,140 of ~1 s on text_vae) are out of reach on this
# 2-core machine: their sets span what one core trains in minutes, said in each manifest.  Large
# models are stored in float16 and their start is rebuilt from the seed (--rebuild-start), to keep
# every committed set together under 50 MB.  The probe takes as many estimates a snapshot as the
# quick budget's trajectory view (--measure-samples: 256 on the toys, 64 on the real tasks), so
# that a full probe of every estimator fits in 10 minutes at -j 2.
#
# usage: bash results/make_snapshots.sh [NAME ...]   (default: every set; names select some, so two
# can be built side by side on two cores)
set -euo pipefail
cd "$(dirname "$0")/.."
source results/require_clean_source.sh
require_clean_source make_snapshots.sh
OUT=results/snapshots
ONLY=" $* "

build() {  # build NAME TASK DRIVER WHY [estbench snapshots options...]
    local name=$1 task=$2 driver=$3 why=$4
    shift 4
    if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then
        return
    fi
    if [ -f "$OUT/$name/manifest.json" ]; then
        echo "$OUT/$name: kept (delete the folder to remake it)"
        return
    fi
    estbench snapshots "$task" --driver "$driver" --why "$why" --out "$OUT/$name" --quiet "$@"
}

EXACT="the exact gradient: plain gradient ascent on the true objective, shaped by no estimator's bias or noise"
for toy in toy_binary toy_categorical liu_toy; do
    build "$toy" "$toy" exact "$EXACT" --budget standard --snapshots 6 --measure-samples 256
done
build poly_toy poly_toy rloo \
    "unbiased (its 2^128 configurations rule the exact gradient out): in expectation it follows the true gradient, shaped by no estimator's bias" \
    --budget standard --snapshots 6 --measure-samples 256
build toy_gaussian toy_gaussian reparam \
    "unbiased, and its noise tiny beside the score-function estimators' (no exact gradient for Gaussian latents)" \
    --budget standard --snapshots 6 --measure-samples 256

# --- the real tasks ---
build categorical_vae "categorical_vae[binarize=none,training_images=60000,lr=0.0005]" "reinmax[temperature=1.0]" \
    "the ReinMax reproduction's gradient study trains ReinMax (temperature 1.0, Adam 5e-4, batch 100, all 60,000 images) and scores every method on its models; a biased driver, chosen to put the published figures beside ours: the sets of the toys measure how far a driver moves the probe's ranking" \
    --budget published --steps 30000 --at 0,600,6000,30000 --n-samples 6 --measure-samples 64 --dtype float16 --rebuild-start
build binary_vae binary_vae disarm \
    "unbiased (its 2^200 configurations rule the exact gradient out); 30,000 of the standard budget's 10^6 steps, what one core trains in minutes" \
    --budget standard --steps 30000 --at 0,3000,10000,30000 --measure-samples 64 --dtype float16 --rebuild-start
SST_WHY="unbiased: in expectation it follows the true gradient, shaped by no estimator's bias"
build sst_rationales sst_rationales rloo "$SST_WHY" \
    --budget standard --snapshots 3 --measure-samples 64 --dtype float16 --rebuild-start
build sst_rationales_structured sst_rationales_structured rloo "$SST_WHY" \
    --budget standard --snapshots 3 --measure-samples 64 --dtype float16 --rebuild-start
build sst_rationales_categorical sst_rationales_categorical exact \
    "the exact gradient (one latent position per sentence, enumerated): gradient ascent on the true objective" \
    --budget standard --snapshots 3 --measure-samples 64 --dtype float16 --rebuild-start
build text_vae text_vae reparam \
    "unbiased, and its noise tiny beside the score-function estimators'; 1,200 of the standard budget's 26,280 steps" \
    --budget standard --steps 1200 --at 0,400,1200 --dtype float16 --rebuild-start
