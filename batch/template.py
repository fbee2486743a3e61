"""A user's API workflow as the batch template: what the tool fills per item, found by structure.

Any API workflow (as the frontend's *Export (API)* writes it: numeric ids, extra nodes, several
saves) works when it renders one subject. The tool follows the graph's links from the pack's
nodes instead of relying on node ids:

    photo     the LoadImage upstream of the SubjectEncode    (its ``image``)
    category  that SubjectEncode                             (its ``category``)
    prompt    the SubjectConditioning feeding the sampler's positive side (``prompt``, ``target_category``)
    sampler   the first sampler downstream of that conditioning: its seed (or its RandomNoise's),
              cfg (or its CFGGuider's), steps (or its scheduler's), the negative CLIPTextEncode's text,
              and the width/height (and batch_size, for --batch-size) of the empty latent it starts from
    model     the BlipDiffusionLoader, when there is exactly one
    save      every node with a ``filename_prefix`` (SaveImage and friends): all their images are collected

Where the structure is ambiguous (two subjects, two samplers) a node can be marked by putting
``batch:<role>`` in its title, e.g. a LoadImage titled "Subject photo batch:photo". Roles:
photo, category, prompt, seed, cfg, steps, size, negative, model.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .graph import DEFAULT_WORKFLOW, TemplateError

# role -> the input names a node of that role holds the value in (first found wins); a title mark names a role
ROLE_INPUTS = {"photo": ("image",), "category": ("category",), "prompt": ("prompt",),
               "seed": ("noise_seed", "seed"), "cfg": ("cfg",), "steps": ("steps",), "size": ("width",),
               "negative": ("text",), "model": ("model_name",)}
ROLES = tuple(ROLE_INPUTS)
SUBJECT_ENCODE, SUBJECT_CONDITIONING, LOADER = "SubjectEncode", "SubjectConditioning", "BlipDiffusionLoader"
MARK = re.compile(r"batch:([a-z_]+)", re.IGNORECASE)


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) \
        and isinstance(value[1], int)


def _id_order(node_id: str):
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


@dataclass
class Slots:
    """Where each item field goes: field -> (node id, input name); every save node's id."""
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    saves: list[str] = field(default_factory=list)
    encoder: str | None = None

    def describe(self, graph: dict) -> str:
        def name(node_id):
            node = graph[node_id]
            title = (node.get("_meta") or {}).get("title")
            return f"#{node_id} {node['class_type']}" + (f" '{title}'" if title and title != node["class_type"] else "")

        parts = [f"{f} -> {name(n)}.{i}" for f, (n, i) in self.inputs.items()]
        parts.append("save -> " + ", ".join(name(n) for n in self.saves))
        return "; ".join(parts)


class Graph:
    """Links of an API workflow in both directions."""

    def __init__(self, nodes: dict):
        self.nodes = nodes
        self.users: dict[str, list[tuple[str, str]]] = {k: [] for k in nodes}  # id -> [(user id, input)]
        for node_id, node in nodes.items():
            for name, value in (node.get("inputs") or {}).items():
                if _is_link(value) and str(value[0]) in self.users:
                    self.users[str(value[0])].append((node_id, name))

    def cls(self, node_id: str) -> str:
        return self.nodes[node_id]["class_type"]

    def inputs(self, node_id: str) -> dict:
        return self.nodes[node_id].get("inputs") or {}

    def literal(self, node_id: str, name: str) -> bool:
        return name in self.inputs(node_id) and not _is_link(self.inputs(node_id)[name])

    def source(self, node_id: str, name: str) -> str | None:
        value = self.inputs(node_id).get(name)
        return str(value[0]) if _is_link(value) and str(value[0]) in self.nodes else None

    def upstream(self, start: str, through: str | None = None) -> list[str]:
        """Nodes feeding ``start`` (breadth first, nearest first); ``through`` starts at that input only."""
        first = [self.source(start, through)] if through else \
            [str(v[0]) for v in self.inputs(start).values() if _is_link(v)]
        return self._walk([n for n in first if n in self.nodes], lambda n: [
            str(v[0]) for v in self.inputs(n).values() if _is_link(v) and str(v[0]) in self.nodes])

    def downstream(self, start: str) -> list[str]:
        return self._walk([u for u, _ in self.users[start]], lambda n: [u for u, _ in self.users[n]])

    @staticmethod
    def _walk(first, step) -> list[str]:
        seen, order, queue = set(), [], list(first)
        while queue:
            n = queue.pop(0)
            if n in seen:
                continue
            seen.add(n)
            order.append(n)
            queue.extend(step(n))
        return order


def _marked(graph: dict) -> dict[str, list[str]]:
    marks: dict[str, list[str]] = {}
    for node_id, node in graph.items():
        for role in MARK.findall((node.get("_meta") or {}).get("title") or ""):
            marks.setdefault(role.lower(), []).append(node_id)
    return marks


def _is_sampler(g: Graph, n: str) -> bool:
    return "latent_image" in g.inputs(n)


