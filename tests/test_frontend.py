"""The host's own frontend in a real browser: every shipped UI workflow, dropped onto the canvas as
a user drops a file, loads without a missing-node/model or invalid-widget complaint, draws every
node of the pack, runs from the page's Run button and shows its output image on the page.

The frontend is the comfyui-frontend-package the host serves at ``/``; the browser is Debian's
Chromium (/usr/bin/chromium) driven by tests/browser/drive.mjs with playwright-core (the driver
library only, never a downloaded browser). ``bash scripts/setup_browser.sh`` provisions both.

The dropped files are the shipped workflows adjusted to the session host exactly as
tests/test_workflows.py adjusts the API twins (generated weights, 64 px, 2 steps); its broken copies
of the zero-shot workflow (UI_MISTAKES) are dropped too and each must be reported. The README's
screenshots, docs/images/{zero_shot,edit_photo}_graph.png, are those shipped workflows as users see them;
``BLIP_UPDATE_SCREENSHOT=1`` makes this test write it anew.
"""
from __future__ import annotations

import copy
import io
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graphs import ROOT
from test_workflows import (  # noqa: F401  (object_info is a fixture)
    SIZE, UI_DIR, UI_MISTAKES, UI_NAMES, broken, for_test, frontend_widgets, input_image, load, make_saved_subjects,
    object_info, pack_nodes,
)

BROWSER_DIR = ROOT / "tests" / "browser"
DRIVER = BROWSER_DIR / "drive.mjs"
CHROMIUM = os.environ.get("BLIP_CHROMIUM", "/usr/bin/chromium")
# The README's pictures of shipped workflows, as the frontend draws them
SCREENSHOTS = {name: ROOT / "docs" / "images" / f"{name}_graph.png" for name in ("zero_shot", "edit_photo")}
SCREENSHOT_SIZE = (1600, 900)
SETUP_HINT = "run `bash scripts/setup_browser.sh` (installs Debian's chromium and playwright-core)"


def ui_for_test(wf: dict, node_info: dict) -> dict:
    """The UI workflow with test_workflows.for_test's changes applied to its widget values.

    Each node's widget values become an API-style node (linked inputs as links), for_test adjusts
    that graph, and the adjusted values are written back into ``widgets_values``."""
    wf = copy.deepcopy(wf)
    as_api = {}
    for node in wf["nodes"]:
        widgets = frontend_widgets(node_info[node["type"]])
        inputs = {name: value for (name, _, role), value in zip(widgets, node["widgets_values"]) if role == "value"}
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                inputs[slot["name"]] = ["linked", 0]
        as_api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    adjusted = for_test(as_api)
    for node in wf["nodes"]:
        inputs = adjusted[str(node["id"])]["inputs"]
        for index, (name, _, role) in enumerate(frontend_widgets(node_info[node["type"]])):
            if role == "value" and name in inputs and not isinstance(inputs[name], list):
                node["widgets_values"][index] = inputs[name]
    return wf


def api_for_test(name: str) -> dict:
    return for_test(load("api", name))


def browser_problem() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM}"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "tests/browser/node_modules/playwright-core is missing"
    return None


