"""Fine-tunes written by LAVIS's BLIP-Diffusion runner: one ``checkpoint_N.pth``.

What LAVIS writes (``_save_checkpoint`` of its ``runner_iter``/``runner_base``): ``torch.save`` of
``{"model": state_dict, "optimizer": ..., "config": ..., "scaler": ..., "iters" or "epoch": N}``.
``state_dict`` is the ``BlipDiffusion`` module's own, less every parameter that does not require
gradients. With the published fine-tuning settings (BLIP-2 encoder, projection layer, text encoder and
VAE frozen) that leaves:

* ``unet.<key>``: every tensor of the UNet, a diffusers ``UNet2DConditionModel`` (trained);
* ``ctx_embeddings_cache``: the subject, shape (1, 16, 768). Before training LAVIS sets it to the
  mean embedding of the training photos and makes it trainable; a loaded fine-tune generates from
  it instead of encoding a photo;
* buffers of the frozen parts, which a state dict keeps (``...embeddings.position_ids``).

``config`` is the run's configuration as plain containers; its dataset's ``build_info.subject_text``
names the subject's category. LAVIS loads such a file over the base model with
``load_state_dict(strict=False)``: a checkpoint holding only some UNet tensors changes only those.

This module reads the file with ``torch.load(weights_only=True)`` only (tensors and plain
containers; a pickle that needs any other Python object is refused) and splits it into the
UNet tensors under their diffusers names and the subject. Applying them to a model is the host's
business (nodes/host_finetune.py).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

SUBJECT_KEY = "ctx_embeddings_cache"
UNET_PREFIX = "unet."
# Parts the subject embedding replaces at generation: their tensors are not needed.
ENCODER_PREFIXES = ("blip.", "proj_layer.")
SHOWN = 3


class LavisCheckpointError(ValueError):
    pass


@dataclass
class LavisFinetune:
    unet: dict[str, torch.Tensor]      # diffusers UNet2DConditionModel names, without "unet."
    subject: torch.Tensor              # (1, tokens, width), float32
    category: str | None               # the run's subject_text, when its config names one
    step: int | None                   # the runner's "iters" (or "epoch") at saving
    not_applied: list[str] = field(default_factory=list)   # trained tensors of other parts (text encoder ...)
    unused: int = 0                    # subject-encoder tensors and buffers, not needed


def few_keys(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:SHOWN]) + (f", ... ({len(keys)} in all)" if len(keys) > SHOWN else "")


def _load(path: str):
    name = os.path.basename(path)
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    try:
        # mmap (zip checkpoints): the optimiser state that LAVIS saves beside the model (twice the
        # UNet's size) is never read.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped), zipped
    except Exception as e:
        text = str(e)
        if type(e).__name__ == "UnpicklingError" and "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise LavisCheckpointError(
                f"{name} holds Python objects{what} besides tensors, and rebuilding them would run code from "
                "the file: this node reads checkpoints only with torch.load(weights_only=True), which refuses "
                "that. LAVIS's checkpoint_N.pth loads this way; for a file made elsewhere, save just its state "
                "dict of tensors again (torch.save(state_dict, path)) in a Python session you trust") from e
        first = (text.strip().splitlines() or [""])[0][:160]
        raise LavisCheckpointError(f"{name} is not a readable torch checkpoint ({type(e).__name__}: {first}); copy "
                                   "the checkpoint_N.pth from LAVIS's output folder again") from e


def _state_dict(obj, name: str) -> tuple[dict, dict | None, int | None]:
    """(state dict, run config, step) of the runner's wrapper or of a bare state dict."""
    if not isinstance(obj, dict):
        raise LavisCheckpointError(f"{name} holds a {type(obj).__name__}, not a state dict: it is not a LAVIS "
                                   "BLIP-Diffusion checkpoint")
    config, step = None, None
    if isinstance(obj.get("model"), dict):
        sd = obj["model"]
        config = obj.get("config") if isinstance(obj.get("config"), dict) else None
        for key in ("iters", "epoch"):
            if isinstance(obj.get(key), int):
                step = obj[key]
                break
    else:
        sd = obj
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):  # saved from the DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, config, step


