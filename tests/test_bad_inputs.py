"""The bad-input matrix of docs/bad_inputs.md, driven through a real host's HTTP API.

Every row is one case below (its id is the test id and the id in the doc's table). A case is
refused by the host's validation at /prompt (``rejected``: node_errors name the node and the
input), fails while running with our own message (``failed``: the execution error names the
node type), or is accepted (``ok``, sometimes with a warning in the server log). Each
assertion checks specific words of the message, including the fix it suggests. After the
whole matrix the same server renders a good zero-shot prompt.

Bad weight folders are built in the server's models/blip_diffusion/ from symlinks to the test
model's components, with one component missing, corrupt (random bytes) or truncated (a real
file cut in half); they are removed at the end of the module.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import random
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save_file

from blip_diffusion.api.client import ExecutionFailed, PromptRejected
from blip_diffusion.blip_core import encoder_weights, finetune_io
from blip_diffusion.blip_core.encoder_weights import read_tensors
from blip_diffusion.blip_core.subject import Subject
from blip_diffusion.blip_core.subject_io import FORMAT_KEY, FORMAT_VERSION, load_subject, save_subject
from encoder_files import save_lavis_folder, save_single_file, to_lavis_state_dict
from graphs import api_workflow, put_input_image, zero_shot
from paths import ROOT, TEST_MODEL

SAMPLE = ROOT / "workflows" / "assets" / "sample_subject.png"
SCENE = ROOT / "workflows" / "assets" / "sample_scene.png"
DOC = ROOT / "docs" / "bad_inputs.md"
PREFIX = "bi_"  # every file and folder this module creates in the host's folders
LOADER = {"class_type": "BlipDiffusionLoader", "inputs": {"model_name": TEST_MODEL}}


# --------------------------------------------------------------------------------------------
# Fixtures: bad files and images in the server's folders
# --------------------------------------------------------------------------------------------
def _random_bytes(n: int, seed: int) -> bytes:
    data = bytearray(random.Random(seed).randbytes(n))
    data[:4] = b"\x13\x37junk"[:4]  # never a zip ("PK") or pickle (0x80) start by chance
    return bytes(data)


def _half_of(src: Path, dest: Path) -> None:
    size = src.stat().st_size
    with open(src, "rb") as f, open(dest, "wb") as out:
        remaining = size // 2
        while remaining:
            chunk = f.read(min(remaining, 1 << 24))
            out.write(chunk)
            remaining -= len(chunk)


def _variant_folder(models: Path, test_model_dir: Path, name: str, drop=(), replace=None) -> Path:
    """A model folder of symlinks to the test model's components; ``drop`` leaves components out,
    ``replace`` maps "component/file" to a function writing the bad file there."""
    folder = models / name
    folder.mkdir()
    (folder / "model_index.json").symlink_to(test_model_dir / "model_index.json")
    for part in ("unet", "text_encoder", "vae", "qformer"):
        if part in drop:
            continue
        (folder / part).mkdir()
        for f in (test_model_dir / part).iterdir():
            (folder / part / f.name).symlink_to(f)
    for rel, write in (replace or {}).items():
        path = folder / rel
        if path.is_symlink():
            path.unlink()
        write(path)
    return folder


@dataclass
class Env:
    base: Path
    images: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def env(comfy_server, test_model_dir):
    base = comfy_server.base_dir
    models = base / "models" / "blip_diffusion"
    subjects = base / "models" / "blip_subjects"
    subjects.mkdir(parents=True, exist_ok=True)
    created = []

    def made(p):
        created.append(p)
        return p

    qformer_bin = test_model_dir / "qformer" / "pytorch_model.bin"
    vae_bin = test_model_dir / "vae" / "diffusion_pytorch_model.bin"

    # model folders: one component missing, corrupt or truncated
    made(_variant_folder(models, test_model_dir, "bi-no-qformer", drop=("qformer",)))
    made(_variant_folder(models, test_model_dir, "bi-corrupt-unet", replace={
        "unet/diffusion_pytorch_model.bin": lambda p: p.write_bytes(_random_bytes(1 << 20, 1))}))
    made(_variant_folder(models, test_model_dir, "bi-corrupt-text-encoder", replace={
        "text_encoder/model.safetensors": lambda p: p.write_bytes(_random_bytes(1 << 20, 2))}))
    made(_variant_folder(models, test_model_dir, "bi-truncated-vae", replace={
        "vae/diffusion_pytorch_model.bin": lambda p: _half_of(vae_bin, p)}))
    made(_variant_folder(models, test_model_dir, "bi-truncated-qformer", replace={
        "qformer/pytorch_model.bin": lambda p: _half_of(qformer_bin, p)}))

    # single encoder files: corrupt, truncated, a VAE, and a valid but different encoder
    made(models / "bi_corrupt_encoder.safetensors").write_bytes(_random_bytes(1 << 20, 3))
    made(models / "bi_corrupt_encoder.bin").write_bytes(_random_bytes(1 << 20, 4))
    _half_of(qformer_bin, made(models / "bi_truncated_encoder.bin"))
    made(models / "bi_vae_as_encoder.bin").symlink_to(vae_bin)
    other = encoder_weights.load_released(str(test_model_dir))
    with torch.no_grad():
        other.query_tokens.mul_(1.5)  # other weights: another fingerprint
    save_single_file(other, str(made(models / "bi_other_encoder.safetensors")))
    del other
    _half_of(models / "bi_other_encoder.safetensors", made(models / "bi_truncated_encoder.safetensors"))

    # a LAVIS checkpoint folder (blip_model/ + proj_layer/) of the test encoder, for Load Subject Encoder
    save_lavis_folder(to_lavis_state_dict(read_tensors(str(qformer_bin))), made(models / "bi-lavis-run"))

    # subject files: two good ones for the interpolation cases, bad ones for LoadSubject
    gen = torch.Generator().manual_seed(0)
    for name, cat in (("bi_subject_a", "teapot"), ("bi_subject_b", "vase")):
        made(Path(save_subject(Subject(torch.randn(1, 16, 768, generator=gen), cat, {}), str(subjects), name,
                               overwrite=True)))
    made(subjects / "bi_exists.safetensors").write_bytes((subjects / "bi_subject_a.safetensors").read_bytes())
    made(subjects / "bi_corrupt_subject.safetensors").write_bytes(_random_bytes(50000, 5))
    _half_of(subjects / "bi_subject_a.safetensors", made(subjects / "bi_truncated_subject.safetensors"))
    save_file({"weight": torch.zeros(4, 4)}, str(made(subjects / "bi_not_a_subject.safetensors")))
    # subject files whole on disk but damaged inside: metadata not an object, no category, NaN values
    for name, meta, values in (("bi_meta_list", {"category": "teapot", "meta": "[1, 2]"}, 0.0),
                               ("bi_no_category", {"meta": "{}"}, 0.0),
                               ("bi_nan", {"category": "teapot", "meta": "{}"}, float("nan"))):
        save_file({"embedding": torch.full((1, 16, 768), values)}, str(made(subjects / f"{name}_subject.safetensors")),
                  metadata={FORMAT_KEY: FORMAT_VERSION, **meta})

    # LAVIS checkpoints for Load LAVIS Fine-tune: a VAE's weights, a pickle with a Python object, wrong shapes
    finetunes = base / "models" / "blip_finetunes"
    finetunes.mkdir(parents=True, exist_ok=True)
    made(finetunes / "bi_vae_as_lavis.pth").symlink_to(vae_bin)
    subject = torch.randn(1, 16, 768, generator=gen)
    torch.save({"model": {"ctx_embeddings_cache": subject}, "args": argparse.Namespace(lr=5e-6)},
               made(finetunes / "bi_lavis_pickle.pth"))
    torch.save({"unet.conv_in.weight": torch.zeros(320, 9, 3, 3), "ctx_embeddings_cache": subject},
               made(finetunes / "bi_lavis_unet_shape.pth"))
    torch.save({"ctx_embeddings_cache": torch.zeros(1, 16, 1024)}, made(finetunes / "bi_lavis_subject_shape.pth"))
    torch.save({"model": {"unet.conv_in.bias": torch.zeros(320)}}, made(finetunes / "bi_lavis_no_subject.pth"))
    torch.save({"ctx_embeddings_cache": subject}, made(finetunes / "bi_lavis_subject_only.pth"))
    # the pack's own fine-tune files: one made for another base, one with NaN, one with damaged metadata, a good one
    teapot = Subject(subject.clone(), "teapot", {})
    for name, unet_sd, subj in (("bi_ft_other_base", {"diffusion_model.input_blocks.0.0.diff": torch.zeros(320, 9, 3, 3)},
                                 teapot),
                                ("bi_ft_nan", {"diffusion_model.input_blocks.0.0.diff_b": torch.zeros(320)},
                                 Subject(torch.full((1, 16, 768), float("nan")), "teapot", {})),
                                ("bi_ft_good", {"diffusion_model.input_blocks.0.0.diff_b": torch.zeros(320)}, teapot)):
        made(Path(finetune_io.save_finetune(str(finetunes), name, unet_sd, subj, "full", overwrite=True)))
    save_file({finetune_io.SUBJECT_KEY: subject}, str(made(finetunes / "bi_ft_meta.safetensors")),
              metadata={finetune_io.FORMAT_KEY: finetune_io.FORMAT_VERSION, "mode": "full", "category": "teapot",
                        "subject_meta": "{not json", "meta": "{}"})

    # images
    e = Env(base)
    sample = Image.open(SAMPLE).convert("RGB")
    w, h = sample.size
    pics = {
        "sample": sample,
        "tiny": Image.new("RGB", (1, 1), (200, 60, 40)),
        "large": sample.resize((4096, 4096), Image.BICUBIC),
        "gray": sample.convert("L"),
        "scene": Image.open(SCENE).convert("RGB"),   # 640x480: not square
        "gray_as_rgb": sample.convert("L").convert("RGB"),
    }
    # RGBA: the left half transparent, hiding pure green; alpha only 0 or 255 so compositing is exact
    rgb = np.asarray(sample).copy()
    rgb[:, : w // 2] = (0, 255, 0)
    alpha = np.full((h, w), 255, np.uint8)
    alpha[:, : w // 2] = 0
    pics["rgba"] = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    pics["rgba_rgb_only"] = Image.fromarray(rgb, "RGB")
    white = rgb.copy()
    white[:, : w // 2] = 255
    pics["rgba_over_white"] = Image.fromarray(white, "RGB")
    for key, img in pics.items():
        path = base / "input" / f"{PREFIX}{key}.png"
        img.save(path, compress_level=1)
        e.images[key] = made(path).name
    yield e
    created += list(subjects.glob(f"{PREFIX}*.safetensors"))  # also those the server saved
    for p in created:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Graph builders
# --------------------------------------------------------------------------------------------
def encode_graph(env: Env, image="sample", category="teapot", weights="", preprocess="diffusers",
                 encoder=("loader", 3), image_node=None, save_name=None) -> dict:
    """LoadImage -> SubjectEncode -> SaveSubject, the encoder from ``encoder`` (a link)."""
    g = {
        "loader": copy.deepcopy(LOADER),
        "img": {"class_type": "LoadImage", "inputs": {"image": env.images[image]}},
        "encode": {"class_type": "SubjectEncode", "inputs": {
            "subject_encoder": list(encoder), "images": ["img", 0], "category": category,
            "image_weights": weights, "preprocess": preprocess}},
        "save": {"class_type": "SaveSubject", "inputs": {
            "subject": ["encode", 0], "name": save_name or f"{PREFIX}out_{uuid.uuid4().hex[:8]}",
            "overwrite": True}},
    }
    if image_node:
        g.update(image_node)
        g["encode"]["inputs"]["images"] = [next(iter(image_node)), 0]
    return g


def linked_category_graph(env: Env) -> dict:
    """The category from another node (a link, not a widget value): validation must not refuse it."""
    g = encode_graph(env, category=["cat", 0])
    g["cat"] = {"class_type": "PrimitiveString", "inputs": {"value": "teapot"}}
    return g


def model_loader_graph(env: Env, model_name: str) -> dict:
    g = encode_graph(env)
    g["bad_loader"] = {"class_type": "BlipDiffusionLoader", "inputs": {"model_name": model_name}}
    g["encode"]["inputs"]["subject_encoder"] = ["bad_loader", 3]
    return g


def encoder_loader_graph(env: Env, encoder_name: str) -> dict:
    g = encode_graph(env)
    g["enc_loader"] = {"class_type": "BlipSubjectEncoderLoader", "inputs": {"encoder_name": encoder_name}}
    g["encode"]["inputs"]["subject_encoder"] = ["enc_loader", 0]
    return g


def render_graph(env: Env, seed=1, **positive) -> dict:
    """The shipped zero-shot workflow, tiny: 64 px, 2 steps."""
    g = zero_shot(TEST_MODEL, env.images["sample"], "teapot", "on a beach", seed=seed, steps=2, size=64,
                  save_latent=False)
    g["save"]["inputs"]["filename_prefix"] = f"{PREFIX}render"
    g["positive"]["inputs"].update(positive)
    return g


def edit_graph(env: Env, prompts=None, edit=None, extra=None, size=64) -> dict:
    """The shipped edit_photo workflow, tiny (64 px, 2 + 2 steps); dicts override node inputs."""
    g = api_workflow("edit_photo")
    g["loader"] = copy.deepcopy(LOADER)
    g["reference"]["inputs"]["image"] = env.images["sample"]
    g["scene"]["inputs"]["image"] = env.images["scene"]
    g["photo"]["inputs"]["size"] = size
    g["invert"]["inputs"]["steps"] = 2
    g["edit"]["inputs"].update(steps=2, **(edit or {}))
    g["prompts"]["inputs"].update(prompts or {})
    g["save"]["inputs"]["filename_prefix"] = f"{PREFIX}edit"
    g.update(extra or {})
    return g


def split_sigmas_graph(env: Env, add_noise=True) -> dict:
    """The zero-shot render's 20 PNDM sigmas split at 10: the second half (timesteps 450 .. 0) sampled alone,
    with the published sampler's default full_denoise."""
    g = with_(render_graph(env), "sigmas", steps=20)
    g["split"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["sigmas", 0], "step": 10}}
    g["sample"]["inputs"].update(sigmas=["split", 1], add_noise=add_noise)
    return g


