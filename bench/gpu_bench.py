"""GPU benchmark, for a session lent an H100/H200 (see bench/gpu.sh); untimed smoke run on CPU.

No weights travel: full-size models are built in-process with random values (the host's SD 1.5
UNet, CLIP-L and VAE classes, our subject encoder; real shapes, so time and memory are real).
The host's own model code and model management do the work. Measures:
  * the physical floor: a large bf16 matmul's rate;
  * one UNet call, 512 px, CFG batch 2, fp16 and bf16, with its FLOPs (torch's flop counter)
    against that floor (goal: within 2.5x in bf16); in bf16 also channels-last and a batch of 8,
    which show whether the gap is the card's occupancy at small batch;
  * the zero-shot workflow (workflows/api/zero_shot.json), its nodes called in its order with its
    own settings, minus the file loader: subject encode, SubjectConditioning, the negative prompt,
    the published PNDM sampler in SamplerCustom, VAE decode; 25 and 100 steps, fp16 and bf16;
    completes, finite output, seconds per step, peak GPU memory;
  * the same render with the host's torch.compile wrapper (TorchCompileModel's), bf16;
  * the fine-tune node's training path, 76 steps at batch 3, 512 px, full UNet and LoRA, with
    the training FLOPs of one step against the floor.
Prints one JSON line per measurement and writes them all to --out.

    python bench/gpu_bench.py --out bench/results/gpu.json            # on the GPU machine
    python bench/gpu_bench.py --device cpu --smoke --out /tmp/x.json   # checks the script runs
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMFY = Path(os.environ.get("COMFYUI_DIR") or ROOT / ".cache" / "ComfyUI")

SD15_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
             'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
             'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': False,
             'context_dim': 768, 'num_heads': 8, 'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             'use_temporal_attention': False, 'use_temporal_resblock': False}
SD_VAE = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
          'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


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


def build_unet(dtype, **narrower):
    """The host's SD1.5 UNet with random weights; ``narrower`` (e.g. model_channels=64) changes the
    detected config's layer widths, for probes that need the structure, not the size."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET, dtype=dtype))
    config.unet_config.update(narrower)
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


def build_vae():
    """An SD VAE state dict in the original layout, handed to the host's VAE (its own detection)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    randomise(model)
    return comfy.sd.VAE(sd=model.state_dict())


def from_folder(folder: str):
    """The pack's loader on a released-layout folder (what Load BLIP-Diffusion does): the unet for a
    dtype, and the CLIP, VAE and subject encoder. For the side-by-side run, on the reference's files."""
    from blip_diffusion.nodes import host_models
    from blip_diffusion.nodes.nodes_encoder import load_encoder

    def unet(dtype):
        return host_models.load_unet(os.path.join(folder, "unet"), {"dtype": dtype})

    parts = (host_models.load_clip(os.path.join(folder, "text_encoder")),
             host_models.load_vae(os.path.join(folder, "vae")), load_encoder(os.path.join(folder, "qformer"), "bench"))
    return unet, parts


def build_encoder():
    import comfy.model_management as mm
    from blip_diffusion.blip_core.subject_encoder import SubjectEncoder
    from blip_diffusion.nodes.nodes_encoder import EncoderHandle, encoder_dtype

    enc = SubjectEncoder()
    randomise(enc)
    return EncoderHandle(enc.eval(), "random", encoder_dtype(mm.text_encoder_device()))


