#!/usr/bin/env bash
# The checks that need a GPU, in one short run (a few minutes), for whenever one is at hand:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the CUDA tests (they skip cleanly without a GPU elsewhere);
# 2. the per-step overhead of the estimator API against handwritten torch steps, on CUDA;
# 3. the batched measurement pass against a loop of estimates, and the harness's recorded step time
#    against the bare estimator step (benchmarks/harness_step.py), on CUDA;
# 4. one quick-budget cell per real task on CUDA (step time with torch.cuda.synchronize, end to end);
# 5. text_vae's paper protocol (dgm4nlp SentVAE_Solutions.ipynb) cut to 200 of its 13,140 steps with
#    reparam, a short final evaluation (400 test sentences, 50 importance samples): the step time
#    (times 13,140: a paper cell's training) and the validation ELBO beside the notebook's at step 200;
# 6. each model's training step against a bare chain of its matrix products (benchmarks/step_flops.py);
# 7. k seeds' steps stacked with torch.func against one after the other (benchmarks/stacked_seeds.py):
#    on a CPU core 1.1x at 8 seeds; on a GPU, where these models are launch-bound, the question.
# (The CUDA tests include a snapshot set made on the CPU and probed on CUDA: tests/test_probe.py.)
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
# 5. the text_vae paper budget, cut short (the protocol's model, batch 64, Adam 1e-3, dropout 0.4)
start=$SECONDS
estbench run --device cuda --seeds 0 --quiet --out "$out/text_vae_paper" --budget paper \
    --tasks 'text_vae[test_sentences=400]' --estimators reparam --steps 200 --checkpoints 2 \
    --measure-samples 16 --eval-points 3 --cell-timeout 300 2>&1 | tee "$out/text_vae_paper.txt" | tail -7 || status=1
python - "$out/text_vae_paper/results.parquet" $((SECONDS - start)) <<'PY' 2>&1 | tee -a "$out/text_vae_paper.txt" || status=1
import sys
import pandas as pd
d = pd.read_parquet(sys.argv[1])
v = lambda m, s=200: float(d[(d.metric == m) & (d.step == s)].value.iloc[0])
st = v("step_time")
print(f"text_vae paper protocol, 200 steps on CUDA: {st * 1e3:.1f} ms a step, so {st * 13140 / 3600:.2f} h "
      f"of training for the 13,140 steps of a paper cell; the whole cut-down cell took {sys.argv[2]} s")
print("validation ELBO (all 3,370 sentences, one sample) at steps 0 / 100 / 200: "
      + " / ".join(f"{v('elbo', s):.2f}" for s in (0, 100, 200)))
print("  the notebook (cell 22) printed -134.28 (KL 3.47) at step 100 and -128.24 (3.77) at step 200,"
      " i.e. ELBOs of -141.22 and -135.78 (its printed 'ELBO' is the ELBO + 2 KL)")
print(f"400 test sentences, 50 importance samples: ELBO {v('final_elbo'):.2f}, KL {v('test_kl'):.2f}, "
      f"NLL {v('test_nll'):.2f}, perplexity {v('test_ppl_is'):.1f} (bound {v('test_ppl_elbo'):.1f})")
PY
# 6. how far each model's step is from the GPU's limit for its matrix products
python benchmarks/step_flops.py --device cuda --steps 20 --rounds 3 2>&1 | tee "$out/step_flops_cuda.txt" || status=1
# 7. stacked seeds
python benchmarks/stacked_seeds.py --device cuda --seeds 1,4,16,64 --steps 10 --rounds 3 2>&1 \
    | tee "$out/stacked_seeds_cuda.txt" || status=1
echo "figures in $out"
exit $status
