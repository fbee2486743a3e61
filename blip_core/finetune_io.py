"""Fine-tune files: the UNet change plus the fine-tuned subject in one safetensors file.

The UNet part is in the host's LoRA key layout, keyed by the host's module names
(``diffusion_model.input_blocks.1.1.proj_in``): full fine-tunes as ``<module>.diff`` (weight
change) and ``<module>.diff_b`` (bias change), LoRA fine-tunes as ``<module>.lora_up.weight``,
``<module>.lora_down.weight``, ``<module>.alpha`` plus ``.diff``/``.diff_b`` for the 1-D
tensors. Any LoRA loader of the host reads that part; the subject sits under
``blip_subject.embedding`` with its category in the metadata.

Written atomically (subject_io.save_atomically): an interrupted save never leaves a truncated
file under the final name.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from . import subject_io
from .subject import Subject

FORMAT_KEY = "blip_diffusion_finetune"
FORMAT_VERSION = "1"
SUBJECT_KEY = "blip_subject.embedding"
FINETUNE_MODES = ("full", "lora")


class FinetuneFileError(ValueError):
    pass


def sanitise_name(name: str) -> str:
    return subject_io.sanitise_name(name, what="file name", error=FinetuneFileError)


def save_finetune(folder: str, name: str, unet_sd: dict[str, torch.Tensor], subject: Subject, mode: str,
                  meta: dict | None = None, overwrite: bool = False) -> str:
    if mode not in FINETUNE_MODES:
        raise FinetuneFileError(f"unknown fine-tune mode {mode!r}")
    if SUBJECT_KEY in unet_sd:
        raise FinetuneFileError(f"UNet weights may not use the key {SUBJECT_KEY}")
    file_name = sanitise_name(name)
    metadata = {FORMAT_KEY: FORMAT_VERSION, "mode": mode, "category": subject.category,
                "subject_meta": json.dumps(subject.meta, sort_keys=True, default=str),
                "meta": json.dumps(meta or {}, sort_keys=True, default=str)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in unet_sd.items()}
    tensors[SUBJECT_KEY] = subject.embedding.detach().float().cpu().contiguous()
    return subject_io.save_atomically(tensors, metadata, folder, file_name, overwrite, ".finetune-")


def load_finetune(path: str) -> tuple[dict[str, torch.Tensor], Subject, str, dict]:
    """(UNet weights in the host's LoRA layout, subject, mode, metadata) of a fine-tune file."""
    base = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get(FORMAT_KEY) is None or SUBJECT_KEY not in f.keys():
                raise FinetuneFileError(f"{base} is not a BLIP-Diffusion fine-tune file (made by Save BLIP-Diffusion "
                                        "Fine-tune)")
            if metadata[FORMAT_KEY] != FORMAT_VERSION:
                raise FinetuneFileError(f"{base} has fine-tune format {metadata[FORMAT_KEY]}, this pack reads "
                                        f"{FORMAT_VERSION}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FinetuneFileError:
        raise
    except Exception as e:  # safetensors raises its own errors for corrupt files
        raise FinetuneFileError(f"{base} is not a readable fine-tune file ({e})") from e
    mode = metadata.get("mode")
    if mode not in FINETUNE_MODES:
        raise FinetuneFileError(f"{base}: unknown fine-tune mode {mode!r}")
    embedding = tensors.pop(SUBJECT_KEY).to(torch.float32)
    meta = subject_io.metadata_object(metadata, "meta", base, FinetuneFileError)
    bad = sorted(k for k in tensors if not k.startswith("diffusion_model."))
    if bad:
        raise FinetuneFileError(f"{base}: unexpected tensors {bad[:3]} (UNet keys start with 'diffusion_model.')")
    broken = [k for k, v in [(SUBJECT_KEY, embedding), *tensors.items()] if not torch.isfinite(v).all()]
    if broken:
        raise FinetuneFileError(f"{base} holds NaN or infinite values ({', '.join(broken[:3])})")
    subject = subject_io.stored_subject(embedding, metadata, "subject_meta", base, FinetuneFileError)
    return tensors, subject, mode, meta
