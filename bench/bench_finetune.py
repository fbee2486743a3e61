"""Benchmark: one BLIP-Diffusion fine-tuning step (full UNet, as published) against the reference step.

    .cache/host-venv/bin/python bench/bench_finetune.py [--steps 3] [--json]

Both sides: the generated ``test`` weights (SD 1.5 widths, one layer per block, 580M UNet
parameters), CPU, fp32, 64 px, batch 3, the same inputs (subject embedding, latents, noise,
timesteps), one untimed warm-up step, then ``--steps`` timed steps (median reported). Ours is the
node's code path in-process (the host's UNet and CLIP, ``host_finetune.training``); the
reference is tests/reference/finetune.py (diffusers UNet2DConditionModel + ContextCLIPTextModel,
torch's AdamW as LAVIS builds it). Each side runs in its own process, one after the other; peak
memory is each process's peak RSS (models included).

Writes bench/results/finetune.json and bench/results/finetune.md; ``--json`` prints one line for
bench/run.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL_DIR = ROOT / ".cache" / "models" / "blip-diffusion-test"
RES, BATCH, LR, SEED = 64, 3, 5e-6, 2024


def inputs(steps: int):
    import torch

    gen = torch.Generator().manual_seed(SEED)
    t = {"subject": torch.randn(1, 16, 768, generator=gen) * 0.5}
    for k in range(steps):
        t[f"latents_{k}"] = torch.randn(BATCH, 4, RES // 8, RES // 8, generator=gen)
        t[f"noise_{k}"] = torch.randn(BATCH, 4, RES // 8, RES // 8, generator=gen)
        t[f"timesteps_{k}"] = torch.randint(0, 1000, (BATCH,), generator=gen)
    return t


# -- our side (a worker process) ------------------------------------------------------------------
def ours_worker(tensor_file: str, steps: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "scripts"))
    from _pack import import_pack

    import_pack()
    import comfy_inprocess  # noqa: F401  (the host's modules, CPU)
    import comfy.cli_args

    comfy.cli_args.args.fp32_text_enc = True
    import torch
    from safetensors.torch import load_file

    from blip_diffusion.nodes import host_clip, host_models
    from blip_diffusion.nodes import host_finetune as nf

    t = load_file(tensor_file)
    with torch.inference_mode():  # as the host's loader nodes run
        unet = host_models.load_unet(str(MODEL_DIR / "unet"))
        clip = host_models.load_clip(str(MODEL_DIR / "text_encoder"))
    layout = host_clip.caption_layout(clip, "a dog")
    seconds, losses = [], []
    with nf.training(unet, clip, layout, t["subject"], mode="full", lr=LR) as run:
        for k in range(steps):
            start = time.perf_counter()
            losses.append(run.trainer.step(t[f"latents_{k}"], t[f"noise_{k}"], t[f"timesteps_{k}"].long()))
            seconds.append(time.perf_counter() - start)
    return {"step_seconds": seconds, "losses": losses,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# -- the driver -------------------------------------------------------------------------------------
def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, CPU only, fp32"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    ap.add_argument("--json", action="store_true", help="print one result line for bench/run.py")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tensors", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "ours":
        print(json.dumps(ours_worker(a.tensors, a.steps)))
        return 0

    sys.path.insert(0, str(ROOT / "tests"))
    from safetensors.torch import save_file

    from refenv import run_reference

    total = a.steps + 1
    t = inputs(total)
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        path = os.path.join(tmp, "inputs.safetensors")
        save_file({k: v.contiguous() for k, v in t.items()}, path)
        ref = run_reference("finetune.py", {"model_dir": str(MODEL_DIR), "caption": "a dog", "steps": total,
                                            "lr": LR, "weight_decay": 0.01}, t, timeout=7200)
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "ours", "--tensors", path,
                               "--steps", str(total)], capture_output=True, text=True, timeout=7200,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
        if proc.returncode != 0:
            raise RuntimeError(f"our worker failed:\n{proc.stderr[-6000:]}")
        ours = json.loads(proc.stdout.strip().splitlines()[-1])

    ref_steps = [float(x) for x in ref["step_seconds"].tolist()][1:]
    our_steps = ours["step_seconds"][1:]
    ref_loss = [ref[f"loss_{k}"].item() for k in range(total)]
    loss_rel = max(abs(a_ - b) / abs(b) for a_, b in zip(ours["losses"], ref_loss))
    ours_s, ref_s = statistics.median(our_steps), statistics.median(ref_steps)
    ours_mb, ref_mb = ours["peak_rss_mb"], float(ref["peak_rss_mb"].item())
    settings = (f"test UNet (580M params), {RES} px, batch {BATCH}, fp32 CPU, AdamW, median of {a.steps} steps "
                "after 1 warm-up; peak RSS of each process (models included)")
    result = {
        "name": "fine-tune step (full UNet, test weights)", "goal": 1.0, "ours_s": ours_s, "reference_s": ref_s,
        "ratio": ours_s / ref_s, "settings": settings, "ours_peak_mb": ours_mb, "reference_peak_mb": ref_mb,
        "memory_ratio": ours_mb / ref_mb, "ours_steps_s": our_steps, "reference_steps_s": ref_steps,
        "max_loss_rel_diff": loss_rel, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "finetune.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        "### Fine-tuning step (BLIP-Diffusion, full UNet as published)", "",
        f"Machine: {result['machine']}; {result['date']}. Ratio = ours / reference, same run, same inputs.", "",
        "| measure | ours | reference | ratio |", "|---|---|---|---|",
        f"| seconds per step | {ours_s:.2f} s | {ref_s:.2f} s | {ours_s / ref_s:.2f}x |",
        f"| peak memory (RSS) | {ours_mb:.0f} MB | {ref_mb:.0f} MB | {ours_mb / ref_mb:.2f}x |", "",
        f"Settings: {settings}. Largest relative loss difference between the sides: {loss_rel:.1e}. Ours updates "
        "its tensors with torch's fused AdamW during the backward pass, a bucket of 32M elements at a time (no "
        "UNet-sized gradient buffer), and keeps "
        "the input UNet's own weights aside in a temporary file while their trainable copies train; the reference "
        "keeps all gradients and uses torch's default (for-loop) AdamW.",
    ]
    (out_dir / "finetune.md").write_text("\n".join(md) + "\n")
    if a.json:
        print(json.dumps({k: result[k] for k in ("name", "goal", "ours_s", "reference_s", "ratio", "settings",
                                                 "ours_peak_mb", "reference_peak_mb", "memory_ratio")}))
    else:
        print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
