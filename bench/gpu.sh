#!/usr/bin/env bash
# GPU benchmark on a lent machine (H100/H200), sized for well under 8 minutes.
#
# From this machine, with the device tool: carry the host tree and, if the GPU image lacks them,
# wheels for the host's pure-Python imports (prepared here once):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl torchsde trampoline
#   run(command="bash bench/gpu.sh", carry=[".cache/ComfyUI", ".whl"], timeout_s=540)
# Results: bench/results/gpu.json (copied to $OUT when the device tool sets it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 bench/gpu_bench.py --out bench/results/gpu.json
if [ -n "${OUT:-}" ]; then cp bench/results/gpu.json "$OUT/"; fi
