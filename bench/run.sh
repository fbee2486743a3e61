#!/usr/bin/env bash
# All CPU benchmarks from a fresh clone: provisions the host and the reference environment,
# generates full-size weights (first run: several minutes, ~6 GB), then runs bench/run.py.
# Arguments go to bench/run.py (e.g. --only encode). Results: bench/RESULTS.md, results.json, ratios.png.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_host.sh" >&2
bash "$root/scripts/setup_reference.sh" >&2
exec "${COMFYUI_PYTHON:-$root/.cache/host-venv/bin/python}" "$root/bench/run.py" "$@"
