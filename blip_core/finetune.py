"""Subject fine-tuning as published (LAVIS ``BlipDiffusion.forward`` + its fine-tune config).

Host-independent: the UNet, the text encoder and the parameters come in as callables and
tensors, so the same step runs inside ComfyUI (nodes/nodes_finetune.py) and in tests.

The recipe, with where each fact comes from (LAVIS = salesforce/LAVIS, ``lavis/``):

* Trained: the UNet and the subject embedding. The embedding starts as the mean of the
  training images' subject embeddings, computed once by the encoder
  (``BlipDiffusion.before_training``: ``ctx_embeddings.mean(dim=0, keepdim=True)`` made an
  ``nn.Parameter``); the VAE, text encoder, vision encoder, Q-Former and projection are
  frozen (``freeze_modules``; with the embedding cached the encoder is never called again).
* Text: the caption of every image is ``f"a {subject}"`` (``SubjectDrivenTextToImageDataset``),
  after LAVIS' ``blip_caption`` cleaning (lower case, ``.!"()*#:;~`` to spaces). It is
  tokenised **without padding** (``padding="do_not_pad"``) and **without** the inference-time
  prompt amplification; the 16 subject vectors are inserted at position 2, after ``[BOS, "a"]``.
  So for "a dog" the text encoder sees 2 + 16 + 2 = 20 positions and the UNet cross-attends
  to those 20, not to 77. (A host CLIP needs 77 positions: pad after EOS and keep the first
  20 outputs; the causal mask makes them identical to an unpadded encode.)
* Targets: resize the short side to the resolution (PIL BICUBIC), centre-crop, to [-1, 1]
  (``blip_diffusion_tgt_image_train``); VAE posterior *sample* (``latent_dist.sample()``)
  x 0.18215; a fresh sample every step, since the image is re-encoded in every ``forward``.
* Noise: DDPM forward process at ``timesteps ~ randint(0, 1000)`` per image with the SD 1.5
  ``scaled_linear`` betas 0.00085 -> 0.012 (``DDPMScheduler.add_noise``); epsilon target,
  ``F.mse_loss(pred.float(), noise.float(), reduction="mean")``.
* Optimiser: AdamW, lr 5e-6 constant (``constant_lr``, no warm-up), betas (0.9, 0.999),
  eps 1e-8, weight decay 0.01 on parameters with 2+ dimensions and none on biases and norm
  weights (LAVIS' ``get_optimizer_params``: ``p.ndim < 2 or "bias"/"ln"/"bn" in name`` go to
  a group with weight decay 0; for this UNet the name test adds nothing to the ``ndim`` test);
  batch size 3; mixed precision on a GPU (``amp: True``).

Deterministic batches (our choice; LAVIS draws from a shuffled, 100000x repeated image list,
which amounts to independent uniform draws): one ``torch.Generator`` seeded with ``seed``;
each step draws, in this order, the image indices ``randint(n_images, (B,))`` (with
replacement), the timesteps ``randint(0, 1000, (B,))``, the noise ``randn(B, 4, h, w)`` and
the posterior sample's noise ``randn(B, 4, h, w)``.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .preprocess import resize_center_crop, to_uint8_rgb
from .schedule import LATENT_SCALE, NUM_TRAIN_TIMESTEPS, alphas_cumprod

# The published fine-tuning settings (LAVIS finetune-db-*.yaml, paper appendix table 1).
PUBLISHED_STEPS = 76          # mean of the per-subject steps in the appendix's table 1 (20 to 120)
PUBLISHED_LR = 5e-6
PUBLISHED_BATCH = 3
PUBLISHED_RESOLUTION = 512
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.01


class FinetuneError(ValueError):
    """Bad input for fine-tuning (shown to the user as is)."""


class NonFiniteLoss(FinetuneError):
    """The loss became inf/NaN: training stops, nothing is returned."""


# -- text ----------------------------------------------------------------------------------
def clean_caption(text: str, max_words: int = 50) -> str:
    """LAVIS ``blip_caption`` processing: lower case, ``.!"()*#:;~`` -> space, squeeze spaces."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def training_caption(category: str) -> tuple[str, str]:
    """(cleaned category, caption) as the LAVIS fine-tuning dataset builds them."""
    subject = clean_caption(category or "")
    if not subject:
        raise FinetuneError("category is empty: name what the subject is, e.g. 'dog'")
    return subject, clean_caption(f"a {subject}")


