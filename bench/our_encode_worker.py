"""Our side of the encode benchmark: blip_core's SubjectEncoder, as the node runs it.

usage: our_encode_worker.py CONFIG_JSON -> one JSON line (same fields as the reference worker)
"""
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from _pack import import_pack  # noqa: E402

import_pack()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from blip_diffusion.blip_core.encoder_weights import load_released  # noqa: E402

cfg = json.loads(sys.argv[1])
torch.set_num_threads(int(cfg.get("threads", torch.get_num_threads())))
encoder = load_released(cfg["model_dir"])
image = torch.from_numpy(np.asarray(Image.open(cfg["image"]).convert("RGB")).astype(np.float32) / 255)[None]
times = []
with torch.inference_mode():  # as the host runs every node
    for _ in range(cfg["reps"] + 1):
        t = time.perf_counter()
        encoder.encode(image, cfg["category"])
        times.append(time.perf_counter() - t)
print(json.dumps({"warmup_s": times[0], "times_s": times[1:],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
