"""Subject-driven stylisation (canny ControlNet) through a real host's HTTP API against diffusers'
BlipDiffusionControlNetPipeline.

The shipped workflow workflows/api/controlnet_stylisation.json runs on the host with the
generated weights (their controlnet/ through BlipControlNetLoader, applied with the host's
own ControlNetApplyAdvanced to positive and negative); the reference gets the same subject
photo, the same edge PNG, prompt, seed and steps. Gates as for the zero-shot graph: final
latents within 1e-3 (UNet scale) and the 8-bit image within 2/255.
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from graphs import put_input_image, shipped
from paths import ROOT, TEST_MODEL
from refenv import run_reference
from test_conditioning import LONG

pytestmark = pytest.mark.reference

SAMPLE = ROOT / "workflows" / "assets" / "sample_subject.png"
SCALE = 0.18215  # the host's LATENT is the UNet's latent / SCALE
STEPS, SIZE = 10, 128
LATENT_TOL, IMAGE_TOL = 1e-3, 2.0
CASES = [dict(seed=21, prompt="on a marble table"), dict(seed=22, prompt=LONG),
         dict(seed=23, prompt=LONG), dict(seed=24, prompt="on a marble table")]


def make_edges(path, size):
    """A fixed canny-like edge map: one-pixel white outlines on black, RGB, at the output size
    (so neither side resizes it: diffusers would resize BICUBIC, the host nearest-exact with a crop)."""
    im = Image.new("RGB", (size, size), (0, 0, 0))
    d = ImageDraw.Draw(im)
    s = size / 128
    d.ellipse([20 * s, 30 * s, 100 * s, 110 * s], outline=(255, 255, 255), width=1)
    d.rectangle([40 * s, 10 * s, 90 * s, 45 * s], outline=(255, 255, 255), width=1)
    d.line([0, 120 * s, size - 1, 70 * s], fill=(255, 255, 255), width=1)
    d.line([64 * s, 0, 64 * s, size - 1], fill=(255, 255, 255), width=1)
    im.save(path)
    return path


@pytest.fixture(scope="module")
def edges_png(tmp_path_factory):
    return make_edges(tmp_path_factory.mktemp("edges") / "blip_canny_edges.png", SIZE)


@pytest.fixture(scope="module")
def reference(test_model_dir, edges_png):
    cases = [dict(image=str(SAMPLE), edges=str(edges_png), prompt=c["prompt"], source_category="teapot",
                  seed=c["seed"], steps=STEPS, height=SIZE, width=SIZE) for c in CASES]
    return run_reference("controlnet.py", {"model_dir": str(test_model_dir), "cases": cases})


def stylisation(model_name, image, edges, category, prompt, seed, steps, size, controlnet=True) -> dict:
    """The shipped workflow with this run's inputs; controlnet=False bypasses the ControlNet."""
    g = shipped("controlnet_stylisation", model_name, image, category, prompt, seed, steps, size)
    g["controlnet_loader"]["inputs"]["model_name"] = model_name
    # The reference takes a finished edge map: the graph's in-graph Canny gives way to that PNG.
    del g["edge_source"]
    g["edges"] = {"class_type": "LoadImage", "inputs": {"image": edges}}
    if not controlnet:
        g["sample"]["inputs"].update(positive=["positive", 0], negative=["negative", 0])
        for node in ("controlnet_loader", "edges", "apply_controlnet"):
            del g[node]
    g["save_latent"] = {"class_type": "SaveLatent",
                        "inputs": {"samples": ["sample", 0], "filename_prefix": f"latents/cn_{seed}_{int(controlnet)}"}}
    return g


def run_graph(server, api, graph):
    result = api.run(graph)
    entry = result.outputs["save_latent"]["latents"][0]
    latents = load_file(str(server.base_dir / "output" / entry["subfolder"] / entry["filename"]))["latent_tensor"]
    png = np.asarray(Image.open(io.BytesIO(api.view(result.outputs["save"]["images"][0]))).convert("RGB"))
    return latents * SCALE, png.astype(np.float64)


def errors(reference, i, latents, png):
    ref_latents = reference[f"final_latents_{i}"]
    assert latents.shape == ref_latents.shape == (1, 4, SIZE // 8, SIZE // 8)
    ref_png = reference[f"image_{i}"][0].permute(1, 2, 0).numpy() * 255.0
    return (latents - ref_latents).abs().max().item(), np.abs(png - ref_png).max()


def assert_reference_hint_is(reference, png_path, cases: int, size: int = SIZE) -> None:
    """What the host's LoadImage hands ControlNetApplyAdvanced (pixels / 255, no resize at the output
    size) is exactly what diffusers' ControlNet received, on the uncond and cond halves alike."""
    png = torch.from_numpy(np.asarray(Image.open(png_path).convert("RGB"), dtype=np.float32) / 255.0)
    for i in range(cases):
        assert reference[f"hint_batch_{i}"].item() == 2
        hint = reference[f"hint_{i}"][0].permute(1, 2, 0)
        assert hint.shape == png.shape == (size, size, 3)
        assert (hint - png).abs().max().item() <= 1e-6


def test_reference_hint_is_the_png_on_both_cfg_halves(reference, edges_png):
    assert_reference_hint_is(reference, edges_png, len(CASES))


@pytest.mark.parametrize("i", range(len(CASES)))
def test_controlnet_graph_matches_reference_pipeline(comfy_server, api, reference, edges_png, i):
    image = put_input_image(comfy_server, SAMPLE)
    edges = put_input_image(comfy_server, edges_png)
    graph = stylisation(TEST_MODEL, image, edges, "teapot", CASES[i]["prompt"], CASES[i]["seed"],
                        STEPS, SIZE)
    latent_err, image_err = errors(reference, i, *run_graph(comfy_server, api, graph))
    print(f"case {i}: latent max abs {latent_err:.2e} (UNet scale), {latent_err / SCALE:.2e} (host scale); "
          f"image max {image_err:.2f}/255")
    assert latent_err <= LATENT_TOL
    assert image_err <= IMAGE_TOL


def test_without_controlnet_the_graph_misses_the_reference(comfy_server, api, reference, edges_png):
    """The gates can fail: the same graph with the ControlNet bypassed is far outside them."""
    image = put_input_image(comfy_server, SAMPLE)
    graph = stylisation(TEST_MODEL, image, edges_png.name, "teapot", CASES[0]["prompt"],
                        CASES[0]["seed"], STEPS, SIZE, controlnet=False)
    latent_err, image_err = errors(reference, 0, *run_graph(comfy_server, api, graph))
    print(f"without ControlNet: latent max abs {latent_err:.2e} (UNet scale); image max {image_err:.2f}/255")
    assert latent_err > 100 * LATENT_TOL
