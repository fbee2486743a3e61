"""The shipped workflows: every API workflow has a drag-and-drop (UI-format) twin that the host's
frontend would build the same way, both describe the same graph, together they use every node of
the pack, and each API workflow runs to an image on the generated weights.

The frontend rules checked here (ComfyUI frontend 1.32, as its saved templates show): inputs are
visited in /object_info's ``input_order`` (required, optional, then inputs the frontend adds); an
INT/FLOAT/STRING/BOOLEAN/COMBO input without ``forceInput`` is a widget, anything else a socket;
an INT widget with ``control_after_generate`` (or, when that flag is absent, named seed or
noise_seed) is followed by a "control after generate" value in ``widgets_values``, a COMBO with
the flag by that value and a filter list; a required combo with ``image_upload`` gets an
``upload`` widget saved as "image" (LoadImage saves ``[file, "image"]``).
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

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
INT_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
COMBO_CONTROL_VALUES = INT_CONTROL_VALUES | {"increment-wrap"}
UI_KEYS = {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"}
NODE_KEYS = {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
             "widgets_values"}

# Combos whose file is made by another shipped workflow during the run: only their type is checked.
# Every other combo must hold one of its options: the session host has the generated weights under the
# released names the workflows use (tests/conftest.py's released_names) and the pack's sample photos.
FILE_COMBOS = {
    ("LoadSubject", "subject_name"): None,  # made by a SaveSubject workflow first
    ("LoadBlipFinetune", "finetune_name"): None,  # made by the finetune workflow first
}
SIZE, STEPS = 64, 2


# -- the frontend's view of a node definition ---------------------------------------------------
def spec_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def spec_opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_options(spec) -> list:
    return spec[0] if isinstance(spec[0], list) else spec_opts(spec).get("options", [])


def frontend_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) in the order the frontend creates slots and widgets."""
    req = info.get("input", {}).get("required", {})
    opt = info.get("input", {}).get("optional", {})
    order = info.get("input_order", {})
    out = [(n, req[n], False) for n in order.get("required", []) if n in req]
    out += [(n, opt[n], True) for n in order.get("optional", []) if n in opt]
    named = {n for n, _, _ in out}
    out += [(n, s, False) for n, s in req.items() if n not in named]
    out += [(n, s, True) for n, s in opt.items() if n not in named]
    for n, s in req.items():
        if spec_type(s) == "COMBO" and any(spec_opts(s).get(f) is True for f in UPLOAD_FLAGS):
            out.append(("upload", ["IMAGEUPLOAD", {"imageInputName": n}], False))
            break
    return out


def is_widget(spec) -> bool:
    return spec_type(spec) in WIDGET_TYPES and not spec_opts(spec).get("forceInput")


def frontend_widgets(info: dict) -> list[tuple[str, list, str]]:
    """(input name, spec, role) for every entry of widgets_values; role is value, control, filter or upload."""
    out = []
    for name, spec, _ in frontend_inputs(info):
        if spec_type(spec) == "IMAGEUPLOAD":
            out.append((name, spec, "upload"))
        elif is_widget(spec):
            out.append((name, spec, "value"))
            flag = spec_opts(spec).get("control_after_generate")
            if spec_type(spec) == "INT" and (flag if flag is not None else name in ("seed", "noise_seed")):
                out.append((name, spec, "control"))
            elif spec_type(spec) == "COMBO" and flag:
                out += [(name, spec, "control"), (name, spec, "filter")]
    return out


def frontend_sockets(info: dict) -> list[tuple[str, list, bool]]:
    return [(n, s, o) for n, s, o in frontend_inputs(info) if spec_type(s) != "IMAGEUPLOAD" and not is_widget(s)]


