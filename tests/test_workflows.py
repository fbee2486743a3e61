"""The shipped workflows: every API workflow has a drag-and-drop (UI-format) twin, together they
use every node of the pack, every file they name is one the pack provides or the README explains,
and each API workflow runs to an image on the generated weights.

What a UI twin holds is the host's frontend's business: tests/test_frontend.py has the page save
each API workflow and compares the result with the shipped twin, drops every twin onto the canvas
and checks its Export (API) against the API file.
"""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graphs import WORKFLOWS
from paths import ROOT

API_DIR, UI_DIR = WORKFLOWS / "api", ROOT / "example_workflows"
API_NAMES = sorted(p.stem for p in API_DIR.glob("*.json"))
UI_NAMES = sorted(p.stem for p in UI_DIR.glob("*.json"))
SAMPLE = WORKFLOWS / "assets" / "sample_subject.png"
PACK_MODULE = "custom_nodes.blip_diffusion"  # make_base_dir links the pack as custom_nodes/blip_diffusion

SIZE, STEPS = 64, 2


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def object_info(comfy_server, tmp_path_factory) -> dict:
    """The host's node list, read once the files that shipped loaders name exist (their combo values)."""
    from blip_diffusion.api.client import ComfyClient

    api = ComfyClient(comfy_server.url)
    scratch = tmp_path_factory.mktemp("saved-files")
    for name in API_NAMES:
        make_saved_subjects(comfy_server, api, for_test(load("api", name)), scratch)
    return api.object_info()


def load(kind: str, name: str) -> dict:
    return json.loads(((API_DIR if kind == "api" else UI_DIR) / f"{name}.json").read_text())


# -- the files themselves ---------------------------------------------------------------------------
# What a shipped workflow may name (the UI twins are the frontend's load of these, test_frontend):
# photos the pack puts into input/, the released folders' names as the README tells users to put them,
# and files another shipped workflow saves.
RELEASED_FOLDERS = {"blipdiffusion", "blipdiffusion-controlnet"}
FILE_INPUTS = {("LoadImage", "image"): "photo", ("BlipDiffusionLoader", "model_name"): "folder",
               ("BlipControlNetLoader", "model_name"): "folder", ("BlipSubjectEncoderLoader", "encoder_name"): "folder",
               ("LoadSubject", "subject_name"): "saved", ("LoadBlipFinetune", "finetune_name"): "saved",
               ("UNETLoader", "unet_name"): "host", ("CLIPLoader", "clip_name"): "host",
               ("VAELoader", "vae_name"): "host", ("ControlNetLoader", "control_net_name"): "host"}


def test_every_file_a_shipped_workflow_names_is_one_the_pack_provides():
    readme = (ROOT / "README.md").read_text()
    saved = {f"{n['inputs']['name']}.safetensors" for name in API_NAMES for n in load("api", name).values()
             if n["class_type"] in ("SaveSubject", "SaveBlipFinetune")}
    problems = []
    for name in API_NAMES:
        for key, node in load("api", name).items():
            for (ct, field), kind in FILE_INPUTS.items():
                if node["class_type"] != ct:
                    continue
                value = node["inputs"][field]
                where = f"{name}.{key}.{field} = {value!r}"
                if kind == "photo" and value not in pack_samples():
                    problems.append(f"{where}: not a photo the pack provides ({sorted(pack_samples())})")
                elif kind == "folder" and value not in RELEASED_FOLDERS:
                    problems.append(f"{where}: not a released folder name ({sorted(RELEASED_FOLDERS)})")
                elif kind == "saved" and value not in saved:
                    problems.append(f"{where}: no shipped workflow saves it")
                elif kind in ("folder", "host") and value not in readme:
                    problems.append(f"{where}: the README does not tell users where this comes from")
    assert not problems, "\n".join(problems)
    used = {n["inputs"]["image"] for name in API_NAMES for n in load("api", name).values()
            if n["class_type"] == "LoadImage"}
    assert used == pack_samples(), f"photos shipped but named by no workflow: {pack_samples() - used}"


def test_there_are_workflows_and_each_api_workflow_has_a_ui_twin():
    assert "zero_shot" in API_NAMES
    assert API_NAMES == UI_NAMES, (f"API without UI twin: {sorted(set(API_NAMES) - set(UI_NAMES))}; "
                                   f"UI without API twin: {sorted(set(UI_NAMES) - set(API_NAMES))} "
                                   "(run scripts/make_ui_workflows.py)")


# -- coverage ---------------------------------------------------------------------------------------
def pack_nodes(object_info: dict) -> set[str]:
    return {k for k, v in object_info.items()
            if v.get("python_module") == PACK_MODULE or v.get("python_module", "").startswith(PACK_MODULE + ".")}


