"""Subject-encoder files in the layouts the loader reads, written from a loaded encoder.

Only tests write these (the pack reads them: blip_core/encoder_weights.py): a LAVIS checkpoint
folder from released weights, and a single safetensors file with the config in its metadata.
"""
from __future__ import annotations

import json
import os

import torch

from blip_diffusion.blip_core.encoder_weights import LAVIS_FILES, rename


def to_lavis_state_dict(released: dict) -> dict:
    """Released key names -> LAVIS BlipDiffusion names (``blip.*``, ``proj_layer.*``)."""
    out = {}
    for key, value in released.items():
        new = rename(key, to_lavis=True)
        if new is None:
            raise ValueError(f"no LAVIS name for {key!r}")
        if key in ("visual_encoder.embeddings.class_embedding", "visual_encoder.embeddings.position_embedding"):
            value = value.reshape(value.shape[-2:] if key.endswith("position_embedding") else value.shape[-1:])
        out[new] = value
    return out


def lavis_files(lavis: dict) -> dict:
    """Split a :func:`to_lavis_state_dict` result into LAVIS's two files (module-relative names)."""
    files = {path: {} for path in LAVIS_FILES.values()}
    for key, value in lavis.items():
        module, _, rest = key.partition(".")
        files[LAVIS_FILES[module]][rest] = value
    return files


def save_lavis_folder(lavis: dict, folder) -> None:
    """A :func:`to_lavis_state_dict` result written as LAVIS's checkpoint folder (its two ``torch.save`` files)."""
    for rel, sd in lavis_files(lavis).items():
        os.makedirs(os.path.join(folder, os.path.dirname(rel)), exist_ok=True)
        torch.save(sd, os.path.join(folder, rel))


def save_single_file(encoder, path: str) -> None:
    """Layout (c): released key names, config JSON in the safetensors metadata."""
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(sd, path, metadata={"format": "pt", "config": json.dumps(encoder.config.to_dict())})
