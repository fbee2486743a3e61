"""Host glue for BlipFinetune: subject fine-tuning as published, trained inside the host.

The recipe and its evidence are in ``blip_core/finetune.py``; what each mode (full UNet, LoRA)
trains, exports and restores in ``host_finetune_modes.py``. This module is the rest of the host
glue, done the way the host's own trainer (``comfy_extras/nodes_train.py``) does it:

* training leaves the host's inference mode explicitly (``torch.inference_mode(False)`` and
  ``torch.enable_grad()``);
* the UNet is trained on a *clone* of the input MODEL loaded with ``load_models_gpu``; the
  session's exit (also on error or cancel) restores it, removes every weight wrapper and
  gradient-checkpointing patch and frees the training state: the input model ends exactly as
  it began;
* AdamW updates the tensors during the backward pass, a bucket at a time (torch's fused kernel),
  so no UNet-sized gradient buffer exists; the host's ProgressBar advances per step and the loss is
  reported as progress text; the host's cancel is checked before every step;
* the host's CLIP is frozen but the subject's gradient flows through it: a CLIP clone gets
  identity weight wrappers (the host then hands fresh weight copies to each layer, which
  autograd may keep; the loaded weights are inference tensors it may not) and the encode runs
  under a saved-tensor hook that snapshots activations (the host's CLIP layers add their
  residuals in place);
* the result becomes a MODEL through the host's LoRA loader (``load_lora_for_models``) from
  the same tensors a saved file holds, so a reload is the identical model.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

import comfy.model_base
import comfy.model_management as mm
import comfy.sd
import comfy.utils

from ..blip_core import finetune as ft
from ..blip_core import prompting, schedule
from ..blip_core.finetune_plot import loss_plot
from ..blip_core.subject import Subject
from . import host_clip, host_models
from .host_finetune_modes import check_mode, finetune_mode, wrappable_modules

log = logging.getLogger("blip_diffusion")


@dataclass
class FinetuneWeights:
    """What Save BLIP-Diffusion Fine-tune writes: the UNet change, the subject and how they were made."""
    unet_sd: dict
    subject: Subject
    mode: str
    meta: dict = field(default_factory=dict)


class Trained(NamedTuple):
    unet_sd: dict            # the UNet change in the host's LoRA layout (CPU tensors)
    subject: torch.Tensor    # the trained subject embedding (CPU)


# -- the training session ------------------------------------------------------------------------------
class _Fresh:
    """Identity: its presence makes the host copy the weight before each use (autograd may keep a copy)."""

    def __call__(self, w):
        return w


@contextlib.contextmanager
def _frozen(*modules: torch.nn.Module):
    """requires_grad off for these modules' own parameters while training; the flags come back after."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in saved:
            if p.requires_grad:
                p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            if p.requires_grad != flag:
                with torch.inference_mode(p.is_inference()):  # inference tensors: only inside inference mode
                    p.requires_grad_(flag)


def _snapshot_if_grad(t: torch.Tensor):
    return t.clone() if t.requires_grad else t


def _identity(t):
    return t


