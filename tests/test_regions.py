"""Several subjects in one picture (Subjects in Regions), and an edit restricted to a drawn region.

The region tests render the shipped two-subject workflows in the real host through the HTTP API
and swap subject 2 for a third subject: the change must land in subject 2's region.
"""
import uuid

import pytest
import torch

from blip_diffusion.blip_core import regions
from graphs import api_workflow
from paths import TEST_MODEL
from test_zero_shot_graph import saved_latent

SIZE, STEPS = 64, 2  # 8x8 latent: halves of 4 columns
# Mean |change| in subject 2's half over the other half, when subject 2 is swapped. Measured on the
# generated test weights: boxes 6.6, masks 7.1 (64 px, 2 steps); 5.3 and 4.9 at 128 px, 3 steps. The
# UNet's convolutions and self-attention spread some change everywhere: the left half is never still.
MIN_RATIO = 4.0


# -- the regions themselves (no host) ----------------------------------------------------------
def test_boxes_and_masks_cover_the_picture_once():
    maps, scene = regions.layout([None, None], ["0, 0, 0.5, 1", "0.5, 0, 0.5, 1"], ["a", "b"])
    left, right = maps
    assert left.shape == (regions.BOX_GRID, regions.BOX_GRID)
    half = regions.BOX_GRID // 2
    assert left[:, :half].eq(1).all() and left[:, half:].eq(0).all() and right.eq(1 - left).all()
    assert scene.eq(0).all()  # the two halves leave nothing to the scene
    maps, scene = regions.layout([None, None], ["0.25, 0.25, 0.5, 0.5", "0, 0, 0.25, 0.25"], ["a", "b"])
    assert torch.equal(scene + maps[0] + maps[1], torch.ones_like(scene))  # disjoint: one unit of weight each
    assert maps[0].mean().item() == pytest.approx(0.25) and maps[1].mean().item() == pytest.approx(1 / 16)
    # a mask sets the grid; a box is drawn on it; the soft mask keeps its values
    mask = torch.zeros(1, 64, 96)
    mask[0, :, :48] = 0.5
    maps, scene = regions.layout([mask, None], ["", "0.5, 0, 0.5, 1"], ["a", "b"])
    assert maps[0].shape == maps[1].shape == (64, 96) and maps[1][:, 48:].eq(1).all()
    assert torch.allclose(scene[:, :48], torch.full((64, 48), 0.5))
    for boxes, masks, message in [(["0.6, 0, 0.5, 1", "0, 0, 1, 1"], [None, None], "past the picture's edge"),
                                  (["left", "0, 0, 1, 1"], [None, None], "x, y, width, height"),
                                  (["", "0, 0, 1, 1"], [torch.zeros(1, 8, 8), None], "empty"),
                                  (["", "0, 0, 1, 1"], [torch.ones(2, 8, 8), None], "one mask per subject"),
                                  (["", "0, 0, 1, 1"], [torch.ones(1, 8, 8).index_fill(1, torch.tensor([3]), float("nan")),
                                                        None], "NaN")]:
        with pytest.raises(regions.RegionError, match=message):
            regions.layout(masks, boxes, ["a", "b"])


def test_a_region_drawn_on_a_wide_photo_is_cropped_as_the_photo_is():
    # A 480x640 photo: Subject Edit Photo keeps its centre 480x480 (columns 80-559). A region over columns
    # 80-319 is then the square's left half; one over columns 0-79 was cut off with the photo's edge.
    region = torch.zeros(480, 640)
    region[:, 80:320] = 1
    square = regions.cover(region, (60, 60))
    assert square[:, :30].eq(1).all() and square[:, 30:].eq(0).all()
    edge = torch.zeros(480, 640)
    edge[:, :80] = 1
    assert regions.cover(edge, (60, 60)).eq(0).all()
    # a tall one keeps its centre rows; the same aspect is only resized
    tall = torch.zeros(200, 100)
    tall[50:100] = 1
    assert torch.equal(regions.cover(tall, (4, 4)), torch.tensor([[1.0] * 4] * 2 + [[0.0] * 4] * 2))
    assert torch.equal(regions.cover(tall, (200, 100)), tall)


# -- in the host ---------------------------------------------------------------------------------
def noise_photo(server, seed: int) -> str:
    """A third subject: a fixed random photo (the same on every run)."""
    from PIL import Image

    name = f"regions_noise_{seed}.png"
    pixels = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    Image.fromarray(pixels.numpy(), "RGB").save(server.base_dir / "input" / name)
    return name


