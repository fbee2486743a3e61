"""The released folder's controlnet/ (a diffusers ControlNetModel) as the host's CONTROL_NET.

The host's ControlNetLoader reads diffusers-layout ControlNets only when the depth is one
of the exact configs it knows (comfy.model_detection.unet_config_from_diffusers_unet);
any other depth, such as the test weights' one layer per block, fails inside the host.
Its reader for the original ControlNet layout (input_blocks.*, zero_convs.*,
input_hint_block.*, middle_block_out.*) detects the structure from tensor shapes and
takes any depth. So the diffusers names are mapped to that layout here, from the folder's
own config.json, and the host builds, casts and manages the ControlNet as usual.
"""
from __future__ import annotations

import comfy.controlnet
import comfy.utils
from .host_models import host_unet_config, read_component, rename_keys, require_complete

# The host's hint encoder is fixed: 3x3 convs 16, 16, 32 (stride 2), 32, 96 (s2), 96, 256 (s2).
HOST_HINT_CHANNELS = [16, 32, 96, 256]


def _unet_like_config(config: dict) -> dict:
    """A ControlNet config has only the down half; mirror it so the UNet key map can be built."""
    up_types = [t.replace("DownBlock", "UpBlock") for t in reversed(config["down_block_types"])]
    return dict(config, up_block_types=up_types)


def controlnet_key_map(config: dict) -> dict[str, str]:
    """diffusers ControlNetModel tensor name -> the host's original-layout name."""
    hint = list(config.get("conditioning_embedding_out_channels", HOST_HINT_CHANNELS))
    if hint != HOST_HINT_CHANNELS:
        raise ValueError(f"ControlNet hint encoder widths {hint} differ from the {HOST_HINT_CHANNELS} "
                         "that the host's ControlNet implements")
    unet_config = host_unet_config(_unet_like_config(config))
    key_map = {k: v for k, v in comfy.utils.unet_to_diffusers(unet_config).items()
               if not k.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))}
    # One zero conv per input block: conv_in, every resnet(+attention), every downsampler.
    levels = len(unet_config["num_res_blocks"])
    n_zero = 1 + sum(unet_config["num_res_blocks"]) + (levels - 1)
    # Hint encoder: conv_in, 2 * (len - 1) inner convs, conv_out; the host interleaves SiLUs.
    inner = 2 * (len(hint) - 1)
    for w in ("weight", "bias"):
        for i in range(n_zero):
            key_map[f"controlnet_down_blocks.{i}.{w}"] = f"zero_convs.{i}.0.{w}"
        key_map[f"controlnet_mid_block.{w}"] = f"middle_block_out.0.{w}"
        key_map[f"controlnet_cond_embedding.conv_in.{w}"] = f"input_hint_block.0.{w}"
        for j in range(inner):
            key_map[f"controlnet_cond_embedding.blocks.{j}.{w}"] = f"input_hint_block.{2 * (j + 1)}.{w}"
        key_map[f"controlnet_cond_embedding.conv_out.{w}"] = f"input_hint_block.{2 * (inner + 1)}.{w}"
    return key_map


def diffusers_controlnet_to_host(sd: dict, config: dict) -> dict:
    """Rename a diffusers ControlNetModel state dict to the original layout the host detects."""
    if config.get("class_embed_type") or config.get("addition_embed_type") or config.get("global_pool_conditions"):
        raise ValueError("only plain SD 1.x/2.x ControlNets are supported (no class/addition embedding, "
                         "no global pooling)")
    return rename_keys(sd, controlnet_key_map(config), "ControlNet")


def load_controlnet(folder: str, model_options: dict | None = None):
    """A host ControlNet (CONTROL_NET) from a diffusers ControlNetModel folder (config.json + weights)."""
    config, sd = read_component(folder)
    sd = diffusers_controlnet_to_host(sd, config)
    control = comfy.controlnet.load_controlnet_state_dict(dict(sd), model_options=model_options or {})
    if control is None or not hasattr(control, "control_model"):
        raise ValueError(f"the host could not build a ControlNet from {folder}")
    require_complete(control.control_model, set(sd), "ControlNet", folder)
    return control
