"""Model folders the pack registers with the host's ``folder_paths``."""
import os

import folder_paths

BLIP_FOLDER = "blip_diffusion"
WEIGHT_EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}


def register_model_folders() -> None:
    """Add ``models/blip_diffusion`` (idempotent; keeps paths from extra_model_paths.yaml)."""
    default = os.path.join(folder_paths.models_dir, BLIP_FOLDER)
    folder_paths.add_model_folder_path(BLIP_FOLDER, default, is_default=True)
    paths, exts = folder_paths.folder_names_and_paths[BLIP_FOLDER]
    folder_paths.folder_names_and_paths[BLIP_FOLDER] = (paths, set(exts) | WEIGHT_EXTENSIONS)
    os.makedirs(default, exist_ok=True)


def list_model_folders() -> list[str]:
    """Released-layout folders (those holding model_index.json), relative to a registered path."""
    found = set()
    for base in folder_paths.get_folder_paths(BLIP_FOLDER):
        if not os.path.isdir(base):
            continue
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            if "model_index.json" in filenames:
                found.add(os.path.relpath(dirpath, base))
                dirnames[:] = []  # components live below; do not descend further
    return sorted(found)


def resolve_model_folder(name: str) -> str:
    """Absolute path of a listed folder; refuses names that escape the registered paths."""
    for base in folder_paths.get_folder_paths(BLIP_FOLDER):
        full = os.path.realpath(os.path.join(base, name))
        if os.path.commonpath([full, os.path.realpath(base)]) != os.path.realpath(base):
            continue
        if os.path.isfile(os.path.join(full, "model_index.json")):
            return full
    raise FileNotFoundError(
        f"BLIP-Diffusion model folder '{name}' not found under {folder_paths.get_folder_paths(BLIP_FOLDER)}; "
        "put the released folder (with model_index.json) into models/blip_diffusion/")
