"""Reference: diffusers' BlipDiffusionPipeline on a released-layout folder.

args: model_dir, image (path), prompt, source_category, target_category, seed, steps,
      height, width, guidance, neg_prompt, prompt_strength, prompt_reps
inputs: optional "latents" (initial noise); otherwise torch.Generator(seed) as diffusers does.
outputs: image (B,3,H,W in 0..1), final_latents (what is passed to the VAE, times the
         scaling factor undone), text_embeddings (the conditioning the UNet saw).
"""
import os

from common import io, load_qformer

args, tensors, save = io()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402
from diffusers.pipelines.deprecated.blip_diffusion import BlipDiffusionPipeline  # noqa: E402
from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor  # noqa: E402
from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel  # noqa: E402
import json  # noqa: E402

d = args["model_dir"]
index = json.load(open(os.path.join(d, "model_index.json")))
# Components passed explicitly: from_pretrained on the deprecated pipeline path is unreliable.
pipe = BlipDiffusionPipeline(
    tokenizer=CLIPTokenizer.from_pretrained(os.path.join(d, "tokenizer")),
    text_encoder=ContextCLIPTextModel.from_pretrained(os.path.join(d, "text_encoder")),
    vae=AutoencoderKL.from_pretrained(os.path.join(d, "vae")),
    unet=UNet2DConditionModel.from_pretrained(os.path.join(d, "unet")),
    scheduler=PNDMScheduler.from_pretrained(os.path.join(d, "scheduler")),
    qformer=load_qformer(d),
    image_processor=BlipImageProcessor.from_pretrained(os.path.join(d, "image_processor")),
    ctx_begin_pos=index.get("ctx_begin_pos", 2), mean=index["mean"], std=index["std"],
)
pipe.set_progress_bar_config(disable=True)

captured = {}
orig_decode = pipe.vae.decode
pipe.vae.decode = lambda z, **kw: (captured.__setitem__("final_latents", z * pipe.vae.config.scaling_factor),
                                   orig_decode(z, **kw))[1]
orig_unet = pipe.unet.forward


def unet_spy(*a, **kw):
    captured.setdefault("text_embeddings", kw["encoder_hidden_states"].clone())
    return orig_unet(*a, **kw)


pipe.unet.forward = unet_spy

image = Image.open(args["image"]).convert("RGB")
with torch.no_grad():
    out = pipe(
        prompt=[args["prompt"]], reference_image=image,
        source_subject_category=[args["source_category"]],
        target_subject_category=[args.get("target_category", args["source_category"])],
        latents=tensors.get("latents"),
        generator=torch.Generator().manual_seed(args.get("seed", 0)),
        guidance_scale=args.get("guidance", 7.5), height=args.get("height", 512), width=args.get("width", 512),
        num_inference_steps=args.get("steps", 25), neg_prompt=args.get("neg_prompt", ""),
        prompt_strength=args.get("prompt_strength", 1.0), prompt_reps=args.get("prompt_reps", 20),
        output_type="pt",
    )
save({"image": out.images, **captured})
