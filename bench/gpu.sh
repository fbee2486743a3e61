#!/usr/bin/env bash
# GPU benchmark on a lent machine (H100/H200), sized for well under 8 minutes (bench/gpu_bench.py).
#
# The GPU image has torch, transformers, numpy, safetensors, einops, aiohttp... but not the host's
# torchsde (+ trampoline) nor PyAV (comfy_api imports it). Prepare, once, on this machine:
#   bash bench/prepare_gpu.sh   (those wheels in .whl/, the reference's in .whl/ref/, a slimmed host copy)
# then, with the device tool (the script prints the carry size; the tool takes 64 MiB in all):
#   run(command="bash bench/gpu.sh", carry=[".cache/ComfyUI-slim", ".whl"], timeout_s=540)
#   run(command="bash bench/gpu.sh --reference", carry=[".cache/ComfyUI-slim", ".whl"], timeout_s=590)
# Checked before a lease on CPU in a Python 3.12 venv with the image's torch 2.11 / transformers 5.17
# and these wheels: `bash bench/gpu.sh --device cpu --smoke`.
# Results: bench/results/gpu.json and gpu_bench.log ($OUT/ under the device tool: copy them to bench/results/).
# Some parts again after a fix (bench/run.py's report lists gpu_rerun*.json after the first run):
#   GPU_BENCH_NAME=gpu_rerun bash bench/gpu.sh --only finetune        (parts: see gpu_bench.py --help)
# Where the time goes (kernel time against wall time, CUDA-graph replay): bash bench/gpu.sh --profile
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# the slimmed host copy of bench/prepare_gpu.sh, when carried
[ -d .cache/ComfyUI-slim/comfy ] && export COMFYUI_DIR="${COMFYUI_DIR:-$PWD/.cache/ComfyUI-slim}"
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
# --reference: side by side on the same files (#18 item 1). The released-layout folder is generated
# here, full size and seeded (scripts/make_weights.py in the reference's packages from .whl/ref); the
# reference pipeline renders (bench/gpu_reference.py), then ours from the same folder through the
# pack's loader (gpu_bench.py --model-dir). Results: gpu_reference.json and gpu_side_by_side.json.
if [ "${1:-}" = --reference ]; then
  shift
  mkdir -p "$dest"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/refsite \
    .whl/ref/*.whl || exit 1
  weights=${BLIP_BENCH_WEIGHTS:-/tmp/blip-diffusion-full}
  refenv=(env PYTHONPATH=/tmp/refsite HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1)
  "${refenv[@]}" python3 scripts/make_weights.py --size full --components qformer,text_encoder,vae,unet \
    --out "$weights" 2>&1 | tail -3
  "${refenv[@]}" timeout "${GPU_REFERENCE_TIMEOUT:-200}" python3 bench/gpu_reference.py --model-dir "$weights" \
    --out "$dest/gpu_reference.json" "$@" 2>&1 | tee "$dest/gpu_reference.log"
  PYTHONUNBUFFERED=1 timeout "${GPU_BENCH_TIMEOUT:-300}" python3 bench/gpu_bench.py --model-dir "$weights" \
    --only renders,compile --compile-backend cudagraphs --out "$dest/gpu_side_by_side.json" "$@" 2>&1 \
    | tee "$dest/gpu_side_by_side.log"
  exit 0
fi
# arguments off the device tool (e.g. --device cpu --smoke) mean a check run: keep results out of bench/
[ "$#" -gt 0 ] && [ -z "${OUT:-}" ] && dest=/tmp
mkdir -p "$dest"
PYTHONUNBUFFERED=1 timeout "${GPU_BENCH_TIMEOUT:-500}" python3 bench/$script.py --out "$dest/${GPU_BENCH_NAME:-$name}.json" "$@" 2>&1 \
  | tee "$dest/${GPU_BENCH_NAME:-$script}.log"
