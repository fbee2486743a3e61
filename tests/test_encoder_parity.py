"""Subject encoder vs the reference (diffusers' BLIP-Diffusion Q-Former in its own environment).

One reference run per module computes everything compared here: preprocessed pixels, token
ids, per-image subject embeddings, a padded multi-category batch and the category length limit.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from blip_diffusion.blip_core.bert_tokenizer import default_tokenizer
from blip_diffusion.blip_core.encoder_weights import (
    LAVIS_FILES, load_lavis, load_released, load_single_file, load_subject_encoder, read_tensors)
from blip_diffusion.blip_core.preprocess import CLIP_MEAN, CLIP_STD, preprocess
from blip_diffusion.blip_core.subject_encoder import SubjectEncoderConfig
from encoder_files import save_lavis_folder, save_single_file, to_lavis_state_dict
from refenv import run_reference

pytestmark = pytest.mark.reference

TOL = 1e-5  # subject embedding, fp32 (noise floor of the reference itself ~4e-6)
LIMIT = 512  # the Q-Former's position table; queries take no positions


def _image(shape, seed):
    g = torch.Generator().manual_seed(seed)
    h, w, c = shape
    # smooth structure plus noise, so resampling filters matter
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([(xx * (k + 1) + yy * (c - k)) % 1 for k in range(c)], -1) * 200
    return (base + torch.randint(0, 56, (h, w, c), generator=g)).clamp(0, 255).to(torch.uint8)


def _rgba():
    img = _image((256, 320, 4), 5)
    img[:40, :, 3] = 0      # fully transparent band
    img[40:80, :, 3] = 255  # opaque band
    return img


IMAGES = {
    "tall": _image((300, 200, 3), 1),
    "wide": _image((180, 410, 3), 2),
    "square": _image((224, 224, 3), 3),
    "small": _image((17, 23, 3), 4),
    "large": _image((480, 640, 3), 6),
    "rgba": _rgba(),
    "rgba_opaque": torch.cat([_image((200, 260, 3), 7), torch.full((200, 260, 1), 255, dtype=torch.uint8)], -1),
    "gray": _image((150, 190, 1), 8),
}
MULTI = ["m0", "m1", "m2"]  # same size, as a ComfyUI batch
IMAGES.update({k: _image((210, 330, 3), 20 + j) for j, k in enumerate(MULTI)})


def _over_white(rgba: torch.Tensor) -> torch.Tensor:
    """Independent alpha-over-white compositing in float64 on the bytes (what the pack documents)."""
    a = rgba[..., 3:].double() / 255
    return (rgba[..., :3].double() * a + 255 * (1 - a)).round().to(torch.uint8)


# What the reference is shown: a transparent RGBA image composited over white beforehand (the
# reference would drop alpha); everything else as is, RGBA/L handled by the reference itself.
REF_IMAGES = {k: (_over_white(v) if k == "rgba" else v) for k, v in IMAGES.items()}

CASES = [(k, "dog") for k in IMAGES] + [
    ("tall", "red sports car"),
    ("wide", "Teddy Bear"),
    ("square", "xqzvbrtlkw"),           # out of vocabulary: split into word pieces
    ("gray", "🐶 puppy"),                # [UNK]
    ("rgba", "Café's naïve chair"),
    ("small", " ".join(["dog"] * (LIMIT - 2))),  # exactly at the position-table limit
]
TOO_LONG = " ".join(["dog"] * (LIMIT - 1))
BATCH = (["tall", "wide", "gray"], ["dog", "red sports car", "cat"])  # padded to different lengths
TOKEN_STRINGS = [
    "dog", "red sports car", "Café au lait", "naïve RÉSUMÉ", "e\u0301cole", "dog's toy!", "UPPER Case",
    "xqzvbrtlkw", "🐶 puppy", "狗 dog", "  spaced\tout\n", "a" * 120, "[MASK] token [mask]",
    "hello-world,foo.bar", "ﬁsh Ⅻ", "İstanbul", "ctrl\x00\x07char",
]


def _float(img_u8: torch.Tensor) -> torch.Tensor:
    return (img_u8.float() / 255)[None]


@pytest.fixture(scope="module")
def reference(test_model_dir):
    args = {"model_dir": str(test_model_dir), "cases": CASES, "batch_cases": [BATCH],
            "fail_cases": [["tall", TOO_LONG]], "token_strings": TOKEN_STRINGS}
    return run_reference("encode.py", args, {f"img_{k}": v for k, v in REF_IMAGES.items()})


@pytest.fixture(scope="module")
def encoder(test_model_dir):
    return load_released(str(test_model_dir / "qformer"))


@pytest.fixture(scope="module")
def ours(encoder):
    """Our subject embedding of every case, keyed like the reference's emb_<i>."""
    return {i: encoder.encode(_float(IMAGES[key]), category) for i, (key, category) in enumerate(CASES)}


