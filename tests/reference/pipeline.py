"""Reference: diffusers' BlipDiffusionPipeline on a released-layout folder.

args: model_dir, image (path), prompt, source_category, target_category, seed, steps,
      height, width, guidance, neg_prompt, prompt_strength, prompt_reps
inputs: optional "latents" (initial noise); otherwise torch.Generator(seed) as diffusers does.
outputs: image (B,3,H,W in 0..1), final_latents (what is passed to the VAE, times the
         scaling factor undone), text_embeddings (the conditioning the UNet saw).
"""
from common import build_pipeline, io

args, tensors, save = io()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

pipe = build_pipeline(args["model_dir"])
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
