"""GPU benchmark, for a session lent an H100/H200 (see bench/gpu.sh); untimed smoke run on CPU.

Builds full-size models with random weights in-process (the host's SD1.5 UNet, CLIP-L and VAE
classes, our subject encoder: real shapes, so time and memory are real; no weights travel),
then measures with the host's own model code:
  * UNet call at 512 px, CFG batch 2, fp16 and bf16; its FLOPs (torch's flop counter) against
    a measured bf16 matmul rate, the physical floor (goal: within 2.5x);
  * the zero-shot sampling loop (published PNDM, 25 and 100 steps, CFG 7.5), fp16 and bf16;
  * subject encode (one image);
  * the 76-step fine-tune at batch 3, 512 px (full UNet, the published recipe), bf16 autocast.
Prints one JSON line per measurement and writes them to --out.

    python bench/gpu_bench.py --out bench/results/gpu.json            # on the GPU machine
    python bench/gpu_bench.py --device cpu --smoke --out /tmp/x.json   # checks the script runs
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMFY = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".cache" / "ComfyUI")

SD15_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
             'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
             'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': False,
             'context_dim': 768, 'num_heads': 8, 'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             'use_temporal_attention': False, 'use_temporal_resblock': False}


def setup(device: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    sys.path.append(str(COMFY))
    from _pack import import_pack

    import_pack()
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    import comfy.model_management  # noqa: F401  (device selection happens at import)


def randomise(module, std=0.02):
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, std)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def build_unet(dtype):
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET, dtype=dtype))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=mm.get_torch_device())
    model.diffusion_model.to(mm.get_torch_device())
    randomise(model.diffusion_model)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_clip():
    import torch

    import comfy.sd
    import comfy.sd1_clip

    class Target:
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer
        params = {}

    clip = comfy.sd.CLIP(target=Target(), model_options={"dtype": torch.float32})
    randomise(clip.cond_stage_model)
    return clip


def timed(fn, sync, reps=3):
    fn()
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return min(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and step counts: checks the script runs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    a = ap.parse_args()
    setup(a.device)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import comfy.model_management as mm
    from blip_diffusion.blip_core import pndm
    from blip_diffusion.blip_core.subject_encoder import SubjectEncoder

    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    px = 64 if a.smoke else 512
    render_steps = [2] if a.smoke else [25, 100]
    ft_steps, ft_res = (2, 64) if a.smoke else (76, 512)
    dtypes = [torch.float32] if not cuda else [torch.float16, torch.bfloat16]
    results = []

    def record(**r):
        r.update(device=torch.cuda.get_device_name() if cuda else "cpu", smoke=a.smoke,
                 peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
        print(json.dumps(r), flush=True)
        results.append(r)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    # The physical floor: a large bf16 matmul.
    if cuda:
        m = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        sec = timed(lambda: m @ m, sync, reps=10)
        peak_tflops = 2 * 8192 ** 3 / sec / 1e12
        record(name="bf16 matmul 8192^3", tflops=peak_tflops)
        del m
    else:
        peak_tflops = None

    clip = build_clip()
    tokens = clip.tokenize("a teapot on a wooden table")
    cond = clip.encode_from_tokens(tokens).to(dev)
    for dtype in dtypes:
        unet = build_unet(dtype)
        mm.load_models_gpu([unet])
        dm = unet.model.diffusion_model
        x = torch.randn(2, 4, px // 8, px // 8, device=dev, dtype=dtype)
        t = torch.tensor([500.0, 500.0], device=dev)
        ctx = torch.cat([cond, cond]).to(dtype)
        with torch.inference_mode():
            call = timed(lambda: dm(x, t, context=ctx), sync)
            with FlopCounterMode(display=False) as fc:
                dm(x, t, context=ctx)
        flops = fc.get_total_flops()
        floor = flops / (peak_tflops * 1e12) if peak_tflops else None
        record(name=f"UNet call {px}px CFG batch 2", dtype=str(dtype), seconds=call, gflops=flops / 1e9,
               floor_seconds=floor, x_floor=call / floor if floor else None)
        # Render: the published PLMS loop on the host UNet, CFG 7.5, then the VAE decode.
        alphas = pndm.alphas_cumprod()

        def eps_fn(xt, ts):
            with torch.inference_mode():
                e = dm(torch.cat([xt, xt]).to(dtype), torch.tensor([float(ts)] * 2, device=dev),
                       context=ctx).float()
            u, c = e.chunk(2)
            return u + 7.5 * (c - u)

        for steps in render_steps:
            ts = pndm.pndm_timesteps(steps)
            z = torch.randn(1, 4, px // 8, px // 8, device=dev)
            sec = timed(lambda: pndm.sample_plms(eps_fn, z, ts, alphas.to(dev)), sync, reps=1)
            record(name=f"render loop {px}px {steps} PNDM steps (UNet only)", dtype=str(dtype), seconds=sec)
        unet = dm = None
        mm.unload_all_models()
        mm.soft_empty_cache()

    enc = SubjectEncoder().to(dev)
    randomise(enc)
    img = torch.rand(1, 256, 320, 3)
    for dtype in dtypes:
        enc.to(dtype)
        sec = timed(lambda: enc.encode(img, "teapot"), sync)
        record(name="subject encode (one image)", dtype=str(dtype), seconds=sec)
    enc = None

    # Fine-tune: the node's own training path (full UNet, published optimiser, bf16 autocast on GPU).
    from blip_diffusion.blip_core import finetune as ft
    from blip_diffusion.nodes import host_finetune
    from blip_diffusion.nodes.nodes_conditioning import sd1_tokenizer

    unet = build_unet(torch.float32)
    tok = sd1_tokenizer(clip)
    layout = ft.caption_layout(tok.tokenizer("a teapot", add_special_tokens=False)["input_ids"],
                               tok.start_token, tok.end_token, tok.pad_token)
    gen = torch.Generator().manual_seed(0)
    with host_finetune.training(unet, clip, layout, torch.randn(1, 16, 768, generator=gen) * 0.5,
                                mode="full", gradient_checkpointing=False) as run:
        lat = torch.randn(3, 4, ft_res // 8, ft_res // 8, generator=gen)
        sync()
        t0 = time.perf_counter()
        for _ in range(ft_steps):
            run.trainer.step(lat, torch.randn(lat.shape, generator=gen), torch.randint(0, 1000, (3,), generator=gen))
        sync()
        record(name=f"fine-tune {ft_steps} steps, batch 3, {ft_res}px, full UNet", seconds=time.perf_counter() - t0)

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
