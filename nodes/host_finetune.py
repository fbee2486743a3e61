"""Host glue for BlipFinetune: subject fine-tuning as published, trained inside the host.

The recipe and its evidence are in ``blip_core/finetune.py``. This module is the host glue,
done the way the host's own trainer (``comfy_extras/nodes_train.py``) does it:

* training leaves the host's inference mode explicitly (``torch.inference_mode(False)`` and
  ``torch.enable_grad()``);
* the UNet is trained on a *clone* of the input MODEL loaded with ``load_models_gpu``. full
  (as published): every UNet parameter is swapped for a trainable fp32 copy while the original
  tensors wait aside (CPU memory when training on a GPU, an anonymous temporary file when
  training on the CPU) and are put back bit for bit afterwards, also on error or cancel: the
  input model ends exactly as it began, and its weights never share memory with the training
  state. lora: the host's own LoRA train adapters as weight wrappers
  (``ModelPatcher.add_weight_wrapper``), plus additive deltas for biases and norm weights, as the
  host's trainer does. Wrappers and the optional gradient-checkpointing patches are removed again;
* AdamW updates the tensors during the backward pass, a bucket at a time (torch's fused kernel),
  so no UNet-sized gradient buffer exists; the host's ProgressBar advances per step and the loss is sent as
  progress text; the host's cancel is checked before every step;
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
import os
import tempfile
from dataclasses import dataclass, field

import torch

import comfy.model_base
import comfy.model_management as mm
import comfy.sd
import comfy.utils

from ..blip_core import finetune as ft
from ..blip_core import prompting, schedule
from ..blip_core.finetune_io import FINETUNE_MODES
from ..blip_core.finetune_plot import loss_plot
from ..blip_core.subject import Subject
from . import host_clip

log = logging.getLogger("blip_diffusion")


@dataclass
class FinetuneWeights:
    """What Save BLIP-Diffusion Fine-tune writes: the UNet change, the subject and how they were made."""
    unet_sd: dict
    subject: Subject
    mode: str
    meta: dict = field(default_factory=dict)


# -- stash and weight wrappers ------------------------------------------------------------------------
class _Stash:
    """The input UNet's own tensors, kept aside while trainable copies stand in for them.

    On a GPU they wait in the offload device's memory; when training runs where they already
    live (the CPU), in an anonymous temporary file, so the base weights and their trainable
    copies never take memory at the same time. Every tensor comes back bit for bit.
    """

    def __init__(self, to_disk: bool, device):
        self.to_disk, self.device = to_disk, device
        self.entries: dict[str, tuple] = {}
        self.file = tempfile.TemporaryFile(prefix="blip-finetune-") if to_disk else None

    def put(self, key: str, t: torch.Tensor, requires_grad: bool):
        t = t.detach()
        if self.to_disk:
            raw = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            offset = self.file.seek(0, os.SEEK_END)
            self.file.write(memoryview(raw))
            self.entries[key] = ("disk", offset, raw.nbytes, t.dtype, tuple(t.shape), t.device, requires_grad)
        else:
            self.entries[key] = ("mem", t.to(self.device, copy=True), t.device, requires_grad)

    def get(self, key: str) -> tuple[torch.Tensor, bool]:
        e = self.entries[key]
        if e[0] == "mem":
            return e[1].to(e[2]), e[3]
        _, offset, nbytes, dtype, shape, device, requires_grad = e
        self.file.seek(offset)
        buf = bytearray(nbytes)
        self.file.readinto(buf)
        t = torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)
        return t.to(device).clone() if device.type != "cpu" else t, requires_grad

    def close(self):
        self.entries.clear()
        if self.file is not None:
            self.file.close()
            self.file = None


class _Delta(torch.nn.Module):
    """LoRA mode, for biases and 1-D weights: ``w + delta`` (as the host trainer's BiasDiff)."""

    def __init__(self, shape, device):
        super().__init__()
        self.delta = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))

    def __call__(self, w):
        return (w.to(self.delta.dtype) + self.delta).to(w.dtype)

    def passive_memory_usage(self):
        return self.delta.nelement() * self.delta.element_size()

    def move_to(self, device):
        self.to(device=device)
        return self.passive_memory_usage()


class _Fresh:
    """Identity: its presence makes the host copy the weight before each use (autograd may keep a copy)."""

    def __call__(self, w):
        return w


