#!/usr/bin/env bash
# The dgm4nlp SST notebook's run, as it ran it (estbench run --budget published): REINFORCE with
# a running-mean baseline, 5 seeds, at the notebook's two reported points -- after 3,410 updates
# (its epoch 9, its peak) and 6,820 (its epoch 19, its last): the first run is cut at 3,410 steps
# (its training is the full run's up to there).  About 30 s of training a cell on one CPU core.
# Then the report, with its "Against the published figures" section.
set -euo pipefail
cd "$(dirname "$0")/.."
source results/require_clean_source.sh
require_clean_source make_paper_sst.sh
for steps in 3410 6820; do
    estbench run --tasks sst_rationales --budget published --steps "$steps" --seeds 0,1,2,3,4 \
        --out results/paper/sst_rationales --quiet "$@" || status=$?
    if [ "${status:-0}" -gt 1 ]; then exit "$status"; fi
done
estbench report results/paper/sst_rationales
