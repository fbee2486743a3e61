"""Write the drag-and-drop (UI-format) twin of every API workflow in workflows/api/, as the host's
own frontend saves it.

The ComfyUI frontend opens two kinds of JSON: the API format (``{id: {class_type, inputs}}``, what
scripts POST to /prompt) and its own saved "workflow" format (a LiteGraph graph: nodes with sizes,
sockets, ``widgets_values`` and a ``links`` table). Only the second opens as an editable graph from
the template browser, so each shipped API workflow gets a UI twin in example_workflows/<name>.json.

The frontend is the one authority on that format, which changes with its releases: the page a live
host serves loads each API workflow with its own loader (tests/browser/save_ui_workflows.mjs, in
Debian's headless Chromium), and its own serialisation is what is written. Ours are only:

* node ids 1..N in the API file's order (the page keeps the ids it is given);
* "control after generate" set to "fixed" on seed widgets, so a shipped seed reproduces;
* positions: a left-to-right layout by graph depth, each node as far right as its consumers allow,
  stacked in columns in the order of the sockets they feed; a node is widened to show its whole
  title (the page measures it), and nodes that show a picture (a loaded photo, Save/Preview Image)
  get room for it, as the page would grow them once the picture is there;
* the workflow's id (a uuid5 of its name; the page's API loader leaves a zero id) and
  ``extra.blip_diffusion`` naming the API twin.

Node sizes come from the page and depend on the browser's fonts, so ``--check`` (and the test that
runs it) compares everything but positions and sizes.

Usage (the browser set-up is ``bash scripts/setup_browser.sh``)::

    .cache/host-venv/bin/python scripts/make_ui_workflows.py            # starts a host itself
    .cache/host-venv/bin/python scripts/make_ui_workflows.py --url http://127.0.0.1:8188
    .cache/host-venv/bin/python scripts/make_ui_workflows.py --check    # exit 1 if a file is stale
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
API_DIR = ROOT / "workflows" / "api"
UI_DIR = ROOT / "example_workflows"
BROWSER_DIR = ROOT / "tests" / "browser"
SAVER = BROWSER_DIR / "save_ui_workflows.mjs"
CHROMIUM = os.environ.get("BLIP_CHROMIUM", "/usr/bin/chromium")
WORKFLOW_NAMESPACE = uuid.UUID("5d3c1f0e-2b1a-4c61-9a57-b11bd1ff0510")
VIEW_OFFSET = [60, 60]  # the top-left node's title bar stays in view when the file opens
GAP, SLOT_HEIGHT = 80, 20
TITLE_PADDING = 80  # the collapse dot before a title, room for the node's badges after it
PREVIEW_SIZE = 300  # room for an output preview (Save/Preview Image)
UPLOAD_PREVIEW = 212  # what LoadImage grows by once its photo has loaded (the page fetches none while saving)


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def numbered(api: dict) -> dict:
    """The API workflow with node ids "1".."N" in the file's order (links follow)."""
    num = {key: str(n + 1) for n, key in enumerate(api)}
    out = {}
    for key, node in api.items():
        for name, value in node["inputs"].items():
            if is_link(value) and value[0] not in num:
                raise KeyError(f"node '{key}' input {name} links to missing node '{value[0]}'")
        inputs = {name: [num[v[0]], v[1]] if is_link(v) else v for name, v in node["inputs"].items()}
        out[num[key]] = {**node, "inputs": inputs}
    return out


