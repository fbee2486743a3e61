"""Write the drag-and-drop (UI-format) twin of every API workflow in workflows/api/.

The ComfyUI frontend opens two kinds of JSON: the API format (``{id: {class_type, inputs}}``,
what scripts POST to /prompt) and its own saved "workflow" format (a LiteGraph graph: nodes
with positions, sockets, ``widgets_values`` and a ``links`` table). Only the second can be
dragged onto the canvas as an editable graph, so each shipped API workflow gets a UI twin in
example_workflows/<name>.json.

How inputs map to widgets is taken from a live host's /object_info, following what the
frontend (1.32) does when it builds a node and saves it:

* inputs are visited in ``input_order`` (required, then optional, then anything the frontend
  added, e.g. LoadImage's ``upload``); INT/FLOAT/STRING/BOOLEAN/COMBO inputs without
  ``forceInput`` are widgets, everything else is a socket;
* an INT widget with ``control_after_generate`` (or, when the flag is absent, named ``seed`` or
  ``noise_seed``) is followed by the "control after generate" combo, whose value is saved in
  ``widgets_values`` too: we write "fixed" so the shipped seed stays as published; a COMBO with
  ``control_after_generate`` gets that combo and a filter-list string;
* a required combo with ``image_upload``/``video_upload``/``animated_image_upload`` gets an
  ``upload`` button widget, saved as the value "image" (LoadImage saves ``[file, "image"]``);
* only sockets appear in a node's ``inputs`` (plus widget inputs that are linked, carrying
  ``widget: {name}``); optional sockets have ``shape: 7``.

Nodes are laid out left to right by graph depth (each node as far right as its consumers
allow, so sources sit next to what they feed) and stacked in columns.

Usage::

    .cache/host-venv/bin/python scripts/make_ui_workflows.py            # starts a host itself
    .cache/host-venv/bin/python scripts/make_ui_workflows.py --url http://127.0.0.1:8188
    .cache/host-venv/bin/python scripts/make_ui_workflows.py --check    # exit 1 if a file would change
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
API_DIR = ROOT / "workflows" / "api"
UI_DIR = ROOT / "example_workflows"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
CONTROL_VALUE = "fixed"  # the frontend's default is "randomize"; shipped seeds should reproduce
OPTIONAL_SHAPE = 7  # LiteGraph's RenderShape.HollowCircle, the frontend's mark for optional sockets
WORKFLOW_NAMESPACE = uuid.UUID("5d3c1f0e-2b1a-4c61-9a57-b11bd1ff0510")


# -- what the frontend builds from /object_info -----------------------------------------------
def spec_type(spec) -> str:
    t = spec[0]
    return "COMBO" if isinstance(t, list) else t


def spec_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec) -> bool:
    return spec_type(spec) in WIDGET_TYPES and not spec_options(spec).get("forceInput")


def ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) in the frontend's order, including the upload widget it adds."""
    required = dict(info.get("input", {}).get("required", {}))
    optional = dict(info.get("input", {}).get("optional", {}))
    upload = next((name for name, spec in required.items()
                   if spec_type(spec) == "COMBO" and any(spec_options(spec).get(f) is True for f in UPLOAD_FLAGS)),
                  None)
    order = info.get("input_order") or {"required": list(required), "optional": list(optional)}
    out = [(n, required[n], False) for n in order.get("required", []) if n in required]
    out += [(n, optional[n], True) for n in order.get("optional", []) if n in optional]
    seen = {n for n, _, _ in out}
    out += [(n, s, False) for n, s in required.items() if n not in seen]
    out += [(n, s, True) for n, s in optional.items() if n not in seen]
    if upload is not None:
        out.append(("upload", ["IMAGEUPLOAD", {"imageInputName": upload}], False))
    return out


def control_widget_count(name: str, spec) -> int:
    """Extra widgets the frontend puts right after this widget (0, 1 or 2)."""
    flag = spec_options(spec).get("control_after_generate")
    if spec_type(spec) == "INT":
        return 1 if (flag if flag is not None else name in SEED_NAMES) else 0
    if spec_type(spec) == "COMBO" and flag:
        return 2  # the control combo and its filter list
    return 0


def default_value(spec):
    opts = spec_options(spec)
    if "default" in opts:
        return opts["default"]
    if spec_type(spec) == "COMBO":
        values = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        return values[0] if values else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec_type(spec)]


# -- conversion -----------------------------------------------------------------------------
def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def node_size(info: dict, n_sockets: int, n_widgets: int, multiline: int, class_type: str,
              title: str) -> list[float]:
    width = max(400 if multiline else 320, min(600, 8 * len(title) + 40))  # room for the title
    slots = max(n_sockets, len(info.get("output", [])))
    height = 8 + 22 * slots + 26 * n_widgets + 90 * multiline
    if class_type == "LoadImage":
        height = max(height, 320)  # the image preview
    takes_images = "IMAGE" in [spec_type(s) for s in info.get("input", {}).get("required", {}).values()]
    if info.get("output_node") and takes_images:
        width, height = max(width, 360), max(height, 300)  # image previews
    return [width, height]


