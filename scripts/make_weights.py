"""Write a complete BLIP-Diffusion model with seeded random weights in the released layout.

Runs inside the reference environment (scripts/setup_reference.sh), so every component
is serialised by the same diffusers/transformers classes that wrote the published folder:
torch pickles (`pytorch_model.bin`, `diffusion_pytorch_model.bin`) and the same config
files; `controlnet/` (canny, built from the UNet) is safetensors, as released. Sizes:
  test  CLIP-L text encoder and VAE at full size (the host's loaders need them), a UNet
        with SD1.5 widths and all four levels but one layer per block, and a 2-block
        ViT / 2-layer Q-Former at the real widths.
  full  every component at its published size (for benchmarks).

Usage: python scripts/make_weights.py --size test [--out DIR] [--seed 0] [--components qformer,unet]

A folder already holding the wanted parts (same size, seed and format) is left as it is; asking
for more parts rebuilds it with the union. Each part has its own seed.
"""
import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))

import torch  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
FORMAT_VERSION = 5  # bump when the generated layout or values change, so caches are rebuilt

SIZES = {
    "test": dict(vit_layers=2, qformer_layers=2, unet_layers_per_block=1),
    "full": dict(vit_layers=23, qformer_layers=12, unet_layers_per_block=2),
}


def randomise_(module, gen):
    """Give norms, biases and zero-initialised tensors random values too.

    Default init leaves LayerNorm at (1, 0), query tokens and many biases at 0: a parity
    test on such weights could not see a wrong eps, a missing bias or a swapped norm.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name.lower() or "LayerNorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias") or name.endswith("query_tokens") or name.endswith("class_embedding"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def qformer(out, size, gen):
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from common import bert_tokenizer_dir

    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=SIZES[size]["vit_layers"],
                  num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu")
    qf = dict(vocab_size=30523, hidden_size=768, num_hidden_layers=SIZES[size]["qformer_layers"],
              num_attention_heads=12, intermediate_size=3072, cross_attention_frequency=1,
              encoder_hidden_size=1024)
    cfg = Blip2Config(vision_config=vision, qformer_config=qf, num_query_tokens=16)
    cfg.tokenizer = bert_tokenizer_dir()
    model = Blip2QFormerModel(cfg)
    randomise_(model, gen)
    with torch.no_grad():  # transformers initialises the BLIP-2 ViT with std 1e-10: nearly constant output
        for _, p in model.visual_encoder.named_parameters():
            if p.ndim >= 2:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    path = os.path.join(out, "qformer")
    model.save_pretrained(path, safe_serialization=False)
    # The published config has no tokenizer entry (the vocabulary is not shipped).
    conf = json.load(open(os.path.join(path, "config.json")))
    conf.pop("tokenizer", None)
    json.dump(conf, open(os.path.join(path, "config.json"), "w"), indent=2)


def text_encoder(out, gen):
    from transformers import CLIPTextConfig
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel

    # SD1.5's text encoder config, old bos/eos ids included (as in the published file).
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = ContextCLIPTextModel(cfg)
    randomise_(model, gen)
    model.save_pretrained(os.path.join(out, "text_encoder"), safe_serialization=False)


def unet(out, size, gen):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=SIZES[size]["unet_layers_per_block"],
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    randomise_(model, gen)
    model.save_pretrained(os.path.join(out, "unet"), safe_serialization=False)


def controlnet(out, gen):
    """A canny-style ControlNet copied from the generated UNet (as released: safetensors, no model_index entry)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet"), use_safetensors=False)
    model = ControlNetModel.from_unet(base)
    randomise_(model, gen)
    with torch.no_grad():  # zero-initialised output convs would make the ControlNet a no-op
        for name, p in model.named_parameters():
            if p.ndim >= 2 and name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                                 "controlnet_cond_embedding.conv_out")):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(os.path.join(out, "controlnet"), safe_serialization=True)


def vae(out, gen):
    from diffusers import AutoencoderKL

    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                          block_out_channels=(128, 256, 512, 512), sample_size=512,
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    randomise_(model, gen)
    model.save_pretrained(os.path.join(out, "vae"), safe_serialization=False)


def small_parts(out, clip_tokenizer_dir):
    from diffusers import PNDMScheduler
    from transformers import CLIPTokenizer
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor

    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  set_alpha_to_one=False, skip_prk_steps=True, steps_offset=0,
                  ).save_pretrained(os.path.join(out, "scheduler"))
    CLIPTokenizer.from_pretrained(clip_tokenizer_dir).save_pretrained(os.path.join(out, "tokenizer"))
    BlipImageProcessor(image_mean=CLIP_MEAN, image_std=CLIP_STD, do_center_crop=False,
                       size={"height": 224, "width": 224}).save_pretrained(os.path.join(out, "image_processor"))
    index = {
        "_class_name": "BlipDiffusionPipeline",
        "_diffusers_version": "0.20.0.dev0",
        "ctx_begin_pos": 2,
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
        "image_processor": ["blip_diffusion", "BlipImageProcessor"],
        "qformer": ["blip_diffusion", "Blip2QFormerModel"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    json.dump(index, open(os.path.join(out, "model_index.json"), "w"), indent=2)


def read_stamp(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--components", default="all",
                    help="comma-separated subset of qformer,text_encoder,vae,unet,controlnet (default: all)")
    ap.add_argument("--clip-tokenizer", default=None, help="folder with CLIP vocab.json/merges.txt "
                    "(default: the host's comfy/sd1_tokenizer)")
    a = ap.parse_args()
    out = a.out or os.path.join(ROOT, ".cache", "models", f"blip-diffusion-{a.size}")
    stamp = os.path.join(out, ".complete")
    every = ["qformer", "text_encoder", "vae", "unet", "controlnet"]  # controlnet/ is built from unet/
    parts = every if a.components == "all" else a.components.split(",")
    unknown = sorted(set(parts) - set(every))
    if unknown:
        ap.error(f"unknown components {unknown}; choose from {every}")
    if "controlnet" in parts and "unet" not in parts:
        parts.append("unet")
    key = {"size": a.size, "seed": a.seed, "format": FORMAT_VERSION}
    have = read_stamp(stamp)
    if have and {k: have.get(k) for k in key} == key:
        if set(parts) <= set(have["parts"]):
            print(out)
            return
        parts = sorted(set(parts) | set(have["parts"]))  # never drop what is there
    tok = a.clip_tokenizer or os.path.join(os.environ.get("COMFYUI_DIR") or os.path.join(ROOT, ".cache", "ComfyUI"),
                                           "comfy", "sd1_tokenizer")
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    small_parts(tmp, tok)
    builders = {"qformer": lambda g: qformer(tmp, a.size, g), "text_encoder": lambda g: text_encoder(tmp, g),
                "vae": lambda g: vae(tmp, g), "unet": lambda g: unet(tmp, a.size, g),
                "controlnet": lambda g: controlnet(tmp, g)}
    for index, part in enumerate(every):  # fixed order: controlnet/ needs unet/
        if part in parts:
            # Each part has its own seed, so its values do not depend on which other parts are built.
            torch.manual_seed(a.seed * len(every) + index)
            builders[part](torch.Generator().manual_seed(a.seed * len(every) + index))
    open(os.path.join(tmp, ".complete"), "w").write(json.dumps(dict(key, parts=[p for p in every if p in parts])))
    # Written aside, then swapped in: an interrupted run never leaves a half model behind.
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(out)


if __name__ == "__main__":
    main()
