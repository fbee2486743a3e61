"""The host's own frontend in a real browser: every shipped UI workflow, dropped onto the canvas as
a user drops a file, loads without a missing-node/model or invalid-widget complaint, draws every
node of the pack, runs from the page's Run button and shows its output image on the page.

The frontend is the comfyui-frontend-package the host serves at ``/``; the browser is Debian's
Chromium (/usr/bin/chromium) driven by tests/browser/drive.mjs with playwright-core (the driver
library only, never a downloaded browser). ``bash scripts/setup_browser.sh`` provisions both.

The dropped files are the shipped UI workflows; once the page holds one, the driver types in the
settings tests/test_workflows.py gives the API twins (64 px, 2 steps), by widget name, as a user
would. Broken copies of the zero-shot workflow (UI_MISTAKES) are dropped too and each must be
reported. The UI files themselves are the page's own save of the API files
(scripts/make_ui_workflows.py): the first test has the page save them again and compares. The
README's screenshots, docs/images/*_graph.png, are shipped workflows as users see them;
``BLIP_UPDATE_SCREENSHOT=1`` makes this test write them and the template thumbnails anew.
"""
from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip_diffusion.api.server import PACK_DIR_NAME
from paths import CACHE, ROOT
from test_workflows import (  # noqa: F401  (object_info is a fixture)
    API_NAMES, SIZE, UI_DIR, UI_NAMES, for_test, input_image, load, make_saved_subjects, object_info, pack_nodes,
)

sys.path.insert(0, str(ROOT / "scripts"))
import make_ui_workflows  # noqa: E402  (scripts/ is not a package)

BROWSER_DIR, CHROMIUM, browser_problem = (make_ui_workflows.BROWSER_DIR, make_ui_workflows.CHROMIUM,
                                           make_ui_workflows.browser_problem)
DRIVER = BROWSER_DIR / "drive.mjs"
# The README's pictures of shipped workflows, as the frontend draws them
SCREENSHOTS = {name: ROOT / "docs" / "images" / f"{name}_graph.png"
               for name in ("zero_shot", "edit_photo", "two_subjects")}
SCREENSHOT_SIZE = (1600, 900)
THUMBNAIL_SIZE = (640, 360)  # example_workflows/<name>.jpg, the template browser's card for <name>.json
THUMBNAIL_CROP_TOP = 36  # the frontend's tab bar
TEMPLATE = "zero_shot"  # opened from the template browser and run
# On both frontends every workflow is dropped, checked and exported (its Export (API) must equal the shipped
# API file, which tests/test_workflows.py runs; the Run button posts that same export). Each is also run from
# a Run button once, on one of the two: these on the newest, the others on the pinned one (CI time: the
# host's work is the same on both).
NEWEST_RUNS = {"controlnet_stylisation", "edit_photo", "interpolation"}
# Broken copies the newest frontend loads without marking them (README, *Running the tests*): 1.58 no longer
# flags an unlinked required input when the file loads; the host refuses such a prompt when it is run.
NEWEST_LOADS_QUIETLY = {"required socket unlinked"}
SETUP_HINT = "run `bash scripts/setup_browser.sh` (installs Debian's chromium and playwright-core)"


def settings_for_test(name: str) -> dict:
    """{node title: {widget: value}} that test_workflows.for_test changes in the API twin: what the driver
    types into the page's widgets after a drop (titles are unique in every shipped workflow)."""
    api = load("api", name)
    changed = {}
    for key, node in for_test(api).items():
        title = node["_meta"]["title"]
        for widget, value in node["inputs"].items():
            if not isinstance(value, list) and api[key]["inputs"].get(widget) != value:
                changed.setdefault(title, {})[widget] = value
    return changed


# Broken copies of the shipped zero_shot UI workflow: the page must report each one when it is dropped.
def node_of(wf: dict, node_type: str) -> dict:
    return next(n for n in wf["nodes"] if n["type"] == node_type)


def broken(wf: dict, change) -> dict:
    wf = copy.deepcopy(wf)
    change(wf)
    return wf


def set_link_type(wf, node_type, input_name, new_type):
    slot = next(i for i in node_of(wf, node_type)["inputs"] if i["name"] == input_name)
    next(link for link in wf["links"] if link[0] == slot["link"])[5] = new_type