class TrainingSession:
    """Clones of MODEL and CLIP set up for training; ``with`` loads them, and its exit undoes it all.

    Inside: ``unet(x_t, t, cond) -> eps``, ``text(layout)`` -> a text function, ``named_parameters``
    (the UNet's trainable tensors, host key names), ``device``, ``export()`` -> the UNet change in
    the host's LoRA layout. Each setup step puts its undo on one exit stack as it is made (the
    mode's restore, frozen flags, weight wrappers, checkpointing patches, and what
    ``close_on_exit`` is given), so a normal end, an error and a cancel all leave the same way.
    """

    def __init__(self, model, clip, mode: str = "full", rank: int = 16, seed: int = 0,
                 gradient_checkpointing: bool = False):
        check_mode(mode)
        if not isinstance(getattr(model, "model", None), comfy.model_base.BaseModel):
            raise ft.FinetuneError("the MODEL input is not a diffusion model the host can train")
        if model.model.model_type != comfy.model_base.ModelType.EPS:
            raise ft.FinetuneError(f"BLIP-Diffusion fine-tuning trains an epsilon-prediction SD 1.x UNet; this MODEL "
                                   f"predicts {model.model.model_type.name}")
        self.gradient_checkpointing = gradient_checkpointing
        self.unet_patcher = model.clone()
        self.clip = clip.clone()
        self.mode = finetune_mode(mode, self.unet_patcher, rank, seed)
        self.wrappers: set[int] = set()   # ids of the weight wrappers this session added
        self.named_parameters: list[tuple[str, torch.nn.Parameter]] = []
        self._exit = contextlib.ExitStack()

    @property
    def diffusion_model(self):
        return self.unet_patcher.model.diffusion_model

    def __enter__(self):
        with contextlib.ExitStack() as undo:
            undo.callback(self._remove_wrappers)
            frozen = [self.clip.cond_stage_model] + ([self.diffusion_model] if self.mode.freezes_base else [])
            undo.enter_context(_frozen(*frozen))
            self.mode.attach(self._add_wrapper)
            self._wrap_clip()
            undo.enter_context(ft.gradient_checkpointing(ft.checkpoint_targets(self.diffusion_model),
                                                         self.gradient_checkpointing))
            # Everything else leaves the device; both models stay loaded for the whole run, since
            # loading the CLIP again per step could evict the UNet mid-training.
            mm.load_models_gpu([self.unet_patcher, self.clip.patcher], memory_required=1e20, force_full_load=True)
            self.device = torch.device(self.unet_patcher.load_device)
            undo.callback(self.mode.restore)  # before trainable(): a half-made swap is undone too
            self.named_parameters = self.mode.trainable()
            self._exit = undo.pop_all()
        return self

    def close_on_exit(self, closable) -> None:
        """``closable.close()`` runs first on exit (before the UNet is restored)."""
        self._exit.callback(closable.close)

    def __exit__(self, *exc):
        self.named_parameters = []
        self._exit.close()
        return False

    def _add_wrapper(self, patcher, key: str, wrapper) -> None:
        patcher.add_weight_wrapper(key, wrapper)
        self.wrappers.add(id(wrapper))

    def _wrap_clip(self):
        for name, m in wrappable_modules(self.clip.cond_stage_model, "", strict=False):
            for attr in ("weight", "bias"):
                if getattr(m, attr, None) is not None:
                    self._add_wrapper(self.clip.patcher, f"{name}.{attr}", _Fresh())

    def _remove_wrappers(self):
        """The host copied our wrappers into the shared modules when it loaded the clones: take them out there."""
        for root in (self.diffusion_model, self.clip.cond_stage_model):
            for m in root.modules():
                for attr in ("weight_function", "bias_function"):
                    funcs = m.__dict__.get(attr)
                    if funcs:
                        m.__dict__[attr] = [f for f in funcs if id(f) not in self.wrappers]
        self.unet_patcher.weight_wrapper_patches.clear()
        self.clip.patcher.weight_wrapper_patches.clear()

    # the model functions ------------------------------------------------------------------
    def unet(self, x, t, cond):
        topts = dict(self.unet_patcher.model_options.get("transformer_options", {}))
        return self.diffusion_model(x.float(), t.float(), context=cond.float(), transformer_options=topts)

    def text(self, layout: prompting.TokenLayout):
        """subject (1, 16, D) -> (1, layout.used, D): the caption with the subject spliced in at position 2.

        The same pairs as SubjectConditioning's (host_clip.token_pairs), but not through
        ``encode_from_tokens``: that asks model management to load the CLIP at every step (the
        session loads both models once, see ``__enter__``), and the encode runs under the
        saved-tensor hook below."""
        clip = self.clip

        def encode(subject):
            pairs = host_clip.token_pairs(layout, subject[0])
            csm = clip.cond_stage_model
            csm.reset_clip_options()
            if clip.layer_idx is not None:
                csm.set_clip_options({"layer": clip.layer_idx})
            with torch.autograd.graph.saved_tensors_hooks(_snapshot_if_grad, _identity):
                cond = csm.encode_token_weights({"l": [pairs]})[0]
            return cond[:, :layout.used].to(subject.device)

        return encode

    def export(self) -> dict[str, torch.Tensor]:
        """The UNet change in the host's LoRA key layout (CPU tensors); the trainable tensors are dropped
        (full mode: the UNet's own are back in place)."""
        self.named_parameters = []
        return self.mode.export()


