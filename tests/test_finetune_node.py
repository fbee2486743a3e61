"""BLIP-Diffusion Fine-tune inside a real host, through its HTTP API: the shipped workflow trains
(full UNet, 2 steps at 64 px), renders, saves; the base MODEL renders as before; the saved file
reloads to the same render; bad input gives clear errors; a cancel leaves nothing behind.

Renders compare final latents (SaveLatent), which the VAE would hide. A base render is repeated
with the same seed through a graph that differs only in ``prompt_reps`` on a prompt longer than
the 61-token window (every repetition is cut, so the tokens are identical): the host's cache
cannot serve it, and it must run on the very MODEL object the fine-tune got as input.
"""
from __future__ import annotations

import copy
import io
import json
import struct
import time
import uuid

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from blip_diffusion.api.client import ExecutionFailed, PromptRejected
from graphs import api_workflow, put_input_image, zero_shot
from paths import ROOT, TEST_MODEL
from test_conditioning import LONG

SAMPLE = ROOT / "workflows" / "assets" / "sample_subject.png"
SIZE, RENDER_STEPS, TRAIN_STEPS = 64, 2, 2
BASE_SEED, FT_SEED = 21, 33
FT_PROMPT = "on a beach"


def finetune_graph(image: str, name: str, *, steps=TRAIN_STEPS, mode="full", lr=5e-6, seed=5) -> dict:
    """The shipped workflow, small: 64 px, few steps, a SaveLatent of the fine-tuned render."""
    g = copy.deepcopy(api_workflow("finetune"))
    g["loader"]["inputs"]["model_name"] = TEST_MODEL
    g["photo"]["inputs"]["image"] = image
    g["finetune"]["inputs"].update(steps=steps, resolution=SIZE, seed=seed, mode=mode, learning_rate=lr,
                                   gradient_checkpointing=False)
    g["save_finetune"]["inputs"].update(name=name, overwrite=True)
    g["positive"]["inputs"]["prompt"] = FT_PROMPT
    g["latent"]["inputs"].update(width=SIZE, height=SIZE)
    g["sigmas"]["inputs"]["steps"] = RENDER_STEPS
    g["sample"]["inputs"]["noise_seed"] = FT_SEED
    g["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0],
                                                                "filename_prefix": "latents/ft"}}
    return g


def base_render(image: str, reps: int) -> dict:
    g = zero_shot(TEST_MODEL, image, "teapot", LONG, BASE_SEED, RENDER_STEPS, SIZE)
    g["positive"]["inputs"]["prompt_reps"] = reps
    return g


def reload_render(finetune_name: str) -> dict:
    """The base MODEL + Load BLIP-Diffusion Fine-tune, rendered like the fine-tune graph's own render."""
    g = zero_shot(TEST_MODEL, "unused.png", "teapot", FT_PROMPT, FT_SEED, RENDER_STEPS, SIZE)
    del g["reference"], g["encode"]
    g["ftload"] = {"class_type": "LoadBlipFinetune",
                   "inputs": {"model": ["loader", 0], "finetune_name": finetune_name, "strength": 1.0}}
    g["positive"]["inputs"]["subject"] = ["ftload", 1]
    g["sample"]["inputs"]["model"] = ["ftload", 0]
    g["sigmas"]["inputs"]["model"] = ["ftload", 0]
    return g


def minimal_graph(images_node: dict, **finetune_inputs) -> dict:
    """Loader + photos + BlipFinetune + SaveImage of its loss plot: for errors and small runs."""
    g = copy.deepcopy(api_workflow("finetune"))
    keep = {"loader", "finetune", "save_loss"}
    g = {k: v for k, v in g.items() if k in keep}
    g["loader"]["inputs"]["model_name"] = TEST_MODEL
    g["photos"] = images_node
    g["finetune"]["inputs"].update(images=["photos", 0], steps=1, resolution=SIZE, gradient_checkpointing=False)
    g["finetune"]["inputs"].update(finetune_inputs)
    return g


