#!/usr/bin/env bash
# Issue 12 on the nvidia-h200-x2 machine in one call (~6.5 min; budget 8 min after device_env): Llama-3.2-1B
# full depth at TP=1 (two worktree experiments at once, GPU 0 / GPU 1), --tp 2 and --pp 2, bf16 and
# FA_linear_mxfp8, and the DeepSeek-V2-Lite 2-layer cut at --ep 2, all through `megaquant train`; then the
# comparator's summary.
# Schedule, time estimate and checks: benchmarks/multi_gpu.py's docstring. From the repo root on the machine:
#   . benchmarks/device_env.sh && OUT=$OUT bash benchmarks/multi_gpu.sh
# Everything lands in $OUT/multi_gpu.tgz plus $OUT/summary.txt (rewritten after every phase).
# Rehearsal anywhere (prints and dry-runs every command, no GPU): MULTI_GPU_ARGS=--rehearse bash benchmarks/multi_gpu.sh
set -u
# NVLink multicast off, as the lent machines require (the driver sets these for every run too)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:-/tmp/multi-gpu}"; W="${WORK:-/tmp/mq}"; R=/tmp/multi_gpu
mkdir -p "$OUT" "$W" "$R"
T0=$(date +%s)
[ -d "$W/megatron" ] || megaquant instrument --from-installed "$W/megatron" > "$R/setup.log" 2>&1
[ -d "$W/data/dataset" ] || megaquant data prepare --dataset sample --data-root "$W/data" >> "$R/setup.log" 2>&1
nvidia-smi > "$R/nvidia-smi.txt" 2>&1
python3 benchmarks/multi_gpu.py --tree "$W/megatron" --data-root "$W/data" --out "$R" --pack-to "$OUT" \
  --budget-s $(( ${BUDGET_S:-480} - ($(date +%s) - T0) )) ${MULTI_GPU_ARGS:-} 2>&1 | tee "$R/driver.txt"
echo "multi_gpu.sh took $(( $(date +%s) - T0 )) s" >> "$OUT/summary.txt" 2>/dev/null
cat "$OUT/summary.txt" 2>/dev/null