# -- images -> training targets ----------------------------------------------------------------
def split_images(images) -> list[torch.Tensor]:
    """A host IMAGE batch, or a list of them (any sizes), as single (H, W, C) images."""
    if isinstance(images, torch.Tensor):
        images = [images]
    out = []
    for batch in images or []:
        if not isinstance(batch, torch.Tensor):
            raise FinetuneError(f"expected images, got {type(batch).__name__}")
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4:
            raise FinetuneError(f"expected an image batch (B, H, W, C), got shape {tuple(batch.shape)}")
        out.extend(batch[i] for i in range(batch.shape[0]))
    if not out:
        raise FinetuneError("no training images: connect at least one photo of the subject")
    for img in out:
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise FinetuneError(f"an empty training image ({img.shape[0]}x{img.shape[1]}): every photo needs pixels")
    return out


def target_pixels(images: list[torch.Tensor], resolution: int) -> torch.Tensor:
    """Each image resized (short side) and centre-cropped to ``resolution``: (N, res, res, 3) in [0, 1].

    Every image is processed on its own, so photos of different sizes and aspect ratios are
    fine. Pixels go through 8-bit RGB (alpha over white) as the published PIL pipeline does;
    ``x * 2 - 1`` of the result is the published [-1, 1] target exactly.
    """
    out = []
    for img in images:
        u8 = to_uint8_rgb(img[None])[0].numpy()
        pil = resize_center_crop(Image.fromarray(u8, "RGB"), resolution)
        out.append(torch.from_numpy(np.array(pil)))
    return torch.stack(out).float() / 255.0


# -- noise (the schedule itself: blip_core/schedule.py) ---------------------------------------
def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              acp: torch.Tensor) -> torch.Tensor:
    """The DDPM forward process ``sqrt(a) x0 + sqrt(1 - a) eps`` (diffusers' ``add_noise`` arithmetic)."""
    acp = acp.to(device=latents.device, dtype=latents.dtype)
    timesteps = timesteps.to(latents.device)
    shape = (-1,) + (1,) * (latents.ndim - 1)
    sqrt_a = (acp[timesteps] ** 0.5).flatten().reshape(shape)
    sqrt_1ma = ((1 - acp[timesteps]) ** 0.5).flatten().reshape(shape)
    return sqrt_a * latents + sqrt_1ma * noise


def posterior_sample(mean: torch.Tensor, std: torch.Tensor | None, eps: torch.Tensor,
                     scale: float = LATENT_SCALE) -> torch.Tensor:
    """``(mean + std * eps) * scale``: the VAE posterior sample in the UNet's scale (std None: the mean)."""
    z = mean if std is None else mean + std * eps.to(mean)
    return z * scale


def moments_from_parameters(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of a diagonal Gaussian from the VAE encoder's 2C channels (logvar clamped to [-30, 20])."""
    mean, logvar = torch.chunk(params, 2, dim=1)
    return mean, torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))


# -- batches ---------------------------------------------------------------------------------
@dataclass
class StepDraw:
    indices: torch.Tensor      # (B,) image indices
    timesteps: torch.Tensor    # (B,) int64 in [0, 1000)
    noise: torch.Tensor        # (B, C, h, w) the epsilon target
    latent_eps: torch.Tensor   # (B, C, h, w) the posterior sample's noise


def draw_step(gen: torch.Generator, n_images: int, batch_size: int, latent_shape: tuple[int, int, int],
              num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> StepDraw:
    """One step's random choices, in the documented order, from a CPU generator."""
    idx = torch.randint(n_images, (batch_size,), generator=gen)
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=gen)
    noise = torch.randn((batch_size,) + tuple(latent_shape), generator=gen)
    latent_eps = torch.randn((batch_size,) + tuple(latent_shape), generator=gen)
    return StepDraw(idx, t, noise, latent_eps)


# -- optimiser --------------------------------------------------------------------------------
def optimizer_groups(named_params: Iterable[tuple[str, torch.Tensor]], weight_decay: float = WEIGHT_DECAY):
    """LAVIS' grouping: weight decay on tensors with 2+ dimensions, none on biases and norm weights."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "bias" in name or name.endswith(".diff_b") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_impl(params) -> dict:
    """torch's fused AdamW kernel where it exists (CPU and CUDA, float tensors): the same update as the
    for-loop implementation to ~1e-6 of its size, several times faster on a CPU."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return {"fused": True} if fused else {"foreach": False}


