#!/usr/bin/env bash
# The GPU checks still open after session 9, in three calls of ~6-8 minutes each (one NVIDIA H200):
#   A: (0) the GPU tests of what session 9 changed without a GPU: tests/test_graphsafe_gpu.py (graph-safe
#          SR / Hadamard signs / delayed scaling: a replay equals eager steps bit for bit; if it passes,
#          drop the random-stream reason from launch.graphs.recipe_unverified so `auto` graphs them), the
#          amax grid-stride tests in tests/test_triton.py and tests/test_triton_nvfp4.py;
#      (1) benchmarks/profile_step.py on the 8B cut (2 layers, seq 8192), eager: where the graph step's
#          118-120 ms go (issue 8's 112 ms target); its prediction is in benchmarks/NOTES.md;
#      (2) benchmarks/attention_train.py: 30 steps of bf16 and FA_linear_mxfp8, fused vs unfused attention
#          core, with the v2 kernels (issue 8: "switching fused <-> unfused changes no experiment beyond
#          rounding", last shown with v1).
#   B: train_overhead at 1b-single bf16 / FA_linear_hifp8 / +ts (after the amax change, 3467350) and the
#      8b-2l cells not measured yet: bf16 / FA_linear_{mxfp8,mxfp4,hifp8} / +ts.
#   C: train_overhead's other missing cells: tiny-smoke FA_linear_{mxfp4,hifp8} / +ts, 1b-fast
#      FA_linear_{mxfp4,hifp8}.
#   T: the whole issue-9 table (4 shapes x 5 modes, ~14 min) as one train_overhead run spread over two
#      back-to-back calls: each call continues /tmp/open_checks_T/to (--keep-done) within --budget-s 520;
#      a cold machine starts from the results.json in $KEEP if given (carry it), else from scratch.
#   P: tests/test_shared_grads.py (its CUDA-graph test included), the launch-path and HiF8 amax GPU tests
#      (the amax pass writes partial maxima since session 10), then profile_step.py at the 1B single-gpu
#      preset (eager): where tensor-scaled HiF8's extra ~28 ms per step
#      goes (amax kernel time vs launches), and the weight cache's share, per variant (~3 min); then the A/B
#      of HiF8's shared wgrad gradient (MEGAQUANT_SHARED_GRADS) at 1b-single through megaquant train (~3 min).
#   G: (session 11) where FA_linear_mxfp8's graphed 1b-single step goes: its kernels add 14 ms in the eager
#      profile, its graphed step 31 ms. train_overhead +prof rows trace two replayed steps per mode with
#      Megatron's torch.profiler, and the same eagerly (+nograph: the same harness without the graph) for
#      bf16 and mxfp8 (~6 min); compare kernel time by kind, graphed vs eager.
#   D: (session 11) where the DeepSeek-V2-Lite cut's eager step goes (the results family's largest device
#      cost, ~126 of ~290 planned minutes): train_overhead dsv2-2l bf16 / FA_linear_mxfp8 with +prof (~3 min):
#      GPU busy vs step time says how host-bound it is, the kernel count how many launches a step makes.
#   S: (session 12) the single-read MX gradient (dgrad's read of dy makes wgrad's token blocking too):
#      its GPU tests (kernel vs the one-axis kernels, CUDA graph capture, bits vs unshared), the kernel
#      benchmark (quant_kernels.py --both-axes), and train_overhead at 1b-single bf16 / FA_linear_{mxfp8,
#      mxfp4, hifp8} / FA_linear_mxfp8+noshare (the A/B: same losses) and 1b-fast bf16 / FA_linear_mxfp8.
#   H: (for session 13, ~3 min) where an eager quantized GEMM's host time goes on the GPU machine
#      (profile_step.py --microbench --cprofile: the CPU stub puts megaquant's own Python at ~14 us per
#      GEMM, the H200 host measured ~80 us; the DeepSeek cut pays ~210 us), the single-read kernel's launch
#      configurations (quant_kernels.py --both-axes), and profile_step at 1b-single with the wgrad fix
#      (its quantization launches must now match train_overhead's +prof count: 2688 MX, 2112 HiF8).
# Run from the repo root on the GPU machine:
#   . benchmarks/device_env.sh && OUT=$OUT bash benchmarks/open_checks.sh A     (then B, then C)
# Everything lands in $OUT/open_checks_<part>.tgz plus $OUT/summary_<part>.txt.
set -u
PART="${1:-A}"; OUT="${OUT:-/tmp/open-checks}"; W="${WORK:-/tmp/mq}"; R="/tmp/open_checks_$PART"
mkdir -p "$OUT" "$W" "$R"
T0=$(date +%s)
[ -d "$W/megatron" ] || megaquant instrument --from-installed "$W/megatron" > "$R/setup.log" 2>&1
[ -d "$W/data/dataset" ] || megaquant data prepare --dataset sample --data-root "$W/data" >> "$R/setup.log" 2>&1
S="$OUT/summary_$PART.txt"; : > "$S"
traced() {  # train_overhead rows (+prof: traced) into $R/prof; their tables and top kernels into the summary
  python3 benchmarks/train_overhead.py --tree "$W/megatron" --data-root "$W/data" --out "$R/prof" \
    --steps 12 --pack-to "$OUT" "$@" > "$R/prof.txt" 2>&1
  cat "$R/prof/table.md" >> "$S" 2>&1
  python3 -c "import json,sys; [print(k, {n: round(v, 2) for n, v in r['trace']['top_kernels_ms'].items()}) for k, r in json.load(open(sys.argv[1])).items() if 'trace' in r]" "$R/prof/results.json" >> "$S" 2>&1
  find "$R/prof" -name 'rank-0.json.gz' -delete  # tens of MB each; the summary is in results.json
}
if [ "$PART" = A ]; then
  python3 -m pytest -q -rf -p no:cacheprovider tests/test_graphsafe_gpu.py \
    "tests/test_triton.py::test_tensor_scaled_hif8_equals_reference" \
    "tests/test_triton_nvfp4.py::test_tensor_amax_pass" > "$R/pytest.txt" 2>&1
  echo "pytest: $(tail -1 "$R/pytest.txt")" >> "$S"
  grep -E "^FAILED|^ERROR" "$R/pytest.txt" >> "$S"
  python3 benchmarks/profile_step.py --tree "$W/megatron" --data-root "$W/data" --model llama31-8b \
    --preset standard --extra "--num-layers 2 --global-batch-size 2" --variants bf16,FA_linear_mxfp8 \
    --warmup 2 --timed 2 --train-steps 16 --out "$R/prof8b/prof.json" --table-dir "$R/prof8b" \
    --timeout-s 170 > "$R/prof8b.txt" 2>&1
  python3 -c "import json,sys; [print(v, {k: p.get(k) for k in ('wall_ms','gpu_busy_ms','kernel_ms','kernels','by_kind','top_kernels_ms')}) for v, p in json.load(open(sys.argv[1]))['profiles'].items()]" "$R/prof8b/prof.json" >> "$S" 2>&1
  python3 benchmarks/attention_train.py --out "$R/attn_train" --work "$W" --steps 30 \
    --modes bf16 FA_linear_mxfp8 > "$R/attn_train.txt" 2>&1
  cat "$R/attn_train/summary.md" >> "$S" 2>&1
elif [ "$PART" = B ]; then
  python3 benchmarks/train_overhead.py --tree "$W/megatron" --data-root "$W/data" --out "$R/to" \
    --only 1b-single --modes bf16,FA_linear_hifp8,FA_linear_hifp8+ts --steps 12 --budget-s 180 > "$R/to.txt" 2>&1
  python3 benchmarks/train_overhead.py --tree "$W/megatron" --data-root "$W/data" --out "$R/8b" \
    --only 8b-2l --modes bf16,FA_linear_mxfp8,FA_linear_mxfp4,FA_linear_hifp8,FA_linear_hifp8+ts \
    --steps 12 --budget-s 260 > "$R/8b.txt" 2>&1
  cat "$R/to/table.md" "$R/8b/table.md" >> "$S" 2>&1
elif [ "$PART" = P ]; then
  python3 -m pytest -q -rf -p no:cacheprovider tests/test_shared_grads.py tests/test_launch.py \
    "tests/test_triton.py::test_tensor_scaled_hif8_equals_reference" \
    "tests/test_triton_nvfp4.py::test_tensor_amax_pass" > "$R/pytest.txt" 2>&1
  echo "pytest shared grads, launch paths, amax parts: $(tail -1 "$R/pytest.txt")" >> "$S"
  grep -E "^FAILED|^ERROR" "$R/pytest.txt" >> "$S"
  python3 benchmarks/profile_step.py --tree "$W/megatron" --data-root "$W/data" --model llama32-1b \
    --preset single-gpu --variants bf16,FA_linear_hifp8+cache,FA_linear_hifp8+ts+cache,FA_linear_mxfp8+cache,FA_linear_mxfp8 \
    --warmup 2 --timed 2 --train-steps 30 --out "$R/prof1b/prof.json" --table-dir "$R/prof1b" \
    --timeout-s 400 > "$R/prof1b.txt" 2>&1
  python3 -c "import json,sys; [print(v, {k: p.get(k) for k in ('wall_ms','gpu_busy_ms','kernel_ms','kernels','by_kind','top_kernels_ms')}) for v, p in json.load(open(sys.argv[1]))['profiles'].items()]" "$R/prof1b/prof.json" >> "$S" 2>&1
  python3 benchmarks/train_overhead.py --tree "$W/megatron" --data-root "$W/data" --out "$R/share" \
    --only 1b-single --modes bf16,FA_linear_hifp8,FA_linear_hifp8+noshare,FA_linear_hifp8+ts,FA_linear_hifp8+ts+noshare \
    --steps 12 --budget-s 260 > "$R/share.txt" 2>&1
  cat "$R/share/table.md" >> "$S" 2>&1
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); b=lambda n: r.get('1b-single-'+n,{}).get('losses'); print('bits same with and without sharing:', b('FA_linear_hifp8')==b('FA_linear_hifp8_noshare'), b('FA_linear_hifp8_ts')==b('FA_linear_hifp8_ts_noshare'))" "$R/share/results.json" >> "$S" 2>&1
elif [ "$PART" = G ]; then
  traced --only 1b-single --budget-s 420 \
    --modes bf16+prof,FA_linear_mxfp8+prof,FA_linear_hifp8+prof,bf16+prof+nograph,FA_linear_mxfp8+prof+nograph,FA_linear_mxfp4+prof
