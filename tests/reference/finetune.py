"""Reference: BLIP-Diffusion subject fine-tuning steps, written from LAVIS' ``BlipDiffusion.forward``
with diffusers' UNet2DConditionModel, ContextCLIPTextModel, DDPMScheduler and torch's AdamW.

args:  model_dir, caption ("a dog"), steps, lr, weight_decay, big_dir (where the large arrays go; none:
       not written), optionally images (paths) + resolution for the target-image / VAE check.
tensors in: subject (1, 16, 768) initial subject embedding; for k < steps: latents_k (B, 4, h, w)
       (UNet scale), noise_k, timesteps_k (int64).
tensors out: loss_k, cond_0 (text conditioning of step 0), eps_0 (UNet output of step 0),
       subject_grad_0, subject_final; target_i / vae_mean_i / vae_std_i for the image check;
       caption_ids; step_seconds (wall time of each step: forward, backward, AdamW), peak_rss_mb.
big_dir: grads_0.npy (step-1 gradients of every UNet parameter) and params_final.npy (the UNet
       after all steps), flat float32 in index.json's order (diffusers names, offsets, shapes).

The optimiser follows LAVIS' runner: AdamW(lr, betas (0.9, 0.999)) over two groups, weight decay on
every trainable tensor except those with ``p.ndim < 2`` or "bias"/"ln"/"bn" in the name (LAVIS
``BaseModel.get_optimizer_params``), eps 1e-8 (torch's default).
"""
import json
import os
import resource
import time

from common import io, resize_center_crop

args, tensors, save = io()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

d = args["model_dir"]
out = {}


def lavis_target(path, size):
    """torchvision Resize(size, BICUBIC) + CenterCrop(size) + ToTensor + Normalize(0.5, 0.5) on a PIL image."""
    img = Image.open(path).convert("RGB")
    img = resize_center_crop(img, size, Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
    return ((x - 0.5) / 0.5)[None]


if args.get("images"):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.path.join(d, "vae")).eval()
    with torch.no_grad():
        for i, path in enumerate(args["images"]):
            x = lavis_target(path, args["resolution"])
            dist = vae.encode(x).latent_dist
            out[f"target_{i}"], out[f"vae_mean_{i}"], out[f"vae_std_{i}"] = x, dist.mean, dist.std
    del vae

from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

tokenizer = CLIPTokenizer.from_pretrained(os.path.join(d, "tokenizer"))
text_encoder = ContextCLIPTextModel.from_pretrained(os.path.join(d, "text_encoder")).eval()
text_encoder.requires_grad_(False)
unet = UNet2DConditionModel.from_pretrained(os.path.join(d, "unet"))
unet.train()
scheduler = DDPMScheduler.from_pretrained(os.path.join(d, "scheduler"))

ctx = torch.nn.Parameter(tensors["subject"].clone().float())   # LAVIS: ctx_embeddings_cache
named = [("unet." + n, p) for n, p in unet.named_parameters()] + [("ctx_embeddings_cache", ctx)]
p_wd, p_non_wd = [], []
for n, p in named:
    if not p.requires_grad:
        continue
    if p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n:
        p_non_wd.append(p)
    else:
        p_wd.append(p)
wd = float(args.get("weight_decay", 0.01))
optimizer = torch.optim.AdamW([{"params": p_wd, "weight_decay": wd}, {"params": p_non_wd, "weight_decay": 0}],
                              lr=float(args["lr"]), betas=(0.9, 0.999))

# the flat files for the UNet-sized results
index, offset = [], 0
for n, p in unet.named_parameters():
    index.append((n, offset, list(p.shape)))
    offset += p.numel()
big = args.get("big_dir")
if big:
    os.makedirs(big, exist_ok=True)
    json.dump(index, open(os.path.join(big, "index.json"), "w"))


def dump(name, values):
    if not big:
        return
    mm = np.lib.format.open_memmap(os.path.join(big, name), mode="w+", dtype=np.float32, shape=(offset,))
    for (n, off, shape), (n2, p) in zip(index, unet.named_parameters()):
        v = values(p)
        mm[off:off + v.numel()] = v.detach().reshape(-1).float().numpy()
    mm.flush()
    del mm


caption_ids = None
seconds = []
for k in range(int(args["steps"])):
    start = time.perf_counter()
    latents, noise = tensors[f"latents_{k}"].float(), tensors[f"noise_{k}"].float()
    timesteps = tensors[f"timesteps_{k}"].long()
    bsz = latents.shape[0]
    input_ids = tokenizer([args["caption"]] * bsz, padding="do_not_pad", truncation=True,
                          max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    caption_ids = input_ids[0]
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(input_ids=input_ids, ctx_embeddings=ctx.expand(bsz, -1, -1),
                                         ctx_begin_pos=[2] * bsz)[0]
    noise_pred = unet(noisy_latents.float(), timesteps, encoder_hidden_states).sample
    loss = F.mse_loss(noise_pred.float(), noise.float(), reduction="mean")
    loss.backward()
    out[f"loss_{k}"] = loss.detach().reshape(1)
    if k == 0:
        out["cond_0"] = encoder_hidden_states[:1].detach()
        out["eps_0"] = noise_pred.detach()
        out["subject_grad_0"] = ctx.grad.detach().clone()
        pause = time.perf_counter()
        dump("grads_0.npy", lambda p: p.grad)
        start += time.perf_counter() - pause
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds.append(time.perf_counter() - start)

dump("params_final.npy", lambda p: p)
out["subject_final"] = ctx.detach()
out["caption_ids"] = caption_ids.float()
out["step_seconds"] = torch.tensor(seconds)
out["peak_rss_mb"] = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
save(out)