def edit_with_sd3_clip(env: Env) -> dict:
    g = edit_graph(env, extra={"sd3_clip": {"class_type": "CLIPLoader",
                                            "inputs": {"clip_name": "blipdiff-test-clip.bin", "type": "sd3"}}})
    g["prompts"]["inputs"]["clip"] = ["sd3_clip", 0]
    return g


def edit_with_flow_model(env: Env) -> dict:
    g = edit_graph(env, extra={"flow": {"class_type": "ModelSamplingSD3",
                                        "inputs": {"model": ["loader", 0], "shift": 3.0}}})
    g["invert"]["inputs"]["model"] = ["flow", 0]
    return g


def edit_with_x0_model(env: Env) -> dict:
    g = edit_graph(env, extra={"x0": {"class_type": "ModelSamplingDiscrete",
                                      "inputs": {"model": ["loader", 0], "sampling": "x0", "zsnr": False}}})
    g["invert"]["inputs"]["model"] = ["x0", 0]
    return g


def edit_with_sag_model(env: Env) -> dict:
    g = edit_graph(env, extra={"sag": {"class_type": "SelfAttentionGuidance",
                                       "inputs": {"model": ["loader", 0], "scale": 0.5, "blur_sigma": 2.0}}})
    g["edit"]["inputs"]["model"] = ["sag", 0]
    return g


