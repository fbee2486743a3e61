#!/usr/bin/env bash
# Run the test suite against a real ComfyUI host and the reference implementation.
# Provisions both (idempotent) and the generated weights first. Extra arguments go to
# pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast subset.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_host.sh
bash scripts/setup_reference.sh
bash scripts/setup_browser.sh   # Debian's Chromium + playwright-core, for the frontend test
bash scripts/setup_comfy_cli.sh  # comfy-cli from PyPI, for the registry packaging test
HF_HUB_OFFLINE=1 .cache/ref-venv/bin/python scripts/make_weights.py --size test >/dev/null
py="${COMFYUI_PYTHON:-$root/.cache/host-venv/bin/python}"
exec "$py" -m pytest "$@"
