"""The two fine-tune modes: what of the UNet is trained, how the change is exported, how the UNet is restored.

full (as published): every UNet parameter is swapped for a trainable fp32 copy while the
original tensors wait aside (CPU memory when training on a GPU, an anonymous temporary file
when training on the CPU) and are put back bit for bit afterwards: the input model ends
exactly as it began, and its weights never share memory with the training state.

lora: the host's own LoRA train adapters as weight wrappers (``ModelPatcher.add_weight_wrapper``),
plus additive deltas for biases and norm weights, as the host's trainer
(``comfy_extras/nodes_train.py``) does; the UNet's own tensors are never written.

Both export the change in the host's LoRA key layout, so ``load_lora_for_models`` applies it.
TrainingSession (host_finetune.py) drives either through the same four calls.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..blip_core import finetune as ft
from ..blip_core.finetune_io import FINETUNE_MODES

AddWrapper = Callable[[object, str, Callable], None]   # (patcher, weight key, wrapper)


class FinetuneMode(Protocol):
    """What a mode does to the UNet clone; the session calls these in this order."""

    freezes_base: bool  # the UNet's own parameters stay frozen while training (only wrappers learn)

    def attach(self, add_wrapper: AddWrapper) -> None:
        """Before the models load: weight wrappers that take part in training."""

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """After the models load: the tensors AdamW updates, under host key names."""

    def export(self) -> dict[str, torch.Tensor]:
        """The UNet change in the host's LoRA layout (CPU tensors); drops the trainable tensors."""

    def restore(self) -> None:
        """The UNet as it was before training (the session removes the weight wrappers); safe to call
        again, and after ``export``."""


def check_mode(mode: str) -> None:
    if mode not in FINETUNE_MODES:
        raise ft.FinetuneError(f"mode must be one of {list(FINETUNE_MODES)}, got {mode!r}")


def finetune_mode(mode: str, patcher, rank: int, seed: int) -> FinetuneMode:
    """The mode's implementation for this UNet clone (``rank`` and ``seed``: LoRA's)."""
    check_mode(mode)
    return FullUnet(patcher) if mode == "full" else LoraUnet(patcher, rank, seed)


def wrappable_modules(root: torch.nn.Module, prefix: str, strict: bool = True):
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


# -- full ------------------------------------------------------------------------------------------
@dataclass
class _InMemory:
    """An original tensor kept as a copy in the offload device's memory."""
    copy: torch.Tensor
    device: torch.device
    requires_grad: bool

    def read(self, file) -> torch.Tensor:
        return self.copy.to(self.device)


@dataclass
class _OnDisk:
    """An original tensor kept as raw bytes at ``offset`` in the stash's temporary file."""
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple
    device: torch.device
    requires_grad: bool

    def read(self, file) -> torch.Tensor:
        file.seek(self.offset)
        buf = bytearray(self.nbytes)
        file.readinto(buf)
        t = torch.frombuffer(buf, dtype=torch.uint8).view(self.dtype).reshape(self.shape)
        return t.to(self.device).clone() if self.device.type != "cpu" else t


class _Stash:
    """The input UNet's own tensors, kept aside while trainable copies stand in for them.

    On a GPU they wait in the offload device's memory; when training runs where they already
    live (the CPU), in an anonymous temporary file, so the base weights and their trainable
    copies never take memory at the same time. Every tensor comes back bit for bit.
    """

    def __init__(self, to_disk: bool, device):
        self.to_disk, self.device = to_disk, device
        self.entries: dict[str, _InMemory | _OnDisk] = {}
        self.file = tempfile.TemporaryFile(prefix="blip-finetune-") if to_disk else None

    def put(self, key: str, t: torch.Tensor, requires_grad: bool):
        t = t.detach()
        if self.to_disk:
            raw = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            offset = self.file.seek(0, os.SEEK_END)
            self.file.write(memoryview(raw))
            self.entries[key] = _OnDisk(offset, raw.nbytes, t.dtype, tuple(t.shape), t.device, requires_grad)
        else:
            self.entries[key] = _InMemory(t.to(self.device, copy=True), t.device, requires_grad)

    def get(self, key: str) -> tuple[torch.Tensor, bool]:
        e = self.entries[key]
        return e.read(self.file), e.requires_grad

    def close(self):
        self.entries.clear()
        if self.file is not None:
            self.file.close()
            self.file = None