def edit_with_sd3_latent(env: Env) -> dict:
    g = edit_graph(env, extra={"sd3_latent": {"class_type": "EmptySD3LatentImage",
                                              "inputs": {"width": 64, "height": 64, "batch_size": 1}}})
    g["invert"]["inputs"]["latent"] = ["sd3_latent", 0]
    return g


def edit_with_two_photos(env: Env) -> dict:
    g = edit_graph(env, extra={"two": {"class_type": "RepeatImageBatch",
                                       "inputs": {"image": ["photo", 0], "amount": 2}}})
    g["photo_latent"]["inputs"]["pixels"] = ["two", 0]
    return g


def check_edit(r: "Ran"):
    assert len(r.result.outputs["save"]["images"]) == 1


def edit_saving_mask(env: Env, **kw) -> dict:
    return edit_graph(env, **kw, extra={
        "mask_image": {"class_type": "MaskToImage", "inputs": {"mask": ["edit", 2]}},
        "save_mask": {"class_type": "SaveImage", "inputs": {"images": ["mask_image", 0],
                                                            "filename_prefix": f"{PREFIX}mask"}}})


def check_mask_not_empty(r: "Ran"):
    mask = np.asarray(Image.open(io.BytesIO(r.api.view(r.result.outputs["save_mask"]["images"][0]))).convert("L"))
    assert (mask > 127).any(), "the blend mask is empty: the edit changed nothing"


def generate_then_edit(env: Env, steps: int) -> dict:
    g = edit_graph(env, extra={
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}})
    g["edit"]["inputs"].update(latent=["empty", 0], steps=steps)
    return g


def edit_with_photo_mask(env: Env) -> dict:
    g = edit_graph(env)
    g["edit"]["inputs"]["region"] = ["scene", 1]   # LoadImage's mask of a photo without alpha: all black
    return g


REWRITTEN = f"{PREFIX}rewritten"


def seeded_subject(seed: int) -> Subject:
    return Subject(torch.randn(1, 16, 768, generator=torch.Generator().manual_seed(seed)), "teapot", {})


def write_subject(env: Env, seed: int) -> Subject:
    """``seeded_subject(seed)`` saved as REWRITTEN (replacing the file, as Save Subject's overwrite does)."""
    subject = seeded_subject(seed)
    save_subject(subject, str(env.base / "models" / "blip_subjects"), REWRITTEN, overwrite=True)
    return subject


def check_subject_file_read_again(r: "Ran"):
    # the graph copied the first file (seed 21, the case's setup); the same graph after the file was
    # saved again copies the new one
    assert torch.equal(saved_subject(r.env, r.graph).embedding, seeded_subject(21).embedding)
    second = write_subject(r.env, seed=22)
    r.api.run(r.graph)
    assert torch.equal(saved_subject(r.env, r.graph).embedding, second.embedding)


def check_lavis_encoder(r: "Ran"):
    released = encode_via_api(r.api, r.env, "sample")
    assert max_diff(saved_subject(r.env, r.graph).embedding, released) <= 1e-3


def interpolate_graph(env: Env, four=False, **inputs) -> dict:
    g = {"loader": copy.deepcopy(LOADER)}
    corners = "abcd" if four else "ab"
    for k in corners:
        g[f"s_{k}"] = {"class_type": "LoadSubject",
                       "inputs": {"subject_name": f"{PREFIX}subject_{'a' if k in 'ac' else 'b'}.safetensors"}}
    node = {"class_type": "SubjectInterpolate4" if four else "SubjectInterpolate",
            "inputs": {**{f"subject_{k}": [f"s_{k}", 0] for k in corners}, "mode": "linear", "category": "a",
                       "custom_category": "", **({"u": 0.5, "v": 0.5} if four else {"t": 0.5})}}
    node["inputs"].update(inputs)
    g["mix"] = node
    g["save"] = {"class_type": "SaveSubject", "inputs": {"subject": ["mix", 0], "name": f"{PREFIX}mix",
                                                         "overwrite": True}}
    return g


def load_subject_graph(env: Env, subject_name: str) -> dict:
    return {"loader": copy.deepcopy(LOADER),
            "load": {"class_type": "LoadSubject", "inputs": {"subject_name": subject_name}},
            "save": {"class_type": "SaveSubject", "inputs": {"subject": ["load", 0], "name": f"{PREFIX}copy",
                                                             "overwrite": True}}}