def test_config_from_released_json(test_model_dir, encoder):
    conf = json.load(open(test_model_dir / "qformer" / "config.json"))
    c = encoder.config
    assert c.vision.num_hidden_layers == conf["vision_config"]["num_hidden_layers"]
    assert c.vision.layer_norm_eps == conf["vision_config"]["layer_norm_eps"]
    assert c.qformer.num_hidden_layers == conf["qformer_config"]["num_hidden_layers"]
    assert c.qformer.layer_norm_eps == conf["qformer_config"]["layer_norm_eps"]
    assert c.qformer.cross_attention_frequency == conf["qformer_config"]["cross_attention_frequency"]
    assert c.num_query_tokens == conf["num_query_tokens"]
    del conf["vision_config"]["layer_norm_eps"]  # the published config omits it: transformers' default
    assert SubjectEncoderConfig.from_dict(conf).vision.layer_norm_eps == 1e-6


def test_state_dict_keys_are_released_ones(test_model_dir, encoder):
    released = read_tensors(str(test_model_dir / "qformer" / "pytorch_model.bin"))
    assert set(encoder.state_dict()) == set(released) - {"embeddings.position_ids"}


def test_tokenizer_matches_reference(reference):
    tok = default_tokenizer()
    for i, s in enumerate(TOKEN_STRINGS):
        ids, mask = tok(s)
        assert ids.tolist() == reference[f"ids_{i}"].long().tolist(), s
        assert mask.tolist() == reference[f"mask_{i}"].long().tolist(), s
    ids, mask = tok(TOKEN_STRINGS)
    assert torch.equal(ids, reference["batch_ids"].long())
    assert torch.equal(mask, reference["batch_mask"].long())
    assert tok.vocab["[DEC]"] == 30522


def test_preprocess_matches_reference(reference):
    for key, img in IMAGES.items():
        diff = (preprocess(_float(img)) - reference[f"pix_{key}"]).abs().max().item()
        assert diff <= 1e-6, (key, diff)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{k}-{c[:20]}" for k, c in CASES])
def test_embedding_matches_reference(reference, ours, i):
    ref = reference[f"emb_{i}"]
    assert ours[i].shape == ref.shape == (1, 16, 768)
    err = (ours[i] - ref).abs().max().item()
    print(f"case {CASES[i][0]} / {CASES[i][1][:20]!r}: max abs err {err:.2e}")
    assert err <= TOL


def test_multi_image_mean_and_weighted_mean(encoder, reference):
    """A ComfyUI batch (one size) of one subject: mean / weighted mean of per-image references."""
    idx = [CASES.index((k, "dog")) for k in MULTI]
    per = torch.cat([reference[f"emb_{i}"] for i in idx])
    batch = torch.cat([_float(IMAGES[k]) for k in MULTI])
    mean = encoder.encode(batch, "dog")
    err = (mean - per.mean(0, keepdim=True)).abs().max().item()
    w = torch.tensor([2.0, 5.0, 3.0])  # normalised to sum 1 by the encoder
    weighted = encoder.encode(batch, "dog", weights=w.tolist())
    werr = (weighted - (w[:, None, None] / w.sum() * per).sum(0, keepdim=True)).abs().max().item()
    print(f"mean of 3: max abs err {err:.2e}; weighted mean: {werr:.2e}")
    assert mean.shape == weighted.shape == (1, 16, 768)
    assert err <= TOL and werr <= TOL
    assert (weighted - mean).abs().max().item() > 100 * TOL  # the weights do change the result