def config_category(config: dict | None) -> str | None:
    """The subject_text of the run's dataset (LAVIS lower-cases it for training)."""
    datasets = (config or {}).get("datasets")
    for entry in (datasets.values() if isinstance(datasets, dict) else ()):
        info = entry.get("build_info") if isinstance(entry, dict) else None
        text = info.get("subject_text") if isinstance(info, dict) else None
        if isinstance(text, str) and text.strip():
            return " ".join(text.lower().split())
    return None


def split_state_dict(sd: dict, name: str, config: dict | None = None, step: int | None = None) -> LavisFinetune:
    """The UNet tensors (diffusers names) and the subject of a LAVIS BlipDiffusion state dict."""
    unet, not_applied, unused = {}, [], 0
    subject = sd.get(SUBJECT_KEY)
    for key, value in sd.items():
        if key == SUBJECT_KEY:
            continue
        if not isinstance(key, str):
            not_applied.append(str(key))
        elif key.startswith(UNET_PREFIX):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise LavisCheckpointError(f"{name}: {key} is not a floating-point tensor; the checkpoint is "
                                           "damaged or not from LAVIS's BLIP-Diffusion")
            unet[key[len(UNET_PREFIX):]] = value
        elif key.startswith(ENCODER_PREFIXES) or key.endswith("position_ids"):
            unused += 1
        else:
            not_applied.append(key)
    if not unet and subject is None:
        raise LavisCheckpointError(
            f"{name} is not a LAVIS BLIP-Diffusion checkpoint: it has no 'unet.*' tensors and no "
            f"'{SUBJECT_KEY}' (it holds {few_keys(map(str, sd)) or 'nothing'}). Choose the checkpoint_N.pth that "
            "LAVIS's BLIP-Diffusion fine-tuning wrote to its output folder")
    if subject is None:
        raise LavisCheckpointError(
            f"{name} has UNet weights but no '{SUBJECT_KEY}', the fine-tuned subject that LAVIS's BLIP-Diffusion "
            "runner saves with them: it is not a BLIP-Diffusion fine-tune checkpoint (or the subject was removed). "
            "Choose the checkpoint_N.pth of the fine-tuning run")
    if not isinstance(subject, torch.Tensor) or subject.ndim != 3 or subject.shape[0] != 1 \
            or not subject.is_floating_point() or subject.shape[1] < 1:
        shape = tuple(subject.shape) if isinstance(subject, torch.Tensor) else type(subject).__name__
        raise LavisCheckpointError(
            f"{name}: '{SUBJECT_KEY}' has shape {shape}, but a BLIP-Diffusion subject is (1, 16, 768) floats: the "
            "checkpoint is damaged or not from LAVIS's BLIP-Diffusion")
    subject = subject.detach().to("cpu", torch.float32).clone()
    if not torch.isfinite(subject).all():
        raise LavisCheckpointError(f"{name}: '{SUBJECT_KEY}' holds NaN or infinite values: the fine-tuning diverged; "
                                   "choose an earlier checkpoint of the run")
    return LavisFinetune(unet, subject, config_category(config), step, sorted(not_applied), unused)


def read_checkpoint(path: str) -> LavisFinetune:
    """A LAVIS BLIP-Diffusion fine-tune: the runner's ``checkpoint_N.pth`` or a bare state dict."""
    name = os.path.basename(path)
    obj, mapped = _load(path)
    sd, config, step = _state_dict(obj, name)
    ft = split_state_dict(sd, name, config, step)
    if mapped:  # own the tensors: a trainer that rewrites the file in place must not reach into a mapping
        ft.unet = {k: v.clone() for k, v in ft.unet.items()}
    return ft