def set_widget(node_type, index, value):
    return lambda wf: node_of(wf, node_type)["widgets_values"].__setitem__(index, value)


def unlink(node_type, input_name):
    return lambda wf: next(i for i in node_of(wf, node_type)["inputs"] if i["name"] == input_name).update(link=None)


UI_MISTAKES = {
    "seed without its control_after_generate value": lambda wf: node_of(wf, "SamplerCustom")["widgets_values"].pop(2),
    "unknown control_after_generate value": set_widget("SamplerCustom", 2, "sometimes"),
    "LoadImage without its upload value": lambda wf: node_of(wf, "LoadImage")["widgets_values"].pop(),
    "INT below its minimum": set_widget("BlipPNDMScheduler", 0, 0),
    "FLOAT given as a string": set_widget("SamplerCustom", 3, "7.5"),
    "combo value not among the options": set_widget("SubjectEncode", 2, "bogus"),
    "link typed wrongly": lambda wf: set_link_type(wf, "SamplerCustom", "positive", "LATENT"),
    "required socket unlinked": unlink("SamplerCustom", "model"),
    "unknown node type": lambda wf: node_of(wf, "VAEDecode").update(type="VAEDecodeNope"),
}


def thumbnail(png: Path, out: Path) -> None:
    """A template card's picture: the graph as the frontend draws it (the screenshot less the sidebar and
    the tab bar, 16:9), as a 640x360 JPEG."""
    with Image.open(png) as im:
        w, h = im.size
        left, top = w - (h - THUMBNAIL_CROP_TOP) * 16 // 9, THUMBNAIL_CROP_TOP
        im.convert("RGB").crop((left, top, w, h)).resize(THUMBNAIL_SIZE, Image.LANCZOS).save(
            out, "JPEG", quality=85, optimize=True)


def export_differences(exported: dict, api: dict) -> list[str]:
    """How the frontend's API export of a UI workflow differs from the shipped API twin.

    Node ids differ (numbers in the UI file, names in the API file), so nodes are matched by their
    titles, which must be unique in each; links compare by the title of the node they come from."""
    def by_title(graph):
        titles = [n.get("_meta", {}).get("title") for n in graph.values()]
        if None in titles or len(set(titles)) != len(titles):
            return None, [f"titles missing or not unique: {sorted(map(str, titles))}"]
        return {n["_meta"]["title"]: (key, n) for key, n in graph.items()}, []

    ours, problems = by_title(api)
    theirs, more = by_title(exported)
    if problems or more:
        return [f"shipped API file: {p}" for p in problems] + [f"export: {p}" for p in more]
    if set(ours) != set(theirs):
        return [f"nodes only in the shipped file: {sorted(set(ours) - set(theirs))}; "
                f"only in the export: {sorted(set(theirs) - set(ours))}"]
    title_of = {graph_key: {key: title for title, (key, _) in index.items()}
                for graph_key, index in (("api", ours), ("exported", theirs))}

    def normalised(node, side):
        return {name: (title_of[side][value[0]], value[1]) if isinstance(value, list) and len(value) == 2
                and str(value[0]) in title_of[side] else as_exported(value) for name, value in node["inputs"].items()}

    diffs = []
    for title in sorted(ours):
        (_, a), (_, b) = ours[title], theirs[title]
        if a["class_type"] != b["class_type"]:
            diffs.append(f"{title}: {a['class_type']} shipped, {b['class_type']} exported")
            continue
        na, nb = normalised(a, "api"), normalised(b, "exported")
        if na != nb:
            keys = sorted(set(na) | set(nb))
            diffs.append(f"{title}: " + "; ".join(f"{k}: {na.get(k, '<absent>')!r} shipped, {nb.get(k, '<absent>')!r} "
                                                  f"exported" for k in keys if na.get(k) != nb.get(k)))
    return diffs


def as_exported(value):
    """A widget value as the page's export can hold it: JavaScript has one number type (1 and 1.0 are one
    value), but true is not 1."""
    if isinstance(value, bool):
        return ("boolean", value)
    if isinstance(value, (int, float)):
        return float(value)
    return value