class FullUnet:
    """Every UNet parameter trained, as published: fp32 copies stand in; the originals wait in a _Stash."""

    # Freezing the UNet would keep references to the originals it swaps out (the stash keeps their flags).
    freezes_base = False

    def __init__(self, patcher):
        self.patcher = patcher
        self.stash: _Stash | None = None

    @property
    def diffusion_model(self):
        return self.patcher.model.diffusion_model

    def attach(self, add_wrapper):
        pass

    def trainable(self):
        """Every UNet parameter -> a trainable fp32 copy on the load device; the original goes to the stash."""
        device = self.patcher.load_device
        to_disk = torch.device(self.patcher.offload_device) == torch.device(device)
        self.stash = _Stash(to_disk, self.patcher.offload_device)
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
        return params

    @torch.no_grad()
    def export(self):
        """Trained - original per tensor (``diff``/``diff_b``), taken as the originals go back."""
        return self._swap_back(keep_diff=True)

    def restore(self):
        self._swap_back(keep_diff=False)

    @torch.no_grad()
    def _swap_back(self, keep_diff: bool) -> dict[str, torch.Tensor]:
        diff = {}
        if self.stash is None:
            return diff
        modules = dict(self.diffusion_model.named_modules())
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
        return diff


# -- lora ------------------------------------------------------------------------------------------
class _Delta(torch.nn.Module):
    """For biases and 1-D weights: ``w + delta`` (as the host trainer's BiasDiff)."""

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


class LoraUnet:
    """Low-rank adapters on 2+-D weights, deltas on biases and 1-D weights, as weight wrappers on the clone."""

    freezes_base = True

    def __init__(self, patcher, rank: int, seed: int):
        self.patcher, self.rank, self.seed = patcher, int(rank), int(seed)
        self.adapters: dict[str, object] = {}        # module name -> LoraDiff / _Delta (weight)
        self.bias_deltas: dict[str, _Delta] = {}     # module name -> _Delta (bias)

    def attach(self, add_wrapper):
        from comfy.weight_adapter.lora import LoRAAdapter

        # manual_seed reseeds every CUDA device too: fork them all, so the graph's later draws are untouched.
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.manual_seed(self.seed)
            for name, m in wrappable_modules(self.patcher.model.diffusion_model, "diffusion_model."):
                if m.weight.ndim >= 2:
                    # The adapter's random half is drawn on the CPU whatever device the UNet sits on (an
                    # earlier sampler may have left it on the GPU): same seed, same start. A zero-stride
                    # stand-in gives the weight's shape without copying it.
                    shape_only = torch.empty(1, dtype=m.weight.dtype).expand(m.weight.shape)
                    a = LoRAAdapter.create_train(shape_only, rank=self.rank, alpha=1.0).to(torch.float32)
                else:
                    a = _Delta(m.weight.shape, m.weight.device)
                self.adapters[name] = a
                add_wrapper(self.patcher, f"{name}.weight", a)
                if getattr(m, "bias", None) is not None:
                    b = _Delta(m.bias.shape, m.bias.device)
                    self.bias_deltas[name] = b
                    add_wrapper(self.patcher, f"{name}.bias", b)

    def trainable(self):
        params = []
        for name, a in self.adapters.items():
            for pname, p in a.named_parameters():
                if p.requires_grad:
                    params.append((f"{name}.{pname}", p))
        for name, b in self.bias_deltas.items():
            params.append((f"{name}.diff_b", b.delta))
        return params

    @torch.no_grad()
    def export(self):
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
        self.restore()
        return out

    def restore(self):
        """The UNet's tensors were never written: dropping the adapters is all (the session removes wrappers)."""
        self.adapters.clear()
        self.bias_deltas.clear()
