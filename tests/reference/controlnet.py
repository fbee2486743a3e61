"""Reference: diffusers' BlipDiffusionControlNetPipeline (canny stylisation) on a released-layout folder.

The pipeline is built from the same components as common.build_pipeline plus the folder's
controlnet/ (a ControlNetModel; model_index.json does not list it, as released).

args: model_dir, "cases": a list of cases with image (subject photo path), edges (the
      conditioning image path), prompt, source_category, target_category, seed, steps,
      height, width, guidance, neg_prompt, prompt_strength, prompt_reps.
outputs per case i: image_i (B,3,H,W in 0..1), final_latents_i (the latents handed to the
      VAE, UNet scale), hint_i (the conditioning image the ControlNet received, first call),
      hint_batch_i (its batch size: 2 when both CFG halves get the ControlNet).
"""
import os

from common import build_pipeline, io

args, tensors, save = io()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from diffusers import ControlNetModel  # noqa: E402
from diffusers.pipelines.controlnet.pipeline_controlnet_blip_diffusion import (  # noqa: E402
    BlipDiffusionControlNetPipeline,
)

base = build_pipeline(args["model_dir"])
pipe = BlipDiffusionControlNetPipeline(
    **base.components,
    controlnet=ControlNetModel.from_pretrained(os.path.join(args["model_dir"], "controlnet")).eval(),
    ctx_begin_pos=base.config.ctx_begin_pos, mean=base.config.mean, std=base.config.std,
)
pipe.set_progress_bar_config(disable=True)
captured = {}
orig_decode = pipe.vae.decode
orig_controlnet = pipe.controlnet.forward


def decode_spy(z, **kw):
    captured["final_latents"] = z * pipe.vae.config.scaling_factor
    return orig_decode(z, **kw)


def controlnet_spy(*a, **kw):
    if "hint" not in captured:
        cond = kw["controlnet_cond"]
        captured["hint"] = cond[:1].clone()
        captured["hint_batch"] = torch.tensor([float(cond.shape[0])])
        # Both CFG halves must see the same hint (published: residuals on both halves).
        assert torch.equal(cond[0], cond[-1])
    return orig_controlnet(*a, **kw)


pipe.vae.decode = decode_spy
pipe.controlnet.forward = controlnet_spy


def run(case):
    captured.clear()
    image = Image.open(case["image"]).convert("RGB")
    edges = Image.open(case["edges"])
    with torch.no_grad():
        out = pipe(
            prompt=[case["prompt"]], reference_image=image, condtioning_image=edges,  # sic: diffusers' spelling
            source_subject_category=[case["source_category"]],
            target_subject_category=[case.get("target_category") or case["source_category"]],
            generator=torch.Generator().manual_seed(case.get("seed", 0)),
            guidance_scale=case.get("guidance", 7.5), height=case.get("height", 512),
            width=case.get("width", 512), num_inference_steps=case.get("steps", 25),
            neg_prompt=case.get("neg_prompt", ""), prompt_strength=case.get("prompt_strength", 1.0),
            prompt_reps=case.get("prompt_reps", 20), output_type="pt",
        )
    return {"image": out.images, **captured}


result = {}
for i, case in enumerate(args["cases"]):
    result.update({f"{k}_{i}": v for k, v in run(case).items()})
save(result)