def by_type(graph: dict, class_type: str) -> dict:
    return next(n for n in graph.values() if n["class_type"] == class_type)


def swap_positive_negative(graph):
    sample = by_type(graph, "SamplerCustom")["inputs"]
    sample["positive"], sample["negative"] = sample["negative"], sample["positive"]


# Ways an export can drift from the shipped API file; export_differences must report each.
EXPORT_DRIFTS = {
    "prompt edited": lambda g: by_type(g, "SubjectConditioning")["inputs"].update(prompt="on a beach"),
    "seed changed": lambda g: by_type(g, "SamplerCustom")["inputs"].update(noise_seed=1),
    "true exported as 1": lambda g: by_type(g, "BlipPNDMSampler")["inputs"].update(full_denoise=1),
    "positive and negative swapped": swap_positive_negative,
    "title changed": lambda g: by_type(g, "CLIPTextEncode")["_meta"].update(title="Positive prompt"),
    "node removed": lambda g: g.pop(next(k for k, n in g.items() if n["class_type"] == "BlipPNDMSampler")),
}


@pytest.mark.parametrize("drift", list(EXPORT_DRIFTS))
def test_export_comparison_reports_drift(drift):
    shipped = api_for_test("zero_shot")
    exported = make_ui_workflows.numbered(shipped)  # the page's ids are numbers
    for node in exported.values():
        node["inputs"] = {k: int(v) if type(v) is float and v.is_integer() else v for k, v in node["inputs"].items()}
    assert export_differences(exported, shipped) == []  # 7.5 stays 7.5, 1.0 comes back as 1
    changed = copy.deepcopy(exported)
    EXPORT_DRIFTS[drift](changed)
    assert export_differences(changed, shipped), f"not reported: {drift}"


def api_for_test(name: str) -> dict:
    return for_test(load("api", name))


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


def newest_frontend_version() -> str:
    """The newest frontend's version, as scripts/setup_browser.sh pins and provisions it."""
    m = re.search(r'NEWEST_FRONTEND="\$\{BLIP_NEWEST_FRONTEND:-([0-9.]+)\}"',
                  (ROOT / "scripts" / "setup_browser.sh").read_text())
    return os.environ.get("BLIP_NEWEST_FRONTEND") or m.group(1)


def test_ui_workflows_are_what_the_frontend_saves(comfy_server):
    """Each shipped UI twin is what the pinned frontend saves after loading its API file with its own
    loader (scripts/make_ui_workflows.py), up to our layout: the frontend is the authority on widget
    order, upload and control widgets, sockets and links; a changed API file or frontend shows here."""
    problem = browser_problem()
    if problem:
        pytest.fail(f"the browser test cannot run: {problem}; {SETUP_HINT}")
    saved = make_ui_workflows.ui_workflows(comfy_server.url, API_NAMES)
    assert sorted(saved) == UI_NAMES
    stale = {}
    for name, wf in saved.items():
        want, have = make_ui_workflows.without_layout(wf), make_ui_workflows.without_layout(load("ui", name))
        if want != have:
            stale[name] = first_difference(have, want)
    assert not stale, ("UI twins that are not the frontend's save of their API file "
                       "(run scripts/make_ui_workflows.py):\n" + "\n".join(f"{k}: {v}" for k, v in stale.items()))
    # the comparison sees a widget value, a link and a socket that differ
    zero = make_ui_workflows.without_layout(saved["zero_shot"])
    for change in (set_widget("SamplerCustom", 1, 12345), unlink("SamplerCustom", "model"),
                   lambda wf: node_of(wf, "SubjectEncode")["inputs"].pop()):
        assert first_difference(broken(zero, change), zero) is not None


