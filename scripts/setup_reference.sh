#!/usr/bin/env bash
# Build the reference environment: diffusers' BLIP-Diffusion implementation, which
# only runs with transformers <= 4.53.3. Used by tests and benchmarks as a subprocess,
# never imported by the pack. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/ref-venv"
PY="${PYTHON:-python3.11}"
if [ ! -f "$venv/.stamp" ]; then
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q torch==2.13.0 diffusers==0.39.0 transformers==4.53.3 \
      huggingface-hub==0.36.2 tokenizers==0.21.4 safetensors numpy Pillow
  touch "$venv/.stamp"
fi
echo "reference ready: $venv/bin/python"