def _wrapped_modules(root: torch.nn.Module, prefix: str, strict: bool = True):
    """(key prefix, module) for every module whose weight the host can wrap; strict: nothing may be left out."""
    mods, covered = [], set()
    for name, m in root.named_modules():
        if hasattr(m, "weight_function") and getattr(m, "weight", None) is not None:
            mods.append((f"{prefix}{name}", m))
            covered.update(f"{name}.{p}" for p, _ in m.named_parameters(recurse=False))
    leftover = sorted(n for n, _ in root.named_parameters() if n not in covered)
    if strict and leftover:
        raise ft.FinetuneError(f"the model has parameters the host cannot train through weight wrappers: "
                               f"{leftover[:4]} ({len(leftover)} in all)")
    return mods


def _remove_wrappers(root: torch.nn.Module, ours: set[int]) -> None:
    for m in root.modules():
        for attr in ("weight_function", "bias_function"):
            funcs = m.__dict__.get(attr)
            if funcs:
                m.__dict__[attr] = [f for f in funcs if id(f) not in ours]


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


# -- the training session ------------------------------------------------------------------------------
class TrainingSession:
    """Clones of MODEL and CLIP set up for training; ``with`` loads them and always cleans up.

    Inside: ``unet(x_t, t, cond) -> eps``, ``text(layout)`` -> a text function, ``named_parameters``
    (the UNet's trainable tensors, host key names), ``device``, ``export()`` -> the UNet change in
    the host's LoRA layout.

    full: while training, the UNet's own parameters are swapped for trainable fp32 copies (the
    originals wait in a ``_Stash``); on exit, also after an error or a cancel, the originals are
    put back bit for bit, so the input MODEL ends as it started and never shares memory with the
    training state. lora: the host's LoRA train adapters as weight wrappers on the clone.
    """

    def __init__(self, model, clip, mode: str = "full", rank: int = 16, seed: int = 0,
                 gradient_checkpointing: bool = False):
        if mode not in FINETUNE_MODES:
            raise ft.FinetuneError(f"mode must be one of {list(FINETUNE_MODES)}, got {mode!r}")
        if not isinstance(getattr(model, "model", None), comfy.model_base.BaseModel):
            raise ft.FinetuneError("the MODEL input is not a diffusion model the host can train")
        if model.model.model_type != comfy.model_base.ModelType.EPS:
            raise ft.FinetuneError(f"BLIP-Diffusion fine-tuning trains an epsilon-prediction SD 1.x UNet; this MODEL "
                                   f"predicts {model.model.model_type.name}")
        self.mode, self.rank, self.seed = mode, int(rank), int(seed)
        self.gradient_checkpointing = gradient_checkpointing
        self.unet_patcher = model.clone()
        self.clip = clip.clone()
        self.ours: set[int] = set()
        self.adapters: dict[str, object] = {}        # lora mode: module name -> LoraDiff / _Delta (weight)
        self.bias_deltas: dict[str, _Delta] = {}     # lora mode: module name -> _Delta (bias)
        self.stash: _Stash | None = None             # full mode: the originals
        self.diff: dict[str, torch.Tensor] | None = None
        self._stack = None
        self.named_parameters: list[tuple[str, torch.nn.Parameter]] = []

    @property
    def diffusion_model(self):
        return self.unet_patcher.model.diffusion_model

    # setup -----------------------------------------------------------------------------
    def _register_lora(self):
        from comfy.weight_adapter.lora import LoRAAdapter

        # manual_seed reseeds every CUDA device too: fork them all, so the graph's later draws are untouched.
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.manual_seed(self.seed)
            for name, m in _wrapped_modules(self.diffusion_model, "diffusion_model."):
                if m.weight.ndim >= 2:
                    # The adapter's random half is drawn on the CPU whatever device the UNet sits on (an
                    # earlier sampler may have left it on the GPU): same seed, same start. A zero-stride
                    # stand-in gives the weight's shape without copying it.
                    shape_only = torch.empty(1, dtype=m.weight.dtype).expand(m.weight.shape)
                    a = LoRAAdapter.create_train(shape_only, rank=self.rank, alpha=1.0).to(torch.float32)
                else:
                    a = _Delta(m.weight.shape, m.weight.device)
                self.adapters[name] = a
                self.unet_patcher.add_weight_wrapper(f"{name}.weight", a)
                self.ours.add(id(a))
                if getattr(m, "bias", None) is not None:
                    b = _Delta(m.bias.shape, m.bias.device)
                    self.bias_deltas[name] = b
                    self.unet_patcher.add_weight_wrapper(f"{name}.bias", b)
                    self.ours.add(id(b))

    def _register_clip(self):
        for name, m in _wrapped_modules(self.clip.cond_stage_model, "", strict=False):
            for attr in ("weight", "bias"):
                if getattr(m, attr, None) is not None:
                    f = _Fresh()
                    self.clip.patcher.add_weight_wrapper(f"{name}.{attr}", f)
                    self.ours.add(id(f))

    def _swap_in_copies(self):
        """full: every UNet parameter -> a trainable fp32 copy; the original goes to the stash."""
        device = self.unet_patcher.load_device
        to_disk = torch.device(self.unet_patcher.offload_device) == torch.device(device)
        self.stash = _Stash(to_disk, self.unet_patcher.offload_device)
        params = []
        for mod_name, m in self.diffusion_model.named_modules():
            for pname, p in list(m._parameters.items()):
                if p is None:
                    continue
                key = f"diffusion_model.{mod_name}.{pname}"
                self.stash.put(key, p, p.requires_grad)
                copy = torch.nn.Parameter(p.detach().to(device=device, dtype=torch.float32, copy=True))
                m._parameters[pname] = copy
                del p
                params.append((key, copy))
        self.named_parameters = params

    def _swap_back(self, keep_diff: bool):
        """Put the originals back (bit for bit); with ``keep_diff`` record trained - original first."""
        if self.stash is None:
            return
        diff = {}
        modules = dict(self.diffusion_model.named_modules())
        with torch.no_grad():
            for key in list(self.stash.entries):
                mod_name, pname = key[len("diffusion_model."):].rsplit(".", 1)
                m = modules[mod_name]
                original, requires_grad = self.stash.get(key)
                if keep_diff:
                    trained = m._parameters[pname].detach()
                    suffix = "diff" if pname == "weight" else "diff_b"
                    diff[f"diffusion_model.{mod_name}.{suffix}"] = \
                        (trained - original.to(trained.device, torch.float32)).to("cpu")
                m._parameters[pname] = torch.nn.Parameter(original, requires_grad=requires_grad)
                del original
        self.stash.close()
        self.stash = None
        if keep_diff:
            self.diff = diff

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        try:
            dm = self.diffusion_model
            self._stack.callback(self._cleanup)
            # full mode swaps the UNet's parameters out (the stash keeps their flags): freezing them
            # here would keep references to all of them.
            frozen = [self.clip.cond_stage_model] + ([dm] if self.mode == "lora" else [])
            self._stack.enter_context(_frozen(*frozen))
            if self.mode == "lora":
                self._register_lora()
            self._register_clip()
            self._stack.enter_context(ft.gradient_checkpointing(ft.checkpoint_targets(dm),
                                                                self.gradient_checkpointing))
            # Everything else leaves the device; both models stay loaded for the whole run, since
            # loading the CLIP again per step could evict the UNet mid-training.
            mm.load_models_gpu([self.unet_patcher, self.clip.patcher], memory_required=1e20, force_full_load=True)
            self.device = torch.device(self.unet_patcher.load_device)
            if self.mode == "full":
                self._stack.callback(self._swap_back, False)  # a no-op once export() has put them back
                self._swap_in_copies()
            else:
                self._collect_lora_parameters()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _collect_lora_parameters(self):
        params = []
        for name, a in self.adapters.items():
            for pname, p in a.named_parameters():
                if p.requires_grad:
                    params.append((f"{name}.{pname}", p))
        for name, b in self.bias_deltas.items():
            params.append((f"{name}.diff_b", b.delta))
        self.named_parameters = params

    def _cleanup(self):
        for root in (self.diffusion_model, self.clip.cond_stage_model):
            _remove_wrappers(root, self.ours)
        self.unet_patcher.weight_wrapper_patches.clear()
        self.clip.patcher.weight_wrapper_patches.clear()

    def __exit__(self, *exc):
        self._stack.close()
        return False

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

    # the result ---------------------------------------------------------------------------
    @torch.no_grad()
    def export(self) -> dict[str, torch.Tensor]:
        """The UNet change in the host's LoRA key layout (CPU tensors); full mode: also restores the UNet."""
        if self.mode == "full":
            self.named_parameters = []
            self._swap_back(keep_diff=True)
            out, self.diff = self.diff, None
            return out
        out = {}
        for name, a in self.adapters.items():
            if isinstance(a, _Delta):
                out[f"{name}.diff"] = a.delta.detach().float().cpu()
            else:
                out[f"{name}.lora_up.weight"] = a.lora_up.weight.detach().float().cpu()
                out[f"{name}.lora_down.weight"] = a.lora_down.weight.detach().float().cpu()
                out[f"{name}.alpha"] = a.alpha.detach().float().cpu()
        for name, b in self.bias_deltas.items():
            out[f"{name}.diff_b"] = b.delta.detach().float().cpu()
        return out

    def release(self):
        """Drop the trainable tensors."""
        self.adapters.clear()
        self.bias_deltas.clear()
        self.named_parameters = []


