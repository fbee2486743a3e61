"""Turn the released folder's SD parts into the host's own model objects.

The UNet, VAE and text encoder of BLIP-Diffusion are plain SD 1.5 components in
diffusers layout. The host converts and manages them; what it lacks is accepting a
diffusers-layout UNet whose depth differs from SD 1.5 (its detection matches only the
exact known configs), so the key map is built here from the folder's own config.json.
"""
from __future__ import annotations

import json
import logging
import os
import zipfile

import comfy.model_management
import comfy.sd
import comfy.utils
import torch
from comfy.cli_args import args as host_args

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")


def component_weights(folder: str) -> str:
    """The weights file of one component folder; safetensors preferred over pickles."""
    for name in WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no weights ({', '.join(WEIGHT_NAMES)}) in {folder}")


def check_weights_file(path: str, what: str) -> None:
    """Cheap integrity check (milliseconds, before gigabytes are read): refuses empty, truncated and
    foreign files with a message saying so, instead of torch's or safetensors' internal errors."""
    size = os.path.getsize(path)
    problem = None
    with open(path, "rb") as f:
        head = f.read(8)
        if path.endswith((".safetensors", ".sft")):
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if n <= 0 or 8 + n > size:
                problem = "its safetensors header is missing or larger than the file"
            else:
                try:
                    header = json.loads(f.read(n))
                    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                except (ValueError, TypeError, KeyError, IndexError):
                    problem = "its safetensors header is not valid"
                else:
                    if 8 + n + end > size:
                        problem = f"the file has {size} bytes but its header describes {8 + n + end}"
        elif head.startswith(b"PK\x03\x04"):  # torch.save's zip format: the directory sits at the end
            try:
                zipfile.ZipFile(path).close()
            except (zipfile.BadZipFile, OSError) as e:
                problem = f"the torch checkpoint's zip archive is incomplete ({e})"
        elif not head.startswith(b"\x80"):  # a legacy torch pickle starts with the PROTO opcode
            problem = "it is neither a safetensors file nor a torch checkpoint" if head else "it is empty"
    if problem:
        raise ValueError(f"{what} weights {path} are corrupt or truncated: {problem}. "
                         "Download or copy the file again.")


def read_state_dict(path: str, what: str = "model") -> dict:
    """The tensors of one weights file; pickles only through torch.load(weights_only=True)."""
    check_weights_file(path, what)
    try:
        return comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as e:  # torch/safetensors internals (and torch's advice to unpickle unsafely): say what it means
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"{what} weights {path} could not be read ({type(e).__name__}: {first}); the file is "
                         "corrupt or not a plain tensor checkpoint. Download or copy the file again.") from e


def unet_config(model) -> dict:
    """The host's UNet config of a MODEL ({} for a model that carries none)."""
    return getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}


def host_unet_config(diffusers_config: dict) -> dict:
    """The host's description of a diffusers UNet2DConditionModel config (for its key map)."""
    widths = diffusers_config["block_out_channels"]
    layers = diffusers_config["layers_per_block"]
    down_types = diffusers_config["down_block_types"]
    up_types = diffusers_config["up_block_types"]
    levels = len(widths)
    per_level = layers if isinstance(layers, list) else [layers] * levels
    tdepth = diffusers_config.get("transformer_layers_per_block", 1)
    tdepth = tdepth if isinstance(tdepth, list) else [tdepth] * levels
    depth_in, depth_out = [], []
    for level in range(levels):
        has_attn = down_types[level].startswith("CrossAttn")
        depth_in += [tdepth[level] if has_attn else 0] * per_level[level]
    # Output lists run from the highest resolution level, as the host stores them.
    for level in range(levels):
        has_attn = up_types[levels - 1 - level].startswith("CrossAttn")
        depth_out += [tdepth[level] if has_attn else 0] * (per_level[level] + 1)
    return {
        "num_res_blocks": per_level,
        "channel_mult": [w // widths[0] for w in widths],
        "transformer_depth": depth_in,
        "transformer_depth_output": depth_out,
        "transformer_depth_middle": tdepth[-1],
    }


def read_component(folder: str) -> tuple[dict, dict]:
    """(config.json, state dict) of one diffusers component folder."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    return config, read_state_dict(component_weights(folder), os.path.basename(os.path.normpath(folder)))


def rename_keys(sd: dict, key_map: dict, what: str) -> dict:
    """Apply a diffusers -> host key map. The map names every tensor a model of the family
    may have; foreign keys are refused here, completeness is checked on the built model."""
    leftover = sorted(set(sd) - set(key_map))
    if leftover:
        raise ValueError(f"{what} weights do not match their config.json: unexpected keys {leftover[:5]} "
                         f"({len(leftover)} in all)")
    return {key_map[k]: v for k, v in sd.items()}


def require_complete(module, loaded: set, what: str, folder: str) -> None:
    """The host only logs missing keys; a model with untrained parts must not load silently."""
    missing = sorted(set(module.state_dict()) - loaded)
    if missing:
        raise ValueError(f"{what} weights in {folder} are incomplete: missing {missing[:5]} ({len(missing)} in all)")


def diffusers_unet_to_host(sd: dict, diffusers_config: dict) -> dict:
    """Rename a diffusers-layout UNet state dict to the original SD layout the host detects."""
    return rename_keys(sd, comfy.utils.unet_to_diffusers(host_unet_config(diffusers_config)), "UNet")


def load_unet(folder: str, model_options: dict | None = None):
    """A host ModelPatcher for a diffusers-layout UNet folder (config.json + weights)."""
    config, sd = read_component(folder)
    sd = diffusers_unet_to_host(sd, config)
    model = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=model_options or {})
    if model is None:
        raise ValueError(f"the host could not recognise the UNet in {folder} as an SD 1.5 family model")
    require_complete(model.model.diffusion_model, set(sd), "UNet", folder)
    return model


TEXT_ENCODER_PRECISION_FLAGS = ("fp8_e4m3fn_text_enc", "fp8_e5m2_text_enc", "fp16_text_enc", "bf16_text_enc",
                                 "fp32_text_enc")


def text_encoder_options() -> dict:
    """The text encoder's dtype where the host would pick fp16 on the CPU.

    The host runs its text encoder in fp16 unless told otherwise, on the CPU too. There fp16 gains no
    speed and costs accuracy: the subject-spliced prompt drifts far enough to move a render's final
    latents by ~4e-2 against the published pipeline (2e-4 in fp32). So a CPU text encoder is loaded in
    fp32, unless the user chose a precision (--fp16-text-enc, --bf16-text-enc, ...); on a GPU the host's
    choice stands."""
    if any(getattr(host_args, flag, False) for flag in TEXT_ENCODER_PRECISION_FLAGS):
        return {}
    if not comfy.model_management.is_device_cpu(comfy.model_management.text_encoder_device()):
        return {}
    logging.info("BLIP-Diffusion: the text encoder runs on the CPU, so it is loaded in fp32 (fp16 there only "
                 "adds error); --fp16-text-enc or --bf16-text-enc choose otherwise")
    return {"dtype": torch.float32}


def load_clip(folder: str, embedding_directory=None, model_options: dict | None = None):
    path = component_weights(folder)
    check_weights_file(path, "text encoder")
    options = {**text_encoder_options(), **(model_options or {})}
    return comfy.sd.load_clip([path], embedding_directory=embedding_directory,
                              clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options=options)


def load_vae(folder: str):
    vae = comfy.sd.VAE(sd=read_state_dict(component_weights(folder), "VAE"))
    vae.throw_exception_if_invalid()
    return vae
