"""Reference side of the benchmarks; runs inside the reference environment.

usage: reference_worker.py MODE CONFIG_JSON  -> prints one JSON line of measurements
  encode: {model_dir, image, category, reps}              per-call seconds of preprocess + Q-Former
  render: {model_dir, images, category, prompt, seeds, steps, size, shared_seeds}
          per-call seconds of BlipDiffusionPipeline (built once), first call separately; then
          the shared_seeds renders of images[0]
  unet:   {model_dir, reps, size}                          per-call seconds of the pipeline's UNet alone
          (UNet2DConditionModel, a CFG batch of 2 at size/8 latents, 77 context tokens)
"""
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
START = time.monotonic()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "reference"))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common import build_pipeline, load_qformer  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def encode(cfg):
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor

    d = cfg["model_dir"]
    index = json.load(open(os.path.join(d, "model_index.json")))
    processor = BlipImageProcessor.from_pretrained(os.path.join(d, "image_processor"))
    qformer = load_qformer(d)
    image = Image.open(cfg["image"]).convert("RGB")
    times = []
    with torch.no_grad():
        for _ in range(cfg["reps"] + 1):
            t = time.perf_counter()
            pix = processor.preprocess(image, image_mean=index["mean"], image_std=index["std"],
                                       return_tensors="pt")["pixel_values"]
            qformer(image_input=pix, text_input=[cfg["category"]], return_dict=False)
            times.append(time.perf_counter() - t)
    return {"warmup_s": times[0], "times_s": times[1:], "peak_rss_mb": peak_rss_mb()}


def render(cfg):
    pipe = build_pipeline(cfg["model_dir"])
    built = time.monotonic() - START
    images = [Image.open(p).convert("RGB") for p in cfg["images"]]
    times = []
    with torch.no_grad():
        for i, seed in enumerate(cfg["seeds"]):
            t = time.perf_counter()
            pipe(prompt=[cfg["prompt"]], reference_image=images[i % len(images)],
                 source_subject_category=[cfg["category"]], target_subject_category=[cfg["category"]],
                 generator=torch.Generator().manual_seed(seed), guidance_scale=7.5, height=cfg["size"],
                 width=cfg["size"], num_inference_steps=cfg["steps"], output_type="np")
            times.append(time.perf_counter() - t)
            if i == 0:
                first_image = time.monotonic() - START
        shared = []  # then renders of one subject, back to back (the pipeline encodes it every call)
        for seed in cfg.get("shared_seeds", []):
            t = time.perf_counter()
            pipe(prompt=[cfg["prompt"]], reference_image=images[0], source_subject_category=[cfg["category"]],
                 target_subject_category=[cfg["category"]], generator=torch.Generator().manual_seed(seed),
                 guidance_scale=7.5, height=cfg["size"], width=cfg["size"], num_inference_steps=cfg["steps"],
                 output_type="np")
            shared.append(time.perf_counter() - t)
    return {"build_s": built, "cold_first_image_s": first_image, "times_s": times, "shared_times_s": shared,
            "peak_rss_mb": peak_rss_mb()}


def unet(cfg):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(os.path.join(cfg["model_dir"], "unet")).float().eval()
    gen = torch.Generator().manual_seed(0)
    side = cfg["size"] // 8
    x = torch.randn(2, 4, side, side, generator=gen)
    context = torch.randn(2, 77, 768, generator=gen)
    t = torch.tensor([500.0, 500.0])
    times = []
    with torch.no_grad():  # as the pipeline runs it
        for _ in range(cfg["reps"] + 1):
            start = time.perf_counter()
            model(x, t, encoder_hidden_states=context)
            times.append(time.perf_counter() - start)
    return {"warmup_s": times[0], "times_s": times[1:], "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    mode, cfg = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(int(cfg.get("threads", torch.get_num_threads())))
    print(json.dumps({"encode": encode, "render": render, "unet": unet}[mode](cfg)))
