"""Depth stylisation (LAVIS's blip_diffusion_controlnet_depth) through a real host's HTTP API against
diffusers' BlipDiffusionControlNetPipeline built with the same ControlNet.

The shipped workflow workflows/api/controlnet_depth.json runs unchanged but for its inputs: the
generated weights, and the generated depth ControlNet (tests/controlnets.py) in the single-file
layout users put into models/controlnet/, read by the host's own ControlNetLoader. The reference
gets the same tensors as a diffusers ControlNetModel folder, the same subject photo, depth map,
prompt, seed and steps. The map is the shipped sample_depth.png brought to the output size, so
neither side resizes it. Gates as for the canny graph: final latents within 1e-3 (UNet scale),
the 8-bit image within 2/255.
"""
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from controlnets import DEPTH_FILE, as_diffusers_folder, key_map
from graphs import api_workflow, put_input_image, shipped
from paths import ROOT, TEST_MODEL
from refenv import run_reference
from test_conditioning import LONG
from test_controlnet_graph import IMAGE_TOL, LATENT_TOL, SAMPLE, SIZE, STEPS, assert_reference_hint_is, errors, run_graph

pytestmark = pytest.mark.reference

SHIPPED_PROMPT = api_workflow("controlnet_depth")["positive"]["inputs"]["prompt"]
CASES = [dict(seed=31, prompt=SHIPPED_PROMPT), dict(seed=32, prompt=LONG)]
DEPTH_MAP = ROOT / "workflows" / "assets" / "sample_depth.png"


@pytest.fixture(scope="module")
def depth_png(tmp_path_factory):
    """The shipped depth map at the output size, RGB (what the host's LoadImage makes of it)."""
    out = tmp_path_factory.mktemp("depth") / f"blip_depth_map_{SIZE}.png"
    Image.open(DEPTH_MAP).convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(out)
    return out


@pytest.fixture(scope="module")
def depth_diffusers(controlnet_files, test_model_dir, tmp_path_factory):
    """The host's single file back under diffusers' names: the reference's ControlNetModel folder."""
    folder = as_diffusers_folder(controlnet_files[DEPTH_FILE], test_model_dir / "controlnet",
                                 tmp_path_factory.mktemp("depth-controlnet") / "controlnet")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # 1 GB


@pytest.fixture(scope="module")
def reference(test_model_dir, depth_diffusers, depth_png):
    cases = [dict(image=str(SAMPLE), edges=str(depth_png), prompt=c["prompt"], source_category="teapot",
                  seed=c["seed"], steps=STEPS, height=SIZE, width=SIZE) for c in CASES]
    return run_reference("controlnet.py", {"model_dir": str(test_model_dir), "controlnet": str(depth_diffusers),
                                           "cases": cases})


def depth_stylisation(image, depth_map, prompt, seed, canny_instead=False) -> dict:
    """The shipped depth workflow with this run's inputs; canny_instead puts the generated model's
    canny ControlNet where the depth one was."""
    g = shipped("controlnet_depth", TEST_MODEL, image, "teapot", prompt, seed, STEPS, SIZE)
    g["controlnet_loader"]["inputs"]["control_net_name"] = DEPTH_FILE
    g["edges"]["inputs"]["image"] = depth_map
    if canny_instead:
        g["controlnet_loader"] = {"class_type": "BlipControlNetLoader", "inputs": {"model_name": TEST_MODEL}}
    g["save_latent"] = {"class_type": "SaveLatent",
                        "inputs": {"samples": ["sample", 0],
                                   "filename_prefix": f"latents/cn_depth_{seed}_{int(canny_instead)}"}}
    return g


def test_generated_file_is_in_the_single_file_layout(controlnet_files):
    """Original ControlNet names, unprefixed, as in the SD1.5 ControlNet safetensors users download:
    nothing of diffusers' layout, which the host would read only at the released depth."""
    with safe_open(str(controlnet_files[DEPTH_FILE]), "pt") as f:
        keys = set(f.keys())
    assert {"zero_convs.0.0.weight", "input_hint_block.0.weight", "middle_block_out.0.weight",
            "input_blocks.0.0.weight", "time_embed.0.weight"} <= keys
    assert not [k for k in keys if k.startswith(("controlnet_", "down_blocks.", "control_model."))]
    shipped_names = {api_workflow(n)["controlnet_loader"]["inputs"]["control_net_name"]
                     for n in ("controlnet_depth", "controlnet_hed")}
    assert shipped_names <= set(controlnet_files)


def test_depth_controlnet_differs_from_the_canny_one(controlnet_files, test_model_dir):
    """Same statistics, unrelated values (a zero conv compared)."""
    canny_dir = test_model_dir / "controlnet"
    name = "controlnet_down_blocks.0.weight"
    with safe_open(str(canny_dir / "diffusion_pytorch_model.safetensors"), "pt") as f:
        a = f.get_tensor(name)
    with safe_open(str(controlnet_files[DEPTH_FILE]), "pt") as f:
        b = f.get_tensor(key_map(json.loads((canny_dir / "config.json").read_text()))[name])
    assert a.shape == b.shape
    assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.05
    assert abs(a.std().item() - b.std().item()) < 0.05 * a.std().item()


def test_reference_hint_is_the_map_on_both_cfg_halves(reference, depth_png):
    assert_reference_hint_is(reference, depth_png, len(CASES), SIZE)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_depth_graph_matches_reference_pipeline(comfy_server, api, reference, depth_png, i):
    image = put_input_image(comfy_server, SAMPLE)
    depth_map = put_input_image(comfy_server, depth_png)
    graph = depth_stylisation(image, depth_map, CASES[i]["prompt"], CASES[i]["seed"])
    latent_err, image_err = errors(reference, i, *run_graph(comfy_server, api, graph))
    print(f"depth case {i}: latent max abs {latent_err:.2e} (UNet scale); image max {image_err:.2f}/255")
    assert latent_err <= LATENT_TOL
    assert image_err <= IMAGE_TOL


def test_with_the_canny_controlnet_the_graph_misses_the_reference(comfy_server, api, reference, depth_png):
    """The gates can fail: the same graph with the canny ControlNet in place of the depth one is far out."""
    image = put_input_image(comfy_server, SAMPLE)
    depth_map = put_input_image(comfy_server, depth_png)
    graph = depth_stylisation(image, depth_map, CASES[0]["prompt"], CASES[0]["seed"], canny_instead=True)
    latent_err, image_err = errors(reference, 0, *run_graph(comfy_server, api, graph))
    print(f"canny ControlNet instead: latent max abs {latent_err:.2e} (UNet scale); image max {image_err:.2f}/255")
    assert latent_err > 100 * LATENT_TOL
