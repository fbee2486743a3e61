"""Reference subject embeddings: diffusers' BLIP-Diffusion image processor + Blip2QFormerModel.

Runs in the reference environment. Follows the released pipeline exactly: a PIL image goes
through ``image_processor.preprocess(image, image_mean=mean, image_std=std)`` (mean/std from
model_index.json, as the pipeline's config), then
``qformer(image_input=pixels, text_input=[category], return_dict=False)``.

args:
  model_dir      released-layout folder
  image_paths    {key: path} images read with PIL (optional; tensors may be given instead)
  cases          [[image_key, category], ...]           -> emb_<i> (1, 16, 768)
  batch_cases    [[[image_keys], [categories]], ...]    -> batch_emb_<i> (N, 16, 768), one call
  fail_cases     [[image_key, category], ...]           -> fail_<i> = 1 if the reference raised
  token_strings  [str, ...]                             -> ids_<i>, mask_<i>; all padded: batch_ids, batch_mask
inputs: img_<key> uint8 (H, W, C), C = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA).
outputs also: pix_<key> (1, 3, 224, 224) preprocessed pixels of every image.
"""
import json
import os

import numpy as np
import torch
from PIL import Image

from common import io, load_qformer

MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def main():
    args, tensors, save = io()
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor

    model_dir = args["model_dir"]
    index = json.load(open(os.path.join(model_dir, "model_index.json")))
    processor = BlipImageProcessor.from_pretrained(os.path.join(model_dir, "image_processor"))
    qformer = load_qformer(model_dir)

    images = {k: Image.open(p) for k, p in args.get("image_paths", {}).items()}
    for name, t in tensors.items():
        if name.startswith("img_"):
            arr = t.numpy().astype(np.uint8)
            images[name[4:]] = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr, MODES[arr.shape[-1]])

    def pixels(key):
        return processor.preprocess(images[key], image_mean=index["mean"], image_std=index["std"],
                                    return_tensors="pt")["pixel_values"]

    out = {f"pix_{k}": pixels(k) for k in images}
    with torch.no_grad():
        for i, (key, category) in enumerate(args.get("cases", [])):
            out[f"emb_{i}"] = qformer(image_input=pixels(key), text_input=[category], return_dict=False)
        for i, (keys, categories) in enumerate(args.get("batch_cases", [])):
            batch = torch.cat([pixels(k) for k in keys])
            out[f"batch_emb_{i}"] = qformer(image_input=batch, text_input=categories, return_dict=False)
        for i, (key, category) in enumerate(args.get("fail_cases", [])):
            try:
                qformer(image_input=pixels(key), text_input=[category], return_dict=False)
                failed = 0.0
            except Exception:
                failed = 1.0
            out[f"fail_{i}"] = torch.tensor([failed])

    strings = args.get("token_strings", [])
    for i, s in enumerate(strings):
        tok = qformer.tokenizer([s], return_tensors="pt", padding=True)
        out[f"ids_{i}"], out[f"mask_{i}"] = tok.input_ids, tok.attention_mask
    if strings:
        tok = qformer.tokenizer(strings, return_tensors="pt", padding=True)
        out["batch_ids"], out["batch_mask"] = tok.input_ids, tok.attention_mask
    save(out)


if __name__ == "__main__":
    main()
