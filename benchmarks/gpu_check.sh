#!/usr/bin/env bash
# The checks that need a GPU, in one short run (a few minutes), for whenever one is at hand:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the CUDA tests (they skip cleanly without a GPU elsewhere);
# 2. the per-step overhead of the estimator API against handwritten torch steps, on CUDA;
# 3. the batched measurement pass against a loop of estimates, and the harness's recorded step time
#    against the bare estimator step (benchmarks/harness_step.py), on CUDA;
# 4. one quick-budget cell per real task on CUDA (step time with torch.cuda.synchronize, end to end).
# Figures go to OUT_DIR (default benchmarks/results/gpu-<date>); quote them with the GPU's name.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}"
mkdir -p "$out"
status=0
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" \
    | tee "$out/device.txt" || exit 1
python -m pytest -q -p no:cacheprovider -m cuda 2>&1 | tee "$out/pytest_cuda.txt" | tail -3 || status=1
python benchmarks/overhead.py --device cuda --reps 100 --warmup 10 --out "$out/overhead_cuda.csv" \
    2>&1 | tee "$out/overhead_cuda.txt" | tail -25 || status=1
python benchmarks/measure_speedup.py --device cuda --M 256 --repeat 3 2>&1 | tee "$out/measure_cuda.txt" || status=1
# the harness's recorded step time against the bare step, every estimator, on the two VAEs
python benchmarks/harness_step.py --device cuda --tasks binary_vae,text_vae --steps 50 --rounds 3 \
    --estimators "$(python -c 'import estimators; print(",".join(estimators.available()))')" \
    2>&1 | tee "$out/harness_step_cuda.txt" || status=1
estbench run --device cuda --seeds 0 --quiet --out "$out/cells" \
    --tasks binary_vae,text_vae,sst_rationales --estimators reparam,rloo,disarm,gumbel_softmax \
    --cell-timeout 300 2>&1 | tee "$out/cells.txt" | tail -25 || status=1
echo "figures in $out"
exit $status
