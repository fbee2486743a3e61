"""Why does a compiled render cost more when the step count changes (#18 item 3)? A CPU probe.

The host's TorchCompileModel wrapper (inductor) on a small SD1.5-shaped UNet (the host's class,
fewer channels, random weights), driven through the zero-shot workflow's nodes as gpu_bench runs
them: renders of N, N (another seed), M, M, K and K steps. For each render it records how many graphs
dynamo compiled and the guard that failed each time it compiled again. Guards are the same on any
device, so what recompiles here recompiles on the GPU; the seconds here are CPU seconds.

    .cache/host-venv/bin/python bench/compile_recompiles.py --out bench/results/compile_recompiles.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (the same builders and workflow as the GPU benchmark)

NARROW = {"model_channels": 64}  # the SD1.5 UNet's layout at a fifth of its width


class Reasons(logging.Handler):
    """Collects dynamo's recompile messages (the guard that failed)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if "ecompil" in text:
            self.lines.append(text.strip()[:600])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="4,8,12", help="three step counts, N,M,K")
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--out", default="bench/results/compile_recompiles.json")
    a = ap.parse_args()
    gpu_bench.setup("cpu")
    import torch
    import torch._dynamo.utils as dyn_utils

    from comfy_extras.nodes_torch_compile import TorchCompileModel

    torch._logging.set_logs(recompiles=True)
    reasons = Reasons()
    logging.getLogger("torch._dynamo").addHandler(reasons)
    logging.getLogger("torch").addHandler(reasons)

    unet = gpu_bench.build_unet(torch.float32, **NARROW)
    parts = (TorchCompileModel.execute(unet, "inductor").result[0], gpu_bench.build_clip(), gpu_bench.build_vae(),
             gpu_bench.build_encoder())
    rows = []
    for steps, seed in [(int(n), seed) for n in a.steps.split(",") for seed in (0, 1)]:
        before, first = dyn_utils.counters["stats"]["unique_graphs"], len(reasons.lines)
        start = time.perf_counter()
        with torch.inference_mode():
            gpu_bench.zero_shot(parts, steps, a.px, seed=seed)
        row = {"steps": steps, "seed": seed, "seconds": round(time.perf_counter() - start, 2),
               "graphs_compiled": dyn_utils.counters["stats"]["unique_graphs"] - before,
               "recompile_reasons": reasons.lines[first:]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    gpu_bench.write_json(a.out, {"device": "cpu", "torch": torch.__version__, "unet": "SD1.5 layout, model_channels 64",
                                 "px": a.px, "renders": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