def write_json(path, data) -> None:
    """A result file, its folder made if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


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


def zero_shot(parts, steps: int, px: int, batch: int = 1, seed: int | None = None):
    """The shipped zero-shot workflow's nodes, in its order and with its settings; the loader's
    outputs come from ``parts`` and the photo is random; ``batch`` latents in the empty latent (what the
    batch tool's --batch-size sets); ``seed`` replaces the workflow's. Returns (latent, image, sampling seconds)."""
    import torch

    import nodes as host_nodes
    from blip_diffusion.batch.graph import load_workflow
    from blip_diffusion.nodes.nodes_conditioning import SubjectConditioning
    from blip_diffusion.nodes.nodes_encoder import SubjectEncode
    from blip_diffusion.nodes.nodes_sampler import BlipPNDMSampler, BlipPNDMScheduler
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    wf = {k: v["inputs"] for k, v in load_workflow("zero_shot").items()}
    model, clip, vae, encoder = parts
    photo = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(0))
    e, c = wf["encode"], wf["positive"]
    subject = SubjectEncode.execute(encoder, photo, e["category"], e["image_weights"], e["preprocess"]).result[0]
    positive = SubjectConditioning.execute(clip, subject, c["prompt"], c["target_category"], c["prompt_strength"],
                                           c["prompt_reps"]).result[0]
    negative = host_nodes.CLIPTextEncode().encode(clip, wf["negative"]["text"])[0]
    latent = host_nodes.EmptyLatentImage().generate(px, px, batch)[0]
    sigmas = BlipPNDMScheduler.execute(model, steps).result[0]
    sampler = BlipPNDMSampler.execute(wf["sampler"]["full_denoise"]).result[0]
    s = wf["sample"]
    start = time.perf_counter()
    seed = s["noise_seed"] if seed is None else seed
    out = SamplerCustom.execute(model, s["add_noise"], seed, s["cfg"], positive, negative, sampler, sigmas,
                                latent).result[0]
    sampling_s = time.perf_counter() - start
    image = host_nodes.VAEDecode().decode(vae, out)[0]
    return out["samples"], image, sampling_s


@contextlib.contextmanager
def finetune_steps(clip, mode: str, res: int, after_build=None, **narrower):
    """The fine-tune node's training path on a fresh fp32 UNet: yields one training step on a random
    batch of 3 at ``res`` px; the models are unloaded afterwards. ``after_build`` runs once the UNet
    is built, before training starts (e.g. to reset the peak-memory counter); ``narrower``: build_unet's."""
    import torch

    import comfy.model_management as mm
    from blip_diffusion.nodes import host_clip, host_finetune

    dev = mm.get_torch_device()
    layout = host_clip.caption_layout(clip, "a teapot")
    unet = build_unet(torch.float32, **narrower)
    gen = torch.Generator().manual_seed(0)
    if after_build is not None:
        after_build()
    with host_finetune.training(unet, clip, layout, torch.randn(1, 16, 768, generator=gen) * 0.5,
                                mode=mode, rank=16, gradient_checkpointing=False) as run:
        lat = torch.randn(3, 4, res // 8, res // 8, generator=gen).to(dev)

        def step():  # the batch goes to the device as finetune.run sends it
            run.trainer.step(lat, torch.randn(lat.shape, generator=gen).to(dev),
                             torch.randint(0, 1000, (3,), generator=gen).to(dev))

        def text():  # the text encoder's part of a step: forward and backward to the subject
            run.trainer.text(run.trainer.subject).float().sum().backward()
            run.trainer.subject.grad = None

        step.text = text
        yield step
    unet = run = None
    mm.unload_all_models()
    mm.soft_empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and step counts: checks the script runs")
    ap.add_argument("--dtypes", help="comma-separated, e.g. bfloat16 (default: float16,bfloat16 on a GPU, float32 on CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile render")
    ap.add_argument("--only", default="encode,calls,renders,batches,finetune,compile",
                    help="comma-separated parts to run: encode, calls (UNet call), renders, batches (latent batch "
                         "1/4/8, the batch tool's --batch-size), finetune, compile")
    ap.add_argument("--compile-backend", default="inductor", choices=["inductor", "cudagraphs"],
                    help="TorchCompileModel's backend for the compile part")
    ap.add_argument("--model-dir", help="a released-layout folder to load with the pack's loader (default: random "
                                        "full-size models built in-process)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    a = ap.parse_args()
    setup(a.device)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import comfy.model_management as mm

    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    if a.device == "cuda" and not cuda:  # fail fast: full sizes on a CPU would burn the whole lease
        print(f"no CUDA device (torch {torch.__version__}, host picked {dev}); use --device cpu --smoke off-GPU",
              file=sys.stderr)
        return 2
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if cuda else 'cpu'}", flush=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # The smoke run only proves every part runs: the smallest size, the fewest steps (2 PNDM steps are 2
    # UNet calls; 1 would be the lone t=0 step, which skips the model), one timed repetition.
    px = 64 if a.smoke else 512
    render_steps = [2] if a.smoke else [25, 100]
    ft_steps, ft_res = (1, 64) if a.smoke else (76, 512)
    encode_reps, call_reps = (1, 1) if a.smoke else (5, 3)
    narrow = {"model_channels": 32} if a.smoke else {}   # the smoke's UNets: SD1.5's blocks, 1/10 of the width
    dtypes = ([getattr(torch, d) for d in a.dtypes.split(",")] if a.dtypes
              else [torch.float16, torch.bfloat16] if cuda else [torch.float32])
    results, began = [], time.monotonic()

    def record(**r):
        r.update(device=torch.cuda.get_device_name() if cuda else "cpu", smoke=a.smoke,
                 peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                 elapsed_s=round(time.monotonic() - began, 1))
        print(json.dumps(r), flush=True)
        results.append(r)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")  # kept if a later step fails

    def fresh_peak():
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()

    # The physical floor: a large bf16 matmul.
    peak_tflops = None
    if cuda:
        m = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        sec = timed(lambda: m @ m, sync, reps=10)
        peak_tflops = 2 * 8192 ** 3 / sec / 1e12
        record(name="bf16 matmul 8192^3", tflops=peak_tflops)
        del m

    def floor_of(flops):
        return flops / (peak_tflops * 1e12) if peak_tflops else None

    def render(model, steps, dtype, label="", batch=1):
        fresh_peak()
        start = time.perf_counter()
        with torch.inference_mode():  # as the host's executor runs every node (execution.py)
            latent, image, sampling_s = zero_shot((model, clip, vae, encoder), steps, px, batch)
        sync()
        seconds = time.perf_counter() - start
        record(name=f"zero-shot workflow {px}px {steps} PNDM steps{label}", dtype=str(dtype),
               seconds=seconds, sampling_s=sampling_s, s_per_step=sampling_s / steps, image_shape=list(image.shape),
               images_per_s=batch / seconds, finite=bool(torch.isfinite(latent).all() and torch.isfinite(image).all()))

    if a.model_dir:  # the same files the reference loads (bench/gpu.sh --reference)
        build, (clip, vae, encoder) = from_folder(a.model_dir)
    else:
        build, clip, vae, encoder = partial(build_unet, **narrow), build_clip(), build_vae(), build_encoder()
    cond = clip.encode_from_tokens(clip.tokenize("a teapot on a wooden table")).to(dev)
    parts = set(a.only.split(","))
    if "encode" in parts:  # SubjectEncode as the workflow runs it: one photo, its category
        from blip_diffusion.nodes.nodes_encoder import SubjectEncode

        photo = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(0))
        fresh_peak()
        with torch.inference_mode():
            start = time.perf_counter()
            SubjectEncode.execute(encoder, photo, "teapot", "", "diffusers")
            sync()
            first = time.perf_counter() - start
            sec = timed(lambda: SubjectEncode.execute(encoder, photo, "teapot", "", "diffusers"), sync,
                        reps=encode_reps)
        record(name="subject encode, 1 photo", dtype=str(next(encoder.encoder.parameters()).dtype), seconds=sec,
               first_call_s=first)
    for dtype in dtypes if parts & {"calls", "renders", "batches"} else []:
        unet = build(dtype)
        mm.load_models_gpu([unet])
        dm = unet.model.diffusion_model
        calls = [("", 2, torch.contiguous_format)] if "calls" in parts else []
        if dtype == torch.bfloat16 and calls:
            calls += [(" channels-last", 2, torch.channels_last), ("", 8, torch.contiguous_format)]
        for label, batch, layout in calls:
            x = torch.randn(batch, 4, px // 8, px // 8, device=dev, dtype=dtype).to(memory_format=layout)
            t = torch.full((batch,), 500.0, device=dev)
            ctx = cond.expand(batch, -1, -1).to(dtype)
            dm.to(memory_format=layout)
            fresh_peak()
            with torch.inference_mode():
                sec = timed(lambda: dm(x, t, context=ctx), sync, reps=call_reps)
                with FlopCounterMode(display=False) as fc:
                    dm(x, t, context=ctx)
            flops = fc.get_total_flops()
            floor = floor_of(flops)
            record(name=f"UNet call {px}px batch {batch}{label}", dtype=str(dtype), seconds=sec, gflops=flops / 1e9,
                   floor_seconds=floor, x_floor=sec / floor if floor else None)
        dm.to(memory_format=torch.contiguous_format)
        for steps in render_steps if "renders" in parts else []:
            if a.model_dir and steps == render_steps[0]:  # beside the reference's first image after its move
                render(unet, steps, dtype, " (first image)")
            render(unet, steps, dtype)
            if a.model_dir:  # beside the reference's batch of 4 (bench/gpu_reference.py)
                render(unet, steps, dtype, ", latent batch 4", batch=4)
        if "batches" in parts and dtype == dtypes[-1]:  # --batch-size N: N seeds in one latent batch (bf16 on a GPU)
            for batch in (1, 4, 8):
                render(unet, render_steps[0], dtype, f", latent batch {batch}", batch=batch)
        unet = dm = None
        mm.unload_all_models()
        mm.soft_empty_cache()

    # Fine-tune: the node's training path (published optimiser, bf16 autocast on GPU), both modes.
    for mode in ("full", "lora") if "finetune" in parts else []:
        with finetune_steps(clip, mode, ft_res, after_build=fresh_peak, **narrow) as step:
            with FlopCounterMode(display=False) as fc:
                step()
            with FlopCounterMode(display=False) as text_fc:
                step.text()
            sync()
            t0 = time.perf_counter()
            for _ in range(ft_steps):
                step()
            sync()
            total = time.perf_counter() - t0
        floor = floor_of(fc.get_total_flops() * ft_steps)
        record(name=f"fine-tune {ft_steps} steps, batch 3, {ft_res}px, {mode}", seconds=total,
               step_tflops=fc.get_total_flops() / 1e12, text_tflops=text_fc.get_total_flops() / 1e12,
               floor_seconds=floor, x_floor=total / floor if floor else None)

    # Last, so that a compiler failure costs nothing above: the host's torch.compile wrapper
    # (what its TorchCompileModel node does) on the bf16 UNet; the first render pays the compile.
    if torch.bfloat16 in dtypes and not a.no_compile and "compile" in parts:
        try:
            from comfy_extras.nodes_torch_compile import TorchCompileModel

            label = " torch.compile" + ("" if a.compile_backend == "inductor" else f" {a.compile_backend}")
            compiled = TorchCompileModel.execute(build(torch.bfloat16), a.compile_backend).result[0]
            render(compiled, render_steps[0], torch.bfloat16, f"{label} (first: compiles)")
            render(compiled, render_steps[0], torch.bfloat16, label)
            for steps in render_steps[1:]:  # a new step count recompiles once (bench/NOTES.md), then runs compiled
                render(compiled, steps, torch.bfloat16, f"{label} (first at this step count)")
                render(compiled, steps, torch.bfloat16, label)
        except Exception as e:  # recorded, not fatal: the measurements above are kept
            record(name="zero-shot workflow torch.compile", error=f"{type(e).__name__}: {e}"[:500])
    return 0


if __name__ == "__main__":
    sys.exit(main())