SLOT_HEIGHT = 20


def layout(ids: list[str], edges: list[tuple[str, int, str, int]],
           sizes: dict[str, list[float]]) -> dict[str, list[float]]:
    """Columns by depth (as late as consumers allow), stacked to follow their neighbours.

    ``edges`` are (source, output slot, target, input slot). Within a column, nodes are sorted by
    where their links attach on the neighbouring columns (sweeps from the right), so e.g. the nodes
    feeding a sampler line up in the order of its input sockets.
    """
    preds = {i: [] for i in ids}
    succs = {i: [] for i in ids}
    for src, out_slot, dst, in_slot in edges:
        preds[dst].append((src, out_slot))
        succs[src].append((dst, in_slot))
    depth: dict[str, int] = {}

    def longest(i):
        if i not in depth:
            depth[i] = 1 + max((longest(p) for p, _ in preds[i]), default=-1)
        return depth[i]

    for i in ids:
        longest(i)
    for i in sorted(ids, key=lambda k: -depth[k]):  # pull each node right, next to its nearest consumer
        if succs[i]:
            depth[i] = min(depth[s] for s, _ in succs[i]) - 1

    columns: dict[int, list[str]] = {}
    for i in ids:
        columns.setdefault(depth[i], []).append(i)
    xs, x = {}, 0.0
    for c in sorted(columns):
        xs[c] = x
        x += max(sizes[i][0] for i in columns[c]) + 80

    ys: dict[str, float] = {}

    def stack(col: list[str], key) -> None:
        y = 0.0
        for i in sorted(col, key=key):
            ys[i] = y
            y += sizes[i][1] + 80  # the title bar (30) sits above pos

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else None

    order = {i: n for n, i in enumerate(ids)}

    def attach(i, slot):  # y of a link's end on node i (slots are drawn from its top, widgets below)
        return ys[i] + (slot + 0.5) * SLOT_HEIGHT

    for c in sorted(columns):  # first placement: follow the sources, left to right
        stack(columns[c], lambda i: (mean(attach(p, s) for p, s in preds[i] if p in ys) or 0.0, order[i]))
    for _ in range(3):  # then right to left: each node follows where its links land on its consumers
        for c in sorted(columns, reverse=True):
            def key(i):
                m = mean(attach(t, s) for t, s in succs[i]) if succs[i] else mean(attach(p, s) for p, s in preds[i])
                return (m if m is not None else ys[i], order[i])
            stack(columns[c], key)
    return {i: [round(xs[depth[i]]), round(ys[i])] for i in ids}


def execution_order(ids: list[str], api: dict) -> dict[str, int]:
    done, out = set(), []

    def visit(i):
        if i in done:
            return
        done.add(i)
        for v in api[i]["inputs"].values():
            if is_link(v):
                visit(v[0])
        out.append(i)

    for i in sorted(ids, key=lambda k: (any(is_link(v) for v in api[k]["inputs"].values()), ids.index(k))):
        visit(i)
    return {i: n for n, i in enumerate(out)}