# Nodes no shipped workflow may use, because a fresh install lacks their input (every shipped workflow
# runs as opened): a LAVIS fine-tune is the user's own training output (README, *Fine-tunes made with LAVIS*).
NOT_SHIPPED = {"LoadLavisFinetune"}


def test_every_pack_node_appears_in_a_shipped_workflow(object_info):
    pack = pack_nodes(object_info) - NOT_SHIPPED
    assert "BlipDiffusionLoader" in pack and "SubjectEncode" in pack, sorted(pack)
    in_api = {n["class_type"] for name in API_NAMES for n in load("api", name).values()}
    in_ui = {n["type"] for name in UI_NAMES for n in load("ui", name)["nodes"]}
    assert not pack - in_api, f"pack nodes used by no API workflow: {sorted(pack - in_api)}"
    assert not pack - in_ui, f"pack nodes used by no UI workflow: {sorted(pack - in_ui)}"


# -- each API workflow runs ---------------------------------------------------------------------------
def pack_samples() -> set[str]:
    """The photos the pack puts into the host's input folder when it loads (nodes/samples.py)."""
    return {p.name for p in (WORKFLOWS / "assets").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")}


def input_image(server, name: str) -> Path:
    """The shipped workflow's photo as the pack left it in the host's input folder: no test puts it there."""
    assert name in pack_samples(), f"a shipped workflow names {name!r}, which the pack does not provide"
    placed = server.base_dir / "input" / name
    assert placed.is_file(), f"the pack did not put {name} into the host's input folder"
    return placed


def for_test(api: dict) -> dict:
    """The shipped workflow at 64x64 with 2 steps (CPU time); every file it names stays as shipped."""
    g = copy.deepcopy(api)
    for node in g.values():
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "EmptyLatentImage":
            inputs.update(width=SIZE, height=SIZE, batch_size=1)
        if "steps" in inputs and not isinstance(inputs["steps"], list):
            inputs["steps"] = STEPS
        if ct in ("SaveSubject", "SaveBlipFinetune"):
            inputs["overwrite"] = True  # the session host may have saved it already
        if ct == "BlipFinetune":
            inputs.update(resolution=SIZE)
        if ct == "SubjectEditPhoto":
            inputs.update(size=SIZE)
    return g


def subject_folder(server) -> Path:
    return server.base_dir / "models" / "blip_subjects"


def run_to_images(server, api, graph, tmp_path) -> dict:
    for node in graph.values():
        if node["class_type"] == "LoadImage":
            input_image(server, node["inputs"]["image"])
    return api.run(graph, timeout=900)


# Loader node -> (its file input, the saver node that writes such files, the saver's name input, folder)
SAVED_FILES = {"LoadSubject": ("subject_name", "SaveSubject", "blip_subjects"),
               "LoadBlipFinetune": ("finetune_name", "SaveBlipFinetune", "blip_finetunes")}


def make_saved_subjects(server, api, graph, tmp_path) -> None:
    """LoadSubject / LoadBlipFinetune need their file: run the shipped workflow that saves it, unless it is there."""
    for node in graph.values():
        if node["class_type"] not in SAVED_FILES:
            continue
        field, saver, folder = SAVED_FILES[node["class_type"]]
        wanted = node["inputs"][field]
        if (server.base_dir / "models" / folder / wanted).exists():
            continue
        makers = [n for n in API_NAMES if any(
            m["class_type"] == saver and f"{m['inputs']['name']}.safetensors" == wanted
            for m in load("api", n).values())]
        assert makers, f"no shipped workflow saves the file {wanted!r} that {node['class_type']} expects"
        run_to_images(server, api, for_test(load("api", makers[0])), tmp_path)
        assert (server.base_dir / "models" / folder / wanted).exists(), f"{makers[0]} did not save {wanted}"


@pytest.mark.parametrize("name", API_NAMES)
def test_api_workflow_runs_to_an_image(name, comfy_server, api, tmp_path):
    graph = for_test(load("api", name))
    make_saved_subjects(comfy_server, api, graph, tmp_path)
    result = run_to_images(comfy_server, api, graph, tmp_path)
    savers = [k for k, n in graph.items() if n["class_type"] == "SaveImage"]
    assert savers, f"{name} has no SaveImage"
    for key in savers:
        images = result.outputs.get(key, {}).get("images", [])
        assert len(images) == 1, f"{name}: SaveImage {key} gave {images}"
        img = np.asarray(Image.open(io.BytesIO(api.view(images[0]))))
        source = graph[graph[key]["inputs"]["images"][0]]["class_type"]
        if source != "BlipFinetune":  # the loss plot has its own size
            assert img.shape == (SIZE, SIZE, 3)
        assert img.std() > 0, "a blank frame, not a decode"
    for node in graph.values():
        if node["class_type"] == "SaveSubject":
            assert (subject_folder(comfy_server) / f"{node['inputs']['name']}.safetensors").exists()
