"""Foundation: the host loads the pack, renders on generated weights, the generator writes
the released layout, and the reference environment runs on the same weights."""
import io
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from paths import ROOT
from refenv import offline_env, reference_python, run_reference

pytestmark = pytest.mark.reference

SAMPLE_IMAGE = ROOT / "workflows" / "assets" / "sample_subject.png"


def test_host_loads_pack_without_import_failure(comfy_server, api):
    log = comfy_server.log()
    line = [ln for ln in log.splitlines() if re.search(r"seconds.*custom_nodes/blip_diffusion\b", ln)]
    assert line, "the pack's import line is missing from the host log"
    assert "IMPORT FAILED" not in line[0], line[0]
    assert "Cannot import" not in log and "comfy_entrypoint" not in log, log[-4000:]


def host_only_graph(seed: int, size: int = 64) -> dict:
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "blipdiff-test-unet.safetensors",
                                                          "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": "blipdiff-test-clip.bin",
                                                          "type": "stable_diffusion"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "blipdiff-test-vae.bin"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "a dog on a beach"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "host_only"}},
    }


def test_host_only_sd_graph_renders_on_generated_weights(api):
    result = api.run(host_only_graph(seed=1))
    images = result.images()
    assert len(images) == 1
    img = np.asarray(Image.open(io.BytesIO(api.view(images[0]))))
    assert img.shape == (64, 64, 3)
    assert img.std() > 0  # a real decode of noise, not a blank frame


def expected_qformer_layout(vit_layers=23, qformer_layers=12) -> dict:
    """Key -> shape, written out from REFERENCE.md's description of the released weights."""
    q, v = 768, 1024
    keys = {
        "query_tokens": (1, 16, q),
        "embeddings.word_embeddings.weight": (30523, q),
        "embeddings.position_embeddings.weight": (512, q),
        "embeddings.position_ids": (1, 512),
        "embeddings.LayerNorm.weight": (q,), "embeddings.LayerNorm.bias": (q,),
        "proj_layer.dense1.weight": (4 * q, q), "proj_layer.dense1.bias": (4 * q,),
        "proj_layer.dense2.weight": (q, 4 * q), "proj_layer.dense2.bias": (q,),
        "proj_layer.LayerNorm.weight": (q,), "proj_layer.LayerNorm.bias": (q,),
        "visual_encoder.embeddings.class_embedding": (1, 1, v),
        "visual_encoder.embeddings.position_embedding": (1, 257, v),
        "visual_encoder.embeddings.patch_embedding.weight": (v, 3, 14, 14),
    }
    for ln in ("pre_layernorm", "post_layernorm"):
        keys[f"visual_encoder.{ln}.weight"] = keys[f"visual_encoder.{ln}.bias"] = (v,)
    for n in range(vit_layers):
        p = f"visual_encoder.encoder.layers.{n}."
        for ln in ("layer_norm1", "layer_norm2"):
            keys[p + ln + ".weight"] = keys[p + ln + ".bias"] = (v,)
        keys.update({p + "self_attn.qkv.weight": (3 * v, v), p + "self_attn.qkv.bias": (3 * v,),
                     p + "self_attn.projection.weight": (v, v), p + "self_attn.projection.bias": (v,),
                     p + "mlp.fc1.weight": (4 * v, v), p + "mlp.fc1.bias": (4 * v,),
                     p + "mlp.fc2.weight": (v, 4 * v), p + "mlp.fc2.bias": (v,)})
    for n in range(qformer_layers):
        p = f"encoder.layer.{n}."
        for att, kv in (("attention", q), ("crossattention", v)):
            for proj, width in (("query", q), ("key", kv), ("value", kv)):
                keys[f"{p}{att}.attention.{proj}.weight"] = (q, width)
                keys[f"{p}{att}.attention.{proj}.bias"] = (q,)
            keys[f"{p}{att}.output.dense.weight"] = (q, q)
            keys[f"{p}{att}.output.dense.bias"] = (q,)
            keys[f"{p}{att}.output.LayerNorm.weight"] = keys[f"{p}{att}.output.LayerNorm.bias"] = (q,)
        for suffix in ("", "_query"):
            keys[f"{p}intermediate{suffix}.dense.weight"] = (4 * q, q)
            keys[f"{p}intermediate{suffix}.dense.bias"] = (4 * q,)
            keys[f"{p}output{suffix}.dense.weight"] = (q, 4 * q)
            keys[f"{p}output{suffix}.dense.bias"] = (q,)
            keys[f"{p}output{suffix}.LayerNorm.weight"] = keys[f"{p}output{suffix}.LayerNorm.bias"] = (q,)
    return keys


