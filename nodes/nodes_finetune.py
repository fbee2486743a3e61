"""BlipFinetune, SaveBlipFinetune, LoadBlipFinetune: the published subject fine-tune as nodes;
LoadLavisFinetune: a fine-tune made with LAVIS (its checkpoint_N.pth).

The recipe lives in ``blip_core/finetune.py``; training inside the host (inference mode,
weight wrappers on a clone, model management, progress, cancel) in ``host_finetune.py``, what
each mode trains in ``host_finetune_modes.py``;
LAVIS's checkpoint layout in ``blip_core/lavis_checkpoint.py``.
"""
import logging
import math
import os

import folder_paths
from comfy_api.latest import io

from ..blip_core import finetune as ft
from ..blip_core import finetune_io, lavis_checkpoint
from ..blip_core.subject import Subject
from . import host_models, paths
from .host_finetune import apply_finetune, apply_unet_weights, finetune, finetune_misfits
from .types import SubjectEncoderType, SubjectType

log = logging.getLogger("blip_diffusion")
FinetuneType = io.Custom("BLIP_FINETUNE")
STEPS_TOOLTIP = ("Optimisation steps. The paper fine-tuned each DreamBench subject for 20 to 120 steps (the "
                 "per-subject table, table 1 of its appendix; mean 76, about 40 s on one A100). Few photos or a "
                 "simple subject need fewer.")