def widget_value_problem(node_type: str, name: str, spec, role: str, value) -> str | None:
    t = spec_type(spec)
    if role == "upload":
        return None if value == "image" else f"upload widget must be saved as 'image', got {value!r}"
    if role == "control":
        allowed = INT_CONTROL_VALUES if t == "INT" else COMBO_CONTROL_VALUES
        return None if value in allowed else f"control_after_generate value {value!r} not in {sorted(allowed)}"
    if role == "filter":
        return None if isinstance(value, str) else f"control filter list must be a string, got {value!r}"
    opts = spec_opts(spec)
    if t == "INT" or t == "FLOAT":
        numeric = (int,) if t == "INT" else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            return f"{t} widget holds {value!r}"
        if value < opts.get("min", float("-inf")) or value > opts.get("max", float("inf")):
            return f"{value!r} outside [{opts.get('min')}, {opts.get('max')}]"
        return None
    if t == "BOOLEAN":
        return None if isinstance(value, bool) else f"BOOLEAN widget holds {value!r}"
    if t == "STRING":
        return None if isinstance(value, str) else f"STRING widget holds {value!r}"
    if t == "COMBO":
        if not isinstance(value, str):
            return f"COMBO widget holds {value!r}"
        if (node_type, name) in FILE_COMBOS:
            return None
        options = combo_options(spec)
        return None if value in options else f"{value!r} is not one of {options}"
    return f"unexpected widget type {t}"


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
# What a shipped workflow may name (the UI twins equal the API files, see test_ui_twin_...):
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


def ui_problems(wf: dict, object_info: dict) -> list[str]:
    """Everything in a UI workflow that the host's frontend would not have saved or could not run."""
    if not UI_KEYS <= set(wf):
        return [f"missing top-level keys {sorted(UI_KEYS - set(wf))}"]
    problems = [] if wf["version"] == 0.4 else [f"version {wf['version']}, not 0.4"]
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {link[0]: link for link in wf["links"]}
    if len(nodes) != len(wf["nodes"]) or not all(isinstance(i, int) for i in nodes):
        problems.append("node ids must be unique integers")
    if len(links) != len(wf["links"]):
        problems.append("duplicate link ids")
    if wf["last_node_id"] < max(nodes, default=0) or wf["last_link_id"] < max(links, default=0):
        problems.append("last_node_id/last_link_id below the ids in use")
    for node in wf["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if NODE_KEYS - set(node):
            problems.append(f"{where}: missing keys {NODE_KEYS - set(node)}")
            continue
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"{where}: the host has no such node type")
            continue
        if node["properties"].get("Node name for S&R") != node["type"] or node["mode"] != 0:
            problems.append(f"{where}: properties/mode not as the frontend saves them")
        if not (len(node["pos"]) == 2 and len(node["size"]) == 2 and node["size"][0] > 0 and node["size"][1] > 0):
            problems.append(f"{where}: bad pos/size")

        widgets, values = frontend_widgets(info), node["widgets_values"]
        if len(values) != len(widgets):
            problems.append(f"{where}: {len(values)} widgets_values {values}, the frontend has "
                            f"{len(widgets)} widgets {[(n, r) for n, _, r in widgets]}")
        else:
            for (wname, spec, role), value in zip(widgets, values):
                problem = widget_value_problem(node["type"], wname, spec, role, value)
                if problem:
                    problems.append(f"{where} widget {wname} ({role}): {problem}")

        sockets = frontend_sockets(info)
        socket_slots = [i for i in node["inputs"] if "widget" not in i]
        if [i["name"] for i in socket_slots] != [n for n, _, _ in sockets]:
            problems.append(f"{where}: socket inputs {[i['name'] for i in socket_slots]}, the frontend makes "
                            f"{[n for n, _, _ in sockets]}")
        for slot, (sname, spec, optional) in zip(socket_slots, sockets):
            if slot["type"] != spec_type(spec):
                problems.append(f"{where} input {sname}: type {slot['type']}, host says {spec_type(spec)}")
            if not optional and slot.get("link") is None:
                problems.append(f"{where}: required input {sname} is not linked")
            if optional != (slot.get("shape") == 7):
                problems.append(f"{where} input {sname}: optional sockets (only) are drawn hollow (shape 7)")
        widget_names = {n for n, _, r in widgets if r == "value"}
        for slot in node["inputs"]:
            if "widget" in slot and (slot["widget"].get("name") not in widget_names or slot.get("link") is None):
                problems.append(f"{where}: widget input {slot['name']} must be an existing widget and linked")

        expected_out = list(zip(info.get("output", []), info.get("output_name", [])))
        if [(o["type"], o["name"]) for o in node["outputs"]] != expected_out:
            problems.append(f"{where}: outputs {[(o['type'], o['name']) for o in node['outputs']]}, "
                            f"host says {expected_out}")

        for index, slot in enumerate(node["inputs"]):
            link = links.get(slot.get("link")) if slot.get("link") is not None else None
            if slot.get("link") is not None and (link is None or link[3:5] != [node["id"], index]):
                problems.append(f"{where} input {slot['name']}: link {slot.get('link')} does not end here")
        for index, out in enumerate(node["outputs"]):
            for link_id in out.get("links") or []:
                if link_id not in links or links[link_id][1:3] != [node["id"], index]:
                    problems.append(f"{where} output {index}: link {link_id} does not start here")

    for link_id, src, src_slot, dst, dst_slot, ltype in wf["links"]:
        where = f"link {link_id} ({src}:{src_slot} -> {dst}:{dst_slot})"
        if src not in nodes or dst not in nodes:
            problems.append(f"{where}: unknown node")
            continue
        a, b = nodes[src], nodes[dst]
        if src_slot >= len(a["outputs"]) or dst_slot >= len(b["inputs"]):
            problems.append(f"{where}: no such slot")
            continue
        out, inp = a["outputs"][src_slot], b["inputs"][dst_slot]
        if link_id not in (out.get("links") or []) or inp.get("link") != link_id:
            problems.append(f"{where}: not recorded on both ends")
        host_out = object_info.get(a["type"], {}).get("output", [])
        host_out = host_out[src_slot] if src_slot < len(host_out) else None
        host_in = dict((n, s) for n, s, _ in frontend_inputs(object_info.get(b["type"], {}))).get(inp["name"])
        host_in = spec_type(host_in) if host_in else None
        types = {ltype, out["type"], inp["type"], host_out, host_in} - {"*"}
        if len(types) != 1:
            problems.append(f"{where}: types do not match: link {ltype}, output {out['type']} (host {host_out}), "
                            f"input {inp['type']} (host {host_in})")
    return problems


