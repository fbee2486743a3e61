"""Shared plumbing for scripts run inside the reference environment (never the pack's)."""
import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BERT_VOCAB_DIR = os.path.join(ROOT, "blip_core", "data")


def io():
    """Parse --args/--inputs/--outputs; return (args dict, input tensors, save function)."""
    p = argparse.ArgumentParser()
    p.add_argument("--args")
    p.add_argument("--inputs")
    p.add_argument("--outputs")
    a = p.parse_args()
    args = json.load(open(a.args))
    tensors = load_file(a.inputs)

    def save(out):
        save_file({k: v.detach().float().contiguous().cpu() for k, v in out.items()}, a.outputs)

    torch.manual_seed(args.get("torch_seed", 0))
    torch.set_num_threads(int(args.get("threads", torch.get_num_threads())))
    return args, tensors, save


def resize_center_crop(img, size, resample):
    """torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on a PIL image, written out (torchvision is not
    in this environment): the short side to ``size``, the long one to int(size * long / short) (an image
    already that size is left alone), then a crop at int(round((dim - size) / 2))."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_w, new_h = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def bert_tokenizer_dir():
    """A folder BertTokenizer.from_pretrained can read offline: the pack's shipped vocabulary."""
    import atexit
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="bertvocab-")
    atexit.register(shutil.rmtree, d, True)
    shutil.copy(os.path.join(BERT_VOCAB_DIR, "bert-base-uncased-vocab.txt"), os.path.join(d, "vocab.txt"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "model_max_length": 512}, f)
    return d


def load_qformer(model_dir):
    """diffusers' Blip2QFormerModel from a released-layout folder, tokenizer pointed offline."""
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    cfg = Blip2Config.from_pretrained(os.path.join(model_dir, "qformer"))
    cfg.tokenizer = bert_tokenizer_dir()
    return Blip2QFormerModel.from_pretrained(os.path.join(model_dir, "qformer"), config=cfg).eval()


def build_pipeline(model_dir):
    """diffusers' BlipDiffusionPipeline, components passed explicitly (from_pretrained on the
    deprecated pipeline path cannot read back what it saves)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer
    from diffusers.pipelines.deprecated.blip_diffusion import BlipDiffusionPipeline
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel

    d = model_dir
    index = json.load(open(os.path.join(d, "model_index.json")))
    pipe = BlipDiffusionPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(d, "tokenizer")),
        text_encoder=ContextCLIPTextModel.from_pretrained(os.path.join(d, "text_encoder")),
        vae=AutoencoderKL.from_pretrained(os.path.join(d, "vae")),
        unet=UNet2DConditionModel.from_pretrained(os.path.join(d, "unet")),
        scheduler=PNDMScheduler.from_pretrained(os.path.join(d, "scheduler")),
        qformer=load_qformer(d),
        image_processor=BlipImageProcessor.from_pretrained(os.path.join(d, "image_processor")),
        ctx_begin_pos=index.get("ctx_begin_pos", 2), mean=index["mean"], std=index["std"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def capture_final_latents(pipe, captured: dict) -> None:
    """Record what the pipeline hands its VAE, in the UNet's latent scale."""
    decode = pipe.vae.decode

    def spy(z, **kw):
        captured["final_latents"] = z * pipe.vae.config.scaling_factor
        return decode(z, **kw)

    pipe.vae.decode = spy


def case_kwargs(case: dict) -> dict:
    """A render case's BlipDiffusion pipeline arguments (defaults as the pipeline's own)."""
    from PIL import Image

    return dict(
        prompt=[case["prompt"]], reference_image=Image.open(case["image"]).convert("RGB"),
        source_subject_category=[case["source_category"]],
        target_subject_category=[case.get("target_category") or case["source_category"]],
        generator=torch.Generator().manual_seed(case.get("seed", 0)),
        guidance_scale=case.get("guidance", 7.5), height=case.get("height", 512), width=case.get("width", 512),
        num_inference_steps=case.get("steps", 25), neg_prompt=case.get("neg_prompt", ""),
        prompt_strength=case.get("prompt_strength", 1.0), prompt_reps=case.get("prompt_reps", 20),
        output_type="pt")


def run_cases(cases: list, run) -> dict:
    """``run(case) -> tensors`` for each case, keys suffixed with the case's index."""
    result = {}
    for i, case in enumerate(cases):
        result.update({f"{k}_{i}": v for k, v in run(case).items()})
    return result
