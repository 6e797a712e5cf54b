#!/usr/bin/env bash
# Does the driver move the probe's ranking?  The committed toy sets are trained by the exact
# gradient; here the same toys are trained by a *biased* estimator instead (its trajectory shaped
# by its own bias and noise), every estimator is probed at those snapshots, and
# 'python results/probe_agreement.py' puts the two rankings side by side (Kendall's tau).
# The probe budget is the committed toy sets' (256 estimates a snapshot).
# Output: results/driver_neutrality/{snapshots,probe}.  Resumable (a set present is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
source results/require_clean_source.sh
require_clean_source make_driver_neutrality.sh
DIR=results/driver_neutrality
BIASED="a biased driver on purpose: its trajectory, not the true gradient's, decides where every estimator is measured"
build() {  # build TASK DRIVER
    if [ ! -f "$DIR/snapshots/$1/manifest.json" ]; then
        estbench snapshots "$1" --driver "$2" --why "$BIASED" --out "$DIR/snapshots/$1" --quiet \
            --budget standard --snapshots 6 --measure-samples 256
    fi
}
build toy_binary straight_through
build toy_categorical gumbel_softmax
estbench probe "$DIR/snapshots" -j 2 --out "$DIR/probe" --quiet || status=$?
if [ "${status:-0}" -gt 1 ]; then exit "$status"; fi
estbench report "$DIR/probe" > /dev/null
python results/probe_agreement.py