@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_workflow_is_valid_for_the_host(name, object_info):
    problems = ui_problems(load("ui", name), object_info)
    assert not problems, f"{name}:\n" + "\n".join(problems)


# -- UI twin == API workflow ------------------------------------------------------------------------
def ui_as_api(wf: dict, object_info: dict) -> dict:
    """What the frontend would queue for this UI workflow: {id: (type, title, widget values, links)}."""
    links = {link[0]: link for link in wf["links"]}
    graph = {}
    for node in wf["nodes"]:
        info = object_info[node["type"]]
        widgets = {}
        for (name, _, role), value in zip(frontend_widgets(info), node["widgets_values"]):
            if role == "value":
                widgets[name] = value
        linked = {}
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                link = links[slot["link"]]
                linked[slot["name"]] = (link[1], link[2])
                widgets.pop(slot["name"], None)  # a linked widget sends its link, not its value
        title = node.get("title", info.get("display_name") or node["type"])
        graph[node["id"]] = (node["type"], title, widgets, linked)
    return graph


def api_normalised(api: dict, object_info: dict) -> dict:
    """The API workflow as {key: (type, title, widget values, links)}; absent widgets take their default,
    as the frontend would show them."""
    graph = {}
    for key, node in api.items():
        info = object_info[node["class_type"]]
        widgets, linked = {}, {}
        for name, spec, _ in frontend_inputs(info):
            if spec_type(spec) == "IMAGEUPLOAD":
                continue
            value = node["inputs"].get(name)
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                linked[name] = (value[0], value[1])
            elif is_widget(spec):
                widgets[name] = value if name in node["inputs"] else spec_opts(spec).get("default")
        unknown = set(node["inputs"]) - {n for n, _, _ in frontend_inputs(info)}
        assert not unknown, f"API node {key} ({node['class_type']}) has inputs the host does not know: {unknown}"
        title = node.get("_meta", {}).get("title") or info.get("display_name") or node["class_type"]
        graph[key] = (node["class_type"], title, widgets, linked)
    return graph


