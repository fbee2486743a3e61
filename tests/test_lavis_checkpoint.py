"""Load LAVIS Fine-tune through a real host's HTTP API, and the LAVIS checkpoint reader in-process.

A checkpoint in the layout LAVIS's runner writes (``checkpoint_3.pth``: ``{"model": state dict,
"optimizer", "config", "scaler", "iters"}``, the state dict holding ``unet.<diffusers key>`` for every
UNet tensor, ``ctx_embeddings_cache`` and a frozen part's buffer) is made from the generated test
weights: a few UNet tensors get seeded noise, the subject is seeded random. Its render (Load
BLIP-Diffusion -> Load LAVIS Fine-tune -> Subject Conditioning -> PNDM) must match a render of the
same weights set directly: the changed UNet written as a host-layout file for the host's UNETLoader
and the subject as a Save Subject file for Load Subject. A partial checkpoint (only the changed
tensors, a bare state dict) must give the same model. Renders compare final latents (SaveLatent).
"""
from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip_diffusion.blip_core import lavis_checkpoint as lc
from blip_diffusion.blip_core.subject import Subject
from blip_diffusion.blip_core.subject_io import save_subject
from paths import TEST_MODEL

SIZE, STEPS, SEED = 64, 3, 5
PROMPT = "on a beach"
CATEGORY = "teapot"
TAG = uuid.uuid4().hex[:6]
FULL, PARTIAL = "checkpoint_3.pth", f"lv_{TAG}_partial.pth"
DIRECT_UNET, SUBJECT_FILE = f"lv_{TAG}_direct_unet.safetensors", f"lv_{TAG}_subject"
CHANGED = ["conv_in.weight", "conv_out.bias", "time_embedding.linear_1.weight",
           "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
           "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight",
           "up_blocks.2.attentions.1.proj_out.weight"]


def changed_unet(base: dict) -> dict:
    """The base UNet (diffusers names) with seeded noise of 0.5x each tensor's spread on CHANGED."""
    gen = torch.Generator().manual_seed(1234)
    out = dict(base)
    for key in CHANGED:
        t = base[key].float()
        out[key] = t + 0.5 * max(t.std().item(), 1e-2) * torch.randn(t.shape, generator=gen)
    return out


def lavis_wrapper(state_dict: dict) -> dict:
    """What LAVIS's runner_iter saves: the model's state dict plus the run's optimiser, config, scaler, iters."""
    params = [torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.zeros(4))]
    opt = torch.optim.AdamW(params, lr=5e-6, weight_decay=0.01)
    sum(p.sum() for p in params).backward()
    opt.step()
    config = {"model": {"arch": "blip_diffusion", "model_type": "base", "qformer_train": False,
                        "sd_train_text_encoder": False, "vae_half_precision": True},
              "datasets": {"blip_diffusion_finetune": {"build_info": {"subject_text": "Teapot",
                                                                      "images": {"storage": "/data/teapot"}}}},
              "run": {"runner": "runner_iter", "max_iters": 3, "init_lr": 5e-6, "batch_size_train": 3, "amp": True}}
    return {"model": state_dict, "optimizer": opt.state_dict(), "config": config,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 3}, "iters": 3}


@pytest.fixture(scope="module")
def files(comfy_server, test_model_dir):
    """The checkpoints in models/blip_finetunes/, the directly-set UNet and subject; removed at the end."""
    from conftest import comfy_on_path

    comfy_on_path()
    from blip_diffusion.nodes import host_models

    models = comfy_server.base_dir / "models"
    unet_dir = test_model_dir / "unet"
    base = torch.load(str(unet_dir / "diffusion_pytorch_model.bin"), map_location="cpu", weights_only=True, mmap=True)
    unet = changed_unet(base)
    subject = torch.randn(1, 16, 768, generator=torch.Generator().manual_seed(99))
    buffers = {"blip.Qformer.bert.embeddings.position_ids": torch.arange(512)[None]}
    made = []

    def out(folder, name):
        (models / folder).mkdir(parents=True, exist_ok=True)
        made.append(models / folder / name)
        return made[-1]

    full = {**{f"unet.{k}": v for k, v in unet.items()}, "ctx_embeddings_cache": subject, **buffers}
    torch.save(lavis_wrapper(full), out("blip_finetunes", FULL))
    torch.save({**{f"unet.{k}": unet[k] for k in CHANGED}, "ctx_embeddings_cache": subject},
               out("blip_finetunes", PARTIAL))
    host = host_models.diffusers_unet_to_host(unet, json.loads((unet_dir / "config.json").read_text()))
    save_file({k: v.contiguous() for k, v in host.items()}, str(out("diffusion_models", DIRECT_UNET)))
    made.append(Path(save_subject(Subject(subject, CATEGORY, {}), str(models / "blip_subjects"), SUBJECT_FILE)))
    n_unet = len(unet)
    del base, unet, host, full
    yield n_unet
    for p in made:
        p.unlink(missing_ok=True)