def convert(api: dict, object_info: dict, name: str = "workflow") -> dict:
    """The UI-format workflow for an API-format one (node ids 1..N in the file's order)."""
    ids = list(api)
    num = {k: n + 1 for n, k in enumerate(ids)}
    for k in ids:
        if api[k]["class_type"] not in object_info:
            raise KeyError(f"node '{k}': the host has no node type {api[k]['class_type']!r}")
        for inp, v in api[k]["inputs"].items():
            if is_link(v) and v[0] not in api:
                raise KeyError(f"node '{k}' input {inp} links to missing node '{v[0]}'")

    nodes, links, sizes = {}, [], {}
    out_links: dict[tuple[str, int], list[int]] = {}
    pending = []  # (node id, input index, link) to fill once link ids are known
    for k in ids:
        ct, given = api[k]["class_type"], api[k]["inputs"]
        info = object_info[ct]
        known = {n for n, _, _ in ordered_inputs(info)}
        unknown = set(given) - known
        if unknown:
            raise KeyError(f"node '{k}' ({ct}) has inputs the host does not know: {sorted(unknown)}")
        inputs, widgets, multiline = [], [], 0
        for inp, spec, optional in ordered_inputs(info):
            value = given.get(inp)
            if inp == "upload" and spec_type(spec) == "IMAGEUPLOAD":
                widgets.append("image")
                continue
            if is_widget(spec):
                if is_link(value):  # a widget driven by a link keeps its widget and gains a socket
                    inputs.append({"name": inp, "type": spec_type(spec), "widget": {"name": inp}, "link": None})
                    pending.append((k, len(inputs) - 1, value))
                    value = default_value(spec)
                elif inp not in given:
                    value = default_value(spec)
                widgets.append(value)
                widgets += [CONTROL_VALUE, ""][:control_widget_count(inp, spec)]
                multiline += bool(spec_type(spec) == "STRING" and spec_options(spec).get("multiline"))
            else:
                slot = {"name": inp, "type": spec_type(spec), "link": None}
                if optional:
                    slot["shape"] = OPTIONAL_SHAPE
                if value is None and optional:
                    inputs.append(slot)
                    continue
                if not is_link(value):
                    raise ValueError(f"node '{k}' ({ct}): socket input {inp} must be linked, got {value!r}")
                inputs.append(slot)
                pending.append((k, len(inputs) - 1, value))
        outputs = [{"name": oname, "type": otype, "links": None, "slot_index": n}
                   for n, (otype, oname) in enumerate(zip(info.get("output", []),
                                                          info.get("output_name", info.get("output", []))))]
        title = api[k].get("_meta", {}).get("title") or (info.get("display_name") or ct)
        sizes[k] = node_size(info, sum(1 for i in inputs if "widget" not in i), len(widgets), multiline, ct, title)
        node = {"id": num[k], "type": ct, "pos": None, "size": sizes[k], "flags": {}, "order": None, "mode": 0,
                "inputs": inputs, "outputs": outputs}
        if title != (info.get("display_name") or ct):
            node["title"] = title  # the frontend saves a title only when it differs from the display name
        node["properties"] = {"Node name for S&R": ct}
        node["widgets_values"] = widgets
        nodes[k] = node

    for k, index, (src, slot) in pending:
        src_outputs = nodes[src]["outputs"]
        if slot >= len(src_outputs):
            raise ValueError(f"node '{k}' links to output {slot} of '{src}', which has {len(src_outputs)} outputs")
        link_id = len(links) + 1
        link_type = src_outputs[slot]["type"]
        links.append([link_id, num[src], slot, num[k], index, link_type])
        nodes[k]["inputs"][index]["link"] = link_id
        out_links.setdefault((src, slot), []).append(link_id)
    for (src, slot), ids_ in out_links.items():
        nodes[src]["outputs"][slot]["links"] = ids_

    edges = [(src, slot, k, index) for k, index, (src, slot) in pending]
    positions = layout(ids, edges, sizes)
    order = execution_order(ids, api)
    for k in ids:
        nodes[k]["pos"] = positions[k]
        nodes[k]["order"] = order[k]
    return {
        "id": str(uuid.uuid5(WORKFLOW_NAMESPACE, name)),
        "revision": 0,
        "last_node_id": len(ids),
        "last_link_id": len(links),
        "nodes": [nodes[k] for k in ids],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [60, 60]},
                  "blip_diffusion": {"api_workflow": f"workflows/api/{name}.json",
                                     "generator": "scripts/make_ui_workflows.py"}},
        "version": 0.4,
    }


def dump(workflow: dict) -> str:
    """Indented JSON with short lists (positions, sizes, links, widget values) kept on one line."""
    def compact(value, indent):
        pad, inner = " " * indent, " " * (indent + 2)
        flat = json.dumps(value, ensure_ascii=False)
        if isinstance(value, (dict, list)) and len(flat) + indent <= 110 and "\n" not in flat:
            return flat
        if isinstance(value, dict):
            items = [f"{inner}{json.dumps(k)}: {compact(v, indent + 2)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(value, list):
            return "[\n" + ",\n".join(inner + compact(v, indent + 2) for v in value) + "\n" + pad + "]"
        return json.dumps(value, ensure_ascii=False)
    return compact(workflow, 0) + "\n"


# -- a host to ask -------------------------------------------------------------------------------
def start_host(tmp: Path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from _pack import import_pack

    import_pack()
    from blip_diffusion.api.server import ComfyServer, make_base_dir

    models = ROOT / ".cache" / "models" / "blip-diffusion-test"
    base = make_base_dir(tmp, {"blip_diffusion": {models.name: models}} if models.is_dir() else None)
    return ComfyServer(base).start()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running ComfyUI host with this pack loaded (default: start one)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a UI file is missing or stale")
    ap.add_argument("names", nargs="*", help="workflow names (default: every file in workflows/api/)")
    args = ap.parse_args(argv)

    names = args.names or sorted(p.stem for p in API_DIR.glob("*.json"))
    server, tmp = None, None
    try:
        url = args.url
        if not url:
            tmp = tempfile.TemporaryDirectory(prefix="make-ui-workflows-")
            server = start_host(Path(tmp.name))
            url = server.url
        object_info = requests.get(url.rstrip("/") + "/object_info", timeout=60).json()
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()

    stale = []
    UI_DIR.mkdir(parents=True, exist_ok=True)
    for name in names:
        api = json.loads((API_DIR / f"{name}.json").read_text())
        text = dump(convert(api, object_info, name))
        out = UI_DIR / f"{name}.json"
        if args.check:
            if not out.exists() or out.read_text() != text:
                stale.append(name)
            continue
        out.write_text(text)
        print(f"wrote {out.relative_to(ROOT)} ({len(api)} nodes)")
    if stale:
        print("stale or missing UI workflows: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
