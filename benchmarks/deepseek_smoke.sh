#!/usr/bin/env bash
# GPU smoke run of the DeepSeek-V2-Lite shape through `megaquant train` (issue 13, item 9): two layers (the
# dense first layer and one 64-expert MoE layer), MLA without q-LoRA with the KV norm, on an instrumented
# megatron-core 0.19.2 copy, built-in sample corpus, smoke preset (20 steps of 8 x 256 tokens), bf16 then
# FA_linear_mxfp8. Needs one GPU with >= 40 GB and Python >= 3.12. On the lent machine (from the repo root):
#   . benchmarks/device_env.sh && OUT=$OUT bash benchmarks/deepseek_smoke.sh
# Results: $OUT/<mode>/{manifest.json,train.log,metrics.jsonl}, and $OUT/summary.txt (exit code, last losses).
set -uo pipefail
OUT="${OUT:-/tmp/deepseek-smoke}"
WORK="${WORK:-/tmp/mq-deepseek}"
mkdir -p "$OUT" "$WORK"
[ -d "$WORK/megatron" ] || megaquant instrument --from-installed "$WORK/megatron" || exit 1
megaquant data prepare --dataset sample --data-root "$WORK/data" || exit 1
for mode in bf16 FA_linear_mxfp8; do
  megaquant train --megatron "$WORK/megatron" --model deepseek2_lite --dataset sample --data-root "$WORK/data" \
    --training-config smoke -q "$mode" --run-dir "$OUT/$mode" -- \
    --num-layers 2 --moe-layer-freq '([0]+[1]*1)'
  echo "$mode exit $?" >> "$OUT/summary.txt"
  grep -o 'lm loss: [0-9.E+-]*' "$OUT/$mode/train.log" | tail -3 >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