def locate(nodes: dict) -> tuple[Slots, list[str]]:
    """Where a workflow takes each item field, and the problems (a field it cannot place, why, and the fix)."""
    g = Graph(nodes)
    marks = _marked(nodes)
    slots, problems = Slots(), []
    unknown = sorted(set(marks) - set(ROLES))
    if unknown:
        problems.append(f"unknown batch mark(s) {['batch:' + r for r in unknown]} in node titles; the roles are "
                        f"{', '.join(ROLES)}")

    def pick(role: str, candidates: list[str], what: str, required: bool) -> str | None:
        """The marked node, else the single candidate; a problem when there is none or several."""
        marked = marks.get(role, [])
        if len(marked) > 1:
            problems.append(f"{len(marked)} nodes are marked batch:{role} ({', '.join('#' + m for m in marked)}): "
                            "mark one")
            return None
        if marked:
            if not any(name in g.inputs(marked[0]) for name in ROLE_INPUTS[role]):
                problems.append(f"node #{marked[0]} ({g.cls(marked[0])}) is marked batch:{role} but has no "
                                f"{' or '.join(ROLE_INPUTS[role])} input")
                return None
            return marked[0]
        unique = list(dict.fromkeys(candidates))
        if len(unique) == 1:
            return unique[0]
        if required or unique:
            found = "none was found" if not unique else \
                f"found {len(unique)} ({', '.join('#' + n + ' ' + g.cls(n) for n in unique)})"
            problems.append(f"{role}: the batch needs {what}; {found}. Put 'batch:{role}' in the title of the "
                            "node it should set")
        return None

    def place(field_name: str, node_id: str | None, role: str, names=None) -> None:
        if node_id is None:
            return
        for name in names or ROLE_INPUTS[role]:
            if name in g.inputs(node_id):
                if not g.literal(node_id, name):
                    problems.append(f"{field_name}: #{node_id} {g.cls(node_id)}.{name} is fed by a link; the batch "
                                    "sets it per item, so give it a value in the node instead")
                    return
                slots.inputs[field_name] = (node_id, name)
                return

    # prompt: a SubjectConditioning that reaches a sampler
    conditionings = [n for n in nodes if g.cls(n) == SUBJECT_CONDITIONING]
    rendering = [n for n in conditionings if any(_is_sampler(g, d) or g.cls(d) == "CFGGuider"
                                                 for d in g.downstream(n))]
    prompt = pick("prompt", rendering or conditionings,
                  "one Subject Conditioning node that feeds the sampler's positive input", True)
    place("prompt", prompt, "prompt")
    if prompt and "target_category" in g.inputs(prompt) and g.literal(prompt, "target_category"):
        slots.inputs["target_category"] = (prompt, "target_category")

    # the subject: the SubjectEncode behind that conditioning, the LoadImage behind the encoder
    marked_photo = marks.get("photo", [])
    if prompt:
        encoders = [n for n in g.upstream(prompt, "subject") if g.cls(n) == SUBJECT_ENCODE] \
            if g.source(prompt, "subject") else []
    else:
        encoders = [n for n in nodes if g.cls(n) == SUBJECT_ENCODE]
    if len(marked_photo) == 1:
        behind_photo = [n for n in g.downstream(marked_photo[0]) if g.cls(n) == SUBJECT_ENCODE]
        encoders = [n for n in encoders if n in behind_photo] or behind_photo[:1]
    encoder = pick("category", encoders, "one Subject Encode node (the photo's encoder) behind the Subject "
                   "Conditioning", True)
    place("category", encoder, "category")
    slots.encoder = encoder
    photos = [n for n in g.upstream(encoder, "images") if g.cls(n) == "LoadImage"] if encoder and \
        g.source(encoder, "images") else []
    if encoder or marked_photo:  # no encoder: that problem is already named
        place("image", pick("photo", photos, "one Load Image node that feeds the Subject Encode's images", True),
              "photo")

    # the first sampler downstream of the conditioning (a later one, e.g. a hires pass, starts from its output)
    reached = [n for n in g.downstream(prompt) if _is_sampler(g, n)] if prompt else []
    first = [n for n in reached if not any(n in g.downstream(m) for m in reached if m != n)]
    sampler = first[0] if len(first) == 1 else None
    seed_marks = marks.get("seed", [])
    if len(seed_marks) == 1:  # the marked sampler, or the sampler taking the marked RandomNoise
        m = seed_marks[0]
        sampler = m if _is_sampler(g, m) else next(
            (u for u, name in g.users[m] if name == "noise" and _is_sampler(g, u)), sampler)
    found = dict.fromkeys(("cfg", "steps", "size", "negative"), [])
    if sampler:
        noise = g.source(sampler, "noise")  # SamplerCustomAdvanced: the seed is on its RandomNoise
        seeds = [noise if noise and "noise_seed" in g.inputs(noise) else sampler]
        conds = g.source(sampler, "guider") or sampler  # CFGGuider holds cfg and the conditionings
        found["cfg"] = [conds] if "cfg" in g.inputs(conds) else []
        found["steps"] = [sampler] if "steps" in g.inputs(sampler) else [
            n for n in (g.upstream(sampler, "sigmas") if g.source(sampler, "sigmas") else [])
            if "steps" in g.inputs(n)][:1]
        found["size"] = [n for n in (g.upstream(sampler, "latent_image") if g.source(sampler, "latent_image")
                                     else []) if g.literal(n, "width") and g.literal(n, "height")][:1]
        found["negative"] = [n for n in (g.upstream(conds, "negative") if g.source(conds, "negative") else [])
                             if g.cls(n) == "CLIPTextEncode"][:1]  # through ControlNet apply and the like
    else:
        seeds = first
    if prompt or seed_marks:  # no conditioning: that problem is already named
        place("seed", pick("seed", seeds, "one sampler (KSampler, SamplerCustom, ...) after the Subject "
                           "Conditioning", True), "seed")
    for role, nodes_found in found.items():
        node = pick(role, nodes_found, "", False)
        if role == "size":
            place("width", node, role, ("width",))
            place("height", node, role, ("height",))
            if node and g.literal(node, "batch_size"):
                slots.inputs["batch_size"] = (node, "batch_size")
        else:
            place(role, node, role)

    place("model", pick("model", [n for n in nodes if g.cls(n) == LOADER], "", False), "model")
    slots.saves = sorted((n for n in nodes if g.literal(n, "filename_prefix")), key=_id_order)
    if not slots.saves:
        problems.append("save: the workflow saves nothing; add a Save Image node")
    return slots, problems


