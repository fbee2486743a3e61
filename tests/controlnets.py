"""A second generated SD1.5 ControlNet (the 'depth' one) in the single-file layout users download.

The generated model's controlnet/ (the canny one, a diffusers ControlNetModel) gives the
structure: every tensor is drawn again from a fixed seed with the same shape, mean and standard
deviation, so the result is as lively as the canny ControlNet but a different network. It is
written as one safetensors file under the original ControlNet names (input_blocks.*,
zero_convs.*, input_hint_block.*, middle_block_out.*, no prefix: the layout of the SD1.5
ControlNet safetensors files in models/controlnet/), which the host's own ControlNetLoader
detects and loads unchanged. The reference gets the same tensors back as a diffusers folder.
Needs the host importable (conftest.comfy_on_path).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DEPTH_SEED = 1414
DEPTH_FILE = "blipdiff-test-controlnet-depth.safetensors"
FORMAT = 1  # bump when redrawn() or the layout changes


def key_map(config: dict) -> dict[str, str]:
    from blip_diffusion.nodes.host_controlnet import controlnet_key_map

    return controlnet_key_map(config)


def redrawn(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor drawn again with its shape, mean and std, in name order from one generator (uniform
    values, as the default init draws: a quarter of the time normal ones take on a CPU)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(sd):
        t = sd[name].float()
        half_width = 3.0 ** 0.5 * (t.std().item() if t.numel() > 1 else 0.0)
        new = torch.empty(t.shape).uniform_(-half_width, half_width, generator=gen).add_(t.mean())
        out[name] = new.to(sd[name].dtype)
    return out


def write_depth_controlnet(canny_dir: Path, out: Path) -> Path:
    """The depth ControlNet as one original-layout safetensors file at ``out``."""
    config = json.loads((canny_dir / "config.json").read_text())
    names = key_map(config)
    sd = load_file(str(canny_dir / "diffusion_pytorch_model.safetensors"))
    assert set(sd) <= set(names), f"unmapped ControlNet tensors: {sorted(set(sd) - set(names))[:5]}"
    depth = redrawn(sd, DEPTH_SEED)
    save_file({names[k]: v.contiguous() for k, v in depth.items()}, str(out))
    return out


def depth_controlnet_file(canny_dir: Path, cache_dir: Path) -> Path:
    """The depth ControlNet file, written once per generated canny ControlNet (about 7 s) and kept in
    ``cache_dir``; a stamp names the canny file it was drawn from, so new weights make a new file."""
    source = canny_dir / "diffusion_pytorch_model.safetensors"
    st = source.stat()
    key = {"source": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "seed": DEPTH_SEED,
           "format": FORMAT}
    out, stamp = cache_dir / DEPTH_FILE, cache_dir / (DEPTH_FILE + ".json")
    try:
        if json.loads(stamp.read_text()) == key and out.is_file():
            return out
    except (OSError, ValueError):
        pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{DEPTH_FILE}.{os.getpid()}.partial"
    try:
        write_depth_controlnet(canny_dir, tmp)
        os.replace(tmp, out)  # whole or not at all, also with another test run writing it too
    finally:
        tmp.unlink(missing_ok=True)
    stamp.write_text(json.dumps(key))
    return out


def as_diffusers_folder(single_file: Path, canny_dir: Path, out: Path) -> Path:
    """The single file's tensors under diffusers' names, with the canny folder's config: a ControlNetModel folder."""
    config = json.loads((canny_dir / "config.json").read_text())
    back = {v: k for k, v in key_map(config).items()}
    sd = load_file(str(single_file))
    assert set(sd) <= set(back), f"not ControlNet tensors of this config: {sorted(set(sd) - set(back))[:5]}"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(canny_dir / "config.json", out / "config.json")
    save_file({back[k]: v for k, v in sd.items()}, str(out / "diffusion_pytorch_model.safetensors"))
    return out
