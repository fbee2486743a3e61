"""Subject interpolation: the blend maths, the two nodes, and one graph through a real host.

Expected values are written out here from the definitions (weighted sums, rotations in a
plane), never taken from the module under test.
"""
import math
import uuid

import pytest
import torch
from PIL import Image, ImageOps

from blip_diffusion.blip_core.interpolate import bilinear, lerp, slerp
from blip_diffusion.blip_core.subject import Subject
from paths import ROOT, TEST_MODEL

SAMPLE = ROOT / "workflows" / "assets" / "sample_subject.png"


def rand(seed, shape=(1, 16, 768)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def four():
    return [rand(s) for s in (1, 2, 3, 4)]


def orthonormal_pairs():
    """16 pairs of orthogonal unit vectors in 768 dims, from a QR of random columns."""
    q, _ = torch.linalg.qr(torch.randn(768, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    return q[:, :16].T.unsqueeze(0).float(), q[:, 16:].T.unsqueeze(0).float()


# ---- two subjects -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fn", [lerp, slerp])
def test_endpoints_are_exact(fn, dtype, four):
    a, b = (x.to(dtype) for x in four[:2])
    assert torch.equal(fn(a, b, 0.0), a)
    assert torch.equal(fn(a, b, 1.0), b)
    assert torch.equal(fn(a, b, 0), a) and torch.equal(fn(a, b, 1), b)  # ints from a JSON prompt


def test_linear_midpoint_and_quarter(four):
    a, b = four[:2]
    mid = (a + b) / 2
    assert torch.allclose(lerp(a, b, 0.5), mid, rtol=1e-6, atol=1e-7)
    quarter = 0.75 * a.double() + 0.25 * b.double()
    assert torch.allclose(lerp(a, b, 0.25).double(), quarter, rtol=1e-6, atol=1e-7)


def test_slerp_of_orthogonal_unit_vectors_follows_the_arc():
    a, b = orthonormal_pairs()
    assert torch.allclose(slerp(a, b, 0.5), (a + b) / math.sqrt(2), atol=1e-6)
    # rotation by t * 90 degrees in the plane of a and b
    t = 1 / 3
    want = math.cos(t * math.pi / 2) * a + math.sin(t * math.pi / 2) * b
    assert torch.allclose(slerp(a, b, t), want, atol=1e-6)


def test_slerp_keeps_equal_norms_where_lerp_does_not(four):
    a, b = four[:2]
    a = a / a.norm(dim=-1, keepdim=True) * 3.0
    b = b / b.norm(dim=-1, keepdim=True) * 3.0
    for t in (0.1, 0.5, 0.9):
        norms = slerp(a, b, t).norm(dim=-1)
        assert torch.allclose(norms, torch.full_like(norms, 3.0), atol=1e-5), t
    # the chord's midpoint is shorter: the check above can fail
    assert (lerp(a, b, 0.5).norm(dim=-1) < 2.9).all()


def test_slerp_interpolates_lengths_linearly():
    a, b = orthonormal_pairs()
    out = slerp(2.0 * a, 5.0 * b, 0.25)
    norms = out.norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 0.75 * 2.0 + 0.25 * 5.0), atol=1e-5)


def test_slerp_falls_back_to_linear_where_undefined(four):
    a = four[0].clone()
    a[0, 3] = 0.0                       # a zero vector
    b = -a                              # every vector antiparallel
    b[0, 5] = 2.0 * a[0, 5]             # one parallel
    out = slerp(a, b, 0.25)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, 0.75 * a + 0.25 * b, atol=1e-6)


# ---- four subjects ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["linear", "spherical"])
def test_bilinear_corners_are_exact(mode, four):
    a, b, c, d = four
    for (u, v), corner in {(0, 0): a, (1, 0): b, (0, 1): c, (1, 1): d}.items():
        assert torch.equal(bilinear(a, b, c, d, u, v, mode), corner), (u, v)


def test_bilinear_center_is_the_mean_and_weights_follow_the_corner_convention(four):
    a, b, c, d = four
    assert torch.allclose(bilinear(a, b, c, d, 0.5, 0.5), (a + b + c + d) / 4, rtol=1e-6, atol=1e-6)
    u, v = 0.2, 0.7
    want = (1 - u) * (1 - v) * a + u * (1 - v) * b + (1 - u) * v * c + u * v * d
    assert torch.allclose(bilinear(a, b, c, d, u, v), want, atol=1e-6)


# ---- refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), float("inf"), "x"])
def test_factors_outside_the_unit_interval_are_refused(bad, four):
    a, b, c, d = four
    for fn in (lerp, slerp):
        with pytest.raises(ValueError, match=r"\bt\b"):
            fn(a, b, bad)
    with pytest.raises(ValueError, match=r"\bu\b"):
        bilinear(a, b, c, d, bad, 0.5)
    with pytest.raises(ValueError, match=r"\bv\b"):
        bilinear(a, b, c, d, 0.5, bad)


