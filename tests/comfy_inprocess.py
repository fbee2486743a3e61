"""Import the host's ``comfy`` modules inside the test process.

The ComfyUI root goes on sys.path (appended, so the test environment's own packages win)
and the host is told it runs on the CPU before ``comfy.model_management`` is imported,
as it would be by ``main.py --cpu``. Import this module before any ``comfy`` import and
before ``blip_diffusion.nodes`` (whose package imports ``comfy_api``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from paths import COMFYUI


def comfyui_dir() -> Path:
    env = os.environ.get("COMFYUI_DIR")
    path = Path(env) if env else COMFYUI
    if not (path / "comfy" / "samplers.py").exists():
        raise RuntimeError(f"no ComfyUI tree at {path}: run scripts/setup_host.sh or set COMFYUI_DIR")
    return path


def setup() -> Path:
    """Make ``import comfy...`` work in-process on the CPU; idempotent. Returns the root."""
    path = comfyui_dir()
    if str(path) not in sys.path:
        sys.path.append(str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu once, at import)

    return path


setup()
