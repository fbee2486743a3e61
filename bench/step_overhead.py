"""What a sampling step costs besides the UNet (#18 item 2), split into ours and the host's. A CPU probe.

The zero-shot workflow's sampling (SamplerCustom with BlipPNDMSampler, CFG 7.5, 512 px latent) runs
with the host's UNet replaced by a no-op, so all that is left per step is the host's CFG and model
wrapper plus our PNDM loop. Separately, our loop alone (blip_core.pndm.sample_plms_sigmas with the
same no-op as the model) is run on the same latent. For each: milliseconds per step on this CPU and
the torch operators per step (counted with a dispatch mode; on a GPU each is about one kernel launch,
which is what the step pays on the CPU side).

    .cache/host-venv/bin/python bench/step_overhead.py --out bench/results/step_overhead.json
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--out", default="bench/results/step_overhead.json")
    a = ap.parse_args()
    gpu_bench.setup("cpu")
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from blip_diffusion.blip_core import pndm

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    unet = gpu_bench.build_unet(torch.float32, model_channels=32)
    unet.model.diffusion_model.forward = lambda x, *args, **kwargs: x  # no UNet: what is left is the wrapping
    parts = (unet, gpu_bench.build_clip(), gpu_bench.build_vae(), gpu_bench.build_encoder())
    rows = {}
    with torch.inference_mode():
        gpu_bench.zero_shot(parts, 3, a.px)  # warm-up: first-call costs of the host and of torch
        _, _, seconds = gpu_bench.zero_shot(parts, a.steps, a.px)
        with Count() as counted:
            gpu_bench.zero_shot(parts, a.steps, a.px)
        # the nodes before the sampler also dispatch ops: count them alone (a 1-step render skips the model)
        with Count() as outside:
            gpu_bench.zero_shot(parts, 1, a.px)
        per_step = {k: (v - outside.ops.get(k, 0)) / a.steps for k, v in counted.ops.items()}
        rows["host sampling with a no-op UNet (host CFG + model wrapper + our PNDM loop)"] = {
            "ms_per_step": 1000 * seconds / a.steps, "ops_per_step": round(sum(per_step.values()), 1),
            "top_ops": dict(sorted(((k, round(v, 1)) for k, v in per_step.items() if v > 0.5),
                                   key=lambda kv: -kv[1])[:12])}

        x = torch.randn(1, 4, a.px // 8, a.px // 8)
        sig = torch.linspace(14.6, 0.03, a.steps + 1).tolist()[:-1] + [0.0]
        pndm.sample_plms_sigmas(lambda xx, s: xx, x, sig, final_sigma=0.0292)
        start = time.perf_counter()
        pndm.sample_plms_sigmas(lambda xx, s: xx, x, sig, final_sigma=0.0292)
        ours = time.perf_counter() - start
        with Count() as ours_ops:
            pndm.sample_plms_sigmas(lambda xx, s: xx, x, sig, final_sigma=0.0292)
        rows["our PNDM loop alone (blip_core.pndm.sample_plms_sigmas)"] = {
            "ms_per_step": 1000 * ours / a.steps, "ops_per_step": round(sum(ours_ops.ops.values()) / a.steps, 1),
            "top_ops": dict(sorted(((k, round(v / a.steps, 1)) for k, v in ours_ops.ops.items()),
                                   key=lambda kv: -kv[1])[:12])}
    for name, row in rows.items():
        print(f"{name}: {row['ms_per_step']:.3f} ms/step, {row['ops_per_step']} ops/step {row['top_ops']}")
    gpu_bench.write_json(a.out, {"device": "cpu (2 cores)", "torch": torch.__version__, "px": a.px, "steps": a.steps,
                                 "cfg": 7.5, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
