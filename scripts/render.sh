#!/usr/bin/env bash
# The main job: provision the host (first run only) and render a subject through it.
# Arguments go to scripts/render.py (--image, --category, --prompt, --steps, --size, --seed, --out).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_host.sh" >&2
exec "${COMFYUI_PYTHON:-$root/.cache/host-venv/bin/python}" "$root/scripts/render.py" "$@"