# In-backward updates are made per bucket of this many elements (128 MB of fp32 gradients): one
# fused AdamW call per bucket instead of one optimiser step per tensor. Per tensor, the Python cost
# of ~690 optimiser steps was most of a GPU training step (bench/NOTES.md); the bucket bounds the
# gradient memory held at once to a small fraction of the UNet's.
BUCKET_NUMEL = 1 << 25


class ParamAdamW:
    """AdamW (published settings) over named parameters, with LAVIS' weight-decay groups.

    ``in_backward=True`` updates parameters while the backward pass runs, as soon as a bucket of
    completed gradients holds ``bucket_numel`` elements (``register_post_accumulate_grad_hook``),
    and frees those gradients; ``step()`` after backward updates the rest. The gradients of the
    whole UNet therefore never exist at once: the same AdamW arithmetic (AdamW has no coupling
    between tensors), one UNet-sized buffer less. ``on_grad(name, grad)`` sees every gradient
    before its update.
    """

    def __init__(self, named_params, lr: float = PUBLISHED_LR, weight_decay: float = WEIGHT_DECAY,
                 in_backward: bool = False, on_grad: Callable[[str, torch.Tensor], None] | None = None,
                 bucket_numel: int = BUCKET_NUMEL):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        if not named:
            raise FinetuneError("nothing to train: no parameter requires a gradient")
        self.named, self.in_backward, self.on_grad = named, in_backward, on_grad
        self.bucket_numel = bucket_numel
        self._clear_pending()
        self._hooks = []
        groups = [g for g in optimizer_groups(named, weight_decay) if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay,
                                           **adamw_impl(p for _, p in named))
        self._group_of = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        if in_backward:
            self._hooks = [p.register_post_accumulate_grad_hook(self._hook(name)) for name, p in named]

    def _hook(self, name):
        def hook(p):
            if self.on_grad is not None:
                self.on_grad(name, p.grad)
            if id(p) in self._pending:
                return  # a second backward before step(): its gradient was summed into the pending one
            self._pending[id(p)] = p
            self._pending_numel += p.numel()
            if self._pending_numel >= self.bucket_numel:
                self._flush()
        return hook

    def _flush(self):
        if self._pending:
            # Show AdamW only the bucket (its state is keyed by tensor, so nothing else changes):
            # it would otherwise look over every tensor of the UNet at each flush.
            groups = self.optimizer.param_groups
            everything = [g["params"] for g in groups]
            for i, g in enumerate(groups):
                g["params"] = [p for p in self._pending.values() if self._group_of[id(p)] == i]
            try:
                self.optimizer.step()
            finally:
                for g, params in zip(groups, everything):
                    g["params"] = params
            for p in self._pending.values():
                p.grad = None
        self._clear_pending()

    def _clear_pending(self):
        self._pending, self._pending_numel = {}, 0  # id -> tensor, in the order the gradients came

    def zero_grad(self):
        for _, p in self.named:
            p.grad = None
        self._clear_pending()

    def step(self):
        if self.in_backward:
            return self._flush()  # the last, partly filled bucket
        if self.on_grad is not None:
            for name, p in self.named:
                if p.grad is not None:
                    self.on_grad(name, p.grad)
        self.optimizer.step()

    def close(self):
        """Remove the hooks and drop all state and parameter references (frees the AdamW moments)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._clear_pending()
        if getattr(self, "optimizer", None) is not None:
            self.optimizer.state.clear()
            self.optimizer.param_groups.clear()
            self.optimizer = None
        self.named = []


def make_optimizer(named_params, lr: float = PUBLISHED_LR, weight_decay: float = WEIGHT_DECAY,
                   in_backward: bool = False, on_grad=None, bucket_numel: int = BUCKET_NUMEL) -> ParamAdamW:
    return ParamAdamW(named_params, lr, weight_decay, in_backward, on_grad, bucket_numel)


def check_settings(steps: int, lr: float, batch_size: int, resolution: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise FinetuneError(f"steps must be at least 1 (got {steps}); the paper used 20 to 120, mean 76")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise FinetuneError(f"learning_rate must be a positive number (got {lr}); the published value is 5e-6")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise FinetuneError(f"batch_size must be at least 1 (got {batch_size})")
    if not isinstance(resolution, int) or resolution < 64 or resolution % 64:
        raise FinetuneError(f"resolution must be a multiple of 64, at least 64 (got {resolution})")


# -- the step -----------------------------------------------------------------------------------
UnetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]   # (x_t, t, cond) -> eps
TextFn = Callable[[torch.Tensor], torch.Tensor]                              # subject (1,16,D) -> (1,L,D)


def epsilon_loss(unet: UnetFn, text: TextFn, subject: torch.Tensor, latents: torch.Tensor,
                 noise: torch.Tensor, timesteps: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """The published objective for one batch: MSE between predicted and true noise (mean)."""
    noisy = add_noise(latents, noise, timesteps, acp)
    cond = text(subject)
    cond = cond.expand(latents.shape[0], -1, -1)
    pred = unet(noisy, timesteps, cond)
    return F.mse_loss(pred.float(), noise.float().to(pred.device), reduction="mean")


@dataclass
class Trainer:
    """Optimiser state plus the step: forward, backward, AdamW. One object per fine-tune."""
    unet: UnetFn
    text: TextFn
    subject: torch.Tensor                       # the trainable (1, 16, D) parameter
    optimizer: ParamAdamW
    acp: torch.Tensor = field(default_factory=alphas_cumprod)
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    scaler: object | None = None                # torch.amp.GradScaler for fp16
    step_count: int = 0

    def loss(self, latents, noise, timesteps) -> torch.Tensor:
        with self.autocast():
            return epsilon_loss(self.unet, self.text, self.subject, latents, noise, timesteps, self.acp)

    def step(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> float:
        """One optimisation step; returns the loss. Raises NonFiniteLoss before touching any weight."""
        self.optimizer.zero_grad()
        loss = self.loss(latents, noise, timesteps)
        value = float(loss.detach().float().cpu())
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the training loss became {value} at step {self.step_count + 1}; training "
                                "stopped and nothing was returned. Lower the learning rate, or train in fp32.")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.scaler is not None:
            self.scaler.step(self.optimizer.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step_count += 1
        return value

    def close(self):
        """Frees the optimiser's state and drops the subject parameter; safe to call twice."""
        self.optimizer.close()
        self.subject = None


