"""Batch files: what to render. JSON lines, JSON or CSV; single items or subject x prompt x seed grids.

Every item resolves to the same fields (see FIELDS); its id is given or derived from those
fields, so the same batch file gives the same ids on every run (that is what resume keys on).
Items are ordered so that renders sharing a subject run back to back (the host then serves
the subject embedding from its cache instead of encoding the photo again).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

# field -> type; "size" is accepted as input and turned into width/height
FIELDS = {"id": str, "image": str, "category": str, "prompt": str, "seed": int, "steps": int,
          "width": int, "height": int, "negative": str, "cfg": float, "target_category": str}
INPUT_KEYS = set(FIELDS) | {"size"}
GRID_KEYS = {"subjects", "prompts", "seeds"}
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SEED_MAX = 0xFFFFFFFFFFFFFFFF


class BatchFileError(Exception):
    """The batch file cannot be read; nothing was rendered."""


@dataclass
class Item:
    id: str
    image: str                 # as written in the batch file
    image_path: Path           # resolved against the batch file's folder
    category: str
    prompt: str
    seed: int
    steps: int
    width: int
    height: int
    negative: str = ""
    cfg: float = 7.5
    target_category: str = ""
    source: str = ""           # "file:line" for messages
    image_sha256: str | None = field(default=None, repr=False)  # None: the file is missing or unreadable

    def params(self) -> dict:
        """What the render depends on (also what the derived id hashes)."""
        return {"image": self.image, "category": self.category, "prompt": self.prompt, "seed": self.seed,
                "steps": self.steps, "width": self.width, "height": self.height, "negative": self.negative,
                "cfg": self.cfg, "target_category": self.target_category}

    @property
    def subject_key(self) -> tuple:
        return (self.image_sha256 or f"missing:{self.image_path}", self.category)


def slug(text: str, limit: int = 24) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].strip("-") or "item"


def derive_id(params: dict) -> str:
    digest = hashlib.sha1(json.dumps(params, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:10]
    return f"{slug(Path(params['image']).stem)}-s{params['seed']}-{digest}"


def file_sha256(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


# -- reading -------------------------------------------------------------------------
def _entries(path: Path) -> list[tuple[str, dict]]:
    """(source, raw dict) for every entry of the file, whatever its format."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise BatchFileError(f"cannot read batch file {path}: {e}") from e
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _csv_entries(path, text, "\t" if suffix == ".tsv" else ",")
    stripped = text.lstrip()
    if suffix == ".json" or (suffix not in (".jsonl", ".ndjson") and stripped.startswith("[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if suffix == ".json":
                raise BatchFileError(f"{path.name}:{e.lineno}: not valid JSON: {e.msg}") from e
        else:
            data = data if isinstance(data, list) else [data]
            return [(f"{path.name}[{i}]", d) for i, d in enumerate(data)]
    if suffix in (".jsonl", ".ndjson", ".json") or stripped.startswith("{"):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith(("#", "//")):
                continue
            try:
                out.append((f"{path.name}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise BatchFileError(f"{path.name}:{n}: not valid JSON: {e.msg}") from e
        return out
    return _csv_entries(path, text, ",")


def _csv_entries(path: Path, text: str, delimiter: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if not reader.fieldnames:
        return []
    unknown = [c for c in reader.fieldnames if c and c.strip() not in INPUT_KEYS]
    if unknown:
        raise BatchFileError(f"{path.name}:1: unknown column(s) {unknown}; known: {sorted(INPUT_KEYS)}")
    out = []
    for row in reader:
        entry = {k.strip(): v.strip() for k, v in row.items() if k and v is not None and v.strip() != ""}
        if entry:
            out.append((f"{path.name}:{reader.line_num}", entry))
    return out


def _expand(source: str, raw) -> list[tuple[str, dict]]:
    """A grid entry -> one raw item per subject x prompt x seed; an item entry -> itself."""
    if not isinstance(raw, dict):
        raise BatchFileError(f"{source}: expected an object, got {type(raw).__name__}")
    if not GRID_KEYS & raw.keys():
        return [(source, raw)]
    missing = [k for k in ("subjects", "prompts") if k not in raw]
    if missing:
        raise BatchFileError(f"{source}: a grid needs 'subjects', 'prompts' (and 'seeds'); missing {missing}")
    shared = {k: v for k, v in raw.items() if k not in GRID_KEYS}
    if "id" in shared:
        raise BatchFileError(f"{source}: a grid cannot have one 'id' (ids are derived per item)")
    seeds = raw.get("seeds", [0])
    for key, value in (("subjects", raw["subjects"]), ("prompts", raw["prompts"]), ("seeds", seeds)):
        if not isinstance(value, list) or not value:
            raise BatchFileError(f"{source}: '{key}' must be a non-empty list")
    out = []
    for si, subject in enumerate(raw["subjects"]):
        if not isinstance(subject, dict):
            raise BatchFileError(f"{source}: subjects[{si}] must be an object with 'image' and 'category'")
        for pi, prompt in enumerate(raw["prompts"]):
            prompt = {"prompt": prompt} if isinstance(prompt, str) else prompt
            if not isinstance(prompt, dict):
                raise BatchFileError(f"{source}: prompts[{pi}] must be a string or an object with 'prompt'")
            for seed in seeds:
                out.append((f"{source} subjects[{si}] prompts[{pi}] seed {seed}",
                            {**shared, **subject, **prompt, "seed": seed}))
    return out


def _coerce(source: str, key: str, value, typ):
    if typ is str:
        if isinstance(value, (dict, list)):
            raise BatchFileError(f"{source}: '{key}' must be a string")
        return str(value)
    try:
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        number = float(value)
        if not math.isfinite(number):   # NaN or inf ('nan' in a CSV): the host would render black
            raise ValueError
        return number
    except (TypeError, ValueError, OverflowError):
        raise BatchFileError(f"{source}: '{key}' must be {'an integer' if typ is int else 'a number'}, "
                             f"got {value!r}") from None


def _size(source: str, value) -> tuple[int, int]:
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", value):
        w, h = re.split(r"[xX]", value)
        return int(w), int(h)
    n = _coerce(source, "size", value, int)
    return n, n


def _item(source: str, raw: dict, base_dir: Path, defaults: dict) -> tuple[Item, bool]:
    unknown = sorted(set(raw) - INPUT_KEYS)
    if unknown:
        raise BatchFileError(f"{source}: unknown field(s) {unknown}; known: {sorted(INPUT_KEYS | GRID_KEYS)}")
    values = dict(defaults)
    if "size" in raw:
        values["width"], values["height"] = _size(source, raw["size"])
    for key, value in raw.items():
        if key != "size":
            values[key] = _coerce(source, key, value, FIELDS[key])
    for key in ("image", "category", "prompt"):
        if key not in raw or (key != "prompt" and not values[key].strip()):
            raise BatchFileError(f"{source}: '{key}' is required")
    if not 0 <= values["seed"] <= SEED_MAX:
        raise BatchFileError(f"{source}: 'seed' must be in 0..2**64-1")
    if values["steps"] < 1:
        raise BatchFileError(f"{source}: 'steps' must be at least 1")
    for key in ("width", "height"):
        if values[key] < 8 or values[key] % 8:
            raise BatchFileError(f"{source}: '{key}' must be a positive multiple of 8, got {values[key]}")
    explicit = "id" in values
    if explicit and not ID_RE.match(values["id"]):
        raise BatchFileError(f"{source}: 'id' {values['id']!r} must be letters, digits, '.', '_' or '-' "
                             "(it names the output file)")
    image_path = Path(values["image"]).expanduser()
    if not image_path.is_absolute():
        image_path = base_dir / image_path
    item = Item(id=values.pop("id", ""), image_path=image_path, source=source,
                **{k: values[k] for k in FIELDS if k != "id"})
    if not explicit:
        item.id = derive_id(item.params())
    return item, explicit


def load_batch(path: Path, defaults: dict) -> tuple[list[Item], list[str]]:
    """Items of ``path`` in queue order (grouped by subject) and warnings.

    ``defaults`` holds seed, steps, width, height, negative, cfg and target_category for
    fields an entry leaves out.
    """
    path = Path(path)
    items, warnings, seen = [], [], {}
    for source, raw in _entries(path):
        for src, entry in _expand(source, raw):
            item, explicit = _item(src, entry, path.resolve().parent, defaults)
            key = item.id.casefold()   # the output file's name: one file on macOS and Windows for 'A' and 'a'
            if key in seen:
                first = seen[key]
                if explicit or first.params() != item.params():
                    same = "" if first.id == item.id else f" (as {first.id!r}: output names differ only in case)"
                    raise BatchFileError(f"{src}: id {item.id!r} is already used by {first.source}{same}")
                warnings.append(f"{src}: same render as {first.source}; queued once")
                continue
            seen[key] = item
            items.append(item)
    if not items:
        raise BatchFileError(f"{path}: no items")
    hashes: dict[Path, str | None] = {}
    for item in items:
        if item.image_path not in hashes:
            hashes[item.image_path] = file_sha256(item.image_path) if item.image_path.is_file() else None
        item.image_sha256 = hashes[item.image_path]
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(item.subject_key, []).append(item)
    return [item for group in groups.values() for item in group], warnings
