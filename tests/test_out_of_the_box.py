"""A new user's ComfyUI: started plainly (``--cpu`` and nothing else), the pack in custom_nodes/, the
released folder in models/, and an input/ folder holding only the user's own photo.

- The pack puts the shipped workflows' photos into input/ and leaves the user's file of the same name
  alone.
- The template browser's listing (``/api/workflow_templates``) has every example workflow, and the
  host serves each one with its thumbnail, as the frontend fetches them.
- Precision as the host picks it: on a CPU the host would run the text encoder in fp16; the pack loads
  it in fp32 (nodes/host_models.py, text_encoder_options), so the shipped zero-shot workflow on this
  plain host matches the published pipeline within the same 1e-3 as the fp32 session host does.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests
from PIL import Image, ImageOps

from graphs import zero_shot
from paths import ROOT
from refenv import run_reference
from test_workflows import UI_DIR, UI_NAMES, pack_samples
from test_zero_shot_graph import saved_latent

pytestmark = pytest.mark.reference

ASSETS = ROOT / "workflows" / "assets"
USERS_OWN = "sample_scene.png"  # a photo of the user's that happens to share a sample's name
SCALE = 0.18215
STEPS, SIZE = 10, 128
CASE = dict(seed=31, prompt="on a wooden table in a sunny kitchen")


@pytest.fixture(scope="module")
def users_photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("users-photo") / USERS_OWN
    with Image.open(ASSETS / "sample_subject.png") as im:
        ImageOps.mirror(im.convert("RGB")).save(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def plain_server(test_model_dir, tmp_path_factory, users_photo):
    from blip_diffusion.api.server import ComfyServer, make_base_dir

    base = make_base_dir(tmp_path_factory.mktemp("plain-base"), {"blip_diffusion": {"blipdiffusion": test_model_dir}})
    (base / "input" / USERS_OWN).write_bytes(users_photo)
    server = ComfyServer(base, [])  # ComfyServer adds only --cpu and where to listen
    server.start()
    yield server
    server.stop()


def test_the_pack_fills_input_with_its_photos_and_keeps_the_users_own(plain_server, users_photo):
    inputs = plain_server.base_dir / "input"
    assert (inputs / USERS_OWN).read_bytes() == users_photo, "the pack replaced the user's own file"
    for name in pack_samples() - {USERS_OWN}:
        assert (inputs / name).read_bytes() == (ASSETS / name).read_bytes(), f"{name} is not the pack's sample"
    assert not [p.name for p in inputs.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    log = plain_server.log()
    assert "sample photos for the shipped workflows put into" in log
    assert USERS_OWN not in log.split("put into", 1)[1].splitlines()[0]


def test_the_template_browser_lists_every_example_workflow_with_its_thumbnail(plain_server):
    from blip_diffusion.api.server import PACK_DIR_NAME

    listed = requests.get(f"{plain_server.url}/api/workflow_templates", timeout=30).json()
    assert sorted(listed.get(PACK_DIR_NAME, [])) == UI_NAMES, listed
    for name in UI_NAMES:
        served = requests.get(f"{plain_server.url}/api/workflow_templates/{PACK_DIR_NAME}/{name}.json", timeout=30)
        assert served.status_code == 200 and served.json() == json.loads((UI_DIR / f"{name}.json").read_text())
        thumb = requests.get(f"{plain_server.url}/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg", timeout=30)
        assert thumb.status_code == 200, f"no thumbnail for {name}"
        with Image.open(io.BytesIO(thumb.content)) as im:
            assert im.format == "JPEG" and im.width >= 320


@pytest.fixture(scope="module")
def reference(test_model_dir):
    return run_reference("pipeline.py", {"model_dir": str(test_model_dir), "cases": [
        dict(image=str(ASSETS / "sample_subject.png"), prompt=CASE["prompt"], source_category="teapot",
             seed=CASE["seed"], steps=STEPS, height=SIZE, width=SIZE)]})


def test_a_plain_cpu_host_matches_the_published_pipeline(plain_server, reference):
    from blip_diffusion.api.client import ComfyClient

    api = ComfyClient(plain_server.url)
    graph = zero_shot("blipdiffusion", "sample_subject.png", "teapot", CASE["prompt"], CASE["seed"], STEPS, SIZE)
    result = api.run(graph, timeout=900)
    latents = saved_latent(plain_server, result)
    latent_err = (latents * SCALE - reference["final_latents_0"]).abs().max().item()
    png = np.asarray(Image.open(io.BytesIO(api.view(result.outputs["save"]["images"][0]))).convert("RGB"))
    image_err = np.abs(png.astype(np.float64) - reference["image_0"][0].permute(1, 2, 0).numpy() * 255.0).max()
    print(f"plain --cpu host: latent max abs {latent_err:.2e} (UNet scale), image max {image_err:.2f}/255")
    assert "the text encoder runs on the CPU, so it is loaded in fp32" in plain_server.log()
    assert latent_err <= 1e-3
    assert image_err <= 2.0
