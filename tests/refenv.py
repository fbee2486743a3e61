"""Run a computation in the reference environment (diffusers' BLIP-Diffusion code).

The reference only works with old transformers, so it lives in its own virtual
environment (scripts/setup_reference.sh) and never shares a process with the pack.
Tensors cross the boundary as safetensors files; plain arguments as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from paths import REF_PYTHON

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def reference_python() -> Path:
    env = os.environ.get("BLIP_REF_PYTHON")
    path = Path(env) if env else REF_PYTHON
    if not path.exists():
        raise RuntimeError(f"reference environment missing at {path}: run scripts/setup_reference.sh")
    return path


def offline_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=str(REFERENCE_DIR))
    return env


def run_reference(script: str, args: dict | None = None,
                  tensors: dict[str, torch.Tensor] | None = None,
                  timeout: float = 1800) -> dict[str, torch.Tensor]:
    """Run tests/reference/<script> with ``args`` (JSON) and ``tensors``; return its tensors.

    The script receives ``--args FILE --inputs FILE --outputs FILE`` (see reference/common.py).
    """
    with tempfile.TemporaryDirectory(prefix="blipref-") as tmp:
        tmp = Path(tmp)
        (tmp / "args.json").write_text(json.dumps(args or {}))
        save_file({k: v.contiguous() for k, v in (tensors or {}).items()} or {"_": torch.zeros(1)},
                  str(tmp / "in.safetensors"))
        cmd = [str(reference_python()), str(REFERENCE_DIR / script),
               "--args", str(tmp / "args.json"), "--inputs", str(tmp / "in.safetensors"),
               "--outputs", str(tmp / "out.safetensors")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=offline_env(), timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"reference {script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        return load_file(str(tmp / "out.safetensors"))
