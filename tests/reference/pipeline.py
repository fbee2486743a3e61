"""Reference: diffusers' BlipDiffusionPipeline on a released-layout folder.

args: model_dir, and either one case's fields or "cases": a list of them. A case has
      image (path), prompt, source_category, target_category, seed, steps, height, width,
      guidance, neg_prompt, prompt_strength, prompt_reps.
outputs per case i (suffix _i, none for a single case): image (B,3,H,W in 0..1),
      final_latents (the latents handed to the VAE, UNet scale), text_embeddings.
"""
from common import build_pipeline, capture_final_latents, case_kwargs, io, run_cases

args, tensors, save = io()

import torch  # noqa: E402

pipe = build_pipeline(args["model_dir"])
captured = {}
capture_final_latents(pipe, captured)
orig_unet = pipe.unet.forward


def unet_spy(*a, **kw):
    captured.setdefault("text_embeddings", kw["encoder_hidden_states"].clone())
    return orig_unet(*a, **kw)


pipe.unet.forward = unet_spy


def run(case):
    captured.clear()
    with torch.no_grad():
        out = pipe(**case_kwargs(case))
    return {"image": out.images, **captured}


save(run_cases(args["cases"], run) if "cases" in args else run(args))