def first_difference(have, want, where="") -> str | None:
    """Where two JSON values first differ, as a path, or None."""
    if isinstance(have, dict) and isinstance(want, dict):
        for key in sorted(set(have) | set(want)):
            if key not in have or key not in want:
                return f"{where}.{key}: {'missing' if key not in have else 'extra'} in the shipped file"
            found = first_difference(have[key], want[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(have, list) and isinstance(want, list):
        if len(have) != len(want):
            return f"{where}: {len(have)} entries shipped, the frontend saves {len(want)}"
        return next((d for i, (a, b) in enumerate(zip(have, want)) if (d := first_difference(a, b, f"{where}[{i}]"))),
                    None)
    if type(have) is not type(want) or have != want:
        return f"{where}: {have!r} shipped, the frontend saves {want!r}"
    return None


@pytest.fixture(scope="module", params=["pinned", "newest"])
def frontend_server(request, comfy_server):
    """The session host with the frontend it pins (1.32.x), or a second host on the same folders serving
    the newest comfyui-frontend-package through --front-end-root."""
    if request.param == "pinned":
        yield comfy_server
        return
    from blip_diffusion.api.server import ComfyServer

    version = newest_frontend_version()
    static = CACHE / f"frontend-{version}" / "comfyui_frontend_package" / "static"
    if not (static / "index.html").exists():
        pytest.fail(f"frontend {version} is not provisioned at {static}: {SETUP_HINT}")
    server = ComfyServer(comfy_server.base_dir, [*comfy_server.extra_args, "--front-end-root", str(static)],
                         log_name="server-newest-frontend.log")
    server.start()
    yield server
    server.stop()


def test_frontend_loads_queues_and_shows_every_ui_workflow(frontend_server, comfy_server, api, object_info,
                                                           tmp_path):
    from blip_diffusion.api.client import ComfyClient

    pinned = frontend_server is comfy_server
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
        for node in graph.values():
            if node["class_type"] == "LoadImage":  # the page lists the input folder: the pack filled it
                input_image(comfy_server, node["inputs"]["image"])
        wf = load("ui", name)
        types = {n["id"]: n["type"] for n in wf["nodes"]}
        workflows.append({
            "name": name,
            "file": str(UI_DIR / f"{name}.json"),  # the shipped file as it is; the test's settings are typed in
            "settings": settings_for_test(name),
            "pack_types": sorted({n["type"] for n in wf["nodes"]} & pack),
            "savers": [n["id"] for n in wf["nodes"] if n["type"] == "SaveImage"],
            "loss_plots": [str(link[3]) for link in wf["links"]  # SaveImage nodes fed by BlipFinetune
                           if types[link[1]] == "BlipFinetune" and types[link[3]] == "SaveImage"],
            "run": (name in NEWEST_RUNS) != pinned,
        })
    assert all(w["pack_types"] for w in workflows), "a UI workflow without pack nodes?"

    # Broken copies of zero_shot, dropped after the real runs: each must be reported.
    mistakes = []
    for index, (mistake, change) in enumerate(UI_MISTAKES.items()):
        path = dropped / f"broken_{index}.json"
        path.write_text(json.dumps(broken(load("ui", "zero_shot"), change)))
        mistakes.append({"name": mistake, "file": str(path), "pack_types": [], "savers": []})

    shots = [{"file": str(UI_DIR / f"{name}.json"), "out": str(tmp_path / shot.name), "label": name,
              "width": SCREENSHOT_SIZE[0], "height": SCREENSHOT_SIZE[1]} for name, shot in SCREENSHOTS.items()]
    update = pinned and os.environ.get("BLIP_UPDATE_SCREENSHOT") == "1"
    if not pinned:
        shots = []  # the README's pictures and the thumbnails show the frontend the host pins
    if update:  # the template thumbnails are the same pictures of every shipped workflow
        shots += [{"file": str(UI_DIR / f"{name}.json"), "out": str(tmp_path / f"thumb_{name}.png"), "label": name,
                   "width": SCREENSHOT_SIZE[0], "height": SCREENSHOT_SIZE[1]} for name in UI_NAMES]
    shipped_template = load("ui", TEMPLATE)
    template = {
        "module": PACK_DIR_NAME, "names": UI_NAMES, "name": TEMPLATE, "file": str(UI_DIR / f"{TEMPLATE}.json"),
        "pack_types": sorted({n["type"] for n in shipped_template["nodes"]} & pack),
        "savers": [n["id"] for n in shipped_template["nodes"] if n["type"] == "SaveImage"],
        "settings": settings_for_test(TEMPLATE),
        "check_thumbnails": not update,  # an update run makes them; the next run checks them
    }
    assert template["settings"], "the template test changes no widget: for_test and the template disagree"
    manifest = {
        "url": frontend_server.url,
        "viewport": {"width": SCREENSHOT_SIZE[0], "height": SCREENSHOT_SIZE[1]},
        "chromium": CHROMIUM,
        "workflows": workflows,
        "broken": mistakes,
        "screenshots": shots,
        "template": template,
        "results": str(tmp_path / "results.json"),
        "profile": str(tmp_path / "chromium-profile"),
        "timeout_ms": 300_000,
    }
    results = run_driver(manifest, tmp_path, timeout=900)

    # The page's own prompts, read back from the host: each finished with one 64x64 image per SaveImage.
    client = ComfyClient(frontend_server.url)
    results["workflows"][f"{TEMPLATE} (template)"] = results["template"]
    for wf in [*[w for w in workflows if w["run"]], dict(template, name=f"{TEMPLATE} (template)")]:
        got = results["workflows"].get(wf["name"])
        assert got and got.get("prompt_id"), f"{wf['name']}: the driver reported no prompt: {got}"
        entry = client.history(got["prompt_id"]).get(got["prompt_id"])
        assert entry and entry["status"].get("status_str") == "success", f"{wf['name']}: {entry and entry['status']}"
        for saver in wf["savers"]:
            images = entry["outputs"].get(str(saver), {}).get("images", [])
            assert len(images) == 1, f"{wf['name']}: SaveImage {saver} gave {images}"
            assert images[0]["filename"] in got["shown"][str(saver)], \
                f"{wf['name']}: the page shows {got['shown'][str(saver)]}, the host saved {images[0]['filename']}"
            img = np.asarray(Image.open(io.BytesIO(client.view(images[0]))))
            assert img.std() > 0 and img.ndim == 3
            if wf.get("loss_plots") is None or str(saver) not in wf["loss_plots"]:  # a loss plot has its own size
                assert img.shape == (SIZE, SIZE, 3)

    # Export (API) of each dropped UI twin is its shipped API file (adjusted alike): the two cannot drift.
    drift = {wf["name"]: d for wf in workflows
             if (d := export_differences(results["workflows"][wf["name"]]["exported"], api_for_test(wf["name"])))}
    assert not drift, "the frontend's API export differs from the shipped API twin:\n" + "\n".join(
        f"{name}:\n  " + "\n  ".join(d) for name, d in drift.items())

    not_reported = [m["name"] for m in mistakes if not results["broken"].get(m["name"])
                    and (pinned or m["name"] not in NEWEST_LOADS_QUIETLY)]
    assert not not_reported, f"the page loaded these broken workflows without a complaint: {not_reported}"

    for shot in SCREENSHOTS.values() if pinned else []:
        with Image.open(tmp_path / shot.name) as im:
            assert im.size == SCREENSHOT_SIZE
            assert np.asarray(im.convert("L")).std() > 5, f"the screenshot {shot.name} is blank"
        if update:
            shot.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / shot.name, shot)
    if update:
        for name in UI_NAMES:
            thumbnail(tmp_path / f"thumb_{name}.png", UI_DIR / f"{name}.jpg")


@pytest.mark.parametrize("name", UI_NAMES)
def test_every_template_has_its_thumbnail(name):
    thumb = UI_DIR / f"{name}.jpg"
    assert thumb.exists(), f"{thumb} is missing: BLIP_UPDATE_SCREENSHOT=1 bash scripts/test.sh tests/test_frontend.py"
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.size == THUMBNAIL_SIZE
        assert np.asarray(im.convert("L")).std() > 5, f"{thumb} is blank"


@pytest.mark.parametrize("name", sorted(SCREENSHOTS))
def test_readme_screenshot_is_there(name):
    shot = SCREENSHOTS[name]
    assert shot.exists(), f"{shot} is missing: BLIP_UPDATE_SCREENSHOT=1 bash scripts/test.sh tests/test_frontend.py"
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == SCREENSHOT_SIZE
    assert f"docs/images/{shot.name}" in (ROOT / "README.md").read_text(), "the README does not show it"
