"""Subject-driven editing of a photo (or of a generated scene), as BLIP-Diffusion published it.

Photo -> Subject Edit Photo -> VAEEncode -> Subject Edit Invert -> Subject Edit -> VAEDecode, with the
two prompts from Subject Edit Prompts. The rules live in blip_core.editing, the host glue in host_edit.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from PIL import Image

from comfy_api.latest import io

from ..blip_core import editing, regions
from ..blip_core.preprocess import resize_center_crop, to_uint8_rgb
from . import host_edit
from .types import SubjectType

log = logging.getLogger("blip_diffusion")

EditPromptsType = io.Custom("BLIP_EDIT_PROMPTS")
INVERTED_KEY = "blip_edit_inverted"   # set on the LATENT of Subject Edit Invert: the edit starts from a photo


def _fail(err: Exception):
    """Bad input: the message the user sees, without a traceback from deep inside."""
    raise ValueError(str(err)) from None


class SubjectEditPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SubjectEditPrompts",
            display_name="Subject Edit Prompts",
            category="blip_diffusion/editing",
            description=(
                "The two prompts of a BLIP-Diffusion edit. Source: 'a {source_subject} {prompt}', what the photo "
                "shows (no subject). Target: 'a {16 placeholders} {target_category} {prompt}' with your subject's "
                "16 vectors spliced in after 'a'. The subject's prompt borrows the photo's attention (cross_replace, "
                "self_replace); the blend words say which part of the photo may change."),
            inputs=[
                io.Clip.Input("clip", tooltip="The BLIP-Diffusion text encoder (an SD 1.x CLIP-L)."),
                SubjectType.Input("subject", tooltip="The subject to put into the photo (Subject Encode or Load "
                                                      "Subject)."),
                io.String.Input("source_subject", default="dog",
                                tooltip="The word naming what the photo shows that your subject replaces, e.g. "
                                        "'dog'. It must describe the photo: the inversion uses it."),
                io.String.Input("prompt", multiline=True, default="sitting on the grass",
                                tooltip="The rest of the photo's description, the same for both prompts, e.g. "
                                        "'sitting on the grass'."),
                io.String.Input("target_category", default="",
                                tooltip="The category word for your subject in the edit; empty uses the subject's "
                                        "own category."),
                io.String.Input("negative_prompt", default="", multiline=True,
                                tooltip="Guidance's unconditional text (empty, as published)."),
                io.String.Input("blend_words", default="",
                                tooltip="Words of the source prompt whose attention marks the region that may "
                                        "change (the local-blend mask); empty uses the source subject."),
            ],
            outputs=[EditPromptsType.Output(display_name="edit_prompts",
                                            tooltip="Both prompts, for Subject Edit Invert and Subject Edit.")],
        )

    @classmethod
    def execute(cls, clip, subject, source_subject, prompt, target_category, negative_prompt,
                blend_words) -> io.NodeOutput:
        try:
            return io.NodeOutput(host_edit.build_prompts(clip, subject, source_subject, prompt, target_category,
                                                         negative_prompt, blend_words))
        except editing.EditError as err:
            _fail(err)


class SubjectEditPhoto(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SubjectEditPhoto",
            display_name="Subject Edit Photo",
            category="blip_diffusion/editing",
            description="Prepares a photo for editing as LAVIS does: the short side resized to `size` "
                        "(bilinear), then the centre square kept. Connect the result to VAE Encode.",
            inputs=[
                io.Image.Input("image", tooltip="The photo to edit (any size and aspect; one photo)."),
                io.Int.Input("size", default=512, min=64, max=2048, step=64,
                             tooltip="Side of the square that is edited (published: 512)."),
            ],
            outputs=[io.Image.Output(tooltip="The square that will be edited: what was cut off is not edited.")],
        )

    @classmethod
    def execute(cls, image, size) -> io.NodeOutput:
        try:
            rgb = to_uint8_rgb(image)
        except ValueError as err:
            _fail(err)
        out = []
        for img in rgb.numpy():
            h, w = img.shape[:2]
            if h != w:
                keep = min(h, w)
                log.warning("Subject Edit Photo: the %dx%d photo is not square; its centre %dx%d is edited and "
                            "%d px of its %s are cut off", w, h, keep, keep, max(h, w) - keep,
                            "height" if h > w else "width")
            square = resize_center_crop(Image.fromarray(img, "RGB"), size, Image.BILINEAR)
            out.append(torch.from_numpy(np.array(square)).float() / 255)
        return io.NodeOutput(torch.stack(out))


class SubjectEditInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SubjectEditInvert",
            display_name="Subject Edit Invert",
            category="blip_diffusion/editing",
            description="DDIM inversion of the photo's latent under the source prompt (guidance 1, as "
                        "published): finds the noise from which the model redraws this photo. Feed the result "
                        "to Subject Edit with the same number of steps.",
            inputs=[
                io.Model.Input("model", tooltip="The BLIP-Diffusion UNet."),
                EditPromptsType.Input("edit_prompts", tooltip="From Subject Edit Prompts."),
                io.Latent.Input("latent", tooltip="The photo from Subject Edit Photo through VAE Encode."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="DDIM inversion steps (published: 50)."),
            ],
            outputs=[io.Latent.Output(display_name="inverted",
                                      tooltip="The inverted latent: connect it to Subject Edit.")],
        )

    @classmethod
    def execute(cls, model, edit_prompts, latent, steps) -> io.NodeOutput:
        samples = latent["samples"]
        if samples.shape[0] != 1:
            _fail(f"Subject Edit Invert takes one photo, got a batch of {samples.shape[0]}: edit photos one "
                  "at a time")
        try:
            source = [[edit_prompts.positive[0][0][:1], edit_prompts.positive[0][1]]]
            inverted = host_edit.run_inversion(model, source, samples, steps)
        except editing.EditError as err:
            _fail(err)
        return io.NodeOutput({"samples": inverted, INVERTED_KEY: steps})


class SubjectEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SubjectEdit",
            display_name="Subject Edit",
            category="blip_diffusion/editing",
            description=(
                "Puts the subject into the scene, keeping the rest (BLIP-Diffusion's editing, prompt-to-prompt "
                "with a local blend). Two branches run together: the source redraws the scene, the target "
                "draws it with your subject, borrowing the source's attention, and after every step keeps only "
                "the blend region of the target. From Subject Edit Invert it edits that photo (DDIM); from "
                "Empty Latent Image it first generates the scene from the source prompt with the seed (PNDM)."),
            inputs=[
                io.Model.Input("model", tooltip="The BLIP-Diffusion UNet."),
                EditPromptsType.Input("edit_prompts", tooltip="From Subject Edit Prompts."),
                io.Latent.Input("latent", tooltip="Subject Edit Invert's output (edit a photo), or an Empty "
                                                   "Latent Image (generate a scene, then edit it)."),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The scene's noise when generating; unused when editing a photo."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Sampling steps (published: 50; use the inversion's count for a photo)."),
                io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Guidance of the subject branch, and of the scene branch when generating "
                                       "(published: 7.5)."),
                io.Float.Input("cross_replace", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps in which the subject branch takes the scene's "
                                       "cross-attention (published: 0.8): as published, each of its token "
                                       "positions takes the scene's attention at the position the alignment of "
                                       "the two prompts maps it to."),
                io.Float.Input("self_replace", default=0.4, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps in which the subject branch copies the scene's "
                                       "coarse self-attention, i.e. its layout (published: 0.4)."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the blend words' peak attention a place needs to change "
                                       "(published 0.3; lower changes a larger region, e.g. 0.15 for clothes)."),
                io.Mask.Input("region", optional=True,
                              tooltip="Optional: where the edit may change the photo (white), e.g. drawn on the "
                                      "photo in the mask editor (a mask of the whole photo is cropped to its centre "
                                      "as Subject Edit Photo crops the photo) or the same mask as a Subjects in "
                                      "Regions region. The edit then "
                                      "changes only where both this region and the blend words allow it; with "
                                      "blend_threshold 0 the region alone decides."),
            ],
            outputs=[
                io.Latent.Output(display_name="edited", tooltip="The scene with your subject."),
                io.Latent.Output(display_name="reconstruction",
                                 tooltip="The source branch: the scene redrawn without the edit."),
                io.Mask.Output(display_name="blend_mask", tooltip="Where the edit may change the scene (white)."),
            ],
        )

    @classmethod
    def execute(cls, model, edit_prompts, latent, seed, steps, cfg, cross_replace, self_replace,
                blend_threshold, region=None) -> io.NodeOutput:
        samples = latent["samples"]
        if samples.shape[0] != 1:
            _fail(f"Subject Edit takes one latent, got a batch of {samples.shape[0]}")
        from_photo = INVERTED_KEY in latent
        if not from_photo and samples.abs().max() > 0:
            log.warning("Subject Edit: the latent does not come from Subject Edit Invert, so a scene of its size is "
                        "generated from the seed and its content is not used; to edit a photo, invert it first")
        if from_photo and latent[INVERTED_KEY] != steps:
            log.warning("Subject Edit: the photo was inverted in %d steps and is edited in %d; the published "
                        "edit uses the same count", latent[INVERTED_KEY], steps)
        numbers = dict(cfg=cfg, cross_replace=cross_replace, self_replace=self_replace,
                       blend_threshold=blend_threshold)
        for name, value in numbers.items():
            if not math.isfinite(value):
                _fail(f"{name} must be a finite number, got {value}")
        plan = edit_prompts.plan(steps, cross_replace, self_replace, blend_threshold)
        try:
            allowed = None if region is None else regions.as_map(region, "region")
            if allowed is not None and not allowed.gt(0).any():
                raise regions.RegionError("region is empty (an all-black mask, e.g. LoadImage's mask of a photo "
                                          "without transparency): paint where the edit may change the photo "
                                          "in the mask editor, or disconnect region")
            latents, mask = host_edit.run_edit(model, edit_prompts, plan, samples, from_photo, steps, cfg, seed,
                                               allowed)
        except (editing.EditError, regions.RegionError) as err:
            _fail(err)
        if mask is None or not mask.any():
            log.warning("Subject Edit: the blend mask is empty (threshold %.2f%s): nothing of the scene was allowed "
                        "to change; lower blend_threshold", blend_threshold,
                        "" if region is None else ", inside the region")
            mask = torch.zeros(1, 1, *samples.shape[-2:]) if mask is None else mask
        h, w = samples.shape[-2:]
        image_mask = torch.nn.functional.interpolate(mask.float().cpu(), size=(h * 8, w * 8))[:, 0]
        return io.NodeOutput({"samples": latents[1:2].cpu()}, {"samples": latents[0:1].cpu()}, image_mask)


NODES = [SubjectEditPrompts, SubjectEditPhoto, SubjectEditInvert, SubjectEdit]
