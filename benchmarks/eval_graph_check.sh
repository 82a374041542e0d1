#!/usr/bin/env bash
# Training and validation under the full-iteration CUDA graph vs eager, same run otherwise (~1 min on the
# H200): tiny, 12 steps, evaluation every 5 steps and at the end, for each MODE:RECIPE argument (default
# FA_linear_mxfp8:default), all pairs at once. Writes $OUT/eval_graph_check.txt: per pair both runs'
# validation lines and whether training and validation losses are bit-identical.
# Run from the repo root on the GPU machine:
#   . benchmarks/device_env.sh && OUT=$OUT bash benchmarks/eval_graph_check.sh [MODE:RECIPE ...]
set -u
OUT="${OUT:-/tmp/eval-graph-check}"; W="${WORK:-/tmp/mq}"; R=/tmp/eval_graph_check
mkdir -p "$OUT" "$W" "$R"
[ -d "$W/megatron" ] || megaquant instrument --from-installed "$W/megatron" > "$R/setup.log" 2>&1
[ -d "$W/data/dataset" ] || megaquant data prepare --dataset sample --data-root "$W/data" >> "$R/setup.log" 2>&1
[ $# -gt 0 ] || set -- FA_linear_mxfp8:default
port=29570
for pair in "$@"; do
  mode="${pair%%:*}"; recipe="${pair#*:}"
  for g in on off; do
    megaquant train --megatron "$W/megatron" --worktree "/tmp/wt-eval-$recipe-$g" --master-port $port \
      --model tiny --dataset sample --data-root "$W/data" --training-config smoke -q "$mode" \
      --recipe "$recipe" --cuda-graphs $g --run-dir "$R/$recipe/$g" --no-validate --steps 12 \
      -- --eval-iters 2 --eval-interval 5 --split 90,10,0 > "$R/$recipe-$g.txt" 2>&1 &
    port=$((port + 1))
  done
done
wait
{
  for pair in "$@"; do
    recipe="${pair#*:}"; echo "== $pair"
    for g in on off; do echo "graphs $g: $(grep -c . "$R/$recipe/$g/metrics.jsonl" 2>/dev/null) steps logged"; \
      grep -h "validation loss" "$R/$recipe/$g/train.log"; tail -3 "$R/$recipe-$g.txt"; done
    python3 - "$R/$recipe" <<'PY'
import json, re, sys
from pathlib import Path
r = Path(sys.argv[1])
def losses(g):
    return [json.loads(l).get("loss") for l in (r / g / "metrics.jsonl").read_text().splitlines()]
def val(g):
    return re.findall(r"validation loss at .*?lm loss value: (\S+)", (r / g / "train.log").read_text())
try:
    for g in ("on", "off"):
        print(g, "manifest cuda_graphs:", json.loads((r / g / "manifest.json").read_text()).get("cuda_graphs"))
    print("training losses bit-identical:", losses("on") == losses("off"), len(losses("on")))
    print("validation losses identical:", val("on") == val("off"), val("on"), val("off"))
except OSError as e:
    print("missing:", e)
PY
  done
} > "$OUT/eval_graph_check.txt" 2>&1
cat "$OUT/eval_graph_check.txt"
