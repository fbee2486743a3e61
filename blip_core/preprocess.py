"""Reference-image preprocessing for the subject encoder.

Input: images in ComfyUI's layout, (B, H, W, C) float in [0, 1]. Output: (B, 3, 224, 224)
float32 pixels normalised with CLIP's mean/std.

The published pipeline (diffusers' BlipImageProcessor) receives a PIL image, so each image is
first turned into 8-bit RGB: ``round(x * 255)`` after clamping to [0, 1], which gives back the
exact bytes of an image that was loaded as uint8 / 255. The resize is PIL's own BICUBIC on those
bytes, so it matches the reference bit for bit.

Channels: 3 = RGB; 1 = grayscale, repeated to RGB (as PIL's "L" -> "RGB"); 4 = RGBA and
2 = grayscale + alpha are composited over a **white** background (``c * a + (1 - a)``, in
float, before rounding). Note that diffusers' own ``convert("RGB")`` would instead discard
alpha, showing whatever colour the transparent pixels happen to hold.

Styles (PREPROCESSING_STYLES, the ``mode`` argument):
  "diffusers" (default): resize to exactly 224x224 (aspect ratio not kept), x / 255, normalise.
  "lavis": resize the short side to 224 (torchvision's rounding), centre-crop 224x224, as the
      original LAVIS implementation's torchvision transform does.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSING_STYLES = ("diffusers", "lavis")


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) float [0, 1] -> (B, H, W, 3) uint8, alpha composited over white."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected an image tensor of shape (B, H, W, C), got {shape}")
    b, h, w, c = images.shape
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"empty image: batch {b}, height {h}, width {w}; the subject image must have pixels")
    if c not in (1, 2, 3, 4):
        raise ValueError(f"expected 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA) channels, got {c}")
    x = images.detach().to("cpu", torch.float32)
    if x.isnan().any():   # clamp keeps NaN, and the cast to bytes would make it an arbitrary colour
        raise ValueError("the image holds NaN (not-a-number) pixels: fix the node that made it")
    x = x.clamp(0.0, 1.0)
    if c in (2, 4):
        alpha = x[..., -1:]
        x = x[..., :-1] * alpha + (1.0 - alpha)
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    return (x * 255.0).round().to(torch.uint8)


def _resize_diffusers(img: Image.Image, size: int) -> Image.Image:
    return img.resize((size, size), Image.BICUBIC)


def resize_center_crop(img: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """torchvision ``Resize(size, resample)`` + ``CenterCrop(size)`` on a PIL image (LAVIS's transforms:
    BICUBIC for the subject and fine-tune images, BILINEAR (torchvision's default) for a photo to edit)."""
    w, h = img.size
    # torchvision Resize(int): short side -> size, long side truncated (int()), then CenterCrop
    # with round() offsets.
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    if new_w * new_h > 16 * size * size:
        # A strip over 16:1: resizing all of it would build a huge image (3000x1 at 512: 1.5M x 512) only
        # to keep its centre. Resize just the kept box of the source: the same sample centres (PIL's
        # filter then sees the box's edges differently, a few levels on some pixels; photos stay exact).
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return img.resize((size, size), resample, box=box)
    img = img.resize((new_w, new_h), resample)
    return img.crop((left, top, left + size, top + size))


def preprocess(images: torch.Tensor, mode: str = "diffusers", size: int = 224,
               mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(B, H, W, C) float [0, 1] -> (B, 3, size, size) float32 normalised pixels."""
    if mode not in PREPROCESSING_STYLES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; choose one of {PREPROCESSING_STYLES}")
    resize = _resize_diffusers if mode == "diffusers" else resize_center_crop
    rgb = to_uint8_rgb(images)
    out = []
    for img in rgb.numpy():
        u8 = torch.from_numpy(np.array(resize(Image.fromarray(img, "RGB"), size))).permute(2, 0, 1)
        if mode == "diffusers":
            # transformers rescales in float64 and then casts to float32.
            x = (u8.double() * (1 / 255)).float()
        else:
            x = u8.float() / 255  # torchvision's ToTensor
        out.append(x)
    pixels = torch.stack(out)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (pixels - m) / s
