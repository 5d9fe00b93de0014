#!/usr/bin/env bash
# The GPU figures of docs/results.md: benchmarks/gpu_throughput.py over a few SFT set-ups on a
# Qwen3-VL-shaped model with random weights (the first also measures rollouts). One JSON per set-up
# goes to $1 (default gpu-results/), the printed figures to $1/gpu_suite.log; then
#   prism-pipeline report ... --gpu gpu-results/*.json
# docs/gpu/ holds the files of the run that docs/results.md reports (H100, torch 2.11, transformers 5.24);
# docs/gpu/h200/ the samplers and the compiled SFT step on an H200 (torch 2.11, transformers 5.17).
set -u
out=${1:-gpu-results}
mkdir -p "$out"
log="$out/gpu_suite.log"
python - <<'PY' 2>&1 | tee -a "$log"
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
PY
run() {
    local name=$1; shift
    echo "== $name: $*" | tee -a "$log"
    timeout "${SUITE_TIMEOUT:-180}" python benchmarks/gpu_throughput.py --out "$out/$name.json" "$@" 2>&1 \
        | grep -v -i warn | tee -a "$log"
}
run 1.7b-chunked --size 1.7b --batch 8 --seq 2048                                # prism-sft's default loss
run 1.7b-rollouts --size 1.7b --skip-sft --backends native,hf,native+compile     # the three samplers
run 1.7b-full    --size 1.7b --batch 8 --seq 2048 --loss full --skip-rollout     # the model's full logits
run 1.7b-long    --size 1.7b --batch 2 --seq 8192 --skip-rollout                 # long responses
run 4b-ckpt      --size 4b   --batch 8 --seq 2048 --checkpointing --skip-rollout # a 4B policy, checkpointed
run 1.7b-compile --size 1.7b --batch 8 --seq 2048 --compile --skip-rollout       # model.compile=true
run 1.7b-b4      --size 1.7b --batch 4 --seq 2048 --skip-rollout                 # half the batch
