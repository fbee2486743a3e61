"""Where each subject goes in a picture: boxes as fractions, masks, and what is left for the scene.

Regions are (H, W) float maps in [0, 1] on one grid; the sampler's host scales them to the
latent. The scene prompt takes ``1 - max(regions)``, so every place is covered by exactly one
unit of weight where the regions do not overlap (the host averages predictions by weight).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BOX_GRID = 512  # side of the grid boxes are drawn on when no mask sets one (1/512 of the picture)


class RegionError(ValueError):
    pass


def parse_box(text: str, name: str = "box") -> tuple[float, float, float, float]:
    """'x, y, width, height' as fractions of the picture (0..1, from the top left)."""
    parts = [p for p in str(text).replace(";", ",").split(",") if p.strip()]
    try:
        x, y, w, h = (float(p) for p in parts)
    except ValueError:
        raise RegionError(f"{name}: expected 'x, y, width, height' as fractions of the picture, e.g. "
                          f"'0, 0, 0.5, 1' for the left half; got {text!r}") from None
    if not (0 <= x < 1 and 0 <= y < 1 and 0 < w <= 1 and 0 < h <= 1):
        raise RegionError(f"{name}: x and y must be in [0, 1) and width and height in (0, 1]; got {text!r}")
    if x + w > 1 + 1e-6 or y + h > 1 + 1e-6:
        raise RegionError(f"{name}: the box {text!r} reaches past the picture's edge (x + width and y + height "
                          "must be at most 1)")
    return x, y, w, h


def box_mask(box: tuple[float, float, float, float], size: tuple[int, int]) -> torch.Tensor:
    """(H, W) map that is 1 on the grid cells whose centres lie inside the box."""
    x, y, w, h = box
    rows = (torch.arange(size[0], dtype=torch.float32) + 0.5) / size[0]
    cols = (torch.arange(size[1], dtype=torch.float32) + 0.5) / size[1]
    inside_r = (rows >= y) & (rows < y + h)
    inside_c = (cols >= x) & (cols < x + w)
    return (inside_r[:, None] & inside_c[None, :]).float()


def as_map(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A host MASK ((1, H, W) or (H, W)) as one (H, W) float map in [0, 1]."""
    if mask.ndim == 3:
        if mask.shape[0] != 1:
            raise RegionError(f"{name}: one mask per subject, got a batch of {mask.shape[0]}")
        mask = mask[0]
    if mask.ndim != 2 or min(mask.shape) < 1:
        raise RegionError(f"{name}: expected a (height, width) mask, got shape {tuple(mask.shape)}")
    if mask.isnan().any():
        raise RegionError(f"{name}: the mask holds NaN (not-a-number) values; fix the node that made it")
    return mask.float().cpu().clamp(0, 1)   # masks from other nodes may sit on the GPU


def resize(region: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(region.shape) == tuple(size):
        return region
    return F.interpolate(region[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def cover(region: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``region`` centre-cropped to the aspect of ``size``, then resized to it: a mask drawn on the
    whole photo lands where Subject Edit Photo's centre crop put the photo's pixels."""
    (h, w), (th, tw) = region.shape, size
    if h * tw > w * th:       # taller than the target: keep the centre rows
        keep = max(1, round(w * th / tw))
        top = (h - keep) // 2
        region = region[top:top + keep]
    elif h * tw < w * th:     # wider: keep the centre columns
        keep = max(1, round(h * tw / th))
        left = (w - keep) // 2
        region = region[:, left:left + keep]
    return resize(region, size)


def layout(masks: list[torch.Tensor | None], boxes: list[str], names: list[str]) -> tuple[list[torch.Tensor],
                                                                                          torch.Tensor]:
    """Each subject's region (its mask if given, else its box) on one grid, and the scene's remainder."""
    maps = [None if m is None else as_map(m, f"{n} mask") for m, n in zip(masks, names)]
    grid = max((tuple(m.shape) for m in maps if m is not None), key=lambda s: s[0] * s[1],
               default=(BOX_GRID, BOX_GRID))
    regions = []
    for m, box, name in zip(maps, boxes, names):
        region = resize(m, grid) if m is not None else box_mask(parse_box(box, f"{name} box"), grid)
        if not region.gt(0).any():
            raise RegionError(f"{name}: its region is empty (an all-black mask): the subject would appear nowhere")
        regions.append(region)
    scene = 1 - torch.stack(regions).amax(dim=0)
    return regions, scene