def same_values(a: dict, b: dict) -> bool:
    """Equal widget values of the same JSON type (true is not 1, 1 is not 1.0)."""
    return a.keys() == b.keys() and all(type(a[k]) is type(b[k]) and a[k] == b[k] for k in a)


def match_graphs(api: dict, ui: dict) -> dict | None:
    """A one-to-one map API key -> UI id under which both graphs are identical, or None."""
    if len(api) != len(ui):
        return None
    order, seen = [], set()

    def visit(k):  # sources first, so links are checked as soon as both ends are mapped
        if k not in seen:
            seen.add(k)
            for src, _ in api[k][3].values():
                visit(src)
            order.append(k)

    for k in api:
        visit(k)

    def fits(k, u, mapping):
        t, title, widgets, linked = api[k]
        ut, utitle, uwidgets, ulinked = ui[u]
        if (t, title) != (ut, utitle) or not same_values(widgets, uwidgets) or linked.keys() != ulinked.keys():
            return False
        return all(ulinked[n] == (mapping[src], slot) for n, (src, slot) in linked.items())

    def search(i, mapping, used):
        if i == len(order):
            return dict(mapping)
        k = order[i]
        for u in ui:
            if u not in used and fits(k, u, mapping):
                mapping[k] = u
                used.add(u)
                found = search(i + 1, mapping, used)
                if found:
                    return found
                del mapping[k]
                used.discard(u)
        return None

    return search(0, {}, set())


@pytest.mark.parametrize("name", API_NAMES)
def test_ui_twin_describes_the_same_graph_as_the_api_workflow(name, object_info):
    if name not in UI_NAMES:
        pytest.fail(f"example_workflows/{name}.json is missing: run scripts/make_ui_workflows.py")
    api = api_normalised(load("api", name), object_info)
    ui = ui_as_api(load("ui", name), object_info)
    mapping = match_graphs(api, ui)
    if mapping is None:
        def signature(n):
            return json.dumps([n[0], n[1], n[2]], sort_keys=True)
        only_api = sorted({signature(n) for n in api.values()} - {signature(n) for n in ui.values()})
        only_ui = sorted({signature(n) for n in ui.values()} - {signature(n) for n in api.values()})
        pytest.fail(f"{name}: the UI workflow drifted from the API one (regenerate with "
                    f"scripts/make_ui_workflows.py).\nnodes only in API: {only_api}\nnodes only in UI: {only_ui}\n"
                    + ("" if only_api or only_ui else "the nodes agree; their links differ"))


# -- the checks above can fail --------------------------------------------------------------------
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


@pytest.mark.parametrize("mistake", list(UI_MISTAKES))
def test_ui_check_reports_a_broken_workflow(mistake, object_info):
    wf = load("ui", "zero_shot")
    assert not ui_problems(wf, object_info)
    assert ui_problems(broken(wf, UI_MISTAKES[mistake]), object_info), f"not caught: {mistake}"


def swap_positive_negative(wf):
    inputs = {i["name"]: i for i in node_of(wf, "SamplerCustom")["inputs"]}
    links = {link[0]: link for link in wf["links"]}
    pos, neg = links[inputs["positive"]["link"]], links[inputs["negative"]["link"]]
    pos[1:3], neg[1:3] = neg[1:3], pos[1:3]


TWIN_DRIFTS = {
    "prompt edited": set_widget("SubjectConditioning", 0, "on a beach"),
    "seed changed": set_widget("SamplerCustom", 1, 1),
    "true saved as 1": set_widget("BlipPNDMSampler", 0, 1),
    "positive and negative swapped": swap_positive_negative,
    "title changed": lambda wf: node_of(wf, "CLIPTextEncode").update(title="Positive prompt"),
    "node removed": lambda wf: wf["nodes"].remove(node_of(wf, "BlipPNDMSampler")),
}


@pytest.mark.parametrize("drift", list(TWIN_DRIFTS))
def test_twin_check_reports_drift(drift, object_info):
    api = api_normalised(load("api", "zero_shot"), object_info)
    wf = load("ui", "zero_shot")
    assert match_graphs(api, ui_as_api(wf, object_info)) is not None
    assert match_graphs(api, ui_as_api(broken(wf, TWIN_DRIFTS[drift]), object_info)) is None, f"not caught: {drift}"


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
