#!/usr/bin/env bash
# What session 8 changed after its last GPU call, checked on the lent H200 in one call (~6 min):
#  1. validation under the full-iteration CUDA graph after the weight-cache capture fix (the final
#     evaluation gave NaN before it): tiny FA_linear_mxfp8, 12 steps, eval every 5, --cuda-graphs on;
#  2. the GPU tests of the attention routing changes (tensor-scaled HiF8 / NVFP4 qk on Triton, unquantized
#     attention on the deterministic Triton kernels);
#  3. train_overhead rows: 1b-single bf16 twice (bit-identical now that bf16 attention is Triton?),
#     FA_linear_hifp8+ts (was 3.03x with QK on the reference), 1b-fast bf16 / FA_linear_mxfp8 (not run yet),
#     FA_linear_mxfp8+nocache (memory 1.00x: what it costs in time under the graph);
#  4. (session 9) benchmarks/profile_step.py on the 8B shape cut to 2 layers at seq 8192, eager.
# Run from the repo root on the GPU machine: . benchmarks/device_env.sh && OUT=$OUT bash benchmarks/graph_checks.sh
# Everything lands in $OUT/graph_checks.tgz plus $OUT/summary.txt.
set -u
OUT="${OUT:-/tmp/graph-checks}"; W="${WORK:-/tmp/mq}"; R=/tmp/graph_checks
mkdir -p "$OUT" "$W" "$R"
T0=$(date +%s)
[ -d "$W/megatron" ] || megaquant instrument --from-installed "$W/megatron" > "$R/setup.log" 2>&1
[ -d "$W/data/dataset" ] || megaquant data prepare --dataset sample --data-root "$W/data" >> "$R/setup.log" 2>&1
python3 -m pytest -q -rf -p no:cacheprovider tests/test_attention_gpu.py > "$R/pytest.txt" 2>&1 &
megaquant train --megatron "$W/megatron" --worktree /tmp/wt-eval-graph --master-port 29560 --model tiny \
  --dataset sample --data-root "$W/data" --training-config smoke -q FA_linear_mxfp8 --cuda-graphs on \
  --run-dir "$R/eval_graph" --no-validate --steps 12 -- --eval-iters 2 --eval-interval 5 --split 90,10,0 \
  > "$R/eval_graph.txt" 2>&1
wait
{ echo "pytest: $(tail -1 "$R/pytest.txt")"; grep -h "validation loss" "$R/eval_graph/train.log"; } > "$OUT/summary.txt"
python3 benchmarks/train_overhead.py --tree "$W/megatron" --data-root "$W/data" --out "$R/to" --only 1b-single \
  --modes bf16,bf16+again,FA_linear_hifp8+ts,FA_linear_mxfp8+nocache --steps 12 --budget-s 240 > "$R/to.txt" 2>&1
python3 benchmarks/train_overhead.py --tree "$W/megatron" --data-root "$W/data" --out "$R/fast" --only 1b-fast \
  --modes bf16,FA_linear_mxfp8 --steps 12 --budget-s 120 > "$R/fast.txt" 2>&1
cat "$R/to/table.md" "$R/fast/table.md" >> "$OUT/summary.txt" 2>/dev/null
# 4. where the 8B-cut step's time goes (issue 8: 118-120 ms against the 112 ms target), eager, profiled
python3 benchmarks/profile_step.py --tree "$W/megatron" --data-root "$W/data" --model llama31-8b --preset standard \
  --extra "--num-layers 2 --global-batch-size 2" --variants bf16,FA_linear_mxfp8 --warmup 2 --timed 2 \
  --train-steps 16 --out "$R/prof8b/prof.json" --table-dir "$R/prof8b" --timeout-s 170 > "$R/prof8b.txt" 2>&1
python3 -c "import json,sys; [print(v, {k: p.get(k) for k in ('wall_ms','gpu_busy_ms','kernel_ms','kernels','by_kind')}) for v, p in json.load(open(sys.argv[1]))['profiles'].items()]" "$R/prof8b/prof.json" >> "$OUT/summary.txt" 2>&1
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); a,b=(r.get(k,{}).get('losses') for k in ('1b-single-bf16','1b-single-bf16_again')); print('bf16 twice, bit-identical losses:', a is not None and a == b)" "$R/to/results.json" >> "$OUT/summary.txt" 2>&1
echo "took $(( $(date +%s) - T0 )) s" >> "$OUT/summary.txt"
(cd "$R" && find . -name '*.pt' -delete && tar czf "$OUT/graph_checks.tgz" --exclude='*.bin' --exclude='*.idx' .)
cat "$OUT/summary.txt"
