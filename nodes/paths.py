"""Model folders the pack registers with the host's ``folder_paths``."""
import logging
import os
from typing import Callable

import folder_paths
from comfy_api.latest import io

BLIP_FOLDER = "blip_diffusion"
SUBJECT_FOLDER = "blip_subjects"
FINETUNE_FOLDER = "blip_finetunes"
WEIGHT_EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}
LAVIS_CHECKPOINT_EXTENSIONS = (".pth", ".pt")  # LAVIS's runner writes checkpoint_N.pth

log = logging.getLogger(__name__)


def register_model_folders() -> None:
    """Add models/blip_diffusion, blip_subjects and blip_finetunes (idempotent; keeps extra_model_paths.yaml
    entries). blip_finetunes holds the pack's fine-tune files and LAVIS's checkpoints."""
    for name, exts in ((BLIP_FOLDER, WEIGHT_EXTENSIONS), (SUBJECT_FOLDER, {".safetensors"}),
                       (FINETUNE_FOLDER, {".safetensors", *LAVIS_CHECKPOINT_EXTENSIONS})):
        default = os.path.join(folder_paths.models_dir, name)
        folder_paths.add_model_folder_path(name, default, is_default=True)
        folders, known = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (folders, set(known) | exts)
        try:
            os.makedirs(default, exist_ok=True)
        except OSError as e:  # a read-only models mount or a dangling link must not stop the nodes loading
            log.warning("BLIP-Diffusion: could not create %s (%s); its nodes list nothing from there until it "
                        "exists", default, e)


def finetune_files(lavis: bool = False) -> list[str]:
    """The files in models/blip_finetunes/: the pack's own (.safetensors) or LAVIS checkpoints (.pth, .pt)."""
    exts = LAVIS_CHECKPOINT_EXTENSIONS if lavis else (".safetensors",)
    return [f for f in folder_paths.get_filename_list(FINETUNE_FOLDER) if f.lower().endswith(exts)]


def list_model_folders(also: Callable[[str], bool] | None = None, having: str | None = None) -> list[str]:
    """Released-layout folders (those holding model_index.json), relative to a registered path; with
    ``also``, the folders below a registered path for which ``also(path)`` holds too (one walk); with
    ``having``, only the released folders that have this subfolder."""
    found = set()
    for base in folder_paths.get_folder_paths(BLIP_FOLDER):
        if not os.path.isdir(base):
            continue
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            released = "model_index.json" in filenames
            if released or (also is not None and dirpath != base and also(dirpath)):
                if not (released and having and not os.path.isdir(os.path.join(dirpath, having))):
                    found.add(os.path.relpath(dirpath, base))
                dirnames[:] = []  # components live below; do not descend further
    return sorted(found)


def resolve_model_folder(name: str, also: Callable[[str], bool] | None = None, having: str | None = None) -> str:
    """Absolute path of a listed folder (``also``: as for list_model_folders; ``having``: what the node
    lists, for the message when the name is not there); refuses absolute names and names that climb out."""
    rel = os.path.normpath(name or "")
    if os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
        raise ValueError(f"model folder name {name!r} must be relative to models/{BLIP_FOLDER}/")
    for base in folder_paths.get_folder_paths(BLIP_FOLDER):
        full = os.path.join(base, rel)  # symlinked model folders are welcome: no realpath check
        if os.path.isfile(os.path.join(full, "model_index.json")) or (also is not None and rel != "." and also(full)):
            return full
    there = list_model_folders(also, having)
    raise FileNotFoundError(
        f"BLIP-Diffusion model folder '{name}' not found under {folder_paths.get_folder_paths(BLIP_FOLDER)}; "
        + (f"the folders there are {', '.join(repr(f) for f in there)}: choose one in the node's list, or "
           if there else "")
        + "put the released folder (with model_index.json) into models/blip_diffusion/")


def save_name_inputs(default: str) -> list:
    """The name and overwrite inputs of the Save nodes (names follow subject_io.sanitise_name's rule)."""
    return [io.String.Input("name", default=default,
                            tooltip="File name (letters, digits, spaces, '-', '_', '.'); .safetensors is added."),
            io.Boolean.Input("overwrite", default=False, tooltip="Replace a file of the same name.")]


def saved_file_path(folder: str, name: str, what: str, hint: str = "") -> str:
    """Full path of a file listed in one of the pack's save folders, or a FileNotFoundError naming it."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise FileNotFoundError(f"{what} file '{name}' not found in models/{folder}/{hint}")
    return path


def file_stamp(folder: str, name: str):
    """What a loader's cache key needs of a saved file: its name, modification and change times, size and
    inode (a file saved again under the same name is read again, even one copied over it in place with its
    old modification time kept). A missing file: its name alone, and the node's own run then names it."""
    path = folder_paths.get_full_path(folder, name) if isinstance(name, str) else None
    if path is None:
        return name
    st = os.stat(path)
    return name, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino
