"""Reference: diffusers' BlipDiffusionControlNetPipeline (stylisation along a canny, depth or HED map).

The pipeline is built from the same components as common.build_pipeline plus a ControlNetModel:
the folder's controlnet/ (model_index.json does not list it, as released), or any SD1.5
ControlNet folder given as "controlnet" (LAVIS's depth and HED configurations swap in another one).

args: model_dir, controlnet (optional: a diffusers ControlNetModel folder, default
      model_dir/controlnet), "cases": a list of cases with image (subject photo path), edges (the
      conditioning image path), prompt, source_category, target_category, seed, steps,
      height, width, guidance, neg_prompt, prompt_strength, prompt_reps.
outputs per case i: image_i (B,3,H,W in 0..1), final_latents_i (the latents handed to the
      VAE, UNet scale), hint_i (the conditioning image the ControlNet received, first call),
      hint_batch_i (its batch size: 2 when both CFG halves get the ControlNet).
"""
import os

from common import build_pipeline, capture_final_latents, case_kwargs, io, run_cases

args, tensors, save = io()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from diffusers import ControlNetModel  # noqa: E402
from diffusers.pipelines.controlnet.pipeline_controlnet_blip_diffusion import (  # noqa: E402
    BlipDiffusionControlNetPipeline,
)

base = build_pipeline(args["model_dir"])
controlnet_dir = args.get("controlnet") or os.path.join(args["model_dir"], "controlnet")
pipe = BlipDiffusionControlNetPipeline(
    **base.components,
    controlnet=ControlNetModel.from_pretrained(controlnet_dir).eval(),
    ctx_begin_pos=base.config.ctx_begin_pos, mean=base.config.mean, std=base.config.std,
)
pipe.set_progress_bar_config(disable=True)
captured = {}
capture_final_latents(pipe, captured)
orig_controlnet = pipe.controlnet.forward


def controlnet_spy(*a, **kw):
    if "hint" not in captured:
        cond = kw["controlnet_cond"]
        captured["hint"] = cond[:1].clone()
        captured["hint_batch"] = torch.tensor([float(cond.shape[0])])
        # Both CFG halves must see the same hint (published: residuals on both halves).
        assert torch.equal(cond[0], cond[-1])
    return orig_controlnet(*a, **kw)


pipe.controlnet.forward = controlnet_spy


def run(case):
    captured.clear()
    with torch.no_grad():
        # sic: diffusers spells the ControlNet argument condtioning_image
        out = pipe(**case_kwargs(case), condtioning_image=Image.open(case["edges"]))
    return {"image": out.images, **captured}


save(run_cases(args["cases"], run))
