"""Our side of the UNet-call benchmark: the host's own UNet, loaded by the pack's BLIP-Diffusion loader.

usage: our_unet_worker.py CONFIG_JSON -> one JSON line (same fields as the reference worker)
  {model_dir, reps, size, attention: "host-default" | "pytorch"}

"pytorch" is what the host's --use-pytorch-cross-attention selects (PyTorch SDPA); on the CPU the
host's default is its sub-quadratic chunked attention.
"""
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from _pack import import_pack  # noqa: E402

cfg = json.loads(sys.argv[1])
sys.path.append(os.environ["COMFYUI_DIR"])
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
comfy.cli_args.args.use_pytorch_cross_attention = cfg["attention"] == "pytorch"
import_pack()
import torch  # noqa: E402
import comfy.ldm.modules.attention as attention  # noqa: E402

from blip_diffusion.nodes import host_models  # noqa: E402

torch.set_num_threads(int(cfg.get("threads", torch.get_num_threads())))
with torch.inference_mode(False):
    unet = host_models.load_unet(os.path.join(cfg["model_dir"], "unet")).model.diffusion_model.float().eval()
gen = torch.Generator().manual_seed(0)
side = cfg["size"] // 8
x = torch.randn(2, 4, side, side, generator=gen)  # the CFG batch: conditional + unconditional
context = torch.randn(2, 77, 768, generator=gen)
t = torch.tensor([500.0, 500.0])
times = []
with torch.inference_mode():
    for _ in range(cfg["reps"] + 1):
        start = time.perf_counter()
        unet(x, timesteps=t, context=context)
        times.append(time.perf_counter() - start)
print(json.dumps({"warmup_s": times[0], "times_s": times[1:], "attention": attention.optimized_attention.__name__,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
