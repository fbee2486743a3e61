"""The reference side of the GPU comparison (#18 item 1); runs inside the reference environment.

diffusers' BlipDiffusionPipeline on the released-layout folder that bench/gpu_bench.py --model-dir
loads with the pack's loader (same files, same GPU, one bench/gpu.sh --reference run): 512 px,
25 and 100 PNDM steps, a batch of 1 and of 4 (four latents from one generator, four copies of the
photo, as the pipeline batches), for each dtype. Per row: seconds per image (best of --reps), the
first image's latency after the pipeline moved to the device, peak GPU memory.

The pipeline moves its reference photo to the device but not to the pipeline's dtype; where that
fails in half precision the error is recorded and the row is run again with the photo cast to the
dtype ("photo cast"), the smallest change that lets the published code run there.

    .cache/ref-venv/bin/python bench/gpu_reference.py --model-dir DIR --out bench/results/gpu_reference.json
    .cache/ref-venv/bin/python bench/gpu_reference.py --model-dir .cache/models/blip-diffusion-test \\
        --device cpu --smoke --out /tmp/ref.json                      # checks the script runs
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common import build_pipeline  # noqa: E402

PROMPT, CATEGORY = "on a wooden table in a sunny kitchen", "teapot"  # the zero-shot workflow's


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--smoke", action="store_true", help="64 px, 2 steps, one repetition")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --smoke off-GPU", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    px, step_counts, reps = (64, [2], 1) if a.smoke else (512, [25, 100], a.reps)
    photo = Image.fromarray((np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8))
    rows = []

    def record(**r):
        r.update(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                 peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
        print(json.dumps(r), flush=True)
        rows.append(r)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)

    for name in a.dtypes.split(","):
        dtype = getattr(torch, name)
        pipe = build_pipeline(a.model_dir).to(a.device, dtype)
        preprocess = pipe.image_processor.preprocess
        cast = False

        def call(steps, batch):
            pipe(prompt=[PROMPT] * batch, reference_image=[photo] * batch if batch > 1 else photo,
                 source_subject_category=[CATEGORY] * batch, target_subject_category=[CATEGORY] * batch,
                 generator=torch.Generator().manual_seed(0), guidance_scale=7.5, height=px, width=px,
                 num_inference_steps=steps, output_type="pt")  # a tensor: numpy has no bf16
            sync()

        def measure(steps, batch):
            """(seconds of the first call, best of ``reps`` later calls)."""
            with torch.no_grad():
                t = time.perf_counter()
                call(steps, batch)
                first_call = time.perf_counter() - t
                times = []
                for _ in range(reps):
                    t = time.perf_counter()
                    call(steps, batch)
                    times.append(time.perf_counter() - t)
            return first_call, min(times)

        def cast_preprocess(*args, **kwargs):  # the photo in the pipeline's dtype
            out = preprocess(*args, **kwargs)
            out["pixel_values"] = out["pixel_values"].to(dtype)
            return out

        first = None
        for steps in step_counts:
            for batch in (1, 4):
                label = f"reference pipeline {px}px {steps} PNDM steps batch {batch}"
                label += " (photo cast)" if cast else ""
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                try:
                    first_call, best = measure(steps, batch)
                except (RuntimeError, TypeError) as e:
                    why = f"{type(e).__name__}: {e}"[:400]
                    record(name=label, dtype=name, error=why if cast else f"as published: {why}")
                    if cast or dtype == torch.float32:
                        continue
                    cast, label = True, label + " (photo cast)"  # and this row again
                    pipe.image_processor.preprocess = cast_preprocess
                    try:
                        first_call, best = measure(steps, batch)
                    except (RuntimeError, TypeError) as e2:
                        record(name=label, dtype=name, error=f"{type(e2).__name__}: {e2}"[:400])
                        continue
                first = first_call if first is None else first
                record(name=label, dtype=name, seconds=best, s_per_image=best / batch, s_per_step=best / steps,
                       first_image_s=first if (steps, batch) == (step_counts[0], 1) else None)
        pipe = None
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