def save_subject_graph(env: Env, name: str, overwrite=False) -> dict:
    g = load_subject_graph(env, f"{PREFIX}subject_a.safetensors")
    g["save"]["inputs"].update(name=name, overwrite=overwrite)
    return g


def finetune_graph(env: Env, **inputs) -> dict:
    """LoadImage -> BlipFinetune (tiny: 64 px, 1 step) -> loss plot; ``inputs`` override the node's."""
    g = {"loader": copy.deepcopy(LOADER),
         "img": {"class_type": "LoadImage", "inputs": {"image": env.images["sample"]}},
         "ft": {"class_type": "BlipFinetune", "inputs": {
             "model": ["loader", 0], "clip": ["loader", 1], "vae": ["loader", 2], "subject_encoder": ["loader", 3],
             "images": ["img", 0], "category": "teapot", "steps": 1, "learning_rate": 5e-6, "batch_size": 1,
             "seed": 0, "resolution": 64, "mode": "lora", "lora_rank": 4, "gradient_checkpointing": False}},
         "plot": {"class_type": "SaveImage", "inputs": {"images": ["ft", 2], "filename_prefix": f"{PREFIX}loss"}}}
    g["ft"]["inputs"].update(inputs)
    return g


def save_finetune_graph(env: Env, name: str) -> dict:
    g = finetune_graph(env)
    g["save_ft"] = {"class_type": "SaveBlipFinetune", "inputs": {"finetune": ["ft", 3], "name": name,
                                                                 "overwrite": True}}
    return g


def load_finetune_graph(env: Env, name: str) -> dict:
    return {"loader": copy.deepcopy(LOADER),
            "load_ft": {"class_type": "LoadBlipFinetune", "inputs": {"model": ["loader", 0], "finetune_name": name,
                                                                     "strength": 1.0}},
            "save": {"class_type": "SaveSubject", "inputs": {"subject": ["load_ft", 1], "name": f"{PREFIX}ftcopy",
                                                             "overwrite": True}}}


def lavis_graph(env: Env, name: str, category: str = "teapot") -> dict:
    return {"loader": copy.deepcopy(LOADER),
            "lavis": {"class_type": "LoadLavisFinetune", "inputs": {"model": ["loader", 0], "checkpoint_name": name,
                                                                    "category": category}},
            "save": {"class_type": "SaveSubject", "inputs": {"subject": ["lavis", 1], "name": f"{PREFIX}lavis",
                                                             "overwrite": True}}}


def with_(graph: dict, node: str, **inputs) -> dict:
    graph[node]["inputs"].update(inputs)
    return graph


def sd3_clip_graph(env):
    g = render_graph(env)
    g["sd3_clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "blipdiff-test-clip.bin", "type": "sd3"}}
    g["positive"]["inputs"]["clip"] = ["sd3_clip", 0]
    return g


def flow_model_graph(env):
    g = render_graph(env)
    g["flow"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["loader", 0], "shift": 3.0}}
    g["sigmas"]["inputs"]["model"] = ["flow", 0]
    g["sample"]["inputs"]["model"] = ["flow", 0]
    return g


