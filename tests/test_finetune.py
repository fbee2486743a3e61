"""Subject fine-tuning: the training step through the host's own UNet and CLIP (in-process, the
node's code path) against a reference written with diffusers and torch's AdamW
(tests/reference/finetune.py), plus LoRA mode, cancel and bad input.

Both sides get the same inputs as tensors: the initial subject embedding, and per step the
batch's VAE latents, noise and timesteps. Memory: the full-size test UNet (580M parameters)
with AdamW needs ~7-10 GB per side, so the reference runs first and our UNet is loaded after.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import comfy_on_path
from paths import ROOT
from refenv import run_reference

pytestmark = pytest.mark.reference

SAMPLE = ROOT / "workflows" / "assets" / "sample_subject.png"
RES, BATCH, STEPS, SEED, LR, CATEGORY = 64, 3, 3, 1234, 5e-6, "dog"
LORA_STEPS = 6
LOSS_TOL, GRAD_TOL, PARAM_TOL = 1e-5, 1e-4, 1e-2


def as_host_image(img: Image.Image) -> torch.Tensor:
    """What LoadImage hands a node: RGB float in [0, 1], (1, H, W, 3)."""
    return torch.from_numpy(np.asarray(img.convert("RGB")).astype(np.float32) / 255.0)[None]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three photos of one subject, of different sizes and aspect ratios (as files and as host images)."""
    d = tmp_path_factory.mktemp("photos")
    src = Image.open(SAMPLE).convert("RGB")
    w, h = src.size
    imgs = [src, src.transpose(Image.FLIP_LEFT_RIGHT).crop((0, 0, int(w * 0.8), h)),
            src.resize((w // 2 + 7, h // 3 + 5), Image.BICUBIC)]
    paths = []
    for i, img in enumerate(imgs):
        paths.append(d / f"photo_{i}.png")
        img.save(paths[-1])
    return SimpleNamespace(paths=[str(p) for p in paths], tensors=[as_host_image(Image.open(p)) for p in paths])


@pytest.fixture(scope="module")
def host(test_model_dir):
    """The host's CLIP and VAE, loaded inside inference mode as the host's loader nodes run."""
    comfy_on_path()
    import comfy.model_management as mm
    from blip_diffusion.nodes import host_models

    with torch.inference_mode():
        clip = host_models.load_clip(str(test_model_dir / "text_encoder"))
        vae = host_models.load_vae(str(test_model_dir / "vae"))
    yield SimpleNamespace(clip=clip, vae=vae)
    mm.unload_all_models()
    gc.collect()


@pytest.fixture(scope="module")
def layout(host):
    from blip_diffusion.blip_core import finetune as ft
    from blip_diffusion.nodes import host_clip

    _, caption = ft.training_caption(CATEGORY)
    return host_clip.caption_layout(host.clip, caption)


@pytest.fixture(scope="module")
def inputs(host, photos, test_model_dir):
    """Targets, VAE posteriors and the initial subject as the node computes them; 3 steps of draws."""
    from blip_diffusion.blip_core import finetune as ft
    from blip_diffusion.nodes import host_finetune as nf
    from blip_diffusion.nodes.nodes_encoder import load_encoder

    imgs = ft.split_images(photos.tensors)
    pixels = ft.target_pixels(imgs, RES)
    with torch.inference_mode():
        encoder = load_encoder(str(test_model_dir / "qformer"), "test")
    mean, std = nf.host_vae_moments(host.vae, pixels)
    init = nf.initial_subject(encoder, imgs, CATEGORY, "lavis")
    del encoder
    gc.collect()
    gen = torch.Generator().manual_seed(SEED)
    steps = []
    for _ in range(STEPS):
        d = ft.draw_step(gen, len(photos.tensors), BATCH, tuple(mean.shape[1:]))
        steps.append((ft.posterior_sample(mean[d.indices], std[d.indices], d.latent_eps), d.noise, d.timesteps))
    return SimpleNamespace(pixels=pixels, mean=mean, std=std, init=init, steps=steps)


@pytest.fixture(scope="module")
def reference(inputs, photos, test_model_dir, tmp_path_factory):
    big = tmp_path_factory.mktemp("reference-big")  # grads and params: twice the UNet's size
    tensors = {"subject": inputs.init}
    for k, (latents, noise, t) in enumerate(inputs.steps):
        tensors.update({f"latents_{k}": latents, f"noise_{k}": noise, f"timesteps_{k}": t})
    try:
        out = run_reference("finetune.py", {"model_dir": str(test_model_dir), "caption": f"a {CATEGORY}",
                                            "steps": STEPS, "lr": LR, "weight_decay": 0.01, "big_dir": str(big),
                                            "images": photos.paths, "resolution": RES}, tensors, timeout=3600)
        index = {n: (off, tuple(shape)) for n, off, shape in json.loads((big / "index.json").read_text())}
        yield SimpleNamespace(out=out, index=index, big=big)
    finally:
        shutil.rmtree(big, ignore_errors=True)


@pytest.fixture(scope="module")
def host_unet(test_model_dir, host):
    """The host's UNet (request it after ``reference``: both sides together would not fit in memory)."""
    from blip_diffusion.nodes import host_models

    with torch.inference_mode():
        model = host_models.load_unet(str(test_model_dir / "unet"))
    yield model
    del model
    gc.collect()


def key_map(test_model_dir):
    import comfy.utils
    from blip_diffusion.nodes import host_models

    cfg = json.loads((test_model_dir / "unet" / "config.json").read_text())
    to_host = comfy.utils.unet_to_diffusers(host_models.host_unet_config(cfg))
    return {"diffusion_model." + v: k for k, v in to_host.items()}


class FlatArray:
    """A flat float32 .npy file read slice by slice (not mapped: keeps this process's memory small)."""

    def __init__(self, path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            assert dtype == np.float32 and len(shape) == 1
            self.header = f.tell()

    def read(self, offset: int, count: int) -> np.ndarray:
        return np.fromfile(self.path, dtype=np.float32, count=count, offset=self.header + 4 * offset)


def ref_tensor(flat: FlatArray, index, name) -> torch.Tensor:
    off, shape = index[name]
    return torch.from_numpy(flat.read(off, int(np.prod(shape)))).reshape(shape)


def eps_of(model, x, t, cond):
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    with torch.no_grad():
        return model.model.diffusion_model(x, t.float(), context=cond).clone()


# -- parity ----------------------------------------------------------------------------------------
def test_targets_vae_and_caption_match_reference(reference, inputs, layout, photos):
    """Our PIL resize/crop of each photo is the reference's torchvision-style one, bit for bit; the host
    VAE's posterior moments agree with diffusers' AutoencoderKL; the caption tokens are LAVIS'."""
    out = reference.out
    errs = []
    for i in range(len(photos.paths)):
        ours = (inputs.pixels[i:i + 1] * 2 - 1).permute(0, 3, 1, 2)
        assert torch.equal(ours, out[f"target_{i}"]), f"target image {i} differs"
        errs.append(((inputs.mean[i:i + 1] - out[f"vae_mean_{i}"]).abs().max().item(),
                     (inputs.std[i:i + 1] - out[f"vae_std_{i}"]).abs().max().item()))
    print("\nVAE posterior max abs error (mean, std) per photo:", errs)
    assert max(max(e) for e in errs) < 1e-4
    ids = out["caption_ids"].long().tolist()
    assert layout.ids[:len(ids)] == ids and layout.used == len(ids) + 16


def test_three_steps_match_reference(reference, inputs, layout, host, host_unet, test_model_dir):
    """Loss of steps 1-3 (1e-5 rel), UNet and subject gradients of step 1 (1e-4 rel, norm of the
    difference over the reference's norm) and the parameters after 3 steps (1e-2 of the reference's
    update) against diffusers + torch AdamW, also with gradient checkpointing; the same comparisons
    fail for a wrong timestep, the text padded to 77 positions, or no subject."""
    from blip_diffusion.blip_core import finetune as ft
    from blip_diffusion.nodes import host_finetune as nf

    out, index = reference.out, reference.index
    grads = FlatArray(reference.big / "grads_0.npy")
    final = FlatArray(reference.big / "params_final.npy")
    to_diffusers = key_map(test_model_dir)
    acc = {"gd": 0.0, "gr": 0.0, "n": 0, "subject": None}

    def on_grad(name, g):
        if name == "subject":
            acc["subject"] = g.detach().clone()
            return
        r = ref_tensor(grads, index, to_diffusers[name])
        acc["gd"] += (g.detach().double() - r.double()).pow(2).sum().item()
        acc["gr"] += r.double().pow(2).sum().item()
        acc["n"] += 1

    with nf.training(host_unet, host.clip, layout, inputs.init, mode="full", lr=LR, seed=0,
                     gradient_checkpointing=False) as run:
        tr = run.trainer
        latents, noise, t = inputs.steps[0]
        with torch.no_grad():
            cond = tr.text(tr.subject)
            noisy = ft.add_noise(latents, noise, t, tr.acp)
            eps = run.session.unet(noisy, t, cond.expand(BATCH, -1, -1))
            loss0 = tr.loss(latents, noise, t).item()
            # Negative controls: each deviation from the published step moves the loss past the tolerance.
            wrong_t = tr.loss(latents, noise, (t + 1).clamp(max=999)).item()
            padded = dataclasses.replace(layout, used=77)
            loss_padded = ft.epsilon_loss(tr.unet, run.session.text(padded), tr.subject, latents, noise, t,
                                          tr.acp).item()
            loss_no_subject = ft.epsilon_loss(tr.unet, tr.text, torch.zeros_like(tr.subject), latents, noise, t,
                                              tr.acp).item()
        # A subject gradient through the 77-position text is measurably another gradient.
        g_padded = torch.autograd.grad(ft.epsilon_loss(tr.unet, run.session.text(padded), tr.subject, latents,
                                                       noise, t, tr.acp), [tr.subject])[0]
        # The node's default, gradient checkpointing, recomputes the UNet's activations in backward.
        with ft.gradient_checkpointing(ft.checkpoint_targets(run.session.diffusion_model)):
            g_checkpointed = torch.autograd.grad(tr.loss(latents, noise, t), [tr.subject])[0]

        tr.optimizer.on_grad = on_grad
        losses = [tr.step(*inputs.steps[0])]
        tr.optimizer.on_grad = None
        losses += [tr.step(*s) for s in inputs.steps[1:]]

        pd, pu, n_params = 0.0, 0.0, 0
        w0 = torch.load(str(test_model_dir / "unet" / "diffusion_pytorch_model.bin"), mmap=True, weights_only=True,
                        map_location="cpu")
        for key, p in run.session.named_parameters:
            name = to_diffusers[key]
            r = ref_tensor(final, index, name).double()
            pd += (p.detach().double() - r).pow(2).sum().item()
            pu += (r - w0[name].double()).pow(2).sum().item()
            n_params += 1
        subject_final = tr.subject.detach().clone()
        del w0
        run.finish()

    ref_losses = [out[f"loss_{k}"].item() for k in range(STEPS)]
    loss_rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
    grad_rel_unet = math.sqrt(acc["gd"] / acc["gr"])
    grad_rel_subject = rel(acc["subject"], out["subject_grad_0"])
    param_rel_unet = math.sqrt(pd / pu)
    param_rel_subject = ((subject_final.double() - out["subject_final"].double()).norm()
                         / (out["subject_final"].double() - inputs.init.double()).norm()).item()
    report = {
        "cond_max_abs": (cond - out["cond_0"]).abs().max().item(),
        "eps_rel": rel(eps, out["eps_0"]),
        "loss_rel": loss_rel, "losses": losses, "reference_losses": ref_losses,
        "grad_rel_unet": grad_rel_unet, "grad_rel_subject": grad_rel_subject,
        "param_rel_unet_after_3": param_rel_unet, "param_rel_subject_after_3": param_rel_subject,
        "negative_loss_rel": {"timestep+1": abs(wrong_t - ref_losses[0]) / ref_losses[0],
                              "text padded to 77": abs(loss_padded - ref_losses[0]) / ref_losses[0],
                              "no subject": abs(loss_no_subject - ref_losses[0]) / ref_losses[0]},
        "negative_grad_rel_subject_padded": rel(g_padded, out["subject_grad_0"]),
        "grad_rel_subject_checkpointed": rel(g_checkpointed, out["subject_grad_0"]),
    }
    print("\nfine-tune parity:", json.dumps(report, indent=1))
    assert acc["n"] == n_params == len(index) and abs(loss0 - losses[0]) <= 1e-7 * abs(losses[0])
    assert max(loss_rel) <= LOSS_TOL
    assert grad_rel_unet <= GRAD_TOL and grad_rel_subject <= GRAD_TOL
    assert report["grad_rel_subject_checkpointed"] <= GRAD_TOL
    assert param_rel_unet <= PARAM_TOL and param_rel_subject <= PARAM_TOL
    assert min(report["negative_loss_rel"].values()) > 10 * LOSS_TOL
    assert report["negative_grad_rel_subject_padded"] > 10 * GRAD_TOL


def test_full_mode_leaves_the_input_model_bit_identical(host_unet, host, inputs, layout):
    """After training (and after a cancel) the input UNet's tensors, flags and modules are as before."""
    import comfy.model_management as mm
    import comfy.utils
    from blip_diffusion.nodes import host_finetune as nf

    dm = host_unet.model.diffusion_model
    before = {k: v.detach().clone() for i, (k, v) in enumerate(dm.state_dict().items()) if i % 7 == 0}
    sums = {k: v.double().sum().item() for k, v in dm.state_dict().items()}
    flags = {k: p.requires_grad for k, p in dm.named_parameters()}

    def interrupt_after_first(value, total, preview=None, node_id=None):
        if value >= 1:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(interrupt_after_first)
    try:
        with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
            nf.finetune(host_unet, host.clip, host.vae, _NoEncoder(inputs.init), [inputs.pixels[:1]], CATEGORY,
                        steps=5, batch_size=1, seed=3, resolution=RES, gradient_checkpointing=True)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    after = dm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(after[k].double().sum().item() == s for k, s in sums.items())
    assert {k: p.requires_grad for k, p in dm.named_parameters()} == flags
    assert not any(m.__dict__.get("weight_function") or m.__dict__.get("bias_function") for m in dm.modules())
    assert not any("forward" in vars(m) for m in dm.modules()), "gradient checkpointing patches left behind"
    assert not any(m.__dict__.get("weight_function") for m in host.clip.cond_stage_model.modules())


class _NoEncoder:
    """Stands in for the subject encoder: returns a fixed embedding (the encoder is tested elsewhere)."""

    name, fingerprint = "fixed", "0"

    def __init__(self, embedding):
        self.embedding = embedding

    def encode(self, images, category, weights=None, preprocessing="lavis"):
        return self.embedding.clone()


# -- LoRA mode ---------------------------------------------------------------------------------------
def test_lora_loss_decreases_and_the_saved_lora_reloads_identically(host_unet, host, inputs, layout, tmp_path):
    from blip_diffusion.blip_core import finetune as ft, finetune_io
    from blip_diffusion.blip_core.subject import Subject
    from blip_diffusion.nodes import host_finetune as nf

    latents, noise, t = inputs.steps[0]   # one fixed batch
    with nf.training(host_unet, host.clip, layout, inputs.init, mode="lora", rank=4, seed=0, lr=1e-3) as run:
        tr = run.trainer
        # 6 steps: on this batch the loss halves by the 4th (1.08, 0.84, 0.64, 0.51, 0.41, 0.34)
        losses = [tr.step(latents, noise, t) for _ in range(LORA_STEPS)]
        with torch.no_grad():
            cond = tr.text(tr.subject).clone()
            noisy = ft.add_noise(latents, noise, t, tr.acp)
            live = run.session.unet(noisy, t, cond.expand(BATCH, -1, -1)).clone()
        unet_sd, subject = run.finish()
    print("\nLoRA losses:", [round(v, 5) for v in losses])
    assert all(k.startswith("diffusion_model.") for k in unet_sd)
    assert any(k.endswith(".lora_up.weight") for k in unet_sd) and any(k.endswith(".diff_b") for k in unet_sd)

    in_memory = nf.apply_finetune(host_unet, unet_sd)
    path = finetune_io.save_finetune(str(tmp_path), "lora test", unet_sd, Subject(subject, CATEGORY), "lora",
                                     {"losses": losses})
    sd2, subject2, mode, meta = finetune_io.load_finetune(path)
    assert nf.finetune_misfits(host_unet, sd2) == []   # Load BLIP-Diffusion Fine-tune's check takes it
    own = host_unet.model_state_dict()
    assert any(own[k.replace(".lora_down.weight", ".weight")].ndim == 4 for k in sd2 if k.endswith(".lora_down.weight")), \
        "no convolution has a LoRA here: the check above saw none"
    reloaded = nf.apply_finetune(host_unet, sd2)
    x = noisy.float()
    base = eps_of(host_unet, x, t, cond.expand(BATCH, -1, -1))
    eps_mem = eps_of(in_memory, x, t, cond.expand(BATCH, -1, -1))
    eps_re = eps_of(reloaded, x, t, cond.expand(BATCH, -1, -1))
    print(f"LoRA's change of eps: {rel(eps_mem, base):.2e} (relative)")
    assert mode == "lora" and torch.equal(subject2.embedding, subject) and meta["losses"] == losses
    assert torch.equal(eps_mem, eps_re), "the reloaded LoRA renders differently from the in-memory one"
    assert rel(eps_mem, live) < 1e-4, "the exported LoRA is not the model that was trained"
    assert rel(eps_mem, base) > 1e-3, "the LoRA changed nothing"
    half = LORA_STEPS // 2
    assert sum(losses[-half:]) / half < 0.9 * sum(losses[:half]) / half, losses
    assert losses[-1] < losses[0], losses


# -- bad input and small parts (no model needed) ------------------------------------------------------
def test_bad_settings_are_refused_with_clear_messages():
    from blip_diffusion.blip_core import finetune as ft, prompting

    for kwargs, word in [(dict(steps=0), "steps"), (dict(lr=0.0), "learning_rate"), (dict(lr=-1e-5), "learning_rate"),
                         (dict(lr=float("nan")), "learning_rate"), (dict(batch_size=0), "batch_size"),
                         (dict(resolution=100), "resolution")]:
        args = dict(steps=2, lr=5e-6, batch_size=3, resolution=64) | kwargs
        with pytest.raises(ft.FinetuneError, match=word):
            ft.check_settings(**args)
    with pytest.raises(ft.FinetuneError, match="no training images"):
        ft.split_images([])
    with pytest.raises(ft.FinetuneError, match="no training images"):
        ft.split_images(torch.zeros(0, 8, 8, 3))
    with pytest.raises(ft.FinetuneError, match="category is empty"):
        ft.training_caption("  ")
    with pytest.raises(ft.FinetuneError, match="shorter category"):
        prompting.caption_layout(list(range(100, 160)), 1, 2, 2)


def test_caption_is_lavis_cleaned_and_unamplified():
    from blip_diffusion.blip_core import finetune as ft, prompting

    assert ft.training_caption("Red  Teapot.") == ("red teapot", "a red teapot")
    layout = prompting.caption_layout([320, 1929], 49406, 49407, 49407)
    assert layout.used == 20 and len(layout.ids) == 61 and layout.ids[:5] == [49406, 320, 1929, 49407, 49407]


def test_mixed_sizes_are_each_resized_and_cropped(photos):
    from blip_diffusion.blip_core import finetune as ft

    imgs = ft.split_images(photos.tensors + [torch.cat([photos.tensors[0], photos.tensors[0]])])
    assert len(imgs) == 5 and len({tuple(i.shape) for i in imgs}) == 3
    px = ft.target_pixels(imgs, 64)
    assert px.shape == (5, 64, 64, 3) and 0 <= px.min() and px.max() <= 1
    rgba = torch.cat([photos.tensors[2], torch.zeros_like(photos.tensors[2][..., :1])], dim=-1)
    assert torch.equal(ft.target_pixels(ft.split_images(rgba), 64), torch.ones(1, 64, 64, 3)), "alpha over white"


def test_non_finite_loss_stops_before_any_update():
    from blip_diffusion.blip_core import finetune as ft

    w = torch.nn.Parameter(torch.ones(4, 1, 1, 1))
    subject = torch.nn.Parameter(torch.ones(1, 16, 8))

    def unet(x, t, cond):
        return x * w.reshape(1, 4, 1, 1) * float("nan")

    opt = ft.make_optimizer([("w", w), ("subject", subject)], 1e-3, in_backward=True)
    tr = ft.Trainer(unet, lambda s: s, subject, opt)
    with pytest.raises(ft.NonFiniteLoss, match="nothing was returned"):
        tr.step(torch.ones(2, 4, 2, 2), torch.ones(2, 4, 2, 2), torch.tensor([1, 2]))
    assert torch.equal(w.detach(), torch.ones(4, 1, 1, 1)) and w.grad is None


@pytest.mark.parametrize("bucket_numel", [1, 40, 1 << 25])
def test_in_backward_adamw_is_adamw(bucket_numel):
    """Stepping buckets of tensors during backward gives torch's AdamW over the LAVIS groups, to the
    bit, whether each tensor is its own bucket, several share one, or all of them do."""
    from blip_diffusion.blip_core import finetune as ft

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    twin.load_state_dict(net.state_dict())
    a = ft.make_optimizer(list(net.named_parameters()), 1e-2, in_backward=True, bucket_numel=bucket_numel)
    groups = [{"params": [p for p in twin.parameters() if p.ndim >= 2], "weight_decay": 0.01},
              {"params": [p for p in twin.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    b = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, **ft.adamw_impl(twin.parameters()))
    for _ in range(3):
        x = torch.randn(7, 6)
        net(x).pow(2).mean().backward()
        a.step()
        assert all(p.grad is None for p in net.parameters()), "gradients are freed once applied"
        twin(x).pow(2).mean().backward()
        b.step()
        b.zero_grad()
    a.close()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))


def test_in_backward_two_backwards_before_step_accumulate():
    """Two backward passes before step() update once with the summed gradient, as torch's AdamW does."""
    from blip_diffusion.blip_core import finetune as ft

    w, twin = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = ft.make_optimizer([("w", w)], 1e-1, in_backward=True)
    ref = torch.optim.AdamW([twin], lr=1e-1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            **ft.adamw_impl([twin]))
    for p in (w, twin):
        (p * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        (p * p).sum().backward()
    opt.step()
    ref.step()
    assert torch.equal(w.detach(), twin.detach()) and opt.optimizer.state[w]["step"].item() == 1
    opt.close()


def test_in_backward_holds_one_bucket_of_gradients():
    """During backward no more than a bucket (plus the tensor that filled it) of gradients exists."""
    from blip_diffusion.blip_core import finetune as ft

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])   # 12 tensors, 432 elements
    held = []

    def on_grad(name, grad):
        held.append(sum(p.grad.numel() for p in net.parameters() if p.grad is not None))

    opt = ft.make_optimizer(list(net.named_parameters()), 1e-3, in_backward=True, on_grad=on_grad, bucket_numel=100)
    net(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert len(held) == 12 and max(held) <= 100 + 64, held
    assert max(held) < 432, "a bucket was applied before the backward pass ended"
    opt.close()


def test_finetune_file_is_atomic_and_checked(tmp_path):
    from blip_diffusion.blip_core import finetune_io
    from blip_diffusion.blip_core.subject import Subject

    subject = Subject(torch.randn(1, 16, 768), "dog", {"a": 1})
    sd = {"diffusion_model.out.2.diff": torch.randn(4, 8, 3, 3), "diffusion_model.out.2.diff_b": torch.randn(4)}
    path = finetune_io.save_finetune(str(tmp_path), "ok", sd, subject, "full", {"steps": 2})
    got, s2, mode, meta = finetune_io.load_finetune(path)
    assert mode == "full" and meta == {"steps": 2} and s2.category == "dog" and torch.equal(s2.embedding,
                                                                                              subject.embedding)
    assert all(torch.equal(got[k], sd[k]) for k in sd) and set(got) == set(sd)
    with pytest.raises(FileExistsError):
        finetune_io.save_finetune(str(tmp_path), "ok", sd, subject, "full")
    for bad in ("../up", "/abs/x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="not allowed"):
            finetune_io.save_finetune(str(tmp_path), bad, sd, subject, "full")
    with pytest.raises(Exception):
        finetune_io.save_finetune(str(tmp_path), "broken", {"diffusion_model.x.diff": object()}, subject, "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.safetensors"], "a failed save left a file behind"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a BLIP-Diffusion fine-tune file"):
        finetune_io.load_finetune(str(tmp_path / "foreign.safetensors"))


def test_loss_plot_is_an_image():
    from blip_diffusion.blip_core.finetune_plot import loss_plot

    for losses in ([0.5], [0.9, 0.7, 0.8, 0.4], [1.0] * 3):
        img = loss_plot(losses)
        assert img.shape == (1, 360, 640, 3) and img.dtype == torch.float32 and img.min() >= 0 and img.max() <= 1
        assert img.std() > 0


def test_vae_posterior_survives_the_hosts_out_of_memory_retry(host, inputs, monkeypatch, caplog):
    """On a GPU that runs out of memory, the host's VAE retries in tiles sized for the latent's
    channels, which cannot hold both posterior moments: training falls back to the posterior mean."""
    import comfy.model_management as mm
    from blip_diffusion.nodes import host_finetune as nf

    fsm = host.vae.first_stage_model
    real, calls = fsm.encode, []

    def out_of_memory_once(x):
        calls.append(tuple(x.shape))
        if len(calls) == 1:
            raise mm.OOM_EXCEPTION("CUDA out of memory (simulated)")
        return real(x)

    monkeypatch.setattr(fsm, "encode", out_of_memory_once)
    with caplog.at_level("WARNING", logger="blip_diffusion"):
        mean, std = nf.host_vae_moments(host.vae, inputs.pixels)
    assert len(calls) > 2  # the regular encode, the host's tiles, then the plain encode
    assert std is None
    assert "training on the posterior mean" in caplog.text
    assert (mean - inputs.mean).abs().max().item() <= 1e-5
