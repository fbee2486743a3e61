"""Where the GPU time goes (diagnosis for bench/RESULTS.md's GPU goals); run by bench/gpu.sh --profile.

gpu_bench.py finds the bf16 UNet call at batch 2 about 11x the matmul floor while batch 8 is
3.6x, and the full fine-tune step at 18x (28x before its AdamW stepped buckets instead of single
tensors; bench/RESULTS.md). This asks: is the card busy, or waiting on the CPU?
  * UNet call, bf16, batch 2 and 8: wall time, the summed GPU kernel time (profiler), and the
    wall time of the same call replayed from a CUDA graph (no per-kernel launch cost);
  * fine-tune step (the node's training path, full mode, batch 3, 512 px): wall time, GPU kernel
    time, and the ops that take the most GPU time.
One JSON line per measurement, all written to --out; profiler tables go to the log.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench as gb  # noqa: E402


def device_us(prof) -> float:
    """Summed self time of the device kernels in a profile, microseconds."""
    import torch

    total = 0.0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total += e.self_device_time_total
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="/tmp/gpu_profile.json")
    a = ap.parse_args()
    gb.setup(a.device)
    import torch
    from torch.profiler import ProfilerActivity, profile

    import comfy.model_management as mm

    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    px, res, dtype = (64, 64, torch.float32) if a.smoke else (512, 512, torch.bfloat16)
    results = []

    def record(**r):
        print(json.dumps(r), flush=True)
        results.append(r)
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")

    clip = gb.build_clip()
    cond = clip.encode_from_tokens(clip.tokenize("a teapot on a wooden table")).to(dev)
    unet = gb.build_unet(dtype)
    mm.load_models_gpu([unet])
    dm = unet.model.diffusion_model
    for batch in (2, 8):
        x = torch.randn(batch, 4, px // 8, px // 8, device=dev, dtype=dtype)
        t = torch.full((batch,), 500.0, device=dev)
        ctx = cond.expand(batch, -1, -1).to(dtype).contiguous()
        with torch.inference_mode():
            wall = gb.timed(lambda: dm(x, t, context=ctx), sync, reps=5)
            with profile(activities=acts) as prof:
                dm(x, t, context=ctx)
                sync()
            row = dict(name=f"UNet call {px}px batch {batch}", dtype=str(dtype), wall_s=wall,
                       gpu_kernel_s=device_us(prof) / 1e6 if cuda else None)
            if cuda:
                try:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(3):
                            dm(x, t, context=ctx)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        dm(x, t, context=ctx)
                    row["cuda_graph_s"] = gb.timed(graph.replay, sync, reps=10)
                    del graph
                except Exception as e:  # recorded, not fatal
                    row["cuda_graph_error"] = f"{type(e).__name__}: {e}"[:300]
        record(**row)
    unet = dm = None
    mm.unload_all_models()
    mm.soft_empty_cache()

    for mode in ("full", "lora"):
        with gb.finetune_steps(clip, mode, res) as step:
            wall = gb.timed(step, sync, reps=5)
            with profile(activities=acts) as prof:
                for _ in range(3):
                    step()
                sync()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)
        top = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:12]
        record(name=f"fine-tune step, batch 3, {res}px, {mode}", wall_s=wall,
               gpu_kernel_s=device_us(prof) / 3e6 if cuda else None,
               top_ops=[(e.key, round(getattr(e, key) / 3e3, 2), e.count // 3) for e in top])
    return 0


if __name__ == "__main__":
    sys.exit(main())
