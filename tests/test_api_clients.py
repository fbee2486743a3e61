"""Independent clients against the real host: the shipped zero-shot API workflow driven the way ordinary
API users drive it, so a change that breaks them fails here first.

- comfy-api-simplified (PyPI; provisioned by scripts/setup_host.sh), addressing nodes by their titles:
  upload, set inputs, queue, wait, fetch;
- the README's plain ``curl`` recipe (section *HTTP API*), run as written with only the host and the run's
  values substituted.

Neither goes through the pack's own client (api/client.py): only the host's HTTP API is shared.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from graphs import WORKFLOWS
from paths import ROOT

try:
    from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper
except ImportError:  # failed below, not skipped: CI must run these
    ComfyApiWrapper = ComfyWorkflowWrapper = None

ZERO_SHOT = WORKFLOWS / "api" / "zero_shot.json"
SAMPLE = WORKFLOWS / "assets" / "sample_subject.png"
SIZE, STEPS = 64, 2  # CPU time


def need_client():
    if ComfyApiWrapper is None:
        pytest.fail("comfy-api-simplified is not installed in this Python: `bash scripts/setup_host.sh` puts it into "
                    f"the host venv (or `{sys.executable} -m pip install comfy-api-simplified==1.6.0`)")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A subject photo that is not one the pack ships: its sample mirrored, as a JPEG in a temporary folder."""
    with Image.open(SAMPLE) as im:
        mirrored = im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert np.asarray(mirrored).tolist() != np.asarray(im.convert("RGB")).tolist(), "the sample is symmetric"
    path = tmp_path_factory.mktemp("photo") / "mirrored_subject.jpg"
    mirrored.save(path, quality=95)
    return path


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## HTTP API\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## HTTP API' section"
    return m.group(1)


def readme_block(lang: str) -> str:
    blocks = re.findall(rf"^```{lang}\n(.*?)^```", readme_section(), re.S | re.M)
    assert len(blocks) == 1, f"README 'HTTP API' should have one ```{lang} block, has {len(blocks)}"
    return blocks[0]


def decoded(png: bytes) -> np.ndarray:
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float32)
    assert img.shape == (SIZE, SIZE, 3), f"expected a {SIZE}x{SIZE} render, got {img.shape}"
    assert img.std() > 1.0, "a flat frame, not a decode"
    return img


def history_entry(server, save_id: str, filename: str) -> tuple[dict, dict]:
    """The host's own record (GET /history) of the run whose Save Image wrote ``filename``: (graph, entry)."""
    history = requests.get(server.url + "/history", timeout=30).json()
    found = [e for e in history.values()
             if any(i["filename"] == filename for i in e.get("outputs", {}).get(save_id, {}).get("images", []))]
    assert len(found) == 1, f"/history has {len(found)} runs that wrote {filename}"
    entry = found[0]
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry["prompt"][2], entry


# -- the README's recipes name what the shipped workflow has ---------------------------------------------
def test_readme_titles_and_ids_are_the_shipped_workflows():
    shipped = json.loads(ZERO_SHOT.read_text())
    rows = re.findall(r"^\| ([^|]+?) \| `(\w+)` \| (.+?) \|$", readme_section(), re.M)
    assert rows, "README 'HTTP API' has no table of titles and node ids"
    for title, node_id, inputs in rows:
        assert node_id in shipped, f"README names node id {node_id!r}, which zero_shot.json lacks"
        assert shipped[node_id]["_meta"]["title"] == title, f"{node_id}: README says {title!r}"
        for name in re.findall(r"`(\w+)`", inputs.split(":")[0]):
            assert name in shipped[node_id]["inputs"], f"README: {title} has no input {name!r}"
    titles = [n["_meta"]["title"] for n in shipped.values()]
    assert len(set(titles)) == len(titles), f"titles must be unique for clients that address nodes by title: {titles}"

    code = readme_block("python")
    calls = re.findall(r'set_node_param\("([^"]+)", "([^"]+)"', code)
    assert calls, "the README's Python recipe sets nothing by title"
    by_title = {n["_meta"]["title"]: n for n in shipped.values()}
    for title, name in calls:
        assert title in by_title and name in by_title[title]["inputs"], f"README sets {title!r}.{name!r}: not in zero_shot"
    output = re.search(r'queue_and_wait_images\(wf, "([^"]+)"\)', code)
    assert output and by_title[output.group(1)]["class_type"] == "SaveImage"


