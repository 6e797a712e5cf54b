#!/usr/bin/env bash
# The ReinMax paper's categorical VAE at 8x4, as its source ran it (estbench run --budget
# published): all 60,000 training images, 160 epochs of 100 (96,000 steps), each of the five
# methods of the published table at its own Table 8 settings, seeds 0 and 1 (more: pass --seeds).
# About 20 minutes of training a cell on one CPU core here (Gumbel-Rao with its 100 conditional
# draws: about 50); resumable like every run (finished cells are kept), so the set can grow over
# several sessions.  Then the report, whose "Against the published figures" section puts every
# method beside the published figure.
set -euo pipefail
cd "$(dirname "$0")/.."
source results/require_clean_source.sh
require_clean_source make_paper_8x4.sh
estbench run --tasks categorical_vae --budget published \
    --estimators gumbel_rao,reinmax,straight_through,st_gumbel,gst \
    --seeds 0,1 -j 2 --out results/paper/categorical_vae_8x4 --quiet "$@" || status=$?
if [ "${status:-0}" -gt 1 ]; then exit "$status"; fi
estbench report results/paper/categorical_vae_8x4