def apply_finetune(model, unet_sd: dict, strength: float = 1.0):
    """The base MODEL with a fine-tune's UNet change applied through the host's LoRA loader."""
    new_model, _ = comfy.sd.load_lora_for_models(model, None, unet_sd, strength, 0)
    return new_model


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


def single_value(value, name):
    """is_input_list hands every input as a list: all but the images must be one value."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ft.FinetuneError(f"BlipFinetune trains one model: '{name}' got {len(value)} values, connect one")
        return value[0]
    return value


def _progress_text(node_id, text):
    if node_id is None:
        return
    try:
        from server import PromptServer

        if getattr(PromptServer, "instance", None) is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # no server (in-process use) or an old host
        pass


@contextlib.contextmanager
def training(model, clip, layout: prompting.TokenLayout, init: torch.Tensor, mode: str = "full", rank: int = 16,
             seed: int = 0, lr: float = ft.PUBLISHED_LR, gradient_checkpointing: bool = False, on_grad=None):
    """A ready ``ft.Trainer`` (UNet + subject, published optimiser) inside a TrainingSession.

    Everything it allocates (trainable copies, AdamW state, hooks, wrappers) is released on exit,
    also when training stops with an error or the host's cancel.
    """
    session = TrainingSession(model, clip, mode, rank, seed, gradient_checkpointing)
    with session:
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
        run = TrainingRun(trainer, session)
        try:
            yield run
        finally:
            optimizer.close()
            trainer.subject = None
            session.release()


class TrainingRun:
    def __init__(self, trainer: ft.Trainer, session: TrainingSession):
        self.trainer, self.session = trainer, session

    def finish(self) -> tuple[dict, torch.Tensor]:
        """(UNet change in the host's LoRA layout, trained subject on the CPU); frees the optimiser first."""
        self.trainer.optimizer.close()
        subject = self.trainer.subject.detach().float().cpu().clone()
        return self.session.export(), subject


def finetune(model, clip, vae, subject_encoder, images, category: str, steps: int = ft.PUBLISHED_STEPS,
             learning_rate: float = ft.PUBLISHED_LR, batch_size: int = ft.PUBLISHED_BATCH, seed: int = 0,
             resolution: int = ft.PUBLISHED_RESOLUTION, mode: str = "full", lora_rank: int = 16,
             gradient_checkpointing: bool = True, preprocess: str = "lavis", latent_sampling: bool = True,
             node_id=None):
    """The node's work, callable in-process: returns (MODEL, Subject, loss plot IMAGE, FinetuneWeights)."""
    ft.check_settings(steps, learning_rate, batch_size, resolution)
    if mode not in FINETUNE_MODES:
        raise ft.FinetuneError(f"mode must be one of {list(FINETUNE_MODES)}, got {mode!r}")
    if mode == "lora" and lora_rank < 1:
        raise ft.FinetuneError(f"lora_rank must be at least 1 (got {lora_rank})")
    with torch.inference_mode(False), torch.enable_grad():
        photos = ft.split_images(images)
        subject_text, caption = ft.training_caption(category)
        width = host_clip.text_width(clip)
        layout = host_clip.caption_layout(clip, caption)
        scale = check_schedule(model)

        pixels = ft.target_pixels(photos, resolution)
        mean, std = host_vae_moments(vae, pixels, sample=latent_sampling)
        init = initial_subject(subject_encoder, photos, subject_text, preprocess)
        if init.shape[-1] != width:
            raise ft.FinetuneError(f"the subject encoder gives {init.shape[-1]}-wide vectors but the CLIP is {width} "
                                   "wide: connect the parts of one BLIP-Diffusion model")

        pbar = comfy.utils.ProgressBar(steps)

        def on_step(i, loss):
            pbar.update_absolute(i + 1, steps)
            _progress_text(node_id, f"step {i + 1}/{steps}  loss {loss:.5f}")

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
