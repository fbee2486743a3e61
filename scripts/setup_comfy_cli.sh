#!/usr/bin/env bash
# Provision comfy-cli (the Comfy Registry's own packer and validator) from PyPI into its own
# venv, .cache/comfy-cli-venv (git-ignored), for tests/test_packaging.py. Its own venv because
# its dependencies (typer, ruff, uv, ...) are nothing the host or the pack needs.
# Idempotent: a second run only checks the stamp and returns.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="1.23.0"   # the release tests/test_packaging.py was written against
PY="${PYTHON:-python3.11}"
venv="$root/.cache/comfy-cli-venv"
stamp="$venv/.stamp-comfy-cli-$version"

if [ ! -f "$stamp" ]; then
  rm -rf "$venv"
  mkdir -p "$root/.cache"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "comfy-cli==$version"
  touch "$stamp"
fi
echo "comfy-cli ready: $venv/bin/comfy"