# -- the page's own save ----------------------------------------------------------------------------
def browser_problem() -> str | None:
    """Why the browser set-up (scripts/setup_browser.sh) cannot drive the page here, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM}"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "tests/browser/node_modules/playwright-core is missing"
    return None


def frontend_saves(url: str, apis: dict[str, dict], workdir: Path) -> dict[str, dict]:
    """{name: {"graph": the page's serialisation, "titles": {node id: title width in px}}} for each API
    workflow, loaded into the frontend at ``url``."""
    problem = browser_problem()
    if problem:
        raise SystemExit(f"no browser to save with ({problem}): run `bash scripts/setup_browser.sh`")
    manifest = {"url": url, "chromium": CHROMIUM, "out": str(workdir / "saved.json"),
                "workflows": [{"name": name, "api": numbered(api)} for name, api in apis.items()]}
    (workdir / "manifest.json").write_text(json.dumps(manifest))
    env = dict(os.environ, PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD="1")
    proc = subprocess.run(["node", str(SAVER), str(workdir / "manifest.json")], cwd=BROWSER_DIR, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the frontend did not save the workflows (exit {proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(Path(manifest["out"]).read_text())


# -- ours: positions, id, extra -----------------------------------------------------------------------
def layout(ids: list, edges: list[tuple], sizes: dict) -> dict:
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
    depth: dict = {}

    def longest(i):
        if i not in depth:
            depth[i] = 1 + max((longest(p) for p, _ in preds[i]), default=-1)
        return depth[i]

    for i in ids:
        longest(i)
    for i in sorted(ids, key=lambda k: -depth[k]):  # pull each node right, next to its nearest consumer
        if succs[i]:
            depth[i] = min(depth[s] for s, _ in succs[i]) - 1

    columns: dict[int, list] = {}
    for i in ids:
        columns.setdefault(depth[i], []).append(i)
    xs, x = {}, 0.0
    for c in sorted(columns):
        xs[c] = x
        x += max(sizes[i][0] for i in columns[c]) + GAP

    ys: dict = {}
    order = {i: n for n, i in enumerate(ids)}

    def stack(col: list, key) -> None:
        y = 0.0
        for i in sorted(col, key=key):
            ys[i] = y
            y += sizes[i][1] + GAP  # the title bar sits above pos

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else None

    def attach(i, slot):  # y of a link's end on node i (slots are drawn from its top)
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


def shows_output_images(node: dict) -> bool:
    """A node that ends a branch and takes images: the page draws what it gets below its widgets."""
    return not node.get("outputs") and any(i["type"] == "IMAGE" for i in node.get("inputs", []))


def laid_out(saved: dict, name: str) -> dict:
    """The page's serialisation with our sizes for titles and previews, positions, id and extra."""
    wf = json.loads(json.dumps(saved["graph"]))
    nodes = {n["id"]: n for n in wf["nodes"]}
    for i, node in nodes.items():
        width, height = node["size"]
        width = max(width, math.ceil(saved["titles"][str(i)]) + TITLE_PADDING)
        if any(i["type"] == "IMAGEUPLOAD" for i in node.get("inputs", [])):
            height += UPLOAD_PREVIEW  # the photo shown below the upload button
        elif shows_output_images(node):
            width, height = max(width, PREVIEW_SIZE), max(height, PREVIEW_SIZE)
        node["size"] = [width, height]
    edges = []
    for _, src, src_slot, dst, dst_slot, _ in wf["links"]:
        inputs = nodes[dst]["inputs"]
        sockets = [i for i in inputs if "widget" not in i]  # widget inputs are drawn beside their widget
        slot = sockets.index(inputs[dst_slot]) if inputs[dst_slot] in sockets else len(sockets)
        edges.append((src, src_slot, dst, slot))
    positions = layout(list(nodes), edges, {i: n["size"] for i, n in nodes.items()})
    for i, node in nodes.items():
        node["pos"] = positions[i]
    wf["id"] = str(uuid.uuid5(WORKFLOW_NAMESPACE, name))
    wf["extra"] = {**wf.get("extra", {}), "ds": {"scale": 1, "offset": VIEW_OFFSET},
                   "blip_diffusion": {"api_workflow": f"workflows/api/{name}.json",
                                      "generator": "scripts/make_ui_workflows.py"}}
    return wf


def without_layout(wf: dict) -> dict:
    """What --check compares: everything but positions and (font-dependent) sizes."""
    wf = json.loads(json.dumps(wf))
    for node in wf.get("nodes", []):
        node.pop("pos", None)
        node.pop("size", None)
    return wf


def ui_workflows(url: str, names: list[str]) -> dict[str, dict]:
    """{name: UI workflow} for the named API workflows, saved by the frontend at ``url``."""
    apis = {name: json.loads((API_DIR / f"{name}.json").read_text()) for name in names}
    with tempfile.TemporaryDirectory(prefix="save-ui-") as tmp:
        saved = frontend_saves(url, apis, Path(tmp))
    return {name: laid_out(saved[name], name) for name in names}


def dump(workflow: dict) -> str:
    """Indented JSON with short lists and objects (positions, links, widget values) kept on one line."""
    def compact(value, indent):
        pad, inner = " " * indent, " " * (indent + 2)
        flat = json.dumps(value, ensure_ascii=False)
        if isinstance(value, (dict, list)) and len(flat) + indent <= 140:
            return flat
        if isinstance(value, dict):
            items = [f"{inner}{json.dumps(k)}: {compact(v, indent + 2)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(value, list):
            return "[\n" + ",\n".join(inner + compact(v, indent + 2) for v in value) + "\n" + pad + "]"
        return flat
    return compact(workflow, 0) + "\n"


# -- a host to ask ------------------------------------------------------------------------------------
def start_host(tmp: Path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from _pack import import_pack

    import_pack()
    from blip_diffusion.api.server import ComfyServer, make_base_dir

    return ComfyServer(make_base_dir(tmp, None)).start()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running ComfyUI host with this pack loaded (default: start one)")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if a UI file is missing or differs in more than its layout")
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
        workflows = ui_workflows(url, names)
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()

    stale = []
    UI_DIR.mkdir(parents=True, exist_ok=True)
    for name, wf in workflows.items():
        out = UI_DIR / f"{name}.json"
        if args.check:
            if not out.exists() or without_layout(json.loads(out.read_text())) != without_layout(wf):
                stale.append(name)
            continue
        out.write_text(dump(wf))
        print(f"wrote {out.relative_to(ROOT)} ({len(wf['nodes'])} nodes)")
    if stale:
        print("stale or missing UI workflows (run scripts/make_ui_workflows.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
