#!/usr/bin/env bash
# The ReinMax reproduction's gradient cosine, ours beside the published (results/paper/reinmax_cosine_8x4).
#
# The source (tasks/data/SOURCES.md, published/reinmax_cosine_8x4.csv) trains ReinMax at 8x4 with
# temperature 1.0, Adam 5e-4, batch 100 on all 60,000 images, and scores st, gumbel, rao_gumbel,
# gst-1.0 and reinmax, all at temperature 1.0, on its models after epochs 1, 5, 10, ...: the cosine
# of the mean of 512 single-sample estimates to the exact gradient, w.r.t. the encoder's logits, on
# 100 training images.  Here: the same driver and settings (the trajectory of
# results/snapshots/categorical_vae, whose parameters at 600 and 6,000 steps these snapshots share:
# a test checks it) with a 100-image measurement batch, snapshots after epochs 1, 5 and 10 (600
# updates an epoch), and the five methods at temperature 1.0 (rao_gumbel with the source's 100
# repeats).  Then 'python results/published_cosine.py' prints ours beside the published.
set -euo pipefail
cd "$(dirname "$0")/.."
source results/require_clean_source.sh
require_clean_source make_reinmax_cosine.sh
DIR=results/paper/reinmax_cosine_8x4
if [ ! -f "$DIR/snapshots/manifest.json" ]; then
    estbench snapshots "categorical_vae[binarize=none,training_images=60000,lr=0.0005,measure_size=100]" \
        --driver "reinmax[temperature=1.0]" --budget published --steps 6000 --at 600,3000,6000 \
        --n-samples 1 --measure-samples 64 --figure cosine_of_mean=512 --dtype float16 \
        --why "the source's own driver: ReinMax at temperature 1.0 trains, every method is scored on its models" \
        --out "$DIR/snapshots" --quiet
fi
estbench probe "$DIR/snapshots" -j 2 --out "$DIR/probe" --quiet --estimators \
    "straight_through[temperature=1.0],st_gumbel[temperature=1.0],gumbel_rao[temperature=1.0,k=100],gst[temperature=1.0,gap=1.0],reinmax[temperature=1.0]" \
    || status=$?
if [ "${status:-0}" -gt 1 ]; then exit "$status"; fi
estbench report "$DIR/probe"
python results/published_cosine.py