# -- comfy-api-simplified, by titles ------------------------------------------------------------------------
def test_comfy_api_simplified_drives_the_shipped_workflow_by_titles(comfy_server, photo):
    need_client()
    api = ComfyApiWrapper(comfy_server.url)

    up = api.upload_image(photo)  # the client's default subfolder
    assert up["type"] == "input", up
    image = f"{up['subfolder']}/{up['name']}" if up["subfolder"] else up["name"]
    assert (comfy_server.base_dir / "input" / image).read_bytes() == photo.read_bytes(), "the upload did not land"

    values = {("Subject photo", "image"): image,
              ("Subject Encode", "category"): "mug",
              ("Subject Conditioning", "prompt"): "on a beach at sunset",
              ("PNDM schedule (as published)", "steps"): STEPS,
              ("Empty Latent Image (output size)", "width"): SIZE,
              ("Empty Latent Image (output size)", "height"): SIZE}
    renders = {}
    for seed in (11, 12):
        wf = ComfyWorkflowWrapper(str(ZERO_SHOT))  # loaded by the client from the shipped file
        for (title, name), value in values.items():
            wf.set_node_param(title, name, value)
        wf.set_node_param("Sample (SamplerCustom)", "noise_seed", seed)
        wf.set_node_param("Save Image", "filename_prefix", f"api_clients/simplified_{seed}")

        files = api.queue_and_wait_images(wf, "Save Image")  # queue, wait over /ws, fetch over /view
        assert len(files) == 1, f"expected one image, got {list(files)}"
        (filename, png), = files.items()
        assert filename.startswith(f"simplified_{seed}_"), f"{filename!r}: not a file Save Image wrote"
        assert (comfy_server.base_dir / "output" / "api_clients" / filename).read_bytes() == png
        renders[seed] = decoded(png)

        graph, _ = history_entry(comfy_server, wf.get_node_id("Save Image"), filename)
        assert graph == dict(wf), "the host ran another graph than the client built"
        ids = {title: wf.get_node_id(title) for title, _ in values}
        for (title, name), value in values.items():
            assert graph[ids[title]]["inputs"][name] == value, f"{title}.{name}"
        assert graph[wf.get_node_id("Sample (SamplerCustom)")]["inputs"]["noise_seed"] == seed

    assert np.abs(renders[11] - renders[12]).mean() > 1.0, "another seed gave the same image: inputs are ignored"


# -- the README's curl recipe, as written ---------------------------------------------------------------------
def test_readme_curl_recipe_runs_as_written(comfy_server, photo, tmp_path):
    if shutil.which("curl") is None:
        pytest.fail("curl is not on PATH: the README's HTTP recipe needs it (Debian: apt-get install curl)")
    script = readme_block("bash")
    run = {"HOST": comfy_server.url, "PHOTO": "curl_subject.jpg", "CATEGORY": "kettle",
           "PROMPT": '"in the snow at night"', "SEED": "7", "STEPS": str(STEPS), "SIZE": str(SIZE)}
    for var, value in run.items():
        script, n = re.subn(rf"(?m)(^|\s){var}=(\"[^\"]*\"|\S+)", rf"\g<1>{var}={value}", script, count=1)
        assert n == 1, f"the README's curl recipe sets no {var}=..."
    shutil.copy(photo, tmp_path / run["PHOTO"])
    (tmp_path / "workflows").symlink_to(WORKFLOWS, target_is_directory=True)  # run "from the pack folder"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the README's curl recipe failed ({proc.returncode}):\n{proc.stderr[-4000:]}"

    png = (tmp_path / "render.png").read_bytes()
    decoded(png)
    assert (comfy_server.base_dir / "input" / run["PHOTO"]).read_bytes() == photo.read_bytes()
    history = requests.get(comfy_server.url + "/history", timeout=30).json()
    runs = [e for e in history.values()   # other tests' graphs may be in this host's history too
            if e["prompt"][2].get("reference", {}).get("inputs", {}).get("image") == run["PHOTO"]]
    assert len(runs) == 1, f"/history has {len(runs)} runs of {run['PHOTO']}"
    graph = runs[0]["prompt"][2]
    expected = json.loads(ZERO_SHOT.read_text())
    expected["reference"]["inputs"]["image"] = run["PHOTO"]
    expected["encode"]["inputs"]["category"] = "kettle"
    expected["positive"]["inputs"]["prompt"] = "in the snow at night"
    expected["sample"]["inputs"]["noise_seed"] = 7
    expected["sigmas"]["inputs"]["steps"] = STEPS
    expected["latent"]["inputs"].update(width=SIZE, height=SIZE)
    assert graph == expected, "the recipe queued another graph than the shipped one with its inputs"
    saved = runs[0]["outputs"]["save"]["images"][0]
    assert (comfy_server.base_dir / "output" / saved["subfolder"] / saved["filename"]).read_bytes() == png
