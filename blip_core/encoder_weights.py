"""Loading and saving subject-encoder weights.

Three layouts are read:
  (a) the released diffusers-format ``qformer/`` folder: config.json + pytorch_model.bin
      (torch pickle, read only with ``weights_only=True``) or model.safetensors;
  (b) a LAVIS checkpoint folder: blip_model/blip_weight.pt + proj_layer/proj_weight.pt;
  (c) one safetensors file (or torch pickle) with released or LAVIS key names; a
      safetensors file may carry the config as JSON in its metadata under "config".
:func:`locate` decides once which layout a path holds and which files a load reads, so
the checks before a load and the load itself see the same files. Loading is strict:
missing, unexpected or wrongly shaped tensors raise a ValueError that names them.
Structure is inferred from tensor shapes; config.json values override it where present.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from .subject_encoder import SubjectEncoder, SubjectEncoderConfig

# Buffers the released file carries that the model recomputes.
TOLERATED_EXTRA = {"embeddings.position_ids"}
# Training heads in LAVIS's BLIP-2 checkpoint that the subject encoder never uses.
LAVIS_IGNORED = re.compile(r"^blip\.(Qformer\.cls\.|vision_proj\.|text_proj\.|itm_head\.|temp$)")
LAVIS_FILES = {"blip": "blip_model/blip_weight.pt", "proj_layer": "proj_layer/proj_weight.pt"}
LAVIS_VISION_EPS = 1e-5  # LAVIS's LayerNorm default for ln_pre, ln_1/ln_2 and ln_vision
SHOWN = 5

# (released name, LAVIS name) templates; {n} is a layer index, {rest} any suffix. First match wins.
_QF = "blip.Qformer.bert."
_VL, _RB = "visual_encoder.encoder.layers.{n}.", "blip.visual_encoder.transformer.resblocks.{n}."
_RULES = [
    ("query_tokens", "blip.query_tokens"),
    ("embeddings.{rest}", _QF + "embeddings.{rest}"),
    ("encoder.layer.{n}.attention.attention.{rest}", _QF + "encoder.layer.{n}.attention.self.{rest}"),
    ("encoder.layer.{n}.crossattention.attention.{rest}", _QF + "encoder.layer.{n}.crossattention.self.{rest}"),
    ("encoder.layer.{rest}", _QF + "encoder.layer.{rest}"),
    ("visual_encoder.embeddings.class_embedding", "blip.visual_encoder.class_embedding"),
    ("visual_encoder.embeddings.position_embedding", "blip.visual_encoder.positional_embedding"),
    ("visual_encoder.embeddings.patch_embedding.{rest}", "blip.visual_encoder.conv1.{rest}"),
    ("visual_encoder.pre_layernorm.{rest}", "blip.visual_encoder.ln_pre.{rest}"),
    (_VL + "layer_norm1.{rest}", _RB + "ln_1.{rest}"),
    (_VL + "layer_norm2.{rest}", _RB + "ln_2.{rest}"),
    (_VL + "self_attn.qkv.weight", _RB + "attn.in_proj_weight"),
    (_VL + "self_attn.qkv.bias", _RB + "attn.in_proj_bias"),
    (_VL + "self_attn.projection.{rest}", _RB + "attn.out_proj.{rest}"),
    (_VL + "mlp.fc1.{rest}", _RB + "mlp.c_fc.{rest}"),
    (_VL + "mlp.fc2.{rest}", _RB + "mlp.c_proj.{rest}"),
    ("visual_encoder.post_layernorm.{rest}", "blip.ln_vision.{rest}"),
    ("proj_layer.{rest}", "proj_layer.{rest}"),
]


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(f"^{escaped}$")


_COMPILED = [(_pattern(a), a, _pattern(b), b) for a, b in _RULES]


def rename(key: str, to_lavis: bool) -> str | None:
    """A released key's LAVIS name, or (``to_lavis=False``) a LAVIS key's released name; None if no rule fits."""
    for released_re, released, lavis_re, lavis in _COMPILED:
        m = (released_re if to_lavis else lavis_re).match(key)
        if m:
            return (lavis if to_lavis else released).format(**m.groupdict())
    return None


def from_lavis_state_dict(lavis: dict) -> dict:
    """LAVIS names (with or without the ``blip.`` prefix) -> released names; training heads dropped."""
    out, unknown = {}, []
    for key, value in lavis.items():
        if not key.startswith(("blip.", "proj_layer.")):
            key = "blip." + key  # blip_weight.pt holds names relative to the BLIP-2 module
        if LAVIS_IGNORED.match(key):
            continue
        new = rename(key, to_lavis=False)
        if new is None:
            unknown.append(key)
            continue
        if new == "visual_encoder.embeddings.class_embedding":
            value = value.reshape(1, 1, -1)
        elif new == "visual_encoder.embeddings.position_embedding":
            value = value.reshape(1, *value.shape[-2:])
        out[new] = value
    if unknown:
        raise ValueError(f"unexpected keys in LAVIS checkpoint ({len(unknown)}): {_few(unknown)}")
    return out


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:SHOWN]) + (", ..." if len(keys) > SHOWN else "")


def read_tensors(path: str) -> dict:
    """State dict of a .safetensors file or a torch pickle (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, a non-weights file, or a pickle with arbitrary objects
        raise ValueError(f"{path} is not a readable weights file ({type(e).__name__}: {str(e)[:200]})") from e
    for wrapper in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return sd


def _layer_indices(sd: dict, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def infer_config(sd: dict, overrides: dict | None = None) -> SubjectEncoderConfig:
    """Config from tensor shapes (released names), then ``overrides`` (config.json-style dict).

    Shapes that are absent keep the defaults; the strict load then names the missing keys.
    """
    cfg = SubjectEncoderConfig().to_dict()
    vis, qf = cfg["vision_config"], cfg["qformer_config"]

    def shape(key):
        return tuple(sd[key].shape) if key in sd else None

    if s := shape("visual_encoder.embeddings.patch_embedding.weight"):
        vis.update(hidden_size=s[0], num_attention_heads=s[0] // 64, patch_size=s[-1])
    if s := shape("visual_encoder.embeddings.position_embedding"):
        vis["image_size"] = round((s[-2] - 1) ** 0.5) * vis["patch_size"]
    vis["num_hidden_layers"] = len(_layer_indices(sd, "visual_encoder.encoder.layers."))
    if s := shape("visual_encoder.encoder.layers.0.mlp.fc1.weight"):
        vis["intermediate_size"] = s[0]
    if "visual_encoder.encoder.layers.0.self_attn.qkv.weight" in sd:
        vis["qkv_bias"] = "visual_encoder.encoder.layers.0.self_attn.qkv.bias" in sd
    if s := shape("embeddings.word_embeddings.weight"):
        qf.update(vocab_size=s[0], hidden_size=s[1], num_attention_heads=s[1] // 64)
    if s := shape("embeddings.position_embeddings.weight"):
        qf["max_position_embeddings"] = s[0]
    layers = _layer_indices(sd, "encoder.layer.")
    qf["num_hidden_layers"] = len(layers)
    if s := shape("encoder.layer.0.intermediate.dense.weight"):
        qf["intermediate_size"] = s[0]
    if s := shape("encoder.layer.0.crossattention.attention.key.weight"):
        qf["encoder_hidden_size"] = s[1]
    cross = {i for i in layers if f"encoder.layer.{i}.crossattention.attention.query.weight" in sd}
    for freq in range(1, len(layers) + 1):
        if cross == {i for i in layers if i % freq == 0}:
            qf["cross_attention_frequency"] = freq
            break
    if s := shape("query_tokens"):
        cfg["num_query_tokens"] = s[1]
    for section in ("vision_config", "qformer_config"):
        cfg[section].update({k: v for k, v in (overrides or {}).get(section, {}).items() if v is not None})
    if overrides and "num_query_tokens" in overrides:
        cfg["num_query_tokens"] = overrides["num_query_tokens"]
    return SubjectEncoderConfig.from_dict(cfg)


def _looks_like_encoder(sd: dict) -> bool:
    return any(k == "query_tokens" or k.startswith(("visual_encoder.", "encoder.layer.", "embeddings.word_"))
               for k in sd)


def _is_lavis(sd: dict) -> bool:
    return any(k.startswith(("blip.", "Qformer.bert.", "ln_vision.")) or k == "visual_encoder.conv1.weight"
               for k in sd)


def build_encoder(sd: dict, config: SubjectEncoderConfig, source: str = "weights",
                  dtype: torch.dtype = torch.float32, device="cpu") -> SubjectEncoder:
    """A frozen, eval-mode SubjectEncoder holding exactly the tensors of ``sd`` (released names)."""
    with torch.device("meta"):  # no random init: every tensor comes from sd
        encoder = SubjectEncoder(config)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    sd = {k: v for k, v in sd.items() if k not in TOLERATED_EXTRA}
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in sorted(expected.keys() & sd.keys())
             if tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): {_few(wrong)}")
    if problems:
        raise ValueError(f"{source} does not match the subject encoder: " + "; ".join(problems))
    encoder.load_state_dict(sd, strict=True, assign=True)
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _from_state_dict(sd: dict, source: str, overrides: dict | None = None, **kw) -> SubjectEncoder:
    if _is_lavis(sd):
        sd = from_lavis_state_dict(sd)
    if not _looks_like_encoder(sd):
        raise ValueError(f"{source} is not a BLIP-Diffusion subject encoder (no query_tokens, visual_encoder.* "
                         f"or Q-Former keys; it has {len(sd)} tensors such as {_few(list(sd)[:SHOWN])}): choose "
                         "a BLIP-Diffusion model folder (its qformer/) or a subject encoder file")
    return build_encoder(sd, infer_config(sd, overrides), source, **kw)


RELEASED_FILES = ("model.safetensors", "pytorch_model.bin")  # in qformer/, in this order of preference


@dataclass(frozen=True)
class Location:
    """Which layout a path holds and the weights files its load reads (those that exist)."""
    layout: str              # "released", "lavis" or "single"
    path: str                # released: the qformer/ folder; lavis: the checkpoint folder; single: the file
    files: tuple[str, ...]   # empty when there are none: the load then says what is missing


def locate(path: str) -> Location:
    """The layout at ``path``, recognised once: a LAVIS checkpoint folder, a released (model or
    qformer/) folder, or one file."""
    if not os.path.isdir(path):
        return _single_file(path)
    lavis = _lavis_folder(path)
    return lavis if len(lavis.files) == len(LAVIS_FILES) else _released_folder(path)


def _released_folder(folder: str) -> Location:
    if os.path.isdir(os.path.join(folder, "qformer")):
        folder = os.path.join(folder, "qformer")
    found = [os.path.join(folder, n) for n in RELEASED_FILES if os.path.isfile(os.path.join(folder, n))]
    return Location("released", folder, tuple(found[:1]))


def _lavis_folder(folder: str) -> Location:
    paths = [os.path.join(folder, rel) for rel in LAVIS_FILES.values()]
    return Location("lavis", folder, tuple(p for p in paths if os.path.isfile(p)))


def _single_file(path: str) -> Location:
    return Location("single", path, (path,) if os.path.isfile(path) else ())


def load(where: Location, **kw) -> SubjectEncoder:
    """The encoder at a located path (``kw``: build_encoder's dtype and device; lavis: vision_layer_norm_eps)."""
    read = {"released": _read_released, "lavis": _read_lavis, "single": _read_single}[where.layout]
    return read(where, **kw)


def load_subject_encoder(path: str, **kw) -> SubjectEncoder:
    """Any of the supported layouts, recognised from the path."""
    return load(locate(path), **kw)


def load_released(folder: str, **kw) -> SubjectEncoder:
    """The released ``qformer/`` folder (or the model folder containing it)."""
    return _read_released(_released_folder(folder), **kw)


def load_lavis(folder: str, vision_layer_norm_eps: float = LAVIS_VISION_EPS, **kw) -> SubjectEncoder:
    """A LAVIS checkpoint folder (blip_model/blip_weight.pt, proj_layer/proj_weight.pt).

    LAVIS has no config file: the structure comes from the shapes; its vision LayerNorms use
    eps 1e-5 unless ``vision_layer_norm_eps`` says otherwise.
    """
    return _read_lavis(_lavis_folder(folder), vision_layer_norm_eps, **kw)


def load_single_file(path: str, **kw) -> SubjectEncoder:
    """One safetensors (or pickle) file; its "config" metadata, when present, sets the config."""
    return _read_single(_single_file(path), **kw)


def _read_released(where: Location, **kw) -> SubjectEncoder:
    if not where.files:
        raise FileNotFoundError(f"{where.path} has neither {' nor '.join(RELEASED_FILES)}")
    config_path = os.path.join(where.path, "config.json")
    overrides = None
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            overrides = json.load(f)
    return _from_state_dict(read_tensors(where.files[0]), where.files[0], overrides, **kw)


def _read_lavis(where: Location, vision_layer_norm_eps: float = LAVIS_VISION_EPS, **kw) -> SubjectEncoder:
    sd = {}
    for module, rel in LAVIS_FILES.items():
        path = os.path.join(where.path, rel)
        if path not in where.files:
            raise FileNotFoundError(f"LAVIS checkpoint folder {where.path} lacks {rel}")
        for key, value in read_tensors(path).items():
            sd[key if key.startswith(module + ".") else f"{module}.{key}"] = value
    overrides = {"vision_config": {"layer_norm_eps": vision_layer_norm_eps}}
    return _from_state_dict(sd, where.path, overrides, **kw)


def _read_single(where: Location, **kw) -> SubjectEncoder:
    path, overrides = where.path, None
    if path.endswith(".safetensors") and where.files:
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
        if "config" in meta:
            overrides = json.loads(meta["config"])
    return _from_state_dict(read_tensors(path), path, overrides, **kw)