# -- gradient checkpointing ---------------------------------------------------------------------
def checkpoint_targets(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The highest submodules that are not plain containers (what gets recomputed in backward)."""
    containers = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)
    found = []

    def walk(m):
        for child in m.children():
            if isinstance(child, containers):
                walk(child)
            else:
                found.append(child)

    walk(model)
    return found


@contextlib.contextmanager
def gradient_checkpointing(modules: list[torch.nn.Module], enabled: bool = True):
    """Recompute these modules' activations in backward instead of keeping them (instance patch, undone on exit)."""
    patched = []
    try:
        if enabled:
            for m in modules:
                original = m.forward

                def forward(*args, _original=original, **kwargs):
                    if torch.is_grad_enabled():
                        return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)
                    return _original(*args, **kwargs)

                m.forward = forward
                patched.append(m)
        yield
    finally:
        for m in patched:
            if "forward" in vars(m):
                del m.forward


# -- the whole run -------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    losses: list[float]


def run(trainer: Trainer, latents_mean: torch.Tensor, latents_std: torch.Tensor | None, *, steps: int,
        batch_size: int, seed: int, device=None, on_step: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], None] | None = None, latent_scale: float = LATENT_SCALE) -> FinetuneResult:
    """``steps`` optimisation steps on batches drawn from the per-image latent posteriors.

    ``latents_mean``/``latents_std``: (N, C, h, w) VAE posterior moments in the VAE's own scale.
    ``should_stop`` is called before every step (the host's cancel check raises from there).
    """
    n = latents_mean.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
    device = device if device is not None else latents_mean.device
    losses = []
    for i in range(steps):
        if should_stop is not None:
            should_stop()
        d = draw_step(gen, n, batch_size, tuple(latents_mean.shape[1:]))
        std = None if latents_std is None else latents_std[d.indices]
        latents = posterior_sample(latents_mean[d.indices], std, d.latent_eps, latent_scale)
        loss = trainer.step(latents.to(device), d.noise.to(device), d.timesteps.to(device))
        losses.append(loss)
        if on_step is not None:
            on_step(i, loss)
    return FinetuneResult(losses)