def saved_latent(server, result, key) -> torch.Tensor:
    entry = result.outputs[key]["latents"][0]
    return load_file(str(server.base_dir / "output" / entry["subfolder"] / entry["filename"]))["latent_tensor"]


def finetune_folder(server):
    return server.base_dir / "models" / "blip_finetunes"


@pytest.fixture(scope="module")
def image(comfy_server):
    return put_input_image(comfy_server, SAMPLE)


@pytest.fixture(scope="module")
def base_before(comfy_server, image):
    """The base MODEL's render before any fine-tune ran in this host."""
    from blip_diffusion.api.client import ComfyClient

    api = ComfyClient(comfy_server.url)
    return saved_latent(comfy_server, api.run(base_render(image, reps=1), timeout=900), "save_latent")


@pytest.fixture(scope="module")
def trained(comfy_server, image, base_before):
    """One run of the shipped workflow (full UNet, 2 steps, 64 px)."""
    from blip_diffusion.api.client import ComfyClient

    name = f"ft_{uuid.uuid4().hex[:8]}"
    result = ComfyClient(comfy_server.url).run(finetune_graph(image, name), timeout=1800)
    return name, result


def test_workflow_trains_renders_and_saves(comfy_server, api, trained):
    name, result = trained
    loss = result.outputs["save_loss"]["images"]
    render = result.outputs["save"]["images"]
    assert len(loss) == 1 and len(render) == 1
    plot = np.asarray(Image.open(io.BytesIO(api.view(loss[0]))).convert("RGB"))
    assert plot.shape == (360, 640, 3) and plot.std() > 0
    img = np.asarray(Image.open(io.BytesIO(api.view(render[0]))).convert("RGB"))
    assert img.shape == (SIZE, SIZE, 3) and img.std() > 0
    path = finetune_folder(comfy_server) / f"{name}.safetensors"
    assert path.exists()
    from blip_diffusion.blip_core import finetune_io

    unet_sd, subject, mode, meta = finetune_io.load_finetune(str(path))
    assert mode == "full" and meta["steps"] == TRAIN_STEPS and len(meta["losses"]) == TRAIN_STEPS
    assert subject.category == "teapot" and subject.embedding.shape == (1, 16, 768)
    assert all(k.endswith((".diff", ".diff_b")) for k in unet_sd) and len(unet_sd) > 400
    assert all(torch.isfinite(v).all() for v in unet_sd.values())
    assert max(v.abs().max().item() for v in unet_sd.values()) > 0, "the UNet did not change"
    assert not list(finetune_folder(comfy_server).glob(".finetune-*")), "temporary file left behind"


def test_input_model_renders_as_before(comfy_server, api, image, base_before, trained):
    after = saved_latent(comfy_server, api.run(base_render(image, reps=2), timeout=900), "save_latent")
    assert torch.equal(after, base_before), f"the base MODEL changed: max {(after - base_before).abs().max()}"


def test_saved_finetune_reloads_to_the_same_render(comfy_server, api, trained):
    name, result = trained
    in_memory = saved_latent(comfy_server, result, "save_latent")
    reloaded = saved_latent(comfy_server, api.run(reload_render(f"{name}.safetensors"), timeout=900), "save_latent")
    assert torch.equal(reloaded, in_memory), f"max diff {(reloaded - in_memory).abs().max()}"


