"""Where the tests find things: the repository, its .cache/ and the generated models' names.

The generated weights (scripts/make_weights.py, README *Running the tests*) live in .cache/models/,
one folder per size; the session host (conftest.comfy_server) lists the test-size one in its
models/blip_diffusion/ under the same name, TEST_MODEL, the model_name graphs give BlipDiffusionLoader.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
COMFYUI = CACHE / "ComfyUI"  # the provisioned host (scripts/setup_host.sh); COMFYUI_DIR overrides it
REF_PYTHON = CACHE / "ref-venv" / "bin" / "python"  # the reference environment (scripts/setup_reference.sh)


def model_name(size: str = "test") -> str:
    return f"blip-diffusion-{size}"


def model_dir(size: str = "test") -> Path:
    """The generated released-layout model of this size (written by conftest.generated_model_dir)."""
    return CACHE / "models" / model_name(size)


TEST_MODEL = model_name("test")