def controlnet_graph(env, model_name):
    g = render_graph(env)
    g["cnet"] = {"class_type": "BlipControlNetLoader", "inputs": {"model_name": model_name}}
    g["apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["positive", 0], "negative": ["negative", 0], "control_net": ["cnet", 0],
        "image": ["reference", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    g["sample"]["inputs"].update(positive=["apply", 0], negative=["apply", 1])
    return g


def other_encoder_subject_graph(env):
    """LoadSubject of a subject made by the model's encoder, with a different encoder connected."""
    g = render_graph(env, seed=3)
    g["other_enc"] = {"class_type": "BlipSubjectEncoderLoader",
                      "inputs": {"encoder_name": f"{PREFIX}other_encoder.safetensors"}}
    g["load"] = {"class_type": "LoadSubject", "inputs": {"subject_name": f"{PREFIX}main_subject.safetensors",
                                                         "subject_encoder": ["other_enc", 0]}}
    g["positive"]["inputs"]["subject"] = ["load", 0]
    return g


def make_main_subject(api, env):
    """Setup of load-other-encoder: a subject saved from the model's own encoder."""
    api.run(encode_graph(env, save_name=f"{PREFIX}main_subject"))


# --------------------------------------------------------------------------------------------
# Checks of accepted cases
# --------------------------------------------------------------------------------------------
@dataclass
class Ran:
    """What an accepted case's check sees."""
    api: object
    env: Env
    graph: dict
    result: object
    rss_before: int
    rss_after: int


def saved_subject(env: Env, graph: dict, node: str = "save") -> Subject:
    name = graph[node]["inputs"]["name"]
    return load_subject(str(env.base / "models" / "blip_subjects" / f"{name}.safetensors"))


def encode_via_api(api, env, image, **kw) -> torch.Tensor:
    graph = encode_graph(env, image=image, **kw)
    api.run(graph)
    return saved_subject(env, graph).embedding


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def check_gray(r: Ran):
    # LoadImage converts "L" to RGB: the node sees three equal channels, as from an RGB copy
    assert max_diff(saved_subject(r.env, r.graph).embedding, encode_via_api(r.api, r.env, "gray_as_rgb")) <= 1e-6


def check_rgba_loadimage(r: Ran):
    # LoadImage drops alpha: the hidden green under transparent pixels is what the encoder sees
    got = saved_subject(r.env, r.graph).embedding
    assert max_diff(got, encode_via_api(r.api, r.env, "rgba_rgb_only")) <= 1e-6
    assert max_diff(got, encode_via_api(r.api, r.env, "rgba_over_white")) > 1e-4


def check_rgba_joined(r: Ran):
    # LoadImage's MASK joined back: a 4-channel image, composited over white by SubjectEncode
    got = saved_subject(r.env, r.graph).embedding
    assert max_diff(got, encode_via_api(r.api, r.env, "rgba_over_white")) <= 1e-6


def check_large(r: Ran):
    assert saved_subject(r.env, r.graph).embedding.shape == (1, 16, 768)
    # a 4096^2 image is 200 MB as floats; the node must not multiply that
    grown = r.rss_after - r.rss_before
    print(f"server RSS {r.rss_before / 2**30:.2f} -> {r.rss_after / 2**30:.2f} GiB for a 4096x4096 subject photo")
    assert grown < 1.5 * 2**30


def check_render(r: Ran):
    assert len(r.result.images()) == 1


def queue_allowing_nan(api, prompt: dict) -> str:
    """POST /prompt with NaN written as JSON's NaN literal (Python's json does; requests refuses)."""
    r = requests.post(api.url + "/prompt", data=json.dumps({"prompt": prompt, "client_id": api.client_id}),
                      headers={"Content-Type": "application/json"}, timeout=60)
    body = r.json()
    if r.status_code != 200 or body.get("node_errors"):
        raise PromptRejected(body)
    return body["prompt_id"]


# --------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    node: str                      # the node type named by the error (or the node under test)
    graph: Callable[[Env], dict]
    outcome: str                   # "rejected" | "failed" | "ok"
    expect: tuple = ()             # substrings of the message shown to the user (all required)
    log: tuple = ()                # substrings of the server log (warnings)
    check: Callable | None = None  # extra check of an accepted case, given a Ran
    setup: Callable | None = None
    nan: bool = False              # the graph holds NaN: sent as a JSON NaN literal


CORRUPT = ("corrupt or truncated", "Download or copy the file again")
RESAVE = ("choose another file, or encode the subject again and save it",)

CASES = [
    # ---- Load BLIP-Diffusion
    Case("loader-empty-name", "BlipDiffusionLoader", lambda e: model_loader_graph(e, ""), "failed",
         ("BLIP-Diffusion model folder '' not found", "the folders there are", f"'{TEST_MODEL}'",
          "choose one in the node's list, or put the released folder (with model_index.json) into "
          "models/blip_diffusion/")),
    Case("loader-missing-qformer", "BlipDiffusionLoader", lambda e: model_loader_graph(e, "bi-no-qformer"), "failed",
         ("'bi-no-qformer' has no qformer/ subfolder", "copy the complete released folder")),
    Case("loader-corrupt-unet", "BlipDiffusionLoader", lambda e: model_loader_graph(e, "bi-corrupt-unet"), "failed",
         ("bi-corrupt-unet/unet weights", "neither a safetensors file nor a torch checkpoint", *CORRUPT)),
    Case("loader-corrupt-text-encoder", "BlipDiffusionLoader",
         lambda e: model_loader_graph(e, "bi-corrupt-text-encoder"), "failed",
         ("bi-corrupt-text-encoder/text_encoder weights", "model.safetensors", "safetensors header", *CORRUPT)),
    Case("loader-truncated-vae", "BlipDiffusionLoader", lambda e: model_loader_graph(e, "bi-truncated-vae"),
         "failed", ("bi-truncated-vae/vae weights", "zip archive is incomplete", *CORRUPT)),
    Case("loader-truncated-qformer", "BlipDiffusionLoader",
         lambda e: model_loader_graph(e, "bi-truncated-qformer"), "failed",
         ("bi-truncated-qformer/qformer weights", "zip archive is incomplete", *CORRUPT)),
    # ---- Load Subject Encoder
    Case("encloader-empty-name", "BlipSubjectEncoderLoader", lambda e: encoder_loader_graph(e, ""), "failed",
         ("subject encoder '' not found in models/blip_diffusion/", "choose it in encoder_name")),
    Case("encloader-missing-qformer", "BlipSubjectEncoderLoader",
         lambda e: encoder_loader_graph(e, "bi-no-qformer"), "failed",
         ("'bi-no-qformer' has no qformer/ subfolder", "choose an encoder file")),
    Case("encloader-corrupt-safetensors", "BlipSubjectEncoderLoader",
         lambda e: encoder_loader_graph(e, "bi_corrupt_encoder.safetensors"), "failed",
         ("subject encoder 'bi_corrupt_encoder.safetensors'", "safetensors header", *CORRUPT)),
    Case("encloader-corrupt-bin", "BlipSubjectEncoderLoader",
         lambda e: encoder_loader_graph(e, "bi_corrupt_encoder.bin"), "failed",
         ("neither a safetensors file nor a torch checkpoint", *CORRUPT)),
    Case("encloader-truncated-bin", "BlipSubjectEncoderLoader",
         lambda e: encoder_loader_graph(e, "bi_truncated_encoder.bin"), "failed",
         ("zip archive is incomplete", *CORRUPT)),
    Case("encloader-truncated-safetensors", "BlipSubjectEncoderLoader",
         lambda e: encoder_loader_graph(e, "bi_truncated_encoder.safetensors"), "failed",
         ("but its header describes", *CORRUPT)),
    Case("encloader-lavis-folder", "BlipSubjectEncoderLoader", lambda e: encoder_loader_graph(e, "bi-lavis-run"),
         "ok", check=check_lavis_encoder),
    Case("encloader-vae-file", "BlipSubjectEncoderLoader",
         lambda e: encoder_loader_graph(e, "bi_vae_as_encoder.bin"), "failed",
         ("is not a BLIP-Diffusion subject encoder", "encoder.conv_in.weight",
          "choose a BLIP-Diffusion model folder (its qformer/) or a subject encoder file")),
    # ---- Subject Encode
    Case("encode-empty-category", "SubjectEncode", lambda e: encode_graph(e, category=""), "rejected",
         ("category is empty", "name what the subject is, e.g. 'dog'")),
    Case("encode-blank-category", "SubjectEncode", lambda e: encode_graph(e, category="   "), "rejected",
         ("category is empty", "name what the subject is, e.g. 'dog'")),
    Case("encode-long-category", "SubjectEncode", lambda e: encode_graph(e, category="dog " * 600), "failed",
         ("category is too long", "at most 512")),
    Case("encode-weights-not-numbers", "SubjectEncode", lambda e: encode_graph(e, weights="a, b"), "failed",
         ("image_weights must be numbers separated by commas",)),
    Case("encode-weights-count", "SubjectEncode", lambda e: encode_graph(e, weights="1, 2"), "failed",
         ("image_weights has 2 numbers but 1 images are connected",)),
    Case("encode-weights-negative", "SubjectEncode", lambda e: encode_graph(e, weights="-1"), "failed",
         ("must be finite and non-negative",)),
    Case("encode-unknown-preprocess", "SubjectEncode", lambda e: encode_graph(e, preprocess="bogus"), "failed",
         ("unknown preprocessing mode 'bogus'; choose one of ('diffusers', 'lavis')",)),
    Case("encode-linked-category", "SubjectEncode", linked_category_graph, "ok"),
    Case("encode-vae-as-encoder", "SubjectEncode", lambda e: encode_graph(e, encoder=("loader", 2)), "rejected",
         ("Return type mismatch", "subject_encoder", "received_type(VAE)", "input_type(SUBJECT_ENCODER)")),
    Case("encode-image-1x1", "SubjectEncode", lambda e: encode_graph(e, image="tiny"), "ok",
         log=("SubjectEncode: the subject image is only 1x1 pixels", "use a photo at least 224 pixels wide")),
    Case("encode-image-4096", "SubjectEncode", lambda e: encode_graph(e, image="large"), "ok", check=check_large),
    Case("encode-image-gray", "SubjectEncode", lambda e: encode_graph(e, image="gray"), "ok", check=check_gray),
    Case("encode-image-rgba-loadimage", "SubjectEncode", lambda e: encode_graph(e, image="rgba"), "ok",
         check=check_rgba_loadimage),
    Case("encode-image-rgba-joined", "SubjectEncode", lambda e: encode_graph(e, image="rgba", image_node={
        "join": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["img", 0], "alpha": ["img", 1]}}}),
         "ok", check=check_rgba_joined),
    Case("encode-image-0x0", "SubjectEncode", lambda e: encode_graph(e, image_node={
        "shrink": {"class_type": "ImageScaleToMaxDimension",
                   "inputs": {"image": ["img", 0], "upscale_method": "area", "largest_size": 0}}}), "failed",
         ("SubjectEncode got an empty image batch (1, 0, 0, 3)", "connect at least one photo")),
    # encode-batch-0: in-process, see test_empty_image_batch_in_process below
    # ---- Subject Conditioning
    Case("cond-sdxl-like-clip", "SubjectConditioning", sd3_clip_graph, "failed",
         ("needs an SD 1.x CLIP", "CLIPLoader with type 'stable_diffusion'", "SD2, SDXL, SD3 and Flux")),
    Case("cond-vae-as-clip", "SubjectConditioning", lambda e: with_(render_graph(e), "positive", clip=["loader", 2]),
         "rejected", ("Return type mismatch", "clip, received_type(VAE) mismatch input_type(CLIP)")),
    Case("cond-strength-below-min", "SubjectConditioning", lambda e: render_graph(e, prompt_strength=0.0),
         "rejected", ("Value 0.0 smaller than min of 0.05", "prompt_strength")),
    Case("cond-reps-above-max", "SubjectConditioning", lambda e: render_graph(e, prompt_reps=101), "rejected",
         ("Value 101 bigger than max of 100", "prompt_reps")),
    Case("cond-repeats-below-one", "SubjectConditioning",
         lambda e: render_graph(e, prompt_strength=0.05, prompt_reps=10), "failed",
         ("prompt_strength x prompt_reps must be at least 1", "0.05 x 10")),
    Case("cond-strength-nan", "SubjectConditioning", lambda e: render_graph(e, prompt_strength=float("nan")),
         "failed", ("prompt_strength must be a finite number, got nan",), nan=True),
    Case("cond-blank-prompt-and-target", "SubjectConditioning",
         lambda e: render_graph(e, seed=2, prompt="", target_category="   "), "ok", check=check_render),
    # ---- PNDM Scheduler / Sampler
    Case("sched-steps-1", "BlipPNDMScheduler", lambda e: with_(render_graph(e), "sigmas", steps=1), "rejected",
         ("Value 1 smaller than min of 2", "steps")),
    Case("sampler-start-too-low", "SamplerCustom", lambda e: with_(render_graph(e), "sigmas", steps=400), "failed",
         ("400 steps starting at timestep 798 of 1000 cannot start from pure noise", "use 333 steps instead",
          "or turn full_denoise off for image-to-image")),
    Case("sampler-split-sigmas-with-noise", "SamplerCustom", split_sigmas_graph, "failed",
         ("10 steps starting at timestep 450 of 1000 cannot start from pure noise",
          "turn full_denoise off for split sigmas, denoise below 1 or image-to-image")),
    Case("sampler-split-sigmas-without-noise", "SamplerCustom", lambda e: split_sigmas_graph(e, add_noise=False),
         "ok", check=check_render),
    Case("sched-steps-1001", "BlipPNDMScheduler", lambda e: with_(render_graph(e), "sigmas", steps=1001),
         "rejected", ("Value 1001 bigger than max of 1000", "steps")),
    Case("sched-clip-as-model", "BlipPNDMScheduler",
         lambda e: with_(render_graph(e), "sigmas", model=["loader", 1]), "rejected",
         ("Return type mismatch", "model, received_type(CLIP) mismatch input_type(MODEL)")),
    Case("sampler-flow-model", "SamplerCustom", flow_model_graph, "failed",
         ("BLIP-Diffusion PNDM Sampler needs a noise-prediction (SD 1.x style) model",
          "without flow patches such as ModelSamplingSD3")),
    # ---- Save Subject / Load Subject
    Case("save-empty-name", "SaveSubject", lambda e: save_subject_graph(e, ""), "failed",
         ("subject name '' is not allowed", "use letters, digits")),
    Case("save-path-name", "SaveSubject", lambda e: save_subject_graph(e, "../escape"), "failed",
         ("subject name '../escape' is not allowed", "no folders")),
    Case("save-exists", "SaveSubject", lambda e: save_subject_graph(e, "bi_exists"), "failed",
         ("bi_exists.safetensors already exists", "choose another name or enable overwrite")),
    Case("load-file-saved-again", "LoadSubject", lambda e: load_subject_graph(e, f"{REWRITTEN}.safetensors"),
         "ok", check=check_subject_file_read_again, setup=lambda api, e: write_subject(e, seed=21)),
    Case("load-empty-name", "LoadSubject", lambda e: load_subject_graph(e, ""), "failed",
         ("subject file '' not found in models/blip_subjects/", "save one with Save Subject first")),
    Case("load-corrupt-file", "LoadSubject", lambda e: load_subject_graph(e, "bi_corrupt_subject.safetensors"),
         "failed", ("bi_corrupt_subject.safetensors is not a readable subject file", *RESAVE)),
    Case("load-truncated-file", "LoadSubject",
         lambda e: load_subject_graph(e, "bi_truncated_subject.safetensors"), "failed",
         ("bi_truncated_subject.safetensors is not a readable subject file", *RESAVE)),
    Case("load-not-a-subject", "LoadSubject", lambda e: load_subject_graph(e, "bi_not_a_subject.safetensors"),
         "failed", ("is not a BLIP-Diffusion subject file (made by SaveSubject)", *RESAVE)),
    Case("load-meta-not-object", "LoadSubject", lambda e: load_subject_graph(e, "bi_meta_list_subject.safetensors"),
         "failed", ("bi_meta_list_subject.safetensors: its metadata is damaged", *RESAVE)),
    Case("load-no-category", "LoadSubject", lambda e: load_subject_graph(e, "bi_no_category_subject.safetensors"),
         "failed", ("bi_no_category_subject.safetensors names no category", *RESAVE)),
    Case("load-nan-values", "LoadSubject", lambda e: load_subject_graph(e, "bi_nan_subject.safetensors"),
         "failed", ("bi_nan_subject.safetensors: its embedding holds NaN or infinite values", *RESAVE)),
    Case("load-other-encoder", "LoadSubject", other_encoder_subject_graph, "ok",
         log=("LoadSubject: bi_main_subject.safetensors was made by a different subject encoder",
              "it may not match this model"), check=check_render, setup=make_main_subject),
    # ---- Subject Interpolate (2 and 4 corners)
    Case("interp-t-above-max", "SubjectInterpolate", lambda e: interpolate_graph(e, t=1.5), "rejected",
         ("Value 1.5 bigger than max of 1.0", "t")),
    Case("interp-t-nan", "SubjectInterpolate", lambda e: interpolate_graph(e, t=float("nan")), "failed",
         ("t must be a finite number in [0, 1], got nan",), nan=True),
    Case("interp-unknown-mode", "SubjectInterpolate", lambda e: interpolate_graph(e, mode="cubic"), "failed",
         ("mode must be one of ('linear', 'spherical'), got 'cubic'",)),
    Case("interp-custom-category-blank", "SubjectInterpolate",
         lambda e: interpolate_graph(e, category="custom", custom_category="  "), "failed",
         ("category is 'custom' but custom_category is empty", "type the category word")),
    Case("interp4-u-below-min", "SubjectInterpolate4", lambda e: interpolate_graph(e, four=True, u=-0.1),
         "rejected", ("Value -0.1 smaller than min of 0.0", "u")),
    Case("interp4-v-nan", "SubjectInterpolate4", lambda e: interpolate_graph(e, four=True, v=float("nan")),
         "failed", ("v must be a finite number in [0, 1], got nan",), nan=True),
    # ---- Load BLIP-Diffusion ControlNet
    Case("cnet-empty-name", "BlipControlNetLoader", lambda e: controlnet_graph(e, ""), "failed",
         ("BLIP-Diffusion model folder '' not found",)),
    Case("cnet-missing-controlnet", "BlipControlNetLoader", lambda e: controlnet_graph(e, "bi-no-qformer"), "failed",
         ("'bi-no-qformer' has no controlnet/ subfolder", "choose a folder that ships the ControlNet")),
    # ---- BLIP-Diffusion Fine-tune, Save / Load Fine-tune
    Case("ft-steps-0", "BlipFinetune", lambda e: finetune_graph(e, steps=0), "rejected",
         ("Value 0 smaller than min of 1", "steps")),
    Case("ft-lr-0", "BlipFinetune", lambda e: finetune_graph(e, learning_rate=0.0), "failed",
         ("learning_rate must be a positive number (got 0.0)", "the published value is 5e-6")),
    Case("ft-category-blank", "BlipFinetune", lambda e: finetune_graph(e, category="  "), "failed",
         ("category is empty", "e.g. 'dog'")),
    Case("ft-unknown-mode", "BlipFinetune", lambda e: finetune_graph(e, mode="dreambooth"), "failed",
         ("mode must be one of ['full', 'lora'], got 'dreambooth'",)),
    Case("ft-save-traversal", "SaveBlipFinetune", lambda e: save_finetune_graph(e, "../escape"), "failed",
         ("file name '../escape' is not allowed",)),
    Case("ft-load-empty-name", "LoadBlipFinetune", lambda e: load_finetune_graph(e, ""), "failed",
         ("fine-tune file '' not found in models/blip_finetunes/",)),
    Case("ft-load-other-base", "LoadBlipFinetune", lambda e: load_finetune_graph(e, "bi_ft_other_base.safetensors"),
         "failed", ("bi_ft_other_base.safetensors does not fit this MODEL: 1 of its tensors have no place of their shape",
                    "diffusion_model.input_blocks.0.0.diff is (320, 9, 3, 3), this MODEL's (320, 4, 3, 3)",
                    "Connect the base model it was fine-tuned from")),
    Case("ft-load-nan-values", "LoadBlipFinetune", lambda e: load_finetune_graph(e, "bi_ft_nan.safetensors"),
         "failed", ("bi_ft_nan.safetensors holds NaN or infinite values (blip_subject.embedding)",)),
    Case("ft-load-damaged-metadata", "LoadBlipFinetune", lambda e: load_finetune_graph(e, "bi_ft_meta.safetensors"),
         "failed", ("bi_ft_meta.safetensors: its metadata is damaged (the 'subject_meta' entry is not a JSON object)",)),
    Case("ft-load-strength-nan", "LoadBlipFinetune",
         lambda e: with_(load_finetune_graph(e, "bi_ft_good.safetensors"), "load_ft", strength=float("nan")), "failed",
         ("strength must be a finite number, got nan",), nan=True),
    # ---- Load LAVIS Fine-tune
    Case("lavis-empty-name", "LoadLavisFinetune", lambda e: lavis_graph(e, ""), "failed",
         ("LAVIS checkpoint file '' not found in models/blip_finetunes/", "copy the checkpoint_N.pth")),
    Case("lavis-not-lavis", "LoadLavisFinetune", lambda e: lavis_graph(e, "bi_vae_as_lavis.pth"), "failed",
         ("bi_vae_as_lavis.pth is not a LAVIS BLIP-Diffusion checkpoint", "no 'unet.*' tensors",
          "Choose the checkpoint_N.pth")),
    Case("lavis-pickled-object", "LoadLavisFinetune", lambda e: lavis_graph(e, "bi_lavis_pickle.pth"), "failed",
         ("holds Python objects (argparse.Namespace)", "would run code from the file",
          "torch.load(weights_only=True), which refuses that")),
    Case("lavis-unet-shape", "LoadLavisFinetune", lambda e: lavis_graph(e, "bi_lavis_unet_shape.pth"), "failed",
         ("the checkpoint's UNet does not fit this MODEL",
          "tensors 1 of another shape (conv_in.weight is (320, 9, 3, 3), this MODEL's (320, 4, 3, 3))",
          "Connect the base model the checkpoint was fine-tuned from")),
    Case("lavis-subject-shape", "LoadLavisFinetune", lambda e: lavis_graph(e, "bi_lavis_subject_shape.pth"),
         "failed", ("the checkpoint's subject is 1024 wide but this MODEL's UNet reads 768-wide text",)),
    Case("lavis-no-subject", "LoadLavisFinetune", lambda e: lavis_graph(e, "bi_lavis_no_subject.pth"), "failed",
         ("has UNet weights but no 'ctx_embeddings_cache'", "Choose the checkpoint_N.pth of the fine-tuning run")),
    Case("lavis-no-category", "LoadLavisFinetune", lambda e: lavis_graph(e, "bi_lavis_subject_only.pth", ""),
         "failed", ("does not name its subject's category", "type it in category, e.g. 'dog'")),
    # ---- Subject editing
    Case("edit-source-blank", "SubjectEditPrompts", lambda e: edit_graph(e, prompts={"source_subject": "  "}),
         "failed", ("source_subject is empty", "e.g. 'dog'")),
    Case("edit-blend-word-missing", "SubjectEditPrompts", lambda e: edit_graph(e, prompts={"blend_words": "cat"}),
         "failed", ("blend word(s) ['cat'] are not words of the source prompt 'a dog standing on the grass'",)),
    Case("edit-prompt-too-long", "SubjectEditPrompts",
         lambda e: edit_graph(e, prompts={"prompt": " ".join(["running"] * 60)}), "failed",
         ("BLIP-Diffusion reads 59", "16 placeholder words count too", "shorten the prompt by")),
    Case("edit-sdxl-like-clip", "SubjectEditPrompts", edit_with_sd3_clip, "failed",
         ("needs an SD 1.x CLIP", "CLIPLoader with type 'stable_diffusion'")),
    Case("edit-flow-model", "SubjectEditInvert", edit_with_flow_model, "failed",
         ("subject editing needs the BLIP-Diffusion UNet", "ModelSamplingSD3")),
    Case("edit-x0-model", "SubjectEditInvert", edit_with_x0_model, "failed",
         ("subject editing needs the BLIP-Diffusion UNet", "samples as ModelSamplingAdvanced",
          "ModelSamplingDiscrete other than eps")),
    Case("edit-sd3-latent", "SubjectEditInvert", edit_with_sd3_latent, "failed",
         ("Subject Edit Invert needs an SD 1.x latent (4 channels", "got shape (1, 16, 8, 8)",
          "encode the photo with the BLIP-Diffusion VAE")),
    Case("edit-model-with-attention-patch", "SubjectEdit", edit_with_sag_model, "ok",
         log=("Subject Edit: the MODEL already replaces attention in 1 block(s)", "that patch does not apply"),
         check=check_edit),
    Case("edit-cross-replace-nan", "SubjectEdit", lambda e: edit_graph(e, edit={"cross_replace": float("nan")}),
         "failed", ("cross_replace must be a finite number, got nan",), nan=True),
    Case("edit-two-photos", "SubjectEditInvert", edit_with_two_photos, "failed",
         ("takes one photo, got a batch of 2", "edit photos one at a time")),
    # (128 px: a graph no other case runs, so the host cannot serve the photo node from its cache)
    Case("edit-photo-not-square", "SubjectEditPhoto", lambda e: edit_graph(e, size=128), "ok",
         log=("the 640x480 photo is not square; its centre 480x480 is edited and 160 px of its width are cut off",),
         check=check_edit),
    Case("edit-empty-mask", "SubjectEdit", lambda e: edit_graph(e, edit={"blend_threshold": 1.0}), "ok",
         log=("the blend mask is empty (threshold 1.00)", "lower blend_threshold"), check=check_edit),
    Case("edit-size-not-multiple-of-32", "SubjectEdit", lambda e: edit_saving_mask(e, size=72), "ok",
         check=check_mask_not_empty),
    Case("edit-blend-word-with-period", "SubjectEditPrompts", lambda e: edit_saving_mask(
        e, prompts={"prompt": "standing on the  grass.", "blend_words": "grass"}), "ok", check=check_mask_not_empty),
    Case("edit-ddim-1000-steps", "SubjectEditInvert", lambda e: with_(edit_graph(e), "invert", steps=1000), "failed",
         ("DDIM takes at most 999 steps here, got 1000",)),
    Case("edit-generate-start-too-low", "SubjectEdit", lambda e: generate_then_edit(e, 400), "failed",
         ("generating the scene: 400 steps starting at timestep 798", "use 333 steps instead")),
    Case("edit-region-all-black", "SubjectEdit", edit_with_photo_mask, "failed",
         ("region is empty (an all-black mask", "paint where the edit may change the photo")),
]
IN_PROCESS = ["encode-batch-0"]


