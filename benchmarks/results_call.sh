#!/usr/bin/env bash
# One results call on the lent GPU machine (issue 11), from the repository root, with the corpus carried
# in .gpu/results-data/ and the wheels in .whl/ (docs/results/plan.md):
#   bash benchmarks/results_call.sh [results_runs.py run arguments...]
# e.g.
#   bash benchmarks/results_call.sh --batch 1b,8b-4l --budget-s 540 --finish-grace-s 30 --prestart-s 15
# It installs the wheels (benchmarks/device_env.sh), sets up the instrumented tree and the data under
# $MQ_WORK (default /tmp/mqr; again on a warm machine: set-up is idempotent), and runs the driver with the
# stored runs left out (--skip-done docs/results/runs) and its tarballs and log written to $OUT. The
# driver's start lines (the full argv of every run) go to the log in $OUT, not to the call's output.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT must name the folder the device tool brings back}"
. benchmarks/device_env.sh
work="${MQ_WORK:-/tmp/mqr}"
python3 benchmarks/results_runs.py setup --data .gpu/results-data/realtext-data.tar.xz --work "$work" >/dev/null
python3 benchmarks/results_runs.py run --skip-done docs/results/runs --tree "$work/megatron" \
  --data-root "$work/data" --work "$work" --out "$OUT" "$@" 2>&1 | grep -v '^\[.*start ' | tail -20
