#!/usr/bin/env bash
# GPU benchmark on a lent machine (H100/H200), sized for well under 8 minutes (bench/gpu_bench.py).
#
# The GPU image has torch, transformers, numpy, safetensors, einops, aiohttp... but not the host's
# torchsde (+ trampoline) nor PyAV (comfy_api imports it). Prepare, once, on this machine:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl torchsde trampoline av
# then, with the device tool (tree + .cache/ComfyUI + .whl is about 60 MB of the 64 MiB allowed):
#   run(command="bash bench/gpu.sh", carry=[".cache/ComfyUI", ".whl"], timeout_s=540)
# Checked before a lease on CPU in a Python 3.12 venv with the image's torch 2.11 / transformers 5.17
# and these wheels: `bash bench/gpu.sh --device cpu --smoke`.
# Results: bench/results/gpu.json and gpu_bench.log ($OUT/ under the device tool: copy them to bench/results/).
# Some parts again after a fix (bench/run.py's report lists gpu_rerun*.json after the first run):
#   GPU_BENCH_NAME=gpu_rerun bash bench/gpu.sh --only finetune        (parts: see gpu_bench.py --help)
# Where the time goes (kernel time against wall time, CUDA-graph replay): bash bench/gpu.sh --profile
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Under the device tool, results and log go straight to $OUT: they come back even if the run is cut off.
dest=${OUT:-bench/results}
script=gpu_bench name=gpu
# --profile: the diagnosis instead (bench/gpu_profile.py: kernel time against wall time, CUDA graphs)
[ "${1:-}" = --profile ] && { shift; script=gpu_profile name=gpu_profile; }
# arguments off the device tool (e.g. --device cpu --smoke) mean a check run: keep results out of bench/
[ "$#" -gt 0 ] && [ -z "${OUT:-}" ] && dest=/tmp
mkdir -p "$dest"
PYTHONUNBUFFERED=1 timeout "${GPU_BENCH_TIMEOUT:-500}" python3 bench/$script.py --out "$dest/${GPU_BENCH_NAME:-$name}.json" "$@" 2>&1 \
  | tee "$dest/${GPU_BENCH_NAME:-$script}.log"