def render(model: list, subject: list, prefix: str, extra: dict, prompt=PROMPT, reps=20) -> dict:
    """Load BLIP-Diffusion's CLIP + ``model`` + ``subject`` -> Subject Conditioning -> PNDM -> SaveLatent."""
    g = {
        "loader": {"class_type": "BlipDiffusionLoader", "inputs": {"model_name": TEST_MODEL}},
        "positive": {"class_type": "SubjectConditioning", "inputs": {
            "clip": ["loader", 1], "subject": subject, "prompt": prompt, "target_category": "",
            "prompt_strength": 1.0, "prompt_reps": reps}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["loader", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "sigmas": {"class_type": "BlipPNDMScheduler", "inputs": {"model": model, "steps": STEPS}},
        "sampler": {"class_type": "BlipPNDMSampler", "inputs": {"full_denoise": True}},
        "sample": {"class_type": "SamplerCustom", "inputs": {
            "model": model, "add_noise": True, "noise_seed": SEED, "cfg": 7.5, "positive": ["positive", 0],
            "negative": ["negative", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
        "save_latent": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0],
                                                                "filename_prefix": f"latents/{prefix}"}},
    }
    g.update(extra)
    return g


def lavis_render(name: str, category: str = "") -> dict:
    return render(["lavis", 0], ["lavis", 1], "lavis", {"lavis": {"class_type": "LoadLavisFinetune", "inputs": {
        "model": ["loader", 0], "checkpoint_name": name, "category": category}}})


def subject_file_render(model: list, prefix: str, extra: dict, **kw) -> dict:
    return render(model, ["subject", 0], prefix, {
        "subject": {"class_type": "LoadSubject", "inputs": {"subject_name": f"{SUBJECT_FILE}.safetensors"}},
        **extra}, **kw)


def latent(server, result) -> torch.Tensor:
    entry = result.outputs["save_latent"]["latents"][0]
    return load_file(str(server.base_dir / "output" / entry["subfolder"] / entry["filename"]))["latent_tensor"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def base_before(comfy_server, files):
    """The base MODEL with the same subject, before any checkpoint was loaded."""
    from blip_diffusion.api.client import ComfyClient

    return latent(comfy_server, ComfyClient(comfy_server.url).run(subject_file_render(["loader", 0], "base", {})))


@pytest.fixture(scope="module")
def direct(comfy_server, files):
    """The same weights set directly: the changed UNet through the host's UNETLoader, the subject from its file."""
    from blip_diffusion.api.client import ComfyClient

    g = subject_file_render(["unet", 0], "direct", {"unet": {"class_type": "UNETLoader", "inputs": {
        "unet_name": DIRECT_UNET, "weight_dtype": "default"}}})
    return latent(comfy_server, ComfyClient(comfy_server.url).run(g, timeout=900))


@pytest.fixture(scope="module")
def full(comfy_server, files):
    """The render through Load LAVIS Fine-tune of the runner's checkpoint_3.pth, and the server log it made."""
    from blip_diffusion.api.client import ComfyClient

    start = len(comfy_server.log())
    result = ComfyClient(comfy_server.url).run(lavis_render(FULL), timeout=900)
    return latent(comfy_server, result), comfy_server.log()[start:]


@pytest.fixture(scope="module")
def partial(comfy_server, files):
    """The same through the partial checkpoint (the changed tensors only, a bare state dict)."""
    from blip_diffusion.api.client import ComfyClient

    start = len(comfy_server.log())
    result = ComfyClient(comfy_server.url).run(lavis_render(PARTIAL, category=CATEGORY), timeout=900)
    return latent(comfy_server, result), comfy_server.log()[start:]


def test_lavis_checkpoint_renders_like_the_weights_set_directly(files, base_before, direct, full):
    got, log = full
    diff, vs_base = rel(got, direct), rel(direct, base_before)
    print(f"LAVIS checkpoint vs weights set directly: max |diff| {(got - direct).abs().max().item():.3g} "
          f"(relative {diff:.3g}); fine-tuned vs base render: relative {vs_base:.3g}")
    assert diff <= 1e-5
    assert vs_base > 0.05, "the fine-tuned weights hardly change the render: the test could not fail"
    assert f"LoadLavisFinetune: {FULL} replaced {files} of the {files} UNet tensors" in log, log[-3000:]


def test_partial_checkpoint_replaces_only_its_tensors(direct, partial):
    got, log = partial
    print(f"partial LAVIS checkpoint vs weights set directly: relative {rel(got, direct):.3g}")
    assert rel(got, direct) <= 1e-5
    assert f"{PARTIAL} replaced {len(CHANGED)} of the" in log, log[-3000:]
    assert "a partial checkpoint: the others keep the base model's weights" in log


def test_base_model_renders_as_before(comfy_server, api, base_before, full, partial):
    """After both checkpoints were applied to it, the base MODEL object renders as before. The graph differs
    only in prompt_reps (21 instead of 20; the window holds fewer repetitions, so the tokens are the same):
    the host cannot serve it from its cache."""
    after = latent(comfy_server, api.run(subject_file_render(["loader", 0], "base_again", {}, reps=21)))
    assert torch.equal(after, base_before)


# -- the reader, in-process ---------------------------------------------------------------------------
def small_sd(width=768) -> dict:
    return {"unet.conv_in.weight": torch.randn(8, 4, 3, 3), "unet.conv_in.bias": torch.randn(8),
            "ctx_embeddings_cache": torch.randn(1, 16, width), "text_encoder.text_model.embeddings.position_ids":
            torch.arange(77)[None], "proj_layer.dense1.weight": torch.randn(4, 4)}


def test_reader_takes_the_runner_wrapper_and_a_bare_state_dict(tmp_path):
    sd = small_sd()
    torch.save(lavis_wrapper(sd), tmp_path / "checkpoint_3.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "bare.pt", _use_new_zipfile_serialization=False)
    for name in ("checkpoint_3.pth", "bare.pt"):
        ft = lc.read_checkpoint(str(tmp_path / name))
        assert sorted(ft.unet) == ["conv_in.bias", "conv_in.weight"]
        assert torch.equal(ft.unet["conv_in.weight"], sd["unet.conv_in.weight"])
        assert torch.equal(ft.subject, sd["ctx_embeddings_cache"]) and ft.subject.dtype == torch.float32
        assert ft.not_applied == [] and ft.unused == 2
    wrapped = lc.read_checkpoint(str(tmp_path / "checkpoint_3.pth"))
    assert (wrapped.category, wrapped.step) == ("teapot", 3)
    assert lc.read_checkpoint(str(tmp_path / "bare.pt")).category is None


def test_reader_names_what_it_does_not_apply(tmp_path):
    sd = {**small_sd(), "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight": torch.randn(4, 4)}
    torch.save({"model": sd}, tmp_path / "c.pth")
    assert lc.read_checkpoint(str(tmp_path / "c.pth")).not_applied == [
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight"]


@pytest.mark.parametrize("content, words", [
    ({"model": {"encoder.weight": torch.zeros(2)}}, ["is not a LAVIS BLIP-Diffusion checkpoint",
                                                      "it holds encoder.weight"]),
    ([torch.zeros(2)], ["holds a list, not a state dict"]),
    ({"model": {"unet.conv_in.weight": torch.zeros(2)}}, ["no 'ctx_embeddings_cache'"]),
    ({"unet.conv_in.weight": torch.zeros(2), "ctx_embeddings_cache": torch.zeros(16, 768)},
     ["'ctx_embeddings_cache' has shape (16, 768)", "(1, 16, 768)"]),
    ({"ctx_embeddings_cache": torch.full((1, 16, 768), float("nan"))}, ["NaN or infinite", "earlier checkpoint"]),
    ({"model": {"unet.conv_in.weight": torch.zeros(2)}, "args": argparse.Namespace(lr=1e-5)},
     ["(argparse.Namespace)", "would run code from the file", "weights_only=True", "refuses"]),
])
def test_reader_errors_say_what_is_wrong(tmp_path, content, words):
    torch.save(content, tmp_path / "bad.pth")
    with pytest.raises(lc.LavisCheckpointError) as e:
        lc.read_checkpoint(str(tmp_path / "bad.pth"))
    for w in words:
        assert w in str(e.value), str(e.value)