def test_different_widths_are_refused():
    a, b = rand(1), rand(2, (1, 16, 1024))
    for fn in (lerp, slerp):
        with pytest.raises(ValueError, match=r"1024.*768|768.*1024"):
            fn(a, b, 0.5)


# ---- nodes --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nodes():
    from conftest import comfy_on_path

    comfy_on_path()
    from blip_diffusion.nodes import nodes_interpolate

    return nodes_interpolate


def subjects(n=2):
    return [Subject(rand(10 + i), cat, {"encoder": "m", "encoder_fingerprint": "f00d"})
            for i, cat in zip(range(n), ["dog", "cat", "teapot", "shoe"])]


def test_node_category_choice_and_meta(nodes):
    a, b = subjects()
    run = nodes.SubjectInterpolate.execute
    assert run(a, b, 0.3, "linear", "a").args[0].category == "dog"
    assert run(a, b, 0.3, "linear", "b").args[0].category == "cat"
    out = run(a, b, 0.3, "spherical", "custom", "  robot dog ").args[0]
    assert out.category == "robot dog"
    info = out.meta["interpolation"]
    assert info["mode"] == "spherical" and info["t"] == 0.3
    assert info["categories"] == {"a": "dog", "b": "cat"} and set(info["sources"]) == {"a", "b"}
    assert out.meta["encoder_fingerprint"] == "f00d"
    with pytest.raises(ValueError, match="custom_category"):
        run(a, b, 0.3, "linear", "custom", " ")
    with pytest.raises(ValueError, match="1024"):
        run(a, Subject(rand(3, (1, 16, 1024)), "cat"), 0.3, "linear", "a")


def test_node4_corners_and_category(nodes):
    subs = subjects(4)
    run = nodes.SubjectInterpolate4.execute
    for (u, v), i in {(0.0, 0.0): 0, (1.0, 0.0): 1, (0.0, 1.0): 2, (1.0, 1.0): 3}.items():
        assert torch.equal(run(*subs, u, v, "spherical", "a").args[0].embedding, subs[i].embedding)
    out = run(*subs, 0.5, 0.5, "linear", "c").args[0]
    assert out.category == "teapot"
    mean = sum(s.embedding for s in subs) / 4
    assert torch.allclose(out.embedding, mean, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"\bv\b"):
        run(*subs, 0.5, 1.5, "linear", "a")


# ---- through the host's HTTP API ----------------------------------------------------------------

def test_interpolate_graph_saves_the_blend_of_the_encoded_subjects(comfy_server, api, tmp_path):
    from blip_diffusion.blip_core.subject_io import load_subject
    from graphs import put_input_image

    flipped = tmp_path / f"flipped_{uuid.uuid4().hex[:8]}.png"
    ImageOps.mirror(Image.open(SAMPLE)).save(flipped)
    img_a, img_b = put_input_image(comfy_server, SAMPLE), put_input_image(comfy_server, flipped)
    tag = uuid.uuid4().hex[:8]
    names = {k: f"interp_{tag}_{k}" for k in ("a", "b", "mix")}

    def save(node, name):
        return {"class_type": "SaveSubject", "inputs": {"subject": [node, 0], "name": name, "overwrite": True}}

    def encode(image_node, category):
        return {"class_type": "SubjectEncode", "inputs": {"subject_encoder": ["loader", 3],
                                                          "images": [image_node, 0], "category": category}}

    graph = {
        "loader": {"class_type": "BlipDiffusionLoader", "inputs": {"model_name": TEST_MODEL}},
        "img_a": {"class_type": "LoadImage", "inputs": {"image": img_a}},
        "img_b": {"class_type": "LoadImage", "inputs": {"image": img_b}},
        "enc_a": encode("img_a", "teapot"),
        "enc_b": encode("img_b", "kettle"),
        "mix": {"class_type": "SubjectInterpolate",
                "inputs": {"subject_a": ["enc_a", 0], "subject_b": ["enc_b", 0], "t": 0.25, "mode": "linear",
                           "category": "b"}},
        "save_a": save("enc_a", names["a"]), "save_b": save("enc_b", names["b"]),
        "save_mix": save("mix", names["mix"]),
    }
    api.run(graph)
    folder = comfy_server.base_dir / "models" / "blip_subjects"
    a, b, mix = (load_subject(str(folder / f"{names[k]}.safetensors")) for k in ("a", "b", "mix"))
    assert not torch.equal(a.embedding, b.embedding)  # the flip must give a different subject
    want = 0.75 * a.embedding.double() + 0.25 * b.embedding.double()
    assert torch.allclose(mix.embedding.double(), want, rtol=1e-6, atol=1e-7)
    assert mix.category == "kettle"
    assert mix.meta["interpolation"]["t"] == 0.25
    assert mix.meta["interpolation"]["sources"]["a"]["encoder"] == TEST_MODEL