def test_bad_inputs_give_clear_errors_and_the_server_keeps_serving(comfy_server, api, image, tmp_path):
    photo = {"class_type": "LoadImage", "inputs": {"image": image}}
    with pytest.raises(PromptRejected) as e:
        api.run(minimal_graph(photo, steps=0))
    assert "steps" in str(e.value)
    with pytest.raises(PromptRejected) as e:
        api.run(minimal_graph(photo, learning_rate=-1e-5))
    assert "learning_rate" in str(e.value)
    with pytest.raises(ExecutionFailed) as e:
        api.run(minimal_graph(photo, learning_rate=0.0))
    assert "learning_rate must be a positive number" in e.value.message
    with pytest.raises(ExecutionFailed) as e:
        api.run(minimal_graph(photo, category=" "))
    assert "category is empty" in e.value.message
    no_photos = minimal_graph(photo)
    del no_photos["finetune"]["inputs"]["images"], no_photos["photos"]
    with pytest.raises(PromptRejected) as e:   # the host refuses a missing IMAGE input (an empty batch or
        api.run(no_photos)                      # list is refused by the node: test_finetune.py)
    assert "images" in str(e.value)

    # Photos of three sizes from a folder (a list input): each is resized and cropped on its own.
    mixed = comfy_server.base_dir / "input" / "ft_mixed"
    mixed.mkdir(exist_ok=True)
    src = Image.open(SAMPLE).convert("RGB")
    for i, size in enumerate([(96, 64), (64, 130), (200, 200)]):
        src.resize(size, Image.BICUBIC).save(mixed / f"p{i}.png")
    result = api.run(minimal_graph({"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "ft_mixed"}},
                                   mode="lora", lora_rank=4, learning_rate=1e-4, seed=9), timeout=900)
    assert len(result.outputs["save_loss"]["images"]) == 1


def test_cancel_stops_training_leaves_no_file_and_the_next_prompt_succeeds(comfy_server, api, image, base_before):
    import websocket

    name = f"cancel_{uuid.uuid4().hex[:8]}"
    graph = finetune_graph(image, name, steps=40, seed=77)
    ws = websocket.create_connection(api.url.replace("http", "ws", 1) + f"/ws?clientId={api.client_id}", timeout=10)
    ws.settimeout(5)
    try:
        prompt_id = api.queue(graph)
        progress, texts, interrupted, done = [], [], False, None
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline and done is None:
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if isinstance(raw, bytes):
                if len(raw) > 8 and struct.unpack(">I", raw[:4])[0] == 3:  # BinaryEventTypes.TEXT
                    n = struct.unpack(">I", raw[4:8])[0]
                    texts.append((raw[8:8 + n].decode(), raw[8 + n:].decode(errors="replace")))
                continue
            msg = json.loads(raw)
            data = msg.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if msg["type"] == "progress" and data.get("node") == "finetune":
                progress.append((data["value"], data["max"]))
                if not interrupted:
                    api.interrupt()   # POST /interrupt during training, after step 1
                    interrupted = True
            if msg["type"] in ("execution_interrupted", "execution_success", "execution_error"):
                done = msg["type"]
    finally:
        ws.close()
    assert done == "execution_interrupted", (done, progress)
    assert progress and progress[0] == (1, 40) and len(progress) <= 2, progress
    assert any(node == "finetune" and "loss" in text for node, text in texts), texts
    assert not (finetune_folder(comfy_server) / f"{name}.safetensors").exists()
    assert not list(finetune_folder(comfy_server).glob(".finetune-*")), "temporary file left behind"
    after = saved_latent(comfy_server, api.run(base_render(image, reps=3), timeout=900), "save_latent")
    assert torch.equal(after, base_before), "the input MODEL changed after a cancelled fine-tune"


def test_parts_of_other_models_are_refused_before_any_work():
    # The UNet's config says what it reads; an SD2-width CLIP or a 16-channel (SD3/Flux) VAE is refused up
    # front with the part to change, not deep in the UNet's first matmul after the VAE and encoder ran.
    from types import SimpleNamespace

    from conftest import comfy_on_path

    comfy_on_path()
    from blip_diffusion.blip_core.finetune import FinetuneError
    from blip_diffusion.nodes.host_finetune import check_parts_fit

    def model(**config):
        return SimpleNamespace(model=SimpleNamespace(model_config=SimpleNamespace(unet_config=config)))

    sd15 = model(context_dim=768, in_channels=4)
    check_parts_fit(sd15, 768, SimpleNamespace(latent_channels=4))
    with pytest.raises(FinetuneError, match="reads 1024-wide text but the CLIP is 768 wide"):
        check_parts_fit(model(context_dim=1024, in_channels=4), 768, SimpleNamespace(latent_channels=4))
    with pytest.raises(FinetuneError, match="the VAE makes 16-channel latents but this MODEL's UNet takes 4"):
        check_parts_fit(sd15, 768, SimpleNamespace(latent_channels=16))
