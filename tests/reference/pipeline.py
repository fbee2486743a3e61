"""Reference: diffusers' BlipDiffusionPipeline on a released-layout folder.

args: model_dir, and either one case's fields or "cases": a list of them. A case has
      image (path), prompt, source_category, target_category, seed, steps, height, width,
      guidance, neg_prompt, prompt_strength, prompt_reps.
outputs per case i (suffix _i, none for a single case): image (B,3,H,W in 0..1),
      final_latents (the latents handed to the VAE, UNet scale), text_embeddings.
"""
from common import build_pipeline, io

args, tensors, save = io()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

pipe = build_pipeline(args["model_dir"])
captured = {}
orig_decode = pipe.vae.decode


def decode_spy(z, **kw):
    captured["final_latents"] = z * pipe.vae.config.scaling_factor
    return orig_decode(z, **kw)


orig_unet = pipe.unet.forward


def unet_spy(*a, **kw):
    captured.setdefault("text_embeddings", kw["encoder_hidden_states"].clone())
    return orig_unet(*a, **kw)


pipe.vae.decode = decode_spy
pipe.unet.forward = unet_spy


def run(case):
    captured.clear()
    image = Image.open(case["image"]).convert("RGB")
    with torch.no_grad():
        out = pipe(
            prompt=[case["prompt"]], reference_image=image,
            source_subject_category=[case["source_category"]],
            target_subject_category=[case.get("target_category") or case["source_category"]],
            generator=torch.Generator().manual_seed(case.get("seed", 0)),
            guidance_scale=case.get("guidance", 7.5), height=case.get("height", 512),
            width=case.get("width", 512), num_inference_steps=case.get("steps", 25),
            neg_prompt=case.get("neg_prompt", ""), prompt_strength=case.get("prompt_strength", 1.0),
            prompt_reps=case.get("prompt_reps", 20), output_type="pt",
        )
    return {"image": out.images, **captured}


if "cases" in args:
    result = {}
    for i, case in enumerate(args["cases"]):
        result.update({f"{k}_{i}": v for k, v in run(case).items()})
    save(result)
else:
    save(run(args))
