# Source this on the lent GPU machine (bash), from the repository root or a copy of it:
#   . benchmarks/device_env.sh
# It installs the carried wheels (.whl/: libcst, GitPython, gitdb, smmap, megatron-core, torchao) into
# /tmp/site, puts this tree first on PYTHONPATH and a `megaquant` command on PATH, so `megaquant train`
# runs exactly as a user's console script would. The machine's own torch/triton are kept.
_mq_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_mq_wheels="${MEGAQUANT_WHEELS:-$_mq_root/.whl}"
[ -d "$_mq_wheels" ] || _mq_wheels="$(git -C "$_mq_root" rev-parse --show-toplevel 2>/dev/null)/.whl"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$_mq_wheels"/*.whl || return 1
export PYTHONPATH="$_mq_root:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p /tmp/mqbin
printf '#!/bin/sh\nexec python3 -m megaquant "$@"\n' > /tmp/mqbin/megaquant && chmod +x /tmp/mqbin/megaquant
export PATH="/tmp/mqbin:$PATH"
export PYTHONUNBUFFERED=1
git config --global user.email >/dev/null 2>&1 || git config --global user.email gpu@megaquant.invalid
git config --global user.name >/dev/null 2>&1 || git config --global user.name megaquant-gpu
git config --global --add safe.directory '*'
