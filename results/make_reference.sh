#!/usr/bin/env bash
# Reproduce (or resume: finished cells are kept) the committed reference run and its report.
# Quick budget, every task x every compatible estimator x 5 seeds, CPU, two worker processes.
set -euo pipefail
cd "$(dirname "$0")/.."
# a reference records the commit that made it: refuse uncommitted changes to the code (changes
# under results/ do not count; remaking deletes the committed cells first)
if git rev-parse --git-dir >/dev/null 2>&1; then
    changes=$(git status --porcelain --untracked-files=no -- . ':(exclude)results')
    if [ -n "$changes" ] && [ -z "${ESTBENCH_ALLOW_DIRTY:-}" ]; then
        echo "make_reference.sh: the source has uncommitted changes; commit them first (or set ESTBENCH_ALLOW_DIRTY=1):" >&2
        echo "$changes" >&2
        exit 2
    fi
fi
estbench run --tasks toy_binary,liu_toy,toy_categorical,toy_gaussian,poly_toy,binary_vae,categorical_vae,sst_rationales_categorical,sst_rationales,text_vae,sst_rationales_structured \
    --seeds 0,1,2,3,4 -j 2 --out results/reference --quiet || status=$?
# exit status 1: some cells failed; each is recorded with its reason and listed in the report
if [ "${status:-0}" -gt 1 ]; then exit "$status"; fi
estbench report results/reference