def test_generator_writes_released_qformer_layout_at_full_size(tmp_path):
    out = tmp_path / "full"
    proc = subprocess.run([str(reference_python()), str(ROOT / "scripts" / "make_weights.py"), "--size", "full",
                           "--components", "qformer", "--out", str(out)],
                          capture_output=True, text=True, env=offline_env(), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import torch

    sd = torch.load(out / "qformer" / "pytorch_model.bin", weights_only=True, map_location="cpu", mmap=True)
    got = {k: tuple(t.shape) for k, t in sd.items()}
    want = expected_qformer_layout()
    assert sorted(set(want) - set(got)) == [], "missing keys"
    assert sorted(set(got) - set(want)) == [], "unexpected keys"
    assert {k: s for k, s in got.items() if want[k] != s} == {}, "wrong shapes"


def test_generated_folder_has_released_layout(test_model_dir):
    import json

    index = json.loads((test_model_dir / "model_index.json").read_text())
    assert index["qformer"] == ["blip_diffusion", "Blip2QFormerModel"]
    assert index["text_encoder"] == ["blip_diffusion", "ContextCLIPTextModel"]
    assert index["ctx_begin_pos"] == 2
    for part, weights in [("qformer", "pytorch_model.bin"), ("text_encoder", "pytorch_model.bin"),
                          ("unet", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin")]:
        assert (test_model_dir / part / weights).is_file(), part
        assert (test_model_dir / part / "config.json").is_file(), part
    assert "tokenizer" not in json.loads((test_model_dir / "qformer" / "config.json").read_text())
    for f in ("tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
              "image_processor/preprocessor_config.json"):
        assert (test_model_dir / f).is_file(), f


def test_reference_pipeline_runs_on_generated_weights(test_model_dir):
    out = run_reference("pipeline.py", {
        "model_dir": str(test_model_dir), "image": str(SAMPLE_IMAGE), "prompt": "swimming underwater",
        "source_category": "dog", "steps": 2, "height": 64, "width": 64, "seed": 3})
    image = out["image"]
    assert image.shape == (1, 3, 64, 64)
    assert bool(((image >= 0) & (image <= 1)).all())
    assert out["final_latents"].shape == (1, 4, 8, 8)
    assert out["text_embeddings"].shape == (2, 77, 768)


def test_a_part_built_alone_equals_the_same_part_of_a_whole_build(test_model_dir, tmp_path):
    """Parts are seeded one by one: the full-size encoder test builds only qformer/ (1.9 GB, not 7 GB)."""
    import json
    import torch

    out = tmp_path / "alone"
    cmd = [str(reference_python()), str(ROOT / "scripts" / "make_weights.py"), "--size", "test",
           "--components", "qformer", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=offline_env(), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "unet").exists() and json.loads((out / ".complete").read_text())["parts"] == ["qformer"]
    alone = torch.load(out / "qformer" / "pytorch_model.bin", weights_only=True, map_location="cpu")
    whole = torch.load(test_model_dir / "qformer" / "pytorch_model.bin", weights_only=True, map_location="cpu")
    assert alone.keys() == whole.keys()
    assert [k for k in alone if not torch.equal(alone[k], whole[k])] == []
    # Asking again for a part that is there builds nothing: the folder is left untouched.
    stamp = (out / ".complete").stat().st_mtime_ns
    proc = subprocess.run(cmd, capture_output=True, text=True, env=offline_env(), timeout=600)
    assert proc.returncode == 0 and (out / ".complete").stat().st_mtime_ns == stamp
