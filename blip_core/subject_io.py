"""Subject files: a subject embedding as safetensors with descriptive metadata.

Written atomically (temporary file in the same folder, then rename), so an interrupted
save never leaves a truncated file under the final name.
"""
from __future__ import annotations

import json
import os
import re
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .subject import Subject

FORMAT_KEY = "blip_diffusion_subject"
FORMAT_VERSION = "1"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,120}$")


def sanitise_name(name: str, what: str = "subject name", error=ValueError) -> str:
    """A plain file name ending in .safetensors; refuses paths, traversal and odd characters."""
    name = (name or "").strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _SAFE_NAME.match(name) or ".." in name:
        raise error(f"{what} {name!r} is not allowed: use letters, digits, spaces, '-', '_' and '.', "
                    "starting with a letter or digit (no folders, no absolute paths)")
    return name + ".safetensors"


def save_atomically(tensors: dict, metadata: dict, folder: str, file_name: str, overwrite: bool,
                    temp_prefix: str) -> str:
    """Write a safetensors file to a temporary file in ``folder``, then rename it to ``file_name``:
    an interrupted save never leaves a truncated file under the final name."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, file_name)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{file_name} already exists; choose another name or enable overwrite")
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix, suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_subject(subject: Subject, folder: str, name: str, overwrite: bool = False) -> str:
    metadata = {FORMAT_KEY: FORMAT_VERSION, "category": subject.category,
                "meta": json.dumps(subject.meta, sort_keys=True)}
    return save_atomically({"embedding": subject.embedding.detach().float().cpu().contiguous()}, metadata, folder,
                           sanitise_name(name), overwrite, ".subject-")


def load_subject(path: str) -> Subject:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            if metadata.get(FORMAT_KEY) is None or keys != ["embedding"]:
                raise ValueError(f"{os.path.basename(path)} is not a BLIP-Diffusion subject file "
                                 "(made by SaveSubject)")
            embedding = f.get_tensor("embedding")
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own errors for corrupt files
        raise ValueError(f"{os.path.basename(path)} is not a readable subject file ({e})") from e
    if metadata[FORMAT_KEY] != FORMAT_VERSION:
        raise ValueError(f"{os.path.basename(path)} has subject format {metadata[FORMAT_KEY]}, this pack reads "
                         f"{FORMAT_VERSION}")
    return stored_subject(embedding, metadata, "meta", os.path.basename(path))


def metadata_object(metadata: dict, key: str, name: str, error=ValueError) -> dict:
    """A JSON-object entry of a file's metadata ({} when absent), or ``error`` naming the damage."""
    try:
        value = json.loads(metadata.get(key) or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise error(f"{name}: its metadata is damaged (the '{key}' entry is not a JSON object)")
    return value


def stored_subject(embedding: torch.Tensor, metadata: dict, meta_key: str, name: str, error=ValueError) -> Subject:
    """The subject a file stores (subject files and fine-tune files alike): its embedding, its 'category'
    and its JSON ``meta_key`` entry, refused by name when damaged."""
    meta = metadata_object(metadata, meta_key, name, error)
    category = metadata.get("category", "")
    if not category.strip():
        raise error(f"{name} names no category (its 'category' metadata is missing or empty)")
    if embedding.ndim != 3 or embedding.shape[0] != 1 or 0 in embedding.shape:
        raise error(f"{name}: its embedding has shape {tuple(embedding.shape)}, not (1, tokens, width)")
    if not torch.isfinite(embedding).all():
        raise error(f"{name}: its embedding holds NaN or infinite values")
    return Subject(embedding.to(torch.float32), category, meta)