@contextlib.contextmanager
def training(model, clip, layout: prompting.TokenLayout, init: torch.Tensor, mode: str = "full", rank: int = 16,
             seed: int = 0, lr: float = ft.PUBLISHED_LR, gradient_checkpointing: bool = False, on_grad=None):
    """A ready ``ft.Trainer`` (UNet + subject, published optimiser) inside a TrainingSession.

    Everything it allocates (trainable copies, AdamW state, hooks, wrappers) is released on exit,
    also when training stops with an error or the host's cancel.
    """
    with TrainingSession(model, clip, mode, rank, seed, gradient_checkpointing) as session:
        device = session.device
        subject = torch.nn.Parameter(init.detach().clone().float().to(device))
        autocast, scaler = contextlib.nullcontext, None
        # bf16 where the card has it, else fp16 (with loss scaling) where the host trusts fp16, else fp32.
        if device.type != "cpu" and mm.should_use_bf16(device):
            autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
        elif device.type != "cpu" and mm.should_use_fp16(device):
            autocast = functools.partial(torch.autocast, device.type, dtype=torch.float16)
            scaler = torch.amp.GradScaler(device.type)
        # Parameters are updated during the backward pass (no UNet-sized gradient buffer), except
        # with fp16 autocast, whose GradScaler needs every gradient before the update.
        optimizer = ft.make_optimizer(session.named_parameters + [("subject", subject)], lr,
                                      in_backward=scaler is None, on_grad=on_grad)
        trainer = ft.Trainer(session.unet, session.text(layout), subject, optimizer, autocast=autocast,
                             scaler=scaler)
        session.close_on_exit(trainer)
        yield TrainingRun(trainer, session)


@dataclass
class TrainingRun:
    trainer: ft.Trainer
    session: TrainingSession

    def finish(self) -> Trained:
        """The UNet change and the trained subject; frees the optimiser first (full mode's export needs the room)."""
        subject = self.trainer.subject.detach().float().cpu().clone()
        self.trainer.close()
        return Trained(self.session.export(), subject)


