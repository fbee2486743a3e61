"""SubjectEncode and the encoder loader inside a real host, through its HTTP API."""
import uuid

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from blip_diffusion.api.client import ExecutionFailed, PromptRejected
from blip_diffusion.blip_core import encoder_weights
from blip_diffusion.blip_core.subject_io import load_subject
from graphs import put_input_image
from paths import ROOT, TEST_MODEL

SAMPLE = ROOT / "workflows" / "assets" / "sample_subject.png"


def encode_graph(image: str, category: str, name: str, encoder_node=None, weights: str = "", second=None):
    g = {
        "loader": encoder_node or {"class_type": "BlipDiffusionLoader", "inputs": {"model_name": TEST_MODEL}},
        "img": {"class_type": "LoadImage", "inputs": {"image": image}},
        "encode": {"class_type": "SubjectEncode", "inputs": {
            "subject_encoder": ["loader", 3 if encoder_node is None else 0], "images": ["img", 0],
            "category": category, "image_weights": weights}},
        "save": {"class_type": "SaveSubject", "inputs": {"subject": ["encode", 0], "name": name, "overwrite": True}},
    }
    if second:
        g["img2"] = {"class_type": "LoadImage", "inputs": {"image": second}}
        g["batch"] = {"class_type": "ImageBatch", "inputs": {"image1": ["img", 0], "image2": ["img2", 0]}}
        g["encode"]["inputs"]["images"] = ["batch", 0]
    return g


def as_host_image(path) -> torch.Tensor:
    """What LoadImage hands a node: RGB float in [0, 1], (1, H, W, 3)."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def direct_encoder(test_model_dir):
    return encoder_weights.load_released(str(test_model_dir))


def saved(server, name):
    return load_subject(str(server.base_dir / "models" / "blip_subjects" / f"{name}.safetensors"))


def test_node_equals_blip_core(comfy_server, api, direct_encoder, tmp_path):
    flipped = tmp_path / "flipped.png"
    Image.open(SAMPLE).transpose(Image.FLIP_LEFT_RIGHT).save(flipped)
    a, b = put_input_image(comfy_server, SAMPLE), put_input_image(comfy_server, flipped, "sample_flipped.png")
    name = f"t_{uuid.uuid4().hex[:8]}"
    api.run(encode_graph(a, "red teapot", name, weights="3, 1", second=b))
    subject = saved(comfy_server, name)
    batch = torch.cat([as_host_image(SAMPLE), as_host_image(flipped)])
    want = direct_encoder.encode(batch, "red teapot", weights=[3, 1])
    assert subject.category == "red teapot"
    assert subject.meta["images"] == 2
    assert (subject.embedding - want).abs().max().item() <= 1e-6
    # and the weights were honoured: the plain mean is measurably different
    assert (subject.embedding - direct_encoder.encode(batch, "red teapot")).abs().max().item() > 1e-4


def test_blank_category_is_refused_before_running(comfy_server, api):
    image = put_input_image(comfy_server, SAMPLE)
    with pytest.raises(PromptRejected, match="category is empty"):
        api.run(encode_graph(image, "   ", "never"))


def test_too_long_category_names_the_limit(comfy_server, api):
    image = put_input_image(comfy_server, SAMPLE)
    with pytest.raises(ExecutionFailed, match="category is too long.*512"):
        api.run(encode_graph(image, "dog " * 600, "never"))


def test_wrong_number_of_weights(comfy_server, api):
    image = put_input_image(comfy_server, SAMPLE)
    with pytest.raises(ExecutionFailed, match="image_weights has 2 numbers but 1 images"):
        api.run(encode_graph(image, "teapot", "never", weights="1, 2"))


def test_foreign_and_wrong_size_weight_files(comfy_server, api, direct_encoder, test_model_dir):
    folder = comfy_server.base_dir / "models" / "blip_diffusion"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4)}, str(folder / "not_an_encoder.safetensors"))
    sd = {k: v.contiguous() for k, v in direct_encoder.state_dict().items()}
    # a cross-attention sized for a 1280-wide vision tower, beside a 1024-wide one
    sd["encoder.layer.0.crossattention.attention.key.weight"] = torch.zeros(768, 1280)
    save_file(sd, str(folder / "wrong_size_encoder.safetensors"))
    image = put_input_image(comfy_server, SAMPLE)
    loader = {"class_type": "BlipSubjectEncoderLoader", "inputs": {"encoder_name": "not_an_encoder.safetensors"}}
    with pytest.raises(ExecutionFailed, match="not a BLIP-Diffusion subject encoder"):
        api.run(encode_graph(image, "teapot", "never", encoder_node=loader))
    loader["inputs"]["encoder_name"] = "wrong_size_encoder.safetensors"
    with pytest.raises(ExecutionFailed, match="wrong shapes.*crossattention.attention.key.weight"):
        api.run(encode_graph(image, "teapot", "never", encoder_node=loader))
    # the server keeps serving: a good prompt still runs
    name = f"ok_{uuid.uuid4().hex[:8]}"
    api.run(encode_graph(image, "teapot", name))
    assert saved(comfy_server, name).embedding.shape == (1, 16, 768)


def test_zero_size_image_batch_is_refused():
    from conftest import comfy_on_path

    comfy_on_path()
    from blip_diffusion.nodes.nodes_encoder import SubjectEncode

    with pytest.raises(ValueError, match="empty image batch"):
        SubjectEncode.execute(None, torch.zeros(0, 64, 64, 3), "dog")


def test_an_image_with_nan_pixels_is_refused():
    # clamp keeps NaN and the cast to bytes would give an arbitrary colour: the photo, the fine-tune's
    # training images and the photo to edit all pass through this one conversion
    from blip_diffusion.blip_core.preprocess import to_uint8_rgb

    image = torch.full((1, 8, 8, 3), 0.5)
    image[0, 2, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_rgb(image)
    assert to_uint8_rgb(torch.full((1, 8, 8, 3), 0.5)).eq(128).all()


def test_half_precision_encoder_keeps_the_fp32_fingerprint_and_returns_an_fp32_mean(test_model_dir):
    """On a GPU the encoder runs in bf16/fp16; subject files made there must still match the same
    weights loaded on a CPU machine, and the weighted mean must not be rounded to half precision."""
    from conftest import comfy_on_path

    comfy_on_path()
    from blip_diffusion.nodes.nodes_encoder import load_encoder

    qformer = str(test_model_dir / "qformer")
    fp32 = load_encoder(qformer, "test", dtype=torch.float32)
    bf16 = load_encoder(qformer, "test", dtype=torch.bfloat16)
    assert next(bf16.encoder.parameters()).dtype == torch.bfloat16
    assert bf16.fingerprint == fp32.fingerprint
    images = torch.cat([as_host_image(SAMPLE), as_host_image(SAMPLE).flip(2)])
    with torch.inference_mode():
        mean = bf16.encoder.encode(images, "teapot", weights=[3, 1])
    assert mean.dtype == torch.float32
    assert not torch.equal(mean, mean.to(torch.bfloat16).float())  # finer than bf16's grid


def test_weights_near_the_float_limit_still_average():
    from blip_diffusion.blip_core.subject_encoder import _normalised_weights

    assert _normalised_weights([1e308, 1e308], 2).tolist() == [0.5, 0.5]
    assert _normalised_weights([3.0, 1.0], 2).tolist() == [0.75, 0.25]
