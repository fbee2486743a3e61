"""The API workflow template and how an item fills it.

The template is a shipped API workflow (workflows/api/zero_shot.json by default) or any API
workflow with the same node ids; the tool sets these inputs per item and leaves the rest:

    reference.image      the uploaded subject photo       encode.category       category
    positive.prompt      prompt                           positive.target_category (if given)
    negative.text        negative                         sample.noise_seed     seed
    sample.cfg           cfg                              sigmas.steps          steps
    latent.width/height  width, height                    loader.model_name     --model
    save.filename_prefix blip_batch/<batch>/<item id>

The shipped workflows share these node ids, so ``fill`` serves every one of them: the render
script, the benchmarks and the tests set a run's inputs through it too.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKFLOW = PACK_ROOT / "workflows" / "api" / "zero_shot.json"

# (node id, input) per item field; the first five are required in a template
SLOTS = {
    "image": ("reference", "image"),
    "category": ("encode", "category"),
    "prompt": ("positive", "prompt"),
    "seed": ("sample", "noise_seed"),
    "save": ("save", "filename_prefix"),
    "steps": ("sigmas", "steps"),
    "width": ("latent", "width"),
    "height": ("latent", "height"),
    "negative": ("negative", "text"),
    "cfg": ("sample", "cfg"),
    "target_category": ("positive", "target_category"),
    "model": ("loader", "model_name"),
}
REQUIRED = ("image", "category", "prompt", "seed", "save")
ENCODER_NODE = "encode"


class TemplateError(Exception):
    pass


def load_workflow(name: str) -> dict:
    """A shipped API workflow by name (``workflows/api/<name>.json``)."""
    return json.loads((PACK_ROOT / "workflows" / "api" / f"{name}.json").read_text())


def fill(graph: dict, **values) -> dict:
    """A copy of an API workflow with the given SLOTS set; None leaves a slot as it is.

    ``size`` sets width and height together. A slot the workflow lacks is an error, so a
    renamed node id cannot be skipped silently.
    """
    if "size" in values:
        size = values.pop("size")
        values.setdefault("width", size)
        values.setdefault("height", size)
    g = copy.deepcopy(graph)
    for slot, value in values.items():
        if value is None:
            continue
        node, name = SLOTS[slot]
        if name not in g.get(node, {}).get("inputs", {}):
            raise TemplateError(f"the workflow has no {node}.{name} for {slot!r}")
        g[node]["inputs"][name] = value
    return g


class Template:
    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else DEFAULT_WORKFLOW
        try:
            raw = self.path.read_bytes()
            self.graph = json.loads(raw)
        except (OSError, json.JSONDecodeError) as e:
            raise TemplateError(f"cannot read workflow {self.path}: {e}") from e
        self.sha256 = hashlib.sha256(raw).hexdigest()
        if not isinstance(self.graph, dict) or not all(isinstance(n, dict) and "class_type" in n
                                                       for n in self.graph.values()):
            raise TemplateError(f"{self.path} is not an API-format workflow (export it with 'Save (API)')")
        missing = [f"{SLOTS[k][0]}.{SLOTS[k][1]}" for k in REQUIRED if not self.has(k)]
        if missing:
            raise TemplateError(f"{self.path}: the template lacks {missing} (node id.input) that the batch sets")

    def has(self, slot: str) -> bool:
        node, name = SLOTS[slot]
        return name in self.graph.get(node, {}).get("inputs", {})

    def value(self, slot: str):
        node, name = SLOTS[slot]
        return self.graph.get(node, {}).get("inputs", {}).get(name)

    def defaults(self) -> dict:
        """Item defaults as the template has them."""
        return {"seed": 0, "steps": self.value("steps") or 25, "width": self.value("width") or 512,
                "height": self.value("height") or 512, "negative": self.value("negative") or "",
                "cfg": self.value("cfg") if self.value("cfg") is not None else 7.5, "target_category": ""}

    def fill(self, item, image_ref: str, model: str | None, save_prefix: str) -> dict:
        values = {"image": image_ref, "category": item.category, "prompt": item.prompt, "seed": item.seed,
                  "save": save_prefix, "steps": item.steps, "width": item.width, "height": item.height,
                  "negative": item.negative, "cfg": item.cfg, "target_category": item.target_category or None,
                  "model": model}
        g = fill(self.graph, **{k: v for k, v in values.items() if self.has(k)})
        for node in g.values():
            node.pop("_meta", None)
        return g
