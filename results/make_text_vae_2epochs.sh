#!/usr/bin/env bash
# text_vae with reparam for 2 of the standard budget's 20 epochs (2628 steps of 32 sentences; the
# standard budget's other settings), one seed: about 50 min on one CPU core.  The full 20 epochs
# (--budget standard) take about 5 h per cell on a CPU: run those on a GPU with --device cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
# the evaluation and measurement sizes these figures were made with (the quick defaults then)
estbench run --tasks "text_vae[val_size=200,test_sentences=500,is_samples=10,measure_size=8,ref_chunks=16,ref_chunk_samples=16]" \
    --estimators reparam --seeds 0 --budget standard --steps 2628 \
    --checkpoints 3 --out results/text_vae_2epochs "$@"
estbench report results/text_vae_2epochs