def run_driver(manifest: dict, tmp_path: Path, timeout: float) -> dict:
    """Run drive.mjs on the manifest in its own process group (the browser goes with it)."""
    (tmp_path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    env = dict(os.environ, PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD="1")
    proc = subprocess.Popen(["node", str(DRIVER), str(tmp_path / "manifest.json")], cwd=BROWSER_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the browser driver ran past {timeout}s\n{driver_output(stdout, stderr)}")
    if proc.returncode != 0:
        pytest.fail(f"the browser driver failed (exit {proc.returncode})\n{driver_output(stdout, stderr)}")
    print(driver_output(stdout, stderr))
    return json.loads(Path(manifest["results"]).read_text())


def driver_output(stdout: str, stderr: str) -> str:
    return f"---- driver stdout ----\n{stdout[-8000:]}\n---- driver stderr ----\n{stderr[-8000:]}"


def test_frontend_loads_queues_and_shows_every_ui_workflow(comfy_server, api, object_info, tmp_path):
    problem = browser_problem()
    if problem:
        pytest.fail(f"the browser test cannot run: {problem}; {SETUP_HINT}")

    pack = pack_nodes(object_info)
    dropped = tmp_path / "drop"
    dropped.mkdir()
    workflows = []
    for name in UI_NAMES:
        graph = api_for_test(name)
        make_saved_subjects(comfy_server, api, graph, tmp_path)  # LoadSubject's file, before the page lists it
        wf = ui_for_test(load("ui", name), object_info)
        for node in wf["nodes"]:
            if node["type"] == "LoadImage":  # the page lists the input folder: the pack filled it
                input_image(comfy_server, node["widgets_values"][0])
        (dropped / f"{name}.json").write_text(json.dumps(wf, indent=1))
        types = {n["id"]: n["type"] for n in wf["nodes"]}
        workflows.append({
            "name": name,
            "file": str(dropped / f"{name}.json"),
            "pack_types": sorted({n["type"] for n in wf["nodes"]} & pack),
            "savers": [n["id"] for n in wf["nodes"] if n["type"] == "SaveImage"],
            "loss_plots": [str(link[3]) for link in wf["links"]  # SaveImage nodes fed by BlipFinetune
                           if types[link[1]] == "BlipFinetune" and types[link[3]] == "SaveImage"],
        })
    assert all(w["pack_types"] for w in workflows), "a UI workflow without pack nodes?"

    # test_workflows' broken copies of zero_shot, dropped after the real runs: each must be reported.
    mistakes = []
    for index, (mistake, change) in enumerate(UI_MISTAKES.items()):
        path = dropped / f"broken_{index}.json"
        path.write_text(json.dumps(broken(json.loads((dropped / "zero_shot.json").read_text()), change)))
        mistakes.append({"name": mistake, "file": str(path), "pack_types": [], "savers": []})

    manifest = {
        "url": comfy_server.url,
        "chromium": CHROMIUM,
        "workflows": workflows,
        "broken": mistakes,
        "screenshots": [{"file": str(UI_DIR / f"{name}.json"), "out": str(tmp_path / shot.name), "label": name,
                         "width": SCREENSHOT_SIZE[0], "height": SCREENSHOT_SIZE[1]}
                        for name, shot in SCREENSHOTS.items()],
        "results": str(tmp_path / "results.json"),
        "profile": str(tmp_path / "chromium-profile"),
        "timeout_ms": 300_000,
    }
    results = run_driver(manifest, tmp_path, timeout=900)

    # The page's own prompts, read back from the host: each finished with one 64x64 image per SaveImage.
    for wf in workflows:
        got = results["workflows"].get(wf["name"])
        assert got and got.get("prompt_id"), f"{wf['name']}: the driver reported no prompt: {got}"
        entry = api.history(got["prompt_id"]).get(got["prompt_id"])
        assert entry and entry["status"].get("status_str") == "success", f"{wf['name']}: {entry and entry['status']}"
        for saver in wf["savers"]:
            images = entry["outputs"].get(str(saver), {}).get("images", [])
            assert len(images) == 1, f"{wf['name']}: SaveImage {saver} gave {images}"
            assert images[0]["filename"] in got["shown"][str(saver)], \
                f"{wf['name']}: the page shows {got['shown'][str(saver)]}, the host saved {images[0]['filename']}"
            img = np.asarray(Image.open(io.BytesIO(api.view(images[0]))))
            assert img.std() > 0 and img.ndim == 3
            if wf.get("loss_plots") is None or str(saver) not in wf["loss_plots"]:  # a loss plot has its own size
                assert img.shape == (SIZE, SIZE, 3)

    not_reported = [m["name"] for m in mistakes if not results["broken"].get(m["name"])]
    assert not not_reported, f"the page loaded these broken workflows without a complaint: {not_reported}"

    for shot in SCREENSHOTS.values():
        with Image.open(tmp_path / shot.name) as im:
            assert im.size == SCREENSHOT_SIZE
            assert np.asarray(im.convert("L")).std() > 5, f"the screenshot {shot.name} is blank"
        if os.environ.get("BLIP_UPDATE_SCREENSHOT") == "1":
            shot.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / shot.name, shot)


@pytest.mark.parametrize("name", sorted(SCREENSHOTS))
def test_readme_screenshot_is_there(name):
    shot = SCREENSHOTS[name]
    assert shot.exists(), f"{shot} is missing: BLIP_UPDATE_SCREENSHOT=1 bash scripts/test.sh tests/test_frontend.py"
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == SCREENSHOT_SIZE
    assert f"docs/images/{shot.name}" in (ROOT / "README.md").read_text(), "the README does not show it"