# -- inputs ------------------------------------------------------------------------------------
def host_vae_moments(vae, pixels: torch.Tensor, sample: bool = True):
    """VAE posterior (mean, std) of (N, H, W, 3) pixels in [0, 1], in the VAE's own latent scale.

    The host's ``VAE.encode`` returns the posterior mode; its encoder's Gaussian regulariser is
    briefly replaced by an identity to read both moments from the same host code path. VAEs
    without that regulariser give the mode and no std (training then uses the mean).
    """
    from comfy.ldm.models.autoencoder import DiagonalGaussianRegularizer

    fsm = getattr(vae, "first_stage_model", None)
    reg = getattr(fsm, "regularization", None)
    with torch.no_grad():
        if sample and isinstance(reg, DiagonalGaussianRegularizer):
            class _Moments(torch.nn.Module):
                def forward(self, z):
                    return z, None

            fsm.regularization = _Moments()
            try:
                params = vae.encode(pixels)
            except RuntimeError as e:
                # The host's out-of-memory retry encodes in tiles sized for the latent's channels, not
                # for both moments; its plain encode (the posterior mean) still works there.
                log.warning("BlipFinetune: could not read the VAE posterior (%s); training on the posterior mean",
                            str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
                params = None
            finally:
                fsm.regularization = reg
            if params is not None and params.shape[1] == 2 * vae.latent_channels:
                mean, std = ft.moments_from_parameters(params.float())
                return mean.clone(), std.clone()
            if params is not None:
                log.warning("BlipFinetune: unexpected VAE encoder output %s; training on the posterior mean",
                            tuple(params.shape))
        elif sample:
            log.warning("BlipFinetune: this VAE has no Gaussian posterior to sample; training on its encoding")
        return vae.encode(pixels).float().clone(), None


def initial_subject(subject_encoder, images: list[torch.Tensor], category: str, preprocess: str) -> torch.Tensor:
    """Mean subject embedding of the training photos, each encoded on its own (sizes may differ)."""
    embs = [subject_encoder.encode(img[None], category, preprocessing=preprocess) for img in images]
    return torch.stack([e.float() for e in embs]).mean(dim=0)


def check_schedule(model) -> float:
    """The MODEL must use SD 1.x's noise schedule (the published DDPM targets); returns its latent scale."""
    ms = model.get_model_object("model_sampling")
    sigmas = getattr(ms, "sigmas", None)
    ours = schedule.alphas_cumprod().double()
    if sigmas is None or sigmas.numel() != ours.numel():
        raise ft.FinetuneError("this MODEL has no 1000-step discrete noise schedule; BLIP-Diffusion fine-tuning "
                               "needs an SD 1.x UNet")
    theirs = 1.0 / (1.0 + sigmas.double().cpu() ** 2)
    if ((theirs - ours).abs() / ours).max().item() > 1e-4:
        raise ft.FinetuneError("this MODEL's noise schedule differs from SD 1.5's (scaled_linear 0.00085 -> 0.012) "
                               "that BLIP-Diffusion was trained and fine-tuned with")
    return float(model.get_model_object("latent_format").scale_factor)


def check_parts_fit(model, text_width: int, vae) -> None:
    """The UNet reads the CLIP's width and the VAE's latent channels, checked before any work is done."""
    config = host_models.unet_config(model)
    context, channels = config.get("context_dim"), config.get("in_channels")
    if context is not None and context != text_width:
        raise ft.FinetuneError(f"this MODEL's UNet reads {context}-wide text but the CLIP is {text_width} wide: "
                               "connect the MODEL and CLIP of one BLIP-Diffusion model (Load BLIP-Diffusion)")
    latent = getattr(vae, "latent_channels", None)
    if channels is not None and latent is not None and latent != channels:
        raise ft.FinetuneError(f"the VAE makes {latent}-channel latents but this MODEL's UNet takes {channels}: "
                               "connect the VAE of the same BLIP-Diffusion model (Load BLIP-Diffusion)")


# -- the node's work --------------------------------------------------------------------------------
def finetune(model, clip, vae, subject_encoder, images, category: str, steps: int = ft.PUBLISHED_STEPS,
             learning_rate: float = ft.PUBLISHED_LR, batch_size: int = ft.PUBLISHED_BATCH, seed: int = 0,
             resolution: int = ft.PUBLISHED_RESOLUTION, mode: str = "full", lora_rank: int = 16,
             gradient_checkpointing: bool = True, preprocess: str = "lavis", latent_sampling: bool = True,
             progress_text: Callable[[str], None] | None = None):
    """The node's work, callable in-process: returns (MODEL, Subject, loss plot IMAGE, FinetuneWeights).

    ``progress_text`` receives each step's line ("step 3/76  loss 0.12345")."""
    ft.check_settings(steps, learning_rate, batch_size, resolution)
    check_mode(mode)
    if mode == "lora" and lora_rank < 1:
        raise ft.FinetuneError(f"lora_rank must be at least 1 (got {lora_rank})")
    with torch.inference_mode(False), torch.enable_grad():
        photos = ft.split_images(images)
        subject_text, caption = ft.training_caption(category)
        width = host_clip.text_width(clip)
        layout = host_clip.caption_layout(clip, caption)
        scale = check_schedule(model)
        check_parts_fit(model, width, vae)
        if getattr(model, "patches", None):
            log.warning("BLIP-Diffusion Fine-tune: the MODEL already carries weight patches on %d tensors (a LoRA or "
                        "another fine-tune); this fine-tune learns the change on top of them, so load its file onto "
                        "the same patched MODEL", len(model.patches))

        pixels = ft.target_pixels(photos, resolution)
        mean, std = host_vae_moments(vae, pixels, sample=latent_sampling)
        init = initial_subject(subject_encoder, photos, subject_text, preprocess)
        if init.shape[-1] != width:
            raise ft.FinetuneError(f"the subject encoder gives {init.shape[-1]}-wide vectors but the CLIP is {width} "
                                   "wide: connect the parts of one BLIP-Diffusion model")

        pbar = comfy.utils.ProgressBar(steps)

        def on_step(i, loss):
            pbar.update_absolute(i + 1, steps)
            if progress_text is not None:
                progress_text(f"step {i + 1}/{steps}  loss {loss:.5f}")

        with training(model, clip, layout, init, mode=mode, rank=lora_rank, seed=seed, lr=learning_rate,
                      gradient_checkpointing=gradient_checkpointing) as run:
            device = run.session.device
            result = ft.run(run.trainer, mean.to(device), None if std is None else std.to(device), steps=steps,
                            batch_size=batch_size, seed=seed, device=device, on_step=on_step,
                            should_stop=mm.throw_exception_if_processing_interrupted, latent_scale=scale)
            unet_sd, trained = run.finish()

    meta = {"category": subject_text, "caption": caption, "mode": mode, "steps": steps,
            "learning_rate": learning_rate, "batch_size": batch_size, "seed": seed, "resolution": resolution,
            "images": len(photos), "lora_rank": lora_rank if mode == "lora" else None,
            "latent_sampling": bool(latent_sampling and std is not None), "preprocess": preprocess,
            "encoder": getattr(subject_encoder, "name", None),
            "encoder_fingerprint": getattr(subject_encoder, "fingerprint", None),
            "losses": [round(v, 6) for v in result.losses]}
    subject_out = Subject(trained, subject_text, {**meta, "finetuned": True})
    weights = FinetuneWeights(unet_sd, subject_out, mode, meta)
    out_model = apply_finetune(model, unet_sd)
    plot = loss_plot(result.losses, title=f"BLIP-Diffusion fine-tune ({mode}): loss per step")
    return out_model, subject_out, plot, weights


# -- the result as a MODEL ------------------------------------------------------------------------
def apply_finetune(model, unet_sd: dict, strength: float = 1.0):
    """The base MODEL with a fine-tune's UNet change applied through the host's LoRA loader."""
    new_model, _ = comfy.sd.load_lora_for_models(model, None, unet_sd, strength, 0)
    return new_model


def finetune_misfits(model, unet_sd: dict) -> list[str]:
    """What of a fine-tune file (host LoRA layout: ``.diff``, ``.diff_b``, ``.lora_up/.lora_down.weight``)
    has no place of its shape in this MODEL's UNet (the host's loader would skip it with a log line)."""
    own = {k: tuple(v.shape) for k, v in model.model_state_dict().items() if k.startswith("diffusion_model.")}
    out = []
    for key, value in unet_sd.items():
        for suffix, param in ((".diff", ".weight"), (".diff_b", ".bias"), (".lora_up.weight", ".weight"),
                              (".lora_down.weight", ".weight")):
            if key.endswith(suffix):
                target = own.get(key[:-len(suffix)] + param)
                break
        else:
            continue   # the host's loader reads only these here
        shape = tuple(value.shape)
        if suffix == ".lora_up.weight":
            fits = target is not None and shape[0] == target[0]
        elif suffix == ".lora_down.weight":   # the host's trainer flattens a conv's input: (rank, in * kh * kw)
            fits = target is not None and math.prod(shape[1:]) == math.prod(target[1:])
        else:
            fits = shape == target
        if not fits:
            out.append(f"{key} is {shape}" + (f", this MODEL's {target}" if target else " with no place in it"))
    return out


def apply_unet_weights(model, diffusers_sd: dict, subject_width: int | None = None):
    """The base MODEL with UNet tensors given under their diffusers names put in place of its own.

    The names become the host's through its own key map for this MODEL's UNet; the tensors
    become ``set`` patches (``<module>.set_weight`` in the LoRA key layout) applied by the same
    LoRA loader as ``apply_finetune``: the input MODEL is not changed and no weight is copied
    until the host loads the model. Returns (MODEL, tensors replaced, tensors of the UNet).
    """
    unet_config = model.model.model_config.unet_config
    if "num_res_blocks" not in unet_config:
        raise ValueError("this MODEL is not an SD 1.x-style UNet: connect the MODEL of Load BLIP-Diffusion (the base "
                         "model the checkpoint was fine-tuned from)")
    width = unet_config.get("context_dim")
    if subject_width is not None and width is not None and subject_width != width:
        raise ValueError(f"the checkpoint's subject is {subject_width} wide but this MODEL's UNet reads {width}-wide "
                         "text: connect the BLIP-Diffusion model the checkpoint was fine-tuned from")
    names = comfy.utils.unet_to_diffusers(unet_config)
    own = {k: v for k, v in model.model_state_dict().items() if k.startswith("diffusion_model.")}
    patches, unknown, wrong = {}, [], []
    for key, value in diffusers_sd.items():
        host = "diffusion_model." + names[key] if key in names else None
        if host not in own:
            unknown.append(key)
        elif tuple(value.shape) != tuple(own[host].shape):
            wrong.append(f"{key} is {tuple(value.shape)}, this MODEL's {tuple(own[host].shape)}")
        else:
            patches[(host[:-len(".weight")] if host.endswith(".weight") else host) + ".set_weight"] = value
    if unknown or wrong:
        counts = [f"{n} {what}" for n, what in ((len(wrong), "of another shape"), (len(unknown), "with no place in it"))
                  if n]
        shown = sorted(wrong)[:3] + sorted(unknown)[:max(0, 3 - len(wrong))]
        raise ValueError(f"the checkpoint's UNet does not fit this MODEL: tensors {' and '.join(counts)} "
                         f"({'; '.join(shown)}). Connect the base model the checkpoint was fine-tuned from")
    return (apply_finetune(model, patches) if patches else model.clone()), len(patches), len(own)