def rejection_text(payload: dict, node: str) -> str:
    """The node_errors of ``node``'s type, as the UI lists them: message and details of each."""
    errors = [err for entry in payload.get("node_errors", {}).values() if entry.get("class_type") == node
              for err in entry["errors"]]
    assert errors, f"no node_errors for {node}: {json.dumps(payload)[:2000]}"
    return "\n".join(f"{err['message']}: {err['details']}" for err in errors)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, comfy_server, api, env):
    if case.setup:
        case.setup(api, env)
    if case.nan:
        api.queue = lambda prompt: queue_allowing_nan(api, prompt)
    graph = case.graph(env)
    start = len(comfy_server.log())
    rss_before = comfy_server.rss_bytes()
    text = ""
    if case.outcome == "rejected":
        with pytest.raises(PromptRejected) as err:
            api.run(graph)
        text = rejection_text(err.value.payload, case.node)
    elif case.outcome == "failed":
        with pytest.raises(ExecutionFailed) as err:
            api.run(graph)
        assert err.value.node_type == case.node, err.value.details
        text = err.value.message
    else:
        result = api.run(graph)
        if case.check:
            case.check(Ran(api, env, graph, result, rss_before, comfy_server.rss_bytes()))
    print(f"[{case.id}] {text}")
    for part in case.expect:
        assert part in text, f"{part!r} not in the message:\n{text}"
    log = comfy_server.log()[start:]
    for part in case.log:
        assert part in log, f"{part!r} not in the server log:\n{log[-3000:]}"


