"""The shipped API workflows and how a run's inputs fill them by node id.

The shipped workflows share these node ids (a user's own workflow is read by structure
instead: batch/template.py); ``fill`` sets these inputs and leaves the rest:

    reference.image      the uploaded subject photo       encode.category       category
    positive.prompt      prompt                           positive.target_category (if given)
    negative.text        negative                         sample.noise_seed     seed
    sample.cfg           cfg                              sigmas.steps          steps
    latent.width/height  width, height                    loader.model_name     --model
    save.filename_prefix blip_batch/<batch>/<item id>

The render script, the benchmarks and the tests set a run's inputs through it.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKFLOW = PACK_ROOT / "workflows" / "api" / "zero_shot.json"

# (node id, input) per field in the shipped workflows
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