def two_subjects_graph(workflow: str, photo_2: str, category_2: str, unused_boxes: bool = True) -> dict:
    g = api_workflow(workflow)
    if not unused_boxes:   # what a script writes for two subjects: no box_3 / box_4
        for k in (3, 4):
            del g["positive"]["inputs"][f"box_{k}"]
    g["loader"]["inputs"]["model_name"] = TEST_MODEL
    g["photo_2"]["inputs"]["image"] = photo_2
    g["encode_2"]["inputs"]["category"] = category_2
    g["latent"]["inputs"].update(width=SIZE, height=SIZE)
    g["sigmas"]["inputs"]["steps"] = STEPS
    g["sample"]["inputs"]["noise_seed"] = 11
    g["save_latent"] = {"class_type": "SaveLatent",
                        "inputs": {"samples": ["sample", 0], "filename_prefix": f"latents/regions_{uuid.uuid4().hex}"}}
    return g


def half_changes(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    change = (a - b).abs()
    w = change.shape[-1] // 2
    return change[..., :w].mean().item(), change[..., w:].mean().item()


@pytest.mark.parametrize("workflow", ["two_subjects", "two_subjects_masks"])
def test_swapping_subject_2_changes_its_region(workflow, comfy_server, api):
    """Subject 1 left, subject 2 right (boxes, or the red/green masks of the shipped regions image)."""
    other = noise_photo(comfy_server, 3)
    before = saved_latent(comfy_server, api.run(two_subjects_graph(workflow, "sample_kettle.png", "kettle")))
    after = saved_latent(comfy_server, api.run(two_subjects_graph(workflow, other, "dog", unused_boxes=False)))
    left, right = half_changes(before, after)
    print(f"{workflow}: mean |change| left {left:.4g}, right {right:.4g}, ratio {right / max(left, 1e-12):.2f}")
    assert right > 0, "subject 2 had no effect"
    assert right >= MIN_RATIO * left, f"subject 2 changed the left half too much: right/left {right / left:.2f}"


# -- an edit restricted to a drawn region ----------------------------------------------------------
def edit_graph(region: bool) -> dict:
    """edit_photo at 64 px, 2 steps, blend threshold 0 (the blend words allow every place), with the red
    ellipse of the shipped regions image (left of the middle) as the region."""
    g = api_workflow("edit_photo")
    g["loader"]["inputs"]["model_name"] = TEST_MODEL
    g["photo"]["inputs"]["size"] = 64
    g["invert"]["inputs"]["steps"] = g["edit"]["inputs"]["steps"] = 2
    g["edit"]["inputs"]["blend_threshold"] = 0.0
    if region:
        g["regions"] = {"class_type": "LoadImage", "inputs": {"image": "sample_regions.png"}}
        g["region"] = {"class_type": "ImageToMask", "inputs": {"image": ["regions", 0], "channel": "red"}}
        g["edit"]["inputs"]["region"] = ["region", 0]
    for k, out in (("edited", 0), ("recon", 1)):
        g[f"save_{k}"] = {"class_type": "SaveLatent", "inputs": {
            "samples": ["edit", out], "filename_prefix": f"latents/edit_region_{k}_{uuid.uuid4().hex}"}}
    return g


def edit_latents(server, result) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    def one(key):
        entry = result.outputs[key]["latents"][0]
        return load_file(str(server.base_dir / "output" / entry["subfolder"] / entry["filename"]))["latent_tensor"]

    return one("save_edited"), one("save_recon")


def test_an_edit_changes_nothing_outside_a_drawn_region(comfy_server, api):
    """The red ellipse ends left of the middle (x < 250 of 512): with it as the region, the right half of the
    edited latent is the reconstruction's, bit for bit; without it, the right half is edited too."""
    edited, recon = edit_latents(comfy_server, api.run(edit_graph(region=True)))
    free_edited, free_recon = edit_latents(comfy_server, api.run(edit_graph(region=False)))
    assert torch.equal(recon, free_recon), "the source branch does not depend on the region"
    w = edited.shape[-1] // 2
    assert torch.equal(edited[..., w:], recon[..., w:])
    assert (edited[..., :w] - recon[..., :w]).abs().max() > 1e-3, "nothing changed inside the region"
    assert (free_edited[..., w:] - free_recon[..., w:]).abs().max() > 1e-3, "the right half is never edited anyway"
