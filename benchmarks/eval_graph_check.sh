#!/usr/bin/env bash
# Validation under the full-iteration CUDA graph vs eager, same run otherwise (~1 min on the H200): tiny
# FA_linear_mxfp8, 12 steps, evaluation every 5 steps and at the end. Writes $OUT/eval_graph_check.txt:
# both runs' validation lines and whether training and validation losses are bit-identical.
# Run from the repo root on the GPU machine: . benchmarks/device_env.sh && OUT=$OUT bash benchmarks/eval_graph_check.sh
set -u
OUT="${OUT:-/tmp/eval-graph-check}"; W="${WORK:-/tmp/mq}"; R=/tmp/eval_graph_check
mkdir -p "$OUT" "$W" "$R"
[ -d "$W/megatron" ] || megaquant instrument --from-installed "$W/megatron" > "$R/setup.log" 2>&1
[ -d "$W/data/dataset" ] || megaquant data prepare --dataset sample --data-root "$W/data" >> "$R/setup.log" 2>&1
port=29570
for g in on off; do
  megaquant train --megatron "$W/megatron" --worktree "/tmp/wt-eval-$g" --master-port $port --model tiny \
    --dataset sample --data-root "$W/data" --training-config smoke -q FA_linear_mxfp8 --cuda-graphs $g \
    --run-dir "$R/$g" --no-validate --steps 12 -- --eval-iters 2 --eval-interval 5 --split 90,10,0 \
    > "$R/$g.txt" 2>&1 &
  port=$((port + 1))
done
wait
{
  for g in on off; do echo "graphs $g: $(grep -c . "$R/$g/metrics.jsonl" 2>/dev/null) steps logged"; \
    grep -h "validation loss" "$R/$g/train.log"; done
  python3 - "$R" <<'PY'
import json, re, sys
from pathlib import Path
r = Path(sys.argv[1])
def losses(g):
    return [json.loads(l).get("loss") for l in (r / g / "metrics.jsonl").read_text().splitlines()]
def val(g):
    return re.findall(r"validation loss at .*?lm loss value: (\S+)", (r / g / "train.log").read_text())
print("training losses bit-identical:", losses("on") == losses("off"), len(losses("on")))
print("validation losses identical:", val("on") == val("off"), val("on"), val("off"))
PY
} > "$OUT/eval_graph_check.txt" 2>&1
cat "$OUT/eval_graph_check.txt"