def test_empty_image_batch_in_process():
    """encode-batch-0: no host node makes an IMAGE batch of 0 through the API, so the node runs directly."""
    from conftest import comfy_on_path

    comfy_on_path()
    from blip_diffusion.nodes.nodes_encoder import SubjectEncode

    with pytest.raises(ValueError, match=r"SubjectEncode got an empty image batch \(0, 64, 64, 3\): connect at least"):
        SubjectEncode.execute(None, torch.zeros(0, 64, 64, 3), "dog")


def test_doc_table_lists_every_case():
    ids = set(c.id for c in CASES) | set(IN_PROCESS)
    last_cells = [line.strip().strip("|").split("|")[-1].strip() for line in DOC.read_text().splitlines()
                  if line.startswith("| ")]
    documented = {cell.strip("`") for cell in last_cells if re.fullmatch(r"`[a-z0-9-]+`", cell)}
    assert ids - documented == set(), "cases missing from docs/bad_inputs.md"
    assert documented - ids == set(), "docs/bad_inputs.md names cases the test does not run"


def test_server_renders_after_the_matrix(comfy_server, api, env):
    """Runs last in this module: after every bad input above, a good prompt still renders."""
    result = api.run(render_graph(env, seed=99))
    assert len(result.images()) == 1
    # and the server still answers its other endpoints
    assert api.get("/queue").json()["queue_running"] == []