elif [ "$PART" = S ]; then
  python3 -m pytest -q -rf -p no:cacheprovider tests/test_mx_both_axes.py tests/test_shared_grads.py \
    tests/test_triton.py tests/test_graphsafe_gpu.py > "$R/pytest.txt" 2>&1
  echo "pytest both-axes, shared grads, triton, graph-safe: $(tail -1 "$R/pytest.txt")" >> "$S"
  grep -E "^FAILED|^ERROR" "$R/pytest.txt" >> "$S"
  python3 benchmarks/quant_kernels.py --both-axes --out "$R/kern" > "$R/kern.txt" 2>&1
  cat "$R/kern/both_axes.json" >> "$S" 2>&1 || tail -5 "$R/kern.txt" >> "$S"
  traced --only 1b-single,1b-fast --budget-s 350 --row-timeout-s 150 \
    --modes bf16,FA_linear_mxfp8,FA_linear_mxfp8+noshare,FA_linear_mxfp4,FA_linear_hifp8
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); b=lambda n: r.get('1b-single-'+n,{}).get('losses'); print('mxfp8 bits same with and without the shared gradient:', b('FA_linear_mxfp8')==b('FA_linear_mxfp8_noshare') and b('FA_linear_mxfp8') is not None)" "$R/prof/results.json" >> "$S" 2>&1
elif [ "$PART" = H ]; then
  python3 benchmarks/profile_step.py --microbench --calls 300 --repeats 3 --cprofile --out "$R/micro.json" \
    > "$R/micro.txt" 2>&1
  grep -E "megatron 1024x2x2048|small 64x2048" "$R/micro.txt" | grep -E "direct " >> "$S"
  sed -n '/cProfile of/,/^$/p' "$R/micro.txt" | head -40 >> "$S"
  python3 benchmarks/quant_kernels.py --both-axes --out "$R/kern" > "$R/kern.txt" 2>&1
  python3 -c "import json,sys; [print(r['shape'], round(r['single_read_us'],1), r['configs']) for r in json.load(open(sys.argv[1]))['rows']]" "$R/kern/both_axes.json" >> "$S" 2>&1
  python3 benchmarks/profile_step.py --tree "$W/megatron" --data-root "$W/data" --model llama32-1b \
    --preset single-gpu --variants bf16,FA_linear_mxfp8+cache,FA_linear_hifp8+cache \
    --warmup 2 --timed 1 --train-steps 30 --out "$R/prof1b/prof.json" --timeout-s 300 > "$R/prof1b.txt" 2>&1
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('wgrad rebound in', len(d.get('wgrad_rebound', [])), 'modules'); [print(v, p['by_kind']) for v, p in d['profiles'].items()]" "$R/prof1b/prof.json" >> "$S" 2>&1
elif [ "$PART" = D ]; then
  traced --only dsv2-2l --modes bf16,bf16+prof,FA_linear_mxfp8,FA_linear_mxfp8+prof --budget-s 330 --row-timeout-s 200
elif [ "$PART" = T ]; then
  mkdir -p "$R/to"
  if [ -n "${KEEP:-}" ] && [ ! -f "$R/to/results.json" ]; then cp "$KEEP" "$R/to/results.json"; fi
  python3 benchmarks/train_overhead.py --tree "$W/megatron" --data-root "$W/data" --out "$R/to" \
    --keep-done --steps 12 --budget-s 520 --pack-to "$OUT" > "$R/to.txt" 2>&1
  cp "$R/to/results.json" "$R/to/table.md" "$OUT/" 2>/dev/null
  cat "$R/to/table.md" >> "$S" 2>&1
else
  python3 benchmarks/train_overhead.py --tree "$W/megatron" --data-root "$W/data" --out "$R/tiny" \
    --only tiny-smoke --modes bf16,FA_linear_mxfp4,FA_linear_hifp8,FA_linear_hifp8+ts --steps 12 \
    --budget-s 200 > "$R/tiny.txt" 2>&1
  python3 benchmarks/train_overhead.py --tree "$W/megatron" --data-root "$W/data" --out "$R/fast" \
    --only 1b-fast --modes bf16,FA_linear_mxfp4,FA_linear_hifp8 --steps 12 --budget-s 150 > "$R/fast.txt" 2>&1
  cat "$R/tiny/table.md" "$R/fast/table.md" >> "$S" 2>&1
fi
echo "took $(( $(date +%s) - T0 )) s" >> "$S"
(cd "$R" && find . -name '*.pt' -delete && tar czf "$OUT/open_checks_$PART.tgz" --exclude='*.bin' --exclude='*.idx' .)
cat "$S"