def single_value(value, name):
    """is_input_list hands every input as a list: all but the images must be one value."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ft.FinetuneError(f"BlipFinetune trains one model: '{name}' got {len(value)} values, connect one")
        return value[0]
    return value


def progress_text_to(node_id):
    """A function that shows a line of text under the node while it runs (None without a node id)."""
    if node_id is None:
        return None

    def send(text):
        try:
            from server import PromptServer

            if getattr(PromptServer, "instance", None) is not None:
                PromptServer.instance.send_progress_text(text, node_id)
        except Exception:  # no server (in-process use) or an old host
            pass

    return send


class BlipFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipFinetune",
            display_name="BLIP-Diffusion Fine-tune",
            category="blip_diffusion",
            description=(
                "Fine-tunes BLIP-Diffusion on photos of one subject, as published: the UNet and the subject "
                "embedding (started from the photos' mean embedding) are trained with the caption 'a {category}' "
                "(subject inserted after 'a'), epsilon MSE at uniform random DDPM timesteps, AdamW (lr 5e-6, "
                "weight decay 0.01, constant), batch 3; VAE, text encoder and subject encoder stay frozen. "
                "The input MODEL is not changed. Cancel stops within one step. Photos of any size are each "
                "resized (short side) and centre-cropped to the resolution; connect several via an image list."),
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The BLIP-Diffusion UNet (from Load BLIP-Diffusion). Not modified."),
                io.Clip.Input("clip", tooltip="The BLIP-Diffusion text encoder (frozen; the subject's gradient "
                                              "flows through it)."),
                io.Vae.Input("vae", tooltip="The SD 1.5 VAE, to encode the photos (frozen)."),
                SubjectEncoderType.Input("subject_encoder", tooltip="The subject encoder: it gives the starting "
                                                                    "subject embedding (frozen)."),
                io.Image.Input("images", tooltip="Photos of the subject: a batch, or a list of images of any sizes "
                                                 "(e.g. Load Image Dataset from Folder)."),
                io.String.Input("category", default="dog",
                                tooltip="What the subject is ('dog', 'teapot'); the caption is 'a {category}'."),
                io.Int.Input("steps", default=ft.PUBLISHED_STEPS, min=1, max=10000, tooltip=STEPS_TOOLTIP),
                io.Float.Input("learning_rate", default=ft.PUBLISHED_LR, min=0.0, max=1.0, step=1e-7,
                               tooltip="AdamW learning rate, constant. Published (full mode): 5e-6. LoRA mode "
                                       "usually needs more, e.g. 1e-4."),
                io.Int.Input("batch_size", default=ft.PUBLISHED_BATCH, min=1, max=64,
                             tooltip="Photos per step, drawn at random (with replacement) from the connected photos. "
                                     "Published: 3."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds every random choice: which photos, timesteps, noise, VAE samples and the "
                                     "LoRA initialisation. Same seed and inputs: same result."),
                io.Int.Input("resolution", default=ft.PUBLISHED_RESOLUTION, min=64, max=2048, step=64,
                             tooltip="Training image size (short side resized, then centre-cropped). Published: 512."),
                io.Combo.Input("mode", options=list(finetune_io.FINETUNE_MODES), default="full",
                               tooltip="full: the whole UNet is trained, as published (needs memory for an fp32 copy "
                                       "of the UNet plus AdamW state). lora: low-rank adapters (plus bias and norm "
                                       "deltas) for smaller GPUs."),
                io.Int.Input("lora_rank", default=16, min=1, max=256, tooltip="Rank of the LoRA adapters (lora mode)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in the backward pass: much less memory, about a third "
                                         "more time. Same result."),
                io.Combo.Input("preprocess", options=["lavis", "diffusers"], default="lavis", optional=True,
                               tooltip="How the subject encoder sees the photos for the starting embedding: lavis "
                                       "(short side to 224, centre crop; as the published fine-tuning) or diffusers "
                                       "(stretched to 224x224)."),
                io.Boolean.Input("sample_latents", default=True, optional=True,
                                 tooltip="On (published): a fresh VAE posterior sample of each photo every step. Off: "
                                         "the posterior mean."),
            ],
            outputs=[
                io.Model.Output(tooltip="The fine-tuned UNet (the input MODEL plus the trained change)."),
                SubjectType.Output(tooltip="The fine-tuned subject embedding, for Subject Conditioning with this "
                                           "MODEL."),
                io.Image.Output(display_name="loss_plot", tooltip="The training loss per step."),
                FinetuneType.Output(display_name="finetune", tooltip="The trained weights and subject, for Save "
                                                                     "BLIP-Diffusion Fine-tune."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, subject_encoder, images, category, steps, learning_rate, batch_size, seed,
                resolution, mode, lora_rank, gradient_checkpointing, preprocess="lavis",
                sample_latents=True) -> io.NodeOutput:
        args = {k: single_value(v, k) for k, v in dict(
            model=model, clip=clip, vae=vae, subject_encoder=subject_encoder, category=category, steps=steps,
            learning_rate=learning_rate, batch_size=batch_size, seed=seed, resolution=resolution, mode=mode,
            lora_rank=lora_rank, gradient_checkpointing=gradient_checkpointing, preprocess=preprocess,
            sample_latents=sample_latents).items()}
        args["latent_sampling"] = args.pop("sample_latents")
        node_id = getattr(cls.hidden, "unique_id", None) if getattr(cls, "hidden", None) is not None else None
        out_model, subject, plot, weights = finetune(images=images, progress_text=progress_text_to(node_id), **args)
        return io.NodeOutput(out_model, subject, plot, weights)


class SaveBlipFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveBlipFinetune",
            display_name="Save BLIP-Diffusion Fine-tune",
            category="blip_diffusion",
            description=("Saves a fine-tune (the UNet change: full difference or LoRA, in the host's LoRA key layout, "
                         "plus the fine-tuned subject) as one .safetensors file in models/blip_finetunes/. Written "
                         "to a temporary file and renamed: never half-written. Existing files are kept unless "
                         "overwrite is on."),
            inputs=[
                FinetuneType.Input("finetune", tooltip="From BLIP-Diffusion Fine-tune."),
                *paths.save_name_inputs("my_finetune"),
            ],
            outputs=[io.String.Output(display_name="file", tooltip="The saved file's name.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, finetune, name, overwrite) -> io.NodeOutput:
        folder = folder_paths.get_folder_paths(paths.FINETUNE_FOLDER)[0]
        path = finetune_io.save_finetune(folder, name, finetune.unet_sd, finetune.subject, finetune.mode,
                                         finetune.meta, overwrite=overwrite)
        return io.NodeOutput(os.path.basename(path))


class LoadBlipFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadBlipFinetune",
            display_name="Load BLIP-Diffusion Fine-tune",
            category="blip_diffusion",
            description=("Loads a fine-tune saved by Save BLIP-Diffusion Fine-tune and applies its UNet change to "
                         "a base MODEL (the same one it was trained from) through the host's LoRA loader; also "
                         "returns the fine-tuned subject. Same base, strength 1: the same model as the fine-tune "
                         "node's output."),
            inputs=[
                io.Model.Input("model", tooltip="The base UNet the fine-tune was trained from."),
                io.Combo.Input("finetune_name", options=paths.finetune_files(),
                               tooltip="A .safetensors file in models/blip_finetunes/."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scales the UNet change; 1.0 is the fine-tune as trained."),
            ],
            outputs=[
                io.Model.Output(tooltip="The base MODEL with the fine-tune applied."),
                SubjectType.Output(tooltip="The fine-tuned subject, for Subject Conditioning."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, finetune_name, **_):
        return paths.file_stamp(paths.FINETUNE_FOLDER, finetune_name)

    @classmethod
    def execute(cls, model, finetune_name, strength) -> io.NodeOutput:
        path = paths.saved_file_path(paths.FINETUNE_FOLDER, finetune_name, "fine-tune")
        if not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, got {strength}")
        unet_sd, subject, _mode, _meta = finetune_io.load_finetune(path)
        problems = []
        misfits = finetune_misfits(model, unet_sd)
        if misfits:
            problems.append(f"{len(misfits)} of its tensors have no place of their shape in it "
                            f"({'; '.join(misfits[:3])})")
        config = host_models.unet_config(model)
        width = config.get("context_dim")
        if width is not None and subject.width != width:
            problems.append(f"its subject is {subject.width} wide and this MODEL's UNet reads {width}-wide text")
        if problems:
            raise ValueError(f"{finetune_name} does not fit this MODEL: {' and '.join(problems)}. Connect the base "
                             "model it was fine-tuned from (Load BLIP-Diffusion's MODEL)")
        return io.NodeOutput(apply_finetune(model, unet_sd, strength), subject)


class LoadLavisFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadLavisFinetune",
            display_name="Load LAVIS Fine-tune",
            category="blip_diffusion",
            description=("Loads a fine-tune made with LAVIS (the checkpoint_N.pth its BLIP-Diffusion fine-tuning "
                         "writes) onto the base MODEL: the checkpoint's UNet weights take the place of the base's "
                         "(a checkpoint with only part of the UNet replaces that part) and its fine-tuned subject "
                         "(ctx_embeddings_cache) becomes a SUBJECT. Read with torch.load(weights_only=True) only: "
                         "a file that needs other Python objects is refused. The input MODEL is not changed."),
            inputs=[
                io.Model.Input("model", tooltip="The base UNet the checkpoint was fine-tuned from (Load "
                                                "BLIP-Diffusion's MODEL). Not modified."),
                io.Combo.Input("checkpoint_name", options=paths.finetune_files(lavis=True),
                               tooltip="A LAVIS checkpoint (.pth or .pt) in models/blip_finetunes/, e.g. "
                                       "checkpoint_40.pth from the fine-tuning run's output folder."),
                io.String.Input("category", default="",
                                tooltip="What the subject is ('dog'); used by Subject Conditioning as the "
                                        "category word. Empty: the subject_text of the run's config, saved in "
                                        "the checkpoint."),
            ],
            outputs=[
                io.Model.Output(tooltip="The base MODEL with the checkpoint's UNet weights."),
                SubjectType.Output(tooltip="The fine-tuned subject, for Subject Conditioning with this MODEL."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, checkpoint_name, **_):
        return paths.file_stamp(paths.FINETUNE_FOLDER, checkpoint_name)

    @classmethod
    def execute(cls, model, checkpoint_name, category) -> io.NodeOutput:
        path = paths.saved_file_path(paths.FINETUNE_FOLDER, checkpoint_name, "LAVIS checkpoint",
                                     ": copy the checkpoint_N.pth from LAVIS's output folder there")
        host_models.check_weights_file(path, "LAVIS checkpoint")
        ft = lavis_checkpoint.read_checkpoint(path)
        category = (category or "").strip() or ft.category
        if not category:
            raise ValueError(f"{checkpoint_name} does not name its subject's category (no subject_text in the run's "
                             "config): type it in category, e.g. 'dog'")
        new_model, replaced, total = apply_unet_weights(model, ft.unet, subject_width=ft.subject.shape[-1])
        log.info("LoadLavisFinetune: %s replaced %d of the %d UNet tensors%s", checkpoint_name, replaced, total,
                 "" if replaced == total else " (a partial checkpoint: the others keep the base model's weights)")
        if ft.not_applied:
            log.warning("LoadLavisFinetune: %s also holds %d tensors of other parts that this node does not apply "
                        "(%s): renders use the connected text encoder and VAE", checkpoint_name,
                        len(ft.not_applied), lavis_checkpoint.few_keys(ft.not_applied))
        meta = {"source": "lavis", "file": checkpoint_name, "step": ft.step, "unet_tensors": replaced,
                "finetuned": True}
        return io.NodeOutput(new_model, Subject(ft.subject, category, meta))


NODES = [BlipFinetune, SaveBlipFinetune, LoadBlipFinetune, LoadLavisFinetune]
