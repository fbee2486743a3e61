"""The loss curve of a fine-tune as an image (PIL only)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def loss_plot(losses: list[float], width: int = 640, height: int = 360, title: str = "") -> torch.Tensor:
    """A line plot of ``losses`` per step, axes labelled: (1, H, W, 3) float in [0, 1] (a host IMAGE)."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 64, 16, 28, 40
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    d.text((8, 6), title or f"training loss, {len(losses)} steps", fill=(0, 0, 0), font=font)
    finite = [v for v in losses if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * max(abs(lo), 1e-3), hi + 0.5 * max(abs(hi), 1e-3)
        n = len(losses)

        def xy(i, v):
            x = x0 + (x1 - x0) * (i / max(n - 1, 1))
            y = y1 - (y1 - y0) * ((v - lo) / (hi - lo))
            return x, y

        points = [xy(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
        if len(points) > 1:
            d.line(points, fill=(30, 90, 200), width=2)
        for p in points if len(points) <= 40 else []:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(30, 90, 200))
        if len(points) == 1:
            p = points[0]
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=(30, 90, 200))
        d.text((4, y0 - 4), f"{hi:.4g}", fill=(0, 0, 0), font=font)
        d.text((4, y1 - 8), f"{lo:.4g}", fill=(0, 0, 0), font=font)
        d.text((x0, y1 + 6), "1", fill=(0, 0, 0), font=font)
        d.text((x1 - 24, y1 + 6), str(n), fill=(0, 0, 0), font=font)
        d.text(((x0 + x1) // 2 - 12, y1 + 20), "step", fill=(0, 0, 0), font=font)
        d.text((x1 - 150, 6), f"last {losses[-1]:.4g}", fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