class Template:
    """An API workflow, its fingerprint, and where the batch fills it."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else DEFAULT_WORKFLOW
        try:
            raw = self.path.read_bytes()
            self.graph = json.loads(raw)
        except (OSError, json.JSONDecodeError) as e:
            raise TemplateError(f"cannot read workflow {self.path}: {e}") from e
        self.sha256 = hashlib.sha256(raw).hexdigest()
        if isinstance(self.graph, dict) and "nodes" in self.graph and "links" in self.graph:
            raise TemplateError(f"{self.path} is a UI workflow; the batch needs the API format: in ComfyUI use "
                                "Workflow > Export (API)")
        if not isinstance(self.graph, dict) or not self.graph or not all(
                isinstance(n, dict) and "class_type" in n for n in self.graph.values()):
            raise TemplateError(f"{self.path} is not an API-format workflow (in ComfyUI: Workflow > Export (API))")
        self.graph = {str(k): v for k, v in self.graph.items()}
        self.slots, problems = locate(self.graph)
        if problems:
            raise TemplateError(f"{self.path}: cannot use it as a batch template:\n  - " + "\n  - ".join(problems))
        self.encoder_node = self.slots.encoder

    def has(self, field_name: str) -> bool:
        return field_name in self.slots.inputs

    def value(self, field_name: str):
        if not self.has(field_name):
            return None
        node, name = self.slots.inputs[field_name]
        return self.graph[node]["inputs"][name]

    def loader_class(self) -> str | None:
        return self.graph[self.slots.inputs["model"][0]]["class_type"] if self.has("model") else None

    def describe(self) -> str:
        return self.slots.describe(self.graph)

    def defaults(self) -> dict:
        """Item defaults as the template has them."""
        return {"seed": 0, "steps": self.value("steps") or 25, "width": self.value("width") or 512,
                "height": self.value("height") or 512, "negative": self.value("negative") or "",
                "cfg": self.value("cfg") if self.value("cfg") is not None else 7.5, "target_category": ""}

    def fill(self, item, image_ref: str, model: str | None, save_prefix: str, batch_size: int = 1) -> dict:
        """The prompt that renders ``item``; ``batch_size`` latents from its seed (one image per latent)."""
        values = {"image": image_ref, "category": item.category, "prompt": item.prompt, "seed": item.seed,
                  "steps": item.steps, "width": item.width, "height": item.height, "negative": item.negative,
                  "cfg": item.cfg, "target_category": item.target_category or None, "model": model,
                  "batch_size": batch_size}
        g = copy.deepcopy(self.graph)
        for field_name, value in values.items():
            if value is not None and self.has(field_name):
                node, name = self.slots.inputs[field_name]
                g[node]["inputs"][name] = value
        for k, node_id in enumerate(self.slots.saves):
            g[node_id]["inputs"]["filename_prefix"] = save_prefix if k == 0 else f"{save_prefix}_{k}"
        for node in g.values():
            node.pop("_meta", None)
        return g

    def unused(self, items) -> list[str]:
        """Item fields set away from the template's defaults that this workflow has nowhere to put."""
        defaults = self.defaults()
        out = []
        for f in ("steps", "width", "height", "negative", "cfg", "target_category"):
            if not self.has(f) and any(getattr(i, f) not in (None, "", defaults.get(f)) for i in items):
                out.append(f)
        return out