def test_padded_batch_matches_reference(encoder, reference):
    keys, categories = BATCH
    pixels = torch.cat([preprocess(_float(IMAGES[k])) for k in keys])
    ids, mask = default_tokenizer()(categories)
    assert (mask == 0).any()  # the batch really is padded
    ours = encoder(pixels, ids, mask)
    err = (ours - reference["batch_emb_0"]).abs().max().item()
    print(f"padded batch: max abs err {err:.2e}")
    assert err <= TOL


def test_category_length_limit(encoder, reference):
    assert encoder.config.max_text_tokens == LIMIT
    assert default_tokenizer()(CASES[-1][1])[0].shape[1] == LIMIT  # the parity case sits at the limit
    assert reference["fail_0"].item() == 1.0  # one token more breaks the reference
    with pytest.raises(ValueError, match="too long"):
        encoder.encode(_float(IMAGES["tall"]), TOO_LONG)


def test_lavis_mode_matches_torchvision():
    tv = pytest.importorskip("torchvision.transforms")
    transform = tv.Compose([tv.Resize(224, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(224),
                            tv.ToTensor(), tv.Normalize(CLIP_MEAN, CLIP_STD)])
    for key in ["tall", "wide", "small", "large", "square"]:
        expected = transform(Image.fromarray(IMAGES[key].numpy()))[None]
        diff = (preprocess(_float(IMAGES[key]), mode="lavis") - expected).abs().max().item()
        assert diff <= 1e-6, (key, diff)
    assert not torch.allclose(preprocess(_float(IMAGES["wide"]), mode="lavis"), preprocess(_float(IMAGES["wide"])))


@pytest.fixture(scope="module")
def lavis_dir(test_model_dir, tmp_path_factory):
    released = read_tensors(str(test_model_dir / "qformer" / "pytorch_model.bin"))
    lavis = to_lavis_state_dict(released)
    # LAVIS training heads that a real checkpoint carries and the loader must ignore
    lavis.update({"blip.Qformer.cls.predictions.bias": torch.zeros(30523),
                  "blip.vision_proj.weight": torch.zeros(256, 768), "blip.text_proj.weight": torch.zeros(256, 768),
                  "blip.itm_head.weight": torch.zeros(2, 768), "blip.temp": torch.tensor(0.07)})
    d = tmp_path_factory.mktemp("lavis")
    save_lavis_folder(lavis, d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_lavis_layout_gives_identical_embedding(encoder, ours, lavis_dir):
    assert set(LAVIS_FILES.values()) <= {str(p.relative_to(lavis_dir)) for p in lavis_dir.rglob("*.pt")}
    blip = torch.load(lavis_dir / LAVIS_FILES["blip"], weights_only=True)
    assert "visual_encoder.transformer.resblocks.0.attn.in_proj_weight" in blip
    assert blip["visual_encoder.class_embedding"].shape == (1024,)
    lavis = load_lavis(str(lavis_dir), vision_layer_norm_eps=encoder.config.vision.layer_norm_eps)
    assert lavis.config == encoder.config
    assert torch.equal(lavis.encode(_float(IMAGES["tall"]), "dog"), ours[0])
    default = load_subject_encoder(str(lavis_dir))  # recognised as LAVIS; LAVIS's own eps
    assert default.config.vision.layer_norm_eps == 1e-5
    assert default.config.vision.num_hidden_layers == encoder.config.vision.num_hidden_layers


def test_single_file_roundtrip(encoder, ours, tmp_path):
    path = str(tmp_path / "encoder.safetensors")
    save_single_file(encoder, path)
    loaded = load_subject_encoder(path)
    assert loaded.config == encoder.config
    assert torch.equal(loaded.encode(_float(IMAGES["tall"]), "dog"), ours[0])


@pytest.fixture(scope="module")
def single_file_parts(encoder):
    sd = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    return sd, {"format": "pt", "config": json.dumps(encoder.config.to_dict())}


def _write(tmp_path, sd, meta):
    path = str(tmp_path / "broken.safetensors")
    save_file(sd, path, metadata=meta)
    return path


def test_missing_key_is_named(single_file_parts, tmp_path):
    sd, meta = single_file_parts
    sd = dict(sd)
    del sd["encoder.layer.1.output.LayerNorm.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): encoder\.layer\.1\.output\.LayerNorm\.bias"):
        load_single_file(_write(tmp_path, sd, meta))


def test_wrong_shape_and_unexpected_key_are_named(single_file_parts, tmp_path):
    sd, meta = single_file_parts
    sd = dict(sd, **{"proj_layer.dense1.weight": torch.zeros(3072, 700), "extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"proj_layer\.dense1\.weight \(3072, 700\) \(expected \(3072, 768\)\)") as e:
        load_single_file(_write(tmp_path, sd, meta))
    assert "unexpected keys (1): extra.weight" in str(e.value)


def test_config_disagreeing_with_weights(test_model_dir, tmp_path):
    conf = json.load(open(test_model_dir / "qformer" / "config.json"))
    conf["qformer_config"]["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(conf))
    os.symlink(test_model_dir / "qformer" / "pytorch_model.bin", tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): encoder\.layer\.2\."):
        load_released(str(tmp_path))


def test_not_an_encoder(tmp_path):
    path = str(tmp_path / "clip.safetensors")
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(ValueError, match="not a BLIP-Diffusion subject encoder"):
        load_subject_encoder(path)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a readable weights file"):
        load_subject_encoder(str(junk))


def test_input_errors(encoder):
    img = _float(IMAGES["tall"])
    for blank in ["", "   ", "\t\n"]:
        with pytest.raises(ValueError, match="blank"):
            encoder.encode(img, blank)
    with pytest.raises(ValueError, match="empty image"):
        encoder.encode(torch.zeros(1, 0, 10, 3), "dog")
    with pytest.raises(ValueError, match="empty image"):
        encoder.encode(torch.zeros(0, 10, 10, 3), "dog")
    with pytest.raises(ValueError, match="channels"):
        encoder.encode(torch.zeros(1, 10, 10, 5), "dog")
    two = torch.cat([img, img])
    for bad, msg in [([1.0], "2 images"), ([1.0, -0.5], "non-negative"), ([0.0, 0.0], "all be zero")]:
        with pytest.raises(ValueError, match=msg):
            encoder.encode(two, "dog", weights=bad)
    with pytest.raises(ValueError, match="mode"):
        encoder.encode(img, "dog", preprocessing="bilinear")


@pytest.mark.slow
def test_full_size_matches_reference():
    from conftest import generated_model_dir

    model_dir = generated_model_dir("full", "qformer")  # 1.9 GB, not the 7 GB of every full-size part
    encoder = load_released(str(model_dir))
    assert encoder.config.vision.num_hidden_layers == 23 and encoder.config.qformer.num_hidden_layers == 12
    cases = [("wide", "dog"), ("rgba_opaque", "red sports car")]
    ref = run_reference("encode.py", {"model_dir": str(model_dir), "cases": cases},
                        {f"img_{k}": REF_IMAGES[k] for k, _ in cases})
    for i, (key, category) in enumerate(cases):
        err = (encoder.encode(_float(IMAGES[key]), category) - ref[f"emb_{i}"]).abs().max().item()
        print(f"full size {key} / {category}: max abs err {err:.2e}")
        assert err <= TOL
